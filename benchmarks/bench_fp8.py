"""FP8 weight kernels against bf16 / int8 and the read-bandwidth roofline (micro-benchmark).

    python benchmarks/bench_fp8.py                 # 2 threads, 5 rounds
    python benchmarks/bench_fp8.py --threads 1 --rounds 3 --set-mib 256

Decode (T = 1): ``dsv2ext.ops`` products of one activation row with V2-Lite-shaped
weights (``--shapes``: gate_up = expert gate / up 1408x2048, down = expert down_proj
2048x1408, kv_b 4096x512, q_b 3072x1536, o_proj 2048x2048) in fp8 (e4m3 + 128x128
fp32 scales), bf16 and int8 (+ per-32 scales).  Each dtype cycles through enough
copies of the matrix (``--set-mib``) that every call reads its weights from memory,
not from the caches; GB/s = bytes of the weights (scales included) / time (best of 3
passes).  Each round first takes a streaming-read probe (benchmarks/machine.py, its
own buffer of 2 GiB), then times every dtype; the table gives medians over the rounds
of GB/s and of GB/s / probe, the median of fp8 / bf16 GB/s of the same round, and the
best fp8 pass over the best probe (on a shared host the best passes come closest to an
idle one).  The numbers include the Python binding call per matrix (about a
microsecond, printed as measured on a 16x16 matrix).

Prefill (T = 512): GFLOP/s (2 T rows cols / time) of the same shapes, fp8 vs bf16
vs int8 (best of ``--reps``), and a V2-Lite expert MLP (swiglu_mlp) at T = 64
(the tokens an expert gets in a 512-token prompt).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import dsv2ext  # noqa: E402
from dsv2ext import BF16, ops  # noqa: E402
from dsv2ext._native import _C  # noqa: E402
from dsv2ext.fp8 import quantize_fp8  # noqa: E402
from dsv2ext.quant import quantize_int8  # noqa: E402
from machine import BandwidthProbe, machine_info  # noqa: E402

SHAPES = {"gate_up": (1408, 2048), "down": (2048, 1408), "kv_b": (4096, 512), "q_b": (3072, 1536),
          "o_proj": (2048, 2048)}  # expert gate / up, expert down_proj, attention projections


def nbytes(w: Any) -> int:
    return int(getattr(w, "total_nbytes", w.nbytes))


def make_weights(rows: int, cols: int, seed: int) -> Dict[str, Any]:
    w = (np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * 0.02)
    return {"fp8": quantize_fp8(w), "bf16": BF16.from_float32(w), "int8": quantize_int8(w)}


def copies(w: Any, n: int) -> List[Any]:
    """n independent copies (distinct memory) of a weight."""
    if isinstance(w, BF16):
        return [BF16(w.data.copy()) for _ in range(n)]
    if hasattr(w, "scale_inv"):
        return [type(w)(w.data.copy(), w.scale_inv.copy(), w.block) for _ in range(n)]
    return [type(w)(w.data.copy(), w.scales.copy()) for _ in range(n)]


def time_pass(ws: List[Any], x: np.ndarray, out: np.ndarray) -> float:
    t0 = time.perf_counter()
    for w in ws:
        _C.linear(out, x, w)
    return time.perf_counter() - t0


def call_overhead_us(reps: int = 2000) -> float:
    w = quantize_fp8(np.ones((16, 16), np.float32))
    x, out = np.ones((1, 16), np.float32), np.empty((1, 16), np.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            _C.linear(out, x, w)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def decode(args: argparse.Namespace) -> None:
    cache = os.path.join(HERE, "cache")
    print(f"\n## decode, T = 1, {args.threads} thread(s): GB/s (median over {args.rounds} rounds; "
          f"ratio to the read probe of the same round)")
    print(f"Python binding call on a 16x16 matrix: {call_overhead_us():.1f} us")
    print("| matrix | MB fp8 | fp8 GB/s | bf16 GB/s | int8 GB/s | fp8 / probe | bf16 / probe | int8 / probe | "
          "fp8 / bf16 GB/s | best fp8 / best probe |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    probes_all: List[float] = []
    with BandwidthProbe(cache, args.threads) as probe:
        for name in args.shapes:
            rows, cols = SHAPES[name]
            base = make_weights(rows, cols, 1)
            sets = {dt: copies(w, max(2, (args.set_mib << 20) // nbytes(w))) for dt, w in base.items()}
            x = np.random.default_rng(2).standard_normal((1, cols), dtype=np.float32)
            out = np.empty((1, rows), np.float32)
            gbs: Dict[str, List[float]] = {dt: [] for dt in sets}
            ratio: Dict[str, List[float]] = {dt: [] for dt in sets}
            probes: List[float] = []
            for _ in range(args.rounds):
                p = probe.read()
                probes.append(p)
                for dt, ws in sets.items():
                    t = min(time_pass(ws, x, out) for _ in range(3))
                    g = sum(nbytes(w) for w in ws) / t / 1e9
                    gbs[dt].append(g)
                    ratio[dt].append(g / p)
            probes_all += probes
            med = {dt: statistics.median(v) for dt, v in gbs.items()}
            rat = {dt: statistics.median(v) for dt, v in ratio.items()}
            vs_bf16 = statistics.median(a / b for a, b in zip(gbs["fp8"], gbs["bf16"]))
            print(f"| {name} {rows}x{cols} | {nbytes(base['fp8']) / 1e6:.2f} | {med['fp8']:.1f} | {med['bf16']:.1f} | "
                  f"{med['int8']:.1f} | {rat['fp8']:.2f} | {rat['bf16']:.2f} | {rat['int8']:.2f} | {vs_bf16:.2f} | "
                  f"{max(gbs['fp8']) / max(probes):.2f} |")
            del sets
    print(f"read probe: median {statistics.median(probes_all):.1f} GB/s ({len(probes_all)} readings)")


def prefill(args: argparse.Namespace) -> None:
    print(f"\n## prefill, T = {args.prefill_t}, {args.threads} thread(s): GFLOP/s (best of {args.reps})")
    print("| matrix | fp8 | bf16 | int8 | fp8 / bf16 |")
    print("|---|---|---|---|---|")
    for name in args.shapes:
        rows, cols = SHAPES[name]
        ws = make_weights(rows, cols, 3)
        x = np.random.default_rng(4).standard_normal((args.prefill_t, cols), dtype=np.float32)
        out = np.empty((args.prefill_t, rows), np.float32)
        flops = 2.0 * args.prefill_t * rows * cols
        res = {}
        for dt, w in ws.items():
            _C.linear(out, x, w)
            res[dt] = flops / min(time_pass([w], x, out) for _ in range(args.reps)) / 1e9
        print(f"| {name} {rows}x{cols} | {res['fp8']:.1f} | {res['bf16']:.1f} | {res['int8']:.1f} | "
              f"{res['fp8'] / res['bf16']:.2f} |")
    d, inter = 2048, 1408
    rng = np.random.default_rng(5)
    w3 = [(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in ((inter, d), (inter, d), (d, inter))]
    print("\nV2-Lite expert SwiGLU MLP (swiglu_mlp), GFLOP/s (best of reps)")
    print("| tokens | fp8 | bf16 | int8 |")
    print("|---|---|---|---|")
    for T in (1, 8, 64, 512):
        x = rng.standard_normal((T, d), dtype=np.float32)
        flops = 2.0 * T * 3 * d * inter
        res = {}
        for dt, q in (("fp8", quantize_fp8), ("bf16", BF16.from_float32), ("int8", quantize_int8)):
            g, u, dn = (q(w) for w in w3)
            ops.swiglu_mlp(x, g, u, dn)
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                ops.swiglu_mlp(x, g, u, dn)
                best = min(best, time.perf_counter() - t0)
            res[dt] = flops / best / 1e9
        print(f"| {T} | {res['fp8']:.1f} | {res['bf16']:.1f} | {res['int8']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--set-mib", type=int, default=256, help="bytes of copies cycled through per dtype (decode)")
    ap.add_argument("--prefill-t", type=int, default=512)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    args = ap.parse_args()
    dsv2ext.set_num_threads(args.threads)
    info = machine_info()
    print(f"{info['cpu_model']}, {info['logical_cpus']} logical CPUs, isa {dsv2ext.get_isa()}, "
          f"dsv2ext {dsv2ext.__version__}")
    if not args.skip_decode:
        decode(args)
    if not args.skip_prefill:
        prefill(args)


if __name__ == "__main__":
    main()
