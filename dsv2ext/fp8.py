"""FP8 weights in the DeepSeek-V3 format, kept as FP8.

Format
------
A Linear weight ``W [rows, cols]`` is stored as float8 e4m3fn codes (one byte
each: 1 sign, 4 exponent, 3 mantissa bits; largest value 448; ``0x7f`` /
``0xff`` are NaN) and one float32 ``scale_inv`` per block of ``B0 x B1``
weights (``quantization_config.weight_block_size``, [128, 128] for
DeepSeek-V3; the last blocks of a row / column may be partial)::

    W[i, j] = e4m3(W8[i, j]) * scale_inv[i // B0, j // B1]

The kernels make every weight as that one float32 multiply (the e4m3 value
is exact in float32) and multiply it with float32 activations: a model with
:class:`Fp8Weight` weights computes the same numbers as a float32 model with
the dequantized weights, up to summation order.  The codes and scales stay
memory-mapped views of the checkpoint (1 byte per weight plus 4 bytes per
block of 16384 weights).

In checkpoints the codes are ``<name>`` (``F8_E4M3``) and the scales
``<name>_scale_inv`` (``F32`` ``[ceil(rows/B0), ceil(cols/B1)]``), with
``quantization_config = {"activation_scheme": "dynamic", "fmt": "e4m3",
"quant_method": "fp8", "weight_block_size": [128, 128]}`` in config.json.

Quantizing (``dsv2ext.load(path, dtype="fp8")``, ``dsv2ext.quant.quantize_model_weights(w,
recipe="fp8")`` or :func:`quantize_fp8`), per block::

    scale_inv = max |W over the block| / 448          (float32 division)
    W8 = e4m3(W / scale_inv)                          (float32 division, round to nearest even)

An all-zero block gets ``scale_inv = 1`` (its codes are 0: the block stays
exactly zero).  As in DeepSeek-V3's files, the token embedding, ``lm_head``,
the norms, the MoE router ``mlp.gate`` and the correction bias are not
quantized.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ._native import _C
from .dtypes import BF16, TaggedArray
from .safetensors import FP8E4M3, CheckpointError, fp8_e4m3_to_float32

__all__ = ["Fp8Weight", "DEFAULT_BLOCK", "quantization_config", "SCALE_SUFFIX", "e4m3_encode", "e4m3_decode",
           "e4m3_encode_reference", "quantize_fp8", "quantize_fp8_reference", "read_fp8_block",
           "load_fp8_tensor", "fp8_checkpoint_tensors"]

DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
E4M3_MAX = 448.0


def quantization_config(block: Tuple[int, int] = DEFAULT_BLOCK) -> Dict[str, Any]:
    """config.json's ``quantization_config`` of a V3-format FP8 checkpoint (DeepSeek-V3's own keys)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [int(block[0]), int(block[1])]}


def _check_block(block: Any, name: str = "block") -> Tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in block)):
        raise ValueError(f"{name}: expected two positive ints (rows, cols) of a scale block, got {block!r}")
    return int(block[0]), int(block[1])


def _scale_shape(shape: Sequence[int], block: Tuple[int, int]) -> Tuple[int, ...]:
    return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


class Fp8Weight(TaggedArray):
    """A float8 e4m3fn weight with 2-D block scales (the DeepSeek-V3 layout).

    ``W[..., i, j] = e4m3(data[..., i, j]) * scale_inv[..., i // block[0], j // block[1]]``

    Parameters
    ----------
    data : np.ndarray uint8 [..., rows, cols]
        The e4m3fn codes (raw bits; not copied).  An :class:`dsv2ext.safetensors.FP8E4M3` is unwrapped.
    scale_inv : np.ndarray float32 [..., ceil(rows / block[0]), ceil(cols / block[1])]
        One scale per block (not copied).
    block : (int, int)
        Rows and columns of a scale block (default (128, 128)).

    Notes
    -----
    ``nbytes`` is the size of the codes (like :class:`BF16`'s, the payload);
    ``scales_nbytes`` and ``total_nbytes`` add the scales.  A stacked weight
    ``[E, rows, cols]`` indexes by its leading dimension (``w[e]``).
    """

    __slots__ = ("scale_inv", "block")
    __dsv2_dtype__ = "fp8"

    def __init__(self, data: Any, scale_inv: np.ndarray, block: Sequence[int] = DEFAULT_BLOCK) -> None:
        if isinstance(data, FP8E4M3):
            data = data.data
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise TypeError(f"Fp8Weight: data: expected a numpy uint8 array of e4m3fn codes, got "
                            f"{getattr(data, 'dtype', type(data).__name__)}")
        if not isinstance(scale_inv, np.ndarray) or scale_inv.dtype != np.float32:
            raise TypeError(f"Fp8Weight: scale_inv: expected a numpy float32 array, got "
                            f"{getattr(scale_inv, 'dtype', type(scale_inv).__name__)}")
        b = _check_block(tuple(block) if isinstance(block, (tuple, list)) else block, "Fp8Weight: block")
        if data.ndim < 2:
            raise ValueError(f"Fp8Weight: data: expected at least 2 dimensions [..., rows, cols], got shape {data.shape}")
        want = _scale_shape(data.shape, b)
        if scale_inv.shape != want:
            raise ValueError(f"Fp8Weight: scale_inv: expected shape {list(want)} for codes of shape "
                             f"{list(data.shape)} and block {list(b)}, got {list(scale_inv.shape)}")
        self.data = data
        self.scale_inv = scale_inv
        self.block = b

    @property
    def scales_nbytes(self) -> int:
        return self.scale_inv.nbytes

    def to_float32(self) -> np.ndarray:
        """The dequantized weight (float32, a new array; the values the kernels use)."""
        out = np.empty(self.shape, np.float32)
        flat_d = self.data.reshape((-1,) + self.shape[-2:])
        flat_s = self.scale_inv.reshape((-1,) + self.scale_inv.shape[-2:])
        flat_o = out.reshape((-1,) + self.shape[-2:])
        for i in range(flat_d.shape[0]):
            _C.dequantize(flat_o[i], Fp8Weight(np.ascontiguousarray(flat_d[i]), np.ascontiguousarray(flat_s[i]),
                                               self.block))
        return out

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 values of the given rows of a 2-D weight (e.g. token embeddings), ``[len(rows), cols]``."""
        if self.ndim != 2:
            raise ValueError("Fp8Weight.take_rows: a 2-D weight is required")
        rows = np.asarray(rows, dtype=np.int64)
        cols = self.shape[1]
        scale = np.repeat(self.scale_inv[rows // self.block[0]], self.block[1], axis=1)[:, :cols]
        return fp8_e4m3_to_float32(self.data[rows]) * scale

    def __getitem__(self, idx: Any) -> "Fp8Weight":
        """Index the leading (stacking) dimensions only, e.g. ``w[e]`` of a stacked ``[E, rows, cols]``."""
        if self.ndim < 3:
            raise IndexError("Fp8Weight: only stacked weights [..., rows, cols] can be indexed (by their leading dims)")
        if not isinstance(idx, (int, np.integer, slice)):
            raise IndexError("Fp8Weight: index the first dimension with an int or a slice")
        return Fp8Weight(self.data[idx], self.scale_inv[idx], self.block)

    def __repr__(self) -> str:
        return f"Fp8Weight(shape={self.data.shape}, block={self.block})"


# ---------------------------------------------------------------------------- codes

def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float8 e4m3fn codes of float32 values (C kernel, the instruction set of ``dsv2ext.get_isa()``).

    Round to nearest, ties to even (subnormals included); ``|x| > 448`` (and
    Inf) saturates to +-448; NaN gives ``0x7f | sign``.

    Parameters
    ----------
    x : array_like of float32, any shape

    Returns
    -------
    np.ndarray uint8, same shape.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    if x.size:
        _C.e4m3_encode(out.reshape(-1), x.reshape(-1))
    return out


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """Exact float32 values of e4m3fn codes (C kernel; NaN for 0x7f / 0xff).

    Parameters
    ----------
    codes : np.ndarray uint8 (or FP8E4M3), any shape

    Returns
    -------
    np.ndarray float32, same shape.
    """
    if isinstance(codes, FP8E4M3):
        codes = codes.data
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes: expected a uint8 array of e4m3fn codes, got dtype {codes.dtype}")
    codes = np.ascontiguousarray(codes)
    out = np.empty(codes.shape, np.float32)
    if codes.size:
        _C.e4m3_decode(out.reshape(-1), codes.reshape(-1))
    return out


_POS_VALUES = fp8_e4m3_to_float32(np.arange(0x7f, dtype=np.uint8)).astype(np.float64)  # codes 0..126, increasing


def e4m3_encode_reference(x: np.ndarray) -> np.ndarray:
    """NumPy model of :func:`e4m3_encode`: the nearest e4m3fn value, ties to the even code.

    Written independently of the kernels' bit manipulation: a search in the
    sorted table of the 127 non-negative finite values.
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(_POS_VALUES, a, side="left"), 1, 126)   # _POS_VALUES[hi - 1] < a <= _POS_VALUES[hi]
    lo = hi - 1
    dlo, dhi = a - _POS_VALUES[lo], _POS_VALUES[hi] - a
    code = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(a >= _POS_VALUES[126], 126, code)
    code = np.where(a == 0, 0, code)
    code = code.astype(np.uint8) | np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))
    return np.where(np.isnan(x), code | np.uint8(0x7f), code).astype(np.uint8)


# ---------------------------------------------------------------------------- quantization

def quantize_fp8_reference(w: Any, block: Sequence[int] = DEFAULT_BLOCK) -> Fp8Weight:
    """NumPy model of :func:`quantize_fp8` (same float32 operations, same bits).

    Parameters
    ----------
    w : np.ndarray (floating) or BF16, shape [rows, cols]
    block : (int, int)

    Returns
    -------
    Fp8Weight
    """
    b0, b1 = _check_block(block)
    x = w.to_float32() if isinstance(w, BF16) else np.asarray(w, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"w: expected 2 dimensions [rows, cols], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("w: holds NaN or Inf values; they cannot be quantized")
    rows, cols = x.shape
    rb, cb = -(-rows // b0), -(-cols // b1)
    pad = np.zeros((rb * b0, cb * b1), np.float32)
    pad[:rows, :cols] = np.abs(x)
    amax = pad.reshape(rb, b0, cb, b1).max(axis=(1, 3))
    s = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    s[s == 0] = 1
    full = np.repeat(np.repeat(s, b0, 0), b1, 1)[:rows, :cols]
    return Fp8Weight(e4m3_encode_reference((x / full).astype(np.float32)), s, (b0, b1))


def quantize_fp8(w: Any, block: Sequence[int] = DEFAULT_BLOCK) -> Fp8Weight:
    """Quantize a weight to float8 e4m3fn with one scale per block (C kernel, threaded).

    Bit-identical to :func:`quantize_fp8_reference`.

    Parameters
    ----------
    w : np.ndarray float32 (other float dtypes are converted) or BF16, shape [rows, cols]
    block : (int, int)
        Rows and columns of a scale block (default (128, 128), as DeepSeek-V3).

    Returns
    -------
    Fp8Weight with data uint8 [rows, cols] and scale_inv float32 [ceil(rows/B0), ceil(cols/B1)].

    Raises
    ------
    ValueError
        ``w`` holds NaN / Inf, is not 2-D, or ``block`` is not two positive ints.
    """
    b = _check_block(block)
    if isinstance(w, BF16):
        src: Any = BF16(np.ascontiguousarray(w.data))
    elif isinstance(w, np.ndarray):
        if w.dtype == np.uint16:
            raise TypeError("w: a bare uint16 array is not taken as bfloat16; wrap it as dsv2ext.BF16(array)")
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"w: expected a floating-point array or a dsv2ext.BF16, got dtype {w.dtype}")
        src = np.ascontiguousarray(w, dtype=np.float32)
    else:
        raise TypeError(f"w: expected a float32 numpy array or a dsv2ext.BF16, got {type(w).__name__}")
    if len(src.shape) != 2:
        raise ValueError(f"w: expected 2 dimensions [rows, cols], got shape {tuple(src.shape)}")
    q = np.empty(src.shape, np.uint8)
    s = np.empty(_scale_shape(src.shape, b), np.float32)
    _C.quantize_fp8(q, s, src, b[0], b[1])
    return Fp8Weight(q, s, b)


# ---------------------------------------------------------------------------- checkpoints

def read_fp8_block(path: Union[str, "os.PathLike[str]"]) -> Tuple[int, int]:
    """The scale block of a checkpoint's FP8 weights: ``quantization_config.weight_block_size``
    of its config.json, (128, 128) when it has none.

    Raises
    ------
    CheckpointError
        An FP8 ``quantization_config`` (``quant_method`` "fp8") with a
        ``weight_block_size`` that is not two positive ints, or a ``fmt`` other than e4m3.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg_path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return DEFAULT_BLOCK
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return DEFAULT_BLOCK
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{cfg_path}: quantization_config.fmt is {fmt!r}; only 'e4m3' FP8 weights are supported")
    bs = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    try:
        return _check_block(bs)
    except ValueError:
        raise CheckpointError(f"{cfg_path}: quantization_config.weight_block_size: expected two positive ints, "
                              f"got {bs!r}") from None


def load_fp8_tensor(reader: Any, name: str, block: Tuple[int, int] = DEFAULT_BLOCK) -> Fp8Weight:
    """An F8_E4M3 weight of a checkpoint with its ``<name>_scale_inv`` (memory-mapped views, no copy).

    Raises
    ------
    CheckpointError
        The weight is not 2-D, its scales are missing, not F32, of the wrong
        shape for ``block``, or not finite (messages name the tensor and file).
    """
    tag, shape = reader.info(name)
    shape = tuple(shape)
    where = f"{name!r} in {reader.file_of(name)!r}"
    if tag != "F8_E4M3":
        raise CheckpointError(f"tensor {where} is {tag}, not F8_E4M3")
    if len(shape) != 2:
        raise CheckpointError(f"F8_E4M3 tensor {where} has shape {list(shape)}; FP8 weights are matrices "
                              "[out, in] with block scales")
    sname = name + SCALE_SUFFIX
    if sname not in reader:
        raise CheckpointError(f"F8_E4M3 tensor {where} has no {sname!r} (float32 block scales) in the checkpoint")
    stag, sshape = reader.info(sname)
    want = _scale_shape(shape, block)
    if stag != "F32" or tuple(sshape) != want:
        raise CheckpointError(f"tensor {sname!r} in {reader.file_of(sname)!r} is {stag} {list(sshape)}; expected F32 "
                              f"{list(want)} (ceil of {list(shape)} / weight_block_size {list(block)}), the scales "
                              f"of {name!r}")
    scale = reader.get(sname, aligned=True)
    if not np.isfinite(scale).all():
        raise CheckpointError(f"tensor {sname!r} in {reader.file_of(sname)!r} holds NaN or Inf scales")
    return Fp8Weight(reader.get(name, aligned=True), scale, block)


def fp8_checkpoint_tensors(weights: Any, cfg: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(tensors, quantization_config) of a checkpoint in the DeepSeek-V3 FP8 layout.

    FP8 weights become ``<name>`` (:class:`FP8E4M3`) + ``<name>_scale_inv``
    (float32); everything else is written in its own dtype (quantize first with
    ``dsv2ext.quant.quantize_model_weights(weights, recipe="fp8")``).

    Raises
    ------
    ValueError
        The FP8 weights use more than one block size (config.json holds one), or are stacked.
    """
    from .quant import _named_tensors

    blocks = {w.block for _, w in _named_tensors(weights, cfg) if isinstance(w, Fp8Weight)}
    if len(blocks) > 1:
        raise ValueError(f"weights: FP8 weights with different blocks {sorted(blocks)}; a checkpoint takes one "
                         "weight_block_size")
    block = blocks.pop() if blocks else DEFAULT_BLOCK
    tensors: Dict[str, Any] = {}
    for name, w in _named_tensors(weights, cfg):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the embedding, stored once
        if isinstance(w, Fp8Weight):
            if w.ndim != 2:
                raise ValueError(f"{name}: stacked FP8 weights {w.shape} cannot be written in the V3 layout")
            tensors[name] = FP8E4M3(np.ascontiguousarray(w.data))
            tensors[name + SCALE_SUFFIX] = np.ascontiguousarray(w.scale_inv)
        elif isinstance(w, BF16):
            tensors[name] = BF16(np.ascontiguousarray(w.data))
        else:
            tensors[name] = np.ascontiguousarray(w)
    return tensors, quantization_config(block)
