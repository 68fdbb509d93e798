/* gemv_f8.h - float8 e4m3fn weights with 2-D block scales (DSV2_F8E4M3, the
 * DeepSeek-V3 layout; see dsv2_mat in dsv2.h): row dots and widening to fp32.
 *
 * Every weight is made as one fp32 multiply e4m3(q) * scale_inv (fp8.h: exact,
 * NaN codes give NaN) and then multiplied with fp32 activations in fp32: the same
 * numbers as an fp32 model with the dequantized weights, up to summation order. */
#ifndef DSV2_GEMV_F8_H
#define DSV2_GEMV_F8_H

#include "dsv2.h"

/* The DSV2_F8E4M3 case of dsv2_gemv_rows (any T >= 1):
 * x [T, K] (rows ldx apart) , W f8 [rows, K] -> y[t * ldy + r], r in [r0, r1) */
void dsv2_gemv_f8_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                       int64_t r0, int64_t r1);

/* rows [r0, r1) of an f8 W -> out [(r1 - r0), cols] fp32, the exact dequantized values
 * (single-threaded) */
void dsv2_dequant_f8_rows(float *out, const dsv2_mat *W, int64_t r0, int64_t r1);

/* 1 when every scale of rows [r0, r1) of an f8 W folds the decode's factor 256 exactly
 * (fp8.h: dsv2_e4m3_scale_foldable), so that the vector kernels apply; r0 < r1 */
int dsv2_f8_scales_foldable(const dsv2_mat *W, int64_t r0, int64_t r1);

/* The AVX-512 VBMI decode kernels (gemv_f8.c): 1 when W is fp8 with column blocks of a
 * multiple of 64, at least 64 columns, and the CPU runs them (dsv2_cpu_has_avx512vbmi). */
int dsv2_f8p_usable(const dsv2_mat *W);
/* x [T, K] (rows ldx apart) -> xp [T, K] (rows K apart): each whole step of 64 columns in
 * the order the VBMI kernels widen the codes, the last K % 64 columns in place */
void dsv2_f8p_prepare(float *xp, const float *x, int64_t ldx, int64_t T, int64_t K);
/* xp [T, K] prepared (rows K apart) , W f8 [rows, K] (dsv2_f8p_usable) -> y[t * ldy + r],
 * r in [r0, r1), any T >= 1 */
void dsv2_gemv_f8p_rows(float *y, int64_t ldy, const float *xp, int64_t T, const dsv2_mat *W, int64_t r0,
                        int64_t r1);

#endif
