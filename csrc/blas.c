/* blas.c - thin wrappers over OpenBLAS's cblas_sgemm. */
#include "blas.h"

#include <cblas.h>

#ifdef DSV2_BLAS_SYSTEM
#define BLAS_SGEMM cblas_sgemm
#define BLAS_THREADS openblas_set_num_threads
extern void openblas_set_num_threads(int);
#else
#define BLAS_SGEMM scipy_cblas_sgemm
#define BLAS_THREADS scipy_openblas_set_num_threads
#endif

void dsv2_sgemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    BLAS_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

void dsv2_sgemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    BLAS_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

void dsv2_blas_set_threads(int n) { BLAS_THREADS(n); }
