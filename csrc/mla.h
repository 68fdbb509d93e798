/* mla.h - DeepSeek multi-head latent attention (MLA) kernels on a latent cache.
 *
 * Per token the cache holds one row of W = kv_lora + rope floats:
 *   [ c = kv_a_layernorm(c_kv) (kv_lora) | k_pe rotated at the token's position (rope) ]
 * The cache is [B, S, W] fp32 (B sequences, S positions each).  A call handles a
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

/* the latent cache [B, S, kv_lora + rope] */
typedef struct {
    float *data;
    int64_t B, S;
} dsv2_mla_cache;

enum { DSV2_MLA_AUTO = 0, DSV2_MLA_ABSORBED = 1, DSV2_MLA_DECOMPRESSED = 2 };

/* ---- latent KV compression (mla_compress.c) ---- */
// h [T, d] , kv_a_proj [kv_lora + rope, d] , kv_a_norm [kv_lora] , pos [T]
//   -> lat [T, kv_lora + rope] = [RMSNorm(c_kv) | rope(k_pe, pos)]  and the same rows written to
//      cache[seq[t], pos[t], :].  lat may be NULL (a temporary is used).
int dsv2_mla_compress_kv(dsv2_mla_cache *cache, float *lat, const float *h, int64_t T, int64_t d,
                         const int64_t *seq, const int64_t *pos, const dsv2_mat *kv_a_proj,
                         const dsv2_mat *kv_a_norm, int64_t kv_lora, int64_t rope, float eps,
                         const float *inv_freq, float attention_factor, int interleaved);

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
