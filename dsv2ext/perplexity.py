"""Perplexity of a model over texts.

Definition (the same as the bundled model's card): each text is encoded with
the tokenizer (bos prepended), its tokens are cut into consecutive
non-overlapping windows of ``window`` tokens, each window is run on its own
(a fresh context), and

    ppl = exp( sum of -log p(token | earlier tokens of its window)
               / number of predicted tokens )

over all windows of all texts (the first token of each window is not predicted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Sequence

import numpy as np

__all__ = ["PerplexityResult", "perplexity", "token_nll"]


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    predicted_tokens: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.predicted_tokens, 1)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, computed in float64.

    Parameters
    ----------
    logits : np.ndarray float32 [N, V]
    targets : np.ndarray int64 [N]
    """
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(model, texts: Iterable[str] = (), window: int = 512,
               token_ids: Sequence[Sequence[int]] = ()) -> PerplexityResult:
    """Perplexity of ``model`` over texts (or already-encoded token id lists).

    Parameters
    ----------
    model : dsv2ext.DeepseekV2
    texts : iterable of str
        Encoded with the model's tokenizer (bos prepended).
    window : int
        Tokens per window (<= max_position_embeddings).
    token_ids : sequence of token-id sequences, optional
        Used in addition to ``texts``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window: expected an int >= 2, got {window!r}")
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window: {window} exceeds the model's context "
                         f"({model.config.max_position_embeddings})")
    seqs: List[List[int]] = [model.encode(t) for t in texts] + [list(map(int, s)) for s in token_ids]
    total, count, nwin = 0.0, 0, 0
    for ids in seqs:
        for s in range(0, len(ids), window):
            chunk = ids[s:s + window]
            if len(chunk) < 2:
                continue
            logits = model.logits(chunk)
            nll = token_nll(logits[:-1], np.asarray(chunk[1:], dtype=np.int64))
            total += float(nll.sum())
            count += len(chunk) - 1
            nwin += 1
    if count == 0:
        raise ValueError("texts: nothing to score (every text is shorter than 2 tokens)")
    return PerplexityResult(math.exp(total / count), total, count, nwin)
