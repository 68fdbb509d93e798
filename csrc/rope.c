/* rope.c - RoPE / YaRN inverse frequencies and the in-place rotation.
 *
 * Compiled without FMA target attributes on purpose: every fp32 operation of
 * the table is rounded like torch's (no contraction into fused multiply-adds),
 * so the table matches transformers' to the last bit or so. */
#define _GNU_SOURCE
#include "rope.h"
#include "threadpool.h"

#include <math.h>

#define ROPE_MAX_DIM 1024

static double yarn_get_mscale(double scale, double mscale) {
    if (scale <= 1.0) return 1.0;
    return 0.1 * mscale * log(scale) + 1.0;
}

static double correction_dim(double num_rot, double dim, double base, double max_pos) {
    return (dim * log(max_pos / (num_rot * 2.0 * M_PI))) / (2.0 * log(base));
}

int dsv2_rope_inv_freq(float *inv_freq, float *attention_factor, int64_t dim, const dsv2_rope_cfg *cfg) {
    if (dim <= 0 || (dim & 1) || dim > ROPE_MAX_DIM) return DSV2_ERR_ARG;
    if (!(cfg->theta > 0.0) || !isfinite(cfg->theta)) return DSV2_ERR_ARG;
    const int64_t half = dim / 2;
    const float fdim = (float)dim, base = (float)cfg->theta;
    if (!cfg->yarn) {
        for (int64_t i = 0; i < half; i++) {
            float e = (float)(2 * i) / fdim;
            inv_freq[i] = 1.0f / powf(base, e);
        }
        *attention_factor = 1.0f;
        return DSV2_OK;
    }
    const double factor = cfg->factor;
    if (!(factor > 0.0) || !isfinite(factor) || !(cfg->original_max_pos > 0.0) || !(cfg->beta_fast > 0.0) ||
        !(cfg->beta_slow > 0.0))
        return DSV2_ERR_ARG;
    double af;
    if (cfg->has_attention_factor)
        af = cfg->attention_factor;
    else if (cfg->mscale != 0.0 && cfg->mscale_all_dim != 0.0)
        af = yarn_get_mscale(factor, cfg->mscale) / yarn_get_mscale(factor, cfg->mscale_all_dim);
    else
        af = yarn_get_mscale(factor, 1.0);
    if (!isfinite(af)) return DSV2_ERR_ARG;

    double low = correction_dim(cfg->beta_fast, (double)dim, cfg->theta, cfg->original_max_pos);
    double high = correction_dim(cfg->beta_slow, (double)dim, cfg->theta, cfg->original_max_pos);
    if (cfg->truncate) {
        low = floor(low);
        high = ceil(high);
    }
    if (low < 0.0) low = 0.0;
    if (high > (double)(dim - 1)) high = (double)(dim - 1);
    if (low == high) high += 0.001;
    const float flow = (float)low, frange = (float)(high - low), ffactor = (float)factor;
    for (int64_t i = 0; i < half; i++) {
        float e = (float)(2 * i) / fdim;
        float pos_freq = powf(base, e);
        float extrap = 1.0f / pos_freq;
        float interp = 1.0f / (ffactor * pos_freq);
        float ramp = ((float)i - flow) / frange;
        if (ramp < 0.0f) ramp = 0.0f;
        if (ramp > 1.0f) ramp = 1.0f;
        float ef = 1.0f - ramp; /* extrapolation weight */
        float a = interp * (1.0f - ef);
        float b = extrap * ef;
        inv_freq[i] = a + b;
    }
    *attention_factor = (float)af;
    return DSV2_OK;
}

typedef struct {
    float *x;
    int64_t ldt, ldh, heads, dim;
    const int64_t *pos;
    const float *inv_freq;
    float af;
    int interleaved;
} rope_job;

static void rope_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    const rope_job *j = (const rope_job *)ctx;
    const int64_t half = j->dim / 2;
    float cs[ROPE_MAX_DIM / 2], sn[ROPE_MAX_DIM / 2];
    for (int64_t t = b; t < e; t++) {
        const float p = (float)j->pos[t];
        for (int64_t i = 0; i < half; i++) {
            const float ang = p * j->inv_freq[i]; /* fp32 product, as torch */
            double s, c;
            sincos((double)ang, &s, &c);
            cs[i] = (float)c * j->af;
            sn[i] = (float)s * j->af;
        }
        for (int64_t h = 0; h < j->heads; h++) {
            float *v = j->x + t * j->ldt + h * j->ldh;
            if (j->interleaved) {
                for (int64_t i = 0; i < half; i++) {
                    const float re = v[2 * i], im = v[2 * i + 1];
                    v[2 * i] = re * cs[i] - im * sn[i];
                    v[2 * i + 1] = re * sn[i] + im * cs[i];
                }
            } else {
                for (int64_t i = 0; i < half; i++) {
                    const float x1 = v[i], x2 = v[i + half];
                    v[i] = x1 * cs[i] - x2 * sn[i];
                    v[i + half] = x2 * cs[i] + x1 * sn[i];
                }
            }
        }
    }
}

int dsv2_rope_apply(float *x, int64_t ldt, int64_t ldh, int64_t T, int64_t heads, int64_t dim,
                    const int64_t *pos, const float *inv_freq, float attention_factor, int interleaved) {
    if (T < 0 || heads <= 0 || dim <= 0 || (dim & 1) || dim > ROPE_MAX_DIM) return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    rope_job j = {x, ldt, ldh, heads, dim, pos, inv_freq, attention_factor, interleaved};
    int64_t per = heads * dim + dim * 8; /* rough cost per token */
    int64_t grain = per >= 8192 ? 1 : 8192 / per;
    dsv2_parallel_for(T, grain, rope_task, &j);
    return DSV2_OK;
}
