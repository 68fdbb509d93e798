"""RMSNorm and linear kernels against torch / transformers (fp32 reference).

Tolerance: max |err| <= 1e-5 * max |reference| (fp32).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext import BF16, ops
from conftest import max_rel_err

TOL = 1e-5


@pytest.mark.parametrize("T,d", [(1, 16), (3, 100), (7, 512), (5, 2048)])
@pytest.mark.parametrize("wdtype", ["f32", "bf16"])
def test_rmsnorm_matches_transformers(T, d, wdtype, isa):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    rng = np.random.default_rng(T * 1000 + d)
    x = (rng.standard_normal((T, d)) * 3).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)
    if wdtype == "bf16":
        wq = BF16.from_float32(w)
        w_ref, w_arg = wq.to_float32(), wq
    else:
        w_ref, w_arg = w, w
    mod = DeepseekV2RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(w_ref))
        ref = mod(torch.from_numpy(x)).numpy()
    got = ops.rms_norm(x, w_arg, 1e-6)
    assert max_rel_err(got, ref) <= TOL


def test_rmsnorm_in_place():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w = np.ones(64, np.float32)
    ref = ops.rms_norm(x, w)
    ops.rms_norm(x, w, out=x)
    np.testing.assert_array_equal(x, ref)


@pytest.mark.parametrize("T,d", [(1, 16), (3, 100), (64, 100), (5, 2048)])
@pytest.mark.parametrize("wdtype", ["f32", "bf16"])
def test_rmsnorm_residual_is_add_then_norm(T, d, wdtype):
    """rms_norm(h, w, residual=r): h += r in place, then the norm of the sum: bit for bit the
    numbers of numpy's float32 add followed by rms_norm (also with out=h and several threads)."""
    rng = np.random.default_rng(T + d)
    h0 = (rng.standard_normal((T, d)) * 3).astype(np.float32)
    r = (rng.standard_normal((T, d)) * 2).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)
    w_arg = BF16.from_float32(w) if wdtype == "bf16" else w
    h_ref = h0 + r
    ref = ops.rms_norm(h_ref, w_arg, 1e-6)
    n = dsv2ext.get_num_threads()
    try:
        for nt in (1, 2, 3):
            dsv2ext.set_num_threads(nt)
            h = h0.copy()
            got = ops.rms_norm(h, w_arg, 1e-6, residual=r)
            np.testing.assert_array_equal(h, h_ref)
            np.testing.assert_array_equal(got, ref)
            h = h0.copy()
            ops.rms_norm(h, w_arg, 1e-6, out=h, residual=r)
            np.testing.assert_array_equal(h, ref)
    finally:
        dsv2ext.set_num_threads(n)


def test_rmsnorm_residual_bad_arguments():
    x = np.ones((3, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, w, residual=np.ones((3, 9), np.float32))
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, w, residual=x)  # shares memory with x
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, w, out=out, residual=out)
    with pytest.raises(TypeError, match="residual"):
        ops.rms_norm(x, w, residual=np.ones((3, 8), np.float64))
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="x"):
        ops.rms_norm(ro, w, residual=np.ones((3, 8), np.float32))  # x is written
    np.testing.assert_array_equal(x, 1.0)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 64])
@pytest.mark.parametrize("N,K", [(1, 1), (37, 100), (256, 2048), (1408, 2048)])
@pytest.mark.parametrize("wdtype", ["f32", "bf16"])
def test_linear_matches_torch(T, N, K, wdtype):
    rng = np.random.default_rng(T + N + K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    if wdtype == "bf16":
        wq = BF16.from_float32(w)
        w_ref, w_arg = wq.to_float32(), wq
    else:
        w_ref, w_arg = w, w
    ref = torch.nn.functional.linear(torch.from_numpy(x).double(), torch.from_numpy(w_ref).double()).numpy()
    got = ops.linear(x, w_arg)
    assert got.shape == (T, N) and got.dtype == np.float32
    assert max_rel_err(got, ref) <= TOL


@pytest.mark.parametrize("T", [1, 3, 6, 20])
@pytest.mark.parametrize("K", [17, 64, 1000])
def test_linear_every_isa(T, K, isa):
    rng = np.random.default_rng(K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal((33, K)).astype(np.float32)
    wq = BF16.from_float32(w)
    for warg, wref in ((w, w), (wq, wq.to_float32())):
        ref = x.astype(np.float64) @ wref.astype(np.float64).T
        assert max_rel_err(ops.linear(x, warg), ref) <= TOL


@pytest.mark.parametrize("T", [9, 16, 257, 300])
@pytest.mark.parametrize("N,K", [(37, 100), (40, 50), (576, 2048)])
def test_linear_bf16_many_rows(T, N, K):
    """bf16 weights with 9+ activation rows: on AVX-512 the even|odd row-dot kernels (activations
    re-laid once per chunk of 256 rows; K % 32 tails in place), elsewhere sgemm on widened panels."""
    rng = np.random.default_rng(T * 7 + K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    wq = BF16.from_float32((rng.standard_normal((N, K)) * 0.05).astype(np.float32))
    ref = x.astype(np.float64) @ wq.to_float32().astype(np.float64).T
    x_before = x.copy()
    outs = []
    n = dsv2ext.get_num_threads()
    try:
        for t in (1, 2, 3):
            dsv2ext.set_num_threads(t)
            outs.append(ops.linear(x, wq))
    finally:
        dsv2ext.set_num_threads(n)
    assert max_rel_err(outs[0], ref) <= TOL
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    np.testing.assert_array_equal(x, x_before)  # the input is not re-laid in place
    prev = dsv2ext.get_isa()
    try:
        dsv2ext.set_isa("avx2")
        assert max_rel_err(ops.linear(x, wq), ref) <= TOL
    finally:
        dsv2ext.set_isa(prev)


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 1e3
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(BF16.from_float32(x).data, ref)


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2048)).astype(np.float32)
    w = BF16.from_float32(rng.standard_normal((1000, 2048)).astype(np.float32))
    n = dsv2ext.get_num_threads()
    try:
        dsv2ext.set_num_threads(1)
        a = ops.linear(x, w)
        dsv2ext.set_num_threads(2)
        b = ops.linear(x, w)
    finally:
        dsv2ext.set_num_threads(n)
    np.testing.assert_array_equal(a, b)


def test_chunks_per_thread_do_not_change_results():
    """Regions cut into 1, 3, 7 or the automatic number of chunks per thread, at 1-3 threads: a
    whole decode and prefill of the bundled model (every kernel family it runs) gives the same bits."""
    model = dsv2ext.load()
    ids = np.random.default_rng(3).integers(5, 1000, size=40).astype(np.int64)

    def run():
        cache = model.new_cache(1, 48)
        a = model.forward(ids, np.zeros(40, np.int64), np.arange(40, dtype=np.int64), cache)
        b = model.forward(ids[:1], np.zeros(1, np.int64), np.array([40], np.int64), cache)
        return np.concatenate([a.ravel(), b.ravel()])

    n = dsv2ext.get_num_threads()
    try:
        dsv2ext.set_num_threads(1)
        ref = run()
        for threads in (2, 3):
            dsv2ext.set_num_threads(threads)
            for c in (1, 3, 7, None):
                dsv2ext.set_chunks_per_thread(c)
                assert dsv2ext.get_chunks_per_thread() == (c or threads)
                np.testing.assert_array_equal(run(), ref)
    finally:
        dsv2ext.set_chunks_per_thread(None)
        dsv2ext.set_num_threads(n)
    dsv2ext.set_num_threads(16)
    try:
        assert dsv2ext.get_chunks_per_thread() == 16  # automatic: min(threads, 16)
    finally:
        dsv2ext.set_num_threads(n)
    with pytest.raises(ValueError, match="n: expected 1..64"):
        dsv2ext.set_chunks_per_thread(0)
    with pytest.raises(ValueError, match="n: expected 1..64"):
        dsv2ext.set_chunks_per_thread(65)
    with pytest.raises(TypeError, match="n: expected an int"):
        dsv2ext.set_chunks_per_thread(2.0)


# ---------------------------------------------------------------- bad input
def _x(T=2, K=8):
    return np.ones((T, K), np.float32)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.linear(_x().astype(np.float64), np.ones((3, 8), np.float32)), TypeError, "x"),
        (lambda: ops.linear(_x(), np.ones((3, 8), np.float64)), TypeError, "weight"),
        (lambda: ops.linear(_x(), np.ones((3, 8), np.uint16)), TypeError, "BF16"),
        (lambda: ops.linear(_x(), np.ones((3, 9), np.float32)), ValueError, "weight"),
        (lambda: ops.linear(_x(), np.ones((3, 8, 1), np.float32)), ValueError, "weight"),
        (lambda: ops.linear(np.ones((2, 16), np.float32)[:, ::2], np.ones((3, 8), np.float32)), ValueError, "contiguous"),
        (lambda: ops.linear(_x(), np.ones((3, 8), np.float32), out=np.ones((2, 4), np.float32)), ValueError, "out"),
        (lambda: ops.linear(np.ones((0, 8), np.float32), np.ones((3, 8), np.float32)), ValueError, "empty"),
        (lambda: ops.linear([[1.0]], np.ones((3, 8), np.float32)), TypeError, "x"),
        (lambda: ops.linear(_x(), "w"), TypeError, "weight"),
        (lambda: ops.rms_norm(_x(), np.ones(7, np.float32)), ValueError, "weight"),
        (lambda: ops.rms_norm(_x(), np.ones(8, np.float32), eps=-1.0), ValueError, "eps"),
        (lambda: dsv2ext.set_num_threads(0), ValueError, "n"),
        (lambda: dsv2ext.set_isa("sse"), ValueError, "isa"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_misaligned_and_readonly():
    buf = np.zeros(2 * 8 * 4 + 1, np.uint8)
    x = np.frombuffer(buf.data, dtype=np.float32, count=16, offset=1).reshape(2, 8)
    with pytest.raises(ValueError, match="aligned"):
        ops.linear(x, np.ones((3, 8), np.float32))
    out = np.zeros((2, 3), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        ops.linear(_x(), np.ones((3, 8), np.float32), out=out)
    x = _x()
    with pytest.raises(ValueError, match="share memory"):
        ops.linear(x, np.ones((8, 8), np.float32), out=x)
