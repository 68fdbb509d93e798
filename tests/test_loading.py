"""Checkpoint loading: dtypes (F32/BF16/F16/FP8), memory mapping, and faults.

FP8 tolerance: the reference is transformers with the dequantized weights in
fp32; FP8 weights stay FP8 (the kernels compute with the exactly dequantized
values), and logits must agree to 1e-4 of the largest logit (tests/test_fp8.py
has more).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dsv2ext
from dsv2ext.dtypes import BF16
from dsv2ext.safetensors import FP8E4M3, SafetensorsFile, save_file
from hf_models import make_model, reference, save

TOL = 1e-4


def _ids(n=40, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, size=n)]


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_f16_checkpoint(tmp_path):
    model = make_model("v2", seed=21, q_lora_rank=40)
    save(model, str(tmp_path), torch.float16)
    ref = reference(str(tmp_path))
    ours = dsv2ext.load(str(tmp_path))
    with torch.no_grad():
        want = ref(torch.tensor([_ids()])).logits[0].numpy()
    assert _rel(ours.logits(_ids()), want) <= TOL


def test_fp8_blockwise_checkpoint(tmp_path):
    model = make_model("v3", seed=22, intermediate_size=160)
    src = str(tmp_path / "src")
    save(model, src)
    st = SafetensorsFile(os.path.join(src, "model.safetensors"))
    out = {}
    rng = np.random.default_rng(0)
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias")
    dequant = {}
    for name in st.keys():
        w = st.get(name)
        w = np.array(w.to_float32() if isinstance(w, BF16) else w, dtype=np.float32)
        if w.ndim != 2 or any(s in name for s in skip):
            out[name] = w
            continue
        rb, cb = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
        scale = (2.0 ** rng.integers(-9, -5, size=(rb, cb))).astype(np.float32)
        full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        q = torch.from_numpy(w / full).to(torch.float8_e4m3fn)
        out[name] = FP8E4M3(q.view(torch.uint8).numpy())
        out[name + "_scale_inv"] = scale
        dequant[name] = q.to(torch.float32).numpy() * full
    st.close()
    dst = str(tmp_path / "fp8")
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    # reference: transformers loading the dequantized weights in fp32
    ref_dir = str(tmp_path / "ref")
    ref_tensors = {n: dequant.get(n, out[n]) for n in out if not n.endswith("_scale_inv")}
    os.makedirs(ref_dir)
    save_file(ref_tensors, os.path.join(ref_dir, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), ref_dir)
    ref = reference(ref_dir)
    ours = dsv2ext.load(dst)
    assert ours.info()["dtype"] == "fp8"
    with torch.no_grad():
        want = ref(torch.tensor([_ids()])).logits[0].numpy()
    assert _rel(ours.logits(_ids()), want) <= TOL
    ours32 = dsv2ext.load(dst, dtype="f32")  # an explicit conversion: exact here
    assert ours32.info()["dtype"] == "f32"
    assert _rel(ours32.logits(_ids()), want) <= TOL


def test_dtype_conversion_options(tmp_path):
    model = make_model("v2", seed=23)
    save(model, str(tmp_path), torch.bfloat16)
    a = dsv2ext.load(str(tmp_path), kv_dtype="f32")  # the exact cache: compares the weights' dtype only
    b = dsv2ext.load(str(tmp_path), dtype="f32")
    assert a.info()["dtype"] == "bf16" and b.info()["dtype"] == "f32"
    assert dsv2ext.load(str(tmp_path)).kv_dtype == "bf16" and b.kv_dtype == "f32"  # the defaults
    assert _rel(a.logits(_ids()), b.logits(_ids())) <= 1e-5
    with pytest.raises(ValueError, match="dtype"):
        dsv2ext.load(str(tmp_path), dtype="fp16")


MEM_SCRIPT = r"""
import os, sys, json, psutil, numpy as np
import dsv2ext
p = psutil.Process()
path = sys.argv[1]
before = p.memory_info().rss
m = dsv2ext.load(path)
after_load = p.memory_info().rss
m.logits([1, 2, 3, 4, 5])
after_run = p.memory_info().rss
print(json.dumps({"before": before, "after_load": after_load, "after_run": after_run,
                  "dtype": m.info()["dtype"]}))
"""


def test_bf16_load_does_not_copy_weights(tmp_path):
    """A >= 200 MB bf16 checkpoint: resident memory grows by <= 1.1x the file size."""
    d, V, F = 1024, 50000, 512
    cfg = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=V, hidden_size=d,
               intermediate_size=F, moe_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
               n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None, first_k_dense_replace=1,
               max_position_embeddings=256, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
               "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    from dsv2ext.weights import expected_tensors
    from dsv2ext.config import ModelConfig
    mc = ModelConfig.from_dict(cfg)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_tensors(mc).items():
        x = (rng.standard_normal(shape, dtype=np.float32) * (1.0 if "norm" in name else 0.02))
        if "norm" in name:
            x = x * 0 + 1
        tensors[name] = BF16.from_float32(x)
    path = str(tmp_path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    del tensors
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    assert size >= 200e6
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["dtype"] == "bf16"
    assert m["after_load"] - m["before"] <= 0.1 * size      # nothing copied at load time
    assert m["after_run"] - m["before"] <= 1.1 * size       # weights touched once, never duplicated


# ---------------------------------------------------------------- faults
@pytest.fixture()
def good(tmp_path):
    model = make_model("v2", seed=24)
    path = str(tmp_path / "good")
    save(model, path)
    return path


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    st = SafetensorsFile(f)
    tensors = {n: np.array(st.get(n)) for n in st.keys()}
    st.close()
    fn(tensors)
    save_file(tensors, f)


def test_missing_tensor(good):
    _rewrite(good, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(dsv2ext.CheckpointError, match=r"experts\.3\.up_proj"):
        dsv2ext.load(good)


def test_extra_tensor(good):
    _rewrite(good, lambda t: t.__setitem__("model.layers.0.self_attn.surprise.weight", np.ones((2, 2), np.float32)))
    with pytest.raises(dsv2ext.CheckpointError, match="surprise.*model.safetensors"):
        dsv2ext.load(good)


def test_wrong_shape(good):
    _rewrite(good, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", np.ones((64, 63), np.float32)))
    with pytest.raises(dsv2ext.CheckpointError, match=r"o_proj.*shape"):
        dsv2ext.load(good)


def test_truncated_file(good):
    f = os.path.join(good, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(dsv2ext.CheckpointError, match="model.safetensors"):
        dsv2ext.load(good)


def test_header_offsets_lie(good):
    f = os.path.join(good, "model.safetensors")
    with open(f, "rb") as fh:
        raw = bytearray(fh.read())
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    name = "model.layers.0.self_attn.o_proj.weight"
    b, e = hdr[name]["data_offsets"]
    hdr[name]["data_offsets"] = [b + 10 ** 9, e + 10 ** 9]
    new = json.dumps(hdr).encode()
    new += b" " * ((8 - (8 + len(new)) % 8) % 8)
    with open(f, "wb") as fh:
        fh.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(dsv2ext.CheckpointError, match="o_proj"):
        dsv2ext.load(good)


def test_config_errors_name_the_field(good):
    p = os.path.join(good, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["n_group"] = 3  # 8 experts are not divisible into 3 groups
    cfg["topk_method"] = "group_limited_greedy"
    with open(p, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(dsv2ext.ConfigError, match="n_group"):
        dsv2ext.load(good)
    cfg["n_group"], cfg["topk_method"] = 1, "greedy"
    del cfg["kv_lora_rank"]
    with open(p, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(dsv2ext.ConfigError, match="kv_lora_rank"):
        dsv2ext.load(good)


def test_missing_shard(tmp_path):
    model = make_model("v2", seed=25)
    path = str(tmp_path)
    save(model, path, shard="50KB")
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(os.path.join(path, shards[1]))
    with pytest.raises(dsv2ext.CheckpointError, match=shards[1]):
        dsv2ext.load(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        dsv2ext.load(str(tmp_path / "nothing"))
