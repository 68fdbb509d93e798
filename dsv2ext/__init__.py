"""dsv2ext: DeepSeek-V2 family inference on the CPU.

C kernels (multi-head latent attention, latent KV compression, DeepSeekMoE)
behind a CPython extension, and a Python package that assembles them into a
model with a ``generate()`` loop.

>>> import dsv2ext
>>> model = dsv2ext.load()          # the bundled model, or dsv2ext.load("checkpoint/dir")
>>> print(model.generate("def fibonacci(n):", max_new_tokens=32).text)
"""
from __future__ import annotations

import os as _os
import sys as _sys
from typing import Any


def _use_installed_extension() -> None:
    """Running from a source checkout (e.g. ``python -m dsv2ext`` in the repository root
    after ``pip install .``) finds this folder first, which holds no compiled ``_C``:
    then look for the installed copy's ``_C`` on sys.path (same version, same sources)."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if any(f.startswith("_C.") for f in _os.listdir(here)):
        return
    for entry in _sys.path:
        cand = _os.path.join(_os.path.abspath(entry or _os.curdir), "dsv2ext")
        try:
            if _os.path.realpath(cand) == _os.path.realpath(here) or not _os.path.isdir(cand):
                continue
            if any(f.startswith("_C.") and f.endswith((".so", ".pyd")) for f in _os.listdir(cand)):
                __path__.append(cand)
                return
        except OSError:
            continue


_use_installed_extension()

from ._native import _C  # noqa: E402
from . import ops  # noqa: E402
from .config import ConfigError, ModelConfig
from .dtypes import BF16
from .fp8 import Fp8Weight
from .model import DeepseekV2, default_model_path, load
from .safetensors import CheckpointError
from .stats import stats
from .threads import (amx_available, get_chunks_per_thread, get_isa, get_num_threads, get_prefetch,
                      prefetch_defaults, set_chunks_per_thread, set_isa, set_num_threads, set_prefetch)
from .precision import bf16_compute, bf16_compute_available, get_bf16_compute, set_bf16_compute
from .tokenizer import TokenizerError

__version__ = "0.1.0"

_default_model = None


def generate(prompt: Any, max_new_tokens: int = 64, **kwargs: Any):
    """Generate with the bundled model (loaded once). See :meth:`DeepseekV2.generate`."""
    global _default_model
    if _default_model is None:
        _default_model = load()
    return _default_model.generate(prompt, max_new_tokens, **kwargs)


__all__ = ["BF16", "Fp8Weight", "ops", "load", "generate", "DeepseekV2", "ModelConfig", "ConfigError", "CheckpointError",
           "TokenizerError", "stats", "default_model_path", "set_num_threads", "get_num_threads", "get_isa",
           "set_isa", "get_prefetch", "set_prefetch", "prefetch_defaults", "set_chunks_per_thread",
           "get_chunks_per_thread", "amx_available", "bf16_compute",
           "bf16_compute_available", "get_bf16_compute", "set_bf16_compute", "__version__"]
