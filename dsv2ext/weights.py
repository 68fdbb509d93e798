"""Checkpoint tensors -> the weights of each layer, with every check.

Tensor names follow Hugging Face (``model.layers.N.self_attn.q_proj.weight``
...).  Each tensor is checked for presence and shape; tensors that the model
does not use are reported, except the ones inference never needs (V3's MTP
layers, rotary buffers).  Weights keep the checkpoint's dtype and stay
memory-mapped: F32 and BF16 tensors are zero-copy views of the file; F16 is
widened to F32 (no fp16 kernels); FP8 e4m3 weights with their
``<name>_scale_inv`` block scales (DeepSeek-V3) become
:class:`dsv2ext.fp8.Fp8Weight` views of the file (``dtype="bf16"`` / ``"f32"``
dequantize them instead: a converted copy).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .config import ModelConfig
from .dtypes import BF16, float32_to_bf16_bits
from .fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, Fp8Weight, load_fp8_tensor
from .int4 import int4_row_bytes
from .quant import is_scales_tensor, load_quantized_tensor
from .safetensors import FP8E4M3, CheckpointError, CheckpointReader

__all__ = ["AttentionWeights", "MLPWeights", "MoEWeights", "LayerWeights", "ModelWeights",
           "load_weights", "expected_tensors", "Weight"]

Weight = Union[np.ndarray, BF16, Any]


@dataclass
class AttentionWeights:
    """MLA weights of one layer (Linear weights are [out, in])."""

    kv_a_proj_with_mqa: Weight            # [kv_lora + rope, d]
    kv_a_layernorm: Weight                # [kv_lora]
    kv_b_proj: Weight                     # [H * (nope + v), kv_lora]
    o_proj: Weight                        # [d, H * v]
    q_proj: Optional[Weight] = None       # [H * (nope + rope), d]       (no q_lora)
    q_a_proj: Optional[Weight] = None     # [q_lora, d]                 (q_lora)
    q_a_layernorm: Optional[Weight] = None  # [q_lora]
    q_b_proj: Optional[Weight] = None     # [H * (nope + rope), q_lora]


@dataclass
class MLPWeights:
    """A SwiGLU MLP: down(silu(gate x) * up x)."""

    gate_proj: Weight  # [I, d]
    up_proj: Weight    # [I, d]
    down_proj: Weight  # [d, I]


@dataclass
class MoEWeights:
    """DeepSeekMoE weights of one layer."""

    gate: Weight                         # router [E, d]
    experts: List[MLPWeights]            # E routed experts
    shared: Optional[MLPWeights] = None  # n_shared * moe_intermediate wide
    correction_bias: Optional[np.ndarray] = None  # [E] fp32 (V3 noaux_tc)


@dataclass
class LayerWeights:
    input_layernorm: Weight
    post_attention_layernorm: Weight
    attn: AttentionWeights
    mlp: Optional[MLPWeights] = None
    moe: Optional[MoEWeights] = None


@dataclass
class ModelWeights:
    embed_tokens: Weight  # [V, d]
    norm: Weight          # [d]
    lm_head: Weight       # [V, d]
    layers: List[LayerWeights] = field(default_factory=list)


def expected_tensors(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name the causal LM needs, with its shape."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    r = cfg.kv_lora_rank
    out: Dict[str, Tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if cfg.q_lora_rank:
            out[a + "q_a_proj.weight"] = (cfg.q_lora_rank, d)
            out[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            out[a + "q_b_proj.weight"] = (H * (nope + rope), cfg.q_lora_rank)
        else:
            out[a + "q_proj.weight"] = (H * (nope + rope), d)
        out[a + "kv_a_proj_with_mqa.weight"] = (r + rope, d)
        out[a + "kv_a_layernorm.weight"] = (r,)
        out[a + "kv_b_proj.weight"] = (H * (nope + v), r)
        out[a + "o_proj.weight"] = (d, H * v)
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            out[m + "gate.weight"] = (E, d)
            if cfg.topk_method == "noaux_tc":
                out[m + "gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                out[m + f"experts.{e}.gate_proj.weight"] = (I, d)
                out[m + f"experts.{e}.up_proj.weight"] = (I, d)
                out[m + f"experts.{e}.down_proj.weight"] = (d, I)
            if cfg.n_shared_experts:
                Is = cfg.n_shared_experts * I
                out[m + "shared_experts.gate_proj.weight"] = (Is, d)
                out[m + "shared_experts.up_proj.weight"] = (Is, d)
                out[m + "shared_experts.down_proj.weight"] = (d, Is)
        else:
            F = cfg.intermediate_size
            out[m + "gate_proj.weight"] = (F, d)
            out[m + "up_proj.weight"] = (F, d)
            out[m + "down_proj.weight"] = (d, F)
    return out


_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq$)")


def _ignorable(name: str, cfg: ModelConfig, reader: Optional[CheckpointReader] = None) -> bool:
    if _IGNORED.search(name):
        return True
    if name.endswith(SCALE_SUFFIX) and reader is not None:  # FP8 block scales, read with their weight
        base = name[: -len(SCALE_SUFFIX)]
        if base in reader and reader.info(base)[0] == "F8_E4M3":
            return True
    if reader is not None and is_scales_tensor(name, reader):  # int8 block scales (dsv2ext.quant)
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    # V3's multi-token-prediction layers sit after the last decoder layer
    return bool(m and int(m.group(1)) >= cfg.num_hidden_layers and cfg.num_nextn_predict_layers > 0)


def _convert(t: Any, name: str, reader: CheckpointReader, dtype: Optional[str],
             fp8_block: Tuple[int, int] = DEFAULT_BLOCK) -> Weight:
    """Bring one tensor to a dtype the kernels take, copying only when needed."""
    if isinstance(t, FP8E4M3):
        w = load_fp8_tensor(reader, name, fp8_block)
        if dtype == "f32":
            return w.to_float32()
        if dtype == "bf16":  # an explicit, rounding conversion
            return BF16(float32_to_bf16_bits(w.to_float32()))
        return w
    if isinstance(t, BF16):
        if dtype == "f32":
            return t.to_float32()
        return t
    if isinstance(t, np.ndarray):
        if t.dtype == np.float16 or t.dtype == np.float64:
            t = t.astype(np.float32)
        if t.dtype != np.float32:
            raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)!r} has dtype {t.dtype}; "
                                  "expected a floating-point weight (F32, BF16, F16 or F8_E4M3)")
        if dtype == "bf16":
            return BF16(float32_to_bf16_bits(t))
        return t
    raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)!r}: unsupported dtype "
                          f"{reader.info(name)[0]}")


def _norm_f32(w: Weight) -> np.ndarray:
    """Norm weights and biases are tiny: keep them in fp32."""
    return w.to_float32() if isinstance(w, BF16) else np.ascontiguousarray(w, dtype=np.float32)


def _router(w: Weight) -> Weight:
    """The MoE router runs in fp32 on f32 / bf16 weights: an FP8 one (not in DeepSeek's files) is dequantized."""
    return w.to_float32() if isinstance(w, Fp8Weight) else w


def _check_counts(cfg: ModelConfig, have: set, reader: CheckpointReader) -> None:
    """Fail fast when config.json claims far more layers or experts than the files hold.

    ``expected_tensors`` lists ~10 names per layer and 3 per expert: a config claiming 10**9
    layers (or experts) would take minutes and gigabytes before reporting the first missing
    tensor.  The last layer's and the last expert's names are probed first instead.
    """
    L = cfg.num_hidden_layers
    probes = [f"model.layers.{L - 1}.input_layernorm.weight"]
    if cfg.n_routed_experts:
        f, k = cfg.moe_layer_freq, cfg.first_k_dense_replace
        first_moe = -(-k // f) * f  # the first multiple of moe_layer_freq >= first_k_dense_replace
        if first_moe < L:
            probes.append(f"model.layers.{first_moe}.mlp.experts.{cfg.n_routed_experts - 1}.gate_proj.weight")
    missing = [p for p in probes if p not in have]
    if missing:
        raise CheckpointError(f"checkpoint {reader.directory!r} lacks tensors the config requires: "
                              f"{', '.join(missing)} (num_hidden_layers={L}, n_routed_experts="
                              f"{cfg.n_routed_experts}; does config.json match the weights?)")


def load_weights(reader: CheckpointReader, cfg: ModelConfig, dtype: Optional[str] = None,
                 progress: Optional[bool] = None, quant: Optional[Dict[str, Any]] = None,
                 fp8_block: Tuple[int, int] = DEFAULT_BLOCK) -> ModelWeights:
    """Read and check every tensor of the causal LM.

    Parameters
    ----------
    reader : CheckpointReader
    cfg : ModelConfig
    dtype : {None, "bf16", "f32"}
        None keeps each tensor's dtype (F16 -> F32, F8_E4M3 with
        ``<name>_scale_inv`` -> :class:`dsv2ext.fp8.Fp8Weight`, I8 with
        ``<name>.scales`` -> :class:`dsv2ext.quant.Int8Weight`, U8 of a
        ``dsv2ext-int4`` checkpoint -> :class:`dsv2ext.int4.Int4Weight`).
    progress : bool, optional
        Show a tqdm bar (default: when stderr is a terminal).
    quant : dict, optional
        The checkpoint's dsv2ext ``quantization_config``
        (:func:`dsv2ext.quant.read_quantization_config`); U8 tensors are read
        as packed int4 weights only when its method is ``dsv2ext-int4``.
    fp8_block : (int, int)
        Scale block of FP8 weights (config.json's
        ``quantization_config.weight_block_size``, see :func:`dsv2ext.fp8.read_fp8_block`).

    Raises
    ------
    CheckpointError
        A tensor is missing, unexpected, or has the wrong shape (the message
        names the tensor and its file).
    """
    have = set(reader.names())
    _check_counts(cfg, have, reader)
    want = expected_tensors(cfg)
    missing = [n for n in want if n not in have]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {reader.directory!r} lacks tensors the config requires: "
                              f"{', '.join(missing[:5])}{more}")
    extra = sorted(n for n in have if n not in want and not _ignorable(n, cfg, reader))
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(
            f"checkpoint {reader.directory!r} has tensors this config does not use: "
            f"{', '.join(repr(n) + ' in ' + repr(reader.file_of(n)) for n in extra[:5])}{more}; "
            "does config.json match the weights?")
    int4 = bool(quant) and quant.get("quant_method") == "dsv2ext-int4"
    for n, shape in want.items():
        tag, got = reader.info(n)
        got = tuple(got)
        if tag == "U8" and len(shape) == 2:
            if not int4:
                raise CheckpointError(f"tensor {n!r} in {reader.file_of(n)!r} is U8 {list(got)}: packed 4-bit "
                                      "weights are read only from a checkpoint whose config.json has "
                                      "quantization_config.quant_method 'dsv2ext-int4'")
            shape = shape[:-1] + (int4_row_bytes(shape[-1]),)  # packed rows (dsv2ext.int4)
        if got != shape:
            raise CheckpointError(f"tensor {n!r} in {reader.file_of(n)!r} has shape {list(got)}, "
                                  f"expected {list(shape)} from config.json")

    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(want), desc="Loading weights", unit="tensor", file=sys.stderr)

    def get(n: str) -> Weight:
        w = load_quantized_tensor(reader, n, dtype, shape=want[n])  # int8 + <n>.scales, int4, else None
        if w is None:
            w = _convert(reader.get(n, aligned=True), n, reader, dtype, fp8_block)
        if bar is not None:
            bar.update(1)
        return w

    try:
        embed = get("model.embed_tokens.weight")
        weights = ModelWeights(
            embed_tokens=embed,
            norm=_norm_f32(get("model.norm.weight")),
            lm_head=embed if cfg.tie_word_embeddings else get("lm_head.weight"),
        )
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            if cfg.q_lora_rank:
                qw = dict(q_a_proj=get(a + "q_a_proj.weight"),
                          q_a_layernorm=_norm_f32(get(a + "q_a_layernorm.weight")),
                          q_b_proj=get(a + "q_b_proj.weight"))
            else:
                qw = dict(q_proj=get(a + "q_proj.weight"))
            attn = AttentionWeights(
                kv_a_proj_with_mqa=get(a + "kv_a_proj_with_mqa.weight"),
                kv_a_layernorm=_norm_f32(get(a + "kv_a_layernorm.weight")),
                kv_b_proj=get(a + "kv_b_proj.weight"),
                o_proj=get(a + "o_proj.weight"), **qw)
            layer = LayerWeights(input_layernorm=_norm_f32(get(p + "input_layernorm.weight")),
                                 post_attention_layernorm=_norm_f32(get(p + "post_attention_layernorm.weight")),
                                 attn=attn)
            m = p + "mlp."
            if cfg.is_moe_layer(i):
                experts = [MLPWeights(get(m + f"experts.{e}.gate_proj.weight"),
                                      get(m + f"experts.{e}.up_proj.weight"),
                                      get(m + f"experts.{e}.down_proj.weight"))
                           for e in range(cfg.n_routed_experts)]
                shared = None
                if cfg.n_shared_experts:
                    shared = MLPWeights(get(m + "shared_experts.gate_proj.weight"),
                                        get(m + "shared_experts.up_proj.weight"),
                                        get(m + "shared_experts.down_proj.weight"))
                bias = None
                if cfg.topk_method == "noaux_tc":
                    bias = _norm_f32(get(m + "gate.e_score_correction_bias"))
                layer.moe = MoEWeights(gate=_router(get(m + "gate.weight")), experts=experts, shared=shared,
                                       correction_bias=bias)
            else:
                layer.mlp = MLPWeights(get(m + "gate_proj.weight"), get(m + "up_proj.weight"),
                                       get(m + "down_proj.weight"))
            weights.layers.append(layer)
    finally:
        if bar is not None:
            bar.close()
    return weights
