"""The bundled model: loads with no argument, matches transformers and its model card.

Perplexity tolerance: 0.1% (relative) against transformers on the same tokens and
against the card's value (metrics.json); greedy continuations identical for >= 32 tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext.perplexity import perplexity, token_nll

DIR = dsv2ext.default_model_path()


@pytest.fixture(scope="module")
def model():
    return dsv2ext.load(kv_dtype="f32")  # parity with the fp32 reference: an exact cache


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sample():
    with open(os.path.join(DIR, "heldout_sample.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def metrics():
    with open(os.path.join(DIR, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def test_bundled_files_and_size():
    names = set(os.listdir(DIR))
    for n in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "README.md"):
        assert n in names
    assert sum(os.path.getsize(os.path.join(DIR, n)) for n in names) <= 16 * 2**20


def test_load_without_argument(model):
    assert model.path == DIR
    info = model.info()
    assert info["dtype"] == "bf16"
    assert model.config.q_lora_rank and model.config.topk_method == "group_limited_greedy"
    assert model.config.rope_type == "yarn" and model.config.first_k_dense_replace == 1


def test_heldout_perplexity_matches_transformers_and_card(model, ref, sample, metrics):
    W = metrics["eval"]["window"]
    texts = [s["text"] for s in sample]
    ours = perplexity(model, texts, window=W)
    # transformers on the same tokens, same windows
    nll, n = 0.0, 0
    for text in texts:
        ids = model.encode(text)
        for s in range(0, len(ids), W):
            chunk = ids[s:s + W]
            if len(chunk) < 2:
                continue
            with torch.no_grad():
                logits = ref(torch.tensor([chunk])).logits[0].numpy()
            nll += float(token_nll(logits[:-1], np.asarray(chunk[1:])).sum())
            n += len(chunk) - 1
    theirs = float(np.exp(nll / n))
    assert ours.predicted_tokens == n == metrics["eval"]["sample"]["tokens"]
    assert abs(ours.perplexity / theirs - 1) <= 1e-3
    assert abs(ours.perplexity / metrics["eval"]["sample"]["ppl"] - 1) <= 1e-3


@pytest.mark.parametrize("k", [0, 5, 11])
def test_greedy_continuation_of_heldout_prompts(model, ref, sample, k):
    text = sample[k]["text"]
    ids = model.encode(text)[:48]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    got = model.generate(ids, max_new_tokens=40, temperature=0)
    assert len(got.token_ids) >= 32 or got.finish_reason == "eos"
    assert got.token_ids == want[:len(got.token_ids)]


def test_generate_function_and_cli(tmp_path, sample):
    out = dsv2ext.generate("def fibonacci(n):", max_new_tokens=24, temperature=0)
    assert len(out.token_ids) > 0 and out.text
    r = subprocess.run([sys.executable, "-m", "dsv2ext", "generate", "--temperature", "0", "--max-new-tokens",
                        "24", "def fibonacci(n):"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fibonacci(n):") and len(r.stdout) > len("def fibonacci(n):") + 10
    files = []
    for i, s in enumerate(sample[:2]):
        p = tmp_path / f"f{i}.py"
        p.write_text(s["text"], encoding="utf-8")
        files.append(str(p))
    r = subprocess.run([sys.executable, "-m", "dsv2ext", "perplexity", "--json", *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    m = dsv2ext.load()
    want = perplexity(m, [s["text"] for s in sample[:2]], window=512)
    assert abs(got["perplexity"] - want.perplexity) <= 1e-9 * want.perplexity
