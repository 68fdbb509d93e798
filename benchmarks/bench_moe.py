"""Time one DeepSeekMoE block at DeepSeek-V2-Lite shapes: dsv2ext vs transformers.

V2-Lite MoE layer: hidden 2048, 64 routed experts of width 1408 (top-6,
greedy, softmax), 2 shared experts (one MLP of width 2816).  Random weights
(expert weights scaled by 1/sqrt(fan-in) so the output is O(1), router std
0.02, fp32 as transformers keeps it); fp32 and bf16 weights; 1 and 64
tokens.  transformers' ``DeepseekV2Moe`` runs on the *same memory* (torch
tensors made with ``torch.from_numpy``, bf16 as a view of the same bits), in
eager mode and, when available, with ``experts_implementation="grouped_mm"``.
Both use the same number of threads; the engines are timed alternately, run
by run, so that load drifting on a shared machine hits them alike.  Prints
medians (and minima) in milliseconds and transformers' time / ours.

Usage::

    python benchmarks/bench_moe.py [--threads 1 2] [--reps R] [--tokens 1 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_interleaved  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="thread counts to run, each for both engines (default: 1 and all CPUs)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-transformers", action="store_true", help="only time dsv2ext")
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args()

    import dsv2ext
    from dsv2ext import BF16
    from dsv2ext.ops.moe import MoEConfig, StackedExperts, moe_block

    d, I, E, k, n_shared = 2048, 1408, 64, 6, 2
    Is = n_shared * I
    rng = np.random.default_rng(0)

    def randn(shape, std):
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= std
        return a

    print(f"building V2-Lite MoE weights (E={E}, I={I}, d={d}) ...", flush=True)
    gate_up = randn((E, 2 * I, d), d ** -0.5)
    down = randn((E, d, I), I ** -0.5)
    router = randn((E, d), 0.02)
    sg, su, sd = randn((Is, d), d ** -0.5), randn((Is, d), d ** -0.5), randn((d, Is), Is ** -0.5)
    cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=k, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0)
    weights: Dict[str, dict] = {
        "fp32": dict(experts=StackedExperts(gate_up, down), shared=(sg, su, sd)),
    }
    if not args.no_bf16:
        b = {n: BF16.from_float32(a) for n, a in
             dict(gate_up=gate_up, down=down, sg=sg, su=su, sd=sd).items()}
        weights["bf16"] = dict(experts=StackedExperts(b["gate_up"], b["down"]), shared=(b["sg"], b["su"], b["sd"]))

    hf = {}
    if not args.no_transformers:
        import torch
        from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe


        def build(dtype_name: str, impl: str):
            c = DeepseekV2Config(hidden_size=d, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                                 n_shared_experts=n_shared, topk_method="greedy", n_group=1, topk_group=1,
                                 routed_scaling_factor=1.0, norm_topk_prob=False)
            c._experts_implementation = impl
            with torch.device("meta"):
                m = DeepseekV2Moe(c)
            w = weights[dtype_name]

            def t(a):
                if isinstance(a, BF16):
                    return torch.from_numpy(a.data).view(torch.bfloat16)
                return torch.from_numpy(a)

            P = torch.nn.Parameter
            m.experts.gate_up_proj = P(t(w["experts"].gate_up_proj), requires_grad=False)
            m.experts.down_proj = P(t(w["experts"].down_proj), requires_grad=False)
            m.gate.weight = P(torch.from_numpy(router), requires_grad=False)  # router stays fp32 (as HF loads it)
            for lin, a in zip((m.shared_experts.gate_proj, m.shared_experts.up_proj, m.shared_experts.down_proj),
                              w["shared"]):
                lin.weight = P(t(a), requires_grad=False)
            return m.eval()

        for dn in weights:
            for impl in ("eager", "grouped_mm"):
                try:
                    m = build(dn, impl)
                    with torch.no_grad():
                        m(torch.zeros(1, 2, d, dtype=torch.float32 if dn == "fp32" else torch.bfloat16))
                    hf[(dn, impl)] = m
                except Exception as e:  # an implementation missing on this build of torch/transformers
                    print(f"transformers {impl} ({dn}) unavailable: {type(e).__name__}: {e}")

    for nt in args.threads:
        dsv2ext.set_num_threads(nt)
        if hf:
            import torch

            torch.set_num_threads(nt)
        print(f"\nthreads: {nt}, isa: {dsv2ext.get_isa()}, load average before: "
              f"{os.getloadavg()[0]:.2f}; median (min) of {args.reps} interleaved runs (T > 8: half as many)\n")
        impls = sorted({impl for (_, impl) in hf})
        hdr = f"{'weights':8s} {'tokens':>6s} {'dsv2ext ms':>18s}"
        for impl in impls:
            hdr += f" {'hf ' + impl + ' ms':>22s} {'speedup':>8s}"
        print(hdr)
        for dn, w in weights.items():
            for T in args.tokens:
                x = rng.standard_normal((T, d), dtype=np.float32)
                out = np.empty_like(x)
                reps = args.reps if T <= 8 else max(3, args.reps // 2)
                fns = {"ours": lambda: moe_block(x, router, w["experts"], w["shared"], cfg, out=out)}
                if impls:
                    import torch

                    xt = torch.from_numpy(x)[None]
                    if dn != "fp32":
                        xt = xt.to(torch.bfloat16)
                for impl in impls:
                    m = hf.get((dn, impl))
                    if m is not None:
                        fns[impl] = (lambda m=m: m(xt))
                times = time_interleaved(fns, reps)
                t0 = times["ours"]
                line = f"{dn:8s} {T:6d} {statistics.median(t0) * 1e3:9.2f} ({min(t0) * 1e3:6.2f})"
                for impl in impls:
                    if impl not in times:
                        line += f" {'-':>22s} {'-':>8s}"
                        continue
                    th = times[impl]
                    line += (f" {statistics.median(th) * 1e3:13.2f} ({min(th) * 1e3:6.2f})"
                             f" {statistics.median(th) / statistics.median(t0):7.2f}x")
                print(line, flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print("hf bf16 runs with bf16 activations (torch bf16 matmuls); dsv2ext keeps fp32 activations and "
          "widens bf16 weights exactly (fp32 accuracy).")
    # bytes of the weights one token reads: router + 6 routed + shared
    params = k * 3 * I * d + 3 * Is * d
    print(f"\nweight bytes one token reads (router fp32 + 6 routed + shared): "
          f"fp32 {(params * 4 + E * d * 4) / 1e6:.0f} MB, bf16 {(params * 2 + E * d * 4) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
