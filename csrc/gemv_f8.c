/* gemv_f8.c - row dots and widening of float8 e4m3fn weights with 2-D block
 * scales (portable, AVX2, AVX-512).
 *
 * In registers a weight is (value / 256) * (scale * 256): the codes widen through
 * their fp16 bit pattern (fp8.h) and the factor 256 rides on the block's scale, so
 * one multiply gives the correctly rounded fp32 product e4m3(q) * scale; NaN codes
 * are found 64 (AVX-512) or 8 (AVX2) codes at a time and their lanes set to NaN.
 * Weight rows are streamed one after the other (one sequential stream per thread,
 * as in gemv.c, with the same optional software prefetch, cpu.h); long activation
 * rows use 4-row tiles (DSV2_GEMV_TILE_XBYTES).
 * Where the CPU has AVX-512 VBMI, decode (few activation rows) takes the byte-table
 * kernels below instead (columns in blocks of a multiple of 64; see the VBMI section).
 * AVX-512 needs group % 16 == 0, AVX2 group % 8 == 0, and scales whose fold by 256
 * is exact (dsv2_e4m3_scale_foldable: every scale below FLT_MAX / 256, e.g. all
 * scales amax / 448 of a quantizer); other matrices take the portable loop (the
 * 256-entry table times the scale). */
#include "gemv_f8.h"
#include "gemv.h"
#include "cpu.h"
#include "fp8.h"

#include <immintrin.h>
#include <math.h>

int dsv2_f8_scales_foldable(const dsv2_mat *W, int64_t r0, int64_t r1) {
    const float *s = dsv2_f8_scale_row(W, r0), *e = dsv2_f8_scale_row(W, r1 - 1) + dsv2_f8_scale_cols(W);
    for (; s < e; s++)
        if (!dsv2_e4m3_scale_foldable(*s)) return 0;
    return 1;
}

/* ---------------- portable ---------------- */
static void f8_portable(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W, int64_t r0,
                        int64_t r1) {
    const int64_t K = W->cols, g = W->group;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = (const uint8_t *)W->data + r * K;
        const float *s = dsv2_f8_scale_row(W, r);
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t k0 = 0, b = 0; k0 < K; k0 += g, b++)
                for (int64_t k = k0; k < k0 + g && k < K; k++) acc[k & 7] += xt[k] * (dsv2_e4m3_to_f32(q[k]) * s[b]);
            y[t * ldy + r] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

static void dequant_portable(float *out, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group;
    const uint8_t *q = (const uint8_t *)W->data + r * K;
    const float *s = dsv2_f8_scale_row(W, r);
    for (int64_t k = 0; k < K; k++) out[k] = dsv2_e4m3_to_f32(q[k]) * s[k / g];
}

/* ---------------- AVX2 (group % 8 == 0) ---------------- */
/* 8 weights at q (scale * 256 in s256) */
DSV2_TARGET_AVX2 static inline __m256 f8w8_avx2(const uint8_t *q, __m256 s256) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)q);
    return _mm256_or_ps(_mm256_mul_ps(dsv2_e4m3x8_div256_avx2(b), s256), dsv2_e4m3x8_nan_avx2(b));
}

DSV2_TARGET_AVX2 static void f8_avx2(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                                     int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, K8 = K & ~(int64_t)7;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *q = (const uint8_t *)W->data + r * K;
        const float *s = dsv2_f8_scale_row(W, r);
        __m256 acc[DSV2_GEMV_MAX_T][2];
        for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        int j = 0;
        for (int64_t k0 = 0, b = 0; k0 < K8; k0 += g, b++) {
            const __m256 sv = _mm256_set1_ps(s[b] * 256.0f);
            const int64_t k1 = k0 + g < K8 ? k0 + g : K8;
            for (int64_t k = k0; k < k1; k += 8, j ^= 1) {
                const __m256 w = f8w8_avx2(q + k, sv);
                for (int t = 0; t < T; t++) acc[t][j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + k), acc[t][j]);
            }
        }
        for (int t = 0; t < T; t++) {
            float v = dsv2_hsum256(_mm256_add_ps(acc[t][0], acc[t][1]));
            for (int64_t k = K8; k < K; k++) v += x[t * ldx + k] * (dsv2_e4m3_to_f32(q[k]) * s[k / g]);
            y[t * ldy + r] = v;
        }
    }
}

DSV2_TARGET_AVX2 static void dequant_avx2(float *out, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group, K8 = K & ~(int64_t)7;
    const uint8_t *q = (const uint8_t *)W->data + r * K;
    const float *s = dsv2_f8_scale_row(W, r);
    for (int64_t k0 = 0, b = 0; k0 < K8; k0 += g, b++) {
        const __m256 sv = _mm256_set1_ps(s[b] * 256.0f);
        for (int64_t k = k0; k < k0 + g && k < K8; k += 8) _mm256_storeu_ps(out + k, f8w8_avx2(q + k, sv));
    }
    for (int64_t k = K8; k < K; k++) out[k] = dsv2_e4m3_to_f32(q[k]) * s[k / g];
}

/* ---------------- AVX-512 (group % 16 == 0) ---------------- */
/* 16 weights from 16 codes (scale * 256 in s256), NaN lanes not yet set */
DSV2_TARGET_AVX512 static inline __m512 f8w16(__m128i b, __m512 s256) {
    return _mm512_mul_ps(dsv2_e4m3x16_div256_avx512(b), s256);
}

DSV2_TARGET_AVX512 static inline __m512 nan_lanes(__m512 w, __mmask16 m) {
    return _mm512_mask_mov_ps(w, m, _mm512_set1_ps(NAN));
}

static inline __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* One weight row x T activation rows (T a compile-time constant after inlining),
 * scale block by scale block; within a block 64 columns a step (one NaN test of the
 * 64 codes, four partial sums per activation row), then 16 (block widths that are not
 * multiples of 64, and the matrix's last, possibly partial, 16 columns). */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
f8_row_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group;
    const uint8_t *q = (const uint8_t *)W->data + r * K;
    const float *s = dsv2_f8_scale_row(W, r);
    const int pf = dsv2_prefetch_for(DSV2_PF_F8);
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += g, b++) {
        const int64_t k1 = k0 + g < K ? k0 + g : K;
        const __m512 sv = _mm512_set1_ps(s[b] * 256.0f);
        int64_t k = k0;
        for (; k + 64 <= k1; k += 64) {
            DSV2_PREFETCH_AHEAD(q + k, 64, pf);
            const __mmask64 nan = dsv2_e4m3x64_nan_avx512(_mm512_loadu_si512((const void *)(q + k)));
            __m512 w0 = f8w16(_mm_loadu_si128((const __m128i *)(q + k)), sv);
            __m512 w1 = f8w16(_mm_loadu_si128((const __m128i *)(q + k + 16)), sv);
            __m512 w2 = f8w16(_mm_loadu_si128((const __m128i *)(q + k + 32)), sv);
            __m512 w3 = f8w16(_mm_loadu_si128((const __m128i *)(q + k + 48)), sv);
            if (__builtin_expect(nan != 0, 0)) {
                w0 = nan_lanes(w0, (__mmask16)nan);
                w1 = nan_lanes(w1, (__mmask16)(nan >> 16));
                w2 = nan_lanes(w2, (__mmask16)(nan >> 32));
                w3 = nan_lanes(w3, (__mmask16)(nan >> 48));
            }
            for (int t = 0; t < T; t++) {
                const float *xt = x + t * ldx + k;
                acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), acc[t][1]);
                acc[t][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xt + 32), acc[t][2]);
                acc[t][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xt + 48), acc[t][3]);
            }
        }
        for (; k < k1; k += 16) {
            const __mmask16 m = tail16(K - k);
            const __m128i c = _mm_maskz_loadu_epi8(m, q + k);
            const __m512 w = nan_lanes(f8w16(c, sv), dsv2_e4m3x16_nan_avx512(c));
            for (int t = 0; t < T; t++) acc[t][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * ldx + k), acc[t][0]);
        }
    }
    for (int t = 0; t < T; t++)
        y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),
                                                            _mm512_add_ps(acc[t][2], acc[t][3])));
}

/* 4 weight rows x T activation rows (long activation rows, see gemv.h): every
 * activation vector loaded serves four weight rows; each row has its own scales
 * (the four rows may straddle a block of rows). */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
f8_tile_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group;
    const uint8_t *q[4];
    const float *s[4];
    const int pf = dsv2_prefetch_for(DSV2_PF_F8);
    for (int i = 0; i < 4; i++) {
        q[i] = (const uint8_t *)W->data + (r + i) * K;
        s[i] = dsv2_f8_scale_row(W, r + i);
    }
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += g, b++) {
        const int64_t k1 = k0 + g < K ? k0 + g : K;
        __m512 sv[4];
        for (int i = 0; i < 4; i++) sv[i] = _mm512_set1_ps(s[i][b] * 256.0f);
        int64_t k = k0;
        for (; k + 64 <= k1; k += 64) { /* one NaN test of 64 codes per row, then 16 columns at a time */
            __mmask64 nan[4];
            for (int i = 0; i < 4; i++) {
                DSV2_PREFETCH_AHEAD(q[i] + k, 64, pf);
                nan[i] = dsv2_e4m3x64_nan_avx512(_mm512_loadu_si512((const void *)(q[i] + k)));
            }
            const int any = (nan[0] | nan[1] | nan[2] | nan[3]) != 0;
            for (int j = 0; j < 4; j++) {
                __m512 w[4];
                for (int i = 0; i < 4; i++) {
                    w[i] = f8w16(_mm_loadu_si128((const __m128i *)(q[i] + k + 16 * j)), sv[i]);
                    if (__builtin_expect(any, 0)) w[i] = nan_lanes(w[i], (__mmask16)(nan[i] >> (16 * j)));
                }
                for (int t = 0; t < T; t++) {
                    const __m512 xv = _mm512_loadu_ps(x + t * ldx + k + 16 * j);
                    for (int i = 0; i < 4; i++) acc[t][i] = _mm512_fmadd_ps(w[i], xv, acc[t][i]);
                }
            }
        }
        for (; k < k1; k += 16) {
            const __mmask16 m = tail16(K - k);
            __m512 w[4];
            for (int i = 0; i < 4; i++) {
                const __m128i c = _mm_maskz_loadu_epi8(m, q[i] + k);
                w[i] = nan_lanes(f8w16(c, sv[i]), dsv2_e4m3x16_nan_avx512(c));
            }
            for (int t = 0; t < T; t++) {
                const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
                for (int i = 0; i < 4; i++) acc[t][i] = _mm512_fmadd_ps(w[i], xv, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[t][i]);
}

#define F8_512_T(TT)                                                                              \
    DSV2_TARGET_AVX512 static void f8_avx512_t##TT(float *y, int64_t ldy, const float *x, int64_t ldx, \
                                                   const dsv2_mat *W, int64_t r0, int64_t r1) {   \
        int64_t r = r0;                                                                           \
        if ((TT) * W->cols * 4 > DSV2_GEMV_TILE_XBYTES)                                           \
            for (; r + 4 <= r1; r += 4) f8_tile_avx512(y, ldy, x, ldx, TT, W, r);                 \
        for (; r < r1; r++) f8_row_avx512(y, ldy, x, ldx, TT, W, r);                              \
    }
F8_512_T(1)
F8_512_T(2)
F8_512_T(3)
F8_512_T(4)

DSV2_TARGET_AVX512 static void dequant_avx512(float *out, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group;
    const uint8_t *q = (const uint8_t *)W->data + r * K;
    const float *s = dsv2_f8_scale_row(W, r);
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += g, b++) {
        const __m512 sv = _mm512_set1_ps(s[b] * 256.0f);
        for (int64_t k = k0; k < k0 + g && k < K; k += 16) {
            const __mmask16 m = tail16(K - k);
            const __m128i c = _mm_maskz_loadu_epi8(m, q + k);
            _mm512_mask_storeu_ps(out + k, m, nan_lanes(f8w16(c, sv), dsv2_e4m3x16_nan_avx512(c)));
        }
    }
}

/* ---------------- AVX-512 VBMI (decode) ----------------
 * 64 codes a step become 4 x 16 exact fp32 values with two byte-table lookups
 * (vpermi2b over 128 entries: the high and the low byte of each magnitude's bf16
 * pattern; an e4m3 value has at most 4 significant bits, so its bf16 pattern is
 * exact, NaN codes give a bf16 NaN, subnormals their exact value), the sign bit
 * ORed into the high byte, the bytes interleaved into bf16 words and the words
 * widened to fp32 by a shift or a mask: 13 vector ops per 64 weights instead of 24
 * (+ a NaN test) for the fp16 route above.  The widening leaves the 64 columns in a
 * fixed order (f8p_col), so the activations are prepared once per call in that
 * order (dsv2_f8p_prepare; the last K % 64 columns stay in place).  The scale of a
 * block of `group` columns multiplies the block's partial sums (two per activation
 * row) once: y = sum_b scale_b * sum_{c in b} e4m3(q_c) x_c, the fp32 dot product of
 * the dequantized row with x up to rounding and summation order. */

/* bf16 pattern of each e4m3 magnitude code 0..127: high bytes, low bytes */
static const uint8_t F8_BF16_HI[128] = {
    0x00, 0x3b, 0x3b, 0x3b, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c,
    0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d,
    0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e,
    0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f,
    0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40,
    0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41,
    0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42,
    0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x7f};
static const uint8_t F8_BF16_LO[128] = {
    0x00, 0x00, 0x80, 0xc0, 0x00, 0x20, 0x40, 0x60, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xc0};

/* column (0..63 in its step of 64) of lane d of the step's widened vector v */
static inline int f8p_col(int v, int d) { return 16 * (d >> 2) + 8 * (v >> 1) + 2 * (d & 3) + (v & 1); }

int dsv2_f8p_usable(const dsv2_mat *W) {
    return W->dtype == DSV2_F8E4M3 && W->group % 64 == 0 && W->cols >= 64 && dsv2_cpu_has_avx512vbmi();
}

typedef struct {
    __m512i hi0, hi1, lo0, lo1;
} f8_tables;

DSV2_TARGET_AVX512VBMI static inline f8_tables f8_tables_load(void) {
    f8_tables tb;
    tb.hi0 = _mm512_loadu_si512((const void *)F8_BF16_HI);
    tb.hi1 = _mm512_loadu_si512((const void *)(F8_BF16_HI + 64));
    tb.lo0 = _mm512_loadu_si512((const void *)F8_BF16_LO);
    tb.lo1 = _mm512_loadu_si512((const void *)(F8_BF16_LO + 64));
    return tb;
}

/* 64 codes -> w[0..3], 16 fp32 values each, columns in f8p_col order */
DSV2_TARGET_AVX512VBMI static inline __attribute__((always_inline)) void f8x64_vbmi(__m512 w[4], __m512i c,
                                                                                 const f8_tables *tb) {
    const __m512i lo = _mm512_permutex2var_epi8(tb->lo0, c, tb->lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(tb->hi0, c, tb->hi1), c,
                                                 _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (c & 0x80) */
    const __m512i u0 = _mm512_unpacklo_epi8(lo, hi), u1 = _mm512_unpackhi_epi8(lo, hi);
    const __m512i m = _mm512_set1_epi32((int)0xFFFF0000u);
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(u0, 16));
    w[1] = _mm512_castsi512_ps(_mm512_and_si512(u0, m));
    w[2] = _mm512_castsi512_ps(_mm512_slli_epi32(u1, 16));
    w[3] = _mm512_castsi512_ps(_mm512_and_si512(u1, m));
}

DSV2_TARGET_AVX512 static void f8p_prepare_512(float *xp, const float *x, int64_t ldx, int64_t T, int64_t K) {
    const int64_t K64 = K & ~(int64_t)63;
    __m512i idx[4];
    for (int v = 0; v < 4; v++) {
        int32_t ix[16];
        for (int d = 0; d < 16; d++) ix[d] = f8p_col(v, d);
        idx[v] = _mm512_loadu_si512((const void *)ix);
    }
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * ldx;
        float *o = xp + t * K;
        for (int64_t k = 0; k < K64; k += 64)
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(o + k + 16 * v, _mm512_i32gather_ps(idx[v], xt + k, 4));
        for (int64_t k = K64; k < K; k++) o[k] = xt[k];
    }
}

void dsv2_f8p_prepare(float *xp, const float *x, int64_t ldx, int64_t T, int64_t K) {
    if (dsv2_isa() == DSV2_ISA_AVX512) {
        f8p_prepare_512(xp, x, ldx, T, K);
        return;
    }
    const int64_t K64 = K & ~(int64_t)63;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++)
            xp[t * K + k] = x[t * ldx + (k < K64 ? (k & ~(int64_t)63) + f8p_col((int)(k & 63) >> 4, (int)(k & 15)) : k)];
}

/* the last K - K64 columns of row r (natural order, each weight scaled) added to v[t] */
DSV2_TARGET_AVX512 static inline void f8p_tail(float *v, const float *xp, int T, const dsv2_mat *W, int64_t r,
                                               int64_t K64) {
    const int64_t K = W->cols, g = W->group;
    const uint8_t *q = (const uint8_t *)W->data + r * K;
    const float *s = dsv2_f8_scale_row(W, r);
    for (int64_t k = K64; k < K; k += 16) {
        const __mmask16 m = tail16(K - k);
        const __m128i c = _mm_maskz_loadu_epi8(m, q + k);
        const __m512 w = _mm512_mul_ps(dsv2_e4m3x16_to_f32_avx512(c), _mm512_set1_ps(s[k / g]));
        for (int t = 0; t < T; t++) v[t] += _mm512_reduce_add_ps(_mm512_mul_ps(w, _mm512_maskz_loadu_ps(m, xp + t * K + k)));
    }
}

/* ---- scaled codes: the VBMI kernels' fast path ----
 * The fp32 number with a code's sign at bit 31 and its 7 magnitude bits at bits 26..20 is
 * e4m3(q) * 2^-120 exactly for every code but the NaN codes: the e4m3 exponent field lands at
 * the bottom of fp32's (bias 127 = 7 + 120) and e4m3 subnormals become fp32 subnormals.  With
 * the activations of the whole steps scaled by 2^120 (exact while every |x| < 256),
 * fma(e4m3(q) * 2^-120, x * 2^120, s) is fma(e4m3(q), x, s) bit for bit (the same exact
 * product, one rounding), so the scaled codes give the bits of the byte tables, whatever the
 * rows' split: each row keeps its sums (two per activation row where it runs alone, one in a
 * 4-row tile), added in the same order.  The widening takes 3 shifts, 2 ands and 4
 * unpacks per 64 codes (+ 2 ops for the NaN test) instead of 2 vpermi2b, a vpternlogd and 6
 * more; on Zen 4 vpermi2b and vpternlogd compete with the FMAs for their pipes, and one thread
 * decodes ~1.25x the weights per second (K = 2048, rows in L2).  Rows go 2 at a time (4 for
 * the tile sums) from as many parts of the range: each activation load serves them all, the
 * FMA chains overlap and every stream stays in its own pages (2 adjacent rows of 2 KiB in one
 * 4 KiB page stream at a third of the speed).  Not on Intel, where the 512-bit shuffles and
 * shifts share the FMA ports and 15 uops per 64 codes would lose to the tables' 13.  Taken
 * where MXCSR.DAZ is off (the scaled subnormals must stay; they do raise MXCSR.DE), every
 * activation of the steps has |x| < 256 (finite), T * K <= F8S_STACK (the scaled copy is made
 * per call, on the stack) and the call has F8S_MIN_ROWS rows or more (the copy costs about one
 * row); rows with a NaN code (a running byte max of code | 0x80) are redone with the tables, and
 * every other call is f8p_o's, the tables on adjacent rows. */
#define F8S_STACK 8192
#define F8S_MIN_ROWS 8

/* 64 codes -> w[0..3] = e4m3 * 2^-120 (NaN codes: finite), columns in f8p_col order */
DSV2_TARGET_AVX512VBMI static inline __attribute__((always_inline)) void f8x64_s(__m512 w[4], __m512i c) {
    const __m512i m = _mm512_set1_epi16((short)0x87F0), z = _mm512_setzero_si512();
    /* per 16-bit word of 2 codes: sign at bit 15, magnitude at bits 10..4 */
    const __m512i o = _mm512_and_si512(_mm512_srai_epi16(c, 4), m);                       /* odd codes */
    const __m512i e = _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(c, 8), 4), m); /* even codes */
    w[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, e));
    w[1] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, o));
    w[2] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, e));
    w[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, o));
}

/* one step of 64 columns at k of f8s_rows */
DSV2_TARGET_AVX512VBMI static inline __attribute__((always_inline)) void
f8s_step(__m512 blk[DSV2_GEMV_MAX_T][4], __m512i *nm, const uint8_t *const q[4], const float *xs, const int T,
         const int S, const int G, int64_t K, int64_t k, const int sc, const f8_tables *tb, int pf) {
    __m512 w[4][4];
    for (int i = 0; i < G; i++) {
        DSV2_PREFETCH_AHEAD(q[i] + k, 64, pf);
        __m512i c = _mm512_loadu_si512((const void *)(q[i] + k));
        __asm__("" : "+v"(c)); /* one load of the codes (gcc would load them once per use) */
        if (sc) {
            *nm = _mm512_max_epu8(*nm, _mm512_or_si512(c, _mm512_set1_epi8((char)0x80))); /* 0xff: a NaN code */
            f8x64_s(w[i], c);
        } else {
            f8x64_vbmi(w[i], c, tb);
        }
    }
    for (int t = 0; t < T; t++)
        for (int v = 0; v < 4; v++) {
            const __m512 xv = _mm512_loadu_ps(xs + t * K + k + 16 * v);
            for (int i = 0; i < G; i++)
                blk[t][S * i + (v & (S - 1))] = _mm512_fmadd_ps(w[i][v], xv, blk[t][S * i + (v & (S - 1))]);
        }
}

/* G weight rows r + i * d (G * S <= 4) x T prepared activation rows -> y.  Sums per row and
 * activation row: S == 2 two (even / odd vectors of a step; a row run alone), S == 1 one (a row of
 * a 4-row tile); each block's sums times its scale, then the row's total.  sc: on xs (the steps
 * of xp times 2^120; the tail read from xp) with the scaled codes, returning nonzero when a code
 * is NaN (y of these rows then unset); else on xp (xs == xp) with the byte tables (f8x64_vbmi) */
DSV2_TARGET_AVX512VBMI static inline __attribute__((always_inline)) int
f8s_rows(float *y, int64_t ldy, const float *xs, const float *xp, const int T, const int S, const int G,
         const dsv2_mat *W, int64_t r, int64_t d, const int sc, const f8_tables *tb, int pf) {
    const int64_t K = W->cols, K64 = K & ~(int64_t)63, g = W->group;
    const uint8_t *q[4];
    const float *s[4];
    for (int i = 0; i < G; i++) {
        q[i] = (const uint8_t *)W->data + (r + i * d) * K;
        s[i] = dsv2_f8_scale_row(W, r + i * d);
    }
    __m512i nm = _mm512_setzero_si512();
    /* sum j of row i of activation row t: acc[t][S * i + j] */
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < G * S; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K64; k0 += g, b++) {
        const int64_t k1 = k0 + g < K64 ? k0 + g : K64;
        __m512 blk[DSV2_GEMV_MAX_T][4];
        for (int t = 0; t < T; t++)
            for (int j = 0; j < G * S; j++) blk[t][j] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) f8s_step(blk, &nm, q, xs, T, S, G, K, k, sc, tb, pf);
        for (int i = 0; i < G; i++) {
            const __m512 sv = _mm512_set1_ps(s[i][b]);
            for (int t = 0; t < T; t++)
                for (int j = S * i; j < S * i + S; j++) acc[t][j] = _mm512_fmadd_ps(blk[t][j], sv, acc[t][j]);
        }
    }
    if (sc && _mm512_cmpeq_epi8_mask(nm, _mm512_set1_epi8(-1))) return 1;
    for (int i = 0; i < G; i++) {
        float v[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++)
            v[t] = _mm512_reduce_add_ps(S == 2 ? _mm512_add_ps(acc[t][2 * i], acc[t][2 * i + 1]) : acc[t][i]);
        if (K64 < K) f8p_tail(v, xp, T, W, r + i * d, K64);
        for (int t = 0; t < T; t++) y[t * ldy + r + i * d] = v[t];
    }
    return 0;
}

/* xs = the steps of xp [T, K] times 2^120 (rows K apart); 1 when the scaled codes give the tables' bits.
 * The range is tested before each multiply, which so never overflows (no MXCSR flag that the
 * original would not raise; e4m3 subnormals scaled by 2^-120 do raise DE in the FMAs) */
DSV2_TARGET_AVX512VBMI static int f8s_scale(float *xs, const float *xp, int T, int64_t K, int64_t rows) {
    const int64_t K64 = K & ~(int64_t)63;
    if (rows < F8S_MIN_ROWS || T * K > F8S_STACK || (_mm_getcsr() & 0x0040) /* DAZ */ || dsv2_cpu_is_intel())
        return 0;
    const __m512 s = _mm512_set1_ps(0x1p120f);
    const __m512i a = _mm512_set1_epi32(0x7fffffff), lim = _mm512_set1_epi32(0x43800000); /* 256.0f */
    for (int t = 0; t < T; t++)
        for (int64_t k = 0; k < K64; k += 16) {
            const __m512 v = _mm512_loadu_ps(xp + t * K + k);
            /* |x| >= 256, Inf and NaN (not needed for Inf, but rare) */
            if (_mm512_cmpge_epu32_mask(_mm512_and_si512(_mm512_castps_si512(v), a), lim)) return 0;
            _mm512_storeu_ps(xs + t * K + k, _mm512_mul_ps(v, s));
        }
    return 1;
}

/* rows [a, a + n) with the sums of a row alone (R == 1) or of a 4-row tile (R == 4), in groups of G rows r, r + h, .. (h = n / G: G
 * streams in different pages) */
#define F8S_GROUPS(TT, R, G)                                                                             \
    do {                                                                                                 \
        const int64_t h_ = n_ / (G);                                                                     \
        for (int64_t i_ = 0; i_ < h_; i_++)                                                              \
            if (f8s_rows(y, ldy, xs, xp, TT, (R) == 1 ? 2 : 1, G, W, a_ + i_, h_, 1, &tb, pf))           \
                for (int j_ = 0; j_ < (G); j_++) f8p_one##TT(y, ldy, xp, R, W, a_ + i_ + j_ * h_, &tb, pf); \
        for (int64_t r_ = a_ + (G) * h_; r_ < a_ + n_; r_++)                                             \
            if (f8s_rows(y, ldy, xs, xp, TT, (R) == 1 ? 2 : 1, 1, W, r_, 1, 1, &tb, pf))                 \
                f8p_one##TT(y, ldy, xp, R, W, r_, &tb, pf);                                              \
    } while (0)

/* the byte tables on adjacent rows: 4-row tiles for long activation rows, then rows alone */
#define F8P_O(TT)                                                                                        \
    DSV2_TARGET_AVX512VBMI __attribute__((noinline)) static void f8p_o##TT(float *y, int64_t ldy, const float *xp, \
                                                                         const dsv2_mat *W, int64_t r0, int64_t r1) { \
        const int pf = dsv2_prefetch_for(DSV2_PF_F8);                                                    \
        const f8_tables tb = f8_tables_load();                                                           \
        int64_t r = r0;                                                                                  \
        if ((TT) * W->cols * 4 > DSV2_GEMV_TILE_XBYTES)                                                  \
            for (; r + 4 <= r1; r += 4) f8s_rows(y, ldy, xp, xp, TT, 1, 4, W, r, 1, 0, &tb, pf);          \
        for (; r < r1; r++) f8s_rows(y, ldy, xp, xp, TT, 2, 1, W, r, 1, 0, &tb, pf);                     \
    }
F8P_O(1)
F8P_O(2)
F8P_O(3)
F8P_O(4)

#define F8P_T(TT)                                                                                        \
    /* row r with the tables and the sums of a row alone (R == 1) or of a 4-row tile (R == 4) */        \
    DSV2_TARGET_AVX512VBMI static void f8p_one##TT(float *y, int64_t ldy, const float *xp, int R, const dsv2_mat *W, \
                                                   int64_t r, const f8_tables *tb, int pf) {             \
        f8s_rows(y, ldy, xp, xp, TT, R == 1 ? 2 : 1, 1, W, r, 1, 0, tb, pf);                             \
    }                                                                                                    \
    DSV2_TARGET_AVX512VBMI static void f8p_t##TT(float *y, int64_t ldy, const float *xp, const dsv2_mat *W, \
                                                 int64_t r0, int64_t r1) {                               \
        const int pf = dsv2_prefetch_for(DSV2_PF_F8);                                                    \
        const f8_tables tb = f8_tables_load();                                                           \
        const int tile = (TT) * W->cols * 4 > DSV2_GEMV_TILE_XBYTES;                                     \
        float xs[F8S_STACK] __attribute__((aligned(64)));                                                \
        if (!f8s_scale(xs, xp, TT, W->cols, r1 - r0)) {                                                  \
            f8p_o##TT(y, ldy, xp, W, r0, r1);                                                            \
            return;                                                                                      \
        }                                                                                                \
        /* the rows f8p_o takes in 4-row tiles, then those it takes alone */                          \
        const int64_t n4 = tile ? (r1 - r0) & ~(int64_t)3 : 0;                                           \
        {                                                                                                \
            const int64_t a_ = r0, n_ = n4;                                                              \
            F8S_GROUPS(TT, 4, 4);                                                                        \
        }                                                                                                \
        {                                                                                                \
            const int64_t a_ = r0 + n4, n_ = r1 - r0 - n4;                                               \
            if ((TT) <= 2) F8S_GROUPS(TT, 1, 2);                                                         \
            else F8S_GROUPS(TT, 1, 1);                                                                   \
        }                                                                                                \
    }
F8P_T(1)
F8P_T(2)
F8P_T(3)
F8P_T(4)

void dsv2_gemv_f8p_rows(float *y, int64_t ldy, const float *xp, int64_t T, const dsv2_mat *W, int64_t r0,
                        int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    for (int64_t t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
        const int64_t tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
        const float *xs = xp + t0 * W->cols;
        float *ys = y + t0 * ldy;
        switch (tt) {
        case 1: f8p_t1(ys, ldy, xs, W, r0, r1); break;
        case 2: f8p_t2(ys, ldy, xs, W, r0, r1); break;
        case 3: f8p_t3(ys, ldy, xs, W, r0, r1); break;
        default: f8p_t4(ys, ldy, xs, W, r0, r1); break;
        }
    }
}

/* dsv2_gemv_f8_rows (activations not prepared by the caller) prepares them on the stack for
 * T * K <= F8P_STACK floats and at least F8P_MIN_ROWS rows (the preparation costs about what
 * decoding 4 rows does); otherwise the fp16 route */
#define F8P_STACK 8192
#define F8P_MIN_ROWS 64

/* ---------------- dispatch ---------------- */

static int f8_isa(const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int isa = dsv2_isa();
    if (isa == DSV2_ISA_AVX512 && W->group % 16 == 0 && dsv2_f8_scales_foldable(W, r0, r1)) return DSV2_ISA_AVX512;
    if (isa >= DSV2_ISA_AVX2 && W->group % 8 == 0 && dsv2_f8_scales_foldable(W, r0, r1)) return DSV2_ISA_AVX2;
    return DSV2_ISA_PORTABLE;
}

void dsv2_gemv_f8_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                       int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    const int isa = f8_isa(W, r0, r1);
    const int vbmi = dsv2_f8p_usable(W);
    for (int t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
        const int tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
        const float *xs = x + t0 * ldx;
        float *ys = y + t0 * ldy;
        if (isa == DSV2_ISA_AVX512 && vbmi && tt * W->cols <= F8P_STACK && r1 - r0 >= F8P_MIN_ROWS) {
            float xp[F8P_STACK] __attribute__((aligned(64)));
            dsv2_f8p_prepare(xp, xs, ldx, tt, W->cols);
            dsv2_gemv_f8p_rows(ys, ldy, xp, tt, W, r0, r1);
        } else if (isa == DSV2_ISA_AVX512) {
            switch (tt) {
            case 1: f8_avx512_t1(ys, ldy, xs, ldx, W, r0, r1); break;
            case 2: f8_avx512_t2(ys, ldy, xs, ldx, W, r0, r1); break;
            case 3: f8_avx512_t3(ys, ldy, xs, ldx, W, r0, r1); break;
            default: f8_avx512_t4(ys, ldy, xs, ldx, W, r0, r1); break;
            }
        } else if (isa == DSV2_ISA_AVX2) {
            f8_avx2(ys, ldy, xs, ldx, tt, W, r0, r1);
        } else {
            f8_portable(ys, ldy, xs, ldx, tt, W, r0, r1);
        }
    }
}

void dsv2_dequant_f8_rows(float *out, const dsv2_mat *W, int64_t r0, int64_t r1) {
    if (r0 >= r1) return;
    const int isa = f8_isa(W, r0, r1);
    for (int64_t r = r0; r < r1; r++) {
        float *o = out + (r - r0) * W->cols;
        if (isa == DSV2_ISA_AVX512) dequant_avx512(o, W, r);
        else if (isa == DSV2_ISA_AVX2) dequant_avx2(o, W, r);
        else dequant_portable(o, W, r);
    }
}
