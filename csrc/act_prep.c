/* act_prep.c - activations prepared once per call for the integer row-dot
 * kernels: which kinds a call needs (int16 for int8 weights, int8 for int4
 * weights), their buffers, and the quantization into them (gemv.h). */
#include "gemv.h"
#include "gemv_f8.h"
#include "int4.h"

dsv2_act_kinds dsv2_act_kinds_of(const dsv2_mat *a, const dsv2_mat *b) {
    dsv2_act_kinds k = {0, 0, 0};
    const dsv2_mat *w[2] = {a, b};
    int64_t g = 0;
    int mixed = 0;
    for (int i = 0; i < 2; i++) {
        if (!w[i]) continue;
        if (dsv2_i4q_usable(w[i])) k.i8 = 1;
        if (dsv2_f8p_usable(w[i])) k.f8 = 1;
        if (w[i]->dtype == DSV2_I8) {
            const int64_t gi = dsv2_i8q_usable(w[i], w[i]->group) ? w[i]->group : 0;
            if (gi && g && gi != g) mixed = 1;
            if (!gi) mixed = 1; /* an int8 matrix on the fp32 path: no int16 kind for it */
            if (gi) g = gi;
        }
    }
    /* int8 matrices with different groups: the fp32 path for both (as before int4) */
    k.g16 = mixed ? 0 : g;
    return k;
}

static size_t act16_bytes(int64_t T, int64_t K, int64_t group) {
    return (((size_t)T * (size_t)K * sizeof(int16_t) + 63) & ~(size_t)63) +
           (((size_t)T * (size_t)(K / group) * sizeof(float) + 63) & ~(size_t)63);
}

static size_t f8p_bytes(dsv2_act_kinds k, int64_t T, int64_t K) {
    return k.f8 && T <= DSV2_F8P_MAX_ROWS ? (((size_t)T * (size_t)K * sizeof(float) + 63) & ~(size_t)63) : 0;
}

size_t dsv2_act_bytes(dsv2_act_kinds k, int64_t T, int64_t K) {
    return (k.g16 > 0 ? act16_bytes(T, K, k.g16) : 0) + (k.i8 ? ((dsv2_act8_bytes(T, K) + 63) & ~(size_t)63) : 0) +
           f8p_bytes(k, T, K);
}

dsv2_xq dsv2_act_at(dsv2_act_kinds k, void *buf, int64_t T, int64_t K) {
    dsv2_xq r;
    memset(&r, 0, sizeof r);
    char *p = (char *)buf;
    if (k.g16 > 0) {
        r.q = (const int16_t *)p;
        r.s = (const float *)(p + (((size_t)T * (size_t)K * sizeof(int16_t) + 63) & ~(size_t)63));
        r.group = k.g16;
        p += act16_bytes(T, K, k.g16);
    }
    if (k.i8) {
        const dsv2_xq v = dsv2_act8_at(p, T, K);
        r.q8 = v.q8;
        r.s8 = v.s8;
        r.gsum8 = v.gsum8;
        p += (dsv2_act8_bytes(T, K) + 63) & ~(size_t)63;
    }
    if (f8p_bytes(k, T, K)) r.f8p = (const float *)p;
    return r;
}

void dsv2_act_quantize(const dsv2_xq *xq, const float *x, int64_t ldx, int64_t T, int64_t K) {
    if (xq->q) dsv2_quantize_act16((int16_t *)xq->q, (float *)xq->s, x, ldx, T, K, xq->group);
    if (xq->q8) dsv2_quantize_act8(xq, x, ldx, T, K);
    if (xq->f8p) dsv2_f8p_prepare((float *)xq->f8p, x, ldx, T, K);
}

dsv2_xq dsv2_xq_rows(const dsv2_xq *xq, int64_t K, int64_t r0) {
    dsv2_xq r;
    memset(&r, 0, sizeof r);
    if (xq->q) {
        r.q = xq->q + r0 * K;
        r.s = xq->s + r0 * (K / xq->group);
        r.group = xq->group;
    }
    if (xq->p) r.p = xq->p + r0 * K;
    if (xq->f8p) r.f8p = xq->f8p + r0 * K;
    if (xq->q8) {
        r.q8 = xq->q8 + r0 * dsv2_i4_kp(K);
        r.s8 = xq->s8 + r0 * dsv2_i4_nsb(K);
        r.gsum8 = xq->gsum8 + r0 * dsv2_i4_nsb(K) * 8;
    }
    return r;
}

int dsv2_gemv_q_rows(float *y, int64_t ldy, const dsv2_xq *xq, int64_t T, const dsv2_mat *W, int64_t r0,
                     int64_t r1) {
    if (!xq) return 0;
    if (xq->f8p && dsv2_f8p_usable(W)) {
        dsv2_gemv_f8p_rows(y, ldy, xq->f8p, T, W, r0, r1);
        return 1;
    }
    const int i4 = xq->q8 && dsv2_i4q_usable(W), i8 = !i4 && xq->q && dsv2_i8q_usable(W, xq->group);
    if (!i4 && !i8) return 0;
    for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int tt = (int)(T - t0 < 16 ? T - t0 : 16);
        const dsv2_xq xs = dsv2_xq_rows(xq, W->cols, t0);
        if (i4) dsv2_gemv_i4q_rows(y + t0 * ldy, ldy, &xs, tt, W, r0, r1);
        else dsv2_gemv_i8q_rows(y + t0 * ldy, ldy, &xs, tt, W, r0, r1);
    }
    return 1;
}
