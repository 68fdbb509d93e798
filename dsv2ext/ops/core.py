"""Basic kernels: RMSNorm and linear layers.

All activations are float32, C-contiguous, aligned NumPy arrays.  Weights are
float32 arrays or :class:`dsv2ext.BF16` (bfloat16 bits as uint16); nothing is
converted silently: a wrong dtype, shape, layout or a read-only ``out`` raises
``TypeError`` / ``ValueError`` naming the argument.  The GIL is released while
a kernel runs.

NaN / Inf policy: activations and weights are not scanned; NaN / Inf propagate
through the arithmetic (a NaN in row t of ``x`` makes row t of the output NaN,
a NaN in row n of a linear weight makes column n NaN; other rows and columns are
unaffected).  A non-finite or out-of-range ``eps`` is a ``ValueError``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._native import _C
from ._util import Weight, check_f32, new_out, weight_shape

__all__ = ["rms_norm", "linear"]


def rms_norm(x: np.ndarray, weight: Weight, eps: float = 1e-6, *,
             out: Optional[np.ndarray] = None, residual: Optional[np.ndarray] = None) -> np.ndarray:
    """RMSNorm over the last dimension, computed in fp32.

    ``y = x * rsqrt(mean(x**2, -1) + eps) * weight`` (as transformers'
    ``DeepseekV2RMSNorm``).  With ``residual``, ``x += residual`` is done
    first, in place (a decoder layer's residual add fused with the next
    norm: the same numbers as ``x += residual; rms_norm(x, ...)``).

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, d]
        Written (the sum) when ``residual`` is given.
    weight : np.ndarray float32 or BF16, shape [d]
    eps : float
    out : np.ndarray, float32, shape [T, d], optional
        May be ``x`` itself (in place).
    residual : np.ndarray, float32, shape [T, d], optional
        Added to ``x`` before the norm; must not share memory with ``x`` or ``out``.

    Returns
    -------
    np.ndarray, float32, shape [T, d]
    """
    check_f32(x, "x", 2)
    out = new_out(out, x.shape)
    if residual is None:
        _C.rmsnorm(out, x, weight, float(eps))
    else:
        check_f32(residual, "residual", 2)
        _C.rmsnorm(out, x, weight, float(eps), residual)
    return out


def linear(x: np.ndarray, weight: Weight, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``y = x @ weight.T`` (a bias-free ``torch.nn.Linear``).

    For up to 8 rows of ``x`` the weight is streamed once through vector
    row-dot kernels; for more rows OpenBLAS ``sgemm`` is used, bfloat16
    weights being widened one panel of rows at a time (never the whole matrix).

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, K]
    weight : np.ndarray float32, BF16, Int8Weight or Fp8Weight, shape [N, K]
    out : np.ndarray, float32, shape [T, N], optional

    Returns
    -------
    np.ndarray, float32, shape [T, N]
    """
    check_f32(x, "x", 2)
    shp = weight_shape(weight, "weight")
    if len(shp) != 2:
        raise ValueError(f"weight: expected 2 dimensions [N, K], got shape {shp}")
    out = new_out(out, (x.shape[0], shp[0]))
    _C.linear(out, x, weight)
    return out
