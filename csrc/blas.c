/* blas.c - sgemm through OpenBLAS, split over the columns of C by our pool. */
#include "blas.h"
#include "threadpool.h"

#include <cblas.h>
#include <stdint.h>

#ifdef DSV2_BLAS_SYSTEM
#define BLAS_SGEMM cblas_sgemm
#define BLAS_THREADS openblas_set_num_threads
extern void openblas_set_num_threads(int);
#else
#define BLAS_SGEMM scipy_cblas_sgemm
#define BLAS_THREADS scipy_openblas_set_num_threads
#endif

void dsv2_sgemm_nt_1(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    BLAS_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

void dsv2_sgemm_nn_1(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    BLAS_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

typedef struct {
    int M, N, K, lda, ldb, ldc, trans_b;
    const float *A, *B;
    float *C;
    float beta;
} gemm_job;

/* Columns are cut into fixed chunks of GEMM_CHUNK whatever the thread count, so
 * that every element is computed by the same sgemm call shape: results do not
 * depend on the number of threads. */
#define GEMM_CHUNK 128

static void gemm_task(void *ctx, int64_t cb, int64_t ce, int tid) {
    (void)tid;
    gemm_job *j = (gemm_job *)ctx;
    for (int64_t c = cb; c < ce; c++) {
        int64_t b = c * GEMM_CHUNK;
        int n = (int)(j->N - b < GEMM_CHUNK ? j->N - b : GEMM_CHUNK);
        if (j->trans_b)
            dsv2_sgemm_nt_1(j->M, n, j->K, j->A, j->lda, j->B + b * (int64_t)j->ldb, j->ldb, j->beta, j->C + b,
                            j->ldc);
        else
            dsv2_sgemm_nn_1(j->M, n, j->K, j->A, j->lda, j->B + b, j->ldb, j->beta, j->C + b, j->ldc);
    }
}

static void gemm_split(int trans_b, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                       float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    gemm_job j = {M, N, K, lda, ldb, ldc, trans_b, A, B, C, beta};
    dsv2_parallel_for((N + GEMM_CHUNK - 1) / GEMM_CHUNK, 1, gemm_task, &j);
}

void dsv2_sgemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc) {
    gemm_split(1, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

void dsv2_sgemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc) {
    gemm_split(0, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

void dsv2_blas_init(void) { BLAS_THREADS(1); }
