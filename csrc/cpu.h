/* cpu.h - run-time instruction-set dispatch. */
#ifndef DSV2_CPU_H
#define DSV2_CPU_H

enum { DSV2_ISA_PORTABLE = 0, DSV2_ISA_AVX2 = 1, DSV2_ISA_AVX512 = 2 };

/* The instruction set the kernels use: the best the CPU supports, capped by
 * the environment variable DSV2EXT_ISA=portable|avx2|avx512 (read once) or
 * by dsv2_set_isa(). */
int dsv2_isa(void);
/* Cap the instruction set (tests use this to run every code path); returns
 * the level in force, never above what the CPU supports. */
int dsv2_set_isa(int level);
/* 1 when the CPU has AVX-512 BF16 (vdpbf16ps). */
int dsv2_cpu_has_avx512bf16(void);
/* 1 when the CPU has AVX-512 VNNI (vpdpwssd / vpdpbusd). */
int dsv2_cpu_has_avx512vnni(void);
const char *dsv2_isa_name(int level);

/* Software-prefetch distance (bytes ahead of the weight row being read) of the
 * decode row-dot kernels, 0 = off.  Read once from DSV2EXT_PREFETCH (bytes, or
 * "off"); default DSV2_PREFETCH_DEFAULT.  Weights are streamed from memory once per
 * token; a server core keeps too few cache misses in flight on its own to read at
 * the socket's per-core bandwidth, more so at every 4 KiB page of a memory-mapped
 * checkpoint, where the hardware prefetchers stop and a page walk starts. */
int dsv2_prefetch_bytes(void);
void dsv2_set_prefetch_bytes(int bytes);

/* prefetch the 64-byte lines [p + dist, p + dist + n) into L1 (n a multiple of 64, dist
 * from dsv2_prefetch_bytes; nothing when dist is 0) */
#define DSV2_PREFETCH_AHEAD(p, n, dist)                                                       \
    do {                                                                                      \
        if (dist)                                                                             \
            for (int64_t pf_ = 0; pf_ < (int64_t)(n); pf_ += 64)                              \
                __builtin_prefetch((const char *)(p) + (dist) + pf_, 0, 3);                   \
    } while (0)

#define DSV2_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")))
#define DSV2_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DSV2_TARGET_AVX512VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2,f16c")))

#endif
