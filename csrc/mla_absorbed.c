/* mla_absorbed.c - MLA attention in absorbed form over the latent cache.
 *
 * Per token: Qa[h] = [W_UK_h^T q_nope_h | q_pe_h] (kv_lora + rope wide), scores against
 * the token's cached rows (one wide key shared by all heads: a [H, W] x [W, n] product),
 * online softmax in fp32 per block of rows, o_lat[h] = sum_j p_j c_j (kv_lora wide),
 * o_h = W_UV_h o_lat[h].  The rows are read in the cache's format.  On AVX-512 each block
 * of rows is one pass per group of 16 heads with a head in each fp32 lane: the scores as 16-lane
 * vectors, the online softmax on whole vectors (mla_softmax.h), then the values (exact:
 * mla_tiles.h's lanes kernels; bf16 compute mode: mla_bf16dp.h).  Long contexts are split into key ranges processed in parallel and
 * merged with an exact log-sum-exp combine (flash-decoding); the ranges depend on the
 * call's sizes only (not on the thread count), so results are the same for any number of
 * threads.  Work items are pulled dynamically so ragged batches balance over the threads. */
#include "mla.h"
#include "blas.h"
#include "gemv.h"
#include "gemv_nn.h"
#include "gemm_bf16dp.h"
#include "mla_bf16dp.h"
#include "mla_softmax.h"
#include "linear.h"
#include "mla_tiles.h"
#include "scratch.h"
#include "threadpool.h"
#include "vexp.h"

#include <immintrin.h>

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#define KB 64                /* cached rows per online-softmax block */
_Static_assert(KB == DSV2_MLA_BF16DP_KB, "one block size for both modes");
#define MIN_SPLIT 1024       /* fewest rows per work item when a token's rows are split */
#define SPLIT_ITEMS 256      /* a call's rows are split into about this many items: a constant, not the
                              * thread count, so that the result is the same for any number of threads */
#define CHUNK_BYTES (16u << 20) /* bound of the per-chunk query/latent-output buffers */

typedef struct {
    int64_t t, j0, j1, slot; /* slot < 0: whole row range, write the result directly */
    int64_t h0, h1;          /* heads [h0, h1) (a split by heads only when slot < 0) */
} work_item;

typedef struct {
    const float *qa;          /* [Tc, H, Wd] */
    float *olat;              /* [Tc, H, L] */
    float *part;              /* [nslots, H, L + 2] */
    const dsv2_mla_cache *cache;
    int64_t S, Wd, L, H, rope, rb;
    const int64_t *seq;
    const work_item *items;
    int64_t n_items;
    atomic_long next;
    atomic_int err;
    float scale;
    int dp; /* bf16 compute mode over a bf16 cache (mla_bf16dp.h), decided once per call */
} attn_job;

static void attn_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)b; (void)e; (void)tid;
    attn_job *j = (attn_job *)ctx;
    const int64_t H = j->H, L = j->L, Wd = j->Wd;
    /* bf16 compute mode over a bf16 cache (mla_bf16dp.h): the queries and the softmax weights rounded to bf16 */
    const int dp = j->dp;
    /* m, l: a multiple of 16 heads (the bf16 compute mode's blocks update them as 16-lane vectors) */
    const size_t Hp = (size_t)((H + 15) / 16) * 16;
    const size_t nf = (size_t)H * (size_t)L + (size_t)H * KB + 2 * Hp;
    const size_t nwk = dp ? dsv2_mla_bf16dp_work_len() : 0;   /* the block's scores and weight pairs */
    const size_t nqp = dp ? dsv2_mla_bf16dp_qpack_len(H, Wd) : 0; /* 32-bit words */
    /* exact mode over FP8 rows (AVX-512): each block of rows is widened once into fp32 (Wb, KB x Wd,
     * in L2), then the lanes kernels read those as fp32 rows (FP8 numbers take a table and a scale:
     * too dear to widen once per use).  bf16 rows are read as they are (2 cheap ops per pair of
     * numbers in the scores, 2 per 16 numbers and 4 heads in the values). */
    const int wide = !dp && j->cache->dtype == DSV2_KV_FP8 && dsv2_isa() == DSV2_ISA_AVX512;
    const size_t nwb = wide ? (size_t)KB * (size_t)Wd : 0;
    /* exact mode on AVX-512 (f32 and bf16 rows, FP8 rows once widened): the block pass with the heads
     * in the fp32 lanes (mla_tiles.h: scores as 16-lane vectors, mla_softmax.h, values), on the
     * queries transposed once per token (Qt).  One V2-Lite decode token over 32K bf16 rows, 2 threads
     * (Zen 4, python benchmarks/bench_attention.py, alternating): 5.95-7.12 ms against 8.11-8.39 with
     * the former 4 x 4 score tiles (each row widened once per 4 heads), their horizontal sums and
     * the per-head softmax calls. */
    const int lanes = !dp && dsv2_mla_lanes_use(wide ? DSV2_KV_F32 : j->cache->dtype);
    const size_t nqt = lanes ? dsv2_mla_lanes_qpack_len(H, Wd) + (size_t)KB * 16 : 0;
    float *scr = (float *)malloc((nf + nwb) * sizeof(float) + (dp ? (nwk + nqp) * 4 + 128 : 0) +
                                 (lanes ? nqt * 4 + 128 : 0));
    if (!scr) {
        atomic_store(&j->err, DSV2_ERR_NOMEM);
        return;
    }
    float *const Oown = scr, *Sb = Oown + H * L, *m = Sb + H * KB, *l = m + Hp, *Wb = wide ? scr + nf : NULL;
    float *Wk = dp ? (float *)(((uintptr_t)(scr + nf) + 63) & ~(uintptr_t)63) : NULL;
    uint32_t *Qp = dp ? (uint32_t *)(((uintptr_t)(Wk + nwk) + 63) & ~(uintptr_t)63) : NULL;
    float *Sl = lanes ? (float *)(((uintptr_t)(scr + nf + nwb) + 63) & ~(uintptr_t)63) : NULL; /* [KB, 16] */
    float *Qt = lanes ? Sl + KB * 16 : NULL;
    int64_t packed_t = -1, packed_h0 = -1, packed_h1 = -1; /* the queries now in Qp */
    for (;;) {
        int64_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n_items) break;
        const work_item *it = &j->items[i];
        const int64_t Hn = it->h1 - it->h0; /* the item's heads */
        const float *Q = j->qa + it->t * H * Wd + it->h0 * Wd;
        const char *K = (const char *)j->cache->data + (size_t)j->seq[it->t] * (size_t)j->S * (size_t)j->rb;
        /* a part of a split token accumulates in its slot of the parts ([H, L] outputs, then [H]
         * maxima and [H] sums); a whole token in the thread's own buffer */
        float *const pslot = it->slot < 0 ? NULL : j->part + it->slot * H * (L + 2);
        float *const O = pslot ? pslot + it->h0 * L : Oown;
        for (size_t h = 0; h < Hp; h++) {
            m[h] = -INFINITY;
            l[h] = 0.0f;
        }
        if (!dp && !lanes) memset(O, 0, (size_t)Hn * (size_t)L * sizeof(float)); /* else: the first block starts it */
        if ((dp || lanes) && (it->t != packed_t || it->h0 != packed_h0 || it->h1 != packed_h1)) {
            /* once per token and heads, not per row range (32 ranges of one decode token at 32K) */
            if (dp) dsv2_mla_bf16dp_qpack(Qp, Q, Wd, Hn, Wd);
            else dsv2_mla_lanes_qpack(Qt, Q, Wd, Hn, Wd);
            packed_t = it->t, packed_h0 = it->h0, packed_h1 = it->h1;
        }
        for (int64_t jb = it->j0; jb < it->j1; jb += KB) {
            const int64_t nb = it->j1 - jb < KB ? it->j1 - jb : KB;
            const int64_t jn = jb + KB < it->j1 ? jb + KB : it->j1; /* the next block, prefetched */
            const int64_t nn = it->j1 - jn < KB ? it->j1 - jn : KB;
            dsv2_mla_rows Kb = {K + jb * j->rb, j->rb, j->cache->dtype, L, j->rope,
                                nn > 0 ? K + jn * j->rb : NULL, nn};
            if (wide) {
                dsv2_mla_rows_load(Wb, Wd, Kb.p, j->rb, nb, 0, Wd, Kb.dtype, L, j->rope);
                Kb = (dsv2_mla_rows){(const char *)Wb, Wd * (int64_t)sizeof(float), DSV2_KV_F32, L, j->rope, NULL, 0};
            }
            if (dp) { /* scores, softmax and values of the block in one pass (mla_bf16dp.h) */
                const int rc = dsv2_mla_bf16dp_block(O, L, m, l, Wk, Qp, Hn, &Kb, nb, j->scale, jb == it->j0);
                if (rc) atomic_store(&j->err, rc);
                continue;
            }
            if (lanes) { /* per group of 16 heads: scores, softmax, values */
                for (int64_t g = 0; g < Hn; g += 16) {
                    const int64_t nh = Hn - g < 16 ? Hn - g : 16;
                    dsv2_mla_rows Kg = Kb;
                    if (g) Kg.pf = NULL, Kg.pf_n = 0; /* the next block is prefetched by the first group */
                    int rc = dsv2_mla_scores_lanes(Sl, Qt + (g / 16) * Wd * 16, &Kg, nb);
                    if (!rc) {
                        dsv2_mla_softmax_lanes(m + g, l + g, O + g * L, L, nh, L, Sl, nb, j->scale);
                        rc = dsv2_mla_pv_lanes(O + g * L, L, Sl, nh, &Kb, nb, jb == it->j0);
                    }
                    if (rc) atomic_store(&j->err, rc);
                }
                continue;
            }
            dsv2_mla_scores_rows(Sb, KB, Q, Wd, Hn, &Kb, nb);
            for (int64_t h = 0; h < Hn; h++) {
                float *sh = Sb + h * KB;
                const float mx = dsv2_vmax(sh, nb) * j->scale;
                if (mx > m[h] || mx != mx) { /* NaN scores propagate */
                    if (l[h] > 0.0f) {
                        const float a = expf(m[h] - mx);
                        l[h] *= a;
                        dsv2_vscale(O + h * L, L, a);
                    }
                    m[h] = mx;
                }
                l[h] += dsv2_vexp_shift_sum(sh, nb, j->scale, m[h]);
            }
            dsv2_mla_pv_rows(O, L, Sb, KB, Hn, &Kb, nb);
        }
        if (it->slot < 0) {
            if (dp) dsv2_mla_bf16dp_natural(O, L, Hn, L); /* a split token's parts: in the merge */
            float *dst = j->olat + it->t * H * L + it->h0 * L;
            for (int64_t h = 0; h < Hn; h++) {
                const float inv = 1.0f / l[h];
                for (int64_t c = 0; c < L; c++) dst[h * L + c] = O[h * L + c] * inv;
            }
        } else {
            memcpy(pslot + H * L + it->h0, m, (size_t)Hn * sizeof(float));
            memcpy(pslot + H * L + H + it->h0, l, (size_t)Hn * sizeof(float));
        }
    }
    free(scr);
}

typedef struct {
    float *olat;
    const float *part;
    const int64_t *first_slot, *n_slots; /* per token; n_slots 0 = direct */
    int64_t H, L;
    int dp_order; /* the parts' columns are in the bf16 compute mode's order (mla_bf16dp.h) */
} merge_job;

/* dst [L] (k == 0: =, else +=) w x [L] */
static void axpy_row_portable(float *dst, float w, const float *x, int64_t L, int64_t k) {
    for (int64_t c = 0; c < L; c++) dst[c] = (k ? dst[c] : 0.0f) + w * x[c];
}

/* the same, 16 columns at a time */
DSV2_TARGET_AVX512 static void axpy_row_avx512(float *dst, float w, const float *x, int64_t L, int64_t k) {
    const __m512 vw = _mm512_set1_ps(w);
    for (int64_t c = 0; c < L; c += 16) {
        const __mmask16 mk = L - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - c)) - 1u);
        const __m512 d = k ? _mm512_maskz_loadu_ps(mk, dst + c) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(dst + c, mk, _mm512_add_ps(d, _mm512_mul_ps(vw, _mm512_maskz_loadu_ps(mk, x + c))));
    }
}

/* items = (token, head): the exact log-sum-exp combine of a split token's partial results */
static void merge_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    const merge_job *j = (const merge_job *)ctx;
    const int64_t H = j->H, L = j->L, P = H * (L + 2);
    const int avx512 = dsv2_isa() == DSV2_ISA_AVX512;
    for (int64_t i = b; i < e; i++) {
        const int64_t t = i / H, h = i % H, ns = j->n_slots[t];
        if (ns == 0) continue;
        const float *p0 = j->part + j->first_slot[t] * P;
        float M = -INFINITY;
        for (int64_t k = 0; k < ns; k++) {
            float mk = p0[k * P + H * L + h];
            if (mk > M) M = mk;
        }
        float *dst = j->olat + t * H * L + h * L;
        float den = 0.0f; /* dst = sum_k w_k o_k / sum_k w_k l_k, w_k = exp(m_k - M) */
        for (int64_t k = 0; k < ns; k++) {
            const float *pk = p0 + k * P;
            const float w = expf(pk[H * L + h] - M);
            den += w * pk[H * L + H + h];
            if (avx512) axpy_row_avx512(dst, w, pk + h * L, L, k);
            else axpy_row_portable(dst, w, pk + h * L, L, k);
        }
        dsv2_vscale(dst, L, 1.0f / den);
        if (j->dp_order) dsv2_mla_bf16dp_natural(dst, L, 1, L);
    }
}

/* q_lat for T <= 8 tokens: items = (head, column block) */
typedef struct {
    float *qa;
    const float *q;
    const dsv2_mat *kv_b;
    int64_t T, H, dqk, Wd, nope, v, L, ncb;
    atomic_int err;
} qlat_job;

#define QL_CB 128

static void qlat_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    qlat_job *j = (qlat_job *)ctx;
    for (int64_t i = b; i < e; i++) {
        const int64_t h = i / j->ncb, cb = (i % j->ncb) * QL_CB;
        const int64_t c1 = cb + QL_CB < j->L ? cb + QL_CB : j->L;
        dsv2_mat Wuk = dsv2_mat_rows(j->kv_b, h * (j->nope + j->v), j->nope);
        for (int64_t t0 = 0; t0 < j->T; t0 += DSV2_GEMV_NN_MAX_T) {
            int tt = (int)(j->T - t0 < DSV2_GEMV_NN_MAX_T ? j->T - t0 : DSV2_GEMV_NN_MAX_T);
            float *yq = j->qa + (t0 * j->H + h) * j->Wd;
            const float *xq = j->q + (t0 * j->H + h) * j->dqk;
            /* one column block per head (ncb == 1): W_UK_h read as one sequential stream */
            int rc = j->ncb == 1 ? dsv2_gemv_nn_stream(yq, j->H * j->Wd, xq, j->H * j->dqk, tt, &Wuk)
                                 : dsv2_gemv_nn(yq, j->H * j->Wd, xq, j->H * j->dqk, tt, &Wuk, cb, c1);
            if (rc) atomic_store(&j->err, rc);
        }
    }
}

/* o = W_UV o_lat for T <= 8 tokens: items = (head, 16-row block) */
typedef struct {
    float *o;
    const float *olat;
    const dsv2_mat *kv_b;
    int64_t T, H, nope, v, L, nrb;
} out_job;

static void out_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    const out_job *j = (const out_job *)ctx;
    for (int64_t i = b; i < e; i++) {
        const int64_t h = i / j->nrb, r0 = (i % j->nrb) * 16;
        const int64_t r1 = r0 + 16 < j->v ? r0 + 16 : j->v;
        dsv2_mat Wuv = dsv2_mat_rows(j->kv_b, h * (j->nope + j->v) + j->nope, j->v);
        for (int64_t t0 = 0; t0 < j->T; t0 += DSV2_GEMV_MAX_T) {
            int tt = (int)(j->T - t0 < DSV2_GEMV_MAX_T ? j->T - t0 : DSV2_GEMV_MAX_T);
            dsv2_gemv_rows(j->o + t0 * j->H * j->v + h * j->v, j->H * j->v, j->olat + (t0 * j->H + h) * j->L,
                           j->H * j->L, tt, &Wuv, r0, r1);
        }
    }
}

/* q_pe copy into the absorbed query rows */
static void copy_qpe(float *qa, const float *q, int64_t T, const dsv2_mla_dims *dm) {
    const int64_t H = dm->n_heads, dqk = dm->nope + dm->rope, Wd = dm->kv_lora + dm->rope;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            memcpy(qa + (t * H + h) * Wd + dm->kv_lora, q + (t * H + h) * dqk + dm->nope,
                   (size_t)dm->rope * sizeof(float));
}

static int absorb_queries(float *qa, const float *q, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm) {
    const int64_t H = dm->n_heads, dqk = dm->nope + dm->rope, Wd = dm->kv_lora + dm->rope, L = dm->kv_lora;
    copy_qpe(qa, q, T, dm);
    if (T <= DSV2_LINEAR_GEMV_MAX_T) {
        /* one work item per head (the head's W_UK streamed once) while that gives every
         * thread work; column blocks of QL_CB otherwise */
        const int64_t ncb = H >= 2 * dsv2_get_num_threads() && L <= 2048 ? 1 : (L + QL_CB - 1) / QL_CB;
        qlat_job j = {qa, q, kv_b, T, H, dqk, Wd, dm->nope, dm->v, L, ncb};
        atomic_init(&j.err, 0);
        dsv2_parallel_for(H * j.ncb, 1, qlat_task, &j);
        return atomic_load(&j.err);
    }
    /* many tokens: sgemm per head, W_UK_h widened (dequantized) to fp32 if needed */
    float *wbuf = NULL;
    if (kv_b->dtype != DSV2_F32) {
        wbuf = (float *)dsv2_scratch_alloc((size_t)dm->nope * (size_t)L * sizeof(float));
        if (!wbuf) return DSV2_ERR_NOMEM;
    }
    for (int64_t h = 0; h < H; h++) {
        const int64_t r0 = h * (dm->nope + dm->v);
        const float *Wuk;
        if (wbuf) {
            dsv2_mat_rows_to_f32(wbuf, kv_b, r0, r0 + dm->nope);
            Wuk = wbuf;
        } else {
            Wuk = (const float *)kv_b->data + r0 * L;
        }
        dsv2_sgemm_nn((int)T, (int)L, (int)dm->nope, q + h * dqk, (int)(H * dqk), Wuk, (int)L, 0.0f,
                      qa + h * Wd, (int)(H * Wd));
    }
    dsv2_scratch_free(wbuf);
    return DSV2_OK;
}

static int project_out(float *o, const float *olat, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm) {
    const int64_t H = dm->n_heads, L = dm->kv_lora, v = dm->v;
    if (T <= DSV2_LINEAR_GEMV_MAX_T) {
        out_job j = {o, olat, kv_b, T, H, dm->nope, v, L, (v + 15) / 16};
        dsv2_parallel_for(H * j.nrb, 1, out_task, &j);
        return DSV2_OK;
    }
    for (int64_t h = 0; h < H; h++) {
        dsv2_mat Wuv = dsv2_mat_rows(kv_b, h * (dm->nope + v) + dm->nope, v);
        int rc = dsv2_linear_ex(o + h * v, H * v, olat + h * L, H * L, &Wuv, T);
        if (rc) return rc;
    }
    return DSV2_OK;
}

/* parts to cut each of n_items (token, rows) work items into by heads, for nthreads threads: the
 * fewest rounds of work per thread times the largest part's cost, in multiply-adds per row: ws per
 * head for the scores (kv_lora + rope), wp for the values (kv_lora), and a fixed cost (per-item setup
 * and the re-read of its rows) of 1/16 of a whole item.  With the heads in lanes (lanes: AVX-512 and
 * the bf16 compute mode) the scores of a group of 16 lanes cost the same for any number of live
 * heads, so a cut by heads repeats them: at 16 threads and 5 ranges of one token's 4097 rows, 3 parts
 * (not 4, which would also take two rounds). */
static int64_t head_parts(int64_t n_items, int nthreads, int64_t H, int lanes, double ws, double wp) {
    if (n_items <= 0 || n_items >= nthreads) return 1;
    int64_t best = 1;
    double best_cost = 0.0;
    for (int64_t hp = 1; hp <= H; hp++) {
        const int64_t rounds = (n_items * hp + nthreads - 1) / nthreads, h = (H + hp - 1) / hp;
        const double scores = lanes ? (double)((h + 15) / 16 * 16) * ws : (double)h * ws;
        const double cost = (double)rounds * (scores + (double)h * wp + (double)H * (ws + wp) / 16);
        if (hp == 1 || cost < best_cost) {
            best = hp;
            best_cost = cost;
        }
    }
    return best;
}

static int absorbed_chunk(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                          const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                          float scale) {
    const int64_t H = dm->n_heads, L = dm->kv_lora, Wd = dm->kv_lora + dm->rope;
    const int nthreads = dsv2_get_num_threads();
    const int dp = dsv2_mla_bf16dp_use(cache->dtype, L);
    int64_t total = 0;
    for (int64_t t = 0; t < T; t++) total += pos[t] + 1;
    int64_t span = (total + SPLIT_ITEMS - 1) / SPLIT_ITEMS;
    if (span < MIN_SPLIT) span = MIN_SPLIT;
    span = (span + KB - 1) / KB * KB;
    int64_t n_items = 0, n_slots = 0;
    for (int64_t t = 0; t < T; t++) {
        int64_t k = (pos[t] + span) / span; /* ceil((pos + 1) / span) */
        n_items += k;
        if (k > 1) n_slots += k;
    }
    /* fewer (token, rows) items than threads (decode at short contexts, or a few key ranges of
     * one token on many threads): split every item by heads too, so that every thread works.
     * Heads are independent, so results do not depend on the split. */
    const int lanes = dp || dsv2_isa() == DSV2_ISA_AVX512; /* attn_task's block passes */
    const int64_t hparts = head_parts(n_items, nthreads, H, lanes, (double)Wd, (double)L);
    float *qa = (float *)dsv2_scratch_alloc((size_t)T * (size_t)H * (size_t)Wd * sizeof(float));
    float *olat = (float *)dsv2_scratch_alloc((size_t)T * (size_t)H * (size_t)L * sizeof(float));
    work_item *items = (work_item *)malloc((size_t)(n_items * hparts) * sizeof(work_item));
    int64_t *first = (int64_t *)malloc((size_t)T * 2 * sizeof(int64_t));
    float *part = n_slots ? (float *)dsv2_scratch_alloc((size_t)n_slots * (size_t)H * (size_t)(L + 2) * sizeof(float)) : NULL;
    int rc = DSV2_OK;
    if (!qa || !olat || !items || !first || (n_slots && !part)) {
        rc = DSV2_ERR_NOMEM;
        goto done;
    }
    int64_t *nsl = first + T;
    {
        int64_t ii = 0, slot = 0;
        for (int64_t t = 0; t < T; t++) {
            const int64_t len = pos[t] + 1, k = (len + span - 1) / span;
            first[t] = slot;
            nsl[t] = k > 1 ? k : 0;
            for (int64_t s = 0; s < k; s++, slot += k > 1)
                for (int64_t hp = 0; hp < hparts; hp++) {
                    items[ii].t = t;
                    items[ii].j0 = s * span;
                    items[ii].j1 = (s + 1) * span < len ? (s + 1) * span : len;
                    items[ii].slot = k > 1 ? slot : -1;
                    items[ii].h0 = H * hp / hparts;
                    items[ii].h1 = H * (hp + 1) / hparts;
                    ii++;
                }
        }
        n_items = ii;
    }
    rc = absorb_queries(qa, q, T, kv_b, dm);
    if (rc) goto done;
    {
        attn_job j;
        j.qa = qa; j.olat = olat; j.part = part; j.cache = cache;
        j.S = cache->S; j.Wd = Wd; j.L = L; j.H = H; j.seq = seq;
        j.rope = dm->rope; j.rb = dsv2_mla_row_bytes(cache->dtype, L, dm->rope);
        j.items = items; j.n_items = n_items; j.scale = scale; j.dp = dp;
        atomic_init(&j.next, 0);
        atomic_init(&j.err, 0);
        int64_t nw = n_items < nthreads ? n_items : nthreads;
        dsv2_parallel_for(nw, 1, attn_task, &j);
        rc = atomic_load(&j.err);
        if (rc) goto done;
    }
    if (n_slots) {
        merge_job mj = {olat, part, first, nsl, H, L, dp};
        dsv2_parallel_for(T * H, 1, merge_task, &mj);
    }
    rc = project_out(o, olat, T, kv_b, dm);
done:
    dsv2_scratch_free(qa);
    dsv2_scratch_free(olat);
    free(items);
    free(first);
    dsv2_scratch_free(part);
    return rc;
}

int dsv2_mla_attn_absorbed(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                           const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                           float scale) {
    const int64_t H = dm->n_heads, dqk = dm->nope + dm->rope, Wd = dm->kv_lora + dm->rope;
    if (T < 0 || H <= 0 || dm->nope <= 0 || dm->rope <= 0 || dm->v <= 0 || dm->kv_lora <= 0) return DSV2_ERR_ARG;
    if (kv_b->rows != H * (dm->nope + dm->v) || kv_b->cols != dm->kv_lora) return DSV2_ERR_ARG;
    if (cache->B <= 0 || cache->S <= 0 || !(scale > 0.0f)) return DSV2_ERR_ARG;
    if (dsv2_mla_row_bytes(cache->dtype, dm->kv_lora, dm->rope) <= 0) return DSV2_ERR_ARG;
    for (int64_t t = 0; t < T; t++)
        if (seq[t] < 0 || seq[t] >= cache->B || pos[t] < 0 || pos[t] >= cache->S) return DSV2_ERR_RANGE;
    int64_t per_tok = H * (Wd + dm->kv_lora) * (int64_t)sizeof(float);
    int64_t tc = (int64_t)CHUNK_BYTES / per_tok;
    if (tc < 8) tc = 8;
    if (tc > INT32_MAX / (H * Wd)) tc = INT32_MAX / (H * Wd);
    for (int64_t t0 = 0; t0 < T; t0 += tc) {
        const int64_t n = T - t0 < tc ? T - t0 : tc;
        int rc = absorbed_chunk(o + t0 * H * dm->v, q + t0 * H * dqk, cache, seq + t0, pos + t0, n, kv_b, dm, scale);
        if (rc) return rc;
    }
    return DSV2_OK;
}
