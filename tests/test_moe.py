"""DeepSeekMoE kernels against transformers' DeepseekV2Moe / DeepseekV3MoE.

Tolerance (fp32 and bf16 weights alike): max |ours - reference| <= 1e-5 * max |reference|,
the reference being transformers in fp32 (for bf16 weights: the same bf16-rounded
weights upcast to fp32).  Routing must choose the same experts as transformers.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext import BF16
from dsv2ext.ops.moe import (MoEConfig, StackedExperts, moe_block, moe_combine, moe_dispatch, moe_experts,
                             moe_route, swiglu_mlp)
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP, DeepseekV2Moe
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

RTOL = 1e-5  # max abs error <= RTOL * max |reference|


def max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err = max_rel(ours, ref)
    assert err <= RTOL, f"max abs error {err:.3g} * max|ref| > {RTOL}"


def bf16_of(t: torch.Tensor) -> BF16:
    return BF16(t.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy())


# ---------------------------------------------------------------- model builders

def hf_moe(version: int, d: int, inter: int, E: int, k: int, n_shared: int = 2, seed: int = 0,
           bias_std: float = 0.3, **kw: Any) -> torch.nn.Module:
    """A transformers MoE block with random weights: outputs O(1) for x ~ N(0, 1)."""
    torch.manual_seed(seed)
    common = dict(hidden_size=d, moe_intermediate_size=inter, n_routed_experts=E, num_experts_per_tok=k,
                  n_shared_experts=n_shared, num_attention_heads=1, num_key_value_heads=1)
    if version == 2:
        cfg = DeepseekV2Config(**common, **kw)
        cfg._experts_implementation = "eager"
        m = DeepseekV2Moe(cfg)
    else:
        cfg = DeepseekV3Config(**common, **kw)
        cfg._experts_implementation = "eager"
        m = DeepseekV3MoE(cfg)
    with torch.no_grad():
        m.experts.gate_up_proj.normal_(0, d ** -0.5)
        m.experts.down_proj.normal_(0, inter ** -0.5)
        m.gate.weight.normal_(0, 1.5 * d ** -0.5)
        for lin in (m.shared_experts.gate_proj, m.shared_experts.up_proj):
            lin.weight.normal_(0, d ** -0.5)
        m.shared_experts.down_proj.weight.normal_(0, (n_shared * inter) ** -0.5)
        if version == 3:
            m.gate.e_score_correction_bias.normal_(0, bias_std)
    m.cfg = MoEConfig.from_hf(cfg)
    return m.eval()


def round_module_bf16(m: torch.nn.Module) -> None:
    """Round every weight of the experts (routed and shared) to bf16, in place (router stays fp32)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("gate."):
                p.copy_(p.to(torch.bfloat16).float())


def weights_of(m: torch.nn.Module, layout: str = "stacked", bf16: bool = False):
    """(router, experts, shared, bias) for dsv2ext, sharing memory with the module where possible."""
    cv = bf16_of if bf16 else (lambda t: t.detach().numpy())
    gu, dn = m.experts.gate_up_proj, m.experts.down_proj
    inter = dn.shape[2]
    if layout == "stacked":
        experts = StackedExperts(cv(gu), cv(dn))
    else:
        gu_c, dn_c = cv(gu), cv(dn)
        experts = [(gu_c[e, :inter], gu_c[e, inter:], dn_c[e]) for e in range(gu.shape[0])]
    se = m.shared_experts
    shared = tuple(cv(lin.weight) for lin in (se.gate_proj, se.up_proj, se.down_proj))
    bias = m.gate.e_score_correction_bias.detach().numpy() if hasattr(m.gate, "e_score_correction_bias") else None
    return m.gate.weight.detach().numpy(), experts, shared, bias


def reference(m: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x)[None])[0].numpy().astype(np.float64)


def ref_routing(m: torch.nn.Module, x: np.ndarray):
    with torch.no_grad():
        _, w, ids = m.gate(torch.from_numpy(x))
    return ids.numpy(), w.numpy()


def assert_same_routing(ids, w, ref_ids, ref_w) -> None:
    """Same experts per token (transformers' order is unspecified: compare sorted by id)."""
    o, ro = np.argsort(ids, 1), np.argsort(ref_ids, 1)
    np.testing.assert_array_equal(np.take_along_axis(ids, o, 1), np.take_along_axis(ref_ids, ro, 1))
    sw, srw = np.take_along_axis(w, o, 1), np.take_along_axis(ref_w, ro, 1)
    assert np.abs(sw - srw).max() <= RTOL * np.abs(srw).max()


SMALL = dict(d=64, inter=48, E=16, k=4)
METHODS = {
    "greedy": (2, dict(topk_method="greedy")),
    "group_limited": (2, dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             routed_scaling_factor=16.0)),
    "noaux_tc": (3, dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
}


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """The torch reference runs single-threaded: quick and steady on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_threads_and_isa():
    n, isa = dsv2ext.get_num_threads(), dsv2ext.get_isa()
    yield
    dsv2ext.set_num_threads(n)
    dsv2ext.set_isa(isa)


# ---------------------------------------------------------------- block vs transformers (small shapes)

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("T", [1, 5, 40])
@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_block_matches_transformers(method, T, layout):
    version, kw = METHODS[method]
    m = hf_moe(version, **SMALL, **kw)
    router, experts, shared, bias = weights_of(m, layout)
    x = np.random.default_rng(T).standard_normal((T, SMALL["d"]), dtype=np.float32)
    out, ids, w = moe_block(x, router, experts, shared, m.cfg, bias, return_routing=True)
    assert_close(out, reference(m, x))
    assert_same_routing(ids, w, *ref_routing(m, x))


@pytest.mark.parametrize("method", list(METHODS))
def test_block_bf16_weights(method):
    version, kw = METHODS[method]
    m = hf_moe(version, **SMALL, **kw, seed=1)
    round_module_bf16(m)
    with torch.no_grad():  # the router too, so that it can also be passed as BF16
        m.gate.weight.copy_(m.gate.weight.to(torch.bfloat16).float())
    x = np.random.default_rng(3).standard_normal((24, SMALL["d"]), dtype=np.float32)
    ref = reference(m, x)
    for layout in ("stacked", "per_expert"):
        router, experts, shared, bias = weights_of(m, layout, bf16=True)
        assert_close(moe_block(x, router, experts, shared, m.cfg, bias), ref)
        # transformers widens a bf16 router weight to fp32 exactly: same result
        assert_close(moe_block(x, bf16_of(m.gate.weight), experts, shared, m.cfg, bias), ref)


def test_block_without_shared_experts():
    m = hf_moe(2, **SMALL)
    router, experts, _, _ = weights_of(m)
    x = np.random.default_rng(0).standard_normal((6, SMALL["d"]), dtype=np.float32)
    with torch.no_grad():
        _, w, ids = m.gate(torch.from_numpy(x))
        ref = m.experts(torch.from_numpy(x), ids, w).numpy()
    assert_close(moe_block(x, router, experts, None, m.cfg), ref)


def test_one_expert_gets_every_token():
    """Expert 5 is in every token's top-k: it runs on all 48 tokens (sgemm path), others on few."""
    m = hf_moe(2, **SMALL)
    with torch.no_grad():
        m.gate.weight[5, 0] = 30.0
    x = np.random.default_rng(1).standard_normal((48, SMALL["d"]), dtype=np.float32)
    x[:, 0] = np.abs(x[:, 0]) + 1.0
    router, experts, shared, _ = weights_of(m)
    out, ids, _ = moe_block(x, router, experts, shared, m.cfg, return_routing=True)
    assert (ids == 5).any(axis=1).all()
    assert_close(out, reference(m, x))
    # and with every token routed to the same k experts
    with torch.no_grad():
        m.gate.weight[[1, 2, 9], 0] = 29.0
    out, ids, _ = moe_block(x, router, experts, shared, m.cfg, return_routing=True)
    assert (np.sort(ids, 1) == [1, 2, 5, 9]).all()
    assert_close(out, reference(m, x))


# ---------------------------------------------------------------- real DeepSeek-V2-Lite expert shapes

def build_lite() -> torch.nn.Module:
    """V2-Lite MoE layer (64 experts x 1408, hidden 2048, 2 shared, top-6 greedy) with bf16-exact weights,
    so that one fp32 reference serves both the fp32 and the bf16 kernels (``.bf16`` holds the bits)."""
    d, inter, E, k, ns = 2048, 1408, 64, 6, 2
    g = torch.Generator().manual_seed(0)

    def rnd(shape, std):
        return (torch.randn(shape, generator=g, dtype=torch.bfloat16) * std)

    gu = rnd((E, 2 * inter, d), d ** -0.5)
    dn = rnd((E, d, inter), inter ** -0.5)
    sh = [rnd((ns * inter, d), d ** -0.5), rnd((ns * inter, d), d ** -0.5), rnd((d, ns * inter), (ns * inter) ** -0.5)]
    cfg = DeepseekV2Config(hidden_size=d, moe_intermediate_size=inter, n_routed_experts=E, num_experts_per_tok=k,
                           n_shared_experts=ns, topk_method="greedy", n_group=1, topk_group=1,
                           routed_scaling_factor=1.0, norm_topk_prob=False)
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        m = DeepseekV2Moe(cfg)
    P = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
    m.experts.gate_up_proj = P(gu.float())
    m.experts.down_proj = P(dn.float())
    m.gate.weight = P(torch.randn((E, d), generator=g) * 1.5 * d ** -0.5)
    for lin, t in zip((m.shared_experts.gate_proj, m.shared_experts.up_proj, m.shared_experts.down_proj), sh):
        lin.weight = P(t.float())
    m.cfg = MoEConfig.from_hf(cfg)
    bits = lambda t: BF16(t.view(torch.int16).numpy().view(np.uint16))  # noqa: E731
    m.bf16 = dict(gu=bits(gu), dn=bits(dn), shared=tuple(bits(t) for t in sh))
    return m.eval()


@pytest.fixture(scope="module")
def lite():
    m = build_lite()
    yield m
    del m


@pytest.mark.parametrize("T", [1, 64])
def test_v2_lite_shapes_fp32_and_bf16(lite, T):
    m = lite
    x = np.random.default_rng(T).standard_normal((T, 2048), dtype=np.float32)
    ref = reference(m, x)
    router, experts, shared, _ = weights_of(m, "stacked")
    out, ids, w = moe_block(x, router, experts, shared, m.cfg, return_routing=True)
    assert_close(out, ref)
    assert_same_routing(ids, w, *ref_routing(m, x))
    b = m.bf16
    assert_close(moe_block(x, router, StackedExperts(b["gu"], b["dn"]), b["shared"], m.cfg), ref)
    if T == 1:  # per-expert views (as mmap'd checkpoint tensors would be), fp32 and bf16
        _, per, _, _ = weights_of(m, "per_expert")
        assert_close(moe_block(x, router, per, shared, m.cfg), ref)
        per16 = [(b["gu"][e, :1408], b["gu"][e, 1408:], b["dn"][e]) for e in range(64)]
        assert_close(moe_block(x, router, per16, b["shared"], m.cfg), ref)


def test_v2_lite_long_prompt_in_chunks(lite):
    """1,000 tokens at V2-Lite dims exceed one workspace chunk (~950 tokens): two equal chunks of
    500, each the same computation as a 500-token call."""
    m = lite
    x = np.random.default_rng(1000).standard_normal((1000, 2048), dtype=np.float32)
    b = m.bf16
    router, _, _, _ = weights_of(m, "stacked")
    ex = StackedExperts(b["gu"], b["dn"])
    out = moe_block(x, router, ex, b["shared"], m.cfg)
    assert_close(out, reference(m, x))
    np.testing.assert_array_equal(out[:500], moe_block(x[:500], router, ex, b["shared"], m.cfg))
    np.testing.assert_array_equal(out[500:], moe_block(x[500:], router, ex, b["shared"], m.cfg))


def test_v2_lite_dense_mlp_shapes():
    """The dense MLP of the first layer (intermediate 10944) through the same kernel."""
    torch.manual_seed(0)
    c = DeepseekV2Config(hidden_size=2048, intermediate_size=10944, num_attention_heads=16)
    mlp = DeepseekV2MLP(c)
    with torch.no_grad():
        mlp.gate_proj.weight.normal_(0, 2048 ** -0.5)
        mlp.up_proj.weight.normal_(0, 2048 ** -0.5)
        mlp.down_proj.weight.normal_(0, 10944 ** -0.5)
    ws = [lin.weight.detach().numpy() for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    for T in (1, 20):
        x = np.random.default_rng(T).standard_normal((T, 2048), dtype=np.float32)
        with torch.no_grad():
            ref = mlp(torch.from_numpy(x)).numpy().astype(np.float64)
        assert_close(swiglu_mlp(x, *ws), ref)


# ---------------------------------------------------------------- router edge cases

def one_hot_router(logits: np.ndarray, E: int, d: int = 8):
    """x = e_0, router_weight[:, 0] = logits: the router sees exactly these logits."""
    x = np.zeros((1, d), np.float32)
    x[0, 0] = 1.0
    r = np.zeros((E, d), np.float32)
    r[:, 0] = logits
    return x, r


def hf_gate(version: int, r: np.ndarray, bias: Optional[np.ndarray] = None, **kw: Any):
    E, d = r.shape
    cfg = (DeepseekV2Config if version == 2 else DeepseekV3Config)(
        hidden_size=d, n_routed_experts=E, num_attention_heads=1, num_key_value_heads=1, **kw)
    m = (DeepseekV2Moe if version == 2 else DeepseekV3MoE)(cfg)
    with torch.no_grad():
        m.gate.weight.copy_(torch.from_numpy(r))
        if bias is not None:
            m.gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
    return m, MoEConfig.from_hf(cfg)


def test_kept_group_without_selected_expert():
    """Group 0 holds the 2 best experts and group 2 the 3rd best: both groups are kept, but top-2 takes
    both experts from group 0, so kept group 2 contributes none; the best experts of dropped groups
    (which beat most of group 2) are never taken."""
    logits = np.array([5, 4.9, 0, 0, -1, -1, -1, 3.0, 4.0, 1, -2, -2, 1.0, 1.0, 1.0, 1.0], np.float32)
    x, r = one_hot_router(logits, 16)
    for version, kw in ((2, dict(topk_method="group_limited_greedy")), (3, dict(norm_topk_prob=True))):
        m, cfg = hf_gate(version, r, num_experts_per_tok=2, n_group=4, topk_group=2, **kw)
        ids, w = moe_route(x, r, cfg, m.gate.e_score_correction_bias.numpy() if version == 3 else None)
        assert sorted(ids[0].tolist()) == [0, 1]
        assert_same_routing(ids, w, *ref_routing(m, x))


def test_top_k_equals_experts_of_kept_groups():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(16).astype(np.float32)
    x, r = one_hot_router(logits, 16)
    bias = rng.standard_normal(16).astype(np.float32) * 0.2
    for version, kw, b in ((2, dict(topk_method="group_limited_greedy"), None), (3, dict(), bias)):
        m, cfg = hf_gate(version, r, b, num_experts_per_tok=8, n_group=4, topk_group=2, **kw)
        ids, w = moe_route(x, r, cfg, b)
        ref_ids, ref_w = ref_routing(m, x)
        groups = sorted(set((ids[0] // 4).tolist()))
        assert len(groups) == 2 and sorted(ids[0].tolist()) == [g * 4 + i for g in groups for i in range(4)]
        assert_same_routing(ids, w, ref_ids, ref_w)


def test_noaux_tc_bias_selects_but_does_not_weight():
    """Negative biases make the kept groups' biased scores negative: masking dropped groups with 0 would
    wrongly pick their experts; transformers (and we) mask with -inf.  The weights are the unbiased
    sigmoid scores, renormalised, times the scaling factor."""
    rng = np.random.default_rng(2)
    E = 16
    logits = rng.standard_normal(E).astype(np.float32)
    bias = np.full(E, -3.0, np.float32)
    bias[[4, 5, 6, 7, 12, 13, 14, 15]] = -1.0  # groups 1 and 3 win; all biased scores < 0
    x, r = one_hot_router(logits, E)
    m, cfg = hf_gate(3, r, bias, num_experts_per_tok=6, n_group=4, topk_group=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5)
    ids, w = moe_route(x, r, cfg, bias)
    assert set((ids[0] // 4).tolist()) <= {1, 3}
    s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    order = np.argsort(-(s + bias)[[4, 5, 6, 7, 12, 13, 14, 15]], kind="stable")
    expect = np.array([4, 5, 6, 7, 12, 13, 14, 15])[order[:6]]
    np.testing.assert_array_equal(ids[0], expect)
    np.testing.assert_allclose(w[0], 2.5 * s[expect] / s[expect].sum(), rtol=1e-6)
    assert_same_routing(ids, w, *ref_routing(m, x))


def test_router_sigmoid_and_softmax_variants_and_ties():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 32)).astype(np.float32)
    r = rng.standard_normal((12, 32)).astype(np.float32) * 0.3
    # softmax greedy with norm_topk_prob (DeepSeek's formula; transformers' V2 ignores the flag)
    cfg = MoEConfig(12, 3, norm_topk_prob=True, routed_scaling_factor=3.0)
    ids, w = moe_route(x, r, cfg)
    lg = x.astype(np.float64) @ r.T.astype(np.float64)
    s = np.exp(lg - lg.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    ref_ids = np.argsort(-s, 1, kind="stable")[:, :3]
    np.testing.assert_array_equal(ids, ref_ids)  # by decreasing score
    sel = np.take_along_axis(s, ref_ids, 1)
    np.testing.assert_allclose(w, 3.0 * sel / sel.sum(1, keepdims=True), rtol=1e-5)
    # sigmoid greedy without normalisation
    ids, w = moe_route(x, r, MoEConfig(12, 2, scoring_func="sigmoid"))
    sg = 1 / (1 + np.exp(-lg))
    ref_ids = np.argsort(-sg, 1, kind="stable")[:, :2]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, np.take_along_axis(sg, ref_ids, 1), rtol=1e-5)
    # exact ties go to the lower expert index
    x1, r1 = one_hot_router(np.array([1, 2, 2, 2, 0, 2], np.float32), 6)
    ids, _ = moe_route(x1, r1, MoEConfig(6, 3))
    assert ids[0].tolist() == [1, 2, 3]


# ---------------------------------------------------------------- dispatch / combine / experts

def test_dispatch_and_combine():
    rng = np.random.default_rng(0)
    T, k, E, d = 13, 3, 7, 40
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int64)
    order, offsets = moe_dispatch(ids, E)
    np.testing.assert_array_equal(order, np.argsort(ids.ravel(), kind="stable"))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(ids.ravel(), minlength=E))]))
    for e in range(E):  # expert e's tokens, ascending
        toks = order[offsets[e]:offsets[e + 1]] // k
        assert list(toks) == sorted(toks) and (ids[toks] == e).any(1).all()
    y = rng.standard_normal((T * k, d)).astype(np.float32)
    w = rng.random((T, k)).astype(np.float32)
    add = rng.standard_normal((T, d)).astype(np.float32)
    pos = np.empty(T * k, np.int64)
    pos[order] = np.arange(T * k)
    ref = (w[:, :, None].astype(np.float64) * y[pos.reshape(T, k)]).sum(1) + add
    out = moe_combine(y, order, w, add)
    assert_close(out, ref)
    dsv2ext.set_num_threads(1)
    np.testing.assert_array_equal(moe_combine(y, order, w, add), out)


def test_moe_experts_matches_transformers_experts():
    m = hf_moe(3, **SMALL, n_shared=1)
    _, experts, shared, _ = weights_of(m, "per_expert")
    x = np.random.default_rng(4).standard_normal((21, SMALL["d"]), dtype=np.float32)
    ids, w = ref_routing(m, x)
    with torch.no_grad():
        ref = (m.experts(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w))
               + m.shared_experts(torch.from_numpy(x))).numpy()
    assert_close(moe_experts(x, ids.astype(np.int64), w, experts, shared), ref)


@pytest.mark.parametrize("T", [1, 5, 40])
def test_swiglu_mlp_matches_transformers(T):
    torch.manual_seed(T)
    c = DeepseekV2Config(hidden_size=96, intermediate_size=200, num_attention_heads=1)
    mlp = DeepseekV2MLP(c)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.normal_(0, lin.weight.shape[1] ** -0.5)
    x = np.random.default_rng(T).standard_normal((T, 96), dtype=np.float32)
    with torch.no_grad():
        ref = mlp(torch.from_numpy(x)).numpy()
    ws = [lin.weight for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert_close(swiglu_mlp(x, *[t.detach().numpy() for t in ws]), ref)
    round_module_bf16(mlp)
    with torch.no_grad():
        ref = mlp(torch.from_numpy(x)).numpy()
    out = np.full_like(x, np.nan)
    assert swiglu_mlp(x, *[bf16_of(t) for t in ws], out=out) is out
    assert_close(out, ref)


def _bf16_bits(shape, seed: int, scale: float) -> BF16:
    a = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale
    return BF16((a.view(np.uint32) >> 16).astype(np.uint16))


def _widen(w: BF16) -> np.ndarray:
    return (w.data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


ROW_DOT_CASES = [(d, i, T) for d, i in [(96, 200), (72, 40), (50, 33)] for T in (7, 8, 9, 13, 33, 64)]
ROW_DOT_CASES += [(2048, 1408, T) for T in (8, 33, 64)]  # V2-Lite expert dims
ROW_DOT_CASES += [(96, 200, 600)]  # more tokens than one row-dot chunk (512)
ROW_DOT_CASES += [(24, 20, 9), (16, 31, 12)]  # rows shorter than one 32-column chunk: all tail


@pytest.mark.parametrize("d,inter,T", ROW_DOT_CASES)
def test_swiglu_bf16_row_dot_kernels_against_numpy(d, inter, T):
    """bf16 weights take the row-dot kernels (from 8 tokens on AVX-512, at any token count: activations
    laid out even|odd per 32 columns, tails of d % 32 / inter % 32 columns in place)."""
    g, u = _bf16_bits((inter, d), 1, d ** -0.5), _bf16_bits((inter, d), 2, d ** -0.5)
    dn = _bf16_bits((d, inter), 3, inter ** -0.5)
    x = np.random.default_rng(T).standard_normal((T, d), dtype=np.float32)
    x64 = x.astype(np.float64)
    a, b = x64 @ _widen(g).T, x64 @ _widen(u).T
    h = a / (1 + np.exp(-a)) * b
    ref = h @ _widen(dn).T
    outs = []
    for n in (1, 2, 3):
        dsv2ext.set_num_threads(n)
        outs.append(swiglu_mlp(x, g, u, dn))
    dsv2ext.set_num_threads(2)
    assert_close(outs[0], ref)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    prev = dsv2ext.get_isa()
    try:
        dsv2ext.set_isa("avx2")  # the plain kernels: same fp32 products, other order
        assert_close(swiglu_mlp(x, g, u, dn), ref)
    finally:
        dsv2ext.set_isa(prev)


def test_block_bf16_busy_row_dot_experts():
    """A bf16 MoE block whose experts get 8..64 tokens each (the even|odd row-dot kernels, rows permuted
    in the gathered workspace) and whose 40-token shared expert reads a permuted copy of x."""
    version, kw = METHODS["greedy"]
    m = hf_moe(version, d=96, inter=72, E=4, k=2, **kw, seed=5)
    round_module_bf16(m)
    x = np.random.default_rng(11).standard_normal((40, 96), dtype=np.float32)
    ref = reference(m, x)
    router, experts, shared, bias = weights_of(m, bf16=True)
    out, ids, w = moe_block(x, router, experts, shared, m.cfg, bias, return_routing=True)
    counts = np.bincount(ids.ravel(), minlength=4)
    assert counts.min() >= 8 and counts.max() <= 64, counts
    assert_close(out, ref)
    x_before = x.copy()
    for n in (1, 3):
        dsv2ext.set_num_threads(n)
        np.testing.assert_array_equal(moe_block(x, router, experts, shared, m.cfg, bias), out)
    dsv2ext.set_num_threads(2)
    np.testing.assert_array_equal(x, x_before)  # the caller's activations are not permuted


class Int8:
    """A minimal int8 weight (the tag the binding understands): W = data * scales per group of columns."""
    __dsv2_dtype__ = "int8"

    def __init__(self, w: np.ndarray, group: int):
        s = np.abs(w.reshape(*w.shape[:-1], -1, group)).max(-1) / 127.0
        self.scales = s.astype(np.float32)
        self.data = np.round(w / np.repeat(s, group, -1)).astype(np.int8)
        self.shape = w.shape

    def dequant(self) -> np.ndarray:
        return self.data.astype(np.float32) * np.repeat(self.scales, self.data.shape[-1] // self.scales.shape[-1], -1)


def test_int8_expert_weights():
    # exact parity with the dequantized weights needs fp32 activations (the default
    # int16 activations are tested against their own model in tests/test_quant.py)
    from dsv2ext.quant import set_int8_activations
    prev = set_int8_activations("fp32")
    try:
        _int8_expert_weights()
    finally:
        set_int8_activations(prev)


def _int8_expert_weights():
    m = hf_moe(2, **SMALL)
    gu, dn = m.experts.gate_up_proj.detach().numpy(), m.experts.down_proj.detach().numpy()
    qgu, qdn = Int8(gu, 16), Int8(dn, 16)
    with torch.no_grad():
        m.experts.gate_up_proj.copy_(torch.from_numpy(qgu.dequant()))
        m.experts.down_proj.copy_(torch.from_numpy(qdn.dequant()))
    router, _, shared, _ = weights_of(m)
    x = np.random.default_rng(0).standard_normal((3, SMALL["d"]), dtype=np.float32)
    assert_close(moe_block(x, router, StackedExperts(qgu, qdn), shared, m.cfg), reference(m, x))


# ---------------------------------------------------------------- threads, ISA paths, GIL

@pytest.mark.parametrize("T", [1, 40])
def test_deterministic_across_thread_counts(T):
    m = hf_moe(3, **SMALL, **METHODS["noaux_tc"][1])
    router, experts, shared, bias = weights_of(m)
    x = np.random.default_rng(9).standard_normal((T, SMALL["d"]), dtype=np.float32)
    x[:, 0] += 3.0
    with torch.no_grad():
        router[2, 0] = 10.0  # expert 2 takes every token: its 40 rows use the sgemm path
    outs = []
    for n in (1, 2, 3):
        dsv2ext.set_num_threads(n)
        outs.append(moe_block(x, router, experts, shared, m.cfg, bias))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    assert_close(outs[0], reference(m, x))


def same_for_thread_counts(fn, counts):
    """fn() under each thread count in counts: the results must be the same bits; returns the first
    (the thread count is restored)."""
    prev = dsv2ext.get_num_threads()
    outs = []
    try:
        for n in counts:
            dsv2ext.set_num_threads(n)
            outs.append(fn())
    finally:
        dsv2ext.set_num_threads(prev)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    return outs[0]


def random_moe_weights(fmt: str, d: int, inter: int, E: int, rng: np.random.Generator, fp8_block=(128, 128)):
    """A router [E, d], E experts (gate, up [inter, d], down [d, inter]) and a shared expert of width
    2 * inter, random, the matrices in format fmt (f32, bf16, int8, int4, fp8 with fp8_block)."""
    from dsv2ext.fp8 import quantize_fp8
    from dsv2ext.int4 import quantize_int4
    from dsv2ext.quant import quantize_int8

    def fmt_of(a: np.ndarray):
        return {"f32": lambda: a, "bf16": lambda: BF16.from_float32(a), "int8": lambda: quantize_int8(a),
                "int4": lambda: quantize_int4(a), "fp8": lambda: quantize_fp8(a, fp8_block)}[fmt]()

    router = (rng.standard_normal((E, d)) * 0.05).astype(np.float32)
    shapes = ((inter, d), (inter, d), (d, inter))
    experts = [tuple(fmt_of((rng.standard_normal(s) * 0.08).astype(np.float32)) for s in shapes) for _ in range(E)]
    shared = tuple(fmt_of((rng.standard_normal(s) * 0.08).astype(np.float32))
                   for s in ((2 * inter, d), (2 * inter, d), (d, 2 * inter)))
    return router, experts, shared


@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8", "int4", "fp8"])
def test_many_busy_experts_run_concurrently_with_the_same_numbers(fmt):
    """A long prompt gives most routed experts more tokens than the row-dot path takes; with two
    or more such experts per thread, the threads run whole experts at once (each expert's
    products single-threaded).  The output must not change with the thread count (1 thread: one
    expert after another) and must match the experts' dequantized weights in fp32."""
    def dense(w) -> np.ndarray:
        return w if isinstance(w, np.ndarray) else w.to_float32()

    rng = np.random.default_rng(23)
    d, inter, E, k, T = 128, 96, 12, 4, 240  # ~80 tokens per expert: every routed expert is busy
    x = rng.standard_normal((T, d)).astype(np.float32)
    router, experts, shared = random_moe_weights(fmt, d, inter, E, rng, (32, 32))
    cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=k)
    out = same_for_thread_counts(lambda: moe_block(x, router, experts, shared, cfg), (1, 2, 3, 4))
    ref = moe_block(x, router, [tuple(dense(w) for w in e) for e in experts], tuple(dense(w) for w in shared), cfg)
    assert max_rel(out, ref) <= 2e-5


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "fp8"])
def test_row_dot_work_items_do_not_change_results(fmt):
    """Decode-sized calls (1-3 tokens, every expert on the row-dot kernels): the gate/up rows and
    down + combine columns per work item grow as the thread count falls (about 4 items per thread,
    48-352 rows, 24-256 columns); with these sizes 1, 3, 7 and 16 threads cut the experts at
    different rows and columns, and the output must stay the same bits."""
    rng = np.random.default_rng(31)
    d, inter, E, k = 256, 704, 8, 6
    router, experts, shared = random_moe_weights(fmt, d, inter, E, rng)
    cfg = MoEConfig(n_routed_experts=E, num_experts_per_tok=k)
    for T in (1, 3):
        x = rng.standard_normal((T, d)).astype(np.float32)
        same_for_thread_counts(lambda: moe_block(x, router, experts, shared, cfg), (1, 3, 7, 16))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_isa_paths(isa):
    dsv2ext.set_isa(isa)
    version, kw = METHODS["group_limited"]
    m = hf_moe(version, d=72, inter=40, E=16, k=4, **kw)  # widths not multiples of 16
    for bf16 in (False, True):
        if bf16:
            round_module_bf16(m)
        router, experts, shared, bias = weights_of(m, bf16=bf16)
        x = np.random.default_rng(0).standard_normal((7, 72), dtype=np.float32)
        assert_close(moe_block(x, router, experts, shared, m.cfg, bias), reference(m, x))


def test_concurrent_calls_from_python_threads():
    m = hf_moe(2, **SMALL)
    router, experts, shared, _ = weights_of(m)
    xs = [np.random.default_rng(i).standard_normal((9, SMALL["d"]), dtype=np.float32) for i in range(4)]
    expect = [moe_block(x, router, experts, shared, m.cfg) for x in xs]
    got: list = [None] * 4

    def run(i):
        for _ in range(20):
            got[i] = moe_block(xs[i], router, experts, shared, m.cfg)

    th = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for g, e in zip(got, expect):
        np.testing.assert_array_equal(g, e)


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def small():
    m = hf_moe(3, **SMALL, **METHODS["noaux_tc"][1])
    router, experts, shared, bias = weights_of(m)
    x = np.random.default_rng(0).standard_normal((3, SMALL["d"]), dtype=np.float32)
    return m, router, experts, shared, bias, x


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by n_group"):
        MoEConfig(15, 4, n_group=4, topk_group=2, topk_method="group_limited_greedy")
    with pytest.raises(ValueError, match="larger than the number of experts in the kept groups"):
        MoEConfig(16, 9, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEConfig(16, 17)
    with pytest.raises(ValueError, match="topk_group"):
        MoEConfig(16, 2, n_group=4, topk_group=5, topk_method="group_limited_greedy")
    with pytest.raises(ValueError, match="topk_method"):
        MoEConfig(16, 2, topk_method="top_p")
    with pytest.raises(ValueError, match="scoring_func"):
        MoEConfig(16, 2, scoring_func="relu")
    with pytest.raises(ValueError, match="2 best experts"):
        MoEConfig(16, 2, n_group=16, topk_group=4, topk_method="noaux_tc")
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        MoEConfig(16, 2, routed_scaling_factor=float("nan"))
    with pytest.raises(TypeError, match="n_group"):
        MoEConfig(16, 2, n_group=2.0)


def test_binding_rejects_bad_config_directly(small):
    """The C binding checks the configuration itself (for callers of dsv2ext._C)."""
    from dsv2ext._native import _C
    m, router, experts, shared, bias, x = small
    ids, w = np.empty((3, 4), np.int64), np.empty((3, 4), np.float32)
    with pytest.raises(ValueError, match="divisible by n_group"):
        _C.moe_route(ids, w, x, router, None, 4, 5, 2, "group_limited_greedy", "softmax", False, 1.0)
    with pytest.raises(ValueError, match="larger than the number of experts in the kept groups"):
        _C.moe_route(ids, w, x, router, bias, 4, 8, 1, "noaux_tc", "sigmoid", True, 1.0)
    with pytest.raises(ValueError, match="topk_method"):
        _C.moe_route(ids, w, x, router, None, 4, 1, 1, "best", "softmax", False, 1.0)


def test_nan_router_logits_raise_and_leave_out_untouched(small):
    m, router, experts, shared, bias, x = small
    xn = x.copy()
    xn[1, 3] = np.nan
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        moe_block(xn, router, experts, shared, m.cfg, bias, out=out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        moe_route(xn, router, m.cfg, bias)
    r2 = router.copy()
    r2[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        moe_route(x, r2, m.cfg, bias)
    b2 = bias.copy()
    b2[3] = np.nan
    with pytest.raises(ValueError, match="correction_bias: element 3 is not finite"):
        moe_block(x, router, experts, shared, m.cfg, b2)


def test_bad_weights(small):
    m, router, experts, shared, bias, x = small
    gu, dn = experts.gate_up_proj, experts.down_proj
    cfg = m.cfg
    with pytest.raises(ValueError, match="gate_up_proj: expected a C-contiguous"):
        moe_block(x, router, StackedExperts(gu[:, :-2], dn), shared, cfg, bias)
    with pytest.raises(ValueError, match="gate_up_proj: expected shape .* even middle"):
        moe_block(x, router, StackedExperts(np.ascontiguousarray(gu[:, :-1]), dn), shared, cfg, bias)
    with pytest.raises(ValueError, match=r"down_proj: expected shape \[16, 64, 47\]"):
        moe_block(x, router, StackedExperts(np.ascontiguousarray(gu[:, :-2]), dn), shared, cfg, bias)
    with pytest.raises(ValueError, match="down_proj: expected shape"):
        moe_block(x, router, StackedExperts(gu, np.ascontiguousarray(dn[:, :, :-1])), shared, cfg, bias)
    with pytest.raises(ValueError, match="gate_up_proj: expected shape"):
        moe_block(x, router, StackedExperts(gu[:8], dn[:8]), shared, cfg, bias)
    with pytest.raises(TypeError, match="float32"):
        moe_block(x, router, StackedExperts(gu.astype(np.float64), dn), shared, cfg, bias)
    with pytest.raises(TypeError, match="BF16"):
        moe_block(x, router, StackedExperts(gu.view(np.uint16)[..., ::2].copy(), dn), shared, cfg, bias)
    per = [(gu[e, :48], gu[e, 48:], dn[e]) for e in range(16)]
    with pytest.raises(ValueError, match="expected 16 experts"):
        moe_block(x, router, per[:15], shared, cfg, bias)
    bad = list(per)
    bad[3] = (per[3][0], per[3][1][:40], per[3][2])
    with pytest.raises(ValueError, match=r"experts\[3\].up_proj: expected shape \[48, 64\]"):
        moe_block(x, router, bad, shared, cfg, bias)
    bad[3] = (per[3][0], per[3][1])
    with pytest.raises(ValueError, match=r"experts\[3\]: expected 3 weights"):
        moe_block(x, router, bad, shared, cfg, bias)
    with pytest.raises(ValueError, match="shared.down_proj"):
        moe_block(x, router, per, (shared[0], shared[1], shared[2][:, :10].copy()), cfg, bias)
    with pytest.raises(TypeError, match="experts"):
        moe_block(x, router, "weights", shared, cfg, bias)
    with pytest.raises(ValueError, match="router_weight"):
        moe_block(x, router[:12], per, shared, cfg, bias)
    with pytest.raises(ValueError, match=r"x: expected shape \[\?, 32\]"):  # d is the router's
        moe_block(x, np.ascontiguousarray(router[:, :32]), per, shared, cfg, bias)
    with pytest.raises(TypeError, match="cfg"):
        moe_block(x, router, per, shared)
    with pytest.raises(ValueError, match="correction_bias: only used by topk_method 'noaux_tc'"):
        moe_block(x, router, per, shared, MoEConfig(16, 4), bias)
    with pytest.raises(ValueError, match="correction_bias: expected shape"):
        moe_block(x, router, per, shared, cfg, bias[:8].copy())
    with pytest.raises(ValueError, match=r"gate: expected shape|up: expected shape"):
        swiglu_mlp(x, shared[0], shared[1][:5], shared[2])
    with pytest.raises(TypeError, match="down"):
        swiglu_mlp(x, shared[0], shared[1], shared[2].astype(np.float16))


def test_bad_activations_and_outputs(small):
    m, router, experts, shared, bias, x = small
    cfg = m.cfg
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        moe_block(x.astype(np.float64), router, experts, shared, cfg, bias)
    with pytest.raises(ValueError, match="x: expected shape"):
        moe_block(np.ones((3, 32), np.float32), router, experts, shared, cfg, bias)
    with pytest.raises(ValueError, match="x: expected a C-contiguous"):
        moe_block(np.asfortranarray(np.ones((3, 64), np.float32)), router, experts, shared, cfg, bias)
    raw = np.zeros(3 * 64 * 4 + 1, np.uint8)
    xm = np.frombuffer(raw.data, dtype=np.float32, count=3 * 64, offset=1).reshape(3, 64)
    with pytest.raises(ValueError, match="x: the array's data is not aligned"):
        moe_block(xm, router, experts, shared, cfg, bias)
    with pytest.raises(ValueError, match="empty"):
        moe_block(np.ones((0, 64), np.float32), router, experts, shared, cfg, bias)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: the output array is read-only"):
        moe_block(x, router, experts, shared, cfg, bias, out=ro)
    with pytest.raises(ValueError, match="out and x must not share memory"):
        moe_block(x, router, experts, shared, cfg, bias, out=x)
    with pytest.raises(ValueError, match="out and gate_up_proj must not share memory"):
        moe_block(x, router, experts, shared, cfg, bias, out=experts.gate_up_proj[0, :3])
    with pytest.raises(ValueError, match="out: expected shape"):
        moe_block(x, router, experts, shared, cfg, bias, out=np.empty((3, 63), np.float32))
    with pytest.raises(ValueError, match="out and x must not share memory"):
        swiglu_mlp(x, *shared, out=x)


def test_bad_indices():
    with pytest.raises(ValueError, match=r"ids: expert id 7 at \[1, 0\] is outside \[0, 7\)"):
        moe_dispatch(np.array([[0, 1], [7, 2]], np.int64), 7)
    with pytest.raises(ValueError, match="outside"):
        moe_dispatch(np.array([[0, -1]], np.int64), 7)
    with pytest.raises(TypeError, match="ids: expected dtype int64"):
        moe_dispatch(np.array([[0, 1]], np.int32), 7)
    y, w = np.ones((4, 8), np.float32), np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="order: expected a permutation.*repeated"):
        moe_combine(y, np.array([0, 1, 1, 3], np.int64), w)
    with pytest.raises(ValueError, match="order: expected a permutation.*out of range"):
        moe_combine(y, np.array([0, 1, 2, 4], np.int64), w)
    with pytest.raises(ValueError, match="expert_out: expected shape"):
        moe_combine(np.ones((5, 8), np.float32), np.arange(4), w)
    m = hf_moe(2, **SMALL)
    _, experts, shared, _ = weights_of(m)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="ids: expert id 16"):
        moe_experts(x, np.array([[0, 16], [1, 2]], np.int64), w, experts, shared)
    with pytest.raises(ValueError, match="weights: expected shape"):
        moe_experts(x, np.array([[0, 15], [1, 2]], np.int64), np.ones((2, 3), np.float32), experts, shared)
