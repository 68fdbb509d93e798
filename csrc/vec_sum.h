/* vec_sum.h - horizontal sums of AVX-512 accumulators shared by the attention tiles. */
#ifndef DSV2_VEC_SUM_H
#define DSV2_VEC_SUM_H

#include <immintrin.h>

#include "cpu.h"

/* [sum a0, sum a1, sum a2, sum a3] of four 16-lane accumulators as one xmm */
DSV2_TARGET_AVX512 static inline __m128 dsv2_sum4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

#endif
