/* bf16_vec.h - fp32 -> bf16 round to nearest even on AVX-512 registers (the
 * activation rounding of the bf16 compute mode, shared by its kernels). */
#ifndef DSV2_BF16_VEC_H
#define DSV2_BF16_VEC_H

#include "cpu.h"

#include <immintrin.h>

// u: 16 fp32 bit patterns -> their nearest-even bf16 patterns in the high 16 bits (NaN kept quiet)
DSV2_TARGET_AVX512 static inline __m512i dsv2_bf16_rne_hi_avx512(__m512i u) {
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, absmask), inf);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
}

#endif
