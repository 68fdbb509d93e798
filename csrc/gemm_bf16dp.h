/* gemm_bf16dp.h - the opt-in "bf16 compute" mode: products of bf16 weights with
 * activations rounded to bf16, on AVX-512 BF16 dot products (vdpbf16ps).
 *
 * On Zen 4 vdpbf16ps does 32 multiply-adds per instruction against 16 for an
 * fp32 FMA, so compute-bound products (prefill) can run up to twice as fast.
 * The price is the rounding of the activations to bf16 (8 significant bits,
 * ~2e-3 relative per element), which the default fp32-activation path does
 * not pay; decode (one activation row) is bound by memory and keeps the exact
 * path either way.  Off by default; DSV2EXT_BF16_COMPUTE=1 or
 * dsv2_set_bf16_compute(1) turns it on.  Products with bf16 weights and at
 * least 2 activation rows then use it where the CPU has AVX512-BF16. */
#ifndef DSV2_GEMM_BF16DP_H
#define DSV2_GEMM_BF16DP_H

#define DSV2_TARGET_AVX512BF16 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,f16c")))

#include "dsv2.h"

#include <stdint.h>

/* 1 when the CPU (and the ISA cap) allow the bf16 dot-product kernels. */
int dsv2_bf16dp_available(void);
/* the mode: 0 off (default), 1 on; the first call reads DSV2EXT_BF16_COMPUTE */
int dsv2_get_bf16_compute(void);
void dsv2_set_bf16_compute(int on);
/* 1 when a product of W with T activation rows goes through the bf16 kernels */
int dsv2_bf16dp_use(const dsv2_mat *W, int64_t T);

// x [T, K] f32 (rows ldx apart) -> xb [T, K] bf16 (rows ldxb apart), rounded to nearest even (NaN stays NaN)
void dsv2_round_bf16_rows(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int64_t T, int64_t K);

// x [T, K] f32 (rows ldx apart), W bf16 [N, K] -> y [T, N] = round_bf16(x) W^T, split over the pool
int dsv2_linear_bf16dp(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T);

#endif
