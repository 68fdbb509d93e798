"""Drop-in ``torch.nn.Module`` replacements for transformers' DeepSeek-V2 / V3 blocks.

* :class:`MLAAttention` replaces ``DeepseekV2Attention`` / ``DeepseekV3Attention``: same
  forward arguments and return value (``(attn_output, None)``), computed by the fused MLA
  kernel, with the 576-wide latent cache kept inside transformers' ``DynamicCache``
  (see :mod:`dsv2ext.torch._cache`).
* :class:`MoE` replaces ``DeepseekV2Moe`` / ``DeepseekV3MoE`` (router + fused 3-D experts
  + shared experts in one kernel call).
* :class:`SwiGLUMLP` replaces the dense ``DeepseekV2MLP`` / ``DeepseekV3MLP`` layers.

The modules hold the *original* transformers submodules (``q_proj``, ``kv_b_proj``, ``gate``,
``experts``, ...) as their children, so parameters are shared, never copied, and
``state_dict()`` keys are unchanged by patching.  Weights are read at every forward through
zero-copy views (float32, or bfloat16 as :class:`dsv2ext.BF16`).
"""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..ops.mla import MLA_MODES, MLAConfig, MLAWeights
from ..ops.moe import MoEConfig
from . import ops as tops
from ._convert import weight_view

if TYPE_CHECKING:  # transformers is imported only when a cache is used
    from ._cache import LatentCacheLayer

__all__ = ["MLAAttention", "MoE", "SwiGLUMLP"]


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _no_bias(module: Optional[nn.Module], name: str) -> None:
    if module is not None and getattr(module, "bias", None) is not None:
        raise ValueError(f"{name}: has a bias; the dsv2ext kernels implement bias-free projections "
                         "(config.attention_bias / mlp_bias must be False)")


def _weight(module: Optional[nn.Module], name: str) -> Optional[torch.Tensor]:
    if module is None:
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a module with a .weight tensor, got {type(module).__name__}")
    return w


def _check_silu(config: Any, module: nn.Module, name: str) -> None:
    act = _cfg_get(config, "hidden_act", "silu") if config is not None else "silu"
    if act not in ("silu", "swish"):
        raise ValueError(f"{name}: hidden_act {act!r} is not supported (the kernels implement SiLU / SwiGLU)")


# --------------------------------------------------------------------------- attention masks

def _real_tokens(attention_mask: Any, B: int, T: int, past: int, layer: Optional["LatentCacheLayer"]
                 ) -> Optional[torch.Tensor]:
    """Which of the ``T`` new tokens are real (not padding), from transformers' attention mask.

    Returns None when all are real.  Raises ValueError when the mask asks for anything but
    causal attention over the real tokens (e.g. packed sequences, custom biases), which the
    kernel cannot reproduce.
    """
    has_pad = layer is not None and layer.has_padding
    if attention_mask is None:
        if has_pad:
            raise ValueError("attention_mask: None, but the cache holds padding slots from earlier calls; pass the "
                             "attention mask of the whole sequence")
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a tensor or None, got {type(attention_mask).__name__}; use "
                        "attn_implementation='sdpa' or 'eager' with the patched model")
    m = attention_mask
    S = past + T
    t = torch.arange(T)
    if m.dim() == 2:  # [B, S] padding mask (1 = token)
        if m.shape[-1] != S:
            raise ValueError(f"attention_mask: 2-D mask of length {m.shape[-1]}, expected {S} (cache + new tokens)")
        slots = m.to(torch.bool).expand(B, S)
        allowed = slots[:, None, :] & (torch.arange(S)[None, None, :] <= (past + t)[None, :, None])
    else:
        if m.dim() == 4:
            if m.shape[1] != 1:
                raise ValueError(f"attention_mask: per-head masks are not supported, got shape {tuple(m.shape)}")
            m = m[:, 0]
        if m.dim() != 3 or m.shape[-2] != T or m.shape[-1] != S:
            raise ValueError(f"attention_mask: expected shape [B, 1, {T}, {S}] (new tokens x cache + new tokens), "
                             f"got {tuple(attention_mask.shape)}")
        if m.dtype == torch.bool:
            allowed = m
        elif m.is_floating_point():
            allowed = m == 0
            if not bool((allowed | (m <= torch.finfo(m.dtype).min / 2)).all()):
                raise ValueError("attention_mask: additive biases other than 0 / -inf are not supported")
        else:
            allowed = m != 0
        allowed = allowed.expand(B, T, S)
    diag = allowed[:, t, past + t]
    future = torch.arange(S)[None, None, :] > (past + t)[None, :, None]
    degenerate = (allowed & future).any(-1)  # rows unmasked to avoid NaN (padding queries)
    real_q = diag & ~degenerate
    if past:
        real_past = layer.real[:, :past] if layer is not None and layer.real is not None else \
            torch.ones((B, past), dtype=torch.bool)
    else:
        real_past = torch.ones((B, 0), dtype=torch.bool)
    slots = torch.cat((real_past, real_q), 1)
    expected = slots[:, None, :] & ~future
    if bool(((allowed != expected) & real_q[:, :, None]).any()):
        raise ValueError("attention_mask: dsv2ext's MLAAttention supports causal attention over the non-padding "
                         "tokens (left or right padding as generate() and tokenizers make); this mask allows a "
                         "different pattern (e.g. packed sequences or a custom mask)")
    if not has_pad and bool(real_q.all()):
        return None
    return real_q


def _cached_real_tokens(cache: Any, attention_mask: Any, B: int, T: int, past: int,
                        layer: Optional["LatentCacheLayer"]) -> Optional[torch.Tensor]:
    """:func:`_real_tokens`, computed once per forward and shared by the layers through ``cache``."""
    if cache is None or attention_mask is None:
        return _real_tokens(attention_mask, B, T, past, layer)
    memo = getattr(cache, "_dsv2ext_mask_memo", None)
    key = (B, T, past, attention_mask._version)
    if memo is not None and memo[0] is attention_mask and memo[1] == key:
        return memo[2]
    res = _real_tokens(attention_mask, B, T, past, layer)
    cache._dsv2ext_mask_memo = (attention_mask, key, res)
    return res


# --------------------------------------------------------------------------- MLA attention

_V2_ORDER = ("attention_mask", "cache", "position_embeddings")
#: latent row formats of the cache kept by MLAAttention
_KV_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
_V3_ORDER = ("position_embeddings", "attention_mask", "cache")


def _positional_order(module: nn.Module) -> Tuple[str, ...]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return _V2_ORDER
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = ["cache" if n == "past_key_values" else n for n in names[1:]]
    return tuple(names) if names else _V2_ORDER


class MLAAttention(nn.Module):
    """Multi-head latent attention on the dsv2ext kernel, a drop-in for transformers' module.

    Build it with :meth:`from_hf`.  ``forward`` takes what ``DeepseekV2DecoderLayer`` /
    ``DeepseekV3DecoderLayer`` pass (``hidden_states``, ``attention_mask``, ``position_ids``,
    ``cache`` / ``past_key_values``, ``position_embeddings``, ``use_cache``, ...) and returns
    ``(attn_output, None)``.

    Parameters
    ----------
    cfg : dsv2ext.ops.MLAConfig
    layer_idx : int
        Index of the decoder layer (its slot in the cache).
    q_proj, q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj : nn.Module
        Modules with a ``.weight`` ([out, in] for projections), float32 or bfloat16; ``q_proj``
        alone or the three ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``.
    mode : {"auto", "absorbed", "decompressed"}
        Attention form (``"auto"``: cheaper per sequence).
    kv_dtype : {"f32", "bf16"}
        Format of the latent rows kept in the cache (fp32: exact; bf16: half the bytes).
    positional : tuple of str
        Names of the positional arguments after ``hidden_states`` (V2 and V3 differ).

    Notes
    -----
    Positions come from the attention mask and the cache: a sequence's non-padding tokens
    take positions 0, 1, 2, ... (as ``generate()`` makes them from the attention mask);
    ``position_ids``, when given, are checked against them.  ``position_embeddings`` are not
    used: the kernel computes RoPE / YaRN from ``cfg`` (checked against the model's rotary
    table by :func:`dsv2ext.torch.patch`).
    """

    def __init__(self, cfg: MLAConfig, layer_idx: int, *, kv_a_proj_with_mqa: nn.Module, kv_a_layernorm: nn.Module,
                 kv_b_proj: nn.Module, o_proj: nn.Module, q_proj: Optional[nn.Module] = None,
                 q_a_proj: Optional[nn.Module] = None, q_a_layernorm: Optional[nn.Module] = None,
                 q_b_proj: Optional[nn.Module] = None, mode: str = "auto", attention_dropout: float = 0.0,
                 positional: Tuple[str, ...] = _V2_ORDER, kv_dtype: str = "f32") -> None:
        super().__init__()
        if not isinstance(cfg, MLAConfig):
            raise TypeError(f"cfg: expected a dsv2ext.ops.MLAConfig, got {type(cfg).__name__}")
        if mode not in MLA_MODES:
            raise ValueError(f"mode: expected one of {sorted(MLA_MODES)}, got {mode!r}")
        if kv_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_dtype: expected one of {sorted(_KV_DTYPES)}, got {kv_dtype!r}")
        self.cfg = cfg
        self.layer_idx = int(layer_idx)
        self.mode = mode
        self.kv_dtype = kv_dtype
        self.attention_dropout = float(attention_dropout)
        self.positional = tuple(positional)
        self.q_proj = q_proj
        self.q_a_proj = q_a_proj
        self.q_a_layernorm = q_a_layernorm
        self.q_b_proj = q_b_proj
        self.kv_a_proj_with_mqa = kv_a_proj_with_mqa
        self.kv_a_layernorm = kv_a_layernorm
        self.kv_b_proj = kv_b_proj
        self.o_proj = o_proj
        self.num_heads = cfg.num_heads
        self.scaling = cfg.softmax_scale
        self.is_causal = True
        for name in tops.MLA_WEIGHT_NAMES:
            _no_bias(getattr(self, name), name)
        self.hidden_size = int(self.weights()["o_proj"].shape[0])
        # fail early on wrong shapes / dtypes (zero-copy views, nothing kept)
        MLAWeights(**{k: (None if v is None else weight_view(v, k)) for k, v in self.weights().items()}
                   ).validate(cfg, self.hidden_size)

    @classmethod
    def from_hf(cls, module: nn.Module, config: Any = None, *, mla_config: Optional[MLAConfig] = None,
                mode: str = "auto", kv_dtype: str = "f32") -> "MLAAttention":
        """Wrap a transformers ``DeepseekV2Attention`` / ``DeepseekV3Attention`` (weights shared).

        Parameters
        ----------
        module : nn.Module
            The attention module (its submodules are reused, not copied).
        config : DeepseekV2Config / DeepseekV3Config, optional
            Default: ``module.config``.
        mla_config : MLAConfig, optional
            Precomputed :meth:`MLAConfig.from_hf_config` of ``config``.
        mode : {"auto", "absorbed", "decompressed"}
        kv_dtype : {"f32", "bf16"}
            Format of the latent rows kept in the cache.

        Raises
        ------
        ValueError
            Unsupported configuration (biases, rope type, a softmax scale that differs from the
            config's, per-head shapes that do not fit).
        """
        config = config if config is not None else getattr(module, "config", None)
        if config is None:
            raise ValueError("config: not given and the module has no .config")
        cfg = mla_config if mla_config is not None else MLAConfig.from_hf_config(config)
        scaling = getattr(module, "scaling", None)
        if scaling is not None and not math.isclose(float(scaling), cfg.softmax_scale, rel_tol=1e-6):
            raise ValueError(f"config: the module's softmax scale {float(scaling):.8g} differs from the "
                             f"config's {cfg.softmax_scale:.8g} (transformers < 5.17 lacked the YaRN m^2 factor)")
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError("module: has no layer_idx (needed to find its slot in the cache)")
        get = lambda n: getattr(module, n, None)  # noqa: E731
        return cls(cfg, int(layer_idx), q_proj=get("q_proj"), q_a_proj=get("q_a_proj"),
                   q_a_layernorm=get("q_a_layernorm"), q_b_proj=get("q_b_proj"),
                   kv_a_proj_with_mqa=get("kv_a_proj_with_mqa"), kv_a_layernorm=get("kv_a_layernorm"),
                   kv_b_proj=get("kv_b_proj"), o_proj=get("o_proj"), mode=mode,
                   attention_dropout=float(getattr(module, "attention_dropout", 0.0) or 0.0),
                   positional=_positional_order(module), kv_dtype=kv_dtype)

    def weights(self) -> Dict[str, Optional[torch.Tensor]]:
        """The weight tensors by HF name (the shared parameters themselves)."""
        return {n: _weight(getattr(self, n), n) for n in tops.MLA_WEIGHT_NAMES}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layer_idx={self.layer_idx}, heads={c.num_heads}, kv_lora_rank={c.kv_lora_rank}, "
                f"q_lora_rank={c.q_lora_rank}, latent_width={c.latent_dim}, mode={self.mode!r}, "
                f"kv_dtype={self.kv_dtype!r}")

    def forward(self, hidden_states: torch.Tensor, *args: Any, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Any = None, cache: Any = None, past_key_values: Any = None,
                position_ids: Optional[torch.Tensor] = None, cache_position: Optional[torch.Tensor] = None,
                **kwargs: Any) -> Tuple[torch.Tensor, None]:
        """MLA attention of ``hidden_states`` [B, T, hidden] (after ``input_layernorm``).

        Returns
        -------
        (Tensor [B, T, hidden] in the dtype of ``hidden_states``, None)
            Padding tokens get zeros.
        """
        if args:
            if len(args) > len(self.positional):
                raise TypeError(f"forward: takes at most {len(self.positional) + 1} positional arguments")
            given = dict(zip(self.positional, args))
            attention_mask = given.get("attention_mask", attention_mask)
            cache = given.get("cache", cache)
            position_embeddings = given.get("position_embeddings", position_embeddings)
        if cache is None:
            cache = past_key_values
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError("attention dropout is not implemented by the dsv2ext kernel: set "
                                      "config.attention_dropout = 0 or call model.eval()")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states: expected [batch, seq, hidden], got shape {tuple(hidden_states.shape)}")
        B, T, d = hidden_states.shape
        if d != self.hidden_size:
            raise ValueError(f"hidden_states: hidden size {d}, expected {self.hidden_size}")
        W = self.cfg.latent_dim
        layer = None
        if cache is not None:
            from ._cache import latent_layer

            layer = latent_layer(cache, self.layer_idx, W, _KV_DTYPES[self.kv_dtype])
        past = layer.length if layer is not None else 0
        if layer is not None and layer.latent is not None and layer.latent.shape[0] != B:
            raise ValueError(f"hidden_states: batch size {B} differs from the {layer.latent.shape[0]} sequences "
                             f"in the cache")
        real_q = _cached_real_tokens(cache, attention_mask, B, T, past, layer)
        rows_before = layer.n_rows if layer is not None and layer.n_rows is not None else \
            torch.zeros(B, dtype=torch.int64)
        if real_q is None:
            pos = rows_before[:, None] + torch.arange(T)[None, :]
        else:
            pos = rows_before[:, None] + real_q.cumsum(1) - 1
        if position_ids is None and cache_position is not None:
            position_ids = cache_position.reshape(1, -1)
        if position_ids is not None:
            pid = position_ids.to(torch.int64)
            pid = pid.reshape(1, -1) if pid.dim() == 1 else pid
            if pid.dim() != 2 or pid.shape[-1] != T or pid.shape[0] not in (1, B):
                raise ValueError(f"position_ids: expected shape [{B}, {T}], got {tuple(position_ids.shape)}")
            bad = pid.expand(B, T) != pos
            if real_q is not None:
                bad &= real_q
            if bool(bad.any()):
                raise ValueError("position_ids: dsv2ext's latent cache stores each sequence's non-padding tokens at "
                                 "positions 0, 1, 2, ... (as generate() computes them from the attention mask); got "
                                 f"{pid.expand(B, T)[bad][:8].tolist()} where {pos[bad][:8].tolist()} were expected. "
                                 "Pass position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) for padded "
                                 "batches")
        flat = hidden_states.reshape(B * T, d)
        if real_q is None:
            idx = None
            seq_ids = torch.arange(B).repeat_interleave(T)
            positions = pos.reshape(-1)
        else:
            idx = real_q.reshape(-1).nonzero().squeeze(1)
            flat = flat.index_select(0, idx)
            seq_ids = idx // T
            positions = pos.reshape(-1).index_select(0, idx)
        rows_needed = int(positions.max()) + 1 if positions.numel() else 1
        if layer is not None:
            buf = layer.prepare(B, rows_needed, past + T)
        else:
            buf = torch.zeros((B, rows_needed, W), dtype=_KV_DTYPES[self.kv_dtype])
        out = tops.mla_attention_block(flat, self.weights(), self.cfg, buf, seq_ids, positions, self.mode)
        if idx is not None:
            out = hidden_states.new_zeros((B * T, d)).index_copy(0, idx, out)
        if layer is not None:
            layer.commit(real_q, T)
        return out.view(B, T, d), None


# --------------------------------------------------------------------------- MoE / MLP

def moe_config_from_router(gate: nn.Module) -> MoEConfig:
    """The :class:`MoEConfig` that transformers' router module computes.

    ``DeepseekV2TopkRouter``: softmax scoring, ``greedy`` / ``group_limited_greedy``, weights
    never renormalised (transformers' V2 ignores ``norm_topk_prob``).
    ``DeepseekV3TopkRouter`` (has ``e_score_correction_bias``): sigmoid, ``noaux_tc``.
    """
    for attr in ("top_k", "num_experts", "routed_scaling_factor"):
        if not hasattr(gate, attr):
            raise TypeError(f"gate: expected a transformers DeepseekV2/V3 router with .{attr}, "
                            f"got {type(gate).__name__}")
    common = dict(n_routed_experts=int(gate.num_experts), num_experts_per_tok=int(gate.top_k),
                  n_group=int(getattr(gate, "num_group", 1) or 1), topk_group=int(getattr(gate, "topk_group", 1) or 1),
                  routed_scaling_factor=float(gate.routed_scaling_factor))
    if getattr(gate, "e_score_correction_bias", None) is not None:
        return MoEConfig(topk_method="noaux_tc", scoring_func="sigmoid",
                         norm_topk_prob=bool(getattr(gate, "norm_topk_prob", False)), **common)
    method = getattr(gate, "topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"gate: topk_method {method!r} is not supported for V2 routers "
                         "(greedy, group_limited_greedy)")
    return MoEConfig(topk_method=method, scoring_func="softmax", norm_topk_prob=False, **common)


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU MLP ``down(silu(gate x) * up x)`` on the fused kernel (drop-in for
    ``DeepseekV2MLP`` / ``DeepseekV3MLP``; holds their Linear modules)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        for n in ("gate_proj", "up_proj", "down_proj"):
            _no_bias(getattr(self, n), n)
        g, u, dn = (_weight(getattr(self, n), n) for n in ("gate_proj", "up_proj", "down_proj"))
        if g.shape != u.shape or dn.shape != (g.shape[1], g.shape[0]):
            raise ValueError(f"gate/up/down_proj: inconsistent shapes {tuple(g.shape)}, {tuple(u.shape)}, "
                             f"{tuple(dn.shape)}")

    @classmethod
    def from_hf(cls, module: nn.Module, config: Any = None) -> "SwiGLUMLP":
        """Wrap a transformers ``DeepseekV2MLP`` / ``DeepseekV3MLP`` (weights shared)."""
        _check_silu(config if config is not None else getattr(module, "config", None), module, "module")
        return cls(module.gate_proj, module.up_proj, module.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., d] -> [..., d] (dtype of ``x``)."""
        return tops.swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class MoE(nn.Module):
    """DeepSeekMoE block on the dsv2ext kernel, a drop-in for ``DeepseekV2Moe`` / ``DeepseekV3MoE``.

    Parameters
    ----------
    gate : nn.Module
        The router (``.weight`` [E, d]; V3 also ``.e_score_correction_bias`` [E]).
    experts : nn.Module
        transformers-5 fused experts: ``.gate_up_proj`` [E, 2I, d] (gate rows then up rows) and
        ``.down_proj`` [E, d, I], handed to the kernel as :class:`dsv2ext.ops.StackedExperts`
        views (not copied).
    shared_experts : nn.Module, optional
        ``gate_proj`` / ``up_proj`` / ``down_proj`` Linear modules.
    cfg : MoEConfig
    """

    def __init__(self, gate: nn.Module, experts: nn.Module, shared_experts: Optional[nn.Module],
                 cfg: MoEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a dsv2ext.ops.MoEConfig, got {type(cfg).__name__}")
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts
        self.cfg = cfg
        gu = getattr(experts, "gate_up_proj", None)
        dn = getattr(experts, "down_proj", None)
        if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
            raise TypeError("experts: expected transformers-5 fused experts with 3-D .gate_up_proj [E, 2I, d] and "
                            f".down_proj [E, d, I], got {type(experts).__name__}")
        E, I2, d = gu.shape
        if E != cfg.n_routed_experts or dn.shape != (E, d, I2 // 2) or I2 % 2:
            raise ValueError(f"experts: gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} do not fit "
                             f"{cfg.n_routed_experts} experts")
        if shared_experts is not None:
            for n in ("gate_proj", "up_proj", "down_proj"):
                _no_bias(getattr(shared_experts, n, None), f"shared_experts.{n}")
                _weight(getattr(shared_experts, n, None), f"shared_experts.{n}")

    @classmethod
    def from_hf(cls, module: nn.Module, config: Any = None) -> "MoE":
        """Wrap a transformers ``DeepseekV2Moe`` / ``DeepseekV3MoE`` (weights shared).

        The routing rule is read from the router module (:func:`moe_config_from_router`).
        """
        config = config if config is not None else getattr(module, "config", None)
        _check_silu(config, module, "module")
        for attr in ("gate", "experts"):
            if not hasattr(module, attr):
                raise TypeError(f"module: expected a DeepseekV2Moe / DeepseekV3MoE with .{attr}, "
                                f"got {type(module).__name__}")
        return cls(module.gate, module.experts, getattr(module, "shared_experts", None),
                   moe_config_from_router(module.gate))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"experts={c.n_routed_experts}, top_k={c.num_experts_per_tok}, method={c.topk_method!r}, "
                f"scoring={c.scoring_func!r}")

    def _shared(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        s = self.shared_experts
        if s is None:
            return None
        return (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` [..., d] (after ``post_attention_layernorm``) -> [..., d], same dtype."""
        bias = getattr(self.gate, "e_score_correction_bias", None) if self.cfg.topk_method == "noaux_tc" else None
        return tops.moe_block(hidden_states, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj,
                              self._shared(), self.cfg, bias)

    def route(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The routing of ``hidden_states`` [..., d]: (ids int64 [T, k], weights float32 [T, k])."""
        bias = getattr(self.gate, "e_score_correction_bias", None) if self.cfg.topk_method == "noaux_tc" else None
        return tops.moe_route(hidden_states, self.gate.weight, self.cfg, bias)
