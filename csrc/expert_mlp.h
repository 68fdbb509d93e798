/* expert_mlp.h - the SwiGLU MLP of DeepSeek's experts, shared experts and
 * dense layers:  y = down( silu(x gate^T) * (x up^T) ).
 *
 * Weights are three dsv2_mat (fp32, bf16, int8, int4 or fp8, any mix):
 *   gate [I, d], up [I, d], down [d, I]   (torch Linear layout [out, in]).
 * The stacked transformers-5 layout gate_up_proj [E, 2I, d] gives gate and
 * up as rows [0, I) and [I, 2I) of one expert's matrix (no copy).
 *
 * Two ways to run it:
 *  - row-dot ("gemv") path for few tokens: gate and up are computed a block
 *    of 24 intermediate rows at a time and SiLU(gate)*up is applied at once,
 *    so the intermediate for one token (I floats) stays in cache; then down.
 *    Used for T <= dsv2_mlp_rowdot_max_t (DSV2_MLP_GEMV_MAX_T, or every T
 *    for bf16 weights on AVX-512: the even|odd kernels of gemv_eo.h run
 *    512-token products at ~205 GFLOP/s on Zen 4 against ~187 for sgemm;
 *    DSV2_AMX_MIN_T - 1 for bf16 / int8 weights where the CPU has AMX tiles).
 *    fp8 weights with more than 4 tokens: blocks of rows widened to fp32 once
 *    per call, then the fp32 row-dot tiles.
 *  - matrix-product path for many tokens (through dsv2_linear_ex: OpenBLAS
 *    sgemm, bf16 weights widened one panel at a time, or the AMX tiles). */
#ifndef DSV2_EXPERT_MLP_H
#define DSV2_EXPERT_MLP_H

#include "dsv2.h"
#include "gemv.h"
#include "gemv_eo.h"

/* Up to this many tokens per MLP call the row-dot path is used.  Measured on
 * Zen 4 at V2-Lite expert shapes (d 2048, I 1408), 2 threads: 48 tokens run at
 * 145-157 GFLOP/s through the row-dot tiles against 114-123 through sgemm on
 * widened panels (whose small-M calls repack the activations per panel), 96
 * tokens at ~157 either way; a 512-token lite-L4 prefill went from 173 to 200
 * tokens/s (bf16) with the limit at 64 instead of 32 (most experts of a
 * 512-token prompt get 30-70 tokens). */
#ifndef DSV2_MLP_GEMV_MAX_T
#define DSV2_MLP_GEMV_MAX_T 64
#endif
/* dsv2_mlp_rowdot_max_t of MLPs whose weights take the even|odd kernels (all token counts) */
#define DSV2_MLP_ROWDOT_ALL ((int64_t)1 << 40)
/* Tokens per matrix-product pass (bounds the [T, 2I] scratch; also the row-dot
 * path's chunk). */
#define DSV2_MLP_GEMM_CHUNK 512

typedef struct {
    dsv2_mat gate; /* [I, d] */
    dsv2_mat up;   /* [I, d] */
    dsv2_mat down; /* [d, I] */
} dsv2_mlp;

/* Most tokens an MLP call sends through the row-dot path: DSV2_MLP_GEMV_MAX_T;
 * DSV2_AMX_MIN_T - 1 for weights on AMX tiles (gemm_amx.h: bf16, int8 in groups of 32k);
 * DSV2_MLP_ROWDOT_ALL for bf16 weights on the even|odd kernels (gemv_eo.h); 1 when
 * its weights take the opt-in bf16 compute mode (gemm_bf16dp.h), whose kernels are
 * matrix products that round each activation matrix once. */
int64_t dsv2_mlp_rowdot_max_t(const dsv2_mlp *m);


/* DSV2_OK if the three shapes agree (gate/up [I, d], down [d, I], I, d >= 1)
 * and the dtypes are supported; sets *d and *I when the pointers are given. */
int dsv2_mlp_check(const dsv2_mlp *m, int64_t *d, int64_t *ni);

/* h = silu(g) * u elementwise, n values (h may alias g or u). */
void dsv2_silu_mul(float *h, const float *g, const float *u, int64_t n);

/* Intermediate columns [i0, i1) of T tokens (single-threaded, any T):
 *   x [T, d] (rows ldx apart) -> h[t * ldh + i] = silu(x_t . gate_i) * (x_t . up_i)
 * and output columns [r0, r1):
 *   h [T, I] (rows ldh apart) -> y[t * ldy + r] = h_t . down_r
 * with activations prepared once per call (xq / hq, see dsv2_xq in gemv.h;
 * NULL or both parts NULL: the plain fp32 x / h):
 *  - p set (bf16 weights where dsv2_mlp_eo_x / dsv2_mlp_eo_h hold): x / h in
 *    the even|odd layout of gemv_eo.h, rows K apart; the x / h arguments are
 *    then not read;
 *  - q / q8 set (dsv2_act_at + dsv2_act_quantize, gemv.h): x / h quantized
 *    once, int16 for the int8 matrices that take it, int8 for the int4 ones;
 *    each matrix takes its kind (dsv2_gemv_q_rows), the others the fp32 x / h. */
void dsv2_mlp_gateup_rows_q(float *h, int64_t ldh, const float *x, int64_t ldx, const dsv2_xq *xq, int64_t T,
                            const dsv2_mlp *m, int64_t i0, int64_t i1);
void dsv2_mlp_down_rows_q(float *y, int64_t ldy, const float *h, int64_t ldh, const dsv2_xq *hq, int64_t T,
                          const dsv2_mlp *m, int64_t r0, int64_t r1);

// 1 when an MLP call of T tokens runs gate/up (x) / down (h) on the even|odd kernels (T >= DSV2_EO_MIN_T)
int dsv2_mlp_eo_x(const dsv2_mlp *m, int64_t T);
int dsv2_mlp_eo_h(const dsv2_mlp *m, int64_t T);


/* Matrix-product path (threaded; call it outside parallel regions).
 * x [T, d] (rows ldx apart) -> y [T, d] (rows ldy apart).
 * scratch: at least dsv2_mlp_gemm_scratch(m, T) floats. */
int64_t dsv2_mlp_gemm_scratch(const dsv2_mlp *m, int64_t T);
int dsv2_mlp_gemm(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T, const dsv2_mlp *m,
                  float *scratch);

/* The whole MLP, threaded, picking the path by T.
 * x [T, d] -> y [T, d]  (contiguous; y must not overlap x) */
int dsv2_mlp_forward(float *y, const float *x, const dsv2_mlp *m, int64_t T);

#endif
