"""Weight-only quantization: int8 with per-block absmax scales, int4 (dsv2ext.int4), recipes, checkpoints.

Scheme (``quant_method = "dsv2ext-int8"``)
------------------------------------------
Each row of a Linear weight ``W [rows, cols]`` is cut into blocks of
``group`` consecutive columns (32 by default).  Block ``b`` of row ``r``
stores one float32 scale and ``group`` int8 codes::

    s[r, b] = max |W[r, b*group : (b+1)*group]| / 127      (float32 division)
    q[r, c] = clip(rint(W[r, c] / s[r, b]), -127, 127)     (float32 division,
                                                             round half to even)
    W'[r, c] = q[r, c] * s[r, b]                            (dequantized)

(``q = 0`` where a block is all zeros).  Every step is one correctly rounded
float32 operation, so :func:`quantize_int8` (C, threaded) and
:func:`quantize_int8_reference` (NumPy) give bit-identical results.

Only activations x weights products are quantized: every Linear of the
model (attention projections, dense MLP, routed and shared experts,
``lm_head``).  The token embedding, the RMSNorm weights, the MoE router
(``mlp.gate``, so that routing decisions do not move) and V3's correction
bias keep their dtype.

Activations: products with many activation rows (prefill) dequantize panels
of the weight and run fp32 sgemm.  The row-dot kernels (decode) quantize
each activation row once per call to int16 with one scale per weight block
and sum ``q_w * q_x`` exactly in int32 (about 2x less compute than
dequantizing in registers; ~1e-5 relative change of a dot product), or,
with ``set_int8_activations("fp32")``, compute exactly what a float32 model
with the dequantized weights computes (up to summation order).

Checkpoint format
-----------------
:func:`save_quantized` writes Hugging Face safetensors in which each
quantized weight ``<name>`` (e.g. ``model.layers.0.mlp.down_proj.weight``)
is an ``I8`` tensor of the weight's shape plus an ``F32`` tensor
``<name>.scales`` of shape ``[rows, cols / group]``, and adds to config.json::

    "quantization_config": {"quant_method": "dsv2ext-int8", "group_size": 32, "bits": 8, ...}

:func:`load_quantized_tensor` reads such a pair back as an :class:`Int8Weight`
(memory-mapped, no re-quantization).

Recipes (``dtype=`` of :func:`dsv2ext.load`, ``recipe=`` here)
-------------------------------------------------------------
* ``"int8"``: every Linear weight int8.
* ``"int4"``: every Linear weight in the int4 format of :mod:`dsv2ext.int4`
  (4.625 bits per weight), except three that stay int8: ``kv_b_proj`` (the
  absorbed attention reads it per head, transposed, and it is ~2.5% of the
  bytes read per token; an int4 ``kv_b_proj`` passed by hand is computed
  correctly, on a slower path) and the ``down_proj`` of the dense MLPs and of
  the shared experts, read by every token (as llama.cpp's Q4_K_M gives its
  ``ffn_down`` more bits; on the bundled model: held-out perplexity 9.767
  instead of 9.787 with them in int4, for 5.50 instead of 5.26 bits per weight
  read per token).
* ``"int4-mixed"``: the routed experts int4 (most of the bytes of a MoE
  model), attention, shared experts, dense MLPs and ``lm_head`` int8.
* ``"fp8"``: the DeepSeek-V3 format of :mod:`dsv2ext.fp8` (float8 e4m3 with
  128x128 block scales) for every Linear weight but ``lm_head``, which keeps its
  dtype as in DeepSeek-V3's files; :func:`save_quantized` writes such a model in
  DeepSeek-V3's layout.

The router, the norms and the embeddings always keep their dtype.
int4 checkpoints (``quant_method = "dsv2ext-int4"``, both int4 recipes) store
each int4 weight ``<name>`` as one ``U8`` tensor of its packed rows
``[rows, int4_row_bytes(cols)]`` (codes and scales together, see
:mod:`dsv2ext.int4`) and each int8 weight as in ``dsv2ext-int8``: the dtype of
a tensor is the dtype of what is stored (``U8``: int4, ``I8`` + ``.scales``:
int8, ``BF16`` / ``F32``: not quantized).
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import shutil
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from ._native import _C
from .dtypes import BF16, TaggedArray, float32_to_bf16_bits
from .fp8 import Fp8Weight, quantize_fp8
from .int4 import Int4Weight, int4_row_bytes, quantize_int4

__all__ = ["Int8Weight", "Int4Weight", "QUANT_METHOD", "QUANT_METHOD_INT4", "RECIPES", "DEFAULT_GROUP", "quantize_int8", "quantize_int8_reference",
           "dequantize", "get_int8_activations", "set_int8_activations", "quantize_act16_reference",
           "linear_int8_reference", "row_dot_limits", "quantize_model_weights", "save_quantized", "read_quantization_config",
           "load_quantized_tensor", "is_scales_tensor", "SCALES_SUFFIX", "stacked_experts"]

QUANT_METHOD = "dsv2ext-int8"
QUANT_METHOD_INT4 = "dsv2ext-int4"
RECIPES = ("int8", "int4", "int4-mixed", "fp8")
DEFAULT_GROUP = 32
SCALES_SUFFIX = ".scales"


class Int8Weight(TaggedArray):
    """An int8 block-quantized weight: ``W[..., r, c] = data[..., r, c] * scales[..., r, c // group]``.

    Parameters
    ----------
    data : np.ndarray int8 [..., rows, cols]
        The codes (not copied).
    scales : np.ndarray float32 [..., rows, cols // group]
        One scale per block of ``group`` columns (not copied); its last
        dimension must divide ``cols``.

    Notes
    -----
    ``nbytes`` is the size of the int8 codes only (like :class:`BF16`'s, the
    payload); ``scales_nbytes`` and ``total_nbytes`` add the scales.
    """

    __slots__ = ("scales",)
    __dsv2_dtype__ = "int8"

    def __init__(self, data: np.ndarray, scales: np.ndarray) -> None:
        if not isinstance(data, np.ndarray) or data.dtype != np.int8:
            raise TypeError(f"Int8Weight: data: expected a numpy int8 array, got "
                            f"{getattr(data, 'dtype', type(data).__name__)}")
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float32:
            raise TypeError(f"Int8Weight: scales: expected a numpy float32 array, got "
                            f"{getattr(scales, 'dtype', type(scales).__name__)}")
        if data.ndim < 2:
            raise ValueError(f"Int8Weight: data: expected at least 2 dimensions [..., rows, cols], got shape {data.shape}")
        if (scales.ndim != data.ndim or scales.shape[:-1] != data.shape[:-1] or scales.shape[-1] < 1
                or data.shape[-1] % scales.shape[-1]):
            raise ValueError(f"Int8Weight: scales: expected shape [{', '.join(map(str, data.shape[:-1]))}, "
                             f"cols / group] with a last dimension dividing {data.shape[-1]}, got {scales.shape}")
        self.data = data
        self.scales = scales

    @property
    def group(self) -> int:
        """Columns per scale block."""
        return self.data.shape[-1] // self.scales.shape[-1]

    @property
    def scales_nbytes(self) -> int:
        return self.scales.nbytes

    def to_float32(self) -> np.ndarray:
        """The dequantized weight (float32, a new array)."""
        return dequantize(self)

    def __getitem__(self, idx: Any) -> "Int8Weight":
        """Index the leading (stacking) dimensions only, e.g. ``w[e]`` of a stacked ``[E, rows, cols]``."""
        if self.ndim < 3:
            raise IndexError("Int8Weight: only stacked weights [..., rows, cols] can be indexed (by their leading dims)")
        if not isinstance(idx, (int, np.integer, slice)):
            raise IndexError("Int8Weight: index the first dimension with an int or a slice")
        return Int8Weight(self.data[idx], self.scales[idx])

    def __repr__(self) -> str:
        return f"Int8Weight(shape={self.data.shape}, group={self.group})"


# ---------------------------------------------------------------------------- tensors

def _as_float32(w: Any, name: str) -> np.ndarray:
    if isinstance(w, BF16):
        return w.to_float32()
    if isinstance(w, np.ndarray):
        if w.dtype == np.uint16:
            raise TypeError(f"{name}: a bare uint16 array is not taken as bfloat16; wrap it as dsv2ext.BF16(array)")
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"{name}: expected a floating-point array or a dsv2ext.BF16, got dtype {w.dtype}")
        return np.asarray(w, dtype=np.float32)
    raise TypeError(f"{name}: expected a float32 numpy array or a dsv2ext.BF16, got {type(w).__name__}")


def _check_group(shape: Tuple[int, ...], group: Any, name: str) -> int:
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group: expected a positive int, got {group!r}")
    if len(shape) < 2:
        raise ValueError(f"{name}: expected a weight of at least 2 dimensions [..., rows, cols], got shape {shape}")
    if shape[-1] % group:
        raise ValueError(f"group: {group} does not divide the {shape[-1]} columns of {name} (shape {shape})")
    return int(group)


def quantize_int8_reference(w: Any, group: int = DEFAULT_GROUP) -> Int8Weight:
    """NumPy model of :func:`quantize_int8` (same float32 operations, same bits).

    Parameters
    ----------
    w : np.ndarray (floating) or BF16, shape [..., rows, cols]
    group : int
        Columns per scale block; must divide ``cols``.

    Returns
    -------
    Int8Weight
    """
    x = _as_float32(w, "w")
    group = _check_group(x.shape, group, "w")
    if not np.isfinite(x).all():
        raise ValueError("w: holds NaN or Inf values; they cannot be quantized")
    *lead, cols = x.shape
    g = x.reshape(*lead, cols // group, group)
    s = (np.abs(g).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(g / s[..., None])
    q = np.where(s[..., None] > 0, np.clip(q, -127, 127), 0).astype(np.int8)
    return Int8Weight(q.reshape(x.shape), s)


def quantize_int8(w: Any, group: int = DEFAULT_GROUP) -> Int8Weight:
    """Quantize a weight to int8 with one absmax scale per ``group`` columns (C kernel, threaded).

    Round half to even (``rint``), codes in [-127, 127]; bit-identical to
    :func:`quantize_int8_reference`.

    Parameters
    ----------
    w : np.ndarray float32 (other float dtypes are converted) or BF16, shape [..., rows, cols]
    group : int
        Columns per scale block; must divide ``cols``.

    Returns
    -------
    Int8Weight with data int8 [..., rows, cols] and scales float32 [..., rows, cols / group].

    Raises
    ------
    ValueError
        ``group`` does not divide ``cols``, or ``w`` holds NaN / Inf.
    """
    if isinstance(w, Int8Weight):
        raise TypeError("w: already an Int8Weight")
    shape = tuple(w.shape) if isinstance(w, (np.ndarray, BF16)) else None
    if shape is None:
        raise TypeError(f"w: expected a float32 numpy array or a dsv2ext.BF16, got {type(w).__name__}")
    group = _check_group(shape, group, "w")
    if isinstance(w, BF16):
        src: Any = BF16(np.ascontiguousarray(w.data).reshape(-1, shape[-1]))
    else:
        if w.dtype == np.uint16:
            raise TypeError("w: a bare uint16 array is not taken as bfloat16; wrap it as dsv2ext.BF16(array)")
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"w: expected a floating-point array or a dsv2ext.BF16, got dtype {w.dtype}")
        src = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, shape[-1])
    q = np.empty(shape, np.int8)
    s = np.empty(shape[:-1] + (shape[-1] // group,), np.float32)
    _C.quantize_int8(q.reshape(-1, shape[-1]), s.reshape(-1, s.shape[-1]), src, group)
    return Int8Weight(q, s)


def dequantize(w: Any) -> np.ndarray:
    """float32 values of a weight: ``data * scales`` of an :class:`Int8Weight` (exact
    float32 products, the values the kernels use), an :class:`Int4Weight` dequantized
    (:mod:`dsv2ext.int4`), an :class:`dsv2ext.fp8.Fp8Weight` likewise, a BF16 widened,
    a float32 array copied.

    Parameters
    ----------
    w : Int8Weight, Int4Weight, Fp8Weight, BF16 or np.ndarray float32, shape [..., rows, cols]

    Returns
    -------
    np.ndarray float32, same shape (a new array).
    """
    if isinstance(w, Int8Weight):
        shape = w.shape
        out = np.empty(shape, np.float32)
        src = Int8Weight(np.ascontiguousarray(w.data).reshape(-1, shape[-1]),
                         np.ascontiguousarray(w.scales).reshape(-1, w.scales.shape[-1]))
        _C.dequantize(out.reshape(-1, shape[-1]), src)
        return out
    if isinstance(w, (Int4Weight, Fp8Weight, BF16)):
        return w.to_float32()
    if isinstance(w, np.ndarray):
        return np.array(w, dtype=np.float32)
    raise TypeError(f"w: expected an Int8Weight, Int4Weight, Fp8Weight, BF16 or numpy array, got {type(w).__name__}")


def _release_mapped_pages(arr: Any) -> None:
    """Drop this process's resident pages of a read-only view of a file mapping.

    The data stays valid (a later access re-reads it from the page cache or
    the file); the process's resident set no longer counts it.  Anything that
    is not a read-only view of an ``mmap.mmap`` is left alone.
    """
    if isinstance(arr, TaggedArray):
        arr = arr.data  # BF16, or the codes of a quantized weight
    if not isinstance(arr, np.ndarray) or arr.flags.writeable or arr.nbytes == 0:
        return
    base: Any = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or base.closed:
        return
    try:
        start = np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data
        off = arr.ctypes.data - start
        page = mmap.PAGESIZE
        lo = -(-off // page) * page
        hi = (off + arr.nbytes) // page * page
        if 0 <= lo < hi <= len(base):
            base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------- activations

def get_int8_activations() -> str:
    """How int8 row-dot kernels (few activation rows, e.g. decode) treat activations:
    ``"int16"`` or ``"fp32"`` (see :func:`set_int8_activations`)."""
    return _C.get_int8_activations()


def set_int8_activations(mode: str) -> str:
    """Choose the activations of the int8 row-dot kernels; returns the previous mode.

    ``"int16"`` (default; environment variable ``DSV2EXT_INT8_ACT=fp32``
    changes the default): each activation row is quantized once per call to
    int16 with one fp32 scale per block of the weight's ``group`` columns
    (``s = max|x_block| / 32767``, ``q = rint(x / s)``, see
    :func:`quantize_act16_reference`), block sums of ``q_w * q_x`` are exact
    in int32 and scaled in fp32: about 2x less compute than ``"fp32"``;
    activation rounding changes a dot product by ~1e-5 relative.
    ``"fp32"``: weights dequantized in registers times fp32 activations,
    exactly an fp32 product with the dequantized weights.  The int16 path
    needs AVX2 and a group that is a multiple of 16 (at most 512); other
    int8 matrices, and products with more than 8 activation rows (sgemm on
    dequantized panels), always use fp32 activations.  Process-wide; set it
    between calls.
    """
    if mode not in ("int16", "fp32"):
        raise ValueError(f"mode: expected 'int16' or 'fp32', got {mode!r}")
    prev = _C.get_int8_activations()
    _C.set_int8_activations(mode)
    return prev


def quantize_act16_reference(x: np.ndarray, group: int) -> Tuple[np.ndarray, np.ndarray]:
    """NumPy model of the kernels' int16 activation quantization.

    Parameters
    ----------
    x : np.ndarray float32 [T, K]
    group : int, dividing K

    Returns
    -------
    q : np.ndarray int16 [T, K]; s : np.ndarray float32 [T, K / group] with
    ``s = max|x_block| / 32767`` and ``q = rint(x / s)`` (float32 operations, half to even).
    """
    x = np.asarray(x, dtype=np.float32)
    T, K = x.shape
    g = x.reshape(T, K // group, group)
    s = (np.abs(g).max(axis=-1) / np.float32(32767)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[..., None] > 0, np.clip(np.rint(g / s[..., None]), -32767, 32767), 0)
    return q.astype(np.int16).reshape(T, K), s


def row_dot_limits() -> Tuple[int, int]:
    """``(linear, mlp)``: the most activation rows that ``ops.linear`` / the SwiGLU MLP
    (and each MoE expert) run on the row-dot kernels; more rows use sgemm on
    dequantized panels (always fp32 activations)."""
    return tuple(_C.row_dot_limits())


def _act16_used(w: Int8Weight, rows: int) -> bool:
    from .threads import get_isa

    g = w.group
    return (rows <= row_dot_limits()[0] and get_int8_activations() == "int16" and g % 16 == 0 and g <= 512
            and get_isa() != "portable")


def linear_int8_reference(x: np.ndarray, w: Int8Weight, *, act16: Optional[bool] = None) -> np.ndarray:
    """float64 model of ``dsv2ext.ops.linear(x, w)`` for an int8 weight.

    With int16 activations (the path the kernels take for ``x`` of at most
    ``row_dot_limits()[0]`` rows in ``"int16"`` mode, see :func:`set_int8_activations`; force it with
    ``act16``): ``sum_b (s_w * s_x)[b] * sum_{c in b} q_w * q_x`` from
    :func:`quantize_act16_reference`; otherwise ``x @ dequantize(w).T``.

    Parameters
    ----------
    x : np.ndarray float32 [T, K]
    w : Int8Weight [N, K]

    Returns
    -------
    np.ndarray float64 [T, N]
    """
    if act16 is None:
        act16 = _act16_used(w, x.shape[0])
    if not act16:
        return x.astype(np.float64) @ dequantize(w).astype(np.float64).T
    g = w.group
    qx, sx = quantize_act16_reference(x, g)
    N, K = w.shape
    T = x.shape[0]
    blocks = np.einsum("nbg,tbg->tnb", w.data.reshape(N, K // g, g).astype(np.int64),
                       qx.reshape(T, K // g, g).astype(np.int64))
    return (blocks * (w.scales.astype(np.float64)[None] * sx.astype(np.float64)[:, None])).sum(-1)


# ---------------------------------------------------------------------------- whole model

def _group_for(cols: int, group: int) -> int:
    """The block size used for a matrix of ``cols`` columns: ``group`` when it
    divides ``cols``, else ``gcd(cols, group)`` (e.g. 16 for 48 columns)."""
    return group if cols % group == 0 else math.gcd(cols, group)


def _is_float_weight(w: Any) -> bool:
    return isinstance(w, BF16) or (isinstance(w, np.ndarray) and np.issubdtype(w.dtype, np.floating))


def _float_src(w: Any) -> Any:
    """A 2-D-reshapeable contiguous float32 array or BF16 of a float weight (no copy when it already is one)."""
    return BF16(np.ascontiguousarray(w.data)) if isinstance(w, BF16) else np.ascontiguousarray(w, np.float32)


def _quant(w: Any, group: int, release: bool, kind: str = "int8") -> Any:
    """One weight to ``kind`` ("int8" / "int4" / "fp8"; "keep": as it is); int8 / int4 weights
    are kept as they are, FP8 ones too for "fp8" (for int8 / int4: from their exact values)."""
    if w is None or kind == "keep" or isinstance(w, (Int8Weight, Int4Weight)) or (
            kind == "fp8" and isinstance(w, Fp8Weight)):
        return w
    src = w.to_float32() if isinstance(w, Fp8Weight) else w
    if not _is_float_weight(src):
        raise TypeError(f"cannot quantize a weight of type {type(w).__name__}")
    if kind == "fp8":
        q = quantize_fp8(src)
    else:
        q = quantize_int4(src) if kind == "int4" else quantize_int8(src, _group_for(w.shape[-1], group))
    if release:
        _release_mapped_pages(w)
    return q


def _quant_experts(experts: List[Any], group: int, release: bool, kind: str = "int8") -> List[Any]:
    """Routed experts quantized into two stacked buffers per layer (gate_up [E, 2I, d],
    down [E, d, I]); each expert's weights are views, gate and up of an expert adjacent.
    One expert at a time: the source pages of an expert are released (``release``)
    before the next one is read."""
    from .weights import MLPWeights

    if kind == "fp8" or not experts or not all(_is_float_weight(e.gate_proj) and _is_float_weight(e.up_proj)
                                               and _is_float_weight(e.down_proj) for e in experts):
        # FP8 experts keep one matrix per tensor (the V3 layout: each has its own block scales)
        return [dataclasses.replace(e, gate_proj=_quant(e.gate_proj, group, release, kind),
                                    up_proj=_quant(e.up_proj, group, release, kind),
                                    down_proj=_quant(e.down_proj, group, release, kind)) for e in experts]
    E = len(experts)
    I, d = experts[0].gate_proj.shape
    for i, e in enumerate(experts):
        if e.gate_proj.shape != (I, d) or e.up_proj.shape != (I, d) or e.down_proj.shape != (d, I):
            raise ValueError(f"experts[{i}]: shapes {e.gate_proj.shape}, {e.up_proj.shape}, {e.down_proj.shape} "
                             f"differ from expert 0's ({I}, {d}), ({I}, {d}), ({d}, {I})")
    out = []
    if kind == "int4":
        gu = np.empty((E, 2 * I, int4_row_bytes(d)), np.uint8)
        dn = np.empty((E, d, int4_row_bytes(I)), np.uint8)
        for i, e in enumerate(experts):
            _C.quantize_int4(gu[i, :I], _float_src(e.gate_proj))
            _C.quantize_int4(gu[i, I:], _float_src(e.up_proj))
            _C.quantize_int4(dn[i], _float_src(e.down_proj))
            if release:
                for w in (e.gate_proj, e.up_proj, e.down_proj):
                    _release_mapped_pages(w)
            out.append(MLPWeights(Int4Weight(gu[i, :I], d), Int4Weight(gu[i, I:], d), Int4Weight(dn[i], I)))
        return out
    g1, g2 = _group_for(d, group), _group_for(I, group)
    gu = np.empty((E, 2 * I, d), np.int8)
    gus = np.empty((E, 2 * I, d // g1), np.float32)
    dn = np.empty((E, d, I), np.int8)
    dns = np.empty((E, d, I // g2), np.float32)
    for i, e in enumerate(experts):
        for w, rows in ((e.gate_proj, slice(0, I)), (e.up_proj, slice(I, 2 * I))):
            _C.quantize_int8(gu[i, rows], gus[i, rows], _float_src(w), g1)
        _C.quantize_int8(dn[i], dns[i], _float_src(e.down_proj), g2)
        if release:
            for w in (e.gate_proj, e.up_proj, e.down_proj):
                _release_mapped_pages(w)
        out.append(MLPWeights(Int8Weight(gu[i, :I], gus[i, :I]), Int8Weight(gu[i, I:], gus[i, I:]),
                              Int8Weight(dn[i], dns[i])))
    return out


def _recipe_kinds(recipe: str) -> Dict[str, str]:
    """The dtype of each class of Linear weights under a recipe."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {', '.join(repr(r) for r in RECIPES)}, got {recipe!r}")
    if recipe == "fp8":  # DeepSeek-V3's FP8 files: every Linear but lm_head
        return dict(attn="fp8", kv_b="fp8", dense="fp8", experts="fp8", shared="fp8", lm_head="keep",
                    dense_down="fp8", shared_down="fp8")
    if recipe == "int8":
        kinds = dict(attn="int8", kv_b="int8", dense="int8", experts="int8", shared="int8", lm_head="int8")
    elif recipe == "int4":
        kinds = dict(attn="int4", kv_b="int8", dense="int4", experts="int4", shared="int4", lm_head="int4")
    else:
        kinds = dict(attn="int8", kv_b="int8", dense="int8", experts="int4", shared="int8", lm_head="int8")
    # the down projections of the dense MLPs and the shared experts (read by every token) keep 8 bits
    kinds.update(dense_down="int8", shared_down="int8")
    return kinds


def quantize_model_weights(weights: Any, group: int = DEFAULT_GROUP, *, release_source: bool = False,
                           recipe: str = "int8") -> Any:
    """Quantize the Linear weights of a model (a new ModelWeights; the input is not changed).

    Quantized: ``q_proj`` / ``q_a_proj`` / ``q_b_proj``, ``kv_a_proj_with_mqa``,
    ``kv_b_proj``, ``o_proj``, the dense MLPs, every routed expert, the shared
    experts, ``lm_head``, to the dtypes of ``recipe`` (see the module docs).
    Kept as they are: ``embed_tokens``, every RMSNorm weight, the MoE router
    ``gate`` (routing must not change) and the correction bias.  Weights that
    are already quantized (:class:`Int8Weight` / :class:`Int4Weight`) are kept;
    FP8 weights (a DeepSeek-V3 checkpoint) are kept by the "fp8" recipe and
    requantized from their exact values by the others.
    Tensor by tensor (one routed expert at a time): no more than one
    tensor is widened to float32 at any time.

    Parameters
    ----------
    weights : dsv2ext.weights.ModelWeights
    group : int
        int8 columns per scale block (default 32).  A matrix whose column count it
        does not divide uses ``gcd(cols, group)`` (e.g. 16 for 48 columns).
    release_source : bool
        After quantizing a weight that is a read-only view of a memory-mapped
        checkpoint, drop its pages from this process's resident set (keeps the
        peak memory of quantize-at-load near the size of the quantized model).
    recipe : {"int8", "int4", "int4-mixed", "fp8"}

    Returns
    -------
    ModelWeights whose Linear weights are :class:`Int8Weight` / :class:`Int4Weight` (the
    routed experts of a layer share two stacked buffers, see :func:`stacked_experts`) or
    :class:`dsv2ext.fp8.Fp8Weight` (one per tensor).
    """
    from .weights import ModelWeights, MLPWeights, MoEWeights

    if not isinstance(weights, ModelWeights):
        raise TypeError(f"weights: expected a dsv2ext.weights.ModelWeights, got {type(weights).__name__}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group: expected a positive int, got {group!r}")
    kinds = _recipe_kinds(recipe)
    group = int(group)

    def q(w: Any, cls: str) -> Any:
        return _quant(w, group, release_source, kinds[cls])

    def mlp(m: Any, cls: str) -> Any:
        return None if m is None else MLPWeights(q(m.gate_proj, cls), q(m.up_proj, cls), q(m.down_proj, cls + "_down"))

    layers = []
    for lw in weights.layers:
        a = lw.attn
        attn = dataclasses.replace(a, q_proj=q(a.q_proj, "attn"), q_a_proj=q(a.q_a_proj, "attn"),
                                   q_b_proj=q(a.q_b_proj, "attn"),
                                   kv_a_proj_with_mqa=q(a.kv_a_proj_with_mqa, "attn"),
                                   kv_b_proj=q(a.kv_b_proj, "kv_b"), o_proj=q(a.o_proj, "attn"))
        moe = None
        if lw.moe is not None:
            m = lw.moe
            moe = MoEWeights(gate=m.gate, experts=_quant_experts(m.experts, group, release_source, kinds["experts"]),
                             shared=mlp(m.shared, "shared"), correction_bias=m.correction_bias)
        layers.append(dataclasses.replace(lw, attn=attn, mlp=mlp(lw.mlp, "dense"), moe=moe))
    return ModelWeights(embed_tokens=weights.embed_tokens, norm=weights.norm, lm_head=q(weights.lm_head, "lm_head"),
                        layers=layers)


def stacked_experts(experts: List[Any]) -> Optional[Tuple[Any, Any]]:
    """The stacked ``(gate_up_proj [E, 2I, d], down_proj [E, d, I])`` behind the routed
    experts made by :func:`quantize_model_weights` (:class:`Int8Weight` or
    :class:`Int4Weight` pairs), or None when the experts are not views of such
    buffers (e.g. loaded from a checkpoint)."""
    if not experts:
        return None
    ws = [w for e in experts for w in (e.gate_proj, e.up_proj, e.down_proj)]
    int4 = all(isinstance(w, Int4Weight) for w in ws)
    if not int4 and not all(isinstance(w, Int8Weight) for w in ws):
        return None
    g0, d0 = experts[0].gate_proj, experts[0].down_proj
    gu, dn = g0.data.base, d0.data.base
    bases = (gu, dn) if int4 else (gu, g0.scales.base, dn, d0.scales.base)
    if not all(isinstance(b, np.ndarray) and b.ndim == 3 and b.shape[0] == len(experts) for b in bases):
        return None
    I = g0.shape[0]
    for i, e in enumerate(experts):
        if not (e.gate_proj.data.base is gu and e.up_proj.data.base is gu and e.down_proj.data.base is dn
                and e.gate_proj.data.ctypes.data == gu[i].ctypes.data
                and e.up_proj.data.ctypes.data == gu[i, I:].ctypes.data
                and e.down_proj.data.ctypes.data == dn[i].ctypes.data):
            return None
        if not int4:
            gus, dns = bases[1], bases[3]
            if not (e.gate_proj.scales.ctypes.data == gus[i].ctypes.data
                    and e.up_proj.scales.ctypes.data == gus[i, I:].ctypes.data
                    and e.down_proj.scales.ctypes.data == dns[i].ctypes.data):
                return None
    if int4:
        return Int4Weight(gu, g0.cols), Int4Weight(dn, d0.cols)
    return Int8Weight(gu, bases[1]), Int8Weight(dn, bases[3])


# ---------------------------------------------------------------------------- save / load

def _named_tensors(weights: Any, cfg: Any) -> Iterator[Tuple[str, Any]]:
    """(HF name, weight) of every tensor of the causal LM, as ``weights.expected_tensors`` lists them."""
    yield "model.embed_tokens.weight", weights.embed_tokens
    yield "model.norm.weight", weights.norm
    yield "lm_head.weight", weights.lm_head
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", lw.input_layernorm
        yield p + "post_attention_layernorm.weight", lw.post_attention_layernorm
        for f in dataclasses.fields(lw.attn):
            w = getattr(lw.attn, f.name)
            if w is not None:
                yield p + "self_attn." + f.name + ".weight", w
        m = p + "mlp."
        if lw.mlp is not None:
            for f in ("gate_proj", "up_proj", "down_proj"):
                yield m + f + ".weight", getattr(lw.mlp, f)
        if lw.moe is not None:
            yield m + "gate.weight", lw.moe.gate
            if lw.moe.correction_bias is not None:
                yield m + "gate.e_score_correction_bias", lw.moe.correction_bias
            for e, ex in enumerate(lw.moe.experts):
                for f in ("gate_proj", "up_proj", "down_proj"):
                    yield m + f"experts.{e}.{f}.weight", getattr(ex, f)
            if lw.moe.shared is not None:
                for f in ("gate_proj", "up_proj", "down_proj"):
                    yield m + f"shared_experts.{f}.weight", getattr(lw.moe.shared, f)


def _recipe_of(weights: Any) -> str:
    """The recipe name that describes already quantized weights ("custom" when none does)."""
    lm = weights.lm_head
    ex = [w for lw in weights.layers if lw.moe is not None for e in lw.moe.experts
          for w in (e.gate_proj, e.up_proj, e.down_proj)]
    if isinstance(lm, Int4Weight):
        return "int4"
    if isinstance(lm, Int8Weight) and ex and all(isinstance(w, Int4Weight) for w in ex):
        return "int4-mixed"
    return "int8" if isinstance(lm, Int8Weight) else "custom"


def save_quantized(model_or_weights: Any, directory: Union[str, "os.PathLike[str]"], *,
                   config: Any = None, group: int = DEFAULT_GROUP, recipe: Optional[str] = None,
                   max_shard_bytes: int = 5 * 10 ** 9) -> str:
    """Write an int8 / int4 / FP8 checkpoint that :func:`dsv2ext.load` reloads without re-quantizing.

    A model holding FP8 weights (:class:`dsv2ext.fp8.Fp8Weight`: loaded from a DeepSeek-V3
    checkpoint, or with ``dtype="fp8"``), or ``recipe="fp8"``, is written in DeepSeek-V3's
    layout (``<name>`` F8_E4M3 + ``<name>_scale_inv`` F32 and V3's ``quantization_config``,
    see :mod:`dsv2ext.fp8`); other models as dsv2ext-int8 / dsv2ext-int4.

    Parameters
    ----------
    model_or_weights : DeepseekV2 or ModelWeights
        Weights not yet quantized are quantized first (``recipe``, ``group``);
        quantized ones are written as they are.  From a model loaded from a
        directory, its config.json (original spelling), tokenizer files and
        generation_config.json are carried over.
    directory : str or os.PathLike
        Created if missing; must not be the directory the weights are read from.
    config : ModelConfig or dict, optional
        Required when passing bare ModelWeights (the model's own otherwise).
    group : int
        int8 block size for weights that still need quantizing (default 32).
    recipe : {None, "int8", "int4", "int4-mixed", "fp8"}
        For weights that still need quantizing (None: "fp8" when the model holds FP8
        weights, else "int8").  A checkpoint
        holding int4 weights gets ``quant_method = "dsv2ext-int4"``.
    max_shard_bytes : int
        Larger checkpoints are written as shards with model.safetensors.index.json.

    Returns
    -------
    str: the directory.
    """
    from .config import ModelConfig
    from .weights import ModelWeights

    src_dir = None
    if isinstance(model_or_weights, ModelWeights):
        weights = model_or_weights
        if config is None:
            raise TypeError("config: required when saving bare ModelWeights (a ModelConfig or a config dict)")
    elif hasattr(model_or_weights, "weights") and hasattr(model_or_weights, "config"):
        weights = model_or_weights.weights
        src_dir = getattr(model_or_weights, "path", None)
        if config is None:
            config = model_or_weights.config
    else:
        raise TypeError(f"model_or_weights: expected a DeepseekV2 or a ModelWeights, got {type(model_or_weights).__name__}")
    if isinstance(config, ModelConfig):
        cfg = config
        raw: Dict[str, Any] = {}
        if src_dir and os.path.isfile(os.path.join(src_dir, "config.json")):
            with open(os.path.join(src_dir, "config.json"), "r", encoding="utf-8") as f:
                raw = json.load(f)
        if not raw:
            raw = cfg.to_dict()
    elif isinstance(config, Mapping):
        raw = dict(config)
        cfg = ModelConfig.from_dict(raw)
    else:
        raise TypeError(f"config: expected a ModelConfig or a dict, got {type(config).__name__}")

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if src_dir and os.path.isdir(src_dir) and os.path.samefile(src_dir, directory):
        raise ValueError(f"directory: {directory!r} is the directory the model was loaded from; "
                         "write the quantized checkpoint elsewhere")
    holds_fp8 = any(isinstance(w, Fp8Weight) for _, w in _named_tensors(weights, cfg))
    qw = quantize_model_weights(weights, group, recipe=recipe or ("fp8" if holds_fp8 else "int8"))
    stored = {type(w) for _, w in _named_tensors(qw, cfg)}
    if Fp8Weight in stored and stored & {Int8Weight, Int4Weight}:
        raise ValueError("model_or_weights: holds both FP8 and int8 / int4 weights; a checkpoint takes one format")
    if Fp8Weight in stored:  # the DeepSeek-V3 layout (dsv2ext.fp8)
        from .fp8 import fp8_checkpoint_tensors
        tensors, qconf = fp8_checkpoint_tensors(qw, cfg)
        raw = dict(raw, quantization_config=qconf)
        _write_checkpoint(directory, tensors, raw, "fp8", src_dir, max_shard_bytes)
        return directory

    tensors: Dict[str, Any] = {}
    groups = set()
    n4 = 0
    for name, w in _named_tensors(qw, cfg):
        if isinstance(w, Int8Weight):
            tensors[name] = np.ascontiguousarray(w.data)
            tensors[name + SCALES_SUFFIX] = np.ascontiguousarray(w.scales)
            groups.add(w.group)
        elif isinstance(w, Int4Weight):
            tensors[name] = np.ascontiguousarray(w.data)
            n4 += 1
        elif isinstance(w, BF16):
            tensors[name] = BF16(np.ascontiguousarray(w.data))
        else:
            tensors[name] = np.ascontiguousarray(w)
    raw = dict(raw)
    if raw.get("tie_word_embeddings"):
        raw["tie_word_embeddings"] = False  # lm_head is stored (quantized) on its own
    q_group = max(groups) if groups else int(group)
    int8_scales = (f"<name>{SCALES_SUFFIX}: float32 [rows, cols / block]; block = group_size, or "
                   "gcd(cols, group_size) when group_size does not divide cols")
    not_converted = ["model.embed_tokens", "*norm*", "mlp.gate"]
    if n4:
        method = QUANT_METHOD_INT4
        raw["quantization_config"] = {
            "quant_method": method, "bits": 4, "group_size": 32, "super_block_size": 256,
            "recipe": _recipe_of(qw), "int8_group_size": q_group,
            "format": "U8 <name> [rows, 20 * ceil(cols / 256) + 32 * ceil(cols / 64)]: packed int4 rows "
                      "(bf16 d, dmin, 8 uint8 sub-scales and sub-mins per 256 columns, then 4-bit codes; "
                      "see dsv2ext.int4); I8 <name> with " + int8_scales + ": int8 as dsv2ext-int8",
            "modules_not_converted": not_converted}
    else:
        method = QUANT_METHOD
        raw["quantization_config"] = {
            "quant_method": method, "group_size": q_group, "bits": 8, "symmetric": True,
            "scales": int8_scales, "modules_not_converted": not_converted}
    _write_checkpoint(directory, tensors, raw, method, src_dir, max_shard_bytes)
    return directory


def _write_checkpoint(directory: str, tensors: Dict[str, Any], raw: Dict[str, Any], method: str,
                      src_dir: Optional[str], max_shard_bytes: int) -> None:
    """safetensors (sharded above max_shard_bytes), config.json and the source's tokenizer files."""
    from .safetensors import save_file, save_sharded

    total = sum(t.nbytes for t in tensors.values())
    meta = {"format": "pt", "quant_method": method}
    for old in os.listdir(directory):
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.unlink(os.path.join(directory, old))
    if total > max_shard_bytes:
        save_sharded(tensors, directory, max_shard_bytes, meta)
    else:
        save_file(tensors, os.path.join(directory, "model.safetensors"), meta)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
        f.write("\n")
    if src_dir:
        for fn in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            p = os.path.join(src_dir, fn)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(directory, fn))


def read_quantization_config(path: Union[str, "os.PathLike[str]"]) -> Optional[Dict[str, Any]]:
    """The ``quantization_config`` of a checkpoint written by :func:`save_quantized`, or None.

    Parameters
    ----------
    path : checkpoint directory (or its config.json)

    Returns
    -------
    dict with ``quant_method`` ``"dsv2ext-int8"`` (and an int ``group_size``) or
    ``"dsv2ext-int4"`` (``bits`` 4, ``group_size`` 32), or None when config.json has
    no such section (other quantization methods, e.g. V3's FP8, are not this
    module's and also give None).

    Raises
    ------
    ValueError
        A dsv2ext section with missing or bad fields.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg_path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") not in (QUANT_METHOD, QUANT_METHOD_INT4):
        return None
    g = qc.get("group_size")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"{cfg_path}: quantization_config.group_size: expected a positive int, got {g!r}")
    if qc["quant_method"] == QUANT_METHOD_INT4 and (qc.get("bits") != 4 or g != 32):
        raise ValueError(f"{cfg_path}: quantization_config: {QUANT_METHOD_INT4} needs bits 4 and group_size 32, "
                         f"got bits {qc.get('bits')!r}, group_size {g!r}")
    return dict(qc)


def is_scales_tensor(name: str, reader: Any) -> bool:
    """True for ``<name>.scales`` whose ``<name>`` is an I8 tensor of the checkpoint
    (the loader must not report it as an unexpected tensor)."""
    if not name.endswith(SCALES_SUFFIX):
        return False
    base = name[: -len(SCALES_SUFFIX)]
    return base in reader and reader.info(base)[0] == "I8"


def load_quantized_tensor(reader: Any, name: str, dtype: Optional[str] = None, *,
                          shape: Optional[Tuple[int, ...]] = None) -> Optional[Any]:
    """Read an int8 weight (and its ``<name>.scales``) or an int4 weight from a checkpoint.

    Parameters
    ----------
    reader : dsv2ext.safetensors.CheckpointReader
    name : str
        e.g. ``"model.layers.0.mlp.down_proj.weight"``.
    dtype : {None, "int8", "int4", "f32", "bf16"}
        None / "int8" / "int4": the stored :class:`Int8Weight` / :class:`Int4Weight`
        (memory-mapped views, no copy); "f32": dequantized; "bf16": dequantized
        and rounded to bfloat16.
    shape : tuple of int, optional
        The weight's shape [..., rows, cols]; required to read an int4 (``U8``)
        tensor, whose stored rows are packed.

    Returns
    -------
    Int8Weight / Int4Weight (or np.ndarray / BF16 for dtype f32 / bf16), or None
    when the tensor is neither I8 nor U8 (the caller loads it the usual way).

    Raises
    ------
    CheckpointError
        An I8 tensor without its scales, scales of the wrong dtype / shape, a U8
        tensor whose rows are not the packed int4 rows of ``shape``.
    """
    from .safetensors import CheckpointError

    if dtype not in (None, "int8", "int4", "f32", "bf16"):
        raise ValueError(f"dtype: expected None, 'int8', 'int4', 'f32' or 'bf16', got {dtype!r}")
    tag, stored = reader.info(name)
    stored = tuple(stored)
    if tag == "U8":
        if shape is None or len(shape) < 2:
            raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)!r} is U8 (int4); its shape "
                                  "[..., rows, cols] is needed to read it")
        want = tuple(shape[:-1]) + (int4_row_bytes(int(shape[-1])),)
        if stored != want:
            raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)!r} is U8 {list(stored)}; the packed "
                                  f"int4 rows of a {list(shape)} weight are U8 {list(want)} (dsv2ext-int4)")
        w4 = Int4Weight(reader.get(name, aligned=True), int(shape[-1]))
        if dtype == "f32":
            return w4.to_float32()
        if dtype == "bf16":
            return BF16(float32_to_bf16_bits(w4.to_float32()))
        return w4
    if tag != "I8":
        return None
    shape = stored
    sname = name + SCALES_SUFFIX
    if sname not in reader:
        raise CheckpointError(f"int8 tensor {name!r} in {reader.file_of(name)!r} has no {sname!r} "
                              "(float32 block scales) in the checkpoint")
    stag, sshape = reader.info(sname)
    sshape = tuple(sshape)
    if (stag != "F32" or len(shape) < 2 or len(sshape) != len(shape) or sshape[:-1] != shape[:-1]
            or sshape[-1] < 1 or shape[-1] % sshape[-1]):
        raise CheckpointError(f"tensor {sname!r} in {reader.file_of(sname)!r} is {stag} {list(sshape)}; expected "
                              f"F32 [{', '.join(map(str, shape[:-1]))}, cols / group] with a last dimension "
                              f"dividing {shape[-1]} (the scales of {name!r})")
    w = Int8Weight(reader.get(name, aligned=True), reader.get(sname, aligned=True))
    if dtype == "f32":
        return dequantize(w)
    if dtype == "bf16":
        return BF16(float32_to_bf16_bits(dequantize(w)))
    return w
