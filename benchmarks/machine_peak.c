/* Machine ceilings for the benchmark rooflines: streaming read bandwidth and
 * the peak of the dot-product instructions, with 1..N threads.
 *
 *   machine_peak read  THREADS BYTES REPS   -> best GB/s of REPS passes over BYTES
 *   machine_peak fma32 THREADS ITERS REPS   -> best GFLOP/s (zmm vfmadd231ps)
 *   machine_peak bf16  THREADS ITERS REPS   -> best GFLOP/s (zmm vdpbf16ps)
 *   machine_peak vnni  THREADS ITERS REPS   -> best GOP/s   (zmm vpdpbusd)
 *   machine_peak amx   THREADS ITERS REPS   -> best GFLOP/s (AMX tdpbf16ps on tiles that stay in
 *                                              the tile registers: 4 products of 16x16x32 a step)
 *   machine_peak readloop THREADS BYTES REPS -> allocates and touches BYTES once, then prints the
 *                                              best GB/s of REPS passes for every line read from
 *                                              stdin (until EOF): a probe that keeps its memory,
 *                                              so that probing between measurements does not make
 *                                              the kernel evict other processes' page cache
 *
 * With PEAK_PIN=1 in the environment, thread i runs on the i-th CPU of the
 * process's affinity mask (otherwise where the scheduler puts it).
 *
 * Prints one number.  Compiled by benchmarks/machine.py with
 * gcc -O2 -march=native -pthread.  The read loop sums 64-bit lanes into
 * 8 independent accumulators (the sum is printed to stderr so that the loads
 * cannot be removed); each thread reads its own contiguous slice, which it
 * also wrote first (first-touch placement).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct {
    int id, nthreads, mode, pin; /* pin: a CPU number, or -1 */
    uint8_t *buf;
    size_t bytes;
    long iters;
    pthread_barrier_t *start, *stop;
    volatile int *quit;
    int reps;
    double *times; /* written by thread 0 */
    uint64_t sink;
} job_t;

static uint64_t read_slice(const uint8_t *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (size_t i = 0; i + 512 <= n; i += 512) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(p + i)));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(p + i + 64)));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(p + i + 128)));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(p + i + 192)));
        a4 = _mm512_add_epi64(a4, _mm512_load_si512((const void *)(p + i + 256)));
        a5 = _mm512_add_epi64(a5, _mm512_load_si512((const void *)(p + i + 320)));
        a6 = _mm512_add_epi64(a6, _mm512_load_si512((const void *)(p + i + 384)));
        a7 = _mm512_add_epi64(a7, _mm512_load_si512((const void *)(p + i + 448)));
    }
    a0 = _mm512_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)),
                          _mm512_add_epi64(_mm512_add_epi64(a4, a5), _mm512_add_epi64(a6, a7)));
    return (uint64_t)_mm512_reduce_add_epi64(a0);
}

static uint64_t fma_loop(long iters) {
    __m512 a[12];
    const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
    for (int k = 0; k < 12; k++) a[k] = _mm512_set1_ps((float)k);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++) a[k] = _mm512_fmadd_ps(a[k], x, y);
    }
    __m512 s = a[0];
    for (int k = 1; k < 12; k++) s = _mm512_add_ps(s, a[k]);
    return (uint64_t)_mm512_reduce_add_ps(s);
}

#ifdef __AVX512BF16__
static uint64_t bf16_loop(long iters) {
    __m512 a[12];
    const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3c00);
    for (int k = 0; k < 12; k++) a[k] = _mm512_set1_ps((float)k);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++) a[k] = _mm512_dpbf16_ps(a[k], x, y);
    }
    __m512 s = a[0];
    for (int k = 1; k < 12; k++) s = _mm512_add_ps(s, a[k]);
    return (uint64_t)_mm512_reduce_add_ps(s);
}
#endif

#ifdef __AVX512VNNI__
static uint64_t vnni_loop(long iters) {
    __m512i a[12];
    const __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(-2);
    for (int k = 0; k < 12; k++) a[k] = _mm512_set1_epi32(k);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++) a[k] = _mm512_dpbusd_epi32(a[k], x, y);
    }
    __m512i s = a[0];
    for (int k = 1; k < 12; k++) s = _mm512_add_epi32(s, a[k]);
    return (uint64_t)_mm512_reduce_add_epi32(s);
}
#endif


#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define HAVE_AMX 1
typedef struct {
    uint8_t palette, start;
    uint8_t pad[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

static uint64_t amx_loop(long iters) {
    static uint16_t src[16 * 32] __attribute__((aligned(64)));
    float out[16 * 16] __attribute__((aligned(64)));
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    for (int i = 0; i < 16 * 32; i++) src[i] = 0x3c00; /* 2^-7: the sums stay finite */
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&cfg);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, src, 64); _tile_loadd(5, src, 64); _tile_loadd(6, src, 64); _tile_loadd(7, src, 64);
    for (long i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    _tile_release();
    return (uint64_t)out[0];
}

/* Linux gives a process the AMX tile data state only on request */
static int amx_permit(void) {
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return 0;
    return syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &perm) == 0 && (perm & (1ul << 18));
}
#endif

static void *worker(void *arg) {
    job_t *j = (job_t *)arg;
    if (j->pin >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(j->pin, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    size_t slice = (j->bytes / j->nthreads) & ~(size_t)511;
    uint8_t *p = j->buf + (size_t)j->id * slice;
    if (j->mode == 0 || j->mode == 4) memset(p, j->id + 1, slice);
    if (j->mode == 4) { /* the main thread times each pass between the two barriers */
        for (;;) {
            pthread_barrier_wait(j->start);
            if (*j->quit) return NULL;
            j->sink += read_slice(p, slice);
            pthread_barrier_wait(j->stop);
        }
    }
    for (int r = 0; r < j->reps; r++) {
        pthread_barrier_wait(j->start);
        double t0 = now();
        switch (j->mode) {
            case 0: j->sink += read_slice(p, slice); break;
            case 1: j->sink += fma_loop(j->iters); break;
#ifdef __AVX512BF16__
            case 2: j->sink += bf16_loop(j->iters); break;
#endif
#ifdef __AVX512VNNI__
            case 3: j->sink += vnni_loop(j->iters); break;
#endif
#ifdef HAVE_AMX
            case 5: j->sink += amx_loop(j->iters); break;
#endif
            default: break;
        }
        pthread_barrier_wait(j->stop);
        if (j->id == 0) j->times[r] = now() - t0;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s read|fma32|bf16|vnni|amx|readloop THREADS BYTES_OR_ITERS REPS\n", argv[0]);
        return 2;
    }
    int mode = !strcmp(argv[1], "read") ? 0 : !strcmp(argv[1], "fma32") ? 1
             : !strcmp(argv[1], "bf16") ? 2 : !strcmp(argv[1], "vnni") ? 3
             : !strcmp(argv[1], "readloop") ? 4 : !strcmp(argv[1], "amx") ? 5 : -1;
    int nt = atoi(argv[2]);
    long n = atol(argv[3]);
    int reps = atoi(argv[4]);
    if (mode < 0 || nt < 1 || n < 1 || reps < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
#ifndef __AVX512BF16__
    if (mode == 2) { fprintf(stderr, "this CPU/compiler has no AVX512-BF16\n"); return 3; }
#endif
#ifndef __AVX512VNNI__
    if (mode == 3) { fprintf(stderr, "this CPU/compiler has no AVX512-VNNI\n"); return 3; }
#endif
#ifdef HAVE_AMX
    if (mode == 5 && !amx_permit()) { fprintf(stderr, "the OS does not give this process AMX tiles\n"); return 3; }
#else
    if (mode == 5) { fprintf(stderr, "this CPU/compiler has no AMX-BF16\n"); return 3; }
#endif
    /* PEAK_PIN=1: thread i on the i-th CPU of the affinity mask */
    int cpus[1024], ncpu = 0;
    const char *pin = getenv("PEAK_PIN");
    if (pin && atoi(pin) > 0) {
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) == 0)
            for (int c = 0; c < CPU_SETSIZE && ncpu < 1024; c++) if (CPU_ISSET(c, &set)) cpus[ncpu++] = c;
    }
    uint8_t *buf = NULL;
    if ((mode == 0 || mode == 4) && posix_memalign((void **)&buf, 4096, (size_t)n) != 0) {
        fprintf(stderr, "cannot allocate %ld bytes\n", n);
        return 1;
    }
    pthread_barrier_t b1, b2;
    pthread_barrier_init(&b1, NULL, nt + (mode == 4));
    pthread_barrier_init(&b2, NULL, nt + (mode == 4));
    double *times = calloc(reps, sizeof(double));
    job_t *jobs = calloc(nt, sizeof(job_t));
    pthread_t *th = calloc(nt, sizeof(pthread_t));
    volatile int quit = 0;
    for (int i = 0; i < nt; i++) {
        jobs[i] = (job_t){.id = i, .nthreads = nt, .mode = mode, .buf = buf, .bytes = (size_t)n,
                          .iters = n, .start = &b1, .stop = &b2, .quit = &quit, .reps = reps, .times = times,
                          .pin = ncpu ? cpus[i % ncpu] : -1};
        pthread_create(&th[i], NULL, worker, &jobs[i]);
    }
    if (mode == 4) {
        double bytes = (double)(((size_t)n / nt) & ~(size_t)511) * nt;
        char line[256];
        pthread_barrier_wait(&b1); /* a first, untimed pass: every thread has touched its slice */
        pthread_barrier_wait(&b2);
        printf("ready\n");
        fflush(stdout);
        while (fgets(line, sizeof line, stdin)) {
            double best = 0;
            for (int r = 0; r < reps; r++) {
                double t0 = now();
                pthread_barrier_wait(&b1);
                pthread_barrier_wait(&b2);
                double dt = now() - t0;
                if (r == 0 || dt < best) best = dt;
            }
            printf("%.3f\n", bytes / best / 1e9);
            fflush(stdout);
        }
        quit = 1;
        pthread_barrier_wait(&b1);
        for (int i = 0; i < nt; i++) pthread_join(th[i], NULL);
        free(buf);
        return 0;
    }
    uint64_t sink = 0;
    for (int i = 0; i < nt; i++) {
        pthread_join(th[i], NULL);
        sink += jobs[i].sink;
    }
    double best = times[0];
    for (int r = 1; r < reps; r++) if (times[r] < best) best = times[r];
    double work;
    if (mode == 0) work = (double)(((size_t)n / nt) & ~(size_t)511) * nt;   /* bytes */
    else if (mode == 1) work = 2.0 * 16 * 12 * (double)n * nt;             /* flops */
    else if (mode == 2) work = 2.0 * 32 * 12 * (double)n * nt;
    else if (mode == 5) work = 4.0 * 2 * 16 * 16 * 32 * (double)n * nt;       /* 4 tile products a step */
    else work = 2.0 * 64 * 12 * (double)n * nt;                            /* int8 ops */
    printf("%.3f\n", work / best / 1e9);
    fprintf(stderr, "sink %llu\n", (unsigned long long)sink);
    free(buf);
    return 0;
}
