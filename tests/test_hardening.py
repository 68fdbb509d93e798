"""Hardening: every public entry point turns bad input into a clear exception, never a crash.

* Raw ``dsv2ext._C`` functions: wrong argument counts, keywords, and every argument of a
  valid call replaced in turn by ~40 bad values (None, wrong types, huge / negative ints,
  NaN, arrays of the wrong dtype / byte order / rank / shape / layout / alignment,
  read-only, empty, zero-stride views claiming 2**80 elements, out-of-range indices,
  other arguments of the same call, forged dtype-tagged weights).  Each call must either
  succeed or raise TypeError / ValueError / OverflowError.
* ``dsv2ext.ops`` wrappers: each failure class raises the documented exception naming the
  argument (table-driven over every kernel).
* Model level: token ids out of range, positions past the cache, ``max_new_tokens`` past the
  context, unknown config values, and the NaN/Inf policy (see ``dsv2ext.ops`` docstrings):
  kernels propagate NaN/Inf of the activations and weights; non-finite router logits raise
  ``dsv2ext.ops.NonFiniteError`` (a ValueError and a FloatingPointError); ``generate``
  raises FloatingPointError on NaN or +Inf logits.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest

import dsv2ext
from dsv2ext import BF16, _C, ops
from dsv2ext.config import ConfigError, ModelConfig
from dsv2ext.dtypes import float32_to_bf16_bits
from harden_cases import (D, E, K, S_MAX, RawCall, f32, huge_zero_stride, misaligned, mla_config,
                          mla_weights, moe_weights, op_calls, raw_calls, ref_linear,
                          tiny_model_dict, write_tiny_checkpoint)

ALLOWED = (TypeError, ValueError, OverflowError)


# =============================================================================== raw _C

def _c_functions():
    return sorted(n for n in dir(_C) if not n.startswith("_") and callable(getattr(_C, n))
                  and not isinstance(getattr(_C, n), type))


@pytest.mark.parametrize("name", _c_functions())
def test_raw_wrong_argument_count_and_keywords(name):
    fn = getattr(_C, name)
    with pytest.raises(TypeError):
        fn(*([None] * 40))
    with pytest.raises(TypeError):
        fn(bogus_keyword=1)
    try:
        fn()  # functions without arguments succeed, the others raise TypeError
    except TypeError:
        pass


class _Tagged:
    """A forged dtype-tagged weight."""

    def __init__(self, tag, data=None, scales=None, raise_on_data=False):
        self.__dsv2_dtype__ = tag
        self._data, self._scales, self._raise = data, scales, raise_on_data

    @property
    def data(self):
        if self._raise:
            raise RuntimeError("data property failed")
        if self._data is None:
            raise AttributeError("data")
        return self._data.copy()  # a fresh temporary on every access

    @property
    def scales(self):
        if self._scales is None:
            raise AttributeError("scales")
        return self._scales

    @property
    def shape(self):
        return None if self._data is None else self._data.shape


def _variants(v, others):
    """Bad (or odd) replacements for argument value ``v``."""
    out = [None, "bogus", b"x", object(), 2**64, -2**63 - 1, -1, 0, 2**31, 2**62, float("nan"),
           float("inf"), -1.0, 1e300, [1.0, 2.0], (), True, "\udc80", "a\0b"]
    if isinstance(v, np.ndarray):
        nd = v.ndim
        ro = v.copy()
        ro.flags.writeable = False
        out += [v.astype(np.float64), v.astype(np.int32), v.astype(v.dtype.newbyteorder()), ro,
                misaligned(v), np.empty((0,) + v.shape[1:], v.dtype), v[None].copy(), v.reshape(-1).copy(),
                np.concatenate([v, v]), np.zeros((), v.dtype), huge_zero_stride(v.dtype, nd),
                np.zeros(v.shape[:-1] + (v.shape[-1] + 1,), v.dtype)]
        if v.shape[-1] >= 2:
            out.append(np.repeat(v, 2, axis=-1)[..., ::2])  # right shape, not contiguous
        if nd >= 2:
            out += [np.asfortranarray(np.concatenate([v, v], -1)[..., : v.shape[-1]]), v[:1].copy()]
        if v.dtype == np.float32:
            out += [BF16(float32_to_bf16_bits(v)), v.view(np.uint16), np.full_like(v, np.nan),
                    np.full_like(v, np.inf), _Tagged("bf16", v), _Tagged("bf16", float32_to_bf16_bits(v)),
                    _Tagged("int8", v.astype(np.int8)), _Tagged("int8", v.astype(np.int8), np.ones((1,) * nd)),
                    _Tagged("int8", v.astype(np.int8), np.ones(v.shape[:-1] + (3,), np.float32)),
                    _Tagged("fp4", v), _Tagged(5, v), _Tagged("bf16"), _Tagged("bf16", raise_on_data=True)]
        if v.dtype == np.int64:
            out += [v + 1000, v * 0 - 1, np.full_like(v, 2**62), np.full_like(v, -2**63), v.astype(np.uint64)]
        out += [o for o in others if isinstance(o, np.ndarray) and o is not v]  # aliasing
    if isinstance(v, (list, tuple)) and v:
        out += [list(v)[:-1], list(v) + [v[-1]], [None] * len(v), tuple(v), iter(v), {"a": 1},
                [np.zeros((2, 2), np.float32)] * len(v)]
        if isinstance(v[0], (list, tuple)):
            out += [[v[0][:2]] + list(v[1:]), [None] + list(v[1:]), [list(reversed(v[0]))] + list(v[1:])]
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # casts of NaN-filled variants
@pytest.mark.parametrize("call", raw_calls(), ids=lambda c: c.name)
def test_raw_every_argument_replaced(call: RawCall):
    """Replacing any one argument of a valid raw call never crashes: success or a clean error."""
    call()
    if call.restore:
        call.restore()
    n_calls, errors, unexpected = 0, 0, []
    for i, v in enumerate(call.args):
        for bad in _variants(v, call.args):
            args = list(call.args)
            args[i] = bad
            try:
                call(args)
            except ALLOWED:
                errors += 1
            except RuntimeError as e:
                if "data property failed" not in str(e):  # the forged weight's own exception
                    unexpected.append((i, repr(bad)[:60], repr(e)))
            except Exception as e:  # noqa: BLE001 - the point is to list anything else
                unexpected.append((i, repr(bad)[:60], repr(e)))
            finally:
                if call.restore:
                    call.restore()
            n_calls += 1
    assert not unexpected, f"{call.name}: unexpected exception types: {unexpected[:5]}"
    assert n_calls == 0 or errors > 0


def test_raw_temporary_tagged_data_is_kept_alive():
    """A weight whose .data is computed on access (a temporary) is used safely (no use-after-free)."""
    w = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    bits = float32_to_bf16_bits(w)
    fake = _Tagged("bf16", bits)  # .data returns a fresh copy each time
    x = np.ones((3, 256), np.float32)
    out = np.empty((3, 512), np.float32)
    for _ in range(20):
        _C.linear(out, x, fake)
        np.testing.assert_allclose(out, ref_linear(x, BF16(bits).to_float32()), rtol=1e-5, atol=1e-4)


def test_raw_tagged_weight_errors_name_the_argument():
    x = np.ones((2, 8), np.float32)
    out = np.empty((2, 4), np.float32)
    with pytest.raises(TypeError, match="weight"):
        _C.linear(out, x, _Tagged("bf16"))  # no .data
    with pytest.raises(TypeError, match="weight.data"):
        _C.linear(out, x, _Tagged("bf16", np.ones((4, 8), np.float32)))
    with pytest.raises(TypeError, match="weight"):
        _C.linear(out, x, _Tagged("int8", np.ones((4, 8), np.int8)))  # no .scales
    with pytest.raises(TypeError, match="unsupported weight dtype tag"):
        _C.linear(out, x, _Tagged("fp4", np.ones((4, 8), np.uint8)))
    with pytest.raises(ValueError, match="weight.scales"):
        _C.linear(out, x, _Tagged("int8", np.ones((4, 8), np.int8), np.ones((4, 3), np.float32)))


# =============================================================================== ops wrappers

def _cases():
    return {c.name: c for c in op_calls()}


# (op, argument index, argument name in the message, bad value builder, exception)
def _bad_arg_table():
    rows = []
    c = _cases()
    arr_args = {  # op -> [(index, name)] of its array arguments
        "rms_norm": [(0, "x"), (1, "weight")],
        "linear": [(0, "x"), (1, "weight")],
        "apply_rope": [(0, "x"), (1, "positions"), (2, "inv_freq")],
        "mla_attention": [(0, "q"), (1, "cache"), (2, "seq_ids"), (3, "positions"), (4, "kv_b_proj")],
        "mla_attention_absorbed": [(0, "q"), (1, "cache"), (2, "seq_ids"), (3, "positions"), (4, "kv_b_proj")],
        "mla_attention_decompressed": [(0, "q"), (1, "cache"), (2, "seq_ids"), (3, "positions"),
                                       (4, "kv_b_proj")],
        "mla_compress_kv": [(0, "hidden"), (1, "kv_a_proj_with_mqa"), (3, "cache"), (4, "seq_ids"),
                            (5, "positions"), (6, "inv_freq")],
        "mla_attention_block": [(0, "hidden"), (3, "cache"), (4, "seq_ids"), (5, "positions")],
        "moe_route": [(0, "x"), (1, "router_weight")],
        "moe_dispatch": [(0, "ids")],
        "moe_combine": [(0, "expert_out"), (1, "order"), (2, "weights")],
        "swiglu_mlp": [(0, "x"), (1, "gate"), (2, "up"), (3, "down")],
        "moe_experts": [(0, "x"), (1, "ids"), (2, "weights")],
        "moe_block": [(0, "x"), (1, "router_weight")],
    }
    for op, args in arr_args.items():
        for i, name in args:
            v = c[op].args[i]
            other = np.float64 if v.dtype != np.float64 else np.float32
            rows += [
                (op, i, name, "dtype", lambda v=v, o=other: v.astype(o), TypeError),
                (op, i, name, "byteorder", lambda v=v: v.astype(v.dtype.newbyteorder()), TypeError),
                (op, i, name, "list", lambda v=v: v.tolist(), TypeError),
                (op, i, name, "rank", lambda v=v: v[None].copy(), ValueError),
                (op, i, name, "strides", lambda v=v: np.repeat(v, 2, axis=-1)[..., ::2], ValueError),
                (op, i, name, "alignment", lambda v=v: misaligned(v), ValueError),
                (op, i, name, "empty", lambda v=v: np.empty((0,) + v.shape[1:], v.dtype), ValueError),
                (op, i, name, "overflow", lambda v=v: huge_zero_stride(v.dtype, v.ndim), ValueError),
            ]
            # shape: the message names whichever argument disagrees with the sizes taken from the others
            free = {("apply_rope", "x"), ("mla_attention", "q"), ("mla_attention_absorbed", "q"),
                    ("mla_attention_decompressed", "q"), ("moe_dispatch", "ids"),
                    ("moe_combine", "expert_out")}  # any last size is valid there
            if v.shape[-1] > 1 and (op, name) not in free:
                rows.append((op, i, r"(\w+): (expected shape|row width|.* does not fit|.* expected \d+ \*)", "shape",
                             lambda v=v: np.ascontiguousarray(v[..., :-1]), ValueError))
    return rows


_TABLE = _bad_arg_table()


@pytest.mark.parametrize("op,i,name,kind,make,exc", _TABLE,
                         ids=[f"{r[0]}-{r[2]}-{r[3]}" for r in _TABLE])
def test_ops_bad_argument(op, i, name, kind, make, exc):
    call = _cases()[op]
    if op == "apply_rope" and name == "x" and kind in ("strides",):
        pytest.skip("apply_rope takes strided views by design")
    bad = make()
    if op == "moe_dispatch" and kind == "empty":
        exc = ValueError
    with pytest.raises(exc, match=name):
        call(*[bad if j == i else a for j, a in enumerate(call.args)])


@pytest.mark.parametrize("op", sorted(_cases()))
def test_ops_bad_out(op):
    """out: wrong dtype / shape / layout / read-only / aliasing an input -> error naming ``out``."""
    call = _cases()[op]
    if op in ("moe_route", "moe_dispatch", "apply_rope"):
        pytest.skip("no out argument")
    good = call()
    good = good[0] if isinstance(good, tuple) else good
    ro = np.zeros_like(good)
    ro.flags.writeable = False
    bad_outs = [(good.astype(np.float64), TypeError), (np.zeros(good.shape[:-1] + (good.shape[-1] + 1,),
                                                               np.float32), ValueError),
                (misaligned(good), ValueError), (ro, ValueError),
                (np.repeat(good, 2, axis=-1)[..., ::2], ValueError)]
    for out, exc in bad_outs:
        with pytest.raises(exc, match="out"):
            call(out=out)
    x = call.args[0]
    if x.shape == good.shape and op != "rms_norm":  # the output may not share memory with an input (rms_norm: may be x)
        with pytest.raises(ValueError, match="share memory|must not"):
            call(out=x)


def test_ops_zero_stride_huge_views_rejected_before_allocation():
    """Views claiming ~2**57 elements are refused as non-contiguous, never allocated for."""
    rng = np.random.default_rng(1)
    x, w = f32(rng, 2, D), f32(rng, 16, D)
    huge, huge1 = huge_zero_stride(np.float32, 2), huge_zero_stride(np.float32, 1)
    for fn, args in [(ops.rms_norm, (huge, huge1)), (ops.rms_norm, (x, huge1)),
                     (ops.linear, (huge, w)), (ops.linear, (x, huge)), (ops.linear, (x, BF16(huge_zero_stride(np.uint16)))),
                     (ops.swiglu_mlp, (huge, w, w, w.T.copy())), (ops.swiglu_mlp, (x, huge, huge, huge)),
                     (ops.moe_combine, (huge, np.zeros(4, np.int64), np.ones((2, 2), np.float32))),
                     (ops.moe_combine, (np.ones((4, D), np.float32), np.arange(4), huge)),
                     (ops.moe_route, (huge, w[:4], ops.MoEConfig(n_routed_experts=4, num_experts_per_tok=2)))]:
        with pytest.raises(ValueError, match="contiguous|expected shape"):
            fn(*args)
    with pytest.raises(ValueError, match="contiguous"):
        ops.moe_dispatch(huge_zero_stride(np.int64, 2), 4)


def test_c_size_arithmetic_cannot_overflow():
    """Scalar sizes whose products exceed int64 are refused before any arithmetic."""
    rng = np.random.default_rng(2)
    mw = mla_weights(rng)
    x, cache = f32(rng, 2, D), np.zeros((1, S_MAX, 20), np.float32)
    seq, pos = np.zeros(2, np.int64), np.arange(2, dtype=np.int64)
    inv = mla_config().inv_freq

    def block(Hh, nope, rope, v, Lr, ql, qp=mw.q_proj, kvb=mw.kv_b_proj, o=mw.o_proj):
        _C.mla_attention_block(np.empty_like(x), x, cache, seq, pos, inv, qp, None, None, None,
                               mw.kv_a_proj_with_mqa, mw.kv_a_layernorm, kvb, o, Hh, nope, rope, v, Lr, ql,
                               1e-6, 0.1, 1.0, True, 0)

    # H * (nope + rope) wraps to 16 in int64 and would match a 16-row q_proj: must be refused
    wrap = 2**62 + 2
    with pytest.raises(ValueError, match="qk_nope_head_dim"):
        block(4, wrap, 2, 2, 8, 0, qp=np.ones((16, D), np.float32), kvb=np.ones((16, 8), np.float32),
              o=np.ones((D, 8), np.float32))
    for args in [(2**40, 8, 4, 8, 16, 0), (2, 2**40, 4, 8, 16, 0), (2, 8, 2**40, 8, 16, 0), (2, 8, 4, 2**40, 16, 0),
                 (2, 8, 4, 8, 2**40, 0), (2, 8, 4, 8, 16, 2**40), (2**62, 2**62, 4, 8, 16, 0)]:
        with pytest.raises(ValueError):
            block(*args)
    for args in [(2**63, 8, 4, 8, 16, 0), (-2**63 - 1, 8, 4, 8, 16, 0)]:
        with pytest.raises(OverflowError):
            block(*args)
    # MoE: experts / top-k / groups far beyond the arrays
    mo = moe_weights(rng)
    out = np.empty_like(x)
    ids, w = np.zeros((2, K), np.int64), np.ones((2, K), np.float32)
    for E_bad in (2**62, 2**63 - 1):
        with pytest.raises(ValueError, match="experts"):
            _C.moe_experts(out, x, ids, w, mo["experts"], None, None, E_bad, None)
    for top_k, ng, tg in [(2**62, 1, 1), (2, 2**62, 1), (2, 2, 2**62), (2**31, 2**31, 2**31)]:
        with pytest.raises(ValueError):
            _C.moe_route(np.empty((2, 2), np.int64), np.empty((2, 2), np.float32), x, mo["router"], None,
                         top_k, ng, tg, "group_limited_greedy", "softmax", False, 1.0)
    assert math.isfinite(_C.mla_flops(True, 2**62, 2**62, 2**62, 2**62, 2**62, 2**62, 2**62, 2**62))


def test_ops_index_and_position_ranges():
    c = _cases()
    q, cache, seq, pos, kvb, sc = c["mla_attention"].args
    for p, s in [(S_MAX, 0), (-1, 0), (2**62, 0), (0, 2), (0, -1), (0, 2**62)]:
        badpos, badseq = pos.copy(), seq.copy()
        badpos[1], badseq[1] = p, s
        name = "positions" if (p < 0 or p >= S_MAX) else "seq_ids"
        with pytest.raises(ValueError, match=name):
            ops.mla_attention(q, cache, badseq, badpos, kvb, sc)
        blk = c["mla_attention_block"].args
        with pytest.raises(ValueError, match=name):
            ops.mla_attention_block(blk[0], blk[1], blk[2], blk[3], badseq, badpos)
    with pytest.raises(ValueError, match="positions"):
        ops.apply_rope(c["apply_rope"].args[0], np.array([0, -5, 1], np.int64), c["apply_rope"].args[2])
    ids = c["moe_dispatch"].args[0].copy()
    for bad in (E, -1, 2**62):
        ids[0, 0] = bad
        with pytest.raises(ValueError, match="ids"):
            ops.moe_dispatch(ids, E)
        with pytest.raises(ValueError, match="ids"):
            ops.moe_experts(c["moe_experts"].args[0], ids, *c["moe_experts"].args[2:])
    order = c["moe_combine"].args[1].copy()
    for bad in (len(order), -1):
        o2 = order.copy()
        o2[0] = bad
        with pytest.raises(ValueError, match="order"):
            ops.moe_combine(c["moe_combine"].args[0], o2, c["moe_combine"].args[2])
    o2 = order.copy()
    o2[0] = o2[1]
    with pytest.raises(ValueError, match="order.*repeated"):
        ops.moe_combine(c["moe_combine"].args[0], o2, c["moe_combine"].args[2])


def test_ops_scalar_arguments():
    c = _cases()
    x, w, _ = c["rms_norm"].args
    for eps in (-1e-6, float("nan"), float("inf"), 2.0):
        with pytest.raises(ValueError, match="eps"):
            ops.rms_norm(x, w, eps)
    with pytest.raises((TypeError, ValueError)):
        ops.rms_norm(x, w, "small")
    q, cache, seq, pos, kvb, _ = c["mla_attention"].args
    for sc in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softmax_scale"):
            ops.mla_attention(q, cache, seq, pos, kvb, sc)
    with pytest.raises(ValueError, match="mode"):
        ops.mla_attention(q, cache, seq, pos, kvb, 0.1, mode=3)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="n_experts"):
            ops.moe_dispatch(c["moe_dispatch"].args[0], bad)
    with pytest.raises(ValueError, match="n_routed_experts|num_experts_per_tok"):
        ops.MoEConfig(n_routed_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="topk_method"):
        ops.MoEConfig(n_routed_experts=4, num_experts_per_tok=2, topk_method="top1")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="routed_scaling_factor"):
            ops.MoEConfig(n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=bad)
    with pytest.raises(ValueError, match="dim"):
        ops.rope_inv_freq(2**40)
    with pytest.raises(ValueError, match="threads|n"):
        dsv2ext.set_num_threads(0)
    with pytest.raises(ValueError, match="n"):
        dsv2ext.set_num_threads(10**6)
    with pytest.raises(TypeError):
        dsv2ext.set_num_threads(2.0)
    with pytest.raises(ValueError, match="isa"):
        dsv2ext.set_isa("sse2")


def test_bare_uint16_is_never_bf16():
    x = np.ones((2, D), np.float32)
    u16 = np.ones((8, D), np.uint16)
    with pytest.raises(TypeError, match="BF16"):
        ops.linear(x, u16)
    with pytest.raises(TypeError, match="BF16"):
        ops.rms_norm(x, np.ones(D, np.uint16))


# =============================================================================== NaN / Inf policy

def test_nan_policy_kernels_propagate():
    """NaN/Inf in one token's activations make that token's outputs NaN/Inf, the others exact."""
    for op in ("rms_norm", "linear", "swiglu_mlp", "moe_experts", "mla_attention_absorbed",
               "mla_attention_decompressed", "mla_attention"):
        call = _cases()[op]
        clean = np.array(call(), np.float64)
        x = call.args[0].copy()
        x[1].flat[0] = np.nan
        x[2].flat[1] = np.inf
        got = np.array(call(x), np.float64)
        assert not np.isfinite(got[1]).all(), op
        if op not in ("moe_experts",):  # inf * 0 in SwiGLU may give NaN: only require non-finite
            assert not np.isfinite(got[2]).all(), op
        np.testing.assert_array_equal(got[0], clean[0], err_msg=op)
    # a NaN weight row poisons exactly its output column
    x, w = _cases()["linear"].args
    w = w.copy()
    w[3, 0] = np.nan
    y = ops.linear(x, w)
    assert np.isnan(y[:, 3]).all() and np.isfinite(np.delete(y, 3, axis=1)).all()


def test_nan_policy_router_raises_nonfinite_error():
    c = _cases()
    x, router, cfg = c["moe_route"].args
    for bad in (np.nan, np.inf, -np.inf):
        xb = x.copy()
        xb[1, 3] = bad
        with pytest.raises(ops.NonFiniteError, match="NaN or Inf"):
            ops.moe_route(xb, router, cfg)
        out = np.full_like(xb, 7.0)
        with pytest.raises(ValueError, match="router logits"):
            ops.moe_block(xb, router, c["moe_block"].args[2], c["moe_block"].args[3], cfg, out=out)
        assert (out == 7.0).all()  # nothing written
        with pytest.raises(FloatingPointError):
            ops.moe_block(xb, router, c["moe_block"].args[2], c["moe_block"].args[3], cfg)
    assert issubclass(ops.NonFiniteError, ValueError) and issubclass(ops.NonFiniteError, FloatingPointError)
    with pytest.raises(ValueError, match="correction_bias"):
        ops.moe_route(x, router, ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=K, n_group=2, topk_group=1,
                                               topk_method="noaux_tc", scoring_func="sigmoid"),
                      correction_bias=np.array([0, np.nan, 0, 0], np.float32))
    with pytest.raises(ValueError, match="inv_freq"):
        ops.apply_rope(c["apply_rope"].args[0], c["apply_rope"].args[1], np.array([1.0, np.nan], np.float32))


# =============================================================================== model level

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    write_tiny_checkpoint(path, seed=3)
    return dsv2ext.load(path)


def test_model_token_ids_out_of_range(tiny):
    V = tiny.config.vocab_size
    for bad in ([V], [-1], [0, 2**62], [3, V + 5]):
        with pytest.raises(ValueError, match="token id"):
            tiny.generate(bad, max_new_tokens=1)
        with pytest.raises(ValueError, match="token id"):
            tiny.logits(bad)
    with pytest.raises(TypeError):
        tiny.generate([1.5, 2], max_new_tokens=1)
    with pytest.raises(TypeError):
        tiny.generate([True, 2], max_new_tokens=1)
    with pytest.raises(TypeError):
        tiny.generate(np.array([[1, 2]]), max_new_tokens=1)
    with pytest.raises((ValueError, TypeError)):
        tiny.generate([2**70], max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        tiny.generate([], max_new_tokens=1)
    cache = tiny.new_cache(1, 4)
    with pytest.raises(ValueError, match="token_ids"):
        tiny.forward(np.array([V]), np.zeros(1, np.int64), np.zeros(1, np.int64), cache)


def test_model_positions_past_the_cache(tiny):
    cache = tiny.new_cache(2, 4)
    tok = np.array([3, 4], np.int64)
    for pos, seq, name in [([0, 4], [0, 0], "positions"), ([0, -1], [0, 0], "positions"),
                           ([0, 1], [0, 2], "seq_ids"), ([0, 1], [-1, 0], "seq_ids")]:
        with pytest.raises(ValueError, match=name):
            tiny.forward(tok, np.array(seq), np.array(pos), cache)
    assert all((a == 0).all() for a in cache.arrays())  # rejected before anything was written
    with pytest.raises(ValueError, match="positions"):
        tiny.forward(tok, np.zeros(2, np.int64), np.zeros(3, np.int64), cache)


def test_model_max_new_tokens_past_the_context(tiny):
    ctx = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        tiny.generate([3, 4, 5], max_new_tokens=ctx - 2)
    tiny.generate([3, 4, 5], max_new_tokens=1)
    with pytest.raises(ValueError, match="context"):
        tiny.logits([3] * (ctx + 1))
    for bad in (0, -1, True, 1.5, "8", None, 2**70):
        with pytest.raises((ValueError, TypeError), match="max_new_tokens|context"):
            tiny.generate([3, 4], max_new_tokens=bad)
    for kw in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
               dict(top_k=-1), dict(repetition_penalty=0.0), dict(seed=-1), dict(stop=[""]), dict(stop=5)):
        with pytest.raises((ValueError, TypeError)):
            tiny.generate([3, 4], max_new_tokens=2, **kw)
    with pytest.raises(dsv2ext.TokenizerError):
        tiny.generate("text needs a tokenizer", max_new_tokens=2)
    with pytest.raises(dsv2ext.TokenizerError):
        tiny.chat([{"role": "user", "content": "hi"}])


def test_model_nan_logits_raise_floating_point_error(tiny):
    w = tiny.weights
    lm = np.array(w.lm_head, np.float32)
    lm[5, 0] = np.nan  # one NaN logit
    poisoned = dsv2ext.DeepseekV2(tiny.config, dataclasses.replace(w, lm_head=lm))
    with pytest.raises(FloatingPointError, match="NaN"):
        poisoned.generate([3, 4, 5], max_new_tokens=2)
    lm = np.array(w.lm_head, np.float32)
    lm[6] = 3e38  # one logit overflows to +inf: greedy would pick it silently
    poisoned = dsv2ext.DeepseekV2(tiny.config, dataclasses.replace(w, lm_head=lm))
    for kw in (dict(temperature=0), dict(temperature=0.7, seed=1)):
        with pytest.raises(FloatingPointError, match="Inf"):
            poisoned.generate([3, 4, 5], max_new_tokens=2, **kw)
    emb = np.array(w.embed_tokens, np.float32)
    emb[7, :] = np.inf  # a poisoned token: NaN reaches the MoE router of layer 1
    poisoned = dsv2ext.DeepseekV2(tiny.config, dataclasses.replace(w, embed_tokens=emb))
    with pytest.raises(FloatingPointError):
        poisoned.generate([3, 7, 5], max_new_tokens=2)
    assert poisoned.generate([3, 4, 5], max_new_tokens=2, temperature=0).token_ids == \
        tiny.generate([3, 4, 5], max_new_tokens=2, temperature=0).token_ids


BASE = tiny_model_dict()


@pytest.mark.parametrize("field,value", [
    ("model_type", "llama"), ("model_type", 2), ("hidden_act", "gelu"), ("topk_method", "top1"),
    ("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("scoring_func", "relu"),
    ("rope_parameters", {"rope_type": "longrope", "factor": 2.0}), ("rope_parameters", "yarn"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "truncate": False}),
    ("hidden_size", 0), ("hidden_size", 32.0), ("hidden_size", "32"), ("hidden_size", True),
    ("num_experts_per_tok", 9), ("n_group", 3), ("qk_rope_head_dim", 5), ("rms_norm_eps", -1.0),
    ("rms_norm_eps", float("nan")), ("routed_scaling_factor", float("inf")), ("rope_interleave", False),
    ("attention_bias", True), ("eos_token_id", [1, -2]), ("eos_token_id", "1"),
    ("rms_norm_eps", 10**400), ("routed_scaling_factor", -(10**400)),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10**400}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 10**400, "original_max_position_embeddings": 16}),
    # values the float32 kernels cannot run: refused at load time, not at the first forward
    ("rms_norm_eps", 2.0), ("routed_scaling_factor", 1e39),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e-300}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 10**30}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "mscale_all_dim": 1e300}),
    ("topk_group", 2**63),
])
def test_config_unknown_or_bad_field_value(field, value):
    d = dict(BASE)
    if field == "topk_method" and value == "noaux_tc":
        d["n_group"], d["topk_group"] = 2, 1
    if field == "n_group":
        d["topk_method"] = "group_limited_greedy"
    d[field] = value
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d)
    f = ei.value.field
    assert f is None or f.split(".")[0].split("[")[0] == field or (
        field == "rope_parameters" and (f.startswith("rope") or f == "softmax_scale"))
    assert field.split("_")[0] in str(ei.value) or "rope" in str(ei.value)


@pytest.mark.parametrize("over", [dict(num_hidden_layers=10**9), dict(n_routed_experts=10**8),
                                  dict(first_k_dense_replace=10**9, num_hidden_layers=10**9 + 1)])
def test_config_claiming_huge_counts_fails_fast(tmp_path, over):
    """A config.json claiming 10**9 layers / experts is refused at once, without building 10**9 names."""
    import json
    import time

    write_tiny_checkpoint(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(tiny_model_dict(**over), f)
    t0 = time.perf_counter()
    with pytest.raises(dsv2ext.CheckpointError, match="lacks tensors"):
        dsv2ext.load(str(tmp_path))
    assert time.perf_counter() - t0 < 30.0  # building 10**9 names would take minutes


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "config.json"
    for text in ("{", "[1, 2]", "null", "{\"model_type\": \"deepseek_v2\"}", "[" * 100000 + "]" * 100000):
        p.write_text(text)
        with pytest.raises(ConfigError, match="config.json"):
            ModelConfig.from_json_file(str(p))
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json_file(str(p))


def test_chat_bad_messages():
    m = dsv2ext.load()
    try:
        for bad in ("hello", [{"role": "user"}], [{"role": 1, "content": "x"}], [("user", "x")], None):
            with pytest.raises(TypeError, match="messages"):
                m.chat(bad, max_new_tokens=1)
        with pytest.raises(ValueError, match="context"):
            m.chat([{"role": "user", "content": "hi"}], max_new_tokens=10**6)
    finally:
        m.close()


def test_cli_bad_input_exits_with_a_message(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dsv2ext", *args], capture_output=True, text=True, timeout=120)

    import json

    from dsv2ext.safetensors import save_file
    from harden_cases import tiny_tensors

    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    d = tiny_model_dict(vocab_size=4096)  # the bundled tokenizer's vocabulary
    (nan_dir / "config.json").write_text(json.dumps(d))
    t = tiny_tensors(ModelConfig.from_dict(d))
    t["lm_head.weight"][3, :] = np.nan
    save_file(t, str(nan_dir / "model.safetensors"))
    (nan_dir / "tokenizer.json").write_bytes(
        open(os.path.join(dsv2ext.default_model_path(), "tokenizer.json"), "rb").read())
    r = run("generate", "--model", str(nan_dir), "--max-new-tokens", "2", "x")
    assert r.returncode == 2 and "error:" in r.stderr and "NaN" in r.stderr, r.stderr[-500:]
    write_tiny_checkpoint(str(tmp_path))
    st = tmp_path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])  # truncated
    for args, what in [(("info", str(tmp_path)), "truncated|lies|past the end"),
                       (("generate", "--max-new-tokens", "0", "x"), "max_new_tokens"),
                       (("generate", "--max-new-tokens", "1000000", "x"), "context"),
                       (("generate", "--top-p", "2", "x"), "top_p")]:
        r = run(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-500:])
        assert "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
        assert __import__("re").search(what, r.stderr), r.stderr[-500:]
