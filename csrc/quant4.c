/* quant4.c - the int4 quantizer (int4.h) and dequantization of rows.
 *
 * The group fits run 16 groups side by side ("lanes"): each lane does the
 * scalar sequence of fp32 operations of int4.h in the same order, so the
 * compiler's vectorisation of the lane loops (AVX-512, AVX2 or none) cannot
 * change a bit.  The build keeps fp contraction off (setup.py): no fused
 * multiply-adds where the format specifies two roundings. */
#include "int4.h"
#include "cpu.h"
#include "gemv.h"
#include "threadpool.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#define LANES 16
#define NCAND 22

/* The groups of a block of rows: x [ng][32] (absent columns hold a present
 * value of their group, or 0), n [ng] present columns per group.  Three
 * implementations of step 1, identical in every bit: one group at a time
 * (portable), 8 or 16 groups side by side in AVX2 / AVX-512 lanes. */

/* candidate j's iscale numerator */
static inline float cand_c(int j) { return j == 0 ? 15.0f : 14.0f + 0.1f * (float)(j - 1); }

/* step 1 of int4.h, one group at a time (any instruction set) */
static void fit_portable(float *s_out, float *mn_out, const float *x, const float *nv, int64_t ng) {
    for (int64_t g = 0; g < ng; g++) {
        const float *xg = x + g * DSV2_I4_GROUP, n = nv[g];
        const int np = (int)n;
        float lo = 0.0f, hi = xg[0], sx = 0.0f;
        for (int i = 0; i < np; i++) {
            lo = xg[i] < lo ? xg[i] : lo;
            hi = xg[i] > hi ? xg[i] : hi;
            sx = sx + xg[i];
        }
        const float rng = hi - lo;
        float bs = 0.0f, bm = lo, be = 0.0f;
        if (rng > 0.0f)
            for (int j = 0; j < NCAND; j++) {
                const float is = cand_c(j) / rng;
                float sl = 0.0f, sll = 0.0f, sxl = 0.0f;
                for (int i = 0; i < np; i++) {
                    float L = nearbyintf(is * (xg[i] - lo));
                    L = L > 15.0f ? 15.0f : L;
                    sl = sl + L;
                    sll = sll + L * L;
                    sxl = sxl + xg[i] * L;
                }
                float sv, mv;
                if (j == 0) {
                    sv = rng / 15.0f;
                    mv = lo;
                } else {
                    const float D = n * sll - sl * sl;
                    if (!(D > 0.0f)) continue;
                    sv = (n * sxl - sx * sl) / D;
                    mv = (sll * sx - sl * sxl) / D;
                    if (mv > 0.0f) {
                        mv = 0.0f;
                        sv = sxl / sll;
                    }
                }
                const float err = sv * (sv * sll + 2.0f * (mv * sl - sxl)) + mv * (n * mv - 2.0f * sx);
                if (j == 0 || err < be) {
                    bs = sv;
                    bm = mv;
                    be = err;
                }
            }
        s_out[g] = bs;
        mn_out[g] = bm;
    }
}

/* the same operations for 16 groups side by side (lane l = group g0 + l) */
DSV2_TARGET_AVX512 static void fit_avx512(float *s_out, float *mn_out, const float *x, const float *nv, int64_t ng) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(DSV2_I4_GROUP));
    const __m512 zero = _mm512_setzero_ps(), fifteen = _mm512_set1_ps(15.0f), two = _mm512_set1_ps(2.0f);
    for (int64_t g0 = 0; g0 < ng; g0 += LANES) {
        const __mmask16 live = (__mmask16)(ng - g0 >= LANES ? 0xffff : (1u << (ng - g0)) - 1u);
        const float *xb = x + g0 * DSV2_I4_GROUP;
        const __m512 n = _mm512_maskz_loadu_ps(live, nv + g0);
        __m512 xt[DSV2_I4_GROUP], xl[DSV2_I4_GROUP];
        __mmask16 pm[DSV2_I4_GROUP];
        __m512 lo = zero, hi = _mm512_mask_i32gather_ps(zero, live, idx, xb, 4), sx = zero;
        for (int i = 0; i < DSV2_I4_GROUP; i++) {
            pm[i] = _mm512_cmp_ps_mask(n, _mm512_set1_ps((float)i), _CMP_GT_OQ);
            xt[i] = _mm512_mask_i32gather_ps(zero, live, idx, xb + i, 4);
            lo = _mm512_mask_blend_ps(pm[i] & _mm512_cmp_ps_mask(xt[i], lo, _CMP_LT_OQ), lo, xt[i]);
            hi = _mm512_mask_blend_ps(pm[i] & _mm512_cmp_ps_mask(xt[i], hi, _CMP_GT_OQ), hi, xt[i]);
            sx = _mm512_mask_add_ps(sx, pm[i], sx, xt[i]);
        }
        const __m512 rng = _mm512_sub_ps(hi, lo);
        const __mmask16 pos = _mm512_cmp_ps_mask(rng, zero, _CMP_GT_OQ);
        for (int i = 0; i < DSV2_I4_GROUP; i++) xl[i] = _mm512_sub_ps(xt[i], lo);
        __m512 bs = zero, bm = lo, be = zero;
        for (int j = 0; j < NCAND; j++) {
            const __m512 is = _mm512_maskz_div_ps(pos, _mm512_set1_ps(cand_c(j)), rng);
            __m512 sl = zero, sll = zero, sxl = zero;
            for (int i = 0; i < DSV2_I4_GROUP; i++) {
                __m512 L = _mm512_roundscale_ps(_mm512_mul_ps(is, xl[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                L = _mm512_min_ps(L, fifteen);
                sl = _mm512_mask_add_ps(sl, pm[i], sl, L);
                sll = _mm512_mask_add_ps(sll, pm[i], sll, _mm512_mul_ps(L, L));
                sxl = _mm512_mask_add_ps(sxl, pm[i], sxl, _mm512_mul_ps(xt[i], L));
            }
            __m512 sv, mv;
            __mmask16 ok = pos;
            if (j == 0) {
                sv = _mm512_div_ps(rng, fifteen);
                mv = lo;
            } else {
                const __m512 D = _mm512_sub_ps(_mm512_mul_ps(n, sll), _mm512_mul_ps(sl, sl));
                ok &= _mm512_cmp_ps_mask(D, zero, _CMP_GT_OQ);
                sv = _mm512_maskz_div_ps(ok, _mm512_sub_ps(_mm512_mul_ps(n, sxl), _mm512_mul_ps(sx, sl)), D);
                mv = _mm512_maskz_div_ps(ok, _mm512_sub_ps(_mm512_mul_ps(sll, sx), _mm512_mul_ps(sl, sxl)), D);
                const __mmask16 up = _mm512_cmp_ps_mask(mv, zero, _CMP_GT_OQ);
                mv = _mm512_mask_mov_ps(mv, up, zero);
                sv = _mm512_mask_div_ps(sv, up, sxl, sll);
            }
            const __m512 e1 = _mm512_add_ps(_mm512_mul_ps(sv, sll), _mm512_mul_ps(two, _mm512_sub_ps(_mm512_mul_ps(mv, sl), sxl)));
            const __m512 e2 = _mm512_sub_ps(_mm512_mul_ps(n, mv), _mm512_mul_ps(two, sx));
            const __m512 err = _mm512_add_ps(_mm512_mul_ps(sv, e1), _mm512_mul_ps(mv, e2));
            const __mmask16 take = j == 0 ? ok : (__mmask16)(ok & _mm512_cmp_ps_mask(err, be, _CMP_LT_OQ));
            bs = _mm512_mask_mov_ps(bs, take, sv);
            bm = _mm512_mask_mov_ps(bm, take, mv);
            be = _mm512_mask_mov_ps(be, take, err);
        }
        _mm512_mask_storeu_ps(s_out + g0, live, bs);
        _mm512_mask_storeu_ps(mn_out + g0, live, bm);
    }
}

/* the same operations for 8 groups side by side with AVX2 (masked operations as a
 * full operation and a blend: the same values where the mask is set) */
DSV2_TARGET_AVX2 static void fit_avx2(float *s_out, float *mn_out, const float *x, const float *nv, int64_t ng) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(DSV2_I4_GROUP));
    const __m256 zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.0f), two = _mm256_set1_ps(2.0f),
                 one = _mm256_set1_ps(1.0f);
    for (int64_t g0 = 0; g0 < ng; g0 += 8) {
        const int nl = ng - g0 >= 8 ? 8 : (int)(ng - g0);
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(nl), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
        const float *xb = x + g0 * DSV2_I4_GROUP;
        const __m256 n = _mm256_maskload_ps(nv + g0, lanes);
        __m256 xt[DSV2_I4_GROUP], xl[DSV2_I4_GROUP], pm[DSV2_I4_GROUP];
        __m256 lo = zero, sx = zero;
        __m256 hi = _mm256_mask_i32gather_ps(zero, xb, idx, _mm256_castsi256_ps(lanes), 4);
        for (int i = 0; i < DSV2_I4_GROUP; i++) {
            pm[i] = _mm256_cmp_ps(n, _mm256_set1_ps((float)i), _CMP_GT_OQ);
            xt[i] = _mm256_mask_i32gather_ps(zero, xb + i, idx, _mm256_castsi256_ps(lanes), 4);
            lo = _mm256_blendv_ps(lo, xt[i], _mm256_and_ps(pm[i], _mm256_cmp_ps(xt[i], lo, _CMP_LT_OQ)));
            hi = _mm256_blendv_ps(hi, xt[i], _mm256_and_ps(pm[i], _mm256_cmp_ps(xt[i], hi, _CMP_GT_OQ)));
            sx = _mm256_blendv_ps(sx, _mm256_add_ps(sx, xt[i]), pm[i]);
        }
        const __m256 rng = _mm256_sub_ps(hi, lo);
        const __m256 pos = _mm256_cmp_ps(rng, zero, _CMP_GT_OQ);
        const __m256 rsafe = _mm256_blendv_ps(one, rng, pos);
        for (int i = 0; i < DSV2_I4_GROUP; i++) xl[i] = _mm256_sub_ps(xt[i], lo);
        __m256 bs = zero, bm = lo, be = zero;
        for (int j = 0; j < NCAND; j++) {
            const __m256 is = _mm256_and_ps(pos, _mm256_div_ps(_mm256_set1_ps(cand_c(j)), rsafe));
            __m256 sl = zero, sll = zero, sxl = zero;
            for (int i = 0; i < DSV2_I4_GROUP; i++) {
                __m256 L = _mm256_round_ps(_mm256_mul_ps(is, xl[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                L = _mm256_min_ps(L, fifteen);
                sl = _mm256_blendv_ps(sl, _mm256_add_ps(sl, L), pm[i]);
                sll = _mm256_blendv_ps(sll, _mm256_add_ps(sll, _mm256_mul_ps(L, L)), pm[i]);
                sxl = _mm256_blendv_ps(sxl, _mm256_add_ps(sxl, _mm256_mul_ps(xt[i], L)), pm[i]);
            }
            __m256 sv, mv, ok = pos;
            if (j == 0) {
                sv = _mm256_div_ps(rng, fifteen);
                mv = lo;
            } else {
                const __m256 D = _mm256_sub_ps(_mm256_mul_ps(n, sll), _mm256_mul_ps(sl, sl));
                ok = _mm256_and_ps(ok, _mm256_cmp_ps(D, zero, _CMP_GT_OQ));
                const __m256 Dd = _mm256_blendv_ps(one, D, ok);
                sv = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(n, sxl), _mm256_mul_ps(sx, sl)), Dd);
                mv = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sll, sx), _mm256_mul_ps(sl, sxl)), Dd);
                const __m256 up = _mm256_cmp_ps(mv, zero, _CMP_GT_OQ);
                mv = _mm256_blendv_ps(mv, zero, up);
                sv = _mm256_blendv_ps(sv, _mm256_div_ps(sxl, _mm256_blendv_ps(one, sll, up)), up);
            }
            const __m256 e1 = _mm256_add_ps(_mm256_mul_ps(sv, sll), _mm256_mul_ps(two, _mm256_sub_ps(_mm256_mul_ps(mv, sl), sxl)));
            const __m256 e2 = _mm256_sub_ps(_mm256_mul_ps(n, mv), _mm256_mul_ps(two, sx));
            const __m256 err = _mm256_add_ps(_mm256_mul_ps(sv, e1), _mm256_mul_ps(mv, e2));
            const __m256 take = j == 0 ? ok : _mm256_and_ps(ok, _mm256_cmp_ps(err, be, _CMP_LT_OQ));
            bs = _mm256_blendv_ps(bs, sv, take);
            bm = _mm256_blendv_ps(bm, mv, take);
            be = _mm256_blendv_ps(be, err, take);
        }
        _mm256_maskstore_ps(s_out + g0, lanes, bs);
        _mm256_maskstore_ps(mn_out + g0, lanes, bm);
    }
}

/* fp32 -> bf16 bits rounded toward +inf (x >= 0 finite) */
static inline uint16_t bf16_up(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if (u & 0xffffu) u = (u & 0xffff0000u) + 0x10000u;
    return (uint16_t)(u >> 16);
}

static inline float rint_clamp(float v, float hi) {
    v = nearbyintf(v);
    return v < 0.0f ? 0.0f : v > hi ? hi : v;
}

/* codes of one group: x [32] (n present), a, b -> q [32] (absent: 0) */
static void codes_portable(uint8_t *q, const float *x, int n, float a, float b) {
    for (int i = 0; i < DSV2_I4_GROUP; i++) q[i] = i < n && a > 0.0f ? (uint8_t)rint_clamp((x[i] + b) / a, 15.0f) : 0;
}

DSV2_TARGET_AVX512 static void codes_avx512(uint8_t *q, const float *x, int n, float a, float b) {
    if (!(a > 0.0f)) {
        memset(q, 0, DSV2_I4_GROUP);
        return;
    }
    const __m512 av = _mm512_set1_ps(a), bv = _mm512_set1_ps(b), hi = _mm512_set1_ps(15.0f), zero = _mm512_setzero_ps();
    for (int h = 0; h < 2; h++) {
        const int m = n - 16 * h;
        const __mmask16 pm = (__mmask16)(m >= 16 ? 0xffff : m <= 0 ? 0 : (1u << m) - 1u);
        __m512 v = _mm512_div_ps(_mm512_add_ps(_mm512_loadu_ps(x + 16 * h), bv), av);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_maskz_mov_ps(pm, _mm512_min_ps(_mm512_max_ps(v, zero), hi));
        _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
}

/* steps 2 and 3 of int4.h for one row: x [Kp] fp32, s / mn [nb] -> q row */
static void encode_row(uint8_t *q, const float *x, int64_t cols, const float *s, const float *mn, int avx512) {
    const int64_t Kp = dsv2_i4_kp(cols), nsb = dsv2_i4_nsb(cols);
    for (int64_t sb = 0; sb < nsb; sb++) {
        uint8_t *h = q + sb * DSV2_I4_SB_BYTES;
        const int64_t c0 = sb * DSV2_I4_SUPER, c1 = c0 + DSV2_I4_SUPER < Kp ? c0 + DSV2_I4_SUPER : Kp;
        const int ng = (int)((c1 - c0) / DSV2_I4_GROUP);
        float S[8], M[8], smax = 0.0f, mmax = 0.0f;
        for (int g = 0; g < ng; g++) {
            const int64_t gi = c0 / DSV2_I4_GROUP + g;
            S[g] = s[gi] > 0.0f ? s[gi] : 0.0f;
            M[g] = -mn[gi] > 0.0f ? -mn[gi] : 0.0f;
            smax = S[g] > smax ? S[g] : smax;
            mmax = M[g] > mmax ? M[g] : mmax;
        }
        const uint16_t db = bf16_up(smax / 255.0f), mb = bf16_up(mmax / 255.0f);
        const float d = dsv2_bf16_to_f32(db), dmin = dsv2_bf16_to_f32(mb);
        memset(h, 0, DSV2_I4_HDR);
        h[0] = (uint8_t)(db & 0xff);
        h[1] = (uint8_t)(db >> 8);
        h[2] = (uint8_t)(mb & 0xff);
        h[3] = (uint8_t)(mb >> 8);
        for (int g = 0; g < ng; g += 2) {
            uint8_t cq[2][DSV2_I4_GROUP];
            for (int k = 0; k < 2; k++) {
                const float sc = d > 0.0f ? rint_clamp(S[g + k] / d, 255.0f) : 0.0f;
                const float m = dmin > 0.0f ? rint_clamp(M[g + k] / dmin, 255.0f) : 0.0f;
                h[4 + g + k] = (uint8_t)sc;
                h[12 + g + k] = (uint8_t)m;
                const int64_t c = c0 + (g + k) * DSV2_I4_GROUP;
                const int n = (int)(cols - c <= 0 ? 0 : cols - c < DSV2_I4_GROUP ? cols - c : DSV2_I4_GROUP);
                if (avx512) codes_avx512(cq[k], x + c, n, d * sc, dmin * m);
                else codes_portable(cq[k], x + c, n, d * sc, dmin * m);
            }
            uint8_t *u = h + DSV2_I4_HDR + (g / 2) * 32;
            for (int i = 0; i < DSV2_I4_GROUP; i++) u[i] = (uint8_t)(cq[0][i] | cq[1][i] << 4);
        }
    }
}

typedef struct {
    uint8_t *q;
    const dsv2_mat *W;
    int64_t rpb; /* rows per block (so that a block has >= 16 groups) */
    atomic_int bad, nomem;
} q4_job;

static void q4_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    q4_job *j = (q4_job *)ctx;
    const dsv2_mat *W = j->W;
    const int64_t K = W->cols, Kp = dsv2_i4_kp(K), nb = Kp / DSV2_I4_GROUP, R = j->rpb;
    const size_t rb = (size_t)dsv2_i4_row_bytes(K);
    /* x [R][Kp] (absent columns filled), S, MN, n [R * nb] */
    float *buf = (float *)malloc((size_t)R * (size_t)(Kp + 3 * nb) * sizeof(float));
    if (!buf) {
        atomic_store(&j->nomem, 1);
        return;
    }
    float *S = buf + R * Kp, *MN = S + R * nb, *nv = MN + R * nb;
    const int isa = dsv2_isa(), avx512 = isa == DSV2_ISA_AVX512;
    int bad = 0;
    for (int64_t r0 = b; r0 < e && !bad; r0 += R) {
        const int64_t nr = e - r0 < R ? e - r0 : R;
        for (int64_t r = 0; r < nr; r++) {
            float *xr = buf + r * Kp;
            if (W->dtype == DSV2_F32) memcpy(xr, (const float *)W->data + (r0 + r) * K, (size_t)K * sizeof(float));
            else dsv2_bf16_row_to_f32(xr, (const uint16_t *)W->data + (r0 + r) * K, K);
            for (int64_t c = 0; c < K; c++) bad |= !(fabsf(xr[c]) <= FLT_MAX);
            /* absent columns: the group's first value (min / max unchanged), 0 in an empty group */
            const int64_t gl = K / DSV2_I4_GROUP; /* the group holding column K: partly present if K % 32 */
            for (int64_t c = K; c < Kp; c++)
                xr[c] = c / DSV2_I4_GROUP == gl && K % DSV2_I4_GROUP ? xr[gl * DSV2_I4_GROUP] : 0.0f;
            for (int64_t g = 0; g < nb; g++) {
                const int64_t n = K - g * DSV2_I4_GROUP;
                nv[r * nb + g] = (float)(n <= 0 ? 0 : n < DSV2_I4_GROUP ? n : DSV2_I4_GROUP);
            }
        }
        if (bad) break;
        if (avx512) fit_avx512(S, MN, buf, nv, nr * nb);
        else if (isa >= DSV2_ISA_AVX2) fit_avx2(S, MN, buf, nv, nr * nb);
        else fit_portable(S, MN, buf, nv, nr * nb);
        for (int64_t r = 0; r < nr; r++)
            encode_row(j->q + (size_t)(r0 + r) * rb, buf + r * Kp, K, S + r * nb, MN + r * nb, avx512);
    }
    free(buf);
    if (bad) atomic_store(&j->bad, 1);
}

int dsv2_quantize_i4(uint8_t *q, const dsv2_mat *W) {
    if (!q || !W || !W->data || W->rows < 0 || W->cols <= 0) return DSV2_ERR_ARG;
    if (W->dtype != DSV2_F32 && W->dtype != DSV2_BF16) return DSV2_ERR_DTYPE;
    const int64_t nb = dsv2_i4_kp(W->cols) / DSV2_I4_GROUP;
    q4_job j;
    j.q = q;
    j.W = W;
    j.rpb = (LANES + nb - 1) / nb;
    atomic_init(&j.bad, 0);
    atomic_init(&j.nomem, 0);
    int64_t grain = (int64_t)(1 << 14) / W->cols;
    if (grain < j.rpb) grain = j.rpb;
    dsv2_parallel_for(W->rows, grain, q4_task, &j);
    if (atomic_load(&j.nomem)) return DSV2_ERR_NOMEM;
    return atomic_load(&j.bad) ? DSV2_ERR_NONFINITE : DSV2_OK;
}

/* ---------------- dequantize ---------------- */

static void dequant_row_portable(float *out, const uint8_t *row, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++) out[c - c0] = dsv2_i4_get(row, c);
}

/* whole super-blocks, 32 columns (one group) at a time */
DSV2_TARGET_AVX512 static void dequant_row_avx512(float *out, const uint8_t *row, int64_t K) {
    const int64_t Kp = dsv2_i4_kp(K);
    const __m128i m4 = _mm_set1_epi8(15);
    for (int64_t c0 = 0; c0 < Kp; c0 += DSV2_I4_SUPER) {
        const uint8_t *h = row + (c0 / DSV2_I4_SUPER) * DSV2_I4_SB_BYTES;
        const float d = dsv2_bf16_to_f32((uint16_t)(h[0] | h[1] << 8));
        const float dmin = dsv2_bf16_to_f32((uint16_t)(h[2] | h[3] << 8));
        const int64_t ng = (Kp - c0 < DSV2_I4_SUPER ? Kp - c0 : DSV2_I4_SUPER) / DSV2_I4_GROUP;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c = c0 + g * DSV2_I4_GROUP;
            if (c >= K) break;
            const __m512 a = _mm512_set1_ps(d * (float)h[4 + g]), b = _mm512_set1_ps(dmin * (float)h[12 + g]);
            const uint8_t *u = h + DSV2_I4_HDR + (g / 2) * 32;
            __m128i v0 = _mm_loadu_si128((const __m128i *)u), v1 = _mm_loadu_si128((const __m128i *)(u + 16));
            if (g & 1) {
                v0 = _mm_srli_epi16(v0, 4);
                v1 = _mm_srli_epi16(v1, 4);
            }
            v0 = _mm_and_si128(v0, m4);
            v1 = _mm_and_si128(v1, m4);
            const __m512 w0 = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v0))), b);
            const __m512 w1 = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v1))), b);
            const int64_t n = K - c < DSV2_I4_GROUP ? K - c : DSV2_I4_GROUP;
            if (n == DSV2_I4_GROUP) {
                _mm512_storeu_ps(out + c, w0);
                _mm512_storeu_ps(out + c + 16, w1);
            } else {
                _mm512_mask_storeu_ps(out + c, (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1u), w0);
                if (n > 16) _mm512_mask_storeu_ps(out + c + 16, (__mmask16)((1u << (n - 16)) - 1u), w1);
            }
        }
    }
}

void dsv2_dequant_i4_rows(float *out, const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int64_t K = W->cols;
    const size_t rb = (size_t)dsv2_i4_row_bytes(K);
    const int fast = dsv2_isa() == DSV2_ISA_AVX512;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)W->data + (size_t)r * rb;
        if (fast) dequant_row_avx512(out + (r - r0) * K, row, K);
        else dequant_row_portable(out + (r - r0) * K, row, 0, K);
    }
}

void dsv2_dequant_i4_cols(float *out, const dsv2_mat *W, int64_t r, int64_t c0, int64_t c1) {
    dequant_row_portable(out, (const uint8_t *)W->data + (size_t)r * (size_t)dsv2_i4_row_bytes(W->cols), c0, c1);
}
