/* rope.h - rotary position embedding (plain and YaRN) for the rope channels
 * of DeepSeek's MLA: the inverse-frequency table and the in-place rotation.
 *
 * The table reproduces transformers' `compute_default_rope_parameters` and
 * `_compute_yarn_parameters` (modeling_rope_utils) in fp32, and the rotation
 * reproduces `apply_rotary_emb` of DeepseekV2 (complex multiplication of the
 * interleaved pairs (x[2i], x[2i+1]) by attention_factor * exp(j pos inv_freq[i])),
 * with the angle computed as fp32(float(pos) * inv_freq[i]) exactly as torch does. */
#ifndef DSV2_ROPE_H
#define DSV2_ROPE_H

#include "dsv2.h"

typedef struct {
    int yarn;                   /* 0: plain RoPE, 1: YaRN */
    double theta;               /* rope_theta (base) */
    /* YaRN only (all already resolved: no "missing" values here) */
    double factor;              /* scaling factor (> 0) */
    double original_max_pos;    /* original_max_position_embeddings (> 0) */
    double beta_fast, beta_slow;
    double mscale, mscale_all_dim;  /* 0 means "not given" */
    double attention_factor;    /* used when has_attention_factor */
    int has_attention_factor;
    int truncate;               /* floor/ceil the correction range (transformers' default: 1) */
} dsv2_rope_cfg;

// cfg -> inv_freq [dim / 2], *attention_factor (the cos/sin multiplier; 1 for plain RoPE)
// dim must be even and > 0.
int dsv2_rope_inv_freq(float *inv_freq, float *attention_factor, int64_t dim, const dsv2_rope_cfg *cfg);

// x [T, heads, dim] (strided: token t, head h starts at x + t * ldt + h * ldh; channels
// contiguous), pos [T] -> x rotated in place at pos[t].
// interleaved = 1: pairs (2i, 2i+1) (DeepSeek layout, transformers' DeepseekV2 and
// DeepseekV3 with rope_interleave); interleaved = 0: pairs (i, i + dim/2) (rotate_half).
int dsv2_rope_apply(float *x, int64_t ldt, int64_t ldh, int64_t T, int64_t heads, int64_t dim,
                    const int64_t *pos, const float *inv_freq, float attention_factor, int interleaved);

#endif
