/* mla_bf16dp.c - latent attention's scores and values on vdpbf16ps (bf16 compute mode). */
#include "mla_bf16dp.h"
#include "cpu.h"
#include "gemm_bf16dp.h"
#include "mla.h"

#include <immintrin.h>

#include "bf16_vec.h"
#include "mla_softmax.h"

#include <math.h>
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
 * horizontal sums; each row's numbers are read once per head group, and row r's 16 scores are
 * stored as they are, a vector s[r] (heads in lanes: the softmax below works on whole vectors).
 * Rows past the end are clamped (computed, not stored).  The next tile's rows are prefetched into
 * L1 and, when fk is given, the next block's into L2.  A head's score is the same sum whatever the
 * group it shares (lanes are independent), so any split of the heads gives the same bits.
 * (Zen 4, one decode token of V2-Lite over 32768 bf16 rows: the scores 2.69 ms on 1 thread with the rows
 * in L2, 2.77 streamed from memory, ~96% of the vdpbf16ps peak; the values 2.40 ms; the whole call
 * with the softmax, the split and the merge 6.1 ms, 3.1 ms on 2 threads, against 6.6 and 3.4-3.6
 * when the softmax ran per head on transposed scores.) */
enum { RT = 8 };

// qg [ceil(D / 2), 16] bf16 pairs , bf16 rows k [n, D] (ldk bytes apart) -> s [n, 16] (heads in lanes)
DSV2_TARGET_AVX512BF16 static void scores_lanes(float *s, const uint32_t *qg, const char *k, int64_t ldk, int64_t n,
                                                int64_t D, const char *fk, int64_t fn) {
    const int64_t P = (D + 1) / 2, Pf = D / 2;
    for (int64_t j0 = 0; j0 < n; j0 += RT) {
        const char *kr[RT], *pr[RT], *fr[RT];
        int far;
        const int64_t nr = dsv2_mla_tile_rows(kr, pr, fr, &far, RT, k, ldk, n, j0, fk, fn);
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
        for (int r = 0; r < nr; r++) _mm512_store_ps(s + (j0 + r) * 16, acc[r]);
    }
}

/* The online softmax of one block for the 16 heads of a group (mla_softmax.h), then the weights
 * p = exp(scale s - m) rounded to bf16 (nearest even) as pairs of rows:
 * s [n, 16] scores -> pw [ceil(n / 2), 16] 32-bit words (p[2i] low, p[2i + 1] high; an odd n pads
 * with a 0), m, l, o updated as dsv2_mla_softmax_lanes does */
DSV2_TARGET_AVX512BF16 static void softmax_lanes(uint32_t *pw, float *m, float *l, float *o, int64_t ldo, int64_t nh,
                                                 int64_t L, float *s, int64_t n, float scale) {
    dsv2_mla_softmax_lanes(m, l, o, ldo, nh, L, s, n, scale);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t r = 0; r < n; r += 2) {
        const __m512i a = dsv2_bf16_rne_hi_avx512(_mm512_load_si512((const void *)(s + r * 16)));
        const __m512i b = r + 1 < n ? dsv2_bf16_rne_hi_avx512(_mm512_load_si512((const void *)(s + (r + 1) * 16)))
                                    : _mm512_setzero_si512();
        _mm512_store_si512((void *)(pw + (r / 2) * 16),
                           _mm512_or_si512(_mm512_srli_epi32(a, 16), _mm512_and_si512(b, hi)));
    }
}

/* NH heads x NC (32 or 64) columns of o from column c0, over the n rows of c two at a time:
 * the two rows' numbers interleaved into bf16 pairs (unpacklo / unpackhi of 16-bit words),
 * each head's two weights broadcast as one pair (pw [ceil(n / 2), 16], head h in word h);
 * first: o starts from 0 instead of its contents */
DSV2_TARGET_AVX512BF16 static inline __attribute__((always_inline)) void
pv_tile_dp(float *o, int64_t ldo, const uint32_t *pw, const int NH, const char *c, int64_t ldc, int64_t n,
           int64_t c0, const int NV, int first) {
    __m512 acc[4][4];
    for (int h = 0; h < NH; h++)
        for (int v = 0; v < NV; v++)
            acc[h][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + h * ldo + c0 + 16 * v);
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
        const uint32_t *pj = pw + (j / 2) * 16;
        for (int h = 0; h < NH; h++) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int32_t)pj[h]);
            for (int v = 0; v < NV; v++) acc[h][v] = _mm512_dpbf16_ps(acc[h][v], w[v], pb);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(o + h * ldo + c0 + 16 * v, acc[h][v]);
}

#define PV_DP(NH)                                                                                          \
    DSV2_TARGET_AVX512BF16 static void pv_dp_h##NH(float *o, int64_t ldo, const uint32_t *pw, const char *c, \
                                                   int64_t ldc, int64_t n, int64_t L, int first) {         \
        int64_t c0 = 0;                                                                                    \
        for (; c0 + 64 <= L; c0 += 64) pv_tile_dp(o, ldo, pw, NH, c, ldc, n, c0, 4, first);                \
        if (c0 < L) pv_tile_dp(o, ldo, pw, NH, c, ldc, n, c0, 2, first);                                   \
    }
PV_DP(1)
PV_DP(2)
PV_DP(3)
PV_DP(4)

// pw [ceil(n / 2), 16] weight pairs , bf16 rows c [n] -> o [nh, L] (rows ldo apart) += p c[:, :L]
static void pv_group(float *o, int64_t ldo, const uint32_t *pw, int64_t nh, const dsv2_mla_rows *c, int64_t n,
                     int first) {
    int64_t h0 = 0;
    for (; h0 + 4 <= nh; h0 += 4) pv_dp_h4(o + h0 * ldo, ldo, pw + h0, c->p, c->ld, n, c->L, first);
    switch (nh - h0) {
    case 3: pv_dp_h3(o + h0 * ldo, ldo, pw + h0, c->p, c->ld, n, c->L, first); break;
    case 2: pv_dp_h2(o + h0 * ldo, ldo, pw + h0, c->p, c->ld, n, c->L, first); break;
    case 1: pv_dp_h1(o + h0 * ldo, ldo, pw + h0, c->p, c->ld, n, c->L, first); break;
    default: break;
    }
}

size_t dsv2_mla_bf16dp_work_len(void) {
    return (size_t)DSV2_MLA_BF16DP_KB * 16 + (size_t)(DSV2_MLA_BF16DP_KB / 2) * 16;
}

int dsv2_mla_bf16dp_block(float *o, int64_t ldo, float *m, float *l, float *work, const uint32_t *qp, int64_t H,
                          const dsv2_mla_rows *k, int64_t n, float scale, int first) {
    if (n <= 0 || n > DSV2_MLA_BF16DP_KB || H <= 0 || k->L % 32 || k->dtype != DSV2_KV_BF16 ||
        ((uintptr_t)work & 63) || ((uintptr_t)qp & 63))
        return DSV2_ERR_ARG;
    const int64_t D = k->L + k->rope, P = (D + 1) / 2;
    float *s = work;
    uint32_t *pw = (uint32_t *)(work + DSV2_MLA_BF16DP_KB * 16);
    for (int64_t g = 0; g < H; g += 16) {
        const int64_t nh = H - g < 16 ? H - g : 16;
        scores_lanes(s, qp + (g / 16) * P * 16, k->p, k->ld, n, D, g == 0 ? k->pf : NULL, k->pf_n);
        softmax_lanes(pw, m + g, l + g, o + g * ldo, ldo, nh, k->L, s, n, scale);
        pv_group(o + g * ldo, ldo, pw, nh, k, n, first);
    }
    return DSV2_OK;
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
