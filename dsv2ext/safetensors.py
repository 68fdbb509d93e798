"""A self-contained, defensive reader and writer for the safetensors format.

File layout (https://github.com/huggingface/safetensors)::

    [8 bytes: N, unsigned little-endian]  [N bytes: UTF-8 JSON header]  [data section]

The header is a JSON object mapping tensor names to
``{"dtype": TAG, "shape": [d0, d1, ...], "data_offsets": [begin, end]}``
(offsets are relative to the start of the data section) plus an optional
``"__metadata__"`` object of string -> string.

Design
------
* :class:`SafetensorsFile` memory-maps the file read-only and hands out
  zero-copy, read-only NumPy views into the mapping.  Every field of the header
  is validated before any view is made (see :meth:`SafetensorsFile.__init__`),
  so a corrupt or lying file gives a :class:`CheckpointError` naming the file
  and tensor, never a read outside the mapping.
* bfloat16 tensors come back wrapped in :class:`dsv2ext.dtypes.BF16` (raw
  ``uint16`` bits) and float8 tensors in :class:`FP8E4M3` / :class:`FP8E5M2`
  (raw ``uint8`` bits), so that no consumer has to guess a dtype from a bare
  integer array.
* Alignment: the mapping starts on a page boundary, but a tensor's bytes start
  wherever the file says.  Files written by the official library (and by
  :func:`save_file`) keep every tensor aligned to its element size; other
  writers may not.  ``get(name)`` returns the view as it is (check
  ``array.flags.aligned``); ``get(name, aligned=True)`` guarantees alignment to
  the element size and ``get(name, aligned=64)`` to 64 bytes, copying the
  tensor into a fresh aligned buffer only when the view is not already
  aligned.  The C kernels need aligned data, so the loader should ask with
  ``aligned=True`` (or the kernels' vector width).
* The reader is more lenient than the official library in one respect: gaps
  between tensors and trailing bytes after the last tensor are accepted (they
  are harmless); overlaps and out-of-range offsets are rejected.
* If the file is truncated by another process *while* it is mapped, touching
  the lost pages raises SIGBUS; that cannot be guarded against from user space
  and is outside the scope of this module.

Public API
----------
CheckpointError, TensorNotFoundError, SafetensorsFile, CheckpointReader,
FP8E4M3, FP8E5M2, fp8_e4m3_to_float32, fp8_e5m2_to_float32,
dequantize_fp8_blockwise, save_file, save_sharded.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import sys
import tempfile
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from .dtypes import BF16, TaggedArray, float32_to_bf16_bits

__all__ = [
    "CheckpointError",
    "TensorNotFoundError",
    "SafetensorsFile",
    "CheckpointReader",
    "FP8E4M3",
    "FP8E5M2",
    "fp8_e4m3_to_float32",
    "fp8_e5m2_to_float32",
    "dequantize_fp8_blockwise",
    "save_file",
    "save_sharded",
    "INDEX_NAME",
    "SINGLE_NAME",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # an "absurd" header length; real headers are < 10 MB

# safetensors dtype tag -> little-endian numpy dtype of the stored elements
_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),      # raw bits, wrapped in BF16
    "F8_E4M3": np.dtype("u1"),    # raw bits, wrapped in FP8E4M3
    "F8_E5M2": np.dtype("u1"),    # raw bits, wrapped in FP8E5M2
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

Tensor = Union[np.ndarray, BF16, "FP8E4M3", "FP8E5M2"]


class CheckpointError(ValueError):
    """A checkpoint file or directory is malformed or inconsistent.

    The message always names the file and, where one is involved, the tensor.
    """


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name was asked for that the file or checkpoint does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- FP8

def _build_e4m3_table() -> np.ndarray:
    table = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp = (code >> 3) & 0xF
        man = code & 0x7
        if exp == 0xF and man == 0x7:
            val = math.nan           # e4m3fn: no infinities, S.1111.111 is NaN
        elif exp == 0:
            val = sign * (man / 8.0) * 2.0 ** -6          # subnormal (and +-0)
        else:
            val = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
        table[code] = val
    return table


_E4M3_TABLE = _build_e4m3_table()
_E4M3_TABLE.flags.writeable = False


def fp8_e4m3_to_float32(u8: np.ndarray) -> np.ndarray:
    """Decode float8 e4m3fn bit patterns to float32, exactly.

    e4m3fn (the "fn" = finite variant used by DeepSeek-V3 and torch's
    ``float8_e4m3fn``): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
    infinities; ``0x7f``/``0xff`` are NaN; exponent 0 encodes subnormals.
    Max finite value 448.

    Parameters
    ----------
    u8 : np.ndarray of uint8, any shape
        Raw fp8 bits (or an :class:`FP8E4M3`).

    Returns
    -------
    np.ndarray of float32, same shape (a new array).
    """
    if isinstance(u8, FP8E4M3):
        u8 = u8.data
    u8 = np.asarray(u8)
    if u8.dtype != np.uint8:
        raise TypeError(f"u8: expected a uint8 array of float8 e4m3 bits, got dtype {u8.dtype}")
    return _E4M3_TABLE[u8]


def fp8_e5m2_to_float32(u8: np.ndarray) -> np.ndarray:
    """Decode float8 e5m2 bit patterns to float32, exactly.

    e5m2 is the upper byte of an IEEE binary16 value (1 sign, 5 exponent,
    2 mantissa bits, with infinities and NaNs), so the decode is a widening of
    ``u8 << 8`` viewed as float16.

    Parameters
    ----------
    u8 : np.ndarray of uint8, any shape

    Returns
    -------
    np.ndarray of float32, same shape.
    """
    if isinstance(u8, FP8E5M2):
        u8 = u8.data
    u8 = np.asarray(u8)
    if u8.dtype != np.uint8:
        raise TypeError(f"u8: expected a uint8 array of float8 e5m2 bits, got dtype {u8.dtype}")
    return (u8.astype(np.uint16) << 8).view(np.float16).astype(np.float32)


class _FP8Base(TaggedArray):
    __slots__ = ()

    def __init__(self, data: np.ndarray) -> None:
        if isinstance(data, _FP8Base):
            data = data.data
        if not isinstance(data, np.ndarray):
            raise TypeError(f"{type(self).__name__}: expected a numpy uint8 array, got {type(data).__name__}")
        if data.dtype != np.uint8:
            raise TypeError(f"{type(self).__name__}: expected the raw bits as a uint8 array, got dtype {data.dtype}")
        self.data = data


class FP8E4M3(_FP8Base):
    """A float8 e4m3fn tensor stored as its raw ``uint8`` bits.

    Parameters
    ----------
    data : np.ndarray of uint8, any shape
        The raw bits.  Not copied.
    """

    __slots__ = ()
    __dsv2_dtype__ = "f8_e4m3"

    def to_float32(self) -> np.ndarray:
        """Exact float32 copy of the values (same shape)."""
        return fp8_e4m3_to_float32(self.data)

    def __getitem__(self, idx: Any) -> "FP8E4M3":
        return FP8E4M3(self.data[idx])


class FP8E5M2(_FP8Base):
    """A float8 e5m2 tensor stored as its raw ``uint8`` bits (read support only)."""

    __slots__ = ()
    __dsv2_dtype__ = "f8_e5m2"

    def to_float32(self) -> np.ndarray:
        """Exact float32 copy of the values (same shape)."""
        return fp8_e5m2_to_float32(self.data)

    def __getitem__(self, idx: Any) -> "FP8E5M2":
        return FP8E5M2(self.data[idx])


def _raw(t: Any) -> np.ndarray:
    return t.data if isinstance(t, (BF16, _FP8Base)) else t


def dequantize_fp8_blockwise(
    w8: Union[np.ndarray, FP8E4M3],
    scale_inv: Union[np.ndarray, BF16],
    block: Tuple[int, int] = (128, 128),
    out_dtype: str = "bf16",
    *,
    name: Optional[str] = None,
    file: Optional[str] = None,
) -> Union[np.ndarray, BF16]:
    """Dequantize a block-scaled float8 e4m3fn weight (the DeepSeek-V3 format).

    ``W[i, j] = float32(W8[i, j]) * scale_inv[i // block[0], j // block[1]]``,
    computed in float32 and, for ``out_dtype="bf16"``, rounded to bfloat16
    (nearest-even), as ``(w.float() * s).to(torch.bfloat16)`` does.

    Parameters
    ----------
    w8 : FP8E4M3 or np.ndarray of uint8, shape [out, in]
    scale_inv : np.ndarray of float32 (or BF16), shape [ceil(out/b0), ceil(in/b1)]
    block : (int, int)
        Block size along rows and columns.
    out_dtype : {"bf16", "f32"}
    name, file : str, optional
        Tensor and file names, used only in error messages.

    Returns
    -------
    BF16 or np.ndarray of float32, shape [out, in] (new memory).

    Raises
    ------
    CheckpointError
        If the shapes disagree or a scale is not finite.
    TypeError
        If an argument has the wrong type or dtype.
    """
    where = ""
    if name is not None:
        where += f" tensor {name!r}"
    if file is not None:
        where += f" in file {str(file)!r}"
    if out_dtype not in ("bf16", "f32"):
        raise ValueError(f"out_dtype: expected 'bf16' or 'f32', got {out_dtype!r}")
    if isinstance(w8, FP8E5M2):
        raise TypeError(f"w8{where}: float8 e5m2 weights are not supported (expected e4m3fn)")
    bits = _raw(w8)
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint8:
        raise TypeError(f"w8{where}: expected FP8E4M3 or a uint8 array, got "
                        f"{getattr(bits, 'dtype', type(bits).__name__)}")
    if isinstance(scale_inv, BF16):
        scale = scale_inv.to_float32()
    elif isinstance(scale_inv, np.ndarray) and scale_inv.dtype in (np.float32, np.float16, np.float64):
        scale = scale_inv.astype(np.float32, copy=False)
    else:
        raise TypeError(f"scale_inv{where}: expected a float32 array or BF16, got "
                        f"{getattr(scale_inv, 'dtype', type(scale_inv).__name__)}")
    if (len(block) != 2 or any(not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b <= 0
                               for b in block)):
        raise ValueError(f"block: expected two positive ints, got {block!r}")
    b0, b1 = int(block[0]), int(block[1])
    if bits.ndim != 2:
        raise CheckpointError(f"fp8 weight{where}: expected 2 dimensions [out, in], got shape {bits.shape}")
    rows, cols = bits.shape
    want = (-(-rows // b0), -(-cols // b1))
    if scale.shape != want:
        raise CheckpointError(
            f"weight_scale_inv for{where or ' fp8 weight'}: expected shape {want} "
            f"(= ceil({rows}/{b0}), ceil({cols}/{b1})) for a weight of shape {bits.shape}, "
            f"got {scale.shape}")
    if not np.isfinite(scale).all():
        raise CheckpointError(f"weight_scale_inv for{where or ' fp8 weight'}: contains NaN or Inf")

    out = np.empty((rows, cols), dtype=np.float32 if out_dtype == "f32" else np.uint16)
    for rb in range(want[0]):
        r0, r1 = rb * b0, min(rows, (rb + 1) * b0)
        col_scale = np.repeat(scale[rb], b1)[:cols]
        chunk = _E4M3_TABLE[bits[r0:r1]]
        chunk *= col_scale
        if out_dtype == "f32":
            out[r0:r1] = chunk
        else:
            out[r0:r1] = float32_to_bf16_bits(chunk)
    return out if out_dtype == "f32" else BF16(out)


# ------------------------------------------------------------------- reading

def _reject_duplicates_hook(where: str):
    def hook(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        obj: Dict[str, Any] = {}
        for k, v in pairs:
            if k in obj:
                raise CheckpointError(f"{where}: duplicate key {k!r} in the JSON header")
            obj[k] = v
        return obj
    return hook


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Entry:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: Tuple[int, ...], begin: int, end: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped read-only.

    Parameters
    ----------
    path : str or os.PathLike

    Raises
    ------
    CheckpointError
        If the file is missing, truncated, or its header is invalid in any way:
        shorter than 8 bytes; header length past the end of the file or over
        100 MB; header not UTF-8 JSON or not an object; duplicate keys; an
        entry that is not ``{"dtype", "shape", "data_offsets"}``; unknown dtype
        tag; shape entries not non-negative ints; data_offsets not two ints
        with ``0 <= begin <= end``; ``end - begin != prod(shape) * itemsize``;
        offsets past the end of the data section; two tensors whose byte
        ranges overlap; ``__metadata__`` not a str -> str object.

    Notes
    -----
    Arrays returned by :meth:`get` are read-only views of the mapping (no copy)
    and stay valid after :meth:`close`: the mapping is released when the file
    is closed *and* no view of it is alive any more.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)
        self._mm: Optional[mmap.mmap] = None
        p = repr(self.path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"safetensors file {p} does not exist") from None
        except IsADirectoryError:
            raise CheckpointError(f"safetensors file {p} is a directory") from None
        except OSError as e:
            raise CheckpointError(f"safetensors file {p} cannot be opened: {e}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"safetensors file {p} is truncated: {size} bytes, shorter than the "
                    "8-byte header length field")
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"safetensors file {p}: header length {n} is absurd (over {MAX_HEADER_BYTES} "
                    "bytes); the file is corrupt or not a safetensors file")
            if n > size - 8:
                raise CheckpointError(
                    f"safetensors file {p}: header length {n} is larger than the file "
                    f"({size} bytes, {size - 8} after the length field); the file is truncated "
                    "or the header length lies")
            raw = f.read(n)
            if len(raw) != n:
                raise CheckpointError(f"safetensors file {p}: could not read the {n}-byte header")
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"safetensors file {p} cannot be memory-mapped: {e}") from None
        if len(self._mm) != size:  # file changed between stat and map
            self.close()
            raise CheckpointError(f"safetensors file {p} changed size while being opened")
        self._data_start = 8 + n
        self._data_len = size - 8 - n
        try:
            self._entries, self.metadata = self._parse_header(raw)
        except BaseException:
            self.close()
            raise

    # -- header -----------------------------------------------------------------
    def _parse_header(self, raw: bytes) -> Tuple[Dict[str, _Entry], Dict[str, str]]:
        p = repr(self.path)
        where = f"safetensors file {p}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{where}: header is not valid UTF-8 ({e})") from None
        if not text.startswith("{"):
            raise CheckpointError(f"{where}: header does not start with '{{' (not a JSON object)")
        try:
            header = json.loads(text, object_pairs_hook=_reject_duplicates_hook(where))
        except CheckpointError:
            raise
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{where}: header is not a JSON object")

        metadata: Dict[str, str] = {}
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                raise CheckpointError(f"{where}: __metadata__ must be an object of string -> string")
            metadata = meta

        entries: Dict[str, _Entry] = {}
        for name, spec in header.items():
            t = f"{where}, tensor {name!r}"
            if not isinstance(spec, dict):
                raise CheckpointError(f"{t}: entry is not a JSON object")
            missing = [k for k in ("dtype", "shape", "data_offsets") if k not in spec]
            if missing:
                raise CheckpointError(f"{t}: entry lacks {', '.join(missing)}")
            dtype = spec["dtype"]
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise CheckpointError(
                    f"{t}: unknown dtype tag {dtype!r} (supported: {', '.join(_DTYPES)})")
            shape = spec["shape"]
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise CheckpointError(f"{t}: shape must be a list of non-negative ints, got {shape!r}")
            offs = spec["data_offsets"]
            if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise CheckpointError(
                    f"{t}: data_offsets must be two ints [begin, end] with 0 <= begin <= end, "
                    f"got {offs!r}")
            begin, end = offs
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: no overflow
            if end - begin != nbytes:
                raise CheckpointError(
                    f"{t}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
                    f"[{begin}, {end}] span {end - begin} bytes")
            if end > self._data_len:
                raise CheckpointError(
                    f"{t}: data_offsets [{begin}, {end}] lie past the end of the data section "
                    f"({self._data_len} bytes); the file is truncated or the header lies")
            entries[name] = _Entry(dtype, tuple(shape), begin, end)

        ranges = sorted((e.begin, e.end, k) for k, e in entries.items() if e.end > e.begin)
        for (b0, e0, k0), (b1, e1, k1) in zip(ranges, ranges[1:]):
            if b1 < e0:
                raise CheckpointError(
                    f"{where}: tensors {k0!r} [{b0}, {e0}] and {k1!r} [{b1}, {e1}] have "
                    "overlapping data_offsets")
        return entries, metadata

    # -- queries ----------------------------------------------------------------
    def keys(self) -> List[str]:
        """Tensor names, in header order (``__metadata__`` excluded)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(
                f"safetensors file {self.path!r} has no tensor {name!r}") from None

    def info(self, name: str) -> Tuple[str, Tuple[int, ...]]:
        """``(dtype_tag, shape)`` of a tensor, e.g. ``("BF16", (4096, 5120))``."""
        e = self._entry(name)
        return e.dtype, e.shape

    def nbytes(self, name: str) -> int:
        """Size in bytes of a tensor's data."""
        e = self._entry(name)
        return e.end - e.begin

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' data sizes in bytes."""
        return sum(e.end - e.begin for e in self._entries.values())

    def is_aligned(self, name: str, alignment: Optional[int] = None) -> bool:
        """Whether the tensor's bytes in the mapping start on ``alignment`` bytes
        (default: its element size)."""
        e = self._entry(name)
        a = _DTYPES[e.dtype].itemsize if alignment is None else int(alignment)
        # the mapping itself is page aligned
        return (self._data_start + e.begin) % a == 0

    def get(self, name: str, *, aligned: Union[bool, int] = False) -> Tensor:
        """A tensor as a read-only NumPy view of the mapping.

        Parameters
        ----------
        name : str
        aligned : bool or int
            ``False`` (default): the zero-copy view as it lies in the file, which
            may be unaligned (``array.flags.aligned``).  ``True``: aligned to the
            element size; an int (a power of two): aligned to that many bytes.
            A copy (also read-only) is made only when the view does not
            already satisfy the alignment.

        Returns
        -------
        np.ndarray (F32 -> float32, F16 -> float16, F64, ints, BOOL),
        BF16 (uint16 bits), FP8E4M3 or FP8E5M2 (uint8 bits); shape as in the header.
        """
        if self._mm is None:
            raise CheckpointError(f"safetensors file {self.path!r} is closed (reading {name!r})")
        e = self._entry(name)
        dt = _DTYPES[e.dtype]
        count = (e.end - e.begin) // dt.itemsize
        if count == 0:
            arr = np.zeros(e.shape, dtype=dt)
        else:
            arr = np.frombuffer(self._mm, dtype=dt, count=count,
                                offset=self._data_start + e.begin).reshape(e.shape)
        if aligned is not False:
            a = dt.itemsize if aligned is True else int(aligned)
            if a <= 0 or a & (a - 1):
                raise ValueError(f"aligned: expected True/False or a power of two, got {aligned!r}")
            if arr.ctypes.data % a:
                arr = _aligned_copy(arr, a)
        arr.flags.writeable = False
        return _wrap(e.dtype, arr)

    # -- lifetime ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Release this object's mapping.  Views already handed out stay valid
        (they keep the mapping alive until they are garbage collected)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views exported: the mapping is unmapped when the last one dies

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"{len(self._entries)} tensors"
        return f"SafetensorsFile({self.path!r}, {state})"


def _aligned_copy(arr: np.ndarray, alignment: int) -> np.ndarray:
    buf = np.empty(arr.nbytes + alignment, dtype=np.uint8)
    off = (-buf.ctypes.data) % alignment
    out = buf[off:off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def _wrap(tag: str, arr: np.ndarray) -> Tensor:
    if tag == "BF16":
        return BF16(arr)
    if tag == "F8_E4M3":
        return FP8E4M3(arr)
    if tag == "F8_E5M2":
        return FP8E5M2(arr)
    return arr


class CheckpointReader:
    """A checkpoint directory of safetensors files.

    Layouts, in this order of precedence:

    1. ``model.safetensors.index.json`` present: its ``weight_map`` (tensor ->
       shard file) names the shards, which are all opened and checked against it.
    2. no index: every ``*.safetensors`` in the directory (typically just
       ``model.safetensors``).

    A path to a single ``.safetensors`` file is accepted too.

    Parameters
    ----------
    directory : str or os.PathLike

    Raises
    ------
    CheckpointError
        Directory missing or holding no safetensors file; index not valid JSON
        or without a ``weight_map`` object of string -> string; a shard file
        that is missing or outside the directory; a tensor the index names but
        its shard lacks; a tensor present in two files; any fault of a single
        file (see :class:`SafetensorsFile`).

    Notes
    -----
    Tensors held by a shard but not listed in the index are still served
    (``names()`` includes them), as long as no other file holds the same name.
    """

    def __init__(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        self.directory = os.fspath(directory)
        self._files: Dict[str, SafetensorsFile] = {}
        self._where: Dict[str, str] = {}
        self.index_path: Optional[str] = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        d = self.directory
        if os.path.isfile(d) and d.endswith(".safetensors"):
            self._add_file(d)
            self.directory = os.path.dirname(os.path.abspath(d))
            return
        if not os.path.isdir(d):
            raise CheckpointError(f"checkpoint directory {d!r} does not exist or is not a directory")
        index = os.path.join(d, INDEX_NAME)
        if os.path.exists(index):
            self.index_path = index
            weight_map = self._read_index(index)
            shards = sorted(set(weight_map.values()))
            root = os.path.normpath(os.path.abspath(d))
            for shard in shards:
                path = os.path.join(d, shard)
                # symlinks are allowed (the Hugging Face cache uses them); ".." tricks are not
                if (os.path.isabs(shard) or
                        not os.path.normpath(os.path.abspath(path)).startswith(root + os.sep)):
                    raise CheckpointError(
                        f"index {index!r}: shard file {shard!r} lies outside the checkpoint directory")
                if not os.path.isfile(path):
                    who = sorted(k for k, v in weight_map.items() if v == shard)
                    raise CheckpointError(
                        f"index {index!r}: shard file {path!r} is missing "
                        f"(it should hold {len(who)} tensors, e.g. {who[0]!r})")
                self._add_file(path)
            for tensor, shard in weight_map.items():
                path = os.path.join(d, shard)
                if tensor not in self._files[path]:
                    actual = self._where.get(tensor)
                    extra = f"; it is in {actual!r} instead" if actual else ""
                    raise CheckpointError(
                        f"index {index!r} names tensor {tensor!r} in shard {path!r}, "
                        f"but that file has no such tensor{extra}")
            return
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(
                f"checkpoint directory {d!r} holds no {SINGLE_NAME}, no {INDEX_NAME} "
                "and no other *.safetensors file")
        for f in files:
            self._add_file(os.path.join(d, f))

    @staticmethod
    def _read_index(index: str) -> Dict[str, str]:
        try:
            with open(index, "rb") as fh:
                raw = fh.read()
            obj = json.loads(raw.decode("utf-8"),
                             object_pairs_hook=_reject_duplicates_hook(f"index {index!r}"))
        except CheckpointError:
            raise
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"index {index!r} is not valid JSON ({e})") from None
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"index {index!r}: expected a 'weight_map' object of "
                                  "tensor name -> shard file name")
        return wm

    def _add_file(self, path: str) -> None:
        f = SafetensorsFile(path)
        self._files[path] = f
        for name in f.keys():
            other = self._where.get(name)
            if other is not None:
                raise CheckpointError(f"tensor {name!r} is present in two files: {other!r} and {path!r}")
            self._where[name] = path

    # -- queries ----------------------------------------------------------------
    def names(self) -> List[str]:
        """All tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, name: str) -> str:
        """Path of the file holding ``name``."""
        try:
            return self._where[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(
                f"checkpoint {self.directory!r} has no tensor {name!r}") from None

    def info(self, name: str) -> Tuple[str, Tuple[int, ...]]:
        """``(dtype_tag, shape)`` of a tensor."""
        return self._files[self.file_of(name)].info(name)

    def get(self, name: str, *, aligned: Union[bool, int] = False) -> Tensor:
        """A tensor as a read-only view (see :meth:`SafetensorsFile.get`)."""
        return self._files[self.file_of(name)].get(name, aligned=aligned)

    def get_dequantized(self, name: str, out_dtype: str = "bf16",
                        block: Tuple[int, int] = (128, 128)) -> Union[np.ndarray, BF16]:
        """An F8_E4M3 weight dequantized with its ``<name>_scale_inv`` companion.

        Parameters
        ----------
        name : str
            e.g. ``"model.layers.0.mlp.down_proj.weight"``; the scale is read
            from ``"model.layers.0.mlp.down_proj.weight_scale_inv"``.
        out_dtype : {"bf16", "f32"}

        Returns
        -------
        BF16 or np.ndarray of float32, shape of the weight.
        """
        w = self.get(name)
        path = self.file_of(name)
        if not isinstance(w, FP8E4M3):
            raise CheckpointError(f"tensor {name!r} in {path!r} is {self.info(name)[0]}, not F8_E4M3")
        sname = name + "_scale_inv"
        if sname not in self:
            raise CheckpointError(f"F8_E4M3 tensor {name!r} in {path!r} has no {sname!r} "
                                  "in the checkpoint")
        s = self.get(sname)
        return dequantize_fp8_blockwise(w, s, block, out_dtype, name=sname, file=self.file_of(sname))

    @property
    def files(self) -> List[str]:
        """Paths of the opened safetensors files."""
        return list(self._files)

    @property
    def total_bytes(self) -> int:
        """Sum of all tensors' data sizes in bytes."""
        return sum(f.total_bytes for f in self._files.values())

    @property
    def metadata(self) -> Dict[str, str]:
        """``__metadata__`` of the files merged (later files win on conflicts)."""
        out: Dict[str, str] = {}
        for f in self._files.values():
            out.update(f.metadata)
        return out

    def iter_tensors(self, names: Optional[Iterable[str]] = None, desc: str = "Loading",
                     *, aligned: Union[bool, int] = False,
                     progress: Optional[bool] = None) -> Iterator[Tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` pairs, with a tqdm progress bar (by bytes).

        Parameters
        ----------
        names : iterable of str, optional
            Default: all names, grouped by file.
        desc : str
            Label of the progress bar.
        aligned : bool or int
            Passed to :meth:`get`.
        progress : bool, optional
            Force the bar on or off; by default it shows only when stderr is a TTY.
        """
        if names is None:
            names = sorted(self._where, key=lambda n: (self._where[n], n))
        names = list(names)
        for n in names:
            self.file_of(n)  # fail early, before any bar is drawn
        show = sys.stderr.isatty() if progress is None else progress
        bar = None
        if show:
            from tqdm import tqdm
            total = sum(self._files[self._where[n]].nbytes(n) for n in names)
            bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, leave=False)
        try:
            for n in names:
                t = self.get(n, aligned=aligned)
                yield n, t
                if bar is not None:
                    bar.update(self._files[self._where[n]].nbytes(n))
        finally:
            if bar is not None:
                bar.close()

    def close(self) -> None:
        """Release all mappings (views already handed out stay valid)."""
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CheckpointReader({self.directory!r}, {len(self._files)} files, "
                f"{len(self._where)} tensors)")


# ------------------------------------------------------------------- writing

_NP_TO_TAG = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def _tag_and_array(name: str, t: Any) -> Tuple[str, np.ndarray]:
    if isinstance(t, BF16):
        return "BF16", t.data
    if isinstance(t, FP8E4M3):
        return "F8_E4M3", t.data
    if isinstance(t, FP8E5M2):
        return "F8_E5M2", t.data
    if isinstance(t, np.generic):
        t = np.asarray(t)
    if not isinstance(t, np.ndarray):
        raise TypeError(f"tensors[{name!r}]: expected a numpy array, BF16 or FP8E4M3, "
                        f"got {type(t).__name__}")
    if t.dtype.newbyteorder("=") == np.dtype("uint16"):
        raise TypeError(f"tensors[{name!r}]: a bare uint16 array is ambiguous; wrap bfloat16 "
                        "bits as dsv2ext.BF16(array)")
    tag = _NP_TO_TAG.get(t.dtype.newbyteorder("="))
    if tag is None:
        raise TypeError(f"tensors[{name!r}]: dtype {t.dtype} cannot be stored in safetensors")
    return tag, t


def _le_bytes(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8)


def save_file(tensors: Mapping[str, Tensor], path: Union[str, "os.PathLike[str]"],
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors to a safetensors file, readable by the official library.

    Tensors are laid out by descending element size, then name (as the
    official writer does), which keeps each one aligned to its element size;
    the header is padded with spaces so that the data starts on 8 bytes.  The
    file is written to a temporary name and renamed into place.

    Parameters
    ----------
    tensors : mapping of str -> np.ndarray | BF16 | FP8E4M3 | FP8E5M2
        ndarray dtypes float64/32/16, int64/32/16/8, uint64/32/8 and bool.
        A bare uint16 array is refused (wrap bfloat16 bits in BF16).
    path : str or os.PathLike
    metadata : mapping of str -> str, optional
        Stored as ``__metadata__``.
    """
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata: expected a mapping of str -> str")
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: names must be str, got {type(name).__name__}")
        if name == "__metadata__":
            raise ValueError("tensors: '__metadata__' is reserved and cannot be a tensor name")
        tag, arr = _tag_and_array(name, t)
        items.append((name, tag, arr))
    items.sort(key=lambda it: (-_DTYPES[it[1]].itemsize, it[0]))

    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for name, tag, arr in items:
        n = arr.size * _DTYPES[tag].itemsize
        header[name] = {"dtype": tag, "shape": [int(d) for d in arr.shape],
                        "data_offsets": [off, off + n]}
        off += n
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * ((-(8 + len(hbytes))) % 8)

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(hbytes).to_bytes(8, "little"))
            f.write(hbytes)
            for _, _, arr in items:
                if arr.size:
                    f.write(memoryview(_le_bytes(arr)))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_sharded(tensors: Mapping[str, Tensor], directory: Union[str, "os.PathLike[str]"],
                 max_shard_bytes: int, metadata: Optional[Mapping[str, str]] = None) -> List[str]:
    """Write tensors as ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` (the Hugging Face layout).

    Tensors are packed greedily in the mapping's order; a shard is closed when
    the next tensor would take it past ``max_shard_bytes`` (a single tensor
    larger than that gets a shard of its own).  An index is written even when
    everything fits in one shard.

    Parameters
    ----------
    tensors : mapping of str -> np.ndarray | BF16 | FP8E4M3
    directory : str or os.PathLike
        Created if missing.
    max_shard_bytes : int
        Maximum tensor bytes per shard (> 0).
    metadata : mapping of str -> str, optional
        Written into every shard's ``__metadata__``.

    Returns
    -------
    list of str: paths of the shard files written.
    """
    if not _is_int(max_shard_bytes) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive int, got {max_shard_bytes!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    shards: List[Dict[str, Tensor]] = []
    cur: Dict[str, Tensor] = {}
    cur_bytes = 0
    total = 0
    for name, t in tensors.items():
        _, arr = _tag_and_array(name, t)
        n = arr.nbytes
        total += n
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += n
    shards.append(cur)
    count = len(shards)
    weight_map: Dict[str, str] = {}
    paths = []
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{count:05d}.safetensors"
        path = os.path.join(directory, fname)
        save_file(shard, path, metadata)
        paths.append(path)
        for name in shard:
            weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return paths
