"""Shared by the benchmark driver and its per-engine worker processes."""
from __future__ import annotations

import contextlib
import json
import time
import os
import resource
import sys
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

__all__ = ["prompt_ids", "peak_rss_bytes", "load_llama_backends", "read_json", "write_json", "top2", "Workload",
           "QUICK", "FULL", "time_interleaved"]


def prompt_ids(n: int, seed: int, vocab: int = 100000) -> List[int]:
    """``n`` reproducible token ids in [0, vocab) (below the special tokens at 100000+).

    Parameters
    ----------
    n : int
        Number of tokens.
    seed : int
        Different seeds give unrelated prompts.
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    rng = np.random.default_rng([7919, seed])
    return [int(i) for i in rng.integers(0, vocab, size=n)]


def peak_rss_bytes(status_path: str = "/proc/self/status") -> int:
    """Peak resident set size of this process since it started its program, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this
    process's own address space, which ``exec`` starts afresh.  Not
    ``ru_maxrss``: Linux carries it across fork + exec, so a worker started by
    a driver that had grown to 6 GiB would report at least 6 GiB whatever it
    used itself.  Elsewhere (no /proc) ``ru_maxrss`` is the fallback.
    """
    try:
        with open(status_path, "r", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    if unit != "kB":
                        raise ValueError(f"{status_path}: VmHWM in unexpected unit {unit!r}")
                    return int(value) * 1024
    except FileNotFoundError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def read_json(path: str) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_default)
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def top2(logits: np.ndarray) -> Dict[str, Any]:
    """Top-1 / top-2 ids and values of a logit row (float32 [V])."""
    row = np.asarray(logits, dtype=np.float32)
    i2 = np.argpartition(row, -2)[-2:]
    i2 = i2[np.argsort(-row[i2])]
    return {"top1": int(i2[0]), "top2": int(i2[1]), "v1": float(row[i2[0]]), "v2": float(row[i2[1]]),
            "margin": float(row[i2[0]] - row[i2[1]])}


class Workload(dict):
    """The sizes of one benchmark run (a plain dict, JSON-serializable).

    Keys
    ----
    check_prompt : int         tokens whose logits are compared across engines
    check_greedy : int         greedy tokens compared after that prompt
    prefill : int              prompt length of the prefill measurement
    prefill_reps : int         best of this many prefills (engines that are fast)
    decode_contexts : list     contexts before the decode measurement
    decode_tokens : int        decode steps timed after each context
    profile_tokens : int       decode steps of the dsv2ext time split
    """


FULL = Workload(check_prompt=48, check_greedy=32, prefill=512, prefill_reps=2,
                decode_contexts=[128, 4096], decode_tokens=64, profile_tokens=32)
QUICK = Workload(check_prompt=24, check_greedy=12, prefill=64, prefill_reps=1,
                 decode_contexts=[32], decode_tokens=8, profile_tokens=8)


def softmax_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token (len of the shorter when one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def time_interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Time each function `reps` times, alternating between them (fair under drifting load)."""
    try:
        import torch

        ctx = torch.no_grad()
    except ImportError:
        ctx = contextlib.nullcontext()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with ctx:
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return times


def load_llama_backends() -> List[str]:
    """Load llama.cpp's CPU backends where llama-cpp-python was built with dynamic backends.

    A build with ``-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON`` (one wheel for every
    x86-64 CPU: the best ``libggml-cpu-<variant>.so`` is picked at run time) installs the
    variants under ``site-packages/bin``, where nothing loads them: then "no backends are
    loaded" and every model fails to load.  This loads them into the ``libggml.so.0`` that
    ``libllama`` links.  A regular build (the backend linked in) needs nothing: returns [].
    ``LLAMA_BACKEND_DIR`` names the folder explicitly.
    """
    import ctypes
    import glob

    import llama_cpp

    pkg = os.path.dirname(os.path.abspath(llama_cpp.__file__))
    dirs = [os.environ.get("LLAMA_BACKEND_DIR", ""), os.path.join(os.path.dirname(pkg), "bin"),
            os.path.join(pkg, "lib")]
    found = [d for d in dirs if d and glob.glob(os.path.join(d, "libggml-cpu-*.so"))]
    if not found:
        return []
    lib = os.path.join(pkg, "lib", "libggml.so.0")
    g = ctypes.CDLL(lib if os.path.exists(lib) else os.path.join(pkg, "lib", "libggml.so"))
    g.ggml_backend_reg_count.restype = ctypes.c_size_t
    if g.ggml_backend_reg_count() == 0:
        g.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        g.ggml_backend_load_all_from_path(found[0].encode())
    return found
