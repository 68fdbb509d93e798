/* linear.c - y = x W^T: row-dot kernels for few rows, sgemm for many. */
#include "linear.h"
#include "blas.h"
#include "gemm_amx.h"
#include "gemm_bf16dp.h"
#include "gemv.h"
#include "gemv_eo.h"
#include "scratch.h"
#include "threadpool.h"

#include <stdatomic.h>
#include <stdlib.h>

/* A row-parallel product: y [T, N] (rows ldy apart) from activations given as x (rows ldx apart)
 * or prepared once per call (xq: int16 codes, or the even|odd layout in xq->p), split over the
 * weight rows by dsv2_parallel_for with one of the tasks below. */
typedef struct {
    float *y;
    int64_t ldy;
    const float *x;
    int64_t ldx;
    const dsv2_xq *xq;
    const dsv2_mat *W;
    int64_t T;
} rows_job;

static void gemv_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    rows_job *j = (rows_job *)ctx;
    dsv2_gemv_rows(j->y, j->ldy, j->x, j->ldx, (int)j->T, j->W, b, e);
}

static void gemvq_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    rows_job *j = (rows_job *)ctx;
    dsv2_gemv_q_rows(j->y, j->ldy, j->xq, j->T, j->W, b, e);
}

static void eo_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    rows_job *j = (rows_job *)ctx;
    dsv2_gemv_eo_rows_blocked(j->y, j->ldy, j->xq->p, j->W->cols, j->T, j->W, b, e);
}

/* int8 / int4 weights, few rows: activations quantized once (int16 for int8 weights,
 * int8 for int4 weights, see gemv.h), then the integer row-dot kernels */
static int linear_q(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T,
                    dsv2_act_kinds k) {
    const int64_t K = W->cols;
    char stackbuf[16384] __attribute__((aligned(64)));
    const size_t need = dsv2_act_bytes(k, T, K);
    char *buf = need <= sizeof stackbuf ? stackbuf : (char *)dsv2_scratch_alloc(need);
    if (!buf) return DSV2_ERR_NOMEM;
    const dsv2_xq xq = dsv2_act_at(k, buf, T, K);
    dsv2_act_quantize(&xq, x, ldx, T, K);
    rows_job j = {y, ldy, NULL, 0, &xq, W, T};
    dsv2_parallel_for(W->rows, 16, gemvq_task, &j);
    if (buf != stackbuf) dsv2_scratch_free(buf);
    return DSV2_OK;
}

/* bf16 weights, many rows, AVX-512: the activations laid out even|odd once per
 * chunk of LINEAR_EO_CHUNK rows, then the blocked even|odd row dots (gemv_eo.h). */
#define LINEAR_EO_CHUNK 256

static int linear_eo(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T) {
    const int64_t K = W->cols, Tc = T < LINEAR_EO_CHUNK ? T : LINEAR_EO_CHUNK;
    float *xp = (float *)dsv2_scratch_alloc((size_t)Tc * (size_t)K * sizeof(float));
    if (!xp) return DSV2_ERR_NOMEM;
    for (int64_t t0 = 0; t0 < T; t0 += Tc) {
        const int64_t tc = T - t0 < Tc ? T - t0 : Tc;
        dsv2_eo_copy_permute(xp, K, x + t0 * ldx, ldx, tc, K);
        dsv2_xq xq = {NULL, NULL, 0, xp};
        rows_job j = {y + t0 * ldy, ldy, NULL, 0, &xq, W, tc};
        dsv2_parallel_for(W->rows, 16, eo_task, &j);
    }
    dsv2_scratch_free(xp);
    return DSV2_OK;
}

typedef struct {
    float *y;
    int64_t ldy;
    const float *x;
    int64_t ldx;
    const dsv2_mat *W;
    int64_t T, P;
    atomic_int err;
} panel_job;

/* panels [pb, pe) of P rows of W: widen each to fp32 and multiply (single-threaded
 * sgemm).  Panels have a fixed size whatever the thread count, so results do
 * not depend on the number of threads. */
static void panel_task(void *ctx, int64_t pb, int64_t pe, int tid) {
    (void)tid;
    panel_job *j = (panel_job *)ctx;
    const int64_t K = j->W->cols, N = j->W->rows, P = j->P;
    float *buf = (float *)malloc((size_t)P * (size_t)K * sizeof(float));
    if (!buf) {
        atomic_store(&j->err, DSV2_ERR_NOMEM);
        return;
    }
    for (int64_t r0 = pb * P; r0 < pe * P && r0 < N; r0 += P) {
        int64_t p = N - r0 < P ? N - r0 : P;
        dsv2_mat_rows_to_f32(buf, j->W, r0, r0 + p);
        dsv2_sgemm_nt_1((int)j->T, (int)p, (int)K, j->x, (int)j->ldx, buf, (int)K, 0.0f, j->y + r0, (int)j->ldy);
    }
    free(buf);
}

int dsv2_linear_ex(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T) {
    const int64_t N = W->rows, K = W->cols;
    if (T < 0 || N <= 0 || K <= 0 || ldx < K || ldy < N) return DSV2_ERR_ARG;
    if (W->dtype == DSV2_F8E4M3 && dsv2_f8_check(W)) return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    if (dsv2_amx_use(W, T)) return dsv2_linear_amx(y, ldy, x, ldx, W, T);       /* tiles: exact or bf16 compute */
    if (dsv2_bf16dp_use(W, T)) return dsv2_linear_bf16dp(y, ldy, x, ldx, W, T); /* opt-in bf16 compute */
    if (T <= DSV2_LINEAR_GEMV_MAX_T) {
        const dsv2_act_kinds k = dsv2_act_kinds_of(W, NULL);
        if (k.g16 || k.i8 || k.f8) return linear_q(y, ldy, x, ldx, W, T, k);
    }
    if (T <= DSV2_LINEAR_GEMV_MAX_T) {
        for (int64_t t0 = 0; t0 < T; t0 += DSV2_LINEAR_GEMV_MAX_T) {
            int tt = (int)(T - t0 < DSV2_LINEAR_GEMV_MAX_T ? T - t0 : DSV2_LINEAR_GEMV_MAX_T);
            rows_job j = {y + t0 * ldy, ldy, x + t0 * ldx, ldx, NULL, W, tt};
            dsv2_parallel_for(N, 16, gemv_task, &j);
        }
        return DSV2_OK;
    }
    if (T >= DSV2_EO_MIN_T && dsv2_eo_usable(W)) return linear_eo(y, ldy, x, ldx, W, T);
    if (T > INT32_MAX || N > INT32_MAX || K > INT32_MAX || ldx > INT32_MAX || ldy > INT32_MAX)
        return DSV2_ERR_ARG;
    if (W->dtype == DSV2_F32) {
        dsv2_sgemm_nt((int)T, (int)N, (int)K, x, (int)ldx, (const float *)W->data, (int)K, 0.0f, y, (int)ldy);
        return DSV2_OK;
    }
    /* bf16 / int8 / fp8: each thread widens (dequantizes) its own rows of W one panel at a time
     * (never the whole matrix) */
    panel_job pj;
    pj.y = y;
    pj.ldy = ldy;
    pj.x = x;
    pj.ldx = ldx;
    pj.W = W;
    pj.T = T;
    /* panels of up to 2 MiB of fp32 (a multiple of 16 rows), at least 8 per matrix and
     * two per thread so that every thread gets work (with "at least 8" alone, 16 threads
     * left half of them idle on 1408-row matrices).  Each panel is one sgemm call that
     * repacks the activations, so small panels cost: with 256 KiB panels a 512-token
     * lite-L4 prefill ran at ~187 tokens/s, with 2 MiB ~203.  An element's value does
     * not depend on the panel's size (sgemm sums over K the same way whatever the
     * panel's width), so results stay the same for any thread count. */
    const int64_t min_panels = 2 * (int64_t)dsv2_region_threads() > 8 ? 2 * (int64_t)dsv2_region_threads() : 8;
    int64_t P = (int64_t)(2u << 20) / (K * 4);
    if (P > N / min_panels) P = N / min_panels;
    P = P < 16 ? 16 : P / 16 * 16;
    pj.P = P;
    atomic_init(&pj.err, DSV2_OK);
    dsv2_parallel_for((N + P - 1) / P, 1, panel_task, &pj);
    return atomic_load(&pj.err);
}

int dsv2_linear(float *y, const float *x, const dsv2_mat *W, int64_t T) {
    return dsv2_linear_ex(y, W->rows, x, W->cols, W, T);
}

/* ---------------- two weights, one pass ---------------- */

typedef struct {
    float *y[2];
    const float *x;
    const dsv2_xq *xq; /* NULL: no prepared kind */
    const dsv2_mat *W[2];
    int64_t T;
} rows2_job;

/* rows [b, e) of the stacked [W1; W2]: each matrix with the kernel dsv2_linear_ex gives it alone */
static void rows2_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    rows2_job *j = (rows2_job *)ctx;
    const int64_t N1 = j->W[0]->rows;
    for (int m = 0; m < 2; m++) {
        const int64_t off = m ? N1 : 0, r0 = (b > off ? b : off) - off, r1 = (m ? e : (e < N1 ? e : N1)) - off;
        if (r0 >= r1) continue;
        const dsv2_mat *W = j->W[m];
        if (!dsv2_gemv_q_rows(j->y[m], W->rows, j->xq, j->T, W, r0, r1))
            dsv2_gemv_rows(j->y[m], W->rows, j->x, W->cols, (int)j->T, W, r0, r1);
    }
}

/* the prepared kind W takes alone is in k (so that W's kernel is the one dsv2_linear_ex picks) */
static int kinds_cover(dsv2_act_kinds k, const dsv2_mat *W) {
    const dsv2_act_kinds w = dsv2_act_kinds_of(W, NULL);
    return (w.g16 == 0 || w.g16 == k.g16) && (!w.i8 || k.i8) && (!w.f8 || k.f8);
}

int dsv2_linear2(float *y1, float *y2, const float *x, const dsv2_mat *W1, const dsv2_mat *W2, int64_t T) {
    const int64_t K = W1->cols;
    if (T < 0 || W1->rows <= 0 || W2->rows <= 0 || K <= 0 || W2->cols != K) return DSV2_ERR_ARG;
    if ((W1->dtype == DSV2_F8E4M3 && dsv2_f8_check(W1)) || (W2->dtype == DSV2_F8E4M3 && dsv2_f8_check(W2)))
        return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    const dsv2_act_kinds k = dsv2_act_kinds_of(W1, W2);
    const int one_pass = T <= DSV2_LINEAR_GEMV_MAX_T && !dsv2_amx_use(W1, T) && !dsv2_amx_use(W2, T) &&
                         !dsv2_bf16dp_use(W1, T) && !dsv2_bf16dp_use(W2, T) && kinds_cover(k, W1) && kinds_cover(k, W2);
    if (!one_pass) {
        const int rc = dsv2_linear(y1, x, W1, T);
        return rc ? rc : dsv2_linear(y2, x, W2, T);
    }
    char stackbuf[16384] __attribute__((aligned(64)));
    const size_t need = dsv2_act_bytes(k, T, K);
    char *buf = need <= sizeof stackbuf ? stackbuf : (char *)dsv2_scratch_alloc(need);
    if (!buf) return DSV2_ERR_NOMEM;
    const dsv2_xq xq = dsv2_act_at(k, buf, T, K);
    if (need) dsv2_act_quantize(&xq, x, K, T, K);
    rows2_job j = {{y1, y2}, x, need ? &xq : NULL, {W1, W2}, T};
    dsv2_parallel_for(W1->rows + W2->rows, 16, rows2_task, &j);
    if (buf != stackbuf) dsv2_scratch_free(buf);
    return DSV2_OK;
}
