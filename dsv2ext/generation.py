"""Generation results and incremental (UTF-8 safe) text streaming."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

__all__ = ["GenerationOutput", "IncrementalDecoder", "TextStream"]


@dataclass
class GenerationOutput:
    """The result of :meth:`DeepseekV2.generate` for one prompt.

    Attributes
    ----------
    token_ids : list of int
        New tokens only (an eos that ended generation is included).
    text : str or None
        The new tokens decoded (special tokens skipped, cut before a stop
        string); None when the model has no tokenizer.
    finish_reason : str
        "eos", "stop" (a stop string), or "length" (max_new_tokens).
    prompt_tokens : int
    prefill_seconds, decode_seconds : float
    prefill_tokens : int
        Prompt tokens computed by this call: all of them for a fresh run; in a session,
        only those after the prefix already in the cache.
    prefill_tokens_per_s, decode_tokens_per_s : float
        Prompt tokens processed per second; new tokens after the first per
        second of decoding (for a batch, summed over the batch).
    """

    token_ids: List[int]
    text: Optional[str]
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_tokens: int = 0

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.token_ids)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces.

    A piece is released only when it is final: it never ends inside a
    multi-byte UTF-8 character (the decoder would show U+FFFD there) and never
    inside a possible start of a stop string.  The pieces join exactly to the
    final text.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return the new final text (may be empty)."""
        self.ids.append(int(token_id))
        full = self._decode(self.ids)
        for s in self._stop:
            k = full.find(s)
            if k >= 0:
                full = full[:k]
                self.stopped = True
        self.text = full
        if self.stopped:
            return self.flush()
        safe = len(full)
        while safe > 0 and full[safe - 1] == "\ufffd":
            safe -= 1
        for s in self._stop:  # hold back a suffix that may begin a stop string
            for j in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:j]):
                    safe = min(safe, len(full[:safe]) - j)
                    break
        if safe <= self.emitted:
            return ""
        piece = full[self.emitted:safe]
        self.emitted = safe
        return piece

    def flush(self) -> str:
        """The remaining text (at the end of generation)."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


class TextStream:
    """Iterator of text pieces from ``generate(..., stream=True)``.

    Iterate it to receive the pieces as tokens are decoded; afterwards
    :attr:`result` holds the :class:`GenerationOutput` (whose ``.text`` is the
    pieces joined).
    """

    def __init__(self, gen, on_result: Optional[Callable[[GenerationOutput], None]] = None) -> None:
        self._gen = gen
        self._on_result = on_result
        self.result: Optional[GenerationOutput] = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        while True:
            item = next(self._gen)  # StopIteration ends the stream
            if isinstance(item, str):
                if item:
                    return item
            else:
                self.result = item[0]
                if self._on_result is not None:
                    self._on_result(self.result)

    def close(self) -> None:
        """Stop generating early."""
        self._gen.close()
