#!/usr/bin/env python
"""Decode speed at long contexts per latent-cache format, and the memory of a long prefill.

    python benchmarks/bench_long.py --model benchmarks/cache/lite-L4-seed0-v1          # decode @128..32K
    python benchmarks/bench_long.py --model DIR --contexts 128,32768 --kv bf16 --steps 32
    python benchmarks/bench_long.py --model DIR --prefill 16384                           # peak RSS of a prefill
    python benchmarks/bench_long.py --model DIR --contexts 128,32768 --kv bf16 --modes exact,bf16-compute

Decode: the cache of each (format, context) is filled with random rows (no prefill: the time of a
decode step does not depend on the values), then the steps of every (format, context) alternate in
rounds, so that a drift of the machine hits all alike; tokens/s = 1 / median step time.  --modes adds
the opt-in bf16 compute mode (dsv2ext.set_bf16_compute: over a bf16 cache the attention runs on bf16
dot products) as rows of its own, in the same rounds.
Prefill (--prefill N): an N-token prompt in one forward (processed in chunks of
model.prefill_chunk tokens), timed, with the process's peak RSS before and after and the
cache's bytes: the rest is the work space.  (benchmarks/run.py --long measures prefill and decode
after real prompts against llama.cpp; this is the quick look.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import dsv2ext  # noqa: E402
from dsv2ext.dtypes import float32_to_bf16_bits  # noqa: E402

from common import peak_rss_bytes as peak_rss, prompt_ids  # noqa: E402


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill_random(cache, n: int, rng: np.random.Generator) -> None:
    """Rows 0..n-1 of every layer: random values of the size real rows have (normalized latent)."""
    for a in cache.arrays():
        rows = rng.standard_normal((a.shape[0], n, cache.width), dtype=np.float32)
        if cache.dtype == "f32":
            a[:, :n] = rows
        elif cache.dtype == "bf16":
            a[:, :n] = float32_to_bf16_bits(rows)
        else:  # fp8: random finite codes, scales of amax / 448 for |x| <~ 4
            L = cache.config.kv_lora_rank
            lay = cache.layer(0).__class__(a, L, cache.config.qk_rope_head_dim)
            codes = rng.integers(0, 0x7f, size=(a.shape[0], n, L), dtype=np.uint8)
            codes |= rng.integers(0, 2, size=codes.shape, dtype=np.uint8) << 7
            lay.codes[:, :n] = codes
            lay.scales[:, :n] = np.float32(4.0 / 448)
            lay.rope.data[:, :n] = float32_to_bf16_bits(rows[..., L:])
    cache.lengths[:] = n


def decode(model, contexts: List[int], kvs: List[str], steps: int, rounds: int,
           modes: List[str]) -> Dict[str, Dict[int, float]]:
    rng = np.random.default_rng(0)
    caches = {}
    for kv in kvs:
        for c in contexts:
            cache = model.new_cache(1, c + steps, dtype=kv)
            fill_random(cache, c, rng)
            caches[kv, c] = cache
    times: Dict[tuple, List[float]] = {(kv, m, c): [] for (kv, c) in caches for m in modes}
    tok = np.array([7], np.int64)
    z = np.zeros(1, np.int64)
    prev = dsv2ext.get_bf16_compute()
    try:
        for r in range(rounds):
            for (kv, m, c) in times:
                cache = caches[kv, c]
                dsv2ext.set_bf16_compute(m == "bf16-compute")
                model.forward(tok, z, np.array([c], np.int64), cache)  # untimed: wakes the threads
                for i in range(steps):
                    t0 = time.perf_counter()
                    model.forward(tok, z, np.array([c + i], np.int64), cache)
                    times[kv, m, c].append(time.perf_counter() - t0)
    finally:
        dsv2ext.set_bf16_compute(prev)
    out: Dict[str, Dict[int, float]] = {}
    for (kv, m, c), ts in times.items():
        out.setdefault(kv if m == "exact" else f"{kv}, {m}", {})[c] = 1.0 / float(np.median(ts))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. the lite-L4 of benchmarks/run.py)")
    ap.add_argument("--contexts", default="128,4096,16384,32768")
    ap.add_argument("--kv", default="bf16,fp8", help="cache formats (f32, bf16, fp8)")
    ap.add_argument("--modes", default="exact", help="exact and / or bf16-compute (the opt-in mode), comma-separated")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per context per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=0, help="instead: time a prompt of this many tokens")
    ap.add_argument("--kv-prefill", default=None, help="cache format of --prefill (default: the model's)")
    ap.add_argument("--chunk", type=int, default=0, help="model.prefill_chunk for --prefill (default: the model's)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    dsv2ext.set_num_threads(a.threads)
    model = dsv2ext.load(a.model)
    info = model.info()
    print(f"{a.model}: {info['layers']} layers, weights {info['weight_bytes'] / 2**30:.2f} GiB ({info['dtype']}), "
          f"{a.threads} threads, isa {dsv2ext.get_isa()}")
    if a.prefill:
        T = a.prefill
        if a.chunk:
            model.prefill_chunk = a.chunk
        ids = np.asarray(prompt_ids(T, seed=5, vocab=min(100000, model.config.vocab_size)), np.int64)
        model.logits(ids[:64])  # touches the weights and the thread pool
        base, base_peak = current_rss(), peak_rss()
        cache = model.new_cache(1, T, dtype=a.kv_prefill)
        t0 = time.perf_counter()
        model.forward(ids, np.zeros(T, np.int64), np.arange(T, dtype=np.int64), cache, logit_rows=np.array([T - 1]))
        dt = time.perf_counter() - t0
        used = cache.lengths[0] * cache.bytes_per_token
        print(f"prefill {T} tokens (chunks of {model.prefill_chunk}, {cache.dtype} cache): {dt:.1f} s, "
              f"{T / dt:.1f} tokens/s")
        print(f"RSS before {base / 2**30:.2f} GiB (peak {base_peak / 2**30:.2f}); peak after {peak_rss() / 2**30:.2f} "
              f"GiB; cache {used / 2**30:.3f} GiB; peak - before - cache = {(peak_rss() - base - used) / 2**20:.0f} MiB "
              "(work space)")
        return 0
    ctx = [int(c) for c in a.contexts.split(",")]
    modes = a.modes.split(",")
    bad = [m for m in modes if m not in ("exact", "bf16-compute")]
    if bad:
        ap.error(f"--modes: expected exact and / or bf16-compute, got {bad}")
    if "bf16-compute" in modes and not dsv2ext.bf16_compute_available():
        ap.error("--modes bf16-compute: this CPU lacks AVX512-BF16")
    res = decode(model, ctx, a.kv.split(","), a.steps, a.rounds, modes)
    print("| kv | " + " | ".join(f"decode tok/s @{c}" for c in ctx) + f" | @{ctx[-1]} / @{ctx[0]} |")
    print("|---|" + "---|" * (len(ctx) + 1))
    for kv, r in res.items():
        print(f"| {kv} | " + " | ".join(f"{r[c]:.2f}" for c in ctx) + f" | {r[ctx[-1]] / r[ctx[0]]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
