"""The dsv2ext kernels registered as PyTorch operators (``torch.ops.dsv2ext.*``).

Every operator takes CPU tensors and hands them to the C kernels without copying:
float32 tensors through ``tensor.numpy()``, bfloat16 *weights* through an int16 view wrapped
as :class:`dsv2ext.BF16`.  Activations may be float32, bfloat16 or float16: the kernels
compute in fp32 (non-fp32 activations are widened, a copy) and outputs come back in the
activation's dtype.  Each operator has a fake (meta) implementation, so ``torch.compile``
(``fullgraph=True``) and ``torch.export`` can trace it.

Operators (schemas in ``torch.ops.dsv2ext.<name>.default._schema``):

====================================  ==========================================================
``rms_norm(x, weight, eps)``           RMSNorm over the last axis
``linear(x, weight)``                  ``x @ weight.T``
``swiglu_mlp(x, gate, up, down)``      ``down(silu(gate x) * up x)``
``apply_rope(x, positions, ...)``      RoPE / YaRN rotation (returns a rotated copy)
``moe_route(x, router_weight, ...)``   DeepSeekMoE routing -> (ids int64 [T, k], weights [T, k])
``moe_block(x, router_weight, ...)``   router + routed experts (stacked 3-D weights) + shared
``mla_attention(q, cache, ...)``       MLA attention over a latent cache (reads it)
``mla_compress_kv_(hidden, ..., cache)``  latent rows of new tokens, written into ``cache``
``mla_attention_block_(hidden, cache, ...)``  the whole MLA block; writes ``cache``
====================================  ==========================================================

Gradients (see :mod:`dsv2ext.torch._grad`): the differentiable operators take a trailing
``grad_mode`` string that the Python wrappers fill from :func:`dsv2ext.torch.get_grad_mode`.
``"error"``: backward raises ``RuntimeError``; ``"fallback"``: backward recomputes the op with
PyTorch ops (:mod:`dsv2ext.torch._reference`).  The two in-place operators (``..._``) cannot
carry an autograd formula; their Python wrappers route the result through a functional
"gradient bridge" operator with the same policy, so the kernels' outputs never lose their
``grad_fn`` silently.
"""
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import ops as _ops
from ..ops.mla import MLA_MODES, MLAConfig, MLAWeights
from ..ops.moe import MoEConfig, StackedExperts
from . import _reference as ref
from ._convert import cache_buffer, f32_vector, f32_view, i64_view, opt_weight_view, weight_view
from ._grad import GRAD_MODES, backward_error_message, get_grad_mode

__all__ = ["rms_norm", "linear", "swiglu_mlp", "apply_rope", "moe_route", "moe_block", "mla_attention",
           "mla_compress_kv", "mla_attention_block", "MLA_WEIGHT_NAMES"]

_NS = "dsv2ext"


def _back(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(arr)
    return t if dtype == torch.float32 else t.to(dtype)


def _check_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode: expected one of {GRAD_MODES}, got {grad_mode!r}")


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


# --------------------------------------------------------------------------- autograd policy

@torch.library.custom_op(f"{_NS}::_no_backward", mutates_args=(), device_types="cpu")
def _no_backward(op: str, inputs: List[Tensor]) -> List[Tensor]:
    """Raises: reached when a backward pass runs through a forward-only kernel ("error" mode).

    Its outputs (the would-be gradients) are what the backward returns, so the call can never
    be dropped from a compiled backward graph.
    """
    raise RuntimeError(backward_error_message(op))


@_no_backward.register_fake
def _(op, inputs):
    return [torch.empty_like(t) for t in inputs]


def _register_autograd(op: Any, name: str, reference: Callable[..., Sequence[Optional[Tensor]]],
                       save_outputs: bool = False) -> None:
    """Attach the gradient policy to a functional custom op.

    ``reference(args, outputs, static)`` recomputes the op's outputs with PyTorch ops from the
    full argument list (tensors in place); ``None`` for outputs without a gradient.
    """

    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
        ctx.grad_mode = inputs[-1]
        ctx.tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.args = [None if isinstance(a, Tensor) else a for a in inputs]
        outs = list(output) if isinstance(output, (tuple, list)) else [output]
        ctx.n_out = len(outs)
        saved = [inputs[i] for i in ctx.tensor_pos] + (outs if save_outputs else [])
        ctx.save_for_backward(*saved)

    def backward(ctx: Any, *grads: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        saved = ctx.saved_tensors
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_pos, saved):
            args[i] = t
        outputs = list(saved[len(ctx.tensor_pos):]) if save_outputs else None
        need = [i for i in ctx.tensor_pos if ctx.needs_input_grad[i]]
        result: List[Optional[Tensor]] = [None] * len(args)
        if not need:
            return tuple(result)
        if ctx.grad_mode != "fallback":
            gs = torch.ops.dsv2ext._no_backward(name, [args[i] for i in need])
            for i, g in zip(need, gs):
                result[i] = g
            return tuple(result)
        static = ref.is_tracing(*[a for a in args if isinstance(a, Tensor)])
        with torch.enable_grad():
            leaves = {i: args[i].detach().requires_grad_() for i in need}
            call = [leaves.get(i, a) for i, a in enumerate(args)]
            outs = reference(call, outputs, static)
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
            if pairs:
                gs = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in need],
                                         [g.to(o.dtype) for o, g in pairs], allow_unused=True)
            else:
                gs = (None,) * len(need)
        for i, g in zip(need, gs):
            result[i] = torch.zeros_like(args[i]) if g is None else g.to(args[i].dtype)
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


# --------------------------------------------------------------------------- core ops

@torch.library.custom_op(f"{_NS}::rms_norm", mutates_args=(), device_types="cpu")
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float = 1e-6, grad_mode: str = "error") -> Tensor:
    _check_mode(grad_mode)
    d = x.shape[-1]
    if _rows(x) == 0:
        return x.new_empty(x.shape)
    out = _ops.rms_norm(f32_view(x.reshape(-1, d), "x"), weight_view(weight, "weight"), float(eps))
    return _back(out, x.dtype).view(x.shape)


@_rms_norm_op.register_fake
def _(x, weight, eps=1e-6, grad_mode="error"):
    return x.new_empty(x.shape)


_register_autograd(_rms_norm_op, "rms_norm", lambda a, o, s: [ref.rms_norm(a[0], a[1], a[2])])


@torch.library.custom_op(f"{_NS}::linear", mutates_args=(), device_types="cpu")
def _linear_op(x: Tensor, weight: Tensor, grad_mode: str = "error") -> Tensor:
    _check_mode(grad_mode)
    d = x.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dimensions [N, K], got shape {tuple(weight.shape)}")
    shape = (*x.shape[:-1], weight.shape[0])
    if _rows(x) == 0:
        return x.new_empty(shape)
    out = _ops.linear(f32_view(x.reshape(-1, d), "x"), weight_view(weight, "weight"))
    return _back(out, x.dtype).view(shape)


@_linear_op.register_fake
def _(x, weight, grad_mode="error"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_register_autograd(_linear_op, "linear", lambda a, o, s: [ref.linear(a[0], a[1])])


@torch.library.custom_op(f"{_NS}::swiglu_mlp", mutates_args=(), device_types="cpu")
def _swiglu_op(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, grad_mode: str = "error") -> Tensor:
    _check_mode(grad_mode)
    d = x.shape[-1]
    if _rows(x) == 0:
        return x.new_empty(x.shape)
    out = _ops.swiglu_mlp(f32_view(x.reshape(-1, d), "x"), weight_view(gate, "gate"), weight_view(up, "up"),
                          weight_view(down, "down"))
    return _back(out, x.dtype).view(x.shape)


@_swiglu_op.register_fake
def _(x, gate, up, down, grad_mode="error"):
    return x.new_empty(x.shape)


_register_autograd(_swiglu_op, "swiglu_mlp", lambda a, o, s: [ref.swiglu_mlp(a[0], a[1], a[2], a[3])])


@torch.library.custom_op(f"{_NS}::apply_rope", mutates_args=(), device_types="cpu")
def _apply_rope_op(x: Tensor, positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0,
                   interleaved: bool = True, grad_mode: str = "error") -> Tensor:
    _check_mode(grad_mode)
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected [T, dim] or [T, heads, dim], got shape {tuple(x.shape)}")
    xc = np.array(f32_view(x, "x"), copy=True)
    if x.shape[0]:
        _ops.apply_rope(xc, i64_view(positions, "positions"), f32_vector(inv_freq, "inv_freq"),
                        float(attention_factor), interleaved=bool(interleaved))
    return _back(xc, x.dtype)


@_apply_rope_op.register_fake
def _(x, positions, inv_freq, attention_factor=1.0, interleaved=True, grad_mode="error"):
    return x.new_empty(x.shape)


_register_autograd(_apply_rope_op, "apply_rope", lambda a, o, s: [ref.rope(a[0], a[1], a[2], a[3], a[4])])


# --------------------------------------------------------------------------- MoE

def _moe_cfg(router_weight: Tensor, top_k: int, n_group: int, topk_group: int, topk_method: str,
             scoring_func: str, norm_topk_prob: bool, routed_scaling_factor: float) -> MoEConfig:
    if router_weight.dim() != 2:
        raise ValueError(f"router_weight: expected 2 dimensions [E, d], got shape {tuple(router_weight.shape)}")
    return MoEConfig(n_routed_experts=int(router_weight.shape[0]), num_experts_per_tok=int(top_k),
                     n_group=int(n_group), topk_group=int(topk_group), topk_method=topk_method,
                     scoring_func=scoring_func, norm_topk_prob=bool(norm_topk_prob),
                     routed_scaling_factor=float(routed_scaling_factor))


@torch.library.custom_op(f"{_NS}::moe_route", mutates_args=(), device_types="cpu")
def _moe_route_op(x: Tensor, router_weight: Tensor, correction_bias: Optional[Tensor], top_k: int,
                  n_group: int = 1, topk_group: int = 1, topk_method: str = "greedy",
                  scoring_func: str = "softmax", norm_topk_prob: bool = False,
                  routed_scaling_factor: float = 1.0, grad_mode: str = "error") -> Tuple[Tensor, Tensor]:
    _check_mode(grad_mode)
    cfg = _moe_cfg(router_weight, top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob,
                   routed_scaling_factor)
    T = _rows(x)
    if T == 0:
        return x.new_empty((0, top_k), dtype=torch.int64), x.new_empty((0, top_k), dtype=torch.float32)
    bias = None if correction_bias is None else f32_vector(correction_bias, "correction_bias")
    ids, w = _ops.moe_route(f32_view(x.reshape(T, x.shape[-1]), "x"), weight_view(router_weight, "router_weight"),
                            cfg, bias)
    return torch.from_numpy(ids), torch.from_numpy(w)


@_moe_route_op.register_fake
def _(x, router_weight, correction_bias, top_k, n_group=1, topk_group=1, topk_method="greedy",
      scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, grad_mode="error"):
    T = x.numel() // x.shape[-1]
    return (x.new_empty((T, top_k), dtype=torch.int64), x.new_empty((T, top_k), dtype=torch.float32))


def _route_reference(a: List[Any], o: List[Tensor], static: bool) -> List[Optional[Tensor]]:
    x = a[0].reshape(-1, a[0].shape[-1])
    return [None, ref.moe_route_weights(x, a[1], o[0], a[7], a[8], a[9])]


_register_autograd(_moe_route_op, "moe_route", _route_reference, save_outputs=True)


@torch.library.custom_op(f"{_NS}::moe_block", mutates_args=(), device_types="cpu")
def _moe_block_op(x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                  shared_gate: Optional[Tensor], shared_up: Optional[Tensor], shared_down: Optional[Tensor],
                  correction_bias: Optional[Tensor], top_k: int, n_group: int = 1, topk_group: int = 1,
                  topk_method: str = "greedy", scoring_func: str = "softmax", norm_topk_prob: bool = False,
                  routed_scaling_factor: float = 1.0,
                  grad_mode: str = "error") -> Tuple[Tensor, Tensor, Tensor]:
    _check_mode(grad_mode)
    cfg = _moe_cfg(router_weight, top_k, n_group, topk_group, topk_method, scoring_func, norm_topk_prob,
                   routed_scaling_factor)
    given = [s is not None for s in (shared_gate, shared_up, shared_down)]
    if any(given) and not all(given):
        raise ValueError("shared_gate, shared_up, shared_down: give all three shared-expert weights or none")
    d = x.shape[-1]
    T = _rows(x)
    if T == 0:
        return (x.new_empty(x.shape), x.new_empty((0, top_k), dtype=torch.int64),
                x.new_empty((0, top_k), dtype=torch.float32))
    shared = None
    if all(given):
        shared = (weight_view(shared_gate, "shared_gate"), weight_view(shared_up, "shared_up"),
                  weight_view(shared_down, "shared_down"))
    bias = None if correction_bias is None else f32_vector(correction_bias, "correction_bias")
    experts = StackedExperts(weight_view(gate_up_proj, "gate_up_proj"), weight_view(down_proj, "down_proj"))
    out, ids, w = _ops.moe_block(f32_view(x.reshape(T, d), "x"), weight_view(router_weight, "router_weight"),
                                 experts, shared, cfg, correction_bias=bias, return_routing=True)
    return _back(out, x.dtype).view(x.shape), torch.from_numpy(ids), torch.from_numpy(w)


@_moe_block_op.register_fake
def _(x, router_weight, gate_up_proj, down_proj, shared_gate, shared_up, shared_down, correction_bias, top_k,
      n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
      routed_scaling_factor=1.0, grad_mode="error"):
    T = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((T, top_k), dtype=torch.int64),
            x.new_empty((T, top_k), dtype=torch.float32))


def _moe_reference(a: List[Any], o: List[Tensor], static: bool) -> List[Optional[Tensor]]:
    x = a[0]
    out, w = ref.moe_block(x.reshape(-1, x.shape[-1]), a[1], a[2], a[3], a[4], a[5], a[6], o[1], a[12], a[13],
                           a[14], static)
    return [out.view(x.shape), None, w]


_register_autograd(_moe_block_op, "moe_block", _moe_reference, save_outputs=True)


# --------------------------------------------------------------------------- MLA

def _mode_check(mode: str) -> None:
    if mode not in MLA_MODES:
        raise ValueError(f"mode: expected one of {sorted(MLA_MODES)}, got {mode!r}")


@torch.library.custom_op(f"{_NS}::mla_attention", mutates_args=(), device_types="cpu")
def _mla_attention_op(q: Tensor, cache: Tensor, seq_ids: Tensor, positions: Tensor, kv_b_proj: Tensor,
                      softmax_scale: float, attn_mode: str = "auto", grad_mode: str = "error") -> Tensor:
    _check_mode(grad_mode)
    _mode_check(attn_mode)
    if q.dim() != 3:
        raise ValueError(f"q: expected [T, H, nope + rope], got shape {tuple(q.shape)}")
    out = _ops.mla_attention(f32_view(q, "q"), cache_buffer(cache, "cache"), i64_view(seq_ids, "seq_ids"),
                             i64_view(positions, "positions"), weight_view(kv_b_proj, "kv_b_proj"),
                             float(softmax_scale), attn_mode)
    return _back(out, q.dtype)


def _mla_v_dim(q: Tensor, cache: Tensor, kv_b_proj: Tensor) -> int:
    nope = q.shape[2] - (cache.shape[2] - kv_b_proj.shape[1])
    return kv_b_proj.shape[0] // q.shape[1] - nope


@_mla_attention_op.register_fake
def _(q, cache, seq_ids, positions, kv_b_proj, softmax_scale, attn_mode="auto", grad_mode="error"):
    return q.new_empty((q.shape[0], q.shape[1], _mla_v_dim(q, cache, kv_b_proj)))


_register_autograd(_mla_attention_op, "mla_attention",
                   lambda a, o, s: [ref.mla_attention(a[0], a[1], a[2], a[3], a[4], a[5], s)])


@torch.library.custom_op(f"{_NS}::mla_compress_kv_", mutates_args=("cache",), device_types="cpu")
def _mla_compress_op(hidden: Tensor, kv_a_proj_with_mqa: Tensor, kv_a_layernorm: Tensor, cache: Tensor,
                     seq_ids: Tensor, positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0,
                     eps: float = 1e-6, interleaved: bool = True) -> Tensor:
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [T, d], got shape {tuple(hidden.shape)}")
    rows = _ops.mla_compress_kv(f32_view(hidden, "hidden"), weight_view(kv_a_proj_with_mqa, "kv_a_proj_with_mqa"),
                                weight_view(kv_a_layernorm, "kv_a_layernorm"), cache_buffer(cache, "cache"),
                                i64_view(seq_ids, "seq_ids"), i64_view(positions, "positions"),
                                f32_vector(inv_freq, "inv_freq"), float(attention_factor), eps=float(eps),
                                interleaved=bool(interleaved))
    return torch.from_numpy(rows)


@_mla_compress_op.register_fake
def _(hidden, kv_a_proj_with_mqa, kv_a_layernorm, cache, seq_ids, positions, inv_freq, attention_factor=1.0,
      eps=1e-6, interleaved=True):
    return hidden.new_empty((hidden.shape[0], cache.shape[2]), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::_mla_compress_kv_grad", mutates_args=(), device_types="cpu")
def _mla_compress_bridge(rows: Tensor, hidden: Tensor, kv_a_proj_with_mqa: Tensor, kv_a_layernorm: Tensor,
                         positions: Tensor, inv_freq: Tensor, attention_factor: float, eps: float,
                         interleaved: bool, grad_mode: str = "error") -> Tensor:
    """Gradient bridge of ``mla_compress_kv_``: returns ``rows`` (a copy) with the op's autograd policy."""
    _check_mode(grad_mode)
    return rows.clone()


@_mla_compress_bridge.register_fake
def _(rows, hidden, kv_a_proj_with_mqa, kv_a_layernorm, positions, inv_freq, attention_factor, eps, interleaved,
      grad_mode="error"):
    return torch.empty_like(rows)


_register_autograd(_mla_compress_bridge, "mla_compress_kv_",
                   lambda a, o, s: [ref.mla_compress_kv(a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8])])


@torch.library.custom_op(f"{_NS}::mla_attention_block_", mutates_args=("cache",), device_types="cpu")
def _mla_block_op(hidden: Tensor, cache: Tensor, seq_ids: Tensor, positions: Tensor, q_proj: Optional[Tensor],
                  q_a_proj: Optional[Tensor], q_a_layernorm: Optional[Tensor], q_b_proj: Optional[Tensor],
                  kv_a_proj_with_mqa: Tensor, kv_a_layernorm: Tensor, kv_b_proj: Tensor, o_proj: Tensor,
                  inv_freq: Tensor, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                  kv_lora_rank: int, eps: float = 1e-6, softmax_scale: float = 1.0,
                  rope_attention_factor: float = 1.0, rope_interleave: bool = True,
                  attn_mode: str = "auto") -> Tensor:
    _mode_check(attn_mode)
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [T, d], got shape {tuple(hidden.shape)}")
    if hidden.shape[0] == 0:
        return hidden.new_empty(hidden.shape)
    cfg = MLAConfig(num_heads=int(num_heads), qk_nope_head_dim=int(qk_nope_head_dim),
                    qk_rope_head_dim=int(qk_rope_head_dim), v_head_dim=int(v_head_dim),
                    kv_lora_rank=int(kv_lora_rank), q_lora_rank=None if q_a_proj is None else int(q_a_proj.shape[0]),
                    softmax_scale=float(softmax_scale), inv_freq=f32_vector(inv_freq, "inv_freq"),
                    rope_attention_factor=float(rope_attention_factor), rms_norm_eps=float(eps),
                    rope_interleave=bool(rope_interleave))
    w = MLAWeights(kv_a_proj_with_mqa=weight_view(kv_a_proj_with_mqa, "kv_a_proj_with_mqa"),
                   kv_a_layernorm=weight_view(kv_a_layernorm, "kv_a_layernorm"),
                   kv_b_proj=weight_view(kv_b_proj, "kv_b_proj"), o_proj=weight_view(o_proj, "o_proj"),
                   q_proj=opt_weight_view(q_proj, "q_proj"), q_a_proj=opt_weight_view(q_a_proj, "q_a_proj"),
                   q_a_layernorm=opt_weight_view(q_a_layernorm, "q_a_layernorm"),
                   q_b_proj=opt_weight_view(q_b_proj, "q_b_proj"))
    out = _ops.mla_attention_block(f32_view(hidden, "hidden"), w, cfg, cache_buffer(cache, "cache"),
                                   i64_view(seq_ids, "seq_ids"), i64_view(positions, "positions"), attn_mode)
    return _back(out, hidden.dtype)


@_mla_block_op.register_fake
def _(hidden, cache, seq_ids, positions, q_proj, q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
      kv_a_layernorm, kv_b_proj, o_proj, inv_freq, num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
      kv_lora_rank, eps=1e-6, softmax_scale=1.0, rope_attention_factor=1.0, rope_interleave=True,
      attn_mode="auto"):
    return hidden.new_empty(hidden.shape)


def _check_self_contained(seq_ids: Tensor, positions: Tensor) -> None:
    """Fallback gradients of the MLA block need every attended row produced in the same call."""
    s = seq_ids.numpy().astype(np.int64)
    p = positions.numpy().astype(np.int64)
    if s.size == 0:
        return
    pairs = np.unique(np.stack([s, p], 1), axis=0)
    bad = []
    for sid in np.unique(pairs[:, 0]):
        pos = pairs[pairs[:, 0] == sid, 1]
        if pos.size != int(pos.max()) + 1:
            bad.append(int(sid))
    if bad:
        raise RuntimeError(
            "dsv2ext::mla_attention_block_: the 'fallback' gradient mode needs every latent row a token attends "
            "to to be computed in the same call, but tokens of sequence(s) "
            f"{bad[:8]} attend to rows cached by an earlier call (their dependence on earlier inputs is not "
            "recorded by autograd, and dropping it would silently detach the gradient). Run the whole sequence "
            "in one forward without a past cache (e.g. model(input_ids, use_cache=False)) to train.")


@torch.library.custom_op(f"{_NS}::_mla_attention_block_grad", mutates_args=(), device_types="cpu")
def _mla_block_bridge(out: Tensor, hidden: Tensor, seq_ids: Tensor, positions: Tensor, q_proj: Optional[Tensor],
                      q_a_proj: Optional[Tensor], q_a_layernorm: Optional[Tensor], q_b_proj: Optional[Tensor],
                      kv_a_proj_with_mqa: Tensor, kv_a_layernorm: Tensor, kv_b_proj: Tensor, o_proj: Tensor,
                      inv_freq: Tensor, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                      eps: float, softmax_scale: float, rope_attention_factor: float, rope_interleave: bool,
                      n_seq: int, max_len: int, grad_mode: str = "error") -> Tensor:
    """Gradient bridge of ``mla_attention_block_``: returns ``out`` (a copy) with the op's autograd policy."""
    _check_mode(grad_mode)
    if grad_mode == "fallback":
        _check_self_contained(seq_ids, positions)
    return out.clone()


@_mla_block_bridge.register_fake
def _(out, hidden, seq_ids, positions, q_proj, q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
      kv_a_layernorm, kv_b_proj, o_proj, inv_freq, num_heads, qk_nope_head_dim, qk_rope_head_dim, eps,
      softmax_scale, rope_attention_factor, rope_interleave, n_seq, max_len, grad_mode="error"):
    return torch.empty_like(out)


def _block_reference(a: List[Any], o: Any, static: bool) -> List[Optional[Tensor]]:
    return [ref.mla_attention_block(*a[1:22], static).to(a[1].dtype)]


_register_autograd(_mla_block_bridge, "mla_attention_block_", _block_reference)


# --------------------------------------------------------------------------- Python API

def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _inv_freq_tensor(inv_freq: Union[Tensor, np.ndarray]) -> Tensor:
    return inv_freq if isinstance(inv_freq, Tensor) else torch.from_numpy(np.ascontiguousarray(inv_freq))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis: ``x * rsqrt(mean(x^2) + eps) * weight`` (fp32 arithmetic).

    Parameters
    ----------
    x : Tensor [..., d], float32 / bfloat16 / float16
    weight : Tensor [d], float32 or bfloat16 (not copied)
    eps : float

    Returns
    -------
    Tensor [..., d], dtype of ``x``
    """
    return torch.ops.dsv2ext.rms_norm(x, weight, float(eps), get_grad_mode())


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` (a bias-free ``nn.Linear``).

    Parameters
    ----------
    x : Tensor [..., K]
    weight : Tensor [N, K], float32 or bfloat16 (not copied)

    Returns
    -------
    Tensor [..., N], dtype of ``x``
    """
    return torch.ops.dsv2ext.linear(x, weight, get_grad_mode())


def swiglu_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU MLP ``down(silu(x @ gate.T) * (x @ up.T))`` (dense layers, shared experts).

    Parameters
    ----------
    x : Tensor [..., d]
    gate, up : Tensor [I, d]; down : Tensor [d, I] (float32 or bfloat16)

    Returns
    -------
    Tensor [..., d], dtype of ``x``
    """
    return torch.ops.dsv2ext.swiglu_mlp(x, gate, up, down, get_grad_mode())


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Union[Tensor, np.ndarray], attention_factor: float = 1.0,
               interleaved: bool = True) -> Tensor:
    """Rotary embedding (RoPE / YaRN tables from :func:`dsv2ext.ops.rope_inv_freq`) of ``x``.

    Parameters
    ----------
    x : Tensor [T, dim] or [T, heads, dim]
    positions : Tensor int64 [T]
    inv_freq : Tensor or ndarray float32 [dim // 2]
    attention_factor : float
    interleaved : bool
        Pairs ``(2i, 2i+1)`` (DeepSeek) or ``(i, i + dim/2)``.

    Returns
    -------
    Tensor, the rotated copy of ``x`` (same shape and dtype)
    """
    return torch.ops.dsv2ext.apply_rope(x, positions, _inv_freq_tensor(inv_freq), float(attention_factor),
                                        bool(interleaved), get_grad_mode())


def _moe_args(cfg: MoEConfig) -> tuple:
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg: expected a dsv2ext.ops.MoEConfig, got {type(cfg).__name__}")
    return (int(cfg.num_experts_per_tok), int(cfg.n_group), int(cfg.topk_group), cfg.topk_method,
            cfg.scoring_func, bool(cfg.norm_topk_prob), float(cfg.routed_scaling_factor))


def moe_route(x: Tensor, router_weight: Tensor, cfg: MoEConfig,
              correction_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """DeepSeekMoE routing (greedy / group_limited_greedy / noaux_tc, see :class:`MoEConfig`).

    Parameters
    ----------
    x : Tensor [T, d] (or [..., d])
    router_weight : Tensor [E, d]
    cfg : dsv2ext.ops.MoEConfig
    correction_bias : Tensor [E], optional (``noaux_tc``)

    Returns
    -------
    ids : Tensor int64 [T, k]
    weights : Tensor float32 [T, k] (differentiable in "fallback" mode)
    """
    return torch.ops.dsv2ext.moe_route(x, router_weight, correction_bias, *_moe_args(cfg), get_grad_mode())


def moe_block(x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
              shared: Optional[Sequence[Tensor]] = None, cfg: Optional[MoEConfig] = None,
              correction_bias: Optional[Tensor] = None, *,
              return_routing: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """One DeepSeekMoE block (router + routed experts + shared experts).

    Parameters
    ----------
    x : Tensor [..., d]
    router_weight : Tensor [E, d]
    gate_up_proj : Tensor [E, 2I, d]
        transformers-5 fused experts (gate rows then up rows), not copied.
    down_proj : Tensor [E, d, I]
    shared : (gate [Is, d], up [Is, d], down [d, Is]), optional
    cfg : dsv2ext.ops.MoEConfig (required)
    correction_bias : Tensor [E], optional
    return_routing : bool
        Also return ``(ids [T, k] int64, weights [T, k] float32)``.

    Returns
    -------
    Tensor [..., d] (dtype of ``x``), or ``(out, ids, weights)``.
    """
    if cfg is None:
        raise TypeError("cfg: a dsv2ext.ops.MoEConfig is required")
    sg = su = sd = None
    if shared is not None:
        if len(shared) != 3:
            raise ValueError("shared: expected (gate_proj, up_proj, down_proj)")
        sg, su, sd = shared
    out, ids, w = torch.ops.dsv2ext.moe_block(x, router_weight, gate_up_proj, down_proj, sg, su, sd, correction_bias,
                                              *_moe_args(cfg), get_grad_mode())
    return (out, ids, w) if return_routing else out


def mla_attention(q: Tensor, cache: Tensor, seq_ids: Tensor, positions: Tensor, kv_b_proj: Tensor,
                  softmax_scale: float, mode: str = "auto") -> Tensor:
    """MLA attention over a latent cache (see :func:`dsv2ext.ops.mla_attention`); reads ``cache``.

    Parameters
    ----------
    q : Tensor [T, H, nope + rope] (``q_pe`` already rotated)
    cache : Tensor float32 or bfloat16 [B, S, kv_lora + rope] (fp32 or bfloat16 latent rows)
    seq_ids, positions : Tensor int64 [T]
    kv_b_proj : Tensor [H * (nope + v), kv_lora]
    softmax_scale : float
    mode : {"auto", "absorbed", "decompressed"}

    Returns
    -------
    Tensor [T, H, v], dtype of ``q``
    """
    return torch.ops.dsv2ext.mla_attention(q, cache, seq_ids, positions, kv_b_proj, float(softmax_scale), mode,
                                           get_grad_mode())


def mla_compress_kv(hidden: Tensor, kv_a_proj_with_mqa: Tensor, kv_a_layernorm: Tensor, cache: Tensor,
                    seq_ids: Tensor, positions: Tensor, inv_freq: Union[Tensor, np.ndarray],
                    attention_factor: float = 1.0, *, eps: float = 1e-6, interleaved: bool = True) -> Tensor:
    """Latent rows of ``T`` new tokens, written into ``cache[seq_ids, positions]`` and returned.

    Parameters
    ----------
    hidden : Tensor [T, d] (after ``input_layernorm``)
    kv_a_proj_with_mqa : Tensor [kv_lora + rope, d]; kv_a_layernorm : Tensor [kv_lora]
    cache : Tensor float32 or bfloat16 [B, S, kv_lora + rope], written in place
    seq_ids, positions : Tensor int64 [T]
    inv_freq : Tensor or ndarray float32 [rope // 2]
    attention_factor, eps, interleaved : see :func:`dsv2ext.ops.mla_compress_kv`

    Returns
    -------
    Tensor float32 [T, kv_lora + rope]
    """
    inv = _inv_freq_tensor(inv_freq)
    grad = _wants_grad(hidden, kv_a_proj_with_mqa, kv_a_layernorm)
    args = (hidden, kv_a_proj_with_mqa, kv_a_layernorm)
    rows = torch.ops.dsv2ext.mla_compress_kv_(*(a.detach() for a in args) if grad else args, cache, seq_ids,
                                              positions, inv, float(attention_factor), float(eps), bool(interleaved))
    if grad:
        rows = torch.ops.dsv2ext._mla_compress_kv_grad(rows, hidden, kv_a_proj_with_mqa, kv_a_layernorm, positions,
                                                       inv, float(attention_factor), float(eps), bool(interleaved),
                                                       get_grad_mode())
    return rows


MLA_WEIGHT_NAMES = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                    "kv_b_proj", "o_proj")


def _mla_weight_tuple(weights: Any) -> Tuple[Optional[Tensor], ...]:
    if isinstance(weights, Mapping):
        get = weights.get
    else:
        get = lambda k: getattr(weights, k, None)  # noqa: E731
    return tuple(get(k) for k in MLA_WEIGHT_NAMES)


def mla_attention_block(hidden: Tensor, weights: Any, cfg: MLAConfig, cache: Tensor, seq_ids: Tensor,
                        positions: Tensor, mode: str = "auto") -> Tensor:
    """The whole MLA block (see :func:`dsv2ext.ops.mla_attention_block`); writes ``cache``.

    Parameters
    ----------
    hidden : Tensor [T, d] (after ``input_layernorm``)
    weights : mapping or object with tensors ``q_proj`` (or ``q_a_proj``, ``q_a_layernorm``,
        ``q_b_proj``), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``
        (HF names, ``[out, in]``; float32 or bfloat16, not copied)
    cfg : dsv2ext.ops.MLAConfig
    cache : Tensor float32 or bfloat16 [B, S, kv_lora + rope], written in place (row of token t at
        ``cache[seq_ids[t], positions[t]]``)
    seq_ids, positions : Tensor int64 [T]
    mode : {"auto", "absorbed", "decompressed"}

    Returns
    -------
    Tensor [T, d], dtype of ``hidden``

    Gradients: in "fallback" mode every row a token attends to must come from this call.
    """
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"cfg: expected a dsv2ext.ops.MLAConfig, got {type(cfg).__name__}")
    ws = _mla_weight_tuple(weights)
    inv = _inv_freq_tensor(cfg.inv_freq)
    dims = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim)
    scal = (float(cfg.rms_norm_eps), float(cfg.softmax_scale), float(cfg.rope_attention_factor),
            bool(cfg.rope_interleave))
    grad = _wants_grad(hidden, *ws)
    kw = [None if w is None else (w.detach() if grad else w) for w in ws]
    out = torch.ops.dsv2ext.mla_attention_block_(hidden.detach() if grad else hidden, cache, seq_ids, positions,
                                                 *kw, inv, *dims, cfg.v_head_dim, cfg.kv_lora_rank, *scal, mode)
    if grad:
        out = torch.ops.dsv2ext._mla_attention_block_grad(out, hidden, seq_ids, positions, *ws, inv, *dims, *scal,
                                                          int(cache.shape[0]), int(cache.shape[1]),
                                                          get_grad_mode())
    return out
