/* gemm_amx.h - products of bf16 and int8 weights with many activation rows on
 * AMX tiles (TDPBF16PS), where dsv2_amx_mode() is not DSV2_AMX_OFF (cpu.h).
 *
 * y^T = W x^T: the weight rows are the tiles' A operand (16 rows x 32 bf16,
 * copied K-panel by K-panel into tile order), the activations the B operand
 * (16 tokens x 32 k in the pair layout B[kp][2t + j] = x[t][2kp + j], packed
 * once per call), the fp32 C tiles are transposed into y on the way out.  K,
 * N and T tails are zero-padded in the packs.  Two numerics:
 *
 *  - exact (the default): each fp32 activation is split exactly into three
 *    bf16 parts, x = b1 + b2 + b3 (b1 = x with the low 16 bits of its fp32
 *    pattern cleared, b2 the same of x - b1, b3 = x - b1 - b2: every
 *    difference is exact and b3 has at most 8 significant bits), and one
 *    weight tile meets the three part tiles, accumulating W b1 + W b2 + W b3
 *    in the same fp32 tile.  bf16 x bf16 products are exact in fp32, so each
 *    output is the fp32 dot product of the exact bf16 weights with the fp32
 *    activations, in another summation order than the AVX-512 kernels: per
 *    32-column step and part, two fp32 sums of 16 products (even / odd
 *    columns), their sum, then the running C sum.  The tile unit reads
 *    denormals as zero and flushes denormal results: activation parts and
 *    weights below 2^-126 in magnitude, and the ~3.2 K partial sums of an
 *    output when they fall below 2^-126, are lost: an absolute error under
 *    2^-125 (sum_k |W_nk| + sum_k |x_k| + 2 K) per output, ~5e-33 at V2-Lite
 *    sizes (K = 2048, |x| ~ 100), far below the fp32 rounding of any output
 *    above ~1e-25.
 *    (Rounding to nearest for b1, as the vdpbf16ps mode does, would give the
 *    same exactness but overflows to inf for |x| > 3.39e38; truncation cannot.)
 *  - bf16 compute (dsv2_bf16dp_use, gemm_bf16dp.h): activations rounded to
 *    bf16 once (nearest even, as the vdpbf16ps kernels), one tile product per
 *    step: the same class as those kernels (exact products, fp32 sums), in the
 *    tile order above.
 *  - int8 weights (dsv2ext.quant: W[r, c] = q[r, c] s[r, c / group]), groups
 *    a multiple of 32 columns: the codes are exact in bf16 (|q| <= 128), so the
 *    exact mode's three tile products give each group's sum P = sum_c q x
 *    (tiles from zero per group; fp32 sums of exact products), and
 *    acc = fma(s, P, acc) group after group (AVX-512, on the stored tiles).
 *    The result is the fp32 product with the dequantized weights up to
 *    rounding: the scale multiplies a block sum instead of each weight (no
 *    rounding of q s to fp32 at all), the order of the sums differs.  Other
 *    groups keep sgemm on dequantized panels.  Activations are fp32 here
 *    whatever the int8 activation mode (which is about the row-dot kernels).
 *    Designs kept out: AMX-INT8 (TDPBSSD) needs int8 activations (llama.cpp's
 *    Q8_0 path quantizes them), which the exact default must not; dequantized
 *    weights split into three bf16 parts would need 9 tile products a step
 *    (all part pairs) against 3 here plus the per-group epilogue.
 *
 * Every output element is computed by the same sequence of tile operations
 * whatever the thread count and blocking (work is split over blocks of weight
 * rows and of tokens; K-panels only store and reload C exactly), and the
 * emulated tiles (amx_tiles.h) run the same code with the same results as the
 * CPU's tiles, as far as the emulation models the SDM's TDPBF16PS. */
#ifndef DSV2_GEMM_AMX_H
#define DSV2_GEMM_AMX_H

#include "dsv2.h"

#include <stdint.h>

/* Fewest activation rows for which bf16 products go to the tiles.  Tokens come
 * in tiles of 16 (a shorter product pays for a whole tile), and below ~16 rows
 * the row-dot kernels stream the weights at memory speed anyway.  (Not yet
 * measured on an AMX CPU: benchmarks/bench_amx.py times T = 16, 64, 512.) */
#define DSV2_AMX_MIN_T 16

/* 1 when a product of W with T activation rows runs on the tiles (bf16, or int8 with groups
 * of a multiple of 32 columns; T >= DSV2_AMX_MIN_T) */
int dsv2_amx_use(const dsv2_mat *W, int64_t T);

// x [T, K] f32 (rows ldx apart), W bf16 | int8 [N, K] -> y [T, N] (rows ldy apart), split over the pool;
// exact, or with bf16-rounded activations where dsv2_bf16dp_use(W, T).  Requires dsv2_amx_use(W, T).
int dsv2_linear_amx(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T);

/* Test hooks. */
// x [n] -> b1, b2, b3 [n] bf16: the exact three-part split of the exact mode (DSV2_ERR_ARG without AVX-512)
int dsv2_amx_split3(uint16_t *b1, uint16_t *b2, uint16_t *b3, const float *x, int64_t n);
// one TDPBF16PS on full tiles: c [16, 16] f32 += a [16, 32] bf16 . b [16, 32] bf16 (pair layout),
// on the CPU's tiles (hw = 1; DSV2_ERR_ARG where there are none) or on the emulation (hw = 0)
int dsv2_amx_tdpbf16ps_tile(float *c, const uint16_t *a, const uint16_t *b, int hw);

#endif
