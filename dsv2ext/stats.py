"""Parameter, FLOP and KV-cache arithmetic for MoE decoders ("economics" of a config).

``stats(x)`` takes a DeepSeek-V2-family configuration (a :class:`ModelConfig`,
a ``config.json`` path, a checkpoint directory, a parsed config dict) or a
built-in name, and returns a dict with the parameter counts (total, active
per token, per component), FLOPs per token, and the KV cache per token of the
model and of its MHA / GQA / MQA / MLA equivalents following Table 1 of the
DeepSeek-V2 paper (elements per token, ``l`` layers, ``n_h`` heads of
dimension ``d_h``, ``n_g`` KV groups, MLA latent ``d_c`` and decoupled rope
key ``d_h^R``)::

    MHA  2 * n_h * d_h * l        GQA  2 * n_g * d_h * l
    MQA  2 * d_h * l              MLA  (d_c + d_h^R) * l

Non-DeepSeek models and hypothetical configurations are described with the
small :class:`ArchSpec` dataclass (Mixtral 8x7B, DeepSeek LLM 67B,
DeepSeekMoE 145B, and the two rows of a widely shared article's table), so that
published claims can be compared with what the arithmetic gives: every
built-in spec carries its claims, and ``stats`` reports computed / claimed.

Conventions (stated once, used everywhere):

* ``active_params``: parameters one token multiplies through: attention, the
  dense MLP or (router + top-k routed experts + shared experts), the norms,
  and the lm_head.  The embedding table is a row lookup and is not counted;
  ``active_params_with_embedding`` adds it (Mistral's convention for "12.9B
  active"), ``active_params_no_lm_head`` drops the lm_head (prefill only needs
  logits for the last token).
* ``flops_per_token = 2 * active_params + attention FLOPs`` for one token
  attending to ``context`` earlier tokens; attention FLOPs are the
  score and value products ``2 * n_h * (d_qk + d_v) * context`` per layer, on
  decompressed keys/values.  ``attention_flops_per_token_absorbed`` gives
  MLA's absorbed form, ``2 * n_h * ((d_c + d_h^R) + d_c) * context`` per layer
  (the absorption matmuls cost exactly what ``kv_b_proj`` does for one token).
* ``d_h`` in the paper's formulas is the per-head content dimension:
  ``qk_nope_head_dim`` (128) for DeepSeek-V2, ``head_dim`` for GQA models.

Only the standard library is used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, ModelConfig, NAMED_CONFIGS

__all__ = ["ArchSpec", "Claim", "stats", "format_stats", "main_stats", "named_specs",
           "spec_for", "DTYPE_BYTES"]

#: bytes per stored element for the ``dtype=`` / ``kv_dtype=`` names; q8_0 and
#: q4_0 are llama.cpp's 32-element blocks with one fp16 scale (34 and 18 bytes).
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0, "f32": 4.0, "float32": 4.0,
    "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "f16": 2.0, "float16": 2.0,
    "fp8": 1.0, "f8": 1.0, "float8_e4m3fn": 1.0, "int8": 1.0, "i8": 1.0,
    "q8_0": 34.0 / 32.0, "q4_0": 18.0 / 32.0, "int4": 0.5,
}


@dataclass(frozen=True)
class Claim:
    """A published number to compare with the arithmetic.

    Attributes
    ----------
    key : str
        The ``stats()`` key it is compared with (e.g. ``"total_params"``).
    value : float
        The claimed value.
    source : str
        Where the claim comes from.
    """

    key: str
    value: float
    source: str


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Shape of a decoder-only (MoE) transformer, enough to count parameters and caches.

    Attributes
    ----------
    name : str
        Label used in reports.
    vocab_size, hidden_size, num_layers, num_heads : int
        ``V``, ``d``, ``l``, ``n_h``.
    attention : str
        ``"mla"`` (DeepSeek multi-head latent attention) or ``"gqa"`` (MHA /
        GQA / MQA with ``num_kv_heads`` key-value heads, q/k/v/o projections).
    head_dim : int
        The paper's ``d_h``: per-head dimension (GQA) or per-head content
        dimension ``qk_nope_head_dim`` (MLA).
    num_kv_heads : int
        GQA only: key-value heads (``num_heads`` for MHA, 1 for MQA).
    q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        MLA only (``q_lora_rank`` None: plain ``q_proj``).
    num_dense_layers, dense_intermediate_size : int
        Layers with a dense SwiGLU MLP and its width.
    num_moe_layers, n_routed_experts, n_shared_experts, experts_per_tok, moe_intermediate_size
        DeepSeekMoE / Mixtral-style layers: router ``[E, d]``, ``E`` SwiGLU
        experts of width ``moe_intermediate_size``, shared experts forming one
        SwiGLU of width ``n_shared_experts * moe_intermediate_size``.
    router_bias : bool
        A per-expert router bias vector (V3's ``e_score_correction_bias``).
    tie_word_embeddings : bool
        lm_head shares the embedding matrix.
    notes : str
        Where the dimensions come from / what was assumed.
    claims : tuple[Claim, ...]
        Published numbers to compare with.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    attention: str
    head_dim: int
    num_kv_heads: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    num_dense_layers: int = 0
    dense_intermediate_size: int = 0
    num_moe_layers: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    router_bias: bool = False
    tie_word_embeddings: bool = False
    notes: str = ""
    claims: tuple[Claim, ...] = ()

    def __post_init__(self) -> None:
        def need(name: str, minimum: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"ArchSpec {self.name!r}: {name} = {v!r}, expected an integer "
                                 f">= {minimum}")

        for n in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            need(n, 1)
        for n in ("num_dense_layers", "num_moe_layers", "n_routed_experts", "n_shared_experts",
                  "experts_per_tok", "dense_intermediate_size", "moe_intermediate_size"):
            need(n, 0)
        if self.attention not in ("mla", "gqa"):
            raise ValueError(f"ArchSpec {self.name!r}: attention = {self.attention!r}, "
                             "expected 'mla' or 'gqa'")
        if self.attention == "gqa":
            need("num_kv_heads", 1)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"ArchSpec {self.name!r}: num_heads ({self.num_heads}) is not "
                                 f"a multiple of num_kv_heads ({self.num_kv_heads})")
        else:
            for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(n, 1)
            if self.q_lora_rank is not None:
                need("q_lora_rank", 1)
        if self.num_dense_layers + self.num_moe_layers != self.num_layers:
            raise ValueError(
                f"ArchSpec {self.name!r}: num_dense_layers ({self.num_dense_layers}) + "
                f"num_moe_layers ({self.num_moe_layers}) != num_layers ({self.num_layers})")
        if self.num_dense_layers:
            need("dense_intermediate_size", 1)
        if self.num_moe_layers:
            for n in ("n_routed_experts", "experts_per_tok", "moe_intermediate_size"):
                need(n, 1)
            if self.experts_per_tok > self.n_routed_experts:
                raise ValueError(f"ArchSpec {self.name!r}: experts_per_tok "
                                 f"({self.experts_per_tok}) > n_routed_experts "
                                 f"({self.n_routed_experts})")

    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str | None = None, *,
                    notes: str = "", claims: Sequence[Claim] = ()) -> "ArchSpec":
        """Describe a DeepSeek-V2-family :class:`ModelConfig` (MTP layers excluded)."""
        return cls(
            name=name or cfg.family,
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
            attention="mla", head_dim=cfg.qk_nope_head_dim,
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            num_dense_layers=cfg.num_dense_layers,
            dense_intermediate_size=cfg.intermediate_size,
            num_moe_layers=cfg.num_moe_layers,
            n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
            experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            router_bias=cfg.model_type == "deepseek_v3",
            tie_word_embeddings=cfg.tie_word_embeddings,
            notes=notes or cfg.describe().splitlines()[0],
            claims=tuple(claims),
        )

    # ------------------------------------------------------------------
    # per-layer pieces
    # ------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query/key."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        """Width of one head's value."""
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    def attention_params_per_layer(self) -> int:
        """Attention weights of one layer (MLA: including its q_a / kv_a RMSNorm weights)."""
        d, H = self.hidden_size, self.num_heads
        if self.attention == "gqa":
            hd = self.head_dim
            return d * H * hd + 2 * d * self.num_kv_heads * hd + H * hd * d
        qk = self.qk_head_dim
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk
        else:
            q = d * H * qk
        kv_a = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        o = H * self.v_head_dim * d
        return q + kv_a + kv_b + o

    def kv_elements_per_layer(self) -> int:
        """Numbers this model caches per token per layer."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim


# ---------------------------------------------------------------------------
# built-in specs
# ---------------------------------------------------------------------------

_PAPER_V2 = "DeepSeek-V2 paper (arXiv 2405.04434)"
_OFFICIAL_CLAIMS: dict[str, tuple[Claim, ...]] = {
    "deepseek-v2": (Claim("total_params", 236e9, _PAPER_V2),
                    Claim("active_params", 21e9, _PAPER_V2)),
    "deepseek-v2-lite": (Claim("total_params", 15.7e9, _PAPER_V2),
                         Claim("active_params", 2.4e9, _PAPER_V2)),
    "deepseek-v2.5": (Claim("total_params", 236e9, "DeepSeek-V2.5 model card (V2 architecture)"),
                      Claim("active_params", 21e9, "DeepSeek-V2.5 model card (V2 architecture)")),
    "deepseek-v3": (Claim("total_params", 671e9, "DeepSeek-V3 report (arXiv 2412.19437)"),
                    Claim("active_params", 37e9, "DeepSeek-V3 report (arXiv 2412.19437)")),
}


def _extra_specs() -> dict[str, ArchSpec]:
    v2 = ModelConfig.named("deepseek-v2")
    return {
        "mixtral-8x7b": ArchSpec(
            name="Mixtral 8x7B", vocab_size=32000, hidden_size=4096, num_layers=32,
            num_heads=32, attention="gqa", head_dim=128, num_kv_heads=8,
            num_moe_layers=32, n_routed_experts=8, experts_per_tok=2,
            moe_intermediate_size=14336,
            notes="Mistral AI's Mixtral 8x7B: 32 layers, d 4096, 32 heads / 8 KV heads of 128, "
                  "8 SwiGLU experts of 14336, top-2, vocab 32000, untied lm_head",
            claims=(Claim("total_params", 46.7e9, "Mistral AI announcement"),
                    Claim("active_params_with_embedding", 12.9e9,
                          "Mistral AI announcement (counts the embedding table)"))),
        "deepseek-67b": ArchSpec(
            name="DeepSeek LLM 67B", vocab_size=102400, hidden_size=8192, num_layers=95,
            num_heads=64, attention="gqa", head_dim=128, num_kv_heads=8,
            num_dense_layers=95, dense_intermediate_size=22016,
            notes="DeepSeek LLM 67B (arXiv 2401.02954): 95 layers, d 8192, 64 heads / 8 KV heads "
                  "of 128, SwiGLU 22016, vocab 102400; the dense baseline of DeepSeek-V2's "
                  "'KV cache -93.3%' claim",
            claims=(Claim("total_params", 67e9, "DeepSeek LLM paper"),)),
        "deepseekmoe-145b": ArchSpec(
            name="DeepSeekMoE 145B (paper)", vocab_size=102400, hidden_size=4096, num_layers=62,
            num_heads=32, attention="gqa", head_dim=128, num_kv_heads=32,
            num_dense_layers=1, dense_intermediate_size=16 * 1408,
            num_moe_layers=61, n_routed_experts=128, n_shared_experts=4, experts_per_tok=12,
            moe_intermediate_size=1408,
            notes="DeepSeekMoE paper (arXiv 2401.06066) sec. 7: 62 layers, d 4096, 32 MHA heads "
                  "of 128, first layer dense, then 4 shared + 128 routed experts of 0.125x a "
                  "standard FFN (1408 = 11264/8), 12 routed per token, vocab 102400; assumed: "
                  "dense-layer width 22528 (= the 16 activated experts)",
            claims=(Claim("total_params", 144.6e9, "DeepSeekMoE paper"),
                    Claim("active_params_with_embedding", 22.2e9,
                          "DeepSeekMoE paper (matches counting the embedding table)"))),
        "article-deepseekmoe-145b": ArchSpec(
            name="article: 'DeepSeekMoE 145B'", vocab_size=102400, hidden_size=4096,
            num_layers=48, num_heads=32, attention="gqa", head_dim=128, num_kv_heads=32,
            num_moe_layers=48, n_routed_experts=64, experts_per_tok=2,
            moe_intermediate_size=1408,
            notes="the article's row taken literally: 48 layers, all MoE, 64 experts, top-2, no "
                  "shared experts; other dims from the DeepSeekMoE 145B paper: d 4096, 32 MHA "
                  "heads of 128, experts of width 1408, vocab 102400",
            claims=(Claim("total_params", 145e9, "the article's model name"),)),
        "article-deepseek-v2-236b": ArchSpec(
            name="article: 'DeepSeek-V2 236B'", vocab_size=v2.vocab_size,
            hidden_size=v2.hidden_size, num_layers=64, num_heads=v2.num_attention_heads,
            attention="mla", head_dim=v2.qk_nope_head_dim, q_lora_rank=v2.q_lora_rank,
            kv_lora_rank=v2.kv_lora_rank, qk_nope_head_dim=v2.qk_nope_head_dim,
            qk_rope_head_dim=v2.qk_rope_head_dim, v_head_dim=v2.v_head_dim,
            num_moe_layers=64, n_routed_experts=128, experts_per_tok=2,
            moe_intermediate_size=v2.moe_intermediate_size,
            notes="the article's row taken literally: 64 MoE layers, 128 experts, top-2, MLA, no "
                  "shared experts, no dense layer; other dims from the official DeepSeek-V2 "
                  "config: d 5120, 128 heads, q/kv lora 1536/512, head dims 128/64/128, experts "
                  "of width 1536, vocab 102400",
            claims=(Claim("total_params", 236e9, "the article's model name"),
                    Claim("active_params", 39e9, "the article"))),
    }


def named_specs() -> list[str]:
    """Names accepted by :func:`stats` / :func:`spec_for` besides paths."""
    return sorted(set(NAMED_CONFIGS) | set(_extra_specs()))


def _looks_like_path(s: str) -> bool:
    return os.path.exists(s) or os.sep in s or s.endswith(".json")


def spec_for(x: Any) -> tuple[ArchSpec, str]:
    """Resolve anything :func:`stats` accepts to an :class:`ArchSpec` and a source label.

    Parameters
    ----------
    x : ArchSpec | ModelConfig | Mapping | str | os.PathLike
        A spec, a config, a parsed config.json dict, a built-in name (see
        :func:`named_specs`), a ``config.json`` path or a checkpoint directory.

    Raises
    ------
    ConfigError
        For an unknown name or an invalid configuration.
    FileNotFoundError
        For a path that does not exist.
    """
    if isinstance(x, ArchSpec):
        return x, "spec"
    if isinstance(x, ModelConfig):
        return ArchSpec.from_config(x), "config"
    if isinstance(x, Mapping):
        return ArchSpec.from_config(ModelConfig.from_dict(x)), "dict"
    if isinstance(x, (str, os.PathLike)):
        s = os.fspath(x)
        key = s.strip().lower()
        if key.startswith("deepseek-ai/"):
            key = key[len("deepseek-ai/"):]
        if key in NAMED_CONFIGS and not os.path.exists(s):
            cfg = ModelConfig.named(key)
            return (ArchSpec.from_config(cfg, name=key, claims=_OFFICIAL_CLAIMS.get(key, ())),
                    f"built-in official config {key!r}")
        extra = _extra_specs()
        if key in extra and not os.path.exists(s):
            return extra[key], f"built-in spec {key!r}"
        if _looks_like_path(s):
            cfg = ModelConfig.from_pretrained(s)
            return ArchSpec.from_config(cfg, name=os.path.basename(os.path.normpath(s))), s
        raise ConfigError(f"{s!r} is neither a built-in name nor an existing path; built-in names: "
                          + ", ".join(named_specs()), field="name", value=s)
    raise TypeError("stats: expected a ModelConfig, ArchSpec, config dict, built-in name or path, "
                    f"got {type(x).__name__}")


def _bytes_per_element(arg: str, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{arg}: expected a dtype name or bytes per element, got a bool")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{arg} = {value!r}: bytes per element must be > 0")
        return float(value)
    if isinstance(value, str) and value.lower() in DTYPE_BYTES:
        return DTYPE_BYTES[value.lower()]
    raise ValueError(f"{arg} = {value!r}: expected one of {', '.join(DTYPE_BYTES)} "
                     "or a number of bytes per element")


# ---------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------

def stats(config_or_dir_or_name: Any, *, context: int = 4096, dtype: str | float = "bf16",
          kv_dtype: str | float | None = None, gqa_groups: int | None = None) -> dict[str, Any]:
    """Parameter counts, FLOPs and KV-cache sizes of a model configuration.

    Parameters
    ----------
    config_or_dir_or_name : ModelConfig | ArchSpec | Mapping | str | os.PathLike
        What to describe (see :func:`spec_for`).
    context : int, default 4096
        Number of earlier tokens a token attends to, for the attention FLOPs
        and for ``bytes_at_context`` of the KV cache.
    dtype : str or float, default "bf16"
        Weight storage type (a name from :data:`DTYPE_BYTES`) or bytes per element.
    kv_dtype : str or float, optional
        KV cache storage type; defaults to ``dtype``.
    gqa_groups : int, optional
        ``n_g`` of the GQA comparison row, in ``[1, num_heads]``; default 8
        (or ``num_heads`` when a model has fewer than 8 heads).

    Returns
    -------
    dict
        JSON-serialisable.  Parameter keys (ints): ``total_params``,
        ``embedding_params``, ``lm_head_params``, ``attention_params``,
        ``dense_mlp_params``, ``moe_params`` (= routed + shared + router),
        ``moe_routed_expert_params``, ``moe_shared_expert_params``,
        ``router_params``, ``norm_params``, ``active_params``,
        ``active_params_no_lm_head``, ``active_params_with_embedding``,
        ``active_attention_params``, ``active_dense_mlp_params``,
        ``active_moe_params``.  FLOPs: ``flops_per_token``,
        ``flops_per_token_no_lm_head``, ``attention_flops_per_token`` (and
        ``..._absorbed`` variants for MLA).  Bytes: ``weight_bytes``,
        ``active_weight_bytes_per_token``.  KV cache: ``kv_cache`` maps
        ``"model"``, ``"mha"``, ``"gqa"``, ``"mqa"`` (and ``"mla"``,
        ``"mla_decompressed"`` for MLA models) to dicts with
        ``elements_per_token_per_layer``, ``elements_per_token``,
        ``bytes_per_token_per_layer``, ``bytes_per_token``, ``bytes_at_context``
        and ``formula``; ``kv_elements_per_token_per_layer``,
        ``kv_elements_per_token``, ``kv_bytes_per_token`` repeat the model's own
        row; ``kv_mla_vs_mha_ratio`` (MLA / MHA, None for non-MLA models) and
        ``kv_model_vs_mha_ratio``.  ``claims`` lists published numbers with
        ``computed`` and ``ratio`` (computed / claimed).
    """
    spec, source = spec_for(config_or_dir_or_name)
    if gqa_groups is None:
        gqa_groups = min(8, spec.num_heads)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context = {context!r}: expected an integer >= 0")
    if isinstance(gqa_groups, bool) or not isinstance(gqa_groups, int) or not (
            1 <= gqa_groups <= spec.num_heads):
        raise ValueError(f"gqa_groups = {gqa_groups!r}: expected an integer in "
                         f"[1, num_heads={spec.num_heads}]")
    bpe = _bytes_per_element("dtype", dtype)
    kv_bpe = bpe if kv_dtype is None else _bytes_per_element("kv_dtype", kv_dtype)

    d, V, L, H = spec.hidden_size, spec.vocab_size, spec.num_layers, spec.num_heads
    Ld, Lm = spec.num_dense_layers, spec.num_moe_layers

    attn_layer = spec.attention_params_per_layer()
    dense_layer = 3 * d * spec.dense_intermediate_size
    expert = 3 * d * spec.moe_intermediate_size
    shared_layer = spec.n_shared_experts * expert
    router_layer = (spec.n_routed_experts * d + (spec.n_routed_experts if spec.router_bias else 0)
                    if Lm else 0)

    embedding = V * d
    lm_head = 0 if spec.tie_word_embeddings else V * d
    attention = L * attn_layer
    dense_mlp = Ld * dense_layer
    routed = Lm * spec.n_routed_experts * expert
    shared = Lm * shared_layer
    router = Lm * router_layer
    norms = L * 2 * d + d
    total = embedding + lm_head + attention + dense_mlp + routed + shared + router + norms

    active_moe = Lm * (spec.experts_per_tok * expert + shared_layer + router_layer)
    lm_head_matmul = V * d
    active = attention + dense_mlp + active_moe + norms + lm_head_matmul
    active_no_head = active - lm_head_matmul
    active_with_emb = active + (0 if spec.tie_word_embeddings else embedding)

    qk, vd = spec.qk_head_dim, spec.value_head_dim
    attn_flops = L * 2 * H * (qk + vd) * context
    out: dict[str, Any] = {
        "name": spec.name,
        "source": source,
        "notes": spec.notes,
        "architecture": {
            "attention": spec.attention, "layers": L, "dense_layers": Ld, "moe_layers": Lm,
            "hidden_size": d, "vocab_size": V, "heads": H,
            "kv_heads": spec.num_kv_heads if spec.attention == "gqa" else None,
            "head_dim_paper_d_h": spec.head_dim,
            "routed_experts": spec.n_routed_experts, "shared_experts": spec.n_shared_experts,
            "experts_per_token": spec.experts_per_tok,
            "moe_intermediate_size": spec.moe_intermediate_size,
            "dense_intermediate_size": spec.dense_intermediate_size,
            "tie_word_embeddings": spec.tie_word_embeddings,
        },
        "total_params": total,
        "embedding_params": embedding,
        "lm_head_params": lm_head,
        "attention_params": attention,
        "dense_mlp_params": dense_mlp,
        "moe_params": routed + shared + router,
        "moe_routed_expert_params": routed,
        "moe_shared_expert_params": shared,
        "router_params": router,
        "norm_params": norms,
        "active_params": active,
        "active_params_no_lm_head": active_no_head,
        "active_params_with_embedding": active_with_emb,
        "active_attention_params": attention,
        "active_dense_mlp_params": dense_mlp,
        "active_moe_params": active_moe,
        "context": context,
        "attention_flops_per_token": attn_flops,
        "flops_per_token": 2 * active + attn_flops,
        "flops_per_token_no_lm_head": 2 * active_no_head + attn_flops,
        "dtype": dtype,
        "bytes_per_element": bpe,
        "weight_bytes": total * bpe,
        "active_weight_bytes_per_token": active * bpe,
        "kv_dtype": dtype if kv_dtype is None else kv_dtype,
        "kv_bytes_per_element": kv_bpe,
        "gqa_groups": gqa_groups,
    }
    if spec.attention == "mla":
        absorbed = L * 2 * H * (spec.kv_elements_per_layer() + spec.kv_lora_rank) * context
        out["attention_flops_per_token_absorbed"] = absorbed
        out["flops_per_token_absorbed"] = 2 * active + absorbed

    # --- KV cache -------------------------------------------------------
    dh = spec.head_dim

    def row(per_layer: int, formula: str) -> dict[str, Any]:
        return {
            "elements_per_token_per_layer": per_layer,
            "elements_per_token": per_layer * L,
            "bytes_per_token_per_layer": per_layer * kv_bpe,
            "bytes_per_token": per_layer * L * kv_bpe,
            "bytes_at_context": per_layer * L * kv_bpe * context,
            "formula": formula,
        }

    kv: dict[str, dict[str, Any]] = {}
    if spec.attention == "mla":
        kv["model"] = row(spec.kv_elements_per_layer(),
                          f"MLA (d_c + d_h^R) * l = ({spec.kv_lora_rank} + "
                          f"{spec.qk_rope_head_dim}) * {L}")
        kv["mla"] = kv["model"]
        kv["mla_decompressed"] = row(
            H * (qk + vd), f"per-head K and V, n_h * (d_qk + d_v) * l = {H} * ({qk} + {vd}) * {L}")
    else:
        kind = ("MHA" if spec.num_kv_heads == H else
                "MQA" if spec.num_kv_heads == 1 else f"GQA-{spec.num_kv_heads}")
        kv["model"] = row(spec.kv_elements_per_layer(),
                          f"{kind} 2 * {spec.num_kv_heads} * {dh} * {L}")
    kv["mha"] = row(2 * H * dh, f"MHA 2 * n_h * d_h * l = 2 * {H} * {dh} * {L}")
    kv["gqa"] = row(2 * gqa_groups * dh, f"GQA 2 * n_g * d_h * l = 2 * {gqa_groups} * {dh} * {L}")
    kv["mqa"] = row(2 * dh, f"MQA 2 * d_h * l = 2 * {dh} * {L}")
    out["kv_cache"] = kv
    out["kv_cache_kind"] = "mla" if spec.attention == "mla" else "gqa"
    out["kv_elements_per_token_per_layer"] = kv["model"]["elements_per_token_per_layer"]
    out["kv_elements_per_token"] = kv["model"]["elements_per_token"]
    out["kv_bytes_per_token"] = kv["model"]["bytes_per_token"]
    mha = kv["mha"]["elements_per_token_per_layer"]
    out["kv_model_vs_mha_ratio"] = kv["model"]["elements_per_token_per_layer"] / mha
    out["kv_mla_vs_mha_ratio"] = (kv["mla"]["elements_per_token_per_layer"] / mha
                                  if "mla" in kv else None)
    # MLA expressed as a number of GQA groups (paper: 2.25 for V2)
    out["kv_model_equivalent_gqa_groups"] = kv["model"]["elements_per_token_per_layer"] / (2 * dh)

    # --- claims ---------------------------------------------------------
    claims = []
    for c in spec.claims:
        computed = out.get(c.key)
        claims.append({"key": c.key, "claimed": c.value, "computed": computed,
                       "ratio": (computed / c.value) if isinstance(computed, (int, float)) else None,
                       "source": c.source})
    out["claims"] = claims
    return out


# ---------------------------------------------------------------------------
# formatting and CLI
# ---------------------------------------------------------------------------

def _human(n: float, unit: str = "") -> str:
    n = float(n)
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip() if n == int(n) else f"{n:.3g} {unit}".rstrip()


def _human_bytes(n: float) -> str:
    n = float(n)
    for scale, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def format_stats(d: Mapping[str, Any]) -> str:
    """Render a :func:`stats` dict as a readable plain-text table."""
    total = d["total_params"]
    lines = [f"{d['name']}  [{d['source']}]"]
    if d.get("notes"):
        lines.append(f"  {d['notes']}")
    lines.append("")
    lines.append(f"{'parameters':<34}{'count':>14}{'share':>9}")
    for label, key in (("total", "total_params"), ("embedding", "embedding_params"),
                       ("lm_head (untied)", "lm_head_params"),
                       (f"attention ({d['architecture']['attention'].upper()})", "attention_params"),
                       ("dense MLP", "dense_mlp_params"),
                       ("MoE routed experts", "moe_routed_expert_params"),
                       ("MoE shared experts", "moe_shared_expert_params"),
                       ("routers", "router_params"), ("norms", "norm_params")):
        lines.append(f"  {label:<32}{_human(d[key]):>14}{100.0 * d[key] / total:>8.2f}%")
    lines.append(f"{'active per token':<34}")
    for label, key in (("with lm_head (active_params)", "active_params"),
                       ("without lm_head", "active_params_no_lm_head"),
                       ("with embedding table", "active_params_with_embedding")):
        lines.append(f"  {label:<32}{_human(d[key]):>14}{100.0 * d[key] / total:>8.2f}%")
    lines.append("")
    lines.append(f"FLOPs per token at context {d['context']}: {_human(d['flops_per_token'], 'FLOP')}"
                 f" (2 x active {_human(2 * d['active_params'], 'FLOP')} + attention "
                 f"{_human(d['attention_flops_per_token'], 'FLOP')}); without lm_head "
                 f"{_human(d['flops_per_token_no_lm_head'], 'FLOP')}")
    if "attention_flops_per_token_absorbed" in d:
        lines.append(f"  MLA absorbed form: attention "
                     f"{_human(d['attention_flops_per_token_absorbed'], 'FLOP')}, total "
                     f"{_human(d['flops_per_token_absorbed'], 'FLOP')}")
    lines.append(f"weights ({d['dtype']}): {_human_bytes(d['weight_bytes'])}; read per token "
                 f"(active): {_human_bytes(d['active_weight_bytes_per_token'])}")
    lines.append("")
    lines.append(f"KV cache per token ({d['kv_dtype']}, {d['kv_bytes_per_element']:g} B/element)")
    lines.append(f"  {'':<18}{'per layer':>10}{'all layers':>12}{'bytes':>12}"
                 f"{'at ' + str(d['context']):>14}{'vs MHA':>9}  formula")
    mha = d["kv_cache"]["mha"]["elements_per_token_per_layer"]
    order = ["model", "mla", "mla_decompressed", "mha", "gqa", "mqa"]
    labels = {"model": "this model", "mla": "MLA", "mla_decompressed": "MLA decompressed",
              "mha": "MHA", "gqa": f"GQA ({d['gqa_groups']} groups)", "mqa": "MQA"}
    for key in order:
        if key not in d["kv_cache"] or (key == "mla" and d["kv_cache_kind"] == "mla"):
            continue
        r = d["kv_cache"][key]
        lines.append(f"  {labels[key]:<18}{r['elements_per_token_per_layer']:>10,}"
                     f"{r['elements_per_token']:>12,}{_human_bytes(r['bytes_per_token']):>12}"
                     f"{_human_bytes(r['bytes_at_context']):>14}"
                     f"{100.0 * r['elements_per_token_per_layer'] / mha:>8.2f}%  {r['formula']}")
    if d["kv_mla_vs_mha_ratio"] is not None:
        lines.append(f"  MLA / MHA = {100.0 * d['kv_mla_vs_mha_ratio']:.2f}%  (like GQA with "
                     f"{d['kv_model_equivalent_gqa_groups']:.2f} groups)")
    if d["claims"]:
        lines.append("")
        lines.append(f"{'claim':<26}{'claimed':>12}{'arithmetic':>13}{'ratio':>8}  source")
        for c in d["claims"]:
            comp = "-" if c["computed"] is None else _human(c["computed"])
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.3f}"
            lines.append(f"  {c['key']:<24}{_human(c['claimed']):>12}{comp:>13}{ratio:>8}  "
                         f"{c['source']}")
    return "\n".join(lines)


def main_stats(argv: Sequence[str] | None = None) -> int:
    """``python -m dsv2ext stats CONFIG_OR_DIR [--json] [...]``; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments after ``stats`` (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m dsv2ext stats",
        description="Parameter, FLOP and KV-cache arithmetic for a DeepSeek-V2-family config "
                    "(a built-in name, a config.json or a checkpoint directory).")
    parser.add_argument("model", nargs="?", help="built-in name, config.json path or checkpoint "
                        "directory (--list shows the names)")
    parser.add_argument("--json", action="store_true", help="print the stats dict as JSON")
    parser.add_argument("--context", type=int, default=4096,
                        help="context length for attention FLOPs and KV bytes (default 4096)")
    parser.add_argument("--dtype", default="bf16",
                        help="weight dtype name or bytes per element (default bf16)")
    parser.add_argument("--kv-dtype", default=None,
                        help="KV cache dtype name or bytes per element (default: --dtype)")
    parser.add_argument("--gqa-groups", type=int, default=None,
                        help="KV groups of the GQA comparison row (default 8)")
    parser.add_argument("--list", action="store_true", help="list the built-in names and exit")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        print("\n".join(named_specs()))
        return 0
    if args.model is None:
        parser.print_usage(sys.stderr)
        print("error: give a built-in name, a config.json or a checkpoint directory "
              "(--list shows the names)", file=sys.stderr)
        return 2

    def dtype_arg(v: str | None) -> str | float | None:
        if v is None:
            return None
        try:
            return float(v)
        except ValueError:
            return v

    try:
        d = stats(args.model, context=args.context, dtype=dtype_arg(args.dtype),
                  kv_dtype=dtype_arg(args.kv_dtype), gqa_groups=args.gqa_groups)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=2) if args.json else format_stats(d))
    return 0
