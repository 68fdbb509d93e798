/* moe_router.h - DeepSeekMoE routing: which top_k experts each token uses
 * and with what weight (as transformers' DeepseekV2TopkRouter /
 * DeepseekV3TopkRouter compute it).
 *
 *   logits = x . router^T  in fp32 (a bf16 router weight is widened exactly)
 *   s      = softmax(logits) | sigmoid(logits)
 *   greedy:               top_k of s
 *   group_limited_greedy: E experts form n_group contiguous groups; group
 *                         score = max of s in the group; keep the topk_group
 *                         best groups; top_k of s among their experts
 *   noaux_tc:             c = s + bias (selection only); group score = sum of
 *                         the 2 largest c in the group; keep topk_group groups
 *                         (the others can never be chosen); top_k of c among
 *                         their experts
 *   weights = s at the chosen experts (never the biased c);
 *             if norm_topk_prob: w /= (sum(w) + 1e-20);  w *= routed_scaling_factor
 *
 * Ties (exactly equal scores) go to the lower expert / group index; the
 * chosen experts of a token are listed by decreasing selection score.
 * NaN policy: if any router logit is NaN or +-Inf the router fails with
 * DSV2_ERR_NONFINITE and writes nothing useful (no guessing). */
#ifndef DSV2_MOE_ROUTER_H
#define DSV2_MOE_ROUTER_H

#include "dsv2.h"

enum { DSV2_TOPK_GREEDY = 0, DSV2_TOPK_GROUP_LIMITED = 1, DSV2_TOPK_NOAUX_TC = 2 };
enum { DSV2_SCORE_SOFTMAX = 0, DSV2_SCORE_SIGMOID = 1 };

typedef struct {
    int64_t n_experts;      /* E */
    int64_t top_k;          /* k, 1 <= k <= E (and <= topk_group * E / n_group for group methods) */
    int64_t n_group;        /* groups (group methods only; must divide E) */
    int64_t topk_group;     /* groups kept, 1 <= topk_group <= n_group */
    int topk_method;        /* DSV2_TOPK_* */
    int scoring;            /* DSV2_SCORE_* */
    int norm_topk_prob;     /* 0 / 1 */
    float routed_scaling_factor;
} dsv2_moe_cfg;

/* DSV2_OK or DSV2_ERR_ARG (the binding gives the detailed message). */
int dsv2_moe_cfg_check(const dsv2_moe_cfg *cfg);

/* Routing from precomputed logits (single-threaded).
 * logits [T, E] , bias [E] (noaux_tc only, may be NULL = zeros)
 *   -> ids [T, k] int64 , w [T, k] fp32 */
int dsv2_moe_route_logits(int64_t *ids, float *w, const float *logits, const float *bias, int64_t T,
                          const dsv2_moe_cfg *cfg);

/* Full router: logits = x . router^T (threaded), then routing.
 * x [T, d] , router [E, d] fp32|bf16 , bias [E] or NULL
 *   -> ids [T, k] , w [T, k] , logits [T, E] (optional, may be NULL) */
int dsv2_moe_route(int64_t *ids, float *w, float *logits, const float *x, const dsv2_mat *router,
                   const float *bias, int64_t T, const dsv2_moe_cfg *cfg);

#endif
