"""Model configuration for the DeepSeek-V2 family (V2, V2-Lite, V2.5, V3).

:class:`ModelConfig` holds every ``config.json`` field that changes what the
model computes, validated and in one canonical form, whichever of the two
spellings the file uses:

* hub remote-code style (the files DeepSeek published): top-level
  ``rope_theta`` and ``rope_scaling = {"type": "yarn", ...}``, plus
  ``topk_method`` / ``scoring_func`` / ``moe_layer_freq``;
* transformers >= 5 style (what ``save_pretrained`` writes):
  ``rope_parameters = {"rope_type": "yarn", "rope_theta": ..., ...}``; V3
  files carry no ``topk_method`` / ``scoring_func`` (V3 is always sigmoid
  scoring with ``noaux_tc`` routing, V2 always softmax).

Fields that do not change inference (``auto_map``, ``aux_loss_alpha``,
``architectures``, ``torch_dtype``, ``use_cache``, ...) are ignored.  Missing,
mistyped, inconsistent or unsupported values raise :class:`ConfigError`, a
``ValueError`` whose message names the field and the offending value.

Semantics follow the correctness reference, transformers >= 5.17
(``models/deepseek_v2`` and ``models/deepseek_v3``), except ``moe_layer_freq``,
which transformers ignores and the hub code honours (see
:meth:`ModelConfig.is_moe_layer`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "ModelConfig", "NAMED_CONFIGS", "named_config_names"]


class ConfigError(ValueError):
    """An invalid, inconsistent or unsupported model configuration.

    Attributes
    ----------
    field : str or None
        The ``config.json`` key at fault (dotted for nested keys, e.g.
        ``"rope_scaling.factor"``), or None when the error is not about one field.
    value : Any
        The offending value (None when the field is missing).
    source : str or None
        The file the configuration was read from, when known.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.source = source
        self.message = message
        super().__init__(f"{source}: {message}" if source else message)

    def with_source(self, source: str) -> "ConfigError":
        """Return a copy of this error that names the file it came from."""
        return ConfigError(self.message, field=self.field, value=self.value, source=source)


def _short_repr(value: Any, limit: int = 200) -> str:
    """repr() for messages: never fails (ints over 4300 digits) and never floods (long lists)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an int of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= limit else text[:limit] + "..."


def _bad(field: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config field {field!r} = {_short_repr(value)}: {expected}", field=field, value=value)


def _missing(field: str, why: str = "") -> ConfigError:
    text = f"config field {field!r} is missing"
    text += f" ({why})" if why else ": it is required"
    return ConfigError(text, field=field)


# ---------------------------------------------------------------------------
# scalar checks shared by from_dict() and ModelConfig.__post_init__
# ---------------------------------------------------------------------------

_INT_MAX = 2**31 - 1  # sizes, counts and token ids: the kernels index with int32 / BLAS ints


def _check_int(field: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, value, f"expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise _bad(field, value, f"expected an integer >= {minimum}")
    if value > _INT_MAX:
        raise _bad(field, value, "expected an integer < 2**31")
    return int(value)


def _check_float(field: str, value: Any, *, positive: bool = False,
                 minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, value, f"expected a number, got {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:  # an integer too large for a float (JSON allows 1e400 spelled out)
        raise _bad(field, value, "expected a finite number (too large for a float)") from None
    if not math.isfinite(out):
        raise _bad(field, value, "expected a finite number")
    if positive and not out > 0.0:
        raise _bad(field, value, "expected a number > 0")
    if minimum is not None and out < minimum:
        raise _bad(field, value, f"expected a number >= {minimum:g}")
    return out


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(field, value, f"expected true or false, got {type(value).__name__}")
    return value


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _bad(field, value, "expected one of " + ", ".join(repr(c) for c in choices))
    return value


MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")

# Keys of a rope dict (rope_parameters / rope_scaling) this module understands.
_ROPE_KEYS = frozenset({
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "attention_factor",
    "partial_rotary_factor",
})


_F32_MAX = 3.4028234663852886e38
_F32_MIN_NORMAL = 1.1754943508222875e-38


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every inference-relevant field of a DeepSeek-V2 / V2-Lite / V2.5 / V3 config.

    Construct with :meth:`from_dict`, :meth:`from_json_file`,
    :meth:`from_pretrained` or :meth:`named`; direct construction (and
    ``dataclasses.replace``) is validated the same way.

    Notes
    -----
    * ``n_routed_experts == 0`` means a dense model (every layer a SwiGLU MLP of
      width ``intermediate_size``); the MoE fields are then unused.
    * For ``topk_method == "greedy"`` the grouping fields are unused and are
      normalised to ``n_group = topk_group = 1`` when absent.
    * ``rope_factor``, ``rope_original_max_position_embeddings``,
      ``rope_beta_fast`` and ``rope_beta_slow`` are None unless
      ``rope_type == "yarn"``; ``rope_mscale`` / ``rope_mscale_all_dim`` are
      None when the file does not give them (transformers distinguishes
      "absent" from 1.0, see :attr:`rope_attention_factor`).
    * ``rope_interleave`` (transformers' DeepseekV3Config field, default True):
      True rotates channel pairs ``(2i, 2i+1)`` (DeepSeek's layout, the only
      one the V2 code and checkpoints use); False rotates pairs ``(i, i+32)``
      (rotate-half on the raw layout).  It changes the attention scores, not
      just memory layout.  V2 configs must leave it True.
    * ``norm_topk_prob`` with ``deepseek_v2``: transformers' V2 router ignores
      it (weights are never renormalized), DeepSeek's hub code renormalizes and
      then skips ``routed_scaling_factor``.  Every official V2 config has it
      false; the value is kept as given.
    * ``num_nextn_predict_layers`` counts V3's multi-token-prediction layers
      (stored as ``model.layers.{num_hidden_layers + j}``); they are not part
      of the causal LM and are skipped.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    # DeepSeekMoE
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # norms and positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_interleave: bool = True
    # tokens and heads
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0

    # ------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        mt = self.model_type
        if mt == "deepseek":  # the very first DeepSeek-V2 upload
            mt = "deepseek_v2"
        put("model_type", _check_choice("model_type", mt, MODEL_TYPES))
        v3 = self.model_type == "deepseek_v3"

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            put(name, _check_int(name, getattr(self, name), 1))
        if self.q_lora_rank is not None:
            put("q_lora_rank", _check_int("q_lora_rank", self.q_lora_rank, 1))
        if self.qk_rope_head_dim % 2:
            raise _bad("qk_rope_head_dim", self.qk_rope_head_dim,
                       "expected an even number (rotary channels come in pairs)")

        # --- MoE -------------------------------------------------------
        put("n_routed_experts", _check_int("n_routed_experts", self.n_routed_experts, 0))
        put("first_k_dense_replace",
            _check_int("first_k_dense_replace", self.first_k_dense_replace, 0))
        put("moe_layer_freq", _check_int("moe_layer_freq", self.moe_layer_freq, 1))
        put("n_shared_experts", _check_int("n_shared_experts", self.n_shared_experts, 0))
        put("topk_method", _check_choice("topk_method", self.topk_method, TOPK_METHODS))
        put("scoring_func", _check_choice("scoring_func", self.scoring_func, SCORING_FUNCS))
        put("norm_topk_prob", _check_bool("norm_topk_prob", self.norm_topk_prob))
        put("routed_scaling_factor",
            _check_float("routed_scaling_factor", self.routed_scaling_factor, positive=True))
        if self.routed_scaling_factor > 3.0e38:  # the kernels scale in float32
            raise _bad("routed_scaling_factor", self.routed_scaling_factor,
                       "expected a number <= 3e38 (float32 range)")
        put("n_group", _check_int("n_group", self.n_group, 1))
        put("topk_group", _check_int("topk_group", self.topk_group, 1))
        if v3:
            if self.topk_method != "noaux_tc":
                raise _bad("topk_method", self.topk_method,
                           "deepseek_v3 models route with 'noaux_tc' only")
            if self.scoring_func != "sigmoid":
                raise _bad("scoring_func", self.scoring_func,
                           "deepseek_v3 models score experts with 'sigmoid' only")
        else:
            if self.topk_method == "noaux_tc":
                raise _bad("topk_method", self.topk_method,
                           "deepseek_v2 models route with 'greedy' or 'group_limited_greedy' "
                           "(noaux_tc is the deepseek_v3 router)")
            if self.scoring_func != "softmax":
                raise _bad("scoring_func", self.scoring_func,
                           "deepseek_v2 models score experts with 'softmax' only")
        put("moe_intermediate_size",
            _check_int("moe_intermediate_size", self.moe_intermediate_size, 0))
        put("num_experts_per_tok", _check_int("num_experts_per_tok", self.num_experts_per_tok, 0))
        if self.n_routed_experts > 0:
            E = self.n_routed_experts
            if self.moe_intermediate_size < 1:
                raise _bad("moe_intermediate_size", self.moe_intermediate_size,
                           "expected an integer >= 1 for a MoE model")
            k = self.num_experts_per_tok
            if k < 1:
                raise _bad("num_experts_per_tok", k, "expected an integer >= 1 for a MoE model")
            if k > E:
                raise _bad("num_experts_per_tok", k,
                           f"more experts per token than n_routed_experts ({E})")
            if self.topk_method != "greedy":
                G, TG = self.n_group, self.topk_group
                if E % G:
                    raise _bad("n_group", G,
                               f"n_routed_experts ({E}) is not divisible by n_group")
                if TG > G:
                    raise _bad("topk_group", TG, f"larger than n_group ({G})")
                per_group = E // G
                if k > TG * per_group:
                    raise _bad("num_experts_per_tok", k,
                               f"more than the {TG * per_group} experts in the topk_group={TG} "
                               f"kept groups of {per_group} experts")
                if self.topk_method == "noaux_tc" and per_group < 2:
                    raise _bad("n_group", G,
                               f"noaux_tc scores a group by its top-2 experts, but "
                               f"n_routed_experts/n_group = {per_group}")

        # --- norms and rope --------------------------------------------
        put("rms_norm_eps", _check_float("rms_norm_eps", self.rms_norm_eps, positive=True))
        if self.rms_norm_eps > 1.0:  # the RMSNorm kernels take 0 <= eps <= 1
            raise _bad("rms_norm_eps", self.rms_norm_eps, "expected a number <= 1")
        put("rope_theta", _check_float("rope_theta", self.rope_theta, positive=True))
        put("rope_type", _check_choice("rope_type", self.rope_type, ROPE_TYPES))
        put("rope_interleave", _check_bool("rope_interleave", self.rope_interleave))
        if not self.rope_interleave and not v3:
            raise _bad("rope_interleave", False,
                       "deepseek_v2 models always rotate interleaved channel pairs")
        if self.rope_type == "yarn":
            if self.rope_factor is None:
                raise _missing("rope_factor", "YaRN needs a factor")
            put("rope_factor", _check_float("rope_factor", self.rope_factor, minimum=1.0))
            orig = self.rope_original_max_position_embeddings
            if orig is None:
                raise _missing("rope_original_max_position_embeddings", "YaRN needs it")
            put("rope_original_max_position_embeddings",
                _check_int("rope_original_max_position_embeddings", orig, 1))
            bf = 32.0 if self.rope_beta_fast is None else self.rope_beta_fast
            bs = 1.0 if self.rope_beta_slow is None else self.rope_beta_slow
            put("rope_beta_fast", _check_float("rope_beta_fast", bf, positive=True))
            put("rope_beta_slow", _check_float("rope_beta_slow", bs, positive=True))
            if self.rope_beta_fast < self.rope_beta_slow:
                raise _bad("rope_beta_fast", self.rope_beta_fast,
                           f"must be >= rope_beta_slow ({self.rope_beta_slow:g})")
            for name in ("rope_mscale", "rope_mscale_all_dim"):
                val = getattr(self, name)
                if val is not None:
                    put(name, _check_float(name, val, minimum=0.0))
        else:
            for name in ("rope_factor", "rope_original_max_position_embeddings",
                         "rope_beta_fast", "rope_beta_slow", "rope_mscale",
                         "rope_mscale_all_dim"):
                if getattr(self, name) is not None:
                    raise _bad(name, getattr(self, name),
                               "only meaningful with rope_type 'yarn' (rope_type is 'default')")

        # --- what the float32 kernels can represent ----------------------
        # theta and factor enter the rotary table as float32: outside the normal float32 range
        # the table holds Inf/NaN; an attention factor or softmax scale that overflows float32
        # makes every score non-finite.  Reject them here, naming the field, not at run time.
        if not _F32_MIN_NORMAL <= self.rope_theta <= _F32_MAX:
            raise _bad("rope_theta", self.rope_theta, "expected a number in the float32 range [1.2e-38, 3.4e38]")
        if self.rope_type == "yarn":
            if self.rope_factor > _F32_MAX:
                raise _bad("rope_factor", self.rope_factor, "expected a number <= 3.4e38 (float32 range)")
        for name in ("softmax_scale", "rope_attention_factor"):
            val = getattr(self, name)
            if not (0.0 < val <= _F32_MAX):
                raise ConfigError(f"config: the derived {name} = {val!r} is not a positive float32 number "
                                  f"(check rope_scaling mscale / mscale_all_dim / factor)", field=name, value=val)
        if self.n_routed_experts > 0 and self.n_group > self.n_routed_experts:
            raise _bad("n_group", self.n_group, f"more groups than n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts > 0 and self.topk_group > self.n_group:
            raise _bad("topk_group", self.topk_group, f"larger than n_group ({self.n_group})")

        # --- tokens ----------------------------------------------------
        if self.bos_token_id is not None:
            put("bos_token_id", _check_int("bos_token_id", self.bos_token_id, 0))
        put("eos_token_id", _normalize_eos("eos_token_id", self.eos_token_id))
        put("tie_word_embeddings", _check_bool("tie_word_embeddings", self.tie_word_embeddings))
        put("num_nextn_predict_layers",
            _check_int("num_nextn_predict_layers", self.num_nextn_predict_layers, 0))

    # ------------------------------------------------------------------
    # derived values
    # ------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        """True when at least one layer is a DeepSeekMoE layer."""
        return self.num_moe_layers > 0

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` (0-based) uses DeepSeekMoE instead of a dense MLP.

        ``n_routed_experts > 0 and i >= first_k_dense_replace and i % moe_layer_freq == 0``
        (DeepSeek's rule; transformers assumes ``moe_layer_freq == 1``, which all
        official configs use).

        Raises
        ------
        IndexError
            If ``i`` is not in ``[0, num_hidden_layers)``.
        """
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer index i: expected an int, got {type(i).__name__}")
        if not 0 <= i < self.num_hidden_layers:
            raise IndexError(f"layer index i={i} out of range [0, {self.num_hidden_layers})")
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def num_moe_layers(self) -> int:
        """Number of DeepSeekMoE layers."""
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def num_dense_layers(self) -> int:
        """Number of layers with a dense SwiGLU MLP."""
        return self.num_hidden_layers - self.num_moe_layers

    @property
    def q_head_dim(self) -> int:
        """Per-head query/key width: ``qk_nope_head_dim + qk_rope_head_dim`` (192 for the family)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Numbers cached per token per layer by MLA: ``kv_lora_rank + qk_rope_head_dim`` (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        """Routed experts per routing group (``n_routed_experts // n_group``; 0 for dense models)."""
        return self.n_routed_experts // self.n_group if self.n_routed_experts else 0

    @property
    def is_yarn(self) -> bool:
        """True when YaRN rope scaling is configured."""
        return self.rope_type == "yarn"

    @property
    def softmax_scale(self) -> float:
        """Attention score scale: ``q_head_dim**-0.5 * m**2``.

        ``m = 0.1 * mscale_all_dim * ln(factor) + 1`` when YaRN is configured
        with ``factor > 1`` and a non-zero ``mscale_all_dim``, else 1
        (transformers' ``yarn_apply_mscale``).  Official V2/V2-Lite: 0.1147214;
        V2.5/V3: 0.1352338.
        """
        scale = self.q_head_dim ** -0.5
        if self.is_yarn and self.rope_mscale_all_dim:
            m = _yarn_get_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Multiplier applied to the rotary cos/sin tables (1.0 without YaRN).

        As transformers' ``_compute_yarn_parameters``: with both ``mscale`` and
        ``mscale_all_dim`` given and non-zero,
        ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)``,
        otherwise ``get_mscale(factor)``.  1.0 for every official config.
        """
        if not self.is_yarn:
            return 1.0
        f = self.rope_factor
        if self.rope_mscale and self.rope_mscale_all_dim:
            return _yarn_get_mscale(f, self.rope_mscale) / _yarn_get_mscale(f, self.rope_mscale_all_dim)
        return _yarn_get_mscale(f)

    @property
    def family(self) -> str:
        """Short human label: ``"DeepSeek-V2"`` or ``"DeepSeek-V3"``."""
        return "DeepSeek-V3" if self.model_type == "deepseek_v3" else "DeepSeek-V2"

    # ------------------------------------------------------------------
    # constructors
    # ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a parsed ``config.json`` (either spelling).

        Parameters
        ----------
        d : Mapping[str, Any]
            The JSON object.  Unknown keys and keys that do not affect
            inference are ignored.

        Raises
        ------
        ConfigError
            Naming the field and value, for missing, mistyped, inconsistent or
            unsupported values.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: expected a JSON object (mapping), got {type(d).__name__}")
        return cls(**_parse_dict(d))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Read a ``config.json`` file.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ConfigError
            If the file is not valid JSON or the configuration is invalid;
            the message names the file.
        """
        path = os.fspath(path)
        try:
            with open(path, "r", encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text: {exc}", source=path) from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc}", source=path) from None
        except RecursionError:
            raise ConfigError("not valid JSON: nested too deeply", source=path) from None
        except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
            raise ConfigError(f"not valid JSON: {exc}", source=path) from None
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise exc.with_source(path) from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Read ``<dir>/config.json`` from a checkpoint directory, or a config file directly."""
        path = os.fspath(path)
        if os.path.isdir(path):
            cfg = os.path.join(path, "config.json")
            if not os.path.isfile(cfg):
                raise FileNotFoundError(f"checkpoint directory {path!r} has no config.json")
            return cls.from_json_file(cfg)
        return cls.from_json_file(path)

    @classmethod
    def named(cls, name: str) -> "ModelConfig":
        """One of the official configurations, by name.

        Parameters
        ----------
        name : str
            ``"deepseek-v2"``, ``"deepseek-v2-lite"``, ``"deepseek-v2.5"`` or
            ``"deepseek-v3"`` (case-insensitive; a ``"deepseek-ai/"`` prefix is
            allowed).
        """
        key = _normalize_name(name)
        if key not in NAMED_CONFIGS:
            raise ConfigError(f"unknown configuration name {name!r}; known: "
                              + ", ".join(sorted(NAMED_CONFIGS)), field="name", value=name)
        return cls.from_dict(NAMED_CONFIGS[key])

    # ------------------------------------------------------------------
    # output
    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The canonical transformers-5 spelling (``rope_parameters``), JSON-serialisable.

        ``ModelConfig.from_dict(cfg.to_dict()) == cfg``.  For MoE models the
        result is accepted by transformers' ``DeepseekV2Config`` /
        ``DeepseekV3Config``.  ``moe_layer_freq`` is written only when it is
        not 1 (transformers has no such field).
        """
        v3 = self.model_type == "deepseek_v3"
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.is_yarn:
            rope["factor"] = self.rope_factor
            rope["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
            rope["beta_fast"] = self.rope_beta_fast
            rope["beta_slow"] = self.rope_beta_slow
            if self.rope_mscale is not None:
                rope["mscale"] = self.rope_mscale
            if self.rope_mscale_all_dim is not None:
                rope["mscale_all_dim"] = self.rope_mscale_all_dim
        eos: Any
        if not self.eos_token_id:
            eos = None
        elif len(self.eos_token_id) == 1:
            eos = self.eos_token_id[0]
        else:
            eos = list(self.eos_token_id)
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts if self.n_routed_experts else None,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "first_k_dense_replace": self.first_k_dense_replace,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
        }
        if v3:
            out["rope_interleave"] = self.rope_interleave
            out["num_nextn_predict_layers"] = self.num_nextn_predict_layers
        else:
            out["topk_method"] = self.topk_method
            out["mlp_bias"] = False
        if self.moe_layer_freq != 1:
            out["moe_layer_freq"] = self.moe_layer_freq
        return out

    def describe(self) -> str:
        """A short multi-line human-readable summary."""
        lines = [
            f"{self.family} ({self.model_type}): {self.num_hidden_layers} layers "
            f"({self.num_dense_layers} dense + {self.num_moe_layers} MoE), hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}",
            f"  MLA: {self.num_attention_heads} heads, "
            + (f"q lora rank {self.q_lora_rank}" if self.q_lora_rank else "plain q_proj")
            + f", kv lora rank {self.kv_lora_rank}, head dims nope/rope/v "
            f"{self.qk_nope_head_dim}/{self.qk_rope_head_dim}/{self.v_head_dim}, "
            f"cache {self.kv_cache_width} per token per layer, softmax scale {self.softmax_scale:.7f}",
        ]
        if self.is_moe:
            route = self.topk_method
            if self.topk_method != "greedy":
                route += f" ({self.n_group} groups, keep {self.topk_group})"
            lines.append(
                f"  MoE: {self.n_routed_experts} routed x {self.moe_intermediate_size} + "
                f"{self.n_shared_experts} shared, top-{self.num_experts_per_tok} {route}, "
                f"{self.scoring_func}, scale {self.routed_scaling_factor:g}"
                + (", renormalized" if self.norm_topk_prob else ""))
        if self.num_dense_layers:
            lines.append(f"  dense MLP width {self.intermediate_size}")
        rope = f"  RoPE theta {self.rope_theta:g}"
        if self.is_yarn:
            rope += (f", YaRN x{self.rope_factor:g} (original {self.rope_original_max_position_embeddings}, "
                     f"beta {self.rope_beta_fast:g}/{self.rope_beta_slow:g})")
        rope += f", max positions {self.max_position_embeddings}"
        if not self.rope_interleave:
            rope += ", rotate-half (non-interleaved) pairs"
        lines.append(rope)
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# dict parsing
# ---------------------------------------------------------------------------

def _normalize_eos(field: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(_check_int(f"{field}[{i}]", v, 0) for i, v in enumerate(value))
    return (_check_int(field, value, 0),)


def _normalize_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key.startswith("deepseek-ai/"):
        key = key[len("deepseek-ai/"):]
    return key


def _parse_rope(d: Mapping[str, Any], max_pos: Any) -> dict[str, Any]:
    """Read rope settings from either spelling into ModelConfig rope_* fields."""
    rp = d.get("rope_parameters")
    rs = d.get("rope_scaling")
    for key, val in (("rope_parameters", rp), ("rope_scaling", rs)):
        if val is not None and not isinstance(val, Mapping):
            raise _bad(key, val, "expected an object or null")
    rp = dict(rp or {})
    rs = dict(rs or {})
    if rp and rs:
        where = "rope_parameters"
        merged = dict(rs)
        for k, v in rp.items():
            if k in merged and merged[k] != v:
                raise ConfigError(
                    f"config fields 'rope_scaling.{k}' = {_short_repr(merged[k])} and 'rope_parameters.{k}' = "
                    f"{_short_repr(v)} disagree", field=f"rope_parameters.{k}", value=v)
            merged[k] = v
    elif rp:
        where, merged = "rope_parameters", rp
    else:
        where, merged = "rope_scaling", rs
    for k, v in merged.items():
        if isinstance(v, Mapping):
            raise _bad(f"{where}.{k}", v, "per-layer-type rope parameters are not supported")

    t_new, t_old = merged.get("rope_type"), merged.get("type")
    if t_new is not None and t_old is not None and t_new != t_old:
        raise ConfigError(f"config fields '{where}.rope_type' = {_short_repr(t_new)} and '{where}.type' = "
                          f"{_short_repr(t_old)} disagree", field=f"{where}.rope_type", value=t_new)
    rope_type = t_new if t_new is not None else (t_old if t_old is not None else "default")
    type_field = f"{where}.rope_type" if t_new is not None else f"{where}.type"
    if rope_type not in ROPE_TYPES:
        raise _bad(type_field, rope_type,
                   "unsupported rope type; expected 'default' or 'yarn'")

    theta_top, theta_in = d.get("rope_theta"), merged.get("rope_theta")
    if theta_top is not None and theta_in is not None and theta_top != theta_in:
        raise ConfigError(f"config fields 'rope_theta' = {_short_repr(theta_top)} and '{where}.rope_theta' = "
                          f"{_short_repr(theta_in)} disagree", field="rope_theta", value=theta_top)
    theta = theta_in if theta_in is not None else theta_top
    theta_field = f"{where}.rope_theta" if theta_in is not None else "rope_theta"
    out: dict[str, Any] = {
        "rope_theta": 10000.0 if theta is None else _check_float(theta_field, theta, positive=True),
        "rope_type": rope_type,
    }
    prf = merged.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if prf is not None and prf != 1 and prf != 1.0:
        raise _bad("partial_rotary_factor", prf, "only 1.0 is supported (all qk_rope_head_dim "
                   "channels rotate)")
    if rope_type == "default":
        return out

    factor = merged.get("factor")
    if factor is None:
        raise _missing(f"{where}.factor", "YaRN rope scaling needs a factor")
    out["rope_factor"] = _check_float(f"{where}.factor", factor, minimum=1.0)
    orig_in = merged.get("original_max_position_embeddings")
    orig_top = d.get("original_max_position_embeddings")
    if orig_in is not None and orig_top is not None and orig_in != orig_top:
        raise ConfigError(
            f"config fields 'original_max_position_embeddings' = {_short_repr(orig_top)} and "
            f"'{where}.original_max_position_embeddings' = {_short_repr(orig_in)} disagree",
            field="original_max_position_embeddings", value=orig_top)
    orig = orig_in if orig_in is not None else orig_top
    # transformers falls back to max_position_embeddings when it is absent
    if orig is None:
        orig = max_pos
    out["rope_original_max_position_embeddings"] = _check_int(
        f"{where}.original_max_position_embeddings", orig, 1)
    for key in ("beta_fast", "beta_slow"):
        val = merged.get(key)
        # transformers: `rope_parameters.get("beta_fast") or 32` (and `or 1`)
        if val is not None and val != 0:
            out[f"rope_{key}"] = _check_float(f"{where}.{key}", val, positive=True)
    bf, bs = out.get("rope_beta_fast", 32.0), out.get("rope_beta_slow", 1.0)
    if bf < bs:
        raise _bad(f"{where}.beta_fast", merged.get("beta_fast"),
                   f"must be >= {where}.beta_slow ({bs:g})")
    for key in ("mscale", "mscale_all_dim"):
        val = merged.get(key)
        if val is not None:
            out[f"rope_{key}"] = _check_float(f"{where}.{key}", val, minimum=0.0)
    trunc = merged.get("truncate")
    if trunc is not None and trunc is not True:
        raise _bad(f"{where}.truncate", trunc, "only true (the DeepSeek YaRN ramp) is supported")
    af = merged.get("attention_factor")
    if af is not None:
        raise _bad(f"{where}.attention_factor", af,
                   "an explicit YaRN attention_factor is not supported (it is derived from "
                   "factor, mscale and mscale_all_dim)")
    return out


_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")


def _parse_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    if "model_type" not in d:
        raise _missing("model_type", "required: 'deepseek_v2' or 'deepseek_v3'")
    model_type = d["model_type"]
    if model_type == "deepseek":
        model_type = "deepseek_v2"
    _check_choice("model_type", model_type, MODEL_TYPES + ("deepseek",))
    v3 = model_type == "deepseek_v3"

    f: dict[str, Any] = {"model_type": model_type}
    for name in _REQUIRED_INTS:
        if d.get(name) is None:
            raise _missing(name)
        f[name] = _check_int(name, d[name], 1)
    if "q_lora_rank" not in d:
        raise _missing("q_lora_rank", "required; null for a plain q_proj")
    f["q_lora_rank"] = d["q_lora_rank"]

    # unsupported variations of the architecture
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _bad("hidden_act", act, "only 'silu' is supported")
    for key in ("attention_bias", "mlp_bias"):
        val = d.get(key, False)
        if val is not None and val is not False:
            raise _bad(key, val, "biases are not supported (DeepSeek checkpoints have none)")

    # --- MoE ------------------------------------------------------------
    E = d.get("n_routed_experts", "<absent>")
    if E == "<absent>":
        raise _missing("n_routed_experts", "required; null or 0 for a dense model")
    E = 0 if E is None else _check_int("n_routed_experts", E, 0)
    f["n_routed_experts"] = E
    if E > 0:
        required = ["moe_intermediate_size", "num_experts_per_tok", "n_shared_experts",
                    "first_k_dense_replace"]
        if v3:  # defaults differ between the hub code and transformers
            required += ["routed_scaling_factor", "norm_topk_prob"]
        for name in required:
            if d.get(name) is None:
                raise _missing(name, "required for a MoE model, n_routed_experts > 0")
    for name in ("moe_intermediate_size", "num_experts_per_tok", "n_shared_experts",
                 "first_k_dense_replace"):
        if d.get(name) is not None:
            f[name] = d[name]
    if d.get("moe_layer_freq") is not None:
        f["moe_layer_freq"] = d["moe_layer_freq"]
    if d.get("routed_scaling_factor") is not None:
        f["routed_scaling_factor"] = d["routed_scaling_factor"]
    if d.get("norm_topk_prob") is not None:
        f["norm_topk_prob"] = d["norm_topk_prob"]

    default_method, default_scoring = ("noaux_tc", "sigmoid") if v3 else ("greedy", "softmax")
    method = d.get("topk_method")
    f["topk_method"] = default_method if method is None else method
    scoring = d.get("scoring_func")
    f["scoring_func"] = default_scoring if scoring is None else scoring
    n_group, topk_group = d.get("n_group"), d.get("topk_group")
    if E > 0 and f["topk_method"] in ("group_limited_greedy", "noaux_tc"):
        if n_group is None:
            raise _missing("n_group", f"topk_method {f['topk_method']!r} routes over groups")
        if topk_group is None:
            raise _missing("topk_group", f"topk_method {f['topk_method']!r} routes over groups")
    f["n_group"] = 1 if n_group is None else n_group
    f["topk_group"] = f["n_group"] if topk_group is None else topk_group

    # --- rest -----------------------------------------------------------
    if d.get("rms_norm_eps") is not None:
        f["rms_norm_eps"] = d["rms_norm_eps"]
    f.update(_parse_rope(d, d["max_position_embeddings"]))
    if d.get("rope_interleave") is not None:
        f["rope_interleave"] = d["rope_interleave"]
    f["bos_token_id"] = d.get("bos_token_id")
    f["eos_token_id"] = _normalize_eos("eos_token_id", d.get("eos_token_id"))
    if d.get("tie_word_embeddings") is not None:
        f["tie_word_embeddings"] = d["tie_word_embeddings"]
    nextn = d.get("num_nextn_predict_layers", d.get("num_mtp_layers"))
    if nextn is not None:
        f["num_nextn_predict_layers"] = nextn
    return f


# ---------------------------------------------------------------------------
# official configurations (hub spelling, as DeepSeek published them; only the
# fields that matter for inference are kept)
# ---------------------------------------------------------------------------

def _v2_like(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 8,
        "topk_group": 3,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    base.update(over)
    return base


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-v2": _v2_like(),
    "deepseek-v2-lite": _v2_like(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        n_routed_experts=64, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0),
    "deepseek-v2.5": _v2_like(
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "deepseek-v3": _v2_like(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
        topk_method="noaux_tc", n_group=8, topk_group=4, scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, bos_token_id=0, eos_token_id=1,
        num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def named_config_names() -> list[str]:
    """Names accepted by :meth:`ModelConfig.named`."""
    return sorted(NAMED_CONFIGS)
