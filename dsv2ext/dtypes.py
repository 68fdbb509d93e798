"""Explicit dtype tags for arrays NumPy cannot describe.

NumPy has no bfloat16.  dsv2ext passes bfloat16 tensors across the NumPy
boundary as ``uint16`` arrays holding the raw bits, wrapped in :class:`BF16`
so that the kernels never have to *guess* that a bare ``uint16`` array is
bfloat16.  A bare ``uint16`` array handed to a kernel is rejected.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["TaggedArray", "BF16", "bf16_to_float32", "float32_to_bf16_bits", "as_weight"]


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (``uint16``) to ``float32`` exactly.

    Parameters
    ----------
    bits : np.ndarray of uint16, any shape

    Returns
    -------
    np.ndarray of float32, same shape (a new array).
    """
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bits: expected a uint16 array, got {bits.dtype}")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round ``float32`` values to bfloat16 (round-to-nearest-even), as raw bits.

    NaN stays NaN (quiet).  Matches ``torch.Tensor.to(torch.bfloat16)``.

    Parameters
    ----------
    x : array_like of float32

    Returns
    -------
    np.ndarray of uint16, same shape.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


class TaggedArray:
    """Base of the dtype-tagged tensors (:class:`BF16`, FP8 bits, quantized weights).

    ``data`` is the NumPy payload (raw bits or codes) whose element type NumPy
    cannot describe by itself; ``__dsv2_dtype__`` names what it holds, and the
    kernels' bindings read that tag (they never guess a dtype from the array).
    Subclasses check ``data`` in their constructor and may carry more arrays
    (e.g. block scales).
    """

    __slots__ = ("data",)
    __dsv2_dtype__ = ""

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def nbytes(self) -> int:
        """Bytes of ``data`` (the payload; quantized weights add their scales in ``total_nbytes``)."""
        return self.data.nbytes

    @property
    def scales_nbytes(self) -> int:
        """Bytes of the scales kept beside ``data`` (0 where there are none)."""
        return 0

    @property
    def total_nbytes(self) -> int:
        """Bytes of the whole weight: ``data`` and its scales."""
        return self.data.nbytes + self.scales_nbytes

    @property
    def dtype_name(self) -> str:
        return self.__dsv2_dtype__

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.data.shape})"


class BF16(TaggedArray):
    """A bfloat16 tensor stored as its raw ``uint16`` bits.

    Parameters
    ----------
    data : np.ndarray of uint16
        The raw bits, any shape.  Not copied.

    Examples
    --------
    >>> w = BF16.from_float32(np.ones((4, 8), np.float32))
    >>> w.shape, w.data.dtype
    ((4, 8), dtype('uint16'))
    """

    __slots__ = ()
    __dsv2_dtype__ = "bf16"

    def __init__(self, data: np.ndarray) -> None:
        if isinstance(data, BF16):
            data = data.data
        if not isinstance(data, np.ndarray):
            raise TypeError(f"BF16: expected a numpy uint16 array, got {type(data).__name__}")
        if data.dtype != np.uint16:
            raise TypeError(
                f"BF16: expected the raw bits as a uint16 array, got dtype {data.dtype}; "
                "use BF16.from_float32() to round float32 values")
        self.data = data

    @classmethod
    def from_float32(cls, x: Any) -> "BF16":
        """Round float32 values to bfloat16 (nearest-even) and wrap them."""
        return cls(float32_to_bf16_bits(np.asarray(x, dtype=np.float32)))

    def to_float32(self) -> np.ndarray:
        """Exact float32 copy of the values."""
        return bf16_to_float32(self.data)

    def __getitem__(self, idx: Any) -> "BF16":
        return BF16(self.data[idx])


def as_weight(w: Any) -> Any:
    """Validate a weight argument: float32 ndarray or a dtype-tagged wrapper.

    Returns the object unchanged.  A bare ``uint16`` array raises ``TypeError``
    (bfloat16 is never guessed).
    """
    if isinstance(w, np.ndarray):
        if w.dtype == np.uint16:
            raise TypeError("a bare uint16 array is not taken as bfloat16: wrap it as dsv2ext.BF16(array)")
        return w
    if getattr(w, "__dsv2_dtype__", None) is not None:
        return w
    raise TypeError(f"expected a float32 numpy array or a dsv2ext.BF16, got {type(w).__name__}")
