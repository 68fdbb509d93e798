/* rmsnorm.h - RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w, in fp32. */
#ifndef DSV2_RMSNORM_H
#define DSV2_RMSNORM_H

#include "dsv2.h"

// x [T, d] (rows ldx apart) , w [d] (fp32 or bf16, a 1 x d dsv2_mat) -> y [T, d] (rows ldy apart)
// y may be x (in place).
int dsv2_rmsnorm_ex(float *y, int64_t ldy, const float *x, int64_t ldx, const dsv2_mat *w,
                    int64_t T, int64_t d, float eps);
// x [T, d] , w [d] -> y [T, d]  (contiguous)
int dsv2_rmsnorm(float *y, const float *x, const dsv2_mat *w, int64_t T, int64_t d, float eps);

// h [T, d] += r [T, d], then h , w [d] -> y [T, d] (contiguous; y may be h: h is then lost).
// The residual add of a decoder layer fused with the next norm: the same numbers as h += r
// followed by dsv2_rmsnorm(y, h, ...).
int dsv2_rmsnorm_add(float *y, float *h, const float *r, const dsv2_mat *w, int64_t T, int64_t d, float eps);

#endif
