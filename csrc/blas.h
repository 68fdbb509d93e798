/* blas.h - the few OpenBLAS calls the kernels use (scipy-openblas32 by
 * default, whose symbols carry a scipy_ prefix; a system OpenBLAS when built
 * with DSV2_BLAS_SYSTEM). 32-bit BLAS integers: callers keep sizes < 2^31. */
#ifndef DSV2_BLAS_H
#define DSV2_BLAS_H

/* C[M, N] = A[M, K] . B[N, K]^T + beta * C   (row-major, leading dims given) */
void dsv2_sgemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc);
/* C[M, N] = A[M, K] . B[K, N] + beta * C */
void dsv2_sgemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc);
void dsv2_blas_set_threads(int n);

#endif
