"""Decode kernels of the weight formats against the read-bandwidth roofline, measured side by side.

    python benchmarks/bench_int4.py                     # 2 threads, V2-Lite shapes
    python benchmarks/bench_int4.py --threads 1 --rounds 7

For each case the same random weights (std 0.02) in bf16, int8 and int4 (and int4 x int8
activations in "fp32" mode for reference) are multiplied with one activation row (decode) by
``dsv2ext.ops``, in rounds: each round first reads the streaming bandwidth with a probe that keeps its
2 GiB buffer (benchmarks/machine.py), then times every format (median of ``--reps`` calls).  A
format's bandwidth is the bytes it stores (codes and scales) over the median time; "roofline" is that
over the probe of the same round.  Cases (V2-Lite shapes, several matrices so that the weights of a
call are not in the 32 MiB L3 cache):

* ``lm_head``: linear [102400, 2048] (the vocabulary projection);
* ``expert_down``: linear on [64 x 2048, 1408] (64 experts' down_proj as one matrix: K = 1408);
* ``moe_block``: ``ops.moe_block`` of one token, 32 experts (I = 1408, top-6) + 2 shared experts,
  random routing per call: the bytes are those of the 6 + shared experts it reads;
* ``mlp_4tok``: a dense SwiGLU MLP (d 2048, I 10944) on 4 tokens (speculative / batched decode):
  reported as weights x tokens per second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import dsv2ext  # noqa: E402
from dsv2ext import BF16, ops  # noqa: E402
from dsv2ext.int4 import quantize_int4  # noqa: E402
from dsv2ext.quant import quantize_int8  # noqa: E402


def nbytes(w: Any) -> int:
    return int(getattr(w, "total_nbytes", getattr(w, "nbytes", 0)))


def formats(w: np.ndarray) -> Dict[str, Any]:
    return {"bf16": BF16.from_float32(w), "int8": quantize_int8(w, 32), "int4": quantize_int4(w)}


def rand(shape, seed) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02)


def median_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cases", nargs="+", default=["lm_head", "expert_down", "moe_block", "mlp_4tok"])
    a = ap.parse_args(argv)
    dsv2ext.set_num_threads(a.threads)
    from machine import BandwidthProbe

    rng = np.random.default_rng(0)
    cases: Dict[str, Dict[str, Any]] = {}
    if "lm_head" in a.cases:
        f = formats(rand((102400, 2048), 1))
        x = rng.standard_normal((1, 2048)).astype(np.float32)
        cases["lm_head"] = {k: (lambda w=w, x=x: ops.linear(x, w), nbytes(w), 102400 * 2048) for k, w in f.items()}
    if "expert_down" in a.cases:
        f = formats(rand((64 * 2048, 1408), 2))
        x = rng.standard_normal((1, 1408)).astype(np.float32)
        cases["expert_down"] = {k: (lambda w=w, x=x: ops.linear(x, w), nbytes(w), 64 * 2048 * 1408) for k, w in f.items()}
    if "moe_block" in a.cases:
        E, d, I, k = 32, 2048, 1408, 6
        router = rand((E, d), 3) * 50
        cfg = ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=k, n_group=1, topk_group=1,
                            topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                            routed_scaling_factor=1.0)
        ex: Dict[str, List[Any]] = {"bf16": [], "int8": [], "int4": []}
        for e in range(E):  # one expert at a time: no float32 copy of all of them
            f3 = [formats(rand(s, 10 + 3 * e + i)) for i, s in enumerate([(I, d), (I, d), (d, I)])]
            for name in ex:
                ex[name].append(tuple(f[name] for f in f3))
        sh3 = [formats(rand(s, 4 + i)) for i, s in enumerate([(2 * I, d), (2 * I, d), (d, 2 * I)])]
        xs = [rng.standard_normal((1, d)).astype(np.float32) for _ in range(64)]
        per_tok = (k * 3 * I * d + 3 * 2 * I * d)
        cases["moe_block"] = {}
        for name in ("bf16", "int8", "int4"):
            sh = tuple(f[name] for f in sh3)
            tab = ops.moe.moe_expert_table(ex[name])
            nb = k * sum(nbytes(w) for w in ex[name][0]) + sum(nbytes(w) for w in sh)
            it = iter(range(10 ** 9))
            cases["moe_block"][name] = (lambda tab=tab, sh=sh, it=it: ops.moe_block(xs[next(it) % 64], router, tab, sh, cfg),
                                        nb, per_tok)
    if "mlp_4tok" in a.cases:
        g, u, dn = rand((10944, 2048), 7), rand((10944, 2048), 8), rand((2048, 10944), 9)
        x = rng.standard_normal((4, 2048)).astype(np.float32)
        cases["mlp_4tok"] = {}
        for name in ("bf16", "int8", "int4"):
            ws = [formats(w)[name] for w in (g, u, dn)]
            cases["mlp_4tok"][name] = (lambda ws=ws, x=x: ops.swiglu_mlp(x, *ws), sum(nbytes(w) for w in ws), 4 * 3 * 10944 * 2048)
    print(f"threads {a.threads}, {a.rounds} rounds, median of {a.reps} calls each; GB/s of stored bytes, "
          f"% of the probe read in the same round")
    res: Dict[str, Dict[str, List[float]]] = {c: {k: [] for k in v} for c, v in cases.items()}
    probes: List[float] = []
    with BandwidthProbe(os.path.join(HERE, "cache"), a.threads) as probe:
        for r in range(a.rounds):
            bw = probe.read()
            probes.append(bw)
            for c, fmts in cases.items():
                for name, (fn, nb, nw) in fmts.items():
                    t = median_time(fn, a.reps)
                    res[c][name].append((nb / t / 1e9, nb / t / 1e9 / bw, nw / t / 1e9))
    print(f"probe read bandwidth: median {statistics.median(probes):.1f} GB/s (min {min(probes):.1f}, max {max(probes):.1f})")
    for c, fmts in res.items():
        for name, rows in fmts.items():
            gbs = statistics.median(x[0] for x in rows)
            roof = statistics.median(x[1] for x in rows)
            gw = statistics.median(x[2] for x in rows)
            unit = "G weight-tokens/s" if c == "mlp_4tok" else "G weights/s"
            print(f"{c:12s} {name:5s} {gbs:6.1f} GB/s  {100 * roof:5.1f}% of roofline  {gw:6.1f} {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
