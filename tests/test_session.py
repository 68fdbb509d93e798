"""Sessions: a conversation keeps its latent cache between calls.

Each call must equal a fresh run over the whole conversation (greedy: the same tokens; seeded
sampling: the same tokens) while computing only the tokens after the longest common prefix
with the cached ones (``prefill_tokens``).  The bundled model and its chat template.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import dsv2ext

GREEDY = dict(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model():
    return dsv2ext.load()


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_generate_reuses_the_prefix(model):
    s = model.session()
    p1 = model.encode("def fibonacci(n):\n    if n < 2:\n")
    a = s.generate(p1, **GREEDY)
    assert a.prefill_tokens == len(p1) and a.prompt_tokens == len(p1)
    assert a.token_ids == model.generate(p1, **GREEDY).token_ids
    # the cache holds the prompt and every generated token but the last (sampled, never fed)
    assert len(s) == len(p1) + len(a.token_ids) - 1 and s.tokens == p1 + a.token_ids[:-1]
    extra = model.encode("    return x\n", )[1:]
    p2 = p1 + a.token_ids + extra
    b = s.generate(p2, **GREEDY)
    assert b.prefill_tokens == len(extra) + 1
    assert b.token_ids == model.generate(p2, **GREEDY).token_ids
    # the same conversation again: only its last token is computed (for its logits)
    c = s.generate(p2, **GREEDY)
    assert c.prefill_tokens == 1 and c.token_ids == b.token_ids


def test_history_edit_falls_back_to_the_common_prefix(model):
    s = model.session()
    p1 = model.encode("import os\nimport sys\n\nclass Foo(object):\n")
    s.generate(p1, **GREEDY)
    cached = list(s.tokens)
    p2 = model.encode("import os\nimport re\n\nclass Foo(object):\n    pass\n")
    out = s.generate(p2, **GREEDY)
    assert out.prefill_tokens == len(p2) - lcp(cached, p2)
    assert 0 < lcp(cached, p2) < len(p2)
    assert out.token_ids == model.generate(p2, **GREEDY).token_ids
    s.reset()
    assert len(s) == 0 and s.messages == []
    assert s.generate(p1, **GREEDY).prefill_tokens == len(p1)


def test_chat_turns_equal_fresh_runs(model):
    """Two chat turns (text, then the next user message): each equals model.chat on the whole
    history, and the second computes only what the re-rendered history does not share with the
    cached tokens (the previous prompt and the answer as generated)."""
    s = model.session()
    a = s.chat("Write a function that adds two numbers.", **GREEDY)
    h1 = [{"role": "user", "content": "Write a function that adds two numbers."}]
    ids1 = model._chat_ids(h1)
    assert a.token_ids == model.chat(h1, **GREEDY).token_ids and a.prefill_tokens == len(ids1)
    assert s.messages[:1] == h1 and s.messages[1]["role"] == "assistant"
    cached = list(s.tokens)
    assert cached == ids1 + a.token_ids[:-1]
    b = s.chat("Now with type hints.", **GREEDY)
    history = s.messages[:-1]
    ids2 = model._chat_ids(history)
    assert history[-1] == {"role": "user", "content": "Now with type hints."}
    assert b.prefill_tokens == len(ids2) - lcp(cached, ids2)
    assert lcp(cached, ids2) >= len(ids1) - 1  # at least the first prompt (its generation prompt may merge)
    assert b.token_ids == model.chat(history, **GREEDY).token_ids
    # the same history as a list of messages: nothing new but the last token
    c = s.chat(history, **GREEDY)
    assert c.prefill_tokens == 1 and c.token_ids == b.token_ids


def test_answer_that_continues_the_rendering_is_reused(model, monkeypatch):
    """DeepSeek's own template ("Assistant: " + content): when the answer is what it renders after
    the generation prompt ("Assistant:" + " text"), the next turn reuses it whole: only the eos and
    the new turn are computed, and the recorded content drops the leading space."""
    from hf_models import DEEPSEEK_CHAT_TEMPLATE
    monkeypatch.setattr(model.tokenizer, "chat_template", DEEPSEEK_CHAT_TEMPLATE)
    s = model.session()
    h1 = [{"role": "user", "content": "hi"}]
    ids1 = model._chat_ids(h1)
    answer = model.tokenizer.encode(" def add(a, b):\n    return a + b", add_special_tokens=False)
    s.generate(ids1 + answer, max_new_tokens=1, temperature=0)  # the answer, as if generated
    h2 = h1 + [{"role": "assistant", "content": "def add(a, b):\n    return a + b"},
               {"role": "user", "content": "thanks"}]
    ids2 = model._chat_ids(h2)
    assert ids2[:len(ids1) + len(answer)] == ids1 + answer  # the template renders what was cached
    out = s.chat(h2, **GREEDY)
    assert out.prefill_tokens == len(ids2) - len(ids1) - len(answer)
    assert out.token_ids == model.chat(h2, **GREEDY).token_ids
    as_generated = dataclasses.replace(out, token_ids=answer, text=" def add(a, b):\n    return a + b")
    assert s._answer_content(h1, as_generated) == "def add(a, b):\n    return a + b"


def test_bundled_answers_are_reused_whole(model):
    """The bundled template writes a past answer right after "Assistant:", as the model generated it
    (its answers start with a newline): over three turns nothing of an answer is computed again."""
    s = model.session()
    assert "'Assistant:' + message['content']" in model.tokenizer.chat_template
    for user in ["Write a function that adds two numbers.", "Add type hints.", "Add a test."]:
        cached = list(s.tokens)
        out = s.chat(user, **GREEDY)
        ids = model._chat_ids(s.messages[:-1])
        assert lcp(cached, ids) == len(cached)  # the whole cache (prompt and answer) is a prefix
        assert out.prefill_tokens == len(ids) - len(cached)
        assert out.token_ids == model.chat(s.messages[:-1], **GREEDY).token_ids
        assert s.messages[-1]["content"] == out.text  # recorded as generated


def bench_user_turns():
    """The user turns of benchmarks/session.py's 20-turn conversation: the bundled model's greedy
    answers to some of them (from the 12th on, on AVX-512) hold tokens that encoding their text would
    not give."""
    import importlib.util
    import os
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "session.py")
    spec = importlib.util.spec_from_file_location("bench_session", path)
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved  # the benchmark puts its own folder first
    return list(mod.USER_TURNS)


def test_answers_in_tokens_the_text_would_not_encode_to_are_not_computed_again(model, monkeypatch):
    """Greedy chat turns until an answer's generated tokens differ from the encoding of its text
    (e.g. "\n", "\n" for "\n\n"): every turn computes only the new turn (the whole cache is a
    prefix of the conversation, whose answers are their recorded ``token_ids``) and equals a fresh
    ``model.chat`` over ``session.messages``; the same history as plain text (no ids) is encoded
    again and falls back to the common prefix, still equal to a fresh run.  Where this CPU's greedy
    answers all encode back to their tokens, one answer is picked by a scripted sampler instead."""
    tok = model.tokenizer
    s = model.session()
    odd = None
    for k, user in enumerate(bench_user_turns()):
        cached = list(s.tokens)
        out = s.chat(user, max_new_tokens=48, temperature=0)
        history = s.messages[:-1]
        ids = model._chat_ids(history)
        assert ids[:len(cached)] == cached  # nothing cached is computed again
        assert out.prefill_tokens == len(ids) - len(cached)
        assert out.token_ids == model.chat(history, max_new_tokens=48, temperature=0).token_ids
        answer = s.messages[-1]
        assert tok.decode(answer["token_ids"], skip_special_tokens=False) == out.text == answer["content"]
        if answer["token_ids"] != tok.encode(answer["content"], add_special_tokens=False):
            odd = k
            break
    if odd is None:  # none on this CPU's greedy path: one answer of such tokens, picked by a scripted sampler
        import dsv2ext.model as model_module
        enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
        script = enc("def f():") + enc("\n") + enc("\n") + enc("    pass")
        picks = iter(script)
        with monkeypatch.context() as mp:
            mp.setattr(model_module, "select_token", lambda *a, **k: next(picks))
            s.chat("One more.", max_new_tokens=len(script), temperature=0)
        answer = s.messages[-1]
        assert answer["token_ids"] == script != enc(answer["content"])
    # the next turn reuses the odd answer whole
    cached = list(s.tokens)
    nxt = s.chat("Thanks.", max_new_tokens=8, temperature=0)
    assert nxt.prefill_tokens == len(model._chat_ids(s.messages[:-1])) - len(cached)
    # as plain text the odd answer encodes differently: computed again from the first difference
    plain = [{"role": m["role"], "content": m["content"]} for m in s.messages[:-1]]
    ids = model._chat_ids(plain)
    s2_cached = list(s.tokens)
    out = s.chat(plain, max_new_tokens=8, temperature=0)
    assert out.prefill_tokens == len(ids) - lcp(s2_cached, ids) > nxt.prefill_tokens
    assert out.token_ids == model.chat(plain, max_new_tokens=8, temperature=0).token_ids


def test_encode_chat_puts_answer_tokens_in_place_of_their_text(model, monkeypatch):
    """Tokenizer.encode_chat with hand-made ids that are not the encoding of their text."""
    tok = model.tokenizer
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    nl = enc("\n")
    assert len(nl) == 1 and enc("\n\n") != nl + nl  # "\n\n" is one token of its own
    ids = enc("def f():") + nl + nl + enc("    pass")
    text = tok.decode(ids)
    assert enc(text) != ids
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text, "token_ids": ids},
            {"role": "user", "content": "more"}]
    plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
    got, canon = tok.encode_chat(msgs), tok.encode_chat(plain)
    assert canon == enc(tok.apply_chat_template(plain))
    prompt = tok.apply_chat_template(plain[:1])  # ends with the generation prompt "Assistant:"
    head = enc(prompt)
    assert got[:len(head) + len(ids)] == head + ids  # the prompt the answer was generated after, then the answer
    assert got[len(head) + len(ids):] == enc(tok.apply_chat_template(plain)[len(prompt) + len(text):])
    assert tok.decode(got, skip_special_tokens=False) == tok.decode(canon, skip_special_tokens=False)
    assert model._chat_ids(msgs) == got
    # ids that do not decode to the content (an edited answer): the content is encoded
    edited = [dict(m, content="def g():\n    pass") if m["role"] == "assistant" else m for m in msgs]
    assert tok.encode_chat(edited) == enc(tok.apply_chat_template(edited))
    # only assistant messages; empty ids are no ids
    assert tok.encode_chat([dict(msgs[0], token_ids=enc("hi"))] + msgs[1:]) == got
    assert tok.encode_chat([msgs[0], dict(msgs[1], token_ids=[]), msgs[2]]) == canon
    with pytest.raises(TypeError, match=r"messages\[1\]\['token_ids'\]"):
        tok.encode_chat([msgs[0], dict(msgs[1], token_ids="abc"), msgs[2]])
    with pytest.raises(TypeError, match=r"messages\[1\]\['token_ids'\]"):
        tok.encode_chat([msgs[0], dict(msgs[1], token_ids=(t for t in ids)), msgs[2]])
    with pytest.raises(TypeError, match=r"messages\[1\]\['token_ids'\]"):
        tok.encode_chat([msgs[0], dict(msgs[1], token_ids=[1.5]), msgs[2]])
    with pytest.raises(ValueError, match=r"messages\[1\]\['token_ids'\]"):
        tok.encode_chat([msgs[0], dict(msgs[1], token_ids=[tok.vocab_size]), msgs[2]])
    # DeepSeek's template writes "Assistant: " + content: ids that decode to " " + content take
    # the space from the text before them (the generation prompt ends at "Assistant:")
    from hf_models import DEEPSEEK_CHAT_TEMPLATE
    monkeypatch.setattr(tok, "chat_template", DEEPSEEK_CHAT_TEMPLATE)
    sp = enc(" def") + enc(" f():") + nl + nl + enc("    pass")
    msgs2 = [msgs[0], {"role": "assistant", "content": tok.decode(sp)[1:], "token_ids": sp}, msgs[2]]
    prompt = enc(tok.apply_chat_template(msgs2[:1]))
    got2 = tok.encode_chat(msgs2)
    assert got2[:len(prompt) + len(sp)] == prompt + sp
    assert tok.decode(got2, skip_special_tokens=False) == tok.apply_chat_template(msgs2)
    # a template that changes the content (strips it) gets the content encoded as rendered
    monkeypatch.setattr(tok, "chat_template", DEEPSEEK_CHAT_TEMPLATE.replace(
        "message['content'] + eos_token", "message['content'] | trim + eos_token"))
    msgs3 = [msgs[0], dict(msgs[1], content=text + "\n", token_ids=ids + nl), msgs[2]]
    assert tok.encode_chat(msgs3) == enc(tok.apply_chat_template(msgs3))


def test_seeded_sampling_and_stream(model):
    s = model.session()
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    p1 = model.encode("class Foo:\n")
    a = s.generate(p1, **kw)
    assert a.token_ids == model.generate(p1, **kw).token_ids
    p2 = p1 + a.token_ids + model.encode("    x = 1\n")[1:]
    st = s.generate(p2, stream=True, **kw)
    text = "".join(st)
    fresh = model.generate(p2, **kw)
    assert st.result.token_ids == fresh.token_ids and text == fresh.text
    assert st.result.prefill_tokens < len(p2) // 2
    # a streamed chat turn records its answer once the stream is exhausted
    c = s.chat("hi", max_new_tokens=6, temperature=0, stream=True)
    assert s.messages == [] and "".join(c) == c.result.text
    assert s.messages[-1] == {"role": "assistant", "content": s._answer_content(s.messages[:1], c.result),
                              "token_ids": c.result.token_ids[:len(s.messages[-1]["token_ids"])]}
    assert model.tokenizer.decode(s.messages[-1]["token_ids"], skip_special_tokens=False) == c.result.text
    # a stream left unfinished is closed by the next call, which reuses what it had computed
    st = s.generate(p2, stream=True, **kw)
    next(st)
    n = len(s)
    again = s.generate(p2, **kw)
    assert again.token_ids == fresh.token_ids and len(s) >= n


def test_context_overflow_and_bad_arguments(model):
    s = model.session()
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        s.generate([5] * (ctx - 4), max_new_tokens=8)
    assert len(s) == 0
    s.generate([5, 6, 7], max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="context"):
        s.generate([5, 6, 7] + [8] * (ctx - 3), max_new_tokens=1)
    with pytest.raises(ValueError, match="single prompt"):
        s.generate([[1, 2], [3, 4]], max_new_tokens=2)
    with pytest.raises(TypeError, match="messages"):
        s.chat(5)
    assert "Session(" in repr(s)


def test_cache_grows_without_a_max_length(model):
    s = model.session()
    assert s.cache.max_len == 256
    ids = model.encode("x = 1\n" * 150)
    out = s.generate(ids, max_new_tokens=4, temperature=0)
    assert s.cache.max_len >= len(ids) + 3
    assert out.token_ids == model.generate(ids, max_new_tokens=4, temperature=0).token_ids
