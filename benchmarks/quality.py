"""Quality of the weight formats: dsv2ext bf16 / fp8 / int8 / int4 / int4-mixed against llama.cpp
BF16 / Q8_0 / Q4_0 / Q4_K_M of the same weights (llama.cpp's own quantizer).

    python benchmarks/quality.py                      # both parts (~15-25 min on 2 cores)
    python benchmarks/quality.py --part bundled       # held-out perplexity of the bundled model only
    python benchmarks/quality.py --part lite --prompts 4 --tokens 128

Parts
-----
* ``bundled``: held-out perplexity of the bundled model (``heldout_sample.json``, windows of
  512 tokens scored alone, the model card's definition: ``dsv2ext.perplexity``); llama.cpp scores
  the same token ids (dsv2ext's tokenizer) from GGUFs written by benchmarks/gguf_export.py.
* ``lite``: next-token agreement on lite-L4 (V2-Lite shapes, 4 layers, random bf16 weights)
  with dsv2ext bf16 (the exact computation) at every position of ``--prompts`` prompts of
  ``--tokens`` random token ids: cosine of the logit vectors (mean and minimum), argmax
  agreement where the bf16 top-two margin is clear (>= 0.05 x the standard deviation of the bf16
  logits, as benchmarks/run.py's checks), and KL(bf16 || format) of the softmax distributions.

Bits per weight are counted from what is stored (dsv2ext: every weight object's bytes, codes and
scales; llama.cpp: the GGUF tensor table, after llama.cpp's fallbacks for rows not divisible by
its block sizes), over the weights a decode step reads: all of them except the routed experts
(top-k of E) and the embedding (one row), as benchmarks/worker.py counts active bytes.
Every engine runs in its own process, one at a time.  fp8 rows appear when this dsv2ext
accepts ``dtype="fp8"``.  Writes ``RESULTS-quality.md`` and ``results-quality.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

BUNDLED = os.path.join(ROOT, "dsv2ext", "bundled", "deepseek-v2-tiny-python")
DS_VARIANTS = ["bf16", "fp8", "int8", "int4", "int4-mixed"]
LLAMA_VARIANTS = ["BF16", "Q8_0", "Q4_0", "Q4_K_M"]
GGUF_QTYPE = {"BF16": "BF16", "Q8_0": "Q8_0-LLAMA", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K_M"}
NEAR_TIE = 0.05  # x std of the reference logits


def _active_fraction(name: str, k: int, E: int, V: int) -> float:
    from worker import _active_fraction as f
    return f(name, k, E, V)


# ----------------------------------------------------------------------------- bits per weight

def ds_bits(model: Any) -> Dict[str, Any]:
    """Bits per weight of a dsv2ext model over the weights one decode step reads."""
    cfg = model.config
    k, E, V = cfg.num_experts_per_tok, cfg.n_routed_experts or 1, cfg.vocab_size
    n = b = 0.0
    by: Dict[str, List[float]] = {}
    seen: set = set()

    def walk(obj: Any, path: str) -> None:
        nonlocal n, b
        if obj is None or isinstance(obj, (int, float, str, bool)):
            return
        if hasattr(obj, "shape") and (isinstance(obj, np.ndarray) or getattr(obj, "__dsv2_dtype__", None)):
            if id(obj) in seen:
                return
            seen.add(id(obj))
            f = _active_fraction(path, k, E, V)
            el = float(np.prod(obj.shape)) * f
            by_ = float(getattr(obj, "total_nbytes", obj.nbytes)) * f
            n += el
            b += by_
            dt = getattr(obj, "__dsv2_dtype__", None) or str(obj.dtype).replace("float32", "f32")
            acc = by.setdefault(dt, [0.0, 0.0])
            acc[0] += el
            acc[1] += by_
            return
        if isinstance(obj, (list, tuple)):
            for i, x in enumerate(obj):
                walk(x, f"{path}.{i}")
            return
        d = getattr(obj, "__dict__", None)
        if d:
            for key, x in d.items():
                if not key.startswith("_"):
                    walk(x, f"{path}.{key}")

    walk(model.weights, "weights")
    return {"bits_per_weight": 8 * b / n, "active_weights": n, "active_bytes": b,
            "by_dtype": {t: {"weights": v[0], "bits_per_weight": 8 * v[1] / v[0]} for t, v in by.items()}}


def gguf_bits(path: str) -> Dict[str, Any]:
    """Bits per weight of a GGUF over the weights one decode step reads, and its tensor types."""
    import gguf
    from gguf_export import gguf_tensor_types

    r = gguf.GGUFReader(path)
    fld = lambda key: int(r.fields[f"deepseek2.{key}"].parts[r.fields[f"deepseek2.{key}"].data[0]][0])  # noqa: E731
    k, E, V = fld("expert_used_count"), fld("expert_count"), fld("vocab_size")
    n = b = 0.0
    by: Dict[str, List[float]] = {}
    for name, (typ, el, nb) in gguf_tensor_types(path)["tensors"].items():
        f = _active_fraction(name, k, E, V)
        n += el * f
        b += nb * f
        acc = by.setdefault(typ, [0.0, 0.0])
        acc[0] += el * f
        acc[1] += nb * f
    return {"bits_per_weight": 8 * b / n, "active_weights": n, "active_bytes": b,
            "by_dtype": {t: {"weights": v[0], "bits_per_weight": 8 * v[1] / v[0]} for t, v in by.items()}}


# ----------------------------------------------------------------------------- workers

def _load_ds(ckpt: str, variant: str, threads: int) -> Any:
    import dsv2ext

    dsv2ext.set_num_threads(threads)
    return dsv2ext.load(ckpt, dtype=None if variant == "bf16" else variant, load_tokenizer=True)


def _llama(path: str, threads: int, n_ctx: int) -> Any:
    import llama_cpp

    saved = os.dup(2)
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 2)  # llama.cpp's load log
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False, seed=0)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    return llm


def _windows(window: int) -> List[List[int]]:
    import dsv2ext

    tok = dsv2ext.load(BUNDLED).tokenizer
    with open(os.path.join(BUNDLED, "heldout_sample.json"), encoding="utf-8") as f:
        texts = [d["text"] for d in json.load(f)]
    out = []
    for t in texts:
        ids = tok.encode(t)
        out += [ids[s:s + window] for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2]
    return out


def _nll(logits: np.ndarray, targets: List[int]) -> float:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def worker_bundled(spec: Dict[str, Any]) -> Dict[str, Any]:
    wins = _windows(spec["window"])
    total, count = 0.0, 0
    t0 = time.perf_counter()
    if spec["engine"] == "dsv2ext":
        model = _load_ds(BUNDLED, spec["variant"], spec["threads"])
        bits = ds_bits(model)
        for w in wins:
            total += _nll(model.logits(w)[:-1], w[1:])
            count += len(w) - 1
    else:
        llm = _llama(spec["gguf"], spec["threads"], spec["window"])
        bits = gguf_bits(spec["gguf"])
        for w in wins:
            llm.reset()
            llm.eval(w)
            total += _nll(np.array(llm.scores[:len(w)], dtype=np.float32)[:-1], w[1:])
            count += len(w) - 1
    return {"perplexity": math.exp(total / count), "mean_nll": total / count, "predicted_tokens": count,
            "windows": len(wins), "seconds": time.perf_counter() - t0, **bits}


def _prompts(n: int, tokens: int) -> List[List[int]]:
    from common import prompt_ids
    return [prompt_ids(tokens, 1000 + i) for i in range(n)]


def _logits(spec: Dict[str, Any]) -> (np.ndarray, Dict[str, Any]):
    prompts = _prompts(spec["prompts"], spec["tokens"])
    if spec["engine"] == "dsv2ext":
        model = _load_ds(spec["ckpt"], spec["variant"], spec["threads"])
        bits = ds_bits(model)
        out = np.concatenate([np.asarray(model.logits(p), np.float32) for p in prompts])
    else:
        llm = _llama(spec["gguf"], spec["threads"], spec["tokens"])
        bits = gguf_bits(spec["gguf"])
        rows = []
        for p in prompts:
            llm.reset()
            llm.eval(p)
            rows.append(np.array(llm.scores[:len(p)], dtype=np.float32))
        out = np.concatenate(rows)
    return out, bits


def agreement(ref: np.ndarray, got: np.ndarray) -> Dict[str, Any]:
    """Per-position cosine, argmax agreement where the reference margin is clear, KL(ref || got)."""
    r, g = ref.astype(np.float64), got.astype(np.float64)
    cos = (r * g).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(g, axis=1)
    top = np.sort(r, axis=1)[:, -2:]
    clear = (top[:, 1] - top[:, 0]) >= NEAR_TIE * r.std(axis=1)
    agree = r.argmax(1) == g.argmax(1)

    def logp(x: np.ndarray) -> np.ndarray:
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
    lr, lg = logp(r), logp(g)
    kl = (np.exp(lr) * (lr - lg)).sum(1)
    return {"positions": int(len(r)), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "clear_positions": int(clear.sum()), "argmax_agree_clear": float(agree[clear].mean()) if clear.any() else None,
            "argmax_agree_all": float(agree.mean()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def worker_lite(spec: Dict[str, Any]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    logits, bits = _logits(spec)
    res: Dict[str, Any] = {"seconds": time.perf_counter() - t0, **bits}
    if spec.get("save_ref"):
        np.save(spec["save_ref"], logits)
    else:
        res.update(agreement(np.load(spec["ref"], mmap_mode="r"), logits))
    return res


def run_worker(spec: Dict[str, Any], work: str) -> Dict[str, Any]:
    """One engine in a child process; {'ok': False, 'error': ...} when it fails."""
    path = os.path.join(work, f"spec-{spec['part']}-{spec['engine']}-{spec['variant']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", path], capture_output=True, text=True)
    lines = [l for l in r.stdout.strip().splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"ok": False, "error": (r.stderr or r.stdout)[-3000:]}
    return json.loads(lines[-1])


def _worker_main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        res = worker_bundled(spec) if spec["part"] == "bundled" else worker_lite(spec)
        res["ok"] = True
    except ValueError as e:
        if spec["engine"] == "dsv2ext" and "dtype" in str(e):
            res = {"ok": False, "unsupported": True, "error": str(e)}
        else:
            raise
    from common import peak_rss_bytes  # VmHWM: the worker's own peak (ru_maxrss keeps the driver's)

    res["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------- driver

def _ggufs(ckpt: str, cfg: Dict[str, Any], out_dir: str, threads: int, log: Any) -> Dict[str, str]:
    from gguf_export import export_gguf, gguf_path

    out: Dict[str, str] = {}
    bf16 = gguf_path(ckpt, "BF16")
    for v in LLAMA_VARIANTS:
        q = GGUF_QTYPE[v]
        if q == "BF16" and os.path.isfile(bf16):
            out[v] = bf16
            continue
        if os.path.isfile(bf16) and q != "BF16":  # quantize the checkpoint's existing BF16 file
            from gguf_export import quantize_gguf
            out[v] = quantize_gguf(bf16, q, gguf_path(out_dir, q), threads=threads, log=log)
        else:
            out[v] = export_gguf(ckpt, cfg, q, log=log, out_dir=out_dir, threads=threads)
    return out


def _lite_ckpt(arg: Optional[str]) -> str:
    if arg:
        return arg
    from checkpoint import checkpoint_dir
    for root in (os.path.join(HERE, "cache"), "/work/bench-cache"):
        p = checkpoint_dir(root, "lite-L4", 0)
        if os.path.isfile(os.path.join(p, "config.json")):
            return p
    from checkpoint import build_checkpoint
    return build_checkpoint("lite-L4", os.path.join(HERE, "cache"), 0)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mix(r: Dict[str, Any]) -> str:
    """The stored types by share of the weights read per token (>= 1%), e.g. 'int4 80%, int8 18%'."""
    by = r.get("by_dtype") or {}
    tot = sum(v["weights"] for v in by.values()) or 1.0
    parts = sorted(((v["weights"] / tot, t) for t, v in by.items()), reverse=True)
    return ", ".join(f"{t} {100 * f:.0f}%" for f, t in parts if f >= 0.01)


def write_report(res: Dict[str, Any], out: str) -> str:
    lines = ["# Weight formats: quality and bits per weight", "",
             f"Written by `python benchmarks/quality.py` ({res['date']}, {res['machine']}); "
             "bits per weight over the weights one decode step reads (routed experts: top-k of E; "
             "embedding: one row), from the stored tensors (scales included; llama.cpp after its fallbacks).", ""]
    if "bundled" in res:
        b = res["bundled"]
        ref = next((r for r in b["rows"] if r.get("ok") and r["engine"] == "dsv2ext" and r["variant"] == "bf16"), None)
        lines += ["## Held-out perplexity of the bundled model", "",
                  f"`{os.path.relpath(BUNDLED, ROOT)}/heldout_sample.json`, windows of {b['window']} tokens "
                  "(the model card's definition; the card gives 9.6922 for transformers fp32).", "",
                  "| engine | format | bits / weight | perplexity | vs dsv2ext bf16 | stored types (share of weights read) |",
                  "|---|---|---|---|---|---|"]
        for r in b["rows"]:
            if not r.get("ok"):
                lines.append(f"| {r['engine']} | {r['variant']} | - | {'not supported by this dsv2ext' if r.get('unsupported') else 'failed'} | - | |")
                continue
            rel = f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.2f}%" if ref else "-"
            lines.append(f"| {r['engine']} | {r['variant']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.4f} | {rel} | "
                         f"{_mix(r)} |")
        lines.append("")
    if "lite" in res:
        li = res["lite"]
        lines += ["## Next-token agreement on lite-L4 with dsv2ext bf16", "",
                  f"{li['prompts']} prompts x {li['tokens']} random token ids, every position; clear = "
                  f"bf16 top-two margin >= {NEAR_TIE} x std of the bf16 logits.", "",
                  "| engine | format | bits / weight | cosine mean | cosine min | argmax agree (clear) | KL(bf16 \\|\\| fmt) mean | KL max | stored types (share of weights read) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in li["rows"]:
            if not r.get("ok"):
                lines.append(f"| {r['engine']} | {r['variant']} | - | {'not supported by this dsv2ext' if r.get('unsupported') else 'failed'} | | | | | |")
                continue
            if r.get("reference"):
                lines.append(f"| {r['engine']} | {r['variant']} | {r['bits_per_weight']:.2f} | reference | | | | | {_mix(r)} |")
                continue
            lines.append(f"| {r['engine']} | {r['variant']} | {r['bits_per_weight']:.2f} | {r['cosine_mean']:.5f} | "
                         f"{r['cosine_min']:.5f} | {_fmt(r['argmax_agree_clear'], '.4f')} ({r['clear_positions']}) | "
                         f"{r['kl_mean']:.2e} | {r['kl_max']:.2e} | {_mix(r)} |")
        lines.append("")
    lines += ["dsv2ext int4 keeps kv_b_proj and the down_proj of the dense MLP and the shared experts in int8 "
              "(see the README); llama.cpp's Q4_K_M uses Q6_K for some tensors and falls back to Q5_0 / Q8_0 / F16 "
              "for rows not divisible by 256 (or 32).  Per-type details: `results-quality.json` (`by_dtype`).", ""]
    path = os.path.join(out, "RESULTS-quality.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return _worker_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["bundled", "lite", "all"], default="all")
    ap.add_argument("--lite-ckpt", default=None, help="lite-L4 checkpoint (default: the benchmark cache's)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated variants to run (others: previous results kept)")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--cache", default=os.path.join(HERE, "cache", "quality"))
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS-quality.md from the JSON")
    a = ap.parse_args(argv)
    os.makedirs(a.cache, exist_ok=True)
    if a.report_only:
        with open(os.path.join(a.out, "results-quality.json"), encoding="utf-8") as f:
            print(write_report(json.load(f), a.out))
        return 0
    log = lambda m: print(m, flush=True)  # noqa: E731
    jpath = os.path.join(a.out, "results-quality.json")
    res: Dict[str, Any] = {}
    if os.path.isfile(jpath):
        with open(jpath, encoding="utf-8") as f:
            res = json.load(f)
    from machine import cpu_model
    res.update(date=time.strftime("%Y-%m-%d"), machine=f"{cpu_model()}, {a.threads} threads")
    only = set(a.only.split(",")) if a.only else None
    need_gguf = only is None or bool(only & set(LLAMA_VARIANTS))  # llama.cpp files only when a llama row runs

    def keep(part: str, eng: str, var: str) -> Optional[Dict[str, Any]]:
        if only is None or var in only:
            return None
        return next((r for r in res.get(part, {}).get("rows", []) if r["engine"] == eng and r["variant"] == var), None)

    if a.part in ("bundled", "all"):
        with open(os.path.join(BUNDLED, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        ggufs = _ggufs(BUNDLED, cfg, os.path.join(a.cache, "bundled"), a.threads, log) if need_gguf else {}
        rows = []
        for eng, variants in (("dsv2ext", DS_VARIANTS), ("llama.cpp", LLAMA_VARIANTS)):
            for v in variants:
                r = keep("bundled", eng, v)
                if r is None:
                    spec = {"part": "bundled", "engine": eng, "variant": v, "threads": a.threads, "window": a.window,
                            "gguf": ggufs.get(v)}
                    r = dict(run_worker(spec, a.cache), engine=eng, variant=v)
                rows.append(r)
                log(f"bundled {eng:9s} {v:10s} " + (f"ppl {r['perplexity']:.4f}  {r['bits_per_weight']:.2f} bits/weight"
                                                   if r.get("ok") else f"-- {r.get('error', '')[-300:]}"))
        res["bundled"] = {"window": a.window, "rows": rows}
    if a.part in ("lite", "all"):
        ckpt = _lite_ckpt(a.lite_ckpt)
        with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        ggufs = _ggufs(ckpt, cfg, os.path.join(a.cache, "lite-L4"), a.threads, log) if need_gguf else {}
        ref = os.path.join(a.cache, f"lite-ref-{a.prompts}x{a.tokens}.npy")
        rows = []
        base = {"part": "lite", "ckpt": ckpt, "threads": a.threads, "prompts": a.prompts, "tokens": a.tokens}
        r = dict(run_worker(dict(base, engine="dsv2ext", variant="bf16", save_ref=ref), a.cache),
                 engine="dsv2ext", variant="bf16", reference=True)
        rows.append(r)
        log(f"lite    dsv2ext   bf16       reference ({r.get('bits_per_weight', 0):.2f} bits/weight)")
        for eng, variants in (("dsv2ext", DS_VARIANTS[1:]), ("llama.cpp", LLAMA_VARIANTS)):
            for v in variants:
                r = keep("lite", eng, v)
                if r is None:
                    r = dict(run_worker(dict(base, engine=eng, variant=v, ref=ref, gguf=ggufs.get(v)), a.cache),
                             engine=eng, variant=v)
                rows.append(r)
                log(f"lite    {eng:9s} {v:10s} " + (
                    f"cos {r['cosine_mean']:.5f} (min {r['cosine_min']:.4f})  agree {_fmt(r['argmax_agree_clear'], '.4f')}  "
                    f"KL {r['kl_mean']:.2e}  {r['bits_per_weight']:.2f} bits/weight" if r.get("ok")
                    else f"-- {r.get('error', '')[-300:]}"))
        res["lite"] = {"ckpt": ckpt, "prompts": a.prompts, "tokens": a.tokens, "rows": rows}
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {jpath} and {write_report(res, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
