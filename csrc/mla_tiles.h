/* mla_tiles.h - the two small dense products of latent attention over a block
 * of cached rows (all heads of one token at once: MQA with one wide key):
 *   scores: s = q k^T   (q [H, D] against n key rows of width D)
 *   values: o += p c    (p [H, n] weights, c the n rows' first Dv columns)
 * AVX-512 register tiles, with a portable/AVX2 fallback. */
#ifndef DSV2_MLA_TILES_H
#define DSV2_MLA_TILES_H

#include <stdint.h>

// q [H, D] (rows ldq apart) , k [n, D] (rows ldk apart) -> s [H, n] (rows lds apart) = q k^T
void dsv2_mla_scores(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H,
                     const float *k, int64_t ldk, int64_t n, int64_t D);

// p [H, n] (rows ldp apart) , c [n, Dv] (rows ldc apart) -> o [H, Dv] (rows ldo apart) += p c
void dsv2_mla_pv_acc(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H,
                     const float *c, int64_t ldc, int64_t n, int64_t Dv);

#endif
