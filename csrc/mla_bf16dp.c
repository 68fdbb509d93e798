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

size_t dsv2_mla_bf16dp_qpack_len(int64_t H, int64_t D) {
    return (size_t)((H + 15) / 16) * (size_t)((D + 1) / 2) * 16;
}

void dsv2_mla_bf16dp_qpack(uint32_t *qp, const float *q, int64_t ldq, int64_t H, int64_t D) {
    const int64_t P = (D + 1) / 2;
    for (int64_t g = 0; g < H; g += 16)
        for (int64_t i = 0; i < P; i++) {
            uint32_t *o = qp + ((g / 16) * P + i) * 16;
            for (int64_t h = 0; h < 16; h++) {
                const float *qr = q + (g + h) * ldq;
                const uint32_t a = g + h < H ? dsv2_f32_to_bf16(qr[2 * i]) : 0u;
                const uint32_t b = g + h < H && 2 * i + 1 < D ? dsv2_f32_to_bf16(qr[2 * i + 1]) : 0u;
                o[h] = a | (b << 16);
            }
        }
}

/* One group of 16 heads (a head per fp32 lane) x RT = 8 key rows: for each pair of numbers i,
 * acc[r] += qp[i] . (k[r][2i], k[r][2i+1]) broadcast, one vdpbf16ps per pair and row, no
 * horizontal sums; each row's numbers are read once per head group.  Rows past the end are
 * clamped (computed, not stored).  The next tile's rows are prefetched into L1 and, in the
 * first head group, the next block's (fk) into L2.  A head's score is the same sum whatever
 * the group it shares (lanes are independent), so any split of the heads gives the same bits.
 * (Zen 4, one decode token of V2-Lite over 32768 bf16 rows, scores and values: 7.2-7.5 ms on 1 thread
 * and 4.0-4.3 on 2, against 8.5-10.3 and 4.9-5.4 with the former 8-head x 2-row tiles and their
 * horizontal sums.) */
enum { RT = 8 };

DSV2_TARGET_AVX512BF16 static void scores_hl(float *s, int64_t lds, const uint32_t *qp, int64_t H, const char *k,
                                             int64_t ldk, int64_t n, int64_t D, const char *fk, int64_t fn) {
    const int64_t P = (D + 1) / 2, Pf = D / 2;
    for (int64_t h0 = 0; h0 < H; h0 += 16) {
        const int64_t nh = H - h0 < 16 ? H - h0 : 16;
        const uint32_t *qg = qp + (h0 / 16) * P * 16;
        const int first = h0 == 0;
        for (int64_t j0 = 0; j0 < n; j0 += RT) {
            const int64_t nr = n - j0 < RT ? n - j0 : RT;
            const int64_t jn = j0 + RT < n ? j0 + RT : j0, nn = n - jn < RT ? n - jn : RT;
            const char *kr[RT], *pr[RT], *fr[RT];
            const int far = first && fk && j0 < fn;
            for (int r = 0; r < RT; r++) {
                kr[r] = k + (j0 + (nr > r ? r : 0)) * ldk;
                pr[r] = k + (jn + (nn > r ? r : 0)) * ldk;
                fr[r] = far ? fk + (j0 + r < fn ? j0 + r : fn - 1) * ldk : NULL;
            }
            __m512 acc[RT];
            for (int r = 0; r < RT; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t i = 0; i < Pf; i++) {
                if ((i & 15) == 0) { /* one 64-byte line of each row per 16 pairs */
                    for (int r = 0; r < RT; r++) _mm_prefetch(pr[r] + 4 * i, _MM_HINT_T0);
                    if (far)
                        for (int r = 0; r < RT; r++) _mm_prefetch(fr[r] + 4 * i, _MM_HINT_T1);
                }
                const __m512bh qv = (__m512bh)_mm512_load_si512((const void *)(qg + 16 * i));
                for (int r = 0; r < RT; r++) {
                    int32_t kk;
                    memcpy(&kk, kr[r] + 4 * i, 4);
                    acc[r] = _mm512_dpbf16_ps(acc[r], qv, (__m512bh)_mm512_set1_epi32(kk));
                }
            }
            if (Pf < P) { /* odd D: the last number, paired with a 0 */
                const __m512bh qv = (__m512bh)_mm512_load_si512((const void *)(qg + 16 * Pf));
                for (int r = 0; r < RT; r++) {
                    uint16_t kk;
                    memcpy(&kk, kr[r] + 4 * Pf, 2);
                    acc[r] = _mm512_dpbf16_ps(acc[r], qv, (__m512bh)_mm512_set1_epi32((int32_t)kk));
                }
            }
            float t[RT][16] __attribute__((aligned(64)));
            for (int r = 0; r < RT; r++) _mm512_store_ps(t[r], acc[r]);
            for (int64_t h = 0; h < nh; h++)
                for (int64_t r = 0; r < nr; r++) s[(h0 + h) * lds + j0 + r] = t[r][h];
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

void dsv2_mla_scores_bf16dp(float *s, int64_t lds, const uint32_t *qp, int64_t H, const dsv2_mla_rows *k,
                            int64_t n) {
    if (H <= 0 || n <= 0) return;
    scores_hl(s, lds, qp, H, k->p, k->ld, n, k->L + k->rope, k->pf, k->pf_n);
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
