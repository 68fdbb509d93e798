"""Next-token selection: repetition penalty, temperature, top-k, top-p.

The order and the rules follow transformers' logits processors
(repetition penalty, then temperature, then top-k, then top-p).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

__all__ = ["SamplingParams", "apply_repetition_penalty", "select_token"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings.

    temperature : float
        0 means greedy (argmax); > 0 divides the logits.
    top_k : int
        Keep the k largest logits (0 = off).
    top_p : float
        Keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    repetition_penalty : float
        > 1 discourages tokens already present (prompt and generated), as in
        transformers: positive logits are divided, negative multiplied.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"top_k: expected an int >= 0, got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {p!r}")
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not np.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty: expected a finite number > 0, got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """Penalise the logits of token ids in ``seen`` (in place on a float64 copy).

    Parameters
    ----------
    logits : np.ndarray [V]
    seen : iterable of int
    penalty : float

    Returns
    -------
    np.ndarray float64 [V]
    """
    out = np.array(logits, dtype=np.float64)
    if penalty == 1.0:
        return out
    ids = np.unique(np.fromiter(seen, dtype=np.int64))
    if ids.size:
        s = out[ids]
        out[ids] = np.where(s < 0, s * penalty, s / penalty)
    return out


def select_token(logits: np.ndarray, params: SamplingParams, rng: Optional[np.random.Generator],
                 seen: Iterable[int] = ()) -> int:
    """Choose the next token from one row of logits.

    Parameters
    ----------
    logits : np.ndarray float32 [V]
    params : SamplingParams
    rng : np.random.Generator or None (only used when sampling)
    seen : token ids already in the sequence (for the repetition penalty)

    Returns
    -------
    int

    Raises
    ------
    FloatingPointError
        If the logits contain NaN or +Inf (greedy decoding would silently pick an overflowed
        logit, sampling would turn it into NaN probabilities).
    """
    if params.greedy and params.repetition_penalty == 1.0:
        # one pass, no copy (a decode step's hot path): argmax returns the first NaN if there is
        # one, else the first maximum, which is +inf if any logit is; the float64 path below
        # picks the same index (widening keeps the order)
        x = np.asarray(logits)
        i = int(np.argmax(x))
        if np.isnan(x[i]) or np.isposinf(x[i]):
            raise FloatingPointError("the model produced NaN or +Inf logits")
        return i
    x = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if np.isnan(x).any() or np.isposinf(x).any():  # -inf is a masked token, NaN / +inf a numerical fault
        raise FloatingPointError("the model produced NaN or +Inf logits")
    if params.greedy:
        return int(np.argmax(x))
    x = x / params.temperature
    V = x.shape[0]
    if params.top_k and params.top_k < V:
        kth = np.partition(x, V - params.top_k)[V - params.top_k]
        x = np.where(x < kth, -np.inf, x)
    if params.top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        sx = x[order]
        p = np.exp(sx - sx[0])
        p /= p.sum()
        cum = np.cumsum(p)
        # keep tokens until the cumulative probability reaches top_p (at least one)
        keep = cum - p < params.top_p
        keep[0] = True
        drop = order[~keep]
        x[drop] = -np.inf
    m = np.max(x)
    p = np.exp(x - m)
    p /= p.sum()
    if rng is None:
        rng = np.random.default_rng()
    return int(rng.choice(V, p=p))
