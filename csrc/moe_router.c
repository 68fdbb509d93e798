/* moe_router.c - softmax/sigmoid scoring and greedy / group-limited /
 * noaux_tc top-k selection. */
#include "moe_router.h"
#include "linear.h"

#include <math.h>
#include <stdlib.h>

int dsv2_moe_cfg_check(const dsv2_moe_cfg *c) {
    if (c->n_experts < 1 || c->top_k < 1 || c->top_k > c->n_experts) return DSV2_ERR_ARG;
    if (c->scoring != DSV2_SCORE_SOFTMAX && c->scoring != DSV2_SCORE_SIGMOID) return DSV2_ERR_ARG;
    if (!isfinite(c->routed_scaling_factor)) return DSV2_ERR_ARG;
    switch (c->topk_method) {
    case DSV2_TOPK_GREEDY: return DSV2_OK;
    case DSV2_TOPK_GROUP_LIMITED:
    case DSV2_TOPK_NOAUX_TC:
        if (c->n_group < 1 || c->n_experts % c->n_group) return DSV2_ERR_ARG;
        if (c->topk_group < 1 || c->topk_group > c->n_group) return DSV2_ERR_ARG;
        if (c->top_k > c->topk_group * (c->n_experts / c->n_group)) return DSV2_ERR_ARG;
        /* the group score of noaux_tc is the sum of the 2 best: needs 2 per group */
        if (c->topk_method == DSV2_TOPK_NOAUX_TC && c->n_experts / c->n_group < 2) return DSV2_ERR_ARG;
        return DSV2_OK;
    default: return DSV2_ERR_ARG;
    }
}

/* Keep the k best of vals[i] for i in [0, n) with keep[i] != 0 (keep may be
 * NULL): idx sorted by decreasing value; equal values keep the lower index
 * first (strict '>' while scanning indices in increasing order).
 * Returns how many were found (< k only if fewer than k are eligible). */
static int64_t topk_select(int64_t *idx, float *val, const float *vals, const unsigned char *keep,
                           int64_t n, int64_t k) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < n; i++) {
        if (keep && !keep[i]) continue;
        float v = vals[i];
        if (cnt == k && !(v > val[k - 1])) continue;
        int64_t p = cnt < k ? cnt : k - 1;
        while (p > 0 && v > val[p - 1]) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            p--;
        }
        val[p] = v;
        idx[p] = i;
        if (cnt < k) cnt++;
    }
    return cnt;
}

int dsv2_moe_route_logits(int64_t *ids, float *w, const float *logits, const float *bias, int64_t T,
                          const dsv2_moe_cfg *cfg) {
    int rc = dsv2_moe_cfg_check(cfg);
    if (rc) return rc;
    if (T < 0) return DSV2_ERR_ARG;
    const int64_t E = cfg->n_experts, k = cfg->top_k;
    for (int64_t i = 0; i < T * E; i++)
        if (!isfinite(logits[i])) return DSV2_ERR_NONFINITE;
    const int grouped = cfg->topk_method != DSV2_TOPK_GREEDY;
    const int64_t G = grouped ? cfg->n_group : 1, per = E / G, kg = grouped ? cfg->topk_group : 1;
    const int64_t kgs = kg > 2 ? kg : 2;
    /* scratch: s [E], c [E], group scores [G], best values [kgs]; keep [E]; ids [kgs]; sel [k] */
    float *s = (float *)malloc((size_t)(2 * E + G + kgs) * sizeof(float));
    unsigned char *keep = (unsigned char *)malloc((size_t)E);
    int64_t *gidx = (int64_t *)malloc((size_t)kgs * sizeof(int64_t));
    float *sel = (float *)malloc((size_t)k * sizeof(float));
    if (!s || !keep || !gidx || !sel) {
        free(s);
        free(keep);
        free(gidx);
        free(sel);
        return DSV2_ERR_NOMEM;
    }
    float *c = s + E, *gs = s + 2 * E, *gval = gs + G;
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        int64_t *id = ids + t * k;
        float *wt = w + t * k;
        if (cfg->scoring == DSV2_SCORE_SOFTMAX) {
            float mx = l[0];
            for (int64_t e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
            float sum = 0.0f;
            for (int64_t e = 0; e < E; e++) {
                s[e] = expf(l[e] - mx);
                sum += s[e];
            }
            float inv = 1.0f / sum;
            for (int64_t e = 0; e < E; e++) s[e] *= inv;
        } else {
            for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-l[e]));
        }
        /* selection score: c = s (+ bias for noaux_tc) */
        const float *choice = s;
        if (cfg->topk_method == DSV2_TOPK_NOAUX_TC) {
            for (int64_t e = 0; e < E; e++) c[e] = s[e] + (bias ? bias[e] : 0.0f);
            choice = c;
        }
        const unsigned char *mask = NULL;
        if (grouped) {
            for (int64_t g = 0; g < G; g++) {
                const float *cg = choice + g * per;
                if (cfg->topk_method == DSV2_TOPK_GROUP_LIMITED) {
                    float mx = cg[0];
                    for (int64_t e = 1; e < per; e++) mx = cg[e] > mx ? cg[e] : mx;
                    gs[g] = mx;
                } else {
                    topk_select(gidx, gval, cg, NULL, per, 2);
                    gs[g] = gval[0] + gval[1];
                }
            }
            topk_select(gidx, gval, gs, NULL, G, kg);
            memset(keep, 0, (size_t)E);
            for (int64_t q = 0; q < kg; q++) memset(keep + gidx[q] * per, 1, (size_t)per);
            mask = keep;
        }
        if (topk_select(id, sel, choice, mask, E, k) != k) {
            rc = DSV2_ERR_ARG; /* unreachable after cfg check */
            break;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            wt[j] = s[id[j]];
            sum += wt[j];
        }
        if (cfg->norm_topk_prob) {
            float den = sum + 1e-20f;
            for (int64_t j = 0; j < k; j++) wt[j] /= den;
        }
        for (int64_t j = 0; j < k; j++) wt[j] *= cfg->routed_scaling_factor;
    }
    free(s);
    free(keep);
    free(gidx);
    free(sel);
    return rc;
}

int dsv2_moe_route(int64_t *ids, float *w, float *logits, const float *x, const dsv2_mat *router,
                   const float *bias, int64_t T, const dsv2_moe_cfg *cfg) {
    int rc = dsv2_moe_cfg_check(cfg);
    if (rc) return rc;
    if (T < 0 || router->rows != cfg->n_experts || router->cols < 1) return DSV2_ERR_ARG;
    if (router->dtype != DSV2_F32 && router->dtype != DSV2_BF16) return DSV2_ERR_DTYPE;
    if (T == 0) return DSV2_OK;
    float *buf = logits;
    if (!buf) {
        buf = (float *)malloc((size_t)T * (size_t)cfg->n_experts * sizeof(float));
        if (!buf) return DSV2_ERR_NOMEM;
    }
    rc = dsv2_linear(buf, x, router, T);
    if (!rc) rc = dsv2_moe_route_logits(ids, w, buf, bias, T, cfg);
    if (!logits) free(buf);
    return rc;
}
