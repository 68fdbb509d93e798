/* mla_cache.c - the formats of cached latent rows (see mla.h): size of a row, fp32 rows
 * stored in the cache format (round to nearest even), cached rows widened back to fp32
 * for a bounded tile of rows (the non-absorbed form's decompression products).
 *
 * FP8 rows: per block of 128 latent numbers, scale = amax / 448 (fp32 division; 0 for an
 * all-zero block; NaN / Inf when the block holds one, so that they reach the outputs),
 * code = e4m3(x / scale) rounded to nearest even; the value read back is
 * e4m3(code) * scale (one fp32 product).  k_pe is stored as bfloat16. */
#include "mla.h"
#include "cpu.h"
#include "fp8.h"
#include "gemv.h"

#include <immintrin.h>
#include <string.h>

int64_t dsv2_mla_row_bytes(int dtype, int64_t kv_lora, int64_t rope) {
    const int64_t W = kv_lora + rope;
    switch (dtype) {
    case DSV2_KV_F32: return 4 * W;
    case DSV2_KV_BF16: return 2 * W;
    case DSV2_KV_FP8: return dsv2_kv_fp8_scales_at(kv_lora) + 4 * dsv2_kv_fp8_blocks(kv_lora) + 2 * rope;
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
        } else if (dtype == DSV2_KV_FP8) {
            uint8_t *codes = (uint8_t *)row;
            float *scales = (float *)(row + dsv2_kv_fp8_scales_at(kv_lora));
            uint16_t *pe = (uint16_t *)(row + dsv2_kv_fp8_rope_at(kv_lora));
            for (int64_t b0 = 0, k = 0; b0 < kv_lora; b0 += DSV2_KV_FP8_BLOCK, k++) {
                const int64_t b1 = b0 + DSV2_KV_FP8_BLOCK < kv_lora ? b0 + DSV2_KV_FP8_BLOCK : kv_lora;
                float amax = 0.0f;
                for (int64_t i = b0; i < b1; i++) {
                    const float a = x[i] < 0 ? -x[i] : x[i];
                    if (a > amax || a != a) amax = a; /* NaN stays */
                    if (amax != amax) break;
                }
                const float sc = amax / 448.0f;
                scales[k] = sc;
                for (int64_t i = b0; i < b1; i++) codes[i] = sc == 0.0f ? 0 : dsv2_f32_to_e4m3(x[i] / sc);
            }
            for (int64_t i = kv_lora; i < dsv2_kv_fp8_scales_at(kv_lora); i++) codes[i] = 0; /* padding */
            for (int64_t i = 0; i < rope; i++) pe[i] = dsv2_f32_to_bf16(x[kv_lora + i]);
        }
    }
}

/* FP8 codes [c0, e) of a row (all below kv_lora) -> y: the exact e4m3 value times its block's
 * scale, one fp32 product (NaN codes NaN) */
static void fp8_codes_load(float *y, const uint8_t *codes, const float *scales, int64_t c0, int64_t e) {
    for (int64_t c = c0; c < e; c++) y[c - c0] = dsv2_e4m3_to_f32(codes[c]) * scales[c / DSV2_KV_FP8_BLOCK];
}

/* the same numbers, 16 codes at a time, never across a block of 128 */
DSV2_TARGET_AVX512 static void fp8_codes_load_avx512(float *y, const uint8_t *codes, const float *scales, int64_t c0,
                                                     int64_t e) {
    for (int64_t c = c0; c < e;) {
        const int64_t bend = (c / DSV2_KV_FP8_BLOCK + 1) * DSV2_KV_FP8_BLOCK;
        const int64_t stop = bend < e ? bend : e, k = stop - c < 16 ? stop - c : 16;
        const __mmask16 m = (__mmask16)((1u << k) - 1u);
        const __m512 v = _mm512_mul_ps(dsv2_e4m3x16_to_f32_avx512(_mm_maskz_loadu_epi8(m, codes + c)),
                                       _mm512_set1_ps(scales[c / DSV2_KV_FP8_BLOCK]));
        _mm512_mask_storeu_ps(y + (c - c0), m, v);
        c += k;
    }
}

void dsv2_mla_rows_load(float *dst, int64_t ldd, const void *rows, int64_t ldr, int64_t n, int64_t c0, int64_t c1,
                        int dtype, int64_t kv_lora, int64_t rope) {
    (void)rope;
    const int avx512 = dsv2_isa() == DSV2_ISA_AVX512;
    for (int64_t r = 0; r < n; r++) {
        const char *row = (const char *)rows + r * ldr;
        float *y = dst + r * ldd;
        if (dtype == DSV2_KV_F32) {
            memcpy(y, (const float *)row + c0, (size_t)(c1 - c0) * sizeof(float));
        } else if (dtype == DSV2_KV_BF16) {
            dsv2_bf16_row_to_f32(y, (const uint16_t *)row + c0, c1 - c0);
        } else if (dtype == DSV2_KV_FP8) {
            const uint8_t *codes = (const uint8_t *)row;
            const float *scales = (const float *)(row + dsv2_kv_fp8_scales_at(kv_lora));
            const int64_t e = c1 < kv_lora ? c1 : kv_lora;
            if (c0 < e) {
                if (avx512) fp8_codes_load_avx512(y, codes, scales, c0, e);
                else fp8_codes_load(y, codes, scales, c0, e);
            }
            if (c1 > kv_lora) { /* k_pe, bf16 */
                const int64_t s0 = c0 > kv_lora ? c0 : kv_lora;
                const uint16_t *pe = (const uint16_t *)(row + dsv2_kv_fp8_rope_at(kv_lora));
                dsv2_bf16_row_to_f32(y + (s0 - c0), pe + (s0 - kv_lora), c1 - s0);
            }
        }
    }
}
