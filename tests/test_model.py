"""The whole model against transformers on checkpoints made here.

Tolerances: logits max abs error <= 1e-4 * max |reference logit| (fp32
compute; bf16 checkpoints compared with the same bf16 weights upcast);
greedy generation identical for >= 32 new tokens.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import dsv2ext
from hf_models import YARN, make_model, reference, save, to_hub_spelling

LOGIT_TOL = 1e-4

VARIANTS = {
    # name: (kind, config overrides, dtype, shard, hub spelling)
    "v2-lite-greedy-f32": ("v2", {}, torch.float32, None, False),
    "v2-qlora-group-yarn-bf16-sharded": (
        "v2", dict(q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                   routed_scaling_factor=16.0, rope_parameters=dict(YARN)), torch.bfloat16, "60KB", False),
    "v2-yarn-hub-spelling": ("v2", dict(rope_parameters=dict(YARN), topk_method="group_limited_greedy",
                                        n_group=2, topk_group=1), torch.float32, None, True),
    "v3-noaux-yarn-bf16": ("v3", dict(rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0)),
                           torch.bfloat16, None, False),
    "v3-hub-spelling-sharded": ("v3", {}, torch.float32, "50KB", True),
    # transformers' V2 ignores norm_topk_prob (the reference): so must we
    "v2-norm-topk-flag": ("v2", dict(norm_topk_prob=True, routed_scaling_factor=2.0), torch.float32, None, False),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def ckpt(request, tmp_path_factory):
    kind, over, dtype, shard, hub = VARIANTS[request.param]
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_model(kind, seed=len(request.param), **over)
    save(model, path, dtype, shard)
    ref = reference(path)
    if hub:
        to_hub_spelling(path)
    ours = dsv2ext.load(path, kv_dtype="f32")  # parity with the fp32 reference: an exact cache
    return request.param, path, ref, ours


def _prompt(n: int, seed: int = 0) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, size=n)]


def test_logits_match_transformers(ckpt):
    name, path, ref, ours = ckpt
    # longer than original_max_position_embeddings (64) for the YaRN variants
    ids = _prompt(100)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = ours.logits(ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert got.shape == want.shape
    assert err <= LOGIT_TOL, f"{name}: relative logit error {err:.3g}"


def test_greedy_generate_matches_transformers(ckpt):
    name, path, ref, ours = ckpt
    ids = _prompt(20, seed=1)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = ours.generate(ids, max_new_tokens=40, temperature=0)
    n = len(got.token_ids)
    assert got.token_ids == want[:n]
    assert n >= 32 or got.finish_reason == "eos"


def test_batch_equals_one_by_one(ckpt):
    name, path, ref, ours = ckpt
    prompts = [_prompt(5, 2), _prompt(17, 3), _prompt(9, 4)]
    batch = ours.generate(prompts, max_new_tokens=12, temperature=0)
    for p, b in zip(prompts, batch):
        single = ours.generate(p, max_new_tokens=12, temperature=0)
        assert b.token_ids == single.token_ids


def test_prefill_then_decode_equals_full_logits(ckpt):
    name, path, ref, ours = ckpt
    ids = _prompt(30, 5)
    full = ours.logits(ids)
    cache = ours.new_cache(1, 30)
    step = [ours.forward(np.array(ids[:10]), np.zeros(10, np.int64), np.arange(10), cache)]
    for t in range(10, 30):
        step.append(ours.forward(np.array([ids[t]]), np.zeros(1, np.int64), np.array([t]), cache))
    got = np.concatenate(step)
    assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()


def test_sampling_seeded_reproducible(ckpt):
    name, path, ref, ours = ckpt
    ids = _prompt(8, 6)
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1)
    a = ours.generate(ids, seed=123, **kw)
    b = ours.generate(ids, seed=123, **kw)
    c = ours.generate(ids, seed=124, **kw)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) >= 1 and (a.token_ids != c.token_ids or len(a.token_ids) < 4)


def test_info_and_repr(ckpt):
    name, path, ref, ours = ckpt
    info = ours.info()
    # every checkpoint tensor counts (V3's router correction bias is a buffer in transformers)
    n_ref = sum(p.numel() for p in ref.parameters()) + sum(
        b.numel() for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias"))
    assert info["total_params"] == n_ref
    assert info["kv_cache_elements_per_token"] == (32 + 8) * 3
    assert "DeepseekV2(" in repr(ours)


def test_config_spellings_load_the_same(tmp_path):
    model = make_model("v2", seed=7, rope_parameters=dict(YARN), q_lora_rank=48)
    a = save(model, str(tmp_path / "a"))
    b = save(model, str(tmp_path / "b"))
    to_hub_spelling(b)
    ma, mb = dsv2ext.load(a), dsv2ext.load(b)
    assert ma.config == mb.config
    ids = _prompt(70, 8)
    np.testing.assert_array_equal(ma.logits(ids), mb.logits(ids))


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_yarn_past_four_times_the_original_length(kind, tmp_path):
    """YaRN positions far beyond original_max_position_embeddings (16): a 72-token prompt (4.5x) in
    chunks of 16, then greedy decoding to 104 tokens (6.5x), against transformers in fp32."""
    yarn = dict(YARN, original_max_position_embeddings=16, factor=8.0)
    if kind == "v3":
        yarn.update(mscale=1.0, mscale_all_dim=1.0)
    path = save(make_model(kind, seed=41, rope_parameters=yarn, max_position_embeddings=128), str(tmp_path))
    ref = reference(path)
    ours = dsv2ext.load(path, kv_dtype="f32")
    ours.prefill_chunk = 16
    ids = _prompt(72, seed=9)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    got = ours.logits(ids)
    assert np.abs(got - want).max() <= LOGIT_TOL * np.abs(want).max()
    out = ours.generate(ids, max_new_tokens=32, temperature=0)
    assert out.token_ids == greedy[:len(out.token_ids)] and (len(out.token_ids) == 32 or out.finish_reason == "eos")
