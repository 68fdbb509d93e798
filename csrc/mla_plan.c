/* mla_plan.c - which form of MLA attention to run for each sequence of a batch,
 * and the dispatch.
 *
 * FLOP estimate per sequence (multiply-adds x 2, per head), with n_new query tokens,
 * n_ctx = max position + 1 and S = sum over the query tokens of (position + 1):
 *   absorbed     = 2 H [ n_new nope kv_lora          (q_lat = W_UK^T q_nope)
 *                        + S (kv_lora + rope)        (scores against the latent rows)
 *                        + S kv_lora                 (sum p c)
 *                        + n_new kv_lora v ]         (W_UV o_lat)
 *   decompressed = 2 H [ n_ctx kv_lora (nope + v)    (K_nope, V from the latent rows)
 *                        + S (nope + rope) + S v ]   (scores, sum p v)
 * Decode (one new token) always favours the absorbed form; a prompt processed from
 * an empty cache favours the non-absorbed form once it is longer than a few tokens. */
#include "mla_plan.h"
#include "scratch.h"

#include <stdlib.h>

typedef struct {
    int64_t seq, pos, idx;
} tok_key;

static int cmp_tok(const void *a, const void *b) {
    const tok_key *x = (const tok_key *)a, *y = (const tok_key *)b;
    if (x->seq != y->seq) return x->seq < y->seq ? -1 : 1;
    if (x->pos != y->pos) return x->pos < y->pos ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

int64_t dsv2_mla_group_tokens(int64_t *order, dsv2_mla_group *groups, const int64_t *seq,
                              const int64_t *pos, int64_t T) {
    if (T <= 0) return 0;
    tok_key *k = (tok_key *)malloc((size_t)T * sizeof(tok_key));
    if (!k) return -DSV2_ERR_NOMEM;
    for (int64_t t = 0; t < T; t++) {
        k[t].seq = seq[t];
        k[t].pos = pos[t];
        k[t].idx = t;
    }
    qsort(k, (size_t)T, sizeof(tok_key), cmp_tok);
    int64_t ng = 0;
    for (int64_t i = 0; i < T; i++) {
        order[i] = k[i].idx;
        if (i == 0 || k[i].seq != k[i - 1].seq) {
            groups[ng].seq = k[i].seq;
            groups[ng].start = i;
            groups[ng].count = 0;
            groups[ng].n_ctx = 0;
            groups[ng].sum_len = 0;
            ng++;
        }
        dsv2_mla_group *g = &groups[ng - 1];
        g->count++;
        g->sum_len += k[i].pos + 1;
        if (k[i].pos + 1 > g->n_ctx) g->n_ctx = k[i].pos + 1;
    }
    free(k);
    return ng;
}

double dsv2_mla_flops(int absorbed, int64_t n_new, int64_t n_ctx, int64_t sum_len, const dsv2_mla_dims *dm) {
    const double H = (double)dm->n_heads, nope = (double)dm->nope, rope = (double)dm->rope;
    const double v = (double)dm->v, L = (double)dm->kv_lora;
    const double q = (double)n_new, n = (double)n_ctx, S = (double)sum_len;
    if (absorbed) return 2.0 * H * (q * nope * L + S * (L + rope) + S * L + q * L * v);
    return 2.0 * H * (n * L * (nope + v) + S * (nope + rope) + S * v);
}

/* run `mode` on the subset of tokens idx[0..n) (gathered, computed, scattered) */
static int run_subset(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                      const int64_t *pos, const int64_t *idx, int64_t n, const dsv2_mat *kv_b,
                      const dsv2_mla_dims *dm, float scale, int mode) {
    const int64_t H = dm->n_heads, dqk = dm->nope + dm->rope, v = dm->v;
    float *qs = (float *)dsv2_scratch_alloc((size_t)n * (size_t)H * (size_t)dqk * sizeof(float));
    float *os = (float *)dsv2_scratch_alloc((size_t)n * (size_t)H * (size_t)v * sizeof(float));
    int64_t *ss = (int64_t *)malloc((size_t)n * 2 * sizeof(int64_t));
    int rc = DSV2_ERR_NOMEM;
    if (qs && os && ss) {
        int64_t *ps = ss + n;
        for (int64_t i = 0; i < n; i++) {
            memcpy(qs + i * H * dqk, q + idx[i] * H * dqk, (size_t)(H * dqk) * sizeof(float));
            ss[i] = seq[idx[i]];
            ps[i] = pos[idx[i]];
        }
        rc = mode == DSV2_MLA_ABSORBED ? dsv2_mla_attn_absorbed(os, qs, cache, ss, ps, n, kv_b, dm, scale)
                                       : dsv2_mla_attn_decompressed(os, qs, cache, ss, ps, n, kv_b, dm, scale);
        if (!rc)
            for (int64_t i = 0; i < n; i++)
                memcpy(o + idx[i] * H * v, os + i * H * v, (size_t)(H * v) * sizeof(float));
    }
    dsv2_scratch_free(qs);
    dsv2_scratch_free(os);
    free(ss);
    return rc;
}

int dsv2_mla_attention(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                       const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                       float scale, int mode) {
    if (mode == DSV2_MLA_ABSORBED) return dsv2_mla_attn_absorbed(o, q, cache, seq, pos, T, kv_b, dm, scale);
    if (mode == DSV2_MLA_DECOMPRESSED) return dsv2_mla_attn_decompressed(o, q, cache, seq, pos, T, kv_b, dm, scale);
    if (mode != DSV2_MLA_AUTO) return DSV2_ERR_ARG;
    if (T <= 0) return T == 0 ? DSV2_OK : DSV2_ERR_ARG;
    int64_t *order = (int64_t *)malloc((size_t)T * 3 * sizeof(int64_t));
    dsv2_mla_group *g = (dsv2_mla_group *)malloc((size_t)T * sizeof(dsv2_mla_group));
    if (!order || !g) {
        free(order);
        free(g);
        return DSV2_ERR_NOMEM;
    }
    int64_t *ia = order + T, *id = order + 2 * T, na = 0, nd = 0;
    int rc = DSV2_OK;
    int64_t ng = dsv2_mla_group_tokens(order, g, seq, pos, T);
    if (ng < 0) {
        rc = (int)-ng;
        goto done;
    }
    for (int64_t k = 0; k < ng; k++) {
        double fa = dsv2_mla_flops(1, g[k].count, g[k].n_ctx, g[k].sum_len, dm);
        double fd = dsv2_mla_flops(0, g[k].count, g[k].n_ctx, g[k].sum_len, dm);
        int64_t *dst = fa <= fd ? ia : id;
        int64_t *cnt = fa <= fd ? &na : &nd;
        for (int64_t i = 0; i < g[k].count; i++) dst[(*cnt)++] = order[g[k].start + i];
    }
    if (nd == 0) rc = dsv2_mla_attn_absorbed(o, q, cache, seq, pos, T, kv_b, dm, scale);
    else if (na == 0) rc = dsv2_mla_attn_decompressed(o, q, cache, seq, pos, T, kv_b, dm, scale);
    else {
        rc = run_subset(o, q, cache, seq, pos, ia, na, kv_b, dm, scale, DSV2_MLA_ABSORBED);
        if (!rc) rc = run_subset(o, q, cache, seq, pos, id, nd, kv_b, dm, scale, DSV2_MLA_DECOMPRESSED);
    }
done:
    free(order);
    free(g);
    return rc;
}
