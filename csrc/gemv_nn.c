/* gemv_nn.c - y = x W for T <= 4 rows (portable, AVX2 via the compiler, AVX-512);
 * fp32, bf16, int8 and fp8 (block-scaled, dequantized in registers) weights; int4
 * weights (int4.h) through the generic loop on dequantized column blocks. */
#include "gemv_nn.h"
#include "cpu.h"
#include "fp8.h"
#include "gemv_f8.h"
#include "int4.h"

#include <math.h>

#include <immintrin.h>

/* ---------------- portable / AVX2 (same source, vectorised by the compiler) ---------------- */
#define NN_CB 64 /* columns per block */

static inline __attribute__((always_inline)) void
nn_generic(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W, int64_t c0, int64_t c1) {
    const int64_t K = W->rows, N = W->cols;
    for (int64_t cb = c0; cb < c1; cb += NN_CB) {
        const int64_t nc = c1 - cb < NN_CB ? c1 - cb : NN_CB;
        float acc[DSV2_GEMV_NN_MAX_T][NN_CB];
        for (int t = 0; t < T; t++)
            for (int64_t c = 0; c < NN_CB; c++) acc[t][c] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float w[NN_CB];
            if (W->dtype == DSV2_F32) {
                const float *wr = (const float *)W->data + k * N + cb;
                for (int64_t c = 0; c < nc; c++) w[c] = wr[c];
            } else if (W->dtype == DSV2_BF16) {
                const uint16_t *wr = (const uint16_t *)W->data + k * N + cb;
                for (int64_t c = 0; c < nc; c++) w[c] = dsv2_bf16_to_f32(wr[c]);
            } else if (W->dtype == DSV2_I4) {
                dsv2_dequant_i4_cols(w, W, k, cb, cb + nc);
            } else if (W->dtype == DSV2_F8E4M3) {
                const uint8_t *wr = (const uint8_t *)W->data + k * N + cb;
                const float *sr = dsv2_f8_scale_row(W, k);
                for (int64_t c = 0, b = cb / W->group, e = (b + 1) * W->group - cb; c < nc; c++) {
                    if (c == e) b++, e += W->group;
                    w[c] = dsv2_e4m3_to_f32(wr[c]) * sr[b];
                }
            } else {
                const int8_t *wr = (const int8_t *)W->data + k * N + cb;
                const float *sr = W->scale + k * (N / W->group);
                for (int64_t c = 0, b = cb / W->group, e = (b + 1) * W->group - cb; c < nc; c++) {
                    if (c == e) b++, e += W->group;
                    w[c] = (float)wr[c] * sr[b];
                }
            }
            for (int t = 0; t < T; t++) {
                const float xv = x[t * ldx + k];
                for (int64_t c = 0; c < nc; c++) acc[t][c] += xv * w[c];
            }
        }
        for (int t = 0; t < T; t++)
            for (int64_t c = 0; c < nc; c++) y[t * ldy + cb + c] = acc[t][c];
    }
}

static void nn_portable(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                        int64_t c0, int64_t c1) {
    nn_generic(y, ldy, x, ldx, T, W, c0, c1);
}

DSV2_TARGET_AVX2 static void nn_avx2(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                                     const dsv2_mat *W, int64_t c0, int64_t c1) {
    nn_generic(y, ldy, x, ldx, T, W, c0, c1);
}

/* ---------------- AVX-512: T rows x 64 columns in 4T accumulators ---------------- */
/* sk: for int8 / fp8, the scale of row k that covers columns [c, c + 16) (the 16
 * columns lie in one scale block: checked by the caller).  fp8: NaN codes are not
 * handled here (nn_f8_nan) */
DSV2_TARGET_AVX512 static inline __m512 nn_load_w(const dsv2_mat *W, int64_t k, int64_t c, __mmask16 m,
                                                  const float *sk) {
    if (W->dtype == DSV2_F32) return _mm512_maskz_loadu_ps(m, (const float *)W->data + k * W->cols + c);
    if (W->dtype == DSV2_I8) {
        __m128i b = _mm_maskz_loadu_epi8(m, (const int8_t *)W->data + k * W->cols + c);
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(*sk));
    }
    if (W->dtype == DSV2_F8E4M3) {
        __m128i b = _mm_maskz_loadu_epi8(m, (const uint8_t *)W->data + k * W->cols + c);
        return _mm512_mul_ps(dsv2_e4m3x16_div256_avx512(b), _mm512_set1_ps(*sk * 256.0f));
    }
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)W->data + k * W->cols + c);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* fp8: w with the lanes of NaN codes among the 16 (mask m) at p set to NaN */
DSV2_TARGET_AVX512 static inline __m512 nn_f8_nan(__m512 w, const uint8_t *p, __mmask16 m) {
    const __mmask16 nan = dsv2_e4m3x16_nan_avx512(_mm_maskz_loadu_epi8(m, p));
    return __builtin_expect(nan != 0, 0) ? _mm512_mask_mov_ps(w, nan, _mm512_set1_ps(NAN)) : w;
}

DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
nn_block64_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const dsv2_mat *W,
                  int64_t cb, int64_t nc) {
    const int64_t K = W->rows;
    const __mmask16 m0 = tail_mask(nc), m1 = tail_mask(nc - 16), m2 = tail_mask(nc - 32), m3 = tail_mask(nc - 48);
    __m512 acc[DSV2_GEMV_NN_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
    /* int8 / fp8: scale columns of the four 16-column chunks (a chunk past the end reuses the
     * first); the scale row moves on every row (int8) or every block_rows rows (fp8) */
    static const float no_scale = 1.0f;
    const int i8 = W->dtype == DSV2_I8, f8 = W->dtype == DSV2_F8E4M3, sc = i8 || f8;
    const int64_t g = sc ? W->group : 1, ng = i8 ? W->cols / g : f8 ? dsv2_f8_scale_cols(W) : 0;
    const int64_t j0 = sc ? cb / g : 0, j1 = sc && m1 ? (cb + 16) / g : j0, j2 = sc && m2 ? (cb + 32) / g : j0,
                  j3 = sc && m3 ? (cb + 48) / g : j0;
    const float *sk = sc ? W->scale : &no_scale;
    int64_t left = f8 ? W->block_rows - W->row_off : 1; /* rows before the next scale row */
    for (int64_t k = 0; k < K; k++) {
        __m512 w0 = nn_load_w(W, k, cb, m0, sk + j0), w1 = nn_load_w(W, k, cb + 16, m1, sk + j1);
        __m512 w2 = nn_load_w(W, k, cb + 32, m2, sk + j2), w3 = nn_load_w(W, k, cb + 48, m3, sk + j3);
        if (f8) {
            const uint8_t *wk = (const uint8_t *)W->data + k * W->cols + cb;
            w0 = nn_f8_nan(w0, wk, m0), w1 = nn_f8_nan(w1, wk + 16, m1);
            w2 = nn_f8_nan(w2, wk + 32, m2), w3 = nn_f8_nan(w3, wk + 48, m3);
        }
        if (--left == 0) sk += ng, left = f8 ? W->block_rows : 1;
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_set1_ps(x[t * ldx + k]);
            acc[t][0] = _mm512_fmadd_ps(xv, w0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(xv, w1, acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(xv, w2, acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(xv, w3, acc[t][3]);
        }
    }
    for (int t = 0; t < T; t++) {
        float *yt = y + t * ldy + cb;
        _mm512_mask_storeu_ps(yt, m0, acc[t][0]);
        _mm512_mask_storeu_ps(yt + 16, m1, acc[t][1]);
        _mm512_mask_storeu_ps(yt + 32, m2, acc[t][2]);
        _mm512_mask_storeu_ps(yt + 48, m3, acc[t][3]);
    }
}

#define NN512_T(TT)                                                                              \
    DSV2_TARGET_AVX512 static void nn_avx512_t##TT(float *y, int64_t ldy, const float *x, int64_t ldx, \
                                                   const dsv2_mat *W, int64_t c0, int64_t c1) {  \
        for (int64_t cb = c0; cb < c1; cb += 64)                                                  \
            nn_block64_avx512(y, ldy, x, ldx, TT, W, cb, c1 - cb < 64 ? c1 - cb : 64);            \
    }
NN512_T(1)
NN512_T(2)
NN512_T(3)
NN512_T(4)

/* the AVX-512 kernels take W from column c0 on: int8 / fp8 blocks of 16k columns, c0 % 16 == 0,
 * fp8 scales that fold exactly (fp8.h) */
static int nn_avx512_ok(const dsv2_mat *W, int64_t c0) {
    if (W->dtype == DSV2_I8) return W->group % 16 == 0 && c0 % 16 == 0;
    if (W->dtype == DSV2_F8E4M3) return W->group % 16 == 0 && c0 % 16 == 0 && dsv2_f8_scales_foldable(W, 0, W->rows);
    return 1;
}

int dsv2_gemv_nn(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                 int64_t c0, int64_t c1) {
    if (W->dtype != DSV2_F32 && W->dtype != DSV2_BF16 && W->dtype != DSV2_I8 && W->dtype != DSV2_I4 &&
        W->dtype != DSV2_F8E4M3)
        return DSV2_ERR_DTYPE;
    if (W->dtype == DSV2_I8 && (!W->scale || W->group < 1 || W->cols % W->group)) return DSV2_ERR_ARG;
    if (W->dtype == DSV2_F8E4M3 && dsv2_f8_check(W)) return DSV2_ERR_ARG;
    if (T <= 0 || c0 >= c1) return DSV2_OK;
    if (T > DSV2_GEMV_NN_MAX_T || c0 < 0 || c1 > W->cols) return DSV2_ERR_ARG;
    int isa = dsv2_isa();
    /* int8 / fp8 in AVX-512 registers: every 16-column chunk must lie in one scale block */
    /* int4: rows dequantized one column block at a time (the generic loop) */
    if (W->dtype == DSV2_I4) {
        nn_portable(y, ldy, x, ldx, T, W, c0, c1);
    } else if (isa == DSV2_ISA_AVX512 && nn_avx512_ok(W, c0)) {
        switch (T) {
        case 1: nn_avx512_t1(y, ldy, x, ldx, W, c0, c1); break;
        case 2: nn_avx512_t2(y, ldy, x, ldx, W, c0, c1); break;
        case 3: nn_avx512_t3(y, ldy, x, ldx, W, c0, c1); break;
        default: nn_avx512_t4(y, ldy, x, ldx, W, c0, c1); break;
        }
    } else if (isa >= DSV2_ISA_AVX2) {
        nn_avx2(y, ldy, x, ldx, T, W, c0, c1);
    } else {
        nn_portable(y, ldy, x, ldx, T, W, c0, c1);
    }
    return DSV2_OK;
}

/* ---------------- row-streaming variant ---------------- */

/* Rows of W one after the other, partial sums of all columns in y (L1).  The
 * dtype is a template parameter (DT) so that the inner loop has no branch. */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
nn_stream_dt(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const dsv2_mat *W, const int DT) {
    const int64_t K = W->rows, N = W->cols;
    const int sc = DT == DSV2_I8 || DT == DSV2_F8E4M3;
    const int64_t cpg = sc ? W->group / 16 : 1, ng = DT == DSV2_I8 ? N / W->group : 0;
    for (int t = 0; t < T; t++) memset(y + t * ldy, 0, (size_t)N * sizeof(float));
    for (int64_t k = 0; k < K; k++) {
        __m512 xk[DSV2_GEMV_NN_MAX_T];
        for (int t = 0; t < T; t++) xk[t] = _mm512_set1_ps(x[t * ldx + k]);
        /* fp8: the scale folds the 256 of the fp16 decode (fp8.h) */
        const float *sk = DT == DSV2_I8 ? W->scale + k * ng : DT == DSV2_F8E4M3 ? dsv2_f8_scale_row(W, k) : NULL;
        const float fold = DT == DSV2_F8E4M3 ? 256.0f : 1.0f;
        __m512 sv = sc ? _mm512_set1_ps(sk[0] * fold) : _mm512_setzero_ps();
        int64_t b = 0, cc = 0; /* int8 / fp8: scale block of column c, chunk index within it */
        for (int64_t c = 0; c < N; c += 16) {
            const __mmask16 m = tail_mask(N - c);
            __m512 w;
            if (DT == DSV2_F32) {
                w = _mm512_maskz_loadu_ps(m, (const float *)W->data + k * N + c);
            } else if (DT == DSV2_BF16) {
                __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)W->data + k * N + c);
                w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            } else if (DT == DSV2_F8E4M3) { /* group % 16 == 0: the 16 columns share one scale */
                const uint8_t *p = (const uint8_t *)W->data + k * N + c;
                w = nn_f8_nan(_mm512_mul_ps(dsv2_e4m3x16_div256_avx512(_mm_maskz_loadu_epi8(m, p)), sv), p, m);
                if (++cc == cpg && c + 16 < N) cc = 0, sv = _mm512_set1_ps(sk[++b] * fold);
            } else { /* group % 16 == 0: the 16 columns share one scale */
                __m128i q8 = _mm_maskz_loadu_epi8(m, (const int8_t *)W->data + k * N + c);
                w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)), sv);
                if (++cc == cpg && c + 16 < N) cc = 0, sv = _mm512_set1_ps(sk[++b]);
            }
            for (int t = 0; t < T; t++) {
                float *yt = y + t * ldy + c;
                _mm512_mask_storeu_ps(yt, m, _mm512_fmadd_ps(xk[t], w, _mm512_maskz_loadu_ps(m, yt)));
            }
        }
    }
}

#define NN_STREAM(TT)                                                                                    \
    DSV2_TARGET_AVX512 static void nn_stream_t##TT(float *y, int64_t ldy, const float *x, int64_t ldx, \
                                                   const dsv2_mat *W) {                                \
        if (W->dtype == DSV2_F32) nn_stream_dt(y, ldy, x, ldx, TT, W, DSV2_F32);                         \
        else if (W->dtype == DSV2_BF16) nn_stream_dt(y, ldy, x, ldx, TT, W, DSV2_BF16);                  \
        else if (W->dtype == DSV2_F8E4M3) nn_stream_dt(y, ldy, x, ldx, TT, W, DSV2_F8E4M3);              \
        else nn_stream_dt(y, ldy, x, ldx, TT, W, DSV2_I8);                                               \
    }
NN_STREAM(1)
NN_STREAM(2)
NN_STREAM(3)
NN_STREAM(4)

DSV2_TARGET_AVX512 static void nn_stream_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                                                const dsv2_mat *W) {
    switch (T) {
    case 1: nn_stream_t1(y, ldy, x, ldx, W); break;
    case 2: nn_stream_t2(y, ldy, x, ldx, W); break;
    case 3: nn_stream_t3(y, ldy, x, ldx, W); break;
    default: nn_stream_t4(y, ldy, x, ldx, W); break;
    }
}

int dsv2_gemv_nn_stream(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W) {
    if (W->dtype != DSV2_F32 && W->dtype != DSV2_BF16 && W->dtype != DSV2_I8 && W->dtype != DSV2_I4 &&
        W->dtype != DSV2_F8E4M3)
        return DSV2_ERR_DTYPE;
    if (W->dtype == DSV2_F8E4M3 && dsv2_f8_check(W)) return DSV2_ERR_ARG;
    if (T > DSV2_GEMV_NN_MAX_T) return DSV2_ERR_ARG;
    if (T <= 0) return DSV2_OK;
    if (dsv2_isa() == DSV2_ISA_AVX512 && W->dtype != DSV2_I4 && nn_avx512_ok(W, 0)) {
        nn_stream_avx512(y, ldy, x, ldx, T, W);
        return DSV2_OK;
    }
    return dsv2_gemv_nn(y, ldy, x, ldx, T, W, 0, W->cols);
}
