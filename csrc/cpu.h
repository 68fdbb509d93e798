/* cpu.h - run-time instruction-set dispatch. */
#ifndef DSV2_CPU_H
#define DSV2_CPU_H

/* Levels, each including the ones below.  DSV2_ISA_AMX is AVX-512 plus the AMX
 * tiles (AMX-TILE + AMX-BF16, tile state granted by the OS; see amx_tiles.h). */
enum { DSV2_ISA_PORTABLE = 0, DSV2_ISA_AVX2 = 1, DSV2_ISA_AVX512 = 2, DSV2_ISA_AMX = 3 };

/* The vector instruction set the kernels use (portable, avx2 or avx512; never
 * DSV2_ISA_AMX): the best the CPU supports, capped by the environment variable
 * DSV2EXT_ISA=portable|avx2|avx512|amx (read once) or by dsv2_set_isa(). */
int dsv2_isa(void);
/* The level in force including the tiles: DSV2_ISA_AMX where the AMX kernels
 * run, else dsv2_isa(). */
int dsv2_isa_level(void);
/* Cap the level (tests use this to run every code path; DSV2_ISA_AVX512 turns
 * AMX off); returns the level in force, never above what the CPU supports. */
int dsv2_set_isa(int level);
/* 1 when the CPU has AVX-512 BF16 (vdpbf16ps). */
int dsv2_cpu_has_avx512bf16(void);
/* 1 when the CPU has AVX-512 VNNI (vpdpwssd / vpdpbusd). */
int dsv2_cpu_has_avx512vnni(void);
/* 1 when the AVX-512 kernels may use AVX-512 VBMI (vpermi2b byte tables): the CPU has
 * it, the level in force is AVX-512, and dsv2_set_avx512vbmi has not turned it off
 * (tests do, to run the AVX-512 kernels written for CPUs without it). */
int dsv2_cpu_has_avx512vbmi(void);
/* 1 on an Intel CPU (cached after the first call) */
int dsv2_cpu_is_intel(void);
/* allow (1) or forbid (0) the VBMI kernels; returns dsv2_cpu_has_avx512vbmi() */
int dsv2_set_avx512vbmi(int allow);
const char *dsv2_isa_name(int level);

/* Software-prefetch distance (bytes ahead of the weight row being read) of the
 * decode row-dot kernels, 0 = off.  Weights are streamed from memory once per token;
 * where a core keeps too few cache misses in flight on its own (server cores; every 4 KiB
 * page of a memory-mapped checkpoint, where the hardware prefetchers stop), prefetching
 * ahead helps, elsewhere it can cost.  Each kernel family has a default per CPU vendor,
 * measured (benchmarks/bench_stream.py, one decode product against the read probe):
 *   Intel (16-core Xeon with AMX): 4 KiB for every family: one thread streams bf16 rows at
 *     10.4 GB/s instead of 6.4, 16 threads at 109 instead of 75 (int8: 125 / 92);
 *     fp8 is not measured there and takes the same as the int8 rows it resembles;
 *   others (Zen 4): 4 KiB for the int4 (~12% faster decode) and int8 rows (~4%); off for the
 *     bf16 rows (1 thread: 26 GB/s without, 18 with) and the fp8 rows (neutral).
 * The environment variable DSV2EXT_PREFETCH (bytes, or "off") or dsv2_set_prefetch_bytes
 * overrides all of them. */
enum { DSV2_PF_BF16 = 0, DSV2_PF_I8 = 1, DSV2_PF_I4 = 2, DSV2_PF_F8 = 3 };
/* the distance a kernel family (DSV2_PF_*) uses: the override if one is set, else its default */
int dsv2_prefetch_for(int family);
/* the default of a family on this CPU (no override) */
int dsv2_prefetch_default(int family);
/* the override in force (-1: none, every kernel uses its default) */
int dsv2_prefetch_bytes(void);
/* set the override (bytes >= 0) or remove it (-1) */
void dsv2_set_prefetch_bytes(int bytes);

/* prefetch the 64-byte lines [p + dist, p + dist + n) into L1 (n a multiple of 64, dist
 * from dsv2_prefetch_bytes; nothing when dist is 0) */
#define DSV2_PREFETCH_AHEAD(p, n, dist)                                                       \
    do {                                                                                      \
        if (dist)                                                                             \
            for (int64_t pf_ = 0; pf_ < (int64_t)(n); pf_ += 64)                              \
                __builtin_prefetch((const char *)(p) + (dist) + pf_, 0, 3);                   \
    } while (0)

/* How the AMX kernels run: off (level below DSV2_ISA_AMX), on the tiles, or on
 * the C emulation of the tiles (amx_tiles.h).  The emulation is a test vehicle:
 * dsv2_set_amx_emulation(1) makes an AVX-512 CPU without AMX (or with it) run
 * the AMX kernels on emulated tiles, so that tests exercise their packing,
 * blocking and tails anywhere; the environment variable DSV2EXT_AMX_EMULATION=1
 * (read once) starts the process with it on. */
enum { DSV2_AMX_OFF = 0, DSV2_AMX_HW = 1, DSV2_AMX_EMU = 2 };
int dsv2_amx_mode(void);
void dsv2_set_amx_emulation(int on);
int dsv2_get_amx_emulation(void);

#define DSV2_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")))
#define DSV2_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DSV2_TARGET_AVX512VBMI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,avx2,f16c")))
#define DSV2_TARGET_AVX512VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2,f16c")))

#endif
