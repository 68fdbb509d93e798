"""Leaks: repeated calls keep reference counts, tracked objects and resident memory flat.

* 10,000 kernel calls (every ops wrapper in turn, fp32 and BF16 weights, one in ten a
  rejected call so the error paths are covered too);
* 100 generate calls with the bundled model (text prompts, sampling, streaming);
* 20 load / generate / close cycles of the bundled model: the memory maps of the
  checkpoint must be gone from /proc/self/maps after each model is dropped.

Bounds (after a warm-up that fills NumPy's and the kernels' caches): the reference count of
every argument array unchanged; gc-tracked objects +300 at most; resident memory +8 MiB
(kernels), +16 MiB (generate), +24 MiB (20 load cycles of a 14 MiB checkpoint: one leaked
model per cycle would add >= 280 MiB).  The resident-memory bounds are not checked under
AddressSanitizer (its quarantine holds freed memory on purpose).
"""
from __future__ import annotations

import gc
import os
import sys

import numpy as np
import psutil
import pytest

import dsv2ext
from dsv2ext import BF16
from dsv2ext.dtypes import float32_to_bf16_bits
from harden_cases import SANITIZED, op_calls

MiB = 1 << 20


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


def _arrays(obj, out):
    """Every ndarray reachable through lists / tuples / dicts / dataclasses / BF16 of ``obj``."""
    if isinstance(obj, np.ndarray):
        out.append(obj)
    elif isinstance(obj, BF16):
        out.append(obj.data)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _arrays(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _arrays(o, out)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            _arrays(getattr(obj, name), out)
    return out


def _checkpoint_maps(path: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if path in line)


def test_kernel_calls_do_not_leak():
    calls = op_calls(seed=4)
    bf = op_calls(seed=5)
    for c in bf:  # the same calls with BF16 weights where a weight is a plain 2-D float32 array
        if c.name in ("linear", "swiglu_mlp"):
            c.args = [c.args[0]] + [BF16(float32_to_bf16_bits(a)) for a in c.args[1:]]
    calls += [c for c in bf if c.name in ("linear", "swiglu_mlp")]
    bad_x = np.ones((3, 32), np.float64)

    def one(i):
        c = calls[i % len(calls)]
        if i % 10 == 9:  # a rejected call: wrong dtype of the first argument
            with pytest.raises((TypeError, ValueError)):
                c(bad_x)
        else:
            c()

    for i in range(500):  # warm-up: NumPy's small-array cache, the kernels' scratch buffers
        one(i)
    args = [a for c in calls for a in _arrays(c.args, [])]
    refs0 = [sys.getrefcount(a) for a in args]
    objs0, rss0 = _tracked(), _rss()
    for i in range(10_000):
        one(i)
    refs1 = [sys.getrefcount(a) for a in args]
    objs1, rss1 = _tracked(), _rss()
    assert refs1 == refs0, "reference counts of kernel arguments changed"
    assert objs1 - objs0 <= 300, f"{objs1 - objs0} more gc-tracked objects after 10,000 calls"
    if not SANITIZED:
        assert rss1 - rss0 <= 8 * MiB, f"resident memory grew by {(rss1 - rss0) / MiB:.1f} MiB"


@pytest.fixture(scope="module")
def bundled():
    m = dsv2ext.load()
    yield m
    m.close()


def test_generate_does_not_leak(bundled):
    prompts = ["def f(x):", "import os\n", "class A:", "for i in range(3):"]

    def one(i):
        p = prompts[i % len(prompts)]
        if i % 3 == 0:
            out = bundled.generate(p, max_new_tokens=3, temperature=0.0)
        elif i % 3 == 1:
            out = bundled.generate(p, max_new_tokens=3, temperature=0.8, top_p=0.9, seed=i)
        else:
            stream = bundled.generate(p, max_new_tokens=3, seed=i, stream=True)
            "".join(stream)
            out = stream.result
        assert 1 <= len(out.token_ids) <= 3

    for i in range(10):
        one(i)
    w = bundled.weights.layers[1].attn.kv_b_proj
    ref_w = sys.getrefcount(w)
    objs0, rss0 = _tracked(), _rss()
    for i in range(100):
        one(i)
    objs1, rss1 = _tracked(), _rss()
    assert sys.getrefcount(w) == ref_w
    assert objs1 - objs0 <= 300, f"{objs1 - objs0} more gc-tracked objects after 100 generate calls"
    if not SANITIZED:
        assert rss1 - rss0 <= 16 * MiB, f"resident memory grew by {(rss1 - rss0) / MiB:.1f} MiB"


def test_load_close_cycles_release_everything():
    path = os.path.realpath(os.path.join(dsv2ext.default_model_path(), "model.safetensors"))
    base_maps = _checkpoint_maps(path)

    def cycle(i):
        m = dsv2ext.load()
        assert _checkpoint_maps(path) > base_maps  # the weights are memory-mapped views
        out = m.generate([5, 6, 7], max_new_tokens=1, temperature=0)
        assert len(out.token_ids) == 1
        m.close()
        del m, out
        gc.collect()
        assert _checkpoint_maps(path) == base_maps, f"cycle {i}: the checkpoint is still mapped"

    for i in range(3):
        cycle(i)
    objs0, rss0 = _tracked(), _rss()
    for i in range(20):
        cycle(i)
    objs1, rss1 = _tracked(), _rss()
    assert objs1 - objs0 <= 300, f"{objs1 - objs0} more gc-tracked objects after 20 load/close cycles"
    if not SANITIZED:
        assert rss1 - rss0 <= 24 * MiB, f"resident memory grew by {(rss1 - rss0) / MiB:.1f} MiB"
