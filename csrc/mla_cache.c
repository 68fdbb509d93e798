/* mla_cache.c - the formats of cached latent rows (see mla.h): size of a row, fp32 rows
 * stored in the cache format (round to nearest even), cached rows widened back to fp32
 * for a bounded tile of rows (the non-absorbed form's decompression products). */
#include "mla.h"

int64_t dsv2_mla_row_bytes(int dtype, int64_t kv_lora, int64_t rope) {
    const int64_t W = kv_lora + rope;
    switch (dtype) {
    case DSV2_KV_F32: return 4 * W;
    case DSV2_KV_BF16: return 2 * W;
    default: return 0;
    }
}

void dsv2_mla_rows_store(void *rows, int64_t ldr, const float *lat, int64_t n, int dtype, int64_t kv_lora,
                         int64_t rope) {
    const int64_t W = kv_lora + rope;
    for (int64_t r = 0; r < n; r++) {
        char *row = (char *)rows + r * ldr;
        const float *x = lat + r * W;
        if (dtype == DSV2_KV_F32) {
            memcpy(row, x, (size_t)W * sizeof(float));
        } else if (dtype == DSV2_KV_BF16) {
            uint16_t *b = (uint16_t *)row;
            for (int64_t i = 0; i < W; i++) b[i] = dsv2_f32_to_bf16(x[i]);
        }
    }
}

void dsv2_mla_rows_load(float *dst, int64_t ldd, const void *rows, int64_t ldr, int64_t n, int64_t c0, int64_t c1,
                        int dtype, int64_t kv_lora, int64_t rope) {
    (void)kv_lora;
    (void)rope;
    const int64_t w = c1 - c0;
    for (int64_t r = 0; r < n; r++) {
        const char *row = (const char *)rows + r * ldr;
        float *y = dst + r * ldd;
        if (dtype == DSV2_KV_F32) {
            memcpy(y, (const float *)row + c0, (size_t)w * sizeof(float));
        } else if (dtype == DSV2_KV_BF16) {
            const uint16_t *b = (const uint16_t *)row + c0;
            for (int64_t i = 0; i < w; i++) y[i] = dsv2_bf16_to_f32(b[i]);
        }
    }
}
