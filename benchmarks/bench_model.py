"""dsv2ext vs transformers on the same checkpoint: logits parity and speed.

    python benchmarks/bench_model.py [--model DIR] [--threads 2] [--prompt 512] [--new 64]

Prints the relative logit error and prefill / decode tokens per second of both
engines, measured in the same run (median of --repeat runs), and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import dsv2ext

    torch.set_num_threads(a.threads)
    dsv2ext.set_num_threads(a.threads)
    ours = dsv2ext.load(a.model)
    path = ours.path
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    V = ours.config.vocab_size
    ids = np.random.default_rng(0).integers(3, V, size=a.prompt).tolist()

    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = ours.logits(ids)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"model: {path}")
    print(f"logits [{a.prompt}, {V}]: max |dsv2ext - transformers| / max |ref| = {err:.2e}")

    def hf_run():
        with torch.no_grad():
            t0 = time.perf_counter()
            out = ref(torch.tensor([ids]), use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(a.new - 1):
                out = ref(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
        return a.prompt / (t1 - t0), (a.new - 1) / (t2 - t1)

    def ours_run():
        r = ours.generate(ids, max_new_tokens=a.new, temperature=0)
        return r.prefill_tokens_per_s, r.decode_tokens_per_s

    rows = {"dsv2ext": [], "transformers": []}
    for _ in range(a.repeat):
        rows["dsv2ext"].append(ours_run())
        rows["transformers"].append(hf_run())
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in rows.items()}
    print(f"threads {a.threads}, prompt {a.prompt} tokens, {a.new} new tokens (median of {a.repeat})")
    print(f"{'engine':14s} {'prefill tok/s':>14s} {'decode tok/s':>14s}")
    for k, (p, d) in med.items():
        print(f"{k:14s} {p:14.1f} {d:14.1f}")
    p0, d0 = med["dsv2ext"]
    p1, d1 = med["transformers"]
    print(f"{'ratio':14s} {p0 / p1:13.2f}x {d0 / d1:13.2f}x")


if __name__ == "__main__":
    main()
