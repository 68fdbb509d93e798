"""Describe and measure the machine: CPU model, memory, read bandwidth, dot-product peaks.

The measurements come from ``machine_peak.c``, compiled at run time with the
system's gcc (``-O2 -march=native -pthread``) into the benchmark cache.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from typing import Any, Dict, List, Optional

__all__ = ["cpu_model", "machine_info", "measure_peaks", "cpu_busy", "wait_until_idle"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def machine_info() -> Dict[str, Any]:
    """CPU model, logical CPUs, ISA flags of interest, total memory, caches."""
    flags = set(_cpu_flags())
    mem = None
    try:
        with open("/proc/meminfo", "r", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    caches: Dict[str, str] = {}
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(L[123][a-z]? cache):\s*(.+)", line)
            if m:
                caches[m.group(1)] = m.group(2).strip()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "isa": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                                  "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")),
        "memory_bytes": mem,
        "caches": caches,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _cpu_times() -> Optional[List[int]]:
    try:
        with open("/proc/stat", "r", encoding="utf-8") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_busy(interval: float = 1.0) -> Optional[float]:
    """Fraction of all CPUs busy (not idle / iowait) during ``interval`` seconds, from /proc/stat."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None:
        return None
    d = [y - x for x, y in zip(a, b)]
    total = sum(d)
    idle = d[3] + (d[4] if len(d) > 4 else 0)
    return (total - idle) / total if total > 0 else None


def wait_until_idle(max_seconds: float, busy_below: float = 0.15) -> Optional[float]:
    """Wait (at most ``max_seconds``) until other processes leave the CPUs mostly idle.

    Returns the last busy fraction measured (None where /proc/stat is unreadable).
    """
    t0 = time.time()
    busy = cpu_busy(1.0)
    while busy is not None and busy >= busy_below and time.time() - t0 < max_seconds:
        busy = cpu_busy(2.0)
    return busy


def _binary(cache: str) -> str:
    src = os.path.join(_HERE, "machine_peak.c")
    exe = os.path.join(cache, "machine_peak")
    if not os.path.isfile(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("no C compiler (gcc/cc) on PATH: cannot measure the bandwidth")
        os.makedirs(cache, exist_ok=True)
        r = subprocess.run([cc, "-O2", "-march=native", "-pthread", "-o", exe, src],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{r.stderr}")
    return exe


def _run(exe: str, mode: str, threads: int, n: int, reps: int) -> Optional[float]:
    r = subprocess.run([exe, mode, str(threads), str(n), str(reps)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 3:  # instruction not available
        return None
    if r.returncode != 0:
        raise RuntimeError(f"machine_peak {mode} failed: {r.stderr.strip()}")
    return float(r.stdout.strip())


def measure_peaks(cache: str, threads: List[int], quick: bool = False, read_only: bool = False) -> Dict[str, Any]:
    """Streaming-read bandwidth (2 GiB buffer) and dot-product peaks per thread count.

    Returns
    -------
    dict
        ``{"read_GBps": {"1": .., "2": ..}, "fma32_GFLOPs": {...}, "bf16_GFLOPs": {...},
        "vnni_GOPs": {...}, "amx_bf16_GFLOPs": {...}, "buffer_bytes": ...}``; a peak
        is None where the instruction is missing (AMX: tile products on tiles that
        stay in the tile registers).
    """
    exe = _binary(cache)
    size = (1 << 30) if quick else (2 << 30)
    reps = 3 if quick else 6
    iters = 20_000_000 if quick else 50_000_000
    out: Dict[str, Any] = {"buffer_bytes": size, "read_GBps": {}, "fma32_GFLOPs": {},
                           "bf16_GFLOPs": {}, "vnni_GOPs": {}, "amx_bf16_GFLOPs": {}}
    for t in threads:
        out["read_GBps"][str(t)] = _run(exe, "read", t, size, reps)
        if read_only:
            continue
        out["fma32_GFLOPs"][str(t)] = _run(exe, "fma32", t, iters, 3)
        out["bf16_GFLOPs"][str(t)] = _run(exe, "bf16", t, iters, 3)
        out["vnni_GOPs"][str(t)] = _run(exe, "vnni", t, iters, 3)
        out["amx_bf16_GFLOPs"][str(t)] = _run(exe, "amx", t, iters // 8, 3)  # ~64 cycles a step
    return out


class BandwidthProbe:
    """A streaming-read probe that keeps its buffer between measurements (``machine_peak readloop``).

    The interleaved decode rounds take one reading before each round: on a shared host the
    bandwidth drifts by tens of percent within minutes, so a roofline must come from probes
    taken at the same time as the measurement it judges.  The buffer (2 GiB, as in
    :func:`measure_peaks`) is allocated once: allocating it anew for each reading would make
    the kernel evict other processes' page cache (the engines' memory-mapped weights) and
    slow them down.  Use as a context manager; :meth:`read` returns GB/s (best of ``reps``).
    """

    def __init__(self, cache: str, threads: int, size: int = 2 << 30, reps: int = 3) -> None:
        self.proc = subprocess.Popen([_binary(cache), "readloop", str(threads), str(size), str(reps)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("machine_peak readloop did not start")

    def read(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("read\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("machine_peak readloop exited")
        return float(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "BandwidthProbe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    import json
    print(json.dumps(machine_info(), indent=1))
    print(json.dumps(measure_peaks(os.path.join(_HERE, "cache"), [1, 2], quick=True), indent=1))
