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

/* `steps` 32-column K steps into the C tiles: per step the two weight tiles (*a) meet the
 * `parts` tiles of one or two token tiles (*b0, *b1); the pointers advance. */
AMX_ATTR static inline __attribute__((always_inline)) void
AMX_FN(steps)(AMX_SP const uint16_t **a, const uint16_t **b0, const uint16_t **b1, int64_t steps, int parts,
              const int two) {
    for (int64_t s = 0; s < steps; s++) {
        T_LOAD(4, *a, 64);
        T_LOAD(5, *a + AMX_TILE_U16, 64);
        *a += 2 * AMX_TILE_U16;
        for (int p = 0; p < parts; p++) {
            T_LOAD(6, *b0, 64);
            *b0 += AMX_TILE_U16;
            if (two) {
                T_LOAD(7, *b1, 64);
                *b1 += AMX_TILE_U16;
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
}

AMX_ATTR static inline __attribute__((always_inline)) void AMX_FN(zero_c)(AMX_SP const int two) {
    T_ZERO(0);
    T_ZERO(2);
    if (two) {
        T_ZERO(1);
        T_ZERO(3);
    }
}

/* C tiles -> c (rows ldc floats apart): a 32 x (16 or 32) block */
AMX_ATTR static inline __attribute__((always_inline)) void AMX_FN(store_c)(AMX_SP float *c, int64_t ldc,
                                                                           const int two) {
    const int64_t cs = ldc * (int64_t)sizeof(float);
    T_STORE(0, c, cs);
    T_STORE(2, c + 16 * ldc, cs);
    if (two) {
        T_STORE(1, c + 16, cs);
        T_STORE(3, c + 16 * ldc + 16, cs);
    }
}

/* bf16 weights: one 32-row x (16 or 32)-token block of C over `steps` K steps, c (rows ldc
 * floats apart) zeroed first (first) or loaded */
AMX_ATTR static inline __attribute__((always_inline)) void
AMX_FN(block)(AMX_SP float *c, int64_t ldc, const uint16_t *a, const uint16_t *b0, const uint16_t *b1,
              int64_t steps, int parts, int first, const int two) {
    const int64_t cs = ldc * (int64_t)sizeof(float);
    if (first) {
        AMX_FN(zero_c)(AMX_SA two);
    } else {
        T_LOAD(0, c, cs);
        T_LOAD(2, c + 16 * ldc, cs);
        if (two) {
            T_LOAD(1, c + 16, cs);
            T_LOAD(3, c + 16 * ldc + 16, cs);
        }
    }
    AMX_FN(steps)(AMX_SA &a, &b0, &b1, steps, parts, two);
    AMX_FN(store_c)(AMX_SA c, ldc, two);
}

/* int8 weights: per group of spg steps the block sums P = q . x (tiles from zero, stored to
 * pb [32 rows][32]), then acc = fma(s, P, acc) with the group's 32 row scales (amx_scale_acc) */
AMX_ATTR static inline __attribute__((always_inline)) void
AMX_FN(block_i8)(AMX_SP float *acc, int64_t ldc, float *pb, const uint16_t *a, const float *sc,
                 const uint16_t *b0, const uint16_t *b1, int64_t groups, int64_t spg, const int two) {
    for (int64_t g = 0; g < groups; g++) {
        AMX_FN(zero_c)(AMX_SA two);
        AMX_FN(steps)(AMX_SA &a, &b0, &b1, spg, 3, two);
        AMX_FN(store_c)(AMX_SA pb, 32, two);
        amx_scale_acc(acc, ldc, pb, sc + 32 * g, two);
    }
}

/* items [i0, i1) of J (see amx_job): ap, cb, pb: this thread's A-panel, C and int8 group buffers */
AMX_ATTR static void AMX_FN(items)(const amx_job *J, int64_t i0, int64_t i1, uint16_t *ap, float *cb, float *pb) {
    AMX_STATE;
    T_CFG(&J->cfg);
    const int64_t N = J->W->rows, nsteps = J->nsteps, parts = J->parts;
    const int64_t tstride = nsteps * parts * AMX_TILE_U16; /* one token tile's panel */
    for (int64_t it = i0; it < i1; it++) {
        const int64_t r0 = (it / J->ntg) * J->rb, nr = N - r0 < J->rb ? N - r0 : J->rb, nblk = (nr + 31) / 32;
        const int64_t j0 = (it % J->ntg) * J->tpg, nj = J->ntt - j0 < J->tpg ? J->ntt - j0 : J->tpg;
        const int64_t ldc = nj * 16;
        if (J->W->dtype == DSV2_I8) memset(cb, 0, (size_t)(nblk * 32 * ldc) * sizeof(float)); /* the sums over groups */
        for (int64_t s0 = 0; s0 < nsteps; s0 += J->kcs) {
            const int64_t ns = nsteps - s0 < J->kcs ? nsteps - s0 : J->kcs;
            const float *sc = amx_pack_a(ap, J->W, r0, nblk, s0, ns);
            for (int64_t blk = 0; blk < nblk; blk++) {
                const uint16_t *a = ap + blk * ns * 2 * AMX_TILE_U16;
                for (int64_t j = 0; j < nj; j += 2) {
                    const uint16_t *b0 = J->bp + (j0 + j) * tstride + s0 * parts * AMX_TILE_U16;
                    const uint16_t *b1 = j + 1 < nj ? b0 + tstride : NULL;
                    float *c = cb + blk * 32 * ldc + j * 16;
                    if (sc) { /* int8 */
                        const float *s = sc + blk * (ns / J->spg) * 32;
                        if (b1) AMX_FN(block_i8)(AMX_SA c, ldc, pb, a, s, b0, b1, ns / J->spg, J->spg, 1);
                        else AMX_FN(block_i8)(AMX_SA c, ldc, pb, a, s, b0, NULL, ns / J->spg, J->spg, 0);
                    } else if (b1) {
                        AMX_FN(block)(AMX_SA c, ldc, a, b0, b1, ns, (int)parts, s0 == 0, 1);
                    } else {
                        AMX_FN(block)(AMX_SA c, ldc, a, b0, NULL, ns, (int)parts, s0 == 0, 0);
                    }
                }
            }
        }
        const int64_t t0 = j0 * 16, nt = J->T - t0 < nj * 16 ? J->T - t0 : nj * 16;
        amx_unpack_c(J->y + t0 * J->ldy + r0, J->ldy, cb, ldc, nr, nt);
    }
    T_RELEASE();
}
