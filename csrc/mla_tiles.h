/* mla_tiles.h - the two small dense products of latent attention over a block
 * of cached rows (all heads of one token at once: MQA with one wide key):
 *   scores: s = q k^T   (q [H, D] against n key rows of width D)
 *   values: o += p c    (p [H, n] weights, c the n rows' first Dv columns)
 * AVX-512 register tiles, with a portable/AVX2 fallback. */
#ifndef DSV2_MLA_TILES_H
#define DSV2_MLA_TILES_H

#include <stddef.h>
#include <stdint.h>

#include "mla.h"

// q [H, D] (rows ldq apart) , k [n, D] (rows ldk apart) -> s [H, n] (rows lds apart) = q k^T
void dsv2_mla_scores(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H,
                     const float *k, int64_t ldk, int64_t n, int64_t D);

// p [H, n] (rows ldp apart) , c [n, Dv] (rows ldc apart) -> o [H, Dv] (rows ldo apart) += p c
void dsv2_mla_pv_acc(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H,
                     const float *c, int64_t ldc, int64_t n, int64_t Dv);

/* cached latent rows of one sequence, read in their own format (see mla.h) */
typedef struct {
    const char *p;     /* the first row */
    int64_t ld;        /* bytes between rows */
    int dtype;         /* DSV2_KV_* */
    int64_t L, rope;   /* kv_lora, rope: a row holds L + rope numbers */
    /* optional: the rows the caller reads next (pf_n of them, ld bytes apart, NULL: none); the
     * score kernels prefetch them into L2 while they pass over these (a long context is one
     * stream of rows: reading it a block ahead keeps the memory busy while a block is computed) */
    const char *pf;
    int64_t pf_n;
} dsv2_mla_rows;

/* The rows of a score tile of R key rows from j0 of the n rows of k (ldk bytes apart): kr, rows past
 * the end clamped to the tile's first (computed, not stored); pr, the next tile's (prefetched into L1;
 * the last tile names itself); fr, while j0 < fn, rows j0.. of the next block fk (prefetched into L2,
 * clamped to its fn rows).  Returns the tile's rows (<= R) and sets *far to whether fr is set. */
static inline int64_t dsv2_mla_tile_rows(const char **kr, const char **pr, const char **fr, int *far, int R,
                                         const char *k, int64_t ldk, int64_t n, int64_t j0, const char *fk,
                                         int64_t fn) {
    const int64_t nr = n - j0 < R ? n - j0 : R;
    const int64_t jn = j0 + R < n ? j0 + R : j0, nn = n - jn < R ? n - jn : R;
    *far = fk && j0 < fn;
    for (int r = 0; r < R; r++) {
        kr[r] = k + (j0 + (nr > r ? r : 0)) * ldk;
        pr[r] = k + (jn + (nn > r ? r : 0)) * ldk;
        fr[r] = *far ? fk + (j0 + r < fn ? j0 + r : fn - 1) * ldk : NULL;
    }
    return nr;
}

// q [H, L + rope] (rows ldq apart) , rows k [n] -> s [H, n] (rows lds apart) = q k^T, fp32 rows read as
// they are, others widened to fp32 one row at a time (the AVX2 / portable attention; AVX-512 takes the
// lanes kernels below)
void dsv2_mla_scores_rows(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H,
                          const dsv2_mla_rows *k, int64_t n);
// p [H, n] (rows ldp apart) , rows c [n] -> o [H, L] (rows ldo apart) += p c[:, :L]
void dsv2_mla_pv_rows(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H,
                      const dsv2_mla_rows *c, int64_t n);

/* ---- heads in lanes: the exact block pass of mla_absorbed.c (AVX-512; f32 and bf16 rows) ----
 * A group of up to 16 heads of one token: its queries transposed, qt [D, 16] (head h in lane h,
 * missing heads zero), the scores of n rows as n vectors s [n, 16], the softmax weights in the
 * same layout (mla_softmax.h). */

// 1 when the lanes kernels take rows of this format (DSV2_KV_F32 / DSV2_KV_BF16) on this CPU
int dsv2_mla_lanes_use(int dtype);

// q [H, D] (rows ldq apart) -> qt [ceil(H / 16), D, 16] (each group's queries transposed, zero-padded)
size_t dsv2_mla_lanes_qpack_len(int64_t H, int64_t D);
void dsv2_mla_lanes_qpack(float *qt, const float *q, int64_t ldq, int64_t H, int64_t D);

// qt [D, 16] (one group; 64-byte aligned) , rows k [n] (D = L + rope) -> s [n, 16] (64-byte aligned) = q k^T
int dsv2_mla_scores_lanes(float *s, const float *qt, const dsv2_mla_rows *k, int64_t n);

// p [n, 16] , rows c [n] -> o [nh, L] (rows ldo apart; first: starts from 0) += p^T c[:, :L], nh <= 16
int dsv2_mla_pv_lanes(float *o, int64_t ldo, const float *p, int64_t nh, const dsv2_mla_rows *c, int64_t n,
                      int first);

#endif
