/* gemv_i4.c - row-dot kernels for int4 weights (int4.h): int8-quantized
 * activations against the 4-bit codes in exact integer sums (AVX-512 VNNI,
 * AVX2, portable), and the fp32-activation path on dequantized rows.
 *
 * Prepared activations (gemv.h, the int8 kind of dsv2_xq): per row, Kp int8
 * codes laid out for the kernels.  A 64-byte vector of weight codes holds two
 * 32-byte units (4 groups g0..g3 of 32 columns): its low nibbles are g0 and g2,
 * its high nibbles g1 and g3.  So that both halves meet their activations in
 * one load, every full 128-column chunk of the activation row is stored as
 * groups [g0, g2, g1, g3]; a last 64-column unit of a row stays in order.
 * Per super-block: one fp32 scale and the 8 group sums of the codes (int16). */
#include "gemv.h"
#include "cpu.h"
#include "int4.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

/* ---------------- activation layout ---------------- */

/* position of column c (c < Kp, c a multiple of 32) of an activation row in the kernel layout */
static inline int64_t act8_pos(int64_t c, int64_t Kp) {
    if (c >= Kp / 128 * 128) return c;
    static const int perm[4] = {0, 2, 1, 3};
    return c / 128 * 128 + perm[(c % 128) / 32] * 32 + c % 32;
}

/* offsets (from the super-block's first activation) of unit k's low / high groups; nu units in the block */
static inline void unit_offsets(int k, int nu, int64_t *lo, int64_t *hi) {
    if (k < nu / 2 * 2) {
        *lo = (k / 2) * 128 + (k % 2) * 32;
        *hi = *lo + 64;
    } else {
        *lo = (int64_t)k * 64;
        *hi = *lo + 32;
    }
}

/* ---------------- activation quantization ---------------- */

static float block_scale(const float *x, int64_t n) {
    float m = 0.0f;
    int bad = 0;
    for (int64_t c = 0; c < n; c++) {
        const float a = fabsf(x[c]);
        bad |= !(a <= FLT_MAX);
        m = a > m ? a : m;
    }
    return bad ? NAN : m / 127.0f;
}

DSV2_TARGET_AVX512 static float block_scale_avx512(const float *x, int64_t n) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), big = _mm512_set1_ps(FLT_MAX);
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 k = (__mmask16)(n - c >= 16 ? 0xffff : (1u << (n - c)) - 1u);
        const __m512 a = _mm512_and_ps(_mm512_maskz_loadu_ps(k, x + c), absmask);
        bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        m = _mm512_max_ps(m, a);
    }
    return bad ? NAN : _mm512_reduce_max_ps(m) / 127.0f;
}

/* codes of n <= 256 values with scale sc -> q [n] (natural order) */
static void block_codes(int8_t *q, const float *x, int64_t n, float sc) {
    for (int64_t c = 0; c < n; c++) {
        float v = sc > 0.0f ? nearbyintf(x[c] / sc) : 0.0f;
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[c] = (int8_t)v;
    }
}

DSV2_TARGET_AVX512 static void block_codes_avx512(int8_t *q, const float *x, int64_t n, float sc) {
    if (!(sc > 0.0f)) {
        memset(q, 0, (size_t)n);
        return;
    }
    const __m512 sv = _mm512_set1_ps(sc), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 k = (__mmask16)(n - c >= 16 ? 0xffff : (1u << (n - c)) - 1u);
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(k, x + c), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(q + c, k, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
}

void dsv2_quantize_act8(const dsv2_xq *xq, const float *x, int64_t ldx, int64_t T, int64_t K) {
    const int64_t Kp = dsv2_i4_kp(K), nsb = dsv2_i4_nsb(K);
    const int fast = dsv2_isa() == DSV2_ISA_AVX512;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * ldx;
        int8_t *qt = (int8_t *)xq->q8 + t * Kp;
        float *st = (float *)xq->s8 + t * nsb;
        int16_t *gt = (int16_t *)xq->gsum8 + t * nsb * 8;
        for (int64_t sb = 0; sb < nsb; sb++) {
            const int64_t c0 = sb * DSV2_I4_SUPER, n = K - c0 < DSV2_I4_SUPER ? K - c0 : DSV2_I4_SUPER;
            const int64_t np = (Kp - c0 < DSV2_I4_SUPER ? Kp - c0 : DSV2_I4_SUPER);
            int8_t tmp[DSV2_I4_SUPER];
            const float sc = fast ? block_scale_avx512(xt + c0, n) : block_scale(xt + c0, n);
            st[sb] = sc;
            if (fast) block_codes_avx512(tmp, xt + c0, n, sc);
            else block_codes(tmp, xt + c0, n, sc);
            memset(tmp + n, 0, (size_t)(DSV2_I4_SUPER - n));
            for (int g = 0; g < 8; g++) {
                int s = 0;
                if (g * DSV2_I4_GROUP < np) {
                    const int8_t *src = tmp + g * DSV2_I4_GROUP;
                    memcpy(qt + act8_pos(c0 + g * DSV2_I4_GROUP, Kp), src, DSV2_I4_GROUP);
                    for (int i = 0; i < DSV2_I4_GROUP; i++) s += src[i];
                }
                gt[sb * 8 + g] = (int16_t)s;
            }
        }
    }
}

size_t dsv2_act8_bytes(int64_t T, int64_t K) {
    const size_t a = ((size_t)T * (size_t)dsv2_i4_kp(K) + 63) & ~(size_t)63;
    const size_t b = ((size_t)T * (size_t)dsv2_i4_nsb(K) * sizeof(float) + 63) & ~(size_t)63;
    return a + b + (size_t)T * (size_t)dsv2_i4_nsb(K) * 8 * sizeof(int16_t);
}

dsv2_xq dsv2_act8_at(void *buf, int64_t T, int64_t K) {
    dsv2_xq r;
    memset(&r, 0, sizeof r);
    const size_t a = ((size_t)T * (size_t)dsv2_i4_kp(K) + 63) & ~(size_t)63;
    const size_t b = ((size_t)T * (size_t)dsv2_i4_nsb(K) * sizeof(float) + 63) & ~(size_t)63;
    r.q8 = (const int8_t *)buf;
    r.s8 = (const float *)((char *)buf + a);
    r.gsum8 = (const int16_t *)((char *)buf + a + b);
    return r;
}

static int g_i4_act = -1; /* DSV2_I4_ACT_*, -1: not read from the environment yet */

int dsv2_get_i4_act(void) {
    if (g_i4_act < 0) {
        const char *env = getenv("DSV2EXT_INT4_ACT");
        g_i4_act = env && !strcmp(env, "fp32") ? DSV2_I4_ACT_FP32 : DSV2_I4_ACT_INT8;
    }
    return g_i4_act;
}

int dsv2_set_i4_act(int mode) {
    g_i4_act = mode == DSV2_I4_ACT_FP32 ? DSV2_I4_ACT_FP32 : DSV2_I4_ACT_INT8;
    return g_i4_act;
}

int dsv2_i4q_usable(const dsv2_mat *W) {
    return W->dtype == DSV2_I4 && dsv2_get_i4_act() == DSV2_I4_ACT_INT8;
}

/* ---------------- portable ---------------- */

/* Software prefetch of the weight stream (cpu.h: dsv2_prefetch_bytes, DSV2EXT_PREFETCH),
 * one super-block's 148 bytes (3 lines) per super-block read.  The row-dot calls of a
 * decode step read short stretches of many matrices (48 rows of an expert's gate, 24 of
 * its down_proj, ...); measured on Zen 4 (2 threads, busy host, A/B in one process) with
 * 4096 bytes: MoE block of one token +10%, a long linear +15% over the hardware
 * prefetchers alone. */
#define I4_PREFETCH(h, pf) DSV2_PREFETCH_AHEAD(h, 3 * 64, pf)

static inline float hdr_f(const uint8_t *h) { return dsv2_bf16_to_f32((uint16_t)(h[0] | h[1] << 8)); }

static void i4q_portable(float *y, int64_t ldy, const dsv2_xq *xq, int T, const dsv2_mat *W, int64_t r0,
                         int64_t r1) {
    const int64_t K = W->cols, Kp = dsv2_i4_kp(K), nsb = dsv2_i4_nsb(K);
    const size_t rb = (size_t)dsv2_i4_row_bytes(K);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)W->data + (size_t)r * rb;
        for (int t = 0; t < T; t++) {
            const int8_t *xt = xq->q8 + t * Kp;
            float acc = 0.0f;
            for (int64_t sb = 0; sb < nsb; sb++) {
                const uint8_t *h = row + sb * DSV2_I4_SB_BYTES;
                const int nu = (int)((Kp - sb * DSV2_I4_SUPER < DSV2_I4_SUPER ? Kp - sb * DSV2_I4_SUPER : DSV2_I4_SUPER) /
                                     DSV2_I4_UNIT);
                int32_t main = 0, mins = 0;
                for (int k = 0; k < nu; k++) {
                    int64_t lo, hi;
                    unit_offsets(k, nu, &lo, &hi);
                    const uint8_t *u = h + DSV2_I4_HDR + k * 32;
                    const int8_t *xl = xt + sb * DSV2_I4_SUPER + lo, *xh = xt + sb * DSV2_I4_SUPER + hi;
                    int32_t sl = 0, sh = 0;
                    for (int i = 0; i < 32; i++) {
                        sl += (u[i] & 15) * xl[i];
                        sh += (u[i] >> 4) * xh[i];
                    }
                    main += h[4 + 2 * k] * sl + h[5 + 2 * k] * sh;
                }
                for (int g = 0; g < 8; g++) mins += h[12 + g] * xq->gsum8[(t * nsb + sb) * 8 + g];
                const float sx = xq->s8[t * nsb + sb];
                acc += sx * (hdr_f(h) * (float)main - hdr_f(h + 2) * (float)mins);
            }
            y[t * ldy + r] = acc;
        }
    }
}

/* ---------------- AVX2: one weight row x T activation rows, 32-byte units ---------------- */

DSV2_TARGET_AVX2 static inline __attribute__((always_inline)) void
i4q_row_avx2(float *y, int64_t ldy, const dsv2_xq *xq, const int T, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, Kp = dsv2_i4_kp(K), nsb = dsv2_i4_nsb(K);
    const uint8_t *row = (const uint8_t *)W->data + (size_t)r * (size_t)dsv2_i4_row_bytes(K);
    const int pf = dsv2_prefetch_for(DSV2_PF_I4);
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 accf[DSV2_GEMV_MAX_T];
    __m128 accm[DSV2_GEMV_MAX_T];
    for (int t = 0; t < T; t++) {
        accf[t] = _mm256_setzero_ps();
        accm[t] = _mm_setzero_ps();
    }
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *h = row + sb * DSV2_I4_SB_BYTES;
        const int nu = (int)((Kp - sb * DSV2_I4_SUPER < DSV2_I4_SUPER ? Kp - sb * DSV2_I4_SUPER : DSV2_I4_SUPER) /
                             DSV2_I4_UNIT);
        I4_PREFETCH(h, pf);
        __m256i acc[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_si256();
        for (int k = 0; k < nu; k++) {
            int64_t lo, hi;
            unit_offsets(k, nu, &lo, &hi);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(h + DSV2_I4_HDR + k * 32));
            const __m256i wl = _mm256_and_si256(v, m4), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            const __m256i sl = _mm256_set1_epi16(h[4 + 2 * k]), sh = _mm256_set1_epi16(h[5 + 2 * k]);
            for (int t = 0; t < T; t++) {
                const int8_t *xs = xq->q8 + t * Kp + sb * DSV2_I4_SUPER;
                const __m256i pl = _mm256_maddubs_epi16(wl, _mm256_loadu_si256((const __m256i *)(xs + lo)));
                const __m256i ph = _mm256_maddubs_epi16(wh, _mm256_loadu_si256((const __m256i *)(xs + hi)));
                acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(pl, sl), _mm256_madd_epi16(ph, sh)));
            }
        }
        const float d = hdr_f(h), dmin = hdr_f(h + 2);
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(h + 12)));
        for (int t = 0; t < T; t++) {
            const float sx = xq->s8[t * nsb + sb];
            accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_set1_ps(d * sx), accf[t]);
            const __m128i gs = _mm_loadu_si128((const __m128i *)(xq->gsum8 + (t * nsb + sb) * 8));
            accm[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(m16, gs)), _mm_set1_ps(dmin * sx), accm[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        __m128 m = _mm_add_ps(accm[t], _mm_movehl_ps(accm[t], accm[t]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        y[t * ldy + r] = dsv2_hsum256(accf[t]) - _mm_cvtss_f32(m);
    }
}

#define I4Q_AVX2_T(TT)                                                                                       \
    DSV2_TARGET_AVX2 static void i4q_avx2_t##TT(float *y, int64_t ldy, const dsv2_xq *xq, const dsv2_mat *W, \
                                                int64_t r0, int64_t r1) {                                    \
        for (int64_t r = r0; r < r1; r++) i4q_row_avx2(y, ldy, xq, TT, W, r);                                \
    }
I4Q_AVX2_T(1)
I4Q_AVX2_T(2)
I4Q_AVX2_T(3)
I4Q_AVX2_T(4)

/* ---------------- AVX-512 VNNI: one weight row x T activation rows ----------------
 * Per 64 bytes of codes (128 weights): one AND and one shift + AND give the
 * low and high nibbles; vpmaddubsw multiplies them with the activation codes
 * (u8 x s8 -> pairs summed in int16, at most 2 * 15 * 127), vpdpwssd weights
 * each int16 pair with its group's 8-bit sub-scale and accumulates in int32
 * (exact: at most 7.8e6 per lane per super-block).  Per super-block: the
 * int32 lanes -> fp32 times d * s_x, and the sub-min term from the group sums
 * (vpmaddwd).  The sub-scale vectors come from one 8-byte broadcast and
 * vpshufb (lanes 0-15 / 16-31 take the scale of the two groups of a half). */

DSV2_TARGET_AVX512VNNI static inline __m512i sc_ctrl(int a, int b) {
    /* int16 lanes of 128-bit lanes 0-1 <- byte a, of 128-bit lanes 2-3 <- byte b (zero-extended) */
    const short va = (short)(0x8000 | a), vb = (short)(0x8000 | b);
    return _mm512_set_epi16(vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, vb, va, va, va, va, va, va, va,
                            va, va, va, va, va, va, va, va, va);
}

DSV2_TARGET_AVX512VNNI static inline __attribute__((always_inline)) void
i4q_row_avx512(float *y, int64_t ldy, const dsv2_xq *xq, const int T, const dsv2_mat *W, int64_t r,
               const __m512i *ctrl) {
    const int64_t K = W->cols, Kp = dsv2_i4_kp(K), nsb = dsv2_i4_nsb(K);
    const uint8_t *row = (const uint8_t *)W->data + (size_t)r * (size_t)dsv2_i4_row_bytes(K);
    const int pf = dsv2_prefetch_for(DSV2_PF_I4);
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 accf[DSV2_GEMV_MAX_T];
    __m128 accm[DSV2_GEMV_MAX_T];
    for (int t = 0; t < T; t++) {
        accf[t] = _mm512_setzero_ps();
        accm[t] = _mm_setzero_ps();
    }
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *h = row + sb * DSV2_I4_SB_BYTES, *cq = h + DSV2_I4_HDR;
        const int nu = (int)((Kp - sb * DSV2_I4_SUPER < DSV2_I4_SUPER ? Kp - sb * DSV2_I4_SUPER : DSV2_I4_SUPER) /
                             DSV2_I4_UNIT);
        I4_PREFETCH(h, pf);
        int64_t scb64;
        memcpy(&scb64, h + 4, 8);
        const __m512i scb = _mm512_set1_epi64(scb64);
        __m512i acc[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_si512();
        const int8_t *xs = xq->q8 + sb * DSV2_I4_SUPER;
#define I4Q_PAIR(p)                                                                                          \
    {                                                                                                        \
        const __m512i v = _mm512_loadu_si512((const void *)(cq + 64 * (p)));                                 \
        const __m512i wl = _mm512_and_si512(v, m4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);      \
        const __m512i sl = _mm512_shuffle_epi8(scb, ctrl[2 * (p)]), sh = _mm512_shuffle_epi8(scb, ctrl[2 * (p) + 1]); \
        for (int t = 0; t < T; t++) {                                                                        \
            const int8_t *xt = xs + t * Kp + 128 * (p);                                                      \
            acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(wl, _mm512_loadu_si512((const void *)xt)), sl); \
            acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(wh, _mm512_loadu_si512((const void *)(xt + 64))), sh); \
        }                                                                                                    \
    }
        if (sb + 1 < nsb || nu == 4) {
            I4Q_PAIR(0)
            I4Q_PAIR(1)
        } else {
            if (nu >= 2) I4Q_PAIR(0)
            if (nu & 1) { /* the row's last unit, alone: low / high groups are its two 32-column halves */
                const int k = nu - 1;
                const __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(cq + 32 * k)));
                const __m512i wl = _mm512_and_si512(v, m4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                const __m512i sl = _mm512_shuffle_epi8(scb, ctrl[k]), sh = _mm512_shuffle_epi8(scb, ctrl[k + 1]);
                for (int t = 0; t < T; t++) {
                    const int8_t *xt = xs + t * Kp + 64 * k;
                    const __m512i xl = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)xt));
                    const __m512i xh = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(xt + 32)));
                    acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(wl, xl), sl);
                    acc[t] = _mm512_dpwssd_epi32(acc[t], _mm512_maddubs_epi16(wh, xh), sh);
                }
            }
        }
#undef I4Q_PAIR
        const float d = hdr_f(h), dmin = hdr_f(h + 2);
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(h + 12)));
        for (int t = 0; t < T; t++) {
            const float sx = xq->s8[t * nsb + sb];
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(d * sx), accf[t]);
            const __m128i gs = _mm_loadu_si128((const __m128i *)(xq->gsum8 + (t * nsb + sb) * 8));
            accm[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(m16, gs)), _mm_set1_ps(dmin * sx), accm[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        __m128 m = _mm_add_ps(accm[t], _mm_movehl_ps(accm[t], accm[t]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        y[t * ldy + r] = _mm512_reduce_add_ps(accf[t]) - _mm_cvtss_f32(m);
    }
}

/* ---------------- AVX-512 VNNI, T = 1 (decode): four weight rows per step ----------------
 * With one activation row the kernel is bound by the vector pipes, not by memory:
 * per super-block and row, 18 512-bit ops (per 128 weights: AND, shift + AND for
 * the nibbles, 2 sub-scale vpshufb, 2 vpmaddubsw, 2 vpdpwssd) and the fp32 work.
 * Four adjacent rows per step share the activation loads and the header work (d,
 * dmin of the four rows in one vector, scaled by s_x at once; the sub-min terms of
 * two rows per 256-bit vector), and each 64-byte code vector is loaded once.  Every
 * row gets the int32 lanes and the fp32 operations (order and rounding) of
 * i4q_row_avx512, so y is bit-identical to it; the rows left over (fewer than 4) go
 * through i4q_row_avx512.
 * Prefetch: the four rows are read as four interleaved streams, which the hardware
 * prefetchers follow badly; one software sweep runs 2 x dsv2_prefetch_for(DSV2_PF_I4)
 * bytes ahead of the block of four rows, over the block's bytes at the pace they are
 * read, into L2 (prefetcht2: with prefetcht0 the four rows get 22-27 G weights/s
 * from DRAM).  Zen 4, 1 thread, K = 2048: 66 G weights/s hot in L2 against 53 for
 * one row at a time; 2048 x 65536 (77 MB) 34-49 over the whole range and 43-49 in
 * 24-row calls against 28-40 and 35-37. */

/* int32 lanes of one full super-block (4 units) of one row: those of i4q_row_avx512 */
DSV2_TARGET_AVX512VNNI static inline __attribute__((always_inline)) __m512i
i4q_sb_full(const uint8_t *h, const int8_t *xs, const __m512i *ctrl) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i v0 = _mm512_loadu_si512((const void *)(h + DSV2_I4_HDR));
    __m512i v1 = _mm512_loadu_si512((const void *)(h + DSV2_I4_HDR + 64));
    __asm__("" : "+v"(v0), "+v"(v1)); /* one load per vector (else one per use) */
    int64_t scb64;
    memcpy(&scb64, h + 4, 8);
    const __m512i scb = _mm512_set1_epi64(scb64);
    const __m512i p0 = _mm512_maddubs_epi16(_mm512_and_si512(v0, m4), _mm512_loadu_si512((const void *)xs));
    const __m512i p1 = _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(v0, 4), m4),
                                            _mm512_loadu_si512((const void *)(xs + 64)));
    const __m512i p2 = _mm512_maddubs_epi16(_mm512_and_si512(v1, m4), _mm512_loadu_si512((const void *)(xs + 128)));
    const __m512i p3 = _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(v1, 4), m4),
                                            _mm512_loadu_si512((const void *)(xs + 192)));
    __m512i acc = _mm512_madd_epi16(p0, _mm512_shuffle_epi8(scb, ctrl[0]));
    acc = _mm512_dpwssd_epi32(acc, p1, _mm512_shuffle_epi8(scb, ctrl[1]));
    acc = _mm512_dpwssd_epi32(acc, p2, _mm512_shuffle_epi8(scb, ctrl[2]));
    return _mm512_dpwssd_epi32(acc, p3, _mm512_shuffle_epi8(scb, ctrl[3]));
}

/* the same for a row's last super-block of nu < 4 units */
DSV2_TARGET_AVX512VNNI static inline __attribute__((always_inline)) __m512i
i4q_sb_part(const uint8_t *h, const int8_t *xs, int nu, const __m512i *ctrl) {
    const __m512i m4 = _mm512_set1_epi8(15);
    const uint8_t *cq = h + DSV2_I4_HDR;
    int64_t scb64;
    memcpy(&scb64, h + 4, 8);
    const __m512i scb = _mm512_set1_epi64(scb64);
    __m512i acc = _mm512_setzero_si512();
    if (nu >= 2) {
        const __m512i v = _mm512_loadu_si512((const void *)cq);
        const __m512i wl = _mm512_and_si512(v, m4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(wl, _mm512_loadu_si512((const void *)xs)),
                                  _mm512_shuffle_epi8(scb, ctrl[0]));
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(wh, _mm512_loadu_si512((const void *)(xs + 64))),
                                  _mm512_shuffle_epi8(scb, ctrl[1]));
    }
    if (nu & 1) {
        const int k = nu - 1;
        const __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(cq + 32 * k)));
        const __m512i wl = _mm512_and_si512(v, m4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const int8_t *xt = xs + 64 * k;
        const __m512i xl = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)xt));
        const __m512i xh = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(xt + 32)));
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(wl, xl), _mm512_shuffle_epi8(scb, ctrl[k]));
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(wh, xh), _mm512_shuffle_epi8(scb, ctrl[k + 1]));
    }
    return acc;
}

/* fp32 work of one super-block of the 4 rows h, h + st, h + 2 st, h + 3 st: per row
 * accf += cvt(a) * (d * s_x) and accm += cvt(m . gsum) * (dmin * s_x), as i4q_row_avx512 */
DSV2_TARGET_AVX512VNNI static inline __attribute__((always_inline)) void
i4q_sb_fp4(const uint8_t *h, size_t st, const __m512i *a, const float *sxp, const int16_t *gs8, __m512 *accf,
           __m256 *accm) {
    int32_t d[4];
    int64_t m[4];
    for (int k = 0; k < 4; k++) {
        memcpy(&d[k], h + k * st, 4);
        memcpy(&m[k], h + k * st + 12, 8);
    }
    __m128i dd = _mm_cvtsi32_si128(d[0]);
    dd = _mm_insert_epi32(dd, d[1], 1);
    dd = _mm_insert_epi32(dd, d[2], 2);
    dd = _mm_insert_epi32(dd, d[3], 3);
    const __m128 sx = _mm_broadcast_ss(sxp);
    /* bf16 -> fp32: the 16 bits above 16 zero bits; f01 = d0 dmin0 d1 dmin1, f23 likewise */
    const __m128 f[2] = {_mm_mul_ps(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), dd)), sx),
                         _mm_mul_ps(_mm_castsi128_ps(_mm_unpackhi_epi16(_mm_setzero_si128(), dd)), sx)};
    const __m512i two = _mm512_set1_epi32(2);
    const __m256i gs = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)gs8));
    const __m256i dmin_idx = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
    for (int k = 0; k < 2; k++) {
        accf[2 * k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[2 * k]), _mm512_broadcastss_ps(f[k]), accf[2 * k]);
        accf[2 * k + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[2 * k + 1]),
                                          _mm512_permutexvar_ps(two, _mm512_castps128_ps512(f[k])), accf[2 * k + 1]);
        const __m256i m16 = _mm256_cvtepu8_epi16(_mm_insert_epi64(_mm_cvtsi64_si128(m[2 * k]), m[2 * k + 1], 1));
        accm[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(m16, gs)),
                                  _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f[k]), dmin_idx), accm[k]);
    }
}

/* rows r .. r + 3 */
DSV2_TARGET_AVX512VNNI static inline __attribute__((always_inline)) void
i4q_rows4_avx512(float *y, const dsv2_xq *xq, const dsv2_mat *W, int64_t r, const __m512i *ctrl, int pf) {
    const int64_t K = W->cols, Kp = dsv2_i4_kp(K), nsb = dsv2_i4_nsb(K), nfull = Kp / DSV2_I4_SUPER;
    const size_t rb = (size_t)dsv2_i4_row_bytes(K);
    const uint8_t *h = (const uint8_t *)W->data + (size_t)r * rb;
    const char *pfp = (const char *)h + 2 * pf; /* the sweep: 4 rb bytes per block of 4 rows */
    __m512 accf[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m256 accm[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m512i a[4];
    for (int64_t sb = 0; sb < nfull; sb++, h += DSV2_I4_SB_BYTES) {
        if (pf) {
            for (int l = 0; l < 10; l++) __builtin_prefetch(pfp + 64 * l, 0, 1); /* 10 lines >= 4 x 148 bytes */
            pfp += 4 * DSV2_I4_SB_BYTES;
        }
        const int8_t *xs = xq->q8 + sb * DSV2_I4_SUPER;
        for (int k = 0; k < 4; k++) a[k] = i4q_sb_full(h + k * rb, xs, ctrl);
        i4q_sb_fp4(h, rb, a, xq->s8 + sb, xq->gsum8 + sb * 8, accf, accm);
    }
    if (nfull < nsb) {
        const int nu = (int)((Kp - nfull * DSV2_I4_SUPER) / DSV2_I4_UNIT);
        if (pf)
            for (int l = 0; l < (4 * (DSV2_I4_HDR + 32 * nu) + 63) / 64; l++) __builtin_prefetch(pfp + 64 * l, 0, 1);
        const int8_t *xs = xq->q8 + nfull * DSV2_I4_SUPER;
        for (int k = 0; k < 4; k++) a[k] = i4q_sb_part(h + k * rb, xs, nu, ctrl);
        i4q_sb_fp4(h, rb, a, xq->s8 + nfull, xq->gsum8 + nfull * 8, accf, accm);
    }
    for (int k = 0; k < 4; k++) {
        __m128 m = k & 1 ? _mm256_extractf128_ps(accm[k >> 1], 1) : _mm256_castps256_ps128(accm[k >> 1]);
        m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        y[r + k] = _mm512_reduce_add_ps(accf[k]) - _mm_cvtss_f32(m);
    }
}

DSV2_TARGET_AVX512VNNI static void i4q_avx512_t1(float *y, int64_t ldy, const dsv2_xq *xq, const dsv2_mat *W,
                                                 int64_t r0, int64_t r1) {
    const __m512i ctrl[4] = {sc_ctrl(0, 2), sc_ctrl(1, 3), sc_ctrl(4, 6), sc_ctrl(5, 7)};
    const int pf = dsv2_prefetch_for(DSV2_PF_I4);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) i4q_rows4_avx512(y, xq, W, r, ctrl, pf);
    for (; r < r1; r++) i4q_row_avx512(y, ldy, xq, 1, W, r, ctrl);
}

#define I4Q_512_T(TT)                                                                                             \
    DSV2_TARGET_AVX512VNNI static void i4q_avx512_t##TT(float *y, int64_t ldy, const dsv2_xq *xq, const dsv2_mat *W, \
                                                        int64_t r0, int64_t r1) {                                 \
        const __m512i ctrl[4] = {sc_ctrl(0, 2), sc_ctrl(1, 3), sc_ctrl(4, 6), sc_ctrl(5, 7)};                     \
        for (int64_t r = r0; r < r1; r++) i4q_row_avx512(y, ldy, xq, TT, W, r, ctrl);                             \
    }
I4Q_512_T(2)
I4Q_512_T(3)
I4Q_512_T(4)

typedef void (*i4q_fn)(float *, int64_t, const dsv2_xq *, const dsv2_mat *, int64_t, int64_t);

void dsv2_gemv_i4q_rows(float *y, int64_t ldy, const dsv2_xq *xq, int T, const dsv2_mat *W, int64_t r0,
                        int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    static const i4q_fn f512[5] = {NULL, i4q_avx512_t1, i4q_avx512_t2, i4q_avx512_t3, i4q_avx512_t4};
    static const i4q_fn f256[5] = {NULL, i4q_avx2_t1, i4q_avx2_t2, i4q_avx2_t3, i4q_avx2_t4};
    const int64_t K = W->cols, Kp = dsv2_i4_kp(K), nsb = dsv2_i4_nsb(K);
    const int isa = dsv2_isa();
    const i4q_fn *fn = isa == DSV2_ISA_AVX512 && dsv2_cpu_has_avx512vnni() ? f512 : isa >= DSV2_ISA_AVX2 ? f256 : NULL;
    for (int t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
        const int tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
        dsv2_xq xs = *xq;
        xs.q8 = xq->q8 + t0 * Kp;
        xs.s8 = xq->s8 + t0 * nsb;
        xs.gsum8 = xq->gsum8 + t0 * nsb * 8;
        if (fn) fn[tt](y + t0 * ldy, ldy, &xs, W, r0, r1);
        else i4q_portable(y + t0 * ldy, ldy, &xs, tt, W, r0, r1);
    }
}

/* ---------------- fp32 activations: rows dequantized, then the fp32 row dots ---------------- */

#define I4_F32_ROWS 16

void dsv2_gemv_i4_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                       int64_t r0, int64_t r1) {
    const int64_t K = W->cols;
    float stackbuf[4096];
    float *buf = (size_t)I4_F32_ROWS * (size_t)K <= sizeof stackbuf / sizeof(float)
                     ? stackbuf
                     : (float *)malloc((size_t)I4_F32_ROWS * (size_t)K * sizeof(float));
    for (int64_t rb = r0; rb < r1; rb += I4_F32_ROWS) {
        const int64_t n = r1 - rb < I4_F32_ROWS ? r1 - rb : I4_F32_ROWS;
        if (buf) {
            dsv2_dequant_i4_rows(buf, W, rb, rb + n);
            const dsv2_mat F = {DSV2_F32, buf, NULL, n, K, 0};
            dsv2_gemv_rows(y + rb, ldy, x, ldx, T, &F, 0, n);
        } else { /* no memory for the rows: one element at a time */
            for (int64_t r = rb; r < rb + n; r++)
                for (int t = 0; t < T; t++) {
                    float acc = 0.0f;
                    for (int64_t k = 0; k < K; k++) acc += x[t * ldx + k] * dsv2_mat_get(W, r, k);
                    y[t * ldy + r] = acc;
                }
        }
    }
    if (buf != stackbuf) free(buf);
}
