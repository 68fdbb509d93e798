/* quant_f8.c - float8 e4m3fn block quantization (portable and AVX-512) and
 * encode / decode of arrays (portable, AVX2, AVX-512). */
#include "quant_f8.h"
#include "cpu.h"
#include "fp8.h"
#include "threadpool.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>

#define E4M3_MAX 448.0f

/* ---------------- portable ---------------- */

static inline float load_w(const dsv2_mat *W, int64_t r, int64_t c) {
    size_t i = (size_t)r * (size_t)W->cols + (size_t)c;
    return W->dtype == DSV2_F32 ? ((const float *)W->data)[i] : dsv2_bf16_to_f32(((const uint16_t *)W->data)[i]);
}

/* block [r0, r1) x [c0, c1) -> its scale (returned) and codes; *bad set on NaN / Inf */
static float quant_block_portable(uint8_t *q, const dsv2_mat *W, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                  int *bad) {
    float m = 0.0f;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++) {
            const float a = fabsf(load_w(W, r, c));
            *bad |= !(a <= FLT_MAX);
            m = a > m ? a : m;
        }
    float s = m / E4M3_MAX;
    if (s == 0.0f) s = 1.0f;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++) q[r * W->cols + c] = dsv2_f32_to_e4m3(load_w(W, r, c) / s);
    return s;
}

/* ---------------- AVX-512 ---------------- */

DSV2_TARGET_AVX512 static inline __m512 load16(const dsv2_mat *W, int64_t r, int64_t c, __mmask16 m) {
    size_t i = (size_t)r * (size_t)W->cols + (size_t)c;
    if (W->dtype == DSV2_F32) return _mm512_maskz_loadu_ps(m, (const float *)W->data + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)W->data + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

DSV2_TARGET_AVX512 static float quant_block_avx512(uint8_t *q, const dsv2_mat *W, int64_t r0, int64_t r1, int64_t c0,
                                                   int64_t c1, int *bad) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), big = _mm512_set1_ps(FLT_MAX);
    __m512 m = _mm512_setzero_ps();
    __mmask16 nf = 0;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c += 16) {
            const __m512 a = _mm512_and_ps(load16(W, r, c, tail16(c1 - c)), absmask);
            nf |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
            m = _mm512_max_ps(m, a);
        }
    *bad |= nf != 0;
    float s = _mm512_reduce_max_ps(m) / E4M3_MAX;
    if (s == 0.0f) s = 1.0f;
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c += 16) {
            const __mmask16 k = tail16(c1 - c);
            _mm_mask_storeu_epi8(q + r * W->cols + c, k, dsv2_f32x16_to_e4m3_avx512(_mm512_div_ps(load16(W, r, c, k), sv)));
        }
    return s;
}

/* ---------------- threaded over block rows ---------------- */

typedef struct {
    uint8_t *q;
    float *s;
    const dsv2_mat *W;
    int64_t brow, bcol;
    atomic_int bad;
} quant_job;

static void quant_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    quant_job *j = (quant_job *)ctx;
    const dsv2_mat *W = j->W;
    const int64_t ncb = (W->cols + j->bcol - 1) / j->bcol;
    const int fast = dsv2_isa() == DSV2_ISA_AVX512;
    int bad = 0;
    for (int64_t rb = b; rb < e; rb++) {
        const int64_t r0 = rb * j->brow, r1 = r0 + j->brow < W->rows ? r0 + j->brow : W->rows;
        for (int64_t cb = 0; cb < ncb; cb++) {
            const int64_t c0 = cb * j->bcol, c1 = c0 + j->bcol < W->cols ? c0 + j->bcol : W->cols;
            j->s[rb * ncb + cb] = fast ? quant_block_avx512(j->q, W, r0, r1, c0, c1, &bad)
                                       : quant_block_portable(j->q, W, r0, r1, c0, c1, &bad);
        }
    }
    if (bad) atomic_store(&j->bad, 1);
}

int dsv2_quantize_f8(uint8_t *q, float *scale_inv, const dsv2_mat *W, int64_t brow, int64_t bcol) {
    if (!q || !scale_inv || !W || !W->data || W->rows < 0 || W->cols <= 0 || brow < 1 || bcol < 1)
        return DSV2_ERR_ARG;
    if (W->dtype != DSV2_F32 && W->dtype != DSV2_BF16) return DSV2_ERR_DTYPE;
    quant_job j = {q, scale_inv, W, brow, bcol};
    atomic_init(&j.bad, 0);
    dsv2_parallel_for((W->rows + brow - 1) / brow, 1, quant_task, &j);
    return atomic_load(&j.bad) ? DSV2_ERR_NONFINITE : DSV2_OK;
}

/* ---------------- arrays ---------------- */

DSV2_TARGET_AVX512 static void encode_avx512(uint8_t *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        _mm_mask_storeu_epi8(out + i, m, dsv2_f32x16_to_e4m3_avx512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

DSV2_TARGET_AVX512 static void decode_avx512(float *out, const uint8_t *c, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail16(n - i);
        _mm512_mask_storeu_ps(out + i, m, dsv2_e4m3x16_to_f32_avx512(_mm_maskz_loadu_epi8(m, c + i)));
    }
}

DSV2_TARGET_AVX2 static void decode_avx2(float *out, const uint8_t *c, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, dsv2_e4m3x8_to_f32_avx2(_mm_loadl_epi64((const __m128i *)(c + i))));
    for (; i < n; i++) out[i] = dsv2_e4m3_to_f32(c[i]);
}

void dsv2_e4m3_encode(uint8_t *out, const float *x, int64_t n) {
    if (dsv2_isa() == DSV2_ISA_AVX512) {
        encode_avx512(out, x, n);
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = dsv2_f32_to_e4m3(x[i]);
}

void dsv2_e4m3_decode(float *out, const uint8_t *codes, int64_t n) {
    const int isa = dsv2_isa();
    if (isa == DSV2_ISA_AVX512) decode_avx512(out, codes, n);
    else if (isa == DSV2_ISA_AVX2) decode_avx2(out, codes, n);
    else
        for (int64_t i = 0; i < n; i++) out[i] = dsv2_e4m3_to_f32(codes[i]);
}
