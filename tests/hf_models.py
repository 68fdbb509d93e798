"""Small DeepSeek-V2 / V3 checkpoints made with transformers, for the tests.

Weights are random but of non-trivial scale (Linear weights ~ N(0, 1/fan_in),
norms ~ 1 + N(0, 0.1^2), V3 correction bias ~ N(0, 0.1^2)) so that logits are
not flat and greedy decoding has clear margins.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch

VOCAB = 256


def v2_config(**over: Any):
    from transformers import DeepseekV2Config

    kw: Dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )
    kw.update(over)
    return DeepseekV2Config(**kw)


def v3_config(**over: Any):
    from transformers import DeepseekV3Config

    kw: Dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
    )
    kw.update(over)
    return DeepseekV3Config(**kw)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


def init_weights(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in name:
                continue
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        # embeddings of unit scale
        model.model.embed_tokens.weight.copy_(torch.randn(model.model.embed_tokens.weight.shape, generator=g))


def make_model(kind: str = "v2", seed: int = 0, **over: Any):
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    cfg = v2_config(**over) if kind == "v2" else v3_config(**over)
    torch.manual_seed(seed)
    model = (DeepseekV2ForCausalLM if kind == "v2" else DeepseekV3ForCausalLM)(cfg)
    init_weights(model, seed)
    return model.eval()


def save(model, path: str, dtype: torch.dtype = torch.float32, shard: Optional[str] = None) -> str:
    m = model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    m.save_pretrained(path, **kw)
    model.to(torch.float32)
    return path


def reference(path: str):
    """The checkpoint loaded back by transformers, in fp32 (bf16 weights upcast)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def to_hub_spelling(path: str) -> None:
    """Rewrite config.json in the hub remote-code spelling (rope_scaling + rope_theta)."""
    p = os.path.join(path, "config.json")
    with open(p) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.pop("rope_theta", 10000.0)
    if rp.get("rope_type", "default") != "default":
        rp["type"] = rp.pop("rope_type")
        c["rope_scaling"] = rp
    else:
        c["rope_scaling"] = None
    c["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}
    c["aux_loss_alpha"] = 0.001
    c["seq_aux"] = True
    if c["model_type"] == "deepseek_v3":
        c["topk_method"] = "noaux_tc"
        c["scoring_func"] = "sigmoid"
    else:
        c.setdefault("scoring_func", "softmax")
    with open(p, "w") as f:
        json.dump(c, f)


DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


def make_tokenizer(path: str, vocab_size: int) -> int:
    """Train a byte-level BPE of exactly ``vocab_size`` ids (0 pad, 1 bos, 2 eos) into ``path``.

    Writes tokenizer.json and tokenizer_config.json (with DeepSeek's chat template).
    Returns the vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
              "import os\nimport sys\n\nclass Foo(object):\n    def __init__(self, x):\n        self.x = x\n",
              "for i in range(10):\n    print(i, 'héllo wörld', \"naïve\")\n"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                      special_tokens=[(BOS, 1)])
    n = tok.get_vocab_size()
    assert n <= vocab_size, n
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True,
                   "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": DEEPSEEK_CHAT_TEMPLATE,
                   "model_max_length": 512}, f)
    return n


# names of the tensors DeepSeek-V3's FP8 files keep unquantized
FP8_KEPT = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias")


def save_fp8(model, path: str, ref_path: str, block=(128, 128)) -> None:
    """Write ``model`` as a DeepSeek-V3-format FP8 checkpoint (made with torch, not dsv2ext):
    each Linear weight as float8_e4m3fn with ``<name>_scale_inv`` = block amax / 448, the rest
    in fp32, config.json with V3's quantization_config.  ``ref_path`` gets the same model with
    the exactly dequantized weights (``float(W8) * scale_inv`` in fp32), for transformers."""
    from safetensors.torch import load_file, save_file as st_save

    save(model, ref_path)  # the checkpoint layout (per-expert tensors), fp32
    sd = load_file(os.path.join(ref_path, "model.safetensors"))
    fp8, deq = {}, {}
    b0, b1 = block
    for name, w in sd.items():
        if "rotary_emb" in name:
            continue
        if w.ndim != 2 or any(k in name for k in FP8_KEPT):
            fp8[name] = deq[name] = w
            continue
        rows, cols = w.shape
        rb, cb = -(-rows // b0), -(-cols // b1)
        pad = torch.zeros(rb * b0, cb * b1)
        pad[:rows, :cols] = w.abs()
        s = pad.reshape(rb, b0, cb, b1).amax(dim=(1, 3)) / 448.0
        s[s == 0] = 1.0
        full = s.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
        q = (w / full).to(torch.float8_e4m3fn)
        fp8[name], fp8[name + "_scale_inv"] = q, s.contiguous()
        deq[name] = q.to(torch.float32) * full
    os.makedirs(path, exist_ok=True)
    st_save(fp8, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    st_save(deq, os.path.join(ref_path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(ref_path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [b0, b1]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
