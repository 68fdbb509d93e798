/* blas.h - the few OpenBLAS calls the kernels use (scipy-openblas32 by
 * default, whose symbols carry a scipy_ prefix; a system OpenBLAS when built
 * with DSV2_BLAS_SYSTEM). 32-bit BLAS integers: callers keep sizes < 2^31.
 *
 * OpenBLAS always runs single-threaded: dsv2ext's own pool (threadpool.h)
 * owns the cores and splits each product over the columns of C, one
 * single-threaded sgemm per chunk.  (Two pools on the same cores - OpenBLAS's
 * spinning threads and ours - were up to 15x slower on a busy machine.) */
#ifndef DSV2_BLAS_H
#define DSV2_BLAS_H

/* C[M, N] = A[M, K] . B[N, K]^T + beta * C   (row-major, leading dims given), threaded over N */
void dsv2_sgemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc);
/* C[M, N] = A[M, K] . B[K, N] + beta * C, threaded over N */
void dsv2_sgemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc);
/* single-threaded variants (for use inside a parallel region) */
void dsv2_sgemm_nt_1(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc);
void dsv2_sgemm_nn_1(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc);
/* keep OpenBLAS single-threaded (called once when the pool starts) */
void dsv2_blas_init(void);

#endif
