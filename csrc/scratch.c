/* scratch.c - a small cache of large freed work buffers. */
#include "scratch.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define HDR 64    /* header before each block: its capacity */
#define SLOTS 16

static struct {
    pthread_mutex_t m;
    void *blk[SLOTS];   /* the raw allocations (header included) */
    size_t cap[SLOTS];
    int n;
    size_t total;
} C = {PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t once = PTHREAD_ONCE_INIT;

static void atfork_child(void) { pthread_mutex_init(&C.m, NULL); }
static void init(void) { pthread_atfork(NULL, NULL, atfork_child); }

void *dsv2_scratch_alloc(size_t bytes) {
    if (bytes > SIZE_MAX - 2 * HDR - 65535) return NULL;
    pthread_once(&once, init);
    if (bytes >= DSV2_SCRATCH_MIN_KEEP) {
        pthread_mutex_lock(&C.m);
        int best = -1;
        for (int i = 0; i < C.n; i++)
            if (C.cap[i] >= bytes && (best < 0 || C.cap[i] < C.cap[best])) best = i;
        if (best >= 0) {
            void *raw = C.blk[best];
            C.total -= C.cap[best];
            C.blk[best] = C.blk[C.n - 1];
            C.cap[best] = C.cap[C.n - 1];
            C.n--;
            pthread_mutex_unlock(&C.m);
            return (char *)raw + HDR;
        }
        pthread_mutex_unlock(&C.m);
        bytes = (bytes + 65535) & ~(size_t)65535;
    }
    void *raw = NULL;
    if (posix_memalign(&raw, 64, bytes + HDR) != 0) return NULL;
    *(size_t *)raw = bytes;
    return (char *)raw + HDR;
}

void dsv2_scratch_free(void *p) {
    if (!p) return;
    void *raw = (char *)p - HDR;
    size_t cap = *(size_t *)raw;
    if (cap >= DSV2_SCRATCH_MIN_KEEP) {
        pthread_mutex_lock(&C.m);
        if (cap <= DSV2_SCRATCH_MAX_CACHED) {
            /* make room: drop the smallest cached blocks while over a limit */
            while (C.n > 0 && (C.n == SLOTS || C.total + cap > DSV2_SCRATCH_MAX_CACHED)) {
                int s = 0;
                for (int i = 1; i < C.n; i++)
                    if (C.cap[i] < C.cap[s]) s = i;
                if (C.cap[s] >= cap && C.n == SLOTS) break;
                free(C.blk[s]);
                C.total -= C.cap[s];
                C.blk[s] = C.blk[C.n - 1];
                C.cap[s] = C.cap[C.n - 1];
                C.n--;
            }
            if (C.n < SLOTS && C.total + cap <= DSV2_SCRATCH_MAX_CACHED) {
                C.blk[C.n] = raw;
                C.cap[C.n] = cap;
                C.n++;
                C.total += cap;
                raw = NULL;
            }
        }
        pthread_mutex_unlock(&C.m);
    }
    free(raw);
}

void dsv2_scratch_trim(void) {
    pthread_once(&once, init);
    pthread_mutex_lock(&C.m);
    for (int i = 0; i < C.n; i++) free(C.blk[i]);
    C.n = 0;
    C.total = 0;
    pthread_mutex_unlock(&C.m);
}
