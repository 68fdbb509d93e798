/* mla_plan.h - grouping of a ragged token batch by sequence (internal to the MLA kernels). */
#ifndef DSV2_MLA_PLAN_H
#define DSV2_MLA_PLAN_H

#include "mla.h"

typedef struct {
    int64_t seq;      /* sequence id */
    int64_t start;    /* first entry of the group in `order` */
    int64_t count;    /* tokens of the group */
    int64_t n_ctx;    /* max position + 1 */
    int64_t sum_len;  /* sum of (position + 1) */
} dsv2_mla_group;

// seq [T], pos [T] -> order [T] (token indices grouped by sequence id, ascending positions in a
// group, ties by index), groups [n_groups]; returns n_groups (>= 0) or -DSV2_ERR_NOMEM.
int64_t dsv2_mla_group_tokens(int64_t *order, dsv2_mla_group *groups, const int64_t *seq,
                              const int64_t *pos, int64_t T);

#endif
