/* mla_tiles.c - q k^T and p c tiles for latent attention. */
#include "mla_tiles.h"
#include "cpu.h"

#include <immintrin.h>
#include <string.h>

/* ---------------- portable / AVX2 (same source, vectorised by the compiler) ---------------- */
static inline __attribute__((always_inline)) float dot_generic(const float *a, const float *b, int64_t D) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        for (int i = 0; i < 8; i++) acc[i] += a[d + i] * b[d + i];
    for (; d < D; d++) acc[0] += a[d] * b[d];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static inline __attribute__((always_inline)) void
scores_generic(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H, const float *k, int64_t ldk,
               int64_t n, int64_t D) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < H; h++) s[h * lds + j] = dot_generic(q + h * ldq, k + j * ldk, D);
}

static inline __attribute__((always_inline)) void
pv_generic(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H, const float *c, int64_t ldc,
           int64_t n, int64_t Dv) {
    for (int64_t h = 0; h < H; h++) {
        float *oh = o + h * ldo;
        for (int64_t j = 0; j < n; j++) {
            const float pj = p[h * ldp + j];
            const float *cj = c + j * ldc;
            for (int64_t d = 0; d < Dv; d++) oh[d] += pj * cj[d];
        }
    }
}

static void scores_portable(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H, const float *k,
                            int64_t ldk, int64_t n, int64_t D) {
    scores_generic(s, lds, q, ldq, H, k, ldk, n, D);
}
DSV2_TARGET_AVX2 static void scores_avx2(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H,
                                         const float *k, int64_t ldk, int64_t n, int64_t D) {
    scores_generic(s, lds, q, ldq, H, k, ldk, n, D);
}
static void pv_portable(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H, const float *c,
                        int64_t ldc, int64_t n, int64_t Dv) {
    pv_generic(o, ldo, p, ldp, H, c, ldc, n, Dv);
}
DSV2_TARGET_AVX2 static void pv_avx2(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H,
                                     const float *c, int64_t ldc, int64_t n, int64_t Dv) {
    pv_generic(o, ldo, p, ldp, H, c, ldc, n, Dv);
}

/* ---------------- AVX-512 ---------------- */
static inline __mmask16 tmask(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* 16 numbers of a cached row from element d on, widened to fp32; lanes outside m are zero.
 * kind: DSV2_KV_F32 or DSV2_KV_BF16 (FP8 rows reach the tiles widened: mla_absorbed.c). */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) __m512 ld16(const char *row, int64_t d, int kind,
                                                                            __mmask16 m) {
    if (kind == DSV2_KV_BF16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + d)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)row + d);
}

/* NH heads x 64 columns of o, accumulated over the n rows of c; head h's weight of row j is
 * p[h ldp + j pj]; first: o starts from 0 instead of its contents */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
pv_tile_avx512(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t pj, const int NH, const char *c,
               int64_t ldc, int64_t n, int64_t c0, int64_t nc, int kind, int first) {
    const __mmask16 m0 = tmask(nc), m1 = tmask(nc - 16), m2 = tmask(nc - 32), m3 = tmask(nc - 48);
    __m512 acc[4][4];
    for (int h = 0; h < NH; h++) {
        float *oh = o + h * ldo + c0;
        acc[h][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, oh);
        acc[h][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, oh + 16);
        acc[h][2] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m2, oh + 32);
        acc[h][3] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m3, oh + 48);
    }
    for (int64_t j = 0; j < n; j++) {
        const char *cj = c + j * ldc;
        __m512 v0 = ld16(cj, c0, kind, m0), v1 = ld16(cj, c0 + 16, kind, m1);
        __m512 v2 = ld16(cj, c0 + 32, kind, m2), v3 = ld16(cj, c0 + 48, kind, m3);
        for (int h = 0; h < NH; h++) {
            const __m512 pb = _mm512_set1_ps(p[h * ldp + j * pj]);
            acc[h][0] = _mm512_fmadd_ps(pb, v0, acc[h][0]);
            acc[h][1] = _mm512_fmadd_ps(pb, v1, acc[h][1]);
            acc[h][2] = _mm512_fmadd_ps(pb, v2, acc[h][2]);
            acc[h][3] = _mm512_fmadd_ps(pb, v3, acc[h][3]);
        }
    }
    for (int h = 0; h < NH; h++) {
        float *oh = o + h * ldo + c0;
        _mm512_mask_storeu_ps(oh, m0, acc[h][0]);
        _mm512_mask_storeu_ps(oh + 16, m1, acc[h][1]);
        _mm512_mask_storeu_ps(oh + 32, m2, acc[h][2]);
        _mm512_mask_storeu_ps(oh + 48, m3, acc[h][3]);
    }
}

DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
pv_avx512_k(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t pj, int64_t H, const char *c, int64_t ldc,
            int64_t n, int64_t Dv, int kind, int first) {
    for (int64_t c0 = 0; c0 < Dv; c0 += 64) {
        const int64_t nc = Dv - c0 < 64 ? Dv - c0 : 64;
        int64_t h0 = 0;
        for (; h0 + 4 <= H; h0 += 4)
            pv_tile_avx512(o + h0 * ldo, ldo, p + h0 * ldp, ldp, pj, 4, c, ldc, n, c0, nc, kind, first);
        switch (H - h0) {
        case 3: pv_tile_avx512(o + h0 * ldo, ldo, p + h0 * ldp, ldp, pj, 3, c, ldc, n, c0, nc, kind, first); break;
        case 2: pv_tile_avx512(o + h0 * ldo, ldo, p + h0 * ldp, ldp, pj, 2, c, ldc, n, c0, nc, kind, first); break;
        case 1: pv_tile_avx512(o + h0 * ldo, ldo, p + h0 * ldp, ldp, pj, 1, c, ldc, n, c0, nc, kind, first); break;
        default: break;
        }
    }
}

DSV2_TARGET_AVX512 static void pv_avx512(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H,
                                         const float *c, int64_t ldc, int64_t n, int64_t Dv) {
    pv_avx512_k(o, ldo, p, ldp, 1, H, (const char *)c, ldc * 4, n, Dv, DSV2_KV_F32, 0);
}

/* ---------------- heads in lanes (AVX-512, the block pass of mla_absorbed.c) ---------------- */
enum { LRT = 8 }; /* key rows per scores tile */

/* 16 heads (a head per lane) x LRT rows: acc[r] += qt[d] * k[r][d], the even numbers d into a[r], the
 * odd ones into b[r], each cached number broadcast to the 16 lanes (bf16: a 32-bit pair broadcast,
 * the even number shifted up, the odd one masked); s[r] = a[r] + b[r].  Prefetch as in the 4 x 4
 * tiles: the next tile's lines into L1, the next block's (fk, while there are) into L2. */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
scores_lanes_k(float *s, const float *qt, const char *k, int64_t ldk, int64_t n, int64_t D, int kind, const char *fk,
               int64_t fn) {
    const int64_t es = kind == DSV2_KV_BF16 ? 2 : 4, Pf = D / 2;
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t j0 = 0; j0 < n; j0 += LRT) {
        const char *kr[LRT], *pr[LRT], *fr[LRT];
        int far;
        const int64_t nr = dsv2_mla_tile_rows(kr, pr, fr, &far, LRT, k, ldk, n, j0, fk, fn);
        __m512 a[LRT], b[LRT];
        for (int r = 0; r < LRT; r++) a[r] = b[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < Pf; i++) {
            if ((2 * i * es) % 64 == 0) { /* a 64-byte line of each row */
                for (int r = 0; r < LRT; r++) _mm_prefetch(pr[r] + 2 * i * es, _MM_HINT_T0);
                if (far)
                    for (int r = 0; r < LRT; r++) _mm_prefetch(fr[r] + 2 * i * es, _MM_HINT_T1);
            }
            const __m512 q0 = _mm512_load_ps(qt + 32 * i), q1 = _mm512_load_ps(qt + 32 * i + 16);
            for (int r = 0; r < LRT; r++) {
                __m512 x0, x1;
                if (kind == DSV2_KV_BF16) {
                    int32_t kk;
                    memcpy(&kk, kr[r] + 4 * i, 4);
                    const __m512i v = _mm512_set1_epi32(kk);
                    x0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                    x1 = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                } else {
                    x0 = _mm512_set1_ps(((const float *)kr[r])[2 * i]);
                    x1 = _mm512_set1_ps(((const float *)kr[r])[2 * i + 1]);
                }
                a[r] = _mm512_fmadd_ps(q0, x0, a[r]);
                b[r] = _mm512_fmadd_ps(q1, x1, b[r]);
            }
        }
        if (2 * Pf < D) { /* odd D: the last number */
            const __m512 q0 = _mm512_load_ps(qt + 32 * Pf);
            for (int r = 0; r < LRT; r++) {
                float x;
                if (kind == DSV2_KV_BF16) {
                    uint16_t kk;
                    memcpy(&kk, kr[r] + 4 * Pf, 2);
                    const uint32_t u = (uint32_t)kk << 16;
                    memcpy(&x, &u, 4);
                } else {
                    x = ((const float *)kr[r])[2 * Pf];
                }
                a[r] = _mm512_fmadd_ps(q0, _mm512_set1_ps(x), a[r]);
            }
        }
        for (int r = 0; r < nr; r++) _mm512_store_ps(s + (j0 + r) * 16, _mm512_add_ps(a[r], b[r]));
    }
}

DSV2_TARGET_AVX512 static void scores_lanes_f32(float *s, const float *qt, const char *k, int64_t ldk, int64_t n,
                                                int64_t D, const char *fk, int64_t fn) {
    scores_lanes_k(s, qt, k, ldk, n, D, DSV2_KV_F32, fk, fn);
}
DSV2_TARGET_AVX512 static void scores_lanes_bf16(float *s, const float *qt, const char *k, int64_t ldk, int64_t n,
                                                 int64_t D, const char *fk, int64_t fn) {
    scores_lanes_k(s, qt, k, ldk, n, D, DSV2_KV_BF16, fk, fn);
}
DSV2_TARGET_AVX512 static void pv_lanes_f32(float *o, int64_t ldo, const float *p, int64_t nh, const char *c,
                                            int64_t ldc, int64_t n, int64_t L, int first) {
    pv_avx512_k(o, ldo, p, 1, 16, nh, c, ldc, n, L, DSV2_KV_F32, first);
}
DSV2_TARGET_AVX512 static void pv_lanes_bf16(float *o, int64_t ldo, const float *p, int64_t nh, const char *c,
                                             int64_t ldc, int64_t n, int64_t L, int first) {
    pv_avx512_k(o, ldo, p, 1, 16, nh, c, ldc, n, L, DSV2_KV_BF16, first);
}

int dsv2_mla_lanes_use(int dtype) {
    return dsv2_isa() == DSV2_ISA_AVX512 && (dtype == DSV2_KV_F32 || dtype == DSV2_KV_BF16);
}

size_t dsv2_mla_lanes_qpack_len(int64_t H, int64_t D) { return (size_t)((H + 15) / 16) * (size_t)D * 16; }

void dsv2_mla_lanes_qpack(float *qt, const float *q, int64_t ldq, int64_t H, int64_t D) {
    for (int64_t g = 0; g < H; g += 16)
        for (int64_t d = 0; d < D; d++)
            for (int64_t h = 0; h < 16; h++) qt[((g / 16) * D + d) * 16 + h] = g + h < H ? q[(g + h) * ldq + d] : 0.0f;
}

int dsv2_mla_scores_lanes(float *s, const float *qt, const dsv2_mla_rows *k, int64_t n) {
    if (!dsv2_mla_lanes_use(k->dtype) || ((uintptr_t)s & 63) || ((uintptr_t)qt & 63)) return DSV2_ERR_ARG;
    if (n <= 0) return DSV2_OK;
    if (k->dtype == DSV2_KV_BF16) scores_lanes_bf16(s, qt, k->p, k->ld, n, k->L + k->rope, k->pf, k->pf_n);
    else scores_lanes_f32(s, qt, k->p, k->ld, n, k->L + k->rope, k->pf, k->pf_n);
    return DSV2_OK;
}

int dsv2_mla_pv_lanes(float *o, int64_t ldo, const float *p, int64_t nh, const dsv2_mla_rows *c, int64_t n,
                      int first) {
    if (!dsv2_mla_lanes_use(c->dtype) || nh > 16) return DSV2_ERR_ARG;
    if (n <= 0 || nh <= 0) return DSV2_OK;
    if (c->dtype == DSV2_KV_BF16) pv_lanes_bf16(o, ldo, p, nh, c->p, c->ld, n, c->L, first);
    else pv_lanes_f32(o, ldo, p, nh, c->p, c->ld, n, c->L, first);
    return DSV2_OK;
}

void dsv2_mla_scores(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H, const float *k, int64_t ldk,
                     int64_t n, int64_t D) {
    if (H <= 0 || n <= 0) return;
    int isa = dsv2_isa();
    if (isa >= DSV2_ISA_AVX2) scores_avx2(s, lds, q, ldq, H, k, ldk, n, D);
    else scores_portable(s, lds, q, ldq, H, k, ldk, n, D);
}

void dsv2_mla_pv_acc(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H, const float *c, int64_t ldc,
                     int64_t n, int64_t Dv) {
    if (H <= 0 || n <= 0) return;
    int isa = dsv2_isa();
    if (isa == DSV2_ISA_AVX512) pv_avx512(o, ldo, p, ldp, H, c, ldc, n, Dv);
    else if (isa == DSV2_ISA_AVX2) pv_avx2(o, ldo, p, ldp, H, c, ldc, n, Dv);
    else pv_portable(o, ldo, p, ldp, H, c, ldc, n, Dv);
}

/* ---------------- cached rows in their own format ----------------
 * (AVX-512 takes the lanes kernels above, from mla_absorbed.c.)  fp32 rows go to the tiles of
 * dsv2_mla_scores / dsv2_mla_pv_acc; other rows are widened into a small buffer (RB numbers at a
 * time, in L1) that every head then uses. */
#define RB 512

static inline __attribute__((always_inline)) void
scores_rows_generic(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H, const dsv2_mla_rows *k,
                    int64_t n) {
    float buf[RB];
    const int64_t D = k->L + k->rope;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t d0 = 0; d0 < D; d0 += RB) {
            const int64_t w = D - d0 < RB ? D - d0 : RB;
            dsv2_mla_rows_load(buf, RB, k->p + j * k->ld, k->ld, 1, d0, d0 + w, k->dtype, k->L, k->rope);
            for (int64_t h = 0; h < H; h++) {
                const float x = dot_generic(q + h * ldq + d0, buf, w);
                s[h * lds + j] = d0 ? s[h * lds + j] + x : x;
            }
        }
    }
}

static inline __attribute__((always_inline)) void
pv_rows_generic(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H, const dsv2_mla_rows *c, int64_t n) {
    float buf[RB];
    for (int64_t j = 0; j < n; j++)
        for (int64_t d0 = 0; d0 < c->L; d0 += RB) {
            const int64_t w = c->L - d0 < RB ? c->L - d0 : RB;
            dsv2_mla_rows_load(buf, RB, c->p + j * c->ld, c->ld, 1, d0, d0 + w, c->dtype, c->L, c->rope);
            for (int64_t h = 0; h < H; h++) {
                float *oh = o + h * ldo + d0;
                const float pj = p[h * ldp + j];
                for (int64_t d = 0; d < w; d++) oh[d] += pj * buf[d];
            }
        }
}

static void scores_rows_portable(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H,
                                 const dsv2_mla_rows *k, int64_t n) {
    scores_rows_generic(s, lds, q, ldq, H, k, n);
}
DSV2_TARGET_AVX2 static void scores_rows_avx2(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H,
                                              const dsv2_mla_rows *k, int64_t n) {
    scores_rows_generic(s, lds, q, ldq, H, k, n);
}
static void pv_rows_portable(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H, const dsv2_mla_rows *c,
                             int64_t n) {
    pv_rows_generic(o, ldo, p, ldp, H, c, n);
}
DSV2_TARGET_AVX2 static void pv_rows_avx2(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H,
                                          const dsv2_mla_rows *c, int64_t n) {
    pv_rows_generic(o, ldo, p, ldp, H, c, n);
}

void dsv2_mla_scores_rows(float *s, int64_t lds, const float *q, int64_t ldq, int64_t H, const dsv2_mla_rows *k,
                          int64_t n) {
    if (H <= 0 || n <= 0) return;
    const int isa = dsv2_isa();
    const int64_t D = k->L + k->rope;
    if (k->dtype == DSV2_KV_F32) {
        dsv2_mla_scores(s, lds, q, ldq, H, (const float *)k->p, k->ld / 4, n, D);
    } else if (isa >= DSV2_ISA_AVX2) {
        scores_rows_avx2(s, lds, q, ldq, H, k, n);
    } else {
        scores_rows_portable(s, lds, q, ldq, H, k, n);
    }
}

void dsv2_mla_pv_rows(float *o, int64_t ldo, const float *p, int64_t ldp, int64_t H, const dsv2_mla_rows *c,
                      int64_t n) {
    if (H <= 0 || n <= 0) return;
    const int isa = dsv2_isa();
    if (c->dtype == DSV2_KV_F32) {
        dsv2_mla_pv_acc(o, ldo, p, ldp, H, (const float *)c->p, c->ld / 4, n, c->L);
    } else if (isa >= DSV2_ISA_AVX2) {
        pv_rows_avx2(o, ldo, p, ldp, H, c, n);
    } else {
        pv_rows_portable(o, ldo, p, ldp, H, c, n);
    }
}
