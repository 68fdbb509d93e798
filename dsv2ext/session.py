"""Conversations that keep their latent cache between calls.

>>> s = model.session()
>>> a = s.chat("Write a function that adds two numbers.")
>>> b = s.chat("Now with type hints.")        # prefills only the new turn
>>> b.prefill_tokens, len(s)

Each call takes the *whole* conversation (a prompt, or chat messages rendered with the
checkpoint's template), finds the longest prefix of its tokens that the cache already holds
(the previous prompt and answer), and computes only the tokens after it.  An edited history
falls back to the longest common prefix.  The result equals a fresh ``model.generate`` /
``model.chat`` over the whole conversation (greedy: the same tokens; seeded sampling: the same
draws).  The answers recorded in ``session.messages`` keep the tokens the model generated
(``"token_ids"``), which stand for their text when the conversation is rendered again, so
``s.chat(text)`` equals ``model.chat(s.messages + [{"role": "user", "content": text}])``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .generation import GenerationOutput, TextStream
from .tokenizer import TokenizerError

if TYPE_CHECKING:
    from .model import DeepseekV2, Prompt

__all__ = ["Session", "common_prefix_len"]

Messages = List[Dict[str, Any]]  # {"role", "content"[, "token_ids"]}


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    x, y = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = min(x.size, y.size)
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if diff.size else n


class Session:
    """One conversation with a model, its latent cache kept between calls.

    Made by :meth:`DeepseekV2.session`.  The cache grows as the conversation does (capacity
    doubling; no length chosen up front) up to the model's context
    (``max_position_embeddings``); a call that would pass it raises ``ValueError``.

    Attributes
    ----------
    model : DeepseekV2
    cache : LatentCache
        One sequence, in the model's ``kv_dtype``.
    tokens : list of int
        The tokens whose latent rows are cached, in order (``len(session)`` of them).
    messages : list of dict
        The chat history of :meth:`chat` (user turns and the answers).  An answer also carries
        ``"token_ids"``, the tokens the model generated for it: the next turns put them back in
        place of the answer's text (see :meth:`DeepseekV2.chat`), so that the history is never
        computed again, even where the model chose tokens that encoding its text would not
        give (e.g. "\n", "\n" for "\n\n").  ``model.chat(session.messages + [next])`` is a
        fresh run of the same conversation; without the ids the text is encoded again.
    """

    def __init__(self, model: "DeepseekV2") -> None:
        self.model = model
        self.cache = model.new_cache(1)
        self.tokens: List[int] = []
        self.messages: Messages = []
        self._stream: Optional[TextStream] = None  # a streamed call still writing the cache

    def __len__(self) -> int:
        """Tokens in the cache."""
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"Session({len(self.tokens)} cached tokens, {len(self.messages)} messages, "
                f"kv_dtype={self.cache.dtype}, capacity={self.cache.max_len})")

    def reset(self) -> None:
        """Forget the conversation (the cache's memory is kept for the next one)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.tokens = []
        self.messages = []
        self.cache.reset()

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: "Prompt", max_new_tokens: int = 64, *, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                 stop: Union[str, Sequence[str], None] = None,
                 stream: bool = False) -> Union[GenerationOutput, TextStream]:
        """Continue the conversation: :meth:`DeepseekV2.generate` on the whole conversation so far.

        Parameters
        ----------
        prompt : str or sequence of int
            The whole conversation (e.g. the previous prompt + the previous answer + the new
            text); the prefix already cached is not computed again.
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stream
            As :meth:`DeepseekV2.generate`.

        Returns
        -------
        GenerationOutput (``prefill_tokens``: tokens computed by this call), or a TextStream.
        """
        if self._stream is not None:  # an unfinished stream stops here: its cache rows are kept
            self._stream.close()
            self._stream = None
        res = self.model._generate(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                                   stop, stream, session=self)
        if isinstance(res, TextStream):
            self._stream = res
        return res

    def chat(self, messages: Union[str, Messages], max_new_tokens: int = 128,
             **kwargs: Any) -> Union[GenerationOutput, TextStream]:
        """Answer with the checkpoint's chat template, reusing the cached turns.

        Parameters
        ----------
        messages : str or list of {"role", "content"}
            A str is the next user message, appended to :attr:`messages`; a list is the whole
            conversation (it replaces :attr:`messages`; an edited history reuses the cache up
            to the first difference).
        max_new_tokens : int
        **kwargs : as :meth:`generate` (temperature, top_p, seed, stop, stream, ...)

        Returns
        -------
        GenerationOutput, or a TextStream (``stream=True``).  The answer is appended to
        :attr:`messages` once complete.
        """
        model = self.model
        if model.tokenizer is None:
            raise TokenizerError("chat() needs a tokenizer (this checkpoint has no tokenizer.json)")
        if isinstance(messages, str):
            history = self.messages + [{"role": "user", "content": messages}]
        elif isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            history = [dict(m) for m in messages]
        else:
            raise TypeError("messages: expected a str (the next user message) or a list of "
                            "{'role', 'content'} dicts")
        ids = model._chat_ids(history)

        def done(out: GenerationOutput) -> None:
            answer: Dict[str, Any] = {"role": "assistant", "content": self._answer_content(history, out)}
            ids = self._answer_ids(out)
            if ids is not None:
                answer["token_ids"] = ids
            self.messages = history + [answer]

        res = self.generate(ids, max_new_tokens, **kwargs)
        if isinstance(res, TextStream):
            res._on_result = done
        else:
            done(res)
        return res

    # ------------------------------------------------------------------ internals
    def _answer_content(self, history: Messages, out: GenerationOutput) -> str:
        """The answer as an assistant message whose rendering continues the text the model saw.

        The generation prompt (e.g. "Assistant:") is followed by the generated text (e.g.
        " Sure..."); a template that writes "Assistant: " + content then wants the content
        without the leading space, or the next turn's tokens would differ from the cached ones.
        """
        tok = self.model.tokenizer
        text = out.text or ""
        seen = tok.apply_chat_template(history, add_generation_prompt=True) + text
        for content in ([text[1:]] if text.startswith(" ") else []) + [text]:
            r = tok.apply_chat_template(history + [{"role": "assistant", "content": content}],
                                        add_generation_prompt=False)
            if r.startswith(seen):
                return content
        return text  # no rendering continues it (e.g. an answer that starts with a newline after "Assistant:")

    def _answer_ids(self, out: GenerationOutput) -> Optional[List[int]]:
        """The generated tokens that make the answer's text (an eos that ended it dropped), or None
        when no run of them decodes to exactly that text (e.g. a stop string inside a token)."""
        tok = self.model.tokenizer
        ids = list(out.token_ids)
        if out.finish_reason == "eos" and ids and ids[-1] == tok.eos_token_id:
            ids.pop()
        text = out.text or ""
        if out.finish_reason == "stop":  # the text ends before the stop string: the tokens up to there
            while ids and len(tok.decode(ids, skip_special_tokens=False)) > len(text):
                ids.pop()
        return ids if ids and tok.decode(ids, skip_special_tokens=False) == text else None

    def _reuse(self, ids: np.ndarray) -> int:
        """Cached tokens kept for a call on ``ids``: their longest common prefix, less one when that
        is all of ``ids`` (the last token is computed again for its logits).  Drops the rest."""
        keep = min(common_prefix_len(self.tokens, ids), ids.size - 1)
        del self.tokens[keep:]
        self.cache.lengths[0] = keep
        return keep

    def _fed(self, ids: np.ndarray) -> None:
        """Record tokens whose rows the model has just written (after ``len(self)`` of them)."""
        self.tokens.extend(int(t) for t in ids)
