#!/usr/bin/env python
"""Thread scaling: dsv2ext and llama.cpp side by side at 1, 2, 4, 8, 16 threads.

    python benchmarks/scaling.py                          # lite-L4: bf16 / int8 vs llama.cpp BF16 / Q8_0
    python benchmarks/scaling.py --geometry lite-full --threads 16   # 27-layer V2-Lite int8 vs Q8_0
    python benchmarks/scaling.py --quick                  # smoke run (small prompts, 1 and 2 threads)

For each engine one worker process is started (``worker.py`` in serve mode) and
kept loaded for the whole sweep; the thread count is changed between
measurements (``dsv2ext.set_num_threads``; llama.cpp's ``llama_set_n_threads``).
At each thread count t:

1. prefill: a fresh 512-token prompt, best of two, every engine in turn;
2. decode after 128 and after 4096 tokens of context: the context is prefilled
   with the largest thread count (a 4096-token prompt on one thread would take
   minutes and is not what is measured), then decode steps of every engine in
   alternating rounds on t threads, each round after a reading of a streaming-read
   probe on t threads (the host's bandwidth drifts; the roofline of each thread
   count comes from the probes taken between its steps);
3. the machine's peaks at t threads (read bandwidth, fp32 FMA, bf16 dot, int8 dot)
   come from ``machine.py``.

Decode is reported as tokens/s (1 / median step time) and as a fraction of the
read-bandwidth roofline at the same thread count (active weight bytes + latent
cache bytes read per token); prefill as tokens/s and as a fraction of the fp32
FMA peak at that thread count.  Results are merged per geometry into
``benchmarks/results-scaling.json``, with ``RESULTS-scaling.md`` and
``results-scaling.png`` (tokens/s against threads, both engines).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checkpoint import build_checkpoint, hf_config  # noqa: E402
from common import read_json, write_json  # noqa: E402
from machine import BandwidthProbe, machine_info, measure_peaks  # noqa: E402
from run import ENGINE_LABEL, Run, Served, flops_per_prefill_token  # noqa: E402

#: engines of each geometry: (engine, variant); lite-full's bf16 does not fit the 24 GiB machines
ENGINES = {
    "lite-L4": [("dsv2ext", "bf16"), ("dsv2ext", "int8"), ("llama", "BF16"), ("llama", "Q8_0")],
    "lite-full": [("dsv2ext", "int8"), ("llama", "Q8_0")],
}
#: the dsv2ext variant an anchor is compared with
PAIRS = {("llama", "BF16"): ("dsv2ext", "bf16"), ("llama", "Q8_0"): ("dsv2ext", "int8")}


def _key(engine: str, variant: str) -> str:
    return f"{engine}:{variant}"


def sweep(served: Dict[str, Served], threads_list: List[int], max_threads: int, contexts: List[int],
          prefill_tokens: int, decode_steps: int, rounds: int, cache: str,
          log: Callable[[str], None]) -> Dict[str, Any]:
    """Measure every served engine at every thread count (see the module docstring).

    Returns ``{"bandwidth_GBps": {t: {ctx: [probes]}}, "engines": {key: {t: {"prefill_s": [...],
    "decode": {ctx: {"step_s": [...], "prefill_s": s}}}}}}``.
    """
    per = max(1, decode_steps // rounds)
    out: Dict[str, Any] = {"rounds": rounds, "steps_per_round": per, "bandwidth_GBps": {},
                           "engines": {k: {} for k in served}}
    order = list(served)
    for t in threads_list:
        tk = str(t)
        out["bandwidth_GBps"][tk] = {}
        for k in order:
            served[k].ask({"cmd": "threads", "n": t}, timeout=60)
            out["engines"][k][tk] = {"decode": {}}
        # prefill: one engine at a time (each uses all t threads)
        for k in order:
            time.sleep(0.3)
            reps = 1 if t == 1 else 2
            d = served[k].ask({"cmd": "prefill", "tokens": prefill_tokens, "reps": reps}, timeout=1800)
            out["engines"][k][tk]["prefill_s"] = d["seconds"]
        with BandwidthProbe(cache, t) as probe:
            for ctx in contexts:
                for k in order:
                    d = served[k].ask({"cmd": "begin", "context": ctx, "threads": max_threads}, timeout=1800)
                    out["engines"][k][tk]["decode"][str(ctx)] = {"prefill_s": d["prefill_s"], "step_s": []}
                bws = []
                for r in range(rounds):
                    time.sleep(0.3)
                    bws.append(probe.read())
                    for i in range(len(order)):
                        k = order[(i + r) % len(order)]
                        time.sleep(0.3)  # llama.cpp's threads poll for a while after their work
                        d = served[k].ask({"cmd": "steps", "n": per, "warmup": 1}, timeout=600)
                        out["engines"][k][tk]["decode"][str(ctx)]["step_s"].extend(d["step_s"])
                out["bandwidth_GBps"][tk][str(ctx)] = bws
                msg = ", ".join(f"{k} {1.0 / np.median(out['engines'][k][tk]['decode'][str(ctx)]['step_s']):.1f}"
                                for k in order)
                log(f"  {t:2d} threads, decode @{ctx}: {msg} tok/s; read bandwidth {np.median(bws):.1f} GB/s")
        msg = ", ".join(f"{k} {prefill_tokens / min(out['engines'][k][tk]['prefill_s']):.1f}" for k in order)
        log(f"  {t:2d} threads, prefill {prefill_tokens}: {msg} tok/s")
        for k in order:
            if k.startswith("dsv2ext:"):  # where a decode step's time goes at this thread count
                prof = served[k].ask({"cmd": "profile", "context": contexts[0], "n": 16}, timeout=600)["profile"]
                out["engines"][k][tk]["profile"] = prof
                if prof:
                    log(f"  {t:2d} threads, {k} decode step @{contexts[0]}: " + ", ".join(
                        f"{b} {1e3 * v:.2f}" for b, v in prof["seconds_per_token"].items()) + " ms")
    return out


def summarize(raw: Dict[str, Any], hello: Dict[str, Dict[str, Any]], peaks: Dict[str, Any], cfg: Dict[str, Any],
              prefill_tokens: int, decode_steps: int) -> Dict[str, Any]:
    """Per engine and thread count: tokens/s, roofline fractions; ratios against the anchors."""
    fl = flops_per_prefill_token(cfg, prefill_tokens)
    rows: Dict[str, Any] = {}
    for k, by_t in raw["engines"].items():
        wbytes = hello[k]["weights"]["active_bytes"]
        kvb = hello[k]["kv_cache"]["bytes_per_token"]
        r: Dict[str, Any] = {"engine": ENGINE_LABEL[k.split(":")[0]], "variant": k.split(":", 1)[1],
                             "active_weight_bytes": wbytes, "kv_bytes_per_token": kvb, "threads": {}}
        for tk, m in by_t.items():
            fma = (peaks["fma32_GFLOPs"].get(tk) or float("nan")) * 1e9
            e: Dict[str, Any] = {"prefill_tps": prefill_tokens / min(m["prefill_s"])}
            e["prefill_fma_fraction"] = e["prefill_tps"] * fl / fma
            e["decode"] = {}
            for ctx, d in m["decode"].items():
                bw = float(np.median(raw["bandwidth_GBps"][tk][ctx])) * 1e9
                read = wbytes + (int(ctx) + decode_steps / 2.0) * kvb
                tps = 1.0 / float(np.median(d["step_s"]))
                e["decode"][ctx] = {"tps": tps, "bandwidth_GBps": bw / 1e9, "bytes_per_token": read,
                                    "roofline_tps": bw / read, "roofline_fraction": tps * read / bw}
            r["threads"][tk] = e
        rows[k] = r
    for (ae, av), (de, dv) in PAIRS.items():
        a, d = rows.get(_key(ae, av)), rows.get(_key(de, dv))
        if a is None or d is None:
            continue
        a["ratios_vs"] = _key(de, dv)
        for tk, ea in a["threads"].items():
            ed = d["threads"].get(tk)
            if ed is None:
                continue
            ea["dsv2ext_ratio"] = {"prefill": ed["prefill_tps"] / ea["prefill_tps"]}
            for ctx in ea["decode"]:
                if ctx in ed["decode"]:
                    ea["dsv2ext_ratio"][f"decode@{ctx}"] = ed["decode"][ctx]["tps"] / ea["decode"][ctx]["tps"]
    return rows


def _fmt(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def table(rows: Dict[str, Any], contexts: List[int], prefill_tokens: int) -> List[str]:
    head = ["engine", "weights", "threads", f"prefill tok/s ({prefill_tokens})", "% fp32 FMA peak"]
    for c in contexts:
        head += [f"decode tok/s @{c}", f"% roofline @{c}"]
    head += ["dsv2ext / this (prefill" + "".join(f", decode@{c}" for c in contexts) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, r in rows.items():
        for tk in sorted(r["threads"], key=int):
            e = r["threads"][tk]
            cells = [r["engine"], r["variant"], tk, _fmt(e["prefill_tps"]), _fmt(100 * e["prefill_fma_fraction"], 0)]
            for c in contexts:
                d = e["decode"].get(str(c))
                cells += [_fmt(d and d["tps"]), _fmt(d and 100 * d["roofline_fraction"], 0)]
            rat = e.get("dsv2ext_ratio")
            cells.append("-" if not rat else ", ".join(_fmt(rat.get(x), 2) for x in
                                                       ["prefill"] + [f"decode@{c}" for c in contexts]))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(rows: Dict[str, Any], peaks: Dict[str, Any], contexts: List[int]) -> List[Dict[str, Any]]:
    """Issue 16's targets at the largest thread count measured."""
    out: List[Dict[str, Any]] = []
    ts = sorted({int(t) for r in rows.values() for t in r["threads"]})
    if not ts:
        return out
    top, two = str(ts[-1]), "2"
    for dk, ak in ((_key("dsv2ext", "bf16"), _key("llama", "BF16")), (_key("dsv2ext", "int8"), _key("llama", "Q8_0"))):
        d, a = rows.get(dk), rows.get(ak)
        if d is None or top not in d["threads"]:
            continue
        e = d["threads"][top]
        for c in contexts:
            dd = e["decode"].get(str(c))
            if dd:
                out.append({"target": f"{dk} decode @{c}, {top} threads >= 85% of the roofline",
                            "value": dd["roofline_fraction"], "goal": 0.85, "met": dd["roofline_fraction"] >= 0.85})
            if a is not None and top in a["threads"] and dd and str(c) in a["threads"][top]["decode"]:
                rr = dd["tps"] / a["threads"][top]["decode"][str(c)]["tps"]
                out.append({"target": f"{dk} / {ak} decode @{c}, {top} threads >= 1.0", "value": rr, "goal": 1.0,
                            "met": rr >= 1.0})
        if two in d["threads"] and top != two:
            rr = e["prefill_tps"] / d["threads"][two]["prefill_tps"]
            out.append({"target": f"{dk} prefill {top} threads / 2 threads >= 6", "value": rr, "goal": 6.0,
                        "met": rr >= 6.0})
        if a is not None and top in a["threads"]:
            rr = e["prefill_tps"] / a["threads"][top]["prefill_tps"]
            out.append({"target": f"{dk} / {ak} prefill, {top} threads >= 1.2", "value": rr, "goal": 1.2,
                        "met": rr >= 1.2})
    return out


def write_chart(path: str, all_geoms: Dict[str, Any], before: Optional[Dict[str, Any]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    geoms = list(all_geoms)  # one row of panels per entry: prefill, then decode at each context
    ncol = max(1 + len(all_geoms[g]["contexts"]) for g in geoms)
    fig, axes = plt.subplots(len(geoms), ncol, figsize=(4.2 * ncol, 3.6 * len(geoms)), squeeze=False)
    panels = []
    for i, g in enumerate(geoms):
        ctxs = all_geoms[g]["contexts"]
        cells = [(g, "prefill", None)] + [(g, "decode", c) for c in ctxs]
        panels += [(axes[i][j],) + cell for j, cell in enumerate(cells)]
        for j in range(len(cells), ncol):
            axes[i][j].axis("off")
    styles = {"dsv2ext": "-", "llama.cpp": "--"}
    for ax, g, kind, c in panels:
        rows = all_geoms[g]["rows"]
        old = ((before or {}).get(g) or {}).get("rows", {})
        for k, r in old.items():  # an earlier run of the same sweep (e.g. before a change), faint
            ts = sorted(r["threads"], key=int)
            ys = [r["threads"][t]["prefill_tps"] if kind == "prefill" else
                  r["threads"][t]["decode"].get(str(c), {}).get("tps", np.nan) for t in ts]
            ax.plot([int(t) for t in ts], ys, ":", marker=".", alpha=0.5,
                    label=f"{r['engine']} {r['variant']} (before)")
        for k, r in rows.items():
            ts = sorted(r["threads"], key=int)
            xs = [int(t) for t in ts]
            if kind == "prefill":
                ys = [r["threads"][t]["prefill_tps"] for t in ts]
            else:
                ys = [r["threads"][t]["decode"].get(str(c), {}).get("tps", np.nan) for t in ts]
            ax.plot(xs, ys, styles.get(r["engine"], ":"), marker="o", label=f"{r['engine']} {r['variant']}")
        if kind == "decode":
            # the roofline of the bf16 / int8 rows (same bytes as their llama.cpp twins within ~1%)
            for k, r in rows.items():
                if r["engine"] != "dsv2ext":
                    continue
                ts = sorted(r["threads"], key=int)
                ys = [r["threads"][t]["decode"].get(str(c), {}).get("roofline_tps", np.nan) for t in ts]
                ax.plot([int(t) for t in ts], ys, ":", color="gray", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("threads")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{g}: " + (f"prefill {all_geoms[g]['prefill_tokens']}" if kind == "prefill"
                                 else f"decode @{c} (dotted: rooflines)"), fontsize=8, wrap=True)
        ax.set_xticks(sorted({int(t) for r in list(rows.values()) + list(old.values()) for t in r["threads"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    cpu = next(iter(all_geoms.values()))["machine"]["cpu_model"]
    sub = "; dotted: before = " + "; ".join(b["label"] for b in (before or {}).values()) if before else ""
    fig.suptitle(f"thread scaling on {cpu}{sub}", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title above the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(all_geoms: Dict[str, Any], before: Optional[Dict[str, Any]] = None) -> str:
    lines = ["# Thread scaling (`python benchmarks/scaling.py`)", ""]
    runs = [(g, res, "") for g, res in all_geoms.items()]
    runs += [(g, res, f" ({res['label']})") for g, res in (before or {}).items()]
    for g, res, tag in runs:
        m = res["machine"]
        lines += [f"## {g}{tag}", "",
                  f"{res['date']}, {m['cpu_model']} ({m['logical_cpus']} logical CPUs, "
                  f"{(m['memory_bytes'] or 0) / 2 ** 30:.0f} GiB; ISA {', '.join(m['isa'])}); "
                  f"llama.cpp: {res.get('llama_build') or 'not run'}; dsv2ext: {res.get('dsv2ext_settings', '?')}.", ""]
        if res.get("note"):
            lines += [res["note"][0].upper() + res["note"][1:] + ".", ""]
        pk = res["peaks"]
        amx = pk.get("amx_bf16_GFLOPs", {})  # absent in entries measured before the AMX probe
        lines += ["| threads | read GB/s | fp32 FMA GFLOP/s | bf16 dot GFLOP/s | int8 dot GOP/s | AMX bf16 GFLOP/s |",
                  "|---|---|---|---|---|---|"]
        for t in sorted(pk["read_GBps"], key=int):
            lines.append(f"| {t} | {_fmt(pk['read_GBps'][t])} | {_fmt(pk['fma32_GFLOPs'].get(t), 0)} | "
                         f"{_fmt(pk['bf16_GFLOPs'].get(t), 0)} | {_fmt(pk['vnni_GOPs'].get(t), 0)} | "
                         f"{_fmt(amx.get(t), 0)} |")
        lines += ["", "Decode rooflines use the median of the read probes taken between that thread count's "
                  "decode rounds (not the table above).", ""]
        lines += table(res["rows"], res["contexts"], res["prefill_tokens"]) + [""]
        if res.get("targets"):
            lines += ["| target | value | goal | met |", "|---|---|---|---|"]
            for t in res["targets"]:
                lines.append(f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
            lines.append("")
    lines.append("![thread scaling](results-scaling.png)")
    return "\n".join(lines) + "\n"


def llama_build_info() -> str:
    """llama-cpp-python's version, the CPU backend it loads on this machine and ggml's features."""
    try:
        from common import load_llama_backends

        dirs = load_llama_backends()  # a dynamic-backend build: the variant files of the folder
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
        where = ""
        if dirs:
            import glob

            names = sorted(os.path.basename(f)[len("libggml-cpu-"):-3]
                           for f in glob.glob(os.path.join(dirs[0], "libggml-cpu-*.so")))
            where = f"dynamic CPU backends from {dirs[0]} ({', '.join(names)}); "
        return f"llama-cpp-python {llama_cpp.__version__}; {where}{info}"
    except Exception as ex:  # reported in the results, not fatal
        return f"unavailable ({type(ex).__name__}: {ex})"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="lite-L4", choices=sorted(ENGINES))
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default 1,2,4,8,16 capped at the CPU count)")
    ap.add_argument("--contexts", default="128,4096", help="decode contexts (default 128,4096)")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    ap.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per engine, context and "
                    "thread count (default 32)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds the decode steps are split into")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated engine:variant keys to run")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64-token prompts, contexts 32, 1-2 threads")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"), help="checkpoints, GGUFs, logs")
    ap.add_argument("--out", default=None, help="where results-scaling.json/.md/.png go (default benchmarks/, "
                    "or cache/quick with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefetch", default=None, metavar="VARIANT=BYTES,...",
                    help="software-prefetch distance per dsv2ext variant (e.g. bf16=0,int8=4096, as "
                         "bench_stream.py measured on this machine); default: the kernels' own defaults")
    ap.add_argument("--tag", default=None, help="store the results as '<geometry> (<tag>)', next to the "
                    "geometry's main entry (e.g. a sweep of other engines on the same machine)")
    ap.add_argument("--keep-previous", default=None, metavar="LABEL",
                    help="keep this geometry's previous results in the output as an earlier run named LABEL "
                         "(e.g. 'before the scaling fixes'), shown next to the new one")
    args = ap.parse_args(argv)

    ncpu = os.cpu_count() or 1
    prefetch: Dict[str, int] = {}
    for item in filter(None, (args.prefetch or "").split(",")):
        var, _, nb = item.partition("=")
        if not nb.strip().isdigit():
            ap.error(f"--prefetch: expected VARIANT=BYTES items, got {item!r}")
        prefetch[var.strip()] = int(nb)
    if args.quick:
        threads_list, contexts, prefill, steps, rounds = [1, 2], [32], 64, 8, 2
    else:
        threads_list = ([int(x) for x in args.threads.split(",")] if args.threads else
                        [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= ncpu])
        contexts = [int(x) for x in args.contexts.split(",")]
        prefill, steps, rounds = args.prefill, args.decode_steps, args.rounds
    max_threads = max(threads_list)
    out_dir = args.out or (os.path.join(args.cache, "quick") if args.quick else HERE)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    info = machine_info()
    log(f"{info['cpu_model']}, {info['logical_cpus']} logical CPUs, ISA {', '.join(info['isa'])}")
    peaks = measure_peaks(args.cache, threads_list, quick=args.quick)
    for t in threads_list:
        tk = str(t)
        log(f"  {t:2d} threads: read {peaks['read_GBps'][tk]:.1f} GB/s, fp32 FMA {peaks['fma32_GFLOPs'][tk]:.0f} "
            f"GFLOP/s, bf16 dot {peaks['bf16_GFLOPs'][tk] or float('nan'):.0f}, int8 dot "
            f"{peaks['vnni_GOPs'][tk] or float('nan'):.0f} GOP/s, AMX bf16 "
            f"{peaks['amx_bf16_GFLOPs'][tk] or float('nan'):.0f} GFLOP/s")

    geometry = args.geometry
    ckpt = build_checkpoint(geometry, args.cache, seed=args.seed, log=log)
    cfg = hf_config(geometry)
    engines = [e for e in ENGINES[geometry] if not (args.skip_llama and e[0] == "llama")]
    if args.only:
        want = {s.strip() for s in args.only.split(",")}
        engines = [e for e in engines if _key(*e) in want]
    ggufs: Dict[str, str] = {}
    if any(e == "llama" for e, _ in engines):
        from gguf_export import export_gguf
        for _, v in engines:
            if v.isupper():
                ggufs[v] = export_gguf(ckpt, cfg, v, log=log, threads=max_threads)
    work = os.path.join(args.cache, "runs", f"scaling-{geometry}" + ("-quick" if args.quick else ""))
    os.makedirs(work, exist_ok=True)
    n_ctx = max([prefill] + [c + 2 * steps + 16 for c in contexts]) + 64
    workload = {"check_prompt": 8, "check_greedy": 4, "prefill": prefill, "prefill_reps": 1,
                "decode_contexts": contexts, "decode_tokens": steps, "profile_tokens": 0}
    base = {"ckpt": ckpt, "threads": max_threads, "workload": workload, "n_ctx": n_ctx,
            "npy_dir": os.path.join(work, "logits")}
    served: Dict[str, Served] = {}
    hello: Dict[str, Dict[str, Any]] = {}
    try:
        for eng, var in engines:
            spec = dict(base)
            if eng == "llama":
                spec["gguf"] = ggufs[var]
            elif var in prefetch:
                spec["prefetch"] = prefetch[var]
            served[_key(eng, var)] = Served(Run(eng, var, "serve", 3600), spec, work)
        for k in list(served):
            try:
                hello[k] = served[k].reply(timeout=3600)
            except RuntimeError as ex:  # an engine that does not load is reported; the others go on
                log(f"  {k} FAILED to load: {ex}")
                served.pop(k).close()
                continue
            log(f"  {k} loaded ({hello[k].get('load_seconds') or 0:.1f} s)")
        if not served:
            raise RuntimeError("no engine loaded")
        raw = sweep(served, threads_list, max_threads, contexts, prefill, steps, rounds, args.cache, log)
    finally:
        for s in served.values():
            s.close()

    rows = summarize(raw, hello, peaks, cfg, prefill, steps)
    import dsv2ext

    settings = {"isa": dsv2ext.get_isa(), "prefetch_bytes": prefetch or {"kernel defaults": dsv2ext.prefetch_defaults()},
                "env": {k: v for k, v in os.environ.items() if k.startswith("DSV2EXT_")}}
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": info,
           "dsv2ext_settings": settings,
           "llama_build": llama_build_info() if ggufs else None, "peaks": peaks, "contexts": contexts,
           "prefill_tokens": prefill, "decode_steps": steps, "threads": threads_list, "raw": raw, "rows": rows}
    res["targets"] = targets(rows, peaks, contexts)
    print()
    print("\n".join(table(rows, contexts, prefill)))
    for t in res["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']:.2f}")

    jpath = os.path.join(out_dir, "results-scaling.json")
    all_geoms: Dict[str, Any] = {}
    before: Dict[str, Any] = {}
    if os.path.isfile(jpath):
        try:
            prev = read_json(jpath)
            all_geoms, before = prev.get("geometries", {}), prev.get("before", {})
        except ValueError:
            pass
    entry = f"{geometry} ({args.tag})" if args.tag else geometry
    res["geometry"] = geometry
    if args.keep_previous and entry in all_geoms:
        before[entry] = dict(all_geoms[entry], label=args.keep_previous)
    all_geoms[entry] = res
    write_json(jpath, {"geometries": all_geoms, "before": before})
    write_reports(out_dir, all_geoms, before)
    log(f"wrote {jpath}")
    return 0


def amx_section(path: str) -> List[str]:
    """The AMX table of ``bench_amx.py --json`` (results-amx.json next to the scaling results), if any."""
    if not os.path.isfile(path):
        return []
    recs = read_json(path)
    if not recs:
        return []
    lines = ["", "## AMX tiles against AVX-512 (`python benchmarks/bench_amx.py --threads 16 --tokens 512`)", "",
             f"{recs[0]['cpu']}, hardware tiles: {recs[0]['amx_hw']}.  Every AMX path gave bit-identical results "
             "to the C emulation of the tiles that CI tests (`tests/test_amx.py`).", "",
             "| product | tokens | threads | path | ms | GFLOP/s | vs AVX-512 | max rel. error vs float64 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['case']} | {r['T']} | {r['threads']} | {r['path']} | {r['ms']:.2f} | {r['gflops']:.0f} | "
                     f"{r['speedup_vs_avx512']:.2f} | {r['max_rel_err']:.1e} |")
    return lines


def write_reports(out_dir: str, all_geoms: Dict[str, Any], before: Dict[str, Any]) -> None:
    """RESULTS-scaling.md and results-scaling.png from the results (and an earlier run kept as "before")."""
    with open(os.path.join(out_dir, "RESULTS-scaling.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(all_geoms, before))
        f.write("\n".join(amx_section(os.path.join(out_dir, "results-amx.json"))) + "\n")
    try:
        write_chart(os.path.join(out_dir, "results-scaling.png"), all_geoms, before)
    except ImportError as ex:
        print(f"no chart: {ex}")


if __name__ == "__main__":
    sys.exit(main())
