"""The DeepSeek-V2 family model assembled from the C kernels, and generation.

>>> import dsv2ext
>>> model = dsv2ext.load()                      # the bundled model
>>> out = model.generate("def fibonacci(n):", max_new_tokens=48)
>>> print(out.text)
"""
from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import ops
from .cache import KV_DTYPES, LatentCache, kv_row_bytes
from .config import ModelConfig
from .dtypes import BF16, bf16_to_float32
from .fp8 import Fp8Weight, read_fp8_block
from .generation import GenerationOutput, IncrementalDecoder, TextStream
from .safetensors import CheckpointReader
from .sampling import SamplingParams, select_token
from .tokenizer import Tokenizer, TokenizerError
from ._native import _C
from .ops._util import weight_shape
from .ops.mla import attention_block_args
from .ops.moe import moe_block_args, moe_expert_table
from .quant import QUANT_METHOD, RECIPES, quantize_model_weights, read_quantization_config
from .weights import ModelWeights, load_weights

__all__ = ["DeepseekV2", "load", "default_model_path"]

if TYPE_CHECKING:
    from .session import Session

Prompt = Union[str, Sequence[int]]


# Decode steps call forward() with one token per sequence, and the Python around the kernels
# runs on caches that the weight stream has just flushed: for a few values, plain Python on a
# list is several times cheaper there than numpy's reductions and ufunc.at.
_SMALL = 32


def _span(a: np.ndarray) -> "tuple[int, int]":
    """(min, max) of a non-empty int64 array as Python ints."""
    if a.size <= _SMALL:
        v = a.tolist()
        return min(v), max(v)
    return int(a.min()), int(a.max())


def _extend_lengths(lengths: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray) -> None:
    """lengths[s] = max(lengths[s], position + 1) for every (s, position) pair (np.maximum.at)."""
    if seq_ids.size > _SMALL:
        np.maximum.at(lengths, seq_ids, positions + 1)
        return
    for s, p in zip(seq_ids.tolist(), positions.tolist()):
        if p >= lengths[s]:
            lengths[s] = p + 1


def default_model_path() -> str:
    """Directory of the model shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "deepseek-v2-tiny-python")


def _dtype_of(w: Any) -> str:
    if isinstance(w, BF16):
        return "bf16"
    if isinstance(w, np.ndarray):
        return str(w.dtype).replace("float32", "f32")
    return getattr(w, "__dsv2_dtype__", type(w).__name__)


class DeepseekV2:
    """A DeepSeek-V2 / V2-Lite / V2.5 / V3 causal language model on the CPU.

    Build it with :meth:`from_pretrained` (or :func:`dsv2ext.load`).

    Attributes
    ----------
    config : ModelConfig
    weights : ModelWeights
        Memory-mapped views of the checkpoint in its own dtype.
    tokenizer : Tokenizer or None
    generation_config : dict
    """

    #: prompts longer than this are processed in chunks of this many tokens (bounded work space)
    prefill_chunk = 2048

    def __init__(self, config: ModelConfig, weights: ModelWeights, tokenizer: Optional[Tokenizer] = None,
                 generation_config: Optional[Dict[str, Any]] = None, path: Optional[str] = None,
                 reader: Optional[CheckpointReader] = None, kv_dtype: Optional[str] = None) -> None:
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.path = path
        self._reader = reader  # keeps the memory maps alive
        self._mla_cfg = ops.MLAConfig.from_model_config(config)
        self._moe_cfg = None
        if config.n_routed_experts:
            # transformers' DeepseekV2 (the reference) never renormalizes the top-k weights, whatever
            # norm_topk_prob says (every official V2 config has it false); V3 does when asked
            norm = config.norm_topk_prob and config.model_type != "deepseek_v2"
            self._moe_cfg = ops.MoEConfig(
                n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                n_group=config.n_group, topk_group=config.topk_group, topk_method=config.topk_method,
                scoring_func=config.scoring_func, norm_topk_prob=norm,
                routed_scaling_factor=config.routed_scaling_factor)
        # per-layer argument tuples for the MoE kernel (views, no copies); the routed
        # experts as a table parsed once (not E x 3 weights checked per call)
        self._moe_args = [None if l.moe is None else (
            l.moe.gate, moe_expert_table([(e.gate_proj, e.up_proj, e.down_proj) for e in l.moe.experts]),
            None if l.moe.shared is None else (l.moe.shared.gate_proj, l.moe.shared.up_proj,
                                               l.moe.shared.down_proj),
            l.moe.correction_bias) for l in weights.layers]
        self._mla_weights = [ops.MLAWeights(**vars(l.attn)) for l in weights.layers]
        # the fixed kernel arguments of every layer, checked once here: the decode loop calls the
        # kernels with them directly (their bindings still check each call's arguments), without
        # re-validating ~40 weights in Python per layer and token
        d = config.hidden_size
        self._attn_args = [attention_block_args(w, self._mla_cfg, d) for w in self._mla_weights]
        self._ffn_args = [("moe", moe_block_args(a[0], a[1], a[2], self._moe_cfg, a[3])) if a is not None else
                          ("mlp", (l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj))
                          for a, l in zip(self._moe_args, weights.layers)]
        if kv_dtype is None:  # fp32 checkpoints keep an exact fp32 cache; others store bf16 rows
            kv_dtype = "f32" if _dtype_of(weights.embed_tokens) == "f32" else "bf16"
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: expected None or one of {KV_DTYPES}, got {kv_dtype!r}")
        self.kv_dtype = kv_dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, *, dtype: Optional[str] = None,
                        kv_dtype: Optional[str] = None, progress: Optional[bool] = None,
                        load_tokenizer: bool = True) -> "DeepseekV2":
        """Load a Hugging Face checkpoint directory.

        Parameters
        ----------
        path : str, optional
            Directory with config.json and safetensors (single file or sharded
            with model.safetensors.index.json).  Default: the bundled model.
        dtype : {None, "bf16", "f32", "int8", "int4", "int4-mixed", "fp8"}
            None keeps the checkpoint's dtype (weights stay memory-mapped; FP8
            checkpoints in the DeepSeek-V3 format stay FP8, dsv2ext.fp8);
            "f32"/"bf16" convert (a copy); "int8" quantizes every Linear
            weight (dsv2ext.quant: per-32-column absmax scales); "int4" the
            Linear weights to the 4-bit format of dsv2ext.int4, but kv_b_proj
            and the down_proj of dense MLPs and shared experts (int8);
            "int4-mixed" the routed experts to int4 and the other Linear
            weights to int8; "fp8" every Linear weight but lm_head to the
            DeepSeek-V3 FP8 format (e4m3 with 128x128 block scales; FP8
            weights of the checkpoint are kept) (see dsv2ext.quant).  Quantizing streams tensor by tensor
            (threaded C) and releases the source pages.  A checkpoint saved by
            dsv2ext.quant.save_quantized loads as it is stored (memory-mapped)
            with dtype None or its own recipe.
        kv_dtype : {None, "f32", "bf16", "fp8"}
            Format of the latent KV cache rows (see :mod:`dsv2ext.cache`).  None: "f32"
            for fp32 weights (exact, parity with fp32 references), "bf16" otherwise.
        progress : bool, optional
            tqdm progress bar; default when stderr is a terminal.
        load_tokenizer : bool
            Load tokenizer.json when present.
        """
        if path is None:
            path = default_model_path()
        path = os.fspath(path)
        if dtype not in (None, "bf16", "f32") + RECIPES:
            raise ValueError(f"dtype: expected None, 'bf16', 'f32', 'int8', 'int4', 'int4-mixed' or 'fp8', "
                             f"got {dtype!r}")
        if kv_dtype not in (None,) + KV_DTYPES:
            raise ValueError(f"kv_dtype: expected None or one of {KV_DTYPES}, got {kv_dtype!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: {path!r} is not a checkpoint directory")
        config = ModelConfig.from_pretrained(path)
        quant = read_quantization_config(path)
        if dtype in RECIPES and quant is not None:
            stored = "int8" if quant["quant_method"] == QUANT_METHOD else quant.get("recipe", "int4")
            if stored != dtype:
                raise ValueError(f"dtype: {dtype!r} asked for, but {path!r} holds weights already quantized as "
                                 f"{stored!r} ({quant['quant_method']}); load it with dtype=None (as stored) or "
                                 "quantize the original checkpoint")
        reader = CheckpointReader(path)
        try:
            weights = load_weights(reader, config, dtype=None if dtype in RECIPES else dtype, progress=progress,
                                   quant=quant, fp8_block=read_fp8_block(path))
            if dtype in RECIPES and quant is None:
                weights = quantize_model_weights(weights, release_source=True, recipe=dtype)
        except BaseException:
            reader.close()
            raise
        tok = None
        if load_tokenizer and os.path.isfile(os.path.join(path, "tokenizer.json")):
            tok = Tokenizer(path)
        gen: Dict[str, Any] = {}
        gpath = os.path.join(path, "generation_config.json")
        if os.path.isfile(gpath):
            try:
                with open(gpath, "r", encoding="utf-8") as f:
                    gen = json.load(f)
            except ValueError as e:
                raise ValueError(f"{gpath}: invalid JSON: {e}") from e
            if not isinstance(gen, dict):
                raise ValueError(f"{gpath}: expected a JSON object")
        return cls(config, weights, tok, gen, path, reader, kv_dtype=kv_dtype)

    def close(self) -> None:
        """Release the memory maps (the model is unusable afterwards)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype: Optional[str] = None) -> LatentCache:
        """An empty latent cache for ``batch_size`` sequences.

        Parameters
        ----------
        batch_size : int
        max_len : int, optional
            Tokens per sequence it holds; None: it grows as needed (up to the model's context).
        dtype : {None, "f32", "bf16", "fp8"}
            Row format; default the model's ``kv_dtype``.
        """
        return LatentCache(self.config, batch_size, max_len, dtype or self.kv_dtype)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        emb = self.weights.embed_tokens
        if isinstance(emb, BF16):
            return bf16_to_float32(emb.data[ids])
        if isinstance(emb, Fp8Weight):
            return emb.take_rows(ids)
        return np.array(emb[ids], dtype=np.float32)

    def _check_ids(self, ids: np.ndarray, name: str) -> None:
        if ids.size:
            lo, hi = _span(ids)
            if lo < 0 or hi >= self.config.vocab_size:
                bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
                raise ValueError(f"{name}: token id {bad} is out of range [0, {self.config.vocab_size})")

    def forward(self, token_ids: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray,
                cache: LatentCache, logit_rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Run new tokens of one or more sequences through the model.

        Parameters
        ----------
        token_ids : np.ndarray int64 [T]
            New tokens of all sequences, ragged (any order).
        seq_ids : np.ndarray int64 [T]
            Sequence (cache row) of each token.
        positions : np.ndarray int64 [T]
            Position of each token in its sequence; rows < position of the
            same sequence must already be in the cache.
        cache : LatentCache
            Updated in place: the latent row of each token is written.
        logit_rows : np.ndarray int64 [R], optional
            Tokens whose logits are wanted (default: all).

        Returns
        -------
        np.ndarray float32 [R, vocab_size]
        """
        cfg = self.config
        token_ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        seq_ids = np.ascontiguousarray(seq_ids, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if token_ids.ndim != 1 or token_ids.size == 0:
            raise ValueError(f"token_ids: expected a non-empty 1-D array, got shape {token_ids.shape}")
        if seq_ids.shape != token_ids.shape or positions.shape != token_ids.shape:
            raise ValueError("seq_ids and positions: expected the same shape as token_ids "
                             f"{token_ids.shape}, got {seq_ids.shape} and {positions.shape}")
        self._check_ids(token_ids, "token_ids")
        p_lo, p_hi = _span(positions)
        if p_lo < 0:
            raise ValueError(f"positions: expected values >= 0, got {p_lo}")
        s_lo, s_hi = _span(seq_ids)
        if s_lo < 0 or s_hi >= cache.batch_size:
            raise ValueError(f"seq_ids: expected values in [0, {cache.batch_size}) (the cache batch size)")
        cache.ensure(p_hi + 1)  # grows a growable cache; ValueError past its limit
        T, C = token_ids.size, int(self.prefill_chunk)
        if T <= C:
            h = self._layers(token_ids, seq_ids, positions, cache)
            if logit_rows is not None:
                h = np.ascontiguousarray(h[np.asarray(logit_rows, dtype=np.int64)])
        else:
            h = self._chunked(token_ids, seq_ids, positions, cache, logit_rows, C)
        _extend_lengths(cache.lengths, seq_ids, positions)
        hn = np.empty_like(h)  # ops.rms_norm / ops.linear, minus their checks (done at load)
        _C.rmsnorm(hn, h, self.weights.norm, float(cfg.rms_norm_eps))
        logits = np.empty((h.shape[0], weight_shape(self.weights.lm_head, "lm_head")[0]), np.float32)
        _C.linear(logits, hn, self.weights.lm_head)
        return logits

    def _layers(self, token_ids: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray,
                cache: LatentCache) -> np.ndarray:
        """Hidden states [T, d] after the last decoder layer (before the final norm)."""
        eps = float(self.config.rms_norm_eps)
        h = self._embed(token_ids)
        x = np.empty_like(h)
        y = np.empty_like(h)
        layers = self.weights.layers
        # the kernels straight from dsv2ext._C with the arguments checked in __init__
        # (the same calls as ops.rms_norm / mla_attention_block / moe_block / swiglu_mlp);
        # each residual add h += y is fused with the norm that follows it (rmsnorm's residual):
        # a decode step's Python between kernels runs on caches that the weights just flushed,
        # so every extra numpy call costs tens of microseconds there
        _C.rmsnorm(x, h, layers[0].input_layernorm, eps)
        for i, lw in enumerate(layers):
            _C.mla_attention_block(y, x, cache.layer(i), seq_ids, positions, *self._attn_args[i])
            _C.rmsnorm(x, h, lw.post_attention_layernorm, eps, y)
            kind, args = self._ffn_args[i]
            if kind == "moe":
                _C.moe_block(y, x, *args, None, None)
            else:
                _C.swiglu_mlp(y, x, *args)
            if i + 1 < len(layers):
                _C.rmsnorm(x, h, layers[i + 1].input_layernorm, eps, y)
        h += y
        return h

    def _chunked(self, token_ids: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray, cache: LatentCache,
                 logit_rows: Optional[np.ndarray], C: int) -> np.ndarray:
        """:meth:`_layers` over chunks of C tokens in position order (every row a token attends to is
        cached by an earlier chunk or its own), keeping the hidden states of the wanted rows only:
        the work space is that of C tokens, whatever the prompt length."""
        T = token_ids.size
        key = seq_ids * (int(positions.max()) + 1) + positions
        if np.unique(key).size != T:
            raise ValueError("positions: two tokens write the same cache row (seq_id, position)")
        rows = np.arange(T) if logit_rows is None else np.asarray(logit_rows, dtype=np.int64)
        if rows.size and (rows.min() < -T or rows.max() >= T):
            raise IndexError(f"logit_rows: expected indices in [0, {T})")
        uniq, inv = np.unique(rows % T, return_inverse=True)
        slot = np.full(T, -1, np.int64)
        slot[uniq] = np.arange(uniq.size)
        out = np.empty((uniq.size, self.config.hidden_size), np.float32)
        order = np.argsort(positions, kind="stable")
        for c0 in range(0, T, C):
            idx = order[c0:c0 + C]
            h = self._layers(token_ids[idx], seq_ids[idx], positions[idx], cache)
            s = slot[idx]
            keep = s >= 0
            out[s[keep]] = h[keep]
        return out[inv]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """fp32 logits [T, vocab_size] of a whole sequence (a fresh cache, discarded).

        Parameters
        ----------
        token_ids : sequence of int, length T <= max_position_embeddings
        """
        ids = self._as_ids(token_ids, "token_ids")
        T = len(ids)
        if T > self.config.max_position_embeddings:
            raise ValueError(f"token_ids: {T} tokens exceed the model's context "
                             f"(max_position_embeddings={self.config.max_position_embeddings})")
        cache = self.new_cache(1, T)
        return self.forward(ids, np.zeros(T, np.int64), np.arange(T, dtype=np.int64), cache)

    # ------------------------------------------------------------------ helpers
    def _as_ids(self, p: Any, name: str) -> np.ndarray:
        if isinstance(p, np.ndarray):
            if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
                raise TypeError(f"{name}: expected a 1-D integer array of token ids, got {p.dtype} {p.shape}")
            ids = p.astype(np.int64)
        else:
            try:
                ids = np.array([int(i) for i in p], dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise TypeError(f"{name}: expected token ids (a sequence of ints)") from None
            if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in p):
                raise TypeError(f"{name}: expected token ids (a sequence of ints)")
        if ids.size == 0:
            raise ValueError(f"{name}: empty prompt")
        self._check_ids(ids, name)
        return ids

    def encode(self, text: str) -> List[int]:
        """Text -> token ids with the checkpoint's tokenizer."""
        if self.tokenizer is None:
            raise TokenizerError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise TokenizerError("this checkpoint has no tokenizer.json: cannot decode to text")
        return self.tokenizer.decode(ids)

    def _prompt_ids(self, p: Prompt, name: str) -> np.ndarray:
        if isinstance(p, str):
            return self._as_ids(self.encode(p), name)
        return self._as_ids(p, name)

    def _eos_ids(self) -> set:
        ids = set(self.config.eos_token_id or ())
        g = self.generation_config.get("eos_token_id")
        if isinstance(g, int):
            ids.add(g)
        elif isinstance(g, list):
            ids.update(int(i) for i in g if isinstance(i, int))
        return ids

    def _sampling(self, temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
                  repetition_penalty: Optional[float]) -> SamplingParams:
        g = self.generation_config
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if g.get("do_sample") else 0.0
        if top_k is None:
            top_k = int(g.get("top_k") or 0) if g.get("do_sample") else 0
        if top_p is None:
            top_p = float(g.get("top_p") or 1.0) if g.get("do_sample") else 1.0
        if repetition_penalty is None:
            repetition_penalty = float(g.get("repetition_penalty") or 1.0)
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: Union[Prompt, List[Prompt]], max_new_tokens: int = 64, *,
                 temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                 stream: bool = False) -> Union[GenerationOutput, List[GenerationOutput], TextStream]:
        """Generate a continuation.

        Parameters
        ----------
        prompt : str, sequence of int, or a list of either (a batch)
            Text needs the checkpoint's tokenizer (bos is prepended as the
            tokenizer config says); token ids are used as given.
        max_new_tokens : int
            Upper bound on new tokens; prompt + max_new_tokens must fit the
            context (max_position_embeddings).
        temperature : float, optional
            0 = greedy.  Default: generation_config.json (greedy unless do_sample).
        top_k, top_p, repetition_penalty : optional
            As in transformers.
        seed : int, optional
            Seeds the sampler (reproducible output).
        stop : str or list of str, optional
            Stop when the generated text contains one of them (text is cut before it).
        stream : bool
            Return an iterator of text pieces instead (single prompt; needs a
            tokenizer).  The pieces join to the final text; multi-byte UTF-8
            characters are never split.

        Returns
        -------
        GenerationOutput (a list of them for a batch), or a TextStream (an iterator of str
        with ``.result`` once exhausted) when stream=True.
        """
        return self._generate(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
                              stream)

    def _generate(self, prompt: Any, max_new_tokens: Any, temperature: Optional[float], top_k: Optional[int],
                  top_p: Optional[float], repetition_penalty: Optional[float], seed: Any, stop: Any, stream: bool,
                  session: Optional["Session"] = None) -> Any:
        """:meth:`generate`, in a session's cache when ``session`` is given (a single prompt then)."""
        batch = isinstance(prompt, list) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer))
        prompts = list(prompt) if batch else [prompt]
        if isinstance(prompt, list) and len(prompt) == 0:
            raise ValueError("prompt: empty list")
        if batch and session is not None:
            raise ValueError("prompt: a session holds one conversation; pass a single prompt, not a batch")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise TypeError("stop: expected a string or a list of non-empty strings")
        if stop and self.tokenizer is None:
            raise TokenizerError("stop strings need a tokenizer (this checkpoint has no tokenizer.json)")
        params = self._sampling(temperature, top_k, top_p, repetition_penalty)
        ids = [self._prompt_ids(p, f"prompt[{i}]" if batch else "prompt") for i, p in enumerate(prompts)]
        ctx = self.config.max_position_embeddings
        for i, p in enumerate(ids):
            if len(p) + int(max_new_tokens) > ctx:
                what = "tokens of conversation" if session is not None else "prompt tokens"
                raise ValueError(f"prompt{'[%d]' % i if batch else ''}: {len(p)} {what} + "
                                 f"max_new_tokens={max_new_tokens} exceed the model's context of {ctx} tokens"
                                 + (" (session.reset() starts a new conversation)" if session is not None else ""))
        if stream:
            if batch:
                raise ValueError("stream=True takes a single prompt, not a batch")
            if self.tokenizer is None:
                raise TokenizerError("stream=True needs a tokenizer (this checkpoint has no tokenizer.json)")
        gen = self._generate_iter(ids, int(max_new_tokens), params, seed, stop, session)
        if stream:
            return TextStream(gen)
        results = None
        for item in gen:
            if isinstance(item, list):
                results = item
        assert results is not None
        return results if batch else results[0]

    def _generate_iter(self, prompts: List[np.ndarray], max_new: int, params: SamplingParams,
                       seed: Optional[int], stop: List[str], session: Optional["Session"] = None) -> Iterator[Any]:
        """Yields text pieces of sequence 0 as they become final, then the list of outputs.

        With a session (one prompt): the longest prefix of the prompt already in the session's
        cache is reused, only the rest is prefilled, and the session records every token fed.
        """
        B = len(prompts)
        rng = np.random.default_rng(seed)
        eos = self._eos_ids()
        if session is None:
            cache = self.new_cache(B, max(len(p) for p in prompts) + max_new)
            start = 0
        else:
            cache = session.cache
            start = session._reuse(prompts[0])
        decoders = [IncrementalDecoder(self.decode, stop) if self.tokenizer is not None else None
                    for _ in range(B)]
        new: List[List[int]] = [[] for _ in range(B)]
        finish: List[Optional[str]] = [None] * B
        seen = [list(map(int, p)) for p in prompts]

        t0 = time.perf_counter()
        tok = np.concatenate([p[start:] for p in prompts])
        sid = np.concatenate([np.full(len(p) - start, b, np.int64) for b, p in enumerate(prompts)])
        pos = np.concatenate([np.arange(start, len(p), dtype=np.int64) for p in prompts])
        last = np.cumsum([len(p) - start for p in prompts]) - 1
        logits = self.forward(tok, sid, pos, cache, logit_rows=last)
        if session is not None:
            session._fed(tok)
        t1 = time.perf_counter()
        active = list(range(B))
        lengths = [len(p) for p in prompts]
        decode_tokens = 0
        while True:
            next_tokens = []
            for row, b in enumerate(active):
                t = select_token(logits[row], params, rng, seen[b] if params.repetition_penalty != 1.0 else ())
                new[b].append(t)
                seen[b].append(t)
                next_tokens.append(t)
                piece = ""
                if decoders[b] is not None and t not in eos:
                    piece = decoders[b].add(t)
                if t in eos:
                    finish[b] = "eos"
                elif decoders[b] is not None and decoders[b].stopped:
                    finish[b] = "stop"
                elif len(new[b]) >= max_new:
                    finish[b] = "length"
                if b == 0:
                    if finish[0] is not None and decoders[0] is not None:
                        piece += decoders[0].flush()
                    yield piece
            still = [(b, t) for b, t in zip(active, next_tokens) if finish[b] is None]
            if not still:
                break
            active = [b for b, _ in still]
            tok = np.array([t for _, t in still], np.int64)
            sid = np.array(active, np.int64)
            pos = np.array([lengths[b] for b in active], np.int64)
            for b in active:
                lengths[b] += 1
            logits = self.forward(tok, sid, pos, cache)
            if session is not None:
                session._fed(tok)
            decode_tokens += len(active)
        t2 = time.perf_counter()
        n_prompt = sum(len(p) - start for p in prompts)
        outs = []
        for b in range(B):
            text = decoders[b].text if decoders[b] is not None else None
            outs.append(GenerationOutput(
                token_ids=new[b], text=text, finish_reason=finish[b] or "length",
                prompt_tokens=len(prompts[b]), prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                prefill_tokens_per_s=n_prompt / max(t1 - t0, 1e-9),
                decode_tokens_per_s=decode_tokens / max(t2 - t1, 1e-9) if decode_tokens else 0.0,
                prefill_tokens=len(prompts[b]) - start))
        yield outs

    def chat(self, messages: List[Dict[str, Any]], max_new_tokens: int = 128, **kwargs: Any
             ) -> Union[GenerationOutput, Iterator[str]]:
        """Answer a conversation using the checkpoint's chat template.

        Parameters
        ----------
        messages : list of {"role": "system" | "user" | "assistant", "content": str}
            An assistant message may also carry ``"token_ids"``, the tokens the model generated
            for it (a :class:`~dsv2ext.session.Session` records them in ``session.messages``):
            they stand in the prompt for the content instead of the content's own encoding,
            which can differ (see :meth:`Tokenizer.encode_chat`).
        max_new_tokens : int
        **kwargs : passed to :meth:`generate` (temperature, top_p, seed, stop, stream, ...)
        """
        return self.generate(self._chat_ids(messages), max_new_tokens, **kwargs)

    def _chat_ids(self, messages: List[Dict[str, Any]]) -> List[int]:
        """Token ids of a conversation rendered with the chat template (generation prompt added)."""
        if self.tokenizer is None:
            raise TokenizerError("chat() needs a tokenizer (this checkpoint has no tokenizer.json)")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def session(self) -> "Session":
        """A conversation that keeps its latent cache between calls (see :class:`dsv2ext.session.Session`).

        >>> s = model.session()
        >>> s.chat("Write a function that adds two numbers.").text
        >>> s.chat("Now with type hints.").prefill_tokens      # only the new turn is computed
        """
        from .session import Session

        return Session(self)

    # ------------------------------------------------------------------ description
    def info(self) -> Dict[str, Any]:
        """Architecture, parameter counts, dtypes, weight bytes, KV cache format and bytes per token."""
        from .stats import stats

        cfg = self.config
        s = stats(cfg)
        dtypes: Dict[str, int] = {}
        nbytes = 0
        for w in _iter_weights(self.weights):
            dt = _dtype_of(w)
            dtypes[dt] = dtypes.get(dt, 0) + int(np.prod(w.shape))
            nbytes += int(getattr(w, "total_nbytes", w.nbytes))  # int8 / int4: codes + scales
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        L = cfg.num_hidden_layers
        mha = 2 * cfg.num_attention_heads * cfg.v_head_dim * L
        return {
            "architecture": cfg.model_type,
            "path": self.path,
            "layers": L,
            "dense_layers": sum(1 for i in range(L) if not cfg.is_moe_layer(i)),
            "moe_layers": sum(1 for i in range(L) if cfg.is_moe_layer(i)),
            "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "routed_experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "vocab_size": cfg.vocab_size,
            "total_params": s["total_params"],
            "active_params": s["active_params"],
            "dtype": max(dtypes, key=dtypes.get) if dtypes else None,
            "params_by_dtype": dtypes,
            "weight_bytes": nbytes,
            "kv_dtype": self.kv_dtype,
            "kv_cache_elements_per_token": width * L,
            "kv_cache_bytes_per_token": kv_row_bytes(self.kv_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim) * L,
            "mha_kv_cache_bytes_per_token": mha * 4,
            "tokenizer": self.tokenizer is not None,
        }

    def __repr__(self) -> str:
        i = self.info()
        return (f"DeepseekV2({i['architecture']}, layers={i['layers']} ({i['dense_layers']} dense + "
                f"{i['moe_layers']} MoE), hidden={i['hidden_size']}, heads={i['heads']}, "
                f"experts={i['routed_experts']} top-{i['experts_per_token']}, "
                f"params={i['total_params'] / 1e6:.1f}M total / {i['active_params'] / 1e6:.1f}M active, "
                f"dtype={i['dtype']}, weights={i['weight_bytes'] / 2**20:.1f} MiB, "
                f"kv_cache={i['kv_dtype']} {i['kv_cache_bytes_per_token']} B/token (fp32 MHA would take "
                f"{i['mha_kv_cache_bytes_per_token']} B/token))")


def _iter_weights(w: ModelWeights) -> Iterator[Any]:
    seen = set()
    def walk(obj: Any) -> Iterator[Any]:
        if obj is None:
            return
        if isinstance(obj, (np.ndarray, BF16)) or getattr(obj, "__dsv2_dtype__", None):
            if id(obj) not in seen:
                seen.add(id(obj))
                yield obj
            return
        if isinstance(obj, list):
            for o in obj:
                yield from walk(o)
            return
        if hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                yield from walk(v)
    yield from walk(w)


def load(path: Optional[str] = None, **kwargs: Any) -> DeepseekV2:
    """Load a checkpoint directory (default: the bundled model). See :meth:`DeepseekV2.from_pretrained`."""
    return DeepseekV2.from_pretrained(path, **kwargs)
