/* mla_decompressed.c - MLA attention in the ordinary (non-absorbed) form.
 *
 * Per sequence of the batch and per group of heads: K_nope and V are decompressed from
 * the sequence's cached latent rows with kv_b_proj (one sgemm over all rows), the keys
 * are repacked per head as [k_nope_h | k_pe] rows; then work items (head, block of
 * queries sorted by position) run on the thread pool: S = Q K^T and O = P V (register tiles),
 * causal softmax per row in fp32.  A block's keys stop at its last query's
 * position, so a prompt costs about half of the full square; items are pulled
 * dynamically (largest first) so the causal imbalance evens out. */
#include "mla.h"
#include "linear.h"
#include "mla_plan.h"
#include "mla_tiles.h"
#include "scratch.h"
#include "threadpool.h"
#include "vexp.h"

#include <stdatomic.h>
#include <stdlib.h>

#define QB 32                   /* queries per work item */
#define KV_BUDGET (48u << 20)   /* bytes of decompressed K / V kept at once */

typedef struct {
    float *kt;                  /* [nh, dqk, n]: keys of each head, transposed */
    const float *kv;            /* [n, nh * hw] */
    const float *cs;            /* [n, Wd] cached rows */
    int64_t n, nh, hw, nope, rope, Wd, L;
} repack_job;

/* blocks of 16 rows: reads stay in L1, writes are 16 contiguous floats */
static void repack_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    const repack_job *j = (const repack_job *)ctx;
    const int64_t dqk = j->nope + j->rope, ldkv = j->nh * j->hw;
    for (int64_t blk = b; blk < e; blk++) {
        const int64_t r0 = blk * 16, r1 = r0 + 16 < j->n ? r0 + 16 : j->n;
        for (int64_t hl = 0; hl < j->nh; hl++) {
            float *kt = j->kt + hl * dqk * j->n;
            const float *src = j->kv + hl * j->hw;
            for (int64_t d = 0; d < j->nope; d++)
                for (int64_t r = r0; r < r1; r++) kt[d * j->n + r] = src[r * ldkv + d];
            const float *pe = j->cs + j->L;
            for (int64_t d = 0; d < j->rope; d++)
                for (int64_t r = r0; r < r1; r++) kt[(j->nope + d) * j->n + r] = pe[r * j->Wd + d];
        }
    }
}

typedef struct {
    int64_t hl, i0, mq, nk;
} dc_item;

typedef struct {
    float *og;                  /* [nq, H, v] */
    const float *qg;            /* [nq, H, dqk] */
    const float *kt;            /* [nh, dqk, n] */
    const float *kv;            /* [n, nh * hw]: V of head hl at column hl * hw + nope */
    const int64_t *len;         /* [nq] keys visible to each query */
    const dc_item *items;
    int64_t n_items, n, h0, nh, H, hw, nope, dqk, v;
    float scale;
    atomic_long next;
    atomic_int err;
} dc_job;

static void dc_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b; (void)e; (void)tid;
    dc_job *j = (dc_job *)ctx;
    float *sb = (float *)malloc((size_t)QB * (size_t)j->n * sizeof(float));
    if (!sb) {
        atomic_store(&j->err, DSV2_ERR_NOMEM);
        return;
    }
    for (;;) {
        int64_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n_items) break;
        const dc_item *it = &j->items[i];
        const int64_t h = j->h0 + it->hl, nk = it->nk, mq = it->mq;
        /* S [mq, nk] = Q [mq, dqk] K^T [dqk, nk]: the p c tile product with the transposed keys */
        for (int64_t r = 0; r < mq; r++) memset(sb + r * nk, 0, (size_t)nk * sizeof(float));
        dsv2_mla_pv_acc(sb, nk, j->qg + (it->i0 * j->H + h) * j->dqk, j->H * j->dqk, mq,
                        j->kt + it->hl * j->dqk * j->n, j->n, j->dqk, nk);
        for (int64_t r = 0; r < mq; r++) {
            float *row = sb + r * nk;
            const int64_t n = j->len[it->i0 + r];
            const float m = dsv2_vmax(row, n) * j->scale;
            const float inv = 1.0f / dsv2_vexp_shift_sum(row, n, j->scale, m);
            dsv2_vscale(row, n, inv);
            for (int64_t c = n; c < nk; c++) row[c] = 0.0f;
        }
        float *o = j->og + (it->i0 * j->H + h) * j->v;
        for (int64_t r = 0; r < mq; r++) memset(o + r * j->H * j->v, 0, (size_t)j->v * sizeof(float));
        dsv2_mla_pv_acc(o, j->H * j->v, sb, nk, mq, j->kv + it->hl * j->hw + j->nope, j->nh * j->hw, nk, j->v);
    }
    free(sb);
}

static int cmp_item_desc(const void *a, const void *b) {
    const dc_item *x = (const dc_item *)a, *y = (const dc_item *)b;
    int64_t cx = x->mq * x->nk, cy = y->mq * y->nk;
    return cx > cy ? -1 : cx < cy ? 1 : 0;
}

static int one_sequence(float *o, const float *q, const float *cs, const int64_t *order, const int64_t *pos,
                        const dsv2_mla_group *g, const dsv2_mat *kv_b, const dsv2_mla_dims *dm, float scale) {
    const int64_t H = dm->n_heads, nope = dm->nope, rope = dm->rope, v = dm->v, L = dm->kv_lora;
    const int64_t dqk = nope + rope, Wd = L + rope, hw = nope + v, nq = g->count, n = g->n_ctx;
    int64_t hg = (int64_t)KV_BUDGET / (n * (hw + dqk) * (int64_t)sizeof(float));
    if (hg < 1) hg = 1;
    if (hg > H) hg = H;
    const int64_t nqb = (nq + QB - 1) / QB;
    /* the group's tokens are usually one contiguous run in position order: no gather then */
    const int64_t t0 = order[g->start];
    int contiguous = 1;
    for (int64_t i = 1; i < nq && contiguous; i++) contiguous = order[g->start + i] == t0 + i;
    float *qbuf = contiguous ? NULL : (float *)dsv2_scratch_alloc((size_t)nq * (size_t)H * (size_t)dqk * sizeof(float));
    float *obuf = contiguous ? NULL : (float *)dsv2_scratch_alloc((size_t)nq * (size_t)H * (size_t)v * sizeof(float));
    const float *qg = contiguous ? q + t0 * H * dqk : qbuf;
    float *og = contiguous ? o + t0 * H * v : obuf;
    float *kv = (float *)dsv2_scratch_alloc((size_t)n * (size_t)hg * (size_t)hw * sizeof(float));
    float *kt = (float *)dsv2_scratch_alloc((size_t)n * (size_t)hg * (size_t)dqk * sizeof(float));
    int64_t *len = (int64_t *)malloc((size_t)nq * sizeof(int64_t));
    dc_item *items = (dc_item *)malloc((size_t)(nqb * hg) * sizeof(dc_item));
    int rc = DSV2_OK;
    if ((!contiguous && (!qbuf || !obuf)) || !kv || !kt || !len || !items) {
        rc = DSV2_ERR_NOMEM;
        goto done;
    }
    for (int64_t i = 0; i < nq; i++) {
        const int64_t t = order[g->start + i];
        if (!contiguous) memcpy(qbuf + i * H * dqk, q + t * H * dqk, (size_t)(H * dqk) * sizeof(float));
        len[i] = pos[t] + 1;
    }
    const int nthreads = dsv2_get_num_threads();
    for (int64_t h0 = 0; h0 < H; h0 += hg) {
        const int64_t nh = H - h0 < hg ? H - h0 : hg;
        dsv2_mat Wg = dsv2_mat_rows(kv_b, h0 * hw, nh * hw);
        rc = dsv2_linear_ex(kv, nh * hw, cs, Wd, &Wg, n);
        if (rc) goto done;
        repack_job rj = {kt, kv, cs, n, nh, hw, nope, rope, Wd, L};
        dsv2_parallel_for((n + 15) / 16, 4, repack_task, &rj);
        int64_t ni = 0;
        for (int64_t hl = 0; hl < nh; hl++)
            for (int64_t i0 = 0; i0 < nq; i0 += QB) {
                const int64_t mq = nq - i0 < QB ? nq - i0 : QB;
                items[ni].hl = hl;
                items[ni].i0 = i0;
                items[ni].mq = mq;
                items[ni].nk = len[i0 + mq - 1]; /* queries sorted by position */
                ni++;
            }
        qsort(items, (size_t)ni, sizeof(dc_item), cmp_item_desc);
        dc_job j;
        j.og = og; j.qg = qg; j.kt = kt; j.kv = kv; j.len = len; j.items = items;
        j.n_items = ni; j.n = n; j.h0 = h0; j.nh = nh; j.H = H; j.hw = hw; j.nope = nope; j.dqk = dqk; j.v = v;
        j.scale = scale;
        atomic_init(&j.next, 0);
        atomic_init(&j.err, 0);
        dsv2_parallel_for(ni < nthreads ? ni : nthreads, 1, dc_task, &j);
        rc = atomic_load(&j.err);
        if (rc) goto done;
    }
    if (!contiguous)
        for (int64_t i = 0; i < nq; i++)
            memcpy(o + order[g->start + i] * H * v, obuf + i * H * v, (size_t)(H * v) * sizeof(float));
done:
    dsv2_scratch_free(qbuf);
    dsv2_scratch_free(obuf);
    dsv2_scratch_free(kv);
    dsv2_scratch_free(kt);
    free(len);
    free(items);
    return rc;
}

int dsv2_mla_attn_decompressed(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                               const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                               float scale) {
    const int64_t H = dm->n_heads, Wd = dm->kv_lora + dm->rope;
    if (T < 0 || H <= 0 || dm->nope <= 0 || dm->rope <= 0 || dm->v <= 0 || dm->kv_lora <= 0) return DSV2_ERR_ARG;
    if (kv_b->rows != H * (dm->nope + dm->v) || kv_b->cols != dm->kv_lora) return DSV2_ERR_ARG;
    if (cache->B <= 0 || cache->S <= 0 || !(scale > 0.0f)) return DSV2_ERR_ARG;
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
    for (int64_t k = 0; k < ng && !rc; k++) {
        const float *cs = cache->data + (size_t)g[k].seq * (size_t)cache->S * (size_t)Wd;
        rc = one_sequence(o, q, cs, order, pos, &g[k], kv_b, dm, scale);
    }
done:
    free(order);
    free(g);
    return rc;
}
