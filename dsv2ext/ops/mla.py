"""Multi-head latent attention (MLA) of DeepSeek-V2 / V2.5 / V3 on a latent KV cache.

What a layer caches per token is one *latent row* of ``kv_lora_rank + qk_rope_head_dim``
floats (576 for every official config)::

    [ c = kv_a_layernorm(c_kv)  (kv_lora_rank) | k_pe rotated at the token's position (rope) ]

The cache of a layer is ``[B, S_max, kv_lora_rank + qk_rope_head_dim]`` rows (``B`` sequences,
``S_max`` positions each; see :func:`new_latent_cache`) in one of three formats: a float32 array
(fp32 rows), a :class:`dsv2ext.BF16` of a uint16 array (bfloat16 rows, rounded to nearest even;
a bare uint16 array is refused), or an :class:`FP8Cache` (e4m3 codes with a scale per 128 and
bfloat16 ``k_pe``).  The kernels read the rows in their own format.  Calls take a
*ragged* batch of ``T`` tokens: token ``t`` belongs to sequence ``seq_ids[t]`` and sits at
position ``positions[t]`` (both int64 ``[T]``); it attends to rows ``0 .. positions[t]`` of
its sequence (causal, several new tokens of a sequence at once).  Rows of earlier tokens must
have been written before; :func:`mla_attention_block` writes the rows of its own tokens first.

Queries are ``[T, H, qk_nope_head_dim + qk_rope_head_dim]`` (per head ``[q_nope | q_pe]``);
attention outputs are ``[T, H, v_head_dim]`` (heads concatenated before ``o_proj``).
``kv_b_proj`` is ``[H * (qk_nope_head_dim + v_head_dim), kv_lora_rank]``: per head the
``W_UK`` rows then the ``W_UV`` rows.

Two exact forms of the attention:

* absorbed (decode): ``q_lat_h = W_UK_h^T q_nope_h``, scores ``q_lat_h . c + q_pe_h . k_pe``,
  ``o_h = W_UV_h (sum_j p_j c_j)``; all heads of a token form one small GEMM against the rows.
* decompressed (prefill): ``K_nope``/``V`` decompressed from the rows with ``kv_b_proj``,
  ordinary causal attention with head dims 192 / 128 (OpenBLAS sgemm).

``mode="auto"`` picks, per sequence, the form with the smaller FLOP estimate
(:func:`mla_attention_flops`).  Softmax is computed in fp32 with the YaRN-corrected scale
(:func:`mla_softmax_scale`).  The results equal transformers' ``DeepseekV2Attention`` /
``DeepseekV3Attention`` (eager, fp32) to rounding.

RoPE: the rotary channels are interleaved pairs ``(x[2i], x[2i+1])`` rotated as complex
numbers (DeepSeek's layout, transformers' ``DeepseekV2`` and ``DeepseekV3`` with
``rope_interleave=True``; V3 writes the rotated pairs de-interleaved, which changes no dot
product).  ``interleaved=False`` selects the rotate-half pairing ``(i, i + dim/2)`` of
``DeepseekV3`` with ``rope_interleave=False``.

All arrays are NumPy, float32 activations (C-contiguous, aligned, never converted silently);
weights are float32 arrays or :class:`dsv2ext.BF16` (the projections may also be int8, int4 or FP8
weights: ``dsv2ext.quant.Int8Weight``, ``dsv2ext.int4.Int4Weight``, :class:`dsv2ext.Fp8Weight`).  Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument before any
kernel runs.  The GIL is released while kernels run.

NaN / Inf policy: the activations (``hidden``, ``q``, the cache rows) and weights are not
scanned; NaN / Inf in them propagate through the arithmetic to the outputs of the tokens
that depend on them (a NaN query gives that token NaN outputs, a NaN cache row gives NaN
outputs to every token attending to it) - no exception, no effect on other tokens.
Non-finite *parameters* are rejected with ``ValueError``: ``inv_freq`` entries,
``softmax_scale``, ``attention_factor``, ``eps``, RoPE/YaRN settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .._native import _C
from ..dtypes import BF16
from ._util import Weight, _require_contiguous, check_f32, new_out, weight_shape

__all__ = [
    "MLAConfig",
    "MLAWeights",
    "MLA_MODES",
    "rope_inv_freq",
    "mla_softmax_scale",
    "apply_rope",
    "new_latent_cache",
    "FP8Cache",
    "fp8_cache_row_bytes",
    "mla_compress_kv",
    "mla_attention_absorbed",
    "mla_attention_decompressed",
    "mla_attention",
    "mla_attention_flops",
    "mla_choose_mode",
    "mla_attention_block",
    "release_scratch_memory",
]

MLA_MODES: Dict[str, int] = {"auto": 0, "absorbed": 1, "decompressed": 2}

_SUPPORTED_ROPE = ("default", "yarn")


# --------------------------------------------------------------------------- helpers

def _check_i64(x: Any, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of dtype int64, got {type(x).__name__}")
    if x.dtype != np.int64:
        raise TypeError(f"{name}: expected dtype int64, got {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"{name}: expected 1 dimension [T], got shape {x.shape}")
    return x


FP8_BLOCK = 128  # latent numbers per fp32 scale in an FP8 row


def fp8_cache_row_bytes(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """Bytes of one FP8 cache row: codes (padded to 4 bytes), scales, bf16 k_pe (656 for V2 dims)."""
    return -(-kv_lora_rank // 4) * 4 + 4 * -(-kv_lora_rank // FP8_BLOCK) + 2 * qk_rope_head_dim


class FP8Cache:
    """A latent cache in FlashMLA's FP8 layout: per row, ``kv_lora_rank`` e4m3 codes (padded to a
    multiple of 4 bytes), one fp32 scale per block of 128 codes, then ``k_pe`` in bfloat16.

    The value of latent number ``i`` of a row is ``e4m3(codes[i]) * scales[i // 128]``
    (see :meth:`to_float32`, the exact NumPy model).  :func:`mla_compress_kv` writes rows with
    ``scale = amax / 448`` per block and codes rounded to nearest even.

    Parameters
    ----------
    data : np.ndarray uint8 [B, S, fp8_cache_row_bytes(kv_lora_rank, qk_rope_head_dim)]
        The rows (not copied).
    kv_lora_rank, qk_rope_head_dim : int
    """

    __slots__ = ("data", "kv_lora_rank", "qk_rope_head_dim")
    __dsv2_dtype__ = "fp8_kv"

    def __init__(self, data: np.ndarray, kv_lora_rank: int, qk_rope_head_dim: int) -> None:
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 3:
            raise TypeError("data: expected a uint8 ndarray [B, S, row bytes]")
        rb = fp8_cache_row_bytes(int(kv_lora_rank), int(qk_rope_head_dim))
        if data.shape[2] != rb:
            raise ValueError(f"data: FP8 rows of kv_lora_rank {kv_lora_rank} and qk_rope_head_dim "
                             f"{qk_rope_head_dim} take {rb} bytes, got a last dimension of {data.shape[2]}")
        self.data = data
        self.kv_lora_rank = int(kv_lora_rank)
        self.qk_rope_head_dim = int(qk_rope_head_dim)

    @classmethod
    def zeros(cls, batch: int, max_seq_len: int, kv_lora_rank: int, qk_rope_head_dim: int) -> "FP8Cache":
        rb = fp8_cache_row_bytes(kv_lora_rank, qk_rope_head_dim)
        return cls(np.zeros((batch, max_seq_len, rb), np.uint8), kv_lora_rank, qk_rope_head_dim)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(B, S, kv_lora_rank + qk_rope_head_dim)``: the numbers each row stands for."""
        return (self.data.shape[0], self.data.shape[1], self.kv_lora_rank + self.qk_rope_head_dim)

    def _view(self, dtype: Any, offset: int, count: int) -> np.ndarray:
        d = self.data
        return np.ndarray((d.shape[0], d.shape[1], count), dtype=dtype, buffer=d, offset=offset,
                          strides=(d.strides[0], d.strides[1], np.dtype(dtype).itemsize))

    @property
    def codes(self) -> np.ndarray:
        """uint8 [B, S, kv_lora_rank] e4m3 codes (a view)."""
        return self._view(np.uint8, 0, self.kv_lora_rank)

    @property
    def scales(self) -> np.ndarray:
        """float32 [B, S, ceil(kv_lora_rank / 128)] block scales (a view)."""
        return self._view(np.float32, -(-self.kv_lora_rank // 4) * 4, -(-self.kv_lora_rank // FP8_BLOCK))

    @property
    def rope(self) -> BF16:
        """bfloat16 [B, S, qk_rope_head_dim] k_pe (a view)."""
        off = fp8_cache_row_bytes(self.kv_lora_rank, 0)
        return BF16(self._view(np.uint16, off, self.qk_rope_head_dim))

    def to_float32(self) -> np.ndarray:
        """The values the rows hold, float32 [B, S, kv_lora_rank + qk_rope_head_dim] (a new array)."""
        from ..safetensors import fp8_e4m3_to_float32

        sc = np.repeat(self.scales, FP8_BLOCK, axis=2)[:, :, :self.kv_lora_rank]
        return np.concatenate([fp8_e4m3_to_float32(self.codes) * sc, self.rope.to_float32()], axis=2)

    def __repr__(self) -> str:
        return f"FP8Cache(shape={self.shape}, {self.data.nbytes / 2**20:.1f} MiB)"


def _cache_shape(cache: Any) -> Tuple[int, int, int]:
    """``(B, S_max, kv_lora + rope)`` of a latent cache argument, with a clear error for the wrong
    kind of object (the binding checks the rest)."""
    if isinstance(cache, np.ndarray):
        if cache.dtype == np.uint16:
            raise TypeError("cache: a bare uint16 array is not taken as bfloat16 rows; wrap it as dsv2ext.BF16(array)")
        check_f32(cache, "cache", 3)
        return cache.shape
    if isinstance(cache, BF16):
        if cache.ndim != 3:
            raise ValueError(f"cache: expected 3 dimensions [B, S_max, kv_lora + rope], got shape {cache.shape}")
        _require_contiguous(cache.data, "cache.data")
        return cache.shape
    if isinstance(cache, FP8Cache):
        _require_contiguous(cache.data, "cache.data")
        return cache.shape
    raise TypeError(f"cache: expected a float32 numpy array, a dsv2ext.BF16 (bfloat16 rows) or an FP8Cache, "
                    f"got {type(cache).__name__}")


def _mode_id(mode: str) -> int:
    if not isinstance(mode, str) or mode not in MLA_MODES:
        raise ValueError(f"mode: expected one of {sorted(MLA_MODES)}, got {mode!r}")
    return MLA_MODES[mode]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _rope_dict(rope_scaling: Optional[Mapping[str, Any]]) -> Tuple[str, Mapping[str, Any]]:
    if rope_scaling is None:
        return "default", {}
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"rope_scaling: expected a dict or None, got {type(rope_scaling).__name__}")
    rtype = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if rtype not in _SUPPORTED_ROPE:
        raise ValueError(f"rope_scaling: unsupported rope type {rtype!r} (supported: {', '.join(_SUPPORTED_ROPE)})")
    return rtype, rope_scaling


def _yarn_factor(rs: Mapping[str, Any], max_position_embeddings: Optional[int]) -> float:
    factor = rs.get("factor")
    if factor is None:
        orig = rs.get("original_max_position_embeddings")
        if orig is None or max_position_embeddings is None:
            raise ValueError("rope_scaling: 'factor' is missing and cannot be derived "
                             "(needs original_max_position_embeddings and max_position_embeddings)")
        factor = max_position_embeddings / orig
    return float(factor)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# --------------------------------------------------------------------------- RoPE

def rope_inv_freq(dim: int, rope_theta: float = 10000.0, rope_scaling: Optional[Mapping[str, Any]] = None, *,
                  max_position_embeddings: Optional[int] = None) -> Tuple[np.ndarray, float]:
    """Inverse-frequency table of the rotary channels and the cos/sin attention factor.

    Reproduces transformers' ``compute_default_rope_parameters`` (plain RoPE) and
    ``_compute_yarn_parameters`` (YaRN) in fp32: ``inv_freq[i] = theta^(-2i/dim)``; with YaRN the
    frequencies are blended between ``inv_freq`` and ``inv_freq / factor`` along a linear ramp
    between the correction dims of ``beta_fast`` / ``beta_slow`` (floor/ceil unless
    ``truncate`` is False), and the attention factor is
    ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` when both are given
    (non-zero), else ``get_mscale(factor)``, unless ``attention_factor`` is given.

    Parameters
    ----------
    dim : int
        Number of rotary channels (``qk_rope_head_dim``, 64 for DeepSeek), even.
    rope_theta : float
        Base; a ``rope_theta`` key inside ``rope_scaling`` takes precedence.
    rope_scaling : dict or None
        Either spelling: hub ``rope_scaling`` (``{"type": "yarn", "factor", ...}``) or
        transformers-5 ``rope_parameters`` (``{"rope_type": "yarn" | "default", ...}``).
        Keys used for YaRN: ``factor``, ``original_max_position_embeddings``, ``beta_fast``
        (default 32), ``beta_slow`` (default 1), ``mscale``, ``mscale_all_dim``,
        ``attention_factor``, ``truncate`` (default True).
    max_position_embeddings : int, optional
        Used only when ``factor`` or ``original_max_position_embeddings`` is missing (as
        transformers does).

    Returns
    -------
    inv_freq : np.ndarray, float32, shape [dim // 2]
    attention_factor : float
        Multiplier of cos and sin (1.0 for plain RoPE and for every official DeepSeek config).
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    dim = int(dim)
    if dim <= 0 or dim % 2 or dim > 1024:
        raise ValueError(f"dim: expected an even number of rotary channels in [2, 1024], got {dim}")
    rtype, rs = _rope_dict(rope_scaling)
    prf = rs.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"rope_scaling: partial_rotary_factor {prf} is not supported (MLA rotates all "
                         f"qk_rope_head_dim channels)")
    theta = float(rs.get("rope_theta") or rope_theta)
    out = np.empty(dim // 2, dtype=np.float32)
    if rtype == "default":
        af = _C.rope_inv_freq(out, False, theta, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, True)
        return out, float(af)
    factor = _yarn_factor(rs, max_position_embeddings)
    orig = rs.get("original_max_position_embeddings")
    if orig is None:
        if max_position_embeddings is None:
            raise ValueError("rope_scaling: 'original_max_position_embeddings' is missing")
        orig = max_position_embeddings
    af_in = rs.get("attention_factor")
    af = _C.rope_inv_freq(out, True, theta, factor, float(orig), float(rs.get("beta_fast") or 32),
                          float(rs.get("beta_slow") or 1), float(rs.get("mscale") or 0.0),
                          float(rs.get("mscale_all_dim") or 0.0), None if af_in is None else float(af_in),
                          bool(rs.get("truncate", True)))
    return out, float(af)


def mla_softmax_scale(qk_head_dim: int, rope_scaling: Optional[Mapping[str, Any]] = None, *,
                      max_position_embeddings: Optional[int] = None) -> float:
    """Softmax scale of MLA: ``qk_head_dim^-0.5 * m^2`` (transformers' ``yarn_apply_mscale``).

    ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` when the rope type is not ``"default"``,
    ``mscale_all_dim`` is given (non-zero) and ``factor > 1``; otherwise ``m = 1``.
    Official V2 / V2-Lite: 0.1147214; V2.5 / V3: 0.1352338.

    Parameters
    ----------
    qk_head_dim : int
        ``qk_nope_head_dim + qk_rope_head_dim`` (192).
    rope_scaling : dict or None
        As for :func:`rope_inv_freq`.
    max_position_embeddings : int, optional
        Only to derive a missing ``factor``.

    Returns
    -------
    float
    """
    if isinstance(qk_head_dim, bool) or not isinstance(qk_head_dim, (int, np.integer)) or qk_head_dim <= 0:
        raise ValueError(f"qk_head_dim: expected a positive int, got {qk_head_dim!r}")
    scale = float(qk_head_dim) ** -0.5
    rtype, rs = _rope_dict(rope_scaling)
    if rtype != "default":
        msa = rs.get("mscale_all_dim", 0)
        if msa:
            m = _yarn_get_mscale(_yarn_factor(rs, max_position_embeddings), float(msa))
            scale = scale * m * m
    return scale


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0, *,
               interleaved: bool = True) -> np.ndarray:
    """Rotate the rotary channels of ``x`` in place at the given positions.

    Pair ``i`` (channels ``2i, 2i+1``, or ``i, i + dim/2`` when ``interleaved`` is False) of
    token ``t`` is multiplied, as a complex number, by
    ``attention_factor * exp(1j * fp32(positions[t] * inv_freq[i]))`` (the angle rounded to fp32
    as torch does).

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, heads, dim] or [T, dim]
        May be a strided view (e.g. ``q.reshape(T, H, 192)[:, :, 128:]`` or
        ``latent[:, 512:]``); the last axis must be contiguous.  Modified in place.
    positions : np.ndarray, int64, shape [T]
        Non-negative positions.
    inv_freq : np.ndarray, float32, shape [dim // 2]
        From :func:`rope_inv_freq`.
    attention_factor : float
        cos/sin multiplier from :func:`rope_inv_freq`.
    interleaved : bool
        Pair layout (see above).

    Returns
    -------
    np.ndarray
        ``x`` itself.
    """
    check_f32(x, "x", contiguous=False)  # strided views are allowed here
    if x.ndim == 2:
        view = x[:, None, :]
    elif x.ndim == 3:
        view = x
    else:
        raise ValueError(f"x: expected 2 or 3 dimensions ([T, dim] or [T, heads, dim]), got shape {x.shape}")
    _check_i64(positions, "positions")
    check_f32(inv_freq, "inv_freq", 1)
    _C.rope_apply(view, positions, inv_freq, float(attention_factor), bool(interleaved))
    return x


# --------------------------------------------------------------------------- config / weights

@dataclass(frozen=True)
class MLAConfig:
    """Sizes and constants of one MLA layer.

    Parameters
    ----------
    num_heads : int
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim : int
        128 / 64 / 128 for every official config; ``qk_rope_head_dim`` is even.
    kv_lora_rank : int
        512.
    q_lora_rank : int or None
        None (or 0): a plain ``q_proj`` (V2-Lite); else the width of ``q_a_proj`` (1536).
    softmax_scale : float
        See :func:`mla_softmax_scale`.
    inv_freq : np.ndarray, float32, shape [qk_rope_head_dim // 2]
        See :func:`rope_inv_freq`.
    rope_attention_factor : float
        cos/sin multiplier from :func:`rope_inv_freq`.
    rms_norm_eps : float
        eps of ``q_a_layernorm`` and ``kv_a_layernorm``.  transformers and DeepSeek's own code
        build these two norms with the default 1e-6 whatever ``config.rms_norm_eps`` says.
    rope_interleave : bool
        Rotary pair layout (True: DeepSeek's interleaved pairs).
    """

    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    q_lora_rank: Optional[int]
    softmax_scale: float
    inv_freq: np.ndarray = field(repr=False)
    rope_attention_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        for name in ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number, got {self.qk_rope_head_dim}")
        ql = self.q_lora_rank
        if ql is not None and (isinstance(ql, bool) or not isinstance(ql, (int, np.integer)) or ql < 0):
            raise ValueError(f"q_lora_rank: expected None or an int >= 0, got {ql!r}")
        for name in ("softmax_scale", "rope_attention_factor"):
            val = getattr(self, name)
            if not isinstance(val, (float, int, np.floating)) or not math.isfinite(val) or val <= 0:
                raise ValueError(f"{name}: expected a finite number > 0, got {val!r}")
        if not isinstance(self.rms_norm_eps, (float, int, np.floating)) or not 0 <= self.rms_norm_eps <= 1:
            raise ValueError(f"rms_norm_eps: expected 0 <= eps <= 1, got {self.rms_norm_eps!r}")
        f = self.inv_freq
        if not isinstance(f, np.ndarray) or f.dtype != np.float32:
            raise TypeError("inv_freq: expected a float32 numpy array (see rope_inv_freq)")
        if f.shape != (self.qk_rope_head_dim // 2,):
            raise ValueError(f"inv_freq: expected shape ({self.qk_rope_head_dim // 2},), got {f.shape}")
        if not f.flags.c_contiguous:
            raise ValueError("inv_freq: expected a C-contiguous array")

    @property
    def qk_head_dim(self) -> int:
        """``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of a latent cache row: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def q_lora(self) -> int:
        """``q_lora_rank`` with None as 0."""
        return int(self.q_lora_rank or 0)

    @classmethod
    def from_hf_config(cls, config: Any) -> "MLAConfig":
        """Build from a transformers ``DeepseekV2Config`` / ``DeepseekV3Config`` or a config.json dict.

        Accepts both the hub spelling (``rope_theta`` + ``rope_scaling``) and the transformers-5
        one (``rope_parameters``).  ``rope_interleave`` (V3 configs) defaults to True.

        Parameters
        ----------
        config : Mapping or object with attributes
        """
        def need(key: str) -> Any:
            val = _get(config, key)
            if val is None:
                raise ValueError(f"config: missing field {key!r}")
            return val

        rope_dim = int(_get(config, "qk_rope_head_dim", 64))
        nope = int(_get(config, "qk_nope_head_dim", 128))
        rp = _get(config, "rope_parameters")
        if not rp:
            rp = _get(config, "rope_scaling")
        theta = _get(config, "rope_theta")
        if isinstance(rp, Mapping) and rp.get("rope_theta") is not None:
            theta = rp["rope_theta"]
        theta = float(theta if theta is not None else 10000.0)
        max_pos = _get(config, "max_position_embeddings")
        inv_freq, af = rope_inv_freq(rope_dim, theta, rp, max_position_embeddings=max_pos)
        scale = mla_softmax_scale(nope + rope_dim, rp, max_position_embeddings=max_pos)
        ql = _get(config, "q_lora_rank")
        ri = _get(config, "rope_interleave")
        return cls(
            num_heads=int(need("num_attention_heads")),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope_dim,
            v_head_dim=int(_get(config, "v_head_dim", 128)),
            kv_lora_rank=int(need("kv_lora_rank")),
            q_lora_rank=None if not ql else int(ql),
            softmax_scale=scale,
            inv_freq=inv_freq,
            rope_attention_factor=af,
            rms_norm_eps=1e-6,
            rope_interleave=True if ri is None else bool(ri),
        )

    @classmethod
    def from_model_config(cls, config: Any) -> "MLAConfig":
        """Build from :class:`dsv2ext.config.ModelConfig` (anything with ``to_dict()`` giving the
        transformers-5 spelling, and an optional ``rope_interleave`` attribute)."""
        to_dict = getattr(config, "to_dict", None)
        if not callable(to_dict):
            raise TypeError(f"config: expected a ModelConfig (with to_dict()), got {type(config).__name__}")
        d = dict(to_dict())
        ri = getattr(config, "rope_interleave", None)
        if ri is not None:
            d["rope_interleave"] = bool(ri)
        return cls.from_hf_config(d)


_WEIGHT_FIELDS = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                  "kv_b_proj", "o_proj")


@dataclass
class MLAWeights:
    """Weights of one MLA layer (HF names, Linear weights ``[out, in]``).

    Each is a float32 ndarray or a :class:`dsv2ext.BF16` (projections may also be int8, int4 or FP8
    weights: ``dsv2ext.quant.Int8Weight``, ``dsv2ext.int4.Int4Weight``, :class:`dsv2ext.Fp8Weight`).  Give ``q_proj`` (no q compression, V2-Lite) or ``q_a_proj`` + ``q_a_layernorm`` +
    ``q_b_proj``.

    Attributes
    ----------
    kv_a_proj_with_mqa : [kv_lora_rank + qk_rope_head_dim, hidden]
    kv_a_layernorm : [kv_lora_rank]
    kv_b_proj : [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
    o_proj : [hidden, H * v_head_dim]
    q_proj : [H * qk_head_dim, hidden] or None
    q_a_proj : [q_lora_rank, hidden] or None
    q_a_layernorm : [q_lora_rank] or None
    q_b_proj : [H * qk_head_dim, q_lora_rank] or None
    """

    kv_a_proj_with_mqa: Weight
    kv_a_layernorm: Weight
    kv_b_proj: Weight
    o_proj: Weight
    q_proj: Optional[Weight] = None
    q_a_proj: Optional[Weight] = None
    q_a_layernorm: Optional[Weight] = None
    q_b_proj: Optional[Weight] = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Weight], prefix: str = "") -> "MLAWeights":
        """Pick the weights out of a name -> tensor mapping.

        Parameters
        ----------
        tensors : Mapping[str, Weight]
            E.g. a checkpoint's tensors; names ``prefix + "q_proj.weight"`` etc.
        prefix : str
            E.g. ``"model.layers.3.self_attn."``.
        """
        def get(name: str, required: bool) -> Optional[Weight]:
            key = f"{prefix}{name}.weight"
            if key in tensors:
                return tensors[key]
            if required:
                raise KeyError(f"tensors: missing {key!r}")
            return None

        return cls(
            kv_a_proj_with_mqa=get("kv_a_proj_with_mqa", True),
            kv_a_layernorm=get("kv_a_layernorm", True),
            kv_b_proj=get("kv_b_proj", True),
            o_proj=get("o_proj", True),
            q_proj=get("q_proj", False),
            q_a_proj=get("q_a_proj", False),
            q_a_layernorm=get("q_a_layernorm", False),
            q_b_proj=get("q_b_proj", False),
        )

    def validate(self, cfg: MLAConfig, hidden_size: Optional[int] = None) -> int:
        """Check every shape against ``cfg``; returns the hidden size.

        Raises
        ------
        ValueError / TypeError naming the weight.
        """
        d = hidden_size if hidden_size is not None else weight_shape(self.o_proj, "o_proj")[0]
        H = cfg.num_heads
        want: Dict[str, Optional[tuple]] = {
            "kv_a_proj_with_mqa": (cfg.latent_dim, d),
            "kv_a_layernorm": (cfg.kv_lora_rank,),
            "kv_b_proj": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
            "o_proj": (d, H * cfg.v_head_dim),
        }
        if cfg.q_lora:
            want.update({"q_a_proj": (cfg.q_lora, d), "q_a_layernorm": (cfg.q_lora,),
                         "q_b_proj": (H * cfg.qk_head_dim, cfg.q_lora), "q_proj": None})
        else:
            want.update({"q_proj": (H * cfg.qk_head_dim, d), "q_a_proj": None, "q_a_layernorm": None,
                         "q_b_proj": None})
        for name in _WEIGHT_FIELDS:
            w = getattr(self, name)
            shape = want[name]
            if shape is None:
                if w is not None:
                    raise ValueError(f"{name}: must be None when q_lora_rank is "
                                     f"{'set' if cfg.q_lora else 'None'}")
                continue
            if w is None:
                raise ValueError(f"{name}: missing (expected shape {shape})")
            got = tuple(weight_shape(w, name))
            if got != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {got}")
        return int(d)


def new_latent_cache(cfg: MLAConfig, batch: int, max_seq_len: int, dtype: str = "f32") -> Any:
    """A zeroed latent cache for one layer.

    Parameters
    ----------
    cfg : MLAConfig
    batch, max_seq_len : int
    dtype : {"f32", "bf16", "fp8"}
        Row format (see :mod:`dsv2ext.cache`).

    Returns
    -------
    np.ndarray float32 [batch, max_seq_len, kv_lora_rank + qk_rope_head_dim] ("f32"), a
    :class:`dsv2ext.BF16` of such a uint16 array ("bf16": bfloat16 rows), or an :class:`FP8Cache`.
    """
    if batch <= 0 or max_seq_len <= 0:
        raise ValueError(f"batch, max_seq_len: expected positive sizes, got {batch}, {max_seq_len}")
    shape = (int(batch), int(max_seq_len), cfg.latent_dim)
    if dtype == "f32":
        return np.zeros(shape, dtype=np.float32)
    if dtype == "bf16":
        return BF16(np.zeros(shape, dtype=np.uint16))
    if dtype == "fp8":
        return FP8Cache.zeros(shape[0], shape[1], cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    raise ValueError(f"dtype: expected 'f32', 'bf16' or 'fp8', got {dtype!r}")


# --------------------------------------------------------------------------- kernels

def mla_compress_kv(hidden: np.ndarray, kv_a_proj_with_mqa: Weight, kv_a_layernorm: Weight, cache: np.ndarray,
                    seq_ids: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray,
                    attention_factor: float = 1.0, *, eps: float = 1e-6, interleaved: bool = True,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """Latent KV compression of ``T`` new tokens, appended to the cache.

    ``[c_kv | k_pe] = hidden @ kv_a_proj_with_mqa.T``; row =
    ``[RMSNorm(c_kv) * kv_a_layernorm | rope(k_pe, positions)]``, written to
    ``cache[seq_ids[t], positions[t]]`` and returned.

    Parameters
    ----------
    hidden : np.ndarray, float32, shape [T, d]
        Normalized hidden states (after ``input_layernorm``).
    kv_a_proj_with_mqa : float32 ndarray or BF16, shape [kv_lora + rope, d]
    kv_a_layernorm : float32 ndarray or BF16, shape [kv_lora]
    cache : float32 ndarray, dsv2ext.BF16 or FP8Cache, shape [B, S_max, kv_lora + rope]
        Written in place (the rows rounded to the cache's format).
    seq_ids, positions : np.ndarray, int64, shape [T]
        ``0 <= seq_ids < B``, ``0 <= positions < S_max``, (seq_id, position) pairs distinct.
    inv_freq : np.ndarray, float32, shape [rope // 2]
    attention_factor : float
    eps : float
        RMSNorm eps (1e-6 in transformers for this norm).
    interleaved : bool
        Rotary pair layout.
    out : np.ndarray, float32, shape [T, kv_lora + rope], optional

    Returns
    -------
    np.ndarray, float32, shape [T, kv_lora + rope]
        The latent rows.
    """
    check_f32(hidden, "hidden", 2)
    cshape = _cache_shape(cache)
    _check_i64(seq_ids, "seq_ids")
    _check_i64(positions, "positions")
    nshape = weight_shape(kv_a_layernorm, "kv_a_layernorm")
    if len(nshape) != 1:
        raise ValueError(f"kv_a_layernorm: expected 1 dimension [kv_lora_rank], got shape {nshape}")
    out = new_out(out, (hidden.shape[0], cshape[2]))
    _C.mla_compress_kv(out, cache, hidden, seq_ids, positions, kv_a_proj_with_mqa, kv_a_layernorm, inv_freq,
                       int(nshape[0]), float(eps), float(attention_factor), bool(interleaved))
    return out


def _attention(q: np.ndarray, cache: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray, kv_b_proj: Weight,
               softmax_scale: float, mode: str, out: Optional[np.ndarray]) -> np.ndarray:
    check_f32(q, "q", 3)
    cshape = _cache_shape(cache)
    _check_i64(seq_ids, "seq_ids")
    _check_i64(positions, "positions")
    kshape = weight_shape(kv_b_proj, "kv_b_proj")
    if len(kshape) != 2:
        raise ValueError(f"kv_b_proj: expected 2 dimensions, got shape {kshape}")
    T, H, dqk = q.shape
    rope = cshape[2] - kshape[1]
    nope = dqk - rope
    if H <= 0 or kshape[0] % H or nope <= 0:
        raise ValueError(f"kv_b_proj: shape {kshape} does not fit q {q.shape} and cache {cshape}")
    v = kshape[0] // H - nope
    out = new_out(out, (T, H, max(v, 1)))
    _C.mla_attention(out, q, cache, seq_ids, positions, kv_b_proj, float(softmax_scale), _mode_id(mode))
    return out


_ATTN_PARAMS = """
    Parameters
    ----------
    q : np.ndarray, float32, shape [T, H, nope + rope]
        Per head ``[q_nope | q_pe]`` with ``q_pe`` already rotated (:func:`apply_rope`).
    cache : float32 ndarray, dsv2ext.BF16 or FP8Cache, shape [B, S_max, kv_lora + rope]
        Latent cache; rows ``0 .. positions[t]`` of ``seq_ids[t]`` must be filled.
    seq_ids, positions : np.ndarray, int64, shape [T]
        ``0 <= seq_ids < B``, ``0 <= positions < S_max``; any order, several tokens per sequence.
    kv_b_proj : float32 ndarray or BF16, shape [H * (nope + v), kv_lora]
    softmax_scale : float
        :func:`mla_softmax_scale`.
    out : np.ndarray, float32, shape [T, H, v], optional

    Returns
    -------
    np.ndarray, float32, shape [T, H, v]
        Per-head attention outputs (reshape to [T, H * v] for ``o_proj``).

    The head dims follow from the shapes: ``kv_lora = kv_b_proj.shape[1]``,
    ``rope = cache.shape[2] - kv_lora``, ``nope = q.shape[2] - rope``,
    ``v = kv_b_proj.shape[0] / H - nope``.
"""


def mla_attention_absorbed(q: np.ndarray, cache: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray,
                           kv_b_proj: Weight, softmax_scale: float, *,
                           out: Optional[np.ndarray] = None) -> np.ndarray:
    return _attention(q, cache, seq_ids, positions, kv_b_proj, softmax_scale, "absorbed", out)


mla_attention_absorbed.__doc__ = (
    """MLA attention in absorbed form over the latent cache (the decode form).

    ``q_lat_h = W_UK_h^T q_nope_h``; scores ``q_lat_h . c_j + q_pe_h . k_pe_j`` over rows
    ``j <= positions[t]``; fp32 softmax of ``softmax_scale * scores``;
    ``o_h = W_UV_h sum_j p_j c_j``.  All heads of a token are one small GEMM against the rows;
    long contexts are split over threads and merged.
""" + _ATTN_PARAMS)


def mla_attention_decompressed(q: np.ndarray, cache: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray,
                               kv_b_proj: Weight, softmax_scale: float, *,
                               out: Optional[np.ndarray] = None) -> np.ndarray:
    return _attention(q, cache, seq_ids, positions, kv_b_proj, softmax_scale, "decompressed", out)


mla_attention_decompressed.__doc__ = (
    """MLA attention in the ordinary (non-absorbed) form (the prefill form).

    Per sequence, ``K_nope`` and ``V`` are decompressed from the cached latent rows with
    ``kv_b_proj`` (sgemm); per head, causal attention with head dims ``nope + rope`` / ``v``
    (``k = [k_nope | k_pe]``, sgemm for the products, fp32 softmax).
""" + _ATTN_PARAMS)


def mla_attention(q: np.ndarray, cache: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray,
                  kv_b_proj: Weight, softmax_scale: float, mode: str = "auto", *,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    return _attention(q, cache, seq_ids, positions, kv_b_proj, softmax_scale, mode, out)


mla_attention.__doc__ = (
    """MLA attention; ``mode`` = "auto" (cheaper form per sequence, see
    :func:`mla_attention_flops`), "absorbed" or "decompressed".
""" + _ATTN_PARAMS)


def mla_attention_flops(cfg: MLAConfig, positions: np.ndarray) -> Dict[str, float]:
    """FLOP estimates of both forms for the new tokens of ONE sequence.

    With ``n_new`` tokens, ``n_ctx = max(positions) + 1`` and ``S = sum(positions + 1)``::

        absorbed     = 2 H (n_new nope kv_lora + S (kv_lora + rope) + S kv_lora + n_new kv_lora v)
        decompressed = 2 H (n_ctx kv_lora (nope + v) + S (nope + rope) + S v)

    ``mode="auto"`` runs the absorbed form for a sequence when ``absorbed <= decompressed``.

    Parameters
    ----------
    cfg : MLAConfig
    positions : np.ndarray, int64, shape [n_new]

    Returns
    -------
    dict with float entries "absorbed" and "decompressed".
    """
    _check_i64(positions, "positions")
    if positions.size and positions.min() < 0:
        raise ValueError("positions: expected non-negative positions")
    n = int(positions.size)
    n_ctx = int(positions.max()) + 1 if n else 0
    s = int((positions + 1).sum()) if n else 0
    dims = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    return {"absorbed": _C.mla_flops(True, n, n_ctx, s, *dims),
            "decompressed": _C.mla_flops(False, n, n_ctx, s, *dims)}


def mla_choose_mode(cfg: MLAConfig, positions: np.ndarray) -> str:
    """The form ``mode="auto"`` runs for a sequence whose new tokens sit at ``positions``.

    Returns
    -------
    "absorbed" or "decompressed"
    """
    f = mla_attention_flops(cfg, positions)
    return "absorbed" if f["absorbed"] <= f["decompressed"] else "decompressed"


def mla_attention_block(hidden: np.ndarray, weights: MLAWeights, cfg: MLAConfig, cache: np.ndarray,
                        seq_ids: np.ndarray, positions: np.ndarray, mode: str = "auto",
                        out: Optional[np.ndarray] = None) -> np.ndarray:
    """The whole MLA attention block of a layer, in one call.

    ``hidden`` (already ``input_layernorm``-ed) -> ``q`` (``q_proj``, or ``q_a_proj`` ->
    ``q_a_layernorm`` -> ``q_b_proj``), ``q_pe`` rotated at ``positions``; the latent rows of the
    ``T`` tokens written to ``cache[seq_ids, positions]`` (:func:`mla_compress_kv`); attention
    over rows ``0 .. positions[t]`` of each token's sequence (:func:`mla_attention`);
    ``o_proj``.  Equals transformers' ``DeepseekV2Attention`` (and ``DeepseekV3Attention``) output.

    Parameters
    ----------
    hidden : np.ndarray, float32, shape [T, d]
    weights : MLAWeights
        float32 or BF16 tensors (shapes checked against ``cfg``).
    cfg : MLAConfig
    cache : float32 ndarray, dsv2ext.BF16 or FP8Cache, shape [B, S_max, kv_lora + rope]
        Updated in place.
    seq_ids, positions : np.ndarray, int64, shape [T]
        Ragged batch: any mix of sequences; (seq_id, position) pairs distinct.
    mode : {"auto", "absorbed", "decompressed"}
    out : np.ndarray, float32, shape [T, d], optional

    Returns
    -------
    np.ndarray, float32, shape [T, d]
    """
    if not isinstance(weights, MLAWeights):
        raise TypeError(f"weights: expected MLAWeights, got {type(weights).__name__}")
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"cfg: expected MLAConfig, got {type(cfg).__name__}")
    check_f32(hidden, "hidden", 2)
    _cache_shape(cache)
    _check_i64(seq_ids, "seq_ids")
    _check_i64(positions, "positions")
    args = attention_block_args(weights, cfg, hidden.shape[1], mode)
    out = new_out(out, hidden.shape)
    _C.mla_attention_block(out, hidden, cache, seq_ids, positions, *args)
    return out


def attention_block_args(weights: MLAWeights, cfg: MLAConfig, hidden_size: int, mode: str = "auto") -> tuple:
    """The fixed arguments of the attention-block kernel for one layer, checked once.

    ``dsv2ext._C.mla_attention_block(out, hidden, cache, seq_ids, positions, *args)`` then runs
    the block like :func:`mla_attention_block` without re-checking the weights in Python on every
    call (the kernel's binding still checks every argument).  For callers that run the same
    layer for every token (the model's decode loop).

    Returns
    -------
    tuple
    """
    if not isinstance(weights, MLAWeights):
        raise TypeError(f"weights: expected MLAWeights, got {type(weights).__name__}")
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"cfg: expected MLAConfig, got {type(cfg).__name__}")
    weights.validate(cfg, hidden_size)
    return (cfg.inv_freq, weights.q_proj, weights.q_a_proj, weights.q_a_layernorm, weights.q_b_proj,
            weights.kv_a_proj_with_mqa, weights.kv_a_layernorm, weights.kv_b_proj, weights.o_proj,
            cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora,
            float(cfg.rms_norm_eps), float(cfg.softmax_scale), float(cfg.rope_attention_factor),
            bool(cfg.rope_interleave), _mode_id(mode))


def release_scratch_memory() -> None:
    """Free the work buffers the kernels keep between calls.

    Large temporaries of the MLA kernels (decompressed keys, absorbed queries, ...) are kept
    after a call, up to 256 MiB in all, so that the next call does not pay the page faults of
    fresh memory; this returns them to the system (e.g. after a long prompt).
    """
    _C.scratch_trim()
