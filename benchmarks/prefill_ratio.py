#!/usr/bin/env python
"""Prefill at two thread counts, measured alternately in one process, next to the machine's own ratio.

    python benchmarks/prefill_ratio.py [--geometry lite-L4] [--threads 2,16] [--rounds 7]
                                       [--dtypes bf16,int8] [--tokens 512] [--cache DIR]

On a shared host the speed drifts by 10-30% within minutes, so a ratio of two numbers
taken minutes apart (as a thread sweep does) says little.  Here each round prefills the
same prompt at the low and then at the high thread count, and the ratio is that of the
medians (the per-round ratios are printed too).  The time of the MoE blocks is reported
apart (the largest part of a prefill).  Then ``machine_peak`` (AMX tile products, fp32
FMA, bf16 dot products; threads pinned) alternates the two thread counts the same way:
the ratio the hardware allows.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checkpoint import build_checkpoint  # noqa: E402
from machine import _binary, cpu_model  # noqa: E402


def prefill_rounds(ckpt: str, dtype: str, threads: List[int], rounds: int, tokens: int) -> Dict[int, Dict[str, list]]:
    """Seconds of a ``tokens``-token prefill (and of its MoE blocks) per round and thread count."""
    import dsv2ext
    from dsv2ext._native import _C

    moe = _C.moe_block
    acc = [0.0]

    def timed_moe(*a, **kw):
        t = time.perf_counter()
        try:
            return moe(*a, **kw)
        finally:
            acc[0] += time.perf_counter() - t

    m = dsv2ext.load(ckpt, dtype=dtype)
    ids = np.random.default_rng(0).integers(100, min(50000, m.config.vocab_size), size=tokens).astype(np.int64)
    out = {t: {"total": [], "moe": []} for t in threads}
    _C.moe_block = timed_moe
    try:
        for r in range(rounds + 1):  # round 0: warm-up, not kept
            for t in threads:
                dsv2ext.set_num_threads(t)
                cache = m.new_cache(1, tokens)
                acc[0] = 0.0
                t0 = time.perf_counter()
                m.forward(ids, np.zeros(tokens, np.int64), np.arange(tokens, dtype=np.int64), cache,
                          logit_rows=np.array([tokens - 1]))
                if r > 0:
                    out[t]["total"].append(time.perf_counter() - t0)
                    out[t]["moe"].append(acc[0])
    finally:
        _C.moe_block = moe
    return out


def peak_rounds(exe: str, mode: str, threads: List[int], rounds: int) -> Dict[int, List[float]]:
    iters = 4_000_000 if mode == "amx" else 30_000_000
    out: Dict[int, List[float]] = {t: [] for t in threads}
    for _ in range(rounds):
        for t in threads:
            r = subprocess.run([exe, mode, str(t), str(iters), "3"], capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, PEAK_PIN="1"))
            if r.returncode == 3:  # not on this CPU
                return {}
            if r.returncode != 0:
                raise RuntimeError(f"machine_peak {mode}: {r.stderr.strip()}")
            out[t].append(float(r.stdout.strip()))
    return out


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="lite-L4")
    ap.add_argument("--threads", default="2,16", help="two thread counts, low,high")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", default="bf16,int8")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--peak-rounds", type=int, default=5)
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"))
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if len(threads) != 2 or min(threads) < 1:
        ap.error("--threads: expected two thread counts, e.g. 2,16")
    lo, hi = threads
    ckpt = build_checkpoint(args.geometry, args.cache, seed=0, log=print)
    print(f"{cpu_model()}; {args.geometry}, {args.tokens}-token prefill, {args.rounds} rounds of {lo} then {hi} threads")
    for dt in args.dtypes.split(","):
        r = prefill_rounds(ckpt, dt, threads, args.rounds, args.tokens)
        tl, th = np.median(r[lo]["total"]), np.median(r[hi]["total"])
        ml, mh = np.median(r[lo]["moe"]), np.median(r[hi]["moe"])
        per = " ".join(f"{a / b:.2f}" for a, b in zip(r[lo]["total"], r[hi]["total"]))
        print(f"{dt}: {lo} threads {args.tokens / tl:.0f} tokens/s, {hi} threads {args.tokens / th:.0f} tokens/s: "
              f"{hi}/{lo} = {tl / th:.2f}x (rounds: {per}); MoE {1e3 * ml:.0f} -> {1e3 * mh:.0f} ms ({ml / mh:.2f}x) "
              f"of {1e3 * tl:.0f} -> {1e3 * th:.0f} ms", flush=True)
    exe = _binary(args.cache)
    for mode, unit in (("amx", "GFLOP/s"), ("fma32", "GFLOP/s"), ("bf16", "GFLOP/s")):
        p = peak_rounds(exe, mode, threads, args.peak_rounds)
        if not p:
            print(f"peak {mode}: not on this CPU")
            continue
        a, b = np.median(p[lo]), np.median(p[hi])
        print(f"peak {mode} (pinned): {lo} threads {a:.0f}, {hi} threads {b:.0f} {unit}: {hi}/{lo} = {b / a:.2f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
