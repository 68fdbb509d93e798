/* moe_block.h - one DeepSeekMoE feed-forward block as a single call:
 *   out = sum_k w_k * expert_{id_k}(x) + shared(x)
 * with (ids, w) from the router (moe_router.h), each expert run once on all
 * of its tokens (moe_dispatch.h) through the SwiGLU kernels (expert_mlp.h).
 *
 * Work split (one pool, no nested regions):
 *  - experts with more tokens of a chunk than the row-dot path takes
 *    (dsv2_mlp_rowdot_max_t: 64 for fp32 / int8 / fp8 weights, every count for bf16
 *    weights on AVX-512, whose even|odd kernels beat sgemm, see gemv_eo.h;
 *    15 for bf16 and int8 weights on AMX tiles, see gemm_amx.h),
 *    and the shared expert likewise, run one after the other as matrix
 *    products split over the pool;
 *  - all the others share the row-dot parallel regions: gate/up+SiLU over
 *    blocks of 48 intermediate rows of every expert, then down_proj.  Few
 *    tokens (decode): down over blocks of 24 output columns of every expert,
 *    fused with the weighted combine of those columns.  From MOE_SPLIT_MIN_T
 *    tokens: down expert by expert in blocks of 128 output columns (its h stays
 *    in cache), then the combine on its own.  Work items come from an atomic
 *    counter, so both cores work on every matrix and a descheduled thread
 *    holds up at most one item.  (Measured against one thread per whole
 *    expert at V2-Lite shapes, 1 and 64 tokens: as fast or faster, e.g. bf16
 *    1 token 9.0 vs 14.3 ms best-of-30 on a busy machine; whole experts also
 *    balance badly at 1 token: 6 routed + 1 shared twice as wide on 2 threads.)
 *  - long prompts go in equal chunks of tokens that keep the workspace under
 *    128 MiB (V2-Lite: up to ~950 tokens a chunk); every chunk streams the
 *    weights of the experts it uses once.
 * The result does not depend on the number of threads. */
#ifndef DSV2_MOE_BLOCK_H
#define DSV2_MOE_BLOCK_H

#include "dsv2.h"
#include "expert_mlp.h"
#include "moe_router.h"

/* x [T, d] , router [E, d] fp32|bf16 , bias [E] or NULL (noaux_tc only),
 * experts [E] (each gate/up [I, d], down [d, I]; one I for all),
 * shared (gate/up [Is, d], down [d, Is]) or NULL
 *   -> out [T, d] ; ids [T, k] and w [T, k] (optional outputs, may be NULL)
 * out must not overlap x.  Router errors (DSV2_ERR_NONFINITE for NaN/Inf
 * logits) are reported before out is written. */
int dsv2_moe_block(float *out, int64_t *ids, float *w, const float *x, const dsv2_mat *router,
                   const float *bias, const dsv2_mlp *experts, const dsv2_mlp *shared, int64_t T,
                   const dsv2_moe_cfg *cfg);

/* The routed + shared part for given routing (ids, w):
 * x [T, d] , ids [T, k] in [0, E) , w [T, k] -> out [T, d] */
int dsv2_moe_experts(float *out, const float *x, const int64_t *ids, const float *w,
                     const dsv2_mlp *experts, int64_t E, const dsv2_mlp *shared, int64_t T, int64_t k);

#endif
