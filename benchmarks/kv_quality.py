#!/usr/bin/env python
"""Quality of each latent-cache format (kv_dtype f32 / bf16 / fp8), measured, not assumed.

    python benchmarks/kv_quality.py                       # bundled model + lite-L4 (from the benchmark cache)
    python benchmarks/kv_quality.py --skip-lite           # bundled model only (seconds)
    python benchmarks/kv_quality.py --lite DIR            # a lite-L4 checkpoint directory

1. Held-out perplexity of the bundled model (its model card's definition: bos + tokens per file of
   heldout_sample.json, non-overlapping windows, exp(mean next-token NLL)) with each cache format,
   for windows of 512 tokens (the card's) and 2048 (the model's whole context, 4x its YaRN
   original length).
2. lite-L4 (random DeepSeek-V2-Lite-shaped weights, bf16) next-token agreement with the fp32 cache
   on the same weights: per position cosine of the logits, argmax agreement where the reference's
   top-two margin is clear (>= 0.05 x the std of its logits, as benchmarks/run.py), and
   KL(p_f32 || p_format) in nats; prompts of several lengths, the logits of their last 256 positions.

Writes benchmarks/kv_quality.md and kv_quality.json (or --out DIR).  Nothing here runs in CI.
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

import dsv2ext  # noqa: E402
from dsv2ext.perplexity import perplexity  # noqa: E402

from common import prompt_ids, write_json  # noqa: E402

FORMATS = ("f32", "bf16", "fp8")
NEAR_TIE_FRACTION = 0.05


def bundled_perplexity(windows: List[int], threads: int) -> Dict[str, Any]:
    path = dsv2ext.default_model_path()
    with open(os.path.join(path, "heldout_sample.json"), encoding="utf-8") as f:
        texts = [s["text"] for s in json.load(f)]
    out: Dict[str, Any] = {}
    for kv in FORMATS:
        m = dsv2ext.load(kv_dtype=kv)
        bpt = m.info()["kv_cache_bytes_per_token"]
        for w in windows:
            t0 = time.perf_counter()
            r = perplexity(m, texts, window=w)
            out.setdefault(str(w), {})[kv] = {"perplexity": r.perplexity, "tokens": r.predicted_tokens,
                                              "windows": r.windows, "kv_bytes_per_token": bpt,
                                              "seconds": time.perf_counter() - t0}
            print(f"  bundled, window {w}, kv {kv}: perplexity {r.perplexity:.5f} "
                  f"({r.predicted_tokens} tokens, {time.perf_counter() - t0:.1f} s)", flush=True)
        m.close()
    return out


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def agreement(test: np.ndarray, ref: np.ndarray) -> Dict[str, Any]:
    a, b = test.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    srt = np.sort(b, 1)
    clear = (srt[:, -1] - srt[:, -2]) >= NEAR_TIE_FRACTION * b.std(1)
    same = a.argmax(1) == b.argmax(1)
    p, q = _softmax64(b), _softmax64(a)
    kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(1)
    return {"positions": int(a.shape[0]), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "clear": int(clear.sum()), "argmax_agree_where_clear": int((same & clear).sum()),
            "argmax_agree": int(same.sum()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def lite_agreement(path: str, lengths: List[int], last: int) -> Dict[str, Any]:
    m = dsv2ext.load(path)  # bf16 weights, memory-mapped
    res: Dict[str, Any] = {"checkpoint": path, "lengths": lengths, "positions_per_prompt": last, "formats": {}}
    acc: Dict[str, List[Dict[str, Any]]] = {kv: [] for kv in FORMATS[1:]}
    for i, T in enumerate(lengths):
        ids = np.asarray(prompt_ids(T, seed=300 + i), np.int64)
        rows = np.arange(max(0, T - last), T)
        logits = {}
        for kv in FORMATS:
            t0 = time.perf_counter()
            cache = m.new_cache(1, T, dtype=kv)
            logits[kv] = m.forward(ids, np.zeros(T, np.int64), np.arange(T, dtype=np.int64), cache, logit_rows=rows)
            print(f"  lite-L4, {T}-token prompt, kv {kv}: {time.perf_counter() - t0:.1f} s", flush=True)
        for kv in FORMATS[1:]:
            acc[kv].append(agreement(logits[kv], logits["f32"]))
        del logits
    for kv, parts in acc.items():
        res["formats"][kv] = {
            "kv_bytes_per_token": m.new_cache(1, 1, dtype=kv).bytes_per_token,
            "positions": sum(p["positions"] for p in parts),
            "cosine_min": min(p["cosine_min"] for p in parts),
            "cosine_mean": float(np.mean([p["cosine_mean"] for p in parts])),
            "clear": sum(p["clear"] for p in parts),
            "argmax_agree_where_clear": sum(p["argmax_agree_where_clear"] for p in parts),
            "argmax_agree": sum(p["argmax_agree"] for p in parts),
            "kl_mean": float(np.mean([p["kl_mean"] for p in parts])),
            "kl_max": max(p["kl_max"] for p in parts),
            "per_prompt": parts}
    res["f32_kv_bytes_per_token"] = m.new_cache(1, 1, dtype="f32").bytes_per_token
    m.close()
    return res


def markdown(res: Dict[str, Any]) -> str:
    out = ["# Latent cache formats: quality", "",
           f"Written by `python benchmarks/kv_quality.py` ({res['date']}, {res['threads']} threads). "
           "The reference is the fp32 cache on the same weights.", ""]
    ppl = res.get("bundled")
    if ppl:
        ws = sorted(ppl, key=int)
        out += ["## Bundled model: held-out perplexity", "",
                "heldout_sample.json, the model card's definition (bos + tokens per file, non-overlapping windows).",
                "", "| kv_dtype | KV bytes/token | " + " | ".join(f"ppl (window {w}) | vs f32" for w in ws) + " |",
                "|---|---|" + "---|---|" * len(ws)]
        for kv in FORMATS:
            cells = [kv, str(ppl[ws[0]][kv]["kv_bytes_per_token"])]
            for w in ws:
                p, p0 = ppl[w][kv]["perplexity"], ppl[w]["f32"]["perplexity"]
                cells += [f"{p:.4f}", f"{100 * (p / p0 - 1):+.3f}%"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    lite = res.get("lite")
    if lite:
        out += ["## lite-L4: next-token agreement with the fp32 cache", "",
                f"Random V2-Lite-shaped weights (bf16, 4 layers), prompts of {', '.join(map(str, lite['lengths']))} "
                f"tokens, the logits of the last {lite['positions_per_prompt']} positions of each. Argmax compared "
                f"where the reference's top-two margin is clear (>= {NEAR_TIE_FRACTION} x the std of its logits).", "",
                "| kv_dtype | KV bytes/token | cosine min | cosine mean | argmax agree (clear) | KL mean (nats) | "
                "KL max | rel. logit error |", "|---|---|---|---|---|---|---|---|",
                f"| f32 | {lite['f32_kv_bytes_per_token']} | 1 | 1 | reference | 0 | 0 | 0 |"]
        for kv, r in lite["formats"].items():
            rel = float(np.mean([p["rel_err"] for p in r["per_prompt"]]))
            out.append(f"| {kv} | {r['kv_bytes_per_token']} | {r['cosine_min']:.6f} | {r['cosine_mean']:.6f} | "
                       f"{r['argmax_agree_where_clear']}/{r['clear']} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | "
                       f"{rel:.2e} |")
        out.append("")
    return "\n".join(out)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lite", default=None, help="lite-L4 checkpoint directory (default: the benchmark cache's)")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"), help="benchmark cache (lite-L4 is built there)")
    ap.add_argument("--skip-lite", action="store_true")
    ap.add_argument("--skip-bundled", action="store_true")
    ap.add_argument("--lengths", default="512,2048,4096", help="lite-L4 prompt lengths")
    ap.add_argument("--last", type=int, default=256, help="positions compared per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args(argv)
    dsv2ext.set_num_threads(a.threads)
    import datetime as _dt
    res: Dict[str, Any] = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "threads": a.threads}
    if not a.skip_bundled:
        res["bundled"] = bundled_perplexity([512, 2048], a.threads)
    if not a.skip_lite:
        path = a.lite
        if path is None:
            from checkpoint import build_checkpoint
            path = build_checkpoint("lite-L4", a.cache, seed=0, log=print)
        res["lite"] = lite_agreement(path, [int(x) for x in a.lengths.split(",")], a.last)
    md = markdown(res)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "kv_quality.json"), res)
    with open(os.path.join(a.out, "kv_quality.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
