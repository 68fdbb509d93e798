/* dsv2.h - common types of the dsv2ext C kernels (no Python here).
 *
 * Conventions
 *  - Every kernel returns an int error code (DSV2_OK on success); the Python
 *    binding turns codes into exceptions.  No kernel prints, exits or aborts.
 *  - Arguments: outputs first, then inputs, then weights, then sizes.
 *  - Activations are fp32, row-major and contiguous.  Weights are dsv2_mat:
 *    a row-major [rows, cols] matrix (a Linear's [out, in]) in fp32, bf16,
 *    int8 with block scales, float8 e4m3fn with 2-D block scales, or the packed
 *    4-bit format of int4.h.
 */
#ifndef DSV2_H
#define DSV2_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fp8.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    DSV2_OK = 0,
    DSV2_ERR_NOMEM = 1,     /* an allocation failed */
    DSV2_ERR_ARG = 2,       /* inconsistent sizes or arguments */
    DSV2_ERR_DTYPE = 3,     /* unsupported weight dtype for this kernel */
    DSV2_ERR_RANGE = 4,     /* an index or position out of range */
    DSV2_ERR_NONFINITE = 5  /* NaN/Inf where the kernel's policy rejects it */
};

const char *dsv2_strerror(int code);

typedef enum { DSV2_F32 = 0, DSV2_BF16 = 1, DSV2_I8 = 2, DSV2_F8E4M3 = 3, DSV2_I4 = 4 } dsv2_dtype;

/* A weight matrix W [rows, cols], row-major, contiguous rows.
 * For DSV2_I8, `scale` holds one fp32 scale per `group` consecutive columns
 * of each row: W[r, c] = data[r, c] * scale[r * (cols / group) + c / group].
 * For DSV2_I4, `data` holds rows of dsv2_i4_row_bytes(cols) bytes (codes and
 * scales together, see int4.h); `scale` is NULL and `group` is 32. */
typedef struct {
    dsv2_dtype dtype;
    const void *data;
    const float *scale;
    int64_t rows, cols;
    int64_t group;
    /* DSV2_F8E4M3 (float8 e4m3fn codes, one byte each, with 2-D block scales: the
     * DeepSeek-V3 layout).  `scale` is the fp32 scale_inv matrix
     * [ceil((row_off + rows) / block_rows), ceil(cols / group)], one scale per block of
     * block_rows x group weights (the last blocks may be partial), and
     *   W[r, c] = e4m3(data[r, c]) * scale[((row_off + r) / block_rows) * ceil(cols / group) + c / group]
     * as one fp32 multiply (the e4m3 value is exact in fp32; fp8.h).  row_off
     * (0 <= row_off < block_rows) is where row 0 sits inside its block of rows: 0 for a
     * whole matrix, the offset of a row view (dsv2_mat_rows) that starts inside a block.
     * Unused (0) for the other dtypes. */
    int64_t block_rows;
    int64_t row_off;
} dsv2_mat;

/* Element size in bytes of a weight dtype (DSV2_I4: see dsv2_mat_row_bytes). */
static inline size_t dsv2_dtype_size(dsv2_dtype t) {
    return t == DSV2_F32 ? 4 : t == DSV2_BF16 ? 2 : 1;
}

/* Bytes of one DSV2_I4 row of `cols` columns: a 20-byte header per 256
 * columns and 4 bits per column padded to a multiple of 64 (int4.h). */
static inline int64_t dsv2_i4_row_bytes(int64_t cols) {
    return 20 * ((cols + 255) / 256) + (cols + 63) / 64 * 32;
}

/* Bytes from one row of W to the next. */
static inline size_t dsv2_mat_row_bytes(const dsv2_mat *W) {
    if (W->dtype == DSV2_I4) return (size_t)dsv2_i4_row_bytes(W->cols);
    return (size_t)W->cols * dsv2_dtype_size(W->dtype);
}

/* DSV2_F8E4M3: column blocks per row of scales, the scales of row r's block row, and
 * DSV2_OK when the block metadata is usable (scales given, block sizes >= 1,
 * 0 <= row_off < block_rows) */
static inline int64_t dsv2_f8_scale_cols(const dsv2_mat *W) {
    return (W->cols + W->group - 1) / W->group;
}
static inline const float *dsv2_f8_scale_row(const dsv2_mat *W, int64_t r) {
    return W->scale + ((W->row_off + r) / W->block_rows) * dsv2_f8_scale_cols(W);
}
static inline int dsv2_f8_check(const dsv2_mat *W) {
    return W->dtype == DSV2_F8E4M3 && W->scale && W->group >= 1 && W->block_rows >= 1 && W->row_off >= 0 &&
                   W->row_off < W->block_rows
               ? DSV2_OK
               : DSV2_ERR_ARG;
}

/* Rows [r0, r0 + n) of W as a matrix of their own (no copy). */
static inline dsv2_mat dsv2_mat_rows(const dsv2_mat *W, int64_t r0, int64_t n) {
    dsv2_mat s = *W;
    s.data = (const char *)W->data + (size_t)r0 * dsv2_mat_row_bytes(W);
    if (W->dtype == DSV2_I8 && W->scale)
        s.scale = W->scale + r0 * (W->cols / W->group);
    if (W->dtype == DSV2_F8E4M3 && W->scale) {
        s.scale = dsv2_f8_scale_row(W, r0);
        s.row_off = (W->row_off + r0) % W->block_rows;
    }
    s.rows = n;
    return s;
}

static inline float dsv2_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round-to-nearest-even fp32 -> bf16 (NaN kept quiet). */
static inline uint16_t dsv2_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element c of a DSV2_I4 row (int4.h): (d * sc) * q - dmin * m. */
static inline float dsv2_i4_get(const uint8_t *row, int64_t c) {
    const int64_t j = c % 256, g = j / 32;
    const uint8_t *sb = row + (c / 256) * (20 + 128);
    const float d = dsv2_bf16_to_f32((uint16_t)(sb[0] | sb[1] << 8));
    const float dmin = dsv2_bf16_to_f32((uint16_t)(sb[2] | sb[3] << 8));
    const uint8_t byte = sb[20 + (j / 64) * 32 + j % 32];
    const int q = j % 64 < 32 ? (byte & 15) : (byte >> 4);
    return (d * (float)sb[4 + g]) * (float)q - dmin * (float)sb[12 + g];
}

/* Load element (r, c) of W as fp32 (slow path, for references and tails). */
static inline float dsv2_mat_get(const dsv2_mat *W, int64_t r, int64_t c) {
    size_t i = (size_t)r * (size_t)W->cols + (size_t)c;
    switch (W->dtype) {
    case DSV2_F32: return ((const float *)W->data)[i];
    case DSV2_BF16: return dsv2_bf16_to_f32(((const uint16_t *)W->data)[i]);
    case DSV2_I4: return dsv2_i4_get((const uint8_t *)W->data + (size_t)r * dsv2_mat_row_bytes(W), c);
    case DSV2_F8E4M3: return dsv2_e4m3_to_f32(((const uint8_t *)W->data)[i]) * dsv2_f8_scale_row(W, r)[c / W->group];
    default: return (float)((const int8_t *)W->data)[i] *
                    W->scale[r * (W->cols / W->group) + c / W->group];
    }
}

#ifdef __cplusplus
}
#endif
#endif
