"""Helpers shared by the ops wrappers."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..dtypes import BF16

Weight = Any  # np.ndarray (float32) | BF16 | quantized weight


def _require_contiguous(a: np.ndarray, name: str) -> None:
    # checked before any output is allocated from the shape: a zero-stride view may claim
    # 2**80 elements (the kernel binding checks it again)
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (use numpy.ascontiguousarray), "
                         f"got shape {a.shape} with strides {a.strides}")


def weight_shape(w: Weight, name: str) -> tuple:
    """Shape of a weight argument, with a clear error for the wrong kind of object."""
    if isinstance(w, np.ndarray):
        _require_contiguous(w, name)
        return w.shape
    if getattr(w, "__dsv2_dtype__", None) is not None:
        data = getattr(w, "data", None)
        if isinstance(data, np.ndarray):
            _require_contiguous(data, f"{name}.data")
        return tuple(w.shape)
    raise TypeError(f"{name}: expected a float32 numpy array or a dsv2ext.BF16, got {type(w).__name__}")


def check_f32(x: Any, name: str, ndim: Optional[int] = None, *, contiguous: bool = True) -> np.ndarray:
    """Require a float32 ndarray (no silent conversion), C-contiguous unless ``contiguous`` is
    False; the kernel binding checks the rest."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of dtype float32, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {x.ndim} (shape {x.shape})")
    if contiguous:
        _require_contiguous(x, name)
    return x


def new_out(out: Optional[np.ndarray], shape: Sequence[int], name: str = "out") -> np.ndarray:
    """Allocate a float32 output, or return the caller's (checked by the kernel)."""
    if out is None:
        return np.empty(tuple(int(s) for s in shape), dtype=np.float32)
    return out


__all__ = ["Weight", "BF16", "weight_shape", "check_f32", "new_out"]
