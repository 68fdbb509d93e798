/* threadpool.h - the one pool of worker threads that owns the cores.
 *
 * dsv2_parallel_for splits [0, n) into contiguous chunks, a few per thread (chunk
 * sizes are multiples of `grain`), that the threads claim in order, the caller's
 * thread included.  A call made while the pool is busy (from another Python
 * thread, or nested inside a running task) runs serially in the caller, so
 * parallel regions never nest.  OpenBLAS runs single-threaded; blas.c splits
 * matrix products over this pool (one pool owns the cores). */
#ifndef DSV2_THREADPOOL_H
#define DSV2_THREADPOOL_H

#include <stdint.h>

typedef void (*dsv2_task_fn)(void *ctx, int64_t begin, int64_t end, int tid);

#define DSV2_MAX_THREADS 64

void dsv2_parallel_for(int64_t n, int64_t grain, dsv2_task_fn fn, void *ctx);
/* Set the number of threads (>= 1, capped at DSV2_MAX_THREADS); returns the
 * number in force. */
int dsv2_set_num_threads(int n);
int dsv2_get_num_threads(void);
/* Cut each region into n chunks per thread (1..64; 0: automatic, min(threads, 16); the
 * environment variable DSV2EXT_CHUNKS sets it at start-up), claimed dynamically: more chunks
 * even out threads that run at different speeds.  Changes no result (a task's output depends
 * on its range only, never on which thread runs it); returns the setting in force. */
int dsv2_set_chunks_per_thread(int n);
/* chunks per thread a region on all threads gets now */
int dsv2_get_chunks_per_thread(void);
/* The threads a dsv2_parallel_for called here would use: 1 inside a task of a parallel region
 * (nested regions run serially in the calling thread), else dsv2_get_num_threads(). */
int dsv2_region_threads(void);

#endif
