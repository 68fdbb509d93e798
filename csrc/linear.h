/* linear.h - y = x W^T for fp32 activations and fp32 / bf16 / int8 / int4 weights. */
#ifndef DSV2_LINEAR_H
#define DSV2_LINEAR_H

#include "dsv2.h"

/* Up to this many activation rows use the row-dot kernels (the weight is
 * streamed once per 4 rows); more rows use OpenBLAS sgemm, with bf16 weights
 * widened (int8 weights dequantized) one panel of rows at a time (never the
 * whole matrix; int4 weights dequantized likewise).  int8 weights with few
 * rows use int16-quantized activations, int4 weights int8-quantized ones
 * (quantized once per call; see gemv.h). */
#define DSV2_LINEAR_GEMV_MAX_T 8

// x [T, K] (rows ldx apart) , W [N, K] -> y [T, N] (rows ldy apart)
int dsv2_linear_ex(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T);
// x [T, K] , W [N, K] -> y [T, N]   (contiguous)
int dsv2_linear(float *y, const float *x, const dsv2_mat *W, int64_t T);

#endif
