/* fp8.h - float8 e4m3fn <-> fp32: scalar, AVX2 and AVX-512 (header only, no state).
 *
 * e4m3fn is torch.float8_e4m3fn and DeepSeek-V3's weight format: 1 sign bit, 4
 * exponent bits (bias 7), 3 mantissa bits; exponent 0 holds the subnormals
 * (multiples of 2^-9); no infinities; S.1111.111 (0x7f, 0xff) is NaN; the largest
 * finite value is 448.  Every code is exact in fp32, and in fp16 once divided by 256.
 *
 * Decode, exact:
 *   dsv2_e4m3_to_f32(code)               scalar (a 256-entry table built at compile time)
 *   dsv2_e4m3x8_to_f32_avx2(b)           8 codes (low 8 bytes of b) -> 8 fp32, NaN included
 *   dsv2_e4m3x16_to_f32_avx512(b)        16 codes -> 16 fp32, NaN included
 * Decode for kernels that fold a factor into a block scale:
 *   dsv2_e4m3x8_div256_avx2 / dsv2_e4m3x16_div256_avx512: value / 256 of each code.
 *   The code is sign-extended to 16 bits, shifted left by 7 and bit 14 cleared: that
 *   is the fp16 bit pattern of value / 256 (e4m3's 4-bit exponent is the low 4 bits
 *   of fp16's 5-bit one, 8 below its bias; subnormals map to fp16 subnormals), and
 *   vcvtph2ps widens it exactly (in hardware, whatever MXCSR's DAZ/FTZ say).  Then
 *   W = (value / 256) * (s * 256) is the correctly rounded fp32 product value * s
 *   when s * 256 is exact, i.e. unless a finite |s| > FLT_MAX / 256
 *   (dsv2_e4m3_scale_foldable).  NaN codes come out as +-1.875 there: such kernels
 *   test the codes with dsv2_e4m3x*_nan_* and overwrite those lanes with NaN.
 * Encode (dsv2_f32_to_e4m3, dsv2_f32x16_to_e4m3_avx512): round to nearest, ties to
 *   even, including the subnormal range; |x| > 448 (Inf included) saturates to +-448;
 *   NaN -> 0x7f | sign.  (torch's .to(float8_e4m3fn) gives the same code for
 *   |x| <= 464 and NaN above.)
 *
 * API kept stable (other kernels include this header). */
#ifndef DSV2_FP8_H
#define DSV2_FP8_H

#include <float.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"

/* ---------------- scalar ---------------- */

/* value of code c (0..255) as a constant expression */
#define DSV2_E4M3_V(c)                                                                        \
    (((c) & 0x7f) == 0x7f ? __builtin_nanf("")                                               \
                          : (((c) & 0x80) ? -1.0f : 1.0f) *                                  \
                                (((c) >> 3 & 15) ? (float)((8 + ((c) & 7)) << ((c) >> 3 & 15)) / 1024.0f \
                                                 : (float)((c) & 7) / 512.0f))
#define DSV2_E4M3_V4(c) DSV2_E4M3_V(c), DSV2_E4M3_V((c) + 1), DSV2_E4M3_V((c) + 2), DSV2_E4M3_V((c) + 3)
#define DSV2_E4M3_V16(c) DSV2_E4M3_V4(c), DSV2_E4M3_V4((c) + 4), DSV2_E4M3_V4((c) + 8), DSV2_E4M3_V4((c) + 12)
#define DSV2_E4M3_V64(c) DSV2_E4M3_V16(c), DSV2_E4M3_V16((c) + 16), DSV2_E4M3_V16((c) + 32), DSV2_E4M3_V16((c) + 48)

/* the value of every code (exact; NaN for 0x7f and 0xff) */
static const float dsv2_e4m3_table[256] __attribute__((unused, aligned(64))) = {
    DSV2_E4M3_V64(0), DSV2_E4M3_V64(64), DSV2_E4M3_V64(128), DSV2_E4M3_V64(192)};

static inline float dsv2_e4m3_to_f32(uint8_t c) {
    return dsv2_e4m3_table[c];
}

/* fp32 -> e4m3fn code: round to nearest even, saturating to +-448, NaN -> 0x7f | sign.
 * Integer arithmetic only (independent of the FPU rounding mode). */
static inline uint8_t dsv2_f32_to_e4m3(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return (uint8_t)(sign | 0x7f); /* NaN */
    uint32_t code;
    if (u >= 0x3c800000u) {
        /* >= 2^-6: keep 3 mantissa bits with round-half-even, rebias the exponent (127 -> 7);
         * a carry out of the mantissa moves to the next binade as it should */
        code = ((u + 0x7ffffu + ((u >> 20) & 1u)) >> 20) - (120u << 3);
    } else {
        /* subnormal e4m3: code = |x| * 2^9 rounded half to even (|x| < 2^-12 gives 0) */
        const uint32_t e = u >> 23;
        if (e < 115) {
            code = 0;
        } else {
            const uint32_t m = (u & 0x7fffffu) | 0x800000u, s = 141 - e; /* |x| * 2^9 = m >> s */
            const uint32_t q = m >> s, r = m & ((1u << s) - 1u), half = 1u << (s - 1);
            code = q + (r > half || (r == half && (q & 1u)));
        }
    }
    if (code > 0x7e) code = 0x7e; /* saturate to 448 (Inf included) */
    return (uint8_t)(sign | code);
}

/* 1 when (value / 256) * (s * 256) is the correctly rounded value * s for every code:
 * s * 256 exact (no overflow).  Non-finite s give the same non-finite results either way. */
static inline int dsv2_e4m3_scale_foldable(float s) {
    const float a = s < 0 ? -s : s;
    return !(a > FLT_MAX / 256.0f && a <= FLT_MAX);
}

/* ---------------- AVX2 (F16C) ---------------- */

/* 8 codes (the low 8 bytes of b) -> value / 256 (NaN codes: +-1.875) */
DSV2_TARGET_AVX2 static inline __m256 dsv2_e4m3x8_div256_avx2(__m128i b) {
    __m128i h = _mm_cvtepi8_epi16(b);
    h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16((short)0xbfff));
    return _mm256_cvtph_ps(h);
}

/* all-ones 32-bit lanes where the 8 codes (low 8 bytes of b) are NaN: OR it into the
 * fp32 weights (0xffffffff is a NaN) */
DSV2_TARGET_AVX2 static inline __m256 dsv2_e4m3x8_nan_avx2(__m128i b) {
    const __m128i n = _mm_cmpeq_epi8(_mm_or_si128(b, _mm_set1_epi8((char)0x80)), _mm_set1_epi8((char)0xff));
    return _mm256_castsi256_ps(_mm256_cvtepi8_epi32(n));
}

/* 1 when any of the 32 codes of v is NaN */
DSV2_TARGET_AVX2 static inline int dsv2_e4m3x32_any_nan_avx2(__m256i v) {
    const __m256i n = _mm256_cmpeq_epi8(_mm256_or_si256(v, _mm256_set1_epi8((char)0x80)), _mm256_set1_epi8((char)0xff));
    return _mm256_movemask_epi8(n) != 0;
}

/* 8 codes (low 8 bytes of b) -> their exact fp32 values */
DSV2_TARGET_AVX2 static inline __m256 dsv2_e4m3x8_to_f32_avx2(__m128i b) {
    const __m256 v = _mm256_mul_ps(dsv2_e4m3x8_div256_avx2(b), _mm256_set1_ps(256.0f));
    return _mm256_or_ps(v, dsv2_e4m3x8_nan_avx2(b));
}

/* ---------------- AVX-512 ---------------- */

/* 16 codes -> value / 256 (NaN codes: +-1.875) */
DSV2_TARGET_AVX512 static inline __m512 dsv2_e4m3x16_div256_avx512(__m128i b) {
    __m256i h = _mm256_cvtepi8_epi16(b);
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xbfff));
    return _mm512_cvtph_ps(h);
}

/* lanes of NaN codes, 16 / 64 codes */
DSV2_TARGET_AVX512 static inline __mmask16 dsv2_e4m3x16_nan_avx512(__m128i b) {
    return _mm_cmpeq_epi8_mask(_mm_or_si128(b, _mm_set1_epi8((char)0x80)), _mm_set1_epi8((char)0xff));
}

DSV2_TARGET_AVX512 static inline __mmask64 dsv2_e4m3x64_nan_avx512(__m512i v) {
    return _mm512_cmpeq_epi8_mask(_mm512_or_si512(v, _mm512_set1_epi8((char)0x80)), _mm512_set1_epi8((char)0xff));
}

/* 16 codes -> their exact fp32 values */
DSV2_TARGET_AVX512 static inline __m512 dsv2_e4m3x16_to_f32_avx512(__m128i b) {
    const __m512 v = _mm512_mul_ps(dsv2_e4m3x16_div256_avx512(b), _mm512_set1_ps(256.0f));
    return _mm512_mask_mov_ps(v, dsv2_e4m3x16_nan_avx512(b), _mm512_set1_ps(__builtin_nanf("")));
}

/* 16 fp32 -> 16 codes, as dsv2_f32_to_e4m3 */
DSV2_TARGET_AVX512 static inline __m128i dsv2_f32x16_to_e4m3_avx512(__m512 x) {
    const __m512i u0 = _mm512_castps_si512(x);
    const __m512i sign = _mm512_srli_epi32(_mm512_and_si512(u0, _mm512_set1_epi32((int)0x80000000u)), 24);
    const __m512i u = _mm512_and_si512(u0, _mm512_set1_epi32(0x7fffffff));
    /* normal range: as the scalar code */
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1));
    __m512i normal = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7ffff)));
    normal = _mm512_sub_epi32(_mm512_srli_epi32(normal, 20), _mm512_set1_epi32(120 << 3));
    /* subnormal range: |x| * 2^9 (exact) rounded half to even */
    const __m512 sc = _mm512_mul_ps(_mm512_castsi512_ps(u), _mm512_set1_ps(512.0f));
    const __m512i sub = _mm512_cvt_roundps_epi32(sc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 is_sub = _mm512_cmplt_epu32_mask(u, _mm512_set1_epi32(0x3c800000));
    __m512i code = _mm512_mask_mov_epi32(normal, is_sub, sub);
    code = _mm512_min_epu32(code, _mm512_set1_epi32(0x7e));
    const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(u, _mm512_set1_epi32(0x7f800000));
    code = _mm512_mask_mov_epi32(code, is_nan, _mm512_set1_epi32(0x7f));
    return _mm512_cvtepi32_epi8(_mm512_or_si512(code, sign));
}

#endif
