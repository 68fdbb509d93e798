"""The latent KV cache of MLA.

Per layer and token it holds the 576 numbers (for V2 dims) that MLA needs:
the normalized latent ``c_kv`` (kv_lora_rank) and the rotated ``k_pe``
(qk_rope_head_dim) - not the expanded per-head keys and values.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .config import ModelConfig

__all__ = ["LatentCache"]


class LatentCache:
    """Latent rows of every layer for a batch of sequences.

    Parameters
    ----------
    config : ModelConfig
    batch_size : int
        Number of sequences.
    max_len : int
        Tokens per sequence the cache can hold (prompt + generated).

    Attributes
    ----------
    data : np.ndarray float32 [num_layers, batch_size, max_len, kv_lora_rank + qk_rope_head_dim]
        Allocated zero-filled (pages are only backed by memory once written).
    lengths : np.ndarray int64 [batch_size]
        Tokens cached so far per sequence.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if max_len < 1:
            raise ValueError(f"max_len: expected >= 1, got {max_len}")
        self.config = config
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.data = np.zeros((config.num_hidden_layers, batch_size, max_len, self.width), np.float32)
        self.lengths = np.zeros(batch_size, np.int64)

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    def layer(self, i: int) -> np.ndarray:
        """The cache of layer i: float32 [batch_size, max_len, width] (a view)."""
        return self.data[i]

    @property
    def elements_per_token(self) -> int:
        """Numbers stored per token over all layers (576 x layers for V2 dims)."""
        return self.width * self.config.num_hidden_layers

    @property
    def bytes_per_token(self) -> int:
        return self.elements_per_token * self.data.itemsize

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def reset(self, lengths: Optional[np.ndarray] = None) -> None:
        """Forget cached tokens (the rows are overwritten as new tokens arrive)."""
        self.lengths[:] = 0 if lengths is None else lengths

    def __repr__(self) -> str:
        return (f"LatentCache(layers={self.data.shape[0]}, batch={self.batch_size}, "
                f"max_len={self.max_len}, width={self.width}, {self.nbytes / 2**20:.1f} MiB)")
