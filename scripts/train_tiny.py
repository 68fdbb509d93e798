#!/usr/bin/env python3
"""Train the tiny DeepSeek-V2 model that ships inside dsv2ext (``deepseek-v2-tiny-python``).

What it does, in order:

1. Corpus. Every ``.py`` file under the running interpreter's standard library
   (``sysconfig.get_paths()["stdlib"]``; folders named ``site-packages``, ``dist-packages`` and
   ``__pycache__`` are skipped, files that are not valid UTF-8 or are empty are skipped). Files
   are split BY FILE: a file is held out when ``int(sha1(relpath).hexdigest(), 16) % 20 == 0``,
   where ``relpath`` is its POSIX path relative to the stdlib folder (e.g. ``json/decoder.py``).
2. Tokenizer. A byte-level BPE (``tokenizers`` library; GPT-2 style ByteLevel pre-tokenizer and
   decoder) trained on the train split only, ``--vocab-size`` entries including the two DeepSeek
   specials ``<｜begin▁of▁sentence｜>`` (id 0, bos) and ``<｜end▁of▁sentence｜>`` (id 1, eos). Its
   post-processor prepends bos, so ``Tokenizer.encode(text).ids == [0] + encode(text, False).ids``.
3. Model. ``transformers.DeepseekV2ForCausalLM`` from scratch, with every DeepSeek-V2 feature:
   q compression (``q_lora_rank`` + its RMSNorm), latent KV (``kv_lora_rank``, split
   nope/rope/v head dims, one shared rope key), YaRN rope scaling (factor 4,
   original_max_position_embeddings 512 < max_position_embeddings 2048, mscale and
   mscale_all_dim 0.707), one dense first layer (``first_k_dense_replace = 1``), shared experts
   and routed experts with group-limited greedy routing (16 experts in 4 groups, top-2 groups,
   top-2 experts). The lm_head is untied, as in DeepSeek-V2.
4. Training. Train files are packed into one token stream (``bos + file + eos`` per file), cut
   into sequences of ``--seq-len`` tokens (a new random offset and order every epoch), AdamW
   (fused on CUDA), linear warm-up then cosine decay to ``--min-lr-ratio`` of the peak, bf16
   autocast on CUDA (TF32 allowed for training), gradient clipping, residual dropout
   (``--dropout``, forward hooks on the attention and FFN outputs; inactive in eval mode) and the
   DeepSeek-V2 expert-level balance loss (``--aux-loss-coef``, computed from the router outputs
   through forward hooks; transformers' own forward has no such loss).
5. Export. ``export/``: config.json, generation_config.json, model.safetensors (bf16, the
   DeepSeek checkpoint names: one ``mlp.experts.{e}.{gate,up,down}_proj.weight`` per expert),
   tokenizer.json, tokenizer_config.json (bos/eos, DeepSeek-V2 chat template,
   ``PreTrainedTokenizerFast``), heldout_sample.json, metrics.json and the model card README.md.
   The export is reloaded with ``DeepseekV2ForCausalLM.from_pretrained`` in fp32 and its logits
   compared with the trained weights (rounded to bf16); then it is evaluated.
6. Evaluation (fp32, TF32 off, the EXPORTED bf16 weights loaded into a fp32 model). Perplexity
   over a set of text files: each file is encoded with the tokenizer, bos prepended
   (``tokenizer.encode(text).ids``), no eos appended; its ids are cut into consecutive
   non-overlapping windows of ``W = --eval-window`` tokens (the last one may be shorter); each
   window is scored on its own, positions counted from 0, every token of the window but the first
   predicted from the tokens before it in the same window;
   ``ppl = exp(sum of next-token NLL / number of predicted tokens)`` over all windows of all
   files. Reported for the whole held-out split and for ``heldout_sample.json``, a deterministic
   subset (held-out files in sha1(relpath) order, each at most 40,000 bytes, until at least
   ``--sample-bytes`` bytes) shipped with the model so it can be recomputed elsewhere.

Checkpoints. Every ``--ckpt-every-minutes`` and when stopping, ``OUT/ckpt/`` receives the fp32
weights, the AdamW moments (stored as bf16 to keep the folder under 64 MiB), the tokenizer and
``meta.json`` (step, schedule, history), each file under 15 MiB. ``--resume OUT/ckpt`` continues
from it (the stored hyper-parameters win over the command line's). ``--max-minutes`` bounds this
invocation's wall time: training stops early enough to save and, once the schedule is complete,
export and evaluate. When the export is complete it is packed as ``OUT/export.tar`` and
``OUT/ckpt/`` is removed (so everything returned fits 64 MiB); otherwise ``OUT/ckpt/`` stays.

``--train-minutes`` shortens the cosine schedule of a fresh run, measured over steps 20-60, when
the planned ``--epochs`` would not fit.

Examples::

    # CPU smoke test (about a minute): a very small model of the same structure, few files
    python scripts/train_tiny.py --out /tmp/tt --preset smoke --max-files 120 --epochs 2 \
        --seq-len 128 --batch-size 8 --warmup-steps 5 --no-tar
    # GPU training (one H200); the bundled model was made by exactly this command, in one run of
    # 271 s (1,056 steps, 232 s of training), Python 3.12.3, torch 2.11, transformers 5.17
    python3 scripts/train_tiny.py --out $OUT --max-minutes 9.2 --train-minutes 6.0 --log-every 50
    # if it stopped before the end of the schedule (exit status 3): copy OUT/ckpt and resume
    python3 scripts/train_tiny.py --out $OUT --max-minutes 9.2 --resume .device_ckpt/ckpt
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
BOS_ID = 0
EOS_ID = 1
HELDOUT_MODULUS = 20
SAMPLE_MAX_FILE_BYTES = 40_000
# DeepSeek-V2(-Chat)'s chat template, as published in its tokenizer_config.json, except that an
# assistant message follows "Assistant:" as written (DeepSeek's adds a space): this model's answers
# start right after the generation prompt (often with a newline), and a past answer rendered the way
# it was generated keeps a session's cached tokens valid (DeepSeek's chat models answer " text").
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant:' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SHARD_BYTES = 15 * 1024 * 1024
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n", "    def __init__(self"]


# --------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------


@dataclass
class Arch:
    """Architecture of the model (the DeepseekV2Config fields that are chosen here)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 32
    intermediate_size: int = 512
    moe_intermediate_size: int = 48
    n_routed_experts: int = 16
    n_shared_experts: int = 2
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 4.0
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    yarn_factor: float = 4.0
    original_max_position_embeddings: int = 512
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.707
    mscale_all_dim: float = 0.707


PRESETS: dict[str, Arch] = {
    "tiny": Arch(),
    # A very small model with the same structure, for testing the script on a CPU.
    "smoke": Arch(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=96,
        moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, max_position_embeddings=512, original_max_position_embeddings=128,
    ),
}


@dataclass
class TrainArgs:
    """Everything that defines a training run (stored in the checkpoint; wins on resume)."""

    preset: str = "tiny"
    arch: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 512
    batch_size: int = 64
    epochs: float = 12.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.1
    aux_loss_coef: float = 0.01
    seed: int = 0
    max_files: int | None = None
    tokenizer_max_bytes: int = 200_000_000
    eval_window: int = 512
    sample_bytes: int = 150_000


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass
class SourceFile:
    """One stdlib source file: POSIX path relative to the stdlib folder and its text."""

    relpath: str
    text: str


def relpath_hash(relpath: str) -> int:
    """Return ``int(sha1(relpath as UTF-8).hexdigest(), 16)``, the split and sample key."""
    return int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16)


def is_heldout(relpath: str) -> bool:
    """True when the file belongs to the held-out split (sha1(relpath) mod 20 == 0)."""
    return relpath_hash(relpath) % HELDOUT_MODULUS == 0


def collect_stdlib(root: Path, max_files: int | None = None) -> tuple[list[SourceFile], dict[str, int]]:
    """Read every ``.py`` file under ``root`` (the stdlib folder), sorted by relative path.

    Parameters
    ----------
    root : Path
        The standard library folder.
    max_files : int or None
        Keep only the first ``max_files`` files (sorted by path); for quick tests.

    Returns
    -------
    files : list of SourceFile
        Valid UTF-8, non-empty files.
    stats : dict
        ``skipped_non_utf8`` and ``skipped_empty`` counts.
    """
    if not root.is_dir():
        raise ValueError(f"stdlib folder {root} does not exist")
    skip_dirs = {"site-packages", "dist-packages", "__pycache__"}
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    files: list[SourceFile] = []
    stats = {"skipped_non_utf8": 0, "skipped_empty": 0}
    for p in paths:
        if not p.is_file():
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_non_utf8"] += 1
            continue
        if not text.strip():
            stats["skipped_empty"] += 1
            continue
        files.append(SourceFile(p.relative_to(root).as_posix(), text))
        if max_files is not None and len(files) >= max_files:
            break
    if not files:
        raise ValueError(f"no usable .py files under {root}")
    return files, stats


def select_sample(heldout: list[SourceFile], target_bytes: int) -> list[SourceFile]:
    """Deterministic held-out sample: files in sha1(relpath) order, each at most 40,000 bytes
    of UTF-8, taken until their total reaches ``target_bytes``."""
    chosen: list[SourceFile] = []
    total = 0
    for f in sorted(heldout, key=lambda f: hashlib.sha1(f.relpath.encode("utf-8")).hexdigest()):
        n = len(f.text.encode("utf-8"))
        if n > SAMPLE_MAX_FILE_BYTES:
            continue
        chosen.append(f)
        total += n
        if total >= target_bytes:
            break
    return chosen


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, max_bytes: int) -> "Any":
    """Train a byte-level BPE on ``texts`` (at most ``max_bytes`` of them, in order).

    Returns a ``tokenizers.Tokenizer`` whose ids 0 and 1 are bos and eos and whose
    post-processor prepends bos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    used: list[str] = []
    total = 0
    for t in texts:
        if total >= max_bytes:
            break
        used.append(t)
        total += len(t)
    tok.train_from_iterator(used, trainer=trainer, length=len(used))
    if tok.token_to_id(BOS_TOKEN) != BOS_ID or tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise RuntimeError("special tokens did not get ids 0 and 1")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tok


def tokenizer_config_dict(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json contents (transformers ``PreTrainedTokenizerFast``)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_config(arch: Arch, experts_impl: str = "eager") -> "Any":
    """The transformers ``DeepseekV2Config`` for ``arch`` (transformers >= 5 field spelling)."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        moe_intermediate_size=arch.moe_intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        q_lora_rank=arch.q_lora_rank,
        kv_lora_rank=arch.kv_lora_rank,
        qk_nope_head_dim=arch.qk_nope_head_dim,
        qk_rope_head_dim=arch.qk_rope_head_dim,
        v_head_dim=arch.v_head_dim,
        n_routed_experts=arch.n_routed_experts,
        n_shared_experts=arch.n_shared_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        n_group=arch.n_group,
        topk_group=arch.topk_group,
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        routed_scaling_factor=arch.routed_scaling_factor,
        first_k_dense_replace=arch.first_k_dense_replace,
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": arch.rope_theta,
            "factor": arch.yarn_factor,
            "original_max_position_embeddings": arch.original_max_position_embeddings,
            "beta_fast": arch.beta_fast,
            "beta_slow": arch.beta_slow,
            "mscale": arch.mscale,
            "mscale_all_dim": arch.mscale_all_dim,
        },
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        use_cache=False,
        attn_implementation="sdpa",
        experts_implementation=experts_impl,
    )


def check_arch(arch: Arch) -> None:
    """Raise ValueError unless ``arch`` uses every DeepSeek-V2 feature the brief asks for."""
    problems = []
    if arch.q_lora_rank <= 0:
        problems.append("q_lora_rank must be > 0 (q compression)")
    if arch.n_group <= 1 or arch.topk_group >= arch.n_group:
        problems.append("need n_group > 1 and topk_group < n_group")
    if arch.n_routed_experts % arch.n_group:
        problems.append("n_routed_experts must be a multiple of n_group")
    if arch.num_experts_per_tok < 2 or arch.n_shared_experts < 1:
        problems.append("need top-k >= 2 and at least one shared expert")
    if arch.first_k_dense_replace != 1 or arch.num_hidden_layers < 2:
        problems.append("need exactly one dense first layer and MoE layers after it")
    if not (arch.yarn_factor > 1 and arch.original_max_position_embeddings < arch.max_position_embeddings):
        problems.append("YaRN needs factor > 1 and original_max_position_embeddings < max_position_embeddings")
    if arch.hidden_size % arch.num_attention_heads:
        problems.append("hidden_size must be a multiple of num_attention_heads")
    if problems:
        raise ValueError("architecture: " + "; ".join(problems))


def count_parameters(model: torch.nn.Module, arch: Arch) -> dict[str, int]:
    """Parameter counts.

    ``active`` = parameters used for one token: everything except the routed experts that the
    token does not select (``num_experts_per_tok`` of ``n_routed_experts`` are used in each MoE
    layer); the embedding table and lm_head are counted in both ``total`` and ``active``.
    """
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    active = total - routed + routed * arch.num_experts_per_tok // arch.n_routed_experts
    return {
        "total": total,
        "active_per_token": active,
        "routed_experts": routed,
        "embedding": embed,
        "lm_head": head,
        "non_embedding_total": total - embed - head,
        "non_embedding_active": active - embed - head,
    }


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under DeepSeek's checkpoint names, cast to ``dtype``.

    transformers >= 5 keeps the routed experts of a layer fused as ``mlp.experts.gate_up_proj``
    [E, 2*I, d] (gate rows first) and ``mlp.experts.down_proj`` [E, d, I]; DeepSeek checkpoints
    (and ``save_pretrained``) store ``mlp.experts.{e}.{gate,up,down}_proj.weight`` per expert.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].to(dtype).contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].to(dtype).contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].to(dtype).contiguous()
        else:
            out[name] = t.to(dtype).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def make_windows(token_lists: list[list[int]], window: int) -> list[list[int]]:
    """Cut each id list into consecutive non-overlapping windows of ``window`` ids (the last may
    be shorter); windows of fewer than 2 ids predict nothing and are dropped."""
    if window < 2:
        raise ValueError(f"eval window must be >= 2, got {window}")
    out = []
    for ids in token_lists:
        for s in range(0, len(ids), window):
            w = ids[s : s + window]
            if len(w) >= 2:
                out.append(w)
    return out


@torch.no_grad()
def window_nll(
    model: torch.nn.Module,
    token_lists: list[list[int]],
    window: int,
    device: torch.device,
    batch_size: int = 16,
    autocast: bool = False,
) -> tuple[float, int]:
    """Sum of next-token NLL (nats) and number of predicted tokens over all windows.

    Windows are scored independently (positions from 0). Shorter windows are right-padded in a
    batch; causal attention and per-token routing keep the real positions unaffected, and the
    padded positions are not counted.
    """
    model.eval()
    wins = make_windows(token_lists, window)
    total = 0.0
    count = 0
    for i in range(0, len(wins), batch_size):
        chunk = wins[i : i + batch_size]
        n = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), n), EOS_ID, dtype=torch.long)
        tgt = torch.full((len(chunk), n - 1), -100, dtype=torch.long)
        for j, w in enumerate(chunk):
            ids[j, : len(w)] = torch.tensor(w)
            tgt[j, : len(w) - 1] = torch.tensor(w[1:])
        ids, tgt = ids.to(device), tgt.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits[:, :-1]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(nll.item())
        count += int((tgt != -100).sum().item())
    return total, count


@torch.no_grad()
def greedy(model: torch.nn.Module, tok: Any, prompt: str, n_new: int, device: torch.device) -> tuple[list[int], str]:
    """Greedy continuation without a cache (full recompute each step; argmax, lowest id on ties).

    Returns the new ids and their decoded text."""
    model.eval()
    ids = tok.encode(prompt).ids
    new: list[int] = []
    for _ in range(n_new):
        x = torch.tensor([ids + new], device=device)
        nxt = int(model(input_ids=x).logits[0, -1].float().argmax().item())
        new.append(nxt)
        if nxt == EOS_ID:
            break
    return new, tok.decode(new, skip_special_tokens=False)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, stem: str) -> list[str]:
    """Write ``tensors`` as safetensors files ``{stem}-NN.safetensors`` of at most 15 MiB each."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        nb = t.numel() * t.element_size()
        if nb > SHARD_BYTES:
            raise ValueError(f"tensor {name} ({nb} bytes) is larger than one shard")
        if size + nb > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nb
    names = []
    for i, sh in enumerate(shards):
        fname = f"{stem}-{i:02d}.safetensors"
        save_file(sh, str(directory / (fname + ".tmp")))
        os.replace(directory / (fname + ".tmp"), directory / fname)
        names.append(fname)
    return names


def read_sharded(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read back what :func:`write_sharded` wrote."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for n in names:
        p = directory / n
        if not p.is_file():
            raise ValueError(f"checkpoint file {p} is missing")
        out.update(load_file(str(p)))
    return out


def save_checkpoint(ckdir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, tok: Any, meta: dict[str, Any]) -> None:
    """fp32 weights, bf16 AdamW moments, tokenizer and meta.json into ``ckdir`` (replaced)."""
    tmp = ckdir.with_name(ckdir.name + ".writing")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = dict(model.named_parameters())
    pid = {id(p): n for n, p in names.items()}
    m1: dict[str, torch.Tensor] = {}
    m2: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = pid[id(p)]
            m1[n] = st["exp_avg"].to(torch.bfloat16)
            m2[n] = st["exp_avg_sq"].to(torch.bfloat16)
            steps[n] = float(st["step"])
    meta = dict(meta)
    meta["files"] = {
        "params": write_sharded({n: p.data.float() for n, p in names.items()}, tmp, "params"),
        "exp_avg": write_sharded(m1, tmp, "exp_avg") if m1 else [],
        "exp_avg_sq": write_sharded(m2, tmp, "exp_avg_sq") if m2 else [],
    }
    meta["opt_steps"] = steps
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if ckdir.exists():
        shutil.rmtree(ckdir)
    os.replace(tmp, ckdir)


def load_checkpoint(ckdir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Restore weights and AdamW state saved by :func:`save_checkpoint` into ``model``/``opt``."""
    meta = json.loads((ckdir / "meta.json").read_text())
    params = read_sharded(ckdir, meta["files"]["params"])
    named = dict(model.named_parameters())
    if set(params) != set(named):
        raise ValueError(f"checkpoint {ckdir}: parameter names differ from the model's")
    with torch.no_grad():
        for n, p in named.items():
            if params[n].shape != p.shape:
                raise ValueError(f"checkpoint {ckdir}: {n} has shape {tuple(params[n].shape)}, model {tuple(p.shape)}")
            p.copy_(params[n])
    m1 = read_sharded(ckdir, meta["files"]["exp_avg"])
    m2 = read_sharded(ckdir, meta["files"]["exp_avg_sq"])
    sd = opt.state_dict()
    order = [n for g in opt.param_groups for n in (g["param_names"] if "param_names" in g else [])]
    if not order:
        pid = {id(p): n for n, p in named.items()}
        order = [pid[id(p)] for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, n in enumerate(order):
        if n in m1:
            state[idx] = {
                "step": torch.tensor(meta["opt_steps"][n], dtype=torch.float32),
                "exp_avg": m1[n].float(),
                "exp_avg_sq": m2[n].float(),
            }
    sd["state"] = state
    opt.load_state_dict(sd)


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------


class RouterStats:
    """Forward hooks on every MoE router: collects the DeepSeek-V2 expert-level balance loss
    ``E * sum_i f_i * P_i`` (f_i: fraction of the token-slots routed to expert i, P_i: mean
    router probability of expert i; 1.0 when perfectly balanced) and per-expert token counts."""

    def __init__(self, model: torch.nn.Module, n_experts: int) -> None:
        self.n_experts = n_experts
        self.losses: list[torch.Tensor] = []
        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.handles.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            logits, _weights, idx = output
            probs = logits.float().softmax(dim=-1)
            flat = idx.reshape(-1)
            cnt = torch.zeros(self.n_experts, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
            frac = cnt / idx.numel()
            self.losses.append(self.n_experts * (frac * probs.mean(0)).sum())
            c = cnt.detach()
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c

        return hook

    def pop_loss(self) -> torch.Tensor | None:
        if not self.losses:
            return None
        out = torch.stack(self.losses).mean()
        self.losses = []
        return out

    def pop_balance(self) -> dict[str, float]:
        """max/mean expert load over the collected steps, worst layer and mean over layers."""
        if not self.counts:
            return {}
        ratios = [float((c.max() / c.mean().clamp_min(1e-9)).item()) for c in self.counts.values()]
        self.counts = {}
        return {"max_over_mean_load_worst_layer": max(ratios), "max_over_mean_load_avg": sum(ratios) / len(ratios)}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def add_dropout_hooks(model: torch.nn.Module, p: float) -> list[Any]:
    """Residual dropout: drop elements of each attention and FFN output during training."""
    if p <= 0:
        return []

    def attn_hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        if module.training:
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return output

    def mlp_hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        return F.dropout(output, p, True) if module.training else output

    hs = []
    for layer in model.model.layers:
        hs.append(layer.self_attn.register_forward_hook(attn_hook))
        hs.append(layer.mlp.register_forward_hook(mlp_hook))
    return hs


def lr_at(step: int, ta: TrainArgs, total_steps: int) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    if step < ta.warmup_steps:
        return ta.lr * (step + 1) / ta.warmup_steps
    prog = min(1.0, (step - ta.warmup_steps) / max(1, total_steps - ta.warmup_steps))
    return ta.lr * (ta.min_lr_ratio + (1 - ta.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


class Batches:
    """Sequences of ``seq_len + 1`` tokens from the packed stream; epoch ``e`` uses its own random
    start offset in [0, seq_len) and order, both from ``seed`` and ``e`` alone (resumable)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.n_seq = (stream.numel() - seq_len) // seq_len  # valid for any offset < seq_len
        self.steps_per_epoch = self.n_seq // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"corpus too small: {stream.numel()} tokens for one batch of {batch_size}x{seq_len}")
        self._epoch = -1
        self._perm: torch.Tensor | None = None
        self._offset = 0

    def get(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._offset = int(torch.randint(0, self.seq_len, (1,), generator=g).item())
            self._perm = torch.randperm(self.n_seq, generator=g)
            self._epoch = epoch
        idx = self._perm[k * self.batch_size : (k + 1) * self.batch_size]
        starts = self._offset + idx * self.seq_len
        ar = torch.arange(self.seq_len + 1)
        return self.stream[(starts[:, None] + ar[None, :]).to(self.stream.device)]


class Log:
    """Print (flushed) and append to a log file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------------------------
# Export and model card
# --------------------------------------------------------------------------------------------


def fmt_int(n: int) -> str:
    return f"{n:,}"


def write_model_card(path: Path, cfg_dict: dict[str, Any], m: dict[str, Any]) -> None:
    """README.md model card from the export's config and the run's metrics ``m``."""
    pc = m["params"]
    ev = m["eval"]
    co = m["corpus"]
    tr = m["training"]
    arch_rows = "\n".join(
        f"| `{k}` | `{json.dumps(cfg_dict[k], ensure_ascii=False)}` |"
        for k in sorted(cfg_dict)
        if k not in ("transformers_version",)
    )
    samples = "\n\n".join(
        f"Prompt `{json.dumps(s['prompt'])}`, greedy, {len(s['ids'])} new tokens:\n\n```python\n{s['prompt']}{s['text']}\n```"
        for s in m["samples"]
    )
    text = f"""# deepseek-v2-tiny-python

A {pc['total'] / 1e6:.2f} M-parameter DeepSeek-V2 model (transformers `DeepseekV2ForCausalLM`) trained
from scratch on the Python {co['python_version']} standard library, bundled with dsv2ext so that the whole
DeepSeek-V2 path (byte-level BPE tokenizer, MLA with q compression, latent KV and YaRN rope,
a dense first layer, DeepSeekMoE with shared experts and group-limited routing) runs with real,
learned weights and no download. It is a demonstration model: it writes Python-looking code,
not correct programs.

Files: `config.json`, `generation_config.json`, `model.safetensors` (bf16, DeepSeek tensor names,
one tensor per expert), `tokenizer.json`, `tokenizer_config.json`, `heldout_sample.json`,
`metrics.json` (every number on this card, machine-readable), this README. Made by
`scripts/train_tiny.py` in the dsv2ext repository.

## Architecture

| | |
| --- | --- |
| layers | {cfg_dict['num_hidden_layers']} (layer 0 dense SwiGLU MLP, width {cfg_dict['intermediate_size']}; layers 1-{cfg_dict['num_hidden_layers'] - 1} DeepSeekMoE) |
| hidden size | {cfg_dict['hidden_size']}, {cfg_dict['num_attention_heads']} attention heads |
| MLA | q: `q_a_proj` {cfg_dict['hidden_size']}->{cfg_dict['q_lora_rank']}, RMSNorm, `q_b_proj` -> {cfg_dict['num_attention_heads']} x ({cfg_dict['qk_nope_head_dim']} nope + {cfg_dict['qk_rope_head_dim']} rope); KV latent {cfg_dict['kv_lora_rank']} + one shared {cfg_dict['qk_rope_head_dim']}-dim rope key per token; v head dim {cfg_dict['v_head_dim']} |
| RoPE | YaRN, factor {cfg_dict['rope_parameters']['factor']}, original_max_position_embeddings {cfg_dict['rope_parameters']['original_max_position_embeddings']}, max_position_embeddings {cfg_dict['max_position_embeddings']}, mscale = mscale_all_dim = {cfg_dict['rope_parameters']['mscale']} (softmax scale (qk head dim)^-0.5 x m^2) |
| MoE | {cfg_dict['n_routed_experts']} routed experts (width {cfg_dict['moe_intermediate_size']}) in {cfg_dict['n_group']} groups, `group_limited_greedy`: top-{cfg_dict['topk_group']} groups, top-{cfg_dict['num_experts_per_tok']} experts, softmax scores, routed_scaling_factor {cfg_dict['routed_scaling_factor']}, no renormalization; {cfg_dict['n_shared_experts']} shared experts (one SwiGLU of width {cfg_dict['n_shared_experts'] * cfg_dict['moe_intermediate_size']}) |
| vocabulary | {cfg_dict['vocab_size']} (byte-level BPE), bos `{BOS_TOKEN}` = {BOS_ID}, eos `{EOS_TOKEN}` = {EOS_ID}; untied lm_head |

Every field of `config.json`:

| field | value |
| --- | --- |
{arch_rows}

## Parameters

| | count |
| --- | --- |
| total | {fmt_int(pc['total'])} |
| active per token | {fmt_int(pc['active_per_token'])} |
| of which embedding table | {fmt_int(pc['embedding'])} |
| of which lm_head | {fmt_int(pc['lm_head'])} |
| routed experts (all) | {fmt_int(pc['routed_experts'])} |
| non-embedding total / active | {fmt_int(pc['non_embedding_total'])} / {fmt_int(pc['non_embedding_active'])} |

Active per token = all parameters except the routed experts a token does not use
({cfg_dict['num_experts_per_tok']} of {cfg_dict['n_routed_experts']} in each MoE layer); embedding and lm_head are counted.

## Corpus and license

The `.py` files of the Python {co['python_version']} standard library found at `{co['stdlib']}` on the
training machine ({co['platform']}), excluding `site-packages`/`dist-packages`; files that are not
UTF-8 or empty were skipped ({co['skipped_non_utf8']} and {co['skipped_empty']}). Split by file: held out when
`int(sha1(relpath).hexdigest(), 16) % 20 == 0`, relpath being the POSIX path below the stdlib folder.

| split | files | bytes | tokens (with bos/eos) |
| --- | --- | --- | --- |
| train | {fmt_int(co['train_files'])} | {fmt_int(co['train_bytes'])} | {fmt_int(co['train_tokens'])} |
| held-out | {fmt_int(co['heldout_files'])} | {fmt_int(co['heldout_bytes'])} | {fmt_int(co['heldout_tokens'])} |
| held-out sample (`heldout_sample.json`) | {fmt_int(co['sample_files'])} | {fmt_int(co['sample_bytes'])} | {fmt_int(co['sample_tokens'])} |

The Python standard library is Copyright (c) 2001 Python Software Foundation, All Rights
Reserved, and is distributed under the PSF License Agreement (PSF-2.0; some modules carry
additional permissive notices, see the LICENSE file of a CPython distribution). The weights are
derived from that source; `heldout_sample.json` contains verbatim stdlib files and is distributed
under the same PSF License.

## Training

| | |
| --- | --- |
| hardware | {tr['device']} |
| software | torch {tr['torch']}, transformers {tr['transformers']}, tokenizers {tr['tokenizers']} |
| steps | {fmt_int(tr['steps'])} x {tr['batch_size']} sequences x {tr['seq_len']} tokens ({tr['schedule_note']}) |
| tokens trained | {fmt_int(tr['tokens_trained'])} ({tr['epochs']:.2f} passes over the train split) |
| optimizer | AdamW (betas {tr['beta1']}, {tr['beta2']}, weight decay {tr['weight_decay']} on matrices), peak lr {tr['lr']}, {tr['warmup_steps']} warm-up steps, cosine to {tr['min_lr_ratio']} x peak, grad clip {tr['grad_clip']} |
| precision | {tr['precision']} |
| regularization | residual dropout {tr['dropout']} on attention and FFN outputs (training only) |
| routing balance | DeepSeek-V2 expert-level balance loss, coefficient {tr['aux_loss_coef']}; final load max/mean {tr.get('final_balance', {}).get('max_over_mean_load_avg', float('nan')):.2f} (layer average) |
| wall time | {tr['train_seconds']:.0f} s of training steps, {tr['run_seconds']:.0f} s for the whole run(s) including corpus, tokenizer, export and evaluation |
| final train loss | {tr['final_train_loss']:.4f} |

## Held-out perplexity

Definition: each file is encoded with this tokenizer with bos prepended and no eos
(`tokenizer.encode(text)`; with `tokenizers`, `Tokenizer.from_file("tokenizer.json").encode(text).ids`);
the ids are cut into consecutive non-overlapping windows of W = {ev['window']} tokens (the last window of a file
may be shorter; a window of one token predicts nothing); every window is scored on its own with
positions from 0, each of its tokens but the first predicted from the tokens before it in the window;
ppl = exp(sum of next-token negative log-likelihoods (nats) / number of predicted tokens), over all
windows of all files. Computed in fp32 (TF32 off) with the bf16 weights of this directory loaded into a
fp32 `DeepseekV2ForCausalLM`.

| set | predicted tokens | mean NLL (nats) | perplexity |
| --- | --- | --- | --- |
| whole held-out split (Python {co['python_version']} stdlib) | {fmt_int(ev['heldout']['tokens'])} | {ev['heldout']['nll'] / ev['heldout']['tokens']:.5f} | {ev['heldout']['ppl']:.4f} |
| `heldout_sample.json` | {fmt_int(ev['sample']['tokens'])} | {ev['sample']['nll'] / ev['sample']['tokens']:.5f} | {ev['sample']['ppl']:.4f} |

`heldout_sample.json` is a list of `{{"path", "text"}}` objects: held-out files in sha1(path) order,
each at most {SAMPLE_MAX_FILE_BYTES:,} bytes, until at least {tr['sample_bytes']:,} bytes; it lets the sample perplexity be
recomputed on exactly these tokens on a machine with another Python version.

## Sample output

{samples}
"""
    path.write_text(text)


def export_model(
    model: torch.nn.Module,
    arch: Arch,
    tok: Any,
    sample: list[SourceFile],
    out_dir: Path,
) -> dict[str, Any]:
    """Write the HF checkpoint directory (without README/metrics). Returns the config dict."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cfg = build_config(arch)
    cfg.use_cache = True
    cfg.architectures = ["DeepseekV2ForCausalLM"]
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(str(out_dir))
    cfg_dict = json.loads((out_dir / "config.json").read_text())
    for k in ("attn_implementation", "_attn_implementation", "experts_implementation", "_experts_implementation"):
        cfg_dict.pop(k, None)
    (out_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=True, temperature=0.3, top_p=0.95).save_pretrained(str(out_dir))
    save_file(hf_state_dict(model, torch.bfloat16), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config_dict(arch.max_position_embeddings), indent=2, ensure_ascii=False) + "\n"
    )
    (out_dir / "heldout_sample.json").write_text(
        json.dumps([{"path": f.relpath, "text": f.text} for f in sample], ensure_ascii=False, indent=0) + "\n"
    )
    return cfg_dict


def load_export_fp32(out_dir: Path, device: torch.device) -> torch.nn.Module:
    """The exported directory loaded with transformers into a fp32 model (eager experts)."""
    from transformers import DeepseekV2ForCausalLM

    m = DeepseekV2ForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, experts_implementation="eager")
    return m.to(device).eval()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TrainArgs()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoint, export, log)")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint folder to continue from")
    p.add_argument("--stdlib", type=Path, default=None, help="stdlib folder (default: this interpreter's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset)
    p.add_argument("--max-files", type=int, default=d.max_files, help="use only the first N files (tests)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the train split")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-window", type=int, default=d.eval_window, help="perplexity window W")
    p.add_argument("--sample-bytes", type=int, default=d.sample_bytes)
    p.add_argument("--tokenizer-max-bytes", type=int, default=d.tokenizer_max_bytes)
    p.add_argument("--max-minutes", type=float, default=9.0, help="wall-clock budget of this invocation")
    p.add_argument("--export-reserve-minutes", type=float, default=1.5, help="kept free for export and evaluation")
    p.add_argument("--ckpt-every-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    p.add_argument("--monitor-every", type=int, default=0, help="steps between held-out monitor evaluations (0: half an epoch)")
    p.add_argument("--monitor-windows", type=int, default=256, help="held-out windows (of --seq-len) in the monitor")
    p.add_argument("--train-minutes", type=float, default=7.0,
                   help="on a fresh start, shorten the schedule (measured over steps 20-60) so that training takes at most this long")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast for training (auto: on CUDA)")
    p.add_argument("--no-tar", action="store_true", help="leave OUT/export/ as a folder instead of OUT/export.tar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    a = parse_args(argv)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train.log")
    deadline = t_start + a.max_minutes * 60
    train_deadline = deadline - a.export_reserve_minutes * 60

    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    from transformers import DeepseekV2ForCausalLM

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else ("cpu" if a.device == "auto" else a.device))
    cuda = device.type == "cuda"
    amp = cuda if a.amp == "auto" else a.amp == "on"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} "
        f"tokenizers {tokenizers.__version__} device {device}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))

    # ---- hyper-parameters (stored ones win on resume)
    meta: dict[str, Any] = {}
    if a.resume is not None:
        if not (a.resume / "meta.json").is_file():
            raise ValueError(f"--resume {a.resume}: no meta.json there")
        meta = json.loads((a.resume / "meta.json").read_text())
        ta = TrainArgs(**meta["train_args"])
        log(f"resuming from {a.resume} at step {meta['step']} of {meta['total_steps']}")
    else:
        ta = TrainArgs(
            preset=a.preset, arch=asdict(PRESETS[a.preset]), seq_len=a.seq_len, batch_size=a.batch_size, epochs=a.epochs,
            lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, dropout=a.dropout,
            aux_loss_coef=a.aux_loss_coef, seed=a.seed, max_files=a.max_files, tokenizer_max_bytes=a.tokenizer_max_bytes,
            eval_window=a.eval_window, sample_bytes=a.sample_bytes,
        )
    arch = Arch(**ta.arch)
    check_arch(arch)
    if ta.seq_len > arch.max_position_embeddings:
        raise ValueError(f"--seq-len {ta.seq_len} exceeds max_position_embeddings {arch.max_position_embeddings}")

    # ---- corpus
    root = a.stdlib if a.stdlib is not None else Path(sysconfig.get_paths()["stdlib"])
    files, skip = collect_stdlib(root, ta.max_files)
    train = [f for f in files if not is_heldout(f.relpath)]
    held = [f for f in files if is_heldout(f.relpath)]
    if not train or not held:
        raise ValueError(f"split gave {len(train)} train and {len(held)} held-out files; use more files")
    sample = select_sample(held, ta.sample_bytes)
    log(f"stdlib {root}: {len(files)} files ({skip}), train {len(train)} files {sum(len(f.text) for f in train):,} chars, "
        f"held-out {len(held)} files, sample {len(sample)} files {sum(len(f.text.encode()) for f in sample):,} bytes")

    # ---- tokenizer
    t0 = time.time()
    if a.resume is not None:
        tok = Tokenizer.from_file(str(a.resume / "tokenizer.json"))
    else:
        tok = train_tokenizer([f.text for f in train], arch.vocab_size, ta.tokenizer_max_bytes)
    if tok.get_vocab_size() != arch.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} entries, config says {arch.vocab_size}")
    enc_train = [e.ids for e in tok.encode_batch([f.text for f in train], add_special_tokens=False)]
    enc_held = [[BOS_ID] + e.ids for e in tok.encode_batch([f.text for f in held], add_special_tokens=False)]
    if tok.encode(held[0].text).ids != enc_held[0]:
        raise RuntimeError("tokenizer post-processor does not prepend bos as expected")
    stream = torch.tensor([t for ids in enc_train for t in ([BOS_ID] + ids + [EOS_ID])], dtype=torch.long)
    sample_ids = [tok.encode(f.text).ids for f in sample]
    log(f"tokenizer {'loaded' if a.resume else 'trained'} in {time.time() - t0:.1f}s; train stream {stream.numel():,} tokens, "
        f"held-out {sum(map(len, enc_held)):,} tokens ({sum(len(f.text) for f in train) / stream.numel():.2f} chars/token)")
    if meta and meta.get("train_stream_tokens") != stream.numel():
        raise ValueError(f"the corpus differs from the checkpoint's ({stream.numel()} vs {meta.get('train_stream_tokens')} tokens)")

    # ---- model and optimizer
    torch.manual_seed(ta.seed)
    config = build_config(arch)
    model = DeepseekV2ForCausalLM(config).to(device)
    params = count_parameters(model, arch)
    log(f"parameters: {json.dumps(params)}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ta.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=ta.lr, betas=(ta.beta1, ta.beta2), eps=1e-8, fused=cuda,
    )
    batches = Batches(stream.to(device), ta.seq_len, ta.batch_size, ta.seed)
    total_steps = max(1, int(round(ta.epochs * batches.steps_per_epoch)))
    step = 0
    train_seconds = 0.0
    run_seconds_before = 0.0
    history: list[dict[str, Any]] = []
    monitor: list[dict[str, Any]] = []
    schedule_note = ""
    if meta:
        load_checkpoint(a.resume, model, opt)
        step = meta["step"]
        total_steps = meta["total_steps"]
        train_seconds = meta["train_seconds"]
        run_seconds_before = meta["run_seconds"]
        history = meta["history"]
        monitor = meta["monitor"]
        schedule_note = meta.get("schedule_note", "")
    log(f"schedule: {total_steps} steps ({batches.steps_per_epoch} per epoch, {ta.batch_size}x{ta.seq_len} tokens per step)")
    monitor_every = a.monitor_every if a.monitor_every > 0 else max(1, batches.steps_per_epoch // 2)
    schedule_fixed = bool(meta)
    probe_from = step + 20
    t_probe = 0.0

    def meta_now(done: bool) -> dict[str, Any]:
        return {
            "train_args": asdict(ta), "step": step, "total_steps": total_steps, "done": done,
            "train_seconds": train_seconds, "run_seconds": run_seconds_before + time.time() - t_start,
            "train_stream_tokens": stream.numel(), "history": history, "monitor": monitor,
            "schedule_note": schedule_note,
        }

    ckdir = out / "ckpt"
    router = RouterStats(model, arch.n_routed_experts)
    drop_hooks = add_dropout_hooks(model, ta.dropout)
    mon_tokens = make_windows(enc_held, ta.seq_len)[: a.monitor_windows]

    def run_monitor() -> None:
        nll, cnt = window_nll(model, mon_tokens, ta.seq_len, device, a.eval_batch, autocast=amp)
        monitor.append({"step": step, "heldout_subset_loss": nll / cnt, "tokens": cnt})
        log(f"step {step}: held-out monitor loss {nll / cnt:.4f} ({cnt} tokens)")
        model.train()

    # ---- training
    model.train()
    last_ckpt = time.time()
    t_log = time.time()
    loss_acc = torch.zeros((), device=device)
    aux_acc = torch.zeros((), device=device)
    n_acc = 0
    stopped_early = False
    if cuda:
        torch.cuda.synchronize()
    while step < total_steps:
        if time.time() > train_deadline:
            stopped_early = True
            break
        t_step = time.time()
        lr = lr_at(step, ta, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batches.get(step)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = router.pop_loss()
        total = loss + ta.aux_loss_coef * aux if aux is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ta.grad_clip)
        opt.step()
        loss_acc += loss.detach()
        if aux is not None:
            aux_acc += aux.detach()
        n_acc += 1
        step += 1
        if step % a.log_every == 0 or step == total_steps:
            lv = float((loss_acc / n_acc).item())
            av = float((aux_acc / n_acc).item())
            bal = router.pop_balance()
            dt = time.time() - t_log
            tps = n_acc * ta.batch_size * ta.seq_len / max(dt, 1e-9)
            history.append({"step": step, "loss": lv, "aux": av, "lr": lr, "tokens_per_s": tps, **bal})
            log(f"step {step}/{total_steps} loss {lv:.4f} aux {av:.3f} lr {lr:.2e} {tps:,.0f} tok/s "
                f"load max/mean {bal.get('max_over_mean_load_avg', 0):.2f}")
            loss_acc.zero_()
            aux_acc.zero_()
            n_acc = 0
            t_log = time.time()
        train_seconds += time.time() - t_step
        if not schedule_fixed and step == probe_from:
            if cuda:
                torch.cuda.synchronize()
            t_probe = time.time()
        if not schedule_fixed and step == probe_from + 40:
            if cuda:
                torch.cuda.synchronize()
            per_step = (time.time() - t_probe) / 40
            budget = a.train_minutes * 60 - train_seconds
            if (total_steps - step) * per_step > budget:
                new_total = max(step + 1, step + int(budget / per_step))
                schedule_note = (f"schedule shortened from {total_steps} to {new_total} steps to fit --train-minutes "
                                 f"{a.train_minutes} ({per_step * 1000:.0f} ms/step)")
                total_steps = new_total
            else:
                schedule_note = f"{total_steps} steps fit --train-minutes {a.train_minutes} ({per_step * 1000:.0f} ms/step)"
            log(schedule_note)
            schedule_fixed = True
        if step % monitor_every == 0 and step < total_steps:
            run_monitor()
        if time.time() - last_ckpt > a.ckpt_every_minutes * 60 and step < total_steps:
            save_checkpoint(ckdir, model, opt, tok, meta_now(False))
            last_ckpt = time.time()
            log(f"checkpoint at step {step}")
    if cuda:
        torch.cuda.synchronize()
    router.remove()
    for h in drop_hooks:
        h.remove()
    done = step >= total_steps
    if done and not (monitor and monitor[-1]["step"] == step):
        run_monitor()
    save_checkpoint(ckdir, model, opt, tok, meta_now(done))
    log(f"checkpoint at step {step} (done={done}); train time {train_seconds:.0f}s")
    if not done:
        log("stopped before the end of the schedule: resume with --resume pointing at a copy of OUT/ckpt")
        return 3 if stopped_early else 1

    # ---- export, reload, verify, evaluate (fp32, TF32 off)
    work = Path("/tmp") / f"train_tiny_export_{os.getpid()}"
    exp_dir = work / "export"
    cfg_dict = export_model(model, arch, tok, sample, exp_dir)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    ref = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    loaded = load_export_fp32(exp_dir, device)
    probe = batches.get(0)[:2, :128].to(device)
    with torch.no_grad():
        l_ref = ref(input_ids=probe).logits
        l_exp = loaded(input_ids=probe).logits
    max_diff = float((l_ref - l_exp).abs().max().item())
    log(f"export reload check: max |logit diff| {max_diff:.3e} (logit scale {float(l_ref.abs().max().item()):.2f})")
    if max_diff > 1e-3:
        raise RuntimeError(f"exported model disagrees with the trained one: max logit diff {max_diff}")
    del ref
    nll_h, cnt_h = window_nll(loaded, enc_held, ta.eval_window, device, a.eval_batch)
    nll_s, cnt_s = window_nll(loaded, sample_ids, ta.eval_window, device, a.eval_batch)
    ppl_h, ppl_s = math.exp(nll_h / cnt_h), math.exp(nll_s / cnt_s)
    log(f"held-out ppl (W={ta.eval_window}): full {ppl_h:.4f} over {cnt_h:,} tokens; sample {ppl_s:.4f} over {cnt_s:,} tokens")
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids, text = greedy(loaded, tok, prompt, 64, device)
        samples.append({"prompt": prompt, "ids": ids, "text": text})
        log(f"greedy {prompt!r} -> {text!r}")
    with torch.no_grad():
        fib = torch.tensor([tok.encode(SAMPLE_PROMPTS[0]).ids], device=device)
        last = loaded(input_ids=fib).logits[0, -1].float()
    top = torch.topk(last, 5)
    final_bal = next((h for h in reversed(history) if "max_over_mean_load_avg" in h), {})
    metrics = {
        "params": params,
        "corpus": {
            "python_version": platform.python_version(), "stdlib": str(root), "platform": platform.platform(),
            "train_files": len(train), "heldout_files": len(held), "sample_files": len(sample),
            "train_bytes": sum(len(f.text.encode()) for f in train), "heldout_bytes": sum(len(f.text.encode()) for f in held),
            "sample_bytes": sum(len(f.text.encode()) for f in sample),
            "train_tokens": stream.numel(), "heldout_tokens": sum(map(len, enc_held)), "sample_tokens": sum(map(len, sample_ids)),
            **skip,
        },
        "training": {
            **{k: v for k, v in asdict(ta).items() if k != "arch"},
            "steps": step, "tokens_trained": step * ta.batch_size * ta.seq_len,
            "precision": "bf16 autocast, fp32 master weights" if amp else "fp32",
            "schedule_note": schedule_note,
            "epochs": step * ta.batch_size * ta.seq_len / stream.numel(),
            "train_seconds": train_seconds, "run_seconds": run_seconds_before + time.time() - t_start,
            "final_train_loss": history[-1]["loss"] if history else float("nan"),
            "final_balance": {k: final_bal[k] for k in final_bal if k.startswith("max_over")},
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "history": history, "monitor": monitor,
        },
        "eval": {
            "window": ta.eval_window, "definition": "bos + tokens per file, non-overlapping windows of W, exp(mean next-token NLL)",
            "heldout": {"nll": nll_h, "tokens": cnt_h, "ppl": ppl_h},
            "sample": {"nll": nll_s, "tokens": cnt_s, "ppl": ppl_s},
            "export_reload_max_logit_diff": max_diff,
            "fibonacci_last_logits_top5": {"ids": top.indices.tolist(), "values": top.values.tolist()},
        },
        "samples": samples,
    }
    (exp_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
    write_model_card(exp_dir / "README.md", cfg_dict, metrics)
    if a.no_tar:
        dest = out / "export"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(exp_dir, dest)
    else:
        tmp_tar = work / "export.tar"
        with tarfile.open(tmp_tar, "w") as tf:
            for f in sorted(exp_dir.iterdir()):
                tf.add(f, arcname=f"export/{f.name}")
        shutil.rmtree(ckdir)  # the export replaces the checkpoint (64 MiB come back at most)
        shutil.move(str(tmp_tar), out / "export.tar")
    size = sum(f.stat().st_size for f in exp_dir.iterdir())
    shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.time() - t_start:.0f}s; export {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
