/* mla_softmax.h - the online softmax of one block of scores with the heads in the 16 fp32 lanes
 * (the block passes of mla_absorbed.c: exact, and the bf16 compute mode's in mla_bf16dp.c). */
#ifndef DSV2_MLA_SOFTMAX_H
#define DSV2_MLA_SOFTMAX_H

#include <math.h>
#include <stdint.h>

#include "cpu.h"
#include "vexp_avx512.h"

/* s [n, 16] scores of n rows for 16 heads (a head per lane) -> p = exp(scale s - m) in place, with
 * m, l [16] (running maxima of scale * s and sums of p; start from -inf and 0) updated and the nh
 * heads' rows of o (o [nh, L], rows ldo apart) rescaled where a maximum rose.  Per head the
 * arithmetic of the per-head rows in vexp.c (the block's maximum times scale, then
 * exp(s * scale - m) and its sum); a NaN score makes the head's maximum NaN, and so its output. */
DSV2_TARGET_AVX512 static inline void dsv2_mla_softmax_lanes(float *m, float *l, float *o, int64_t ldo, int64_t nh,
                                                             int64_t L, float *s, int64_t n, float scale) {
    __m512 mx = _mm512_load_ps(s);
    __mmask16 nan = _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q);
    for (int64_t r = 1; r < n; r++) {
        const __m512 v = _mm512_load_ps(s + r * 16);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, v);
    }
    const __m512 vs = _mm512_set1_ps(scale);
    mx = _mm512_mask_mov_ps(_mm512_mul_ps(mx, vs), nan, _mm512_set1_ps(NAN));
    __m512 vm = _mm512_loadu_ps(m), vl = _mm512_loadu_ps(l);
    const __mmask16 up = _mm512_cmp_ps_mask(mx, vm, _CMP_GT_OQ) | _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q);
    const __mmask16 resc = up & _mm512_cmp_ps_mask(vl, _mm512_setzero_ps(), _CMP_GT_OQ) &
                           (__mmask16)((1u << nh) - 1u);
    if (resc) {
        const __m512 a = dsv2_exp_avx512(_mm512_sub_ps(vm, mx));
        vl = _mm512_mask_mul_ps(vl, resc, vl, a);
        float av[16] __attribute__((aligned(64)));
        _mm512_store_ps(av, a);
        for (int h = 0; h < nh; h++)
            if (resc >> h & 1) {
                const __m512 ah = _mm512_set1_ps(av[h]);
                float *oh = o + h * ldo;
                int64_t c = 0;
                for (; c + 16 <= L; c += 16) _mm512_storeu_ps(oh + c, _mm512_mul_ps(_mm512_loadu_ps(oh + c), ah));
                if (c < L) {
                    const __mmask16 k = (__mmask16)((1u << (L - c)) - 1u);
                    _mm512_mask_storeu_ps(oh + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, oh + c), ah));
                }
            }
    }
    vm = _mm512_mask_mov_ps(vm, up, mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t r = 0; r < n; r++) {
        const __m512 e = dsv2_exp_avx512(_mm512_sub_ps(_mm512_mul_ps(_mm512_load_ps(s + r * 16), vs), vm));
        _mm512_store_ps(s + r * 16, e);
        sum = _mm512_add_ps(sum, e);
    }
    _mm512_storeu_ps(m, vm);
    _mm512_storeu_ps(l, _mm512_add_ps(vl, sum));
}

#endif
