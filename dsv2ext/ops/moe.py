"""DeepSeekMoE kernels: router, dispatch / combine, SwiGLU MLP, MoE block.

A DeepSeekMoE feed-forward block computes, for each token ``x_t``::

    out_t = sum_j w[t, j] * expert_{ids[t, j]}(x_t) + shared(x_t)
    expert(x) = down(silu(gate(x)) * up(x))          # SwiGLU MLP

with the routing ``(ids, w)`` given by :func:`moe_route` (see
:class:`MoEConfig` for the three routing rules of the family).

Conventions: activations are float32, C-contiguous, aligned NumPy arrays;
weights are float32 arrays, :class:`dsv2ext.BF16` (bfloat16 bits), int8 or FP8 weights
(``dsv2ext.quant.Int8Weight``, :class:`dsv2ext.Fp8Weight`; not for the router), in the
``torch.nn.Linear`` layout ``[out, in]``; they are never copied or converted.
Expert weights come either per expert (``gate_proj [I, d]``, ``up_proj [I, d]``,
``down_proj [d, I]``, e.g. memory-mapped checkpoint tensors) or stacked in the
transformers-5 layout (:class:`StackedExperts`: ``gate_up_proj [E, 2I, d]``
holding the gate rows ``[0, I)`` then the up rows ``[I, 2I)``, and
``down_proj [E, d, I]``).  The GIL is released while the kernels run.
Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument before
any kernel runs.

NaN / Inf policy: routing is undefined for NaN / Inf router logits, so
:func:`moe_route` and :func:`moe_block` raise :class:`NonFiniteError` (a
``ValueError`` and a ``FloatingPointError``) when any logit is not finite
(nothing is written to ``out``); a non-finite ``correction_bias`` or
``routed_scaling_factor`` is a ``ValueError``.  NaN / Inf in expert weights,
in :func:`swiglu_mlp` / :func:`moe_experts` / :func:`moe_combine` inputs, or in
the activations of a token that routes normally simply propagate to that
token's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._native import _C
from ._util import Weight, check_f32, new_out

NonFiniteError = _C.NonFiniteError

__all__ = [
    "NonFiniteError",
    "MoEConfig",
    "StackedExperts",
    "ExpertTable",
    "moe_expert_table",
    "moe_route",
    "moe_dispatch",
    "moe_combine",
    "swiglu_mlp",
    "moe_experts",
    "moe_block",
]

_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_SCORING = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """Routing configuration of a DeepSeekMoE layer (names as in the HF configs).

    Parameters
    ----------
    n_routed_experts : int
        E, the number of routed experts.
    num_experts_per_tok : int
        k, experts chosen per token.
    n_group : int
        Number of contiguous expert groups (group methods only; must divide E).
    topk_group : int
        Groups kept per token (group methods only).
    topk_method : {"greedy", "group_limited_greedy", "noaux_tc"}
        ``greedy``: top-k of the scores (V2-Lite).
        ``group_limited_greedy``: group score = max score in the group, keep the
        ``topk_group`` best groups, top-k among their experts (V2, V2.5).
        ``noaux_tc``: selection on ``score + correction_bias``; group score = sum
        of the 2 best biased scores of the group; dropped groups can never be
        chosen; the weights are the *unbiased* scores (V3).
    scoring_func : {"softmax", "sigmoid"}
        Scores from the fp32 router logits.
    norm_topk_prob : bool
        Divide the k weights of a token by their sum (+1e-20).  Note:
        transformers' ``DeepseekV2Moe`` ignores this flag (all official V2
        configs set it to False); DeepSeek's own code and V3 honour it, and so
        does dsv2ext.
    routed_scaling_factor : float
        Multiplies the weights (after the normalisation).

    Ties between exactly equal scores are resolved towards the lower expert
    (group) index.  torch.topk resolves them in an unspecified order, so on
    exact ties the chosen experts may differ from transformers'.
    """

    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for f in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"MoEConfig.{f}: expected an int, got {type(v).__name__}")
        E, k = int(self.n_routed_experts), int(self.num_experts_per_tok)
        if E < 1:
            raise ValueError(f"MoEConfig.n_routed_experts: expected >= 1, got {E}")
        if not 1 <= k <= E:
            raise ValueError(f"MoEConfig.num_experts_per_tok: expected 1 <= top_k <= n_routed_experts ({E}), got {k}")
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(f"MoEConfig.topk_method: expected one of {_TOPK_METHODS}, got {self.topk_method!r}")
        if self.scoring_func not in _SCORING:
            raise ValueError(f"MoEConfig.scoring_func: expected one of {_SCORING}, got {self.scoring_func!r}")
        if not isinstance(self.norm_topk_prob, (bool, np.bool_)):
            raise TypeError(f"MoEConfig.norm_topk_prob: expected a bool, got {type(self.norm_topk_prob).__name__}")
        s = self.routed_scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating, np.integer)) or not np.isfinite(s):
            raise ValueError(f"MoEConfig.routed_scaling_factor: expected a finite number, got {s!r}")
        if self.topk_method != "greedy":
            G, kg = int(self.n_group), int(self.topk_group)
            if G < 1 or E % G:
                raise ValueError(f"MoEConfig.n_group: the number of routed experts ({E}) must be divisible by "
                                 f"n_group ({G} >= 1)")
            if not 1 <= kg <= G:
                raise ValueError(f"MoEConfig.topk_group: expected 1 <= topk_group <= n_group ({G}), got {kg}")
            per = E // G
            if k > kg * per:
                raise ValueError(f"MoEConfig.num_experts_per_tok: top_k ({k}) is larger than the number of experts "
                                 f"in the kept groups (topk_group {kg} x {per} experts per group = {kg * per})")
            if self.topk_method == "noaux_tc" and per < 2:
                raise ValueError(f"MoEConfig.n_group: 'noaux_tc' scores a group by its 2 best experts, so each "
                                 f"group needs >= 2 experts (got {per})")

    @classmethod
    def from_hf(cls, config: Any) -> "MoEConfig":
        """Build from a transformers config object or a ``config.json`` dict.

        V3-style configs written by transformers 5 carry no ``topk_method`` /
        ``scoring_func``: ``model_type == "deepseek_v3"`` then means sigmoid +
        ``noaux_tc``; otherwise the V2 defaults (softmax, greedy) apply.

        Parameters
        ----------
        config : transformers.PretrainedConfig or Mapping[str, Any]

        Returns
        -------
        MoEConfig
        """
        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        v3 = get("model_type") == "deepseek_v3"
        E = get("n_routed_experts")
        k = get("num_experts_per_tok")
        if E is None or k is None:
            raise ValueError("config: n_routed_experts and num_experts_per_tok are required for a MoE layer")
        return cls(
            n_routed_experts=int(E),
            num_experts_per_tok=int(k),
            n_group=int(get("n_group") or 1),
            topk_group=int(get("topk_group") or 1),
            topk_method=get("topk_method") or ("noaux_tc" if v3 else "greedy"),
            scoring_func=get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            norm_topk_prob=bool(get("norm_topk_prob") or False),
            routed_scaling_factor=float(get("routed_scaling_factor") if get("routed_scaling_factor") is not None
                                        else 1.0),
        )

    def _args(self) -> tuple:
        return (int(self.num_experts_per_tok), int(self.n_group), int(self.topk_group), self.topk_method,
                self.scoring_func, bool(self.norm_topk_prob), float(self.routed_scaling_factor))


@dataclass(frozen=True)
class StackedExperts:
    """Routed-expert weights stacked as in transformers 5 (not copied).

    Parameters
    ----------
    gate_up_proj : np.ndarray float32 or BF16, shape [E, 2I, d]
        Rows ``[0, I)`` of each expert are ``gate_proj``, rows ``[I, 2I)`` ``up_proj``
        (transformers' ``gate, up = linear(x, gate_up_proj[e]).chunk(2, -1)``).
    down_proj : np.ndarray float32 or BF16, shape [E, d, I]
    """

    gate_up_proj: Weight
    down_proj: Weight


MLPWeights = Union[Tuple[Weight, Weight, Weight], Mapping[str, Weight]]


class ExpertTable:
    """Routed-expert weights checked and parsed once (see :func:`moe_expert_table`).

    Passing a table instead of the weights saves the per-call argument
    checks of E x 3 weights (~100 us per call for 64 experts); the table
    keeps the weight objects alive.

    Attributes
    ----------
    n_experts : int
        E.
    hidden_size, intermediate_size : int
        d and I of every expert.
    """

    __slots__ = ("_cap", "n_experts", "hidden_size", "intermediate_size")

    def __init__(self, cap: Any, n_experts: int, hidden_size: int, intermediate_size: int) -> None:
        self._cap = cap
        self.n_experts = n_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size

    def __len__(self) -> int:
        return self.n_experts

    def __repr__(self) -> str:
        return (f"ExpertTable(n_experts={self.n_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size})")


ExpertWeights = Union[StackedExperts, Mapping[str, Weight], Sequence[MLPWeights], ExpertTable]


def _mlp_triple(m: Any, name: str) -> tuple:
    if isinstance(m, Mapping):
        try:
            return (m["gate_proj"], m["up_proj"], m["down_proj"])
        except KeyError as e:
            raise ValueError(f"{name}: expected keys 'gate_proj', 'up_proj', 'down_proj', missing {e}") from None
    if isinstance(m, (tuple, list)):
        return tuple(m)
    raise TypeError(f"{name}: expected a (gate_proj, up_proj, down_proj) tuple, got {type(m).__name__}")


def _experts_args(experts: Any) -> tuple:
    """-> (per-expert list or table or None, gate_up_proj or None, down_proj or None)"""
    if isinstance(experts, ExpertTable):
        return experts._cap, None, None
    if isinstance(experts, StackedExperts):
        return None, experts.gate_up_proj, experts.down_proj
    if isinstance(experts, Mapping):
        if "gate_up_proj" in experts and "down_proj" in experts:
            return None, experts["gate_up_proj"], experts["down_proj"]
        raise ValueError("experts: a mapping must hold the stacked 'gate_up_proj' [E, 2I, d] and "
                         "'down_proj' [E, d, I]")
    if isinstance(experts, (list, tuple)):
        return [_mlp_triple(m, f"experts[{i}]") for i, m in enumerate(experts)], None, None
    raise TypeError("experts: expected a StackedExperts, a {'gate_up_proj', 'down_proj'} mapping or a list of "
                    f"per-expert (gate_proj, up_proj, down_proj), got {type(experts).__name__}")


def moe_expert_table(experts: ExpertWeights) -> ExpertTable:
    """Check and parse the routed experts once, for repeated :func:`moe_block` /
    :func:`moe_experts` calls (decode).

    Parameters
    ----------
    experts : StackedExperts | mapping | sequence of E (gate_proj, up_proj, down_proj)
        As :func:`moe_block` takes them.  The weights are not copied; they must
        not be modified while the table is in use.

    Returns
    -------
    ExpertTable
    """
    if isinstance(experts, ExpertTable):
        return experts
    lst, gu, dn = _experts_args(experts)
    n = len(lst) if lst is not None else int(getattr(gu, "shape", (0,))[0])
    cap = _C.moe_expert_table(lst, gu, dn, n)
    if lst is not None:
        d, inter = lst[0][0].shape[1], lst[0][0].shape[0]
    else:
        d, inter = gu.shape[2], gu.shape[1] // 2
    return ExpertTable(cap, n, int(d), int(inter))


def _shared_arg(shared: Any) -> Optional[tuple]:
    return None if shared is None else _mlp_triple(shared, "shared")


def _check_cfg(cfg: Any) -> "MoEConfig":
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
    return cfg


def moe_route(x: np.ndarray, router_weight: Weight, cfg: MoEConfig,
              correction_bias: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Route tokens to experts (transformers' ``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter``).

    ``logits = x @ router_weight.T`` in fp32 (a BF16 router weight is widened
    exactly, as transformers' ``.type(torch.float32)``), then scoring and
    top-k selection as described in :class:`MoEConfig`.

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, d]
    router_weight : np.ndarray float32 or BF16, shape [E, d]
    cfg : MoEConfig
        ``cfg.n_routed_experts`` must equal E.
    correction_bias : np.ndarray, float32, shape [E], optional
        ``e_score_correction_bias`` (``noaux_tc`` only; None means zeros).  Must be finite.

    Returns
    -------
    ids : np.ndarray, int64, shape [T, k]
        Chosen experts per token, by decreasing selection score.
    weights : np.ndarray, float32, shape [T, k]
        Their weights (unbiased scores, normalised if ``norm_topk_prob``, times
        ``routed_scaling_factor``).

    Raises
    ------
    ValueError
        Bad shapes / configuration, or NaN / Inf router logits.
    """
    cfg = _check_cfg(cfg)
    check_f32(x, "x", 2)
    _check_experts_count(router_weight, cfg)
    T, k = x.shape[0], cfg.num_experts_per_tok
    ids = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    _C.moe_route(ids, w, x, router_weight, correction_bias, *cfg._args())
    return ids, w


def _check_experts_count(router_weight: Any, cfg: MoEConfig) -> None:
    shp = getattr(router_weight, "shape", None)
    if shp is not None and len(shp) == 2 and shp[0] != cfg.n_routed_experts:
        raise ValueError(f"router_weight: has {shp[0]} rows but cfg.n_routed_experts is {cfg.n_routed_experts}")


def moe_dispatch(ids: np.ndarray, n_experts: int) -> Tuple[np.ndarray, np.ndarray]:
    """Group the slots of a routed batch by expert (counting sort).

    Slot ``s = t * k + j`` is the j-th expert of token t.  Expert e's slots are
    ``order[offsets[e]:offsets[e + 1]]`` (ascending, i.e. tokens ascending), so
    its tokens are ``order[offsets[e]:offsets[e + 1]] // k``.

    Parameters
    ----------
    ids : np.ndarray, int64, shape [T, k]
        Expert ids, each in [0, n_experts).
    n_experts : int

    Returns
    -------
    order : np.ndarray, int64, shape [T * k]
    offsets : np.ndarray, int64, shape [n_experts + 1]
    """
    if isinstance(n_experts, bool) or not isinstance(n_experts, (int, np.integer)) or n_experts < 1:
        raise ValueError(f"n_experts: expected an int >= 1, got {n_experts!r}")
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids: expected a 2-D numpy int64 array [T, k], got {type(ids).__name__}")
    if ids.ndim != 2:
        raise ValueError(f"ids: expected 2 dimensions [T, k], got shape {ids.shape}")
    if not ids.flags.c_contiguous:
        raise ValueError(f"ids: expected a C-contiguous array (use numpy.ascontiguousarray), got shape "
                         f"{ids.shape} with strides {ids.strides}")
    order = np.empty(ids.shape[0] * ids.shape[1], np.int64)
    offsets = np.empty(int(n_experts) + 1, np.int64)
    _C.moe_dispatch(offsets, order, ids)
    return order, offsets


def moe_combine(expert_out: np.ndarray, order: np.ndarray, weights: np.ndarray,
                add: Optional[np.ndarray] = None, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Weighted sum of grouped expert outputs back into token order.

    ``out[t] = sum_j weights[t, j] * expert_out[r(t, j)] (+ add[t])`` where
    ``r(t, j)`` is the grouped row of slot ``t * k + j`` (``order[r] == t*k + j``).
    The experts of a token are summed in ascending grouped row (= ascending
    expert id after :func:`moe_dispatch`), starting from 0, then ``add``; the
    result does not depend on the number of threads.

    Parameters
    ----------
    expert_out : np.ndarray, float32, shape [T * k, d]
        Row r is the output of slot ``order[r]``'s expert for its token.
    order : np.ndarray, int64, shape [T * k]
        A permutation of ``0 .. T*k - 1`` (from :func:`moe_dispatch`).
    weights : np.ndarray, float32, shape [T, k]
    add : np.ndarray, float32, shape [T, d], optional
        Added after the weighted sum (the shared experts' output).
    out : np.ndarray, float32, shape [T, d], optional

    Returns
    -------
    np.ndarray, float32, shape [T, d]
    """
    check_f32(expert_out, "expert_out", 2)
    check_f32(weights, "weights", 2)
    out = new_out(out, (weights.shape[0], expert_out.shape[1]))
    _C.moe_combine(out, expert_out, order, weights, add)
    return out


def swiglu_mlp(x: np.ndarray, gate: Weight, up: Weight, down: Weight, *,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """SwiGLU MLP ``down(silu(x @ gate.T) * (x @ up.T))`` (``DeepseekV2MLP``).

    Used for the dense layers and the shared experts.  For up to 32 tokens,
    gate and up are computed 24 intermediate rows at a time with SiLU*up
    applied at once (the intermediate never leaves cache); for more tokens
    OpenBLAS sgemm is used (BF16 weights widened one panel at a time).

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, d]
    gate : np.ndarray float32 or BF16, shape [I, d]
    up : np.ndarray float32 or BF16, shape [I, d]
    down : np.ndarray float32 or BF16, shape [d, I]
    out : np.ndarray, float32, shape [T, d], optional
        Must not overlap ``x``.

    Returns
    -------
    np.ndarray, float32, shape [T, d]
    """
    check_f32(x, "x", 2)
    out = new_out(out, x.shape)
    _C.swiglu_mlp(out, x, gate, up, down)
    return out


def moe_experts(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: ExpertWeights,
                shared: Optional[MLPWeights] = None, *, n_experts: Optional[int] = None,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """Routed experts (+ shared) for a given routing (transformers' ``DeepseekV2Experts``).

    ``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) + shared(x[t])``.
    Each expert runs once on all of its tokens (see :func:`moe_block`).

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, d]
    ids : np.ndarray, int64, shape [T, k]
        Each in [0, E).
    weights : np.ndarray, float32, shape [T, k]
    experts : StackedExperts | mapping | sequence of E (gate_proj, up_proj, down_proj)
        See :func:`moe_block`.
    shared : (gate_proj [Is, d], up_proj [Is, d], down_proj [d, Is]), optional
    n_experts : int, optional
        E; taken from ``experts`` when omitted.
    out : np.ndarray, float32, shape [T, d], optional

    Returns
    -------
    np.ndarray, float32, shape [T, d]
    """
    check_f32(x, "x", 2)
    lst, gu, dn = _experts_args(experts)
    if n_experts is None:
        if isinstance(experts, ExpertTable):
            n_experts = experts.n_experts
        else:
            n_experts = len(lst) if lst is not None else int(getattr(gu, "shape", (0,))[0])
    out = new_out(out, x.shape)
    _C.moe_experts(out, x, ids, weights, lst, gu, dn, int(n_experts), _shared_arg(shared))
    return out


def moe_block(x: np.ndarray, router_weight: Weight, experts: ExpertWeights,
              shared: Optional[MLPWeights] = None, cfg: Optional[MoEConfig] = None,
              correction_bias: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None, *,
              return_routing: bool = False) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One DeepSeekMoE block: router + routed experts + shared experts, one call.

    Same result as transformers' ``DeepseekV2Moe`` / ``DeepseekV3MoE`` forward
    (up to fp32 rounding).  Routing as :func:`moe_route`; then the slots are
    grouped by expert so that each expert runs once on all of its tokens:
    experts with more than 32 tokens as sgemm matrix products, the others by
    fused row-dot kernels in which both threads work on every matrix; the
    weighted combine adds the experts of a token in ascending id (as
    transformers' loop) and then the shared output.  Deterministic: the
    result does not depend on the number of threads.

    Parameters
    ----------
    x : np.ndarray, float32, shape [T, d]
        The post-attention-norm hidden states.
    router_weight : np.ndarray float32 or BF16, shape [E, d]
        ``mlp.gate.weight``.
    experts : StackedExperts | mapping | sequence | ExpertTable
        Either ``StackedExperts(gate_up_proj [E, 2I, d], down_proj [E, d, I])``
        (or a mapping with those two keys), or a sequence of E per-expert
        ``(gate_proj [I, d], up_proj [I, d], down_proj [d, I])`` tuples (or
        mappings with those keys), or an :class:`ExpertTable` of either
        (parsed once: the cheap way to call this per decoded token).
        float32, BF16, int8 (``dsv2ext.quant.Int8Weight``), int4 (``dsv2ext.int4.Int4Weight``) or FP8
        (:class:`dsv2ext.Fp8Weight`), never copied.
    shared : (gate_proj [Is, d], up_proj [Is, d], down_proj [d, Is]), optional
        The shared experts as one MLP (``Is = n_shared_experts * I``).
    cfg : MoEConfig
        Required.
    correction_bias : np.ndarray, float32, shape [E], optional
        ``mlp.gate.e_score_correction_bias`` (``noaux_tc`` only).
    out : np.ndarray, float32, shape [T, d], optional
        Must not overlap ``x`` or any weight.
    return_routing : bool
        Also return the routing ``(ids [T, k] int64, weights [T, k] float32)``.

    Returns
    -------
    out : np.ndarray, float32, shape [T, d]
        Or ``(out, ids, weights)`` when ``return_routing``.

    Raises
    ------
    TypeError, ValueError
        Bad dtypes / shapes / configuration, or NaN / Inf router logits
        (``out`` is not written then).
    """
    args = moe_block_args(router_weight, experts, shared, cfg, correction_bias)
    check_f32(x, "x", 2)
    out = new_out(out, x.shape)
    ids = w = None
    if return_routing:
        ids = np.empty((x.shape[0], cfg.num_experts_per_tok), np.int64)
        w = np.empty((x.shape[0], cfg.num_experts_per_tok), np.float32)
    _C.moe_block(out, x, *args, ids, w)
    if return_routing:
        return out, ids, w
    return out


def moe_block_args(router_weight: Weight, experts: ExpertWeights, shared: Optional[MLPWeights] = None,
                   cfg: Optional[MoEConfig] = None, correction_bias: Optional[np.ndarray] = None) -> tuple:
    """The fixed arguments of the MoE-block kernel for one layer, checked once.

    ``dsv2ext._C.moe_block(out, x, *args, None, None)`` then runs the block like
    :func:`moe_block` without re-parsing its arguments in Python on every call (the kernel's
    binding still checks every argument).  For callers that run the same layer for every
    token (the model's decode loop); pass the experts as an :class:`ExpertTable` so that they
    are not parsed per call in C either.

    Returns
    -------
    tuple
    """
    if cfg is None:
        raise TypeError("cfg: a MoEConfig is required")
    cfg = _check_cfg(cfg)
    _check_experts_count(router_weight, cfg)
    lst, gu, dn = _experts_args(experts)
    return (router_weight, correction_bias, lst, gu, dn, _shared_arg(shared)) + cfg._args()
