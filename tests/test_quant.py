"""int8 weight quantization: the quantizer against its NumPy model, every int8
kernel against float64 / float32 references on the dequantized weights, the
whole model int8 against the same model with dequantized fp32 weights,
save / reload, and the perplexity cost on the bundled model.

Tolerances
----------
- quantizer: bit-identical codes and scales to ``quantize_int8_reference``
  (same float32 operations), on every instruction-set path.
- kernels, both activation modes: max |got - ref| <= 2e-6 * max |ref|
  for linear and 1e-5 for the MLP / MoE against float64 models of the
  same arithmetic: fp32 activations x dequantized weights, or (int16 mode,
  few rows) the int16-quantized activations (``quantize_act16_reference``)
  x the int8 codes with exact block sums.  The int16 mode's distance from
  the fp32 result is also bounded (<= 2e-4) and shown to be non-zero.
- whole model: logits max abs error <= 1e-4 * max |logit| against the model
  built from the dequantized fp32 weights (same as tests/test_model.py).
- perplexity of the bundled model, int8 vs bf16: within 1% (measured on the
  full held-out sample: -0.003%).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import dsv2ext
from dsv2ext import _C, ops
from dsv2ext.dtypes import BF16
from dsv2ext.model import DeepseekV2
from dsv2ext.quant import (Int8Weight, dequantize, get_int8_activations, linear_int8_reference, load_quantized_tensor,
                           quantize_act16_reference, quantize_int8, quantize_int8_reference, quantize_model_weights,
                           read_quantization_config, row_dot_limits, save_quantized, set_int8_activations,
                           stacked_experts)
from dsv2ext.safetensors import CheckpointError, CheckpointReader

from conftest import max_rel_err

KTOL = 1e-5
LTOL = 2e-6
LIN_MAX_T, MLP_MAX_T = row_dot_limits()  # row-dot kernels up to this many rows, sgemm beyond
LOGIT_TOL = 1e-4


@pytest.fixture(params=["int16", "fp32"])
def act(request):
    """Run a test in both activation modes of the int8 row-dot kernels."""
    prev = set_int8_activations(request.param)
    yield request.param
    set_int8_activations(prev)


def act16_on(mode: str, group: int, isa_name: str) -> bool:
    return mode == "int16" and group % 16 == 0 and isa_name != "portable"


def mlp_row_dot_max(g: Int8Weight, u: Int8Weight, dn: Int8Weight) -> int:
    """Most tokens an int8 MLP sends through the row-dot kernels: MLP_MAX_T, or below the AMX
    threshold where the tiles take all three matrices (groups of a multiple of 32)."""
    if dsv2ext.get_isa() == "amx" and all(w.group % 32 == 0 for w in (g, u, dn)):
        return _C.amx_min_rows() - 1
    return MLP_MAX_T


def rand_w(shape, seed, scale=0.05):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def same_bits(a: Int8Weight, b: Int8Weight) -> None:
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.scales.view(np.uint32), b.scales.view(np.uint32))


# ---------------------------------------------------------------- the quantizer

@pytest.mark.parametrize("shape,group", [((64, 2048), 32), ((37, 1408), 32), ((3, 48, 96), 16), ((5, 40), 8),
                                         ((4, 30), 3), ((6, 64), 64)])
def test_quantizer_matches_numpy_model(isa, shape, group):
    w = rand_w(shape, sum(shape) + group)
    w.reshape(-1, shape[-1])[0, :group] = 0.0          # an all-zero block: scale 0, codes 0
    w.reshape(-1, shape[-1])[1, :group] *= 1e-30       # tiny (subnormal) scale
    for src in (w, BF16.from_float32(w)):
        got, ref = quantize_int8(src, group), quantize_int8_reference(src, group)
        same_bits(got, ref)
        assert got.shape == shape and got.scales.shape == shape[:-1] + (shape[-1] // group,)
        assert got.group == group
        assert got.data.min() >= -127
        v = ref.scales.reshape(-1)[0]
        assert v == 0.0 and not got.data.reshape(-1, shape[-1])[0, :group].any()


def test_quantizer_rounding_and_error_bound():
    # block max 127 -> scale exactly 1: codes are rint of the values, half to even
    row = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], np.float32)
    q = quantize_int8(row[None, :], 8)
    assert q.scales[0, 0] == 1.0
    np.testing.assert_array_equal(q.data[0], [127, 0, 2, 2, 0, -2, -2, 126])
    w = rand_w((50, 256), 3)
    q = quantize_int8(w, 32)
    err = np.abs(dequantize(q) - w).reshape(50, 8, 32).max(-1)
    assert (err <= q.scales / 2 * (1 + 1e-6)).all()     # at most half a step per block
    np.testing.assert_array_equal(dequantize(q), q.data.astype(np.float32) * np.repeat(q.scales, 32, -1))


def test_quantizer_bad_arguments():
    w = rand_w((4, 64), 0)
    with pytest.raises(ValueError, match="group"):
        quantize_int8(w, 24)
    with pytest.raises(ValueError, match="group"):
        quantize_int8(w, 0)
    with pytest.raises(ValueError, match="2 dimensions"):
        quantize_int8(w[0], 32)
    bad = w.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(bad, 32)
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(bad, 32)
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8_reference(bad, 32)
    with pytest.raises(TypeError, match="uint16"):
        quantize_int8(w.view(np.uint16), 32)
    with pytest.raises(TypeError, match="floating"):
        quantize_int8(np.ones((4, 64), np.int32), 32)
    with pytest.raises(TypeError, match="already"):
        quantize_int8(quantize_int8(w, 32), 32)
    q = quantize_int8(w, 32)
    with pytest.raises(TypeError, match="int8"):
        Int8Weight(q.data.astype(np.int16), q.scales)
    with pytest.raises(TypeError, match="float32"):
        Int8Weight(q.data, q.scales.astype(np.float64))
    with pytest.raises(ValueError, match="scales"):
        Int8Weight(q.data, q.scales[:, :1].copy()[:3])
    with pytest.raises(ValueError, match="scales"):
        Int8Weight(q.data, np.ones((4, 3), np.float32))
    # the kernels check the tag's arrays too
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="weight.scales"):
        ops.linear(x, _Raw(q.data, np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match="weight.data"):
        ops.linear(x, _Raw(q.data[:, ::2], q.scales))


class _Raw:
    """An int8 tag without Int8Weight's own checks (to reach the binding's)."""
    __dsv2_dtype__ = "int8"

    def __init__(self, data, scales):
        self.data, self.scales, self.shape = data, scales, data.shape


# ---------------------------------------------------------------- kernels

@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 40])
@pytest.mark.parametrize("N,K,group", [(1030, 2048, 32), (37, 10944, 32), (66, 1408, 64), (66, 48, 16), (20, 40, 8),
                                       (9, 30, 3)])
def test_linear_int8(isa, act, T, N, K, group):
    q = quantize_int8(rand_w((N, K), N + K), group)
    x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
    x[0, :group] *= 50.0  # a block with a large range: coarse int16 steps there
    got = ops.linear(x, q)
    on = T <= LIN_MAX_T and act16_on(act, group, isa)
    assert max_rel_err(got, linear_int8_reference(x, q, act16=on)) <= LTOL
    fp = linear_int8_reference(x, q, act16=False)
    assert max_rel_err(got, fp) <= (2e-4 if on else LTOL)
    if on:  # the int16 path really ran: it differs from the fp32 product
        assert max_rel_err(got, fp) > 1e-8


def test_act16_reference_rounding():
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [32767.0, 0.5, 1.5, 2.5, -0.5, -2.5]
    q, s = quantize_act16_reference(x, 32)
    assert s[0, 0] == 1.0
    np.testing.assert_array_equal(q[0, :6], [32767, 0, 2, 2, 0, -2])
    # the kernel rounds the same way: row k of w (127 at column k, scale 1) picks out 127 * q_k * s
    w = np.zeros((6, 32), np.float32)
    w[np.arange(6), np.arange(6)] = 127.0
    prev = set_int8_activations("int16")
    try:
        got = ops.linear(x, quantize_int8(w, 32))
    finally:
        set_int8_activations(prev)
    np.testing.assert_array_equal(got[0], 127.0 * np.array([32767.0, 0.0, 2.0, 2.0, 0.0, -2.0]))


def test_int8_activation_mode_api():
    prev = get_int8_activations()
    assert set_int8_activations("fp32") == prev and get_int8_activations() == "fp32"
    set_int8_activations(prev)
    with pytest.raises(ValueError, match="mode"):
        set_int8_activations("int8")


def test_nonfinite_activations_propagate(act):
    q = quantize_int8(rand_w((8, 64), 0), 32)
    x = np.ones((1, 64), np.float32)
    x[0, 3] = np.nan
    assert np.isnan(ops.linear(x, q)).all()
    x[0, 3] = np.inf
    assert not np.isfinite(ops.linear(x, q)).all()


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [2048, 10944])
def test_linear_bf16_access_orders(isa, T, K):
    """bf16 / fp32 row-dot kernels: rows streamed one by one (short activation rows) or in
    4-row tiles (long ones, see DSV2_GEMV_TILE_XBYTES); both against float64."""
    w = rand_w((43, K), K + T)
    x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
    for W in (w, BF16.from_float32(w)):
        ref = x.astype(np.float64) @ dequantize(W).astype(np.float64).T
        assert max_rel_err(ops.linear(x, W), ref) <= LTOL


def test_linear_int8_threads_identical():
    q = quantize_int8(rand_w((515, 2048), 1), 32)
    x = np.random.default_rng(2).standard_normal((3, 2048)).astype(np.float32)
    outs, prev = [], dsv2ext.get_num_threads()
    for n in (1, 2, 3):
        dsv2ext.set_num_threads(n)
        outs.append(ops.linear(x, q))
    dsv2ext.set_num_threads(prev)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def swiglu_reference(x, g, u, dn, act16):
    a = linear_int8_reference(x, g, act16=act16)
    h = (a / (1 + np.exp(-a))) * linear_int8_reference(x, u, act16=act16)
    return linear_int8_reference(h.astype(np.float32), dn, act16=act16)


@pytest.mark.parametrize("T", [1, 3, 16, 20, 40])
def test_swiglu_mlp_int8(isa, act, T):
    d, I = 256, 1408
    g, u, dn = (quantize_int8(rand_w(s, i), 32) for i, s in enumerate([(I, d), (I, d), (d, I)]))
    x = np.random.default_rng(T).standard_normal((T, d)).astype(np.float32)
    on = T <= mlp_row_dot_max(g, u, dn) and act16_on(act, 32, isa)  # the row-dot path's tokens
    got = ops.swiglu_mlp(x, g, u, dn)
    assert max_rel_err(got, swiglu_reference(x, g, u, dn, on)) <= KTOL
    assert max_rel_err(got, swiglu_reference(x, g, u, dn, False)) <= (2e-4 if on else KTOL)


@pytest.fixture(scope="module")
def bundled():
    return dsv2ext.load()


@pytest.fixture(scope="module")
def bundled_int8(bundled):
    return DeepseekV2(bundled.config, quantize_model_weights(bundled.weights), bundled.tokenizer,
                      bundled.generation_config, kv_dtype="f32")  # exact cache: compares weights only


@pytest.fixture(scope="module")
def bundled_deq(bundled_int8):
    """The same model with every int8 weight replaced by its dequantized fp32 values."""
    w = bundled_int8.weights

    def deq(obj):
        if isinstance(obj, Int8Weight):
            return dequantize(obj)
        if isinstance(obj, list):
            return [deq(o) for o in obj]
        if hasattr(obj, "__dataclass_fields__"):
            return type(obj)(**{k: deq(v) for k, v in vars(obj).items()})
        return obj
    return DeepseekV2(bundled_int8.config, deq(w), bundled_int8.tokenizer, kv_dtype="f32")


@pytest.mark.parametrize("T", [1, 5, 40, 400])
def test_moe_block_int8(bundled_int8, act, T):
    """Routed experts as views of the stacked int8 buffers, and the stacked pair itself."""
    lw = next(l for l in bundled_int8.weights.layers if l.moe is not None)
    m, cfg = lw.moe, bundled_int8._moe_cfg
    st = stacked_experts(m.experts)
    assert st is not None and st[0].shape == (16, 96, 256) and st[1].shape == (16, 256, 48)
    x = np.random.default_rng(T).standard_normal((T, 256)).astype(np.float32)
    trip = lambda e: (e.gate_proj, e.up_proj, e.down_proj)  # noqa: E731
    out, ids, wts = ops.moe_block(x, m.gate, [trip(e) for e in m.experts], trip(m.shared), cfg,
                                  return_routing=True)
    stacked = ops.moe_block(x, m.gate, ops.StackedExperts(*st), trip(m.shared), cfg)
    for tab in (ops.moe.moe_expert_table([trip(e) for e in m.experts]), ops.moe.moe_expert_table(ops.StackedExperts(*st))):
        np.testing.assert_array_equal(ops.moe_block(x, m.gate, tab, trip(m.shared), cfg), out)
    # float64 reference with the same routing; activations quantize per row, so the
    # model runs token by token.  Experts' down_proj (48 columns, group 16) and gate/up
    # (group 32) take int16 activations in "int16" mode when an expert has <= MLP_MAX_T
    # tokens (row-dot path; more tokens: sgemm on dequantized panels, with gate and up
    # fused as one matrix - the stacked int8 layout), the shared expert when T <= MLP_MAX_T.
    on = act16_on(act, 16, dsv2ext.get_isa())
    count = np.bincount(ids.reshape(-1), minlength=16)
    if T == 400:
        assert count.max() > MLP_MAX_T  # the sgemm path is exercised
    lim_e, lim_s = mlp_row_dot_max(*trip(m.experts[0])), mlp_row_dot_max(*trip(m.shared))
    ref = np.zeros((T, 256))
    for t in range(T):
        xt = x[t:t + 1]
        for e, wt in zip(ids[t], wts[t]):
            ref[t] += wt * swiglu_reference(xt, *trip(m.experts[e]), on and count[e] <= lim_e)[0]
        ref[t] += swiglu_reference(xt, *trip(m.shared), on and T <= lim_s)[0]
    assert max_rel_err(out, ref) <= KTOL
    assert max_rel_err(stacked, ref) <= KTOL
    fp = ops.moe_block(x, m.gate, [tuple(map(dequantize, trip(e))) for e in m.experts],
                       tuple(map(dequantize, trip(m.shared))), cfg)
    assert max_rel_err(out, fp) <= (2e-4 if on else KTOL)


def test_quantize_model_weights_policy(bundled, bundled_int8):
    src, w = bundled.weights, bundled_int8.weights
    assert w.embed_tokens is src.embed_tokens and w.norm is src.norm
    assert isinstance(w.lm_head, Int8Weight) and w.lm_head.group == 32
    for ls, lq in zip(src.layers, w.layers):
        assert lq.input_layernorm is ls.input_layernorm
        for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert isinstance(getattr(lq.attn, name), Int8Weight), name
        assert lq.attn.kv_a_layernorm is ls.attn.kv_a_layernorm
        if lq.moe is not None:
            assert lq.moe.gate is ls.moe.gate            # the router keeps its dtype
            assert lq.moe.experts[3].down_proj.group == 16  # 48 columns: gcd(48, 32)
            assert isinstance(lq.moe.shared.down_proj, Int8Weight) and lq.moe.shared.down_proj.group == 32
        else:
            assert isinstance(lq.mlp.down_proj, Int8Weight)
    # the input is left as it was; quantizing twice keeps the int8 weights
    assert isinstance(src.layers[0].attn.o_proj, BF16)
    again = quantize_model_weights(w)
    assert again.lm_head is w.lm_head


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


def test_model_int8_matches_dequantized_fp32(bundled_int8, bundled_deq, act):
    ids = bundled_int8.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    got = _decode_logits(bundled_int8, ids, 6)
    want = _decode_logits(bundled_deq, ids, 6)
    for g, w in zip(got, want):
        assert max_rel_err(g, w) <= LOGIT_TOL


def test_save_and_reload(bundled, bundled_int8, tmp_path):
    d = save_quantized(bundled, tmp_path / "q8")
    qc = read_quantization_config(d)
    assert qc["quant_method"] == "dsv2ext-int8" and qc["group_size"] == 32
    assert os.path.isfile(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "dsv2ext-int8"
    for dt in (None, "int8"):
        m = dsv2ext.load(d, dtype=dt, kv_dtype="f32")  # as bundled_int8: compares the weights
        w = m.weights
        assert isinstance(w.lm_head, Int8Weight) and not w.lm_head.data.flags.writeable  # memory-mapped
        same_bits(w.lm_head, bundled_int8.weights.lm_head)
        same_bits(w.layers[2].moe.experts[5].down_proj, bundled_int8.weights.layers[2].moe.experts[5].down_proj)
        assert isinstance(w.embed_tokens, BF16) and isinstance(w.layers[1].moe.gate, BF16)
        ids = list(range(5, 40))
        np.testing.assert_array_equal(m.logits(ids), bundled_int8.logits(ids))
        assert m.info()["dtype"] == "int8"
        m.close()
    m = dsv2ext.load(d, dtype="f32")
    np.testing.assert_array_equal(m.weights.lm_head, dequantize(bundled_int8.weights.lm_head))
    m.close()
    with pytest.raises(ValueError, match="loaded from"):
        save_quantized(dsv2ext.load(d), d)


def test_load_quantized_errors(bundled, tmp_path):
    d = save_quantized(bundled, tmp_path / "q8")
    from dsv2ext.safetensors import save_file
    r = CheckpointReader(d)
    tensors = {n: r.get(n) for n in r.names()}
    r.close()
    # scales of the wrong shape
    name = "model.layers.0.self_attn.o_proj.weight"
    bad = dict(tensors)
    bad[name + ".scales"] = np.ones((256, 3), np.float32)
    save_file(bad, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight\.scales"):
        dsv2ext.load(d)
    # scales missing
    bad = dict(tensors)
    del bad[name + ".scales"]
    save_file(bad, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no 'model.layers.0.self_attn.o_proj.weight.scales'"):
        dsv2ext.load(d)
    r = CheckpointReader(bundled.path)
    assert load_quantized_tensor(r, name) is None   # not int8: loaded the usual way
    r.close()
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["group_size"] = "32"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="group_size"):
        read_quantization_config(d)


def test_load_int8_from_bf16_checkpoint(bundled_int8):
    m = dsv2ext.load(dtype="int8")
    same_bits(m.weights.lm_head, bundled_int8.weights.lm_head)
    same_bits(m.weights.layers[3].attn.kv_b_proj, bundled_int8.weights.layers[3].attn.kv_b_proj)
    # the bf16 source pages were released from the resident set, not from the file
    np.testing.assert_array_equal(m.weights.embed_tokens.data[7], bundled_int8.weights.embed_tokens.data[7])
    with pytest.raises(ValueError, match="dtype"):
        dsv2ext.load(dtype="int3")
    m.close()


def test_perplexity_int8_within_1_percent(bundled, bundled_int8):
    """A slice of the held-out sample (the full sample: bf16 9.6922, int8 9.6919)."""
    from dsv2ext.perplexity import perplexity

    with open(os.path.join(bundled.path, "heldout_sample.json"), encoding="utf-8") as f:
        texts = [d["text"] for d in json.load(f)]
    ids = [bundled.encode(t)[:384] for t in texts[:6]]
    p16 = perplexity(bundled, token_ids=ids, window=384).perplexity
    p8 = perplexity(bundled_int8, token_ids=ids, window=384).perplexity
    assert abs(p8 / p16 - 1) < 0.01, (p16, p8)


def test_expert_table_checks(bundled_int8):
    from dsv2ext.ops.moe import ExpertTable, moe_expert_table

    lw = next(l for l in bundled_int8.weights.layers if l.moe is not None)
    m, cfg = lw.moe, bundled_int8._moe_cfg
    trip = lambda e: (e.gate_proj, e.up_proj, e.down_proj)  # noqa: E731
    tab = moe_expert_table([trip(e) for e in m.experts])
    assert isinstance(tab, ExpertTable) and (len(tab), tab.hidden_size, tab.intermediate_size) == (16, 256, 48)
    assert moe_expert_table(tab) is tab
    x = np.ones((2, 256), np.float32)
    ids = np.zeros((2, 2), np.int64)
    w = np.ones((2, 2), np.float32)
    ref = ops.moe_experts(x, ids, w, [trip(e) for e in m.experts], trip(m.shared))
    np.testing.assert_array_equal(ops.moe_experts(x, ids, w, tab, trip(m.shared)), ref)
    small = moe_expert_table([trip(e) for e in m.experts[:8]])
    with pytest.raises(ValueError, match="8 experts, expected 16"):
        ops.moe_block(x, m.gate, small, trip(m.shared), cfg)
    with pytest.raises(ValueError, match="hidden size"):
        ops.moe_experts(np.ones((2, 128), np.float32), ids, w, tab, None, n_experts=16)
    with pytest.raises(ValueError, match="hidden size"):
        moe_expert_table([trip(e) for e in m.experts[:2]] + [(rand_w((48, 128), 0), rand_w((48, 128), 1),
                                                              rand_w((128, 48), 2))])
    with pytest.raises(ValueError, match="must not share memory"):
        e0 = m.experts[0].gate_proj
        out = np.frombuffer(e0.data, np.float32).reshape(-1)[:512].reshape(2, 256)  # aliases expert 0's weights
        ops.moe_block(x, m.gate, tab, None, cfg, out=out)


@pytest.mark.parametrize("kv_b_kind", ["f32", "bf16", "int8"])
def test_absorbed_decode_split_by_heads(kv_b_kind):
    """Decode at a short context: the attention work is split by heads over the threads
    (and the absorbed query computed one head per work item); identical for 1, 2, 3
    threads and equal to the non-absorbed form."""
    rng = np.random.default_rng(5)
    H, nope, rope, v, L = 16, 32, 16, 32, 64
    cache = rng.standard_normal((2, 50, L + rope)).astype(np.float32)
    w = (rng.standard_normal((H * (nope + v), L)) / 8).astype(np.float32)
    kv_b = {"f32": w, "bf16": BF16.from_float32(w), "int8": quantize_int8(w, 32)}[kv_b_kind]
    q = rng.standard_normal((1, H, nope + rope)).astype(np.float32)
    seq, pos = np.array([1]), np.array([37])
    outs, prev = [], dsv2ext.get_num_threads()
    for n in (1, 2, 3):
        dsv2ext.set_num_threads(n)
        outs.append(ops.mla_attention_absorbed(q, cache, seq, pos, kv_b, 0.2))
    dsv2ext.set_num_threads(prev)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    ref = ops.mla_attention_decompressed(q, cache, seq, pos, kv_b, 0.2)
    assert max_rel_err(outs[0], ref) <= KTOL
