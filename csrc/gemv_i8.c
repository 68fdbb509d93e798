/* gemv_i8.c - row-dot kernels for int8 weights with per-block scales
 * (portable, AVX2, AVX-512): y[t, r] = sum_k x[t, k] * (q[r, k] * s[r, k / group]).
 *
 * Weights are dequantized in registers (int8 -> int32 -> fp32, times the
 * block scale: the exact fp32 value of the dequantized weight) and multiplied
 * with the fp32 activations in fp32 FMAs, so the result equals an fp32
 * row-dot with the dequantized weights up to summation order.  Four weight
 * rows are streamed at once; every activation vector loaded is used by all
 * four.  AVX-512 needs group % 16 == 0, AVX2 group % 8 == 0; other groups
 * take the portable loop. */
#include "gemv.h"
#include "cpu.h"

#include <immintrin.h>

/* ---------------- portable ---------------- */
static void i8_portable(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                        int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *q = (const int8_t *)W->data + r * K;
        const float *s = W->scale + r * ng;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t k = 0; k < K; k++) acc[k & 7] += xt[k] * ((float)q[k] * s[k / g]);
            y[t * ldy + r] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

/* ---------------- AVX2 (group % 8 == 0) ---------------- */
DSV2_TARGET_AVX2 static inline float hsum256_i8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

DSV2_TARGET_AVX2 static void i8_avx2(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                                     int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *q = (const int8_t *)W->data + r * K;
        const float *s = W->scale + r * ng;
        __m256 acc[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < ng; b++) {
            const __m256 sv = _mm256_set1_ps(s[b]);
            for (int64_t k = b * g; k < (b + 1) * g; k += 8) {
                __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
                w = _mm256_mul_ps(w, sv);
                for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + k), acc[t]);
            }
        }
        for (int t = 0; t < T; t++) y[t * ldy + r] = hsum256_i8(acc[t]);
    }
}

/* ---------------- AVX-512 (group % 16 == 0) ---------------- */
DSV2_TARGET_AVX512 static inline __m512 deq16(const int8_t *p, __m512 s) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))), s);
}

/* NR (1 or 4) weight rows x T activation rows; T, NR compile-time constants after inlining */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
i8_tile_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const int NR, const dsv2_mat *W,
               int64_t r) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    const int8_t *q[4];
    const float *s[4];
    for (int i = 0; i < NR; i++) {
        q[i] = (const int8_t *)W->data + (r + i) * K;
        s[i] = W->scale + (r + i) * ng;
    }
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NR; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < ng; b++) {
        __m512 sv[4];
        for (int i = 0; i < NR; i++) sv[i] = _mm512_set1_ps(s[i][b]);
        for (int64_t k = b * g; k < (b + 1) * g; k += 16) {
            __m512 w[4];
            for (int i = 0; i < NR; i++) w[i] = deq16(q[i] + k, sv[i]);
            for (int t = 0; t < T; t++) {
                const __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
                for (int i = 0; i < NR; i++) acc[t][i] = _mm512_fmadd_ps(w[i], xv, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NR; i++) y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[t][i]);
}

#define I8_512_T(TT)                                                                              \
    DSV2_TARGET_AVX512 static void i8_avx512_t##TT(float *y, int64_t ldy, const float *x, int64_t ldx, \
                                                   const dsv2_mat *W, int64_t r0, int64_t r1) {   \
        int64_t r = r0;                                                                           \
        for (; r + 4 <= r1; r += 4) i8_tile_avx512(y, ldy, x, ldx, TT, 4, W, r);                  \
        for (; r < r1; r++) i8_tile_avx512(y, ldy, x, ldx, TT, 1, W, r);                          \
    }
I8_512_T(1)
I8_512_T(2)
I8_512_T(3)
I8_512_T(4)

void dsv2_gemv_i8_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                       int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    const int isa = dsv2_isa();
    const int64_t g = W->group;
    for (int t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
        const int tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
        const float *xs = x + t0 * ldx;
        float *ys = y + t0 * ldy;
        if (isa == DSV2_ISA_AVX512 && g % 16 == 0) {
            switch (tt) {
            case 1: i8_avx512_t1(ys, ldy, xs, ldx, W, r0, r1); break;
            case 2: i8_avx512_t2(ys, ldy, xs, ldx, W, r0, r1); break;
            case 3: i8_avx512_t3(ys, ldy, xs, ldx, W, r0, r1); break;
            default: i8_avx512_t4(ys, ldy, xs, ldx, W, r0, r1); break;
            }
        } else if (isa >= DSV2_ISA_AVX2 && g % 8 == 0) {
            i8_avx2(ys, ldy, xs, ldx, tt, W, r0, r1);
        } else {
            i8_portable(ys, ldy, xs, ldx, tt, W, r0, r1);
        }
    }
}
