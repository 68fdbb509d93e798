/* rmsnorm.c - RMSNorm over the last dimension, sums in double (optionally after a residual add). */
#include "rmsnorm.h"
#include "threadpool.h"

#include <math.h>

typedef struct {
    float *y;
    int64_t ldy;
    float *h;        /* residual add: h += r first (rows ldx apart), then the norm of h */
    const float *r;  /* NULL: no add */
    const float *x;
    int64_t ldx;
    const dsv2_mat *w;
    int64_t d;
    float eps;
} rms_job;

static void rms_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    rms_job *j = (rms_job *)ctx;
    for (int64_t t = b; t < e; t++) {
        const float *xt = j->x + t * j->ldx;
        float *yt = j->y + t * j->ldy;
        if (j->r) { /* the same fp32 sum as numpy's h += r */
            float *ht = j->h + t * j->ldx;
            const float *rt = j->r + t * j->d;
            for (int64_t i = 0; i < j->d; i++) ht[i] = ht[i] + rt[i];
        }
        double ss = 0.0;
        for (int64_t i = 0; i < j->d; i++) ss += (double)xt[i] * (double)xt[i];
        /* torch: x * rsqrt(mean + eps) in fp32, then weight * that */
        float var = (float)(ss / (double)j->d);
        float inv = 1.0f / sqrtf(var + j->eps);
        if (j->w->dtype == DSV2_F32) {
            const float *w = (const float *)j->w->data;
            for (int64_t i = 0; i < j->d; i++) yt[i] = w[i] * (xt[i] * inv);
        } else {
            for (int64_t i = 0; i < j->d; i++) yt[i] = dsv2_mat_get(j->w, 0, i) * (xt[i] * inv);
        }
    }
}

static int rms_run(rms_job *j, int64_t T) {
    if (T < 0 || j->d <= 0 || j->w->cols * j->w->rows != j->d || j->ldx < j->d || j->ldy < j->d) return DSV2_ERR_ARG;
    if (j->w->dtype != DSV2_F32 && j->w->dtype != DSV2_BF16) return DSV2_ERR_DTYPE;
    int64_t grain = j->d >= 4096 ? 1 : (4096 + j->d - 1) / j->d;
    dsv2_parallel_for(T, grain, rms_task, j);
    return DSV2_OK;
}

int dsv2_rmsnorm_ex(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *w,
                    int64_t T, int64_t d, float eps) {
    rms_job j = {y, ldy, NULL, NULL, x, ldx, w, d, eps};
    return rms_run(&j, T);
}

int dsv2_rmsnorm_add(float *y, float *h, const float *r, const dsv2_mat *w, int64_t T, int64_t d, float eps) {
    rms_job j = {y, d, h, r, h, d, w, d, eps};
    return rms_run(&j, T);
}

int dsv2_rmsnorm(float *y, const float *x, const dsv2_mat *w, int64_t T, int64_t d, float eps) {
    return dsv2_rmsnorm_ex(y, d, x, d, w, T, d, eps);
}
