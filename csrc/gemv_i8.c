/* gemv_i8.c - row-dot kernels for int8 weights with per-block scales
 * (portable, AVX2, AVX-512): y[t, r] = sum_k x[t, k] * (q[r, k] * s[r, k / group]).
 *
 * Weights are dequantized in registers (int8 -> int32 -> fp32, times the
 * block scale: the exact fp32 value of the dequantized weight) and multiplied
 * with the fp32 activations in fp32 FMAs, so the result equals an fp32
 * row-dot with the dequantized weights up to summation order.  Weight rows
 * are streamed one after the other (sequential reads).  AVX-512 needs
 * group % 16 == 0, AVX2 group % 8 == 0; other groups take the portable loop.
 *
 * The second half holds the fast path: int16-quantized activations against
 * the int8 codes in exact int32 block sums (vpmaddwd), see gemv.h. */
#include "gemv.h"
#include "cpu.h"

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>

/* ---------------- portable ---------------- */
static void i8_portable(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                        int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *q = (const int8_t *)W->data + r * K;
        const float *s = W->scale + r * ng;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t b = 0; b < ng; b++)
                for (int64_t k = b * g; k < (b + 1) * g; k++) acc[k & 7] += xt[k] * ((float)q[k] * s[b]);
            y[t * ldy + r] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
    }
}

/* ---------------- AVX2 (group % 8 == 0) ---------------- */
DSV2_TARGET_AVX2 static void i8_avx2(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                                     int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *q = (const int8_t *)W->data + r * K;
        const float *s = W->scale + r * ng;
        __m256 acc[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < ng; b++) {
            const __m256 sv = _mm256_set1_ps(s[b]);
            for (int64_t k = b * g; k < (b + 1) * g; k += 8) {
                __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
                w = _mm256_mul_ps(w, sv);
                for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * ldx + k), acc[t]);
            }
        }
        for (int t = 0; t < T; t++) y[t * ldy + r] = dsv2_hsum256(acc[t]);
    }
}

/* ---------------- AVX-512 (group % 16 == 0) ---------------- */
DSV2_TARGET_AVX512 static inline __m512 deq16(const int8_t *p, __m512 s) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))), s);
}

/* One weight row x T activation rows (T a compile-time constant after
 * inlining): rows one after the other, so that each thread streams its block
 * of the matrix sequentially (see gemv.c); four partial sums per activation
 * row over consecutive 16-column chunks. */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
i8_row_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, cpg = W->group / 16; /* 16-column chunks per scale block */
    const int8_t *q = (const int8_t *)W->data + r * K;
    const float *s = W->scale + r * (K / W->group);
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    int64_t b = 0, cc = 0; /* scale block of the next chunk, and the chunk's index in it */
#define I8_NEXT_SCALE(sv)                     \
    const __m512 sv = _mm512_set1_ps(s[b]);   \
    if (++cc == cpg) cc = 0, b++;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        I8_NEXT_SCALE(s0)
        I8_NEXT_SCALE(s1)
        I8_NEXT_SCALE(s2)
        I8_NEXT_SCALE(s3)
        const __m512 w0 = deq16(q + k, s0), w1 = deq16(q + k + 16, s1);
        const __m512 w2 = deq16(q + k + 32, s2), w3 = deq16(q + k + 48, s3);
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx + k;
            acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xt + 32), acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xt + 48), acc[t][3]);
        }
    }
    for (; k < K; k += 16) {
        I8_NEXT_SCALE(sv)
        const __m512 w = deq16(q + k, sv);
        for (int t = 0; t < T; t++) acc[t][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + k), acc[t][0]);
    }
#undef I8_NEXT_SCALE
    for (int t = 0; t < T; t++)
        y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),
                                                            _mm512_add_ps(acc[t][2], acc[t][3])));
}

/* 4 weight rows x T activation rows (long activation rows, see gemv.h) */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
i8_tile_avx512(float *y, int64_t ldy, const float *x, int64_t ldx, const int T, const int NR, const dsv2_mat *W,
               int64_t r) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    const int8_t *q[4];
    const float *s[4];
    for (int i = 0; i < NR; i++) {
        q[i] = (const int8_t *)W->data + (r + i) * K;
        s[i] = W->scale + (r + i) * ng;
    }
    __m512 acc[DSV2_GEMV_MAX_T][4];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NR; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < ng; b++) {
        __m512 sv[4];
        for (int i = 0; i < NR; i++) sv[i] = _mm512_set1_ps(s[i][b]);
        for (int64_t k = b * g; k < (b + 1) * g; k += 16) {
            __m512 w[4];
            for (int i = 0; i < NR; i++) w[i] = deq16(q[i] + k, sv[i]);
            for (int t = 0; t < T; t++) {
                const __m512 xv = _mm512_loadu_ps(x + t * ldx + k);
                for (int i = 0; i < NR; i++) acc[t][i] = _mm512_fmadd_ps(w[i], xv, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NR; i++) y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[t][i]);
}

#define I8_512_T(TT)                                                                              \
    DSV2_TARGET_AVX512 static void i8_avx512_t##TT(float *y, int64_t ldy, const float *x, int64_t ldx, \
                                                   const dsv2_mat *W, int64_t r0, int64_t r1) {   \
        int64_t r = r0;                                                                           \
        if ((TT) * W->cols * 4 > DSV2_GEMV_TILE_XBYTES)                                           \
            for (; r + 4 <= r1; r += 4) i8_tile_avx512(y, ldy, x, ldx, TT, 4, W, r);              \
        for (; r < r1; r++) i8_row_avx512(y, ldy, x, ldx, TT, W, r);                              \
    }
I8_512_T(1)
I8_512_T(2)
I8_512_T(3)
I8_512_T(4)

void dsv2_gemv_i8_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                       int64_t r0, int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    const int isa = dsv2_isa();
    const int64_t g = W->group;
    for (int t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
        const int tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
        const float *xs = x + t0 * ldx;
        float *ys = y + t0 * ldy;
        if (isa == DSV2_ISA_AVX512 && g % 16 == 0) {
            switch (tt) {
            case 1: i8_avx512_t1(ys, ldy, xs, ldx, W, r0, r1); break;
            case 2: i8_avx512_t2(ys, ldy, xs, ldx, W, r0, r1); break;
            case 3: i8_avx512_t3(ys, ldy, xs, ldx, W, r0, r1); break;
            default: i8_avx512_t4(ys, ldy, xs, ldx, W, r0, r1); break;
            }
        } else if (isa >= DSV2_ISA_AVX2 && g % 8 == 0) {
            i8_avx2(ys, ldy, xs, ldx, tt, W, r0, r1);
        } else {
            i8_portable(ys, ldy, xs, ldx, tt, W, r0, r1);
        }
    }
}

/* ======================= int8 weights x int16 activations ======================= */

/* ---------------- activation quantization ---------------- */
/* A block holding NaN / Inf gets scale NaN (and codes 0), so that the
 * non-finite value reaches the output as it would in fp32. */
static void act16_row_portable(int16_t *q, float *s, const float *x, int64_t K, int64_t g) {
    for (int64_t b = 0; b < K / g; b++) {
        const float *xb = x + b * g;
        float m = 0.0f;
        int bad = 0;
        for (int64_t c = 0; c < g; c++) {
            float a = fabsf(xb[c]);
            bad |= !(a <= FLT_MAX);
            m = a > m ? a : m;
        }
        const float sc = bad ? NAN : m / 32767.0f;
        s[b] = sc;
        for (int64_t c = 0; c < g; c++) {
            float v = sc > 0.0f ? nearbyintf(xb[c] / sc) : 0.0f;
            v = v > 32767.0f ? 32767.0f : v < -32767.0f ? -32767.0f : v;
            q[b * g + c] = (int16_t)v;
        }
    }
}

DSV2_TARGET_AVX512 static void act16_row_avx512(int16_t *q, float *s, const float *x, int64_t K, int64_t g) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 big = _mm512_set1_ps(FLT_MAX), lo = _mm512_set1_ps(-32767.0f), hi = _mm512_set1_ps(32767.0f);
    for (int64_t b = 0; b < K / g; b++) {
        const float *xb = x + b * g;
        __m512 m = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t c = 0; c < g; c += 16) {
            __m512 a = _mm512_and_ps(_mm512_loadu_ps(xb + c), absmask);
            bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
            m = _mm512_max_ps(m, a);
        }
        const float sc = bad ? NAN : _mm512_reduce_max_ps(m) / 32767.0f;
        s[b] = sc;
        if (!(sc > 0.0f)) {
            memset(q + b * g, 0, (size_t)g * sizeof(int16_t));
            continue;
        }
        const __m512 sv = _mm512_set1_ps(sc);
        for (int64_t c = 0; c < g; c += 16) {
            __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xb + c), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            _mm256_storeu_si256((__m256i *)(q + b * g + c), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
        }
    }
}

void dsv2_quantize_act16(int16_t *q, float *s, const float *x, int64_t ldx, int64_t T, int64_t K,
                         int64_t group) {
    const int fast = dsv2_isa() == DSV2_ISA_AVX512 && group % 16 == 0;
    const int64_t ng = K / group;
    for (int64_t t = 0; t < T; t++) {
        if (fast) act16_row_avx512(q + t * K, s + t * ng, x + t * ldx, K, group);
        else act16_row_portable(q + t * K, s + t * ng, x + t * ldx, K, group);
    }
}

static int g_act_mode = -1; /* DSV2_I8_ACT_*, -1: not read from the environment yet */

int dsv2_get_i8_act(void) {
    if (g_act_mode < 0) {
        const char *env = getenv("DSV2EXT_INT8_ACT");
        g_act_mode = env && !strcmp(env, "fp32") ? DSV2_I8_ACT_FP32 : DSV2_I8_ACT_INT16;
    }
    return g_act_mode;
}

int dsv2_set_i8_act(int mode) {
    g_act_mode = mode == DSV2_I8_ACT_FP32 ? DSV2_I8_ACT_FP32 : DSV2_I8_ACT_INT16;
    return g_act_mode;
}

int dsv2_i8q_usable(const dsv2_mat *W, int64_t group) {
    /* block sums stay exact in int32: group * 127 * 32767 < 2^31 */
    return W->dtype == DSV2_I8 && W->scale && W->group == group && group % 16 == 0 && group <= 512 &&
           W->cols % group == 0 && dsv2_isa() >= DSV2_ISA_AVX2 && dsv2_get_i8_act() == DSV2_I8_ACT_INT16;
}

/* ---------------- AVX2 (group % 16 == 0): one weight row at a time ---------------- */
DSV2_TARGET_AVX2 static void i8q_avx2(float *y, int64_t ldy, const dsv2_xq *xq, int T, const dsv2_mat *W,
                                      int64_t r0, int64_t r1) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *qw = (const int8_t *)W->data + r * K;
        const float *sw = W->scale + r * ng;
        __m256 acc[DSV2_GEMV_MAX_T];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < ng; b++) {
            __m256i p[DSV2_GEMV_MAX_T];
            for (int t = 0; t < T; t++) p[t] = _mm256_setzero_si256();
            for (int64_t k = b * g; k < (b + 1) * g; k += 16) {
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qw + k)));
                for (int t = 0; t < T; t++)
                    p[t] = _mm256_add_epi32(p[t], _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(xq->q + t * K + k))));
            }
            for (int t = 0; t < T; t++)
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), _mm256_set1_ps(sw[b] * xq->s[t * ng + b]), acc[t]);
        }
        for (int t = 0; t < T; t++) y[t * ldy + r] = dsv2_hsum256(acc[t]);
    }
}

/* ---------------- AVX-512 (group % 32 == 0): one weight row x T activation rows ----------------
 * Rows one after the other (sequential streaming, see gemv.c).  Per scale
 * block: int32 block sums (vpmaddwd over 32 columns at a time, + vpaddd for
 * blocks wider than 32), converted to fp32 and accumulated with the combined
 * scale sw * sx; four accumulators per activation row take consecutive blocks. */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) __m512i
i8q_block_sum(const int8_t *qw, const int16_t *xq, int64_t g) {
    __m512i p = _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)qw)),
                                  _mm512_loadu_si512((const void *)xq));
    for (int64_t k = 32; k < g; k += 32)
        p = _mm512_add_epi32(p, _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw + k))),
                                                  _mm512_loadu_si512((const void *)(xq + k))));
    return p;
}

DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
i8q_row_avx512(float *y, int64_t ldy, const dsv2_xq *xq, const int T, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    const int8_t *qw = (const int8_t *)W->data + r * K;
    const float *sw = W->scale + r * ng;
    const int pf = dsv2_prefetch_for(DSV2_PF_I8);
    __m512 acc[DSV2_GEMV_MAX_T][4];
    float cs[DSV2_GEMV_MAX_T][16] __attribute__((aligned(64)));
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < ng; b0 += 16) {
        const int nb = ng - b0 < 16 ? (int)(ng - b0) : 16;
        const __mmask16 mb = (__mmask16)((1u << nb) - 1u);
        /* combined scales sw * sx of the next (up to) 16 blocks */
        const __m512 swv = _mm512_maskz_loadu_ps(mb, sw + b0);
        for (int t = 0; t < T; t++) _mm512_store_ps(cs[t], _mm512_mul_ps(swv, _mm512_maskz_loadu_ps(mb, xq->s + t * ng + b0)));
        int bb = 0;
        if (g == 32) { /* the usual block: one vpmaddwd per block, written out so the sums stay in registers */
            for (; bb + 4 <= nb; bb += 4) {
                const int64_t k = (b0 + bb) * 32;
                DSV2_PREFETCH_AHEAD(qw + k, 128, pf);
                const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw + k)));
                const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw + k + 32)));
                const __m512i w2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw + k + 64)));
                const __m512i w3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw + k + 96)));
                for (int t = 0; t < T; t++) {
                    const int16_t *xt = xq->q + t * K + k;
#define I8Q_ACC(j, wj)                                                                                         \
    acc[t][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(wj, _mm512_loadu_si512((const void *)(xt + 32 * j)))), \
                                _mm512_set1_ps(cs[t][bb + j]), acc[t][j]);
                    I8Q_ACC(0, w0)
                    I8Q_ACC(1, w1)
                    I8Q_ACC(2, w2)
                    I8Q_ACC(3, w3)
#undef I8Q_ACC
                }
            }
        } else {
            for (; bb + 4 <= nb; bb += 4) {
                const int64_t k = (b0 + bb) * g;
                for (int t = 0; t < T; t++) {
                    const int16_t *xt = xq->q + t * K + k;
                    const __m512i p0 = i8q_block_sum(qw + k, xt, g), p1 = i8q_block_sum(qw + k + g, xt + g, g);
                    const __m512i p2 = i8q_block_sum(qw + k + 2 * g, xt + 2 * g, g);
                    const __m512i p3 = i8q_block_sum(qw + k + 3 * g, xt + 3 * g, g);
                    acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(cs[t][bb]), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(cs[t][bb + 1]), acc[t][1]);
                    acc[t][2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), _mm512_set1_ps(cs[t][bb + 2]), acc[t][2]);
                    acc[t][3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p3), _mm512_set1_ps(cs[t][bb + 3]), acc[t][3]);
                }
            }
        }
        for (; bb < nb; bb++) {
            const int64_t k = (b0 + bb) * g;
            for (int t = 0; t < T; t++)
                acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i8q_block_sum(qw + k, xq->q + t * K + k, g)),
                                            _mm512_set1_ps(cs[t][bb]), acc[t][0]);
        }
    }
    for (int t = 0; t < T; t++)
        y[t * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),
                                                            _mm512_add_ps(acc[t][2], acc[t][3])));
}

/* NR weight rows x T activation rows (long activation rows, see gemv.h) */
DSV2_TARGET_AVX512 static inline __attribute__((always_inline)) void
i8q_tile_avx512(float *y, int64_t ldy, const dsv2_xq *xq, const int T, const int NR, const dsv2_mat *W, int64_t r) {
    const int64_t K = W->cols, g = W->group, ng = K / g;
    const int8_t *qw[4];
    const float *sw[4];
    for (int i = 0; i < NR; i++) {
        qw[i] = (const int8_t *)W->data + (r + i) * K;
        sw[i] = W->scale + (r + i) * ng;
    }
    __m512 acc[DSV2_GEMV_MAX_T][4];
    float cs[DSV2_GEMV_MAX_T][4][16] __attribute__((aligned(64)));
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NR; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < ng; b0 += 16) {
        const int nb = ng - b0 < 16 ? (int)(ng - b0) : 16;
        const __mmask16 mb = (__mmask16)((1u << nb) - 1u);
        /* combined scales sw * sx of the next (up to) 16 blocks */
        for (int t = 0; t < T; t++) {
            const __m512 sx = _mm512_maskz_loadu_ps(mb, xq->s + t * ng + b0);
            for (int i = 0; i < NR; i++) _mm512_store_ps(cs[t][i], _mm512_mul_ps(_mm512_maskz_loadu_ps(mb, sw[i] + b0), sx));
        }
        for (int bb = 0; bb < nb; bb++) {
            const int64_t k0 = (b0 + bb) * g;
            __m512i p[DSV2_GEMV_MAX_T][4], w[4];
            for (int i = 0; i < NR; i++) w[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw[i] + k0)));
            for (int t = 0; t < T; t++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq->q + t * K + k0));
                for (int i = 0; i < NR; i++) p[t][i] = _mm512_madd_epi16(w[i], xv);
            }
            for (int64_t k = k0 + 32; k < k0 + g; k += 32) { /* groups of 64, 96, ... columns */
                for (int i = 0; i < NR; i++) w[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qw[i] + k)));
                for (int t = 0; t < T; t++) {
                    const __m512i xv = _mm512_loadu_si512((const void *)(xq->q + t * K + k));
                    for (int i = 0; i < NR; i++) p[t][i] = _mm512_add_epi32(p[t][i], _mm512_madd_epi16(w[i], xv));
                }
            }
            for (int t = 0; t < T; t++)
                for (int i = 0; i < NR; i++)
                    acc[t][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[t][i]), _mm512_set1_ps(cs[t][i][bb]), acc[t][i]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NR; i++) y[t * ldy + r + i] = _mm512_reduce_add_ps(acc[t][i]);
}

#define I8Q_512_T(TT, NRT)                                                                         \
    DSV2_TARGET_AVX512 static void i8q_avx512_t##TT(float *y, int64_t ldy, const dsv2_xq *xq,        \
                                                    const dsv2_mat *W, int64_t r0, int64_t r1) {   \
        int64_t r = r0;                                                                            \
        if ((TT) * W->cols * 2 > DSV2_GEMV_TILE_XBYTES)                                            \
            for (; r + NRT <= r1; r += NRT) i8q_tile_avx512(y, ldy, xq, TT, NRT, W, r);            \
        for (; r < r1; r++) i8q_row_avx512(y, ldy, xq, TT, W, r);                                  \
    }
I8Q_512_T(1, 4)
I8Q_512_T(2, 4)
I8Q_512_T(3, 2)
I8Q_512_T(4, 2)

void dsv2_gemv_i8q_rows(float *y, int64_t ldy, const dsv2_xq *xq, int T, const dsv2_mat *W, int64_t r0,
                        int64_t r1) {
    if (T <= 0 || r0 >= r1) return;
    const int64_t K = W->cols, ng = K / W->group;
    const int isa = dsv2_isa();
    for (int t0 = 0; t0 < T; t0 += DSV2_GEMV_MAX_T) {
        const int tt = T - t0 < DSV2_GEMV_MAX_T ? T - t0 : DSV2_GEMV_MAX_T;
        const dsv2_xq xs = {xq->q + t0 * K, xq->s + t0 * ng, xq->group};
        float *ys = y + t0 * ldy;
        if (isa == DSV2_ISA_AVX512 && W->group % 32 == 0) {
            switch (tt) {
            case 1: i8q_avx512_t1(ys, ldy, &xs, W, r0, r1); break;
            case 2: i8q_avx512_t2(ys, ldy, &xs, W, r0, r1); break;
            case 3: i8q_avx512_t3(ys, ldy, &xs, W, r0, r1); break;
            default: i8q_avx512_t4(ys, ldy, &xs, W, r0, r1); break;
            }
        } else {
            i8q_avx2(ys, ldy, &xs, tt, W, r0, r1);
        }
    }
}
