/* vexp.c - exp / max / scale over rows of floats, ISA picked at run time. */
#include "vexp.h"
#include "cpu.h"
#include "vexp_avx512.h"

#include <immintrin.h>
#include <math.h>

#define EXP_HI DSV2_EXP_HI
#define EXP_LO DSV2_EXP_LO
#define LOG2E DSV2_EXP_LOG2E
#define C1 DSV2_EXP_C1
#define C2 DSV2_EXP_C2
#define P0 DSV2_EXP_P0
#define P1 DSV2_EXP_P1
#define P2 DSV2_EXP_P2
#define P3 DSV2_EXP_P3
#define P4 DSV2_EXP_P4
#define P5 DSV2_EXP_P5

/* ---------------- portable ---------------- */
static inline float exp_scalar(float x) {
    /* comparisons are false for NaN, so NaN passes through */
    if (x > EXP_HI) x = EXP_HI;
    if (x < EXP_LO) x = EXP_LO;
    float n = nearbyintf(x * LOG2E);
    float r = x - n * C1;
    r = r - n * C2;
    float p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    float y = p * (r * r) + r + 1.0f;
    return ldexpf(y, (int)n);
}

static float max_portable(const float *x, int64_t n) {
    float m = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > m || x[i] != x[i]) m = x[i];
    return m;
}

static float exp_sum_portable(float *x, int64_t n, float scale, float shift) {
    float acc[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; k++) {
            float e = exp_scalar(x[i + k] * scale - shift);
            x[i + k] = e;
            acc[k] += e;
        }
    for (; i < n; i++) {
        float e = exp_scalar(x[i] * scale - shift);
        x[i] = e;
        acc[0] += e;
    }
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

/* ---------------- AVX2 ---------------- */
DSV2_TARGET_AVX2 static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), x); /* NaN in x -> x */
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C2), r);
    __m256 p = _mm256_set1_ps(P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

DSV2_TARGET_AVX2 static float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

DSV2_TARGET_AVX2 static float exp_sum_avx2(float *x, int64_t n, float scale, float shift) {
    const __m256 vs = _mm256_set1_ps(scale), vsh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), vsh));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = hsum8(acc);
    for (; i < n; i++) {
        float e = exp_scalar(x[i] * scale - shift);
        x[i] = e;
        s += e;
    }
    return s;
}

/* ---------------- AVX-512 ---------------- */

DSV2_TARGET_AVX512 static float exp_sum_avx512(float *x, int64_t n, float scale, float shift) {
    const __m512 vs = _mm512_set1_ps(scale), vsh = _mm512_set1_ps(shift);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = dsv2_exp_avx512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs), vsh));
        _mm512_mask_storeu_ps(x + i, m, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
    }
    return _mm512_reduce_add_ps(acc);
}

DSV2_TARGET_AVX512 static float max_avx512(const float *x, int64_t n) {
    __m512 m = _mm512_set1_ps(x[0]);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_mask_loadu_ps(m, k, x + i); /* masked lanes keep m */
        m = _mm512_max_ps(m, v);                     /* NaN in v -> v */
    }
    return _mm512_reduce_max_ps(m);
}

float dsv2_vmax(const float *x, int64_t n) {
    if (dsv2_isa() == DSV2_ISA_AVX512) return max_avx512(x, n);
    return max_portable(x, n);
}

float dsv2_vexp_shift_sum(float *x, int64_t n, float scale, float shift) {
    if (n <= 0) return 0.0f;
    int isa = dsv2_isa();
    if (isa == DSV2_ISA_AVX512) return exp_sum_avx512(x, n, scale, shift);
    if (isa == DSV2_ISA_AVX2) return exp_sum_avx2(x, n, scale, shift);
    return exp_sum_portable(x, n, scale, shift);
}

void dsv2_vscale(float *x, int64_t n, float a) {
    for (int64_t i = 0; i < n; i++) x[i] *= a;
}
