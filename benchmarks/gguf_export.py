"""Write a synthetic HF checkpoint as a llama.cpp ``deepseek2`` GGUF (MLA layout).

What llama.cpp (the version vendored by llama-cpp-python 0.3.x) expects for
deepseek2, as its own ``convert_hf_to_gguf.py`` writes it:

* MLA with the absorption layout: ``kv_b_proj`` [H*(nope+v), kv_lora] is
  split per head into ``attn_k_b`` (numpy [H, kv_lora, nope], i.e. W_UK
  transposed) and ``attn_v_b`` (numpy [H, v, kv_lora]); ``head_count_kv`` is
  1 (MQA over the 576-wide latent), ``key_length`` = kv_lora + rope (576),
  ``value_length`` = kv_lora (512), ``key_length_mla`` = nope + rope (192),
  ``value_length_mla`` = v (128).
* Routed experts stacked into 3-D ``ffn_{gate,up,down}_exps`` ([E, out, in]),
  shared experts as ``ffn_*_shexp``, the router as ``ffn_gate_inp`` (kept F32,
  like the converter does), norms in F32.
* ``q_lora_rank`` is read only when the file does not have 26 or 27 layers
  (llama.cpp treats those as "Lite", without query compression).
* YaRN: ``rope.scaling.{type,factor,original_context_length,yarn_beta_fast,
  yarn_beta_slow}`` and ``rope.scaling.yarn_log_multiplier`` = 0.1 *
  mscale_all_dim (llama.cpp divides the 0.1 back out for deepseek2).
* ``expert_weights_scale`` (routed_scaling_factor), ``expert_gating_func``
  (1 = softmax), ``expert_shared_count``, ``leading_dense_block_count``.

Tensor data is copied bit for bit from the bf16 safetensors (BF16 file) or
quantized from those values with ``gguf.quants`` (Q8_0: blocks of 32 with an
fp16 scale), one tensor at a time.  Other types (Q4_0, Q4_K_M, or Q8_0 made
by llama.cpp itself) come from llama.cpp's own quantizer run on the BF16 file
(:func:`quantize_gguf`, ``llama_model_quantize`` through llama-cpp-python),
with llama.cpp's per-tensor choices and fallbacks (e.g. Q4_K_M: Q6_K for some
tensors; Q5_0 / Q8_0 / F16 for rows not divisible by 256 / 32);
:func:`gguf_tensor_types` reports what it produced.

Configs other than the benchmark geometries (e.g. the bundled model) work too:
bos / eos ids and the vocabulary size come from the config, and
``n_group`` / ``topk_group`` > 1 are written as llama.cpp's expert groups
(which llama.cpp scores as DeepSeek-V3 does, by the sum of a group's top-2
scores, where V2's group_limited_greedy takes the maximum).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from checkpoint import SafetensorsMap, ordered_map, tokenizer_vocab, BOS_ID, EOS_ID

__all__ = ["export_gguf", "gguf_path", "gguf_plan", "quantize_gguf", "gguf_tensor_types", "LLAMA_QTYPES"]

#: types written by llama.cpp's own quantizer (llama_model_quantize) from the BF16 file
LLAMA_QTYPES = ("Q4_0", "Q4_K_M", "Q8_0-LLAMA")


def gguf_path(ckpt_dir: str, qtype: str) -> str:
    """Where the GGUF of a checkpoint in a given type lives (next to it)."""
    return os.path.join(ckpt_dir, f"model-{qtype.lower()}.gguf")


def gguf_plan(cfg: Dict[str, Any]) -> List[Tuple[str, Tuple[int, ...], str, Callable[[SafetensorsMap], np.ndarray]]]:
    """(gguf name, numpy shape, kind, getter of the uint16/f32 HF data) per tensor.

    kind is "norm" (written F32), "router" (F32) or "weight" (BF16 / Q8_0).
    """
    H = cfg["num_attention_heads"]
    nope, vdim, r_kv = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    E = cfg["n_routed_experts"]
    plan: List[Tuple[str, Tuple[int, ...], str, Callable[[SafetensorsMap], np.ndarray]]] = []

    def direct(hf: str) -> Callable[[SafetensorsMap], np.ndarray]:
        return lambda st: st.raw(hf)

    def add(name: str, hf: str, kind: str, st_shape: Tuple[int, ...]) -> None:
        plan.append((name, st_shape, kind, direct(hf)))

    from checkpoint import tensor_specs
    shapes = {s.name: s.shape for s in tensor_specs(cfg)}
    add("token_embd.weight", "model.embed_tokens.weight", "weight", shapes["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        a = p + "self_attn."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", "norm", shapes[p + "input_layernorm.weight"])
        if cfg["q_lora_rank"]:
            add(b + "attn_q_a.weight", a + "q_a_proj.weight", "weight", shapes[a + "q_a_proj.weight"])
            add(b + "attn_q_a_norm.weight", a + "q_a_layernorm.weight", "norm", shapes[a + "q_a_layernorm.weight"])
            add(b + "attn_q_b.weight", a + "q_b_proj.weight", "weight", shapes[a + "q_b_proj.weight"])
        else:
            add(b + "attn_q.weight", a + "q_proj.weight", "weight", shapes[a + "q_proj.weight"])
        add(b + "attn_kv_a_mqa.weight", a + "kv_a_proj_with_mqa.weight", "weight",
            shapes[a + "kv_a_proj_with_mqa.weight"])
        add(b + "attn_kv_a_norm.weight", a + "kv_a_layernorm.weight", "norm", shapes[a + "kv_a_layernorm.weight"])

        def k_b(st: SafetensorsMap, hf: str = a + "kv_b_proj.weight") -> np.ndarray:
            kv = st.raw(hf).reshape(H, nope + vdim, r_kv)
            return np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))  # [H, r_kv, nope]

        def v_b(st: SafetensorsMap, hf: str = a + "kv_b_proj.weight") -> np.ndarray:
            kv = st.raw(hf).reshape(H, nope + vdim, r_kv)
            return np.ascontiguousarray(kv[:, nope:, :])  # [H, v, r_kv]

        plan.append((b + "attn_k_b.weight", (H, r_kv, nope), "weight", k_b))
        plan.append((b + "attn_v_b.weight", (H, vdim, r_kv), "weight", v_b))
        add(b + "attn_output.weight", a + "o_proj.weight", "weight", shapes[a + "o_proj.weight"])
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", "norm",
            shapes[p + "post_attention_layernorm.weight"])
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            for w in ("gate", "up", "down"):
                add(b + f"ffn_{w}.weight", m + f"{w}_proj.weight", "weight", shapes[m + f"{w}_proj.weight"])
        else:
            add(b + "ffn_gate_inp.weight", m + "gate.weight", "router", shapes[m + "gate.weight"])
            for w in ("gate", "up", "down"):
                eshape = shapes[m + f"experts.0.{w}_proj.weight"]

                def stack(st: SafetensorsMap, m: str = m, w: str = w) -> np.ndarray:
                    return np.stack([st.raw(m + f"experts.{e}.{w}_proj.weight") for e in range(E)])

                plan.append((b + f"ffn_{w}_exps.weight", (E,) + tuple(eshape), "weight", stack))
            for w in ("gate", "up", "down"):
                add(b + f"ffn_{w}_shexp.weight", m + f"shared_experts.{w}_proj.weight", "weight",
                    shapes[m + f"shared_experts.{w}_proj.weight"])
    add("output_norm.weight", "model.norm.weight", "norm", shapes["model.norm.weight"])
    add("output.weight", "lm_head.weight", "weight", shapes["lm_head.weight"])
    return plan


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    if bits.dtype == np.float32:
        return bits
    return (bits.astype(np.uint32) << 16).view(np.float32)


def export_gguf(ckpt_dir: str, cfg: Dict[str, Any], qtype: str,
                log: Callable[[str], None] = print, out_dir: Optional[str] = None, threads: int = 2) -> str:
    """Write ``model-{qtype}.gguf`` (once; next to the checkpoint or in ``out_dir``); returns its path.

    Parameters
    ----------
    ckpt_dir : str
        A directory from :func:`checkpoint.build_checkpoint` (or any bf16 checkpoint of this layout,
        e.g. the bundled model).
    cfg : dict
        Its config.json.
    qtype : {"BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q8_0-LLAMA"}
        BF16 / Q8_0: written here (Q8_0 by gguf.quants); the others by llama.cpp's quantizer
        from the BF16 file (made first when missing), see :func:`quantize_gguf`.
    out_dir : str, optional
        Where the files go (default: the checkpoint directory).
    threads : int
        Threads converting tensors (BF16 / Q8_0, in order of the file) or of llama.cpp's quantizer.
    """
    import gguf

    qtype = qtype.upper()
    if qtype not in ("BF16", "Q8_0") + LLAMA_QTYPES:
        raise ValueError(f"qtype: expected one of BF16, Q8_0, {', '.join(LLAMA_QTYPES)}, got {qtype!r}")
    out = gguf_path(out_dir or ckpt_dir, qtype)
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if qtype in LLAMA_QTYPES:
        src = export_gguf(ckpt_dir, cfg, "BF16", log=log, out_dir=out_dir)
        return quantize_gguf(src, qtype, out, threads=threads, log=log)
    GT = gguf.GGMLQuantizationType
    wtype = GT.BF16 if qtype == "BF16" else GT.Q8_0
    st = SafetensorsMap(os.path.join(ckpt_dir, "model.safetensors"))
    plan = gguf_plan(cfg)

    tmp = out + ".partial"
    w = gguf.GGUFWriter(tmp, "deepseek2")
    rp = cfg["rope_parameters"]
    L = cfg["num_hidden_layers"]
    w.add_name(os.path.basename(os.path.normpath(ckpt_dir)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if qtype == "BF16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if qtype == "Q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(L)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1)  # MLA as MQA over the latent
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_vocab_size(cfg["vocab_size"])
    if int(cfg.get("n_group") or 1) > 1:
        w.add_expert_group_count(int(cfg["n_group"]))
        w.add_expert_group_used_count(int(cfg["topk_group"]))
    if cfg["q_lora_rank"]:
        if L in (26, 27):
            raise ValueError("llama.cpp ignores q_lora_rank for 26/27-layer deepseek2 files")
        w.add_q_lora_rank(cfg["q_lora_rank"])
    r_kv, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_kv_lora_rank(r_kv)
    w.add_key_length(r_kv + rope)
    w.add_value_length(r_kv)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(float(cfg["routed_scaling_factor"]))
    w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_dimension_count(rope)
    if rp.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rp["beta_fast"]))
        w.add_rope_scaling_yarn_beta_slow(float(rp["beta_slow"]))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))
    tokens, types, merges = tokenizer_vocab(ckpt_dir, int(cfg["vocab_size"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(int(cfg.get("bos_token_id", BOS_ID)))
    eos = cfg.get("eos_token_id", EOS_ID)
    w.add_eos_token_id(int(eos[0] if isinstance(eos, list) else eos))
    w.add_add_bos_token(False)

    def nbytes(shape: Tuple[int, ...], t: Any) -> int:
        n = int(np.prod(shape))
        if t == GT.F32:
            return 4 * n
        if t == GT.BF16:
            return 2 * n
        return n // 32 * 34

    types_of: Dict[str, Any] = {}
    for name, shape, kind, _ in plan:
        t = GT.F32 if kind in ("norm", "router") else wtype
        types_of[name] = t
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.time()
    done = 0

    def convert(item: Tuple[str, Tuple[int, ...], str, Any]) -> np.ndarray:
        name, shape, _, get = item
        data = get(st)
        t = types_of[name]
        if t == GT.F32:
            arr = _bf16_to_f32(np.asarray(data)).reshape(shape)
        elif t == GT.BF16:
            arr = np.ascontiguousarray(data, dtype=np.uint16).reshape(shape)
        else:
            arr = gguf.quants.quantize(_bf16_to_f32(np.asarray(data)).reshape(shape), GT.Q8_0)
        if arr.nbytes != nbytes(shape, t):
            raise AssertionError(f"{name}: {arr.nbytes} bytes, expected {nbytes(shape, t)}")
        return arr

    # tensors are converted by a small pool (NumPy releases the GIL in the bulk of the work) and
    # written in order: the file is the same as a serial export
    for k, arr in enumerate(ordered_map(convert, plan, threads, ahead=int(threads) + 1)):
        w.write_tensor_data(arr)
        done += arr.nbytes
        del arr
        if k % 20 == 0 or k == len(plan) - 1:
            log(f"  gguf {qtype}: {done / 1e9:6.2f} GB, tensor {k + 1}/{len(plan)} ({time.time() - t0:.0f} s)")
    w.close()
    os.replace(tmp, out)
    return out


def quantize_gguf(src: str, qtype: str, out: str, threads: int = 2, log: Callable[[str], None] = print) -> str:
    """llama.cpp's own quantizer (``llama_model_quantize``) on a BF16 / F32 GGUF -> ``out`` (once).

    Parameters
    ----------
    src : str
        A BF16 GGUF from :func:`export_gguf`.
    qtype : {"Q4_0", "Q4_K_M", "Q8_0-LLAMA"}
        llama.cpp's file types MOSTLY_Q4_0 / MOSTLY_Q4_K_M / MOSTLY_Q8_0 (its default mixes and
        fallbacks; no importance matrix).
    out : str
    """
    import llama_cpp

    from common import load_llama_backends

    load_llama_backends()
    ftypes = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
              "Q8_0-LLAMA": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    qtype = qtype.upper()
    if qtype not in ftypes:
        raise ValueError(f"qtype: expected one of {', '.join(ftypes)}, got {qtype!r}")
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = ftypes[qtype]
    tmp = out + ".partial"
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src!r} -> {qtype}) failed with {rc}")
    os.replace(tmp, out)
    log(f"  gguf {qtype}: {os.path.getsize(out) / 1e9:.2f} GB by llama.cpp's quantizer ({time.time() - t0:.0f} s)")
    return out


def gguf_tensor_types(path: str) -> Dict[str, Any]:
    """The type, element count and bytes of every tensor of a GGUF, and bits per weight by type.

    Returns
    -------
    dict: ``tensors`` {name: (type, elements, bytes)}, ``by_type`` {type: [elements, bytes]}.
    """
    import gguf

    r = gguf.GGUFReader(path)
    tensors: Dict[str, Tuple[str, int, int]] = {}
    by_type: Dict[str, List[int]] = {}
    for t in r.tensors:
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        tensors[t.name] = (name, int(t.n_elements), int(t.n_bytes))
        acc = by_type.setdefault(name, [0, 0])
        acc[0] += int(t.n_elements)
        acc[1] += int(t.n_bytes)
    return {"tensors": tensors, "by_type": by_type}
