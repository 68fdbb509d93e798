/* gemm_bf16dp.c - bf16 weights x bf16-rounded activations on vdpbf16ps (opt-in mode). */
#include "gemm_bf16dp.h"
#include "bf16_vec.h"
#include "cpu.h"
#include "threadpool.h"

#include <immintrin.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static atomic_int g_mode = -1; /* -1: DSV2EXT_BF16_COMPUTE not read yet */

int dsv2_bf16dp_available(void) { return dsv2_isa() == DSV2_ISA_AVX512 && dsv2_cpu_has_avx512bf16(); }

int dsv2_get_bf16_compute(void) {
    int m = atomic_load(&g_mode);
    if (m < 0) {
        const char *e = getenv("DSV2EXT_BF16_COMPUTE");
        m = (e && (!strcmp(e, "1") || !strcmp(e, "on") || !strcmp(e, "true"))) ? 1 : 0;
        int expected = -1;
        atomic_compare_exchange_strong(&g_mode, &expected, m);
        m = atomic_load(&g_mode);
    }
    return m;
}

void dsv2_set_bf16_compute(int on) { atomic_store(&g_mode, on ? 1 : 0); }

int dsv2_bf16dp_use(const dsv2_mat *W, int64_t T) {
    return T >= 2 && W->dtype == DSV2_BF16 && dsv2_get_bf16_compute() == 1 && dsv2_bf16dp_available();
}

/* ---------------- rounding ---------------- */

static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

DSV2_TARGET_AVX512 static void round_row_avx512(uint16_t *out, const float *in, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i r = dsv2_bf16_rne_hi_avx512(_mm512_loadu_si512((const void *)(in + i)));
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    for (; i < n; i++) out[i] = round_bf16(in[i]);
}

void dsv2_round_bf16_rows(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int64_t T, int64_t K) {
    for (int64_t t = 0; t < T; t++) {
        if (dsv2_isa() == DSV2_ISA_AVX512) {
            round_row_avx512(xb + t * ldxb, x + t * ldx, K);
        } else {
            for (int64_t k = 0; k < K; k++) xb[t * ldxb + k] = round_bf16(x[t * ldx + k]);
        }
    }
}

/* ---------------- dot-product tiles ---------------- */

#define BDP_MAXC 6
#define BDP_MAXR 8

/* the 16-lane sums of four accumulators at once -> [sum a0, sum a1, sum a2, sum a3]
 * (half the shuffles of four separate reductions: at K = 2048 a tile does 64 dot
 * instructions per output, so the reductions are ~10% of its work) */
DSV2_TARGET_AVX512BF16 static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m256 s0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
    __m256 s1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
    __m256 s2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
    __m256 s3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* R weight rows x C activation rows; 16 lane-wise fp32 sums of bf16 pairs per
 * output, then a horizontal sum.  C and R are compile-time constants after
 * inlining (R * C <= 24 accumulators). */
DSV2_TARGET_AVX512BF16 static inline __attribute__((always_inline)) void
bdp_tile(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, const int C, const int R, const uint16_t *W,
         int64_t K, int64_t r) {
    __m512 acc[BDP_MAXR][BDP_MAXC];
    for (int i = 0; i < R; i++)
        for (int c = 0; c < C; c++) acc[i][c] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh w[BDP_MAXR];
        for (int i = 0; i < R; i++) w[i] = (__m512bh)_mm512_loadu_si512((const void *)(W + (r + i) * K + k));
        for (int c = 0; c < C; c++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + c * ldxb + k));
            for (int i = 0; i < R; i++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], w[i], xv);
        }
    }
    if (k < K) { /* tail: zero-padded pairs */
        const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1ull);
        __m512bh w[BDP_MAXR];
        for (int i = 0; i < R; i++) w[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, W + (r + i) * K + k);
        for (int c = 0; c < C; c++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xb + c * ldxb + k);
            for (int i = 0; i < R; i++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], w[i], xv);
        }
    }
    for (int c = 0; c < C; c++) {
        int i = 0;
        for (; i + 4 <= R; i += 4)
            _mm_storeu_ps(y + c * ldy + r + i, reduce4(acc[i][c], acc[i + 1][c], acc[i + 2][c], acc[i + 3][c]));
        for (; i < R; i++) y[c * ldy + r + i] = _mm512_reduce_add_ps(acc[i][c]);
    }
}

#define BDP_KERNEL(CC, RR)                                                                            \
    DSV2_TARGET_AVX512BF16 static void bdp_c##CC(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, \
                                                 const uint16_t *W, int64_t K, int64_t r0, int64_t r1) {  \
        int64_t r = r0;                                                                               \
        for (; r + RR <= r1; r += RR) bdp_tile(y, ldy, xb, ldxb, CC, RR, W, K, r);                     \
        for (; r < r1; r++) bdp_tile(y, ldy, xb, ldxb, CC, 1, W, K, r);                                \
    }
BDP_KERNEL(1, 8)
BDP_KERNEL(2, 8)
BDP_KERNEL(3, 6)
BDP_KERNEL(4, 4)
BDP_KERNEL(5, 4)
BDP_KERNEL(6, 4)

typedef void (*bdp_fn)(float *, int64_t, const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, int64_t);
static const bdp_fn bdp_kernels[BDP_MAXC + 1] = {NULL, bdp_c1, bdp_c2, bdp_c3, bdp_c4, bdp_c5, bdp_c6};

// xb [T, K] bf16 (rows ldxb apart), W rows [r0, r1) of bf16 [N, K] -> y [T, N] columns [r0, r1)
static void bf16dp_rows(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, int64_t T, const dsv2_mat *W,
                        int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    const uint16_t *w = (const uint16_t *)W->data;
    for (int64_t t0 = 0; t0 < T;) {
        int64_t c = T - t0 < BDP_MAXC ? T - t0 : BDP_MAXC;
        bdp_kernels[c](y + t0 * ldy, ldy, xb + t0 * ldxb, ldxb, w, W->cols, r0, r1);
        t0 += c;
    }
}

/* ---------------- a whole product, split over the pool ---------------- */

#define BDP_ROWBLK 64 /* weight rows per work item: 64 x K bf16 stay in L2 while the tokens pass */

typedef struct {
    float *y;
    int64_t ldy, T;
    const uint16_t *xb;
    const dsv2_mat *W;
} bdp_job;

static void bdp_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    bdp_job *j = (bdp_job *)ctx;
    for (int64_t blk = b; blk < e; blk++) {
        int64_t r0 = blk * BDP_ROWBLK, r1 = r0 + BDP_ROWBLK < j->W->rows ? r0 + BDP_ROWBLK : j->W->rows;
        bf16dp_rows(j->y, j->ldy, j->xb, j->W->cols, j->T, j->W, r0, r1);
    }
}

typedef struct {
    uint16_t *xb;
    const float *x;
    int64_t ldx, K;
} round_job;

static void round_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    round_job *j = (round_job *)ctx;
    dsv2_round_bf16_rows(j->xb + b * j->K, j->K, j->x + b * j->ldx, j->ldx, e - b, j->K);
}

int dsv2_linear_bf16dp(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T) {
    const int64_t K = W->cols, N = W->rows;
    if (W->dtype != DSV2_BF16 || T < 0 || ldx < K || ldy < N) return DSV2_ERR_ARG;
    if (T == 0 || N == 0) return DSV2_OK;
    uint16_t *xb = (uint16_t *)malloc((size_t)T * (size_t)K * sizeof(uint16_t));
    if (!xb) return DSV2_ERR_NOMEM;
    round_job rj = {xb, x, ldx, K};
    dsv2_parallel_for(T, 16, round_task, &rj);
    bdp_job j = {y, ldy, T, xb, W};
    dsv2_parallel_for((N + BDP_ROWBLK - 1) / BDP_ROWBLK, 1, bdp_task, &j);
    free(xb);
    return DSV2_OK;
}
