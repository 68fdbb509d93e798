/* moe_dispatch.h - group the (token, slot) pairs of a routed batch by expert
 * (a counting sort), and combine the experts' outputs back into token order.
 *
 * A "slot" is s = t * k + j: the j-th chosen expert of token t.  After
 * dispatch, the rows [offsets[e], offsets[e + 1]) of the grouped order hold
 * expert e's slots, tokens ascending, so each expert runs once on all of its
 * tokens as one matrix product (gathered rows). */
#ifndef DSV2_MOE_DISPATCH_H
#define DSV2_MOE_DISPATCH_H

#include "dsv2.h"

/* ids [T, k] (each in [0, E), checked) -> offsets [E + 1] , order [T * k]
 * order[r] = the slot at grouped row r; stable (slots ascending per expert).
 * Returns DSV2_ERR_RANGE if an id is outside [0, E). */
int dsv2_moe_dispatch(int64_t *offsets, int64_t *order, const int64_t *ids, int64_t T, int64_t k,
                      int64_t E);

/* The combine plan: for each token its grouped rows in ascending order (that
 * is, ascending expert id) with their weights.
 * order [T * k] (a permutation), w [T, k] -> rows [T, k] , wts [T, k] */
void dsv2_moe_combine_plan(int64_t *rows, float *wts, const int64_t *order, const float *w, int64_t T,
                           int64_t k);

/* Columns [c0, c1) of the combine (single-threaded):
 * out[t, c] = (sum over m < k, in plan order, of wts[t, m] * Y[rows[t, m], c]) + add[t, c]
 * Y [T * k, *] grouped rows (ldy apart) , add [T, *] or NULL (ldadd apart) -> out [T, *] (ldo apart)
 * The sum starts from 0 and adds experts in ascending id, as transformers'
 * index_add loop does; the result does not depend on how columns are split. */
void dsv2_moe_combine_cols(float *out, int64_t ldo, const float *Y, int64_t ldy, const int64_t *rows,
                           const float *wts, const float *add, int64_t ldadd, int64_t T, int64_t k,
                           int64_t c0, int64_t c1);

/* Whole combine, threaded over column blocks (deterministic):
 * Y [T * k, d] grouped rows , order [T * k] , w [T, k] , add [T, d] or NULL -> out [T, d] */
int dsv2_moe_combine(float *out, const float *Y, const int64_t *order, const float *w, const float *add,
                     int64_t T, int64_t k, int64_t d);

#endif
