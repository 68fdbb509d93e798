/* amx_tiles.h - Intel AMX tiles: detection, the tile configuration, and a
 * portable C emulation of the tile instructions the kernels use.
 *
 * The AMX kernels (gemm_amx.c) are written once against five primitives
 * (load config, tile load, tile store, tile zero, TDPBF16PS) and compiled
 * twice: with the AMX instructions, and with the emulation below.  The
 * emulation is a test vehicle (CI machines have no AMX), not a user path: it
 * follows the Intel SDM's description of the instructions (palette 1), so
 * the kernels' packing, blocking and tails run in CI exactly as on the CPU.
 *
 * Semantics modelled (Intel SDM / ISA extensions reference, palette 1):
 *  - 8 tiles of at most 16 rows x 64 bytes; LDTILECFG takes a 64-byte block:
 *    byte 0 palette_id, byte 1 start_row, bytes 2-15 reserved (0), bytes
 *    16-47 colsb[16] (uint16, bytes per row; entries 8-15 reserved), bytes
 *    48-63 rows[16] (uint8; entries 8-15 reserved).  A tile is configured
 *    when rows and colsb are both non-zero; colsb <= 64, rows <= 16.
 *    Loading a configuration zeroes every tile.
 *  - TILELOADD t, [base + stride]: row r (r < rows) = the colsb bytes at
 *    base + r * stride; the rest of the tile is zeroed.  TILESTORED writes
 *    rows x colsb bytes the same way; TILEZERO zeroes a tile.
 *  - TDPBF16PS c, a, b (c, a, b distinct; c.rows == a.rows, c.colsb ==
 *    b.colsb, a.colsb / 4 == b.rows, n = c.colsb / 4 <= 16, k = b.rows <= 16):
 *    for each row m and column n, two fp32 partial sums start at +0:
 *        e += A[m][2i] * B[i][2n],   o += A[m][2i+1] * B[i][2n+1]   (i = 0..k-1)
 *    each a fused multiply-add rounded to nearest even; then
 *        C[m][n] = C[m][n] + (e + o)
 *    with two more roundings.  bf16 inputs and the C input are read with
 *    denormals as zero (DAZ) and every result that is denormal is flushed to
 *    a zero of its sign (FTZ); MXCSR plays no part.
 *    (The Intrinsics Guide shows an older, simpler pseudo-code that adds each
 *    product straight into C; the SDM's form above is the one modelled.)
 *  - Misuse that would fault on the CPU (#UD / #GP: unconfigured tile, bad
 *    shapes, reserved bits) is counted (dsv2_amx_emu_stats) and the
 *    instruction is skipped; tests check the count stays 0.
 * Tininess for FTZ is taken after rounding (a result that rounds up to
 * FLT_MIN is kept).  NaN results are NaN, with no particular payload. */
#ifndef DSV2_AMX_TILES_H
#define DSV2_AMX_TILES_H

#include <stdint.h>

/* 1 when this compiler builds the AMX instructions (GCC >= 11, clang >= 12, x86-64);
 * otherwise only the emulation exists and dsv2_amx_hw_supported() is 0. */
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define DSV2_AMX_COMPILED 1
#else
#define DSV2_AMX_COMPILED 0
#endif

/* the 64-byte LDTILECFG operand */
typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) dsv2_tilecfg;

/* 1 when the CPU has AMX-TILE and AMX-BF16, the OS enables the tile state
 * (XCR0 bits 17, 18) and, on Linux, granted this process the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM, requested once); 0 otherwise. */
int dsv2_amx_hw_supported(void);

/* The emulated tile register file (one per thread of a kernel). */
typedef struct {
    dsv2_tilecfg cfg;
    int configured;
    uint8_t t[8][16][64];
} dsv2_tile_emu;

void dsv2_emu_loadconfig(dsv2_tile_emu *E, const dsv2_tilecfg *cfg);
void dsv2_emu_release(dsv2_tile_emu *E);
void dsv2_emu_zero(dsv2_tile_emu *E, int t);
void dsv2_emu_loadd(dsv2_tile_emu *E, int t, const void *base, int64_t stride);
void dsv2_emu_stored(dsv2_tile_emu *E, int t, void *base, int64_t stride);
void dsv2_emu_dpbf16ps(dsv2_tile_emu *E, int c, int a, int b);
/* since the start: emulated TDPBF16PS run, and instructions skipped because they
 * would fault on the CPU */
void dsv2_amx_emu_stats(long *products, long *faults);

#endif
