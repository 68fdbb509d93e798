"""dsv2ext.torch: torch.library ops, gradient policy, drop-in modules, patch() of transformers models.

Reference: transformers' DeepseekV2 / DeepseekV3 (CPU, fp32) on small random models with
non-trivial weights (tests/hf_models.py) and one decoder layer at real V2-Lite shapes.

Tolerances (max |got - ref| / max |ref|):
* kernels called through the torch ops vs the NumPy API: bit-identical (same kernel);
* fp32 logits of a patched model vs the unpatched model: <= 1e-5 (measured ~6e-7);
* bf16 model (kernels in fp32 on bf16 weights, bf16 residual stream) vs the unpatched model in
  fp32 with the same weights: median over tokens of the per-token error <= 1.5e-2 and no worse
  than 1.2x the unpatched bf16 model's own (a few tokens change experts under bf16 rounding);
* modules with bf16 weights on fp32 activations vs transformers in fp32 on the widened weights:
  <= 1e-5 (bf16 widening is exact);
* "fallback" gradients vs transformers' autograd: <= 2e-5 per parameter tensor.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import dsv2ext  # noqa: E402
import dsv2ext.torch as dt  # noqa: E402
from dsv2ext import ops  # noqa: E402
from dsv2ext.torch._convert import weight_view  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import YARN, make_model  # noqa: E402

FP32_TOL = 1e-5


def rel(got, ref) -> float:
    got = torch.as_tensor(got).double()
    ref = torch.as_tensor(ref).double()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# --------------------------------------------------------------------------- models (built once, copied)

CONFIGS = {
    "v2": ("v2", {}),
    "v3": ("v3", {}),
    # YaRN rope, group-limited routing, q compression on V2
    "v2-yarn-grouped": ("v2", dict(rope_parameters=YARN, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                   routed_scaling_factor=2.0, q_lora_rank=24)),
    # rotate-half rope layout, no q compression, YaRN on V3
    "v3-halfrope-yarn": ("v3", dict(rope_interleave=False, q_lora_rank=None, rope_parameters=YARN)),
}


@functools.lru_cache(maxsize=None)
def _base(key: str):
    kind, over = CONFIGS[key]
    return make_model(kind, 7, num_key_value_heads=4, **over)


def model(key: str):
    """A fresh copy of the small random model ``key`` (fp32, eval)."""
    return copy.deepcopy(_base(key))


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


# --------------------------------------------------------------------------- import / optional torch

def test_import_dsv2ext_does_not_need_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dsv2ext\n"
            "assert 'dsv2ext.torch' not in sys.modules\n"
            "try:\n"
            "    import dsv2ext.torch\n"
            "except ImportError as e:\n"
            "    assert 'needs PyTorch' in str(e), e\n"
            "    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_dsv2ext_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, dsv2ext; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- small op fixtures

D, H, NOPE, ROPE, V, KVL, E, INTER, K = 32, 2, 8, 4, 8, 16, 8, 16, 2


@functools.lru_cache(maxsize=None)
def _op_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    w = dict(
        norm=1 + 0.1 * torch.randn(D, generator=g),
        q_proj=lin(H * (NOPE + ROPE), D), kv_a_proj_with_mqa=lin(KVL + ROPE, D),
        kv_a_layernorm=1 + 0.1 * torch.randn(KVL, generator=g), kv_b_proj=lin(H * (NOPE + V), KVL),
        o_proj=lin(D, H * V), router=lin(E, D), gate_up=torch.randn(E, 2 * INTER, D, generator=g) / math.sqrt(D),
        down=torch.randn(E, D, INTER, generator=g) / math.sqrt(INTER),
        sg=lin(INTER, D), su=lin(INTER, D), sd=lin(D, INTER), bias=0.1 * torch.randn(E, generator=g),
    )
    inv, af = ops.rope_inv_freq(ROPE, 10000.0)
    cfg = ops.MLAConfig(num_heads=H, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V, kv_lora_rank=KVL,
                        q_lora_rank=None, softmax_scale=(NOPE + ROPE) ** -0.5, inv_freq=inv, rope_attention_factor=af)
    return w, cfg


def _np(t):
    return weight_view(t.contiguous(), "t")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_ops_equal_numpy_kernels(wdtype):
    """The torch ops hand the same memory to the same kernels: results are bit-identical."""
    w, cfg = _op_weights()
    w = {k: (v.to(wdtype) if k != "bias" else v) for k, v in w.items()}
    g = torch.Generator().manual_seed(1)
    T = 7
    x = torch.randn(T, D, generator=g)
    xn = x.numpy()
    np.testing.assert_array_equal(dt.rms_norm(x, w["norm"]).numpy(), ops.rms_norm(xn, _np(w["norm"])))
    np.testing.assert_array_equal(dt.linear(x, w["q_proj"]).numpy(), ops.linear(xn, _np(w["q_proj"])))
    np.testing.assert_array_equal(dt.swiglu_mlp(x, w["sg"], w["su"], w["sd"]).numpy(),
                                  ops.swiglu_mlp(xn, _np(w["sg"]), _np(w["su"]), _np(w["sd"])))
    moe_cfg = ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                            routed_scaling_factor=2.5)
    out, ids, wts = dt.moe_block(x, w["router"], w["gate_up"], w["down"], (w["sg"], w["su"], w["sd"]), moe_cfg,
                                 w["bias"], return_routing=True)
    ref_out, ref_ids, ref_w = ops.moe_block(xn, _np(w["router"]),
                                            ops.StackedExperts(_np(w["gate_up"]), _np(w["down"])),
                                            (_np(w["sg"]), _np(w["su"]), _np(w["sd"])), moe_cfg,
                                            correction_bias=w["bias"].numpy(), return_routing=True)
    np.testing.assert_array_equal(out.numpy(), ref_out)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_array_equal(wts.numpy(), ref_w)
    rids, rw = dt.moe_route(x, w["router"], moe_cfg, w["bias"])
    np.testing.assert_array_equal(rids.numpy(), ref_ids)
    np.testing.assert_array_equal(rw.numpy(), ref_w)
    # MLA: block, and compress + rope + attention separately
    seq = torch.tensor([0, 0, 0, 1, 1, 0, 1])
    pos = torch.tensor([0, 1, 2, 0, 1, 3, 2])
    c1 = torch.zeros(2, 8, KVL + ROPE)
    c2 = np.zeros((2, 8, KVL + ROPE), np.float32)
    mw = {k: w[k] for k in dt.ops.MLA_WEIGHT_NAMES if k in w}
    got = dt.mla_attention_block(x, mw, cfg, c1, seq, pos)
    ref = ops.mla_attention_block(xn, ops.MLAWeights(**{k: _np(v) for k, v in mw.items()}), cfg, c2, seq.numpy(),
                                  pos.numpy())
    np.testing.assert_array_equal(got.numpy(), ref)
    np.testing.assert_array_equal(c1.numpy(), c2)
    c3 = torch.zeros(2, 8, KVL + ROPE)
    rows = dt.mla_compress_kv(x, w["kv_a_proj_with_mqa"], w["kv_a_layernorm"], c3, seq, pos, cfg.inv_freq)
    np.testing.assert_array_equal(c3.numpy(), c2)
    np.testing.assert_array_equal(rows.numpy(), c2[seq.numpy(), pos.numpy()])
    q = dt.linear(x, w["q_proj"]).view(T, H, NOPE + ROPE)
    q_pe = dt.apply_rope(q[..., NOPE:], pos, cfg.inv_freq)
    qn = ops.linear(xn, _np(w["q_proj"])).reshape(T, H, NOPE + ROPE)
    ops.apply_rope(qn[..., NOPE:], pos.numpy(), cfg.inv_freq)
    np.testing.assert_array_equal(q_pe.numpy(), qn[..., NOPE:])
    qr = torch.cat((q[..., :NOPE], q_pe), -1)
    for mode in ("absorbed", "decompressed"):
        np.testing.assert_array_equal(
            dt.mla_attention(qr, c3, seq, pos, w["kv_b_proj"], cfg.softmax_scale, mode).numpy(),
            ops.mla_attention(qn, c2, seq.numpy(), pos.numpy(), _np(w["kv_b_proj"]), cfg.softmax_scale, mode))


def test_ops_bf16_activations_and_reference():
    """bf16 activations are widened, results come back in bf16; fp32 results match the PyTorch reference."""
    from dsv2ext.torch import _reference as R

    w, cfg = _op_weights()
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(2))
    y = dt.linear(x.bfloat16(), w["q_proj"])
    assert y.dtype == torch.bfloat16 and y.shape == (5, 3, H * (NOPE + ROPE))
    assert rel(y.float(), R.linear(x.bfloat16(), w["q_proj"])) < 1e-2
    assert rel(dt.rms_norm(x, w["norm"]), R.rms_norm(x, w["norm"], 1e-6)) < FP32_TOL
    assert rel(dt.swiglu_mlp(x, w["sg"], w["su"], w["sd"]), R.swiglu_mlp(x, w["sg"], w["su"], w["sd"])) < FP32_TOL
    x2 = x.reshape(-1, D)
    moe_cfg = ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=K, routed_scaling_factor=1.5)
    out, ids, _ = dt.moe_block(x2, w["router"], w["gate_up"], w["down"], None, moe_cfg, return_routing=True)
    for static in (False, True):
        ref_out, _ = R.moe_block(x2, w["router"], w["gate_up"], w["down"], None, None, None, ids, "softmax", False,
                                 1.5, static)
        assert rel(out, ref_out) < FP32_TOL


def test_weights_are_not_copied():
    p = torch.randn(6, 4)
    assert weight_view(p, "p").ctypes.data == p.data_ptr()
    b = p.bfloat16()
    wb = weight_view(b, "b")
    assert isinstance(wb, dsv2ext.BF16) and wb.data.ctypes.data == b.data_ptr()
    with pytest.raises(ValueError, match="contiguous"):
        weight_view(p.T, "w")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        weight_view(p.half(), "w")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        weight_view(p.to(torch.int16), "w")


def test_opcheck_registrations():
    """Schemas, autograd registration and fake (meta) kernels of every op (torch.library.opcheck)."""
    w, cfg = _op_weights()
    O = torch.ops.dsv2ext
    T = 5
    x = torch.randn(T, D, requires_grad=True)
    seq = torch.zeros(T, dtype=torch.int64)
    pos = torch.arange(T)
    inv = torch.from_numpy(cfg.inv_freq)
    cache = torch.zeros(1, 8, KVL + ROPE)
    q = torch.randn(T, H, NOPE + ROPE, requires_grad=True)
    cases = [
        (O.rms_norm.default, (x, w["norm"], 1e-6, "fallback")),
        (O.linear.default, (x, w["q_proj"].bfloat16(), "error")),
        (O.swiglu_mlp.default, (x, w["sg"], w["su"], w["sd"], "fallback")),
        (O.apply_rope.default, (torch.randn(T, H, ROPE, requires_grad=True), pos, inv, 1.0, True, "fallback")),
        (O.moe_route.default, (x, w["router"], w["bias"], K, 4, 2, "noaux_tc", "sigmoid", True, 2.5, "fallback")),
        (O.moe_block.default, (x, w["router"], w["gate_up"], w["down"], w["sg"], w["su"], w["sd"], None, K, 1, 1,
                               "greedy", "softmax", False, 1.0, "fallback")),
        (O.mla_attention.default, (q, torch.randn(1, 8, KVL + ROPE), seq, pos, w["kv_b_proj"], 0.3, "auto",
                                   "fallback")),
        (O.mla_compress_kv_.default, (x.detach(), w["kv_a_proj_with_mqa"], w["kv_a_layernorm"], cache, seq, pos, inv,
                                      1.0, 1e-6, True)),
        (O.mla_attention_block_.default, (x.detach(), cache, seq, pos, w["q_proj"], None, None, None,
                                          w["kv_a_proj_with_mqa"], w["kv_a_layernorm"], w["kv_b_proj"], w["o_proj"],
                                          inv, H, NOPE, ROPE, V, KVL, 1e-6, 0.3, 1.0, True, "auto")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------- torch.compile

def _compiled_fn_setup():
    w, cfg = _op_weights()
    moe_cfg = ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                            routed_scaling_factor=2.5)
    inv = torch.from_numpy(cfg.inv_freq)
    mw = {k: w[k] for k in dt.ops.MLA_WEIGHT_NAMES if k in w}

    def f(x, cache, cache2, seq, pos):
        h = dt.rms_norm(x, w["norm"])
        x = x + dt.mla_attention_block(h, mw, cfg, cache, seq, pos)          # writes cache
        # the same attention from the smaller ops, on a second cache
        rows = dt.mla_compress_kv(h, w["kv_a_proj_with_mqa"], w["kv_a_layernorm"], cache2, seq, pos, inv)
        q = dt.linear(h, w["q_proj"]).view(-1, H, NOPE + ROPE)
        q = torch.cat((q[..., :NOPE], dt.apply_rope(q[..., NOPE:], pos, inv)), -1)
        a = dt.mla_attention(q, cache2, seq, pos, w["kv_b_proj"], cfg.softmax_scale).reshape(-1, H * V)
        x = x + dt.linear(a, w["o_proj"]) + 0.01 * rows.sum()
        h = dt.rms_norm(x, w["norm"])
        _, rw = dt.moe_route(h, w["router"], moe_cfg, w["bias"])
        y = dt.moe_block(h, w["router"], w["gate_up"], w["down"], (w["sg"], w["su"], w["sd"]), moe_cfg, w["bias"])
        return x + y + dt.swiglu_mlp(h, w["sg"], w["su"], w["sd"]) + rw.sum()

    return f


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    f = _compiled_fn_setup()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    T = 6
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    seq = torch.zeros(T, dtype=torch.int64)
    pos = torch.arange(T)

    def caches():
        return torch.zeros(1, 16, KVL + ROPE), torch.zeros(1, 16, KVL + ROPE)

    ce, cc = caches(), caches()
    with torch.no_grad():
        ye = f(x, *ce, seq, pos)
        yc = cf(x, *cc, seq, pos)
    assert torch.equal(ye, yc)
    assert torch.equal(ce[0], cc[0]) and torch.equal(ce[1], cc[1]) and cc[0].abs().sum() > 0
    # the cache written by the block op equals the one written by mla_compress_kv_
    assert torch.equal(cc[0], cc[1])

    # "error" mode: the compiled backward raises at run time (not silently zero)
    xr = x.clone().requires_grad_()
    y = cf(xr, *caches(), seq, pos)
    assert y.requires_grad and y.grad_fn is not None
    with pytest.raises(RuntimeError, match=r"dsv2ext::\w+: no backward.*set_grad_mode\('fallback'\)"):
        y.sum().backward()
    assert xr.grad is None
    # "fallback" mode: recompiles (the mode is a guarded constant), gradients equal eager fallback
    with dt.grad_mode("fallback"):
        y = cf(xr, *caches(), seq, pos)
    y.sum().backward()
    g_compiled = xr.grad.clone()
    xr.grad = None
    with dt.grad_mode("fallback"):
        f(xr, *caches(), seq, pos).sum().backward()
    assert rel(g_compiled, xr.grad) < FP32_TOL


# --------------------------------------------------------------------------- gradient policy

def test_grad_mode_api():
    assert dt.get_grad_mode() == "error"
    with dt.grad_mode("fallback"):
        assert dt.get_grad_mode() == "fallback"
    assert dt.get_grad_mode() == "error"
    prev = dt.set_grad_mode("fallback")
    assert prev == "error" and dt.set_grad_mode("error") == "fallback"
    with pytest.raises(ValueError, match="mode"):
        dt.set_grad_mode("detach")


def test_default_backward_raises_clear_error():
    m = model("v2")
    dt.patch(m)
    ids = ids_for(1, 9)
    out = m(ids, labels=ids, use_cache=False)
    assert out.loss.requires_grad  # never detached
    with pytest.raises(RuntimeError, match=r"dsv2ext::\w+: no backward.*grad_mode\('fallback'\)"):
        out.loss.backward()
    with torch.no_grad():
        assert not m(ids).logits.requires_grad


@pytest.mark.parametrize("key", ["v2", "v3-halfrope-yarn"])
def test_fallback_gradients_match_transformers(key):
    ref = model(key)
    m = model(key)
    dt.patch(m)
    ids = ids_for(2, 9, seed=4)
    loss_ref = ref(ids, labels=ids, use_cache=False).loss
    loss_ref.backward()
    with dt.grad_mode("fallback"):
        loss = m(ids, labels=ids, use_cache=False).loss
    loss.backward()  # outside the context: the mode was captured by the forward
    assert rel(loss.detach(), loss_ref.detach()) < FP32_TOL
    got = dict(m.named_parameters())
    n_checked = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert got[name].grad is None, name
            continue
        assert got[name].grad is not None, name
        assert rel(got[name].grad, p.grad) < 2e-5, name
        n_checked += 1
    assert n_checked == sum(1 for _ in ref.parameters())


def test_fallback_refuses_rows_cached_by_an_earlier_call():
    m = model("v2")
    dt.patch(m)
    ids = ids_for(1, 8)
    with torch.no_grad():
        out = m(ids[:, :6], use_cache=True)
    with dt.grad_mode("fallback"), pytest.raises(RuntimeError, match="earlier call"):
        m(ids[:, 6:], cache=out.cache, use_cache=True)


# --------------------------------------------------------------------------- patch(): parity and generate

@pytest.mark.parametrize("key", list(CONFIGS))
def test_patch_logits_and_greedy_generate(key):
    ref = model(key)
    m = model(key)
    ids = ids_for(1, 13, seed=5)
    with torch.no_grad():
        logits_ref = ref(ids).logits
        n_new = 32 if key in ("v2", "v3") else 8
        gen_ref = ref.generate(ids, max_new_tokens=n_new, do_sample=False)
    report = dt.patch(m)
    n = m.config.num_hidden_layers
    dense = m.config.first_k_dense_replace
    assert report.counts == {"attention": n, "moe": n - dense, "mlp": dense, "total": 2 * n}
    assert report.attention == list(range(n)) and not report.skipped
    assert "3 attention" in str(report)
    assert dt.is_patched(m) and not dt.is_patched(ref)
    with torch.no_grad():
        out = m(ids)
        gen = m.generate(ids, max_new_tokens=n_new, do_sample=False)
    err = rel(out.logits, logits_ref)
    assert err < FP32_TOL, err
    assert gen.shape == (1, 13 + n_new)
    assert torch.equal(gen, gen_ref)
    # the cache of the forward holds the latent rows (width kv_lora + rope), not expanded K/V
    layer = out.cache.layers[0]
    assert isinstance(layer, dt.LatentCacheLayer)
    assert layer.latent.shape[-1] == m.config.kv_lora_rank + m.config.qk_rope_head_dim
    assert out.cache.get_seq_length() == 13


@pytest.mark.parametrize("key", ["v2", "v3"])
def test_left_padded_batch(key):
    ref = model(key)
    m = model(key)
    dt.patch(m)
    ids = ids_for(3, 10, seed=6)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        g_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        g = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(g, g_ref)
        pid = (mask.cumsum(-1) - 1).clamp(min=0)
        l_ref = ref(ids, attention_mask=mask, position_ids=pid).logits
        lg = m(ids, attention_mask=mask, position_ids=pid).logits
        real = mask.bool()
        assert rel(lg[real], l_ref[real]) < FP32_TOL
        # positions that count padding cannot be reproduced on the compact latent cache: clear error
        with pytest.raises(ValueError, match="position_ids"):
            m(ids, attention_mask=mask)


def test_eager_attention_masks_and_beam_search_and_crop():
    ref = model("v3")
    m = model("v3")
    for mm in (ref, m):
        mm.config._attn_implementation = "eager"  # float additive masks instead of sdpa's bool masks
    dt.patch(m)
    ids = ids_for(2, 9, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0),
                           ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0))
        one = ids[:1]
        assert torch.equal(m.generate(one, max_new_tokens=5, num_beams=3, do_sample=False),
                           ref.generate(one, max_new_tokens=5, num_beams=3, do_sample=False))
        # crop(): drop the last 3 cached tokens and recompute them
        full = m(one).logits
        out = m(one, use_cache=True)
        out.cache.crop(-3)
        assert out.cache.get_seq_length() == 6
        again = m(one[:, 6:], cache=out.cache).logits
        assert rel(again, full[:, 6:]) < FP32_TOL


def test_other_instances_untouched_and_unpatch_restores():
    a = model("v2")
    b = model("v2")
    ids = ids_for(1, 12, seed=9)
    with torch.no_grad():
        before = b(ids).logits
    orig_attn = [layer.self_attn for layer in a.model.layers]
    orig_mlp = [layer.mlp for layer in a.model.layers]
    ptrs = {k: v.data_ptr() for k, v in a.state_dict().items()}
    dt.patch(a)
    # parameters shared (no copy), state_dict keys unchanged
    assert {k: v.data_ptr() for k, v in a.state_dict().items()} == ptrs
    assert not dt.is_patched(b)
    assert all(type(layer.self_attn).__name__ == "DeepseekV2Attention" for layer in b.model.layers)
    with torch.no_grad():
        assert torch.equal(b(ids).logits, before)
    again = dt.patch(a)  # idempotent
    assert again.counts["total"] == 0 and len(again.skipped) == 6
    rep = dt.unpatch(a)
    assert rep.counts["total"] == 6 and rep.action == "unpatch"
    assert [layer.self_attn for layer in a.model.layers] == orig_attn
    assert [layer.mlp for layer in a.model.layers] == orig_mlp
    with torch.no_grad():
        assert torch.equal(a(ids).logits, before)
    assert dt.unpatch(a).counts["total"] == 0


@pytest.mark.parametrize("key", ["v2", "v3"])
def test_bf16_model(key):
    """A bf16 model: the patched kernels compute in fp32 on the bf16 weights; the residual stream,
    norms and lm_head stay bf16 (transformers).  Reference: the unpatched model in fp32 with the
    same (widened) weights.  A few tokens change their experts under bf16 rounding (a routing flip
    moves that token's logits a lot, with or without the patch), so the criterion is the median
    over tokens of max|err| / max|logit| of the token: <= 1.5e-2 (measured 0.8-1.0 %), and no
    worse than 1.2x the unpatched bf16 model's."""
    mb = model(key).to(torch.bfloat16)
    ref32 = model(key)
    ref32.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    ids = ids_for(2, 16, seed=10)

    def per_token(logits, ref):
        return float(((logits.float() - ref).abs().amax(-1) / ref.abs().amax(-1)).median())

    with torch.no_grad():
        l32 = ref32(ids).logits
        err_unpatched = per_token(mb(ids).logits, l32)
        dt.patch(mb)
        out = mb(ids).logits
        gen = mb.generate(ids[:1], max_new_tokens=32, do_sample=False)
    assert out.dtype == torch.bfloat16
    err = per_token(out, l32)
    assert err < 1.5e-2 and err <= 1.2 * err_unpatched, (err, err_unpatched)
    assert gen.shape == (1, 48) and int(gen.max()) < 256


@pytest.mark.parametrize("key", ["v2-yarn-grouped", "v3"])
def test_modules_with_bf16_weights_are_exact_in_fp32(key):
    """bf16 weights, fp32 activations: the kernels widen the weights exactly, so the result equals
    transformers in fp32 on the widened weights (prefill, then one decode step on the cache)."""
    from transformers import DynamicCache

    mb = model(key).to(torch.bfloat16)
    ref = model(key)
    ref.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    layer_b, layer_r = mb.model.layers[1], ref.model.layers[1]
    attn = dt.MLAAttention.from_hf(layer_b.self_attn, mb.config)
    moe = dt.MoE.from_hf(layer_b.mlp, mb.config)
    assert attn.kv_b_proj.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 7, 64, generator=g)
    x1 = torch.randn(1, 1, 64, generator=g)
    pos = torch.arange(8)[None]
    pe = ref.model.rotary_emb(x, pos)
    cr, cp = DynamicCache(config=ref.config), DynamicCache(config=ref.config)
    with torch.no_grad():
        r0 = layer_r.self_attn(hidden_states=x, attention_mask=None, cache=cr, position_ids=pos[:, :7],
                               position_embeddings=pe[:, :7] if key.startswith("v2") else (pe[0][:, :7], pe[1][:, :7]))[0]
        g0 = attn(hidden_states=x, attention_mask=None, cache=cp, position_ids=pos[:, :7])[0]
        r1 = layer_r.self_attn(hidden_states=x1, attention_mask=None, cache=cr, position_ids=pos[:, 7:],
                               position_embeddings=pe[:, 7:] if key.startswith("v2") else (pe[0][:, 7:], pe[1][:, 7:]))[0]
        g1 = attn(hidden_states=x1, attention_mask=None, cache=cp, position_ids=pos[:, 7:])[0]
        assert g0.dtype == torch.float32
        assert rel(g0, r0) < FP32_TOL and rel(g1, r1) < FP32_TOL
        assert rel(moe(x), layer_r.mlp(x)) < FP32_TOL


# --------------------------------------------------------------------------- errors

def test_clear_errors():
    from transformers import StaticCache

    m = model("v2")
    with pytest.raises(TypeError, match="DeepseekV2ForCausalLM"):
        dt.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        dt.patch(m, mode="fast")
    dt.patch(m)
    ids = ids_for(1, 6)
    with torch.no_grad():
        with pytest.raises(TypeError, match="DynamicCache"):
            m(ids, cache=StaticCache(config=m.config, max_cache_len=16), use_cache=True)
        with pytest.raises(ValueError, match="position_ids"):
            m(ids, position_ids=torch.arange(6)[None] + 3)
        attn = m.model.layers[0].self_attn
        h = torch.randn(1, 6, 64)
        custom = torch.ones(1, 1, 6, 6, dtype=torch.bool)  # bidirectional: not causal
        with pytest.raises(ValueError, match="causal"):
            attn(hidden_states=h, attention_mask=custom)
        with pytest.raises(ValueError, match="hidden size"):
            attn(hidden_states=torch.randn(1, 6, 32))
    # a cache already filled by transformers' own attention cannot be continued
    ref = model("v2")
    with torch.no_grad():
        cache = ref(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="start a new cache"):
            m(ids[:, :1], cache=cache)
    # ... and an unpatched model cannot continue a latent cache
    with torch.no_grad():
        cache = m(ids, use_cache=True).cache
        dt.unpatch(m)
        with pytest.raises(RuntimeError, match="latent rows"):
            m(ids[:, :1], cache=cache)
    # biases are not supported by the kernels
    mb = make_model("v2", 0, attention_bias=True)
    with pytest.raises(ValueError, match="bias"):
        dt.patch(mb)
    assert not dt.is_patched(mb)  # nothing swapped on error
    with pytest.raises(ValueError, match="grad_mode"):
        torch.ops.dsv2ext.linear(torch.randn(2, 4), torch.randn(3, 4), "detach")


# --------------------------------------------------------------------------- one layer at V2-Lite shapes

V2_LITE_LAYER = dict(
    hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, moe_intermediate_size=1408, intermediate_size=10944, first_k_dense_replace=0,
    num_hidden_layers=1, max_position_embeddings=163840,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 0.707, "mscale_all_dim": 0.707})


def v2_lite_one_layer(seed: int = 0):
    """DeepseekV2ForCausalLM with ONE MoE decoder layer at V2-Lite shapes (vocab 256), random
    weights of unit-variance activations, built on the meta device and filled in place (fast)."""
    from transformers import DeepseekV2ForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

    from hf_models import v2_config

    cfg = v2_config(**V2_LITE_LAYER)
    with torch.device("meta"):
        m = DeepseekV2ForCausalLM(cfg)
    m = m.to_empty(device="cpu")
    m.model.rotary_emb = DeepseekV2RotaryEmbedding(cfg)  # its buffers are computed, not loaded
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2, generator=g)
            else:
                a = math.sqrt(3.0 / p.shape[-1])  # variance 1 / fan_in
                p.uniform_(-a, a, generator=g)
        m.model.embed_tokens.weight.uniform_(-1.7, 1.7, generator=g)
    return m.eval()


def test_v2_lite_layer_prefill_and_decode():
    m = v2_lite_one_layer()
    ids = ids_for(1, 24, seed=12)
    with torch.no_grad():
        out = m(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        ref_step = m(nxt, cache=out.cache).logits
        report = dt.patch(m)
        assert report.counts == {"attention": 1, "moe": 1, "mlp": 0, "total": 2}
        got = m(ids, use_cache=True)
        got_step = m(nxt, cache=got.cache).logits
    assert rel(got.logits, out.logits) < FP32_TOL
    assert rel(got_step, ref_step) < FP32_TOL
    layer = got.cache.layers[0]
    assert layer.latent.shape[-1] == 576 and layer.length == 25
    assert got.cache.layers[0].keys is None  # no expanded K/V kept


def test_bf16_latent_cache():
    """patch(kv_dtype="bf16"): the cache keeps bfloat16 rows (layer 0: exactly the rounding of the fp32
    rows), the logits stay within 1e-2 of the fp32 cache's, and the torch op reads a bfloat16 cache
    tensor as the NumPy op reads a dsv2ext.BF16 one."""
    ids = ids_for(1, 20, seed=3)
    m32, m16 = model("v2"), model("v2")
    dt.patch(m32)
    dt.patch(m16, kv_dtype="bf16")
    with torch.no_grad():
        a, b = m32(ids), m16(ids)
    la, lb = a.cache.layers[0], b.cache.layers[0]
    assert lb.dtype == torch.bfloat16 and lb.latent.dtype == torch.bfloat16 and la.latent.dtype == torch.float32
    assert torch.equal(lb.latent[:, :20], la.latent[:, :20].to(torch.bfloat16))
    assert rel(b.logits, a.logits) < 1e-2
    assert "kv_dtype='bf16'" in repr(m16.model.layers[0].self_attn)
    with pytest.raises(ValueError, match="kv_dtype"):
        dt.patch(model("v2"), kv_dtype="fp8")
    rng = np.random.default_rng(4)
    cache = torch.from_numpy(rng.standard_normal((1, 9, 40)).astype(np.float32)).to(torch.bfloat16)
    q = torch.from_numpy(rng.standard_normal((2, 4, 24)).astype(np.float32))
    kvb = torch.from_numpy((rng.standard_normal((4 * 32, 32)) / 6).astype(np.float32))
    seq, pos = torch.zeros(2, dtype=torch.int64), torch.tensor([3, 8])
    got = dt.mla_attention(q, cache, seq, pos, kvb, 0.2)
    want = ops.mla_attention(q.numpy(), dsv2ext.BF16(cache.view(torch.int16).numpy().view(np.uint16)),
                             seq.numpy(), pos.numpy(), kvb.numpy(), 0.2)
    np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        dt.mla_attention(q, cache.to(torch.float16), seq, pos, kvb, 0.2)


def test_torch_fp8_weight_view():
    """transformers' fine-grained FP8 Linear (float8_e4m3fn + float32 weight_scale_inv) to the kernels without a copy."""
    from transformers.integrations.finegrained_fp8 import FP8Linear
    from dsv2ext.fp8 import quantize_fp8
    q = quantize_fp8(np.random.default_rng(70).standard_normal((300, 200)).astype(np.float32))
    lin = FP8Linear(200, 300, block_size=(128, 128))
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(q.data).view(torch.float8_e4m3fn))
        lin.weight_scale_inv.copy_(torch.from_numpy(q.scale_inv))
    v = dt.fp8_weight_view(lin.weight, lin.weight_scale_inv, lin.block_size)
    assert np.shares_memory(v.data, lin.weight.detach().view(torch.uint8).numpy())
    x = np.random.default_rng(0).standard_normal((3, 200)).astype(np.float32)
    ref = x.astype(np.float64) @ q.to_float32().astype(np.float64).T
    assert np.abs(dsv2ext.ops.linear(x, v) - ref).max() <= 1e-5 * np.abs(ref).max()
    with pytest.raises(TypeError, match="fp8_weight_view"):
        dt.linear(torch.from_numpy(x), lin.weight)
    with pytest.raises(TypeError, match="float32 block scales"):
        dt.fp8_weight_view(lin.weight, lin.weight_scale_inv.to(torch.bfloat16))
    with pytest.raises(ValueError, match="scale_inv"):
        dt.fp8_weight_view(lin.weight, torch.ones(2, 1), (128, 128))
