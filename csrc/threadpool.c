/* threadpool.c - a small pthread pool with dynamically claimed chunks.
 *
 * A parallel region is cut into a few chunks per thread (chunks_per_thread).  Chunks are claimed
 * through an atomic counter by whichever thread gets there first (the caller
 * included), so a worker that the OS has not scheduled yet never holds the
 * caller up: the caller simply runs its chunk too.  This keeps the pool fast
 * on a busy machine (more runnable threads than cores).  Workers spin for the
 * next region for up to DSV2EXT_SPIN_US (1 ms), then sleep on a condition variable. */
#define _GNU_SOURCE
#include "threadpool.h"
#include "blas.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

typedef struct {
    dsv2_task_fn fn;
    void *ctx;
    int64_t n, chunk, nchunks;
    atomic_llong next; /* next chunk to claim */
    atomic_llong done; /* chunks finished */
} job_t;

static struct {
    pthread_mutex_t job_lock; /* held by the thread running a parallel region */
    pthread_mutex_t m;        /* guards the sleep/wake condition */
    pthread_cond_t cv;
    atomic_uint gen;          /* bumped for each new region */
    atomic_int busy;          /* workers currently inside a region */
    _Atomic(job_t *) job;     /* the current region, NULL when none */
    int nthreads;             /* total, caller included */
    int nworkers;             /* worker threads started */
    double spin_s;            /* how long an idle worker spins before it sleeps */
    atomic_int chunks;        /* chunks per thread a region is cut into (dsv2_set_chunks_per_thread) */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static _Thread_local int tl_in_region = 0;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* claim and run chunks of j until none is left */
static void run_chunks(job_t *j, int tid) {
    for (;;) {
        int64_t c = atomic_fetch_add(&j->next, 1);
        if (c >= j->nchunks) return;
        int64_t b = c * j->chunk;
        int64_t e = b + j->chunk;
        if (e > j->n) e = j->n;
        if (b < e) j->fn(j->ctx, b, e, tid);
        atomic_fetch_add(&j->done, 1);
    }
}

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&P.gen);
    tl_in_region = 1;
    for (;;) {
        /* spin for the next region (P.spin_s), then sleep */
        double t0 = now_s();
        unsigned g;
        int spins = 0;
        while ((g = atomic_load(&P.gen)) == seen) {
            cpu_relax();
            if (++spins % 128 == 0 && now_s() - t0 > P.spin_s) break;
        }
        if (g == seen) {
            pthread_mutex_lock(&P.m);
            while ((g = atomic_load(&P.gen)) == seen) pthread_cond_wait(&P.cv, &P.m);
            pthread_mutex_unlock(&P.m);
        }
        seen = g;
        atomic_fetch_add(&P.busy, 1);
        job_t *j = atomic_load(&P.job); /* NULL once the caller has finished the region */
        if (j != NULL && atomic_load(&P.gen) == g) run_chunks(j, tid);
        atomic_fetch_sub(&P.busy, 1);
    }
    return NULL;
}

static int default_threads(void) {
    const char *env = getenv("DSV2EXT_NUM_THREADS");
    if (env && atoi(env) > 0) return atoi(env);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c > 0) return c;
    }
    return 1;
}

static void atfork_child(void) {
    /* worker threads do not survive fork(): the child runs serially */
    pthread_mutex_init(&P.job_lock, NULL);
    pthread_mutex_init(&P.m, NULL);
    pthread_cond_init(&P.cv, NULL);
    atomic_store(&P.busy, 0);
    atomic_store(&P.job, NULL);
    P.nworkers = 0;
    P.nthreads = 1;
}

/* DSV2EXT_SPIN_US: microseconds an idle worker spins for the next region before it
 * sleeps on the condition variable (default DSV2_SPIN_US_DEFAULT).  Between two kernels
 * the caller runs Python code (tens of microseconds per call); a worker that fell
 * asleep meanwhile costs a wake-up at the next region, for each of the ~10 regions of
 * a layer.  Measured on a 16-core Xeon (lite-L4 decode, 16 threads): 1000 us gave
 * bf16 65.6 / int8 122.5 tokens/s against 63.2 / 117.2 with 50 us. */
#ifndef DSV2_SPIN_US_DEFAULT
#define DSV2_SPIN_US_DEFAULT 1000
#endif

static double spin_seconds(void) {
    const char *env = getenv("DSV2EXT_SPIN_US");
    double us = DSV2_SPIN_US_DEFAULT;
    if (env && *env) {
        char *end;
        double v = strtod(env, &end);
        if (end != env && v >= 0 && v <= 1e6) us = v;
    }
    return us * 1e-6;
}

/* DSV2EXT_CHUNKS: chunks per thread, 1..64; unset (or 0): automatic, see chunks_per_thread. */
static int chunks_default(void) {
    const char *env = getenv("DSV2EXT_CHUNKS");
    int v = env && *env ? atoi(env) : 0;
    return v < 0 ? 0 : v > 64 ? 64 : v;
}

/* Chunks per thread of a region of nt threads.  Automatic: min(nt, 16).  A region cut into one
 * chunk per thread lasts as long as its slowest thread; with many threads some always run slower
 * (other processes, a shared memory controller), and claiming smaller chunks dynamically lets the
 * others take up their share.  Measured on a 16-vCPU Xeon (lite-L4, 16 threads, 1 / 4 / 16 chunks
 * per thread, 5 interleaved rounds, medians): decode bf16 79 / 91 / 95 tokens/s, int8 141 / 160 /
 * 165, lm_head bf16 stream 94 / 118 / 133 GB/s, prefill 512 bf16 1814 / 2002 / 2103 tokens/s; at
 * 2 threads 1 and 4 chunks were level. */
static int chunks_per_thread(int nt) {
    const int v = atomic_load(&P.chunks);
    if (v > 0) return v;
    return nt < 16 ? nt : 16;
}

static void init_pool(void) {
    P.spin_s = spin_seconds();
    atomic_store(&P.chunks, chunks_default());
    int n = default_threads();
    if (n > DSV2_MAX_THREADS) n = DSV2_MAX_THREADS;
    P.nthreads = n;
    pthread_atfork(NULL, NULL, atfork_child);
    dsv2_blas_init();
}

/* start workers up to nthreads - 1 (the caller holds job_lock) */
static void ensure_workers(void) {
    while (P.nworkers < P.nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(P.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            P.nthreads = P.nworkers + 1; /* run with what we have */
            break;
        }
        P.nworkers++;
    }
}

void dsv2_parallel_for(int64_t n, int64_t grain, dsv2_task_fn fn, void *ctx) {
    if (n <= 0) return;
    pthread_once(&once, init_pool);
    if (grain < 1) grain = 1;
    int64_t units = (n + grain - 1) / grain;
    if (tl_in_region || P.nthreads <= 1 || units <= 1 || pthread_mutex_trylock(&P.job_lock) != 0) {
        fn(ctx, 0, n, 0);
        return;
    }
    ensure_workers();
    int nt = P.nthreads;
    if (nt > units) nt = (int)units;
    if (nt <= 1 || P.nworkers == 0) {
        pthread_mutex_unlock(&P.job_lock);
        fn(ctx, 0, n, 0);
        return;
    }
    job_t j;
    j.fn = fn;
    j.ctx = ctx;
    j.n = n;
    const int64_t want = (int64_t)nt * chunks_per_thread(nt);
    j.chunk = (units + want - 1) / want * grain;
    j.nchunks = (n + j.chunk - 1) / j.chunk;
    atomic_init(&j.next, 0);
    atomic_init(&j.done, 0);
    atomic_store(&P.job, &j);
    pthread_mutex_lock(&P.m);
    atomic_fetch_add(&P.gen, 1);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.m);
    tl_in_region = 1;
    run_chunks(&j, 0);
    tl_in_region = 0;
    /* wait for chunks that workers claimed */
    int spins = 0;
    while (atomic_load(&j.done) < j.nchunks) {
        cpu_relax();
        if (++spins > 2048) sched_yield();
    }
    /* retire the region; workers that already picked up &j leave before j goes out of scope */
    atomic_store(&P.job, NULL);
    while (atomic_load(&P.busy) > 0) {
        cpu_relax();
        sched_yield();
    }
    pthread_mutex_unlock(&P.job_lock);
}

int dsv2_set_num_threads(int n) {
    pthread_once(&once, init_pool);
    if (n < 1) n = 1;
    if (n > DSV2_MAX_THREADS) n = DSV2_MAX_THREADS;
    pthread_mutex_lock(&P.job_lock);
    P.nthreads = n;
    pthread_mutex_unlock(&P.job_lock);
    return n;
}

int dsv2_set_chunks_per_thread(int n) {
    pthread_once(&once, init_pool);
    if (n < 0) n = 0;
    if (n > 64) n = 64;
    atomic_store(&P.chunks, n);
    return n;
}

int dsv2_get_chunks_per_thread(void) {
    pthread_once(&once, init_pool);
    return chunks_per_thread(P.nthreads);
}

int dsv2_get_num_threads(void) {
    pthread_once(&once, init_pool);
    return P.nthreads;
}

int dsv2_region_threads(void) { return tl_in_region ? 1 : dsv2_get_num_threads(); }
