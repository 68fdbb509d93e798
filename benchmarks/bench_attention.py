#!/usr/bin/env python
"""One decode token's latent attention over a long cache, per cache format and compute mode.

    python benchmarks/bench_attention.py                                  # 32768 rows, 1 and 2 threads
    python benchmarks/bench_attention.py --context 131072 --threads 2 --kv bf16 --modes bf16-compute

V2-Lite dimensions (16 heads, kv_lora 512, rope 64, nope 128, v 128), the absorbed form
(``ops.mla_attention(..., "absorbed")``, what decode runs): 16 x rows x (576 + 512) multiply-adds a
call.  The rows are written by ``ops.mla_compress_kv`` into each format (f32, bf16, fp8), so they
carry the library's own rounding.  For each (format, mode, threads) the median of ``--reps`` calls
is printed with its GMAC/s and, as the anchor measured in the same run, that rate as a fraction of
the machine's peak at that thread count (``machine_peak``: fp32 FMA for the exact mode, ``vdpbf16ps``
for the bf16 compute mode, which applies to bf16 caches only).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import dsv2ext  # noqa: E402
from dsv2ext.ops import mla as M  # noqa: E402

from machine import measure_peaks  # noqa: E402

H, NOPE, ROPE, V, L = 16, 128, 64, 128, 512


def filled_cache(kv: str, S: int, rng: np.random.Generator):
    """A [1, S] cache of format kv holding S rows written by mla_compress_kv."""
    d = 64
    cfg = M.MLAConfig(num_heads=H, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, kv_lora_rank=L,
                      q_lora_rank=None, softmax_scale=0.1, inv_freq=M.rope_inv_freq(ROPE)[0])
    cache = M.new_latent_cache(cfg, 1, S, kv)
    wa = (rng.standard_normal((L + ROPE, d)) / 8).astype(np.float32)
    wn = np.ones(L, np.float32)
    for s0 in range(0, S, 4096):
        n = min(4096, S - s0)
        h = rng.standard_normal((n, d)).astype(np.float32)
        M.mla_compress_kv(h, wa, wn, cache, np.zeros(n, np.int64), np.arange(s0, s0 + n, dtype=np.int64),
                          cfg.inv_freq)
    return cache


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768, help="cached rows")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--kv", default="bf16,fp8,f32", help="cache formats")
    ap.add_argument("--modes", default="exact,bf16-compute", help="exact and / or bf16-compute")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"), help="where machine_peak is built")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    S = a.context
    rng = np.random.default_rng(0)
    kv_b = (rng.standard_normal((H * (NOPE + V), L)) / np.sqrt(L)).astype(np.float32)
    q = (rng.standard_normal((1, H, NOPE + ROPE)) * 0.5).astype(np.float32)
    seq, pos = np.zeros(1, np.int64), np.array([S - 1], np.int64)
    macs = H * S * (L + ROPE + L)
    os.makedirs(a.cache, exist_ok=True)
    peaks = measure_peaks(a.cache, threads, quick=True)
    print(f"{S} cached rows, V2-Lite dims, absorbed form; {macs / 1e9:.2f} GMAC a call")
    print("| kv | mode | threads | ms (median) | GMAC/s | of the peak |")
    print("|---|---|---|---|---|---|")
    prev = dsv2ext.get_num_threads()
    try:
        for kv in a.kv.split(","):
            cache = filled_cache(kv, S, rng)
            for mode in a.modes.split(","):
                if mode == "bf16-compute" and (kv != "bf16" or not dsv2ext.bf16_compute_available()):
                    continue
                for nt in threads:
                    dsv2ext.set_num_threads(nt)
                    with dsv2ext.bf16_compute(mode == "bf16-compute"):
                        for _ in range(2):
                            M.mla_attention(q, cache, seq, pos, kv_b, 0.1, "absorbed")
                        ts = []
                        for _ in range(a.reps):
                            t = time.perf_counter()
                            M.mla_attention(q, cache, seq, pos, kv_b, 0.1, "absorbed")
                            ts.append(time.perf_counter() - t)
                    med = float(np.median(ts))
                    rate = macs / med / 1e9
                    peak = (peaks["bf16_GFLOPs"] if mode == "bf16-compute" else peaks["fma32_GFLOPs"]).get(str(nt))
                    frac = f"{2 * rate / peak:.0%}" if peak else "-"
                    print(f"| {kv} | {mode} | {nt} | {1e3 * med:.2f} | {rate:.0f} | {frac} |", flush=True)
    finally:
        dsv2ext.set_num_threads(prev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
