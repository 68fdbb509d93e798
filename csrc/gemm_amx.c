/* gemm_amx.c - bf16 weights x activations on AMX tiles (or their emulation): packing, work split, dispatch. */
#include "gemm_amx.h"
#include "amx_tiles.h"
#include "bf16_vec.h"
#include "cpu.h"
#include "gemm_bf16dp.h"
#include "scratch.h"
#include "threadpool.h"

#include <immintrin.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define AMX_TILE_U16 512 /* bf16 elements of a 16 x 64-byte tile */
#define DSV2_TARGET_AMX __attribute__((target("amx-tile,amx-bf16")))

int dsv2_amx_use(const dsv2_mat *W, int64_t T) {
    const int ok = W->dtype == DSV2_BF16 ||
                   (W->dtype == DSV2_I8 && W->scale && W->group > 0 && W->group % 32 == 0 && W->cols % W->group == 0);
    return ok && T >= DSV2_AMX_MIN_T && dsv2_amx_mode() != DSV2_AMX_OFF;
}

/* ---------------- activation parts ---------------- */

/* 16 fp32 values (bit patterns u) -> the three exact bf16 parts, each in the high 16 bits
 * of its lanes: p1 = u with the low 16 bits cleared, p2 the same of x - p1, p3 = x - p1 - p2
 * (low 16 bits zero for normal values: see gemm_amx.h).  Inf / NaN: p1 = x (NaN kept
 * quiet), p2 = p3 = 0. */
DSV2_TARGET_AVX512 static inline void split3(__m512i u, __m512i *p1, __m512i *p2, __m512i *p3) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u), expo = _mm512_set1_epi32(0x7f800000);
    const __mmask16 fin = _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, expo), expo);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_andnot_si512(_mm512_set1_epi32((int)0x80000000u), u), expo);
    const __m512i b1 = _mm512_and_si512(u, hi);
    const __m512 r1 = _mm512_maskz_sub_ps(fin, _mm512_castsi512_ps(u), _mm512_castsi512_ps(b1));
    const __m512i b2 = _mm512_and_si512(_mm512_castps_si512(r1), hi);
    const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(b2));
    *p1 = _mm512_mask_or_epi32(b1, nan, b1, _mm512_set1_epi32(0x00400000)); /* NaN stays a (quiet) NaN */
    *p2 = b2;
    *p3 = _mm512_castps_si512(r2);
}

/* the high halves of two 16-lane vectors -> 32 bf16 (16 pairs) in one register */
DSV2_TARGET_AVX512 static inline __m512i pack_hi(__m512i lo, __m512i hi) {
    const __m256i a = _mm512_cvtepi32_epi16(_mm512_srli_epi32(lo, 16));
    const __m256i b = _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi, 16));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* 32 activations x[0..n) (n <= 32, zero beyond) -> out[p]: part p as 16 bf16 pairs, for p < parts
 * (3: the exact split; 1: rounded to nearest even) */
DSV2_TARGET_AVX512 static inline void act_parts(__m512i *out, const float *x, int n, int parts) {
    const __mmask16 m0 = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
    const __mmask16 m1 = n >= 32 ? (__mmask16)0xffff : (n > 16 ? (__mmask16)((1u << (n - 16)) - 1u) : 0);
    const __m512i u0 = _mm512_maskz_loadu_epi32(m0, x), u1 = _mm512_maskz_loadu_epi32(m1, x + 16);
    if (parts == 1) {
        out[0] = pack_hi(dsv2_bf16_rne_hi_avx512(u0), dsv2_bf16_rne_hi_avx512(u1));
        return;
    }
    __m512i a1, a2, a3, c1, c2, c3;
    split3(u0, &a1, &a2, &a3);
    split3(u1, &c1, &c2, &c3);
    out[0] = pack_hi(a1, c1);
    out[1] = pack_hi(a2, c2);
    out[2] = pack_hi(a3, c3);
}

DSV2_TARGET_AVX512 static void split3_rows(uint16_t *b1, uint16_t *b2, uint16_t *b3, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) {
        const int m = n - i < 32 ? (int)(n - i) : 32;
        __m512i v[3];
        act_parts(v, x + i, m, 3);
        uint16_t *out[3] = {b1 + i, b2 + i, b3 + i};
        for (int p = 0; p < 3; p++) {
            uint16_t tmp[32];
            _mm512_storeu_si512((void *)tmp, v[p]);
            memcpy(out[p], tmp, (size_t)m * sizeof(uint16_t));
        }
    }
}

int dsv2_amx_split3(uint16_t *b1, uint16_t *b2, uint16_t *b3, const float *x, int64_t n) {
    if (dsv2_isa() != DSV2_ISA_AVX512) return DSV2_ERR_ARG; /* the packing code is AVX-512 only */
    split3_rows(b1, b2, b3, x, n);
    return DSV2_OK;
}

/* r[i] (16 x 16 32-bit values, row i) -> r[i] = column i */
DSV2_TARGET_AVX512 static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* r[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c */
    for (int g = 0; g < 4; g++) {
        r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
        const __m512i d = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        const __m512i e = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
        t[c] = _mm512_shuffle_i32x4(a, d, 0x88);
        t[8 + c] = _mm512_shuffle_i32x4(a, d, 0xdd);
        t[4 + c] = _mm512_shuffle_i32x4(b, e, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(b, e, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* ---------------- packing ---------------- */

/* Activations of one token tile: x [nt, K] (rows ldx apart, nt <= 16; the other tokens zero)
 * -> dst [nsteps][parts][16 pair rows][16 tokens x 2] bf16 (tile B operands). */
DSV2_TARGET_AVX512 static void pack_b_tile(uint16_t *dst, const float *x, int64_t ldx, int64_t nt, int64_t K,
                                           int parts) {
    const int64_t nsteps = (K + 31) / 32;
    __m512i r[3][16];
    for (int64_t s = 0; s < nsteps; s++) {
        const int n = K - 32 * s < 32 ? (int)(K - 32 * s) : 32;
        for (int t = 0; t < 16; t++) {
            __m512i v[3];
            if (t < nt) act_parts(v, x + t * ldx + 32 * s, n, parts);
            else v[0] = v[1] = v[2] = _mm512_setzero_si512();
            for (int p = 0; p < parts; p++) r[p][t] = v[p];
        }
        for (int p = 0; p < parts; p++) {
            transpose16(r[p]);
            uint16_t *d = dst + (s * parts + p) * AMX_TILE_U16;
            for (int kp = 0; kp < 16; kp++) _mm512_storeu_si512((void *)(d + kp * 32), r[p][kp]);
        }
    }
}

/* Weight rows [r0, r0 + 32 nblk) (rows >= N zero), K steps [s0, s0 + ns) (columns >= K zero)
 * -> ap [nblk][ns][2 tiles][16 rows][32] bf16 (tile A operands). */
DSV2_TARGET_AVX512 static void pack_a_avx512(uint16_t *ap, const dsv2_mat *W, int64_t r0, int64_t nblk, int64_t s0,
                                             int64_t ns) {
    const int64_t K = W->cols, N = W->rows;
    const uint16_t *w = (const uint16_t *)W->data;
    for (int64_t blk = 0; blk < nblk; blk++)
        for (int i = 0; i < 32; i++) {
            const int64_t row = r0 + blk * 32 + i;
            uint16_t *d = ap + (blk * ns * 2 + i / 16) * AMX_TILE_U16 + (i % 16) * 32;
            for (int64_t s = 0; s < ns; s++, d += 2 * AMX_TILE_U16) {
                const int64_t k = (s0 + s) * 32;
                const int n = row >= N ? 0 : (K - k < 32 ? (int)(K - k) : 32);
                const __mmask32 m = n == 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u);
                _mm512_storeu_si512((void *)d, _mm512_maskz_loadu_epi16(m, n ? w + row * K + k : w));
            }
        }
}

/* int8 weights (group % 32 == 0, so K % 32 == 0): the codes as bf16 (exact: |q| <= 128) in the
 * same tile layout, then the scales sc [nblk][ns / spg groups][32 rows] (rows >= N: 0) */
DSV2_TARGET_AVX512 static void pack_a_i8_avx512(uint16_t *ap, float *sc, const dsv2_mat *W, int64_t r0,
                                                int64_t nblk, int64_t s0, int64_t ns) {
    const int64_t K = W->cols, N = W->rows, spg = W->group / 32, ng = ns / spg, gpr = K / W->group;
    const int8_t *q = (const int8_t *)W->data;
    for (int64_t blk = 0; blk < nblk; blk++)
        for (int i = 0; i < 32; i++) {
            const int64_t row = r0 + blk * 32 + i;
            uint16_t *d = ap + (blk * ns * 2 + i / 16) * AMX_TILE_U16 + (i % 16) * 32;
            for (int64_t s = 0; s < ns; s++, d += 2 * AMX_TILE_U16) {
                __m512i v = _mm512_setzero_si512();
                if (row < N) {
                    const __m128i *src = (const __m128i *)(q + row * K + (s0 + s) * 32);
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src)));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1)));
                    v = pack_hi(_mm512_castps_si512(lo), _mm512_castps_si512(hi));
                }
                _mm512_storeu_si512((void *)d, v);
            }
            for (int64_t g = 0; g < ng; g++)
                sc[(blk * ng + g) * 32 + i] = row < N ? W->scale[row * gpr + s0 / spg + g] : 0.0f;
        }
}

/* The A panel of rows [r0, r0 + 32 nblk), steps [s0, s0 + ns) into ap; for int8 weights the
 * scales follow the tiles: returns them (NULL for bf16). */
static const float *amx_pack_a(uint16_t *ap, const dsv2_mat *W, int64_t r0, int64_t nblk, int64_t s0, int64_t ns) {
    if (W->dtype == DSV2_I8) {
        float *sc = (float *)(ap + nblk * ns * 2 * AMX_TILE_U16);
        pack_a_i8_avx512(ap, sc, W, r0, nblk, s0, ns);
        return sc;
    }
    pack_a_avx512(ap, W, r0, nblk, s0, ns);
    return NULL;
}

/* int8 epilogue of one group: acc [32 rows][16 or 32 tokens] (rows ldc apart) += s[r] * pb[r]
 * (pb rows 32 apart), one fused multiply-add (one rounding) */
DSV2_TARGET_AVX512 static void amx_scale_acc(float *acc, int64_t ldc, const float *pb, const float *s, int two) {
    for (int r = 0; r < 32; r++) {
        const __m512 sr = _mm512_set1_ps(s[r]);
        float *ar = acc + r * ldc;
        _mm512_storeu_ps(ar, _mm512_fmadd_ps(sr, _mm512_loadu_ps(pb + 32 * r), _mm512_loadu_ps(ar)));
        if (two) _mm512_storeu_ps(ar + 16, _mm512_fmadd_ps(sr, _mm512_loadu_ps(pb + 32 * r + 16), _mm512_loadu_ps(ar + 16)));
    }
}

/* cb [nr rows (weight rows), nt columns (tokens)] (rows ldc apart) -> y[t * ldy + r] */
DSV2_TARGET_AVX512 static void amx_unpack_c(float *y, int64_t ldy, const float *cb, int64_t ldc, int64_t nr,
                                            int64_t nt) {
    __m512i r[16];
    for (int64_t r0 = 0; r0 < nr; r0 += 16) {
        const int64_t mr = nr - r0 < 16 ? nr - r0 : 16;
        const __mmask16 m = (__mmask16)((1u << mr) - 1u);
        for (int64_t t0 = 0; t0 < nt; t0 += 16) { /* cb holds whole 16 x 16 tiles: full loads */
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(cb + (r0 + i) * ldc + t0));
            transpose16(r);
            const int64_t mt = nt - t0 < 16 ? nt - t0 : 16;
            for (int64_t t = 0; t < mt; t++) _mm512_mask_storeu_epi32(y + (t0 + t) * ldy + r0, m, r[t]);
        }
    }
}

/* ---------------- the tile loops, twice ---------------- */

/* a whole product's plan: items = row blocks x token groups */
typedef struct {
    float *y;
    int64_t ldy;
    const dsv2_mat *W;
    const uint16_t *bp; /* packed activations [ntt][nsteps][parts][512] */
    int64_t T, ntt, nsteps, parts;
    int64_t rb, ntg, tpg; /* rows per block, token groups, token tiles per group */
    int64_t kcs;          /* K steps per panel (a multiple of spg) */
    int64_t spg;          /* int8: K steps per scale group */
    int hw;
    dsv2_tilecfg cfg;
    atomic_int err;
} amx_job;

#if DSV2_AMX_COMPILED
/* the CPU's tiles.  The intrinsics are asm statements that do not tell the compiler they
 * read memory: a compiler barrier before each load keeps the packing stores ahead of it. */
#define AMX_FN(name) amx_hw_##name
#define AMX_ATTR DSV2_TARGET_AMX
#define AMX_STATE (void)0
#define AMX_SP
#define AMX_SA
#define T_CFG(cfg)                           \
    do {                                     \
        __asm__ volatile("" ::: "memory");   \
        _tile_loadconfig(cfg);               \
    } while (0)
#define T_RELEASE() _tile_release()
#define T_ZERO(t) _tile_zero(t)
#define T_LOAD(t, p, s)                      \
    do {                                     \
        __asm__ volatile("" ::: "memory");   \
        _tile_loadd(t, p, s);                \
    } while (0)
#define T_STORE(t, p, s) _tile_stored(t, p, s)
#define T_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#include "gemm_amx_body.h"
#undef AMX_FN
#undef AMX_ATTR
#undef AMX_STATE
#undef AMX_SP
#undef AMX_SA
#undef T_CFG
#undef T_RELEASE
#undef T_ZERO
#undef T_LOAD
#undef T_STORE
#undef T_DP
#else /* no AMX instructions from this compiler: dsv2_amx_hw_supported() is 0, never called */
static void amx_hw_items(const amx_job *J, int64_t i0, int64_t i1, uint16_t *ap, float *cb, float *pb) {
    (void)J, (void)i0, (void)i1, (void)ap, (void)cb, (void)pb;
}
#endif

/* the emulation: the same loops on a register file of this thread */
#define AMX_FN(name) amx_emu_##name
#define AMX_ATTR
#define AMX_STATE                  \
    dsv2_tile_emu emu_state_;      \
    dsv2_tile_emu *E = &emu_state_
#define AMX_SP dsv2_tile_emu *E,
#define AMX_SA E,
#define T_CFG(cfg) dsv2_emu_loadconfig(E, cfg)
#define T_RELEASE() dsv2_emu_release(E)
#define T_ZERO(t) dsv2_emu_zero(E, t)
#define T_LOAD(t, p, s) dsv2_emu_loadd(E, t, p, s)
#define T_STORE(t, p, s) dsv2_emu_stored(E, t, p, s)
#define T_DP(c, a, b) dsv2_emu_dpbf16ps(E, c, a, b)
#include "gemm_amx_body.h"

/* ---------------- a whole product ---------------- */

/* every tile 16 rows x 64 bytes */
static void full_tiles_cfg(dsv2_tilecfg *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette_id = 1;
    for (int i = 0; i < 8; i++) cfg->rows[i] = 16, cfg->colsb[i] = 64;
}

static void items_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    amx_job *J = (amx_job *)ctx;
    /* A panel (+ int8 scales), C block sums, one int8 group's 32 x 32 sums */
    const size_t abytes = (size_t)J->rb * (size_t)J->kcs * 64 + (size_t)J->rb * (size_t)J->kcs * sizeof(float);
    const size_t cbytes = (size_t)J->rb * (size_t)J->tpg * 16 * sizeof(float), pbytes = 32 * 32 * sizeof(float);
    char *buf = (char *)dsv2_scratch_alloc(abytes + cbytes + pbytes);
    if (!buf) {
        atomic_store(&J->err, DSV2_ERR_NOMEM);
        return;
    }
    float *cb = (float *)(buf + abytes), *pb = (float *)(buf + abytes + cbytes);
    if (J->hw) amx_hw_items(J, b, e, (uint16_t *)buf, cb, pb);
    else amx_emu_items(J, b, e, (uint16_t *)buf, cb, pb);
    dsv2_scratch_free(buf);
}

typedef struct {
    uint16_t *bp;
    const float *x;
    int64_t ldx, T, K, parts;
} packb_job;

static void packb_task(void *ctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    packb_job *j = (packb_job *)ctx;
    const int64_t tile = ((j->K + 31) / 32) * j->parts * AMX_TILE_U16;
    for (int64_t jt = b; jt < e; jt++) {
        const int64_t nt = j->T - 16 * jt < 16 ? j->T - 16 * jt : 16;
        pack_b_tile(j->bp + jt * tile, j->x + 16 * jt * j->ldx, j->ldx, nt, j->K, (int)j->parts);
    }
}

/* Blocking of a pass (no effect on the results): weight rows per block rb (<= 128) and token
 * groups, chosen to give every thread about the same work (the pool hands each thread one
 * contiguous run of items) while keeping blocks square-ish (each loaded panel feeds more
 * tile products). */
static void plan(amx_job *J, int64_t N, int nth) {
    static const int64_t rbs[4] = {128, 96, 64, 32};
    double best = 0;
    for (int i = 0; i < 4; i++) {
        const int64_t rb = rbs[i], nrb = (N + rb - 1) / rb;
        for (int64_t ntg = 1; ntg <= J->ntt && ntg <= 64; ntg++) {
            const int64_t tpg = (J->ntt + ntg - 1) / ntg, groups = (J->ntt + tpg - 1) / tpg;
            if (groups != ntg) continue;
            const int64_t items = nrb * ntg, per = (items + nth - 1) / nth;
            const double tok = 16.0 * (double)tpg, rows = (double)(rb < N ? rb : (N + 31) / 32 * 32);
            const double cost = (double)per * rows * tok * (1.0 + 16.0 / rows + 16.0 / (tok * (double)J->parts));
            if (best == 0 || cost < best) {
                best = cost;
                J->rb = rb;
                J->ntg = ntg;
                J->tpg = tpg;
            }
        }
    }
    /* K steps per panel: the item's activation panel stays in L2 (~512 KiB), its weight panel
     * (32 rows) in L1 */
    int64_t kcs = ((int64_t)512 << 10) / (16 * J->tpg * 64 * J->parts);
    kcs = kcs < 4 ? 4 : (kcs > 16 ? 16 : kcs);
    J->kcs = kcs < J->spg ? J->spg : kcs / J->spg * J->spg;
}

/* tokens per pass: the packed activations stay under ~16 MiB */
static int64_t pass_tokens(int64_t nsteps, int64_t parts) {
    int64_t t = ((int64_t)16 << 20) / (nsteps * parts * 64) / 32 * 32;
    return t < 64 ? 64 : (t > 512 ? 512 : t);
}

int dsv2_linear_amx(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *W, int64_t T) {
    const int64_t N = W->rows, K = W->cols;
    const int mode = dsv2_amx_mode();
    if (!dsv2_amx_use(W, DSV2_AMX_MIN_T) || T < 0 || N <= 0 || K <= 0 || ldx < K || ldy < N || mode == DSV2_AMX_OFF)
        return DSV2_ERR_ARG;
    if (T == 0) return DSV2_OK;
    /* int8: always exact (the bf16 compute mode is about bf16 weights) */
    const int64_t parts = W->dtype == DSV2_BF16 && dsv2_bf16dp_use(W, T) ? 1 : 3, nsteps = (K + 31) / 32;
    const int64_t Tp = T < pass_tokens(nsteps, parts) ? T : pass_tokens(nsteps, parts);
    const int64_t tile = nsteps * parts * AMX_TILE_U16;
    uint16_t *bp = (uint16_t *)dsv2_scratch_alloc((size_t)((Tp + 15) / 16) * (size_t)tile * sizeof(uint16_t));
    if (!bp) return DSV2_ERR_NOMEM;
    int rc = DSV2_OK;
    for (int64_t t0 = 0; t0 < T && rc == DSV2_OK; t0 += Tp) {
        const int64_t tc = T - t0 < Tp ? T - t0 : Tp, ntt = (tc + 15) / 16;
        packb_job pj = {bp, x + t0 * ldx, ldx, tc, K, parts};
        dsv2_parallel_for(ntt, 1, packb_task, &pj);
        amx_job J;
        memset(&J, 0, sizeof J);
        J.y = y + t0 * ldy;
        J.ldy = ldy;
        J.W = W;
        J.bp = bp;
        J.T = tc;
        J.ntt = ntt;
        J.nsteps = nsteps;
        J.parts = parts;
        J.hw = mode == DSV2_AMX_HW;
        J.spg = W->dtype == DSV2_I8 ? W->group / 32 : 1;
        full_tiles_cfg(&J.cfg);
        plan(&J, N, dsv2_region_threads()); /* 1 inside a region: the product runs serially */
        atomic_init(&J.err, DSV2_OK);
        dsv2_parallel_for(((N + J.rb - 1) / J.rb) * J.ntg, 1, items_task, &J);
        rc = atomic_load(&J.err);
    }
    dsv2_scratch_free(bp);
    return rc;
}

/* ---------------- test hook: one tile product ---------------- */

#if DSV2_AMX_COMPILED
DSV2_TARGET_AMX static void tile_hw(float *c, const uint16_t *a, const uint16_t *b, const dsv2_tilecfg *cfg) {
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(cfg);
    _tile_loadd(0, c, 64);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
}
#else
static void tile_hw(float *c, const uint16_t *a, const uint16_t *b, const dsv2_tilecfg *cfg) {
    (void)c, (void)a, (void)b, (void)cfg;
}
#endif

int dsv2_amx_tdpbf16ps_tile(float *c, const uint16_t *a, const uint16_t *b, int hw) {
    dsv2_tilecfg cfg;
    full_tiles_cfg(&cfg);
    if (hw) {
        if (!dsv2_amx_hw_supported()) return DSV2_ERR_ARG;
        tile_hw(c, a, b, &cfg);
        return DSV2_OK;
    }
    dsv2_tile_emu E;
    dsv2_emu_loadconfig(&E, &cfg);
    dsv2_emu_loadd(&E, 0, c, 64);
    dsv2_emu_loadd(&E, 1, a, 64);
    dsv2_emu_loadd(&E, 2, b, 64);
    dsv2_emu_dpbf16ps(&E, 0, 1, 2);
    dsv2_emu_stored(&E, 0, c, 64);
    dsv2_emu_release(&E);
    return DSV2_OK;
}
