/* quant.c - int8 block quantization of weights (portable and AVX-512) and
 * fast dequantization of rows. */
#include "quant.h"
#include "cpu.h"
#include "threadpool.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>

/* ---------------- quantize: portable ---------------- */

static inline float load_w(const dsv2_mat *W, int64_t r, int64_t c) {
    size_t i = (size_t)r * (size_t)W->cols + (size_t)c;
    return W->dtype == DSV2_F32 ? ((const float *)W->data)[i] : dsv2_bf16_to_f32(((const uint16_t *)W->data)[i]);
}

/* one row; returns 0, or 1 when a value is not finite */
static int quant_row_portable(int8_t *q, float *s, const dsv2_mat *W, int64_t r, int64_t group) {
    const int64_t ng = W->cols / group;
    int bad = 0;
    for (int64_t b = 0; b < ng; b++) {
        const int64_t c0 = b * group;
        float m = 0.0f;
        for (int64_t c = c0; c < c0 + group; c++) {
            float a = fabsf(load_w(W, r, c));
            bad |= !(a <= FLT_MAX);
            m = a > m ? a : m;
        }
        const float sc = m / 127.0f;
        s[b] = sc;
        for (int64_t c = c0; c < c0 + group; c++) {
            float v = sc > 0.0f ? nearbyintf(load_w(W, r, c) / sc) : 0.0f;
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[c] = (int8_t)v;
        }
    }
    return bad;
}

/* ---------------- quantize: AVX-512 (group a multiple of 16) ---------------- */

DSV2_TARGET_AVX512 static inline __m512 load16_avx512(const dsv2_mat *W, int64_t r, int64_t c) {
    size_t i = (size_t)r * (size_t)W->cols + (size_t)c;
    if (W->dtype == DSV2_F32) return _mm512_loadu_ps((const float *)W->data + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W->data + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

DSV2_TARGET_AVX512 static int quant_row_avx512(int8_t *q, float *s, const dsv2_mat *W, int64_t r, int64_t group) {
    const int64_t ng = W->cols / group;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 big = _mm512_set1_ps(FLT_MAX), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    __mmask16 bad = 0;
    for (int64_t b = 0; b < ng; b++) {
        const int64_t c0 = b * group;
        __m512 m = _mm512_setzero_ps();
        for (int64_t c = c0; c < c0 + group; c += 16) {
            __m512 a = _mm512_and_ps(load16_avx512(W, r, c), absmask);
            bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
            m = _mm512_max_ps(m, a);
        }
        const float sc = _mm512_reduce_max_ps(m) / 127.0f;
        s[b] = sc;
        if (!(sc > 0.0f)) {
            memset(q + c0, 0, (size_t)group);
            continue;
        }
        const __m512 sv = _mm512_set1_ps(sc);
        for (int64_t c = c0; c < c0 + group; c += 16) {
            __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16_avx512(W, r, c), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            _mm_storeu_si128((__m128i *)(q + c), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
        }
    }
    return bad != 0;
}

typedef struct {
    int8_t *q;
    float *s;
    const dsv2_mat *W;
    int64_t group;
    atomic_int bad;
} quant_job;

static void quant_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    quant_job *j = (quant_job *)ctx;
    const int64_t K = j->W->cols, ng = K / j->group;
    const int fast = dsv2_isa() == DSV2_ISA_AVX512 && j->group % 16 == 0;
    int bad = 0;
    for (int64_t r = b; r < e; r++) {
        int8_t *qr = j->q + r * K;
        float *sr = j->s + r * ng;
        bad |= fast ? quant_row_avx512(qr, sr, j->W, r, j->group) : quant_row_portable(qr, sr, j->W, r, j->group);
    }
    if (bad) atomic_store(&j->bad, 1);
}

int dsv2_quantize_i8(int8_t *q, float *scale, const dsv2_mat *W, int64_t group) {
    if (!q || !scale || !W || !W->data || W->rows < 0 || W->cols <= 0 || group < 1 || W->cols % group)
        return DSV2_ERR_ARG;
    if (W->dtype != DSV2_F32 && W->dtype != DSV2_BF16) return DSV2_ERR_DTYPE;
    quant_job j = {q, scale, W, group};
    atomic_init(&j.bad, 0);
    int64_t grain = (int64_t)(1 << 16) / W->cols;
    if (grain < 1) grain = 1;
    dsv2_parallel_for(W->rows, grain, quant_task, &j);
    return atomic_load(&j.bad) ? DSV2_ERR_NONFINITE : DSV2_OK;
}

/* ---------------- dequantize rows ---------------- */

DSV2_TARGET_AVX512 static void dequant_avx512(float *out, const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    const int8_t *q = (const int8_t *)W->data;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *qr = q + r * K;
        const float *sr = W->scale + r * ng;
        float *o = out + (r - r0) * K;
        for (int64_t b = 0; b < ng; b++) {
            const __m512 sv = _mm512_set1_ps(sr[b]);
            for (int64_t c = b * g; c < (b + 1) * g; c += 16) {
                __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + c))));
                _mm512_storeu_ps(o + c, _mm512_mul_ps(v, sv));
            }
        }
    }
}

void dsv2_dequant_i8_rows(float *out, const dsv2_mat *W, int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    if (dsv2_isa() == DSV2_ISA_AVX512 && g % 16 == 0) {
        dequant_avx512(out, W, r0, r1);
        return;
    }
    const int8_t *q = (const int8_t *)W->data;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *qr = q + r * K;
        const float *sr = W->scale + r * ng;
        float *o = out + (r - r0) * K;
        for (int64_t b = 0; b < ng; b++)
            for (int64_t c = b * g; c < (b + 1) * g; c++) o[c] = (float)qr[c] * sr[b];
    }
}
