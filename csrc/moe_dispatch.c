/* moe_dispatch.c - counting sort of slots by expert, and the weighted combine. */
#include "moe_dispatch.h"
#include "threadpool.h"

#include <stdlib.h>

int dsv2_moe_dispatch(int64_t *offsets, int64_t *order, const int64_t *ids, int64_t T, int64_t k,
                      int64_t E) {
    if (T < 0 || k < 1 || E < 1) return DSV2_ERR_ARG;
    const int64_t S = T * k;
    for (int64_t s = 0; s < S; s++)
        if (ids[s] < 0 || ids[s] >= E) return DSV2_ERR_RANGE;
    memset(offsets, 0, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < S; s++) offsets[ids[s] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    /* offsets[e] is used as the fill cursor, then restored */
    for (int64_t s = 0; s < S; s++) order[offsets[ids[s]]++] = s;
    for (int64_t e = E; e > 0; e--) offsets[e] = offsets[e - 1];
    offsets[0] = 0;
    return DSV2_OK;
}

void dsv2_moe_combine_plan(int64_t *rows, float *wts, const int64_t *order, const float *w, int64_t T,
                           int64_t k) {
    const int64_t S = T * k;
    for (int64_t r = 0; r < S; r++) rows[order[r]] = r; /* grouped row of each slot */
    for (int64_t t = 0; t < T; t++) {
        int64_t *rt = rows + t * k;
        float *wt = wts + t * k;
        for (int64_t j = 0; j < k; j++) wt[j] = w[t * k + j];
        for (int64_t j = 1; j < k; j++) { /* insertion sort by row */
            int64_t r = rt[j];
            float v = wt[j];
            int64_t p = j;
            while (p > 0 && rt[p - 1] > r) {
                rt[p] = rt[p - 1];
                wt[p] = wt[p - 1];
                p--;
            }
            rt[p] = r;
            wt[p] = v;
        }
    }
}

#define COMBINE_BLK 64

void dsv2_moe_combine_cols(float *out, int64_t ldo, const float *Y, int64_t ldy, const int64_t *rows,
                           const float *wts, const float *add, int64_t ldadd, int64_t T, int64_t k,
                           int64_t c0, int64_t c1) {
    float acc[COMBINE_BLK];
    for (int64_t t = 0; t < T; t++) {
        for (int64_t cb = c0; cb < c1; cb += COMBINE_BLK) {
            int64_t n = c1 - cb < COMBINE_BLK ? c1 - cb : COMBINE_BLK;
            for (int64_t c = 0; c < n; c++) acc[c] = 0.0f;
            for (int64_t m = 0; m < k; m++) {
                const float wm = wts[t * k + m];
                const float *y = Y + rows[t * k + m] * ldy + cb;
                for (int64_t c = 0; c < n; c++) {
                    float p = wm * y[c];
                    acc[c] += p;
                }
            }
            float *o = out + t * ldo + cb;
            if (add) {
                const float *a = add + t * ldadd + cb;
                for (int64_t c = 0; c < n; c++) o[c] = acc[c] + a[c];
            } else {
                for (int64_t c = 0; c < n; c++) o[c] = acc[c];
            }
        }
    }
}

typedef struct {
    float *out;
    const float *Y;
    const int64_t *rows;
    const float *wts;
    const float *add;
    int64_t T, k, d;
} combine_job;

static void combine_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    combine_job *j = (combine_job *)ctx;
    int64_t c0 = b * COMBINE_BLK, c1 = e * COMBINE_BLK < j->d ? e * COMBINE_BLK : j->d;
    dsv2_moe_combine_cols(j->out, j->d, j->Y, j->d, j->rows, j->wts, j->add, j->d, j->T, j->k, c0, c1);
}

int dsv2_moe_combine(float *out, const float *Y, const int64_t *order, const float *w, const float *add,
                     int64_t T, int64_t k, int64_t d) {
    if (T < 0 || k < 1 || d < 1) return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    int64_t *rows = (int64_t *)malloc((size_t)(T * k) * sizeof(int64_t));
    float *wts = (float *)malloc((size_t)(T * k) * sizeof(float));
    if (!rows || !wts) {
        free(rows);
        free(wts);
        return DSV2_ERR_NOMEM;
    }
    dsv2_moe_combine_plan(rows, wts, order, w, T, k);
    combine_job j = {out, Y, rows, wts, add, T, k, d};
    dsv2_parallel_for((d + COMBINE_BLK - 1) / COMBINE_BLK, 1, combine_task, &j);
    free(rows);
    free(wts);
    return DSV2_OK;
}
