/* threadpool.c - a small spinning-then-sleeping pthread pool. */
#define _GNU_SOURCE
#include "threadpool.h"
#include "blas.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

static struct {
    pthread_mutex_t job;      /* held by the thread running a parallel region */
    pthread_mutex_t m;        /* guards the sleep/wake condition */
    pthread_cond_t cv;
    atomic_int gen;           /* bumped for each new job */
    atomic_int pending;       /* workers still running the current job */
    int nthreads;             /* total, caller included */
    int nworkers;             /* worker threads started */
    dsv2_task_fn fn;
    void *ctx;
    int64_t n, chunk;
    int ready;
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

static void run_chunk(int tid) {
    int64_t b = (int64_t)tid * P.chunk;
    int64_t e = b + P.chunk;
    if (e > P.n) e = P.n;
    if (b < e) P.fn(P.ctx, b, e, tid);
}

static void *worker_main(void *arg) {
    /* arg packs the thread id and the job generation at creation time, so a
     * worker that starts late still runs the job it was created for */
    intptr_t a = (intptr_t)arg;
    int tid = (int)(a & 0xff);
    int seen = (int)(uint32_t)((uintptr_t)a >> 8);
    tl_in_region = 1;
    for (;;) {
        /* spin ~200 us for the next job, then sleep */
        double t0 = now_s();
        int g;
        int spins = 0;
        while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_s() - t0 > 2e-4) break;
        }
        if (g == seen) {
            pthread_mutex_lock(&P.m);
            while ((g = atomic_load(&P.gen)) == seen) pthread_cond_wait(&P.cv, &P.m);
            pthread_mutex_unlock(&P.m);
        }
        seen = g;
        if (tid < P.nthreads) run_chunk(tid);
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_acq_rel);
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
    pthread_mutex_init(&P.job, NULL);
    pthread_mutex_init(&P.m, NULL);
    pthread_cond_init(&P.cv, NULL);
    P.nworkers = 0;
    P.nthreads = 1;
}

static void init_pool(void) {
    int n = default_threads();
    if (n > DSV2_MAX_THREADS) n = DSV2_MAX_THREADS;
    P.nthreads = n;
    P.ready = 1;
    pthread_atfork(NULL, NULL, atfork_child);
    dsv2_blas_set_threads(n);
}

/* start workers up to nthreads - 1 (caller holds P.job) */
static void ensure_workers(void) {
    while (P.nworkers < P.nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main,
                                (void *)(intptr_t)(((uintptr_t)(uint32_t)atomic_load(&P.gen) << 8) |
                                                 (uintptr_t)(P.nworkers + 1)));
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
    int64_t nchunks = (n + grain - 1) / grain;
    if (tl_in_region || P.nthreads <= 1 || nchunks <= 1 || pthread_mutex_trylock(&P.job) != 0) {
        fn(ctx, 0, n, 0);
        return;
    }
    ensure_workers();
    int nt = P.nthreads;
    if (nt > nchunks) nt = (int)nchunks;
    if (nt <= 1) {
        pthread_mutex_unlock(&P.job);
        fn(ctx, 0, n, 0);
        return;
    }
    int64_t per = (nchunks + nt - 1) / nt;
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    P.chunk = per * grain;
    int saved_nt = P.nthreads;
    P.nthreads = nt; /* workers with tid >= nt skip this job */
    atomic_store(&P.pending, P.nworkers);
    pthread_mutex_lock(&P.m);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.m);
    tl_in_region = 1;
    run_chunk(0);
    tl_in_region = 0;
    int spins = 0;
    while (atomic_load_explicit(&P.pending, memory_order_acquire) > 0) {
        cpu_relax();
        if (++spins > 4096) sched_yield();
    }
    P.nthreads = saved_nt;
    pthread_mutex_unlock(&P.job);
}

int dsv2_set_num_threads(int n) {
    pthread_once(&once, init_pool);
    if (n < 1) n = 1;
    if (n > DSV2_MAX_THREADS) n = DSV2_MAX_THREADS;
    pthread_mutex_lock(&P.job);
    P.nthreads = n;
    pthread_mutex_unlock(&P.job);
    dsv2_blas_set_threads(n);
    return n;
}

int dsv2_get_num_threads(void) {
    pthread_once(&once, init_pool);
    return P.nthreads;
}
