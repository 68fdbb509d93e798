/* moe_block.c - the DeepSeekMoE block: route, group by expert, run the
 * experts (sgemm for busy experts, fused row-dot kernels for the rest), combine. */
#include "moe_block.h"
#include "moe_dispatch.h"
#include "scratch.h"
#include "threadpool.h"

#include <stdatomic.h>
#include <stdlib.h>

/* Work items of the row-dot units (decode and few tokens per expert): gate/up rows per item and
 * down + combine output columns per block, as large as leaves MOE_ITEMS_PER_THREAD items per
 * thread, between the minimum and the maximum below, a multiple of 16 (the boundaries of 4-row
 * kernel tiles stay where they were).  Each item starts new weight streams cold; longer ones
 * stream faster: lite-L4 decode (T = 1), 2 threads, Zen 4, one moe_block call, 3 layers in turn,
 * 48 / 24 -> 352 / 256: int4 2.74 -> 2.25 ms, fp8 3.78 -> 3.13, bf16 5.38 -> 4.62, int8 3.16 ->
 * 2.87 (medians of 6-8 alternating rounds).  The bits do not depend on the items (every row is
 * computed alone, the combine's order is fixed). */
#define MOE_ROWS_A 48      /* at least */
#define MOE_ROWS_A_MAX 352 /* at most */
#define MOE_COLS_B 24
#define MOE_COLS_B_MAX 256
#define MOE_ITEMS_PER_THREAD 4
#define MOE_COLS_DOWN 128           /* output columns per down work item (many tokens) */
/* From this many tokens a chunk runs down_proj unit by unit, then the combine on its own:
 * lite-L4, 512 tokens, bf16: down phase 180 -> 125 ms (each unit's h stays in cache
 * instead of being re-read from memory for every 24 output columns).  Fewer tokens
 * (decode) keep the one fused phase (one parallel region less). */
#define MOE_SPLIT_MIN_T 16
#define MOE_CHUNK_BYTES (128u << 20) /* workspace budget that sets the token chunk */

/* an expert (or the shared expert) run by the row-dot kernels */
typedef struct {
    const dsv2_mlp *m;
    const float *x; /* [n, d] rows ldx apart */
    int64_t ldx, n;
    float *h; /* [n, I] rows ldh apart */
    int64_t ldh;
    float *y; /* [n, d] rows ldy apart */
    int64_t ldy;
    int64_t I;
    int64_t item0; /* its first gate/up work item */
    dsv2_xq xq, hq; /* prepared x / h: int16 (int8 weights) or even|odd (bf16); both NULL: fp32 */
} unit;

typedef struct {
    unit *units;
    int64_t nunits, nitems;
    atomic_llong next;   /* next gate/up item */
    atomic_llong next_b; /* next down + combine column block */
    int64_t rows_a, cols_b; /* gate/up rows per item, down + combine columns per block */
    /* down + combine */
    float *out;
    const float *Y, *Ys;
    const int64_t *rows;
    const float *wts;
    int64_t T, k, d;
} block_job;

/* n rows or columns in items of lo..hi (a multiple of 16 above lo), MOE_ITEMS_PER_THREAD per thread */
static int64_t item_size(int64_t n, int nt, int64_t lo, int64_t hi) {
    int64_t s = n / ((int64_t)MOE_ITEMS_PER_THREAD * (nt > 0 ? nt : 1)) / 16 * 16;
    return s < lo ? lo : s > hi ? hi : s;
}

static void gateup_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b, (void)e, (void)tid;
    block_job *j = (block_job *)ctx;
    int64_t u = 0;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (it >= j->nitems) break;
        while (u + 1 < j->nunits && j->units[u + 1].item0 <= it) u++;
        while (u > 0 && j->units[u].item0 > it) u--;
        const unit *un = &j->units[u];
        int64_t i0 = (it - un->item0) * j->rows_a;
        int64_t i1 = i0 + j->rows_a < un->I ? i0 + j->rows_a : un->I;
        dsv2_mlp_gateup_rows_q(un->h, un->ldh, un->x, un->ldx, &un->xq, un->n, un->m, i0, i1);
    }
}

static void down_combine_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b, (void)e, (void)tid;
    block_job *j = (block_job *)ctx;
    const int64_t cb = j->cols_b, nblk = (j->d + cb - 1) / cb;
    for (;;) {
        int64_t blk = atomic_fetch_add_explicit(&j->next_b, 1, memory_order_relaxed);
        if (blk >= nblk) break;
        int64_t c0 = blk * cb, c1 = c0 + cb < j->d ? c0 + cb : j->d;
        for (int64_t u = 0; u < j->nunits; u++) {
            const unit *un = &j->units[u];
            dsv2_mlp_down_rows_q(un->y, un->ldy, un->h, un->ldh, &un->hq, un->n, un->m, c0, c1);
        }
        dsv2_moe_combine_cols(j->out, j->d, j->Y, j->d, j->rows, j->wts, j->Ys, j->d, j->T, j->k, c0, c1);
    }
}

/* many tokens: down_proj by unit (its h stays in cache while its down rows
 * stream by in blocks of MOE_COLS_DOWN), then the combine on its own */
static void down_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b, (void)e, (void)tid;
    block_job *j = (block_job *)ctx;
    const int64_t nblk = (j->d + MOE_COLS_DOWN - 1) / MOE_COLS_DOWN;
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&j->next_b, 1, memory_order_relaxed);
        if (it >= nblk * j->nunits) break;
        const unit *un = &j->units[it / nblk];
        int64_t c0 = (it % nblk) * MOE_COLS_DOWN, c1 = c0 + MOE_COLS_DOWN < j->d ? c0 + MOE_COLS_DOWN : j->d;
        dsv2_mlp_down_rows_q(un->y, un->ldy, un->h, un->ldh, &un->hq, un->n, un->m, c0, c1);
    }
}

static void combine_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    block_job *j = (block_job *)ctx;
    dsv2_moe_combine_cols(j->out, j->d, j->Y, j->d, j->rows, j->wts, j->Ys, j->d, j->T, j->k, b, e);
}

typedef struct {
    float *dst;
    const float *x;
    const int64_t *order;
    int64_t k, d;
} gather_job;

static void gather_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    gather_job *g = (gather_job *)ctx;
    for (int64_t r = b; r < e; r++)
        memcpy(g->dst + r * g->d, g->x + (g->order[r] / g->k) * g->d, (size_t)g->d * sizeof(float));
}

/* quantize the h rows of every unit (int8 / int4 down_proj) */
static void quant_h_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    block_job *j = (block_job *)ctx;
    for (int64_t u = b; u < e; u++) {
        const unit *un = &j->units[u];
        dsv2_act_quantize(&un->hq, un->h, un->ldh, un->n, un->I);
    }
}

typedef struct {
    const dsv2_xq *xq;
    const float *x;
    int64_t ldx, K;
} quant_rows_job;

static void quant_rows_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    quant_rows_job *j = (quant_rows_job *)ctx;
    const dsv2_xq xr = dsv2_xq_rows(j->xq, j->K, b);
    dsv2_act_quantize(&xr, j->x + b * j->ldx, j->ldx, e - b, j->K);
}

/* rows x [n, K] -> the prepared kinds of xq (threaded over rows when there are many) */
static void quant_rows(const dsv2_xq *xq, const float *x, int64_t ldx, int64_t n, int64_t K) {
    quant_rows_job j = {xq, x, ldx, K};
    int64_t grain = (int64_t)(1 << 16) / K;
    dsv2_parallel_for(n, grain < 1 ? 1 : grain, quant_rows_task, &j);
}

typedef struct {
    int64_t *off, *order, *rows;
    float *wts, *Xg, *Y, *H, *Ys, *Hs, *Xs, *gs;
    unit *units;
    /* quantized activations for int8 / int4 weights (all parts NULL when unused):
     * Xq [S, d] gathered rows, xsq [Tc, d] (shared), Hq [S, I], Hsq [hs_tok, Is] */
    dsv2_xq Xq, xsq, Hq, Hsq;
} workspace;

/* Busy experts, several at once: each thread runs whole experts (their products single-threaded:
 * regions nested in a task run serially), claiming the next one from an atomic counter, largest
 * first.  Every product computes an element the same way whatever the split (gemm_amx.h,
 * linear.c), so the results are those of one expert after another on the whole pool, which is
 * what fewer busy experts than 2 per thread get (prefill of a long prompt: ~48 tokens per routed
 * expert of V2-Lite at 512 tokens; split over 16 threads each such product was ~0.1 ms between
 * two joins). */
typedef struct {
    const workspace *ws;
    const dsv2_mlp *experts;
    const int64_t *list; /* busy experts, largest first */
    int64_t n, d;
    atomic_llong next;
    atomic_int err;
} busy_job;

static void busy_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b, (void)e, (void)tid;
    busy_job *j = (busy_job *)ctx;
    const workspace *ws = j->ws;
    float *gs = NULL;
    int64_t cap = 0;
    for (;;) {
        const int64_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n || atomic_load(&j->err) != DSV2_OK) break;
        const int64_t ex = j->list[i], o = ws->off[ex], n = ws->off[ex + 1] - o;
        const int64_t need = dsv2_mlp_gemm_scratch(&j->experts[ex], n);
        if (need > cap) {
            dsv2_scratch_free(gs);
            gs = (float *)dsv2_scratch_alloc((size_t)need * sizeof(float));
            cap = gs ? need : 0;
            if (!gs) {
                atomic_store(&j->err, DSV2_ERR_NOMEM);
                break;
            }
        }
        const int rc = dsv2_mlp_gemm(ws->Y + o * j->d, j->d, ws->Xg + o * j->d, j->d, n, &j->experts[ex], gs);
        if (rc) atomic_store(&j->err, rc);
    }
    dsv2_scratch_free(gs);
}

/* the busy experts (more than `busy` tokens) through dsv2_mlp_gemm: several at once when there are
 * at least two per thread, else one after another on the whole pool */
static int run_busy(const workspace *ws, const dsv2_mlp *experts, int64_t E, int64_t busy, int64_t d) {
    int64_t count = 0; /* none in a decode step: no allocation, no sort */
    for (int64_t e = 0; e < E; e++) count += ws->off[e + 1] - ws->off[e] > busy;
    if (count == 0) return DSV2_OK;
    int64_t *list = (int64_t *)malloc((size_t)count * sizeof(int64_t));
    if (!list) return DSV2_ERR_NOMEM;
    int64_t nb = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = ws->off[e + 1] - ws->off[e];
        if (n <= busy) continue;
        int64_t i = nb++; /* insertion by token count, largest first (ties: lower expert first) */
        while (i > 0 && ws->off[list[i - 1] + 1] - ws->off[list[i - 1]] < n) {
            list[i] = list[i - 1];
            i--;
        }
        list[i] = e;
    }
    int rc = DSV2_OK;
    const int nt = dsv2_region_threads();
    if (nt > 1 && nb >= 2 * (int64_t)nt) {
        busy_job j = {ws, experts, list, nb, d};
        atomic_init(&j.next, 0);
        atomic_init(&j.err, DSV2_OK);
        dsv2_parallel_for(nt, 1, busy_task, &j);
        rc = atomic_load(&j.err);
    } else {
        for (int64_t i = 0; i < nb && rc == DSV2_OK; i++) {
            const int64_t o = ws->off[list[i]], n = ws->off[list[i] + 1] - o;
            rc = dsv2_mlp_gemm(ws->Y + o * d, d, ws->Xg + o * d, d, n, &experts[list[i]], ws->gs);
        }
    }
    free(list);
    return rc;
}

/* one chunk of Tc tokens: x [Tc, d], ids/w [Tc, k] -> out [Tc, d] */
static int run_chunk(const workspace *ws, float *out, const float *x, const int64_t *ids, const float *w,
                     const dsv2_mlp *experts, int64_t E, const dsv2_mlp *shared, int64_t Tc, int64_t k,
                     int64_t d, int64_t I, int64_t Is) {
    const int64_t S = Tc * k;
    int rc = dsv2_moe_dispatch(ws->off, ws->order, ids, Tc, k, E);
    if (rc) return rc;
    dsv2_moe_combine_plan(ws->rows, ws->wts, ws->order, w, Tc, k);
    gather_job gj = {ws->Xg, x, ws->order, k, d};
    int64_t grain = d >= 16384 ? 1 : 16384 / d;
    dsv2_parallel_for(S, grain, gather_task, &gj);

    /* busy experts (more tokens than the row-dot path takes): one matrix-product MLP each */
    const int64_t busy = dsv2_mlp_rowdot_max_t(&experts[0]);
    const int64_t busy_shared = shared ? dsv2_mlp_rowdot_max_t(shared) : 0;
    rc = run_busy(ws, experts, E, busy, d);
    if (rc) return rc;
    if (shared && Tc > busy_shared) {
        rc = dsv2_mlp_gemm(ws->Ys, d, x, d, Tc, shared, ws->gs);
        if (rc) return rc;
    }
    /* the rest: row-dot kernels in two shared parallel regions */
    int64_t nu = 0, items = 0, nsmall = 0, rows_total = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t n = ws->off[e + 1] - ws->off[e];
        if (n >= 1 && n <= busy) nsmall += n;
    }
    /* int8 / int4 experts: their gathered rows quantized once (all S rows
     * when most are in row-dot units, else only the units' rows) */
    if (dsv2_xq_to_fill(&ws->Xq) && nsmall) {
        if (2 * nsmall >= S) {
            quant_rows(&ws->Xq, ws->Xg, d, S, d);
        } else {
            for (int64_t e = 0; e < E; e++) {
                int64_t o = ws->off[e], n = ws->off[e + 1] - o;
                if (n >= 1 && n <= busy) {
                    dsv2_xq xr = dsv2_xq_rows(&ws->Xq, d, o);
                    dsv2_act_quantize(&xr, ws->Xg + o * d, d, n, d);
                }
            }
        }
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t o = ws->off[e], n = ws->off[e + 1] - o;
        if (n >= 1 && n <= busy) {
            unit un = {&experts[e], ws->Xg + o * d, d, n, ws->H + o * I, I, ws->Y + o * d, d, I, 0,
                       dsv2_xq_rows(&ws->Xq, d, o), dsv2_xq_rows(&ws->Hq, I, o)};
            /* bf16: its own gathered x rows and h rows go even|odd in place (read by nothing else) */
            if (!un.xq.q && dsv2_mlp_eo_x(un.m, n)) un.xq.p = un.x;
            if (!un.hq.q && dsv2_mlp_eo_h(un.m, n)) un.hq.p = un.h;
            ws->units[nu++] = un;
            rows_total += I;
        }
    }
    if (shared && Tc <= busy_shared) {
        if (dsv2_xq_to_fill(&ws->xsq)) quant_rows(&ws->xsq, x, d, Tc, d);
        unit un = {shared, x, d, Tc, ws->Hs, Is, ws->Ys, d, Is, 0, ws->xsq, ws->Hsq};
        if (!un.hq.q && dsv2_mlp_eo_h(shared, Tc)) un.hq.p = un.h;
        if (!un.xq.q && dsv2_mlp_eo_x(shared, Tc)) { /* the caller's x: an even|odd copy */
            dsv2_eo_copy_permute(ws->Xs, d, x, d, Tc, d);
            un.xq.p = ws->Xs;
        }
        ws->units[nu++] = un;
        rows_total += Is;
    }
    /* work items as large as keeps MOE_ITEMS_PER_THREAD of them per thread (few, long weight
     * streams; each item starts its streams cold); both phases hand them out from an atomic
     * counter (one task per thread): a thread that is descheduled holds up at most one item */
    int nt = dsv2_get_num_threads();
    const int64_t rows_a = item_size(rows_total, nt, MOE_ROWS_A, MOE_ROWS_A_MAX);
    const int64_t cols_b = item_size(d, nt, MOE_COLS_B, MOE_COLS_B_MAX);
    items = 0;
    for (int64_t u = 0; u < nu; u++) {
        ws->units[u].item0 = items;
        items += (ws->units[u].I + rows_a - 1) / rows_a;
    }
    block_job j;
    j.units = ws->units;
    j.nunits = nu;
    j.nitems = items;
    j.rows_a = rows_a;
    j.cols_b = cols_b;
    atomic_init(&j.next, 0);
    atomic_init(&j.next_b, 0);
    j.out = out;
    j.Y = ws->Y;
    j.Ys = shared ? ws->Ys : NULL;
    j.rows = ws->rows;
    j.wts = ws->wts;
    j.T = Tc;
    j.k = k;
    j.d = d;
    /* even|odd x of the routed units, in place (the shared expert's copy in Xs already is) */
    for (int64_t u = 0; u < nu; u++) {
        const unit *un = &ws->units[u];
        if (un->xq.p == un->x) dsv2_eo_copy_permute((float *)un->x, un->ldx, un->x, un->ldx, un->n, d);
    }
    if (items > 0) dsv2_parallel_for(nt, 1, gateup_task, &j);
    if (dsv2_xq_to_fill(&ws->Hq) || dsv2_xq_to_fill(&ws->Hsq)) dsv2_parallel_for(nu, 1, quant_h_task, &j);
    for (int64_t u = 0; u < nu; u++) {
        const unit *un = &ws->units[u];
        if (un->hq.p) dsv2_eo_copy_permute(un->h, un->ldh, un->h, un->ldh, un->n, un->I);
    }
    if (Tc >= MOE_SPLIT_MIN_T) {
        dsv2_parallel_for(nt, 1, down_task, &j);
        dsv2_parallel_for(d, 16, combine_task, &j);
    } else {
        dsv2_parallel_for(nt, 1, down_combine_task, &j);
    }
    return DSV2_OK;
}

int dsv2_moe_experts(float *out, const float *x, const int64_t *ids, const float *w,
                     const dsv2_mlp *experts, int64_t E, const dsv2_mlp *shared, int64_t T, int64_t k) {
    if (T < 0 || k < 1 || E < 1 || !experts) return DSV2_ERR_ARG;
    int64_t d, I, Is = 0, dd, ii;
    int rc = dsv2_mlp_check(&experts[0], &d, &I);
    if (rc) return rc;
    for (int64_t e = 1; e < E; e++) {
        rc = dsv2_mlp_check(&experts[e], &dd, &ii);
        if (rc) return rc;
        if (dd != d || ii != I) return DSV2_ERR_ARG;
    }
    if (shared) {
        rc = dsv2_mlp_check(shared, &dd, &Is);
        if (rc) return rc;
        if (dd != d) return DSV2_ERR_ARG;
    }
    if (T == 0) return DSV2_OK;

    /* token chunk: bounded workspace */
    int64_t per_token = (k * (2 * d + I) + d) * (int64_t)sizeof(float);
    int64_t Tc = (int64_t)MOE_CHUNK_BYTES / per_token;
    if (Tc < 64) Tc = 64;
    if (Tc > T) Tc = T;
    /* chunks of equal size: every chunk streams all the experts' weights, so a short last
     * chunk costs nearly as much as a full one (lite-L4, 512 tokens in chunks of 477 + 35:
     * the 35-token chunk took ~50 of ~480 ms) */
    const int64_t nchunks = (T + Tc - 1) / Tc;
    Tc = (T + nchunks - 1) / nchunks;
    const int64_t S = Tc * k;
    int64_t gsz = dsv2_mlp_gemm_scratch(&experts[0], S);
    if (shared && dsv2_mlp_gemm_scratch(shared, Tc) > gsz) gsz = dsv2_mlp_gemm_scratch(shared, Tc);
    /* rows of the shared expert's row-dot buffers: it takes that path when Tc <= its limit */
    int64_t hs_tok = Tc;
    if (shared && dsv2_mlp_rowdot_max_t(shared) < hs_tok) hs_tok = dsv2_mlp_rowdot_max_t(shared);

    workspace ws;
    /* int8 / int4 weights: quantized activation buffers (kinds with nothing set = not used) */
    const dsv2_act_kinds kx = dsv2_act_kinds_of(&experts[0].gate, &experts[0].up),
                         kI = dsv2_act_kinds_of(&experts[0].down, NULL);
    const dsv2_act_kinds none_k = {0, 0, 0};
    const dsv2_act_kinds ksx = shared ? dsv2_act_kinds_of(&shared->gate, &shared->up) : none_k,
                         kIs = shared ? dsv2_act_kinds_of(&shared->down, NULL) : none_k;
    const size_t qb[4] = {dsv2_act_bytes(kx, S, d), dsv2_act_bytes(ksx, Tc, d), dsv2_act_bytes(kI, S, I),
                          dsv2_act_bytes(kIs, hs_tok, Is)};
    size_t nf = (size_t)(S + 2 * S * d + S * I + Tc * d + hs_tok * Is + hs_tok * d + gsz);
    ws.off = (int64_t *)malloc((size_t)(E + 1 + 2 * S) * sizeof(int64_t));
    ws.wts = (float *)dsv2_scratch_alloc(nf * sizeof(float)); /* kept between calls: no fresh page faults */
    ws.units = (unit *)malloc((size_t)(E + 1) * sizeof(unit));
    char *qbuf = (qb[0] + qb[1] + qb[2] + qb[3]) ? (char *)dsv2_scratch_alloc(qb[0] + qb[1] + qb[2] + qb[3] + 256) : NULL;
    if (!ws.off || !ws.wts || !ws.units || ((qb[0] + qb[1] + qb[2] + qb[3]) && !qbuf)) {
        free(ws.off);
        dsv2_scratch_free(ws.wts);
        free(ws.units);
        dsv2_scratch_free(qbuf);
        return DSV2_ERR_NOMEM;
    }
    {
        const dsv2_act_kinds k4[4] = {kx, ksx, kI, kIs};
        const int64_t rows4[4] = {S, Tc, S, hs_tok}, K4[4] = {d, d, I, Is};
        dsv2_xq *dst[4] = {&ws.Xq, &ws.xsq, &ws.Hq, &ws.Hsq};
        char *p = qbuf;
        for (int i = 0; i < 4; i++) {
            *dst[i] = dsv2_act_at(k4[i], p, rows4[i], K4[i]);
            p += (qb[i] + 63) & ~(size_t)63;
        }
    }
    ws.order = ws.off + E + 1;
    ws.rows = ws.order + S;
    ws.Xg = ws.wts + S;
    ws.Y = ws.Xg + S * d;
    ws.H = ws.Y + S * d;
    ws.Ys = ws.H + S * I;
    ws.Hs = ws.Ys + Tc * d;
    ws.Xs = ws.Hs + hs_tok * Is;
    ws.gs = ws.Xs + hs_tok * d;

    for (int64_t t0 = 0; t0 < T && !rc; t0 += Tc) {
        int64_t tc = T - t0 < Tc ? T - t0 : Tc;
        rc = run_chunk(&ws, out + t0 * d, x + t0 * d, ids + t0 * k, w + t0 * k, experts, E, shared, tc, k, d, I,
                       Is);
    }
    free(ws.off);
    dsv2_scratch_free(ws.wts);
    free(ws.units);
    dsv2_scratch_free(qbuf);
    return rc;
}

int dsv2_moe_block(float *out, int64_t *ids, float *w, const float *x, const dsv2_mat *router,
                   const float *bias, const dsv2_mlp *experts, const dsv2_mlp *shared, int64_t T,
                   const dsv2_moe_cfg *cfg) {
    int rc = dsv2_moe_cfg_check(cfg);
    if (rc) return rc;
    if (T < 0 || !experts || router->rows != cfg->n_experts || experts[0].gate.cols != router->cols)
        return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    const int64_t k = cfg->top_k;
    int64_t *id = ids ? ids : (int64_t *)malloc((size_t)(T * k) * sizeof(int64_t));
    float *wt = w ? w : (float *)malloc((size_t)(T * k) * sizeof(float));
    if (!id || !wt) {
        rc = DSV2_ERR_NOMEM;
    } else {
        rc = dsv2_moe_route(id, wt, NULL, x, router, bias, T, cfg);
        if (!rc) rc = dsv2_moe_experts(out, x, id, wt, experts, cfg->n_experts, shared, T, k);
    }
    if (!ids) free(id);
    if (!w) free(wt);
    return rc;
}
