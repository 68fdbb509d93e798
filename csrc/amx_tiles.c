/* amx_tiles.c - AMX detection (CPUID, XCR0, Linux permission) and the C emulation of the tiles. */
#define _GNU_SOURCE
#include "amx_tiles.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ---------------- detection ---------------- */

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int g_amx_hw = 0;
static pthread_once_t g_amx_once = PTHREAD_ONCE_INIT;

static void detect_amx(void) {
#if DSV2_AMX_COMPILED
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return; /* OSXSAVE: xgetbv usable */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return; /* AMX-TILE, AMX-BF16 */
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const uint64_t xcr0 = ((uint64_t)hi << 32) | lo;
    if ((xcr0 & (3ull << 17)) != (3ull << 17)) return; /* XTILECFG, XTILEDATA enabled by the OS */
#if defined(__linux__)
    /* Linux >= 5.16 hands out the 8 KiB tile data state on request, once per process;
     * a refusal (older kernel, seccomp, ...) means no AMX */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return;
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm) != 0 || !(perm & (1ul << XFEATURE_XTILEDATA))) return;
#endif
    g_amx_hw = 1;
#endif
}

int dsv2_amx_hw_supported(void) {
    pthread_once(&g_amx_once, detect_amx);
    return g_amx_hw;
}

/* ---------------- emulation ---------------- */

static atomic_long g_faults, g_products;

void dsv2_amx_emu_stats(long *products, long *faults) {
    *products = atomic_load(&g_products);
    *faults = atomic_load(&g_faults);
}

static void fault(void) { atomic_fetch_add(&g_faults, 1); }

void dsv2_emu_loadconfig(dsv2_tile_emu *E, const dsv2_tilecfg *cfg) {
    E->configured = 0;
    memset(E->t, 0, sizeof E->t);
    if (cfg->palette_id == 0) return; /* palette 0: back to the init state */
    int bad = cfg->palette_id != 1 || cfg->start_row != 0; /* restarts (start_row) are not modelled */
    for (int i = 0; i < 14; i++) bad |= cfg->reserved[i] != 0;
    for (int i = 8; i < 16; i++) bad |= cfg->colsb[i] != 0 || cfg->rows[i] != 0;
    for (int i = 0; i < 8; i++)
        bad |= cfg->colsb[i] > 64 || cfg->rows[i] > 16 || (cfg->rows[i] == 0) != (cfg->colsb[i] == 0);
    if (bad) {
        fault(); /* #GP */
        return;
    }
    E->cfg = *cfg;
    E->configured = 1;
}

void dsv2_emu_release(dsv2_tile_emu *E) {
    E->configured = 0;
    memset(E->t, 0, sizeof E->t);
}

static int valid(const dsv2_tile_emu *E, int t) {
    return E->configured && t >= 0 && t < 8 && E->cfg.rows[t] != 0;
}

void dsv2_emu_zero(dsv2_tile_emu *E, int t) {
    if (!valid(E, t)) {
        fault();
        return;
    }
    memset(E->t[t], 0, sizeof E->t[t]);
}

void dsv2_emu_loadd(dsv2_tile_emu *E, int t, const void *base, int64_t stride) {
    if (!valid(E, t) || E->cfg.colsb[t] % 4) {
        fault();
        return;
    }
    memset(E->t[t], 0, sizeof E->t[t]);
    for (int r = 0; r < E->cfg.rows[t]; r++) memcpy(E->t[t][r], (const char *)base + r * stride, E->cfg.colsb[t]);
}

void dsv2_emu_stored(dsv2_tile_emu *E, int t, void *base, int64_t stride) {
    if (!valid(E, t) || E->cfg.colsb[t] % 4) {
        fault();
        return;
    }
    for (int r = 0; r < E->cfg.rows[t]; r++) memcpy((char *)base + r * stride, E->t[t][r], E->cfg.colsb[t]);
}

/* bf16 -> fp32 with denormals read as zero (of their sign) */
static inline float bf16_daz(uint16_t h) {
    uint32_t u = (h & 0x7f80u) ? (uint32_t)h << 16 : (uint32_t)(h & 0x8000u) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f32_daz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }
/* a denormal result flushed to a zero of its sign (FTZ); the same test as DAZ */
#define FTZ(x) f32_daz(x)

/* The arithmetic of TDPBF16PS on operands already read (DAZ) into fp32:
 * c [M, 16] (m x n), ae / ao [M, 16] (A's even / odd elements, m x i),
 * be / bo [K, 16] (B's even / odd elements, i x n); columns n >= N unused. */
static inline __attribute__((always_inline)) void dp_core(float *c, const float *ae, const float *ao, const float *be,
                                                          const float *bo, int M, int N, int K) {
    for (int m = 0; m < M; m++) {
        float e[16], o[16];
        for (int n = 0; n < 16; n++) e[n] = o[n] = 0.0f;
        for (int i = 0; i < K; i++) {
            const float a0 = ae[m * 16 + i], a1 = ao[m * 16 + i];
            for (int n = 0; n < 16; n++) {
                e[n] = FTZ(fmaf(a0, be[i * 16 + n], e[n]));
                o[n] = FTZ(fmaf(a1, bo[i * 16 + n], o[n]));
            }
        }
        for (int n = 0; n < N; n++) c[m * 16 + n] = FTZ(c[m * 16 + n] + FTZ(e[n] + o[n]));
    }
}

/* the same code with FMA instructions (the emulation's speed matters only to the tests) */
__attribute__((target("avx512f,avx2,fma"))) static void dp_core_fma(float *c, const float *ae, const float *ao,
                                                                   const float *be, const float *bo, int M, int N,
                                                                   int K) {
    dp_core(c, ae, ao, be, bo, M, N, K);
}

static int fma_ok(void) {
    static atomic_int ok = -1;
    int v = atomic_load(&ok);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
        atomic_store(&ok, v);
    }
    return v;
}

static void dp_core_plain(float *c, const float *ae, const float *ao, const float *be, const float *bo, int M, int N,
                          int K) {
    dp_core(c, ae, ao, be, bo, M, N, K);
}

void dsv2_emu_dpbf16ps(dsv2_tile_emu *E, int tc, int ta, int tb) {
    if (tc == ta || tc == tb || ta == tb || !valid(E, tc) || !valid(E, ta) || !valid(E, tb)) {
        fault();
        return;
    }
    const dsv2_tilecfg *g = &E->cfg;
    const int N = g->colsb[tc] / 4, M = g->rows[ta], K = g->rows[tb];
    if (g->colsb[tc] % 4 || g->colsb[ta] % 4 || g->colsb[tb] % 4 || g->colsb[tc] != g->colsb[tb] ||
        g->rows[tc] != M || g->colsb[ta] / 4 != K || N > 16 || K > 16) {
        fault(); /* #UD */
        return;
    }
    float c[16 * 16], ae[16 * 16], ao[16 * 16], be[16 * 16] = {0}, bo[16 * 16] = {0};
    for (int m = 0; m < M; m++) {
        const uint16_t *ar = (const uint16_t *)E->t[ta][m];
        const float *cr = (const float *)E->t[tc][m];
        for (int i = 0; i < K; i++) ae[m * 16 + i] = bf16_daz(ar[2 * i]), ao[m * 16 + i] = bf16_daz(ar[2 * i + 1]);
        for (int n = 0; n < N; n++) c[m * 16 + n] = f32_daz(cr[n]);
    }
    for (int i = 0; i < K; i++) {
        const uint16_t *br = (const uint16_t *)E->t[tb][i];
        for (int n = 0; n < N; n++) be[i * 16 + n] = bf16_daz(br[2 * n]), bo[i * 16 + n] = bf16_daz(br[2 * n + 1]);
    }
    if (fma_ok()) dp_core_fma(c, ae, ao, be, bo, M, N, K);
    else dp_core_plain(c, ae, ao, be, bo, M, N, K);
    atomic_fetch_add_explicit(&g_products, 1, memory_order_relaxed);
    /* the result: rows < M, columns < N; the rest of the tile zeroed */
    memset(E->t[tc], 0, sizeof E->t[tc]);
    for (int m = 0; m < M; m++) memcpy(E->t[tc][m], c + m * 16, (size_t)N * 4);
}
