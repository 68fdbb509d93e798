"""Tests for dsv2ext.stats: parameter counts, KV-cache formulas, claims, CLI.

Parameter counts are cross-checked exactly against transformers models built
from tiny configs; the official configs are checked against the published
totals with stated tolerances.
"""
from __future__ import annotations

import json

import pytest

from dsv2ext.config import ConfigError, ModelConfig
from dsv2ext.stats import ArchSpec, format_stats, main_stats, named_specs, stats


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------
# published totals (tolerances stated per check)
# --------------------------------------------------------------------------

def test_deepseek_v2_totals():
    s = stats("deepseek-v2")
    assert rel(s["total_params"], 236e9) < 0.015          # paper: 236B
    assert rel(s["active_params"], 21e9) < 0.015          # paper: 21B activated
    assert s["total_params"] == (s["embedding_params"] + s["lm_head_params"] + s["attention_params"]
                                 + s["dense_mlp_params"] + s["moe_params"] + s["norm_params"])
    assert s["moe_params"] == (s["moe_routed_expert_params"] + s["moe_shared_expert_params"]
                               + s["router_params"])
    assert s["active_params"] - s["active_params_no_lm_head"] == 102400 * 5120
    assert s["active_params_with_embedding"] - s["active_params"] == 102400 * 5120
    # V2.5 has the same shapes
    s25 = stats("deepseek-v2.5")
    assert s25["total_params"] == s["total_params"] and s25["active_params"] == s["active_params"]


def test_deepseek_v2_lite_totals():
    s = stats("deepseek-v2-lite")
    assert rel(s["total_params"], 15.7e9) < 0.015         # paper: 15.7B
    assert rel(s["active_params"], 2.4e9) < 0.03          # paper: 2.4B activated
    # performance.md: 2.45B active including lm_head, 2.24B without (3 significant digits)
    assert rel(s["active_params"], 2.45e9) < 0.005
    assert rel(s["active_params_no_lm_head"], 2.24e9) < 0.005
    # the closed form of performance.md, evaluated independently
    d, H, V, L = 2048, 16, 102400, 27
    p_attn = d * H * 192 + d * (512 + 64) + 512 * H * 256 + H * 128 * d
    closed = L * p_attn + 1 * 3 * d * 10944 + 26 * ((6 + 2) * 3 * d * 1408 + d * 64) + V * d
    norms = L * 2 * d + d + L * 512  # input/post norms, final norm, kv_a_layernorm
    assert s["active_params"] == closed + norms


def test_deepseek_v3_totals():
    s = stats("deepseek-v3")
    assert rel(s["total_params"], 671e9) < 0.01           # report: 671B (without the MTP module)
    assert rel(s["active_params"], 37e9) < 0.015          # report: 37B activated
    # the correction bias is counted with the routers
    assert s["router_params"] == 58 * (256 * 7168 + 256)


def test_mixtral():
    s = stats("mixtral-8x7b")
    assert rel(s["total_params"], 46.7e9) < 0.005         # Mistral: 46.7B
    assert rel(s["active_params_with_embedding"], 12.9e9) < 0.005  # Mistral: 12.9B active
    assert 12.6e9 < s["active_params"] < 12.9e9
    assert s["kv_cache_kind"] == "gqa" and s["kv_mla_vs_mha_ratio"] is None
    assert s["kv_elements_per_token_per_layer"] == 2 * 8 * 128
    assert s["kv_model_vs_mha_ratio"] == 0.25
    by_key = {c["key"]: c for c in s["claims"]}
    assert abs(by_key["total_params"]["ratio"] - 1) < 0.005


# --------------------------------------------------------------------------
# KV cache (paper Table 1)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name,layers", [("deepseek-v2", 60), ("deepseek-v2-lite", 27),
                                         ("deepseek-v2.5", 60), ("deepseek-v3", 61)])
def test_mla_cache_576(name, layers):
    s = stats(name)
    kv = s["kv_cache"]
    assert s["kv_cache_kind"] == "mla"
    assert kv["mla"]["elements_per_token_per_layer"] == 576
    assert kv["mla"]["elements_per_token"] == 576 * layers
    assert kv["mla"]["bytes_per_token"] == 576 * layers * 2            # bf16
    assert kv["mla"]["bytes_at_context"] == 576 * layers * 2 * 4096
    assert s["kv_model_equivalent_gqa_groups"] == 2.25                 # paper: GQA with 2.25 groups


def test_v2_cache_vs_mha_and_formulas():
    s = stats("deepseek-v2", gqa_groups=4, kv_dtype="fp32", context=1000)
    kv = s["kv_cache"]
    assert kv["mha"]["elements_per_token_per_layer"] == 2 * 128 * 128 == 32768
    assert kv["mha"]["elements_per_token"] == 32768 * 60
    assert kv["gqa"]["elements_per_token_per_layer"] == 2 * 4 * 128
    assert kv["mqa"]["elements_per_token_per_layer"] == 2 * 128
    assert kv["mla_decompressed"]["elements_per_token_per_layer"] == 128 * (192 + 128)
    assert s["kv_mla_vs_mha_ratio"] == 576 / 32768                      # 1.7578 %
    assert round(100 * s["kv_mla_vs_mha_ratio"], 2) == 1.76
    assert kv["mla"]["bytes_per_token_per_layer"] == 576 * 4
    assert kv["mla"]["bytes_at_context"] == 576 * 60 * 4 * 1000
    assert s["kv_bytes_per_token"] == 576 * 60 * 4
    assert s["bytes_per_element"] == 2.0 and s["kv_bytes_per_element"] == 4.0


def test_v2_vs_67b_kv_claim():
    """Paper: V2's KV cache is 93.3% smaller than DeepSeek 67B's (V2 cache quantized to ~6 bits)."""
    v2 = stats("deepseek-v2", kv_dtype=6 / 8)
    dense = stats("deepseek-67b")
    assert dense["kv_elements_per_token"] == 2 * 8 * 128 * 95
    reduction = 1 - v2["kv_bytes_per_token"] / dense["kv_bytes_per_token"]
    assert abs(reduction - 0.933) < 0.0005


# --------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------

def test_flops():
    s = stats("deepseek-v2", context=4096)
    attn = 60 * 2 * 128 * (192 + 128) * 4096
    assert s["attention_flops_per_token"] == attn
    assert s["flops_per_token"] == 2 * s["active_params"] + attn
    assert s["flops_per_token_no_lm_head"] == 2 * s["active_params_no_lm_head"] + attn
    assert s["attention_flops_per_token_absorbed"] == 60 * 2 * 128 * (576 + 512) * 4096
    s0 = stats("deepseek-v2", context=0)
    assert s0["flops_per_token"] == 2 * s0["active_params"]
    m = stats("mixtral-8x7b", context=100)
    assert m["attention_flops_per_token"] == 32 * 2 * 32 * 256 * 100
    assert "attention_flops_per_token_absorbed" not in m


# --------------------------------------------------------------------------
# the article's table, checked against arithmetic
# --------------------------------------------------------------------------

def test_article_rows():
    a = stats("article-deepseek-v2-236b")
    claims = {c["key"]: c for c in a["claims"]}
    assert claims["active_params"]["claimed"] == 39e9
    # 64 MoE layers x (MLA + 2 experts of 3*5120*1536 + router) + lm_head
    attn = 5120 * 1536 + 1536 + 1536 * 128 * 192 + 5120 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 5120
    expected_active = 64 * (attn + 2 * 3 * 5120 * 1536 + 128 * 5120 + 2 * 5120) + 5120 + 102400 * 5120
    assert a["active_params"] == expected_active
    assert claims["active_params"]["ratio"] == pytest.approx(expected_active / 39e9, rel=1e-12)
    assert claims["active_params"]["ratio"] < 0.4        # arithmetic gives ~13B, not 39B
    assert a["kv_elements_per_token"] == 576 * 64

    b = stats("article-deepseekmoe-145b")
    assert b["architecture"]["layers"] == 48 and b["architecture"]["routed_experts"] == 64
    assert b["claims"][0]["claimed"] == 145e9 and b["claims"][0]["ratio"] < 0.5

    paper = stats("deepseekmoe-145b")                    # the paper's own configuration
    assert rel(paper["total_params"], 144.6e9) < 0.005
    assert rel(paper["active_params_with_embedding"], 22.2e9) < 0.005

    text = format_stats(a)
    assert "39.00 B" in text and "13.14 B" in text and "0.337" in text


def test_named_specs_list():
    names = named_specs()
    for n in ("deepseek-v2", "deepseek-v2-lite", "deepseek-v2.5", "deepseek-v3", "mixtral-8x7b",
              "article-deepseekmoe-145b", "article-deepseek-v2-236b"):
        assert n in names
        s = stats(n)
        assert s["total_params"] > s["active_params_no_lm_head"] > 0
        json.dumps(s)  # serialisable


# --------------------------------------------------------------------------
# inputs, errors, formatting, CLI
# --------------------------------------------------------------------------

def test_inputs_agree(tmp_path):
    cfg = ModelConfig.named("deepseek-v2-lite")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    keys = ("total_params", "active_params", "flops_per_token", "kv_bytes_per_token")
    ref = stats("deepseek-v2-lite")
    for x in (cfg, cfg.to_dict(), str(tmp_path), tmp_path / "config.json", ArchSpec.from_config(cfg)):
        s = stats(x)
        assert {k: s[k] for k in keys} == {k: ref[k] for k in keys}


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        stats("no-such-model")
    with pytest.raises(FileNotFoundError):
        stats(str(tmp_path / "missing" / "config.json"))
    with pytest.raises(ValueError, match="context"):
        stats("deepseek-v2", context=-1)
    with pytest.raises(ValueError, match="gqa_groups"):
        stats("deepseek-v2", gqa_groups=0)
    with pytest.raises(ValueError, match="dtype"):
        stats("deepseek-v2", dtype="fp12")
    with pytest.raises(TypeError):
        stats(42)
    with pytest.raises(ValueError, match="num_layers"):
        ArchSpec(name="x", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, attention="gqa",
                 head_dim=4, num_kv_heads=2, num_dense_layers=1, dense_intermediate_size=16)


def test_format_and_cli(capsys, tmp_path):
    text = format_stats(stats("deepseek-v2"))
    assert "235.74 B" in text and "MLA / MHA = 1.76%" in text and "576" in text

    assert main_stats(["deepseek-v2-lite", "--json", "--context", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(stats("deepseek-v2-lite", context=128)))

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.named("deepseek-v3").to_dict()))
    assert main_stats([str(tmp_path), "--kv-dtype", "fp8"]) == 0
    printed = capsys.readouterr().out
    assert "671.03 B" in printed and "KV cache per token (fp8" in printed

    assert main_stats(["--list"]) == 0
    assert "article-deepseek-v2-236b" in capsys.readouterr().out
    assert main_stats(["nonsense"]) == 2
    assert "neither a built-in name" in capsys.readouterr().err


# --------------------------------------------------------------------------
# exact agreement with transformers' modules
# --------------------------------------------------------------------------

def _hf_numel(model) -> int:
    seen, n = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel()
    return n


@pytest.mark.parametrize("case", ["v2_plain_q_greedy", "v2_qlora_grouped", "v3_bias_tied"])
def test_total_matches_transformers(case):
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                  num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
                  n_shared_experts=2)
    if case == "v2_plain_q_greedy":
        hf = tr.DeepseekV2Config(**common, q_lora_rank=None, n_routed_experts=8,
                                 num_experts_per_tok=2, first_k_dense_replace=1)
        model_cls = tr.DeepseekV2ForCausalLM
    elif case == "v2_qlora_grouped":
        hf = tr.DeepseekV2Config(**common, q_lora_rank=20, n_routed_experts=8, num_experts_per_tok=3,
                                 first_k_dense_replace=1, topk_method="group_limited_greedy",
                                 n_group=4, topk_group=2)
        model_cls = tr.DeepseekV2ForCausalLM
    else:
        hf = tr.DeepseekV3Config(**common, q_lora_rank=20, n_routed_experts=8, num_experts_per_tok=2,
                                 first_k_dense_replace=2, n_group=2, topk_group=1,
                                 tie_word_embeddings=True)
        model_cls = tr.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = model_cls(hf)
    cfg = ModelConfig.from_dict(hf.to_dict())
    s = stats(cfg)
    assert s["total_params"] == _hf_numel(model)
    attn = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert s["attention_params"] == attn
    if case == "v3_bias_tied":
        assert s["lm_head_params"] == 0 and s["active_params_with_embedding"] == s["active_params"]
