"""Latent cache formats (f32, bf16, fp8), long prompts in chunks, key-tiled attention, thread counts.

References (tolerances as in test_mla: max |err| <= 1e-5 * max |ref|):
- a compact cache is checked against the same kernels on an fp32 cache holding the exactly
  widened rows, and against a float64 NumPy attention over those rows;
- the stored rows against a NumPy model of the rounding, bit-exact (bf16: round to nearest even;
  fp8: scale = amax / 448 per block of 128 in fp32, codes = torch's float8_e4m3fn rounding of
  x / scale, k_pe bf16);
- the whole model with each cache against the fp32 cache (bf16: logits within 1e-2 of the
  largest, fp8 within 6e-2; same argmax where the top-two margin is clear).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import torch

import dsv2ext
from dsv2ext.dtypes import BF16, bf16_to_float32, float32_to_bf16_bits
from dsv2ext.ops import mla as M
from dsv2ext.ops.mla import FP8Cache
from dsv2ext.safetensors import fp8_e4m3_to_float32

RTOL = 1e-5

# (H, nope, rope, v, kv_lora): V2-Lite attention dims, and widths that are not multiples of 16
SHAPES = [(16, 128, 64, 128, 512), (3, 24, 6, 20, 40), (5, 16, 10, 24, 70)]


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def attention_f64(q, rows, seq, pos, kv_b, scale, H, nope, v, L):
    """The plain definition in float64 over fp32 rows [B, S, L + rope]."""
    out = np.empty((len(seq), H, v))
    for t, (s, p) in enumerate(zip(seq, pos)):
        r = rows[s, :p + 1].astype(np.float64)
        kv = (r[:, :L] @ kv_b.astype(np.float64).T).reshape(-1, H, nope + v)
        for h in range(H):
            k = np.concatenate([kv[:, h, :nope], r[:, L:]], axis=1)
            sc = k @ q[t, h].astype(np.float64) * scale
            pr = np.exp(sc - sc.max())
            out[t, h] = (pr / pr.sum()) @ kv[:, h, nope:]
    return out


def fp8_model(rows: np.ndarray, L: int):
    """NumPy model of FP8 rows: (codes uint8 [..., L], scales float32 [..., ceil(L / 128)], rope bf16 bits)."""
    nb = -(-L // 128)
    lat = np.zeros(rows.shape[:-1] + (nb * 128,), np.float32)
    lat[..., :L] = rows[..., :L]
    amax = np.abs(lat.reshape(rows.shape[:-1] + (nb, 128))).max(-1)
    scales = (amax / np.float32(448)).astype(np.float32)
    den = np.repeat(scales, 128, axis=-1)[..., :L]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(den == 0, np.float32(0), rows[..., :L] / den).astype(np.float32)
    codes = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return codes, scales, float32_to_bf16_bits(rows[..., L:])


def compact(rows: np.ndarray, dtype: str, L: int):
    """(cache for the kernels, the fp32 values it holds) for fp32 rows [B, S, W]."""
    if dtype == "bf16":
        bits = float32_to_bf16_bits(rows)
        return BF16(bits), bf16_to_float32(bits)
    if dtype == "fp8":
        codes, scales, pe = fp8_model(rows, L)
        c = FP8Cache.zeros(rows.shape[0], rows.shape[1], L, rows.shape[2] - L)
        c.codes[...], c.scales[...], c.rope.data[...] = codes, scales, pe
        widened = np.concatenate([fp8_e4m3_to_float32(codes) * np.repeat(scales, 128, axis=-1)[..., :L],
                                  bf16_to_float32(pe)], axis=-1)
        np.testing.assert_array_equal(c.to_float32(), widened)
        return c, widened
    return rows.copy(), rows


def random_case(shape, B, S, T, seed):
    H, nope, rope, v, L = shape
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((B, S, L + rope)).astype(np.float32)
    kv_b = (rng.standard_normal((H * (nope + v), L)) / math.sqrt(L)).astype(np.float32)
    seq = rng.integers(0, B, T).astype(np.int64)
    pos = rng.integers(0, S, T).astype(np.int64)
    pos[0] = S - 1
    q = (rng.standard_normal((T, H, nope + rope)) * 0.5).astype(np.float32)
    return rows, kv_b, seq, pos, q


# --------------------------------------------------------------------------- kernels


# fp8 with kv_lora 70 and 40: one partial scale block; 512: four full blocks
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_attention_reads_compact_rows(isa, shape, dtype):
    """Both forms on a compact cache == the fp32 cache holding the widened rows == float64.  With
    AVX-512 the absorbed form takes the cached numbers exactly (bf16 widened in registers, FP8 blocks
    widened into fp32 once: e4m3 * scale rounded once) in the same fp32 operations as for fp32 rows:
    the same bits as the fp32 cache."""
    H, nope, rope, v, L = shape
    rows, kv_b, seq, pos, q = random_case(shape, 2, 300, 5, seed=sum(shape))
    rows[1, 7, :L] *= 300.0  # a row of large values: its own scales (fp8)
    cache, widened = compact(rows, dtype, L)
    ref = attention_f64(q, widened, seq, pos, kv_b, 0.13, H, nope, v, L)
    for mode in ("absorbed", "decompressed"):
        got = M.mla_attention(q, cache, seq, pos, kv_b, 0.13, mode)
        exact = M.mla_attention(q, widened, seq, pos, kv_b, 0.13, mode)
        assert rel_err(got, exact) <= RTOL, mode
        assert rel_err(got, ref) <= RTOL, mode
        if mode == "absorbed" and isa == "avx512":
            np.testing.assert_array_equal(got, exact)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("L", [40, 300])
def test_compress_writes_rounded_rows(isa, dtype, L):
    """The rows written to a compact cache are the NumPy rounding of the fp32 rows returned."""
    rng = np.random.default_rng(3)
    d, rope = 48, 6
    cfg = M.MLAConfig(num_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=rope, v_head_dim=8, kv_lora_rank=L,
                      q_lora_rank=None, softmax_scale=0.2, inv_freq=M.rope_inv_freq(rope)[0])
    h = rng.standard_normal((7, d)).astype(np.float32)
    wa = (rng.standard_normal((L + rope, d)) / 7).astype(np.float32)
    wn = (1 + 0.1 * rng.standard_normal(L)).astype(np.float32)
    seq = np.array([0, 1, 1, 0, 1, 0, 0], np.int64)
    pos = np.array([0, 0, 1, 1, 2, 2, 3], np.int64)
    cache = M.new_latent_cache(cfg, 2, 4, dtype)
    rows = M.mla_compress_kv(h, wa, wn, cache, seq, pos, cfg.inv_freq)
    f32 = M.new_latent_cache(cfg, 2, 4)
    np.testing.assert_array_equal(M.mla_compress_kv(h, wa, wn, f32, seq, pos, cfg.inv_freq), rows)
    if dtype == "bf16":
        np.testing.assert_array_equal(cache.data[seq, pos], float32_to_bf16_bits(rows))
    else:
        codes, scales, pe = fp8_model(rows, L)
        np.testing.assert_array_equal(cache.codes[seq, pos], codes)
        np.testing.assert_array_equal(cache.scales[seq, pos], scales)
        np.testing.assert_array_equal(cache.rope.data[seq, pos], pe)


def test_bf16_cache_tagging():
    """bf16 rows cross the boundary only as dsv2ext.BF16; never guessed from a bare uint16 array."""
    rows, kv_b, seq, pos, q = random_case(SHAPES[1], 1, 20, 2, seed=5)
    bits = float32_to_bf16_bits(rows)
    with pytest.raises(TypeError, match="BF16"):
        M.mla_attention(q, bits, seq, pos, kv_b, 0.2)
    with pytest.raises(TypeError, match="BF16"):
        dsv2ext._C.mla_attention(np.empty((2, 3, 20), np.float32), q, bits, seq, pos, kv_b, 0.2, 0)
    with pytest.raises(TypeError, match="cache"):
        M.mla_attention(q, object(), seq, pos, kv_b, 0.2)
    with pytest.raises(ValueError, match="cache"):
        M.mla_attention(q, BF16(bits[:, :, :39].copy()), seq, pos, kv_b, 0.2)  # narrower than kv_lora


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_nan_rows_reach_only_the_tokens_that_read_them(dtype):
    """A NaN in a cached row (written by the compression) gives NaN outputs to the tokens attending
    to it and to no other token, in both forms."""
    H, nope, rope, v, L = SHAPES[2]
    rows, kv_b, _, _, q = random_case(SHAPES[2], 1, 40, 4, seed=13)
    rows[0, 20, 3] = np.nan
    cache, _ = compact(rows, dtype, L)
    seq, pos = np.zeros(4, np.int64), np.array([5, 19, 20, 39], np.int64)
    for mode in ("absorbed", "decompressed"):
        out = M.mla_attention(q, cache, seq, pos, kv_b, 0.2, mode)
        assert np.isfinite(out[:2]).all() and np.isnan(out[2:]).all(), mode


def test_fp8_cache_object_checks():
    rows, kv_b, seq, pos, q = random_case(SHAPES[2], 1, 20, 2, seed=5)
    c, _ = compact(rows, "fp8", SHAPES[2][4])
    assert c.shape == (1, 20, 80) and c.data.shape[2] == M.fp8_cache_row_bytes(70, 10) == 72 + 4 + 20
    with pytest.raises(ValueError, match="bytes"):
        FP8Cache(c.data[:, :, :-2].copy(), 70, 10)
    with pytest.raises(TypeError, match="uint8"):
        FP8Cache(c.data.view(np.int8), 70, 10)
    bad = FP8Cache(c.data, 70, 10)
    bad.kv_lora_rank = 69  # a forged object: the binding checks the row size again
    with pytest.raises(ValueError, match="bytes|kv_lora"):
        M.mla_attention(q, bad, seq, pos, kv_b, 0.2)
    with pytest.raises(ValueError, match="kv_lora"):  # kv_b_proj of another width than the cache's
        M.mla_attention(q, c, seq, pos, kv_b[:, :64].copy(), 0.2)


def test_long_context_tiles_and_thread_counts():
    """V2-Lite dims over 1100 rows (three key tiles of the non-absorbed form, several key ranges of
    the absorbed one): both forms agree with float64, and give the same bits for 1, 2, 5 and 16
    threads (16: the absorbed queries are split by columns instead of by heads)."""
    shape = SHAPES[0]
    H, nope, rope, v, L = shape
    rows, kv_b, seq, pos, q = random_case(shape, 1, 1100, 3, seed=9)
    pos[:] = [1099, 517, 1023]
    ref = attention_f64(q, rows, seq, pos, kv_b, 0.1, H, nope, v, L)
    # a prompt: 40 queries at the end of the context (the non-absorbed form's case)
    qp = np.random.default_rng(1).standard_normal((40, H, nope + rope)).astype(np.float32) * 0.5
    sp, pp = np.zeros(40, np.int64), np.arange(1060, 1100, dtype=np.int64)
    prev = dsv2ext.get_num_threads()
    got = {}
    try:
        for nt in (1, 2, 5, 16):
            dsv2ext.set_num_threads(nt)
            for mode in ("absorbed", "decompressed"):
                got[nt, mode] = M.mla_attention(q, rows, seq, pos, kv_b, 0.1, mode)
                got[nt, mode, "p"] = M.mla_attention(qp, rows, sp, pp, kv_b, 0.1, mode)
    finally:
        dsv2ext.set_num_threads(prev)
    for mode in ("absorbed", "decompressed"):
        assert rel_err(got[1, mode], ref) <= RTOL
        for nt in (2, 5, 16):
            np.testing.assert_array_equal(got[1, mode], got[nt, mode])
            np.testing.assert_array_equal(got[1, mode, "p"], got[nt, mode, "p"])
    assert rel_err(got[1, "decompressed", "p"], got[1, "absorbed", "p"]) <= RTOL


@pytest.mark.parametrize("dtype", ["f32", "bf16", "fp8"])
def test_one_decode_token_split_by_rows_and_heads(dtype):
    """One decode token over 4096 rows with V2-Lite dims: its key ranges (4 of 1024 rows) are fewer
    than 16 threads, so they are also split by heads; with 3 threads, by rows only.  The same bits
    for 1, 2, 3, 5 and 16 threads and each cache dtype; within 1e-5 of float64 on the cached values."""
    shape = SHAPES[0]
    H, nope, rope, v, L = shape
    rows, kv_b, seq, pos, q = random_case(shape, 1, 4096, 1, seed=12)
    cache, widened = compact(rows, dtype, L)
    ref = attention_f64(q, widened, seq, pos, kv_b, 0.1, H, nope, v, L)
    prev = dsv2ext.get_num_threads()
    got = {}
    try:
        for nt in (1, 2, 3, 5, 16):
            dsv2ext.set_num_threads(nt)
            got[nt] = M.mla_attention(q, cache, seq, pos, kv_b, 0.1, "absorbed")
    finally:
        dsv2ext.set_num_threads(prev)
    assert rel_err(got[1], ref) <= RTOL
    for nt in (2, 3, 5, 16):
        np.testing.assert_array_equal(got[1], got[nt])
    if dtype == "bf16" and dsv2ext.bf16_compute_available():  # the bf16 compute mode's kernels, same split
        try:
            with dsv2ext.bf16_compute():
                for nt in (1, 3, 16):
                    dsv2ext.set_num_threads(nt)
                    got[nt, "dp"] = M.mla_attention(q, cache, seq, pos, kv_b, 0.1, "absorbed")
        finally:
            dsv2ext.set_num_threads(prev)
        assert 1e-5 < rel_err(got[1, "dp"], ref) <= 1e-2
        np.testing.assert_array_equal(got[1, "dp"], got[3, "dp"])
        np.testing.assert_array_equal(got[1, "dp"], got[16, "dp"])


def attention_bf16q_f64(q, rows, seq, pos, kv_b, scale, H, nope, v, L):
    """float64 absorbed attention whose absorbed queries [W_UK^T q_nope | q_pe] are rounded to bf16
    (the bf16 compute mode's rounding of q; its rounding of the softmax weights is left out)."""
    from dsv2ext.precision import round_to_bf16
    out = np.empty((len(seq), H, v))
    kvb = kv_b.astype(np.float64).reshape(H, nope + v, L)
    for t, (s, p) in enumerate(zip(seq, pos)):
        r = rows[s, :p + 1].astype(np.float64)
        for h in range(H):
            qa = np.concatenate([q[t, h, :nope].astype(np.float64) @ kvb[h, :nope], q[t, h, nope:]])
            qa = round_to_bf16(qa.astype(np.float32)).astype(np.float64)
            sc = r @ qa * scale
            pr = np.exp(sc - sc.max())
            out[t, h] = kvb[h, nope:] @ ((pr / pr.sum()) @ r[:, :L])
    return out


@pytest.mark.parametrize("shape", [(16, 128, 64, 128, 512), (3, 24, 6, 20, 64), (5, 16, 10, 24, 32),
                                   (20, 16, 8, 16, 32)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_compute_attention_on_bf16_cache(shape):
    """bf16 compute mode, bf16 cache, absorbed form: the scores and the values on vdpbf16ps with the
    absorbed queries and the softmax weights rounded to bf16.  Against a float64 model with the same
    rounding of the queries: within 4e-3 (the weights' rounding, at most 2^-9 each: 1.0-2.0e-3 on Zen 4,
    plus the queries rounded from fp32 instead of float64 sums); against the
    exact attention: a bf16-sized difference (1e-5 .. 1e-2), so the mode did act; the same bits for 1,
    2 and 5 threads; contexts of 1 to 2100 rows (odd counts: the last pair padded), several blocks;
    heads in the scores' groups of 16: one group, one partial group, a full and a partial one (20)."""
    if not dsv2ext.bf16_compute_available():
        pytest.skip("CPU lacks AVX512-BF16")
    H, nope, rope, v, L = shape
    prev = dsv2ext.get_num_threads()
    try:
        for S in (1, 63, 300, 2101):
            rows, kv_b, seq, pos, q = random_case(shape, 2, S, 5, seed=S + L)
            cache, widened = compact(rows, "bf16", L)
            ref = attention_f64(q, widened, seq, pos, kv_b, 0.13, H, nope, v, L)
            model = attention_bf16q_f64(q, widened, seq, pos, kv_b, 0.13, H, nope, v, L)
            got = {}
            with dsv2ext.bf16_compute():
                for nt in (1, 2, 5):
                    dsv2ext.set_num_threads(nt)
                    got[nt] = M.mla_attention(q, cache, seq, pos, kv_b, 0.13, "absorbed")
            assert rel_err(got[1], model) <= 4e-3, S
            if S > 1:
                assert 1e-5 < rel_err(got[1], ref) <= 1e-2, S
            np.testing.assert_array_equal(got[1], got[2])
            np.testing.assert_array_equal(got[1], got[5])
    finally:
        dsv2ext.set_num_threads(prev)


def test_absorbed_block_pass_odd_width_and_head_groups():
    """The absorbed form's block pass (AVX-512: heads in the 16 lanes) with 20 heads (a full and a partial
    group of 16), on rows of an odd width (kv_lora 33 + rope 4: the last number of a row has no pair) and of
    kv_lora 32 (the bf16 compute mode's kernels), over one row, a partial block and several key ranges:
    f32 / bf16 / fp8 caches within RTOL of float64, the bf16 compute mode within 4e-3 of its float64 model;
    the same bits for 1, 2 and 5 threads."""
    prev = dsv2ext.get_num_threads()
    try:
        for shape, S in itertools.product([(20, 16, 4, 16, 33), (20, 16, 6, 16, 32)], (1, 77, 2100)):
            H, nope, rope, v, L = shape
            rows, kv_b, seq, pos, q = random_case(shape, 2, S, 4, seed=S + L)
            for dtype in ("f32", "bf16", "fp8"):
                cache, widened = compact(rows, dtype, L) if dtype != "f32" else (rows, rows)
                ref = attention_f64(q, widened, seq, pos, kv_b, 0.13, H, nope, v, L)
                got = {}
                for nt in (1, 2, 5):
                    dsv2ext.set_num_threads(nt)
                    got[nt] = M.mla_attention(q, cache, seq, pos, kv_b, 0.13, "absorbed")
                assert rel_err(got[1], ref) <= RTOL, (shape, S, dtype)
                np.testing.assert_array_equal(got[1], got[2])
                np.testing.assert_array_equal(got[1], got[5])
                if dtype == "bf16" and L % 32 == 0 and dsv2ext.bf16_compute_available():
                    model = attention_bf16q_f64(q, widened, seq, pos, kv_b, 0.13, H, nope, v, L)
                    with dsv2ext.bf16_compute():
                        for nt in (1, 5):
                            dsv2ext.set_num_threads(nt)
                            got[nt, "dp"] = M.mla_attention(q, cache, seq, pos, kv_b, 0.13, "absorbed")
                    assert rel_err(got[1, "dp"], model) <= 4e-3, (shape, S)
                    assert S == 1 or 1e-5 < rel_err(got[1, "dp"], ref), (shape, S)  # the mode did act
                    np.testing.assert_array_equal(got[1, "dp"], got[5, "dp"])
    finally:
        dsv2ext.set_num_threads(prev)


def test_bf16_compute_attention_other_caches_stay_exact():
    """The mode leaves fp32 / fp8 caches and kv_lora widths that are not multiples of 32 exact."""
    for shape, dtype in (((3, 24, 6, 20, 40), "bf16"), ((3, 24, 6, 20, 64), "f32"), ((3, 24, 6, 20, 64), "fp8")):
        H, nope, rope, v, L = shape
        rows, kv_b, seq, pos, q = random_case(shape, 2, 300, 5, seed=3)
        cache, widened = compact(rows, dtype, L)
        ref = attention_f64(q, widened, seq, pos, kv_b, 0.13, H, nope, v, L)
        with dsv2ext.bf16_compute():
            assert rel_err(M.mla_attention(q, cache, seq, pos, kv_b, 0.13, "absorbed"), ref) <= RTOL, dtype


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def bundled():
    return dsv2ext.load(kv_dtype="f32")


def test_default_kv_dtype_and_info(bundled):
    m = dsv2ext.load()
    assert m.kv_dtype == "bf16"  # bf16 checkpoint
    cfg = m.config
    W, Ln = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.num_hidden_layers
    assert m.info()["kv_cache_bytes_per_token"] == 2 * W * Ln and m.info()["kv_dtype"] == "bf16"
    assert bundled.info()["kv_cache_bytes_per_token"] == 4 * W * Ln
    assert m.new_cache(1, 8).bytes_per_token == 2 * W * Ln
    assert "bf16" in repr(m)
    with pytest.raises(ValueError, match="kv_dtype"):
        dsv2ext.load(kv_dtype="fp16")


@pytest.mark.parametrize("kv,tol", [("bf16", 1e-2), ("fp8", 6e-2)])
def test_model_with_compact_cache_vs_f32_cache(bundled, kv, tol):
    ids = bundled.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return fib")
    exact = bundled.logits(ids)
    m = dsv2ext.load(kv_dtype=kv)
    got = m.logits(ids)
    assert rel_err(got, exact) <= tol
    clear = np.sort(exact, 1)[:, -1] - np.sort(exact, 1)[:, -2] > 0.05 * exact.std(1)
    assert (got.argmax(1) == exact.argmax(1))[clear].all()


def test_chunked_prefill_equals_one_shot(bundled):
    """A prompt in chunks of 7 (and of 64) == one forward, also for a ragged batch given out of order."""
    ids = bundled.encode("import os\nimport sys\n\nclass Foo(object):\n    def __init__(self, x):\n"
                         "        self.x = x\n\n    def bar(self):\n        return self.x * 2\n")
    T = len(ids)
    one = bundled.logits(ids)
    saved = bundled.prefill_chunk
    try:
        for C in (7, 64):
            bundled.prefill_chunk = C
            assert rel_err(bundled.logits(ids), one) <= RTOL
        bundled.prefill_chunk = 5
        other = ids[::-1][:23]
        tok = np.array(ids + other, np.int64)
        seq = np.array([0] * T + [1] * len(other), np.int64)
        pos = np.concatenate([np.arange(T), np.arange(len(other))])
        perm = np.random.default_rng(2).permutation(tok.size)
        cache = bundled.new_cache(2, T)
        rows = np.array([T - 1, tok.size - 1, 3])
        got = bundled.forward(tok[perm], seq[perm], pos[perm], cache, logit_rows=np.argsort(perm)[rows])
        assert rel_err(got[0], one[-1]) <= RTOL and rel_err(got[2], one[3]) <= RTOL
        assert rel_err(got[1], bundled.logits(other)[-1]) <= RTOL
        with pytest.raises(ValueError, match="same cache row"):
            bundled.forward(tok[:8].repeat(2), np.zeros(16, np.int64), np.arange(8).repeat(2), bundled.new_cache(1, 8))
    finally:
        bundled.prefill_chunk = saved


def test_growable_cache(bundled):
    c = bundled.new_cache(1)
    assert c.growable and c.max_len == 256
    ids = bundled.encode("x = 1\n" * 60)
    got = bundled.forward(np.array(ids), np.zeros(len(ids), np.int64), np.arange(len(ids)), c)
    assert c.max_len >= len(ids) and c.lengths[0] == len(ids)
    np.testing.assert_array_equal(got, bundled.logits(ids))
    with pytest.raises(ValueError, match="context"):
        c.ensure(bundled.config.max_position_embeddings + 1)
    fixed = bundled.new_cache(1, 4)
    with pytest.raises(ValueError, match="positions"):
        fixed.ensure(5)
