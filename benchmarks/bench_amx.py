"""AMX tiles against the AVX-512 kernels for bf16 prefill products, at DeepSeek-V2-Lite shapes.

Paths (all bf16 weights, fp32 activations in and out):
  amx-exact   AMX TDPBF16PS, activations split into three bf16 parts (fp32-exact; the default on AMX)
  amx-bf16    AMX TDPBF16PS, activations rounded to bf16 (the opt-in bf16 compute mode)
  avx512-eo   AVX-512 even|odd row-dot kernels (fp32-exact; the default without AMX)
  vdpbf16ps   AVX-512 BF16 dot products, activations rounded to bf16 (bf16 compute mode without AMX)

Shapes: linears K = 2048, N in {1408, 2816, 3072, 10944}; one MoE layer (64 experts x 1408, hidden
2048, top-6 of T tokens, 2 shared experts); T in {64, 512} (--tokens).  Each thread count (default
2 and all CPUs) runs every path on the same inputs, interleaved rep by rep in this process; the table
gives the median time, GFLOP/s (2 N K T per linear; 6 d I per routed token-expert and 6 d Is per token
for the MoE) and the speedup against avx512-eo.

Accuracy: max |path - ref| / max |ref| with ref the float64 product (linears), or the float64 MoE of
the first 8 tokens with dsv2ext's routing (MoE).  Tolerances: exact paths 1e-5; bf16-activation paths
1e-5 * max(|round_bf16(x)| @ |W|^T) / max |ref| against the float64 product of the rounded activations
(linears), 2e-2 (MoE, against the exact float64 MoE).  Exits 1 if a path exceeds its tolerance, or if
the AMX kernels on the CPU's tiles and on their emulation disagree (both are run once on a
33 x 2048 x 1408 product).

Usage::

    python benchmarks/bench_amx.py [--threads 2 16] [--tokens 64 512] [--reps 5] [--json out.json]
    python benchmarks/bench_amx.py --quick --emulate   # smoke test of this script where the CPU has no AMX
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved  # noqa: E402

import dsv2ext  # noqa: E402
from dsv2ext import BF16, ops  # noqa: E402
from dsv2ext._native import _C  # noqa: E402
from dsv2ext.ops.moe import MoEConfig, StackedExperts, moe_block  # noqa: E402
from dsv2ext.precision import round_to_bf16  # noqa: E402

D, I, E, TOPK, NS = 2048, 1408, 64, 6, 2
TOL_EXACT, TOL_BF16_MOE = 1e-5, 2e-2
PATHS = {  # name -> (isa, bf16 compute)
    "amx-exact": ("amx", False),
    "amx-bf16": ("amx", True),
    "avx512-eo": ("avx512", False),
    "vdpbf16ps": ("avx512", True),
}


def bf16_random(rng: np.random.Generator, shape: Tuple[int, ...], std: float) -> BF16:
    """Random bf16 weights made from random bits (fast: the MoE's 550 M weights in about a second
    per core): random sign and 7 mantissa bits, exponents spread over 4 binades, rms ~ std."""
    r = np.frombuffer(bytearray(rng.bytes(2 * int(np.prod(shape)))), np.uint16).reshape(shape)
    e0 = np.uint16(int(np.floor(np.log2(std))) + 127 - 2)
    expo = (r >> np.uint16(7)) & np.uint16(3)
    expo += e0
    expo <<= np.uint16(7)
    r &= np.uint16(0x807F)
    r |= expo
    return BF16(r)


def set_path(name: str) -> None:
    isa, bf16 = PATHS[name]
    dsv2ext.set_isa(isa)
    dsv2ext.set_bf16_compute(bf16)


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def moe_ref64(x: np.ndarray, ids: np.ndarray, w: np.ndarray, gu: BF16, dn: BF16, shared) -> np.ndarray:
    """float64 MoE output of the rows of x with the given routing (weights widened expert by expert)."""
    f64 = lambda a: (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    silu_mul = lambda g, u: g / (1 + np.exp(-g)) * u  # noqa: E731
    x64 = x.astype(np.float64)
    out = np.zeros_like(x64)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        g_u = f64(gu.data[e])
        h = silu_mul(x64[rows] @ g_u[:I].T, x64[rows] @ g_u[I:].T)
        out[rows] += w[rows, slots, None] * (h @ f64(dn.data[e]).T)
    sg, su, sd = (f64(t.data) for t in shared)
    return out + silu_mul(x64 @ sg.T, x64 @ su.T) @ sd.T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({2, os.cpu_count() or 2}))
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N in {1408}, 64 tokens, 2 reps, no MoE")
    ap.add_argument("--no-moe", action="store_true")
    ap.add_argument("--emulate", action="store_true",
                    help="run the AMX paths on the emulated tiles (a smoke test; the times mean nothing)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.quick:
        args.tokens, args.reps, args.no_moe = [64], 2, True
    Ns = [1408] if args.quick else [1408, 2816, 3072, 10944]

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    hw = dsv2ext.amx_available()
    _C.set_amx_emulation(args.emulate)
    paths = [p for p in PATHS if (hw or args.emulate or not p.startswith("amx"))
             and (not PATHS[p][1] or dsv2ext.bf16_compute_available())]
    print(f"CPU: {cpu}; {os.cpu_count()} CPUs; dsv2ext ISA {dsv2ext.get_isa()}")
    if not hw:
        print("AMX: NOT AVAILABLE on this CPU (or not granted by the OS)"
              + ("; AMX paths run on the EMULATED tiles: times are meaningless" if args.emulate
                 else "; only the AVX-512 paths run"))
    rng = np.random.default_rng(0)
    failures: List[str] = []

    # the CPU's tiles against their emulation, once
    if hw and not args.emulate:
        x = rng.standard_normal((33, D), dtype=np.float32)
        w = bf16_random(rng, (1408, D), D ** -0.5)
        for bf16 in (False, True):
            dsv2ext.set_isa("amx")
            dsv2ext.set_bf16_compute(bf16)
            a = ops.linear(x, w)
            _C.set_amx_emulation(True)
            b = ops.linear(x, w)
            _C.set_amx_emulation(False)
            nd = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
            print(f"AMX tiles vs emulation ({'bf16' if bf16 else 'exact'}): "
                  + ("bit-identical" if nd == 0 else f"{nd} of {a.size} outputs DIFFER "
                     f"(max rel {rel(a, b.astype(np.float64)):.2e})"))
            if nd:
                failures.append(f"tiles vs emulation ({'bf16' if bf16 else 'exact'}): {nd} outputs differ")

    rows: List[Dict[str, object]] = []
    header = f"{'case':24s} {'T':>4s} {'thr':>4s} {'path':>10s} {'ms':>9s} {'GFLOP/s':>9s} {'vs eo':>6s} {'max rel err':>11s}"

    def report(case: str, T: int, th: int, times: Dict[str, List[float]], flops: float,
               errs: Dict[str, Tuple[float, float]]) -> None:
        base = statistics.median(times["avx512-eo"]) if "avx512-eo" in times else None
        for p in times:
            t = statistics.median(times[p])
            err, tol = errs[p]
            flag = "" if err <= tol else "  > tol %.1e" % tol
            if err > tol:
                failures.append(f"{case} T={T} threads={th} {p}: error {err:.2e} > {tol:.1e}")
            print(f"{case:24s} {T:4d} {th:4d} {p:>10s} {t * 1e3:9.2f} {flops / t / 1e9:9.1f} "
                  f"{(base / t if base else float('nan')):6.2f} {err:11.2e}{flag}", flush=True)
            rows.append(dict(case=case, T=T, threads=th, path=p, ms=t * 1e3, gflops=flops / t / 1e9,
                             speedup_vs_eo=(base / t if base else None), max_rel_err=err, tol=tol,
                             cpu=cpu, amx_hw=hw, emulated=args.emulate and p.startswith("amx")))

    # ---- linears
    weights = {N: bf16_random(rng, (N, D), D ** -0.5) for N in Ns}
    xs = {T: rng.standard_normal((T, D), dtype=np.float32) for T in args.tokens}
    refs, tols = {}, {}
    for N, w in weights.items():
        w64 = w.to_float32().astype(np.float64)
        for T, x in xs.items():
            xb = round_to_bf16(x).astype(np.float64)
            ref, refb = x.astype(np.float64) @ w64.T, xb @ w64.T
            scale = float((np.abs(xb) @ np.abs(w64).T).max())
            refs[N, T] = (ref, refb)
            tols[N, T] = (TOL_EXACT, TOL_EXACT * scale / float(np.max(np.abs(refb))))
    for th in args.threads:
        dsv2ext.set_num_threads(th)
        print(f"\n{header}")
        for N, w in weights.items():
            for T, x in xs.items():
                outs = {p: np.empty((T, N), np.float32) for p in paths}

                def run(p: str, x=x, w=w, outs=outs) -> Callable[[], object]:
                    def f():
                        set_path(p)
                        ops.linear(x, w, out=outs[p])
                    return f
                times = time_interleaved({p: run(p) for p in paths}, args.reps, warmup=1)
                ref, refb = refs[N, T]
                te, tb = tols[N, T]
                errs = {p: (rel(outs[p], refb), tb) if PATHS[p][1] else (rel(outs[p], ref), te) for p in paths}
                report(f"linear {N}x{D}", T, th, times, 2.0 * N * D * T, errs)

    # ---- one MoE layer
    if not args.no_moe:
        t0 = time.perf_counter()
        gu = bf16_random(rng, (E, 2 * I, D), D ** -0.5)
        dn = bf16_random(rng, (E, D, I), I ** -0.5)
        shared = (bf16_random(rng, (NS * I, D), D ** -0.5), bf16_random(rng, (NS * I, D), D ** -0.5),
                  bf16_random(rng, (D, NS * I), (NS * I) ** -0.5))
        router = (rng.standard_normal((E, D), dtype=np.float32) * np.float32(1.5 * D ** -0.5))
        experts = StackedExperts(gu, dn)
        cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=TOPK)
        print(f"\nMoE weights built in {time.perf_counter() - t0:.1f} s")
        mrefs = {}
        for T, x in xs.items():
            set_path("avx512-eo")
            _, ids, wts = moe_block(x[:8], router, experts, shared, cfg, return_routing=True)
            mrefs[T] = moe_ref64(x[:8], ids, wts, gu, dn, shared)
        for th in args.threads:
            dsv2ext.set_num_threads(th)
            print(f"\n{header}")
            for T, x in xs.items():
                outs = {p: np.empty((T, D), np.float32) for p in paths}

                def run_moe(p: str, x=x, outs=outs) -> Callable[[], object]:
                    def f():
                        set_path(p)
                        moe_block(x, router, experts, shared, cfg, out=outs[p])
                    return f
                times = time_interleaved({p: run_moe(p) for p in paths}, max(2, args.reps // 2), warmup=1)
                errs = {p: (rel(outs[p][:8], mrefs[T]), TOL_BF16_MOE if PATHS[p][1] else TOL_EXACT) for p in paths}
                flops = 6.0 * D * (T * TOPK * I + T * NS * I)
                report(f"MoE {E}x{I} top-{TOPK}", T, th, times, flops, errs)

    dsv2ext.set_bf16_compute(False)
    _C.set_amx_emulation(False)
    dsv2ext.set_isa("amx")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{time.perf_counter() - t_start:.1f} s")
    for msg in failures:
        print("FAIL:", msg)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
