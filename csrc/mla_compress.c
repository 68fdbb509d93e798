/* mla_compress.c - latent KV compression: h -> [RMSNorm(c_kv) | rope(k_pe)] rows
 * appended to the latent cache (stored in the cache's format). */
#include "mla.h"
#include "linear.h"
#include "rmsnorm.h"
#include "rope.h"
#include "scratch.h"

#include <stdlib.h>

static int check_rows(const dsv2_mla_cache *cache, int64_t T, const int64_t *seq, const int64_t *pos,
                      const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope) {
    if (T < 0 || kv_lora <= 0 || rope <= 0 || (rope & 1) || kv_a_norm->rows * kv_a_norm->cols != kv_lora)
        return DSV2_ERR_ARG;
    if (cache->B <= 0 || cache->S <= 0 || dsv2_mla_row_bytes(cache->dtype, kv_lora, rope) <= 0) return DSV2_ERR_ARG;
    for (int64_t t = 0; t < T; t++)
        if (seq[t] < 0 || seq[t] >= cache->B || pos[t] < 0 || pos[t] >= cache->S) return DSV2_ERR_RANGE;
    return DSV2_OK;
}

/* lat rows (checked by the caller): norm, rope, store */
static int store_rows(dsv2_mla_cache *cache, float *lat, int64_t T, const int64_t *seq, const int64_t *pos,
                      const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope, float eps, const float *inv_freq,
                      float attention_factor, int interleaved) {
    const int64_t W = kv_lora + rope, rb = dsv2_mla_row_bytes(cache->dtype, kv_lora, rope);
    int rc = dsv2_rmsnorm_ex(lat, W, lat, W, kv_a_norm, T, kv_lora, eps);
    if (!rc) rc = dsv2_rope_apply(lat + kv_lora, W, rope, T, 1, rope, pos, inv_freq, attention_factor, interleaved);
    if (!rc)
        for (int64_t t = 0; t < T; t++)
            dsv2_mla_rows_store((char *)cache->data + ((size_t)seq[t] * (size_t)cache->S + (size_t)pos[t]) * (size_t)rb,
                                rb, lat + (size_t)t * (size_t)W, 1, cache->dtype, kv_lora, rope);
    return rc;
}

int dsv2_mla_store_kv(dsv2_mla_cache *cache, float *lat, int64_t T, const int64_t *seq, const int64_t *pos,
                      const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope, float eps, const float *inv_freq,
                      float attention_factor, int interleaved) {
    int rc = check_rows(cache, T, seq, pos, kv_a_norm, kv_lora, rope);
    if (rc || T == 0) return rc;
    return store_rows(cache, lat, T, seq, pos, kv_a_norm, kv_lora, rope, eps, inv_freq, attention_factor, interleaved);
}

int dsv2_mla_compress_kv(dsv2_mla_cache *cache, float *lat, const float *h, int64_t T, int64_t d,
                         const int64_t *seq, const int64_t *pos, const dsv2_mat *kv_a_proj,
                         const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope, float eps,
                         const float *inv_freq, float attention_factor, int interleaved) {
    const int64_t W = kv_lora + rope;
    if (d <= 0 || kv_lora <= 0 || rope <= 0 || kv_a_proj->rows != W || kv_a_proj->cols != d) return DSV2_ERR_ARG;
    int rc = check_rows(cache, T, seq, pos, kv_a_norm, kv_lora, rope);
    if (rc || T == 0) return rc;
    float *buf = lat;
    if (!buf) {
        buf = (float *)dsv2_scratch_alloc((size_t)T * (size_t)W * sizeof(float));
        if (!buf) return DSV2_ERR_NOMEM;
    }
    rc = dsv2_linear(buf, h, kv_a_proj, T);
    if (!rc) rc = store_rows(cache, buf, T, seq, pos, kv_a_norm, kv_lora, rope, eps, inv_freq, attention_factor, interleaved);
    if (buf != lat) dsv2_scratch_free(buf);
    return rc;
}
