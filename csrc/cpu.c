/* cpu.c - detect the CPU's vector extensions once and pick a kernel level. */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

static int g_isa = -1;
static int g_hw = -1;

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

int dsv2_cpu_has_avx512bf16(void) {
    __builtin_cpu_init();
    return hw_level() == DSV2_ISA_AVX512 && __builtin_cpu_supports("avx512bf16");
}

int dsv2_cpu_has_avx512vnni(void) {
    __builtin_cpu_init();
    return hw_level() == DSV2_ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
}

int dsv2_set_isa(int level) {
    int hw = hw_level();
    if (level < DSV2_ISA_PORTABLE) level = DSV2_ISA_PORTABLE;
    g_isa = level < hw ? level : hw;
    return g_isa;
}

int dsv2_isa(void) {
    if (g_isa >= 0) return g_isa;
    int lvl = hw_level();
    const char *env = getenv("DSV2EXT_ISA");
    if (env) {
        if (!strcmp(env, "portable")) lvl = DSV2_ISA_PORTABLE;
        else if (!strcmp(env, "avx2") && lvl > DSV2_ISA_AVX2) lvl = DSV2_ISA_AVX2;
    }
    g_isa = lvl;
    return lvl;
}

const char *dsv2_isa_name(int level) {
    switch (level) {
    case DSV2_ISA_AVX512: return "avx512";
    case DSV2_ISA_AVX2: return "avx2";
    default: return "portable";
    }
}

#ifndef DSV2_PREFETCH_DEFAULT
#define DSV2_PREFETCH_DEFAULT 0
#endif
static int g_prefetch = -1;

int dsv2_prefetch_bytes(void) {
    int v = g_prefetch;
    if (v >= 0) return v;
    v = DSV2_PREFETCH_DEFAULT;
    const char *env = getenv("DSV2EXT_PREFETCH");
    if (env && *env) {
        if (!strcmp(env, "off")) {
            v = 0;
        } else {
            char *end;
            long b = strtol(env, &end, 10);
            if (end != env && b >= 0 && b <= (1L << 20)) v = (int)(b / 64 * 64);
        }
    }
    g_prefetch = v;
    return v;
}

void dsv2_set_prefetch_bytes(int bytes) {
    if (bytes < 0) bytes = 0;
    if (bytes > (1 << 20)) bytes = 1 << 20;
    g_prefetch = bytes / 64 * 64;
}
