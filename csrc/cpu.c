/* cpu.c - detect the CPU's vector extensions once and pick a kernel level. */
#include "cpu.h"
#include "amx_tiles.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static atomic_int g_cap = -1; /* the requested cap; -1: DSV2EXT_ISA not read yet */
static atomic_int g_emu = -1; /* AMX kernels on emulated tiles; -1: DSV2EXT_AMX_EMULATION not read yet */
static int g_hw = -1;
static int g_amx = -1;

static int hw_level(void) {
    if (g_hw >= 0) return g_hw;
    __builtin_cpu_init();
    int lvl = DSV2_ISA_PORTABLE;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) lvl = DSV2_ISA_AVX2;
    if (lvl == DSV2_ISA_AVX2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
        lvl = DSV2_ISA_AVX512;
    g_hw = lvl;
    return lvl;
}

static int emu(void) {
    int e = atomic_load(&g_emu);
    if (e >= 0) return e;
    const char *env = getenv("DSV2EXT_AMX_EMULATION");
    e = env && !strcmp(env, "1");
    int expected = -1;
    atomic_compare_exchange_strong(&g_emu, &expected, e);
    return atomic_load(&g_emu);
}

/* the best level: AVX-512 plus AMX where the CPU and OS provide it (or the emulation is on) */
static int best_level(void) {
    const int v = hw_level();
    if (v < DSV2_ISA_AVX512) return v;
    if (emu()) return DSV2_ISA_AMX;
    if (g_amx < 0) g_amx = dsv2_amx_hw_supported();
    return g_amx ? DSV2_ISA_AMX : v;
}

static int cap(void) {
    int c = atomic_load(&g_cap);
    if (c >= 0) return c;
    c = DSV2_ISA_AMX;
    const char *env = getenv("DSV2EXT_ISA");
    if (env) {
        if (!strcmp(env, "portable")) c = DSV2_ISA_PORTABLE;
        else if (!strcmp(env, "avx2")) c = DSV2_ISA_AVX2;
        else if (!strcmp(env, "avx512")) c = DSV2_ISA_AVX512;
    }
    int expected = -1;
    atomic_compare_exchange_strong(&g_cap, &expected, c);
    return atomic_load(&g_cap);
}

int dsv2_cpu_has_avx512bf16(void) {
    __builtin_cpu_init();
    return hw_level() == DSV2_ISA_AVX512 && __builtin_cpu_supports("avx512bf16");
}

int dsv2_cpu_has_avx512vnni(void) {
    __builtin_cpu_init();
    return hw_level() == DSV2_ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
}

static atomic_int g_vbmi_allowed = 1;
static int g_vbmi_hw = -1; /* the CPU has AVX-512 VBMI (read once) */

int dsv2_cpu_has_avx512vbmi(void) {
    if (g_vbmi_hw < 0) {
        __builtin_cpu_init();
        g_vbmi_hw = __builtin_cpu_supports("avx512vbmi") ? 1 : 0;
    }
    return atomic_load(&g_vbmi_allowed) && g_vbmi_hw && dsv2_isa() == DSV2_ISA_AVX512;
}

int dsv2_set_avx512vbmi(int allow) {
    atomic_store(&g_vbmi_allowed, allow ? 1 : 0);
    return dsv2_cpu_has_avx512vbmi();
}

int dsv2_isa_level(void) {
    const int b = best_level(), c = cap();
    return c < b ? c : b;
}

int dsv2_isa(void) {
    const int l = dsv2_isa_level();
    return l > DSV2_ISA_AVX512 ? DSV2_ISA_AVX512 : l;
}

int dsv2_set_isa(int level) {
    if (level < DSV2_ISA_PORTABLE) level = DSV2_ISA_PORTABLE;
    if (level > DSV2_ISA_AMX) level = DSV2_ISA_AMX;
    atomic_store(&g_cap, level);
    return dsv2_isa_level();
}

int dsv2_amx_mode(void) {
    if (dsv2_isa_level() != DSV2_ISA_AMX) return DSV2_AMX_OFF;
    return emu() ? DSV2_AMX_EMU : DSV2_AMX_HW;
}

void dsv2_set_amx_emulation(int on) { atomic_store(&g_emu, on ? 1 : 0); }

int dsv2_get_amx_emulation(void) { return emu(); }

const char *dsv2_isa_name(int level) {
    switch (level) {
    case DSV2_ISA_AMX: return "amx";
    case DSV2_ISA_AVX512: return "avx512";
    case DSV2_ISA_AVX2: return "avx2";
    default: return "portable";
    }
}

static atomic_int g_prefetch = -2; /* -2: DSV2EXT_PREFETCH not read yet; -1: no override */

int dsv2_prefetch_bytes(void) {
    int v = atomic_load(&g_prefetch);
    if (v >= -1) return v;
    v = -1;
    const char *env = getenv("DSV2EXT_PREFETCH");
    if (env && *env) {
        if (!strcmp(env, "off")) {
            v = 0;
        } else {
            char *end;
            long b = strtol(env, &end, 10);
            if (end != env && *end == '\0' && b >= 0 && b <= (1L << 20)) v = (int)(b / 64 * 64);
        }
    }
    int expected = -2;
    atomic_compare_exchange_strong(&g_prefetch, &expected, v);
    return atomic_load(&g_prefetch);
}

static int g_intel = -1;

int dsv2_cpu_is_intel(void) {
    if (g_intel >= 0) return g_intel;
    __builtin_cpu_init();
    g_intel = __builtin_cpu_is("intel") ? 1 : 0;
    return g_intel;
}

int dsv2_prefetch_default(int family) {
    /*                                 bf16  int8  int4  fp8 */
    static const int intel[4] = {4096, 4096, 4096, 4096};
    static const int other[4] = {0, 4096, 4096, 0};
    if (family < 0 || family > 3) return 0;
    return dsv2_cpu_is_intel() ? intel[family] : other[family];
}

int dsv2_prefetch_for(int family) {
    const int v = dsv2_prefetch_bytes();
    return v >= 0 ? v : dsv2_prefetch_default(family);
}

void dsv2_set_prefetch_bytes(int bytes) {
    if (bytes < -1) bytes = -1;
    if (bytes > (1 << 20)) bytes = 1 << 20;
    atomic_store(&g_prefetch, bytes < 0 ? -1 : bytes / 64 * 64);
}
