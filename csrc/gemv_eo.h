/* gemv_eo.h - row dots of bf16 weights against fp32 activations laid out
 * "even|odd" (AVX-512).
 *
 * Layout: every whole 32-column chunk of an activation row holds its 16
 * even-indexed values, then its 16 odd-indexed ones; a tail of K % 32 columns
 * stays in place.  A 64-byte load of 32 bf16 weights then widens to fp32 with
 * two vector ops (a 16-bit left shift gives the even-indexed weights, a mask
 * the odd-indexed ones) instead of four, and the FMAs no longer share the
 * vector pipes with the widening.  Every output is the fp32 dot product of
 * the exactly widened weights with the activations: 16 lane-wise partial sums
 * over k (the same products per lane as the plain kernels, in another order),
 * then a horizontal sum; nothing depends on the thread count. */
#ifndef DSV2_GEMV_EO_H
#define DSV2_GEMV_EO_H

#include "dsv2.h"

/* Fewest activation rows for which the MLPs and linear layers take these
 * kernels.  Measured on Zen 4 (V2-Lite expert 2048 x 1408, bf16, 2 threads,
 * GFLOP/s plain -> even|odd): 48 tokens 154 -> ~186, 64 tokens 150 -> ~190,
 * 512 tokens (against sgemm on widened panels) 187 -> ~205; 8-16 tokens about
 * even; 2-3 tokens slower (the weight stream, not the widening, is the limit). */
#ifndef DSV2_EO_MIN_T
#define DSV2_EO_MIN_T 8
// the same, blocked for many activation rows (blocks of weight rows x groups of activation rows)
void dsv2_gemv_eo_rows_blocked(float *y, int64_t ldy, const float *xp, int64_t ldx, int64_t T, const dsv2_mat *W,
                               int64_t r0, int64_t r1);

#endif

// 1 when W is bf16 and the CPU runs these kernels (AVX-512)
int dsv2_eo_usable(const dsv2_mat *W);

// x [T, K] (rows ldx apart) -> xp [T, K] even|odd (rows ldxp apart; xp == x permutes in place),
// threaded over rows when there are many
void dsv2_eo_copy_permute(float *xp, int64_t ldxp, const float *x, int64_t ldx, int64_t T, int64_t K);

// xp [T, K] even|odd (rows ldx apart) , W bf16 [rows, K] -> y[t * ldy + r] = x_t . W_r, r in [r0, r1)
// (single-threaded; requires dsv2_eo_usable(W))
void dsv2_gemv_eo_rows(float *y, int64_t ldy, const float *xp, int64_t ldx, int64_t T, const dsv2_mat *W,
                       int64_t r0, int64_t r1);

// the same, blocked for many activation rows (blocks of weight rows x groups of activation rows)
void dsv2_gemv_eo_rows_blocked(float *y, int64_t ldy, const float *xp, int64_t ldx, int64_t T, const dsv2_mat *W,
                               int64_t r0, int64_t r1);

#endif
