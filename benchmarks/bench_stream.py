#!/usr/bin/env python
"""How fast one decode matrix product streams its weights, against the machine's read probe.

    python benchmarks/bench_stream.py [--ckpt DIR] [--threads 1,16] [--prefetch 0,512,1024,2048]

One token (T = 1) times a large weight matrix is what decode does for every
Linear; it should read the weights at the bandwidth a plain streaming read gets
with the same number of threads.  Measured for:

* ``mmap``: the checkpoint's ``lm_head.weight`` (bf16) as the loader maps it from
  the safetensors file (4 KiB pages of the page cache);
* ``anon``: the same bf16 bits copied into anonymous memory (NumPy asks the
  kernel for transparent huge pages for large arrays);
* ``int8``: the matrix quantized to int8 (anonymous memory, int16 activations);

each at every software-prefetch distance given (``dsv2ext.set_prefetch``), thread
count by thread count, in interleaved repetitions (best of them), next to the read
probe of ``machine.py`` (same thread count).  Without ``--ckpt`` a random matrix
written to a temporary safetensors file stands in for the checkpoint's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from machine import BandwidthProbe, cpu_model  # noqa: E402


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory holding lm_head.weight (bf16)")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--prefetch", default="0,512,1024,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"))
    args = ap.parse_args(argv)

    import dsv2ext
    from dsv2ext.quant import quantize_int8
    from dsv2ext.safetensors import CheckpointReader, save_file

    tmp = None
    if args.ckpt is None:
        tmp = tempfile.mkdtemp(prefix="bench_stream_")
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((51200, 2048), dtype=np.float32) * 0.02)
        save_file({"lm_head.weight": dsv2ext.BF16.from_float32(w)}, os.path.join(tmp, "model.safetensors"))
        args.ckpt = tmp
    reader = CheckpointReader(args.ckpt)
    mm = reader.get("lm_head.weight", aligned=True)
    mats: Dict[str, object] = {"mmap": mm, "anon": dsv2ext.BF16(np.array(mm.data)), "int8": quantize_int8(mm)}
    nbytes = {k: getattr(v, "total_nbytes", v.nbytes) for k, v in mats.items()}
    N, K = mm.shape
    x = np.random.default_rng(1).standard_normal((1, K), dtype=np.float32)
    threads = [int(t) for t in args.threads.split(",")]
    dists = [int(d) for d in args.prefetch.split(",")]
    print(f"{cpu_model()}; weight [{N}, {K}] ({nbytes['mmap'] / 2**20:.0f} MiB bf16, "
          f"{nbytes['int8'] / 2**20:.0f} MiB int8)")
    print("| threads | probe GB/s | " + " | ".join(f"{k} pf={d}" for k in mats for d in dists) + " |")
    print("|---|---|" + "---|" * (len(mats) * len(dists)))
    for t in threads:
        dsv2ext.set_num_threads(t)
        best: Dict[str, float] = {}
        with BandwidthProbe(args.cache, t) as probe:
            probes = []
            for _ in range(args.reps):
                probes.append(probe.read())
                for k, w in mats.items():
                    for d in dists:
                        dsv2ext.set_prefetch(d)
                        dsv2ext.ops.linear(x, w)  # warm: page tables, scratch
                        t0 = time.perf_counter()
                        dsv2ext.ops.linear(x, w)
                        dt = time.perf_counter() - t0
                        key = f"{k}/{d}"
                        best[key] = max(best.get(key, 0.0), nbytes[k] / dt / 1e9)
        print(f"| {t} | {max(probes):.1f} | " + " | ".join(f"{best[f'{k}/{d}']:.1f}" for k in mats for d in dists)
              + " |", flush=True)
    reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
