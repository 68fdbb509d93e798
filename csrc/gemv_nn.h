/* gemv_nn.h - a few activation rows times a weight matrix used WITHOUT
 * transposition: y = x W, W [K, N] row-major fp32 or bf16 (rows of W are the
 * reduction index; int8 W: W[k, c] = q[k, c] * scale[k, c / group]; fp8 W: the
 * 2-D block scales of dsv2_mat).
 * MLA uses it for the absorbed query q_lat = W_UK^T q_nope,
 * where W_UK is a [qk_nope, kv_lora] block of kv_b_proj's rows. */
#ifndef DSV2_GEMV_NN_H
#define DSV2_GEMV_NN_H

#include "dsv2.h"

#define DSV2_GEMV_NN_MAX_T 4

// x [T, K] (rows ldx apart) , W [K, N] (fp32 | bf16 | int8 | int4 | fp8) -> y [T, N] (rows ldy apart), T <= 4
// Columns [c0, c1) of y only.  Returns DSV2_ERR_DTYPE for other weight dtypes.
int dsv2_gemv_nn(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                 int64_t c0, int64_t c1);

// Same product, the rows of W read one after the other (one sequential stream;
// partial sums of all N columns kept in y, which should fit L1: T * N * 4 bytes
// of a few KiB).  For a weight block read once from memory.  T <= 4, all N columns.
int dsv2_gemv_nn_stream(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W);

#endif
