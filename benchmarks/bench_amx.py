"""AMX tiles against the AVX-512 kernels for prefill products, at DeepSeek-V2-Lite shapes.

Paths (fp32 activations in and out):
  bf16 weights
    amx-exact   AMX TDPBF16PS, activations split into three bf16 parts (fp32-exact; the default on AMX)
    amx-bf16    AMX TDPBF16PS, activations rounded to bf16 (the opt-in bf16 compute mode)
    avx512      AVX-512 even|odd row-dot kernels (fp32-exact; the default without AMX)
    avx512-bf16 AVX-512 BF16 dot products (vdpbf16ps), activations rounded to bf16 (bf16 compute mode)
  int8 weights (dsv2ext.quant, groups of 32)
    amx-exact   AMX TDPBF16PS on the codes, group scales on the block sums (fp32 activations)
    avx512      what runs without AMX: sgemm on dequantized panels (linears; MoE experts with more than
                64 tokens), int16-activation row dots (MoE experts with at most 64 tokens)

Shapes: linears K = 2048, N in {1408, 2816, 3072, 10944}; one MoE layer (64 experts x 1408, hidden
2048, top-6 of T tokens, 2 shared experts); T in {64, 512} (--tokens).  For each thread count (default
2 and all CPUs) every path runs on the same inputs, interleaved rep by rep in this process; the table
gives the median time, GFLOP/s (2 N K T per linear; 6 d I per routed token-expert and 6 d Is per token
for the MoE) and the speedup over the avx512 path of the same weights.

Accuracy: max |path - ref| / max |ref|, ref = the float64 product (linears; int8: of the dequantized
weights) or the float64 MoE of the first 8 tokens with dsv2ext's routing.  Tolerances: exact paths
1e-5; bf16-activation linears 1e-5 * max(|round_bf16(x)| @ |W|^T) / max|ref| against the float64
product of the rounded activations; bf16-activation MoE 2e-2 (against the exact MoE); int8 MoE 1e-4
(its experts with few tokens take the int16-activation row dots, with AMX or without).  Exits 1 if a path exceeds its tolerance, or if the AMX kernels on the
CPU's tiles and on their emulation disagree (both run once on 33 x 2048 x 1408 products).

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
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved  # noqa: E402

import dsv2ext  # noqa: E402
from dsv2ext import BF16, ops  # noqa: E402
from dsv2ext._native import _C  # noqa: E402
from dsv2ext.ops.moe import MoEConfig, StackedExperts, moe_block  # noqa: E402
from dsv2ext.precision import round_to_bf16  # noqa: E402
from dsv2ext.quant import Int8Weight, quantize_int8  # noqa: E402

D, I, E, TOPK, NS = 2048, 1408, 64, 6, 2
TOL_EXACT, TOL_BF16_MOE, TOL_INT16_MOE = 1e-5, 2e-2, 1e-4
PATHS = {  # name -> (isa, bf16 compute)
    "amx-exact": ("amx", False),
    "amx-bf16": ("amx", True),
    "avx512": ("avx512", False),
    "avx512-bf16": ("avx512", True),
}


def bf16_random(rng: np.random.Generator, shape: Tuple[int, ...], std: float) -> BF16:
    """Random bf16 weights made from random bits (fast: the MoE's 550 M weights in seconds): random
    sign and 7 mantissa bits, exponents spread over 4 binades, rms ~ std."""
    r = np.frombuffer(bytearray(rng.bytes(2 * int(np.prod(shape)))), np.uint16).reshape(shape)
    e0 = np.uint16(int(np.floor(np.log2(std))) + 127 - 2)
    expo = (r >> np.uint16(7)) & np.uint16(3)
    expo += e0
    expo <<= np.uint16(7)
    r &= np.uint16(0x807F)
    r |= expo
    return BF16(r)


def to_int8(w: BF16) -> Int8Weight:
    """int8 (groups of 32) of bf16 weights, matrix by matrix."""
    mats = w.data.reshape(-1, w.shape[-2], w.shape[-1])
    qs = [quantize_int8(BF16(m).to_float32()) for m in mats]
    q = np.stack([t.data for t in qs]).reshape(w.shape)
    s = np.stack([t.scales for t in qs]).reshape(w.shape[:-1] + (w.shape[-1] // 32,))
    return Int8Weight(q, s)


def f64(w: Any) -> np.ndarray:
    """float64 values of a bf16 or int8 weight."""
    if isinstance(w, BF16):
        return w.to_float32().astype(np.float64)
    g = w.group
    return (w.data.astype(np.float64).reshape(*w.shape[:-1], -1, g) * w.scales[..., None]).reshape(w.shape)


def index(w: Any, e: int) -> Any:
    return BF16(w.data[e]) if isinstance(w, BF16) else Int8Weight(w.data[e], w.scales[e])


def set_path(name: str) -> None:
    isa, bf16 = PATHS[name]
    dsv2ext.set_isa(isa)
    dsv2ext.set_bf16_compute(bf16)


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def moe_ref64(x: np.ndarray, ids: np.ndarray, w: np.ndarray, gu: Any, dn: Any, shared) -> np.ndarray:
    """float64 MoE output of the rows of x with the given routing (weights widened expert by expert)."""
    silu_mul = lambda g, u: g / (1 + np.exp(-g)) * u  # noqa: E731
    x64 = x.astype(np.float64)
    out = np.zeros_like(x64)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        g_u = f64(index(gu, e))
        h = silu_mul(x64[rows] @ g_u[:I].T, x64[rows] @ g_u[I:].T)
        out[rows] += w[rows, slots, None] * (h @ f64(index(dn, e)).T)
    sg, su, sd = (f64(t) for t in shared)
    return out + silu_mul(x64 @ sg.T, x64 @ su.T) @ sd.T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({2, os.cpu_count() or 2}))
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
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

    def paths_for(dtype: str) -> List[str]:
        return [p for p in PATHS if (hw or args.emulate or not p.startswith("amx"))
                and (not PATHS[p][1] or (dtype == "bf16" and dsv2ext.bf16_compute_available()))]

    print(f"CPU: {cpu}; {os.cpu_count()} CPUs; dsv2ext ISA {dsv2ext.get_isa()}")
    if not hw:
        print("AMX: NOT AVAILABLE on this CPU (or not granted by the OS)"
              + ("; AMX paths run on the EMULATED tiles: times are meaningless" if args.emulate
                 else "; only the AVX-512 paths run"))
    rng = np.random.default_rng(0)
    failures: List[str] = []

    # the CPU's tiles against their emulation, once per kind of product
    if hw and not args.emulate:
        x = rng.standard_normal((33, D), dtype=np.float32)
        wb = bf16_random(rng, (1408, D), D ** -0.5)
        for label, w, bf16 in (("bf16 exact", wb, False), ("bf16 compute", wb, True), ("int8", to_int8(wb), False)):
            dsv2ext.set_isa("amx")
            dsv2ext.set_bf16_compute(bf16)
            a = ops.linear(x, w)
            _C.set_amx_emulation(True)
            b = ops.linear(x, w)
            _C.set_amx_emulation(False)
            nd = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
            print(f"AMX tiles vs emulation ({label}): " + ("bit-identical" if nd == 0 else
                  f"{nd} of {a.size} outputs DIFFER (max rel {rel(a, b.astype(np.float64)):.2e})"))
            if nd:
                failures.append(f"tiles vs emulation ({label}): {nd} outputs differ")

    rows: List[Dict[str, object]] = []
    header = (f"{'case':26s} {'T':>4s} {'thr':>4s} {'path':>11s} {'ms':>9s} {'GFLOP/s':>9s} {'vs avx512':>9s} "
              f"{'max rel err':>11s}")

    def report(case: str, T: int, th: int, times: Dict[str, List[float]], flops: float,
               errs: Dict[str, Tuple[float, float]]) -> None:
        base = statistics.median(times["avx512"])
        for p in times:
            t = statistics.median(times[p])
            err, tol = errs[p]
            flag = "" if err <= tol else "  > tol %.1e" % tol
            if err > tol:
                failures.append(f"{case} T={T} threads={th} {p}: error {err:.2e} > {tol:.1e}")
            print(f"{case:26s} {T:4d} {th:4d} {p:>11s} {t * 1e3:9.2f} {flops / t / 1e9:9.1f} {base / t:9.2f} "
                  f"{err:11.2e}{flag}", flush=True)
            rows.append(dict(case=case, T=T, threads=th, path=p, ms=t * 1e3, gflops=flops / t / 1e9,
                             speedup_vs_avx512=base / t, max_rel_err=err, tol=tol, cpu=cpu, amx_hw=hw,
                             emulated=args.emulate and p.startswith("amx")))

    def timed(fns: Dict[str, Callable[[], None]], reps: int) -> Dict[str, List[float]]:
        return time_interleaved(fns, reps, warmup=1)

    # ---- linears
    X = rng.standard_normal((max(args.tokens), D), dtype=np.float32)
    xs = {T: X[:T] for T in args.tokens}  # the same first rows: one MoE reference per weight dtype
    lin = []  # (case, dtype, weight, {T: (ref, ref_bf16, tol_bf16)})
    for N in Ns:
        wb = bf16_random(rng, (N, D), D ** -0.5)
        for dtype in args.dtypes:
            w = wb if dtype == "bf16" else to_int8(wb)
            w64 = f64(w)
            refs = {}
            for T, x in xs.items():
                xb = round_to_bf16(x).astype(np.float64)
                refb = xb @ w64.T
                refs[T] = (x.astype(np.float64) @ w64.T, refb,
                           TOL_EXACT * float((np.abs(xb) @ np.abs(w64).T).max()) / float(np.max(np.abs(refb))))
            lin.append((f"linear {dtype} {N}x{D}", dtype, w, refs))
    for th in args.threads:
        dsv2ext.set_num_threads(th)
        print(f"\n{header}")
        for case, dtype, w, refs in lin:
            for T, x in xs.items():
                paths = paths_for(dtype)
                outs = {p: np.empty((T, w.shape[0]), np.float32) for p in paths}

                def run(p: str, x=x, w=w, outs=outs) -> Callable[[], None]:
                    def f():
                        set_path(p)
                        ops.linear(x, w, out=outs[p])
                    return f
                times = timed({p: run(p) for p in paths}, args.reps)
                ref, refb, tolb = refs[T]
                errs = {p: (rel(outs[p], refb), tolb) if PATHS[p][1] else (rel(outs[p], ref), TOL_EXACT)
                        for p in paths}
                report(case, T, th, times, 2.0 * w.shape[0] * D * T, errs)

    # ---- one MoE layer
    if not args.no_moe:
        t0 = time.perf_counter()
        gu_b, dn_b = bf16_random(rng, (E, 2 * I, D), D ** -0.5), bf16_random(rng, (E, D, I), I ** -0.5)
        sh_b = (bf16_random(rng, (NS * I, D), D ** -0.5), bf16_random(rng, (NS * I, D), D ** -0.5),
                bf16_random(rng, (D, NS * I), (NS * I) ** -0.5))
        router = rng.standard_normal((E, D), dtype=np.float32) * np.float32(1.5 * D ** -0.5)
        cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=TOPK)
        layers = {}
        for dtype in args.dtypes:
            if dtype == "bf16":
                layers[dtype] = (gu_b, dn_b, sh_b)
            else:
                layers[dtype] = (to_int8(gu_b), to_int8(dn_b), tuple(to_int8(t) for t in sh_b))
        print(f"\nMoE weights built in {time.perf_counter() - t0:.1f} s")
        mrefs = {}
        for dtype, (gu, dn, sh) in layers.items():
            set_path("avx512")
            _, ids, wts = moe_block(X[:8], router, StackedExperts(gu, dn), sh, cfg, return_routing=True)
            mrefs[dtype] = moe_ref64(X[:8], ids, wts, gu, dn, sh)
        for th in args.threads:
            dsv2ext.set_num_threads(th)
            print(f"\n{header}")
            for dtype, (gu, dn, sh) in layers.items():
                experts = StackedExperts(gu, dn)
                for T, x in xs.items():
                    paths = paths_for(dtype)
                    outs = {p: np.empty((T, D), np.float32) for p in paths}

                    def run_moe(p: str, x=x, outs=outs, experts=experts, sh=sh) -> Callable[[], None]:
                        def f():
                            set_path(p)
                            moe_block(x, router, experts, sh, cfg, out=outs[p])
                        return f
                    times = timed({p: run_moe(p) for p in paths}, max(2, args.reps // 2))
                    tol = {p: TOL_BF16_MOE if PATHS[p][1] else TOL_EXACT for p in paths}
                    if dtype == "int8":  # experts of <= 64 (avx512) or <= 15 tokens (amx): int16 activations
                        tol = {p: TOL_INT16_MOE for p in paths}
                    errs = {p: (rel(outs[p][:8], mrefs[dtype]), tol[p]) for p in paths}
                    report(f"MoE {dtype} {E}x{I} top-{TOPK}", T, th, times, 6.0 * D * T * (TOPK * I + NS * I), errs)

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
