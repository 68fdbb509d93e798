/* mla_bf16dp.c - latent attention's scores and values on vdpbf16ps (bf16 compute mode). */
#include "mla_bf16dp.h"
#include "cpu.h"
#include "gemm_bf16dp.h"
#include "mla.h"

#include <immintrin.h>

#include "vec_sum.h"
#include <string.h>

int dsv2_mla_bf16dp_use(int dtype, int64_t kv_lora) {
    return dtype == DSV2_KV_BF16 && kv_lora % 32 == 0 && dsv2_get_bf16_compute() == 1 && dsv2_bf16dp_available();
}

/* SH = 8 query rows x SK = 2 key rows (16 accumulators), 32 numbers a step (the tail masked);
 * rows past the ends are clamped (computed, not stored).  During the first pass over the heads
 * the next tile's rows are prefetched into L1 and the next block's (fk) into L2.  (Zen 4, lite-L4
 * decode at 32K: scores / values time 1.5 with 8 x 2 tiles, 1.7 with 4 x 4, 2.5 with 16 x 1.) */
DSV2_TARGET_AVX512BF16 static void scores_dp(float *s, int64_t lds, const uint16_t *q, int64_t ldq, int64_t H,
                                             const char *k, int64_t ldk, int64_t n, int64_t D, const char *fk,
                                             int64_t fn) {
    enum { SH = 8, SK = 2 };
    const int64_t Df = D & ~(int64_t)31;
    const __mmask32 mt = (__mmask32)((1ull << (D - Df)) - 1ull);
    for (int64_t h0 = 0; h0 < H; h0 += SH) {
        const int64_t nh = H - h0 < SH ? H - h0 : SH;
        const int pf = h0 == 0;
        const uint16_t *qr[SH];
        for (int i = 0; i < SH; i++) qr[i] = q + (h0 + (nh > i ? i : 0)) * ldq;
        for (int64_t j0 = 0; j0 < n; j0 += SK) {
            const int64_t nj = n - j0 < SK ? n - j0 : SK;
            const int64_t jn = j0 + SK < n ? j0 + SK : j0, nn = n - jn < SK ? n - jn : SK;
            const uint16_t *kr[SK];
            const char *pr[SK], *fr[SK];
            const int far = pf && fk && j0 < fn;
            for (int i = 0; i < SK; i++) {
                kr[i] = (const uint16_t *)(k + (j0 + (nj > i ? i : 0)) * ldk);
                pr[i] = k + (jn + (nn > i ? i : 0)) * ldk;
                fr[i] = far ? fk + (j0 + i < fn ? j0 + i : fn - 1) * ldk : NULL;
            }
            __m512 a[16];
            for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
            int64_t d = 0;
            for (; d < Df; d += 32) {
                if (pf)
                    for (int i = 0; i < SK; i++) _mm_prefetch(pr[i] + d * 2, _MM_HINT_T0);
                if (far)
                    for (int i = 0; i < SK; i++) _mm_prefetch(fr[i] + d * 2, _MM_HINT_T1);
                __m512bh kv[SK];
                for (int i = 0; i < SK; i++) kv[i] = (__m512bh)_mm512_loadu_si512((const void *)(kr[i] + d));
                for (int hh = 0; hh < SH; hh++) {
                    const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(qr[hh] + d));
                    for (int i = 0; i < SK; i++) a[SK * hh + i] = _mm512_dpbf16_ps(a[SK * hh + i], qv, kv[i]);
                }
            }
            if (d < D) { /* the last D % 32 numbers, zero-padded */
                __m512bh kv[SK];
                for (int i = 0; i < SK; i++) kv[i] = (__m512bh)_mm512_maskz_loadu_epi16(mt, kr[i] + d);
                for (int hh = 0; hh < SH; hh++) {
                    const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(mt, qr[hh] + d);
                    for (int i = 0; i < SK; i++) a[SK * hh + i] = _mm512_dpbf16_ps(a[SK * hh + i], qv, kv[i]);
                }
            }
            float r[16];
            for (int i = 0; i < 16; i += 4) _mm_storeu_ps(r + i, dsv2_sum4_ps(a[i], a[i + 1], a[i + 2], a[i + 3]));
            for (int64_t hh = 0; hh < nh; hh++)
                for (int64_t jj = 0; jj < nj; jj++) s[(h0 + hh) * lds + j0 + jj] = r[SK * hh + jj];
        }
    }
}

/* NH heads x NC (32 or 64) columns of o from column c0, over the n rows of c two at a time:
 * the two rows' numbers interleaved into bf16 pairs (unpacklo / unpackhi of 16-bit words),
 * each head's two weights broadcast as one pair */
DSV2_TARGET_AVX512BF16 static inline __attribute__((always_inline)) void
pv_tile_dp(float *o, int64_t ldo, const uint16_t *p, int64_t ldp, const int NH, const char *c, int64_t ldc,
           int64_t n, int64_t c0, const int NV) {
    __m512 acc[4][4];
    for (int h = 0; h < NH; h++)
        for (int v = 0; v < NV; v++) acc[h][v] = _mm512_loadu_ps(o + h * ldo + c0 + 16 * v);
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t j = 0; j < n; j += 2) {
        const uint16_t *ra = (const uint16_t *)(c + j * ldc) + c0;
        const uint16_t *rb = (const uint16_t *)(c + (j + 1) * ldc) + c0;
        const int has_b = j + 1 < n;
        __m512bh w[4];
        for (int g = 0; g < NV / 2; g++) {
            const __m512i a = _mm512_loadu_si512((const void *)(ra + 32 * g));
            const __m512i b = has_b ? _mm512_loadu_si512((const void *)(rb + 32 * g)) : zero;
            w[2 * g] = (__m512bh)_mm512_unpacklo_epi16(a, b);
            w[2 * g + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
        }
        for (int h = 0; h < NH; h++) {
            int32_t pp;
            memcpy(&pp, p + h * ldp + j, 4);
            const __m512bh pb = (__m512bh)_mm512_set1_epi32(pp);
            for (int v = 0; v < NV; v++) acc[h][v] = _mm512_dpbf16_ps(acc[h][v], w[v], pb);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(o + h * ldo + c0 + 16 * v, acc[h][v]);
}

#define PV_DP(NH)                                                                                        \
    DSV2_TARGET_AVX512BF16 static void pv_dp_h##NH(float *o, int64_t ldo, const uint16_t *p, int64_t ldp,   \
                                                   const char *c, int64_t ldc, int64_t n, int64_t L) {    \
        int64_t c0 = 0;                                                                                  \
        for (; c0 + 64 <= L; c0 += 64) pv_tile_dp(o, ldo, p, ldp, NH, c, ldc, n, c0, 4);                 \
        if (c0 < L) pv_tile_dp(o, ldo, p, ldp, NH, c, ldc, n, c0, 2);                                    \
    }
PV_DP(1)
PV_DP(2)
PV_DP(3)
PV_DP(4)

void dsv2_mla_scores_bf16dp(float *s, int64_t lds, const uint16_t *q, int64_t ldq, int64_t H,
                            const dsv2_mla_rows *k, int64_t n) {
    if (H <= 0 || n <= 0) return;
    scores_dp(s, lds, q, ldq, H, k->p, k->ld, n, k->L + k->rope, k->pf, k->pf_n);
}

void dsv2_mla_pv_bf16dp(float *o, int64_t ldo, const uint16_t *p, int64_t ldp, int64_t H,
                        const dsv2_mla_rows *c, int64_t n) {
    if (H <= 0 || n <= 0) return;
    int64_t h0 = 0;
    for (; h0 + 4 <= H; h0 += 4) pv_dp_h4(o + h0 * ldo, ldo, p + h0 * ldp, ldp, c->p, c->ld, n, c->L);
    switch (H - h0) {
    case 3: pv_dp_h3(o + h0 * ldo, ldo, p + h0 * ldp, ldp, c->p, c->ld, n, c->L); break;
    case 2: pv_dp_h2(o + h0 * ldo, ldo, p + h0 * ldp, ldp, c->p, c->ld, n, c->L); break;
    case 1: pv_dp_h1(o + h0 * ldo, ldo, p + h0 * ldp, ldp, c->p, c->ld, n, c->L); break;
    default: break;
    }
}

/* position in the kernel's order (0..31 within a group of 32) of natural column col (0..31) */
static inline int dp_pos(int col) { return ((col & 4) ? 16 : 0) + 4 * (col >> 3) + (col & 3); }

void dsv2_mla_bf16dp_natural(float *o, int64_t ldo, int64_t H, int64_t L) {
    for (int64_t h = 0; h < H; h++)
        for (int64_t g = 0; g < L; g += 32) {
            float *v = o + h * ldo + g, t[32];
            for (int col = 0; col < 32; col++) t[col] = v[dp_pos(col)];
            memcpy(v, t, sizeof t);
        }
}
