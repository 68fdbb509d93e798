"""Shared test fixtures and helpers."""
from __future__ import annotations

import numpy as np
import pytest

import dsv2ext

try:  # the reference runs single-threaded: torch's spinning pool collapses on a busy machine
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a test dependency
    pass


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (the tolerance measure used throughout)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(got - ref))) / (denom if denom > 0 else 1.0)


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request):
    """Run a test once per instruction-set level (capped by the CPU)."""
    prev = dsv2ext.get_isa()
    got = dsv2ext.set_isa(request.param)
    if got != request.param:
        dsv2ext.set_isa(prev)
        pytest.skip(f"CPU lacks {request.param}")
    yield got
    dsv2ext.set_isa(prev)
