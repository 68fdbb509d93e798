"""The opt-in "bf16 compute" mode: bf16 weights times activations rounded to bf16.

By default every product with bfloat16 weights is an fp32 product with the
exact bf16 values (the weights are widened in registers), so dsv2ext matches
an fp32 reference to ~1e-6.  With ``set_bf16_compute(True)`` the products
with at least two activation rows (prefill, batched decode) round the
activations to bf16 (nearest-even) once per call and run on AVX-512 BF16 dot
products (``vdpbf16ps``), which on Zen 4 do twice the multiply-adds per
instruction of an fp32 FMA: what llama.cpp and PyTorch's bf16 path do.  The
cost is the activation rounding (~2e-3 relative per element, logits change by
~1e-2 relative).  Single-row products (decode of one sequence) are bound by
memory, not arithmetic, and stay exact either way; int8 and fp32 weights are
not affected.  Where the CPU lacks AVX512-BF16 the mode has no effect.

The mode is process-wide.  The environment variable ``DSV2EXT_BF16_COMPUTE=1``
turns it on at start-up.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from ._native import _C

__all__ = ["set_bf16_compute", "get_bf16_compute", "bf16_compute_available", "bf16_compute",
           "round_to_bf16"]


def set_bf16_compute(enabled: bool) -> bool:
    """Turn the bf16 compute mode on or off; returns the previous setting.

    Parameters
    ----------
    enabled : bool

    Returns
    -------
    bool
        The mode before the call.
    """
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    prev = bool(_C.get_bf16_compute())
    _C.set_bf16_compute(bool(enabled))
    return prev


def get_bf16_compute() -> bool:
    """Whether the bf16 compute mode is on (it acts only where :func:`bf16_compute_available`)."""
    return bool(_C.get_bf16_compute())


def bf16_compute_available() -> bool:
    """Whether this CPU (under the instruction-set cap of :func:`dsv2ext.set_isa`) has AVX512-BF16."""
    return bool(_C.bf16_compute_available())


@contextlib.contextmanager
def bf16_compute(enabled: bool = True) -> Iterator[None]:
    """Context manager: the bf16 compute mode on (or off) inside the ``with`` block."""
    prev = set_bf16_compute(enabled)
    try:
        yield
    finally:
        set_bf16_compute(prev)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """NumPy model of the mode's activation rounding: float32 -> nearest-even bf16 value, as float32.

    Parameters
    ----------
    x : np.ndarray, float32, any shape

    Returns
    -------
    np.ndarray, float32, same shape: the bf16 values (NaN stays NaN).
    """
    a = np.ascontiguousarray(x, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    out = r.astype(np.uint32).view(np.float32).reshape(a.shape)
    return np.where(np.isnan(a), a, out)
