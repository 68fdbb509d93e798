"""The latent KV cache of MLA.

Per layer and token it holds the 576 numbers (for V2 dims) that MLA needs:
the normalized latent ``c_kv`` (kv_lora_rank) and the rotated ``k_pe``
(qk_rope_head_dim) - not the expanded per-head keys and values - in one of
three formats (``dtype``):

=========  ==========================================================  ===========================
dtype      a cached row                                                bytes per row (V2 dims)
=========  ==========================================================  ===========================
``f32``    576 fp32 numbers                                            2304
``bf16``   576 bfloat16 numbers (rounded to nearest even)              1152
``fp8``    512 e4m3 codes + 4 fp32 scales (one per 128 codes) +        656
           64 bfloat16 ``k_pe`` (FlashMLA's FP8 cache layout)
=========  ==========================================================  ===========================

The attention kernels read the rows in their own format (widened in registers).
"""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from .config import ModelConfig
from .dtypes import BF16
from .ops.mla import FP8Cache, fp8_cache_row_bytes

__all__ = ["LatentCache", "KV_DTYPES", "kv_row_bytes"]

#: the cache formats, by name
KV_DTYPES = ("f32", "bf16", "fp8")

#: rows allocated on the first growth of a growable cache
_FIRST_CAPACITY = 256


def kv_row_bytes(dtype: str, kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """Bytes of one cached row (one token, one layer) in the format ``dtype``."""
    W = kv_lora_rank + qk_rope_head_dim
    if dtype == "f32":
        return 4 * W
    if dtype == "bf16":
        return 2 * W
    if dtype == "fp8":
        return fp8_cache_row_bytes(kv_lora_rank, qk_rope_head_dim)
    raise ValueError(f"kv_dtype: expected one of {KV_DTYPES}, got {dtype!r}")


class LatentCache:
    """Latent rows of every layer for a batch of sequences.

    Parameters
    ----------
    config : ModelConfig
    batch_size : int
        Number of sequences.
    max_len : int, optional
        Tokens per sequence the cache can hold (prompt + generated).  None: the cache
        grows as needed (capacity doubling, layer by layer: every row is copied O(1) times
        on average) up to the model's ``max_position_embeddings``.
    dtype : {"f32", "bf16", "fp8"}
        Format of the cached rows (see the module docstring).

    Attributes
    ----------
    lengths : np.ndarray int64 [batch_size]
        Tokens cached so far per sequence.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: Optional[int] = None,
                 dtype: str = "f32") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len: expected >= 1 or None, got {max_len}")
        if dtype not in KV_DTYPES:
            raise ValueError(f"dtype: expected one of {KV_DTYPES}, got {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.growable = max_len is None
        self.limit = config.max_position_embeddings if self.growable else int(max_len)
        cap = min(_FIRST_CAPACITY, self.limit) if self.growable else int(max_len)
        self._batch = int(batch_size)
        self._arrays: List[np.ndarray] = [self._alloc(cap) for _ in range(config.num_hidden_layers)]
        self._views: Optional[List[Any]] = None  # layer(i)'s wrappers, made once per storage
        self.lengths = np.zeros(batch_size, np.int64)

    def _alloc(self, rows: int) -> np.ndarray:
        """Zeroed storage for ``rows`` rows per sequence (pages are backed once written)."""
        cfg = self.config
        if self.dtype == "fp8":
            return np.zeros((self._batch, rows, kv_row_bytes("fp8", cfg.kv_lora_rank, cfg.qk_rope_head_dim)),
                            np.uint8)
        return np.zeros((self._batch, rows, self.width), np.float32 if self.dtype == "f32" else np.uint16)

    def _wrap(self, a: np.ndarray) -> Any:
        if self.dtype == "bf16":
            return BF16(a)
        if self.dtype == "fp8":
            return FP8Cache(a, self.config.kv_lora_rank, self.config.qk_rope_head_dim)
        return a

    # ------------------------------------------------------------------ shape
    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def max_len(self) -> int:
        """Rows per sequence allocated now (the capacity)."""
        return self._arrays[0].shape[1]

    def layer(self, i: int) -> Any:
        """The cache of layer i as the kernels take it (a view, no copy): a float32 array
        [batch, capacity, width], a :class:`dsv2ext.BF16` of the bfloat16 bits, or a
        :class:`dsv2ext.ops.FP8Cache`."""
        views = self._views
        if views is None:
            views = self._views = [self._wrap(a) for a in self._arrays]
        return views[i]

    def arrays(self) -> List[np.ndarray]:
        """The storage of every layer (float32 / uint16 [batch, capacity, width], or uint8 FP8 rows)."""
        return list(self._arrays)

    def ensure(self, n: int) -> None:
        """Make room for ``n`` rows per sequence (growable caches double their capacity).

        Raises
        ------
        ValueError
            ``n`` exceeds ``max_len`` (fixed caches) or the model's context (growable ones).
        """
        n = int(n)
        if n <= self.max_len:
            return
        if not self.growable or n > self.limit:
            what = "the cache size" if not self.growable else "the model's context (max_position_embeddings)"
            raise ValueError(f"positions: expected values in [0, {self.limit if self.growable else self.max_len}) "
                             f"({what}); got a position {n - 1}")
        cap = self.max_len
        while cap < n:
            cap *= 2
        cap = min(cap, self.limit)
        keep = int(self.lengths.max()) if self.lengths.size else 0
        for i, old in enumerate(self._arrays):  # one layer at a time: the extra memory is one layer's
            new = self._alloc(cap)
            new[:, :keep] = old[:, :keep]
            self._arrays[i] = new
        self._views = None

    # ------------------------------------------------------------------ sizes
    @property
    def elements_per_token(self) -> int:
        """Numbers stored per token over all layers (576 x layers for V2 dims)."""
        return self.width * self.config.num_hidden_layers

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token over all layers in this cache's format."""
        cfg = self.config
        return kv_row_bytes(self.dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim) * cfg.num_hidden_layers

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not the cached tokens)."""
        return sum(a.nbytes for a in self._arrays)

    def reset(self, lengths: Optional[np.ndarray] = None) -> None:
        """Forget cached tokens (the rows are overwritten as new tokens arrive)."""
        self.lengths[:] = 0 if lengths is None else lengths

    def __repr__(self) -> str:
        return (f"LatentCache(layers={len(self._arrays)}, batch={self.batch_size}, dtype={self.dtype}, "
                f"capacity={self.max_len}{' (grows)' if self.growable else ''}, width={self.width}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
