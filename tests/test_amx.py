"""AMX tile kernels (csrc/gemm_amx.c): bf16 weights x activations on TDPBF16PS.

Two ways to run them: the CPU's tiles (tests marked ``hw``, skipped where the CPU has no AMX)
and the C emulation of the tiles (amx_tiles.h: the SDM's TDPBF16PS, with DAZ / FTZ), which
runs the same packing, blocking and tails on any AVX-512 CPU.

References and tolerances:
- one tile product: a NumPy model of the SDM pseudo-code (fp32 sums of even / odd products
  from +0, RNE, DAZ / FTZ), bit for bit (its inputs keep every product exact in fp32, which
  the model checks);
- whole products: a NumPy model of the kernel's exact sequence of tile operations, bit for bit
  (any packing / layout / tail error changes bits), and float64 (exact mode:
  max |err| <= 1e-5 max |ref|; bf16 compute mode: <= 1e-5 max (|round_bf16(x)| @ |W|^T),
  against the bf16-rounded activations, as tests/test_precision.py);
- the hardware tiles against the emulation: bit for bit (the emulation models the SDM; a
  failure there means the CPU rounds differently from the SDM's description, and the float64
  tests above still bound the error);
- MLP / MoE / model: float64 and the AVX-512 path (both fp32-exact).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import dsv2ext
from dsv2ext import BF16, ops
from dsv2ext._native import _C
from dsv2ext.ops.moe import MoEConfig, moe_block, swiglu_mlp
from dsv2ext.precision import round_to_bf16
from dsv2ext.quant import quantize_int8, set_int8_activations
from conftest import max_rel_err

TOL = 1e-5
F32_MIN = np.float32(2.0 ** -126)
needs_hw = pytest.mark.skipif(not dsv2ext.amx_available(), reason="this CPU has no AMX tiles")
# under ASan (scripts/sanitize.sh) the emulation is slow: the bounds of the packing and tiles are
# covered by the small bit-exact cases; the larger ones run in the ordinary pass
not_sanitized = pytest.mark.skipif(bool(os.environ.get("DSV2EXT_SANITIZED")), reason="slow under the sanitizers")


def _ftz(v: np.ndarray) -> np.ndarray:
    """Denormals to zeros of their sign (FTZ on results, DAZ on inputs)."""
    v = np.asarray(v, np.float32)
    return np.where(np.abs(v) < F32_MIN, np.copysign(np.float32(0), v), v).astype(np.float32)


def _bf16_f32(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


@pytest.fixture
def emulated():
    """The AMX kernels on emulated tiles; counts the tile products they ran."""
    prev_isa, prev_emu = dsv2ext.get_isa(), _C.get_amx_emulation()
    _C.set_amx_emulation(True)
    if dsv2ext.set_isa("amx") != "amx":
        _C.set_amx_emulation(prev_emu)
        dsv2ext.set_isa(prev_isa)
        pytest.skip("the AMX kernels need AVX-512 (the emulation too)")
    faults = _C.amx_emu_stats()[1]
    yield lambda: _C.amx_emu_stats()[0]
    _C.set_amx_emulation(prev_emu)
    dsv2ext.set_isa(prev_isa)
    assert _C.amx_emu_stats()[1] == faults, "an emulated tile instruction would have faulted on the CPU"


@pytest.fixture
def hardware():
    prev_isa, prev_emu = dsv2ext.get_isa(), _C.get_amx_emulation()
    _C.set_amx_emulation(False)
    assert dsv2ext.set_isa("amx") == "amx"
    yield
    _C.set_amx_emulation(prev_emu)
    dsv2ext.set_isa(prev_isa)


def _threads(n: int):
    class _T:
        def __enter__(self):
            self.prev = dsv2ext.get_num_threads()
            dsv2ext.set_num_threads(n)

        def __exit__(self, *a):
            dsv2ext.set_num_threads(self.prev)
    return _T()


# ---------------------------------------------------------------- one tile product

def tdp_model(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The SDM's TDPBF16PS on full tiles: c [16, 16] f32 + a [16, 32] bf16 . b [16, 32] bf16 pairs.
    Products must be exact in fp32 (checked): then each fused multiply-add is one fp32 add."""
    A, B = _ftz(_bf16_f32(a)), _ftz(_bf16_f32(b))
    out = _ftz(c).copy()
    for m in range(16):
        e = np.zeros(16, np.float32)
        o = np.zeros(16, np.float32)
        for i in range(16):
            pe, po = A[m, 2 * i] * B[i, 0::2], A[m, 2 * i + 1] * B[i, 1::2]
            assert np.array_equal(pe.astype(np.float64), np.float64(A[m, 2 * i]) * B[i, 0::2].astype(np.float64))
            assert np.array_equal(po.astype(np.float64), np.float64(A[m, 2 * i + 1]) * B[i, 1::2].astype(np.float64))
            e, o = _ftz(e + pe), _ftz(o + po)
        out[m] = _ftz(out[m] + _ftz(e + o))
    return out


def _tile_case(seed: int):
    """Adversarial tile operands: wide exponents, cancelling pairs, bf16 denormals (DAZ),
    products and sums in the denormal range (FTZ), a denormal C input."""
    rng = np.random.default_rng(seed)

    def bf16(shape, lo, hi):
        mant = rng.integers(0, 128, shape)
        expo = rng.integers(lo, hi + 1, shape) + 127
        sign = rng.integers(0, 2, shape) << 15
        return (sign | (expo << 7) | mant).astype(np.uint16)

    a, b = bf16((16, 32), -6, 6), bf16((16, 32), -6, 6)
    a[:4] = bf16((4, 32), -40, 40)  # wide exponents: big and tiny terms in one sum
    b[:, :8] = bf16((16, 8), -40, 40)
    a[4, 0], a[4, 1] = a[4, 2] ^ 0x8000, a[4, 3] ^ 0x8000  # row 4: products cancel pairwise
    b[0], b[1] = b[1], b[1]
    a[5] = (a[5] & 0x807F)  # row 5: bf16 denormals (read as zero)
    a[6], b[:, 30] = 0x1F80, 0x1F80  # 2^-64 x 2^-64 = 2^-128: a denormal product (flushed)
    a[7, :2] = [0x2000, 0xA000]  # 2^-63, -2^-63
    b[0, 14:16] = [0x2000, 0x1FC0]  # 2^-63 * 2^-63 - 2^-63 * 1.5 2^-64: sums into the denormal range
    c = (rng.standard_normal((16, 16)) * 10.0 ** rng.integers(-3, 4, (16, 16))).astype(np.float32)
    c[3, 3] = np.float32(1e-39)  # denormal C input (read as zero)
    return c, a, b


@pytest.mark.parametrize("seed", range(4))
def test_emulated_tile_product_matches_sdm_model(seed):
    c, a, b = _tile_case(seed)
    ref = tdp_model(c, a, b)
    got = c.copy()
    _C.amx_tile_dot(got, a, b, False)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_emulated_tile_product_inf_nan():
    c, a, b = _tile_case(9)
    ref = tdp_model(c, a, b)
    a[0, 0] = 0x7F80  # +inf in row 0: x 0 -> NaN (columns n % 3 == 0), x 1 -> +inf
    b[0, 0::2] = np.where(np.arange(16) % 3 == 0, 0, 0x3F80)
    c[1, 1] = np.nan
    ref = tdp_model(c, a * (np.arange(16) != 0)[:, None].astype(np.uint16), b)  # rows 2.. : finite inputs
    got = c.copy()
    _C.amx_tile_dot(got, a, b, False)
    assert np.all(np.isnan(got[0, 0::3])) and np.all(np.isposinf(np.delete(got[0], np.s_[0::3])))
    assert np.isnan(got[1, 1])
    np.testing.assert_array_equal(got[2:].view(np.uint32), ref[2:].view(np.uint32))


@needs_hw
@pytest.mark.parametrize("seed", range(8))
def test_hw_tile_product_matches_emulation(seed):
    c, a, b = _tile_case(seed)
    emu, hw = c.copy(), c.copy()
    _C.amx_tile_dot(emu, a, b, False)
    _C.amx_tile_dot(hw, a, b, True)
    diff = np.flatnonzero(emu.view(np.uint32) != hw.view(np.uint32))
    assert diff.size == 0, (f"{diff.size} of 256 outputs differ from the SDM model; first: "
                            f"hw {hw.flat[diff[0]]!r} emu {emu.flat[diff[0]]!r} at {divmod(int(diff[0]), 16)}")


# ---------------------------------------------------------------- the exact split

def test_split3_is_exact():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * 2.0 ** rng.integers(-100, 120, 20000)).astype(np.float32)
    x[:6] = [0.0, -0.0, 3.4028235e38, -3.4028235e38, 1.0 + 2 ** -23, -(2.0 ** -100)]
    parts = np.empty((3, x.size), np.uint16)
    _C.amx_split3(parts, x)
    np.testing.assert_array_equal(parts[0], x.view(np.uint32) >> 16)  # b1: the high half of x
    p = _bf16_f32(parts).astype(np.float64)
    normal = np.abs(x) >= 2.0 ** -100  # every part normal: the sum is x exactly
    np.testing.assert_array_equal((p[0] + p[1] + p[2])[normal], x[normal].astype(np.float64))
    assert np.all(np.abs(p[2]) <= np.abs(p[1]) * 2.0 ** -7)
    # tiny values: the parts read as zero by the tiles (denormal bf16) lose < 2^-125
    tiny = (rng.standard_normal(5000) * 2.0 ** rng.integers(-149, -100, 5000)).astype(np.float32)
    _C.amx_split3(parts := np.empty((3, tiny.size), np.uint16), tiny)
    kept = np.where(np.abs(_bf16_f32(parts)) >= 2.0 ** -126, _bf16_f32(parts), 0).astype(np.float64).sum(0)
    assert np.max(np.abs(kept - tiny)) < 2.0 ** -125
    special = np.array([np.inf, -np.inf, np.nan, np.float32(np.nan) * -1], np.float32)
    _C.amx_split3(parts := np.empty((3, 4), np.uint16), special)
    assert np.all(parts[1:] == 0)
    np.testing.assert_array_equal(_bf16_f32(parts[0])[:2], [np.inf, -np.inf])
    assert np.all(np.isnan(_bf16_f32(parts[0])[2:]))


# ---------------------------------------------------------------- whole products

def kernel_model(x: np.ndarray, w: BF16, exact: bool = True) -> np.ndarray:
    """The exact sequence of tile operations of dsv2_linear_amx for one output element:
    per 32-column step and activation part (b1, b2, b3; or round_bf16(x)), two fp32 sums of the
    16 even / odd products from +0 (each product exact: checked), their sum, the running C sum;
    denormals flushed at every step."""
    T, K = x.shape
    N = w.shape[0]
    Kp = (K + 31) // 32 * 32
    W = np.zeros((N, Kp), np.float32)
    W[:, :K] = _ftz(w.to_float32())
    if exact:
        parts = np.empty((3, T * K), np.uint16)
        _C.amx_split3(parts, np.ascontiguousarray(x).ravel())
        P = [_ftz(_bf16_f32(p)).reshape(T, K) for p in parts]
    else:
        P = [_ftz(round_to_bf16(x))]
    Xs = []
    for p in P:
        xp = np.zeros((T, Kp), np.float32)
        xp[:, :K] = p
        Xs.append(xp)
    C = np.zeros((N, T), np.float32)
    for s in range(Kp // 32):
        for xp in Xs:
            e = np.zeros((N, T), np.float32)
            o = np.zeros((N, T), np.float32)
            for i in range(16):
                k = 32 * s + 2 * i
                pe = W[:, k, None] * xp[None, :, k]
                po = W[:, k + 1, None] * xp[None, :, k + 1]
                e, o = _ftz(e + pe), _ftz(o + po)
            C = _ftz(C + _ftz(e + o))
    return C.T


def kernel_model_i8(x: np.ndarray, w) -> np.ndarray:
    """int8 weights: per group of columns the exact-mode tile sums of q . x from zero (codes are
    exact in bf16), then acc = fma(s, P, acc) in fp32, group by group."""
    T, K = x.shape
    N, g = w.shape[0], w.group
    Q = w.data.astype(np.float32)
    parts = np.empty((3, T * K), np.uint16)
    _C.amx_split3(parts, np.ascontiguousarray(x).ravel())
    Xs = [_ftz(_bf16_f32(p)).reshape(T, K) for p in parts]
    acc = np.zeros((N, T), np.float32)
    for b in range(K // g):
        C = np.zeros((N, T), np.float32)
        for s in range(b * g // 32, (b + 1) * g // 32):
            for xp in Xs:
                e = np.zeros((N, T), np.float32)
                o = np.zeros((N, T), np.float32)
                for i in range(16):
                    k = 32 * s + 2 * i
                    e = _ftz(e + Q[:, k, None] * xp[None, :, k])
                    o = _ftz(o + Q[:, k + 1, None] * xp[None, :, k + 1])
                C = _ftz(C + _ftz(e + o))
        acc = _fma32(np.broadcast_to(w.scales[:, b, None], C.shape), C, acc)
    return acc.T


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fp32 fused multiply-add a * b + c, correctly rounded: the float64 product is exact, the float64
    sum is made round-to-odd (exact error by TwoSum), and round-to-odd at 53 bits then nearest at 24
    bits is the correctly rounded result."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    z = s - p
    err = (p - (s - z)) + (c64 - z)
    u = s.view(np.uint64).copy()
    nudge = (err != 0) & ((u & np.uint64(1)) == 0)
    up = (err > 0) == (s > 0)
    u[nudge & up] += np.uint64(1)
    u[nudge & ~up] -= np.uint64(1)
    return u.view(np.float64).astype(np.float32)


def _case_i8(T, K, N, group=32, seed=0):
    rng = np.random.default_rng(seed + T * 131 + K * 7 + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = quantize_int8((rng.standard_normal((N, K)) * 0.05).astype(np.float32), group=group)
    return x, w


def _dequant64(w) -> np.ndarray:
    N, K = w.shape
    return (w.data.astype(np.float32).reshape(N, K // w.group, w.group) * w.scales[:, :, None]).reshape(N, K).astype(
        np.float64)


def _case(T, K, N, seed=0):
    rng = np.random.default_rng(seed + T * 131 + K * 7 + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = BF16.from_float32((rng.standard_normal((N, K)) * 0.05).astype(np.float32))
    return x, w


@pytest.mark.parametrize("T,K,N", [(16, 64, 16), (17, 100, 23), (33, 64, 1408), (20, 2048, 23), (47, 37, 40),
                                   (33, 1, 5)])
def test_emulated_linear_bit_exact_against_kernel_model(emulated, T, K, N):
    x, w = _case(T, K, N)
    n0 = emulated()
    got = ops.linear(x, w)
    assert emulated() > n0  # the tiles ran
    np.testing.assert_array_equal(got, kernel_model(x, w))
    if dsv2ext.bf16_compute_available():
        with dsv2ext.bf16_compute():
            got = ops.linear(x, w)
        np.testing.assert_array_equal(got, kernel_model(x, w, exact=False))


@pytest.mark.parametrize("T", [2, 16, 17, 33])
@pytest.mark.parametrize("K", [64, 100, 2048])
@pytest.mark.parametrize("N", [16, 23, 1408])
def test_emulated_linear_against_float64(emulated, T, K, N):
    if os.environ.get("DSV2EXT_SANITIZED") and (N * K > 10 ** 5 or T != 17):
        pytest.skip("scaled down under the sanitizers (slow emulation)")
    x, w = _case(T, K, N, seed=1)
    n0 = emulated()
    got = ops.linear(x, w)
    assert (emulated() > n0) == (T >= 16)  # 2 rows: the row-dot kernels
    ref = x.astype(np.float64) @ w.to_float32().astype(np.float64).T
    assert max_rel_err(got, ref) <= TOL
    if dsv2ext.bf16_compute_available():
        xb = round_to_bf16(x).astype(np.float64)
        with dsv2ext.bf16_compute():
            got = ops.linear(x, w)
        scale = float((np.abs(xb) @ np.abs(w.to_float32()).astype(np.float64).T).max())
        assert np.max(np.abs(got - xb @ w.to_float32().astype(np.float64).T)) <= TOL * scale


@not_sanitized
def test_emulated_linear_512_tokens_and_thread_counts(emulated):
    """V2-Lite shape with the prefill token count; results identical for 1, 2, 3 and 5 threads
    (the blocking changes with the thread count, each element's tile operations do not)."""
    x, w = _case(512, 2048, 160)
    ref = x.astype(np.float64) @ w.to_float32().astype(np.float64).T
    outs = []
    for th in (1, 2, 3, 5):
        with _threads(th):
            outs.append(ops.linear(x, w))
    assert max_rel_err(outs[0], ref) <= TOL
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    x, w = _case(37, 100, 1408)
    outs = []
    for th in (1, 3, 4):
        with _threads(th):
            outs.append(ops.linear(x, w))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_emulated_linear_special_values(emulated):
    x, w = _case(20, 64, 24)
    x[0, 3], x[1, 5], x[2, 7] = np.inf, np.nan, -np.inf
    x[3] = (np.random.default_rng(3).standard_normal(64) * 2.0 ** -110).astype(np.float32)  # tiny parts
    got = ops.linear(x, w)
    ref = x.astype(np.float64) @ w.to_float32().astype(np.float64).T
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref).all(1)
    assert max_rel_err(got[fin][1:], ref[fin][1:]) <= TOL  # rows 4..: ordinary
    assert np.max(np.abs(got[3] - ref[3])) < 2.0 ** -125 * (np.abs(w.to_float32()).sum(1).max() + 4 * 64)


@pytest.mark.parametrize("T,K,N,group", [(16, 64, 16, 32), (17, 128, 23, 64), (33, 2048, 40, 32), (40, 96, 1408, 32),
                                         (47, 256, 33, 128)])
def test_emulated_int8_bit_exact_and_float64(emulated, T, K, N, group):
    """int8 weights (group a multiple of 32): exact, whatever the bf16 compute mode."""
    x, w = _case_i8(T, K, N, group)
    n0 = emulated()
    got = ops.linear(x, w)
    assert emulated() > n0
    np.testing.assert_array_equal(got, kernel_model_i8(x, w))
    assert max_rel_err(got, x.astype(np.float64) @ _dequant64(w).T) <= TOL
    with dsv2ext.bf16_compute():
        np.testing.assert_array_equal(ops.linear(x, w), got)
    outs = []
    for th in (1, 3):
        with _threads(th):
            outs.append(ops.linear(x, w))
    for o in outs:
        np.testing.assert_array_equal(o, got)


def test_emulated_int8_other_groups_and_few_rows_keep_their_paths(emulated):
    x, w = _case_i8(40, 96, 24, group=16)  # 16-column groups: not on the tiles
    n0 = emulated()
    got = ops.linear(x, w)
    assert emulated() == n0
    assert max_rel_err(got, x.astype(np.float64) @ _dequant64(w).T) <= TOL
    x, w = _case_i8(8, 64, 24)  # decode-sized: the int16-activation row dots as before
    n0 = emulated()
    got = ops.linear(x, w)
    assert emulated() == n0
    dsv2ext.set_isa("avx512")
    np.testing.assert_array_equal(got, ops.linear(x, w))


@not_sanitized
def test_emulated_int8_mlp_and_moe(emulated):
    rng = np.random.default_rng(7)
    d, inter, E, k, T = 128, 96, 8, 4, 60
    q = lambda s: quantize_int8((rng.standard_normal(s) * 0.08).astype(np.float32))  # noqa: E731
    g, u, dn = q((inter, d)), q((inter, d)), q((d, inter))
    x = rng.standard_normal((T, d)).astype(np.float32)
    f = [_dequant64(t) for t in (g, u, dn)]
    a, b = x.astype(np.float64) @ f[0].T, x.astype(np.float64) @ f[1].T
    ref = (a / (1 + np.exp(-a)) * b) @ f[2].T
    n0 = emulated()
    assert max_rel_err(swiglu_mlp(x, g, u, dn), ref) <= TOL
    assert emulated() > n0
    router = (rng.standard_normal((E, d)) * 0.1).astype(np.float32)
    experts = [(q((inter, d)), q((inter, d)), q((d, inter))) for _ in range(E)]
    cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=k)
    outs = []
    for th in (1, 2):
        with _threads(th):
            outs.append(moe_block(x, router, experts, (g, u, dn), cfg))
    np.testing.assert_array_equal(outs[0], outs[1])
    dsv2ext.set_isa("avx512")
    _C.set_amx_emulation(False)
    prev = set_int8_activations("fp32")  # the reference: fp32 activations everywhere (exact)
    try:
        ref = moe_block(x, router, experts, (g, u, dn), cfg)
    finally:
        set_int8_activations(prev)
    assert max_rel_err(outs[0], ref) <= TOL


# ---------------------------------------------------------------- dispatch

def test_capping_turns_amx_off(emulated):
    x, w = _case(40, 256, 96)
    n0 = emulated()
    amx = ops.linear(x, w)
    assert emulated() > n0
    assert dsv2ext.set_isa("avx512") == "avx512"
    n1 = emulated()
    capped = ops.linear(x, w)
    assert emulated() == n1  # no tile ran
    _C.set_amx_emulation(False)
    assert dsv2ext.set_isa("amx") == ("amx" if dsv2ext.amx_available() else "avx512")
    dsv2ext.set_isa("avx512")
    np.testing.assert_array_equal(capped, ops.linear(x, w))  # exactly the AVX-512 path
    ref = x.astype(np.float64) @ w.to_float32().astype(np.float64).T
    assert max_rel_err(amx, ref) <= TOL and max_rel_err(capped, ref) <= TOL


def test_no_amx_cpu_unchanged():
    """Without AMX (and without the emulation) the level is what it was: 'amx' is never reported."""
    if dsv2ext.amx_available():
        pytest.skip("this CPU has AMX")
    prev, prev_emu = dsv2ext.get_isa(), _C.get_amx_emulation()
    try:
        _C.set_amx_emulation(False)
        assert dsv2ext.set_isa("amx") == dsv2ext.set_isa("avx512") == dsv2ext.get_isa()
        assert dsv2ext.get_isa() in ("avx512", "avx2", "portable")
    finally:
        _C.set_amx_emulation(prev_emu)
        dsv2ext.set_isa(prev)
    with pytest.raises(ValueError, match="isa"):
        dsv2ext.set_isa("amx512")
    with pytest.raises(TypeError, match="name"):
        dsv2ext.set_isa(3)


@not_sanitized
def test_environment_cap_and_emulation():
    code = "import dsv2ext, dsv2ext._native as n; print(dsv2ext.get_isa(), n._C.get_amx_emulation())"

    def run(**env):
        e = {k: v for k, v in os.environ.items() if k not in ("DSV2EXT_ISA", "DSV2EXT_AMX_EMULATION")}
        out = subprocess.run([sys.executable, "-c", code], env=dict(e, **env), capture_output=True, text=True,
                             check=True)
        return out.stdout.split()

    base = run()[0]
    assert run(DSV2EXT_AMX_EMULATION="1", DSV2EXT_ISA="avx512") == ["avx512" if base != "avx2" else base, "True"]
    emulated = "amx" if base in ("avx512", "amx") else base  # the emulation needs AVX-512
    assert run(DSV2EXT_AMX_EMULATION="1") == [emulated, "True"]
    assert run(DSV2EXT_ISA="amx") == [base, "False"]


def test_mlp_dispatch_threshold(emulated):
    """MLPs take the tiles from 16 tokens (DSV2_AMX_MIN_T), the row-dot kernels below."""
    rng = np.random.default_rng(5)
    d, inter = 96, 80
    g, u, dn = (BF16.from_float32((rng.standard_normal(s) * 0.1).astype(np.float32))
                for s in ((inter, d), (inter, d), (d, inter)))
    for T, tiles in ((15, False), (16, True)):
        x = rng.standard_normal((T, d)).astype(np.float32)
        n0 = emulated()
        swiglu_mlp(x, g, u, dn)
        assert (emulated() > n0) == tiles


# ---------------------------------------------------------------- MLP, MoE, model

def _mlp_ref(x, g, u, dn):
    f = [t.to_float32().astype(np.float64) for t in (g, u, dn)]
    a, b = x.astype(np.float64) @ f[0].T, x.astype(np.float64) @ f[1].T
    return (a / (1 + np.exp(-a)) * b) @ f[2].T


@not_sanitized
@pytest.mark.parametrize("T", [16, 40, 100])
def test_emulated_swiglu_mlp(emulated, T):
    rng = np.random.default_rng(T)
    d, inter = 256, 176
    x = rng.standard_normal((T, d)).astype(np.float32)
    g, u, dn = (BF16.from_float32((rng.standard_normal(s) * 0.06).astype(np.float32))
                for s in ((inter, d), (inter, d), (d, inter)))
    got = swiglu_mlp(x, g, u, dn)
    assert max_rel_err(got, _mlp_ref(x, g, u, dn)) <= TOL


@not_sanitized
@pytest.mark.parametrize("T", [40, 300])
def test_emulated_moe_block_matches_avx512_and_threads(emulated, T):
    rng = np.random.default_rng(10 + T)
    d, inter, E, k = 128, 96, 8, 4  # 8 experts x 4 of T tokens: busy experts (>= 16 tokens) on the tiles
    x = rng.standard_normal((T, d)).astype(np.float32)
    router = (rng.standard_normal((E, d)) * 0.1).astype(np.float32)
    b = lambda s: BF16.from_float32((rng.standard_normal(s) * 0.08).astype(np.float32))  # noqa: E731
    experts = [(b((inter, d)), b((inter, d)), b((d, inter))) for _ in range(E)]
    shared = (b((2 * inter, d)), b((2 * inter, d)), b((d, 2 * inter)))
    cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=k)
    outs = []
    for th in (1, 2, 3):
        with _threads(th):
            n0 = emulated()
            outs.append(moe_block(x, router, experts, shared, cfg))
            assert emulated() > n0
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    dsv2ext.set_isa("avx512")
    ref = moe_block(x, router, experts, shared, cfg)
    assert max_rel_err(outs[0], ref) <= TOL


@not_sanitized
def test_emulated_bundled_model_prefill_logits(emulated):
    """The bundled model (bf16 weights) prefills on the tiles: logits as the exact path's (with the
    fp32 latent cache: a bf16 cache would round rows that differ in their last bits, ~1e-5 of a logit)."""
    m = dsv2ext.load(kv_dtype="f32")
    ids = m.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return fib") * 2
    assert len(ids) >= 32
    n0 = emulated()
    amx = m.logits(ids)
    assert emulated() > n0
    dsv2ext.set_isa("avx512")
    exact = m.logits(ids)
    assert max_rel_err(amx, exact) <= 1e-5, max_rel_err(amx, exact)


# ---------------------------------------------------------------- the CPU's tiles

@needs_hw
@pytest.mark.parametrize("T,K,N", [(16, 64, 16), (17, 100, 23), (33, 2048, 1408), (512, 2048, 160),
                                   (47, 37, 40)])
def test_hw_linear_matches_emulation_and_float64(hardware, T, K, N):
    x, w = _case(T, K, N, seed=2)
    ref = x.astype(np.float64) @ w.to_float32().astype(np.float64).T
    modes = [False, True] if dsv2ext.bf16_compute_available() else [False]
    for bf16 in modes:
        with dsv2ext.bf16_compute(bf16):
            hw = ops.linear(x, w)
            _C.set_amx_emulation(True)
            try:
                emu = ops.linear(x, w)
            finally:
                _C.set_amx_emulation(False)
        if not bf16:
            assert max_rel_err(hw, ref) <= TOL
        diff = np.count_nonzero(hw.view(np.uint32) != emu.view(np.uint32))
        assert diff == 0, f"bf16={bf16}: {diff} of {hw.size} outputs differ from the emulation"


@needs_hw
def test_hw_threads_and_moe(hardware):
    x, w = _case(300, 2048, 1408, seed=3)
    outs = []
    for th in (1, 2, 7):
        with _threads(th):
            outs.append(ops.linear(x, w))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    rng = np.random.default_rng(4)
    d, inter, E, k, T = 256, 128, 8, 4, 200
    xm = rng.standard_normal((T, d)).astype(np.float32)
    router = (rng.standard_normal((E, d)) * 0.1).astype(np.float32)
    b = lambda s: BF16.from_float32((rng.standard_normal(s) * 0.08).astype(np.float32))  # noqa: E731
    experts = [(b((inter, d)), b((inter, d)), b((d, inter))) for _ in range(E)]
    cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=k)
    amx = moe_block(xm, router, experts, None, cfg)
    dsv2ext.set_isa("avx512")
    assert max_rel_err(amx, moe_block(xm, router, experts, None, cfg)) <= TOL
