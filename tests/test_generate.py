"""generate(): text prompts, streaming, stop strings, eos, chat, errors, CLI.

A small random DeepSeek-V2 with a real byte-level BPE tokenizer (made here).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext.generation import IncrementalDecoder
from dsv2ext.tokenizer import Tokenizer
from hf_models import YARN, make_model, make_tokenizer, reference, save

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gen"))
    model = make_model("v2", seed=11, vocab_size=VOCAB, q_lora_rank=32, rope_parameters=dict(YARN),
                       topk_method="group_limited_greedy", n_group=4, topk_group=2)
    save(model, path, torch.bfloat16)
    make_tokenizer(path, VOCAB)
    return path, reference(path), dsv2ext.load(path, kv_dtype="f32")  # exact cache: parity with fp32


def test_text_prompt_matches_transformers(ckpt):
    from transformers import AutoTokenizer

    path, ref, ours = ckpt
    text = "def fibonacci(n):\n"
    ids = AutoTokenizer.from_pretrained(path)(text).input_ids
    assert ours.encode(text) == ids
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    got = ours.generate(text, max_new_tokens=32, temperature=0)
    assert got.token_ids == want[:len(got.token_ids)]
    assert got.text == ours.tokenizer.decode(got.token_ids)
    assert got.prompt_tokens == len(ids)
    assert got.prefill_tokens_per_s > 0 and got.finish_reason in ("eos", "length")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stream_joins_to_text(ckpt, seed):
    path, ref, ours = ckpt
    stream = ours.generate("x = ", max_new_tokens=40, temperature=1.0, seed=seed, stream=True)
    pieces = list(stream)
    assert stream.result is not None
    assert "".join(pieces) == stream.result.text
    again = ours.generate("x = ", max_new_tokens=40, temperature=1.0, seed=seed)
    assert again.token_ids == stream.result.token_ids


def test_incremental_decoder_never_splits_utf8(tmp_path):
    make_tokenizer(str(tmp_path), VOCAB)
    tok = Tokenizer(str(tmp_path))
    text = "héllo wörld 😀 naïve ✓ 日本"
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok.decode)
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the emoji spans several byte-level tokens: some steps must have held text back
    assert any(p == "" for p in pieces[:-1])


def test_stop_string_and_eos(ckpt):
    path, ref, ours = ckpt
    base = ours.generate("import os\n", max_new_tokens=24, temperature=0)
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    k = text.find(stop)
    got = ours.generate("import os\n", max_new_tokens=24, temperature=0, stop=[stop])
    assert got.finish_reason == "stop"
    assert got.text == text[:k]
    stream = ours.generate("import os\n", max_new_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(stream) == text[:k]
    # eos: make the 5th greedy token the end-of-sequence token
    eos_tok = base.token_ids[4]
    first = base.token_ids.index(eos_tok)
    saved = dict(ours.generation_config)
    try:
        ours.generation_config["eos_token_id"] = [eos_tok]
        got = ours.generate("import os\n", max_new_tokens=24, temperature=0)
    finally:
        ours.generation_config.clear()
        ours.generation_config.update(saved)
    assert got.finish_reason == "eos"
    assert got.token_ids == base.token_ids[:first + 1]


def test_chat_uses_template(ckpt):
    from transformers import AutoTokenizer

    path, ref, ours = ckpt
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    ids = AutoTokenizer.from_pretrained(path).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    got = ours.chat(msgs, max_new_tokens=10, temperature=0)
    assert got.token_ids == ours.generate(list(ids), max_new_tokens=10, temperature=0).token_ids
    assert got.prompt_tokens == len(ids)


def test_sampling_params_change_output(ckpt):
    path, ref, ours = ckpt
    kw = dict(max_new_tokens=20, seed=5)
    a = ours.generate("def", temperature=1.5, **kw)
    b = ours.generate("def", temperature=1.5, top_k=1, **kw)
    g = ours.generate("def", temperature=0, **kw)
    assert b.token_ids == g.token_ids          # top_k=1 is greedy
    c = ours.generate("def", temperature=1.0, top_p=1e-6, **kw)
    assert c.token_ids == g.token_ids          # a tiny top_p keeps only the best token
    r = ours.generate("def", temperature=0, repetition_penalty=10.0, **kw)
    assert len(set(r.token_ids)) >= len(set(g.token_ids))
    assert a.token_ids != g.token_ids


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m.generate([], max_new_tokens=4), ValueError, "prompt"),
    (lambda m: m.generate([1, 2], max_new_tokens=0), ValueError, "max_new_tokens"),
    (lambda m: m.generate([1, 2], max_new_tokens=511), ValueError, "context"),
    (lambda m: m.generate([1, VOCAB + 5], max_new_tokens=4), ValueError, "out of range"),
    (lambda m: m.generate([1, -1], max_new_tokens=4), ValueError, "out of range"),
    (lambda m: m.generate([1, 2], max_new_tokens=4, temperature=-1), ValueError, "temperature"),
    (lambda m: m.generate([1, 2], max_new_tokens=4, top_p=0), ValueError, "top_p"),
    (lambda m: m.generate([1, 2], max_new_tokens=4, top_k=-3), ValueError, "top_k"),
    (lambda m: m.generate([1, 2], max_new_tokens=4, stop=[1]), TypeError, "stop"),
    (lambda m: m.generate([1, 2], max_new_tokens=4, seed=-1), ValueError, "seed"),
    (lambda m: m.generate([[1, 2], [3]], max_new_tokens=4, stream=True), ValueError, "stream"),
    (lambda m: m.generate(["a", 3.5], max_new_tokens=4), TypeError, "prompt"),
    (lambda m: m.logits(list(range(3, 300)) * 2), ValueError, "context"),
])
def test_bad_arguments(ckpt, call, exc, match):
    path, ref, ours = ckpt
    with pytest.raises(exc, match=match):
        call(ours)


def test_text_without_tokenizer(tmp_path):
    model = make_model("v2", seed=3)
    save(model, str(tmp_path))
    m = dsv2ext.load(str(tmp_path))
    assert m.tokenizer is None
    with pytest.raises(dsv2ext.TokenizerError, match="tokenizer"):
        m.generate("hello", max_new_tokens=2)
    out = m.generate([5, 6, 7], max_new_tokens=3, temperature=0)
    assert out.text is None and len(out.token_ids) >= 1


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv2ext", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_info_stats(ckpt):
    path, ref, ours = ckpt
    r = _run("generate", "--model", path, "--max-new-tokens", "12", "--temperature", "0", "def f(x):")
    assert r.returncode == 0, r.stderr
    want = "def f(x):" + ours.generate("def f(x):", max_new_tokens=12, temperature=0).text
    assert r.stdout.rstrip("\n") == want
    r = _run("info", path)
    assert r.returncode == 0 and "DeepseekV2(" in r.stdout and "kv_cache" in r.stdout
    r = _run("stats", "deepseek-v2-lite")
    assert r.returncode == 0 and r.stdout.strip()
    r = _run("generate", "--model", str(os.path.join(path, "nope")), "x")
    assert r.returncode == 2 and "error" in r.stderr


def test_greedy_select_token_one_pass():
    """The greedy pick (no repetition penalty) takes one argmax over the float32 row: the same
    index as the float64 path (first maximum on ties), and NaN / +Inf anywhere still raise."""
    from dsv2ext.sampling import SamplingParams, select_token

    greedy = SamplingParams()
    rng = np.random.default_rng(0)
    for trial in range(50):
        x = rng.standard_normal(997).astype(np.float32)
        if trial % 2:
            x = np.round(x, 1)  # many ties
        x[rng.integers(0, 997, 20)] = -np.inf  # masked tokens
        assert select_token(x, greedy, None) == int(np.argmax(x.astype(np.float64)))
    assert select_token(np.full(8, -np.inf, np.float32), greedy, None) == 0
    for bad in (np.nan, np.inf):
        for at in (0, 500, 996):
            x = rng.standard_normal(997).astype(np.float32)
            x[at] = bad
            with pytest.raises(FloatingPointError, match="NaN or"):
                select_token(x, greedy, None)
