/* mla_bf16dp.h - latent attention's two products on AVX-512 BF16 dot products
 * (vdpbf16ps), for the opt-in bf16 compute mode (gemm_bf16dp.h) over a bf16 cache.
 *
 * Attention over a long context is bound by arithmetic: every cached row costs
 * 2 H (kv_lora + rope + kv_lora) flops per token, in fp32 FMAs by default.  In the
 * bf16 compute mode the absorbed queries (once per call) and the softmax weights
 * (once per block of rows) are rounded to bf16 and multiplied with the bf16 rows as
 * they are stored: 32 multiply-adds per instruction against 16, exact products,
 * fp32 sums.  The result is the attention of bf16(q) against the rows with bf16(p)
 * as the weights of the values (the denominators use the unrounded p). */
#ifndef DSV2_MLA_BF16DP_H
#define DSV2_MLA_BF16DP_H

#include <stddef.h>
#include <stdint.h>

#include "mla_tiles.h"

/* 1 when the attention over cached rows of this format (DSV2_KV_*) and kv_lora takes these
 * kernels: the mode is on, the CPU has AVX512-BF16 (at the AVX-512 level), the rows are bf16
 * and kv_lora is a multiple of 32 */
int dsv2_mla_bf16dp_use(int dtype, int64_t kv_lora);

/* The queries rounded to bf16 (nearest even) and packed for the scores, once per call: heads in
 * groups of 16 (the last padded with zero queries), each group's D numbers as (D + 1) / 2 pairs,
 * a pair of every head of the group in one 64-byte vector (qp 64-byte aligned):
 * q [H, D] fp32 (rows ldq elements apart) -> qp [ceil(H / 16), ceil(D / 2), 16] bf16 pairs */
size_t dsv2_mla_bf16dp_qpack_len(int64_t H, int64_t D);
void dsv2_mla_bf16dp_qpack(uint32_t *qp, const float *q, int64_t ldq, int64_t H, int64_t D);

/* rows per block of dsv2_mla_bf16dp_block (the online softmax's block) */
#define DSV2_MLA_BF16DP_KB 64

/* floats of the work space of dsv2_mla_bf16dp_block (64-byte aligned) */
size_t dsv2_mla_bf16dp_work_len(void);

/* One block of n (1..DSV2_MLA_BF16DP_KB) bf16 rows k for H heads of one token, in the bf16 compute
 * mode: per group of 16 heads (a head per fp32 lane), the scores s = q k^T, the online-softmax
 * update and o += p c[:, :L], where p = exp(scale s - m) rounded to bf16:
 *   qp packed from q [H, L + rope] (dsv2_mla_bf16dp_qpack; 64-byte aligned) , rows k [n]
 *   -> o [H, L] (rows ldo apart; first: it starts from 0) += p c, its columns in the kernel's order
 *      (within each 32 columns, the 16 lanes of columns {0-3, 8-11, 16-19, 24-27} then those of
 *      {4-7, 12-15, 20-23, 28-31}; elementwise updates keep it, dsv2_mla_bf16dp_natural restores it),
 *      m, l [ceil(H / 16) * 16] running maxima of scale s and sums of p (the unrounded weights;
 *      start from -inf and 0), o's rows rescaled where a maximum rose.
 * Requires k->dtype bf16, k->L % 32 == 0 and AVX512-BF16 (dsv2_mla_bf16dp_use); work: 64-byte
 * aligned, dsv2_mla_bf16dp_work_len() floats.  Returns DSV2_ERR_ARG otherwise. */
int dsv2_mla_bf16dp_block(float *o, int64_t ldo, float *m, float *l, float *work, const uint32_t *qp, int64_t H,
                          const dsv2_mla_rows *k, int64_t n, float scale, int first);

// o [H, L] (rows ldo apart) in the kernel's order -> natural column order, in place (L % 32 == 0)
void dsv2_mla_bf16dp_natural(float *o, int64_t ldo, int64_t H, int64_t L);

#endif
