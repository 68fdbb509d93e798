#!/usr/bin/env python
"""dsv2ext against PyTorch/transformers and llama.cpp on the same weights, in one run.

    python benchmarks/run.py                      # lite-L4, 2 threads, everything
    python benchmarks/run.py --quick              # smoke run (a few minutes), results under cache/quick
    python benchmarks/run.py --geometry lite-full # 27-layer V2-Lite: dsv2ext int8 / int4 vs llama.cpp Q8_0
    python benchmarks/run.py --long              # also prefill and decode at 4K-32K tokens of context

Steps:

1. measure the machine (streaming-read bandwidth over a 2 GiB buffer and the
   fp32 FMA / bf16 / int8 dot-product peaks, 1 and N threads; ``machine.py``);
2. build (once, cached under ``benchmarks/cache``) the synthetic checkpoint in
   the HF layout and the same weights as deepseek2 GGUF files (BF16, Q8_0, and
   Q4_0 / Q4_K_M by llama.cpp's own quantizer);
3. check that the engines compute the same model: dsv2ext vs transformers
   logits in fp32 (relative error <= 1e-4), dsv2ext vs llama.cpp BF16
   (cosine >= 0.99, same argmax wherever the top-two margin is clear, greedy
   tokens equal until the first near-tie);
4. measure each engine in its own time-boxed process (dsv2ext f32, bf16, int8,
   fp8, int4, int4-mixed; llama.cpp BF16, Q8_0, Q4_0, Q4_K_M): prefill tokens/s
   (512-token prompt), decode tokens/s (64 tokens after 128 and after 4096
   tokens of context), peak RSS, KV cache bytes per token, decode as a
   fraction of the bandwidth roofline, and dsv2ext's per-token time split;
   decode once more side by side in alternating rounds, group by group
   (bf16 / int8 / BF16 / Q8_0, then fp8 / int4 / int4-mixed / Q4_0 / Q4_K_M);
5. print one table (with ratios dsv2ext / each anchor) and the issue-8 and issue-14
   targets, and write ``RESULTS.md``, ``results.json`` and a PNG chart.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checkpoint import GEOMETRIES, build_checkpoint, hf_config, tensor_specs  # noqa: E402
from common import FULL, QUICK, first_divergence, read_json, write_json  # noqa: E402
from machine import BandwidthProbe, cpu_busy, machine_info, measure_peaks, wait_until_idle  # noqa: E402

#: relative-error bound of dsv2ext fp32 vs transformers fp32 logits
FP32_REL_TOL = 1e-4
#: cosine-similarity bound of dsv2ext vs llama.cpp (BF16) next-token logits
COSINE_MIN = 0.99
#: a top-two margin below this fraction of the reference logits' standard deviation is a near-tie
NEAR_TIE_FRACTION = 0.05


# ----------------------------------------------------------------------------- plan

class Run:
    """One worker process: engine, variant, task and its time box."""

    def __init__(self, engine: str, variant: str, task: str, timeout: int,
                 contexts: Optional[List[int]] = None) -> None:
        self.engine, self.variant, self.task, self.timeout = engine, variant, task, timeout
        self.contexts = contexts  # decode contexts (None: the workload's)

    @property
    def key(self) -> str:
        return f"{self.task}:{self.engine}:{self.variant}"

    @property
    def label(self) -> str:
        return ENGINE_LABEL[self.engine] + " " + self.variant


ENGINE_LABEL = {"dsv2ext": "dsv2ext", "transformers": "transformers", "llama": "llama.cpp"}

#: engines whose decode is measured again in interleaved rounds, group by group (the engines of a
#: group are resident side by side: 8-bit-and-up, then the 4-bit formats with FP8)
INTERLEAVE_GROUPS = [
    {("dsv2ext", "bf16"), ("dsv2ext", "int8"), ("llama", "BF16"), ("llama", "Q8_0")},
    {("dsv2ext", "fp8"), ("dsv2ext", "int4"), ("dsv2ext", "int4-mixed"), ("llama", "Q4_0"), ("llama", "Q4_K_M")},
]
INTERLEAVED = set().union(*INTERLEAVE_GROUPS)
#: lite-full's int8 and Q8_0 models (16-17 GiB each) cannot be resident together in 24 GiB
INTERLEAVE_GEOMETRIES = {"lite-L4"}
#: engines of the long-context rounds (--long): dsv2ext with its default (bf16) and FP8 latent caches,
#: and with the opt-in bf16 compute mode (its attention over the bf16 cache on bf16 dot products),
#: llama.cpp with its default f16 cache, all on the same bf16 weights
LONG_ENGINES = [("dsv2ext", "bf16"), ("dsv2ext", "bf16-compute"), ("dsv2ext", "bf16-kvfp8"), ("llama", "BF16")]
#: decode steps per context in the long-context rounds (4 rounds)
LONG_STEPS = 32


#: llama.cpp GGUFs of each geometry (BF16 / Q8_0 written by gguf_export, the 4-bit ones by llama.cpp's
#: own quantizer from the BF16 file; lite-full's 29 GiB BF16 file is not made)
LLAMA_TYPES = {"lite-L4": ["BF16", "Q8_0", "Q4_0", "Q4_K_M"], "lite-full": ["Q8_0"]}


def plan_runs(geometry: str, quick: bool, skip_llama: bool, skip_hf: bool, all_contexts: bool,
              contexts: List[int]) -> List[Run]:
    """Every worker process of a benchmark, in execution order.

    dsv2ext f32 and transformers decode only after the shortest context unless
    ``all_contexts`` (their long-context numbers are no target, and a 4096-token
    prefill takes them many minutes).
    """
    runs: List[Run] = []
    t_ds, t_hf, t_ll = (300, 600, 300) if quick else (1500, 1200, 900)
    short = None if all_contexts else contexts[:1]
    if geometry == "lite-L4":
        runs.append(Run("dsv2ext", "f32", "check", t_ds))
        runs.append(Run("dsv2ext", "bf16", "check", t_ds))
        runs.append(Run("dsv2ext", "bf16-compute", "check", t_ds))
        if not skip_hf:
            runs.append(Run("transformers", "fp32-eager", "check", t_hf))
        if not skip_llama:
            runs.append(Run("llama", "BF16", "check", t_ll))
        runs.append(Run("dsv2ext", "bf16", "speed", t_ds))
        runs.append(Run("dsv2ext", "int8", "speed", t_ds))
        # fewer bytes per weight (issue 14): FP8 (V3 format), 4-bit, 4-bit experts with int8 elsewhere
        for v in ("fp8", "int4", "int4-mixed"):
            runs.append(Run("dsv2ext", v, "speed", t_ds))
        # its decode of one token is the bf16 path: only the first context
        runs.append(Run("dsv2ext", "bf16-compute", "speed", t_ds, contexts[:1]))
        if not quick:
            runs.append(Run("dsv2ext", "f32", "speed", t_ds, short))
        if not skip_llama:
            for q in LLAMA_TYPES["lite-L4"]:
                runs.append(Run("llama", q, "speed", t_ll))
        if not skip_hf:
            hf = ["bf16-eager"] if quick else ["fp32-eager", "bf16-eager", "fp32-grouped_mm", "bf16-grouped_mm"]
            for v in hf:
                runs.append(Run("transformers", v, "speed", t_hf, short))
    elif geometry == "lite-full":
        runs.append(Run("dsv2ext", "int8", "check", t_ds * 2))
        if not skip_llama:
            runs.append(Run("llama", "Q8_0", "check", t_ll * 2))
        runs.append(Run("dsv2ext", "int8", "speed", t_ds * 2))
        runs.append(Run("dsv2ext", "int4", "speed", t_ds * 2))  # ~9-10 GiB
        if not skip_llama:
            runs.append(Run("llama", "Q8_0", "speed", t_ll * 2))
    else:
        raise ValueError(f"--geometry: expected one of {sorted(GEOMETRIES)}, got {geometry!r}")
    return runs


def run_worker(run: Run, spec: Dict[str, Any], work_dir: str, log: Any) -> Dict[str, Any]:
    """Start worker.py for one run in its own process group; kill it at the time box."""
    name = run.key.replace(":", "-")
    spec_path = os.path.join(work_dir, name + ".spec.json")
    out_path = os.path.join(work_dir, name + ".json")
    log_path = os.path.join(work_dir, name + ".log")
    if os.path.exists(out_path):
        os.unlink(out_path)
    spec = dict(spec, out=out_path, engine=run.engine, variant=run.variant, task=run.task,
                contexts=run.contexts)
    write_json(spec_path, spec)
    t0 = time.time()
    with open(log_path, "w") as lf:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), spec_path],
                             stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=run.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    wall = time.time() - t0
    if os.path.exists(out_path):
        res = read_json(out_path)
        if rc is None:
            res["timed_out"] = f"killed at its time box ({run.timeout} s); partial results"
    else:
        tail = ""
        try:
            with open(log_path, "r", errors="replace") as f:
                tail = f.read()[-2000:]
        except OSError:
            pass
        why = f"timed out after {run.timeout} s" if rc is None else f"exited with status {rc} (no result)"
        res = {"ok": False, "error": why, "log_tail": tail}
    res["driver_wall_seconds"] = wall
    res["log"] = log_path
    status = "ok" if res.get("ok") else "FAILED: " + str(res.get("error", "?")).splitlines()[0][:200]
    if res.get("timed_out"):
        status += " (" + res["timed_out"] + ")"
    log(f"  [{wall:6.0f} s] {run.key:40s} {status}")
    return res


class Served:
    """A worker process in ``serve`` mode: one engine kept loaded, decoding on request."""

    def __init__(self, run: Run, spec: Dict[str, Any], work_dir: str) -> None:
        self.run = run
        name = "serve-" + run.key.split(":", 1)[1].replace(":", "-")
        spec_path = os.path.join(work_dir, name + ".spec.json")
        self.log_path = os.path.join(work_dir, name + ".log")
        write_json(spec_path, dict(spec, out=os.path.join(work_dir, name + ".json"), engine=run.engine,
                                   variant=run.variant, task="serve"))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker.py"), spec_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, start_new_session=True)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout: float) -> Dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.run.key}: no answer within {timeout:.0f} s (log: {self.log_path})")
        if line is None:
            raise RuntimeError(f"{self.run.key}: the worker exited (log: {self.log_path})")
        return json.loads(line)

    def ask(self, cmd: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply(timeout)

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def interleaved_decode(runs: List[Run], base_spec: Dict[str, Any], ggufs: Dict[str, str], contexts: List[int],
                       steps: int, rounds: int, cache: str, threads: int, work_dir: str,
                       log: Any, same_round_base: bool = False) -> Dict[str, Any]:
    """Decode of several engines, measured in alternating rounds with a bandwidth probe per round.

    The engines stay loaded side by side (one process each).  For each context,
    every engine prefills it, then ``rounds`` rounds follow: a short
    streaming-read probe (the 2 GiB buffer of the machine probe), then
    ``steps / rounds`` decode steps of every engine, the starting engine rotating
    from round to round, with a 0.3 s pause before each engine's turn (llama.cpp's
    threads poll for a while after their work; the pause lets them sleep) and one
    untimed step at the start of each turn (wakes the threads, refills the caches).  Memory-bandwidth drift on
    a shared host (tens of percent within minutes) then hits every engine alike,
    and the roofline uses the median of the probes taken between the steps.

    ``same_round_base``: engines that can hold two decode states (dsv2ext) keep the first
    context's state, and each of their turns at a later context also times as many steps on it
    (after one untimed step), so that the ratio of decode at a long context to decode at the
    first one comes from the same rounds, not from rounds minutes apart (``base_step_s`` and
    ``over_base`` of each later context).

    Returns
    -------
    dict
        ``{"bandwidth_GBps": {ctx: [...]}, "engines": {key: {"decode": {ctx: {...}}, "weights": ...,
        "kv_cache": ...}}, "rounds": R, "steps_per_round": k}``
    """
    per = max(1, steps // rounds)
    out: Dict[str, Any] = {"rounds": rounds, "steps_per_round": per, "bandwidth_GBps": {}, "engines": {}}
    served: List[Served] = []
    probe = BandwidthProbe(cache, threads)  # allocated before the engines load, kept to the end
    try:
        for run in runs:
            spec = dict(base_spec)
            if run.engine == "llama":
                spec["gguf"] = ggufs[run.variant]
            served.append(Served(run, spec, work_dir))
        for s in served:
            hello = s.reply(timeout=s.run.timeout)
            out["engines"][s.run.key] = {"weights": hello["weights"], "kv_cache": hello["kv_cache"], "decode": {}}
        log(f"  interleaved decode: {', '.join(s.run.key for s in served)} loaded")
        kept: set = set()  # engines holding the first context's state (same_round_base)
        for ci, ctx in enumerate(contexts):
            for s in served:
                d = s.ask({"cmd": "begin", "context": ctx}, timeout=s.run.timeout)
                out["engines"][s.run.key]["decode"][str(ctx)] = {"prefill_s": d["prefill_s"], "step_s": [],
                                                                  "peak_rss_bytes": d.get("peak_rss_bytes")}
            bws = []
            for r in range(rounds):
                time.sleep(0.3)
                bws.append(probe.read())
                for i in range(len(served)):
                    s = served[(i + r) % len(served)]
                    # let the previous engine's threads go to sleep first: llama.cpp's pool keeps polling
                    # for a while after its work, which would take the cores from the next engine
                    time.sleep(0.3)
                    d = s.ask({"cmd": "steps", "n": per, "warmup": 1}, timeout=s.run.timeout)
                    e = out["engines"][s.run.key]["decode"][str(ctx)]
                    e["step_s"].extend(d["step_s"])
                    e["peak_rss_bytes"] = max(e.get("peak_rss_bytes") or 0, d.get("peak_rss_bytes") or 0)
                    if ci > 0 and s.run.key in kept:
                        d = s.ask({"cmd": "steps", "n": per, "warmup": 1, "slot": "base"}, timeout=s.run.timeout)
                        e.setdefault("base_step_s", []).extend(d["step_s"])
            if ci == 0 and same_round_base:
                for s in served:
                    if s.ask({"cmd": "keep", "slot": "base"}, timeout=s.run.timeout).get("kept"):
                        kept.add(s.run.key)
            out["bandwidth_GBps"][str(ctx)] = bws
            msg = []
            for s in served:
                d = out["engines"][s.run.key]["decode"][str(ctx)]
                d["tokens"] = len(d["step_s"])
                d["decode_s"] = float(sum(d["step_s"]))
                d["tokens_per_s"] = 1.0 / float(np.median(d["step_s"]))
                d["tokens_per_s_mean"] = d["tokens"] / d["decode_s"]
                d["prefill_tokens_per_s"] = ctx / d["prefill_s"]
                msg.append(f"{s.run.key.split(':', 1)[1]} {d['tokens_per_s']:.1f}")
                if d.get("base_step_s"):
                    d["base_tokens_per_s"] = 1.0 / float(np.median(d["base_step_s"]))
                    d["over_base"] = d["tokens_per_s"] / d["base_tokens_per_s"]
                    msg[-1] += f" ({d['over_base']:.2f}x @{contexts[0]} of the same rounds)"
            log(f"  interleaved decode @{ctx}: " + ", ".join(msg) + f" tok/s; read bandwidth median "
                f"{np.median(bws):.1f} GB/s (min {min(bws):.1f}, max {max(bws):.1f})")
    finally:
        for s in served:
            s.close()
        probe.close()
    return out


def merge_peaks(peaks: Dict[str, Any], new: Dict[str, Any]) -> None:
    """Fold another probe into ``peaks`` (in place).

    Compute ceilings keep the best seen (they only drop when other processes
    take the cores).  Read bandwidth keeps every sample (``read_samples``) and
    ``read_GBps`` is their median: on a shared host it drifts both ways, and the
    best sample would make every roofline fraction look worse than it is.
    """
    for metric in ("fma32_GFLOPs", "bf16_GFLOPs", "vnni_GOPs"):
        for t, v in new.get(metric, {}).items():
            if v is not None and (peaks[metric].get(t) or 0) < v:
                peaks[metric][t] = v
    samples = peaks.setdefault("read_samples", {})
    for t, v in new.get("read_samples", new.get("read_GBps", {})).items():
        vs = v if isinstance(v, list) else [v]
        samples.setdefault(t, []).extend(x for x in vs if x is not None)
    for t, vs in samples.items():
        if vs:
            peaks["read_GBps"][t] = float(np.median(vs))


# ----------------------------------------------------------------------------- checks

def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def compare_logits(test: np.ndarray, ref: np.ndarray, noise_factor: float = 0.0) -> Dict[str, Any]:
    """Per-position agreement of two [T, V] logit arrays (ref: the reference engine).

    A top-two margin is clear when it is at least NEAR_TIE_FRACTION x the
    reference logits' std and (``noise_factor`` > 0, for two differently
    quantized models) at least ``noise_factor`` x the RMS difference of the two
    engines' logits at that position.
    """
    if test.shape != ref.shape:
        raise ValueError(f"logits shapes differ: {test.shape} vs {ref.shape}")
    a = test.astype(np.float64)
    b = ref.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    std = b.std(axis=1)
    srt = np.sort(b, axis=1)
    margin = srt[:, -1] - srt[:, -2]
    rms_diff = np.sqrt(((a - b) ** 2).mean(1))
    clear = (margin >= NEAR_TIE_FRACTION * std) & (margin >= noise_factor * rms_diff)
    same = a.argmax(1) == b.argmax(1)
    return {
        "positions": int(a.shape[0]),
        "rel_err": _rel(a, b),
        "max_abs_err": float(np.abs(a - b).max()),
        "max_abs_ref": float(np.abs(b).max()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "argmax_agree": int(same.sum()),
        "clear_margin_positions": int(clear.sum()),
        "argmax_agree_where_clear": int((same & clear).sum()),
        "ref_logit_std_mean": float(std.mean()),
        "ref_margin_median": float(np.median(margin)),
    }


def compare_greedy(test: Dict[str, Any], ref: Dict[str, Any], ref_std: float) -> Dict[str, Any]:
    """Greedy tokens of two engines: equal until the first near-tie?"""
    ta, tb = test["greedy_tokens"], ref["greedy_tokens"]
    k = first_divergence(ta, tb)
    n = min(len(ta), len(tb))
    tau = NEAR_TIE_FRACTION * ref_std
    out: Dict[str, Any] = {"tokens": n, "agree_prefix": k, "near_tie_threshold": tau}
    if k >= n:
        out["verdict"] = "all equal"
        out["ok"] = True
        return out
    ma = test["greedy_top2"][k]["margin"]
    mb = ref["greedy_top2"][k]["margin"]
    out.update(first_diff_step=k, margin_test=ma, margin_ref=mb)
    out["ok"] = bool(min(ma, mb) < tau)
    out["verdict"] = (f"equal for {k} tokens, then a near-tie (margin {min(ma, mb):.3g} < {tau:.3g})"
                      if out["ok"] else f"DIVERGE at step {k} with a clear margin ({min(ma, mb):.3g})")
    return out


def evaluate_checks(results: Dict[str, Dict[str, Any]], geometry: str) -> List[Dict[str, Any]]:
    """The cross-engine agreement checks from the check runs."""
    checks: List[Dict[str, Any]] = []

    def pair(test_key: str, ref_key: str, kind: str) -> None:
        a, b = results.get(test_key), results.get(ref_key)
        if not a or not b:
            return
        name = f"{test_key.split(':', 1)[1]} vs {ref_key.split(':', 1)[1]}"
        if not (a.get("ok") and b.get("ok")):
            checks.append({"name": name, "ok": False,
                           "detail": "not run: " + "; ".join(str(x.get("error", ""))[:200]
                                                              for x in (a, b) if not x.get("ok"))})
            return
        la, lb = np.load(a["logits_npy"]), np.load(b["logits_npy"])
        c = compare_logits(la, lb, noise_factor=3.0 if kind == "quant" else 0.0)
        g = compare_greedy(a, b, c["ref_logit_std_mean"])
        if kind == "fp32":
            ok = c["rel_err"] <= FP32_REL_TOL and c["argmax_agree_where_clear"] == c["clear_margin_positions"]
            detail = (f"rel err {c['rel_err']:.2e} (<= {FP32_REL_TOL:g}), max abs {c['max_abs_err']:.2e} "
                      f"of {c['max_abs_ref']:.2f}, argmax {c['argmax_agree']}/{c['positions']}; greedy "
                      f"{g['verdict']}")
        else:
            ok = (c["cosine_min"] >= COSINE_MIN
                  and c["argmax_agree_where_clear"] == c["clear_margin_positions"])
            detail = (f"cosine min {c['cosine_min']:.5f} (>= {COSINE_MIN}), argmax "
                      f"{c['argmax_agree_where_clear']}/{c['clear_margin_positions']} where clear "
                      f"({c['argmax_agree']}/{c['positions']} all), rel err {c['rel_err']:.2e}; greedy "
                      f"{g['verdict']}")
        ok = bool(ok and g["ok"])
        checks.append({"name": name, "kind": kind, "ok": ok, "detail": detail, "logits": c, "greedy": g})

    if geometry == "lite-L4":
        pair("check:dsv2ext:f32", "check:transformers:fp32-eager", "fp32")
        pair("check:dsv2ext:bf16", "check:llama:BF16", "cross")
        pair("check:dsv2ext:f32", "check:llama:BF16", "cross")
        pair("check:dsv2ext:bf16", "check:transformers:fp32-eager", "cross")
        pair("check:dsv2ext:bf16-compute", "check:llama:BF16", "cross")
        pair("check:dsv2ext:bf16-compute", "check:transformers:fp32-eager", "cross")
    else:
        pair("check:dsv2ext:int8", "check:llama:Q8_0", "quant")  # two different 8-bit quantizations
    return checks


# ----------------------------------------------------------------------------- metrics

def flops_per_prefill_token(cfg: Dict[str, Any], T: int) -> float:
    """2 x active params without lm_head + attention (average context T/2)."""
    k, E, L = cfg["num_experts_per_tok"], cfg["n_routed_experts"], cfg["num_hidden_layers"]
    act = 0.0
    for s in tensor_specs(cfg):
        n = s.name
        if n.startswith("model.embed_tokens") or n.startswith("lm_head"):
            continue
        act += s.numel * (k / E if ".experts." in n else 1.0)
    H = cfg["num_attention_heads"]
    attn = 2.0 * H * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"]) * (T / 2.0) * L
    return 2.0 * act + attn


def engine_rows(results: Dict[str, Dict[str, Any]], peaks: Dict[str, Any], threads: int,
                cfg: Dict[str, Any], workload: Dict[str, Any],
                interleaved: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """One row per speed run, with rooflines.

    Decode numbers of the engines measured in the interleaved rounds come from
    there, with the roofline of the probes taken in those rounds; the others use
    the median of the probes taken between the workers.
    """
    bw = (peaks["read_GBps"].get(str(threads)) or float("nan")) * 1e9
    inter = (interleaved or {}).get("engines", {})
    fma = (peaks["fma32_GFLOPs"].get(str(threads)) or float("nan")) * 1e9
    rows = []
    for key, r in results.items():
        if not key.startswith("speed:"):
            continue
        _, eng, var = key.split(":", 2)
        row: Dict[str, Any] = {"key": key, "engine": ENGINE_LABEL[eng], "variant": var, "ok": bool(r.get("ok")),
                               "cpu_busy_before": r.get("cpu_busy_before"), "reused": bool(r.get("reused"))}
        row["dtype"] = {"f32": "fp32", "bf16": "bf16", "int8": "int8", "BF16": "bf16", "Q8_0": "q8_0",
                        "Q4_0": "q4_0", "Q4_K_M": "q4_k_m", "int4-mixed": "int4-mixed"}.get(var, var.split("-")[0])
        if not r.get("ok"):
            row["error"] = str(r.get("error", "?")).splitlines()[0][:300]
            rows.append(row)
            continue
        if r.get("timed_out"):
            row["timed_out"] = True
        if "prefill" not in r:
            row["ok"] = False
            row["error"] = "timed out before the prefill measurement" if r.get("timed_out") else "no prefill"
            rows.append(row)
            continue
        row["prefill_tps"] = r["prefill"]["tokens_per_s"]
        wbytes = r["weights"]["active_bytes"]
        kvb = r["kv_cache"]["bytes_per_token"]
        row["active_weight_bytes"] = wbytes
        row["weight_bytes_total"] = r["weights"]["total_bytes"]
        row["kv_bytes_per_token"] = kvb
        row["peak_rss_bytes"] = r["peak_rss_bytes"]
        row["load_seconds"] = r.get("load_seconds")
        row["decode"] = {}
        decode = r["decode"]
        if key in inter:
            decode = inter[key]["decode"]
            row["decode_source"] = "interleaved"
        for ctx, d in decode.items():
            c = int(ctx)
            read = wbytes + (c + workload["decode_tokens"] / 2.0) * kvb
            bw_c = bw
            if key in inter:
                bws = inter[key].get("bandwidth_GBps") or interleaved["bandwidth_GBps"]  # older files: one group
                bw_c = float(np.median(bws[ctx])) * 1e9
            roof = bw_c / read
            row["decode"][ctx] = {"tps": d["tokens_per_s"], "tps_mean": d.get("tokens_per_s_mean"),
                                  "roofline_tps": roof,
                                  "roofline_fraction": d["tokens_per_s"] / roof, "bytes_per_token": read,
                                  "bandwidth_GBps": bw_c / 1e9,
                                  "prefill_tps": d["prefill_tokens_per_s"]}
        fl = flops_per_prefill_token(cfg, workload["prefill"])
        row["prefill_gflops"] = row["prefill_tps"] * fl / 1e9
        row["prefill_fma_fraction"] = row["prefill_tps"] * fl / fma
        bdot = (peaks["bf16_GFLOPs"].get(str(threads)) or float("nan")) * 1e9
        row["prefill_bf16dot_fraction"] = row["prefill_tps"] * fl / bdot
        if "profile" in r:
            row["profile"] = r["profile"]
        if "implementation" in r:
            row["implementation"] = r["implementation"]
        rows.append(row)
    return rows


def _anchor_of(row: Dict[str, Any], rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The dsv2ext row to compare an anchor with: same dtype class (q8_0 -> int8, 4-bit -> int4)."""
    want = {"q8_0": "int8", "q4_0": "int4", "q4_k_m": "int4"}.get(row["dtype"], row["dtype"])
    for r in rows:
        if r["engine"] == "dsv2ext" and r["dtype"] == want and r["ok"]:
            return r
    return None


def add_ratios(rows: List[Dict[str, Any]], contexts: List[int]) -> None:
    for row in rows:
        if row["engine"] == "dsv2ext" or not row["ok"]:
            continue
        ds = _anchor_of(row, rows)
        if ds is None:
            continue
        rat = {"vs": f"dsv2ext {ds['variant']}", "prefill": ds["prefill_tps"] / row["prefill_tps"]}
        for c in contexts:
            a, b = ds["decode"].get(str(c)), row["decode"].get(str(c))
            if a and b:
                rat[f"decode@{c}"] = a["tps"] / b["tps"]
        row["ratios"] = rat


# ----------------------------------------------------------------------------- output

def _fmt(x: Optional[float], nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}"


def table_lines(rows: List[Dict[str, Any]], contexts: List[int], prefill: int) -> List[str]:
    """The main table as Markdown lines."""
    hdr = ["engine", "weights", f"prefill tok/s ({prefill})"]
    for c in contexts:
        hdr += [f"decode tok/s @{c}", f"% roofline @{c}"]
    if len(contexts) > 1:
        hdr.append(f"@{contexts[-1]} / @{contexts[0]}")
    hdr += ["peak RSS GiB", "KV B/token", "dsv2ext / this (prefill, " + ", ".join(f"decode@{c}" for c in contexts) + ")"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        name = (f"{r['engine']} {r['variant']}" + (" (timed out)" if r.get("timed_out") else "")
                + (" (reused)" if r.get("reused") else ""))
        if not r["ok"]:
            lines.append("| " + " | ".join([name, r["dtype"], "error: " + r.get("error", "?")[:80]]
                                         + ["-"] * (len(hdr) - 3)) + " |")
            continue
        cells = [name, r["dtype"], _fmt(r["prefill_tps"])]
        for c in contexts:
            d = r["decode"].get(str(c))
            cells += [_fmt(d["tps"], 2) if d else "-", _fmt(100 * d["roofline_fraction"], 0) + "%" if d else "-"]
        if len(contexts) > 1:
            a, b = r["decode"].get(str(contexts[-1])), r["decode"].get(str(contexts[0]))
            cells.append(_fmt(a["tps"] / b["tps"], 2) if a and b else "-")
        cells += [_fmt(r["peak_rss_bytes"] / 2 ** 30, 2), _fmt(r["kv_bytes_per_token"], 0)]
        rat = r.get("ratios")
        if rat:
            vals = [rat["prefill"]] + [rat.get(f"decode@{c}") for c in contexts]
            cells.append(", ".join(_fmt(v, 2) + "x" if v else "-" for v in vals) + f" (vs {rat['vs']})")
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(rows: List[Dict[str, Any]], geometry: str, contexts: List[int]) -> List[Dict[str, Any]]:
    """The speed targets (issues 8 and 14) that this run measures, with the measured values."""
    by = {(r["engine"], r["variant"]): r for r in rows if r["ok"]}
    ds_b, ds_i = by.get(("dsv2ext", "bf16")), by.get(("dsv2ext", "int8"))
    ll_b, ll_q = by.get(("llama.cpp", "BF16")), by.get(("llama.cpp", "Q8_0"))
    out: List[Dict[str, Any]] = []
    c0 = str(contexts[0])

    def add(name: str, value: Optional[float], goal: float, unit: str = "") -> None:
        out.append({"target": name, "value": value, "goal": goal, "unit": unit,
                    "met": None if value is None else bool(value >= goal)})

    def dec(r: Optional[Dict[str, Any]], c: str, f: str = "tps") -> Optional[float]:
        return r["decode"][c][f] if r and c in r.get("decode", {}) else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    if geometry == "lite-L4":
        add(f"decode bf16 @{c0}: fraction of roofline", dec(ds_b, c0, "roofline_fraction"), 0.80)
        if ds_b and ll_b:
            add(f"decode bf16 @{c0}: dsv2ext / llama.cpp BF16", ratio(dec(ds_b, c0), dec(ll_b, c0)), 1.3, "x")
        add(f"decode int8 @{c0}: fraction of roofline", dec(ds_i, c0, "roofline_fraction"), 0.80)
        if ds_i and ll_q:
            add(f"decode int8 @{c0}: dsv2ext / llama.cpp Q8_0", ratio(dec(ds_i, c0), dec(ll_q, c0)), 1.3, "x")
        if len(contexts) > 1 and ds_b:
            cl = str(contexts[-1])
            add(f"decode bf16 @{cl} / @{c0}", ratio(dec(ds_b, cl), dec(ds_b, c0)), 0.85, "x")
        if ds_b and ll_b:
            add("prefill bf16: dsv2ext / llama.cpp BF16", ds_b["prefill_tps"] / ll_b["prefill_tps"], 1.2, "x")
        if ds_b:
            add("prefill bf16: fraction of the fp32 FMA peak (whole prefill)", ds_b["prefill_fma_fraction"], 0.60)
        ds_c = by.get(("dsv2ext", "bf16-compute"))
        if ds_c and ll_b:
            add("prefill bf16, bf16 compute mode: dsv2ext / llama.cpp BF16", ds_c["prefill_tps"] / ll_b["prefill_tps"],
                1.2, "x")
        if ds_c and ds_c.get("prefill_bf16dot_fraction") is not None:
            add("prefill bf16, bf16 compute mode: fraction of the bf16 dot peak (whole prefill)",
                ds_c["prefill_bf16dot_fraction"], 0.60)
        # fewer bytes per weight (issue 14)
        ds_f, ds_4 = by.get(("dsv2ext", "fp8")), by.get(("dsv2ext", "int4"))
        ll_4k = by.get(("llama.cpp", "Q4_K_M"))
        for name, r in (("fp8", ds_f), ("int4", ds_4)):
            if r:
                add(f"decode {name} @{c0}: fraction of roofline", dec(r, c0, "roofline_fraction"), 0.90)
        if ds_4 and ll_4k:
            for c, goal in zip([str(c) for c in contexts], (1.0, 1.4)):
                add(f"decode int4 @{c}: dsv2ext / llama.cpp Q4_K_M", ratio(dec(ds_4, c), dec(ll_4k, c)), goal, "x")
        for dt, hf in (("fp32", "fp32-eager"), ("bf16", "bf16-eager")):
            ds = by.get(("dsv2ext", "f32" if dt == "fp32" else dt))
            h = by.get(("transformers", hf))
            if ds and h:
                add(f"decode {dt} @{c0}: dsv2ext / transformers eager", ratio(dec(ds, c0), dec(h, c0)), 10.0, "x")
                add(f"prefill {dt}: dsv2ext / transformers eager", ds["prefill_tps"] / h["prefill_tps"], 3.0, "x")
    else:
        add(f"decode int8 @{c0}: fraction of roofline", dec(ds_i, c0, "roofline_fraction"), 0.75)
        if ds_i and ll_q:
            add(f"decode int8 @{c0}: dsv2ext / llama.cpp Q8_0", ratio(dec(ds_i, c0), dec(ll_q, c0)), 1.3, "x")
        if ds_i:
            out.append({"target": "dsv2ext int8 peak RSS <= 24 GiB", "value": ds_i["peak_rss_bytes"] / 2 ** 30,
                        "goal": 24.0, "unit": "GiB", "met": ds_i["peak_rss_bytes"] <= 24 * 2 ** 30})
    return out


def long_rows(long: Dict[str, Any], contexts: List[int]) -> List[Dict[str, Any]]:
    """One row per engine of the long-context rounds: prefill and decode tokens/s per context."""
    rows = []
    for key, e in long["engines"].items():
        _, eng, var = key.split(":", 2)
        r: Dict[str, Any] = {"key": key, "engine": ENGINE_LABEL[eng], "variant": var,
                             "kv_bytes_per_token": e["kv_cache"]["bytes_per_token"], "decode": {}, "prefill": {},
                             "peak_rss_bytes": max((d.get("peak_rss_bytes") or 0) for d in e["decode"].values()),
                             "weight_bytes_total": e["weights"]["total_bytes"]}
        for c in contexts:
            d = e["decode"].get(str(c))
            if d:
                r["decode"][str(c)] = d["tokens_per_s"]
                r["prefill"][str(c)] = d["prefill_tokens_per_s"]
                if d.get("over_base") is not None:  # against the first context's steps of the same rounds
                    r.setdefault("over_base", {})[str(c)] = d["over_base"]
        rows.append(r)
    return rows


def decode_over_first(row: Dict[str, Any], contexts: List[int]) -> Tuple[Optional[float], bool]:
    """Decode at the longest context over decode at the first one, and whether both came from the
    same rounds (``same_round_base``; else the two contexts' rounds, minutes apart)."""
    c0, cl = str(contexts[0]), str(contexts[-1])
    same = row.get("over_base", {}).get(cl)
    if same is not None:
        return same, True
    a, b = row["decode"].get(cl), row["decode"].get(c0)
    return (a / b if a and b else None), False


def long_table(rows: List[Dict[str, Any]], contexts: List[int]) -> List[str]:
    """The long-context table as Markdown lines (ratios against llama.cpp BF16 at each context)."""
    c0, big = contexts[0], [c for c in contexts[1:]]
    hdr = (["engine", "KV B/token"] + [f"prefill tok/s @{c}" for c in big] + [f"decode tok/s @{c}" for c in contexts]
           + [f"decode @{contexts[-1]} / @{c0}", "peak RSS GiB", "dsv2ext / llama.cpp decode (" +
              ", ".join(f"@{c}" for c in contexts) + ")"])
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    ll = next((r for r in rows if r["engine"] == "llama.cpp"), None)
    for r in rows:
        cells = [f"{r['engine']} {r['variant']}", _fmt(r["kv_bytes_per_token"], 0)]
        cells += [_fmt(r["prefill"].get(str(c))) for c in big]
        cells += [_fmt(r["decode"].get(str(c)), 2) for c in contexts]
        v, same = decode_over_first(r, contexts)
        cells.append("-" if v is None else _fmt(v, 2) + ("" if same else " *"))
        cells.append(_fmt(r["peak_rss_bytes"] / 2 ** 30, 2))
        if r["engine"] == "dsv2ext" and ll:
            cells.append(", ".join(_fmt(r["decode"][str(c)] / ll["decode"][str(c)], 2) + "x"
                                   if r["decode"].get(str(c)) and ll["decode"].get(str(c)) else "-"
                                   for c in contexts))
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def long_targets(rows: List[Dict[str, Any]], contexts: List[int]) -> List[Dict[str, Any]]:
    """Issue-15 targets: decode at the longest context vs the shortest (bf16 cache), vs llama.cpp."""
    by = {(r["engine"], r["variant"]): r for r in rows}
    ds, ll = by.get(("dsv2ext", "bf16")), by.get(("llama.cpp", "BF16"))
    c0, cl = str(contexts[0]), str(contexts[-1])
    out = []
    for row, what in ((ds, "bf16 cache"), (by.get(("dsv2ext", "bf16-compute")), "bf16 cache, bf16 compute mode")):
        v, same = decode_over_first(row, contexts) if row else (None, False)
        if v is not None:
            out.append({"target": f"decode {what} @{cl} / @{c0}" + (" (same rounds)" if same else ""),
                        "value": v, "goal": 0.7, "unit": "x", "met": v >= 0.7})
    if ds and ll and ds["decode"].get(cl) and ll["decode"].get(cl):
        v = ds["decode"][cl] / ll["decode"][cl]
        out.append({"target": f"decode @{cl}: dsv2ext bf16 / llama.cpp BF16", "value": v, "goal": 2.0, "unit": "x",
                    "met": v >= 2.0})
    return out


def write_chart(path: str, rows: List[Dict[str, Any]], contexts: List[int], prefill: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["ok"]]
    if not ok:
        return
    names = [f"{r['engine']}\n{r['variant']}" for r in ok]
    colors = ["#1f77b4" if r["engine"] == "dsv2ext" else "#ff7f0e" if r["engine"] == "llama.cpp" else "#7f7f7f"
              for r in ok]
    fig, axes = plt.subplots(1, 1 + len(contexts), figsize=(5 + 4.5 * len(contexts), 4.8))
    x = np.arange(len(ok))
    pv = [r["prefill_tps"] for r in ok]
    axes[0].bar(x, pv, color=colors)
    axes[0].set_title(f"prefill tokens/s ({prefill}-token prompt)")
    for xi, v in zip(x, pv):
        axes[0].text(xi, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    for i, c in enumerate(contexts):
        ax = axes[1 + i]
        vals = [r["decode"].get(str(c), {}).get("tps", 0.0) for r in ok]
        roofs = [r["decode"].get(str(c), {}).get("roofline_tps", 0.0) for r in ok]
        ax.bar(x, roofs, color="none", edgecolor="black", linestyle="--", linewidth=0.8, label="roofline")
        ax.bar(x, vals, color=colors)
        for xi, v, rf in zip(x, vals, roofs):
            if v > 0:
                ax.text(xi, v, f"{v:.3g}\n{100 * v / rf:.0f}%", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"decode tokens/s after {c} tokens (% of roofline)")
        ax.legend(loc="upper right", fontsize=7)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_records(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Flat records: engine, dtype, metric, value, unit, ratios, date, CPU model, threads."""
    recs = []
    base = {k: meta[k] for k in ("date", "cpu_model", "threads", "geometry")}

    def rec(r: Dict[str, Any], metric: str, value: Any, unit: str, ratio: Optional[float] = None) -> None:
        d = dict(base, engine=r["engine"], variant=r["variant"], dtype=r["dtype"], metric=metric,
                 value=value, unit=unit)
        if ratio is not None:
            d["ratios"] = {"dsv2ext_over_this": ratio, "vs": r["ratios"]["vs"]}
        recs.append(d)

    for r in rows:
        if not r["ok"]:
            rec(r, "error", r.get("error"), "")
            continue
        rat = r.get("ratios", {})
        rec(r, f"prefill_tokens_per_s@{meta['workload']['prefill']}", r["prefill_tps"], "tokens/s",
            rat.get("prefill"))
        for c, d in r["decode"].items():
            rec(r, f"decode_tokens_per_s@{c}", d["tps"], "tokens/s", rat.get(f"decode@{c}"))
            if d.get("tps_mean") is not None:
                rec(r, f"decode_tokens_per_s_mean@{c}", d["tps_mean"], "tokens/s")
            rec(r, f"decode_roofline_fraction@{c}", d["roofline_fraction"], "fraction")
            rec(r, f"decode_roofline_tokens_per_s@{c}", d["roofline_tps"], "tokens/s")
        rec(r, "peak_rss", r["peak_rss_bytes"], "bytes")
        rec(r, "kv_cache_per_token", r["kv_bytes_per_token"], "bytes")
        rec(r, "active_weight_bytes_per_token", r["active_weight_bytes"], "bytes")
        rec(r, "prefill_fma_peak_fraction", r["prefill_fma_fraction"], "fraction")
    return recs


def render_markdown(all_runs: Dict[str, Any]) -> str:
    """RESULTS.md from every geometry's latest run."""
    out = ["# Benchmark results", "",
           "Written by `python benchmarks/run.py` (see benchmarks/README.md). Same weights for every engine, "
           "same run, each engine in its own process. Ratios are dsv2ext / the row's engine, against the "
           "dsv2ext row of the same weight type (fp32, bf16, int8 for Q8_0).", ""]
    for geo in sorted(all_runs):
        r = all_runs[geo]
        m = r["meta"]
        out += [f"## {geo}", "",
                f"{m['date']} - {m['cpu_model']}, {m['threads']} threads, {m['logical_cpus']} logical CPUs, "
                f"{m['memory_gib']:.0f} GiB RAM; {m['params'] / 1e9:.2f} B parameters, "
                f"{m['active_params'] / 1e9:.3f} B active per token.", ""]
        pk = r["peaks"]
        t = str(m["threads"])
        out.append(f"Machine: streaming read {_fmt(pk['read_GBps'].get('1'))} GB/s (1 thread), "
                   f"{_fmt(pk['read_GBps'].get(t))} GB/s ({t} threads); fp32 FMA peak "
                   f"{_fmt(pk['fma32_GFLOPs'].get(t), 0)} GFLOP/s, bf16 dot {_fmt(pk['bf16_GFLOPs'].get(t), 0)} "
                   f"GFLOP/s, int8 dot {_fmt(pk['vnni_GOPs'].get(t), 0)} GOP/s ({t} threads).")
        out.append("")
        out += r["table"]
        out.append("")
        out.append("Decode tokens/s = 1 / median time of the decode steps (the mean is in results.json). "
                   "Roofline = read bandwidth / (active weight bytes per token in the engine's own format + "
                   "KV cache bytes read per token at that context).")
        il = r.get("interleaved")
        for g in (il.get("groups", [il]) if il else []):  # older files hold one group at the top level
            names = ", ".join(k.split(":", 1)[1].replace(":", " ") for k in g.get("engines", {}))
            bws = "; ".join(f"@{c}: median {_fmt(float(np.median(v)))} GB/s (min {_fmt(min(v))}, max {_fmt(max(v))})"
                            for c, v in g["bandwidth_GBps"].items())
            out += ["", f"Decode of {names} was measured side by side: they stay loaded together, and "
                    f"{g['rounds']} rounds alternate {g['steps_per_round']} steps of each (the first engine "
                    f"rotating), each round after a short streaming-read probe; their roofline uses those probes "
                    f"({bws})."]
        if il:
            out += ["", "On this shared host the read bandwidth drifts by tens of percent within minutes, so "
                    "engines measured minutes apart are not comparable; engines of the same rounds are. The other "
                    "rows' roofline uses the median of the probes taken between workers "
                    f"({', '.join(_fmt(x) for x in pk.get('read_samples', {}).get(t, []))} GB/s)."]
        busy = [(x["engine"] + " " + x["variant"], x.get("cpu_busy_before")) for x in r["rows"]]
        loud = [f"{n} {100 * b:.0f}%" for n, b in busy if b is not None and b >= 0.15]
        if loud:
            out += ["", "**Other processes were using the CPUs** when these were measured (busy fraction of "
                    "all CPUs in the second before): " + ", ".join(loud) + ". Their numbers are low; "
                    "2-thread spin-waiting engines (llama.cpp) suffer most."]
        out += ["", "### Same model?", ""]
        for c in r["checks"]:
            out.append(f"- {'PASS' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
        if r.get("targets"):
            out += ["", "### Targets (issues 8 and 14)", "", "| target | measured | goal | met |", "|---|---|---|---|"]
            for tg in r["targets"]:
                out.append(f"| {tg['target']} | {_fmt(tg['value'], 2)}{tg['unit']} | {tg['goal']}{tg['unit']} | "
                           f"{'yes' if tg['met'] else 'no' if tg['met'] is not None else '-'} |")
        lg = r.get("long")
        if lg:
            bws = "; ".join(f"@{c}: median {_fmt(float(np.median(v)))} GB/s" for c, v in lg["bandwidth_GBps"].items())
            out += ["", "### Long context", "",
                    f"Prompts of {', '.join(str(c) for c in lg['contexts'][1:])} tokens: prefill tokens/s (dsv2ext: "
                    f"chunks of {lg.get('prefill_chunk', '?')} tokens) and decode tokens/s after them, measured side "
                    f"by side in {lg['rounds']} alternating rounds of {lg['steps_per_round']} steps per engine (read "
                    f"bandwidth {bws}). Peak RSS is the serving process's (weights + cache + work space)."
                    + (f" dsv2ext's decode @{lg['contexts'][-1]} / @{lg['contexts'][0]} comes from the same rounds: "
                       f"the engine keeps its @{lg['contexts'][0]} state, and each of its turns at a longer context "
                       f"also times as many steps on that state (a value marked * compares rounds minutes apart)."
                       if any(r.get("over_base") for r in lg.get("rows", [])) else "")
                    + (f" Reused (`--reuse`) from the run of {lg.get('date', 'an earlier date')}: the engines have "
                       f"changed since." if lg.get("reused") else ""), ""]
            out += lg["table"]
            if lg.get("targets"):
                out += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
                for tg in lg["targets"]:
                    out.append(f"| {tg['target']} | {_fmt(tg['value'], 2)}{tg['unit']} | {tg['goal']}{tg['unit']} | "
                               f"{'yes' if tg['met'] else 'no'} |")
        prof = r.get("profile")
        if prof:
            out += ["", "### dsv2ext decode time per token", ""]
            for name, p in prof.items():
                per = p["seconds_per_token"]
                tot = sum(per.values())
                parts = ", ".join(f"{k} {1000 * v:.2f} ms ({100 * v / tot:.0f}%)" for k, v in per.items())
                out.append(f"- {name} (context {p['context']}, {p['tokens']} tokens, {p['source']}): {parts}")
        if r.get("chart"):
            out += ["", f"![chart]({r['chart']})"]
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--geometry", default="lite-L4", choices=sorted(GEOMETRIES))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small prompts, one transformers variant (results go to cache/quick "
                         "unless --out is given)")
    ap.add_argument("--skip-llama", action="store_true", help="no llama.cpp runs")
    ap.add_argument("--skip-transformers", action="store_true", help="no transformers runs")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: run only the workers whose key (task:engine:variant) "
                         "contains one")
    ap.add_argument("--out", default=None, help="where RESULTS.md, results.json and the chart go "
                    "(default: benchmarks/, or benchmarks/cache/quick with --quick)")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"), help="checkpoints, GGUFs, logs")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--reuse", action="store_true",
                    help="with --only: take the other workers' results from their previous run (marked as "
                         "reused in the table)")
    ap.add_argument("--all-contexts", action="store_true",
                    help="decode after every context for dsv2ext f32 and transformers too (slow)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each worker, wait up to this long for other processes to leave the CPUs "
                         "idle (< 15%% busy); the busy fraction is recorded either way")
    ap.add_argument("--long", action="store_true",
                    help="also measure long prompts (--long-contexts): prefill and decode of dsv2ext bf16 (bf16 and "
                         "FP8 latent caches) and llama.cpp BF16 side by side (lite-L4; ~30-40 min more)")
    ap.add_argument("--long-contexts", default="4096,16384,32768", metavar="N,N,...",
                    help="prompt lengths of --long (default 4096,16384,32768; add 131072 where memory allows)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="skip the interleaved decode rounds (decode numbers then come from each engine's "
                         "own worker, measured minutes apart)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads: expected >= 1")
    out_dir = args.out or (os.path.join(args.cache, "quick") if args.quick else HERE)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    workload = dict(QUICK if args.quick else FULL)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    geometry = args.geometry
    info = machine_info()
    log(f"machine: {info['cpu_model']}, {info['logical_cpus']} CPUs, "
        f"{(info['memory_bytes'] or 0) / 2 ** 30:.1f} GiB, ISA {' '.join(info['isa'])}")
    peaks = measure_peaks(args.cache, sorted({1, args.threads}), quick=args.quick)
    peaks["read_samples"] = {t: [v] for t, v in peaks["read_GBps"].items() if v is not None}
    t = str(args.threads)
    log(f"read bandwidth {peaks['read_GBps']['1']:.1f} GB/s (1 thread), {peaks['read_GBps'][t]:.1f} GB/s "
        f"({t} threads); fp32 FMA {peaks['fma32_GFLOPs'][t]:.0f} GFLOP/s, bf16 dot "
        f"{peaks['bf16_GFLOPs'][t] or float('nan'):.0f} GFLOP/s, int8 dot {peaks['vnni_GOPs'][t] or float('nan'):.0f} "
        f"GOP/s")

    ckpt = build_checkpoint(geometry, args.cache, seed=args.seed, log=log)
    cfg = hf_config(geometry)
    ggufs: Dict[str, str] = {}
    if not args.skip_llama:
        from gguf_export import export_gguf
        for q in LLAMA_TYPES[geometry]:
            ggufs[q] = export_gguf(ckpt, cfg, q, log=log, threads=args.threads)
    specs = tensor_specs(cfg)
    params = sum(s.numel for s in specs)
    economics: Dict[str, Any] = {}
    try:
        import importlib
        dstats = importlib.import_module("dsv2ext.stats")  # the project's own arithmetic
        economics = dstats.stats(ckpt)
    except Exception as ex:  # reported, not fatal: the benchmark does not need it
        log(f"dsv2ext.stats unavailable: {type(ex).__name__}: {ex}")
    active = economics.get("active_params") or 0

    runs = plan_runs(geometry, args.quick, args.skip_llama, args.skip_transformers, args.all_contexts,
                     workload["decode_contexts"])
    if args.only:
        keys = [s.strip() for s in args.only.split(",") if s.strip()]
        runs = [r for r in runs if any(k in r.key for k in keys)]
    if not args.no_interleave and geometry in INTERLEAVE_GEOMETRIES and \
            sum(r.task == "speed" and (r.engine, r.variant) in INTERLEAVED for r in runs) >= 2:
        for r in runs:  # their decode is measured in the interleaved rounds; the first context keeps the profile
            if r.task == "speed" and (r.engine, r.variant) in INTERLEAVED:
                r.contexts = workload["decode_contexts"][:1]
    work = os.path.join(args.cache, "runs", geometry + ("-quick" if args.quick else ""))
    os.makedirs(work, exist_ok=True)
    n_ctx = max([workload["prefill"], workload["check_prompt"] + workload["check_greedy"]]
                + [c + workload["decode_tokens"] + 8 for c in workload["decode_contexts"]]) + 64
    base_spec = {"ckpt": ckpt, "threads": args.threads, "workload": workload, "n_ctx": n_ctx,
                 "npy_dir": os.path.join(work, "logits")}
    results: Dict[str, Dict[str, Any]] = {}
    log(f"{len(runs)} worker runs, results in {work}")
    if args.reuse:
        # the reused results were measured against the ceilings of their run: keep those too
        prev_path = os.path.join(out_dir, "results.json")
        if os.path.isfile(prev_path):
            try:
                merge_peaks(peaks, read_json(prev_path)["geometries"][geometry]["peaks"])
            except (KeyError, ValueError, TypeError):
                pass
        for run in plan_runs(geometry, args.quick, args.skip_llama, args.skip_transformers, args.all_contexts,
                             workload["decode_contexts"]):
            prev = os.path.join(work, run.key.replace(":", "-") + ".json")
            if run not in runs and os.path.isfile(prev) and run.key not in [r.key for r in runs]:
                results[run.key] = read_json(prev)
                results[run.key]["reused"] = True
                log(f"  reused {run.key} from {prev}")
    for run in runs:
        spec = dict(base_spec)
        if run.engine == "llama":
            spec["gguf"] = ggufs[run.variant]
        busy = (wait_until_idle(args.wait_idle) if args.wait_idle > 0 else cpu_busy(1.0))
        if busy is not None and busy >= 0.15:
            log(f"  note: other processes keep {100 * busy:.0f}% of the CPUs busy before {run.key}")
        results[run.key] = run_worker(run, spec, work, log)
        results[run.key]["cpu_busy_before"] = busy
        # the machine's ceilings between workers: other processes may hold them down at times; keep the best
        merge_peaks(peaks, measure_peaks(args.cache, sorted({1, args.threads}), quick=args.quick))

    # the bandwidth probe again: other processes may have held it down at the start; keep the best
    again = measure_peaks(args.cache, sorted({1, args.threads}), quick=args.quick)
    merge_peaks(peaks, again)
    log(f"read bandwidth at the end {again['read_GBps']} GB/s; median of the run's probes: "
        f"{peaks['read_GBps']} GB/s (samples {peaks['read_samples']}); fp32 FMA {peaks['fma32_GFLOPs']} GFLOP/s")

    # decode of dsv2ext and llama.cpp once more, side by side in alternating rounds (see interleaved_decode)
    inter_path = os.path.join(work, "interleaved.json")
    interleaved: Optional[Dict[str, Any]] = None
    groups = [[r for r in runs if r.task == "speed" and (r.engine, r.variant) in g] for g in INTERLEAVE_GROUPS]
    groups = [g for g in groups if len(g) >= 2]
    if groups and not args.no_interleave and geometry in INTERLEAVE_GEOMETRIES:
        # --reuse: the previous rounds of the groups not measured again are kept (each group's engines
        # were measured side by side in their own rounds); otherwise the file starts afresh
        kept: Dict[str, Any] = {"groups": [], "engines": {}}
        measured = {r.key for g in groups for r in g}
        if args.reuse and os.path.isfile(inter_path):
            prev_inter = read_json(inter_path)
            for pg in prev_inter.get("groups", []):
                if not set(pg.get("engines", {})) & measured:
                    kept["groups"].append(pg)
                    for key in pg.get("engines", {}):
                        if key in prev_inter.get("engines", {}):
                            kept["engines"][key] = prev_inter["engines"][key]
                    log(f"  kept the previous interleaved rounds of {', '.join(sorted(pg.get('engines', {})))}")
        if os.path.exists(inter_path):
            os.unlink(inter_path)
        interleaved = kept
        for g in groups:
            busy = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else cpu_busy(1.0)
            try:
                res = interleaved_decode(g, base_spec, ggufs, workload["decode_contexts"],
                                         workload["decode_tokens"], 8, args.cache, args.threads, work, log)
            except Exception as ex:  # the sequential numbers stay; the failure is reported
                log(f"interleaved decode FAILED ({', '.join(r.key for r in g)}): {type(ex).__name__}: {ex}")
                continue
            res["cpu_busy_before"] = busy
            interleaved["groups"].append(res)
            for key, e in res["engines"].items():  # each engine's roofline: the probes of its own rounds
                interleaved["engines"][key] = dict(e, bandwidth_GBps=res["bandwidth_GBps"])
        write_json(inter_path, interleaved)
    elif args.reuse and os.path.isfile(inter_path):
        interleaved = read_json(inter_path)
        log(f"  reused the interleaved decode rounds from {inter_path}")

    # long prompts: prefill and decode side by side at 128 and the long contexts (issue 15)
    long: Optional[Dict[str, Any]] = None
    long_path = os.path.join(work, "long.json")
    if args.long and geometry == "lite-L4":
        lctx = [32] + [256, 1024] if args.quick else [128] + [int(c) for c in args.long_contexts.split(",")]
        lruns = [Run(e, v, "speed", 3600) for e, v in LONG_ENGINES if not (args.skip_llama and e == "llama")]
        lspec = dict(base_spec, n_ctx=max(lctx) + LONG_STEPS + 16 + 64)
        try:
            long = interleaved_decode(lruns, lspec, ggufs, lctx, 8 if args.quick else LONG_STEPS, 4, args.cache,
                                      args.threads, work, log, same_round_base=True)
            long["contexts"] = lctx
            import dsv2ext as _ds
            long["prefill_chunk"] = _ds.DeepseekV2.prefill_chunk
            lrows = long_rows(long, lctx)
            long["rows"] = lrows
            long["table"] = long_table(lrows, lctx)
            long["targets"] = long_targets(lrows, lctx)
            long["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            write_json(long_path, long)
        except Exception as ex:
            log(f"long-context rounds FAILED: {type(ex).__name__}: {ex}")
    elif args.reuse and os.path.isfile(long_path):
        long = read_json(long_path)
        long["reused"] = True
        log(f"  reused the long-context rounds from {long_path}")

    checks = evaluate_checks(results, geometry)
    print()
    print("Same model?")
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")

    rows = engine_rows(results, peaks, args.threads, cfg, workload, interleaved)
    order = {"dsv2ext": 0, "llama.cpp": 1, "transformers": 2}
    rows.sort(key=lambda r: (order[r["engine"]], r["variant"]))
    add_ratios(rows, workload["decode_contexts"])
    table = table_lines(rows, workload["decode_contexts"], workload["prefill"])
    print()
    print("\n".join(table))
    tg = targets(rows, geometry, workload["decode_contexts"])
    if tg:
        print("\nTargets (issues 8 and 14):")
        for x in tg:
            met = "-" if x["met"] is None else ("met" if x["met"] else "MISSED")
            print(f"  {met:6s} {x['target']}: {_fmt(x['value'], 3)}{x['unit']} (goal {x['goal']}{x['unit']})")
    if long:
        print("\nLong context (prefill and decode side by side):")
        print("\n".join(long["table"]))
        for x in long["targets"]:
            print(f"  {'met' if x['met'] else 'MISSED':6s} {x['target']}: {_fmt(x['value'], 3)}{x['unit']} "
                  f"(goal {x['goal']}{x['unit']})")
    profiles = {f"{r['engine']} {r['variant']}": r["profile"] for r in rows if r.get("profile")}
    for name, p in profiles.items():
        per = p["seconds_per_token"]
        print(f"\n{name} decode time per token (context {p['context']}): "
              + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in per.items()) + f"  [{p['source']}]")

    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    meta = {"date": date, "cpu_model": info["cpu_model"], "threads": args.threads, "geometry": geometry,
            "logical_cpus": info["logical_cpus"], "memory_gib": (info["memory_bytes"] or 0) / 2 ** 30,
            "params": params, "active_params": active, "quick": args.quick, "workload": workload,
            "checkpoint": os.path.relpath(ckpt, HERE), "seed": args.seed}
    chart_name = "results.png" if geometry == "lite-L4" else f"results-{geometry}.png"
    try:
        write_chart(os.path.join(out_dir, chart_name), rows, workload["decode_contexts"], workload["prefill"],
                    f"{geometry}, {info['cpu_model']}, {args.threads} threads, {date}")
    except Exception as ex:
        log(f"chart not written: {type(ex).__name__}: {ex}")
        chart_name = ""
    entry = {"meta": meta, "machine": info, "peaks": peaks, "checks": checks, "rows": rows, "table": table,
             "targets": tg, "profile": profiles, "chart": chart_name, "interleaved": interleaved, "long": long,
             "records": results_records(rows, meta),
             "economics": {k: economics[k] for k in ("total_params", "active_params", "active_params_no_lm_head",
                                                     "flops_per_token") if k in economics}}
    rpath = os.path.join(out_dir, "results.json")
    allr: Dict[str, Any] = {}
    if os.path.isfile(rpath):
        try:
            allr = read_json(rpath).get("geometries", {})
        except (ValueError, OSError, AttributeError):
            allr = {}
    allr[geometry] = entry
    write_json(rpath, {"geometries": allr})
    with open(os.path.join(out_dir, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(allr))
    log(f"wrote {os.path.join(out_dir, 'RESULTS.md')}, results.json, {chart_name}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
