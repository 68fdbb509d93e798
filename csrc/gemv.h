/* gemv.h - row-dot kernels: a few activation rows against a block of weight
 * rows, with the instruction set picked at run time.
 *
 * y[t * ldy + r] = sum_k x[t * ldx + k] * W[r, k]   for r in [r0, r1), t < T
 * x [T, K] fp32 (rows ldx apart) , W [rows, K] fp32, bf16, int8 or fp8 -> y [T, ldy]
 * T <= DSV2_GEMV_MAX_T.  bf16 weights are widened to fp32 exactly in
 * registers and accumulated in fp32 (same values as an fp32 model with the
 * bf16 weights upcast, up to summation order).  int8 weights are dequantized
 * in registers (q * scale, the exact fp32 product) and accumulated in fp32:
 * the same values as an fp32 model with the dequantized weights; activations
 * stay fp32.  fp8 (e4m3fn with 2-D block scales) likewise: gemv_f8.h. */
#ifndef DSV2_GEMV_H
#define DSV2_GEMV_H

#include "cpu.h"
#include "dsv2.h"

#include <immintrin.h>

#define DSV2_GEMV_MAX_T 4

/* horizontal sum of 8 fp32 lanes (the AVX2 row-dot kernels) */
DSV2_TARGET_AVX2 static inline float dsv2_hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* Access order of the AVX-512 row-dot kernels: while the activation rows
 * (T x K values in the kernel's format: fp32, or int16 for the int8 fast
 * path) fit in this many bytes, weight rows are read one after the other (one
 * sequential stream per thread); longer activation rows use 4-row tiles (each
 * activation vector loaded serves 4 weight rows).  Measured on Zen 4 (L1D
 * 32 KiB): rows of 2048 columns stream ~1.5x faster one by one; rows of 10944
 * columns ~1.6x faster in tiles. */
#define DSV2_GEMV_TILE_XBYTES 16384

void dsv2_gemv_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                    const dsv2_mat *W, int64_t r0, int64_t r1);

/* The int8 case of dsv2_gemv_rows (gemv_i8.c); any T >= 1. */
void dsv2_gemv_i8_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                       const dsv2_mat *W, int64_t r0, int64_t r1);

/* ---- int8 weights x int16-quantized activations (gemv_i8.c) ----
 * The fast decode path for int8 weights: each activation row is quantized
 * once (per call of a linear / MLP, not per block of weight rows) to int16
 * with one fp32 scale per block of the weight's `group` columns,
 *   s[t, b] = max_{c in b} |x[t, c]| / 32767 ,  q[t, c] = rint(x[t, c] / s[t, b])
 * (fp32 division, round half to even; q = 0 where s = 0), and
 *   y[t, r] = sum_b (sw[r, b] * s[t, b]) * sum_{c in b} qw[r, c] * q[t, c]
 * with the block sums exact in int32 (AVX-512BW / AVX2 vpmaddwd) and the
 * rest in fp32.  Activation rounding is at most max|x in block| / 65534 per
 * value (~1e-5 relative on a dot product).  Used where
 * dsv2_i8q_usable(W, group) holds; other int8 matrices keep the fp32 path. */
/* Activation rows in the next pass of the AVX-512 multi-token row-dot tiles
 * (expert_mlp.c, gemv_eo.c) when `left` rows remain: passes of 4, a first pass
 * of 5 when left % 4 == 1 (no 1-row pass after a 4-row one), or all that is left. */
static inline int64_t dsv2_tile_pass(int64_t left) {
    return left % 4 == 1 && left >= 5 ? 5 : (left < 4 ? left : 4);
}

typedef struct {
    const int16_t *q; /* [T, K] rows K apart */
    const float *s;   /* [T, K / group] rows K / group apart */
    int64_t group;
    /* Or, for bf16 weights (gemv_eo.h): the fp32 activations in the even|odd
     * layout, [T, K] rows K apart (q == NULL then).  The MLP row functions of
     * expert_mlp.h take either kind as "activations prepared once per call". */
    const float *p;
    /* Or, for int4 weights (the third kind, gemv_i4.c): int8 codes in the int4
     * kernels' layout, [T, Kp] rows Kp apart (Kp: K rounded up to 64), one
     * fp32 scale per 256 columns [T, ceil(K / 256)], and the sums of the codes
     * of each 32-column group [T, 8 * ceil(K / 256)] (NULL when not prepared). */
    const int8_t *q8;
    const float *s8;
    const int16_t *gsum8;
    /* Or, for fp8 weights on the AVX-512 VBMI kernels (gemv_f8.h: dsv2_f8p_prepare):
     * the fp32 activations in those kernels' column order, [T, K] rows K apart. */
    const float *f8p;
} dsv2_xq;

// x [T, K] (rows ldx apart) -> q [T, K] int16 , s [T, K / group]   (K % group == 0)
void dsv2_quantize_act16(int16_t *q, float *s, const float *x, int64_t ldx, int64_t T, int64_t K,
                         int64_t group);
// 1 when W is int8 with blocks of `group` columns that the int16 kernels take on this CPU
// (and the activation mode is DSV2_I8_ACT_INT16)
int dsv2_i8q_usable(const dsv2_mat *W, int64_t group);

/* Activations of int8 row-dot products: DSV2_I8_ACT_INT16 (the default; the
 * environment variable DSV2EXT_INT8_ACT=fp32 changes it) or DSV2_I8_ACT_FP32
 * (exactly the dequantized weights times fp32 activations, about 2x the
 * compute).  Set between calls, not while kernels run. */
enum { DSV2_I8_ACT_INT16 = 0, DSV2_I8_ACT_FP32 = 1 };
int dsv2_get_i8_act(void);
int dsv2_set_i8_act(int mode);
// xq [T, K] (dsv2_xq, group == W->group) , W int8 [rows, K] -> y[t * ldy + r], r in [r0, r1); any T >= 1
void dsv2_gemv_i8q_rows(float *y, int64_t ldy, const dsv2_xq *xq, int T, const dsv2_mat *W, int64_t r0,
                        int64_t r1);

/* ---- int4 weights x int8-quantized activations (gemv_i4.c) ----
 * The decode path for int4 weights (int4.h): each activation row is
 * quantized once per call to int8 with one fp32 scale per 256 columns (the
 * weights' super-blocks),
 *   s[t, b] = max_{c in b} |x[t, c]| / 127 ,  q[t, c] = rint(x[t, c] / s[t, b])
 * (fp32 division, half to even; q = 0 where s = 0; a block holding NaN / Inf
 * gets s = NaN), and per super-block b of weight row r
 *   y[t, r] += s[t, b] * (d * sum_g sc_g * sum_{c in g} qw[r, c] q[t, c]
 *                         - dmin * sum_g m_g * sum_{c in g} q[t, c])
 * with the sums exact in int32 (AVX-512 VNNI vpmaddubsw + vpdpwssd, AVX2
 * vpmaddubsw + vpmaddwd, portable C) and the rest in fp32.  Activation
 * rounding is at most max|x in block| / 254 per value. */
// x [T, K] (rows ldx apart) -> xq's q8 [T, Kp], s8 [T, nsb], gsum8 [T, 8 nsb]  (a view from dsv2_act8_at)
void dsv2_quantize_act8(const dsv2_xq *xq, const float *x, int64_t ldx, int64_t T, int64_t K);
// bytes of the int8 kind for T rows of K values, and its view of such a buffer (64-byte aligned)
size_t dsv2_act8_bytes(int64_t T, int64_t K);
dsv2_xq dsv2_act8_at(void *buf, int64_t T, int64_t K);
// 1 when W is int4 and the int4 activation mode is DSV2_I4_ACT_INT8
int dsv2_i4q_usable(const dsv2_mat *W);
/* Activations of int4 row-dot products: DSV2_I4_ACT_INT8 (the default; the
 * environment variable DSV2EXT_INT4_ACT=fp32 changes it) or DSV2_I4_ACT_FP32
 * (the dequantized weights times fp32 activations, exactly).  Set between calls. */
enum { DSV2_I4_ACT_INT8 = 0, DSV2_I4_ACT_FP32 = 1 };
int dsv2_get_i4_act(void);
int dsv2_set_i4_act(int mode);
// xq [T, K] (int8 kind) , W int4 [rows, K] -> y[t * ldy + r], r in [r0, r1); any T >= 1
void dsv2_gemv_i4q_rows(float *y, int64_t ldy, const dsv2_xq *xq, int T, const dsv2_mat *W, int64_t r0,
                        int64_t r1);
// The int4 case of dsv2_gemv_rows (fp32 activations, weights dequantized exactly); any T >= 1
void dsv2_gemv_i4_rows(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const dsv2_mat *W,
                       int64_t r0, int64_t r1);

/* ---- activations prepared once per call (act_prep.c) ----
 * The kinds an input of matrices a and b (b may be NULL) is prepared in:
 * g16 > 0: the int16 kind with blocks of g16 columns (for the int8 matrices,
 * when they all take the int16 kernels with that group); i8: the int8 kind
 * (an int4 matrix takes the int8 kernels).  Matrices of other dtypes, or
 * int8 ones without the int16 kind, run on fp32 activations. */
typedef struct {
    int64_t g16;
    int i8;
    int f8; /* fp8 matrices on the VBMI kernels: x in their column order (only for
             * T <= DSV2_F8P_MAX_ROWS rows; more take the widened fp32 weights) */
} dsv2_act_kinds;
#define DSV2_F8P_MAX_ROWS 64
dsv2_act_kinds dsv2_act_kinds_of(const dsv2_mat *a, const dsv2_mat *b);
// bytes of those kinds for T rows of K values (0: none), and the view of such a buffer (64-byte aligned)
size_t dsv2_act_bytes(dsv2_act_kinds k, int64_t T, int64_t K);
dsv2_xq dsv2_act_at(dsv2_act_kinds k, void *buf, int64_t T, int64_t K);
// 1 when xq holds a kind that dsv2_act_quantize fills (int16, int8 or fp8's column order)
static inline int dsv2_xq_to_fill(const dsv2_xq *xq) { return xq->q || xq->q8 || xq->f8p; }
// x [T, K] (rows ldx apart) -> every quantized kind that xq holds
void dsv2_act_quantize(const dsv2_xq *xq, const float *x, int64_t ldx, int64_t T, int64_t K);
// rows [r0, ...) of prepared activations with rows of K values (every kind; NULL parts stay NULL)
dsv2_xq dsv2_xq_rows(const dsv2_xq *xq, int64_t K, int64_t r0);
// y[t * ldy + r], r in [r0, r1), t < T (any T) with W's kernel for the prepared kinds:
// int4 W and xq->q8: int8 kernels; int8 W usable with xq->q's group: int16 kernels; fp8 W
// (dsv2_f8p_usable) and xq->f8p: the VBMI kernels; returns 0
// when xq has no kind for W (the caller takes its fp32 path)
int dsv2_gemv_q_rows(float *y, int64_t ldy, const dsv2_xq *xq, int64_t T, const dsv2_mat *W, int64_t r0,
                     int64_t r1);

/* bf16 in [n] -> fp32 out [n] (exact) */
void dsv2_bf16_row_to_f32(float *out, const uint16_t *in, int64_t n);

/* Widen rows [r0, r1) of W to fp32: out [(r1 - r0), W->cols]. */
void dsv2_mat_rows_to_f32(float *out, const dsv2_mat *W, int64_t r0, int64_t r1);

#endif
