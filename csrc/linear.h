/* linear.h - y = x W^T for fp32 activations and fp32 / bf16 / int8 / int4 / fp8 weights. */
#ifndef DSV2_LINEAR_H
#define DSV2_LINEAR_H

#include "dsv2.h"

/* Up to this many activation rows use the row-dot kernels (the weight is
 * streamed once per 4 rows); more rows use OpenBLAS sgemm, with bf16 weights
 * widened (int8 / fp8 weights dequantized) one panel of rows at a time (never
 * the whole matrix; int4 weights dequantized likewise).  int8 weights with few
 * rows use int16-quantized activations, int4 weights int8-quantized ones
 * (quantized once per call; see gemv.h) where the CPU allows.  bf16 (and int8, groups
 * of 32k columns) weights with DSV2_AMX_MIN_T rows or more run on AMX tiles where the
 * CPU has them (gemm_amx.h); else bf16 takes the even|odd row-dot kernels (AVX-512,
 * gemv_eo.h) from DSV2_EO_MIN_T rows. */
#define DSV2_LINEAR_GEMV_MAX_T 8

// x [T, K] (rows ldx apart) , W [N, K] -> y [T, N] (rows ldy apart)
int dsv2_linear_ex(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T);
// x [T, K] , W [N, K] -> y [T, N]   (contiguous)
int dsv2_linear(float *y, const float *x, const dsv2_mat *W, int64_t T);
// x [T, K] , W1 [N1, K] , W2 [N2, K] -> y1 [T, N1] , y2 [T, N2]   (contiguous): two products of the same
// activations, the same numbers as two dsv2_linear calls.  For few rows (the row-dot kernels, the
// activations prepared once for both) the rows of both weights are one region of the pool: one
// fork / join instead of two, and the smaller weight streams inside the larger one's pass (a
// decode step's query and latent projections of h).  Otherwise two dsv2_linear calls.
int dsv2_linear2(float *y1, float *y2, const float *x, const dsv2_mat *W1, const dsv2_mat *W2, int64_t T);

#endif
