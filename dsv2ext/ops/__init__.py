"""The C kernels of dsv2ext as documented NumPy functions.

Conventions: activations are float32 ``np.ndarray`` (C-contiguous, aligned);
weights are float32 arrays or :class:`dsv2ext.BF16`; shapes are given in each
docstring as ``[T, d]`` etc.  Every function validates its arguments before any
kernel runs and raises ``TypeError``/``ValueError`` naming the bad argument.
"""
from .core import linear, rms_norm

__all__ = ["rms_norm", "linear"]
