"""Measurement helpers of the benchmarks (benchmarks/ is not a package: loaded by path).

The peak-RSS figure of a benchmark worker must be the worker's own: a worker started
by a driver process that had grown large first (it built checkpoints and GGUFs) used to
report the driver's high-water mark, because Linux keeps ``ru_maxrss`` across fork + exec.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = os.path.join(os.path.dirname(HERE), "benchmarks", "common.py")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# a child that touches `mib` MiB of fresh memory, then prints its peak RSS as the benchmark computes it
CHILD = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("bench_common", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
a = np.ones(int(sys.argv[2]) * 2**20, np.uint8)
print(m.peak_rss_bytes())
"""


def _child_peak(mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, COMMON, str(mib)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def test_worker_peak_rss_is_its_own_after_a_large_parent():
    common = _common()
    big = np.ones(800 * 2 ** 20, np.uint8)  # the parent's resident set grows by 800 MiB first
    parent_peak = common.peak_rss_bytes()
    assert parent_peak >= big.nbytes
    small = _child_peak(50)
    large = _child_peak(300)
    del big
    # each child reports what it touched itself (interpreter + NumPy + its array), not the parent's peak
    assert 50 * 2 ** 20 <= small < 500 * 2 ** 20, small
    assert 300 * 2 ** 20 <= large < 750 * 2 ** 20, large
    assert large - small >= 200 * 2 ** 20


def test_peak_rss_parses_vmhwm(tmp_path):
    common = _common()
    p = tmp_path / "status"
    p.write_text("Name:\tpython\nVmPeak:\t  9000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  1000 kB\n")
    assert common.peak_rss_bytes(str(p)) == 123456 * 1024
    p.write_text("Name:\tpython\nVmHWM:\t  12 MB\n")
    with pytest.raises(ValueError, match="VmHWM"):
        common.peak_rss_bytes(str(p))


def _checkpoint_module():
    path = os.path.join(os.path.dirname(HERE), "benchmarks", "checkpoint.py")
    if "bench_checkpoint" in sys.modules:
        return sys.modules["bench_checkpoint"]
    spec = importlib.util.spec_from_file_location("bench_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_checkpoint"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("workers,ahead", [(1, 1), (3, 2), (4, 16)])
def test_ordered_map_keeps_the_order_of_its_items(workers, ahead):
    import random
    import time

    ordered_map = _checkpoint_module().ordered_map
    rng = random.Random(workers * 100 + ahead)
    delays = [rng.random() * 0.004 for _ in range(40)]

    def slow_square(i):  # later items often finish first
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow_square, range(40), workers, ahead)) == [i * i for i in range(40)]


def test_ordered_map_raises_the_first_failure():
    ordered_map = _checkpoint_module().ordered_map

    def f(i):
        if i == 5:
            raise ValueError("item 5")
        return i

    got = []
    with pytest.raises(ValueError, match="item 5"):
        for x in ordered_map(f, range(10), 3, 4):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
