"""Tokenizer of a checkpoint directory: ``tokenizer.json`` through the
``tokenizers`` library, special tokens and chat template from
``tokenizer_config.json`` (as transformers reads them)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ["Tokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer file is missing or invalid, or text was given without a tokenizer."""


def _token_content(tok: Any) -> Optional[str]:
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


class Tokenizer:
    """Byte-level BPE tokenizer of a DeepSeek checkpoint.

    Parameters
    ----------
    directory : str
        Checkpoint directory holding ``tokenizer.json`` (required) and
        optionally ``tokenizer_config.json``.
    """

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no tokenizer.json in the checkpoint directory")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a plain Exception
            raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from e
        self.directory = directory
        cfg: Dict[str, Any] = {}
        cpath = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cpath):
            try:
                with open(cpath, "r", encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{cpath}: invalid JSON: {e}") from e
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cpath}: expected a JSON object")
        self.config = cfg
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        # DeepSeek's tokenizer_config.json says add_bos_token: true (LlamaTokenizerFast honours it);
        # without the flag only the tokenizer.json post-processor decides, as in transformers
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default")
        if tmpl is None:
            jpath = os.path.join(directory, "chat_template.jinja")
            if os.path.isfile(jpath):
                with open(jpath, "r", encoding="utf-8") as f:
                    tmpl = f.read()
        self.chat_template: Optional[str] = tmpl if isinstance(tmpl, str) else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Text -> token ids; the bos token is prepended when the checkpoint asks for it."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + list(ids)
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text (incomplete UTF-8 at the end decodes to U+FFFD)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the checkpoint's chat template with jinja2, as transformers does.

        Parameters
        ----------
        messages : list of {"role": str, "content": str}
        add_generation_prompt : bool
            End with the assistant prefix so the model answers.
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.directory}: the tokenizer has no chat_template")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise TypeError("messages: expected a list of {'role': str, 'content': str} dicts")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template does not parse: {e}") from e
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = True) -> List[int]:
        """Token ids of a conversation rendered with the chat template.

        An assistant message may carry ``"token_ids"``: the tokens the model generated for it
        (sessions record them).  Those ids are put in the rendering's place of the message's
        content instead of encoding the text again, because a model's own tokens need not be
        the encoding of their text (e.g. "\n", "\n" where encoding gives "\n\n"): the
        conversation is then exactly what the model saw and wrote.  The text around them is
        encoded piece by piece, as it was when the answer was generated (the prompt ended at
        the generation prompt).  Ids are used only where they decode (special tokens as their
        text) to the content, which the rendering must insert verbatim; what they decode to
        before it, e.g. a space that the template writes before the content, is taken from the
        text before them.  Otherwise, e.g. after an edit of the content, the content is encoded.

        Parameters
        ----------
        messages : list of {"role": str, "content": str[, "token_ids": list of int]}
        add_generation_prompt : bool
            End with the assistant prefix so the model answers.

        Returns
        -------
        list of int
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        spliced = self._answer_ids(messages)
        if not spliced:
            return self.encode(text, add_special_tokens=False)
        # the same rendering with a marker in place of each such content: the pieces between markers
        marks = {i: f"\ue000dsv2ext-answer-{i}\ue001" for i in spliced}
        marked = [dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)]
        other = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt)
        pieces: List[Union[str, int]] = []  # text, and the indices of the messages whose ids go there
        rest, order = other, sorted(spliced)
        for i in order:
            before, sep, rest = rest.partition(marks[i])
            if not sep or marks[i] in rest:  # the template dropped or repeated the content
                return self.encode(text, add_special_tokens=False)
            pieces += [before, i]
        pieces.append(rest)
        if "".join(messages[p]["content"] if isinstance(p, int) else p for p in pieces) != text:
            return self.encode(text, add_special_tokens=False)  # the content was not inserted verbatim
        out: List[int] = []
        pending = ""
        for p in pieces:
            if isinstance(p, str):
                pending += p
                continue
            ids, lead = spliced[p]  # lead: what the ids decode to before the content
            if lead and not pending.endswith(lead):
                pending += messages[p]["content"]
                continue
            out += self.encode(pending[:len(pending) - len(lead)], add_special_tokens=False) + ids
            pending = ""
        return out + self.encode(pending, add_special_tokens=False)

    def _answer_ids(self, messages: List[Dict[str, Any]]) -> Dict[int, Any]:
        """{message index: (token_ids, decoded text before the content)} of the assistant messages
        whose ``token_ids`` decode to a text that ends with their content."""
        out: Dict[int, Any] = {}
        n = self.vocab_size
        for i, m in enumerate(messages):
            ids = m.get("token_ids") if isinstance(m, dict) else None
            if ids is None:
                continue
            if (isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__len__") or not hasattr(ids, "__iter__")
                    or not all(isinstance(t, int) or hasattr(t, "__index__") for t in ids)):
                raise TypeError(f"messages[{i}]['token_ids']: expected a list of int token ids")
            ids = [int(t) for t in ids]
            if any(t < 0 or t >= n for t in ids):
                raise ValueError(f"messages[{i}]['token_ids']: ids must be in [0, {n})")
            if m.get("role") != "assistant" or not ids:
                continue
            decoded, content = self.decode(ids, skip_special_tokens=False), m["content"]
            if decoded.endswith(content):
                out[i] = (ids, decoded[:len(decoded) - len(content)])
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
