/* quant.h - weight-only int8 quantization with per-block absmax scales.
 *
 * A weight row of `cols` values is cut into blocks of `group` consecutive
 * columns; each block b of row r gets one fp32 scale and int8 codes:
 *
 *   s[r, b] = max_{c in b} |W[r, c]| / 127            (fp32 division)
 *   q[r, c] = clamp(rint(W[r, c] / s[r, b]), -127, 127) (fp32 division,
 *             rint = round half to even), q = 0 where s = 0
 *   W'[r, c] = q[r, c] * s[r, b]                      (the dequantized weight)
 *
 * Every step is a correctly rounded fp32 operation, so a NumPy model doing
 * the same float32 operations gets bit-identical codes and scales
 * (dsv2ext.quant.quantize_int8_reference). */
#ifndef DSV2_QUANT_H
#define DSV2_QUANT_H

#include "dsv2.h"

// W [rows, cols] fp32 | bf16 -> q [rows, cols] int8 , scale [rows, cols / group] fp32
// (threaded).  group >= 1 must divide cols.  DSV2_ERR_NONFINITE if W holds NaN / Inf
// (q and scale are then partly written).
int dsv2_quantize_i8(int8_t *q, float *scale, const dsv2_mat *W, int64_t group);

// rows [r0, r1) of an int8 W -> out [(r1 - r0), cols] fp32 = q * scale (single-threaded)
void dsv2_dequant_i8_rows(float *out, const dsv2_mat *W, int64_t r0, int64_t r1);

#endif
