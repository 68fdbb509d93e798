"""The C kernels of dsv2ext as documented NumPy functions.

Conventions: activations are float32 ``np.ndarray`` (C-contiguous, aligned);
weights are float32 arrays or :class:`dsv2ext.BF16`; shapes are given in each
docstring as ``[T, d]`` etc.  Every function validates its arguments before any
kernel runs and raises ``TypeError``/``ValueError`` naming the bad argument.
"""
from . import mla as _mla
from . import moe as _moe
from .core import linear, rms_norm
from .mla import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403

__all__ = ["rms_norm", "linear"] + list(_mla.__all__) + list(_moe.__all__)
