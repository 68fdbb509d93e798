"""PyTorch re-implementations of the kernels, used by the ``"fallback"`` gradient mode.

Each function computes what the corresponding kernel computes (fp32 arithmetic, weights
widened from bfloat16) with differentiable PyTorch operations.  The backward pass of a
dsv2ext op in fallback mode re-runs the matching function here on the saved inputs and
differentiates it (the forward values themselves always come from the C kernel).

Functions taking ``static`` have two formulations with the same result: a sparse one (only
the experts / sequences actually used; eager) and a shape-static one used while
``torch.compile`` traces the backward graph (no data-dependent shapes).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["is_tracing", "rms_norm", "linear", "swiglu_mlp", "rope", "moe_route_weights", "moe_block",
           "mla_compress_kv", "mla_attention", "mla_attention_block"]


def is_tracing(*tensors: Optional[torch.Tensor]) -> bool:
    """True while torch.compile / make_fx traces (fake tensors): use shape-static code."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(t is not None and is_fake(t) for t in tensors)


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in fp32, shape of ``x``."""
    xf = _f(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * _f(weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _f(x) @ _f(weight).T


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    xf = _f(x)
    return (F.silu(xf @ _f(gate).T) * (xf @ _f(up).T)) @ _f(down).T


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
         interleaved: bool) -> torch.Tensor:
    """Rotate the last axis of ``x`` ([T, dim] or [T, H, dim]) at ``positions`` [T]."""
    ang = positions.to(torch.float32)[:, None] * _f(inv_freq)[None, :]
    cos = torch.cos(ang) * attention_factor
    sin = torch.sin(ang) * attention_factor
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    xf = _f(x)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def moe_route_weights(x: torch.Tensor, router_weight: torch.Tensor, ids: torch.Tensor, scoring_func: str,
                      norm_topk_prob: bool, routed_scaling_factor: float) -> torch.Tensor:
    """Routing weights [T, k] of the given (kernel-chosen) experts ``ids`` [T, k]."""
    logits = _f(x) @ _f(router_weight).T
    scores = logits.softmax(-1) if scoring_func == "softmax" else logits.sigmoid()
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor


def moe_block(x: torch.Tensor, router_weight: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              shared_gate: Optional[torch.Tensor], shared_up: Optional[torch.Tensor],
              shared_down: Optional[torch.Tensor], ids: torch.Tensor, scoring_func: str, norm_topk_prob: bool,
              routed_scaling_factor: float, static: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeekMoE block on ``x`` [T, d] with the routing ``ids`` [T, k] -> (out [T, d], weights [T, k])."""
    w = moe_route_weights(x, router_weight, ids, scoring_func, norm_topk_prob, routed_scaling_factor)
    xf = _f(x)
    inter = gate_up_proj.shape[1] // 2
    out = torch.zeros_like(xf)

    def expert(xe: torch.Tensor, e: int) -> torch.Tensor:
        gu = xe @ _f(gate_up_proj[e]).T
        return (F.silu(gu[:, :inter]) * gu[:, inter:]) @ _f(down_proj[e]).T

    if static:
        for e in range(gate_up_proj.shape[0]):
            we = (w * (ids == e)).sum(-1)
            out = out + we[:, None] * expert(xf, e)
    else:
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, expert(xf[tok], e) * w[tok, slot][:, None])
    if shared_gate is not None:
        out = out + swiglu_mlp(xf, shared_gate, shared_up, shared_down)
    return out, w


def mla_compress_kv(hidden: torch.Tensor, kv_a_proj_with_mqa: torch.Tensor, kv_a_layernorm: torch.Tensor,
                    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, eps: float,
                    interleaved: bool) -> torch.Tensor:
    """Latent rows [T, kv_lora + rope] = [RMSNorm(c_kv) | rope(k_pe)]."""
    kv_lora = kv_a_layernorm.shape[0]
    ckv = linear(hidden, kv_a_proj_with_mqa)
    c = rms_norm(ckv[:, :kv_lora], kv_a_layernorm, eps)
    kpe = rope(ckv[:, kv_lora:], positions, inv_freq, attention_factor, interleaved)
    return torch.cat((c, kpe), dim=-1)


def mla_attention(q: torch.Tensor, cache: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
                  kv_b_proj: torch.Tensor, softmax_scale: float, static: bool) -> torch.Tensor:
    """Decompressed-form MLA attention of ``q`` [T, H, nope + rope] over the latent ``cache``
    [B, S, kv_lora + rope]; token t sees rows ``0 .. positions[t]`` of ``cache[seq_ids[t]]``."""
    T, H, dqk = q.shape
    kv_lora = kv_b_proj.shape[1]
    rope_dim = cache.shape[2] - kv_lora
    nope = dqk - rope_dim
    vdim = kv_b_proj.shape[0] // H - nope
    qf = _f(q)
    wkv = _f(kv_b_proj)

    def attend(qs: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = _f(rows)
        kv = (rows[:, :kv_lora] @ wkv.T).view(rows.shape[0], H, nope + vdim)
        scores = (torch.einsum("nhd,shd->hns", qs[..., :nope], kv[..., :nope])
                  + torch.einsum("nhr,sr->hns", qs[..., nope:], rows[:, kv_lora:])) * softmax_scale
        allowed = torch.arange(rows.shape[0], device=rows.device)[None, :] <= pos[:, None]
        p = scores.masked_fill(~allowed[None], float("-inf")).softmax(-1)
        return torch.einsum("hns,shv->nhv", p, kv[..., nope:])

    out = qf.new_zeros((T, H, vdim))
    if static:
        for b in range(cache.shape[0]):
            out = torch.where((seq_ids == b)[:, None, None], attend(qf, positions, cache[b]), out)
    else:
        for b in torch.unique(seq_ids).tolist():
            idx = (seq_ids == b).nonzero().squeeze(1)
            n_ctx = int(positions[idx].max()) + 1
            out = out.index_copy(0, idx, attend(qf[idx], positions[idx], cache[b, :n_ctx]))
    return out


def mla_attention_block(hidden: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
                        q_proj: Optional[torch.Tensor], q_a_proj: Optional[torch.Tensor],
                        q_a_layernorm: Optional[torch.Tensor], q_b_proj: Optional[torch.Tensor],
                        kv_a_proj_with_mqa: torch.Tensor, kv_a_layernorm: torch.Tensor, kv_b_proj: torch.Tensor,
                        o_proj: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, qk_nope_head_dim: int,
                        qk_rope_head_dim: int, eps: float, softmax_scale: float, rope_attention_factor: float,
                        rope_interleave: bool, n_seq: int, max_len: int, static: bool) -> torch.Tensor:
    """The MLA block over tokens whose attended rows all come from the same call.

    ``n_seq`` x ``max_len`` is the size of the latent cache built from this call's rows
    (in the eager formulation only ``max(positions) + 1`` rows are used).
    """
    T = hidden.shape[0]
    if q_proj is not None:
        q = linear(hidden, q_proj)
    else:
        q = linear(rms_norm(linear(hidden, q_a_proj), q_a_layernorm, eps), q_b_proj)
    q = q.view(T, num_heads, qk_nope_head_dim + qk_rope_head_dim)
    q = torch.cat((q[..., :qk_nope_head_dim],
                   rope(q[..., qk_nope_head_dim:], positions, inv_freq, rope_attention_factor, rope_interleave)),
                  dim=-1)
    rows = mla_compress_kv(hidden, kv_a_proj_with_mqa, kv_a_layernorm, positions, inv_freq, rope_attention_factor,
                           eps, rope_interleave)
    if not static:
        max_len = int(positions.max()) + 1
    cache = rows.new_zeros((n_seq, max_len, rows.shape[1])).index_put((seq_ids, positions), rows)
    o = mla_attention(q, cache, seq_ids, positions, kv_b_proj, softmax_scale, static)
    return linear(o.reshape(T, -1), o_proj)
