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
const char *dsv2_isa_name(int level);

#define DSV2_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,f16c")))
#define DSV2_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

#endif
