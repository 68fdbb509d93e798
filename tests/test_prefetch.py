"""The software-prefetch knob of the decode kernels changes speed only, never a result."""
from __future__ import annotations

import numpy as np
import pytest

import dsv2ext
from dsv2ext import BF16, ops
from dsv2ext.fp8 import quantize_fp8
from dsv2ext.int4 import quantize_int4
from dsv2ext.quant import quantize_int8


@pytest.fixture
def restore_prefetch():
    before = dsv2ext.get_prefetch()
    yield
    dsv2ext.set_prefetch(before)


def _weights():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1408, 2048)) * 0.02).astype(np.float32)
    return {"f32": w, "bf16": BF16.from_float32(w), "int8": quantize_int8(w), "int4": quantize_int4(w),
            "fp8": quantize_fp8(w)}


@pytest.mark.parametrize("T", [1, 3])
def test_results_do_not_depend_on_the_prefetch_distance(restore_prefetch, T):
    x = np.random.default_rng(4).standard_normal((T, 2048)).astype(np.float32)
    for name, w in _weights().items():
        outs = []
        for pf in (None, 0, 64, 1024, 4096, 1 << 20):
            dsv2ext.set_prefetch(pf)
            outs.append(ops.linear(x, w))
        for o in outs[1:]:
            assert np.array_equal(o, outs[0]), name


def test_prefetch_setting(restore_prefetch):
    assert dsv2ext.set_prefetch(None) is None and dsv2ext.get_prefetch() is None
    assert dsv2ext.set_prefetch(0) == 0
    assert dsv2ext.set_prefetch(1000) == 960  # whole cache lines
    assert dsv2ext.get_prefetch() == 960
    with pytest.raises(ValueError, match="nbytes"):
        dsv2ext.set_prefetch(-5)
    with pytest.raises(ValueError, match="nbytes"):
        dsv2ext.set_prefetch(1 << 21)
    with pytest.raises(TypeError, match="nbytes"):
        dsv2ext.set_prefetch(1.5)
    with pytest.raises(TypeError, match="nbytes"):
        dsv2ext.set_prefetch(True)


def test_prefetch_defaults():
    d = dsv2ext.prefetch_defaults()
    assert set(d) == {"bf16", "int8", "int4", "fp8"}
    assert all(isinstance(v, int) and v >= 0 and v % 64 == 0 for v in d.values())
    assert d == dsv2ext.prefetch_defaults()  # fixed for the process, whatever the override
