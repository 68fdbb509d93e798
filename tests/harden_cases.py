"""Small valid calls of every kernel, shared by the hardening, fuzzing and leak tests.

Each case is a function ``case(seed) -> Call``: the wrapper (``dsv2ext.ops``) or raw
(``dsv2ext._C``) function, its arguments, and a NumPy reference where one is cheap.
Sizes are tiny (hidden 32, 2 heads, 4 experts) so that thousands of calls take seconds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import dsv2ext
from dsv2ext import BF16, _C, ops

SANITIZED = os.environ.get("DSV2EXT_SANITIZED") == "1"

D = 32                                  # hidden size
H, NOPE, ROPE, V, L = 2, 8, 4, 8, 16    # MLA dims (qk head 12, latent row 20)
E, K, I, IS = 4, 2, 8, 16               # MoE: experts, top-k, expert width, shared width
S_MAX, B = 8, 2                         # latent cache [B, S_MAX, L + ROPE]


def f32(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def misaligned(a: np.ndarray) -> np.ndarray:
    """A writable copy of ``a`` whose data starts one byte off its dtype's alignment."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    return out


def huge_zero_stride(dtype: Any = np.float32, ndim: int = 2) -> np.ndarray:
    """A view claiming ~2**57 elements over a single one (stride 0): any product of its dims with
    another size overflows int32, and with the element size nearly int64 (NumPy itself refuses
    views over 2**63 bytes)."""
    n = 2 ** (57 // ndim)
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=(n,) * ndim, strides=(0,) * ndim)


# ------------------------------------------------------------------------- references

def ref_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    var = (x64 * x64).mean(-1, keepdims=True).astype(np.float32)
    return (w * (x * (1.0 / np.sqrt(var + np.float32(eps))))).astype(np.float32)


def ref_linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)


def ref_swiglu(x: np.ndarray, g: np.ndarray, u: np.ndarray, d: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    a = x64 @ g.astype(np.float64).T
    return ((a / (1 + np.exp(-a))) * (x64 @ u.astype(np.float64).T)) @ d.astype(np.float64).T


def ref_rope(x: np.ndarray, pos: np.ndarray, inv: np.ndarray, af: float = 1.0) -> np.ndarray:
    """Interleaved pairs, angle rounded to fp32 (as the kernel and torch)."""
    ang = (pos[:, None].astype(np.float32) * inv[None, :]).astype(np.float32).astype(np.float64)
    c, s = np.cos(ang) * af, np.sin(ang) * af
    out = x.astype(np.float64).copy()
    re, im = out[..., 0::2].copy(), out[..., 1::2].copy()
    shp = (x.shape[0],) + (1,) * (x.ndim - 2) + (inv.shape[0],)
    c, s = c.reshape(shp), s.reshape(shp)
    out[..., 0::2] = re * c - im * s
    out[..., 1::2] = re * s + im * c
    return out


def ref_mla_attention(q: np.ndarray, cache: np.ndarray, seq: np.ndarray, pos: np.ndarray,
                      kv_b: np.ndarray, scale: float, magnitude: bool = False) -> np.ndarray:
    """Non-absorbed MLA attention in float64.  ``magnitude``: sum_j p_j |v_j| instead (the size
    of the terms of each output, the scale of its rounding error when the sum cancels)."""
    T, Hh, dqk = q.shape
    Lr = kv_b.shape[1]
    rope = cache.shape[2] - Lr
    nope = dqk - rope
    v = kv_b.shape[0] // Hh - nope
    out = np.zeros((T, Hh, v))
    kvb = kv_b.astype(np.float64).reshape(Hh, nope + v, Lr)
    for t in range(T):
        rows = cache[seq[t], :pos[t] + 1].astype(np.float64)
        c, kpe = rows[:, :Lr], rows[:, Lr:]
        for h in range(Hh):
            k_nope = c @ kvb[h, :nope].T
            vals = c @ kvb[h, nope:].T
            s = (k_nope @ q[t, h, :nope] + kpe @ q[t, h, nope:]) * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = p @ (np.abs(vals) if magnitude else vals)
    return out


def ref_moe_experts(x: np.ndarray, ids: np.ndarray, w: np.ndarray, experts: List[tuple],
                    shared: Optional[tuple]) -> np.ndarray:
    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            g, u, d = experts[ids[t, j]]
            out[t] += w[t, j] * ref_swiglu(x[t:t + 1], g, u, d)[0]
    if shared is not None:
        out += ref_swiglu(x, *shared)
    return out


def ref_route_greedy_softmax(x: np.ndarray, router: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    logits = ref_linear(x, router).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    return ids, np.take_along_axis(p, ids, -1)


# ------------------------------------------------------------------------- MLA / MoE setups

def mla_config(q_lora: Optional[int] = None) -> ops.MLAConfig:
    inv, af = ops.rope_inv_freq(ROPE)
    return ops.MLAConfig(num_heads=H, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                         kv_lora_rank=L, q_lora_rank=q_lora, softmax_scale=(NOPE + ROPE) ** -0.5,
                         inv_freq=inv, rope_attention_factor=af)


def mla_weights(rng: np.random.Generator, d: int = D, q_lora: Optional[int] = None) -> ops.MLAWeights:
    w = dict(kv_a_proj_with_mqa=f32(rng, L + ROPE, d, scale=d ** -0.5),
             kv_a_layernorm=(1 + 0.1 * rng.standard_normal(L)).astype(np.float32),
             kv_b_proj=f32(rng, H * (NOPE + V), L, scale=L ** -0.5),
             o_proj=f32(rng, d, H * V, scale=(H * V) ** -0.5))
    if q_lora:
        w.update(q_a_proj=f32(rng, q_lora, d, scale=d ** -0.5),
                 q_a_layernorm=(1 + 0.1 * rng.standard_normal(q_lora)).astype(np.float32),
                 q_b_proj=f32(rng, H * (NOPE + ROPE), q_lora, scale=q_lora ** -0.5))
    else:
        w.update(q_proj=f32(rng, H * (NOPE + ROPE), d, scale=d ** -0.5))
    return ops.MLAWeights(**w)


def filled_cache(rng: np.random.Generator) -> np.ndarray:
    return f32(rng, B, S_MAX, L + ROPE)


def moe_weights(rng: np.random.Generator, d: int = D) -> Dict[str, Any]:
    experts = [(f32(rng, I, d, scale=d ** -0.5), f32(rng, I, d, scale=d ** -0.5), f32(rng, d, I, scale=I ** -0.5))
               for _ in range(E)]
    shared = (f32(rng, IS, d, scale=d ** -0.5), f32(rng, IS, d, scale=d ** -0.5), f32(rng, d, IS, scale=IS ** -0.5))
    return dict(router=f32(rng, E, d, scale=d ** -0.5), experts=experts, shared=shared,
                cfg=ops.MoEConfig(n_routed_experts=E, num_experts_per_tok=K))


# ------------------------------------------------------------------------- raw _C calls

@dataclass
class RawCall:
    """A valid call of a raw ``dsv2ext._C`` function: ``fn(*args)``."""

    name: str
    args: List[Any]
    restore: Optional[Callable[[], None]] = None
    notes: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, args: Optional[List[Any]] = None) -> Any:
        return getattr(_C, self.name)(*(self.args if args is None else args))


def raw_calls(seed: int = 0, T: int = 3) -> List[RawCall]:
    """One valid call of every _C function (fresh arrays each time)."""
    rng = np.random.default_rng(seed)
    x = f32(rng, T, D)
    nw = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    lw = f32(rng, 16, D, scale=D ** -0.5)
    inv, af = ops.rope_inv_freq(ROPE)
    cfg = mla_config()
    mw = mla_weights(rng)
    cache = filled_cache(rng)
    seq = np.array([0, 1, 0][:T] + [0] * max(0, T - 3), np.int64)
    pos = np.array([S_MAX - 1, 2, 3][:T] + list(range(4, T + 1)), np.int64)
    q = f32(rng, T, H, NOPE + ROPE)
    mo = moe_weights(rng)
    ids = rng.integers(0, E, size=(T, K)).astype(np.int64)
    rw = np.full((T, K), 0.5, np.float32)
    order, offsets = ops.moe_dispatch(ids, E)
    isa = dsv2ext.get_isa()
    nthreads = dsv2ext.get_num_threads()
    calls = [
        RawCall("rmsnorm", [np.empty((T, D), np.float32), x, nw, 1e-6]),
        RawCall("rmsnorm", [np.empty((T, D), np.float32), x.copy(), nw, 1e-6, f32(rng, T, D)]),  # residual
        RawCall("linear", [np.empty((T, 16), np.float32), x, lw]),
        RawCall("set_num_threads", [nthreads], restore=lambda: _C.set_num_threads(nthreads)),
        RawCall("get_num_threads", []),
        RawCall("get_isa", []),
        RawCall("set_isa", [isa], restore=lambda: _C.set_isa(isa)),
        RawCall("scratch_trim", []),
        RawCall("rope_inv_freq", [np.empty(ROPE // 2, np.float32), True, 10000.0, 4.0, 512.0, 32.0, 1.0, 0.707,
                                  0.707, None, True]),
        RawCall("rope_apply", [f32(rng, T, H, ROPE), pos, inv, af, True]),
        RawCall("mla_compress_kv", [np.empty((T, L + ROPE), np.float32), filled_cache(rng), x, seq, pos,
                                    mw.kv_a_proj_with_mqa, mw.kv_a_layernorm, inv, L, 1e-6, af, True]),
        RawCall("mla_attention", [np.empty((T, H, V), np.float32), q, cache, seq, pos, mw.kv_b_proj,
                                  cfg.softmax_scale, 0]),
        RawCall("mla_flops", [True, T, S_MAX, int((pos + 1).sum()), H, NOPE, ROPE, V, L]),
        RawCall("mla_attention_block", [np.empty((T, D), np.float32), x, filled_cache(rng), seq, pos, inv,
                                        mw.q_proj, None, None, None, mw.kv_a_proj_with_mqa, mw.kv_a_layernorm,
                                        mw.kv_b_proj, mw.o_proj, H, NOPE, ROPE, V, L, 0, 1e-6,
                                        cfg.softmax_scale, af, True, 0]),
        RawCall("moe_route", [np.empty((T, K), np.int64), np.empty((T, K), np.float32), x, mo["router"], None,
                              K, 1, 1, "greedy", "softmax", False, 1.0]),
        RawCall("moe_dispatch", [np.empty(E + 1, np.int64), np.empty(T * K, np.int64), ids]),
        RawCall("moe_combine", [np.empty((T, D), np.float32), f32(rng, T * K, D), order, rw, None]),
        RawCall("swiglu_mlp", [np.empty((T, D), np.float32), x, *mo["shared"]]),
        RawCall("moe_experts", [np.empty((T, D), np.float32), x, ids, rw, mo["experts"], None, None, E,
                                mo["shared"]]),
        RawCall("moe_block", [np.empty((T, D), np.float32), x, mo["router"], None, mo["experts"], None, None,
                              mo["shared"], K, 1, 1, "greedy", "softmax", False, 1.0, None, None]),
        RawCall("amx_available", []),
        RawCall("get_amx_emulation", []),
        RawCall("amx_emu_stats", []),
        RawCall("amx_tile_dot", [f32(rng, 16, 16), np.full((16, 32), 0x3F80, np.uint16),
                                 np.full((16, 32), 0x4000, np.uint16), False]),
    ]
    if isa in ("avx512", "amx"):  # the split is AVX-512 code
        calls.append(RawCall("amx_split3", [np.empty((3, D), np.uint16), f32(rng, D)]))
    return calls


# ------------------------------------------------------------------------- wrapper calls

@dataclass
class OpCall:
    """A valid call of an ``dsv2ext.ops`` function: ``fn(*args, **kwargs)``, with its reference."""

    name: str
    fn: Callable[..., Any]
    args: List[Any]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    ref: Optional[Callable[[], np.ndarray]] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        a = list(self.args)
        for i, v in enumerate(args):
            a[i] = v
        return self.fn(*a, **{**self.kwargs, **kwargs})


def op_calls(seed: int = 0, T: int = 3) -> List[OpCall]:
    """One valid call of every ops wrapper that runs a kernel, with a float64 reference."""
    rng = np.random.default_rng(seed)
    x = f32(rng, T, D)
    nw = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    lw = f32(rng, 16, D, scale=D ** -0.5)
    cfg = mla_config()
    mw = mla_weights(rng)
    cache = filled_cache(rng)
    seq = np.array([0, 1, 0][:T] + [0] * max(0, T - 3), np.int64)
    pos = np.array([S_MAX - 1, 2, 3][:T] + list(range(4, T + 1)), np.int64)
    q = f32(rng, T, H, NOPE + ROPE)
    xr = f32(rng, T, H, ROPE)
    xr0 = xr.copy()  # apply_rope rotates in place
    mo = moe_weights(rng)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    rw = rng.random((T, K)).astype(np.float32)
    yo = f32(rng, T * K, D)
    order = rng.permutation(T * K).astype(np.int64)
    attn_ref = lambda: ref_mla_attention(q, cache, seq, pos, mw.kv_b_proj, cfg.softmax_scale)  # noqa: E731

    def combine_ref() -> np.ndarray:
        rows = np.empty(T * K, np.int64)
        rows[order] = np.arange(T * K)
        return (rw[..., None].astype(np.float64) * yo[rows.reshape(T, K)]).sum(1)

    return [
        OpCall("rms_norm", ops.rms_norm, [x, nw, 1e-6], ref=lambda: ref_rms_norm(x, nw, 1e-6)),
        OpCall("linear", ops.linear, [x, lw], ref=lambda: ref_linear(x, lw)),
        OpCall("apply_rope", ops.apply_rope, [xr, pos, cfg.inv_freq], ref=lambda: ref_rope(xr0, pos, cfg.inv_freq)),
        OpCall("mla_attention", ops.mla_attention, [q, cache, seq, pos, mw.kv_b_proj, cfg.softmax_scale],
               ref=attn_ref),
        OpCall("mla_attention_absorbed", ops.mla_attention_absorbed,
               [q, cache, seq, pos, mw.kv_b_proj, cfg.softmax_scale], ref=attn_ref),
        OpCall("mla_attention_decompressed", ops.mla_attention_decompressed,
               [q, cache, seq, pos, mw.kv_b_proj, cfg.softmax_scale], ref=attn_ref),
        OpCall("mla_compress_kv", ops.mla_compress_kv,
               [x, mw.kv_a_proj_with_mqa, mw.kv_a_layernorm, filled_cache(rng), seq, pos, cfg.inv_freq]),
        OpCall("mla_attention_block", ops.mla_attention_block, [x, mw, cfg, filled_cache(rng), seq, pos]),
        OpCall("moe_route", ops.moe_route, [x, mo["router"], mo["cfg"]],
               ref=lambda: ref_route_greedy_softmax(x, mo["router"], K)),
        OpCall("moe_dispatch", ops.moe_dispatch, [ids, E]),
        OpCall("moe_combine", ops.moe_combine, [yo, order, rw], ref=combine_ref),
        OpCall("swiglu_mlp", ops.swiglu_mlp, [x, *mo["shared"]], ref=lambda: ref_swiglu(x, *mo["shared"])),
        OpCall("moe_experts", ops.moe_experts, [x, ids, rw, mo["experts"], mo["shared"]],
               ref=lambda: ref_moe_experts(x, ids, rw, mo["experts"], mo["shared"])),
        OpCall("moe_block", ops.moe_block, [x, mo["router"], mo["experts"], mo["shared"], mo["cfg"]]),
    ]


def tiny_model_dict(**over: Any) -> Dict[str, Any]:
    """config.json of a tiny DeepSeek-V2 (2 layers: dense then MoE), transformers-5 spelling."""
    d: Dict[str, Any] = {
        "model_type": "deepseek_v2", "vocab_size": 64, "hidden_size": D, "intermediate_size": 48,
        "moe_intermediate_size": I, "num_hidden_layers": 2, "num_attention_heads": H, "q_lora_rank": None,
        "kv_lora_rank": L, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V,
        "n_routed_experts": E, "n_shared_experts": 1, "num_experts_per_tok": K, "first_k_dense_replace": 1,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "bos_token_id": 0,
        "eos_token_id": 1, "tie_word_embeddings": False, "hidden_act": "silu",
    }
    d.update(over)
    return d


def tiny_tensors(cfg: "dsv2ext.ModelConfig", seed: int = 0, bf16: bool = False) -> Dict[str, Any]:
    """Random weights of every tensor the config needs (norms near 1, projections ~ 1/sqrt(fan_in))."""
    from dsv2ext.weights import expected_tensors

    rng = np.random.default_rng(seed)
    out: Dict[str, Any] = {}
    for name, shape in expected_tensors(cfg).items():
        if len(shape) == 1:
            w = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w = f32(rng, *shape, scale=shape[-1] ** -0.5)
        out[name] = BF16.from_float32(w) if (bf16 and len(shape) == 2) else w
    return out


def write_tiny_checkpoint(path: str, seed: int = 0, bf16: bool = False, **over: Any) -> Dict[str, Any]:
    """A loadable checkpoint directory (config.json + model.safetensors, no tokenizer)."""
    import json

    from dsv2ext.safetensors import save_file

    d = tiny_model_dict(**over)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    save_file(tiny_tensors(dsv2ext.ModelConfig.from_dict(d), seed, bf16), os.path.join(path, "model.safetensors"))
    return d


def ref_mla_compress(h: np.ndarray, wa: np.ndarray, wn: np.ndarray, pos: np.ndarray, inv: np.ndarray,
                     kv_lora: int, eps: float) -> np.ndarray:
    """Latent rows [RMSNorm(c_kv) * wn | rope(k_pe)] in float64."""
    kv = h.astype(np.float64) @ wa.astype(np.float64).T
    c = kv[:, :kv_lora]
    c = c / np.sqrt((c * c).mean(-1, keepdims=True) + eps) * wn
    return np.concatenate([c, ref_rope(kv[:, kv_lora:], pos, inv)], axis=1)


def ref_mla_block(h: np.ndarray, w: "ops.MLAWeights", cfg: "ops.MLAConfig", cache: np.ndarray, seq: np.ndarray,
                  pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(out [T, d], the cache after the call) of the MLA block with a plain q_proj, in float64."""
    T = h.shape[0]
    Hh, nope, rope, v = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    rows = ref_mla_compress(h, w.kv_a_proj_with_mqa, w.kv_a_layernorm, pos, cfg.inv_freq, cfg.kv_lora_rank,
                            cfg.rms_norm_eps)
    after = cache.astype(np.float64)
    after[seq, pos] = rows
    q = (h.astype(np.float64) @ w.q_proj.astype(np.float64).T).reshape(T, Hh, nope + rope)
    q[..., nope:] = ref_rope(q[..., nope:], pos, cfg.inv_freq)
    att = ref_mla_attention(q, after, seq, pos, w.kv_b_proj, cfg.softmax_scale)
    return att.reshape(T, Hh * v) @ w.o_proj.astype(np.float64).T, after
