/* gemm_amx_body.h - the tile loops of gemm_amx.c, written once against the
 * tile primitives and included twice by gemm_amx.c: once with the AMX
 * instructions, once with the C emulation of amx_tiles.h.  (No include guard:
 * a template, not a header.)
 *
 * The includer defines:
 *   AMX_FN(name)     the function's name in this variant
 *   AMX_ATTR         its attributes (the AMX target, or nothing)
 *   AMX_STATE        declares the variant's tile state inside a function
 *   AMX_SP / AMX_SA  the state as first parameter / argument of the helpers
 *   T_CFG(cfg) T_RELEASE() T_ZERO(t) T_LOAD(t, p, stride) T_STORE(t, p, stride) T_DP(c, a, b)
 *
 * Tiles (all 16 rows x 64 bytes): C 0..3 (C(i, j) = 2i + j, i: weight-row
 * tile, j: token tile), A 4, 5 (weight rows), B 6, 7 (tokens). */

/* One 32-row x (16 or 32)-token block of C over `steps` 32-column K steps:
 * c (rows ldc floats apart) zeroed (first) or loaded, a: the weight panel
 * (per step two 16 x 32 tiles), b0 / b1: the token tiles' panels (per step
 * `parts` 16 x 32 tiles each); two: 1 for two token tiles. */
AMX_ATTR static inline __attribute__((always_inline)) void
AMX_FN(block)(AMX_SP float *c, int64_t ldc, const uint16_t *a, const uint16_t *b0, const uint16_t *b1,
              int64_t steps, int parts, int first, const int two) {
    const int64_t cs = ldc * (int64_t)sizeof(float);
    float *c1 = c + 16 * ldc;
    if (first) {
        T_ZERO(0);
        T_ZERO(2);
        if (two) {
            T_ZERO(1);
            T_ZERO(3);
        }
    } else {
        T_LOAD(0, c, cs);
        T_LOAD(2, c1, cs);
        if (two) {
            T_LOAD(1, c + 16, cs);
            T_LOAD(3, c1 + 16, cs);
        }
    }
    for (int64_t s = 0; s < steps; s++) {
        T_LOAD(4, a, 64);
        T_LOAD(5, a + AMX_TILE_U16, 64);
        a += 2 * AMX_TILE_U16;
        for (int p = 0; p < parts; p++) {
            T_LOAD(6, b0, 64);
            b0 += AMX_TILE_U16;
            if (two) {
                T_LOAD(7, b1, 64);
                b1 += AMX_TILE_U16;
                T_DP(0, 4, 6);
                T_DP(1, 4, 7);
                T_DP(2, 5, 6);
                T_DP(3, 5, 7);
            } else {
                T_DP(0, 4, 6);
                T_DP(2, 5, 6);
            }
        }
    }
    T_STORE(0, c, cs);
    T_STORE(2, c1, cs);
    if (two) {
        T_STORE(1, c + 16, cs);
        T_STORE(3, c1 + 16, cs);
    }
}

/* items [i0, i1) of J (see amx_job): ap, cb: this thread's A-panel and C buffers */
AMX_ATTR static void AMX_FN(items)(const amx_job *J, int64_t i0, int64_t i1, uint16_t *ap, float *cb) {
    AMX_STATE;
    T_CFG(&J->cfg);
    const int64_t N = J->W->rows, nsteps = J->nsteps, parts = J->parts;
    const int64_t tstride = nsteps * parts * AMX_TILE_U16; /* one token tile's panel */
    for (int64_t it = i0; it < i1; it++) {
        const int64_t r0 = (it / J->ntg) * J->rb, nr = N - r0 < J->rb ? N - r0 : J->rb, nblk = (nr + 31) / 32;
        const int64_t j0 = (it % J->ntg) * J->tpg, nj = J->ntt - j0 < J->tpg ? J->ntt - j0 : J->tpg;
        const int64_t ldc = nj * 16;
        for (int64_t s0 = 0; s0 < nsteps; s0 += J->kcs) {
            const int64_t ns = nsteps - s0 < J->kcs ? nsteps - s0 : J->kcs;
            amx_pack_a(ap, J->W, r0, nblk, s0, ns);
            for (int64_t blk = 0; blk < nblk; blk++) {
                const uint16_t *a = ap + blk * ns * 2 * AMX_TILE_U16;
                for (int64_t j = 0; j < nj; j += 2) {
                    const uint16_t *b0 = J->bp + (j0 + j) * tstride + s0 * parts * AMX_TILE_U16;
                    float *c = cb + blk * 32 * ldc + j * 16;
                    if (j + 1 < nj) AMX_FN(block)(AMX_SA c, ldc, a, b0, b0 + tstride, ns, (int)parts, s0 == 0, 1);
                    else AMX_FN(block)(AMX_SA c, ldc, a, b0, NULL, ns, (int)parts, s0 == 0, 0);
                }
            }
        }
        const int64_t t0 = j0 * 16, nt = J->T - t0 < nj * 16 ? J->T - t0 : nj * 16;
        amx_unpack_c(J->y + t0 * J->ldy + r0, J->ldy, cb, ldc, nr, nt);
    }
    T_RELEASE();
}
