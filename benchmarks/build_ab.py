#!/usr/bin/env python
"""Two builds of dsv2ext, A/B: decode attention and decode after 4096 tokens, in alternating processes.

    git worktree add /tmp/base f61a2b8
    (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/build_ab.py --base /tmp/base --threads 2,16 --rounds 6

A change that does not fit a run-time switch (chunks_ab.py compares those in one process) is
measured against the build before it: each round runs one process with ``--base``'s source tree
first on ``sys.path`` and one with this checkout's package, in alternating order, so that the
host's drift hits both.  Each process loads lite-L4 in bf16 and measures, at every thread count:

- the attention block of one decode token (``_C.mla_attention_block`` of layer 1: projections,
  absorbed attention, output projection) over a bf16 latent cache of 128 and of 4096 random rows,
  hot in cache: median of 300 calls, in microseconds;
- decode after a 4096-token prompt (``bench_decode.decode_run``: the prompt prefilled, then 12
  greedy steps at that thread count): tokens/s from the median step.

Prints one JSON line per process and writes all of them, with medians per build, to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def worker(ckpt: str, threads: List[int], tag: str) -> Dict[str, Any]:
    """One build's measurements (run in a process of its own)."""
    import dsv2ext
    from dsv2ext._native import _C

    m = dsv2ext.load(ckpt, dtype="bf16")
    rng = np.random.default_rng(0)
    d = m.config.hidden_size
    h = rng.standard_normal((1, d), dtype=np.float32)
    y = np.zeros((1, d), np.float32)
    out: Dict[str, Any] = {"tag": tag, "dsv2ext": os.path.dirname(dsv2ext.__file__)}
    for T in (128, 4096):
        cache = m.new_cache(1, T + 8, dtype="bf16")
        layer = cache.layer(1)
        vals = rng.standard_normal(layer.data.shape, dtype=np.float32) * 0.5
        layer.data[...] = (vals.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)
        seq, pos = np.zeros(1, np.int64), np.array([T], np.int64)
        for nt in threads:
            dsv2ext.set_num_threads(nt)

            def block() -> None:
                _C.mla_attention_block(y, h, layer, seq, pos, *m._attn_args[1])

            for _ in range(20):
                block()
            ts = []
            for _ in range(300):
                t = time.perf_counter()
                block()
                ts.append(time.perf_counter() - t)
            out[f"attention_{T}_t{nt}_us"] = 1e6 * float(np.median(ts))
    from bench_decode import decode_run

    for nt in threads:
        dsv2ext.set_num_threads(nt)
        out[f"decode_4096_t{nt}_tok_s"] = decode_run(m, context=4096, tokens=12, profile=False)["tokens_per_s_median"]
    return out


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="source tree of the other build (its extension built in place)")
    ap.add_argument("--ckpt", default=None, help="lite-L4 checkpoint directory (default: the benchmark cache's)")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"))
    ap.add_argument("--threads", default="2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "cache", "build-ab.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if args.worker:
        print(json.dumps(worker(args.ckpt, threads, args.worker)), flush=True)
        return 0
    if not args.base or not os.path.isdir(os.path.join(args.base, "dsv2ext")):
        ap.error("--base: expected a source tree holding dsv2ext/ (with its extension built in place)")
    sys.path.insert(0, HERE)
    from checkpoint import build_checkpoint

    ckpt = args.ckpt or build_checkpoint("lite-L4", args.cache, seed=0, log=print)
    paths = {"base": os.path.abspath(args.base), "new": REPO}
    rows: List[Dict[str, Any]] = []
    for r in range(args.rounds):
        for tag in (("base", "new") if r % 2 == 0 else ("new", "base")):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([paths[tag]] + [p for p in os.environ.get(
                "PYTHONPATH", "").split(os.pathsep) if p]))
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", tag, "--ckpt", ckpt,
                                  "--threads", args.threads], env=env, cwd=os.path.dirname(args.out) or ".",
                                 capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                sys.stderr.write(res.stderr[-3000:])
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["round"] = r
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k.endswith(("_us", "_tok_s"))]
    med = {tag: {k: float(np.median([x[k] for x in rows if x["tag"] == tag])) for k in keys} for tag in paths}
    for k in keys:
        print(f"{k}: base {med['base'][k]:.1f}, new {med['new'][k]:.1f} (new / base {med['new'][k] / med['base'][k]:.3f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": threads, "base": paths["base"], "rounds": rows, "medians": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
