/* expert_mlp.c - SwiGLU MLP: fused gate/up row-dot path and sgemm path. */
#include "expert_mlp.h"
#include "cpu.h"
#include "gemm_amx.h"
#include "gemm_bf16dp.h"
#include "gemv_eo.h"
#include "gemv.h"
#include "linear.h"
#include "scratch.h"
#include "threadpool.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* intermediate rows per gate/up block of the row-dot path */
#define MLP_ROWBLK 24

int dsv2_mlp_check(const dsv2_mlp *m, int64_t *d, int64_t *I) {
    const dsv2_mat *w[3] = {&m->gate, &m->up, &m->down};
    for (int i = 0; i < 3; i++) {
        if (!w[i]->data) return DSV2_ERR_ARG;
        if (w[i]->dtype != DSV2_F32 && w[i]->dtype != DSV2_BF16 && w[i]->dtype != DSV2_I8 && w[i]->dtype != DSV2_I4 &&
            w[i]->dtype != DSV2_F8E4M3)
            return DSV2_ERR_DTYPE;
        if (w[i]->dtype == DSV2_I8 && (!w[i]->scale || w[i]->group <= 0 || w[i]->cols % w[i]->group))
            return DSV2_ERR_ARG;
        if (w[i]->dtype == DSV2_F8E4M3 && dsv2_f8_check(w[i])) return DSV2_ERR_ARG;
    }
    int64_t II = m->gate.rows, dd = m->gate.cols;
    if (II < 1 || dd < 1 || m->up.rows != II || m->up.cols != dd || m->down.rows != dd || m->down.cols != II)
        return DSV2_ERR_ARG;
    if (d) *d = dd;
    if (I) *I = II;
    return DSV2_OK;
}

/* ---------------- silu(g) * u ---------------- */

static void silu_mul_portable(float *h, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float x = g[i];
        h[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

/* exp(x) for x in [-87.3, 88.3] (inputs clamped), Cephes-style polynomial,
 * about 1 ulp: exp(x) = 2^n * exp(r), r = x - n ln2, |r| <= ln2 / 2. */
#define EXP_CONSTS                                                   \
    const float c_lo = -87.3f, c_hi = 88.3f, c_log2e = 1.44269504088896341f; \
    const float c_ln2hi = 0.693359375f, c_ln2lo = -2.12194440e-4f;  \
    const float p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f; \
    const float p3 = 4.1665795894e-2f, p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f;

DSV2_TARGET_AVX512 static inline __m512 exp_avx512(__m512 x) {
    EXP_CONSTS
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(c_lo)), _mm512_set1_ps(c_hi));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(c_log2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c_ln2hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c_ln2lo), r);
    __m512 p = _mm512_set1_ps(p0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p5));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

DSV2_TARGET_AVX512 static void silu_mul_avx512(float *h, const float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 x = _mm512_maskz_loadu_ps(m, g + i), uu = _mm512_maskz_loadu_ps(m, u + i);
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(s, uu));
    }
}

DSV2_TARGET_AVX2 static inline __m256 exp_avx2(__m256 x) {
    EXP_CONSTS
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(c_lo)), _mm256_set1_ps(c_hi));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(c_log2e)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c_ln2hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c_ln2lo), r);
    __m256 p = _mm256_set1_ps(p0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p5));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n with n in [-126, 127] */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

DSV2_TARGET_AVX2 static void silu_mul_avx2(float *h, const float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i), uu = _mm256_loadu_ps(u + i);
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(s, uu));
    }
    if (i < n) silu_mul_portable(h + i, g + i, u + i, n - i);
}

void dsv2_silu_mul(float *h, const float *g, const float *u, int64_t n) {
    if (n <= 0) return;
    int isa = dsv2_isa();
    if (isa == DSV2_ISA_AVX512) silu_mul_avx512(h, g, u, n);
    else if (isa == DSV2_ISA_AVX2) silu_mul_avx2(h, g, u, n);
    else silu_mul_portable(h, g, u, n);
}

/* ---------------- multi-token row dots ----------------
 * y[t * ldy + r] = x_t . W_r for r in [r0, r1), t < T.  The AVX-512 kernel
 * takes up to 8 tokens per pass over the weight rows (tiles of R rows x C
 * tokens, R*C <= 24 accumulators), so an expert with 5..8 tokens streams its
 * weights once; other instruction sets use dsv2_gemv_rows (4 tokens a pass).
 * Per output: 16 lane-wise fp32 partial sums over k, then a horizontal sum.
 * Tiles (measured on Zen 4, fp32 and bf16): 1-2 tokens x 8 rows, 3 x 6,
 * 4-5 x 4; T tokens go in passes of 4 (a first pass of 5 when T % 4 == 1):
 * wider passes (6-8 tokens) were slower, their x rows no longer fit in L1.
 * A single token goes through dsv2_gemv_rows (rows streamed one by one). */

#define DOT_MAXC 5

DSV2_TARGET_AVX512 static inline __m512 load16_w(const dsv2_mat *W, int64_t r, int64_t k, __mmask16 m) {
    if (W->dtype == DSV2_F32) return _mm512_maskz_loadu_ps(m, (const float *)W->data + r * W->cols + k);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)W->data + r * W->cols + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
dot_tile_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int C, const int R, const dsv2_mat *W,
                int64_t r) {
    const int64_t K = W->cols;
    __m512 acc[8][DOT_MAXC];
    for (int i = 0; i < R; i++)
        for (int c = 0; c < C; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = (K - k >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        __m512 w[8];
        for (int i = 0; i < R; i++) w[i] = load16_w(W, r + i, k, m);
        for (int c = 0; c < C; c++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + c * ldx + k);
            for (int i = 0; i < R; i++) acc[i][c] = _mm512_fmadd_ps(w[i], xv, acc[i][c]);
        }
    }
    for (int c = 0; c < C; c++)
        for (int i = 0; i < R; i++) y[c * ldy + r + i] = _mm512_reduce_add_ps(acc[i][c]);
}

#define DOT_KERNEL(CC, RR)                                                                           \
    DSV2_TARGET_AVX512 static void dot_avx512_c##CC(float *y, int64_t ldy, const float *x, int64_t ldx, \
                                                    const dsv2_mat *W, int64_t r0, int64_t r1) {      \
        int64_t r = r0;                                                                              \
        for (; r + RR <= r1; r += RR) dot_tile_avx512(y, ldy, x, ldx, CC, RR, W, r);                 \
        for (; r < r1; r++) dot_tile_avx512(y, ldy, x, ldx, CC, 1, W, r);                            \
    }
DOT_KERNEL(1, 8)
DOT_KERNEL(2, 8)
DOT_KERNEL(3, 6)
DOT_KERNEL(4, 4)
DOT_KERNEL(5, 4)

typedef void (*dot_fn)(float *, int64_t, const float *, int64_t, const dsv2_mat *, int64_t, int64_t);
static const dot_fn dot_avx512[DOT_MAXC + 1] = {NULL, dot_avx512_c1, dot_avx512_c2, dot_avx512_c3,
                                                dot_avx512_c4, dot_avx512_c5};

/* fp8 weights with more tokens than one pass of the row-dot kernels: rows widened to fp32
 * once (exact values, dsv2_mat_rows_to_f32) and multiplied as fp32 weights, instead of
 * decoding every weight again for each pass of 4 tokens */
static int f8_widen(const dsv2_mat *W, int64_t T) {
    return W->dtype == DSV2_F8E4M3 && T > DSV2_GEMV_MAX_T;
}

/* W as fp32 in buf (rows x cols floats) when f8_widen holds, else W itself */
static dsv2_mat widened(float *buf, const dsv2_mat *W, int64_t T) {
    if (!f8_widen(W, T)) return *W;
    dsv2_mat f;
    memset(&f, 0, sizeof f);
    f.dtype = DSV2_F32;
    f.data = buf;
    f.rows = W->rows;
    f.cols = W->cols;
    dsv2_mat_rows_to_f32(buf, W, 0, W->rows);
    return f;
}

/* rows of widened weights per block: ~128 KiB of fp32 (L2), at least 8 */
static int64_t widen_rows(int64_t K) {
    const int64_t n = ((int64_t)128 << 10) / (4 * K);
    return n < 8 ? 8 : n;
}

static void dot_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T, const dsv2_mat *W,
                     int64_t r0, int64_t r1);

static void dot_rows_widened(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T, const dsv2_mat *W,
                             int64_t r0, int64_t r1) {
    const int64_t rb = widen_rows(W->cols);
    float *buf = (float *)dsv2_scratch_alloc((size_t)rb * (size_t)W->cols * sizeof(float));
    if (!buf) { /* no memory for the buffer: decode in registers, pass by pass */
        for (int64_t t0 = 0; t0 < T; t0 += 16)
            dsv2_gemv_rows(y + t0 * ldy, ldy, x + t0 * ldx, ldx, (int)(T - t0 < 16 ? T - t0 : 16), W, r0, r1);
        return;
    }
    for (int64_t b = r0; b < r1; b += rb) {
        const dsv2_mat blk = dsv2_mat_rows(W, b, r1 - b < rb ? r1 - b : rb);
        const dsv2_mat f = widened(buf, &blk, T);
        dot_rows(y + b, ldy, x, ldx, T, &f, 0, f.rows);
    }
    dsv2_scratch_free(buf);
}

static void dot_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T, const dsv2_mat *W,
                     int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    if (f8_widen(W, T)) {
        dot_rows_widened(y, ldy, x, ldx, T, W, r0, r1);
        return;
    }
    /* one token (decode): dsv2_gemv_rows streams the weight rows one after the other
     * (measured on Zen 4, lite-L4 MoE layers, 2 threads, bf16: 26.5 GB/s vs 24.6 with
     * 8-row tiles) */
    if (T == 1) {
        dsv2_gemv_rows(y, ldy, x, ldx, 1, W, r0, r1);
        return;
    }
    if (dsv2_isa() == DSV2_ISA_AVX512 && (W->dtype == DSV2_F32 || W->dtype == DSV2_BF16)) {
        for (int64_t t0 = 0; t0 < T;) {
            const int64_t c = dsv2_tile_pass(T - t0);
            dot_avx512[c](y + t0 * ldy, ldy, x + t0 * ldx, ldx, W, r0, r1);
            t0 += c;
        }
        return;
    }
    for (int64_t t0 = 0; t0 < T; t0 += 16) {
        int tt = (int)(T - t0 < 16 ? T - t0 : 16);
        dsv2_gemv_rows(y + t0 * ldy, ldy, x + t0 * ldx, ldx, tt, W, r0, r1);
    }
}

/* ---------------- row-dot path ---------------- */

void dsv2_mlp_gateup_rows_q(float *h, int64_t ldh, const float *x, int64_t ldx, const dsv2_xq *xq, int64_t T,
                            const dsv2_mlp *m, int64_t i0, int64_t i1) {
    /* gate and up of MLP_ROWBLK rows for up to 16 tokens at a time, then
     * silu * up straight into h: only a block's gate/up values are in flight */
    float g[16 * MLP_ROWBLK], u[16 * MLP_ROWBLK];
    const int64_t K = m->gate.cols;
    const int eo = xq && xq->p; /* set only where dsv2_mlp_eo_x holds */
    /* fp8 with many tokens: each block of gate / up rows widened once for all the tokens */
    float *wb = f8_widen(&m->gate, T) || f8_widen(&m->up, T)
                    ? (float *)dsv2_scratch_alloc((size_t)2 * MLP_ROWBLK * (size_t)K * sizeof(float))
                    : NULL;
    for (int64_t ib = i0; ib < i1; ib += MLP_ROWBLK) {
        int64_t n = i1 - ib < MLP_ROWBLK ? i1 - ib : MLP_ROWBLK;
        dsv2_mat sg = dsv2_mat_rows(&m->gate, ib, n), su = dsv2_mat_rows(&m->up, ib, n);
        if (wb) {
            sg = widened(wb, &sg, T);
            su = widened(wb + MLP_ROWBLK * K, &su, T);
        }
        for (int64_t t0 = 0; t0 < T; t0 += 16) {
            int64_t tt = T - t0 < 16 ? T - t0 : 16;
            if (eo) {
                dsv2_gemv_eo_rows(g, n, xq->p + t0 * K, K, tt, &sg, 0, n);
                dsv2_gemv_eo_rows(u, n, xq->p + t0 * K, K, tt, &su, 0, n);
            } else {
                /* int8 / int4 matrices on their prepared kind, the others on fp32 x */
                const dsv2_xq xs = xq ? dsv2_xq_rows(xq, K, t0) : (dsv2_xq){0};
                if (!dsv2_gemv_q_rows(g, n, &xs, tt, &sg, 0, n)) dot_rows(g, n, x + t0 * ldx, ldx, tt, &sg, 0, n);
                if (!dsv2_gemv_q_rows(u, n, &xs, tt, &su, 0, n)) dot_rows(u, n, x + t0 * ldx, ldx, tt, &su, 0, n);
            }
            for (int64_t t = 0; t < tt; t++) dsv2_silu_mul(h + (t0 + t) * ldh + ib, g + t * n, u + t * n, n);
        }
    }
    dsv2_scratch_free(wb);
}

void dsv2_mlp_down_rows_q(float *y, int64_t ldy, const float *h, int64_t ldh, const dsv2_xq *hq, int64_t T,
                          const dsv2_mlp *m, int64_t r0, int64_t r1) {
    if (hq && hq->p) { /* set only where dsv2_mlp_eo_h holds */
        dsv2_gemv_eo_rows_blocked(y, ldy, hq->p, m->down.cols, T, &m->down, r0, r1);
        return;
    }
    if (!dsv2_gemv_q_rows(y, ldy, hq, T, &m->down, r0, r1)) dot_rows(y, ldy, h, ldh, T, &m->down, r0, r1);
}

int dsv2_mlp_eo_x(const dsv2_mlp *m, int64_t T) {
    return T >= DSV2_EO_MIN_T && dsv2_eo_usable(&m->gate) && dsv2_eo_usable(&m->up);
}

int dsv2_mlp_eo_h(const dsv2_mlp *m, int64_t T) {
    return T >= DSV2_EO_MIN_T && dsv2_eo_usable(&m->down);
}

int64_t dsv2_mlp_rowdot_max_t(const dsv2_mlp *m) {
    /* the bf16 compute mode lives in the matrix-product kernels (dsv2_linear_ex), which round
     * each activation matrix once; the row-dot path keeps fp32 activations */
    if (dsv2_bf16dp_use(&m->gate, 2) && dsv2_bf16dp_use(&m->up, 2) && dsv2_bf16dp_use(&m->down, 2)) return 1;
    /* AMX (bf16, or int8 in groups of 32k columns): products of DSV2_AMX_MIN_T or more tokens
     * go to the tiles (gemm_amx.h, through dsv2_linear_ex), fewer to the row-dot kernels */
    if (dsv2_amx_use(&m->gate, DSV2_AMX_MIN_T) && dsv2_amx_use(&m->up, DSV2_AMX_MIN_T) &&
        dsv2_amx_use(&m->down, DSV2_AMX_MIN_T))
        return DSV2_AMX_MIN_T - 1;
    /* bf16 on AVX-512: the even|odd row-dot kernels beat sgemm on widened panels at every
     * token count (gemv_eo.h) */
    if (dsv2_mlp_eo_x(m, DSV2_EO_MIN_T) && dsv2_mlp_eo_h(m, DSV2_EO_MIN_T)) return DSV2_MLP_ROWDOT_ALL;
    return DSV2_MLP_GEMV_MAX_T;
}

/* ---------------- matrix-product path ---------------- */

int64_t dsv2_mlp_gemm_scratch(const dsv2_mlp *m, int64_t T) {
    int64_t tc = T < DSV2_MLP_GEMM_CHUNK ? T : DSV2_MLP_GEMM_CHUNK;
    return tc * 2 * m->gate.rows;
}

typedef struct {
    float *gu;
    int64_t I;
} silu_rows_job;

static void silu_rows_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    silu_rows_job *j = (silu_rows_job *)ctx;
    for (int64_t t = b; t < e; t++) {
        float *row = j->gu + t * 2 * j->I;
        dsv2_silu_mul(row, row, row + j->I, j->I);
    }
}

/* gate and up stored back to back (the stacked gate_up_proj layout)? */
static int gate_up_adjacent(const dsv2_mlp *m, dsv2_mat *both) {
    const dsv2_mat *g = &m->gate, *u = &m->up;
    if (g->dtype != u->dtype || g->cols != u->cols) return 0;
    size_t bytes = (size_t)g->rows * dsv2_mat_row_bytes(g);
    if ((const char *)g->data + bytes != (const char *)u->data) return 0;
    /* int8: the scales must follow each other too (dsv2ext.quant's stacked experts) */
    if (g->dtype == DSV2_I8 && (g->group != u->group || g->scale + g->rows * (g->cols / g->group) != u->scale)) return 0;
    *both = *g;
    both->rows = g->rows + u->rows;
    /* fp8: up must be rows [I, 2I) of one block-scaled matrix with gate (a stacked gate_up_proj) */
    if (g->dtype == DSV2_F8E4M3) {
        const dsv2_mat v = dsv2_mat_rows(both, g->rows, u->rows);
        if (u->group != g->group || u->block_rows != g->block_rows || v.scale != u->scale || v.row_off != u->row_off)
            return 0;
    }
    return 1;
}

int dsv2_mlp_gemm(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t T, const dsv2_mlp *m,
                  float *scratch) {
    int64_t d, I;
    int rc = dsv2_mlp_check(m, &d, &I);
    if (rc) return rc;
    if (T < 0 || ldx < d || ldy < d) return DSV2_ERR_ARG;
    dsv2_mat both;
    int fused = gate_up_adjacent(m, &both);
    for (int64_t t0 = 0; t0 < T; t0 += DSV2_MLP_GEMM_CHUNK) {
        int64_t tc = T - t0 < DSV2_MLP_GEMM_CHUNK ? T - t0 : DSV2_MLP_GEMM_CHUNK;
        const float *xc = x + t0 * ldx;
        /* scratch [tc, 2I]: columns [0, I) gate, [I, 2I) up */
        if (fused) {
            rc = dsv2_linear_ex(scratch, 2 * I, xc, ldx, &both, tc);
        } else {
            rc = dsv2_linear_ex(scratch, 2 * I, xc, ldx, &m->gate, tc);
            if (!rc) rc = dsv2_linear_ex(scratch + I, 2 * I, xc, ldx, &m->up, tc);
        }
        if (rc) return rc;
        silu_rows_job sj = {scratch, I};
        dsv2_parallel_for(tc, 1, silu_rows_task, &sj);
        rc = dsv2_linear_ex(y + t0 * ldy, ldy, scratch, 2 * I, &m->down, tc);
        if (rc) return rc;
    }
    return DSV2_OK;
}

/* ---------------- the whole MLP ---------------- */

typedef struct {
    float *h;
    float *y;
    const float *x;
    const dsv2_mlp *m;
    int64_t T, d, I;
    const dsv2_xq *xq, *hq; /* prepared activations (int16 or even|odd), or NULL */
} mlp_job;

static void mlp_gateup_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    mlp_job *j = (mlp_job *)ctx;
    dsv2_mlp_gateup_rows_q(j->h, j->I, j->x, j->d, j->xq, j->T, j->m, b, e);
}

static void mlp_down_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    mlp_job *j = (mlp_job *)ctx;
    dsv2_mlp_down_rows_q(j->y, j->d, j->h, j->I, j->hq, j->T, j->m, b, e);
}

int dsv2_mlp_forward(float *y, const float *x, const dsv2_mlp *m, int64_t T) {
    int64_t d, I;
    int rc = dsv2_mlp_check(m, &d, &I);
    if (rc) return rc;
    if (T < 0) return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    if (T <= dsv2_mlp_rowdot_max_t(m)) {
        /* chunks of up to DSV2_MLP_GEMM_CHUNK tokens bound the buffers */
        const int64_t Tc = T < DSV2_MLP_GEMM_CHUNK ? T : DSV2_MLP_GEMM_CHUNK;
        /* int8 / int4 weights: x and h quantized once each (see gemv.h) */
        const dsv2_act_kinds kx = dsv2_act_kinds_of(&m->gate, &m->up), kh = dsv2_act_kinds_of(&m->down, NULL);
        const size_t bx = dsv2_act_bytes(kx, Tc, d), bh = dsv2_act_bytes(kh, Tc, I);
        /* bf16 weights: x copied into the even|odd layout, h permuted in place */
        const size_t bp = dsv2_mlp_eo_x(m, Tc) ? (size_t)Tc * (size_t)d * sizeof(float) : 0;
        float *h = (float *)malloc((size_t)Tc * (size_t)I * sizeof(float) + bx + bh + bp + 192);
        if (!h) return DSV2_ERR_NOMEM;
        char *qb = (char *)(((uintptr_t)(h + Tc * I) + 63) & ~(uintptr_t)63);
        float *xp = (float *)(((uintptr_t)(qb + bx + bh) + 63) & ~(uintptr_t)63);
        for (int64_t t0 = 0; t0 < T; t0 += Tc) {
            const int64_t tc = T - t0 < Tc ? T - t0 : Tc;
            const float *xc = x + t0 * d;
            dsv2_xq xq = dsv2_act_at(kx, qb, tc, d), hq = dsv2_act_at(kh, qb + bx, tc, I);
            dsv2_act_quantize(&xq, xc, d, tc, d);
            if (dsv2_mlp_eo_x(m, tc)) {
                dsv2_eo_copy_permute(xp, d, xc, d, tc, d);
                xq.p = xp;
            }
            mlp_job j = {h, y + t0 * d, xc, m, tc, d, I, &xq, &hq};
            dsv2_parallel_for(I, MLP_ROWBLK, mlp_gateup_task, &j);
            dsv2_act_quantize(&hq, h, I, tc, I);
            if (dsv2_mlp_eo_h(m, tc)) {
                dsv2_eo_copy_permute(h, I, h, I, tc, I);
                hq.p = h;
            }
            dsv2_parallel_for(d, 16, mlp_down_task, &j);
        }
        free(h);
        return DSV2_OK;
    }
    float *s = (float *)malloc((size_t)dsv2_mlp_gemm_scratch(m, T) * sizeof(float));
    if (!s) return DSV2_ERR_NOMEM;
    rc = dsv2_mlp_gemm(y, d, x, d, T, m, s);
    free(s);
    return rc;
}
