/* mla_block.c - the whole MLA attention block of a layer:
 * normalized hidden h [T, d] -> q (q_proj, or q_a_proj -> RMSNorm -> q_b_proj), rope(q_pe);
 * latent rows [RMSNorm(c_kv) | rope(k_pe)] appended to the cache; attention (absorbed /
 * non-absorbed / picked per sequence); o_proj. */
#include "mla.h"
#include "linear.h"
#include "rmsnorm.h"
#include "rope.h"
#include "scratch.h"

#include <stdlib.h>

static int mat_is(const dsv2_mat *m, int64_t rows, int64_t cols) {
    return m->data && m->rows == rows && m->cols == cols;
}

int dsv2_mla_block(float *out, const float *h, int64_t T, int64_t d, dsv2_mla_cache *cache,
                   const int64_t *seq, const int64_t *pos, const dsv2_mla_weights *w,
                   const dsv2_mla_cfg *cfg, int mode) {
    const dsv2_mla_dims *dm = &cfg->dims;
    const int64_t H = dm->n_heads, dqk = dm->nope + dm->rope, ql = cfg->q_lora;
    if (T < 0 || d <= 0 || H <= 0 || dm->nope <= 0 || dm->rope <= 0 || (dm->rope & 1) || dm->v <= 0 ||
        dm->kv_lora <= 0 || ql < 0)
        return DSV2_ERR_ARG;
    if (mode != DSV2_MLA_AUTO && mode != DSV2_MLA_ABSORBED && mode != DSV2_MLA_DECOMPRESSED) return DSV2_ERR_ARG;
    if (ql == 0 ? !mat_is(&w->q_proj, H * dqk, d)
                : !(mat_is(&w->q_a_proj, ql, d) && w->q_a_norm.data && w->q_a_norm.rows * w->q_a_norm.cols == ql &&
                    mat_is(&w->q_b_proj, H * dqk, ql)))
        return DSV2_ERR_ARG;
    if (!mat_is(&w->kv_a_proj, dm->kv_lora + dm->rope, d) || !w->kv_a_norm.data ||
        w->kv_a_norm.rows * w->kv_a_norm.cols != dm->kv_lora || !mat_is(&w->kv_b_proj, H * (dm->nope + dm->v), dm->kv_lora) ||
        !mat_is(&w->o_proj, d, H * dm->v))
        return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    float *q = (float *)dsv2_scratch_alloc((size_t)T * (size_t)H * (size_t)dqk * sizeof(float));
    float *qa = ql ? (float *)dsv2_scratch_alloc((size_t)T * (size_t)ql * sizeof(float)) : NULL;
    float *ob = (float *)dsv2_scratch_alloc((size_t)T * (size_t)H * (size_t)dm->v * sizeof(float));
    float *lat = (float *)dsv2_scratch_alloc((size_t)T * (size_t)(dm->kv_lora + dm->rope) * sizeof(float));
    int rc = DSV2_OK;
    if (!q || !ob || !lat || (ql && !qa)) {
        rc = DSV2_ERR_NOMEM;
        goto done;
    }
    /* the two products of h (query or query-compression, and latent) in one pass; the latent rows
     * are normed, roped and stored once the query is done (no dependence between the two) */
    rc = ql ? dsv2_linear2(qa, lat, h, &w->q_a_proj, &w->kv_a_proj, T)
            : dsv2_linear2(q, lat, h, &w->q_proj, &w->kv_a_proj, T);
    if (!rc && ql) {
        rc = dsv2_rmsnorm(qa, qa, &w->q_a_norm, T, ql, cfg->eps);
        if (!rc) rc = dsv2_linear(q, qa, &w->q_b_proj, T);
    }
    if (!rc)
        rc = dsv2_rope_apply(q + dm->nope, H * dqk, dqk, T, H, dm->rope, pos, cfg->inv_freq, cfg->attention_factor,
                             cfg->interleaved);
    if (!rc)
        rc = dsv2_mla_store_kv(cache, lat, T, seq, pos, &w->kv_a_norm, dm->kv_lora, dm->rope, cfg->eps, cfg->inv_freq,
                               cfg->attention_factor, cfg->interleaved);
    if (!rc) rc = dsv2_mla_attention(ob, q, cache, seq, pos, T, &w->kv_b_proj, dm, cfg->scale, mode);
    if (!rc) rc = dsv2_linear(out, ob, &w->o_proj, T);
done:
    dsv2_scratch_free(q);
    dsv2_scratch_free(qa);
    dsv2_scratch_free(ob);
    dsv2_scratch_free(lat);
    return rc;
}
