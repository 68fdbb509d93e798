/* gemv.h - row-dot kernels: a few activation rows against a block of weight
 * rows, with the instruction set picked at run time.
 *
 * y[t * ldy + r] = sum_k x[t * ldx + k] * W[r, k]   for r in [r0, r1), t < T
 * x [T, K] fp32 (rows ldx apart) , W [rows, K] fp32, bf16 or int8 -> y [T, ldy]
 * T <= DSV2_GEMV_MAX_T.  bf16 weights are widened to fp32 exactly in
 * registers and accumulated in fp32 (same values as an fp32 model with the
 * bf16 weights upcast, up to summation order).  int8 weights are dequantized
 * in registers (q * scale, the exact fp32 product) and accumulated in fp32:
 * the same values as an fp32 model with the dequantized weights; activations
 * stay fp32. */
#ifndef DSV2_GEMV_H
#define DSV2_GEMV_H

#include "dsv2.h"

#define DSV2_GEMV_MAX_T 4

void dsv2_gemv_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                    const dsv2_mat *W, int64_t r0, int64_t r1);

/* The int8 case of dsv2_gemv_rows (gemv_i8.c); any T >= 1. */
void dsv2_gemv_i8_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                       const dsv2_mat *W, int64_t r0, int64_t r1);

/* Widen rows [r0, r1) of W to fp32: out [(r1 - r0), W->cols]. */
void dsv2_mat_rows_to_f32(float *out, const dsv2_mat *W, int64_t r0, int64_t r1);

#endif
