"""Timing of one DeepSeek-V2-Lite MLA attention block (hidden 2048, 16 heads, kv_lora 512,
no q compression, YaRN as in the Lite config), random weights.

    python benchmarks/bench_mla.py [--dtype f32|bf16] [--kv-dtype f32|bf16] [--threads N] [--context 4096]
                                   [--prefill 512] [--threads 1 --cpu-time]

Reports: decode of 1 token after `context` cached tokens (auto = absorbed form), the same
with the non-absorbed form, a `prefill`-token prompt from an empty cache (auto = non-absorbed)
and with the absorbed form; median of several runs, and the bytes / FLOPs behind them.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import dsv2ext
from dsv2ext.dtypes import BF16
from dsv2ext.ops import mla as M

LITE = {"num_attention_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 0.707, "mscale_all_dim": 0.707}}


def make_weights(cfg: M.MLAConfig, d: int, dtype: str, rng: np.random.Generator) -> M.MLAWeights:
    def w(*shape: int):
        a = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)
        return BF16.from_float32(a) if dtype == "bf16" else a

    H = cfg.num_heads
    return M.MLAWeights(
        q_proj=w(H * cfg.qk_head_dim, d), kv_a_proj_with_mqa=w(cfg.latent_dim, d),
        kv_a_layernorm=np.ones(cfg.kv_lora_rank, np.float32),
        kv_b_proj=w(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), o_proj=w(d, H * cfg.v_head_dim))


CLOCK = time.perf_counter


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--kv-dtype", choices=["f32", "bf16"], default="f32", help="latent cache format")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --threads 1: time the calling thread's CPU time (time.thread_time), which "
                         "leaves out waiting for a core on a shared machine")
    a = ap.parse_args()
    global CLOCK
    if a.threads:
        dsv2ext.set_num_threads(a.threads)
    if a.cpu_time:
        if dsv2ext.get_num_threads() != 1:
            ap.error("--cpu-time needs --threads 1")
        CLOCK = time.thread_time
    d = 2048
    cfg = M.MLAConfig.from_hf_config(LITE)
    rng = np.random.default_rng(0)
    W = make_weights(cfg, d, a.dtype, rng)
    wbytes = sum(getattr(W, f).nbytes for f in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))
    S = max(a.context + 1, a.prefill)
    cache = M.new_latent_cache(cfg, 1, S, a.kv_dtype)
    rows = rng.standard_normal((a.context, cfg.latent_dim), dtype=np.float32)
    if a.kv_dtype == "bf16":
        cache.data[0, :a.context] = BF16.from_float32(rows).data
    else:
        cache[0, :a.context] = rows
    row_bytes = cfg.latent_dim * (2 if a.kv_dtype == "bf16" else 4)
    print(f"V2-Lite MLA block, weights {a.dtype} ({wbytes / 2**20:.1f} MiB), {a.kv_dtype} cache, "
          f"threads {dsv2ext.get_num_threads()}, "
          f"isa {dsv2ext.get_isa()}, {'CPU time of the thread' if a.cpu_time else 'wall time'} (median)")

    x1 = rng.standard_normal((1, d), dtype=np.float32)
    seq1, pos1 = np.zeros(1, np.int64), np.array([a.context], np.int64)
    for mode in ("auto", "decompressed"):
        t = timeit(lambda: M.mla_attention_block(x1, W, cfg, cache, seq1, pos1, mode), a.reps)
        kv = (a.context + 1) * row_bytes
        print(f"decode 1 token @ context {a.context:5d} [{mode:12s}]: {t * 1e3:8.2f} ms   "
              f"(weights + latent rows read: {(wbytes + kv) / 2**20:.1f} MiB -> {(wbytes + kv) / t / 1e9:.1f} GB/s)")

    # attention kernel alone at decode
    q = rng.standard_normal((1, 16, 192), dtype=np.float32)
    t = timeit(lambda: M.mla_attention_absorbed(q, cache, seq1, pos1, W.kv_b_proj, cfg.softmax_scale), a.reps)
    fl = 2 * 16 * (a.context + 1) * (576 + 512)
    print(f"  absorbed attention kernel alone: {t * 1e3:.2f} ms ({fl / t / 1e9:.0f} GFLOP/s on the cached rows, "
          f"{(a.context + 1) * row_bytes / t / 1e9:.1f} GB/s of rows)")

    P = a.prefill
    xp = rng.standard_normal((P, d), dtype=np.float32)
    seqp, posp = np.zeros(P, np.int64), np.arange(P, dtype=np.int64)
    proj = 2 * P * d * (16 * 192 + 576 + 16 * 128)
    for mode in ("auto", "absorbed"):
        t = timeit(lambda: M.mla_attention_block(xp, W, cfg, cache, seqp, posp, mode), max(2, a.reps // 2))
        print(f"prefill {P} tokens from empty cache [{mode:12s}]: {t * 1e3:8.1f} ms   "
              f"({P / t:.0f} tokens/s; projections alone {proj / 1e9:.1f} GFLOP)")


if __name__ == "__main__":
    main()
