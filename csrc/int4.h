/* int4.h - the 4-bit weight format of dsv2ext (DSV2_I4) and its quantizer.
 *
 * A weight row of `cols` values is cut into groups of 32 columns; groups go
 * in super-blocks of 8 (256 columns).  The row is padded with absent columns
 * to a multiple of 64 (an even number of groups): Kp = 64 * ceil(cols / 64).
 * Each super-block s of a row is stored as
 *
 *   bytes 0-1   d     bf16   (> 0 or 0)    scale of the sub-scales
 *   bytes 2-3   dmin  bf16   (>= 0)        scale of the sub-mins
 *   bytes 4-11  sc[8] uint8                one sub-scale per group
 *   bytes 12-19 m[8]  uint8                one sub-min per group
 *   bytes 20-   codes, 32 bytes per pair of groups (a "unit" of 64 columns):
 *               byte i of unit u holds column 64u + i in its low nibble and
 *               column 64u + 32 + i in its high nibble (columns counted from
 *               the super-block's first), codes q in [0, 15]
 *
 * and a row is its super-blocks one after the other (the last one holds the
 * remaining 1-4 units; its unused sc / m are 0): dsv2_i4_row_bytes(cols) =
 * 20 * ceil(cols / 256) + Kp / 2 bytes, rows contiguous.  The weight is
 *
 *   W[r, c] = (d * sc[g]) * q[r, c] - dmin * m[g]        (g = the group of c)
 *
 * with d * sc, its product with q and dmin * m exact in fp32 (8 x 8 x 4
 * significant bits) and one fp32 rounding for the difference: this is the dequantized value every
 * kernel and dsv2ext.quant use.  4.625 bits per weight for cols a multiple
 * of 256 (e.g. 2048: 1184 bytes a row), 4.68 for 1408 (V2-Lite's experts).
 *
 * The quantizer (dsv2_quantize_i4) fits each group on its own, then puts the
 * groups of a super-block on the 8-bit grid; every step is a correctly
 * rounded fp32 operation in a fixed order, so a NumPy model doing the same
 * operations (dsv2ext.quant.quantize_int4_reference) gets the same bytes:
 *  1. per group, over its n present columns (column order for every sum):
 *     lo = min(min x, 0), hi = max x, rng = hi - lo; if rng == 0: s = 0, mn = lo.
 *     Otherwise, with SX = sum x, 22 candidates j = 0..21:
 *       iscale = 15 / rng (j = 0) or (14 + 0.1 * (j - 1)) / rng ,
 *       L = min(rint(iscale * (x - lo)), 15) ,
 *       SL = sum L , SLL = sum L * L , SXL = sum x * L ;
 *       j = 0: s = rng / 15 , mn = lo ;
 *       j > 0: least squares for x ~ s L + mn: D = n * SLL - SL * SL; skipped
 *         if D <= 0; s = (n * SXL - SX * SL) / D , mn = (SLL * SX - SL * SXL) / D,
 *         and if mn > 0: mn = 0 , s = SXL / SLL ;
 *       err = s * (s * SLL + 2 * (mn * SL - SXL)) + mn * (n * mn - 2 * SX)
 *       (the squared error minus sum x^2); a candidate replaces the best so
 *       far when its err is strictly smaller.
 *  2. per super-block: S_g = max(s_g, 0), M_g = max(-mn_g, 0);
 *     d = bf16 rounded up of max_g S_g / 255, dmin likewise of max_g M_g / 255;
 *     sc_g = clamp(rint(S_g / d), 0, 255) (0 if d = 0), m_g likewise with dmin.
 *  3. codes: a = d * sc_g, b = dmin * m_g, q = clamp(rint((x + b) / a), 0, 15)
 *     (0 if a = 0); absent columns get q = 0.
 * (rint: round half to even.)  The search is the usual "try scales around
 * max-min and refit by least squares" of 4-bit quantizers with an offset. */
#ifndef DSV2_INT4_H
#define DSV2_INT4_H

#include "dsv2.h"

#define DSV2_I4_GROUP 32     /* columns per sub-scale / sub-min */
#define DSV2_I4_SUPER 256    /* columns per super-block (8 groups) */
#define DSV2_I4_HDR 20       /* header bytes of a super-block */
#define DSV2_I4_UNIT 64      /* columns per 32-byte unit of codes (2 groups) */
#define DSV2_I4_SB_BYTES (DSV2_I4_HDR + DSV2_I4_SUPER / 2)

/* padded columns (a multiple of 64) and super-blocks of a row; its bytes:
 * dsv2_i4_row_bytes (dsv2.h), one element: dsv2_i4_get (dsv2.h) */
static inline int64_t dsv2_i4_kp(int64_t cols) { return (cols + DSV2_I4_UNIT - 1) / DSV2_I4_UNIT * DSV2_I4_UNIT; }
static inline int64_t dsv2_i4_nsb(int64_t cols) { return (cols + DSV2_I4_SUPER - 1) / DSV2_I4_SUPER; }

// W [rows, cols] fp32 | bf16 -> q [rows, dsv2_i4_row_bytes(cols)] (threaded).
// DSV2_ERR_NONFINITE if W holds NaN / Inf (q is then partly written).
int dsv2_quantize_i4(uint8_t *q, const dsv2_mat *W);

// rows [r0, r1) of an int4 W -> out [(r1 - r0), cols] fp32 (single-threaded)
void dsv2_dequant_i4_rows(float *out, const dsv2_mat *W, int64_t r0, int64_t r1);
// columns [c0, c1) of row r of an int4 W -> out [c1 - c0] fp32
void dsv2_dequant_i4_cols(float *out, const dsv2_mat *W, int64_t r, int64_t c0, int64_t c1);

#endif
