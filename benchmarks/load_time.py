"""Time and peak memory of quantizing a bf16 checkpoint at load (``dsv2ext.load(dtype=...)``).

    python benchmarks/load_time.py --geometry lite-L4 --dtype int4
    python benchmarks/load_time.py --geometry lite-full --dtype int8 --threads 2 --json out.json
    python benchmarks/load_time.py --ckpt DIR --dtype int4-mixed --cold

The load runs in a fresh child process (one per measurement), so that its peak
resident set (``VmHWM``, which exec resets) is the load's own: reading the bf16 tensors from
the memory-mapped files, quantizing them tensor by tensor (threaded C) and
dropping the source pages from the resident set after each tensor.  Reported:
seconds of ``dsv2ext.load``, peak RSS, the quantized model's size
(``model.info()["weight_bytes"]``, codes and scales), the bf16 file size, and
whether the peak stays within the model size + 2 GiB (the issue's bound).

``--cold`` first evicts the checkpoint's files from the page cache
(``posix_fadvise(DONTNEED)``; pages other processes map stay), so that the time
includes reading the files from disk; without it the files are usually
cached by an earlier run and the time is the quantization's.  The checkpoint
comes from benchmarks/checkpoint.py (``--geometry``; built into the cache if
missing: lite-L4 ~4.6 GB, lite-full ~31 GB of bf16) or ``--ckpt``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30


def _child(ckpt: str, dtype: str, threads: int) -> Dict[str, Any]:
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    import dsv2ext
    from common import peak_rss_bytes  # VmHWM: this process's own peak (ru_maxrss keeps the parent's)

    dsv2ext.set_num_threads(threads)
    rss0 = peak_rss_bytes()
    t0 = time.perf_counter()
    model = dsv2ext.load(ckpt, dtype=dtype, load_tokenizer=False)
    secs = time.perf_counter() - t0
    info = model.info()
    peak = peak_rss_bytes()
    return {"seconds": secs, "peak_rss_bytes": peak, "rss_before_load_bytes": rss0,
            "weight_bytes": int(info["weight_bytes"]), "params_by_dtype": info["params_by_dtype"],
            "threads": dsv2ext.get_num_threads(), "isa": dsv2ext.get_isa()}


def _files(ckpt: str) -> List[str]:
    return sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))


def evict_page_cache(ckpt: str) -> None:
    """Ask the kernel to drop the checkpoint files' cached pages (not mapped elsewhere)."""
    for f in _files(ckpt):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(ckpt: str, dtype: str, threads: int, cold: bool) -> Dict[str, Any]:
    if cold:
        evict_page_cache(ckpt)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ckpt, dtype, str(threads)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"load failed ({r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_wall_seconds"] = wall
    res["file_bytes"] = sum(os.path.getsize(f) for f in _files(ckpt))
    res["peak_minus_model_bytes"] = res["peak_rss_bytes"] - res["weight_bytes"]
    res["within_model_plus_2GiB"] = res["peak_rss_bytes"] <= res["weight_bytes"] + 2 * GIB
    res.update(ckpt=ckpt, dtype=dtype, cold=cold)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        print(json.dumps(_child(argv[1], argv[2], int(argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=["lite-L4", "lite-full"], default="lite-L4")
    ap.add_argument("--ckpt", default=None, help="bf16 checkpoint directory (default: the geometry's, built if missing)")
    ap.add_argument("--dtype", nargs="+", default=["int4"], choices=["int8", "int4", "int4-mixed"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="measurements per dtype (the table shows each)")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint files from the page cache first")
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"))
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    ckpt = a.ckpt
    if ckpt is None:
        sys.path.insert(0, HERE)
        from checkpoint import build_checkpoint, checkpoint_dir

        ckpt = checkpoint_dir(a.cache, a.geometry, 0)
        shared = os.path.join("/work/bench-cache", os.path.basename(ckpt))
        if not os.path.isfile(os.path.join(ckpt, "config.json")) and os.path.isfile(os.path.join(shared, "config.json")):
            ckpt = shared
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            ckpt = build_checkpoint(a.geometry, a.cache, 0)
    rows = []
    print(f"checkpoint {ckpt}  threads {a.threads}  {'cold' if a.cold else 'warm'} page cache")
    print(f"{'dtype':11s} {'load s':>8s} {'peak RSS GiB':>13s} {'model GiB':>10s} {'peak-model GiB':>15s} "
          f"{'files GiB':>10s}  peak <= model + 2 GiB")
    for dt in a.dtype:
        for _ in range(a.repeat):
            r = measure(ckpt, dt, a.threads, a.cold)
            rows.append(r)
            print(f"{dt:11s} {r['seconds']:8.1f} {r['peak_rss_bytes'] / GIB:13.2f} {r['weight_bytes'] / GIB:10.2f} "
                  f"{r['peak_minus_model_bytes'] / GIB:15.2f} {r['file_bytes'] / GIB:10.2f}  "
                  f"{'yes' if r['within_model_plus_2GiB'] else 'NO'}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["within_model_plus_2GiB"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
