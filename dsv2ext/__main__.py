"""Command line: ``python -m dsv2ext {generate,info,stats,perplexity} ...``

Examples
--------
python -m dsv2ext generate "def fibonacci(n):"
python -m dsv2ext generate --model DIR --max-new-tokens 64 --temperature 0.7 --seed 1 "prompt"
python -m dsv2ext info DIR
python -m dsv2ext stats deepseek-v2
python -m dsv2ext perplexity --model DIR file1.py file2.py
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _model(path: Optional[str], dtype: Optional[str] = None, kv_dtype: Optional[str] = None):
    from .model import load

    return load(path, dtype=dtype, kv_dtype=kv_dtype)


def cmd_generate(a: argparse.Namespace) -> int:
    model = _model(a.model, a.dtype, a.kv_dtype)
    if model.tokenizer is None:
        print(f"error: {model.path} has no tokenizer.json", file=sys.stderr)
        return 2
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop or None)
    out = sys.stdout
    if not a.no_stream:
        out.write(a.prompt)
        out.flush()
        stream = model.generate(a.prompt, a.max_new_tokens, stream=True, **kw)
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        res = stream.result
    else:
        res = model.generate(a.prompt, a.max_new_tokens, **kw)
        out.write(a.prompt + (res.text or "") + "\n")
    if a.verbose:
        print(f"[{len(res.token_ids)} tokens, finish={res.finish_reason}, "
              f"prefill {res.prefill_tokens_per_s:.1f} tok/s, decode {res.decode_tokens_per_s:.1f} tok/s]",
              file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    model = _model(a.model)
    info = model.info()
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(repr(model))
        for k, v in info.items():
            print(f"  {k:32s} {v}")
    return 0


def cmd_perplexity(a: argparse.Namespace) -> int:
    from .perplexity import perplexity

    model = _model(a.model, a.dtype, a.kv_dtype)
    texts = []
    for path in a.files:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    r = perplexity(model, texts, window=a.window)
    if a.json:
        print(json.dumps({"perplexity": r.perplexity, "predicted_tokens": r.predicted_tokens,
                          "windows": r.windows, "mean_nll": r.mean_nll, "window": a.window}))
    else:
        print(f"perplexity {r.perplexity:.4f} over {r.predicted_tokens} predicted tokens "
              f"({r.windows} windows of <= {a.window} tokens, {len(texts)} files)")
    return 0


def _cmd_stats(a: argparse.Namespace) -> int:
    from .stats import main_stats

    return main_stats(a.args)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv2ext", description="DeepSeek-V2 family inference on the CPU")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="continue a prompt (streams to the terminal)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--dtype", choices=["bf16", "f32", "int8", "int4", "int4-mixed", "fp8"], default=None)
    g.add_argument("--kv-dtype", choices=["f32", "bf16", "fp8"], default=None,
                   help="latent cache format (default: f32 for fp32 checkpoints, bf16 otherwise)")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end")
    g.add_argument("-v", "--verbose", action="store_true", help="print speed to stderr")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    s = sub.add_parser("stats", help="parameter / FLOP / KV-cache arithmetic for a config")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_stats)

    q = sub.add_parser("perplexity", help="perplexity over text files")
    q.add_argument("files", nargs="+")
    q.add_argument("--model", default=None)
    q.add_argument("--window", type=int, default=512)
    q.add_argument("--dtype", choices=["bf16", "f32", "int8", "int4", "int4-mixed", "fp8"], default=None)
    q.add_argument("--kv-dtype", choices=["f32", "bf16", "fp8"], default=None, help="latent cache format")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_perplexity)

    a = p.parse_args(argv)
    try:
        return int(a.fn(a) or 0)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:  # FloatingPointError: NaN logits
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
