/* mla_decompressed.c - MLA attention in the ordinary (non-absorbed) form, tiled over keys.
 *
 * Per sequence of the batch, the new tokens (sorted by position) are the queries and the
 * cached rows 0 .. n_ctx-1 are visited in key tiles of kt rows.  For each tile: the tile's
 * rows are widened to fp32 (one tile at a time, never the whole cache), K_nope and V of every
 * head are decompressed from them with kv_b_proj (one matrix product), and the keys are
 * repacked per head as [k_nope | k_pe]^T; then work items (head, block of QB queries) run on
 * the thread pool: S = Q K^T and O += P V (register tiles) with an online softmax in fp32
 * (running max m, sum l and unnormalized output O per query and head, flash-attention
 * style), causal within the tile.  O lives in the output array and is divided by l at the
 * end.  The work space does not grow with the context (flash-attention style):
 *   kt (W + H (nope + v) + H (nope + rope)) + threads QB kt + 2 nq H   floats,
 *   kt = the largest multiple of 64 with kt (W + H (2 nope + rope + v)) 4 bytes <= TILE_BYTES
 *   (at least 64; 512 for V2-Lite dims, 64 for V2), W = kv_lora + rope, nq = new tokens.
 * The tiles and query blocks depend on the sizes only, so the result is the same for any
 * number of threads. */
#include "mla.h"
#include "linear.h"
#include "mla_plan.h"
#include "mla_tiles.h"
#include "scratch.h"
#include "threadpool.h"
#include "vexp.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#define QB 32                     /* queries per work item */
#define TILE_BYTES (16u << 20)    /* bytes of one key tile's fp32 rows + decompressed K / V */

typedef struct {
    float *kt;                  /* [H, dqk, ldt]: keys of each head, transposed */
    const float *kv;            /* [n, H * hw] */
    const float *lat;           /* [n, ldl] the tile's rows in fp32 (k_pe at column L) */
    int64_t n, ldt, ldl, H, hw, nope, rope, L;
} repack_job;

/* blocks of 16 rows: reads stay in L1, writes are 16 contiguous floats */
static void repack_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    const repack_job *j = (const repack_job *)ctx;
    const int64_t dqk = j->nope + j->rope, ldkv = j->H * j->hw;
    for (int64_t blk = b; blk < e; blk++) {
        const int64_t r0 = blk * 16, r1 = r0 + 16 < j->n ? r0 + 16 : j->n;
        for (int64_t h = 0; h < j->H; h++) {
            float *kt = j->kt + h * dqk * j->ldt;
            const float *src = j->kv + h * j->hw;
            for (int64_t d = 0; d < j->nope; d++)
                for (int64_t r = r0; r < r1; r++) kt[d * j->ldt + r] = src[r * ldkv + d];
            const float *pe = j->lat + j->L;
            for (int64_t d = 0; d < j->rope; d++)
                for (int64_t r = r0; r < r1; r++) kt[(j->nope + d) * j->ldt + r] = pe[r * j->ldl + d];
        }
    }
}

typedef struct {
    int64_t h, i0, mq, nk; /* head, first query, queries, keys of the tile seen by the block */
} dc_item;

typedef struct {
    float *og;                  /* [nq, H, v]: unnormalized outputs */
    float *ml;                  /* [nq, H, 2]: running max and sum */
    const float *qg;            /* [nq, H, dqk] */
    const float *kt;            /* [H, dqk, ldt] */
    const float *kv;            /* [n, H * hw]: V of head h at column h * hw + nope */
    const int64_t *len;         /* [nq] keys visible to each query (position + 1) */
    const dc_item *items;
    int64_t n_items, k0, ldt, H, hw, nope, dqk, v;
    float scale;
    atomic_long next;
    atomic_int err;
} dc_job;

static void dc_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b; (void)e; (void)tid;
    dc_job *j = (dc_job *)ctx;
    float *sb = (float *)malloc((size_t)QB * (size_t)j->ldt * sizeof(float));
    if (!sb) {
        atomic_store(&j->err, DSV2_ERR_NOMEM);
        return;
    }
    for (;;) {
        int64_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n_items) break;
        const dc_item *it = &j->items[i];
        const int64_t h = it->h, nk = it->nk, mq = it->mq;
        /* S [mq, nk] = Q [mq, dqk] K^T [dqk, nk]: the p c tile product with the transposed keys */
        for (int64_t r = 0; r < mq; r++) memset(sb + r * nk, 0, (size_t)nk * sizeof(float));
        dsv2_mla_pv_acc(sb, nk, j->qg + (it->i0 * j->H + h) * j->dqk, j->H * j->dqk, mq,
                        j->kt + h * j->dqk * j->ldt, j->ldt, j->dqk, nk);
        float *o = j->og + (it->i0 * j->H + h) * j->v;
        const float *V = j->kv + h * j->hw + j->nope;
        const int64_t ldo = j->H * j->v, ldv = j->H * j->hw;
        int64_t n0 = nk; /* keys seen by every query of the block */
        for (int64_t r = 0; r < mq; r++) {
            float *row = sb + r * nk, *orow = o + r * ldo;
            float *ml = j->ml + ((it->i0 + r) * j->H + h) * 2;
            int64_t n = j->len[it->i0 + r] - j->k0; /* keys of the tile this query sees */
            if (n > nk) n = nk;
            if (n < n0) n0 = n < 0 ? 0 : n;
            if (n <= 0) continue;
            const float mx = dsv2_vmax(row, n) * j->scale;
            if (mx > ml[0] || mx != mx) { /* NaN scores propagate */
                if (ml[1] > 0.0f) {
                    const float a = expf(ml[0] - mx);
                    ml[1] *= a;
                    dsv2_vscale(orow, j->v, a);
                }
                ml[0] = mx;
            }
            ml[1] += dsv2_vexp_shift_sum(row, n, j->scale, ml[0]);
        }
        /* O += P V over exactly the keys each query sees (a key it must not see may hold NaN / Inf:
         * a zero weight would still spread them): the keys all see together, then each row's rest */
        dsv2_mla_pv_acc(o, ldo, sb, nk, mq, V, ldv, n0, j->v);
        for (int64_t r = 0; r < mq; r++) {
            int64_t n = j->len[it->i0 + r] - j->k0;
            if (n > nk) n = nk;
            if (n > n0) dsv2_mla_pv_acc(o + r * ldo, ldo, sb + r * nk + n0, nk, 1, V + n0 * ldv, ldv, n - n0, j->v);
        }
    }
    free(sb);
}

static int cmp_item_desc(const void *a, const void *b) {
    const dc_item *x = (const dc_item *)a, *y = (const dc_item *)b;
    int64_t cx = x->mq * x->nk, cy = y->mq * y->nk;
    if (cx != cy) return cx > cy ? -1 : 1;
    if (x->h != y->h) return x->h < y->h ? -1 : 1;
    return x->i0 < y->i0 ? -1 : x->i0 > y->i0;
}

/* rows of one key tile per TILE_BYTES (a multiple of 64, at least 64) */
static int64_t tile_rows(const dsv2_mla_dims *dm) {
    const int64_t H = dm->n_heads, W = dm->kv_lora + dm->rope;
    const int64_t per_row = (W + H * (2 * dm->nope + dm->rope + dm->v)) * (int64_t)sizeof(float);
    int64_t kt = (int64_t)TILE_BYTES / per_row / 64 * 64;
    return kt < 64 ? 64 : kt;
}

static int one_sequence(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *order,
                        const int64_t *pos, const dsv2_mla_group *g, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                        float scale) {
    const int64_t H = dm->n_heads, nope = dm->nope, rope = dm->rope, v = dm->v, L = dm->kv_lora;
    const int64_t dqk = nope + rope, W = L + rope, hw = nope + v, nq = g->count, n_ctx = g->n_ctx;
    const int64_t rb = dsv2_mla_row_bytes(cache->dtype, L, rope);
    const char *rows = (const char *)cache->data + (size_t)g->seq * (size_t)cache->S * (size_t)rb;
    int64_t kt_rows = tile_rows(dm);
    if (kt_rows > n_ctx) kt_rows = (n_ctx + 15) / 16 * 16;
    const int64_t nqb = (nq + QB - 1) / QB;
    /* the group's tokens are usually one contiguous run in position order: no gather then */
    const int64_t t0 = order[g->start];
    int contiguous = 1;
    for (int64_t i = 1; i < nq && contiguous; i++) contiguous = order[g->start + i] == t0 + i;
    float *qbuf = contiguous ? NULL : (float *)dsv2_scratch_alloc((size_t)nq * (size_t)H * (size_t)dqk * sizeof(float));
    float *obuf = contiguous ? NULL : (float *)dsv2_scratch_alloc((size_t)nq * (size_t)H * (size_t)v * sizeof(float));
    const float *qg = contiguous ? q + t0 * H * dqk : qbuf;
    float *og = contiguous ? o + t0 * H * v : obuf;
    /* fp32 rows of the tile: the cache itself for an fp32 cache */
    float *lat = cache->dtype == DSV2_KV_F32 ? NULL
                                             : (float *)dsv2_scratch_alloc((size_t)kt_rows * (size_t)W * sizeof(float));
    float *kv = (float *)dsv2_scratch_alloc((size_t)kt_rows * (size_t)H * (size_t)hw * sizeof(float));
    float *kt = (float *)dsv2_scratch_alloc((size_t)kt_rows * (size_t)H * (size_t)dqk * sizeof(float));
    float *ml = (float *)dsv2_scratch_alloc((size_t)nq * (size_t)H * 2 * sizeof(float));
    int64_t *len = (int64_t *)malloc((size_t)nq * sizeof(int64_t));
    dc_item *items = (dc_item *)malloc((size_t)(nqb * H) * sizeof(dc_item));
    int rc = DSV2_OK;
    if ((!contiguous && (!qbuf || !obuf)) || (cache->dtype != DSV2_KV_F32 && !lat) || !kv || !kt || !ml || !len ||
        !items) {
        rc = DSV2_ERR_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < nq; i++) {
        const int64_t t = order[g->start + i];
        if (!contiguous) memcpy(qbuf + i * H * dqk, q + t * H * dqk, (size_t)(H * dqk) * sizeof(float));
        len[i] = pos[t] + 1;
        memset(og + i * H * v, 0, (size_t)(H * v) * sizeof(float));
    }
    for (int64_t i = 0; i < nq * H; i++) {
        ml[2 * i] = -INFINITY;
        ml[2 * i + 1] = 0.0f;
    }
    const int nthreads = dsv2_get_num_threads();
    for (int64_t k0 = 0; k0 < n_ctx; k0 += kt_rows) {
        const int64_t nk = n_ctx - k0 < kt_rows ? n_ctx - k0 : kt_rows;
        const float *lt;
        if (lat) {
            dsv2_mla_rows_load(lat, W, rows + (size_t)k0 * (size_t)rb, rb, nk, 0, W, cache->dtype, L, rope);
            lt = lat;
        } else {
            lt = (const float *)rows + k0 * W;
        }
        rc = dsv2_linear_ex(kv, H * hw, lt, W, kv_b, nk);
        if (rc) goto done;
        repack_job rj = {kt, kv, lt, nk, kt_rows, W, H, hw, nope, rope, L};
        dsv2_parallel_for((nk + 15) / 16, 4, repack_task, &rj);
        int64_t ni = 0;
        for (int64_t h = 0; h < H; h++)
            for (int64_t i0 = 0; i0 < nq; i0 += QB) {
                const int64_t mq = nq - i0 < QB ? nq - i0 : QB;
                int64_t seen = len[i0 + mq - 1] - k0; /* queries sorted by position */
                if (seen <= 0) continue;
                items[ni].h = h;
                items[ni].i0 = i0;
                items[ni].mq = mq;
                items[ni].nk = seen < nk ? seen : nk;
                ni++;
            }
        qsort(items, (size_t)ni, sizeof(dc_item), cmp_item_desc);
        dc_job j;
        j.og = og; j.ml = ml; j.qg = qg; j.kt = kt; j.kv = kv; j.len = len; j.items = items;
        j.n_items = ni; j.k0 = k0; j.ldt = kt_rows; j.H = H; j.hw = hw; j.nope = nope; j.dqk = dqk; j.v = v;
        j.scale = scale;
        atomic_init(&j.next, 0);
        atomic_init(&j.err, 0);
        dsv2_parallel_for(ni < nthreads ? ni : nthreads, 1, dc_task, &j);
        rc = atomic_load(&j.err);
        if (rc) goto done;
    }
    for (int64_t i = 0; i < nq * H; i++) dsv2_vscale(og + i * v, v, 1.0f / ml[2 * i + 1]);
    if (!contiguous)
        for (int64_t i = 0; i < nq; i++)
            memcpy(o + order[g->start + i] * H * v, obuf + i * H * v, (size_t)(H * v) * sizeof(float));
done:
    dsv2_scratch_free(qbuf);
    dsv2_scratch_free(obuf);
    dsv2_scratch_free(lat);
    dsv2_scratch_free(kv);
    dsv2_scratch_free(kt);
    dsv2_scratch_free(ml);
    free(len);
    free(items);
    return rc;
}

int dsv2_mla_attn_decompressed(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                               const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                               float scale) {
    const int64_t H = dm->n_heads;
    if (T < 0 || H <= 0 || dm->nope <= 0 || dm->rope <= 0 || dm->v <= 0 || dm->kv_lora <= 0) return DSV2_ERR_ARG;
    if (kv_b->rows != H * (dm->nope + dm->v) || kv_b->cols != dm->kv_lora) return DSV2_ERR_ARG;
    if (cache->B <= 0 || cache->S <= 0 || !(scale > 0.0f)) return DSV2_ERR_ARG;
    if (dsv2_mla_row_bytes(cache->dtype, dm->kv_lora, dm->rope) <= 0) return DSV2_ERR_ARG;
    if (cache->S > INT32_MAX || H * (dm->nope + dm->v) > INT32_MAX) return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    for (int64_t t = 0; t < T; t++)
        if (seq[t] < 0 || seq[t] >= cache->B || pos[t] < 0 || pos[t] >= cache->S) return DSV2_ERR_RANGE;
    int64_t *order = (int64_t *)malloc((size_t)T * sizeof(int64_t));
    dsv2_mla_group *g = (dsv2_mla_group *)malloc((size_t)T * sizeof(dsv2_mla_group));
    int rc = DSV2_OK;
    if (!order || !g) {
        rc = DSV2_ERR_NOMEM;
        goto done;
    }
    int64_t ng = dsv2_mla_group_tokens(order, g, seq, pos, T);
    if (ng < 0) {
        rc = (int)-ng;
        goto done;
    }
    for (int64_t k = 0; k < ng && !rc; k++) rc = one_sequence(o, q, cache, order, pos, &g[k], kv_b, dm, scale);
done:
    free(order);
    free(g);
    return rc;
}
