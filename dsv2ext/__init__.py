"""dsv2ext: DeepSeek-V2 family inference on the CPU.

C kernels (multi-head latent attention, latent KV compression, DeepSeekMoE)
behind a CPython extension, and a Python package that assembles them into a
model with a ``generate()`` loop.
"""
from __future__ import annotations

from ._native import _C
from . import ops
from .dtypes import BF16
from .threads import get_isa, get_num_threads, set_isa, set_num_threads

__version__ = "0.1.0"

__all__ = ["BF16", "ops", "set_num_threads", "get_num_threads", "get_isa", "set_isa", "__version__"]
