"""Tests for dsv2ext.config: both config.json spellings, validation errors, derived values.

transformers (the correctness reference) is used to write configs the way
``save_pretrained`` does and to cross-check the softmax scale and the YaRN
cos/sin factor.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import pytest

from dsv2ext.config import NAMED_CONFIGS, ConfigError, ModelConfig, named_config_names

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402

# The official DeepSeek-V2-Lite config.json, as published (hub remote-code spelling).
OFFICIAL_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def _write(tmp_path, name: str, d: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return str(folder)


def _hf_class(d: dict):
    return DeepseekV3Config if d["model_type"] == "deepseek_v3" else DeepseekV2Config


# --------------------------------------------------------------------------
# official configurations
# --------------------------------------------------------------------------

def test_named_official_values():
    v2 = ModelConfig.named("deepseek-v2")
    assert (v2.hidden_size, v2.num_hidden_layers, v2.num_attention_heads) == (5120, 60, 128)
    assert (v2.q_lora_rank, v2.kv_lora_rank) == (1536, 512)
    assert (v2.qk_nope_head_dim, v2.qk_rope_head_dim, v2.v_head_dim) == (128, 64, 128)
    assert (v2.n_routed_experts, v2.n_shared_experts, v2.num_experts_per_tok) == (160, 2, 6)
    assert (v2.moe_intermediate_size, v2.intermediate_size, v2.first_k_dense_replace) == (1536, 12288, 1)
    assert (v2.topk_method, v2.n_group, v2.topk_group) == ("group_limited_greedy", 8, 3)
    assert (v2.routed_scaling_factor, v2.norm_topk_prob, v2.scoring_func) == (16.0, False, "softmax")
    assert (v2.rope_type, v2.rope_factor, v2.rope_original_max_position_embeddings) == ("yarn", 40.0, 4096)
    assert (v2.rope_beta_fast, v2.rope_beta_slow, v2.rope_mscale, v2.rope_mscale_all_dim) == (32.0, 1.0, 0.707, 0.707)
    assert (v2.vocab_size, v2.bos_token_id, v2.eos_token_id) == (102400, 100000, (100001,))
    assert v2.rms_norm_eps == 1e-6 and v2.rope_theta == 10000.0 and not v2.tie_word_embeddings

    lite = ModelConfig.named("deepseek-ai/DeepSeek-V2-Lite")
    assert (lite.hidden_size, lite.num_hidden_layers, lite.num_attention_heads, lite.q_lora_rank) == (2048, 27, 16, None)
    assert (lite.n_routed_experts, lite.n_shared_experts, lite.num_experts_per_tok) == (64, 2, 6)
    assert (lite.moe_intermediate_size, lite.intermediate_size) == (1408, 10944)
    assert (lite.topk_method, lite.n_group, lite.topk_group, lite.routed_scaling_factor) == ("greedy", 1, 1, 1.0)

    v25 = ModelConfig.named("deepseek-v2.5")
    assert dataclasses.replace(v25, rope_mscale=0.707, rope_mscale_all_dim=0.707) == v2

    v3 = ModelConfig.named("DeepSeek-V3")
    assert v3.model_type == "deepseek_v3"
    assert (v3.hidden_size, v3.num_hidden_layers, v3.vocab_size) == (7168, 61, 129280)
    assert (v3.n_routed_experts, v3.n_shared_experts, v3.num_experts_per_tok) == (256, 1, 8)
    assert (v3.moe_intermediate_size, v3.intermediate_size, v3.first_k_dense_replace) == (2048, 18432, 3)
    assert (v3.topk_method, v3.n_group, v3.topk_group, v3.scoring_func) == ("noaux_tc", 8, 4, "sigmoid")
    assert (v3.routed_scaling_factor, v3.norm_topk_prob) == (2.5, True)
    assert (v3.bos_token_id, v3.eos_token_id, v3.num_nextn_predict_layers) == (0, (1,), 1)
    assert (v3.rope_mscale, v3.rope_mscale_all_dim, v3.rope_interleave) == (1.0, 1.0, True)
    assert sorted(named_config_names()) == ["deepseek-v2", "deepseek-v2-lite", "deepseek-v2.5", "deepseek-v3"]


def test_softmax_scales_and_derived():
    # reference values from the DeepSeek-V2 reference notes, to 1e-7 absolute
    for name in ("deepseek-v2", "deepseek-v2-lite"):
        assert ModelConfig.named(name).softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    for name in ("deepseek-v2.5", "deepseek-v3"):
        assert ModelConfig.named(name).softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    v2 = ModelConfig.named("deepseek-v2")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert v2.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-15)
    assert v2.q_head_dim == 192 and v2.kv_cache_width == 576
    assert v2.rope_attention_factor == pytest.approx(1.0, rel=1e-15)
    # no YaRN -> plain 1/sqrt(192)
    plain = dataclasses.replace(v2, rope_type="default", rope_factor=None,
                                rope_original_max_position_embeddings=None, rope_beta_fast=None,
                                rope_beta_slow=None, rope_mscale=None, rope_mscale_all_dim=None)
    assert plain.softmax_scale == pytest.approx(192 ** -0.5, rel=1e-15)
    assert plain.rope_attention_factor == 1.0

    v3 = ModelConfig.named("deepseek-v3")
    assert [v3.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert (v3.num_dense_layers, v3.num_moe_layers) == (3, 58)
    assert v2.is_moe_layer(59) and not v2.is_moe_layer(0)
    with pytest.raises(IndexError):
        v2.is_moe_layer(60)
    with pytest.raises(IndexError):
        v2.is_moe_layer(-1)
    d = v3.describe()
    assert "61 layers (3 dense + 58 MoE)" in d and "noaux_tc" in d and "576" in d


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "mscale_all_dim": 1.0},
    {"rope_type": "default"},
])
def test_scales_match_transformers(rope):
    """softmax_scale and rope_attention_factor equal transformers' values (rel 1e-12)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    hf = DeepseekV2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                          intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                          num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32,
                          q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                          v_head_dim=16, max_position_embeddings=1024, vocab_size=100,
                          rope_parameters=dict(rope, rope_theta=10000.0))
    cfg = ModelConfig.from_dict(hf.to_dict())
    assert cfg.softmax_scale == pytest.approx(yarn_apply_mscale(hf.rope_parameters, 24 ** -0.5), rel=1e-12)
    if rope["rope_type"] == "yarn":
        _, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        assert cfg.rope_attention_factor == pytest.approx(attention_factor, rel=1e-12)


# --------------------------------------------------------------------------
# both spellings
# --------------------------------------------------------------------------

def test_official_lite_config_json(tmp_path):
    path = _write(tmp_path, "lite", OFFICIAL_V2_LITE)
    cfg = ModelConfig.from_pretrained(path)
    assert cfg == ModelConfig.named("deepseek-v2-lite")
    assert ModelConfig.from_pretrained(os.path.join(path, "config.json")) == cfg
    assert ModelConfig.from_json_file(os.path.join(path, "config.json")) == cfg


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_hub_and_transformers_spellings_agree(tmp_path, name):
    hub = copy.deepcopy(NAMED_CONFIGS[name])
    expected = ModelConfig.from_dict(hub)
    cls = _hf_class(hub)
    # 1. transformers reads the hub file and re-saves it (rope_parameters with both type keys)
    cls.from_dict(copy.deepcopy(hub)).save_pretrained(str(tmp_path / "resaved"))
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "rope_parameters" in saved and saved["rope_parameters"]["rope_type"] == "yarn"
    assert ModelConfig.from_pretrained(str(tmp_path / "resaved")) == expected
    # 2. a config built natively with transformers-5 arguments (rope_parameters, no
    #    topk_method/scoring_func for V3)
    kwargs = expected.to_dict()
    assert "rope_scaling" not in kwargs and "rope_theta" not in kwargs
    if hub["model_type"] == "deepseek_v3":
        assert "topk_method" not in kwargs and "scoring_func" not in kwargs
    cls(**kwargs).save_pretrained(str(tmp_path / "native"))
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    if hub["model_type"] == "deepseek_v3":
        assert "topk_method" not in native and "scoring_func" not in native
    assert ModelConfig.from_pretrained(str(tmp_path / "native")) == expected
    # 3. canonical round trip
    assert ModelConfig.from_dict(json.loads(json.dumps(expected.to_dict()))) == expected


def test_transformers_defaults(tmp_path):
    # DeepseekV3Config() as saved by transformers 5: no topk_method / scoring_func, default rope
    DeepseekV3Config().save_pretrained(str(tmp_path / "v3"))
    raw = json.loads((tmp_path / "v3" / "config.json").read_text())
    assert "topk_method" not in raw and "scoring_func" not in raw and "rope_scaling" not in raw
    v3 = ModelConfig.from_pretrained(str(tmp_path / "v3"))
    assert (v3.topk_method, v3.scoring_func, v3.rope_type, v3.rope_interleave) == ("noaux_tc", "sigmoid", "default", True)
    assert (v3.n_group, v3.topk_group, v3.norm_topk_prob, v3.num_nextn_predict_layers) == (8, 4, True, 1)
    assert v3.softmax_scale == pytest.approx(192 ** -0.5, rel=1e-15)
    # rope_interleave=False is kept (it changes the rotation pairs)
    DeepseekV3Config(rope_interleave=False).save_pretrained(str(tmp_path / "v3b"))
    assert ModelConfig.from_pretrained(str(tmp_path / "v3b")).rope_interleave is False

    # DeepseekV2Config() defaults: greedy, n_group/topk_group null, num_experts_per_tok null
    DeepseekV2Config().save_pretrained(str(tmp_path / "v2"))
    raw = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert raw["topk_method"] == "greedy" and raw["n_group"] is None and raw["num_experts_per_tok"] is None
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_pretrained(str(tmp_path / "v2"))
    assert ei.value.field == "num_experts_per_tok" and "config.json" in str(ei.value)
    DeepseekV2Config(num_experts_per_tok=6).save_pretrained(str(tmp_path / "v2b"))
    v2 = ModelConfig.from_pretrained(str(tmp_path / "v2b"))
    assert (v2.topk_method, v2.n_group, v2.topk_group, v2.scoring_func) == ("greedy", 1, 1, "softmax")
    assert (v2.bos_token_id, v2.eos_token_id, v2.q_lora_rank) == (1, (2,), 1536)


def test_legacy_model_type_and_misc():
    d = copy.deepcopy(OFFICIAL_V2_LITE)
    d["model_type"] = "deepseek"
    assert ModelConfig.from_dict(d) == ModelConfig.named("deepseek-v2-lite")
    assert ModelConfig.from_dict(d).model_type == "deepseek_v2"

    d = copy.deepcopy(OFFICIAL_V2_LITE)
    d["eos_token_id"] = [100001, 100002]
    assert ModelConfig.from_dict(d).eos_token_id == (100001, 100002)
    assert ModelConfig.from_dict(d).to_dict()["eos_token_id"] == [100001, 100002]

    d = copy.deepcopy(OFFICIAL_V2_LITE)
    d["n_routed_experts"] = None  # dense model
    dense = ModelConfig.from_dict(d)
    assert not dense.is_moe and dense.num_dense_layers == 27
    assert not any(dense.is_moe_layer(i) for i in range(27))
    assert ModelConfig.from_dict(dense.to_dict()) == dense
    assert "27 layers (27 dense + 0 MoE)" in dense.describe()

    d = copy.deepcopy(OFFICIAL_V2_LITE)
    d["moe_layer_freq"] = 2
    alt = ModelConfig.from_dict(d)
    assert [alt.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    assert ModelConfig.from_dict(alt.to_dict()) == alt

    # both rope spellings in one file, agreeing, is fine; a top-level theta agrees too
    d = copy.deepcopy(OFFICIAL_V2_LITE)
    d["rope_parameters"] = dict(d["rope_scaling"], rope_type="yarn", rope_theta=10000.0)
    assert ModelConfig.from_dict(d) == ModelConfig.named("deepseek-v2-lite")

    # the object is frozen and replace() is validated
    cfg = ModelConfig.named("deepseek-v2-lite")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]
    small = dataclasses.replace(cfg, num_hidden_layers=4)
    assert small.num_moe_layers == 3
    with pytest.raises(ConfigError) as ei:
        dataclasses.replace(cfg, num_hidden_layers=0)
    assert ei.value.field == "num_hidden_layers"


# --------------------------------------------------------------------------
# errors name the field and the value
# --------------------------------------------------------------------------

def _v2():
    return copy.deepcopy(NAMED_CONFIGS["deepseek-v2"])


def _v3():
    return copy.deepcopy(NAMED_CONFIGS["deepseek-v3"])


def _set(base, **kv):
    def make():
        d = base()
        for k, v in kv.items():
            if v is _DEL:
                d.pop(k, None)
            elif k == "rope_scaling_patch":
                d["rope_scaling"] = {**d["rope_scaling"], **v}
                d["rope_scaling"] = {a: b for a, b in d["rope_scaling"].items() if b is not _DEL}
            else:
                d[k] = v
        return d
    return make


_DEL = object()

ERROR_CASES = [
    # (id, dict factory, expected field, text that must appear)
    ("missing model_type", _set(_v2, model_type=_DEL), "model_type", "missing"),
    ("unknown model_type", _set(_v2, model_type="llama"), "model_type", "'llama'"),
    ("missing vocab", _set(_v2, vocab_size=_DEL), "vocab_size", "missing"),
    ("str hidden", _set(_v2, hidden_size="5120"), "hidden_size", "'5120'"),
    ("zero hidden", _set(_v2, hidden_size=0), "hidden_size", "= 0"),
    ("negative heads", _set(_v2, num_attention_heads=-4), "num_attention_heads", "-4"),
    ("bool layers", _set(_v2, num_hidden_layers=True), "num_hidden_layers", "True"),
    ("float layers", _set(_v2, num_hidden_layers=60.0), "num_hidden_layers", "60.0"),
    ("missing q_lora_rank", _set(_v2, q_lora_rank=_DEL), "q_lora_rank", "missing"),
    ("zero q_lora_rank", _set(_v2, q_lora_rank=0), "q_lora_rank", "= 0"),
    ("odd rope dim", _set(_v2, qk_rope_head_dim=63), "qk_rope_head_dim", "63"),
    ("missing n_routed", _set(_v2, n_routed_experts=_DEL), "n_routed_experts", "missing"),
    ("missing moe width", _set(_v2, moe_intermediate_size=_DEL), "moe_intermediate_size", "missing"),
    ("missing top-k", _set(_v2, num_experts_per_tok=None), "num_experts_per_tok", "missing"),
    ("top-k > experts", _set(_v2, topk_method="greedy", num_experts_per_tok=161), "num_experts_per_tok", "161"),
    ("groups not dividing", _set(_v2, n_group=7), "n_group", "7"),
    ("topk_group > n_group", _set(_v2, topk_group=9), "topk_group", "9"),
    ("top-k beyond kept groups", _set(_v2, num_experts_per_tok=61), "num_experts_per_tok", "61"),
    ("group method without n_group", _set(_v2, n_group=None), "n_group", "missing"),
    ("unknown topk_method", _set(_v2, topk_method="random"), "topk_method", "'random'"),
    ("unknown scoring", _set(_v2, scoring_func="tanh"), "scoring_func", "'tanh'"),
    ("v2 with sigmoid", _set(_v2, scoring_func="sigmoid"), "scoring_func", "'sigmoid'"),
    ("v2 with noaux_tc", _set(_v2, topk_method="noaux_tc"), "topk_method", "'noaux_tc'"),
    ("v3 with greedy", _set(_v3, topk_method="greedy"), "topk_method", "'greedy'"),
    ("v3 with softmax", _set(_v3, scoring_func="softmax"), "scoring_func", "'softmax'"),
    ("v3 groups of one", _set(_v3, n_group=256, topk_group=8), "n_group", "256"),
    ("v3 missing scaling", _set(_v3, routed_scaling_factor=_DEL), "routed_scaling_factor", "missing"),
    ("negative scaling", _set(_v2, routed_scaling_factor=-1.0), "routed_scaling_factor", "-1.0"),
    ("eps zero", _set(_v2, rms_norm_eps=0), "rms_norm_eps", "= 0"),
    ("nan theta", _set(_v2, rope_theta=float("nan")), "rope_theta", "nan"),
    ("unknown rope type", _set(_v2, rope_scaling_patch={"type": "linear"}), "rope_scaling.type", "'linear'"),
    ("yarn without factor", _set(_v2, rope_scaling_patch={"factor": _DEL}), "rope_scaling.factor", "missing"),
    ("yarn factor < 1", _set(_v2, rope_scaling_patch={"factor": 0.5}), "rope_scaling.factor", "0.5"),
    ("beta order", _set(_v2, rope_scaling_patch={"beta_fast": 1, "beta_slow": 32}), "rope_scaling.beta_fast", "= 1"),
    ("type/rope_type disagree", _set(_v2, rope_scaling_patch={"rope_type": "default"}), "rope_scaling.rope_type", "disagree"),
    ("theta disagree", _set(_v2, rope_scaling_patch={"rope_theta": 50000}), "rope_theta", "disagree"),
    ("rope not a dict", _set(_v2, rope_scaling="yarn"), "rope_scaling", "'yarn'"),
    ("explicit attention_factor", _set(_v2, rope_scaling_patch={"attention_factor": 1.2}),
     "rope_scaling.attention_factor", "1.2"),
    ("truncate false", _set(_v2, rope_scaling_patch={"truncate": False}), "rope_scaling.truncate", "False"),
    ("v2 non-interleaved", _set(_v2, rope_interleave=False), "rope_interleave", "False"),
    ("gelu", _set(_v2, hidden_act="gelu"), "hidden_act", "'gelu'"),
    ("attention bias", _set(_v2, attention_bias=True), "attention_bias", "True"),
    ("eos of strings", _set(_v2, eos_token_id=["</s>"]), "eos_token_id[0]", "'</s>'"),
    ("negative bos", _set(_v2, bos_token_id=-1), "bos_token_id", "-1"),
    ("norm_topk_prob not bool", _set(_v2, norm_topk_prob="no"), "norm_topk_prob", "'no'"),
]


@pytest.mark.parametrize("make,field,text", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_name_field_and_value(make, field, text):
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(make())
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.field == field, str(err)
    assert field.split("[")[0] in str(err) and text in str(err), str(err)


def test_file_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_json_file(bad)
    assert str(bad) in str(ei.value) and "JSON" in str(ei.value)
    bad.write_text(json.dumps(_set(_v2, n_group=7)()))
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_pretrained(tmp_path)
    assert str(bad) in str(ei.value) and ei.value.field == "n_group" and ei.value.source == str(bad)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "empty")
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]
    assert "mapping" in str(ei.value)
    with pytest.raises(ConfigError, match="deepseek-v2-lite"):
        ModelConfig.named("deepseek-v4")
