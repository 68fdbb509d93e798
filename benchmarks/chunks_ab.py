#!/usr/bin/env python
"""Chunks per thread, A/B in one process: the lm_head stream, decode and prefill at N threads.

    python benchmarks/chunks_ab.py --threads 16 --chunks 1,4,16 --rounds 5
    python benchmarks/chunks_ab.py --threads 2 --chunks 1,4 --rounds 3

Every parallel region of dsv2ext is cut into ``chunks`` per thread that the threads claim in
order (``dsv2ext.set_chunks_per_thread``; automatic: ``min(threads, 16)``).  For each round (the
settings alternate in order and reverse), a read probe at the same thread count, then per
setting and per weight format (lite-L4 bf16 and int8): the lm_head product of one token (GB/s,
median of 15), decode after 128 tokens of context (``bench_decode.decode_run``: tokens/s from
the median step of 32, and from their mean), and a 512-token prefill (tokens/s).  Prints one JSON line per round and writes them
to ``--out``.  Results do not depend on the setting (tests); only speed does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from machine import BandwidthProbe  # noqa: E402


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="lite-L4 checkpoint directory (default: the benchmark cache's)")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--chunks", default="1,4,16", help="chunks per thread to compare")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results-chunks.json"))
    args = ap.parse_args(argv)

    import dsv2ext
    from dsv2ext import ops
    from bench_decode import decode_run
    from checkpoint import build_checkpoint

    ckpt = args.ckpt or build_checkpoint("lite-L4", args.cache, seed=0, log=print)
    cpts = [int(c) for c in args.chunks.split(",")]
    dsv2ext.set_num_threads(args.threads)
    models = {dt: dsv2ext.load(ckpt, dtype=dt) for dt in ("bf16", "int8")}
    rng = np.random.default_rng(0)
    P = rng.integers(100, 50000, size=512).astype(np.int64)
    x = rng.standard_normal((1, models["bf16"].config.hidden_size), dtype=np.float32)

    def prefill(m: Any) -> float:
        c = m.new_cache(1, 520)
        t = time.perf_counter()
        m.forward(P, np.zeros(512, np.int64), np.arange(512, dtype=np.int64), c, logit_rows=np.array([511]))
        return 512 / (time.perf_counter() - t)

    def lm_head(W: Any, n: int = 15) -> float:
        ops.linear(x, W)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            ops.linear(x, W)
            ts.append(time.perf_counter() - t)
        return int(getattr(W, "total_nbytes", W.nbytes)) / float(np.median(ts)) / 1e9

    rows: List[Dict[str, Any]] = []
    with BandwidthProbe(args.cache, args.threads) as probe:
        for r in range(args.rounds):
            row: Dict[str, Any] = {"round": r, "probe": probe.read()}
            for cpt in (cpts if r % 2 == 0 else cpts[::-1]):
                dsv2ext.set_chunks_per_thread(cpt)
                d: Dict[str, Any] = {}
                for dt, m in models.items():
                    d[f"lm_{dt}"] = lm_head(m.weights.lm_head)
                    r_ = decode_run(m, context=128, tokens=32, profile=False)
                    d[f"dec_{dt}"] = [r_["tokens_per_s_median"], r_["tokens_per_s"]]
                    d[f"pf_{dt}"] = prefill(m)
                row[str(cpt)] = d
            row["probe_end"] = probe.read()
            rows.append(row)
            print(json.dumps(row), flush=True)
    dsv2ext.set_chunks_per_thread(None)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "chunks": cpts, "rounds": rows}, f, indent=1)
    for cpt in cpts:
        med = {k: float(np.median([(r[str(cpt)][k][0] if isinstance(r[str(cpt)][k], list) else r[str(cpt)][k])
                                    for r in rows])) for k in rows[0][str(cpt)]}
        print(f"{cpt:2d} chunks per thread: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
