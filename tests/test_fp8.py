"""FP8 weights (float8 e4m3fn with 2-D block scales, the DeepSeek-V3 format) kept as FP8.

References and tolerances
-------------------------
- e4m3 codes: decode of all 256 codes and encode of random floats, code values and
  midpoints against torch's ``float8_e4m3fn`` (bit-exact; torch turns |x| > 464 into
  NaN where dsv2ext saturates to 448, so those are checked on their own), on every
  instruction-set path.
- quantizer: bit-identical codes and scales to ``quantize_fp8_reference`` (NumPy, the
  same float32 operations), every instruction-set path.
- kernels (linear, swiglu_mlp, moe_block, MLA): float64 NumPy models on the exactly
  dequantized weights ``float32(e4m3(W8)) * scale_inv`` (made here with NumPy from the
  codes, not by the kernels), or transformers fp32 modules holding those weights:
  max |got - ref| <= 1e-5 * max |ref|.
- whole model: tiny DeepSeek-V3 / V2 checkpoints written in the FP8 layout with torch;
  dsv2ext logits against transformers fp32 on the dequantized weights, max abs error
  <= 1e-4 * max |logit|, greedy tokens equal.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext import Fp8Weight, ops
from dsv2ext.dtypes import BF16
from dsv2ext.fp8 import (e4m3_decode, e4m3_encode, e4m3_encode_reference, quantization_config, quantize_fp8,
                         quantize_fp8_reference)
from dsv2ext.quant import dequantize, save_quantized
from dsv2ext.safetensors import CheckpointError, CheckpointReader, SafetensorsFile, fp8_e4m3_to_float32, save_file

from conftest import max_rel_err
from hf_models import FP8_KEPT, make_model, reference, save, save_fp8

KTOL = 1e-5
LOGIT_TOL = 1e-4


def deq_np(w: Fp8Weight) -> np.ndarray:
    """float32 values of an Fp8Weight made by NumPy (the decode table, one float32 multiply)."""
    b0, b1 = w.block
    rows, cols = w.shape[-2:]
    full = np.repeat(np.repeat(w.scale_inv, b0, -2), b1, -1)[..., :rows, :cols]
    return fp8_e4m3_to_float32(w.data) * full


def rand_fp8(shape, seed, block=(128, 128)) -> Fp8Weight:
    """Random codes (NaN excluded) and scales of several magnitudes."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 0x01
    sshape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale = (rng.uniform(0.5, 2.0, sshape) * 10.0 ** rng.integers(-5, -2, sshape)).astype(np.float32)
    return Fp8Weight(codes, scale, block)


def ref_linear(x, w):
    return x.astype(np.float64) @ deq_np(w).astype(np.float64).T


# ---------------------------------------------------------------- codes

def torch_codes(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def test_decode_all_codes(isa):
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()
    for n in (256, 253):  # vector bodies and a scalar tail
        got = e4m3_decode(codes[:n])
        np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want[:n])],
                                      want[:n].view(np.uint32)[~np.isnan(want[:n])])
        assert np.isnan(got[np.isnan(want[:n])]).all() and np.isnan(got).sum() == np.isnan(want[:n]).sum()


def test_encode_against_torch(isa):
    rng = np.random.default_rng(0)
    vals = fp8_e4m3_to_float32(np.arange(256, dtype=np.uint8))
    vals = vals[np.isfinite(vals)]
    pos = np.sort(np.unique(np.abs(vals)))
    mids = (pos[1:] + pos[:-1]) / 2                       # ties: round to the even code
    x = np.concatenate([vals, mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 1e9),
                        rng.standard_normal(20000) * 10.0 ** rng.integers(-5, 3, 20000),
                        rng.uniform(-464, 464, 5000), [0.0, -0.0, 2.0 ** -10, 2.0 ** -149, 464.0, -464.0]]
                       ).astype(np.float32)
    x = x[np.abs(x) <= 464]
    got = e4m3_encode(x)
    np.testing.assert_array_equal(got, torch_codes(x))
    np.testing.assert_array_equal(got, e4m3_encode_reference(x))
    # saturation (torch gives NaN from 480 on) and NaN
    big = np.array([465, 479.9, 480, 1e6, np.inf, -500, -np.inf], np.float32)
    np.testing.assert_array_equal(e4m3_encode(big), [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE])
    np.testing.assert_array_equal(e4m3_encode_reference(big), e4m3_encode(big))
    assert (e4m3_encode(np.array([np.nan], np.float32)) & 0x7F) == 0x7F


# ---------------------------------------------------------------- the quantizer

@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 300), (128, 128)), ((1408, 2048), (128, 128)),
                                         ((37, 53), (16, 32)), ((5, 7), (128, 128)), ((64, 48), (48, 20))])
def test_quantizer_matches_numpy_model(isa, shape, block):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[:16, :16] = 0  # an all-zero block (when the block is 16 x 16 or smaller)
    w[-1, -1] = 7.5  # one large value: its block's other codes get small
    got, want = quantize_fp8(w, block), quantize_fp8_reference(w, block)
    np.testing.assert_array_equal(got.data, want.data)
    np.testing.assert_array_equal(got.scale_inv.view(np.uint32), want.scale_inv.view(np.uint32))
    assert got.block == block and got.scale_inv.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    bf = BF16.from_float32(w)  # bf16 input: quantized from its exact values
    b = quantize_fp8(bf, block)
    np.testing.assert_array_equal(b.data, quantize_fp8_reference(bf.to_float32(), block).data)
    # error bound: half an e4m3 step (relative 2^-4) of the block's scale times the value
    assert np.all(np.abs(deq_np(got) - w) <= np.abs(w) * 2.0 ** -4 + 2.0 ** -10 * deq_np(got).max())


def test_quantizer_zero_block_and_errors():
    w = np.zeros((130, 140), np.float32)
    w[129, 139] = -3.0
    q = quantize_fp8(w)
    assert q.scale_inv[0, 0] == 1.0 and (q.data[:128, :128] == 0).all()      # all-zero block: scale 1, codes 0
    assert q.scale_inv[1, 1] == np.float32(3.0) / np.float32(448) and q.data[129, 139] == 0xFE
    np.testing.assert_array_equal(deq_np(q), w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_fp8(np.full((4, 4), np.inf, np.float32))
    with pytest.raises(ValueError, match="block"):
        quantize_fp8(w, (0, 128))
    with pytest.raises(TypeError, match="uint16"):
        quantize_fp8(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="2 dimensions"):
        quantize_fp8(np.zeros((2, 4, 4), np.float32))


def test_weight_object_checks():
    w = rand_fp8((200, 300), 2)
    assert w.nbytes == 60000 and w.total_nbytes == 60000 + 2 * 3 * 4 and w.dtype_name == "fp8"
    with pytest.raises(ValueError, match=r"scale_inv: expected shape \[2, 3\]"):
        Fp8Weight(w.data, np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="float32"):
        Fp8Weight(w.data, w.scale_inv.astype(np.float64))
    with pytest.raises(TypeError, match="uint8"):
        Fp8Weight(w.data.view(np.int8), w.scale_inv)
    with pytest.raises(ValueError, match="block"):
        Fp8Weight(w.data, w.scale_inv, (128, 0))
    # the binding checks the same for duck-typed weights
    x = np.ones((1, 300), np.float32)

    class Bad:
        __dsv2_dtype__ = "fp8"

        def __init__(self, data, scale_inv, block):
            self.data, self.scale_inv, self.block = data, scale_inv, block
            self.shape = data.shape
    with pytest.raises(ValueError, match="scale_inv: expected shape"):
        ops.linear(x, Bad(w.data, np.ones((2, 2), np.float32), (128, 128)))
    with pytest.raises(ValueError, match="block"):
        ops.linear(x, Bad(w.data, w.scale_inv, (128, -1)))
    with pytest.raises(TypeError, match="Fp8Weight"):
        ops.linear(x, dsv2ext.safetensors.FP8E4M3(w.data))   # codes without scales
    np.testing.assert_array_equal(dequantize(w), deq_np(w))
    np.testing.assert_array_equal(w.take_rows(np.array([0, 199, 130])), deq_np(w)[[0, 199, 130]])


# ---------------------------------------------------------------- kernels

LIN_SHAPES = [(1408, 2048), (2048, 1408), (4096, 512), (200, 300), (256, 384), (48, 40), (7, 130)]


@pytest.mark.parametrize("N,K", LIN_SHAPES)
def test_linear(isa, N, K):
    """Row dots (T <= 8: AVX-512 rows and 4-row tiles, AVX2, portable) and sgemm on panels
    widened in registers (more rows); V2-Lite dims, multiples and non-multiples of 128 / 16."""
    w = rand_fp8((N, K), N + K)
    big = N * K > 1_000_000
    Ts = [1, 3, 8] if big else [1, 2, 3, 4, 5, 8, 9, 33, 64, 600]
    if big and isa == "avx512":
        Ts += [64, 512]
    for T in Ts:
        x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
        assert max_rel_err(ops.linear(x, w), ref_linear(x, w)) <= KTOL, (N, K, T)


def test_linear_blocks_nan_and_huge_scales(isa):
    """Other block sizes (16-multiples and not), NaN codes, and scales > FLT_MAX / 256 (whose fold into
    the fp16 decode would overflow: those matrices take the exact portable loop)."""
    x = np.random.default_rng(0).standard_normal((9, 200)).astype(np.float32)
    for block in ((16, 32), (64, 48), (3, 20), (300, 1)):
        w = rand_fp8((70, 200), 5, block)
        for T in (1, 4, 9):
            assert max_rel_err(ops.linear(x[:T], w), ref_linear(x[:T], w)) <= KTOL, block
    xl = np.random.default_rng(1).standard_normal((4, 1100)).astype(np.float32)
    for xx, K in ((x, 200), (xl, 1100)):  # 1100 columns: 4 tokens take the 4-row tiles
        w = rand_fp8((70, K), 6)
        w.data[3, 17] = 0x7F   # NaN codes
        w.data[40, K - 1] = 0xFF
        w.data[41, 70] = 0xFF
        for T in (1, 2, 4, 9):
            y = ops.linear(xx[:T], w)
            assert np.isnan(y[:, [3, 40, 41]]).all() and not np.isnan(np.delete(y, [3, 40, 41], 1)).any()
    w = rand_fp8((70, 200), 7)
    w.scale_inv[0, 1] = np.float32(3e36)   # > FLT_MAX / 256
    w.data[:, 128:] &= 0x87                # subnormal codes there (|v| <= 7 / 512): finite products
    ref = ref_linear(x, w)
    assert np.isfinite(ref).all()
    for T in (1, 9):
        assert max_rel_err(ops.linear(x[:T], w), ref[:T]) <= KTOL


def test_linear_threads_identical():
    w = rand_fp8((1408, 2048), 8)
    x = np.random.default_rng(1).standard_normal((5, 2048)).astype(np.float32)
    prev = dsv2ext.get_num_threads()
    try:
        dsv2ext.set_num_threads(1)
        a = [ops.linear(x[:T], w) for T in (1, 5)]
        dsv2ext.set_num_threads(2)
        b = [ops.linear(x[:T], w) for T in (1, 5)]
    finally:
        dsv2ext.set_num_threads(prev)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


@pytest.fixture(params=[True, False], ids=["vbmi", "fp16-route"])
def avx512_route(request):
    """The AVX-512 decode kernels of fp8 weights: the VBMI byte-table kernels (where the CPU has
    AVX-512 VBMI) and the fp16-pattern kernels that CPUs without it run."""
    from dsv2ext._native import _C
    prev = dsv2ext.get_isa()
    if dsv2ext.set_isa("avx512") != "avx512":
        dsv2ext.set_isa(prev)
        pytest.skip("CPU lacks avx512")
    got = _C.set_avx512vbmi(request.param)
    try:
        if got != request.param:
            pytest.skip("CPU lacks AVX-512 VBMI")
        yield request.param
    finally:
        _C.set_avx512vbmi(True)
        dsv2ext.set_isa(prev)


@pytest.mark.parametrize("N,K,block", [(1408, 2048, (128, 128)), (2048, 1408, (128, 128)), (512, 7168, (128, 128)),
                                       (4096, 512, (128, 128)), (200, 300, (128, 128)), (70, 1100, (64, 192)),
                                       (33, 200, (64, 64)), (9, 64, (128, 128)), (130, 130, (3, 128)),
                                       (21, 4200, (3, 128))])
def test_linear_avx512_routes(avx512_route, N, K, block):
    """Both AVX-512 decode routes on V2-Lite / V3 dims (7168 columns: one token fits the kernels' stack
    buffer, more take the prepared activations), blocks of 64-multiples and tails of K % 64 columns,
    rows that start inside a block of rows (linear's threads split at 16 rows), 1-9 tokens."""
    w = rand_fp8((N, K), N + 3 * K, block)
    for T in (1, 2, 3, 4, 5, 8, 9):
        x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
        assert max_rel_err(ops.linear(x, w), ref_linear(x, w)) <= KTOL, (N, K, T)
    # NaN codes in a 64-column step, in the tail, and the negative NaN code
    w.data[1, 5] = 0x7F
    w.data[4, K - 1] = 0xFF
    w.data[N - 1, K // 2] = 0xFF
    for T in (1, 4, 9):
        x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
        y = ops.linear(x, w)
        assert np.isnan(y[:, [1, 4, N - 1]]).all() and not np.isnan(np.delete(y, [1, 4, N - 1], 1)).any()


def test_scaled_codes_path_same_bits(avx512_route):
    """The VBMI route's scaled-code kernel (codes widened to e4m3 * 2^-120 against activations times
    2^120; taken for |x| < 256 and calls of 8 rows or more, off on Intel) and the byte-table kernel it
    falls back to give the same bits: y(2 x) == 2 y(x) exactly with max |x| = 200 (2 x takes the
    table kernel), and rows computed in a call of 7 (table kernel) or 4 rows equal the same rows of
    a call of all rows; V2-Lite and V3 dims, 1-5 tokens (the 4-row tile sums from 2 tokens at 2048)."""
    prev = dsv2ext.get_num_threads()
    dsv2ext.set_num_threads(1)
    try:
        for N, K in ((1408, 2048), (2048, 1408), (256, 7168), (96, 200)):
            w = rand_fp8((N, K), N + K)
            for T in (1, 2, 5):
                x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
                x *= np.float32(200.0) / np.abs(x).max()
                y = ops.linear(x, w)
                np.testing.assert_array_equal(ops.linear(x * np.float32(2.0), w), y * np.float32(2.0))
                n = 4 if T * K * 4 > 16384 else 7
                head = Fp8Weight(np.ascontiguousarray(w.data[:n]), np.ascontiguousarray(w.scale_inv[:1]), w.block)
                np.testing.assert_array_equal(ops.linear(x, head), y[:, :n])
                assert max_rel_err(y, ref_linear(x, w)) <= KTOL
    finally:
        dsv2ext.set_num_threads(prev)


def test_decode_routes_mlp_and_moe(avx512_route):
    """The MLP and MoE row-dot paths (activations prepared once per call) on both AVX-512 routes."""
    for d, inter in ((200, 300), (256, 1408)):
        test_swiglu_mlp("avx512", d, inter)
    for T in (1, 6):
        test_moe_block_fp8_experts(T)


def swiglu_ref(x, g, u, d):
    x = x.astype(np.float64)
    a = x @ deq_np(g).astype(np.float64).T
    b = x @ deq_np(u).astype(np.float64).T
    return (a / (1 + np.exp(-a)) * b) @ deq_np(d).astype(np.float64).T


@pytest.mark.parametrize("d,inter", [(200, 300), (256, 1408)])
def test_swiglu_mlp(isa, d, inter):
    g, u, dn = rand_fp8((inter, d), 1), rand_fp8((inter, d), 2), rand_fp8((d, inter), 3)
    for T in (1, 5, 40, 100):
        x = np.random.default_rng(T).standard_normal((T, d)).astype(np.float32)
        assert max_rel_err(ops.swiglu_mlp(x, g, u, dn), swiglu_ref(x, g, u, dn)) <= KTOL, T


def moe_ref(x, ids, wts, experts, shared):
    """float64 model of the MoE output for given routing; experts [(gate, up, down)] as float64 arrays."""
    ref = swiglu_ref(x, *shared)
    x64 = x.astype(np.float64)
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t], wts[t]):
            g, u, dn = experts[e]
            a, b = g @ x64[t], u @ x64[t]
            ref[t] += wt * (dn @ (a / (1 + np.exp(-a)) * b))
    return ref


@pytest.mark.parametrize("T", [1, 6, 70, 300])
def test_moe_block_fp8_experts(T):
    """Routed experts as separate FP8 matrices (the V3 file layout) and stacked as gate_up_proj [E, 2I, d]
    (I = 72: the up rows start inside a block of rows); shared expert FP8; router bf16 (as V3 keeps it).
    T = 70 and 300 send some experts (> 64 tokens) through sgemm on widened panels."""
    E, k, d, inter = 8, 3, 200, 72
    rng = np.random.default_rng(11)
    router = BF16.from_float32(rng.standard_normal((E, d)).astype(np.float32) * 0.1)
    bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
    cfg = ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=k, n_group=4, topk_group=2, topk_method="noaux_tc",
                        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    shared = (rand_fp8((2 * inter, d), 30), rand_fp8((2 * inter, d), 31), rand_fp8((d, 2 * inter), 32))
    x = rng.standard_normal((T, d)).astype(np.float32)
    per = [(rand_fp8((inter, d), 3 * e), rand_fp8((inter, d), 3 * e + 1), rand_fp8((d, inter), 3 * e + 2))
           for e in range(E)]
    out, ids, wts = ops.moe_block(x, router, per, shared, cfg, bias, return_routing=True)
    f64 = lambda w: deq_np(w).astype(np.float64)  # noqa: E731
    assert max_rel_err(out, moe_ref(x, ids, wts, [tuple(map(f64, e)) for e in per], shared)) <= KTOL
    gu = rand_fp8((E * 2 * inter, d), 50)   # codes for E stacked [2I, d] matrices, scales per expert
    stacked_gu = Fp8Weight(gu.data.reshape(E, 2 * inter, d),
                           np.stack([rand_fp8((2 * inter, d), 60 + e).scale_inv for e in range(E)]))
    stacked_dn = Fp8Weight(np.stack([e[2].data for e in per]), np.stack([e[2].scale_inv for e in per]))
    out, ids, wts = ops.moe_block(x, router, ops.StackedExperts(stacked_gu, stacked_dn), shared, cfg, bias,
                                  return_routing=True)
    experts = [(f64(stacked_gu[e])[:inter], f64(stacked_gu[e])[inter:], f64(per[e][2])) for e in range(E)]
    assert max_rel_err(out, moe_ref(x, ids, wts, experts, shared)) <= KTOL


def fp8_attention(seed):
    """A transformers V3 attention with FP8 projections (quantize_fp8) and the dsv2ext weights: the torch
    module holds the dequantized values.  kv_b_proj's head slices start inside blocks of 128 rows, one
    (W_UK of head 1: rows 88..135) across two; kv_lora 144 > 128 columns."""
    from dsv2ext.ops import mla as M
    from test_mla import LITE_YARN, Ref
    ref = Ref("v3", 200, 3, 72, 144, 48, 8, 40, LITE_YARN, seed=seed)
    fp8 = {}
    with torch.no_grad():
        for name, p in ref.att.named_parameters():
            if "layernorm" not in name:
                q = quantize_fp8(p.detach().numpy())
                p.copy_(torch.from_numpy(deq_np(q)))
                fp8[name.replace(".weight", "")] = q
    return ref, M.MLAWeights(**{**vars(ref.weights), **fp8})


def run_block(ref, w, x, mode, split):
    """The block over x [T, d] at positions 0..T-1, in two calls (prefill, then the rest)."""
    from dsv2ext.ops import mla as M
    T = x.shape[0]
    cache = M.new_latent_cache(ref.mcfg, 1, T)
    seq, pos = np.zeros(T, np.int64), np.arange(T, dtype=np.int64)
    return np.concatenate([M.mla_attention_block(x[a:b], w, ref.mcfg, cache, seq[a:b], pos[a:b], mode=mode)
                           for a, b in ((0, split), (split, T))])


@pytest.mark.parametrize("T,threads", [(1, 1), (3, 1), (1, 2), (3, 2), (20, 2)])
@pytest.mark.parametrize("mode", ["absorbed", "decompressed"])
def test_mla_block_fp8_projections(T, threads, mode):
    """Every projection (q_a, q_b, kv_a_proj_with_mqa, kv_b as per-head row views, o_proj) FP8 against
    transformers on the dequantized weights.  Absorbed decode computes W_UK^T q streaming W_UK row by row
    (1 thread: a head per work item) or in column blocks (2 threads)."""
    ref, w = fp8_attention(40)
    x = np.random.default_rng(T).standard_normal((T + 4, 200)).astype(np.float32)
    prev = dsv2ext.get_num_threads()
    dsv2ext.set_num_threads(threads)
    try:
        assert max_rel_err(run_block(ref, w, x, mode, 4), ref.forward(x)) <= KTOL
    finally:
        dsv2ext.set_num_threads(prev)


@pytest.mark.parametrize("isa_name", ["avx2", "portable"])
def test_mla_block_other_isa(isa_name):
    prev = dsv2ext.get_isa()
    if dsv2ext.set_isa(isa_name) != isa_name:
        dsv2ext.set_isa(prev)
        pytest.skip(f"CPU lacks {isa_name}")
    try:
        ref, w = fp8_attention(41)
        x = np.random.default_rng(0).standard_normal((12, 200)).astype(np.float32)
        want = ref.forward(x)
        for mode in ("absorbed", "decompressed"):
            assert max_rel_err(run_block(ref, w, x, mode, 10), want) <= KTOL, mode
    finally:
        dsv2ext.set_isa(prev)


# ---------------------------------------------------------------- whole model

V3_MULT = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128,
               qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4)
V3_ODD = dict(hidden_size=200, intermediate_size=300, moe_intermediate_size=72, q_lora_rank=72, kv_lora_rank=96,
              qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=20, num_attention_heads=3)
CKPTS = {"v3-hidden256": ("v3", V3_MULT), "v3-hidden200": ("v3", V3_ODD),
         "v2-hidden160": ("v2", dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=48,
                                     kv_lora_rank=136, q_lora_rank=None))}


@pytest.fixture(scope="module", params=sorted(CKPTS))
def fp8_ckpt(request, tmp_path_factory):
    kind, over = CKPTS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    path, ref_path = str(d / "fp8"), str(d / "ref")
    save_fp8(make_model(kind, seed=5, **over), path, ref_path)
    return request.param, path, reference(ref_path), dsv2ext.load(path)


def _prompt(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, size=n)]


def test_model_matches_transformers(fp8_ckpt):
    name, path, ref, ours = fp8_ckpt
    info = ours.info()
    assert info["dtype"] == "fp8" and set(info["params_by_dtype"]) == {"fp8", "f32"}
    lw = ours.weights.layers[-1]
    assert isinstance(lw.moe.experts[0].down_proj, Fp8Weight) and isinstance(lw.attn.o_proj, Fp8Weight)
    assert not lw.attn.o_proj.data.flags.writeable   # memory-mapped, not copied
    ids = _prompt(40)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = ours.logits(ids)
    assert max_rel_err(got, want) <= LOGIT_TOL, name
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([ids[:12]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 12:].tolist()
    out = ours.generate(ids[:12], max_new_tokens=12, temperature=0)
    assert out.token_ids == greedy[:len(out.token_ids)] and len(out.token_ids) >= 8


def test_model_bytes_and_conversions(fp8_ckpt):
    name, path, ref, ours = fp8_ckpt
    r = CheckpointReader(path)
    code_bytes = sum(int(np.prod(r.info(n)[1])) for n in r.names() if r.info(n)[0] == "F8_E4M3")
    scale_bytes = sum(4 * int(np.prod(r.info(n)[1])) for n in r.names() if n.endswith("_scale_inv"))
    other_bytes = sum(r.get(n).nbytes for n in r.names() if r.info(n)[0] != "F8_E4M3" and not n.endswith("_scale_inv"))
    r.close()
    fp8 = [w for w in dsv2ext.model._iter_weights(ours.weights) if isinstance(w, Fp8Weight)]
    assert sum(w.total_nbytes for w in fp8) == code_bytes + scale_bytes   # 1 byte per weight + the block scales
    assert ours.info()["weight_bytes"] == code_bytes + scale_bytes + other_bytes
    if name != "v3-hidden200":
        return
    m32 = dsv2ext.load(path, dtype="f32")
    w8, w32 = ours.weights.layers[1].attn.kv_b_proj, m32.weights.layers[1].attn.kv_b_proj
    np.testing.assert_array_equal(w32, deq_np(w8))           # explicit conversion: exact
    mbf = dsv2ext.load(path, dtype="bf16")
    wbf = mbf.weights.layers[1].attn.kv_b_proj
    assert isinstance(wbf, BF16)
    np.testing.assert_array_equal(wbf.data, BF16.from_float32(deq_np(w8)).data)   # explicit, rounded


def test_save_quantized_roundtrip(small_fp8, tmp_path):
    ours = dsv2ext.load(small_fp8[0])
    d = save_quantized(ours, tmp_path / "saved")
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                       "quant_method": "fp8", "weight_block_size": [128, 128]}
    st = SafetensorsFile(os.path.join(d, "model.safetensors"))
    n = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert st.info(n) == ("F8_E4M3", (200, 72)) and st.info(n + "_scale_inv") == ("F32", (2, 1))
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.norm.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert st.info(kept)[0] in ("F32", "BF16") and kept + "_scale_inv" not in st
    st.close()
    back = dsv2ext.load(d)
    w0, w1 = ours.weights.layers[1].moe.experts[3].down_proj, back.weights.layers[1].moe.experts[3].down_proj
    assert isinstance(w1, Fp8Weight) and not w1.data.flags.writeable
    np.testing.assert_array_equal(w0.data, w1.data)
    np.testing.assert_array_equal(w0.scale_inv, w1.scale_inv)
    ids = _prompt(30, 1)
    np.testing.assert_array_equal(back.logits(ids), ours.logits(ids))
    assert back.info()["dtype"] == "fp8"


def test_quantize_at_load(tmp_path):
    """dtype="fp8" on a bf16 checkpoint: each Linear weight but lm_head quantized as the NumPy model does it
    (bit-exact), the rest kept; logits then equal a model on the dequantized weights."""
    model = make_model("v3", seed=9, **V3_ODD)
    src = save(model, str(tmp_path / "bf16"), torch.bfloat16)
    q = dsv2ext.load(src, dtype="fp8")
    plain = dsv2ext.load(src)
    r = CheckpointReader(src)
    count = 0
    for layer, (lq, lp) in enumerate(zip(q.weights.layers, plain.weights.layers)):
        pairs = [(lq.attn.q_a_proj, lp.attn.q_a_proj), (lq.attn.kv_b_proj, lp.attn.kv_b_proj),
                 (lq.attn.o_proj, lp.attn.o_proj)]
        if lq.moe is not None:
            pairs += [(lq.moe.experts[2].gate_proj, lp.moe.experts[2].gate_proj),
                      (lq.moe.shared.down_proj, lp.moe.shared.down_proj)]
            assert lq.moe.gate is not None and isinstance(lq.moe.gate, BF16)
        else:
            pairs += [(lq.mlp.up_proj, lp.mlp.up_proj)]
        for a, b in pairs:
            want = quantize_fp8_reference(b.to_float32())
            np.testing.assert_array_equal(a.data, want.data)
            np.testing.assert_array_equal(a.scale_inv.view(np.uint32), want.scale_inv.view(np.uint32))
            count += 1
    r.close()
    assert count >= 10
    assert isinstance(q.weights.lm_head, BF16) and isinstance(q.weights.embed_tokens, BF16)
    assert q.info()["dtype"] == "fp8"
    # the same model with every FP8 weight dequantized (both with the exact fp32 latent cache)
    from dsv2ext.model import DeepseekV2

    def deq(obj):
        if isinstance(obj, Fp8Weight):
            return deq_np(obj)
        if isinstance(obj, list):
            return [deq(o) for o in obj]
        if hasattr(obj, "__dataclass_fields__"):
            return type(obj)(**{k: deq(v) for k, v in vars(obj).items()})
        return obj
    exact = DeepseekV2(q.config, q.weights, kv_dtype="f32")
    ref = DeepseekV2(q.config, deq(q.weights), kv_dtype="f32")
    ids = _prompt(25, 2)
    assert max_rel_err(exact.logits(ids), ref.logits(ids)) <= LOGIT_TOL
    # an FP8 checkpoint stays as it is with dtype="fp8"; int8 from FP8 goes through the exact values
    d = save_quantized(q, tmp_path / "fp8")
    again = dsv2ext.load(d, dtype="fp8")
    np.testing.assert_array_equal(again.weights.layers[1].attn.o_proj.data, q.weights.layers[1].attn.o_proj.data)
    i8 = dsv2ext.load(d, dtype="int8")
    assert i8.info()["dtype"] == "int8"


# ---------------------------------------------------------------- malformed checkpoints

@pytest.fixture(scope="module")
def small_fp8(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    save_fp8(make_model("v3", seed=4, **V3_ODD), str(d / "fp8"), str(d / "ref"))
    r = CheckpointReader(str(d / "fp8"))
    tensors = {}
    for n in r.names():
        t = r.get(n)
        tensors[n] = np.array(t if isinstance(t, np.ndarray) else t.data)  # raw bits of BF16 / FP8E4M3
    kinds = {n: r.info(n)[0] for n in r.names()}
    r.close()
    return str(d / "fp8"), tensors, kinds


def _write(path, tensors, kinds):
    from dsv2ext.safetensors import FP8E4M3
    out = {n: FP8E4M3(t) if kinds.get(n) == "F8_E4M3" else (BF16(t) if kinds.get(n) == "BF16" else t)
           for n, t in tensors.items()}
    save_file(out, os.path.join(path, "model.safetensors"))


def test_malformed_checkpoints(small_fp8, tmp_path):
    src, tensors, kinds = small_fp8
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    d = str(tmp_path / "bad")
    os.makedirs(d)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)

    def case(edit, match, cfg_edit=None):
        t, k = dict(tensors), dict(kinds)
        edit(t, k)
        _write(d, t, k)
        c = json.loads(json.dumps(cfg))
        if cfg_edit:
            cfg_edit(c)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f)
        with pytest.raises(CheckpointError, match=match):
            dsv2ext.load(d)

    s = name + "_scale_inv"
    case(lambda t, k: t.__setitem__(s, np.ones((2, 2), np.float32)), r"kv_b_proj\.weight_scale_inv.*F32 \[2, 2\]")
    case(lambda t, k: t.__setitem__(s, t[s].astype(np.float16)), r"kv_b_proj\.weight_scale_inv.*F16")
    case(lambda t, k: t.pop(s), r"kv_b_proj\.weight.*has no .*kv_b_proj\.weight_scale_inv")
    case(lambda t, k: t.__setitem__(s, np.full(t[s].shape, np.nan, np.float32)), r"kv_b_proj\.weight_scale_inv.*NaN")
    # a block size the scales do not fit, and malformed block sizes
    case(lambda t, k: None, r"_scale_inv.*weight_block_size \[64, 64\]",
         lambda c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]))
    case(lambda t, k: None, "weight_block_size", lambda c: c["quantization_config"].__setitem__("weight_block_size",
                                                                                               [128, 0]))
    case(lambda t, k: None, "weight_block_size", lambda c: c["quantization_config"].__setitem__("weight_block_size",
                                                                                               "128"))
    case(lambda t, k: None, "fmt", lambda c: c["quantization_config"].__setitem__("fmt", "e5m2"))
    # an F8 tensor that is not a matrix
    case(lambda t, k: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.uint8))
         or k.__setitem__("model.norm.weight", "F8_E4M3"), r"model\.norm\.weight.*matrices")


def test_quantization_config_helper():
    assert quantization_config() == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    assert set(FP8_KEPT) >= {"lm_head", "embed_tokens"}



MEM_SCRIPT = r"""
import json, sys, psutil
import dsv2ext
p = psutil.Process()
before = p.memory_info().rss
m = dsv2ext.load(sys.argv[1], dtype="fp8")
info = m.info()
print(json.dumps({"grew": p.memory_info().rss - before, "bytes": info["weight_bytes"], "dtype": info["dtype"]}))
"""


def test_quantize_at_load_streams(tmp_path):
    """dtype="fp8" on a ~150 MB bf16 checkpoint: each source matrix's mapped pages are dropped once it is
    quantized, so resident memory grows by about the FP8 model (half the file), not file + model."""
    import subprocess
    import sys
    from dsv2ext.config import ModelConfig
    from dsv2ext.weights import expected_tensors
    d, F = 1024, 24576
    cfg = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=1000, hidden_size=d,
               intermediate_size=F, moe_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
               n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None, first_k_dense_replace=1,
               max_position_embeddings=256, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    tensors = {n: BF16.from_float32(np.ones(s, np.float32) if "norm" in n else
                                    rng.standard_normal(s, dtype=np.float32) * 0.02)
               for n, s in expected_tensors(ModelConfig.from_dict(cfg)).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert size >= 150e6
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["dtype"] == "fp8" and m["bytes"] <= 0.52 * size
    assert m["grew"] <= m["bytes"] + 0.2 * size, m   # not the bf16 source (~2x the FP8 bytes) on top
