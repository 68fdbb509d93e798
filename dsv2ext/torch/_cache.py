"""The latent KV cache of the patched attention, kept inside transformers' own cache object.

transformers' ``DynamicCache`` holds one *layer object* per decoder layer.  A patched
:class:`~dsv2ext.torch.MLAAttention` replaces its (still empty) ``DynamicLayer`` by a
:class:`LatentCacheLayer` holding the kernel's latent rows ``[B, capacity, kv_lora + rope]``
(float32, or bfloat16 with ``patch(model, kv_dtype="bf16")``; 576 numbers per token for the
official configs, not the expanded per-head K/V).
Because the rows live in the cache object, they follow it through ``generate()`` (one
``DynamicCache`` per call), beam-search reordering, cropping and batch selection, and two
caches (or two models) never share state.  ``get_seq_length()`` / ``get_mask_sizes()`` report
the number of token slots seen (padding included), exactly as a ``DynamicLayer`` would.

Rows are stored per sequence at their *position* (padding tokens take no row), so that left
padding works: token ``t`` of sequence ``b`` attends to rows ``0 .. position`` of ``b``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

try:  # imported only when a patched attention meets a cache (transformers is optional for the ops)
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("dsv2ext.torch: the latent cache layer needs transformers >= 5.17") from _e

__all__ = ["LatentCacheLayer", "latent_layer"]

_ROW_ALIGN = 64


class LatentCacheLayer(DynamicLayer):
    """One decoder layer's latent rows inside a transformers ``Cache``.

    Attributes
    ----------
    latent : Tensor float32 or bfloat16 [B, capacity, latent_dim] or None
        Row ``p`` of sequence ``b`` is the latent row of its token at position ``p``.
    n_rows : Tensor int64 [B] or None
        Rows (non-padding tokens) stored per sequence.
    real : Tensor bool [B, slot_capacity] or None
        Which of the ``length`` token slots held a real (non-padding) token.
    length : int
        Token slots seen (what transformers calls the sequence length of the cache).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, latent_dim: int, layer_idx: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16 latent rows, got {dtype}")
        self.dtype = dtype
        self.latent_dim = int(latent_dim)
        self.layer_idx = int(layer_idx)
        self.latent: Optional[torch.Tensor] = None
        self.n_rows: Optional[torch.Tensor] = None
        self.real: Optional[torch.Tensor] = None
        self.length = 0
        self.has_padding = False
        self.device = torch.device("cpu")
        self.is_initialized = True

    def __repr__(self) -> str:
        cap = 0 if self.latent is None else self.latent.shape[1]
        return (f"LatentCacheLayer(layer={self.layer_idx}, length={self.length}, width={self.latent_dim}, "
                f"dtype={self.dtype}, capacity={cap})")

    # ---------------------------------------------------------------- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            f"cache layer {self.layer_idx} holds dsv2ext latent rows written by a patched MLAAttention; it cannot "
            "take transformers key/value states. Continue with the patched model, or start a new cache after "
            "dsv2ext.torch.unpatch(model).")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        if self.n_rows is not None:
            self.n_rows.zero_()
            self.real.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop: expected a negative number of tokens to remove, got {tokens_to_remove}")
        n = min(-int(tokens_to_remove), self.length)
        if n == 0 or self.real is None:
            return
        new_len = self.length - n
        self.n_rows -= self.real[:, new_len:self.length].sum(1)
        self.real[:, new_len:self.length] = False
        self.length = new_len
        self.has_padding = bool((~self.real[:, :new_len]).any())

    def _select(self, fn: Any) -> None:
        if self.latent is not None:
            self.latent = fn(self.latent).contiguous()
            self.n_rows = fn(self.n_rows).contiguous()
            self.real = fn(self.real).contiguous()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def offload(self) -> None:  # CPU only: nothing to move
        return None

    def prefetch(self) -> None:
        return None

    # ---------------------------------------------------------------- dsv2ext side
    def prepare(self, batch: int, rows: int, slots: int) -> torch.Tensor:
        """Make room for ``rows`` rows and ``slots`` token slots per sequence; returns ``latent``."""
        if self.latent is None:
            self.latent = torch.zeros((batch, _round(rows), self.latent_dim), dtype=self.dtype)
            self.n_rows = torch.zeros(batch, dtype=torch.int64)
            self.real = torch.zeros((batch, _round(slots)), dtype=torch.bool)
        elif self.latent.shape[0] != batch:
            raise ValueError(f"hidden_states: batch size {batch} differs from the {self.latent.shape[0]} sequences "
                             f"already in cache layer {self.layer_idx}")
        if rows > self.latent.shape[1]:
            grown = torch.zeros((batch, _round(max(rows, 2 * self.latent.shape[1])), self.latent_dim),
                                dtype=self.dtype)
            grown[:, :self.latent.shape[1]] = self.latent
            self.latent = grown
        if slots > self.real.shape[1]:
            grown_r = torch.zeros((batch, _round(max(slots, 2 * self.real.shape[1]))), dtype=torch.bool)
            grown_r[:, :self.real.shape[1]] = self.real
            self.real = grown_r
        return self.latent

    def commit(self, real_q: Optional[torch.Tensor], T: int) -> None:
        """Record ``T`` new token slots (``real_q`` [B, T] bool, None = all real)."""
        a, b = self.length, self.length + T
        if real_q is None:
            self.real[:, a:b] = True
            self.n_rows += T
        else:
            self.real[:, a:b] = real_q
            self.n_rows += real_q.sum(1)
            self.has_padding = self.has_padding or bool((~real_q).any())
        self.length = b


def _round(n: int) -> int:
    return max(_ROW_ALIGN, -(-int(n) // _ROW_ALIGN) * _ROW_ALIGN)


def latent_layer(cache: Any, layer_idx: int, latent_dim: int, dtype: torch.dtype = torch.float32) -> LatentCacheLayer:
    """The :class:`LatentCacheLayer` of ``layer_idx`` in ``cache``, installed on first use.

    Raises
    ------
    TypeError
        ``cache`` is not a transformers ``Cache``, or its layer is not a plain ``DynamicLayer``
        (static / quantized caches are not supported).
    ValueError
        The layer already holds key/value states written by transformers' own attention.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"cache: expected a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
    layers = cache.layers
    if layer_idx < len(layers) and isinstance(layers[layer_idx], LatentCacheLayer):
        layer = layers[layer_idx]
        if layer.latent_dim != latent_dim or layer.dtype != dtype:
            raise ValueError(f"cache layer {layer_idx}: holds latent rows of width {layer.latent_dim} in "
                             f"{layer.dtype}, this attention writes {latent_dim} in {dtype}")
        return layer
    if cache.layer_class_to_replicate is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(layers):
        raise ValueError(f"cache: has {len(layers)} layers, no layer {layer_idx}")
    old = layers[layer_idx]
    if type(old) is not DynamicLayer:
        raise TypeError(f"cache layer {layer_idx} is a {type(old).__name__}: dsv2ext's MLAAttention keeps its latent "
                        "rows in a DynamicCache (the default of generate()); static, sliding, offloaded-static and "
                        "quantized caches are not supported")
    if old.get_seq_length() > 0:
        raise ValueError(f"cache layer {layer_idx} already holds {old.get_seq_length()} tokens written by "
                         "transformers' attention; dsv2ext's MLAAttention cannot continue it: start a new cache")
    layer = LatentCacheLayer(latent_dim, layer_idx, dtype)
    layers[layer_idx] = layer
    return layer
