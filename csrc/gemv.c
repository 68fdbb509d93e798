/* gemv.c - row-dot kernels (portable, AVX2, AVX-512), fp32, bf16, int8 and fp8 weights. */
#include "gemv.h"
#include "cpu.h"
#include "int4.h"
#include "gemv_f8.h"
#include "quant.h"

#include <immintrin.h>

/* ---------------- portable ---------------- */
static void gemv_portable(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                          const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int64_t K = W->cols;
    for (int64_t r = r0; r < r1; r++) {
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t k = 0;
            if (W->dtype == DSV2_F32) {
                const float *w = (const float *)W->data + r * K;
                for (; k + 8 <= K; k += 8)
                    for (int j = 0; j < 8; j++) acc[j] += xt[k + j] * w[k + j];
                for (; k < K; k++) acc[0] += xt[k] * w[k];
            } else if (W->dtype == DSV2_BF16) {
                const uint16_t *w = (const uint16_t *)W->data + r * K;
                for (; k + 8 <= K; k += 8)
                    for (int j = 0; j < 8; j++) acc[j] += xt[k + j] * dsv2_bf16_to_f32(w[k + j]);
                for (; k < K; k++) acc[0] += xt[k] * dsv2_bf16_to_f32(w[k]);
            } else {
                for (; k < K; k++) acc[0] += xt[k] * dsv2_mat_get(W, r, k);
            }
            y[t * ldy + r] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

/* ---------------- AVX2 ---------------- */
DSV2_TARGET_AVX2 static inline __m256 load8_w_avx2(const dsv2_mat *W, int64_t r, int64_t k) {
    if (W->dtype == DSV2_F32) return _mm256_loadu_ps((const float *)W->data + r * W->cols + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)W->data + r * W->cols + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

DSV2_TARGET_AVX2 static void gemv_avx2(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                                       const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int64_t K = W->cols, K8 = K & ~(int64_t)7;
    for (int64_t r = r0; r < r1; r++) {
        __m256 acc[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) {
            __m256 w = load8_w_avx2(W, r, k);
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + k), acc[t]);
        }
        for (int t = 0; t < T; t++) {
            float s = dsv2_hsum256(acc[t]);
            for (int64_t k = K8; k < K; k++) s += x[t * ldx + k] * dsv2_mat_get(W, r, k);
            y[t * ldy + r] = s;
        }
    }
}

/* ---------------- AVX-512 ---------------- */
DSV2_TARGET_AVX512 static inline __m512 load16_w_avx512(const dsv2_mat *W, int64_t r, int64_t k, __mmask16 m) {
    if (W->dtype == DSV2_F32) return _mm512_maskz_loadu_ps(m, (const float *)W->data + r * W->cols + k);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)W->data + r * W->cols + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One weight row x T activation rows (T a compile-time constant after
 * inlining), four partial sums per activation row (k, k+16, k+32, k+48) for
 * FMA latency.  Rows are processed one after the other: each thread reads its
 * block of the weight matrix as one sequential stream (measured on Zen 4:
 * ~1.5x the bandwidth of interleaving 4 rows, whose short per-row streams the
 * hardware prefetchers keep re-learning); the activations stay in L1. */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
gemv_row_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T,
                const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, K64 = K & ~(int64_t)63;
    const int64_t es = (int64_t)dsv2_dtype_size(W->dtype);
    const char *wrow = (const char *)W->data + r * K * es;
    const int pf = dsv2_prefetch_for(DSV2_PF_BF16);
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64) {
        DSV2_PREFETCH_AHEAD(wrow + k * es, 64 * es, pf);
        const __m512 w0 = load16_w_avx512(W, r, k, 0xffff), w1 = load16_w_avx512(W, r, k + 16, 0xffff);
        const __m512 w2 = load16_w_avx512(W, r, k + 32, 0xffff), w3 = load16_w_avx512(W, r, k + 48, 0xffff);
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx + k;
            acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xt + 32), acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xt + 48), acc[t][3]);
        }
    }
    for (int64_t k = K64; k < K; k += 16) {
        const __mmask16 m = (K - k >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        const __m512 w = load16_w_avx512(W, r, k, m);
        for (int t = 0; t < T; t++) acc[t][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * ldx + k), acc[t][0]);
    }
    for (int t = 0; t < T; t++)
        y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),
                                                            _mm512_add_ps(acc[t][2], acc[t][3])));
}

/* 4 weight rows x T activation rows, T a compile-time constant after inlining:
 * for long activation rows (see DSV2_GEMV_TILE_XBYTES), whose re-reads from
 * L2 would otherwise cost more than the short per-row streams; every
 * activation vector loaded serves four weight rows. */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
gemv_tile4_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T,
                  const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols;
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = (K - k >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        __m512 w0 = load16_w_avx512(W, r, k, m), w1 = load16_w_avx512(W, r + 1, k, m);
        __m512 w2 = load16_w_avx512(W, r + 2, k, m), w3 = load16_w_avx512(W, r + 3, k, m);
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
            acc[t][0] = _mm512_fmadd_ps(w0, xv, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, xv, acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(w2, xv, acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(w3, xv, acc[t][3]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[t][i]);
}

#define GEMV512_T(TT)                                                                  \
    DSV2_TARGET_AVX512 static void gemv_avx512_t##TT(float *y, int64_t ldy, const float *x, \
                                                     int64_t ldx, const dsv2_mat *W,   \
                                                     int64_t r0, int64_t r1) {         \
        int64_t r = r0;                                                                \
        if ((TT) * W->cols * 4 > DSV2_GEMV_TILE_XBYTES)                                \
            for (; r + 4 <= r1; r += 4) gemv_tile4_avx512(y, ldy, x, ldx, TT, W, r);   \
        for (; r < r1; r++) gemv_row_avx512(y, ldy, x, ldx, TT, W, r);                 \
    }
GEMV512_T(1)
GEMV512_T(2)
GEMV512_T(3)
GEMV512_T(4)

void dsv2_gemv_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                    const dsv2_mat *W, int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    if (W->dtype == DSV2_I8) {
        dsv2_gemv_i8_rows(y, ldy, x, ldx, T, W, r0, r1);
        return;
    }
    if (W->dtype == DSV2_I4) {
        dsv2_gemv_i4_rows(y, ldy, x, ldx, T, W, r0, r1);
        return;
    }
    if (W->dtype == DSV2_F8E4M3) {
        dsv2_gemv_f8_rows(y, ldy, x, ldx, T, W, r0, r1);
        return;
    }
    int isa = dsv2_isa();
    if (W->dtype == DSV2_F32 || W->dtype == DSV2_BF16) {
        if (isa == DSV2_ISA_AVX512) {
            for (int t0 = 0; t0 < T; t0 += 4) {
                int tt = T - t0 < 4 ? T - t0 : 4;
                const float *xs = x + t0 * ldx;
                float *ys = y + t0 * ldy;
                switch (tt) {
                case 1: gemv_avx512_t1(ys, ldy, xs, ldx, W, r0, r1); break;
                case 2: gemv_avx512_t2(ys, ldy, xs, ldx, W, r0, r1); break;
                case 3: gemv_avx512_t3(ys, ldy, xs, ldx, W, r0, r1); break;
                default: gemv_avx512_t4(ys, ldy, xs, ldx, W, r0, r1); break;
                }
            }
            return;
        }
        if (isa == DSV2_ISA_AVX2) {
            for (int t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
                int tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
                gemv_avx2(y + t0 * ldy, ldy, x + t0 * ldx, ldx, tt, W, r0, r1);
            }
            return;
        }
    }
    gemv_portable(y, ldy, x, ldx, T, W, r0, r1);
}

DSV2_TARGET_AVX512 static void widen_bf16_avx512(float *out, const uint16_t *in, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(in + i));
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    for (; i < n; i++) out[i] = dsv2_bf16_to_f32(in[i]);
}

void dsv2_bf16_row_to_f32(float *out, const uint16_t *in, int64_t n) {
    if (dsv2_isa() == DSV2_ISA_AVX512) {
        widen_bf16_avx512(out, in, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = dsv2_bf16_to_f32(in[i]);
}

void dsv2_mat_rows_to_f32(float *out, const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int64_t K = W->cols;
    if (W->dtype == DSV2_F32) {
        memcpy(out, (const float *)W->data + r0 * K, (size_t)(r1 - r0) * (size_t)K * 4);
    } else if (W->dtype == DSV2_BF16 && dsv2_isa() == DSV2_ISA_AVX512) {
        widen_bf16_avx512(out, (const uint16_t *)W->data + r0 * K, (r1 - r0) * K);
    } else if (W->dtype == DSV2_BF16) {
        const uint16_t *w = (const uint16_t *)W->data + r0 * K;
        for (int64_t i = 0; i < (r1 - r0) * K; i++) out[i] = dsv2_bf16_to_f32(w[i]);
    } else if (W->dtype == DSV2_I8) {
        dsv2_dequant_i8_rows(out, W, r0, r1);
    } else if (W->dtype == DSV2_I4) {
        dsv2_dequant_i4_rows(out, W, r0, r1);
    } else if (W->dtype == DSV2_F8E4M3) {
        dsv2_dequant_f8_rows(out, W, r0, r1);
    } else {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t k = 0; k < K; k++) out[(r - r0) * K + k] = dsv2_mat_get(W, r, k);
    }
}
