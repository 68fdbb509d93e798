"""One transformers DeepSeek-V2 decoder layer at V2-Lite shapes: unpatched vs dsv2ext.torch-patched.

The SAME layer object (same weights) is timed with transformers' own attention / MoE modules
and with dsv2ext's :class:`~dsv2ext.torch.MLAAttention` / :class:`~dsv2ext.torch.MoE` swapped
in, in the same run, alternating the two so that load changes on the machine hit both alike:

* ``decode``: forward of 1 new token after a prefill of ``--context`` tokens (the cache is
  cropped back after every timed step, so each step sees the same context);
* ``prefill``: forward of ``--prefill`` tokens on an empty cache.

V2-Lite layer: hidden 2048, 16 heads, q_proj (no q compression), kv_lora 512, rope 64,
64 routed experts (top-6, greedy softmax) of width 1408 + 2 shared, YaRN (factor 40).
Random weights of unit-variance activations (no checkpoint needed).  The outputs of the two
variants are compared as a sanity check.

    python benchmarks/bench_torch.py                       # fp32 and bf16, context 512, prefill 512
    python benchmarks/bench_torch.py --context 4096 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import dsv2ext
import dsv2ext.torch as dt

V2_LITE = dict(
    vocab_size=256, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=2,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 0.707, "mscale_all_dim": 0.707},
)


def build_layer(dtype: torch.dtype, seed: int = 0):
    """(config, decoder layer 1 (a MoE layer), rotary embedding) with random weights.

    The layer is taken from a ``DeepseekV2ForCausalLM`` built on the meta device, so its config
    carries the implementations transformers picks for a real model (``sdpa`` attention,
    ``grouped_mm`` experts); only this layer is materialised.
    """
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**V2_LITE))
    cfg = model.config
    layer = model.model.layers[1].to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2, generator=g)
            else:
                a = math.sqrt(3.0 / p.shape[-1])
                p.uniform_(-a, a, generator=g)
    return cfg, layer.to(dtype).eval(), DeepseekV2RotaryEmbedding(cfg)


class Runner:
    """Calls the decoder layer the way DeepseekV2Model does (cache, positions, rotary table)."""

    def __init__(self, cfg, layer, rotary, dtype: torch.dtype, seed: int = 1) -> None:
        self.cfg, self.layer, self.rotary, self.dtype = cfg, layer, rotary, dtype
        self.g = torch.Generator().manual_seed(seed)

    def hidden(self, n: int) -> torch.Tensor:
        return torch.randn(1, n, self.cfg.hidden_size, generator=self.g).to(self.dtype)

    def forward(self, h: torch.Tensor, cache, start: int) -> torch.Tensor:
        pos = torch.arange(start, start + h.shape[1])[None]
        pe = self.rotary(h, pos)
        return self.layer(h, attention_mask=None, position_ids=pos, cache=cache, use_cache=True,
                          position_embeddings=pe)


def swap(layer, patched: bool, originals: Dict[str, torch.nn.Module]) -> None:
    if patched:
        layer.self_attn = dt.MLAAttention.from_hf(originals["self_attn"])
        layer.mlp = dt.MoE.from_hf(originals["mlp"])
    else:
        layer.self_attn, layer.mlp = originals["self_attn"], originals["mlp"]


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_dtype(dtype: torch.dtype, context: int, prefill: int, repeat: int, verbose: bool,
                cases: tuple = ("decode", "prefill")) -> List[dict]:
    from transformers import DynamicCache

    cfg, layer, rotary = build_layer(dtype)
    originals = {"self_attn": layer.self_attn, "mlp": layer.mlp}
    run = Runner(cfg, layer, rotary, dtype)
    ctx_h = run.hidden(context)
    step_h = run.hidden(1)
    pre_h = run.hidden(prefill)
    caches, outs = {}, {}
    times: Dict[str, Dict[bool, List[float]]] = {"decode": {False: [], True: []}, "prefill": {False: [], True: []}}
    with torch.no_grad():
        for patched in (False, True):  # context caches (not timed) + warm-up + outputs for the check
            swap(layer, patched, originals)
            cache = DynamicCache(config=cfg)
            if "decode" in cases:
                run.forward(ctx_h, cache, 0)
                outs[("decode", patched)] = run.forward(step_h, cache, context).float()
                cache.crop(-1)
                caches[patched] = cache
            if "prefill" in cases:
                outs[("prefill", patched)] = run.forward(pre_h, DynamicCache(config=cfg), 0).float()
        for r in range(repeat):
            for patched in ((False, True) if r % 2 == 0 else (True, False)):
                swap(layer, patched, originals)
                if "decode" in cases:
                    cache = caches[patched]
                    times["decode"][patched].append(timed(lambda: run.forward(step_h, cache, context)))
                    cache.crop(-1)
                if "prefill" in cases:
                    times["prefill"][patched].append(timed(lambda: run.forward(pre_h, DynamicCache(config=cfg), 0)))
                if verbose:
                    got = ", ".join(f"{k} {times[k][patched][-1] * 1e3:.1f} ms" for k in cases)
                    print(f"  [{dtype}] round {r} {'patched' if patched else 'unpatched'}: {got}", file=sys.stderr)
    swap(layer, False, originals)
    rows = []
    for kind, n in (("decode", 1), ("prefill", prefill)):
        if kind not in cases:
            continue
        un = statistics.median(times[kind][False])
        pa = statistics.median(times[kind][True])
        ref = outs[(kind, False)]
        err = float((outs[(kind, True)] - ref).abs().max() / ref.abs().max())
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), case=kind, new_tokens=n,
                         context=context if kind == "decode" else 0, unpatched_ms=un * 1e3, patched_ms=pa * 1e3,
                         patched_over_unpatched=pa / un, speedup=un / pa, max_rel_err=err))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=512, help="cached tokens before the timed decode step")
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per variant (median reported)")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--cases", default="decode,prefill", help="comma list of decode, prefill")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and dsv2ext (default: all)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        dsv2ext.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    chosen = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in chosen:
        if d not in dtypes:
            ap.error(f"--dtype: unknown {d!r} (fp32, bf16)")
    print(f"# one DeepSeek-V2-Lite decoder layer (MLA + MoE 64x1408 top-6 + 2 shared); torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__} (sdpa attention, grouped_mm experts), "
          f"threads torch={torch.get_num_threads()} dsv2ext={dsv2ext.get_num_threads()} ({dsv2ext.get_isa()}); "
          f"median of {args.repeat}")
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    if not cases or set(cases) - {"decode", "prefill"}:
        ap.error(f"--cases: expected a comma list of decode, prefill, got {args.cases!r}")
    rows = []
    for d in chosen:
        rows += bench_dtype(dtypes[d], args.context, args.prefill, args.repeat, args.verbose, cases)
    hdr = (f"{'dtype':5} {'case':8} {'tokens':>6} {'context':>7} {'unpatched ms':>13} {'patched ms':>11} "
           f"{'patched/unpatched':>18} {'speedup':>8} {'max rel err':>12}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['dtype']:5} {r['case']:8} {r['new_tokens']:>6} {r['context']:>7} {r['unpatched_ms']:>13.1f} "
              f"{r['patched_ms']:>11.1f} {r['patched_over_unpatched']:>18.3f} {r['speedup']:>7.2f}x "
              f"{r['max_rel_err']:>12.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
