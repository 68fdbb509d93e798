"""The opt-in bf16 compute mode (bf16 weights x bf16-rounded activations on vdpbf16ps).

References:
- the rounding: torch's float32 -> bfloat16 conversion (round to nearest even);
- products: a NumPy float64 model of the same arithmetic (activations rounded with
  ``round_to_bf16``, weights' exact bf16 values): max |err| <= 1e-5 x max (|x| @ |W|^T)
  (fp32 accumulation of exact bf16 x bf16 products);
- MLP / MoE / model: the exact (default) path, within what bf16 activations cost.
Every test is skipped where the CPU has no AVX512-BF16 (the mode then has no effect,
which ``test_no_effect_without_avx512bf16`` checks everywhere).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext import BF16, ops
from dsv2ext.precision import round_to_bf16

needs_bf16 = pytest.mark.skipif(not dsv2ext.bf16_compute_available(),
                                reason="this CPU has no AVX512-BF16: the mode has no effect")
TOL = 1e-5


def _bf16(rng, shape, std):
    return BF16.from_float32((rng.standard_normal(shape) * std).astype(np.float32))


def _model_product(x: np.ndarray, w: BF16) -> np.ndarray:
    return round_to_bf16(x).astype(np.float64) @ w.to_float32().astype(np.float64).T


def _scale(x: np.ndarray, w: BF16) -> float:
    return float((np.abs(round_to_bf16(x)).astype(np.float64) @ np.abs(w.to_float32()).astype(np.float64).T).max())


def test_mode_is_off_by_default_and_restored():
    assert dsv2ext.get_bf16_compute() is False
    with dsv2ext.bf16_compute():
        assert dsv2ext.get_bf16_compute() is True
        with dsv2ext.bf16_compute(False):
            assert dsv2ext.get_bf16_compute() is False
        assert dsv2ext.get_bf16_compute() is True
    assert dsv2ext.get_bf16_compute() is False
    assert dsv2ext.set_bf16_compute(False) is False
    with pytest.raises(TypeError, match="enabled"):
        dsv2ext.set_bf16_compute("yes")


def test_round_to_bf16_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-39, 3.4e38, 1.0 + 2 ** -8,
                                  1.0 + 3 * 2 ** -8], np.float32)]).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_bf16(x), ref)
    assert np.isnan(round_to_bf16(np.array([np.nan], np.float32)))[0]


@needs_bf16
@pytest.mark.parametrize("T,K,N", [(2, 2048, 64), (3, 1, 5), (5, 37, 19), (7, 2048, 1408), (9, 1536, 3072),
                                   (48, 2048, 1408), (33, 1408, 2048), (200, 512, 576)])
def test_linear_matches_numpy_model(T, K, N):
    rng = np.random.default_rng(T * 7 + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = _bf16(rng, (N, K), 0.02)
    exact = ops.linear(x, w)
    with dsv2ext.bf16_compute():
        got = ops.linear(x, w)
    ref = _model_product(x, w)
    assert np.max(np.abs(got - ref)) <= TOL * _scale(x, w)
    # and it is the bf16-activation product, not the exact one (which differs by ~1e-3)
    assert np.max(np.abs(got - exact)) > 10 * TOL * _scale(x, w)


@needs_bf16
def test_single_rows_fp32_and_int8_weights_stay_exact():
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((1, 256)).astype(np.float32)
    x8 = rng.standard_normal((8, 256)).astype(np.float32)
    wb = _bf16(rng, (96, 256), 0.05)
    wf = (rng.standard_normal((96, 256)) * 0.05).astype(np.float32)
    off = [ops.linear(x1, wb), ops.linear(x8, wf)]
    with dsv2ext.bf16_compute():
        on = [ops.linear(x1, wb), ops.linear(x8, wf)]
    for a, b in zip(off, on):
        np.testing.assert_array_equal(a, b)


def test_no_effect_without_avx512bf16():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 128)).astype(np.float32)
    w = _bf16(rng, (64, 128), 0.05)
    prev = dsv2ext.get_isa()
    try:
        dsv2ext.set_isa("avx2")
        assert not dsv2ext.bf16_compute_available()
        off = ops.linear(x, w)
        with dsv2ext.bf16_compute():
            on = ops.linear(x, w)
        np.testing.assert_array_equal(off, on)
    finally:
        dsv2ext.set_isa(prev)


@needs_bf16
@pytest.mark.parametrize("T", [2, 5, 16, 64, 100])
def test_swiglu_mlp_matches_numpy_model(T):
    rng = np.random.default_rng(T)
    d, I = 256, 176
    x = rng.standard_normal((T, d)).astype(np.float32)
    g, u, dn = _bf16(rng, (I, d), 0.06), _bf16(rng, (I, d), 0.06), _bf16(rng, (d, I), 0.06)
    with dsv2ext.bf16_compute():
        got = ops.swiglu_mlp(x, g, u, dn)
    a, b = _model_product(x, g), _model_product(x, u)
    h = (a / (1 + np.exp(-a)) * b).astype(np.float32)
    ref = _model_product(h, dn)
    # h is rounded to bf16 before down: an fp32-vs-float64 difference in h can move one
    # rounding by an ulp (2^-8 relative of that element), hence the looser bound here
    assert np.max(np.abs(got - ref)) <= 2e-3 * _scale(h, dn)
    exact = ops.swiglu_mlp(x, g, u, dn)
    assert np.max(np.abs(got - exact)) <= 2e-2 * np.max(np.abs(exact))


@needs_bf16
@pytest.mark.parametrize("T", [1, 7, 40, 300])
def test_moe_block_close_to_exact_and_thread_independent(T):
    rng = np.random.default_rng(10 + T)
    d, I, E, k = 128, 96, 16, 4
    x = rng.standard_normal((T, d)).astype(np.float32)
    router = (rng.standard_normal((E, d)) * 0.1).astype(np.float32)
    experts = [(_bf16(rng, (I, d), 0.08), _bf16(rng, (I, d), 0.08), _bf16(rng, (d, I), 0.08)) for _ in range(E)]
    shared = (_bf16(rng, (2 * I, d), 0.08), _bf16(rng, (2 * I, d), 0.08), _bf16(rng, (d, 2 * I), 0.08))
    cfg = ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=k)
    exact = ops.moe_block(x, router, experts, shared, cfg)
    outs = []
    prev = dsv2ext.get_num_threads()
    try:
        for th in (1, 2, 3):
            dsv2ext.set_num_threads(th)
            with dsv2ext.bf16_compute():
                outs.append(ops.moe_block(x, router, experts, shared, cfg))
    finally:
        dsv2ext.set_num_threads(prev)
    assert np.max(np.abs(outs[0] - exact)) <= 2e-2 * np.max(np.abs(exact))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@needs_bf16
def test_bundled_model_logits_and_generation():
    m = dsv2ext.load()
    ids = m.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    exact = m.logits(ids)
    with dsv2ext.bf16_compute():
        got = m.logits(ids)
        out = m.generate("def add(a, b):", max_new_tokens=12, temperature=0)
    assert len(out.token_ids) == 12
    cos = np.sum(got * exact, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(exact, axis=1))
    assert cos.min() >= 0.999, cos.min()
    # the argmax agrees wherever exact's top-two margin is clear
    top2 = np.sort(exact, 1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * exact.std()
    assert np.all(np.argmax(got, 1)[clear] == np.argmax(exact, 1)[clear])
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 1e-5 < rel < 3e-2, rel
