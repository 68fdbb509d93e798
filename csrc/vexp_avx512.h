/* vexp_avx512.h - exp of 16 fp32 lanes on AVX-512: a Cephes-style range reduction and a
 * degree-6 polynomial (about 1 ulp on the range softmax uses; inputs below -87.3 give ~1e-38
 * instead of 0, NaN propagates).  vexp.c's rows and the bf16 compute mode's attention
 * (mla_bf16dp.c) share it, so that both compute the same softmax weights. */
#ifndef DSV2_VEXP_AVX512_H
#define DSV2_VEXP_AVX512_H

#include "cpu.h"

#include <immintrin.h>

#define DSV2_EXP_HI 88.3762626647949f
#define DSV2_EXP_LO -87.3365447504f
#define DSV2_EXP_LOG2E 1.44269504088896341f
#define DSV2_EXP_C1 0.693359375f
#define DSV2_EXP_C2 -2.12194440e-4f
#define DSV2_EXP_P0 1.9875691500E-4f
#define DSV2_EXP_P1 1.3981999507E-3f
#define DSV2_EXP_P2 8.3334519073E-3f
#define DSV2_EXP_P3 4.1665795894E-2f
#define DSV2_EXP_P4 1.6666665459E-1f
#define DSV2_EXP_P5 5.0000001201E-1f

// x [16] -> exp(x) [16]
DSV2_TARGET_AVX512 static inline __m512 dsv2_exp_avx512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(DSV2_EXP_LO), x);
    x = _mm512_min_ps(_mm512_set1_ps(DSV2_EXP_HI), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(DSV2_EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(DSV2_EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(DSV2_EXP_C2), r);
    __m512 p = _mm512_set1_ps(DSV2_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DSV2_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DSV2_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DSV2_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DSV2_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DSV2_EXP_P5));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

#endif
