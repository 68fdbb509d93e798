"""Decode speed of dsv2ext against the memory-bandwidth roofline, per weight dtype.

    python benchmarks/bench_decode.py                      # lite-L4 checkpoint, bf16 and int8
    python benchmarks/bench_decode.py --ckpt DIR --dtypes int8 int4 fp8 --context 128 4096 --tokens 32
    python benchmarks/bench_decode.py --synthetic --layers 2 --experts 16   # small random model, no files

Per dtype and context: the prompt (random token ids) is prefilled, then
``--tokens`` greedy one-token steps are timed one by one (median and mean
reported).  Roofline tokens/s = streaming read bandwidth / (active weight
bytes per token in the engine's own format, int8 and fp8 scales included, + latent
cache bytes read at that context).  Active bytes: every weight except the
routed experts (top-k of E of them) and the embedding (one row).  The time
of a step is split by the ``dsv2ext._C`` kernel it spends in: attention
(``mla_attention_block``), MoE (``moe_block``), dense MLP (``swiglu_mlp``),
lm_head (``linear``), norms (``rmsnorm``); the rest of the step is Python
(embedding lookup, residual adds, argument checks, cache bookkeeping).

The checkpoint default is the benchmark cache's ``lite-L4-seed0-v1``
(DeepSeek-V2-Lite shapes, 4 layers, q_lora 1536, random bf16 weights; see
benchmarks/checkpoint.py).  Bandwidth comes from benchmarks/machine.py's
``machine_peak read`` (2 threads by default) unless ``--bandwidth`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import dsv2ext  # noqa: E402
from dsv2ext.dtypes import BF16  # noqa: E402

PROFILED = {"attention": "mla_attention_block", "moe": "moe_block", "dense_mlp": "swiglu_mlp",
            "lm_head": "linear", "norms": "rmsnorm"}


def _default_ckpt() -> Optional[str]:
    for root in (os.path.join(HERE, "cache"), "/work/main/benchmarks/cache"):
        p = os.path.join(root, "lite-L4-seed0-v1")
        if os.path.isfile(os.path.join(p, "config.json")):
            return p
    return None


def nbytes(w: Any) -> int:
    if w is None:
        return 0
    return int(getattr(w, "total_nbytes", getattr(w, "nbytes", 0)))


def active_bytes(model: Any) -> Dict[str, float]:
    """Bytes of weights one decode step reads, by part."""
    cfg, W = model.config, model.weights
    out = {"embedding_row": nbytes(W.embed_tokens) / cfg.vocab_size, "lm_head": nbytes(W.lm_head),
           "norms": nbytes(W.norm), "attention": 0.0, "dense_mlp": 0.0, "moe": 0.0}
    for lw in W.layers:
        out["norms"] += nbytes(lw.input_layernorm) + nbytes(lw.post_attention_layernorm)
        out["attention"] += sum(nbytes(v) for v in vars(lw.attn).values())
        if lw.mlp is not None:
            out["dense_mlp"] += sum(nbytes(v) for v in vars(lw.mlp).values())
        if lw.moe is not None:
            m = lw.moe
            per = [sum(nbytes(w) for w in (e.gate_proj, e.up_proj, e.down_proj)) for e in m.experts]
            out["moe"] += nbytes(m.gate) + sum(per) / len(per) * cfg.num_experts_per_tok
            if m.shared is not None:
                out["moe"] += sum(nbytes(w) for w in (m.shared.gate_proj, m.shared.up_proj, m.shared.down_proj))
    return out


def kv_bytes(model: Any, context: int) -> float:
    cfg = model.config
    return float(context) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_hidden_layers


def measure_bandwidth(threads: int) -> Optional[float]:
    try:
        import machine  # benchmarks/machine.py: compiles machine_peak.c into the cache
        exe = machine._binary(os.path.join(HERE, "cache"))
        return max(machine._run(exe, "read", threads, 1 << 30, 3) for _ in range(2))
    except Exception as e:  # no compiler, ...
        print(f"bandwidth measurement failed: {e}", file=sys.stderr)
        return None


def synthetic_model(layers: int, experts: int, dtype: str, seed: int = 0) -> Any:
    """A DeepSeek-V2-Lite-shaped model (q_lora 1536) with random weights, built in memory."""
    from dsv2ext.config import ModelConfig
    from dsv2ext.model import DeepseekV2
    from dsv2ext.weights import AttentionWeights, LayerWeights, MLPWeights, ModelWeights, MoEWeights

    cfg = ModelConfig.from_dict({
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": experts, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "vocab_size": 102400, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 0.707, "mscale_all_dim": 0.707},
        "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False})
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> Any:
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        return BF16.from_float32(x) if dtype != "f32" else x

    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    d, H = 2048, 16
    lw = []
    for i in range(layers):
        attn = AttentionWeights(kv_a_proj_with_mqa=w(576, d), kv_a_layernorm=ones(512), kv_b_proj=w(H * 256, 512),
                                o_proj=w(d, H * 128), q_a_proj=w(1536, d), q_a_layernorm=ones(1536),
                                q_b_proj=w(H * 192, 1536))
        layer = LayerWeights(ones(d), ones(d), attn)
        if i == 0:
            layer.mlp = MLPWeights(w(10944, d), w(10944, d), w(d, 10944))
        else:
            layer.moe = MoEWeights(gate=w(experts, d), experts=[MLPWeights(w(1408, d), w(1408, d), w(d, 1408))
                                                                for _ in range(experts)],
                                   shared=MLPWeights(w(2816, d), w(2816, d), w(d, 2816)))
        lw.append(layer)
    weights = ModelWeights(embed_tokens=w(102400, d), norm=ones(d), lm_head=w(102400, d), layers=lw)
    if dtype in ("int8", "int4", "int4-mixed", "fp8"):
        from dsv2ext.quant import quantize_model_weights
        weights = quantize_model_weights(weights, recipe=dtype)
    return DeepseekV2(cfg, weights)


def decode_run(model: Any, context: int, tokens: int, profile: bool, seed: int = 0) -> Dict[str, Any]:
    """Prefill `context` random tokens, then time `tokens` one-token greedy steps."""
    ops = dsv2ext._C  # the kernels the model's forward calls
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, min(model.config.vocab_size, 100000), size=context).astype(np.int64)
    cache = model.new_cache(1, context + tokens + 1)
    t0 = time.perf_counter()
    logits = model.forward(ids, np.zeros(context, np.int64), np.arange(context, dtype=np.int64), cache,
                           logit_rows=np.array([context - 1]))
    prefill_s = time.perf_counter() - t0
    acc = {k: 0.0 for k in PROFILED}
    saved = {}
    if profile:
        for part, fn in PROFILED.items():
            f = getattr(ops, fn)
            saved[fn] = f

            def wrapped(*a: Any, __f: Any = f, __p: str = part, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return __f(*a, **kw)
                finally:
                    acc[__p] += time.perf_counter() - t
            setattr(ops, fn, wrapped)
    steps: List[float] = []
    try:
        tok = int(np.argmax(logits[0]))
        for i in range(tokens):
            t = time.perf_counter()
            logits = model.forward(np.array([tok], np.int64), np.zeros(1, np.int64),
                                   np.array([context + i], np.int64), cache)
            tok = int(np.argmax(logits[0]))
            steps.append(time.perf_counter() - t)
    finally:
        for fn, f in saved.items():
            setattr(ops, fn, f)
    total = sum(steps)
    res: Dict[str, Any] = {"context": context, "tokens": tokens, "prefill_s": prefill_s,
                           "step_median_s": statistics.median(steps), "step_mean_s": total / len(steps),
                           "step_min_s": min(steps), "tokens_per_s": len(steps) / total,
                           "tokens_per_s_median": 1.0 / statistics.median(steps)}
    if profile:
        split = {k: v / len(steps) for k, v in acc.items()}
        split["python_other"] = total / len(steps) - sum(split.values())
        res["seconds_per_token"] = split
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: the cached lite-L4)")
    ap.add_argument("--synthetic", action="store_true", help="build a random V2-Lite-shaped model in memory")
    ap.add_argument("--layers", type=int, default=4, help="layers of the synthetic model (1 dense + MoE)")
    ap.add_argument("--experts", type=int, default=64, help="routed experts of the synthetic model")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "int8"],
                    choices=["bf16", "int8", "f32", "int4", "int4-mixed", "fp8"])
    ap.add_argument("--context", nargs="+", type=int, default=[128])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s (default: measured)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait (at most this long) until other processes leave the CPUs idle")
    args = ap.parse_args(argv)
    if args.wait_idle > 0:
        import machine
        busy = machine.wait_until_idle(args.wait_idle)
        print(f"CPUs busy before the run: {100 * busy:.0f}%" if busy is not None else "CPU load unknown")

    dsv2ext.set_num_threads(args.threads)
    bw = args.bandwidth if args.bandwidth else measure_bandwidth(args.threads)
    ckpt = None if args.synthetic else (args.ckpt or _default_ckpt())
    if not args.synthetic and ckpt is None:
        ap.error("no --ckpt given and no cached lite-L4 checkpoint found (use --synthetic)")
    print(f"model: {ckpt or f'synthetic {args.layers} layers, {args.experts} experts'}; threads {args.threads}; "
          f"read bandwidth {bw if bw else float('nan'):.1f} GB/s")
    results = []
    for dt in args.dtypes:
        t0 = time.perf_counter()
        model = synthetic_model(args.layers, args.experts, dt) if args.synthetic else dsv2ext.load(ckpt, dtype=dt)
        load_s = time.perf_counter() - t0
        ab = active_bytes(model)
        wbytes = sum(ab.values())
        model.forward(np.array([5], np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), model.new_cache(1, 1))
        for ctx in args.context:
            if args.wait_idle > 0:
                import machine
                machine.wait_until_idle(args.wait_idle)
            r = decode_run(model, ctx, args.tokens, not args.no_profile)
            byt = wbytes + kv_bytes(model, ctx)
            r.update(dtype=dt, load_s=load_s, active_weight_bytes=wbytes, active_bytes_by_part=ab,
                     kv_bytes=kv_bytes(model, ctx), bandwidth_GBps=bw)
            if bw:
                r["roofline_tokens_per_s"] = bw * 1e9 / byt
                r["roofline_fraction"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
                r["roofline_fraction_median"] = r["tokens_per_s_median"] / r["roofline_tokens_per_s"]
            results.append(r)
            line = (f"{dt:5s} ctx {ctx:5d}: {r['tokens_per_s']:6.2f} tok/s (median step {r['step_median_s'] * 1e3:6.1f} ms,"
                    f" min {r['step_min_s'] * 1e3:6.1f} ms), active {wbytes / 1e9:.3f} GB + KV {r['kv_bytes'] / 1e6:.1f} MB")
            if bw:
                line += (f"; roofline {r['roofline_tokens_per_s']:.1f} tok/s -> {100 * r['roofline_fraction']:.0f}% "
                         f"(median step: {100 * r['roofline_fraction_median']:.0f}%)")
            print(line)
            if "seconds_per_token" in r:
                sp = r["seconds_per_token"]
                print("        per token: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sp.items()))
                by = {"attention": ab["attention"], "moe": ab["moe"], "dense_mlp": ab["dense_mlp"],
                      "lm_head": ab["lm_head"]}
                print("        effective GB/s: " + ", ".join(
                    f"{k} {by[k] / sp[k] / 1e9:.1f}" for k in by if sp.get(k, 0) > 0 and by[k] > 0))
        model.close()
        del model
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
