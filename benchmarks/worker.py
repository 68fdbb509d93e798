"""One engine, one task, one process: the benchmark driver starts this script per measurement.

    python benchmarks/worker.py SPEC.json

SPEC keys: engine ("dsv2ext" | "transformers" | "llama"), variant (see
``ENGINES`` in run.py), task ("check" | "speed" | "serve"), ckpt (HF directory), gguf
(file, llama only), threads, workload (common.Workload), out (result JSON
path), npy_dir (check: where logits go).  The result JSON always has
``ok``; on failure ``error`` holds the message and traceback.

Keeping every engine in its own process isolates their memory (peak RSS is
the process's own VmHWM, see common.peak_rss_bytes) and lets the driver time-box each one.
"""
from __future__ import annotations

import math
import abc
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peak_rss_bytes, prompt_ids, read_json, top2, write_json  # noqa: E402

# ----------------------------------------------------------------------------- engines


class Engine(abc.ABC):
    """What every engine offers the measurements (each engine implements every abstract method)."""

    name = "?"
    dtype = "?"

    @abc.abstractmethod
    def logits_all(self, ids: List[int]) -> np.ndarray:
        """float32 [T, V] logits of every position of a fresh sequence."""
        ...

    @abc.abstractmethod
    def greedy(self, ids: List[int], n: int) -> Tuple[List[int], List[Dict[str, Any]]]:
        """n greedy tokens after ids, and the top-2 of the logits at each step."""
        ...

    @abc.abstractmethod
    def prefill(self, ids: List[int]) -> float:
        """Seconds to process a fresh prompt (logits of its last token only)."""
        ...

    @abc.abstractmethod
    def begin(self, ids: List[int]) -> int:
        """Start a fresh decode state: prefill ids, return the greedy next token (fed by ``step``)."""
        ...

    @abc.abstractmethod
    def step(self) -> None:
        """One greedy decode step: feed the pending token, keep the argmax as the next one."""
        ...

    def decode(self, ids: List[int], n: int) -> Dict[str, Any]:
        """Prefill ids, then n greedy decode steps; {"prefill_s", "decode_s", "tokens", "step_s"}."""
        t0 = time.perf_counter()
        self.begin(ids)
        t1 = time.perf_counter()
        steps = []
        for _ in range(n):
            ts = time.perf_counter()
            self.step()
            steps.append(time.perf_counter() - ts)
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": n, "step_s": steps}

    @abc.abstractmethod
    def kv_bytes_per_token(self) -> Dict[str, Any]:
        ...

    @abc.abstractmethod
    def active_weight_bytes(self) -> Dict[str, Any]:
        """Bytes of weights one decode step reads (experts: top-k of E; embedding: one row)."""
        ...

    @abc.abstractmethod
    def set_threads(self, n: int) -> None:
        """Use n threads from the next call on (prefill and decode)."""
        ...

    def profile(self, ids: List[int], n: int) -> Optional[Dict[str, Any]]:
        return None

    def state(self) -> Optional[Any]:
        """The decode state ``begin`` / ``step`` work on, to be put back by :meth:`restore` (None: the
        engine cannot hold two states at once)."""
        return None

    def restore(self, state: Any) -> None:
        raise NotImplementedError(f"{self.name} keeps one decode state")


def _active_fraction(path: str, k: int, E: int, V: int) -> float:
    p = path.lower()
    if "embed" in p or p.startswith("token_embd"):
        return 1.0 / V
    if ("experts" in p and "shared" not in p) or "_exps" in p:
        return k / E
    return 1.0


class DsEngine(Engine):
    name = "dsv2ext"

    def __init__(self, ckpt: str, variant: str, threads: int, prefetch: Optional[int] = None) -> None:
        import dsv2ext

        self.dsv2ext = dsv2ext
        dsv2ext.set_num_threads(threads)
        if prefetch is not None:  # a software-prefetch distance chosen for this machine (bench_stream.py)
            dsv2ext.set_prefetch(int(prefetch))
        self.dtype = variant
        t0 = time.perf_counter()
        # "bf16-compute": bf16 weights with the opt-in bf16 compute mode (activations rounded to
        # bf16 in products of 2+ rows, vdpbf16ps); decode of one token is the same as "bf16".
        # "int4" / "int4-mixed": the dsv2ext.load recipes of those names (quantized at load).
        dsv2ext.set_bf16_compute(variant == "bf16-compute")
        # "bf16-kvfp8": bf16 weights with the FP8 latent cache (default: the checkpoint's default cache)
        base = {"bf16-compute": "bf16", "bf16-kvfp8": "bf16"}.get(variant, variant)
        self.model = dsv2ext.load(ckpt, dtype=base, kv_dtype="fp8" if "kvfp8" in variant else None)
        self.load_s = time.perf_counter() - t0
        self.cfg = self.model.config

    def logits_all(self, ids: List[int]) -> np.ndarray:
        return np.asarray(self.model.logits(ids), dtype=np.float32)

    def greedy(self, ids: List[int], n: int) -> Tuple[List[int], List[Dict[str, Any]]]:
        m = self.model
        T = len(ids)
        cache = m.new_cache(1, T + n)
        z = np.zeros(T, np.int64)
        logits = m.forward(np.asarray(ids, np.int64), z, np.arange(T, dtype=np.int64), cache,
                           logit_rows=np.array([T - 1]))
        toks, tops = [], []
        for i in range(n):
            t = top2(logits[0])
            tops.append(t)
            toks.append(t["top1"])
            if i + 1 < n:
                logits = m.forward(np.array([t["top1"]], np.int64), np.zeros(1, np.int64),
                                   np.array([T + i], np.int64), cache)
        return toks, tops

    def prefill(self, ids: List[int]) -> float:
        out = self.model.generate(list(ids), max_new_tokens=1, temperature=0)
        return float(out.prefill_seconds)

    #: decode steps a state started by ``begin`` has room for
    STEP_ROOM = 4096

    def begin(self, ids: List[int]) -> int:
        m = self.model
        T = len(ids)
        self._cache = m.new_cache(1, T + self.STEP_ROOM)
        logits = m.forward(np.asarray(ids, np.int64), np.zeros(T, np.int64), np.arange(T, dtype=np.int64),
                           self._cache, logit_rows=np.array([T - 1]))
        self._tok, self._pos = int(np.argmax(logits[0])), T
        return self._tok

    def step(self) -> None:
        logits = self.model.forward(np.array([self._tok], np.int64), np.zeros(1, np.int64),
                                    np.array([self._pos], np.int64), self._cache)
        self._tok = int(np.argmax(logits[0]))
        self._pos += 1

    def set_threads(self, n: int) -> None:
        self.dsv2ext.set_num_threads(n)

    def state(self) -> Optional[Any]:
        return (self._cache, self._tok, self._pos) if hasattr(self, "_cache") else None

    def restore(self, state: Any) -> None:
        self._cache, self._tok, self._pos = state

    def kv_bytes_per_token(self) -> Dict[str, Any]:
        c = self.model.new_cache(1, 1)
        return {"bytes_per_token": int(c.bytes_per_token), "elements_per_token": int(c.elements_per_token),
                "dtype": c.dtype, "source": "LatentCache"}

    def active_weight_bytes(self) -> Dict[str, Any]:
        cfg = self.cfg
        k, E, V = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.vocab_size
        total = 0.0
        active = 0.0
        seen: set = set()

        def walk(obj: Any, path: str) -> None:
            nonlocal total, active
            if obj is None or isinstance(obj, (int, float, str, bool)):
                return
            if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
                if id(obj) in seen:
                    return
                seen.add(id(obj))
                nb = float(obj.nbytes)
                extra = getattr(obj, "scales", None)  # quantized weights may keep scales apart
                if extra is not None and hasattr(extra, "nbytes") and id(extra) not in seen:
                    seen.add(id(extra))
                    nb += float(extra.nbytes)
                total += nb
                active += nb * _active_fraction(path, k, E, V)
                return
            if isinstance(obj, (list, tuple)):
                for i, x in enumerate(obj):
                    walk(x, f"{path}.{i}")
                return
            if isinstance(obj, dict):
                for key, x in obj.items():
                    walk(x, f"{path}.{key}")
                return
            d = getattr(obj, "__dict__", None)
            if d:
                for key, x in d.items():
                    if not key.startswith("_"):
                        walk(x, f"{path}.{key}")

        walk(self.model.weights, "weights")
        return {"active_bytes": active, "total_bytes": total, "source": "model.weights"}

    def profile(self, ids: List[int], n: int) -> Optional[Dict[str, Any]]:
        """Decode-step time split by attention / MoE / dense MLP / lm_head / other.

        Uses the model's own profile hook when it has one; otherwise wraps the
        ``dsv2ext._C`` kernels that ``DeepseekV2.forward`` calls.
        """
        m = self.model
        hook = getattr(m, "profile", None)
        if callable(hook):
            try:
                got = hook(ids, n)
                if isinstance(got, dict) and isinstance(got.get("seconds_per_token"), dict):
                    return {"source": "model.profile", "context": len(ids), "tokens": n, **got}
            except TypeError:
                pass
        ops = self.dsv2ext._C  # the kernels the model's forward calls
        buckets = {"attention": "mla_attention_block", "moe": "moe_block", "dense_mlp": "swiglu_mlp",
                   "lm_head": "linear"}
        acc = {b: 0.0 for b in buckets}
        saved = {}
        for b, fn in buckets.items():
            f = getattr(ops, fn, None)
            if f is None:
                continue
            saved[fn] = f

            def wrapped(*a: Any, __f: Callable = f, __b: str = b, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return __f(*a, **kw)
                finally:
                    acc[__b] += time.perf_counter() - t

            setattr(ops, fn, wrapped)
        try:
            T = len(ids)
            cache = m.new_cache(1, T + n + 1)
            logits = m.forward(np.asarray(ids, np.int64), np.zeros(T, np.int64),
                               np.arange(T, dtype=np.int64), cache, logit_rows=np.array([T - 1]))
            for b in acc:
                acc[b] = 0.0
            t0 = time.perf_counter()
            for i in range(n):
                tok = int(np.argmax(logits[0]))
                logits = m.forward(np.array([tok], np.int64), np.zeros(1, np.int64),
                                   np.array([T + i], np.int64), cache)
            wall = time.perf_counter() - t0
        finally:
            for fn, f in saved.items():
                setattr(ops, fn, f)
        per = {b: acc[b] / n for b in acc}
        per["other"] = max(wall / n - sum(per.values()), 0.0)
        return {"source": "wrapped dsv2ext._C (" + ", ".join(sorted(saved)) + ")",
                "seconds_per_token": per, "wall_seconds_per_token": wall / n, "context": T,
                "tokens": n}


class HFEngine(Engine):
    name = "transformers"

    def __init__(self, ckpt: str, variant: str, threads: int) -> None:
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(threads)
        dtype_name, impl = variant.split("-", 1)  # e.g. "fp32-eager", "bf16-grouped_mm"
        self.dtype = dtype_name
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        kw: Dict[str, Any] = {"dtype": tdt}
        if impl == "eager":
            kw["attn_implementation"] = "eager"
            kw["experts_implementation"] = "eager"
        elif impl == "grouped_mm":
            kw["attn_implementation"] = "sdpa"
            kw["experts_implementation"] = "grouped_mm"
        else:
            raise ValueError(f"variant: unknown transformers implementation {impl!r}")
        t0 = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **kw)
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        self.impl = {"attn": self.model.config._attn_implementation,
                     "experts": getattr(self.model.config, "_experts_implementation", None)}
        self.cfg = self.model.config
        self._last_cache = None
        self._last_len = 0

    def logits_all(self, ids: List[int]) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            out = self.model(input_ids=t.tensor([ids]), use_cache=False)
        return out.logits[0].float().numpy()

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def _prefill(self, ids: List[int]) -> Tuple[Any, Any]:
        t = self.torch
        out = self.model(input_ids=t.tensor([ids]), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float(), out.past_key_values

    def greedy(self, ids: List[int], n: int) -> Tuple[List[int], List[Dict[str, Any]]]:
        t = self.torch
        toks, tops = [], []
        with t.inference_mode():
            logits, pkv = self._prefill(ids)
            for i in range(n):
                d = top2(logits.numpy())
                tops.append(d)
                toks.append(d["top1"])
                if i + 1 < n:
                    out = self.model(input_ids=t.tensor([[d["top1"]]]), past_key_values=pkv, use_cache=True)
                    logits, pkv = out.logits[0, -1].float(), out.past_key_values
        return toks, tops

    def prefill(self, ids: List[int]) -> float:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self._prefill(ids)
            return time.perf_counter() - t0

    def begin(self, ids: List[int]) -> int:
        t = self.torch
        with t.inference_mode():
            logits, self._pkv = self._prefill(ids)
        self._tok, self._last_len = int(t.argmax(logits)), len(ids)
        self._last_cache = self._pkv
        return self._tok

    def step(self) -> None:
        t = self.torch
        with t.inference_mode():
            out = self.model(input_ids=t.tensor([[self._tok]]), past_key_values=self._pkv, use_cache=True)
            self._pkv = out.past_key_values
            self._tok = int(t.argmax(out.logits[0, -1]))
        self._last_cache, self._last_len = self._pkv, self._last_len + 1

    def kv_bytes_per_token(self) -> Dict[str, Any]:
        pkv, T = self._last_cache, self._last_len
        if pkv is None or T == 0:
            with self.torch.inference_mode():
                _, pkv = self._prefill(list(range(1, 9)))
            T = 8
        total = 0
        layers = getattr(pkv, "layers", None)
        if layers is not None:
            for lay in layers:
                for name in ("keys", "values"):
                    x = getattr(lay, name, None)
                    if x is not None:
                        total += x.numel() * x.element_size()
        else:
            for k, v in pkv:
                total += k.numel() * k.element_size() + v.numel() * v.element_size()
        return {"bytes_per_token": total / T, "source": f"{type(pkv).__name__} after {T} tokens"}

    def active_weight_bytes(self) -> Dict[str, Any]:
        c = self.cfg
        k, E, V = c.num_experts_per_tok, c.n_routed_experts, c.vocab_size
        total = active = 0.0
        for name, p in self.model.named_parameters():
            nb = float(p.numel() * p.element_size())
            total += nb
            active += nb * _active_fraction(name, k, E, V)
        return {"active_bytes": active, "total_bytes": total, "source": "named_parameters"}


class LlamaEngine(Engine):
    name = "llama.cpp"

    def __init__(self, gguf_file: str, variant: str, threads: int, n_ctx: int, logits_all: bool) -> None:
        import llama_cpp

        from common import load_llama_backends

        load_llama_backends()  # a build with dynamic CPU backends needs them loaded first
        self.llama_cpp = llama_cpp
        self.dtype = variant
        self.path = gguf_file
        log = os.path.join(os.path.dirname(os.path.abspath(os.environ.get("BENCH_OUT", "."))),
                           f".llama-{os.getpid()}.log")
        # llama.cpp logs to fd 2: capture its load log to read the KV cache size
        saved = os.dup(2)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        try:
            t0 = time.perf_counter()
            self.llm = llama_cpp.Llama(model_path=gguf_file, n_ctx=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, n_batch=512, n_ubatch=512,
                                       logits_all=logits_all, verbose=True, seed=0)
            self.load_s = time.perf_counter() - t0
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
        with open(log, "r", encoding="utf-8", errors="replace") as f:
            self.load_log = f.read()
        os.unlink(log)
        self.n_ctx = n_ctx
        self._keep_all = logits_all
        self.llm.verbose = False

    def _last_logits(self) -> np.ndarray:
        """Logits of the last evaluated token (llama-cpp-python keeps scores only with logits_all)."""
        if self._keep_all:
            return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
        n_vocab = self.llm.n_vocab()
        return np.array(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n_vocab,)), dtype=np.float32)

    def logits_all(self, ids: List[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids: List[int], n: int) -> Tuple[List[int], List[Dict[str, Any]]]:
        self.llm.reset()
        self.llm.eval(ids)
        toks, tops = [], []
        for i in range(n):
            d = top2(self._last_logits())
            tops.append(d)
            toks.append(d["top1"])
            if i + 1 < n:
                self.llm.eval([d["top1"]])
        return toks, tops

    def prefill(self, ids: List[int]) -> float:
        self.llm.reset()  # the next eval() drops the cached tokens
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def begin(self, ids: List[int]) -> int:
        self.llm.reset()  # the next eval() drops the cached tokens
        self.llm.eval(ids)
        self._tok = int(np.argmax(self._last_logits()))
        return self._tok

    def step(self) -> None:
        self.llm.eval([self._tok])
        self._tok = int(np.argmax(self._last_logits()))

    def set_threads(self, n: int) -> None:
        # the context's thread counts for single-token (decode) and batch (prompt) evaluation
        self.llama_cpp.llama_set_n_threads(self.llm._ctx.ctx, n, n)

    def kv_bytes_per_token(self) -> Dict[str, Any]:
        import re

        m = re.search(r"llama_kv_cache[^\n]*?size\s*=\s*([\d.]+)\s*MiB\s*\(\s*(\d+)\s*cells[^\n]*", self.load_log)
        if not m:
            raise RuntimeError("llama.cpp load log has no 'llama_kv_cache: size = ... MiB (N cells' line:\n"
                               + "\n".join(l for l in self.load_log.splitlines() if "kv" in l.lower()))
        mib, cells = float(m.group(1)), int(m.group(2))
        return {"bytes_per_token": mib * 1024 * 1024 / cells, "source": "llama.cpp log: " + m.group(0).strip()}

    def active_weight_bytes(self) -> Dict[str, Any]:
        import gguf

        r = gguf.GGUFReader(self.path)
        arch = "deepseek2"

        def field(key: str) -> int:
            f = r.fields[f"{arch}.{key}"]
            return int(f.parts[f.data[0]][0])

        k, E, V = field("expert_used_count"), field("expert_count"), field("vocab_size")
        total = active = 0.0
        for t in r.tensors:
            nb = float(t.n_bytes)
            total += nb
            active += nb * _active_fraction(t.name, k, E, V)
        return {"active_bytes": active, "total_bytes": total, "source": "GGUF tensor table"}


# ----------------------------------------------------------------------------- tasks


def make_engine(spec: Dict[str, Any], logits_all: bool) -> Engine:
    eng, var, th = spec["engine"], spec["variant"], int(spec["threads"])
    if eng == "dsv2ext":
        return DsEngine(spec["ckpt"], var, th, spec.get("prefetch"))
    if eng == "transformers":
        return HFEngine(spec["ckpt"], var, th)
    if eng == "llama":
        n_ctx = int(spec["n_ctx"])
        if logits_all:  # llama-cpp-python allocates n_ctx x vocab fp32 scores: keep it small
            w = spec["workload"]
            n_ctx = 256 * math.ceil((w["check_prompt"] + w["check_greedy"] + 16) / 256)
        return LlamaEngine(spec["gguf"], var, th, n_ctx, logits_all)
    raise ValueError(f"engine: unknown {eng!r}")


def task_check(spec: Dict[str, Any]) -> Dict[str, Any]:
    w = spec["workload"]
    e = make_engine(spec, logits_all=True)
    ids = prompt_ids(w["check_prompt"], seed=1)
    t0 = time.perf_counter()
    logits = e.logits_all(ids)
    t_logits = time.perf_counter() - t0
    os.makedirs(spec["npy_dir"], exist_ok=True)
    path = os.path.join(spec["npy_dir"], f"{spec['engine']}-{spec['variant']}-logits.npy")
    np.save(path, logits)
    gids = prompt_ids(max(8, w["check_prompt"] // 2), seed=2)
    toks, tops = e.greedy(gids, w["check_greedy"])
    return {"logits_npy": path, "logits_shape": list(logits.shape), "logits_seconds": t_logits,
            "greedy_prompt_len": len(gids), "greedy_tokens": toks, "greedy_top2": tops,
            "load_seconds": getattr(e, "load_s", None)}


def task_speed(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Prefill, decode at each context (shortest first), KV bytes, weight bytes, profile.

    The result file is rewritten after every stage (``partial``: true), so a
    run killed at its time box still reports what it measured.
    """
    w = spec["workload"]
    contexts = sorted(int(c) for c in spec.get("contexts") or w["decode_contexts"])
    e = make_engine(spec, logits_all=False)
    res: Dict[str, Any] = {"ok": True, "partial": True, "load_seconds": getattr(e, "load_s", None),
                           "dtype": e.dtype, "decode": {}}
    if hasattr(e, "impl"):
        res["implementation"] = e.impl

    def save() -> None:
        res["peak_rss_bytes"] = peak_rss_bytes()
        write_json(spec["out"], dict(res, spec={k: v for k, v in spec.items() if k != "workload"}))

    # warm-up: touches every expert once (page cache, lazy allocations, thread pools)
    e.decode(prompt_ids(min(128, w["prefill"]), seed=10), 4)
    res["kv_cache"] = e.kv_bytes_per_token()
    res["weights"] = e.active_weight_bytes()
    pre = [e.prefill(prompt_ids(w["prefill"], seed=11 + r)) for r in range(w["prefill_reps"])]
    res["prefill"] = {"tokens": w["prefill"], "seconds": pre, "tokens_per_s": w["prefill"] / min(pre)}
    save()
    for i, ctx in enumerate(contexts):
        d = e.decode(prompt_ids(ctx, seed=20 + ctx), w["decode_tokens"])
        # headline: 1 / median step time (robust to bursts of other processes); mean kept too
        d["tokens_per_s_mean"] = d["tokens"] / d["decode_s"]
        d["tokens_per_s"] = 1.0 / float(np.median(d["step_s"]))
        d["prefill_tokens_per_s"] = ctx / d["prefill_s"]
        res["decode"][str(ctx)] = d
        if i == 0:
            res["kv_cache"] = e.kv_bytes_per_token()  # transformers: measured on this context's cache
            prof = e.profile(prompt_ids(ctx, seed=20 + ctx), w["profile_tokens"])
            if prof is not None:
                res["profile"] = prof
        save()
    res.pop("partial")
    return res


def task_serve(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Keep one engine loaded and decode on request, for the driver's interleaved rounds.

    Protocol: one JSON object per line.  The worker answers ``{"ready": true, "weights": ...,
    "kv_cache": ...}`` once loaded and warmed up, then reads commands from stdin:
    ``{"cmd": "begin", "context": N}`` (fresh state after an N-token prompt; answers
    ``{"prefill_s": s}``; with ``"threads": t`` the prompt runs on t threads, then the
    engine's thread count is restored), ``{"cmd": "steps", "n": k, "warmup": w}`` (w untimed, then
    k timed greedy steps; answers ``{"step_s": [...]}``; with ``"slot": name`` the steps run on a state
    kept by ``keep``, and the current state is put back afterwards), ``{"cmd": "keep", "slot": name}``
    (keep the current decode state under that name, where the engine can hold two; answers
    ``{"kept": bool}``), ``{"cmd": "threads", "n": t}`` (use t
    threads from now on; answers ``{"threads": t}``), ``{"cmd": "prefill", "tokens": N, "reps": r}``
    (r fresh N-token prompts, each timed; answers ``{"seconds": [...]}``), ``{"cmd": "profile",
    "context": N, "n": k}`` (the engine's decode time split over k steps after N tokens, or None;
    answers ``{"profile": ...}``) and ``{"cmd": "quit"}``.  Everything else the process prints goes to stderr (the log).
    """
    import json

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (engines, progress bars) must not corrupt the protocol

    def send(obj: Dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    w = spec["workload"]
    e = make_engine(spec, logits_all=False)
    e.decode(prompt_ids(min(128, w["prefill"]), seed=10), 4)  # warm-up, as in task_speed
    send({"ready": True, "weights": e.active_weight_bytes(), "kv_cache": e.kv_bytes_per_token(),
          "load_seconds": getattr(e, "load_s", None)})
    served = 0
    slots: Dict[str, Any] = {}  # decode states kept by "keep"
    threads = int(spec["threads"])
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "begin":
            ctx = int(cmd["context"])
            if "threads" in cmd:
                e.set_threads(int(cmd["threads"]))
            t0 = time.perf_counter()
            e.begin(prompt_ids(ctx, seed=20 + ctx))
            dt = time.perf_counter() - t0
            if "threads" in cmd:
                e.set_threads(threads)
            send({"prefill_s": dt, "peak_rss_bytes": peak_rss_bytes()})
        elif cmd["cmd"] == "threads":
            threads = int(cmd["n"])
            e.set_threads(threads)
            send({"threads": threads})
        elif cmd["cmd"] == "profile":
            ctx = int(cmd["context"])
            send({"profile": e.profile(prompt_ids(ctx, seed=20 + ctx), int(cmd["n"]))})
        elif cmd["cmd"] == "prefill":
            n = int(cmd["tokens"])
            send({"seconds": [e.prefill(prompt_ids(n, seed=11 + r)) for r in range(int(cmd.get("reps", 1)))]})
        elif cmd["cmd"] == "keep":
            st = e.state()
            if st is not None:
                slots[str(cmd["slot"])] = st
            send({"kept": st is not None})
        elif cmd["cmd"] == "steps":
            slot = cmd.get("slot")
            current = None
            if slot is not None:  # a kept state (e.g. the short context, between the long one's steps)
                current = e.state()
                e.restore(slots[str(slot)])
            for _ in range(int(cmd.get("warmup", 0))):  # untimed: wakes the threads, refills caches
                e.step()
            ts = []
            for _ in range(int(cmd["n"])):
                t0 = time.perf_counter()
                e.step()
                ts.append(time.perf_counter() - t0)
            if slot is not None:
                slots[str(slot)] = e.state()
                e.restore(current)
            served += len(ts)
            send({"step_s": ts, "peak_rss_bytes": peak_rss_bytes()})
        elif cmd["cmd"] == "quit":
            break
        else:
            raise ValueError(f"serve: unknown command {cmd!r}")
    return {"steps_served": served}


def main() -> int:
    spec = read_json(sys.argv[1])
    out = spec["out"]
    os.environ["BENCH_OUT"] = out
    t0 = time.perf_counter()
    try:
        fn = {"check": task_check, "speed": task_speed, "serve": task_serve}[spec["task"]]
        res = fn(spec)
        res["ok"] = True
    except BaseException as ex:  # the driver reports it; the process still exits cleanly
        res = {}
        if os.path.exists(out):  # a speed run's partial results stay usable
            try:
                res = read_json(out)
            except ValueError:
                res = {}
        res.update({"ok": "prefill" in res and spec["task"] == "speed", "error": f"{type(ex).__name__}: {ex}",
                    "traceback": traceback.format_exc()})
    res["wall_seconds"] = time.perf_counter() - t0
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["spec"] = {k: v for k, v in spec.items() if k != "workload"}
    write_json(out, res)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
