/* quant_f8.h - float8 e4m3fn block quantization of weights, the DeepSeek-V3 format.
 *
 * W [rows, cols] is cut into blocks of brow x bcol weights (the last ones partial);
 * each block gets one fp32 scale_inv and e4m3fn codes:
 *
 *   s = max |W over the block| / 448      (fp32 division); s = 1 where that gives 0
 *                                          (an all-zero block: its codes are then 0)
 *   q = e4m3(W / s)                        (fp32 division, then round to nearest even,
 *                                           saturating at 448; fp8.h)
 *   W' = e4m3(q) * s                       (the dequantized weight, one fp32 multiply)
 *
 * Every step is correctly rounded, so a NumPy model of the same float32 operations
 * gets the same codes and scales (dsv2ext.fp8.quantize_fp8_reference). */
#ifndef DSV2_QUANT_F8_H
#define DSV2_QUANT_F8_H

#include "dsv2.h"

// W [rows, cols] fp32 | bf16 -> q [rows, cols] e4m3fn codes , scale_inv [ceil(rows / brow), ceil(cols / bcol)]
// (threaded over block rows).  DSV2_ERR_NONFINITE if W holds NaN / Inf (q and scale_inv are then partly written).
int dsv2_quantize_f8(uint8_t *q, float *scale_inv, const dsv2_mat *W, int64_t brow, int64_t bcol);

// x [n] fp32 -> out [n] e4m3fn codes (fp8.h's rounding), and back (exact); single-threaded, by dsv2_isa()
void dsv2_e4m3_encode(uint8_t *out, const float *x, int64_t n);
void dsv2_e4m3_decode(float *out, const uint8_t *codes, int64_t n);

#endif
