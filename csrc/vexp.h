/* vexp.h - vectorised exp for softmax rows (AVX-512 / AVX2 / portable).
 *
 * exp is a Cephes-style range reduction + degree-6 polynomial (about 1 ulp on
 * the range used by softmax); inputs below -87.3 give ~1e-38 instead of 0,
 * NaN propagates. */
#ifndef DSV2_VEXP_H
#define DSV2_VEXP_H

#include <stdint.h>

// x [n] -> max_i x[i]  (n >= 1)
float dsv2_vmax(const float *x, int64_t n);

// x [n] -> x[i] = exp(x[i] * scale - shift) in place; returns sum_i x[i]
float dsv2_vexp_shift_sum(float *x, int64_t n, float scale, float shift);

// x [n] -> x[i] *= a
void dsv2_vscale(float *x, int64_t n, float a);

#endif
