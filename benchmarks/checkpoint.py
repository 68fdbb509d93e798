"""Synthetic DeepSeek-V2-Lite-shaped checkpoints for the benchmarks.

Two geometries (see ``shared/reference/performance.md``):

``lite-L4``
    DeepSeek-V2-Lite shapes (hidden 2048, 16 heads, kv_lora 512, 64 routed +
    2 shared experts, top-6, moe_intermediate 1408, dense intermediate 10944,
    vocab 102400, YaRN as in the Lite config) truncated to 4 layers (1 dense +
    3 MoE), plus V2's query compression (q_lora_rank 1536 with its norm):
    llama.cpp reads ``q_lora_rank`` only for deepseek2 files that do not have
    26 or 27 layers.  ~2.3 B parameters, ~4.6 GB in bf16.
``lite-full``
    The real V2-Lite geometry (27 layers, no query compression), ~15.7 B
    parameters (~31 GB in bf16 on disk; only int8 / Q8_0 fit in RAM).

The checkpoint is written in the Hugging Face layout that
``transformers.AutoModelForCausalLM`` (>= 5.17) loads: ``config.json`` in the
transformers-5 spelling (``rope_parameters``), ``model.safetensors`` in bf16
(written tensor by tensor so that memory stays low), ``tokenizer.json`` /
``tokenizer_config.json`` (a byte-level BPE trained with the ``tokenizers``
library on local text, padded to the 102400-token vocabulary with unreachable
filler tokens; DeepSeek's bos/eos at 100000/100001) and
``generation_config.json``.

Weights are random with a fixed seed, drawn per tensor from a uniform
distribution (so that generation is fast) with these standard deviations:

=====================  ==========  =====================================
tensors                std         why
=====================  ==========  =====================================
linear layers          0.02        the usual initializer range
norm weights           1 +- 0.05   "norms ~1"
router ``mlp.gate``    0.05        decisive (not flat) expert choice
embeddings             1.0         token identity dominates the residual
``lm_head``            0.1         logits std ~4.5: clear top-two margins
=====================  ==========  =====================================

A bf16 value is the upper half of the float32 sample (truncation): the
checkpoint *is* the bf16 values, so no rounding is involved anywhere else.
"""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

__all__ = ["GEOMETRIES", "TensorSpec", "hf_config", "tensor_specs", "build_checkpoint",
           "SafetensorsMap", "checkpoint_dir", "ordered_map", "BOS_ID", "EOS_ID", "VOCAB_SIZE"]

VOCAB_SIZE = 102400
BOS_ID = 100000
EOS_ID = 100001
BOS_TEXT = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS_TEXT = "<\uff5cend\u2581of\u2581sentence\uff5c>"
#: bump when the weight recipe changes: the cache directory name carries it
RECIPE_VERSION = 1

#: geometry name -> fields that differ from DeepSeek-V2-Lite
GEOMETRIES: Dict[str, Dict[str, Any]] = {
    "lite-L4": {"num_hidden_layers": 4, "q_lora_rank": 1536},
    "lite-full": {"num_hidden_layers": 27, "q_lora_rank": None},
}


def hf_config(geometry: str) -> Dict[str, Any]:
    """config.json of a geometry, in the transformers-5 spelling.

    Parameters
    ----------
    geometry : {"lite-L4", "lite-full"}

    Returns
    -------
    dict
        What ``DeepseekV2Config.save_pretrained`` writes for these shapes.
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: expected one of {sorted(GEOMETRIES)}, got {geometry!r}")
    g = GEOMETRIES[geometry]
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "mlp_bias": False,
        "moe_intermediate_size": 1408,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": g["num_hidden_layers"],
        "num_key_value_heads": 16,
        "q_lora_rank": g["q_lora_rank"],
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        "torch_dtype": "bfloat16",
    }


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: HF name, shape [out, in] and its random init."""

    name: str
    shape: Tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def tensor_specs(cfg: Dict[str, Any]) -> List[TensorSpec]:
    """Every tensor of the causal LM, in file order.

    Parameters
    ----------
    cfg : dict
        A config from :func:`hf_config`.
    """
    d = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    nope, rope, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r_kv, r_q = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    E, Fe, Fd = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    Fs = cfg["n_shared_experts"] * Fe
    V = cfg["vocab_size"]
    W = 0.02
    NORM = dict(std=0.05, mean=1.0)
    out = [TensorSpec("model.embed_tokens.weight", (V, d), 1.0)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out.append(TensorSpec(p + "input_layernorm.weight", (d,), **NORM))
        if r_q:
            out += [TensorSpec(a + "q_a_proj.weight", (r_q, d), W),
                    TensorSpec(a + "q_a_layernorm.weight", (r_q,), **NORM),
                    TensorSpec(a + "q_b_proj.weight", (H * (nope + rope), r_q), W)]
        else:
            out.append(TensorSpec(a + "q_proj.weight", (H * (nope + rope), d), W))
        out += [TensorSpec(a + "kv_a_proj_with_mqa.weight", (r_kv + rope, d), W),
                TensorSpec(a + "kv_a_layernorm.weight", (r_kv,), **NORM),
                TensorSpec(a + "kv_b_proj.weight", (H * (nope + vdim), r_kv), W),
                TensorSpec(a + "o_proj.weight", (d, H * vdim), W),
                TensorSpec(p + "post_attention_layernorm.weight", (d,), **NORM)]
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            out += [TensorSpec(m + "gate_proj.weight", (Fd, d), W),
                    TensorSpec(m + "up_proj.weight", (Fd, d), W),
                    TensorSpec(m + "down_proj.weight", (d, Fd), W)]
        else:
            out.append(TensorSpec(m + "gate.weight", (E, d), 0.05))
            for e in range(E):
                out += [TensorSpec(m + f"experts.{e}.gate_proj.weight", (Fe, d), W),
                        TensorSpec(m + f"experts.{e}.up_proj.weight", (Fe, d), W),
                        TensorSpec(m + f"experts.{e}.down_proj.weight", (d, Fe), W)]
            out += [TensorSpec(m + "shared_experts.gate_proj.weight", (Fs, d), W),
                    TensorSpec(m + "shared_experts.up_proj.weight", (Fs, d), W),
                    TensorSpec(m + "shared_experts.down_proj.weight", (d, Fs), W)]
    out += [TensorSpec("model.norm.weight", (d,), **NORM),
            TensorSpec("lm_head.weight", (V, d), 0.1)]
    return out


_CHUNK = 1 << 24  # elements generated at a time (64 MiB of float32)


def bf16_chunks(spec: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The bf16 bits (uint16, flat, row-major) of one tensor, in chunks.

    Deterministic in (seed, name): uniform on [mean - std*sqrt(3), mean + std*sqrt(3)]
    (standard deviation ``std``), truncated to bf16.
    """
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    half = spec.std * math.sqrt(3.0)
    n = spec.numel
    done = 0
    while done < n:
        k = min(_CHUNK, n - done)
        x = rng.random(k, dtype=np.float32)
        x *= np.float32(2.0 * half)
        x += np.float32(spec.mean - half)
        yield x.view(np.uint16)[1::2].copy()  # little-endian: the high half of each float32
        done += k


T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``fn`` over ``items`` on a pool of ``workers`` threads, at most ``ahead`` results in flight,
    yielded in the order of ``items`` (a writer can then write them as a serial loop would)."""
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        it = iter(items)
        pending = deque(pool.submit(fn, x) for x in itertools.islice(it, max(1, int(ahead))))
        while pending:
            res = pending.popleft().result()
            for x in itertools.islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield res


def _write_safetensors_streaming(path: str, specs: Sequence[TensorSpec], seed: int,
                                 log: Callable[[str], None], threads: int = 1) -> None:
    header: Dict[str, Any] = {"__metadata__": {"format": "pt", "recipe": f"dsv2ext-bench-v{RECIPE_VERSION}",
                                               "seed": str(seed)}}
    off = 0
    for s in specs:
        n = s.numel * 2
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-(8 + len(hb))) % 8)
    tmp = path + ".partial"
    t0 = time.time()
    written = 0
    workers = max(1, min(int(threads), 64))

    def make(s: TensorSpec) -> List[np.ndarray]:
        return list(bf16_chunks(s, seed))

    # tensors are generated by a pool (NumPy's generators release the GIL) and written in order:
    # the bytes are those of a serial build
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for i, chunks in enumerate(ordered_map(make, specs, workers, ahead=2 * workers)):
            for chunk in chunks:
                f.write(memoryview(chunk))
                written += chunk.nbytes
            del chunks
            if i % 200 == 0 or i == len(specs) - 1:
                log(f"  safetensors: {written / 1e9:6.2f} / {off / 1e9:.2f} GB "
                    f"({time.time() - t0:.0f} s)")
    os.replace(tmp, path)


class SafetensorsMap:
    """Minimal read-only memory map of one safetensors file (BF16/F32 only).

    Parameters
    ----------
    path : str
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header: Dict[str, Any] = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self._base = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> List[str]:
        return list(self.header)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored bits: uint16 for BF16, float32 for F32 (a view of the map)."""
        h = self.header.get(name)
        if h is None:
            raise KeyError(f"tensor {name!r} not in {self.path}")
        a, b = h["data_offsets"]
        buf = self._mm[self._base + a:self._base + b]
        if h["dtype"] == "BF16":
            return buf.view(np.uint16).reshape(h["shape"])
        if h["dtype"] == "F32":
            return buf.view(np.float32).reshape(h["shape"])
        raise ValueError(f"tensor {name!r}: dtype {h['dtype']} not supported here")

    def float32(self, name: str) -> np.ndarray:
        """The tensor widened to float32 (a copy)."""
        r = self.raw(name)
        if r.dtype == np.float32:
            return np.array(r)
        return (r.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------- tokenizer

def _corpus(limit_bytes: int = 6 << 20) -> List[str]:
    """Local text to train the BPE on: the Python standard library sources (sorted)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    texts, total = [], 0
    for fn in files:
        try:
            with open(fn, "r", encoding="utf-8") as f:
                t = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(t)
        total += len(t)
        if total >= limit_bytes:
            break
    if not texts:
        raise RuntimeError(f"no Python sources found under {root} to train the tokenizer on")
    return texts


def build_tokenizer(out_dir: str, n_learned: int = 16000) -> None:
    """Write tokenizer.json / tokenizer_config.json with exactly VOCAB_SIZE ids.

    A byte-level BPE (GPT-2 byte alphabet and pre-tokenizer) with ``n_learned``
    tokens trained on local text; ids ``n_learned .. 99999`` and
    ``100002 .. 102399`` are filler tokens ``<fill_N>`` (printable ASCII, never
    produced by the merges); 100000 / 100001 are DeepSeek's bos / eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_learned, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    j = json.loads(tok.to_str())
    vocab: Dict[str, int] = j["model"]["vocab"]
    if len(vocab) > BOS_ID:
        raise RuntimeError(f"tokenizer: learned {len(vocab)} tokens, more than {BOS_ID}")
    nxt = len(vocab)
    for i in range(nxt, VOCAB_SIZE):
        if i in (BOS_ID, EOS_ID):
            continue
        vocab[f"<fill_{i}>"] = i
    j["added_tokens"] = [
        {"id": BOS_ID, "content": BOS_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": EOS_ID, "content": EOS_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
    ]
    j["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS_TEXT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": BOS_TEXT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS_TEXT: {"id": BOS_TEXT, "ids": [BOS_ID], "tokens": [BOS_TEXT]}},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": BOS_TEXT,
                   "eos_token": EOS_TEXT, "pad_token": EOS_TEXT, "clean_up_tokenization_spaces": False,
                   "model_max_length": 16384, "tokenizer_class": "PreTrainedTokenizerFast",
                   "legacy": True}, f, ensure_ascii=False, indent=1)


def tokenizer_vocab(path: str, vocab_size: int = VOCAB_SIZE) -> Tuple[List[str], List[int], List[str]]:
    """(tokens by id, token types (gguf: 1 normal, 3 control), merges "a b") of tokenizer.json."""
    with open(os.path.join(path, "tokenizer.json"), "r", encoding="utf-8") as f:
        j = json.load(f)
    tokens = [""] * vocab_size
    types = [1] * vocab_size
    for t, i in j["model"]["vocab"].items():
        tokens[i] = t
    for a in j["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4
    if any(t == "" for t in tokens):
        raise ValueError(f"{path}/tokenizer.json: ids without a token")
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return tokens, types, merges


# ----------------------------------------------------------------------------- build

def checkpoint_dir(cache: str, geometry: str, seed: int) -> str:
    """Where a geometry's checkpoint lives inside the cache."""
    return os.path.join(cache, f"{geometry}-seed{seed}-v{RECIPE_VERSION}")


def build_checkpoint(geometry: str, cache: str, seed: int = 0,
                     log: Callable[[str], None] = print, threads: Optional[int] = None) -> str:
    """Build (once) the HF-layout checkpoint of a geometry; returns its directory.

    ``threads`` tensors are generated at once (default: the CPUs this process may use, at
    most 16); the file is the same for any number.

    A ``.complete`` marker is written last: a directory without it is rebuilt.
    """
    out = checkpoint_dir(cache, geometry, seed)
    marker = os.path.join(out, ".complete")
    if os.path.isfile(marker):
        return out
    os.makedirs(out, exist_ok=True)
    cfg = hf_config(geometry)
    specs = tensor_specs(cfg)
    total = sum(s.numel for s in specs)
    need = total * 2 * 1.05
    free = _free_bytes(out)
    if free < need:
        raise RuntimeError(f"{out}: needs {need / 1e9:.1f} GB of disk for the {geometry} checkpoint, "
                           f"{free / 1e9:.1f} GB free")
    log(f"building the {geometry} checkpoint ({total / 1e9:.2f} B parameters, "
        f"{total * 2 / 1e9:.2f} GB bf16) in {out}")
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, f, indent=2)
    t0 = time.time()
    build_tokenizer(out)
    log(f"  tokenizer: {time.time() - t0:.1f} s")
    if threads is None:
        threads = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    _write_safetensors_streaming(os.path.join(out, "model.safetensors"), specs, seed, log, threads)
    with open(marker, "w") as f:
        f.write(json.dumps({"geometry": geometry, "seed": seed, "params": total,
                            "recipe": RECIPE_VERSION}) + "\n")
    return out


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


if __name__ == "__main__":  # python benchmarks/checkpoint.py [geometry] [cache]
    geo = sys.argv[1] if len(sys.argv) > 1 else "lite-L4"
    cache_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "cache")
    print(build_checkpoint(geo, cache_dir))
