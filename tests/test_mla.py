"""MLA kernels (RoPE/YaRN, latent KV compression, absorbed / non-absorbed attention, the
whole attention block) against transformers' DeepseekV2Attention / DeepseekV3Attention,
DeepseekV2RMSNorm and the rotary embeddings, in fp32.

Tolerance (every comparison with transformers or between the two attention forms):
    max |ours - reference| <= 1e-5 * max |reference|
bf16 weights are compared with the reference run on the same bf16-rounded weights upcast to
fp32, with the same tolerance.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext.dtypes import BF16
from dsv2ext.ops import mla as M

from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RMSNorm,
    DeepseekV2RotaryEmbedding,
    apply_rotary_emb,
)
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

RTOL = 1e-5  # max abs error <= RTOL * max |reference|

LITE_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
V25_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# small original length so that short tests run past it (positions > original_max_position_embeddings)
SMALL_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
              "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.707}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


_WORST: Dict[str, float] = {}


def assert_close(got: np.ndarray, ref: np.ndarray, what: str = "") -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    e = rel_err(got, ref)
    assert e <= RTOL, f"{what}: max abs error {e:.3g} x max|ref| > {RTOL}"
    key = what.split("/")[0].split(" ")[0] or "?"
    _WORST[key] = max(_WORST.get(key, 0.0), e)
    return e


@pytest.fixture(scope="module", autouse=True)
def _report_worst_errors():
    """Print the largest measured errors (visible with pytest -s)."""
    yield
    if _WORST:
        print("\nlargest max|err| / max|ref| per comparison:")
        for k in sorted(_WORST):
            print(f"  {k:28s} {_WORST[k]:.3g}")


# --------------------------------------------------------------------------- reference builders

def hf_config(version: str, d: int, H: int, q_lora: Optional[int], L: int, nope: int, rope: int, v: int,
              rope_params: Dict, max_pos: int = 163840, rope_interleave: bool = True):
    kw = dict(hidden_size=d, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora, kv_lora_rank=L,
              qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, max_position_embeddings=max_pos,
              rope_parameters=dict(rope_params), num_hidden_layers=1, intermediate_size=64,
              moe_intermediate_size=32)
    if version == "v3":
        cfg = DeepseekV3Config(rope_interleave=rope_interleave, n_routed_experts=4, num_experts_per_tok=2, **kw)
    else:
        cfg = DeepseekV2Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


class Ref:
    """A transformers attention module with random weights and its rotary embedding."""

    def __init__(self, version: str = "v2", d: int = 64, H: int = 2, q_lora: Optional[int] = None, L: int = 32,
                 nope: int = 16, rope: int = 8, v: int = 16, rope_params: Dict = PLAIN, seed: int = 0,
                 max_pos: int = 163840, rope_interleave: bool = True, bf16: bool = False) -> None:
        self.version = version
        self.cfg = hf_config(version, d, H, q_lora, L, nope, rope, v, rope_params, max_pos, rope_interleave)
        torch.manual_seed(seed)
        cls = DeepseekV3Attention if version == "v3" else DeepseekV2Attention
        self.att = cls(self.cfg, 0).eval()
        self.rot = (DeepseekV3RotaryEmbedding if version == "v3" else DeepseekV2RotaryEmbedding)(self.cfg)
        with torch.no_grad():
            for name, p in self.att.named_parameters():
                if "layernorm" in name:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:  # non-trivial scale: O(1) activations, logits of a few units
                    p.copy_(torch.randn_like(p) * (1.5 / math.sqrt(p.shape[1])))
                if bf16:
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
        self.mcfg = M.MLAConfig.from_hf_config(self.cfg)
        sd = {k: t.detach().numpy().copy() for k, t in self.att.state_dict().items()}
        if bf16:
            sd = {k: BF16.from_float32(a) for k, a in sd.items()}
        self.weights = M.MLAWeights.from_tensors(sd)
        self.d = d

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Full causal forward of ONE sequence at positions 0..T-1: x [T, d] -> [T, d]."""
        T = x.shape[0]
        xt = torch.from_numpy(x)[None]
        pos = torch.arange(T)[None]
        pe = self.rot(xt, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        with torch.no_grad():
            if self.version == "v3":
                out = self.att(xt, position_embeddings=pe, attention_mask=mask)[0]
            else:
                out = self.att(xt, attention_mask=mask, position_embeddings=pe)[0]
        return out[0].numpy()


def rand_hidden(T: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, d)).astype(np.float32)


def block(ref: Ref, x: np.ndarray, cache: np.ndarray, seq: np.ndarray, pos: np.ndarray, mode: str = "auto"):
    return M.mla_attention_block(x, ref.weights, ref.mcfg, cache, seq.astype(np.int64), pos.astype(np.int64),
                                 mode=mode)


# --------------------------------------------------------------------------- RoPE / YaRN

ROPE_CASES = {
    "plain": (PLAIN, 163840),
    "plain-theta": ({"rope_type": "default", "rope_theta": 500000.0}, 4096),
    "v2-lite-yarn": (LITE_YARN, 163840),
    "v2.5-yarn": (V25_YARN, 163840),
    "yarn-mscale-ratio": ({**LITE_YARN, "mscale": 1.0, "mscale_all_dim": 0.8}, 163840),
    "yarn-mscale-only": ({k: v for k, v in LITE_YARN.items() if k != "mscale_all_dim"}, 163840),
    "yarn-no-truncate": ({**LITE_YARN, "truncate": False}, 163840),
    "yarn-factor-from-lengths": ({**V25_YARN, "factor": None}, 4096 * 16),
    "yarn-small": (SMALL_YARN, 4096),
    "yarn-explicit-attention-factor": ({**LITE_YARN, "attention_factor": 1.3}, 163840),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_rope_table_matches_transformers(case, version):
    rp, max_pos = ROPE_CASES[case]
    cfg = hf_config(version, 64, 2, None, 32, 16, 64, 16, rp, max_pos)
    rot = (DeepseekV3RotaryEmbedding if version == "v3" else DeepseekV2RotaryEmbedding)(cfg)
    inv, af = M.rope_inv_freq(64, 10000.0, cfg.rope_parameters, max_position_embeddings=max_pos)
    ref = rot.inv_freq.numpy()
    assert inv.dtype == np.float32 and inv.shape == (32,)
    # fp32 table computed with the same fp32 operations: equal up to 1 ulp of powf
    np.testing.assert_allclose(inv, ref, rtol=2.5e-7, atol=0)
    assert af == pytest.approx(rot.attention_scaling, rel=1e-7)
    if rp.get("rope_type") == "yarn" and rp.get("factor") is None:
        # transformers derives the factor for the table but its yarn_apply_mscale needs it given;
        # we derive it (max_position_embeddings / original) for the scale too
        m = 0.1 * rp["mscale_all_dim"] * math.log(max_pos / rp["original_max_position_embeddings"]) + 1
        want_scale = 80 ** -0.5 * m * m
    else:
        want_scale = (DeepseekV3Attention if version == "v3" else DeepseekV2Attention)(cfg, 0).scaling
    assert M.mla_softmax_scale(80, cfg.rope_parameters, max_position_embeddings=max_pos) == pytest.approx(
        want_scale, rel=1e-12)
    mc = M.MLAConfig.from_hf_config(cfg)
    np.testing.assert_array_equal(mc.inv_freq, inv)
    assert mc.softmax_scale == pytest.approx(want_scale, rel=1e-12)


def test_rope_hub_spelling_and_official_scales():
    hub = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
    a, fa = M.rope_inv_freq(64, 10000, hub)
    b, fb = M.rope_inv_freq(64, 10000, LITE_YARN)
    np.testing.assert_array_equal(a, b)
    assert fa == fb == 1.0
    assert M.mla_softmax_scale(192, hub) == pytest.approx(0.1147214, abs=5e-8)
    assert M.mla_softmax_scale(192, V25_YARN) == pytest.approx(0.1352338, abs=5e-8)
    assert M.mla_softmax_scale(192, None) == pytest.approx(192 ** -0.5)
    # the official ramp: frequencies below low=10 untouched, above high=23 divided by the factor
    plain, _ = M.rope_inv_freq(64, 10000)
    np.testing.assert_array_equal(b[:10], plain[:10])
    np.testing.assert_allclose(b[24:], plain[24:] / 40, rtol=3e-7)
    cfg = M.MLAConfig.from_hf_config({"num_attention_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
                                      "rope_theta": 10000, "rope_scaling": hub, "max_position_embeddings": 163840})
    assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192 and cfg.q_lora == 0
    assert cfg.softmax_scale == pytest.approx(0.1147214, abs=5e-8)


@pytest.mark.parametrize("rp", [LITE_YARN, PLAIN, {**LITE_YARN, "mscale": 1.0, "mscale_all_dim": 0.8}],
                         ids=["yarn", "plain", "yarn-af"])
def test_apply_rope_v2_strided_query_and_latent(rp):
    """q_pe inside a [T, H, 192] query and k_pe inside a 576-wide latent row, rotated in place."""
    T, H = 9, 3
    cfg = hf_config("v2", 48, H, None, 512, 128, 64, 128, rp)
    rot = DeepseekV2RotaryEmbedding(cfg)
    rng = np.random.default_rng(1)
    pos = np.array([0, 1, 5, 4095, 4096, 4097, 9000, 40000, 163839], np.int64)  # past the original 4096
    q = rng.standard_normal((T, H * 192)).astype(np.float32)
    lat = rng.standard_normal((T, 576)).astype(np.float32)
    fc = rot(torch.zeros(1), torch.from_numpy(pos)[None])  # [1, T, 32] complex
    q_t = torch.from_numpy(q.reshape(1, T, H, 192).transpose(0, 2, 1, 3).copy())  # [1, H, T, 192]
    k_t = torch.from_numpy(lat[None, None, :, 512:].copy())  # [1, 1, T, 64]
    q_ref, k_ref = apply_rotary_emb(q_t[..., 128:], k_t, fc)
    inv, af = M.rope_inv_freq(64, 10000, rp)
    q_before, lat_before = q.copy(), lat.copy()
    M.apply_rope(q.reshape(T, H, 192)[:, :, 128:], pos, inv, af)
    M.apply_rope(lat[:, 512:], pos, inv, af)
    assert_close(q.reshape(T, H, 192)[:, :, 128:], q_ref[0].numpy().transpose(1, 0, 2), "q_pe")
    assert_close(lat[:, 512:], k_ref[0, 0].numpy(), "k_pe")
    np.testing.assert_array_equal(q.reshape(T, H, 192)[:, :, :128], q_before.reshape(T, H, 192)[:, :, :128])
    np.testing.assert_array_equal(lat[:, :512], lat_before[:, :512])


@pytest.mark.parametrize("interleave", [True, False])
def test_apply_rope_v3_layouts(interleave):
    """DeepseekV3: rope_interleave=True rotates interleaved pairs (and writes them de-interleaved),
    rope_interleave=False rotates halves (our interleaved=False)."""
    T, H = 7, 2
    cfg = hf_config("v3", 64, H, None, 32, 16, 64, 16, LITE_YARN, rope_interleave=interleave)
    rot = DeepseekV3RotaryEmbedding(cfg)
    pos = np.array([3, 0, 4100, 17, 77777, 5000, 1], np.int64)
    x = np.random.default_rng(2).standard_normal((T, H, 64)).astype(np.float32)
    cos, sin = rot(torch.zeros(1), torch.from_numpy(pos)[None])
    xt = torch.from_numpy(x.transpose(1, 0, 2).copy())[None]  # [1, H, T, 64]
    fn = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    ref, _ = fn(xt, xt, cos, sin)
    ref = ref[0].numpy().transpose(1, 0, 2)
    inv, af = M.rope_inv_freq(64, 10000, LITE_YARN)
    M.apply_rope(x, pos, inv, af, interleaved=interleave)
    if interleave:  # transformers writes [re_0..re_31, im_0..im_31]
        x = np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    assert_close(x, ref, "rope v3")


# --------------------------------------------------------------------------- latent compression

@pytest.mark.parametrize("rp", [LITE_YARN, PLAIN], ids=["yarn", "plain"])
def test_compress_kv_matches_transformers(rp):
    d, T = 2048, 6
    ref = Ref("v2", d=d, H=16, q_lora=None, L=512, nope=128, rope=64, v=128, rope_params=rp, seed=3)
    x = rand_hidden(T, d, 4)
    seq = np.array([1, 0, 1, 2, 0, 1], np.int64)
    pos = np.array([0, 7, 5000, 3, 4095, 4096], np.int64)
    cache = M.new_latent_cache(ref.mcfg, 3, 5001)
    lat = M.mla_compress_kv(x, ref.weights.kv_a_proj_with_mqa, ref.weights.kv_a_layernorm, cache, seq, pos,
                            ref.mcfg.inv_freq, ref.mcfg.rope_attention_factor)
    a = ref.att
    with torch.no_grad():
        xt = torch.from_numpy(x)[None]
        ckv = a.kv_a_proj_with_mqa(xt)
        c, kpe = torch.split(ckv, [512, 64], dim=-1)
        norm = DeepseekV2RMSNorm(512)
        norm.weight.copy_(a.kv_a_layernorm.weight)
        c = norm(c)
        fc = ref.rot(xt, torch.from_numpy(pos)[None])
        _, kpe = apply_rotary_emb(kpe[:, None], kpe[:, None], fc)
    want = np.concatenate([c[0].numpy(), kpe[0, 0].numpy()], axis=1)
    assert_close(lat, want, "latent rows")
    np.testing.assert_array_equal(cache[seq, pos], lat)
    mask = np.ones(cache.shape[:2], bool)
    mask[seq, pos] = False
    assert not cache[mask].any(), "rows other than (seq_ids, positions) were written"


# --------------------------------------------------------------------------- the block vs transformers

BLOCK_CASES = {
    # name: (version, d, H, q_lora, L, nope, rope, v, rope_params, T)
    "tiny-plain": ("v2", 64, 2, None, 32, 16, 8, 16, PLAIN, 5),
    "tiny-qlora-yarn": ("v2", 72, 3, 24, 32, 16, 8, 24, SMALL_YARN, 40),  # past original_max_position_embeddings
    "lite-yarn": ("v2", 2048, 16, None, 512, 128, 64, 128, LITE_YARN, 12),
    "lite-plain": ("v2", 2048, 16, None, 512, 128, 64, 128, PLAIN, 3),
    "v2like-qlora-yarn": ("v2", 1024, 8, 1536, 512, 128, 64, 128, V25_YARN, 20),
    "v3-qlora-yarn": ("v3", 512, 4, 96, 512, 128, 64, 128, SMALL_YARN, 24),
}


@pytest.mark.parametrize("mode", ["auto", "absorbed", "decompressed"])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_full_forward(case, mode):
    version, d, H, ql, L, nope, rope, v, rp, T = BLOCK_CASES[case]
    ref = Ref(version, d, H, ql, L, nope, rope, v, rp, seed=sum(map(ord, case)))
    x = rand_hidden(T, d, 5)
    want = ref.forward(x)
    cache = M.new_latent_cache(ref.mcfg, 2, T + 3)
    got = block(ref, x, cache, np.ones(T), np.arange(T), mode)
    assert_close(got, want, f"{case}/{mode}")
    assert not cache[0].any() and not cache[1, T:].any()


def _block_by_ops(ref: Ref, w: "M.MLAWeights", x: np.ndarray, cache: np.ndarray, seq: np.ndarray,
                  pos: np.ndarray) -> np.ndarray:
    """The attention block composed of the single ops, each projection its own call."""
    from dsv2ext import ops

    c, T = ref.mcfg, x.shape[0]
    if c.q_lora:
        qa = ops.linear(x, w.q_a_proj)
        q = ops.linear(ops.rms_norm(qa, w.q_a_layernorm, c.rms_norm_eps), w.q_b_proj)
    else:
        q = ops.linear(x, w.q_proj)
    q = q.reshape(T, c.num_heads, c.qk_head_dim)
    M.apply_rope(q[:, :, c.qk_nope_head_dim:], pos, c.inv_freq, c.rope_attention_factor,
                 interleaved=c.rope_interleave)
    M.mla_compress_kv(x, w.kv_a_proj_with_mqa, w.kv_a_layernorm, cache, seq, pos, c.inv_freq,
                      c.rope_attention_factor, eps=c.rms_norm_eps, interleaved=c.rope_interleave)
    o = M.mla_attention(q, cache, seq, pos, w.kv_b_proj, c.softmax_scale)
    return ops.linear(o.reshape(T, -1), w.o_proj)


@pytest.mark.parametrize("q_lora", [None, 96])
@pytest.mark.parametrize("formats", ["bf16+int8", "int8/64+int8/32", "int4+int8", "int8+int4", "fp8+bf16",
                                     "f32+int8"])
def test_block_query_and_latent_projections_in_one_pass(q_lora, formats):
    """For few tokens the block runs the two products of the hidden states (q_proj or q_a_proj,
    and kv_a_proj) in one pass over the pool; each weight must still get the kernel (and
    activation format) it gets alone: the block equals the single ops bit for bit, whatever the
    two weights' formats (int8 groups that differ cannot share int16 activations)."""
    from dsv2ext.fp8 import quantize_fp8
    from dsv2ext.int4 import quantize_int4
    from dsv2ext.quant import quantize_int8

    def fmt(a: np.ndarray, f: str):
        if f == "bf16":
            return BF16.from_float32(a)
        if f.startswith("int8"):
            return quantize_int8(a, int(f.split("/")[1]) if "/" in f else 32)
        if f == "int4":
            return quantize_int4(a)
        if f == "fp8":
            return quantize_fp8(a, (32, 32))
        return a

    ref = Ref("v2", 256, 4, q_lora, 64, 32, 16, 32, LITE_YARN, seed=7)
    fq, fkv = formats.split("+")
    wd = dict(vars(ref.weights))
    first = "q_a_proj" if q_lora else "q_proj"
    wd[first] = fmt(wd[first], fq)
    wd["kv_a_proj_with_mqa"] = fmt(wd["kv_a_proj_with_mqa"], fkv)
    w = M.MLAWeights(**wd)
    for T in (1, 3, 8, 9):
        x = rand_hidden(T, 256, T)
        seq, pos = np.zeros(T, np.int64), np.arange(T, dtype=np.int64)
        c1, c2 = M.new_latent_cache(ref.mcfg, 1, T), M.new_latent_cache(ref.mcfg, 1, T)
        got = M.mla_attention_block(x, w, ref.mcfg, c1, seq, pos)
        want = _block_by_ops(ref, w, x, c2, seq, pos)
        np.testing.assert_array_equal(got, want, err_msg=f"T={T}")
        np.testing.assert_array_equal(c1, c2)


def test_v3_rope_half_layout_block():
    """DeepseekV3Attention with rope_interleave=False (rotate-half pairs)."""
    ref = Ref("v3", 256, 4, None, 64, 32, 16, 32, SMALL_YARN, seed=11, rope_interleave=False)
    assert ref.mcfg.rope_interleave is False
    x = rand_hidden(30, 256, 6)
    want = ref.forward(x)
    for mode in ("absorbed", "decompressed"):
        cache = M.new_latent_cache(ref.mcfg, 1, 30)
        assert_close(block(ref, x, cache, np.zeros(30), np.arange(30), mode), want, mode)


@pytest.mark.parametrize("case,prefill,total", [("lite-yarn", 6, 10), ("tiny-qlora-yarn", 300, 1100)])
def test_prefill_then_decode_equals_full_forward(case, prefill, total):
    """Prefill P tokens, then decode one token at a time through the cache (contexts past 1024
    rows exercise the split-and-merge of the absorbed kernel)."""
    version, d, H, ql, L, nope, rope, v, rp, _ = BLOCK_CASES[case]
    ref = Ref(version, d, H, ql, L, nope, rope, v, rp, seed=7)
    x = rand_hidden(total, d, 8)
    want = ref.forward(x)
    cache = M.new_latent_cache(ref.mcfg, 2, total)
    outs = [block(ref, x[:prefill], cache, np.zeros(prefill), np.arange(prefill))]
    steps = list(range(prefill, total))
    if len(steps) > 12:  # keep the test fast: decode single tokens at the start and the end, pairs between
        for t in steps[:4]:
            outs.append(block(ref, x[t:t + 1], cache, np.zeros(1), np.array([t])))
        mid = steps[4:-4]
        for i in range(0, len(mid), 64):
            c = mid[i:i + 64]
            outs.append(block(ref, x[c[0]:c[-1] + 1], cache, np.zeros(len(c)), np.array(c), "absorbed"))
        for t in steps[-4:]:
            outs.append(block(ref, x[t:t + 1], cache, np.zeros(1), np.array([t])))
    else:
        for t in steps:
            outs.append(block(ref, x[t:t + 1], cache, np.zeros(1), np.array([t])))
    assert_close(np.concatenate(outs), want, f"{case} prefill+decode")


@pytest.mark.parametrize("case", ["tiny-qlora-yarn", "lite-yarn"])
def test_batch_of_sequences_equals_one_by_one(case):
    version, d, H, ql, L, nope, rope, v, rp, _ = BLOCK_CASES[case]
    ref = Ref(version, d, H, ql, L, nope, rope, v, rp, seed=9)
    lens = [11, 3, 24] if case == "tiny-qlora-yarn" else [7, 2, 9]
    xs = [rand_hidden(n + 2, d, 20 + i) for i, n in enumerate(lens)]
    wants = [ref.forward(x) for x in xs]
    cache = M.new_latent_cache(ref.mcfg, 4, max(lens) + 2)
    slots = [2, 0, 3]  # cache rows of the three sequences (row 1 unused)
    # 1) all prompts in one call, tokens interleaved
    seq = np.concatenate([np.full(n, s) for n, s in zip(lens, slots)])
    pos = np.concatenate([np.arange(n) for n in lens])
    x = np.concatenate([xi[:n] for xi, n in zip(xs, lens)])
    perm = np.random.default_rng(0).permutation(len(seq))
    got = np.empty_like(x)
    got[perm] = block(ref, np.ascontiguousarray(x[perm]), cache, seq[perm], pos[perm])
    off = 0
    for n, w in zip(lens, wants):
        assert_close(got[off:off + n], w[:n], "batched prefill")
        off += n
    assert not cache[1].any()
    # 2) one decode token per sequence, one call; 3) a mixed call: two decode + one 1-token
    for step in range(2):
        x = np.stack([xi[n + step] for xi, n in zip(xs, lens)])
        got = block(ref, x, cache, np.array(slots), np.array([n + step for n in lens]))
        for i, (n, w) in enumerate(zip(lens, wants)):
            assert_close(got[i:i + 1], w[n + step:n + step + 1], f"batched decode step {step}")


def test_auto_mixes_forms_in_one_call():
    """One sequence prefills a long prompt (non-absorbed), another decodes (absorbed), in one call."""
    ref = Ref("v2", 128, 4, None, 64, 32, 16, 32, SMALL_YARN, seed=12)
    xa, xb = rand_hidden(40, 128, 30), rand_hidden(30, 128, 31)
    wa, wb = ref.forward(xa), ref.forward(xb)
    cache = M.new_latent_cache(ref.mcfg, 2, 40)
    block(ref, xb[:29], cache, np.ones(29), np.arange(29))
    assert M.mla_choose_mode(ref.mcfg, np.arange(40, dtype=np.int64)) == "decompressed"
    assert M.mla_choose_mode(ref.mcfg, np.array([29], np.int64)) == "absorbed"
    x = np.concatenate([xa, xb[29:30]])
    got = block(ref, x, cache, np.r_[np.zeros(40), 1], np.r_[np.arange(40), 29])
    assert_close(got[:40], wa, "prefill part")
    assert_close(got[40:], wb[29:30], "decode part")


@pytest.mark.parametrize("T", [3, 20])
def test_bf16_weights(T):
    """bf16 weights (every projection, kv_b_proj included, and the norms) against the reference
    on the same bf16-rounded weights in fp32; T=3 streams the weights (row-dot kernels),
    T=20 widens them per panel for sgemm."""
    ref = Ref("v2", 1024, 8, 384, 512, 128, 64, 128, LITE_YARN, seed=13, bf16=True)
    assert isinstance(ref.weights.kv_b_proj, BF16)
    x = rand_hidden(T, 1024, 14)
    want = ref.forward(x)
    for mode in ("absorbed", "decompressed"):
        cache = M.new_latent_cache(ref.mcfg, 1, T)
        assert_close(block(ref, x, cache, np.zeros(T), np.arange(T), mode), want, f"bf16 {mode}")


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_other_isa_paths(isa):
    prev = dsv2ext.get_isa()
    if dsv2ext.set_isa(isa) != isa:
        dsv2ext.set_isa(prev)
        pytest.skip(f"CPU lacks {isa}")
    try:
        ref = Ref("v2", 260, 5, None, 80, 32, 16, 24, SMALL_YARN, seed=15)  # widths not multiples of 16
        x = rand_hidden(300, 260, 16)
        want = ref.forward(x)
        for mode in ("absorbed", "decompressed"):
            cache = M.new_latent_cache(ref.mcfg, 1, 300)
            got = np.concatenate([block(ref, x[:298], cache, np.zeros(298), np.arange(298), mode),
                                  block(ref, x[298:], cache, np.zeros(2), np.arange(298, 300), mode)])
            assert_close(got, want, f"{isa} {mode}")
        ref_bf = Ref("v2", 129, 3, None, 48, 16, 16, 16, PLAIN, seed=17, bf16=True)
        x = rand_hidden(4, 129, 18)
        cache = M.new_latent_cache(ref_bf.mcfg, 1, 4)
        assert_close(block(ref_bf, x, cache, np.zeros(4), np.arange(4), "absorbed"), ref_bf.forward(x), "bf16")
    finally:
        dsv2ext.set_isa(prev)


# --------------------------------------------------------------------------- the attention kernels directly

def test_absorbed_and_decompressed_agree_on_a_random_cache():
    """Both forms on the same queries and cache: equal to rounding, for ragged sequences,
    several tokens per sequence in any order, a thread count of 1 and 2."""
    rng = np.random.default_rng(21)
    H, nope, rope, v, L = 6, 32, 16, 40, 96
    B, S = 3, 700
    cache = rng.standard_normal((B, S, L + rope)).astype(np.float32)
    kv_b = (rng.standard_normal((H * (nope + v), L)) / math.sqrt(L)).astype(np.float32)
    seq = np.array([0, 2, 2, 1, 0, 2, 1], np.int64)
    pos = np.array([699, 0, 5, 300, 12, 513, 299], np.int64)
    q = (rng.standard_normal((len(seq), H, nope + rope)) * 0.5).astype(np.float32)
    scale = 0.15
    # float64 reference of the plain definition
    ref = np.empty((len(seq), H, v))
    for t, (s, p) in enumerate(zip(seq, pos)):
        rows = cache[s, :p + 1].astype(np.float64)
        kv = rows[:, :L] @ kv_b.astype(np.float64).T
        kv = kv.reshape(-1, H, nope + v)
        for h in range(H):
            k = np.concatenate([kv[:, h, :nope], rows[:, L:]], axis=1)
            sc = k @ q[t, h].astype(np.float64) * scale
            pr = np.exp(sc - sc.max())
            pr /= pr.sum()
            ref[t, h] = pr @ kv[:, h, nope:]
    prev = dsv2ext.get_num_threads()
    try:
        for nt in (1, 2):
            dsv2ext.set_num_threads(nt)
            a = M.mla_attention_absorbed(q, cache, seq, pos, kv_b, scale)
            b = M.mla_attention_decompressed(q, cache, seq, pos, kv_b, scale)
            c = M.mla_attention(q, cache, seq, pos, kv_b, scale, "auto")
            assert a.shape == (len(seq), H, v)
            assert_close(a, ref, f"absorbed nt={nt}")
            assert_close(b, ref, f"decompressed nt={nt}")
            assert_close(a, b, "absorbed vs decompressed")
            np.testing.assert_array_equal(c, a)  # decode-like tokens: auto runs the absorbed form
    finally:
        dsv2ext.set_num_threads(prev)


class Int8Weight:
    """A minimal int8-tagged weight (per-row groups of `group` columns share a scale)."""
    __dsv2_dtype__ = "int8"

    def __init__(self, w: np.ndarray, group: int) -> None:
        rows, cols = w.shape
        g = w.reshape(rows, cols // group, group)
        self.scales = (np.abs(g).max(axis=2) / 127.0).astype(np.float32)
        self.data = np.clip(np.rint(g / self.scales[..., None]), -127, 127).astype(np.int8).reshape(rows, cols)
        self.shape = w.shape

    def to_float32(self) -> np.ndarray:
        rows, cols = self.shape
        g = self.data.reshape(rows, self.scales.shape[1], -1).astype(np.float32) * self.scales[..., None]
        return g.reshape(rows, cols)


@pytest.mark.parametrize("T", [2, 12])
def test_int8_kv_b_proj(T):
    """kv_b_proj as an int8-tagged weight: both forms equal the fp32 result on the dequantized weight."""
    rng = np.random.default_rng(31)
    H, nope, rope, v, L = 4, 32, 16, 32, 64
    cache = rng.standard_normal((2, 40, L + rope)).astype(np.float32)
    w8 = Int8Weight((rng.standard_normal((H * (nope + v), L)) / 8).astype(np.float32), 32)
    wf = w8.to_float32()
    seq = rng.integers(0, 2, T).astype(np.int64)
    pos = rng.permutation(40)[:T].astype(np.int64)
    q = rng.standard_normal((T, H, nope + rope)).astype(np.float32)
    ref = M.mla_attention_absorbed(q, cache, seq, pos, wf, 0.2)
    for fn in (M.mla_attention_absorbed, M.mla_attention_decompressed):
        assert_close(fn(q, cache, seq, pos, w8, 0.2), ref, f"int8 {fn.__name__}")


def test_config_from_model_config():
    """MLAConfig from the package's ModelConfig (official configurations)."""
    config = pytest.importorskip("dsv2ext.config")
    lite = M.MLAConfig.from_model_config(config.ModelConfig.named("deepseek-v2-lite"))
    assert (lite.num_heads, lite.q_lora_rank, lite.latent_dim) == (16, None, 576)
    assert lite.softmax_scale == pytest.approx(0.1147214, abs=5e-8)
    np.testing.assert_array_equal(lite.inv_freq, M.rope_inv_freq(64, 10000, LITE_YARN)[0])
    v3 = M.MLAConfig.from_model_config(config.ModelConfig.named("deepseek-v3"))
    assert (v3.num_heads, v3.q_lora_rank, v3.rope_interleave) == (128, 1536, True)
    assert v3.softmax_scale == pytest.approx(0.1352338, abs=5e-8)
    with pytest.raises(TypeError, match="config"):
        M.MLAConfig.from_model_config({"num_attention_heads": 16})


def test_scratch_release_then_reuse():
    ref = Ref("v2", 64, 2, None, 32, 16, 8, 16, PLAIN, seed=41)
    x = rand_hidden(300, 64, 42)
    cache = M.new_latent_cache(ref.mcfg, 1, 300)
    a = block(ref, x, cache, np.zeros(300), np.arange(300))
    M.release_scratch_memory()
    b = block(ref, x, cache, np.zeros(300), np.arange(300))
    np.testing.assert_array_equal(a, b)


def test_flops_rule():
    cfg = M.MLAConfig.from_hf_config(hf_config("v2", 2048, 16, None, 512, 128, 64, 128, LITE_YARN))
    f = M.mla_attention_flops(cfg, np.array([4095], np.int64))
    assert f["absorbed"] < f["decompressed"]
    # a lone first token: decompressing one row costs about what absorbing the query does
    assert M.mla_choose_mode(cfg, np.array([0], np.int64)) == "decompressed"
    assert M.mla_choose_mode(cfg, np.array([1], np.int64)) == "absorbed"
    assert M.mla_choose_mode(cfg, np.arange(100, 120, dtype=np.int64)) == "absorbed"  # a short chunk on a context
    assert M.mla_choose_mode(cfg, np.arange(512, dtype=np.int64)) == "decompressed"
    # formula check for one case (H=16, nope 128, rope 64, v 128, L 512)
    p = np.arange(100, 110, dtype=np.int64)
    S = int((p + 1).sum())
    fa = 2 * 16 * (10 * 128 * 512 + S * 576 + S * 512 + 10 * 512 * 128)
    fd = 2 * 16 * (110 * 512 * 256 + S * 192 + S * 128)
    f = M.mla_attention_flops(cfg, p)
    assert f["absorbed"] == fa and f["decompressed"] == fd


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def small():
    ref = Ref("v2", 64, 2, None, 32, 16, 8, 16, PLAIN, seed=1)
    x = rand_hidden(4, 64, 2)
    cache = M.new_latent_cache(ref.mcfg, 2, 8)
    return ref, x, cache


def misaligned_f32(shape) -> np.ndarray:
    n = int(np.prod(shape))
    buf = np.zeros(n * 4 + 1, np.uint8)
    return np.frombuffer(buf.data, dtype=np.float32, count=n, offset=1).reshape(shape)


def test_block_bad_inputs(small):
    ref, x, cache = small
    W, cfg = ref.weights, ref.mcfg
    seq, pos = np.zeros(4, np.int64), np.arange(4, dtype=np.int64)

    def run(**kw):
        args = dict(hidden=x, weights=W, cfg=cfg, cache=cache, seq_ids=seq, positions=pos)
        args.update(kw)
        return M.mla_attention_block(**args)

    cases = [
        (TypeError, "hidden", dict(hidden=x.astype(np.float64))),
        (ValueError, "hidden", dict(hidden=x[0])),
        (ValueError, "hidden", dict(hidden=np.asfortranarray(x))),
        (ValueError, "hidden", dict(hidden=misaligned_f32(x.shape))),
        (ValueError, "q_proj", dict(hidden=np.zeros((4, 32), np.float32))),
        (ValueError, "out", dict(out=np.zeros((64, 4), np.float32).T)),  # not C-contiguous
        (ValueError, "cache", dict(cache=np.zeros((2, 8, 41), np.float32))),
        (ValueError, "cache", dict(cache=np.zeros((2, 8), np.float32))),
        (TypeError, "cache", dict(cache=np.zeros((2, 8, 40), np.float64))),
        (ValueError, "positions", dict(positions=np.array([0, 1, 2, 8], np.int64))),
        (ValueError, "positions", dict(positions=np.array([0, 1, -1, 3], np.int64))),
        (ValueError, "positions", dict(positions=np.array([0, 1, 1, 3], np.int64))),  # same cache row twice
        (TypeError, "positions", dict(positions=pos.astype(np.int32))),
        (ValueError, "positions", dict(positions=pos[:3])),
        (ValueError, "seq_ids", dict(seq_ids=np.array([0, 0, 2, 0], np.int64))),
        (ValueError, "seq_ids", dict(seq_ids=seq[:2])),
        (TypeError, "seq_ids", dict(seq_ids=[0, 0, 0, 0])),
        (ValueError, "mode", dict(mode="fast")),
        (TypeError, "weights", dict(weights=vars(W))),
        (TypeError, "cfg", dict(cfg=vars(cfg))),
    ]
    before = cache.copy()
    for exc, name, kw in cases:
        with pytest.raises(exc, match=name):
            run(**kw)
    ro = np.zeros((4, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        run(out=ro)
    with pytest.raises(ValueError, match="out"):
        run(out=np.zeros((4, 63), np.float32))
    rc = cache.copy()
    rc.flags.writeable = False
    with pytest.raises(ValueError, match="cache"):
        run(cache=rc)
    with pytest.raises(ValueError, match="hidden"):  # the output may not alias the input
        run(out=x)
    np.testing.assert_array_equal(cache, before)  # nothing was written by a rejected call
    # weights: wrong shape, bare uint16, missing q path
    import dataclasses
    bad = [
        (ValueError, "kv_b_proj", dataclasses.replace(W, kv_b_proj=np.zeros((60, 32), np.float32))),
        (TypeError, "o_proj", dataclasses.replace(W, o_proj=np.zeros((64, 32), np.uint16))),
        (ValueError, "q_proj", dataclasses.replace(W, q_proj=None)),
        (ValueError, "q_a_proj", dataclasses.replace(W, q_a_proj=np.zeros((8, 64), np.float32))),
        (TypeError, "kv_a_layernorm", dataclasses.replace(W, kv_a_layernorm=[1.0] * 32)),
    ]
    for exc, name, w in bad:
        with pytest.raises(exc, match=name):
            run(weights=w)
    with pytest.raises(ValueError, match="kv_b_proj"):  # the C binding checks shapes on its own
        dsv2ext._C.mla_attention_block(
            np.zeros((4, 64), np.float32), x, cache, seq, pos, cfg.inv_freq, W.q_proj, None, None, None,
            W.kv_a_proj_with_mqa, W.kv_a_layernorm, np.zeros((60, 32), np.float32), W.o_proj,
            2, 16, 8, 16, 32, 0, 1e-6, 0.1, 1.0, True, 0)
    with pytest.raises(ValueError, match="softmax_scale"):
        dsv2ext._C.mla_attention_block(
            np.zeros((4, 64), np.float32), x, cache, seq, pos, cfg.inv_freq, W.q_proj, None, None, None,
            W.kv_a_proj_with_mqa, W.kv_a_layernorm, W.kv_b_proj, W.o_proj,
            2, 16, 8, 16, 32, 0, 1e-6, -0.1, 1.0, True, 0)


def test_config_bad_inputs():
    inv, _ = M.rope_inv_freq(8)
    ok = dict(num_heads=2, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=32,
              q_lora_rank=None, softmax_scale=0.1, inv_freq=inv)
    M.MLAConfig(**ok)
    with pytest.raises(ValueError, match="inv_freq"):
        M.MLAConfig(**{**ok, "inv_freq": np.zeros(3, np.float32)})
    with pytest.raises(TypeError, match="inv_freq"):
        M.MLAConfig(**{**ok, "inv_freq": inv.astype(np.float64)})
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        M.MLAConfig(**{**ok, "qk_rope_head_dim": 7})
    with pytest.raises(ValueError, match="softmax_scale"):
        M.MLAConfig(**{**ok, "softmax_scale": 0.0})
    with pytest.raises(ValueError, match="rope_scaling"):
        M.rope_inv_freq(64, 10000, {"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="dim"):
        M.rope_inv_freq(63)
    with pytest.raises(ValueError, match="factor"):
        M.rope_inv_freq(64, 10000, {"rope_type": "yarn", "factor": -2.0, "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="config"):
        M.MLAConfig.from_hf_config({"kv_lora_rank": 512})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        M.rope_inv_freq(64, 10000, {**LITE_YARN, "partial_rotary_factor": 0.5})


def test_kernel_bad_inputs():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 2, 24)).astype(np.float32)
    cache = rng.standard_normal((2, 10, 40)).astype(np.float32)
    kv_b = rng.standard_normal((2 * 32, 32)).astype(np.float32)
    seq, pos = np.zeros(3, np.int64), np.array([0, 4, 9], np.int64)
    M.mla_attention_absorbed(q, cache, seq, pos, kv_b, 0.2)
    with pytest.raises(TypeError, match="q"):
        M.mla_attention_absorbed(q.astype(np.float64), cache, seq, pos, kv_b, 0.2)
    with pytest.raises(ValueError, match="positions"):
        M.mla_attention_absorbed(q, cache, seq, np.array([0, 4, 10], np.int64), kv_b, 0.2)
    with pytest.raises(ValueError, match="seq_ids"):
        M.mla_attention_decompressed(q, cache, np.array([0, 2, 0], np.int64), pos, kv_b, 0.2)
    with pytest.raises(ValueError, match="kv_b_proj"):
        M.mla_attention_absorbed(q, cache, seq, pos, kv_b[:63], 0.2)
    with pytest.raises(ValueError, match="cache"):  # rope width (40 - 33 = 7) odd
        M.mla_attention_absorbed(q, cache, seq, pos, np.zeros((64, 33), np.float32), 0.2)
    with pytest.raises(ValueError, match="softmax_scale"):
        M.mla_attention_absorbed(q, cache, seq, pos, kv_b, float("nan"))
    with pytest.raises(ValueError, match="out"):
        M.mla_attention_absorbed(q, cache, seq, pos, kv_b, 0.2, out=np.zeros((3, 2, 17), np.float32))
    with pytest.raises(ValueError, match="mode"):
        M.mla_attention(q, cache, seq, pos, kv_b, 0.2, mode="flash")
    with pytest.raises(ValueError, match="q"):
        M.mla_attention_absorbed(q[:, :, ::2].copy()[:, :, :5], cache, seq, pos, kv_b, 0.2)
    # apply_rope
    inv, _ = M.rope_inv_freq(8)
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="x"):
        M.apply_rope(x[:, :, :7], pos, inv[:3])
    with pytest.raises(ValueError, match="x"):
        M.apply_rope(rng.standard_normal((3, 2, 16)).astype(np.float32)[:, :, ::2], pos, inv)
    ro = x.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="x"):
        M.apply_rope(ro, pos, inv)
    with pytest.raises(ValueError, match="positions"):
        M.apply_rope(x, np.array([0, -1, 2], np.int64), inv)
    with pytest.raises(ValueError, match="inv_freq"):
        M.apply_rope(x, pos, inv[:3])
    with pytest.raises(ValueError, match="positions"):
        M.apply_rope(x, pos[:2], inv)
    # compress
    h = rng.standard_normal((3, 16)).astype(np.float32)
    wa = rng.standard_normal((40, 16)).astype(np.float32)
    wn = np.ones(32, np.float32)
    M.mla_compress_kv(h, wa, wn, cache, seq, pos, inv)
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa"):
        M.mla_compress_kv(h, wa[:, :15], wn, cache, seq, pos, inv)
    with pytest.raises(ValueError, match="positions"):
        M.mla_compress_kv(h, wa, wn, cache, seq, np.array([1, 1, 2], np.int64), inv)
    with pytest.raises(ValueError, match="hidden"):
        M.mla_compress_kv(misaligned_f32((3, 16)), wa, wn, cache, seq, pos, inv)
