"""int4 weights (dsv2ext.int4): the quantizer and the activation quantizer against their NumPy
models, every int4 kernel on every instruction-set path against float64 models, the MLP / MoE /
MLA blocks and the whole model with int4 weights, recipes, save / reload, malformed checkpoints.

Tolerances
----------
- quantizers: bit-identical bytes to ``quantize_int4_reference`` / ``quantize_act8_reference``
  (the same float32 operations), on every instruction-set path.
- linear: max |got - ref| <= 2e-6 * max |ref| against the float64 model of the path that runs:
  int8 activations (few rows, ``linear_int4_reference(act8=True)``: exact integer block sums,
  the kernels round only the fp32 scaling and summation) or fp32 activations x the dequantized
  weights (sgemm on dequantized panels for many rows; the "fp32" activation mode).
- SwiGLU MLP / MoE block: 1e-5 (two chained products and SiLU in fp32).
- MLA block, kv_b_proj kernels, whole model ("fp32" activation mode): the same block / model run
  on the dequantized fp32 weights, 1e-5 / 1e-4 of the largest value (as tests/test_mla.py and
  tests/test_quant.py); in "int8" mode the distance to it is bounded (activation rounding at most
  max|x in block| / 254 per value: 3e-2 for a block; for the model, cosine >= 0.99 and the same
  argmax at every position, as routing choices may flip) and shown to be non-zero.
- perplexity of the bundled model on a slice of its held-out sample: int4 within 3% of bf16
  (full sample: bf16 9.6922, int4 9.767, int4-mixed 9.700), int4-mixed within 1%.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import dsv2ext
from dsv2ext import ops
from dsv2ext.dtypes import BF16
from dsv2ext.int4 import (Int4Weight, dequantize_int4_reference, get_int4_activations, int4_row_bytes,
                          linear_int4_reference, quantize_act8, quantize_act8_reference, quantize_int4,
                          quantize_int4_reference, set_int4_activations, unpack_int4)
from dsv2ext.model import DeepseekV2
from dsv2ext.quant import (Int8Weight, dequantize, linear_int8_reference, quantize_int8, quantize_model_weights,
                           read_quantization_config, row_dot_limits, save_quantized, stacked_experts)
from dsv2ext.safetensors import CheckpointError, CheckpointReader, save_file

from conftest import max_rel_err

LTOL = 2e-6
KTOL = 1e-5
LOGIT_TOL = 1e-4
LIN_MAX_T, MLP_MAX_T = row_dot_limits()


@pytest.fixture(params=["int8", "fp32"])
def act(request):
    """Run a test in both activation modes of the int4 row-dot kernels."""
    prev = set_int4_activations(request.param)
    yield request.param
    set_int4_activations(prev)


def rand_w(shape, seed, scale=0.05):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- the format and the quantizer

@pytest.mark.parametrize("shape", [(40, 2048), (23, 1408), (2, 3, 96), (9, 48), (5, 40), (4, 30), (3, 64), (7, 33),
                                   (2, 1), (5, 320), (2, 10944), (3, 192)])
def test_quantizer_matches_numpy_model(isa, shape):
    w = rand_w(shape, sum(shape))
    flat = w.reshape(-1, shape[-1])
    flat[0, :40] = 0.0                   # an all-zero group (and a partly zero one)
    if flat.shape[0] > 2:
        flat[1, :] *= 1e-30              # tiny values: subnormal sub-scales
        flat[2, :] = -0.01               # a constant negative row: range 0 -> s = 0, offset only
    ref = quantize_int4_reference(w)
    for src in (w, BF16.from_float32(w)):
        got = quantize_int4(src)
        assert got.shape == shape and got.data.shape == shape[:-1] + (int4_row_bytes(shape[-1]),)
        np.testing.assert_array_equal(got.data, quantize_int4_reference(src).data)
    np.testing.assert_array_equal(quantize_int4(w).data, ref.data)


def test_format_fields_and_dequantization():
    w = rand_w((37, 1408), 5)
    q = quantize_int4(w)
    assert q.bits_per_weight == pytest.approx(8 * 824 / 1408) and int4_row_bytes(2048) == 1184
    assert q.nbytes == q.total_nbytes == q.data.nbytes and q.scales_nbytes == 37 * 6 * 20
    codes, d, dmin, sc, m = unpack_int4(q)
    assert codes.max() <= 15 and codes.shape == (37, 1408)
    # the format's formula, term by term, equals the C dequantization bit for bit
    deq = q.to_float32()
    np.testing.assert_array_equal(deq, dequantize_int4_reference(q))
    np.testing.assert_array_equal(deq, dequantize(q))
    a = np.repeat((np.repeat(d, 8, 1) * sc).astype(np.float32)[:, :44], 32, 1)
    b = np.repeat((np.repeat(dmin, 8, 1) * m).astype(np.float32)[:, :44], 32, 1)
    np.testing.assert_array_equal(deq, (a * codes.astype(np.float32) - b).astype(np.float32))
    # a codes' step is d * sc: the values lie within half a step of the grid unless clipped by the
    # fitted range, and the whole matrix within a few percent
    step = a[:, ::32]
    inside = np.abs(deq - w).reshape(37, 44, 32) <= 0.5 * step[..., None] * (1 + 1e-6)
    assert inside.mean() > 0.98
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < 0.08


def test_quantizer_bad_arguments():
    w = rand_w((4, 64), 0)
    bad = w.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_int4(bad)
    bad[2, 5] = -np.inf
    with pytest.raises(ValueError, match="NaN"):
        quantize_int4(bad)
    with pytest.raises(ValueError, match="NaN"):
        quantize_int4_reference(bad)
    with pytest.raises(TypeError, match="uint16"):
        quantize_int4(w.view(np.uint16))
    with pytest.raises(TypeError, match="floating"):
        quantize_int4(np.ones((4, 64), np.int32))
    with pytest.raises(ValueError, match="2 dimensions"):
        quantize_int4(w[0])
    q = quantize_int4(w)
    with pytest.raises(TypeError, match="already"):
        quantize_int4(q)
    with pytest.raises(TypeError, match="uint8"):
        Int4Weight(q.data.astype(np.int8), 64)
    with pytest.raises(ValueError, match="takes"):
        Int4Weight(q.data, 65)
    with pytest.raises(ValueError, match="cols"):
        Int4Weight(q.data, 0)
    # the binding checks the tag's fields too
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="weight.data"):
        ops.linear(x, _Raw4(q.data[:, :-1].copy(), 64))
    with pytest.raises(ValueError, match="weight.data"):
        ops.linear(x, _Raw4(np.zeros((4, 2 * q.data.shape[1]), np.uint8)[:, ::2], 64))
    with pytest.raises(ValueError, match="weight"):
        ops.linear(np.ones((1, 63), np.float32), q)           # x has 63 columns, the weight 64
    with pytest.raises(ValueError, match="cols"):
        ops.linear(x, _Raw4(q.data, -3))
    with pytest.raises(TypeError, match="cols"):
        ops.linear(x, _Raw4(q.data, None, missing=True))
    with pytest.raises(TypeError, match="norm"):
        ops.rms_norm(x, _Raw4(np.zeros(int4_row_bytes(64), np.uint8), 64))


class _Raw4:
    """An int4 tag without Int4Weight's own checks (to reach the binding's)."""
    __dsv2_dtype__ = "int4"

    def __init__(self, data, cols, missing=False):
        self.data = data
        if not missing:
            self.cols = cols
        self.shape = data.shape[:-1] + (cols,)


def test_act8_quantizer_matches_numpy_model(isa):
    rng = np.random.default_rng(3)
    for K in (2048, 1408, 48, 33, 320, 192, 10944):
        x = rng.standard_normal((3, K)).astype(np.float32)
        x[1, :7] *= 300.0
        x[2, 256:] = 0.0
        for got, ref in zip(quantize_act8(x), quantize_act8_reference(x)):
            np.testing.assert_array_equal(got, ref)
    x = rng.standard_normal((2, 300)).astype(np.float32)
    x[1, 270] = np.nan
    q, s, g = quantize_act8(x)
    assert np.isnan(s[1, 1]) and not q[1, 256:].any() and np.isfinite(s[1, 0])
    # rounding: block max 127 -> scale 1, half to even
    x = np.zeros((1, 64), np.float32)
    x[0, :6] = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5]
    q, s, g = quantize_act8(x)
    assert s[0, 0] == 1.0 and list(q[0, :6]) == [127, 0, 2, 2, 0, -2] and g[0, 0] == 127 + 2 + 2 - 2


def test_activation_mode_api():
    prev = get_int4_activations()
    assert prev == "int8"
    assert set_int4_activations("fp32") == "int8" and get_int4_activations() == "fp32"
    set_int4_activations(prev)
    with pytest.raises(ValueError, match="mode"):
        set_int4_activations("int16")


# ---------------------------------------------------------------- kernels

@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 40])
@pytest.mark.parametrize("N,K", [(515, 2048), (37, 10944), (66, 1408), (66, 48), (20, 40), (9, 30), (11, 192)])
def test_linear_int4(isa, act, T, N, K):
    q = quantize_int4(rand_w((N, K), N + K))
    x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
    x[0, :16] *= 50.0  # a block with a large range: coarse int8 steps there
    got = ops.linear(x, q)
    on = T <= LIN_MAX_T and act == "int8"
    assert max_rel_err(got, linear_int4_reference(x, q, act8=on)) <= LTOL
    fp = linear_int4_reference(x, q, act8=False)
    if on:  # the int8 path really ran: it differs from the fp32 product, within the rounding bound
        assert 1e-7 < max_rel_err(got, fp) <= 3e-2


def test_linear_int4_long_prompt_and_v2_lite_dims(isa):
    """600 rows (dequantized panels + sgemm) and the V2-Lite q_b / o_proj / kv_a shapes at T = 1."""
    for N, K, T in ((3072, 1536, 1), (2048, 2048, 1), (576, 2048, 1), (300, 1408, 600)):
        q = quantize_int4(rand_w((N, K), N))
        x = np.random.default_rng(K).standard_normal((T, K)).astype(np.float32)
        assert max_rel_err(ops.linear(x, q), linear_int4_reference(x, q, act8=T <= LIN_MAX_T)) <= LTOL


def test_nonfinite_activations_propagate(act):
    q = quantize_int4(rand_w((8, 300), 0))
    x = np.ones((1, 300), np.float32)
    x[0, 3] = np.nan
    assert np.isnan(ops.linear(x, q)).all()
    x[0, 3] = np.inf
    assert not np.isfinite(ops.linear(x, q)).all()


@pytest.mark.parametrize("N,K", [(515, 2048), (66, 1408), (37, 10944), (11, 192), (9, 30), (7, 64)])
def test_linear_int4_decode_rows_same_bits(isa, N, K):
    """One token (decode) takes the four-rows-a-step kernel on AVX-512 VNNI; each row gets the bits
    of the one-row kernel that two tokens run (token 0 of a 2-token call), also for the rows left
    over past a multiple of 4 and for row ranges of 2 threads."""
    q = quantize_int4(rand_w((N, K), 3 * N + K))
    x = np.random.default_rng(K).standard_normal((2, K)).astype(np.float32)
    x[0, :8] *= 30.0
    prev = dsv2ext.get_num_threads()
    try:
        for n in (1, 2):
            dsv2ext.set_num_threads(n)
            np.testing.assert_array_equal(ops.linear(x[:1], q)[0], ops.linear(x, q)[0])
    finally:
        dsv2ext.set_num_threads(prev)


def test_linear_int4_threads_identical():
    q = quantize_int4(rand_w((515, 2048), 1))
    w = rand_w((40, 2048), 7)
    x = np.random.default_rng(2).standard_normal((3, 2048)).astype(np.float32)
    outs, codes, prev = [], [], dsv2ext.get_num_threads()
    for n in (1, 2, 3):
        dsv2ext.set_num_threads(n)
        outs.append(ops.linear(x, q))
        codes.append(quantize_int4(w).data)
    dsv2ext.set_num_threads(prev)
    for o, c in zip(outs[1:], codes[1:]):
        np.testing.assert_array_equal(o, outs[0])
        np.testing.assert_array_equal(c, codes[0])


def lin_ref(x, w, act8, act16):
    """int4: int8 activations when act8; int8 weights: int16 activations when act16 (their own mode)."""
    if isinstance(w, Int4Weight):
        return linear_int4_reference(x.astype(np.float32), w, act8=act8)
    return linear_int8_reference(x.astype(np.float32), w, act16=act16 and w.group % 16 == 0)


def swiglu_reference(x, g, u, dn, act8, act16=False):
    a = lin_ref(x, g, act8, act16)
    h = (a / (1 + np.exp(-a))) * lin_ref(x, u, act8, act16)
    return lin_ref(h.astype(np.float32), dn, act8, act16)


@pytest.mark.parametrize("T", [1, 3, 16, 20, 64, 70])
def test_swiglu_mlp_int4(isa, act, T):
    d, I = 256, 1408
    g, u, dn = (quantize_int4(rand_w(s, i)) for i, s in enumerate([(I, d), (I, d), (d, I)]))
    x = np.random.default_rng(T).standard_normal((T, d)).astype(np.float32)
    on = T <= MLP_MAX_T and act == "int8"
    got = ops.swiglu_mlp(x, g, u, dn)
    assert max_rel_err(got, swiglu_reference(x, g, u, dn, on)) <= KTOL
    if on:
        assert 1e-7 < max_rel_err(got, swiglu_reference(x, g, u, dn, False)) <= 3e-2
    # a mixed MLP: int4 gate / up, int8 down (each matrix on its own activation kind)
    dn8 = quantize_int8(rand_w((d, I), 9), 32)
    on16 = T <= MLP_MAX_T and isa != "portable"  # the int8 kernels' own (default) int16 mode
    assert max_rel_err(ops.swiglu_mlp(x, g, u, dn8), swiglu_reference(x, g, u, dn8, on, on16)) <= KTOL


# ---------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def bundled():
    return dsv2ext.load()


@pytest.fixture(scope="module")
def bundled_int4(bundled):
    # the exact fp32 latent cache: compared below with the dequantized model to fp32 rounding
    return DeepseekV2(bundled.config, quantize_model_weights(bundled.weights, recipe="int4"), bundled.tokenizer,
                      bundled.generation_config, kv_dtype="f32")


def _deq_model(model):
    """The same model with every quantized weight replaced by its dequantized fp32 values."""
    def deq(obj):
        if isinstance(obj, (Int8Weight, Int4Weight)):
            return dequantize(obj)
        if isinstance(obj, list):
            return [deq(o) for o in obj]
        if hasattr(obj, "__dataclass_fields__"):
            return type(obj)(**{k: deq(v) for k, v in vars(obj).items()})
        return obj
    return DeepseekV2(model.config, deq(model.weights), model.tokenizer, kv_dtype=model.kv_dtype)


@pytest.fixture(scope="module")
def bundled_int4_deq(bundled_int4):
    return _deq_model(bundled_int4)


def test_recipes(bundled, bundled_int4):
    src, w = bundled.weights, bundled_int4.weights
    assert w.embed_tokens is src.embed_tokens and w.norm is src.norm and isinstance(w.lm_head, Int4Weight)
    mixed = quantize_model_weights(src, recipe="int4-mixed")
    assert isinstance(mixed.lm_head, Int8Weight)
    for ls, l4, lm in zip(src.layers, w.layers, mixed.layers):
        for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            assert isinstance(getattr(l4.attn, name), Int4Weight), name
            assert isinstance(getattr(lm.attn, name), Int8Weight), name
        assert isinstance(l4.attn.kv_b_proj, Int8Weight) and isinstance(lm.attn.kv_b_proj, Int8Weight)
        assert l4.attn.kv_a_layernorm is ls.attn.kv_a_layernorm and l4.input_layernorm is ls.input_layernorm
        if l4.moe is not None:
            assert l4.moe.gate is ls.moe.gate and lm.moe.gate is ls.moe.gate  # the router keeps its dtype
            assert isinstance(l4.moe.experts[3].down_proj, Int4Weight)
            assert isinstance(lm.moe.experts[3].down_proj, Int4Weight)
            assert isinstance(l4.moe.shared.up_proj, Int4Weight) and isinstance(lm.moe.shared.up_proj, Int8Weight)
            assert isinstance(l4.moe.shared.down_proj, Int8Weight)  # read by every token: 8 bits
            st = stacked_experts(l4.moe.experts)
            assert st is not None and st[0].shape == (16, 96, 256) and st[1].shape == (16, 256, 48)
        else:
            assert isinstance(l4.mlp.up_proj, Int4Weight) and isinstance(lm.mlp.up_proj, Int8Weight)
            assert isinstance(l4.mlp.down_proj, Int8Weight) and isinstance(lm.mlp.down_proj, Int8Weight)
    with pytest.raises(ValueError, match="recipe"):
        quantize_model_weights(src, recipe="int5")
    info = bundled_int4.info()
    assert info["params_by_dtype"]["int4"] > 0 and info["weight_bytes"] < bundled.info()["weight_bytes"]


@pytest.mark.parametrize("T", [1, 5, 40, 400])
def test_moe_block_int4(bundled_int4, act, T):
    """Routed experts as views of the stacked int4 buffers, the stacked pair and expert tables,
    against a float64 model with the same routing."""
    lw = next(l for l in bundled_int4.weights.layers if l.moe is not None)
    m, cfg = lw.moe, bundled_int4._moe_cfg
    st = stacked_experts(m.experts)
    x = np.random.default_rng(T).standard_normal((T, 256)).astype(np.float32)
    trip = lambda e: (e.gate_proj, e.up_proj, e.down_proj)  # noqa: E731
    out, ids, wts = ops.moe_block(x, m.gate, [trip(e) for e in m.experts], trip(m.shared), cfg,
                                  return_routing=True)
    np.testing.assert_array_equal(ops.moe_block(x, m.gate, ops.StackedExperts(*st), trip(m.shared), cfg), out)
    np.testing.assert_array_equal(
        ops.moe_block(x, m.gate, ops.moe.moe_expert_table(ops.StackedExperts(*st)), trip(m.shared), cfg), out)
    on = act == "int8"
    count = np.bincount(ids.reshape(-1), minlength=16)
    if T == 400:
        assert count.max() > MLP_MAX_T  # the sgemm path is exercised
    ref = np.zeros((T, 256))
    for t in range(T):  # activations quantize per row: token by token
        xt = x[t:t + 1]
        for e, wt in zip(ids[t], wts[t]):
            ref[t] += wt * swiglu_reference(xt, *trip(m.experts[e]), on and count[e] <= MLP_MAX_T)[0]
        # the shared expert's down_proj is int8 (the recipe): int16 activations, its own mode
        ref[t] += swiglu_reference(xt, *trip(m.shared), on and T <= MLP_MAX_T,
                                   T <= MLP_MAX_T and dsv2ext.get_isa() != "portable")[0]
    assert max_rel_err(out, ref) <= KTOL


def _decode_logits(model, ids, n_new):
    """Logits of a prompt (prefill, T = len(ids)) and then n_new one-token steps."""
    T = len(ids)
    cache = model.new_cache(1, T + n_new)
    z = np.zeros(T, np.int64)
    outs = [model.forward(np.array(ids, np.int64), z, np.arange(T, dtype=np.int64), cache)]
    for i in range(n_new):
        tok = int(np.argmax(outs[-1][-1]))
        outs.append(model.forward(np.array([tok], np.int64), np.zeros(1, np.int64), np.array([T + i]), cache))
    return outs


def test_model_int4_matches_dequantized_fp32(bundled_int4, bundled_int4_deq, act):
    ids = bundled_int4.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    got = _decode_logits(bundled_int4, ids, 6)
    want = _decode_logits(bundled_int4_deq, ids, 6)
    if act == "fp32":  # exactly the model on the dequantized weights, up to fp32 rounding
        for g, w in zip(got, want):
            assert max_rel_err(g, w) <= LOGIT_TOL
        return
    # int8 activations: rounding of at most max|x in block| / 254 per value, and a routing choice
    # it flips now and then (measured: cosine >= 0.9947 at every position, max error 8% of the
    # largest logit at one prompt position, about 1% in the decode steps)
    for g, w in zip(got, want):
        cos = (g * w).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(w, axis=1)
        assert cos.min() >= 0.99 and max_rel_err(g, w) <= 0.15
        assert (g.argmax(1) == w.argmax(1)).all()
    assert min(max_rel_err(g, w) for g, w in zip(got, want)) > 1e-6


def test_mla_block_int4_projections_and_kv_b(act):
    """The MLA block with int4 q_a / q_b / kv_a / o (and an int4 kv_b_proj passed by hand: the
    recipes keep it int8, but every path must take it) against the block on the dequantized weights."""
    from test_mla import LITE_YARN, Ref, rand_hidden
    import dsv2ext.ops.mla as M

    ref = Ref("v2", 1024, 8, 384, 512, 128, 64, 128, LITE_YARN, seed=13)
    q4 = M.MLAWeights(**{k: (v if v is None or v.ndim == 1 else quantize_int4(v)) for k, v in vars(ref.weights).items()})
    deq = M.MLAWeights(**{k: (v if not isinstance(v, Int4Weight) else v.to_float32()) for k, v in vars(q4).items()})
    for T in (3, 20):
        x = rand_hidden(T, 1024, T)
        for mode in ("absorbed", "decompressed"):
            outs = []
            for w in (q4, deq):
                cache = M.new_latent_cache(ref.mcfg, 1, T)
                outs.append(M.mla_attention_block(x, w, ref.mcfg, cache, np.zeros(T, np.int64),
                                                  np.arange(T, dtype=np.int64), mode=mode))
            on = act == "int8" and T <= LIN_MAX_T
            e = max_rel_err(outs[0], outs[1])
            assert e <= (3e-2 if on else KTOL), (T, mode, e)
            if on:
                assert e > 1e-7


@pytest.mark.parametrize("T", [2, 12])
def test_int4_kv_b_proj_kernels(isa, T):
    """mla_attention with an int4 kv_b_proj: both forms equal the fp32 result on the dequantized weight."""
    import dsv2ext.ops.mla as M

    rng = np.random.default_rng(31)
    H, nope, rope, v, L = 4, 32, 16, 32, 96
    cache = rng.standard_normal((2, 40, L + rope)).astype(np.float32)
    w4 = quantize_int4((rng.standard_normal((H * (nope + v), L)) / 8).astype(np.float32))
    wf = w4.to_float32()
    seq = rng.integers(0, 2, T).astype(np.int64)
    pos = rng.permutation(40)[:T].astype(np.int64)
    q = rng.standard_normal((T, H, nope + rope)).astype(np.float32)
    ref = M.mla_attention_absorbed(q, cache, seq, pos, wf, 0.2)
    for fn in (M.mla_attention_absorbed, M.mla_attention_decompressed):
        assert max_rel_err(fn(q, cache, seq, pos, w4, 0.2), ref) <= KTOL


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("recipe", ["int4", "int4-mixed"])
def test_save_and_reload(bundled, recipe, tmp_path):
    m0 = dsv2ext.load(dtype=recipe)  # quantized at load, from the bf16 files
    d = save_quantized(m0, tmp_path / recipe)
    qc = read_quantization_config(d)
    assert qc["quant_method"] == "dsv2ext-int4" and qc["bits"] == 4 and qc["recipe"] == recipe
    r = CheckpointReader(d)
    lm = "lm_head.weight"
    assert r.info(lm)[0] == ("U8" if recipe == "int4" else "I8")
    tag, shape = r.info("model.layers.2.mlp.experts.5.down_proj.weight")
    assert tag == "U8" and tuple(shape) == (256, int4_row_bytes(48))
    r.close()
    for dt in (None, recipe):
        m = dsv2ext.load(d, dtype=dt)
        w = m.weights
        e0 = w.layers[2].moe.experts[5].down_proj
        assert isinstance(e0, Int4Weight) and not e0.data.flags.writeable  # memory-mapped, not re-quantized
        np.testing.assert_array_equal(e0.data, m0.weights.layers[2].moe.experts[5].down_proj.data)
        assert isinstance(w.embed_tokens, BF16) and isinstance(w.layers[1].moe.gate, BF16)
        ids = list(range(5, 40))
        np.testing.assert_array_equal(m.logits(ids), m0.logits(ids))
        assert m.info()["weight_bytes"] == m0.info()["weight_bytes"]
        m.close()
    other = "int4-mixed" if recipe == "int4" else "int4"
    for dt in ("int8", other):
        with pytest.raises(ValueError, match="already quantized"):
            dsv2ext.load(d, dtype=dt)
    m = dsv2ext.load(d, dtype="f32")
    np.testing.assert_array_equal(m.weights.layers[2].moe.experts[5].down_proj,
                                  m0.weights.layers[2].moe.experts[5].down_proj.to_float32())
    m.close()
    m0.close()


def test_malformed_int4_checkpoints(bundled, tmp_path):
    d = save_quantized(dsv2ext.load(dtype="int4"), tmp_path / "q4")
    r = CheckpointReader(d)
    tensors = {n: r.get(n) for n in r.names()}
    r.close()
    name = "model.layers.0.self_attn.o_proj.weight"
    good = tensors[name]
    # packed rows of the wrong length
    bad = dict(tensors)
    bad[name] = np.zeros((good.shape[0], good.shape[1] - 20), np.uint8)
    save_file(bad, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight"):
        dsv2ext.load(d)
    # U8 weights in a checkpoint that does not say dsv2ext-int4
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    good_qc = dict(raw["quantization_config"])
    del raw["quantization_config"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="dsv2ext-int4"):
        dsv2ext.load(d)
    # a dsv2ext-int4 section with wrong fields
    raw["quantization_config"] = dict(good_qc, bits=3)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="bits"):
        dsv2ext.load(d)
    # restored: loads
    raw["quantization_config"] = good_qc
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    dsv2ext.load(d).close()


def test_perplexity_int4(bundled, bundled_int4):
    """A slice of the held-out sample: int4 within 3% of bf16, int4-mixed within 1%."""
    from dsv2ext.perplexity import perplexity

    with open(os.path.join(bundled.path, "heldout_sample.json"), encoding="utf-8") as f:
        texts = [d["text"] for d in json.load(f)]
    ids = [bundled.encode(t)[:384] for t in texts[:6]]
    mixed = DeepseekV2(bundled.config, quantize_model_weights(bundled.weights, recipe="int4-mixed"),
                       bundled.tokenizer)
    p16 = perplexity(bundled, token_ids=ids, window=384).perplexity
    p4 = perplexity(bundled_int4, token_ids=ids, window=384).perplexity
    pm = perplexity(mixed, token_ids=ids, window=384).perplexity
    assert abs(p4 / p16 - 1) < 0.03, (p16, p4)
    assert abs(pm / p16 - 1) < 0.01, (p16, pm)
