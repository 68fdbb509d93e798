/* gemv_eo.c - row dots of bf16 weights against activations in the "even|odd" layout (AVX-512). */
#include "gemv_eo.h"
#include "gemv.h"
#include "cpu.h"
#include "threadpool.h"

#include <immintrin.h>
#include <string.h>

int dsv2_eo_usable(const dsv2_mat *W) {
    return W->dtype == DSV2_BF16 && dsv2_isa() == DSV2_ISA_AVX512;
}

DSV2_TARGET_AVX512 static void eo_permute_avx512(float *x, int64_t K) {
    const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int64_t k = 0; k + 32 <= K; k += 32) {
        const __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
        _mm512_storeu_ps(x + k, _mm512_permutex2var_ps(a, ie, b));
        _mm512_storeu_ps(x + k + 16, _mm512_permutex2var_ps(a, io, b));
    }
}

static void eo_permute_portable(float *x, int64_t K) {
    float t[32];
    for (int64_t k = 0; k + 32 <= K; k += 32) {
        for (int j = 0; j < 16; j++) t[j] = x[k + 2 * j], t[16 + j] = x[k + 2 * j + 1];
        memcpy(x + k, t, sizeof t);
    }
}


typedef struct {
    float *xp;
    const float *x;
    int64_t ldxp, ldx, K;
    int avx512;
} copy_job;

static void copy_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    copy_job *j = (copy_job *)ctx;
    for (int64_t t = b; t < e; t++) {
        if (j->xp != j->x || j->ldxp != j->ldx) memcpy(j->xp + t * j->ldxp, j->x + t * j->ldx, (size_t)j->K * sizeof(float));
        if (j->avx512) eo_permute_avx512(j->xp + t * j->ldxp, j->K);
        else eo_permute_portable(j->xp + t * j->ldxp, j->K);
    }
}

void dsv2_eo_copy_permute(float *xp, int64_t ldxp, const float *x, int64_t ldx, int64_t T, int64_t K) {
    copy_job j = {xp, x, ldxp, ldx, K, dsv2_isa() == DSV2_ISA_AVX512};
    int64_t grain = (int64_t)(1 << 16) / (K > 0 ? K : 1);
    dsv2_parallel_for(T, grain < 1 ? 1 : grain, copy_task, &j);
}

/* Tiles of R weight rows x C activation rows (R * C <= 24 accumulators, plus
 * 2R widened weight vectors and two activation vectors in registers):
 * 1-2 tokens x 6 rows, 3 x 5, 4-5 x 4; T tokens go in passes of 4 (a first
 * pass of 5 when T % 4 == 1), as the plain kernels in expert_mlp.c. */

#define EO_MAXR 6
#define EO_MAXC 5

DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
eo_tile_avx512(float *y, int64_t ldy, const float *xp, int64_t ldx, const int C, const int R, const dsv2_mat *W,
               int64_t r) {
    const int64_t K = W->cols, K32 = K & ~(int64_t)31;
    const uint16_t *wr = (const uint16_t *)W->data + r * K;
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[EO_MAXR][EO_MAXC];
    for (int i = 0; i < R; i++)
        for (int c = 0; c < C; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
        __m512 we[EO_MAXR], wo[EO_MAXR];
        for (int i = 0; i < R; i++) {
            const __m512i v = _mm512_loadu_si512((const void *)(wr + i * K + k));
            we[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[i] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        }
        for (int c = 0; c < C; c++) {
            const __m512 xe = _mm512_loadu_ps(xp + c * ldx + k), xo = _mm512_loadu_ps(xp + c * ldx + k + 16);
            for (int i = 0; i < R; i++) acc[i][c] = _mm512_fmadd_ps(we[i], xe, acc[i][c]);
            for (int i = 0; i < R; i++) acc[i][c] = _mm512_fmadd_ps(wo[i], xo, acc[i][c]);
        }
    }
    for (int64_t k = K32; k < K; k += 16) { /* the tail, in place */
        const __mmask16 m = (K - k >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        __m512 w[EO_MAXR];
        for (int i = 0; i < R; i++)
            w[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, wr + i * K + k)), 16));
        for (int c = 0; c < C; c++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, xp + c * ldx + k);
            for (int i = 0; i < R; i++) acc[i][c] = _mm512_fmadd_ps(w[i], xv, acc[i][c]);
        }
    }
    for (int c = 0; c < C; c++)
        for (int i = 0; i < R; i++) y[c * ldy + r + i] = _mm512_reduce_add_ps(acc[i][c]);
}

#define EO_KERNEL(CC, RR)                                                                          \
    DSV2_TARGET_AVX512 static void eo_avx512_c##CC(float *y, int64_t ldy, const float *xp, int64_t ldx, \
                                                   const dsv2_mat *W, int64_t r0, int64_t r1) {      \
        int64_t r = r0;                                                                            \
        for (; r + RR <= r1; r += RR) eo_tile_avx512(y, ldy, xp, ldx, CC, RR, W, r);               \
        for (; r < r1; r++) eo_tile_avx512(y, ldy, xp, ldx, CC, 1, W, r);                          \
    }
EO_KERNEL(1, 6)
EO_KERNEL(2, 6)
EO_KERNEL(3, 5)
EO_KERNEL(4, 4)
EO_KERNEL(5, 4)

typedef void (*eo_fn)(float *, int64_t, const float *, int64_t, const dsv2_mat *, int64_t, int64_t);
static const eo_fn eo_avx512[EO_MAXC + 1] = {NULL, eo_avx512_c1, eo_avx512_c2, eo_avx512_c3, eo_avx512_c4,
                                              eo_avx512_c5};

/* xp [T, K] in the even|odd layout (rows ldx apart), W bf16 with dsv2_eo_usable(W) */
void dsv2_gemv_eo_rows(float *y, int64_t ldy, const float *xp, int64_t ldx, int64_t T, const dsv2_mat *W,
                        int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    for (int64_t t0 = 0; t0 < T;) {
        const int64_t c = dsv2_tile_pass(T - t0);
        eo_avx512[c](y + t0 * ldy, ldy, xp + t0 * ldx, ldx, W, r0, r1);
        t0 += c;
    }
}

void dsv2_gemv_eo_rows_blocked(float *y, int64_t ldy, const float *xp, int64_t ldx, int64_t T, const dsv2_mat *W,
                               int64_t r0, int64_t r1) {
    const int64_t K = W->cols;
    /* a block of weight rows (~384 KiB of bf16) meets every group of activation rows
     * (~256 KiB of fp32) while both sit in L2, instead of the whole row range streaming
     * past every 4-token pass */
    int64_t rb = ((int64_t)384 << 10) / (2 * K), tg = ((int64_t)256 << 10) / (4 * K);
    rb = rb < 4 ? 4 : (rb > 64 ? 64 : rb / 4 * 4);
    tg = tg < 4 ? 4 : (tg > 16 ? 16 : tg);
    for (int64_t b = r0; b < r1; b += rb) {
        const int64_t e = r1 - b < rb ? r1 : b + rb;
        for (int64_t t0 = 0; t0 < T; t0 += tg) {
            const int64_t tt = T - t0 < tg ? T - t0 : tg;
            dsv2_gemv_eo_rows(y + t0 * ldy, ldy, xp + t0 * ldx, ldx, tt, W, b, e);
        }
    }
}
