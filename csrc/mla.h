/* mla.h - DeepSeek multi-head latent attention (MLA) kernels on a latent cache.
 *
 * Per token the cache holds one row of W = kv_lora + rope numbers:
 *   [ c = kv_a_layernorm(c_kv) (kv_lora) | k_pe rotated at the token's position (rope) ]
 * The cache is [B, S] rows (B sequences, S positions each) in one of three formats
 * (dsv2_mla_cache.dtype, row size dsv2_mla_row_bytes):
 *   DSV2_KV_F32   W fp32 numbers;
 *   DSV2_KV_BF16  W bfloat16 numbers (rounded to nearest even);
 *   DSV2_KV_FP8   [ codes (kv_lora e4m3 bytes, padded to a multiple of 4) |
 *                   scales (ceil(kv_lora / 128) fp32, one per block of 128 codes) |
 *                   k_pe (rope bfloat16) ]: c[i] = e4m3(codes[i]) * scales[i / 128]
 *                 (FlashMLA's FP8 cache layout: 656 bytes for V2 dims).
 * Attention reads the rows in their own format, never a widened copy of the cache: fp32 and
 * bf16 rows widened in registers, FP8 rows (AVX-512, absorbed form) 64 at a time into a
 * per-thread fp32 block that every head then reads.
 * A call handles a
 * ragged set of T tokens: token t belongs to sequence seq[t] and sits at position
 * pos[t]; it attends to rows 0..pos[t] of its sequence (causal; rows of earlier
 * tokens must have been written before, rows of the call's own tokens are written
 * by the compression step).  The caller checks 0 <= seq[t] < B and 0 <= pos[t] < S.
 *
 * Queries are [T, H, dqk] with dqk = nope + rope, per head [q_nope | q_pe] (q_pe
 * already rotated).  kv_b_proj is [H * (nope + v), kv_lora]: per head h, rows
 * [h*(nope+v), h*(nope+v)+nope) are W_UK_h and the next v rows are W_UV_h.
 * Outputs of attention are [T, H, v] (the heads concatenated, before o_proj). */
#ifndef DSV2_MLA_H
#define DSV2_MLA_H

#include "dsv2.h"

typedef struct {
    int64_t n_heads;   /* H */
    int64_t nope;      /* qk_nope_head_dim */
    int64_t rope;      /* qk_rope_head_dim (even) */
    int64_t v;         /* v_head_dim */
    int64_t kv_lora;   /* kv_lora_rank */
} dsv2_mla_dims;

/* formats of the cached rows */
enum { DSV2_KV_F32 = 0, DSV2_KV_BF16 = 1, DSV2_KV_FP8 = 2 };
#define DSV2_KV_FP8_BLOCK 128 /* codes per fp32 scale in an FP8 row */

/* the latent cache: [B, S] rows of dsv2_mla_row_bytes(dtype, kv_lora, rope) bytes */
typedef struct {
    void *data;
    int64_t B, S;
    int dtype; /* DSV2_KV_* */
} dsv2_mla_cache;

// bytes of one cached row (0 for an unknown dtype): f32 4 W, bf16 2 W,
// fp8 round_up(kv_lora, 4) + 4 ceil(kv_lora / 128) + 2 rope
int64_t dsv2_mla_row_bytes(int dtype, int64_t kv_lora, int64_t rope);
/* FP8 rows: scale blocks, and byte offsets of the scales and of k_pe in a row */
static inline int64_t dsv2_kv_fp8_blocks(int64_t kv_lora) {
    return (kv_lora + DSV2_KV_FP8_BLOCK - 1) / DSV2_KV_FP8_BLOCK;
}
static inline int64_t dsv2_kv_fp8_scales_at(int64_t kv_lora) {
    return (kv_lora + 3) / 4 * 4;
}
static inline int64_t dsv2_kv_fp8_rope_at(int64_t kv_lora) {
    return dsv2_kv_fp8_scales_at(kv_lora) + 4 * dsv2_kv_fp8_blocks(kv_lora);
}

/* ---- cached rows (mla_cache.c) ---- */
// lat [n, kv_lora + rope] fp32 -> n rows in the cache format (ldr bytes apart), rounded to nearest even
void dsv2_mla_rows_store(void *rows, int64_t ldr, const float *lat, int64_t n, int dtype, int64_t kv_lora,
                         int64_t rope);
// n rows (ldr bytes apart), columns [c0, c1) of the row -> dst [n, c1 - c0] fp32 (rows ldd apart)
void dsv2_mla_rows_load(float *dst, int64_t ldd, const void *rows, int64_t ldr, int64_t n, int64_t c0, int64_t c1,
                        int dtype, int64_t kv_lora, int64_t rope);

enum { DSV2_MLA_AUTO = 0, DSV2_MLA_ABSORBED = 1, DSV2_MLA_DECOMPRESSED = 2 };

/* ---- latent KV compression (mla_compress.c) ---- */
// h [T, d] , kv_a_proj [kv_lora + rope, d] , kv_a_norm [kv_lora] , pos [T]
//   -> lat [T, kv_lora + rope] = [RMSNorm(c_kv) | rope(k_pe, pos)]  and the same rows written to
//      cache[seq[t], pos[t], :].  lat may be NULL (a temporary is used).
int dsv2_mla_compress_kv(dsv2_mla_cache *cache, float *lat, const float *h, int64_t T, int64_t d,
                         const int64_t *seq, const int64_t *pos, const dsv2_mat *kv_a_proj,
                         const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope, float eps,
                         const float *inv_freq, float attention_factor, int interleaved);
// lat [T, kv_lora + rope] = h kv_a_proj^T (computed by the caller) -> lat = [RMSNorm(c_kv) | rope(k_pe, pos)]
//   in place, and the same rows written to cache[seq[t], pos[t], :] (the second half of dsv2_mla_compress_kv)
int dsv2_mla_store_kv(dsv2_mla_cache *cache, float *lat, int64_t T, const int64_t *seq, const int64_t *pos,
                      const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope, float eps, const float *inv_freq,
                      float attention_factor, int interleaved);

/* ---- attention, absorbed form (mla_absorbed.c) ---- */
// q [T, H, nope + rope] , cache [B, S, kv_lora + rope] , seq [T] , pos [T] , kv_b [H*(nope+v), kv_lora]
//   -> o [T, H, v].  Scores q_lat . c + q_pe . k_pe with q_lat_h = W_UK_h^T q_nope_h, softmax(scale * .)
//   in fp32, o_h = W_UV_h (sum_j p_j c_j).  kv_b fp32, bf16 or int8 (block scales).
int dsv2_mla_attn_absorbed(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                           const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                           float scale);

/* ---- attention, non-absorbed form (mla_decompressed.c) ---- */
// Same arguments and result as dsv2_mla_attn_absorbed; K_nope / V are decompressed from the cached
// rows with kv_b (sgemm) and ordinary causal attention with head dims nope + rope / v is done.
int dsv2_mla_attn_decompressed(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                               const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                               float scale);

/* ---- choice of form (mla_plan.c) ---- */
// FLOP estimate of one sequence's attention: n_new query tokens, keys 0..n_ctx-1 (n_ctx = max pos + 1),
// sum_len = sum over the query tokens of (pos + 1).  absorbed = 1: absorbed form, 0: non-absorbed.
double dsv2_mla_flops(int absorbed, int64_t n_new, int64_t n_ctx, int64_t sum_len, const dsv2_mla_dims *dm);

// Attention with the form picked per sequence (mode = DSV2_MLA_AUTO) or forced; same arguments as above.
int dsv2_mla_attention(float *o, const float *q, const dsv2_mla_cache *cache, const int64_t *seq,
                       const int64_t *pos, int64_t T, const dsv2_mat *kv_b, const dsv2_mla_dims *dm,
                       float scale, int mode);

/* ---- the whole attention block (mla_block.c) ---- */
typedef struct {
    dsv2_mla_dims dims;
    int64_t q_lora;            /* 0: plain q_proj */
    float eps;                 /* rms_norm_eps of q_a_layernorm / kv_a_layernorm */
    float scale;               /* softmax scale, e.g. (nope + rope)^-0.5 * mscale^2 */
    const float *inv_freq;     /* [rope / 2] */
    float attention_factor;    /* RoPE cos/sin factor */
    int interleaved;           /* rope pair layout (1: DeepSeek interleaved pairs) */
} dsv2_mla_cfg;

typedef struct {
    dsv2_mat q_proj;           /* [H*(nope+rope), d]       (q_lora == 0) */
    dsv2_mat q_a_proj;         /* [q_lora, d]              (q_lora > 0) */
    dsv2_mat q_a_norm;         /* [1, q_lora]              (q_lora > 0) */
    dsv2_mat q_b_proj;         /* [H*(nope+rope), q_lora]  (q_lora > 0) */
    dsv2_mat kv_a_proj;        /* [kv_lora + rope, d] */
    dsv2_mat kv_a_norm;        /* [1, kv_lora] */
    dsv2_mat kv_b_proj;        /* [H*(nope+v), kv_lora] */
    dsv2_mat o_proj;           /* [d, H*v] */
} dsv2_mla_weights;

// h [T, d] (normalized hidden states) -> out [T, d] = o_proj(attention); appends the T latent rows
// to the cache at (seq[t], pos[t]) first.  mode: DSV2_MLA_AUTO | ABSORBED | DECOMPRESSED.
int dsv2_mla_block(float *out, const float *h, int64_t T, int64_t d, dsv2_mla_cache *cache,
                   const int64_t *seq, const int64_t *pos, const dsv2_mla_weights *w,
                   const dsv2_mla_cfg *cfg, int mode);

#endif
