"""Swap dsv2ext kernels into a transformers DeepSeek-V2 / V3 model instance, and back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from ..ops.mla import MLA_MODES, MLAConfig
from .modules import MLAAttention, MoE, SwiGLUMLP

__all__ = ["PatchReport", "patch", "unpatch", "is_patched"]

_ORIGINAL = "_dsv2ext_original"


@dataclass
class PatchReport:
    """What :func:`patch` / :func:`unpatch` changed.

    Attributes
    ----------
    model_class : str
    action : "patch" or "unpatch"
    attention, moe, mlp : list of int
        Decoder-layer indices whose attention / MoE / dense MLP module was swapped (or restored).
    skipped : list of (str, str)
        ``(module path, reason)`` for modules left as they were (e.g. already patched).
    """

    model_class: str
    action: str
    attention: List[int] = field(default_factory=list)
    moe: List[int] = field(default_factory=list)
    mlp: List[int] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> Dict[str, int]:
        """``{"attention": n, "moe": n, "mlp": n, "total": n}``."""
        c = {"attention": len(self.attention), "moe": len(self.moe), "mlp": len(self.mlp)}
        c["total"] = sum(c.values())
        return c

    def __str__(self) -> str:
        c = self.counts
        verb = "swapped" if self.action == "patch" else "restored"
        s = (f"dsv2ext.torch.{self.action}({self.model_class}): {verb} {c['total']} modules: "
             f"{c['attention']} attention, {c['moe']} MoE, {c['mlp']} dense MLP")
        if self.skipped:
            s += f"; skipped {len(self.skipped)}: " + ", ".join(f"{p} ({r})" for p, r in self.skipped[:4])
            if len(self.skipped) > 4:
                s += ", ..."
        return s


def _classes() -> Tuple[tuple, tuple, tuple, tuple]:
    try:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dsv2ext.torch.patch needs transformers >= 5.17 (DeepseekV2 / DeepseekV3 models)") from e
    models = (v2.DeepseekV2ForCausalLM, v3.DeepseekV3ForCausalLM, v2.DeepseekV2Model, v3.DeepseekV3Model)
    attn = (v2.DeepseekV2Attention, v3.DeepseekV3Attention)
    moe = (v2.DeepseekV2Moe, v3.DeepseekV3MoE)
    mlp = (v2.DeepseekV2MLP, v3.DeepseekV3MLP)
    return models, attn, moe, mlp


def _decoder(model: nn.Module) -> Tuple[nn.Module, str]:
    models, _, _, _ = _classes()
    if not isinstance(model, models):
        raise TypeError("model: expected a transformers DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (or their "
                        f"DeepseekV2Model / DeepseekV3Model), got {type(model).__name__}")
    if hasattr(model, "layers"):
        return model, ""
    return model.model, "model."


def _check_rotary(decoder: nn.Module, cfg: MLAConfig) -> None:
    """The kernel computes RoPE / YaRN from the config: it must match the model's own table."""
    rot = getattr(decoder, "rotary_emb", None)
    inv = getattr(rot, "original_inv_freq", None)
    if inv is None:
        inv = getattr(rot, "inv_freq", None)
    if inv is None:
        return
    got = inv.detach().to(torch.float32).cpu().numpy()
    rtol = 1e-6 if inv.dtype == torch.float32 else 1e-2
    if got.shape != cfg.inv_freq.shape or not np.allclose(got, cfg.inv_freq, rtol=rtol, atol=0):
        raise ValueError("model: its rotary embedding table differs from the one dsv2ext derives from the config "
                         "(an unsupported rope type or a modified rotary module); not patching")
    af = float(getattr(rot, "attention_scaling", 1.0))
    if not np.isclose(af, cfg.rope_attention_factor, rtol=1e-6):
        raise ValueError(f"model: rotary attention_scaling {af} differs from the config's "
                         f"{cfg.rope_attention_factor}; not patching")


def _check_cpu(model: nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type != "cpu":
            raise ValueError(f"model: {name} is on {p.device}; the dsv2ext kernels run on the CPU")


def patch(model: nn.Module, *, attention: bool = True, moe: bool = True, mlp: bool = True,
          mode: str = "auto", kv_dtype: str = "f32") -> PatchReport:
    """Swap the attention / MoE / dense MLP modules of ONE model instance for dsv2ext ones.

    Only this instance changes (its submodules are replaced in place; classes and other
    instances are untouched).  Parameters are shared with the replaced modules (no copy),
    ``state_dict()`` keys stay the same, and :func:`unpatch` restores the original modules.

    Parameters
    ----------
    model : DeepseekV2ForCausalLM | DeepseekV3ForCausalLM | DeepseekV2Model | DeepseekV3Model
        On the CPU, float32 or bfloat16 weights.
    attention, moe, mlp : bool
        Which kinds of modules to swap.
    mode : {"auto", "absorbed", "decompressed"}
        MLA form used by the attention kernel.
    kv_dtype : {"f32", "bf16"}
        Format of the latent rows the patched attention keeps in the cache (fp32: exact, the
        default; bf16: half the bytes, as transformers' own bf16 cache).

    Returns
    -------
    PatchReport

    Raises
    ------
    TypeError
        Not a supported model class.
    ValueError
        Unsupported configuration (rope type, biases, activation), weights not on the CPU.
    """
    if mode not in MLA_MODES:
        raise ValueError(f"mode: expected one of {sorted(MLA_MODES)}, got {mode!r}")
    decoder, prefix = _decoder(model)
    _, attn_cls, moe_cls, mlp_cls = _classes()
    _check_cpu(model)
    config = model.config
    report = PatchReport(type(model).__name__, "patch")
    mla_cfg = None
    if attention:
        mla_cfg = MLAConfig.from_hf_config(config)
        _check_rotary(decoder, mla_cfg)
    # build every replacement first, swap only when all succeeded (no half-patched model on error)
    swaps: List[Tuple[nn.Module, str, nn.Module, str, int]] = []
    for i, layer in enumerate(decoder.layers):
        path = f"{prefix}layers.{i}"
        if attention:
            a = layer.self_attn
            if isinstance(a, MLAAttention):
                report.skipped.append((f"{path}.self_attn", "already patched"))
            elif isinstance(a, attn_cls):
                mla = MLAAttention.from_hf(a, config, mla_config=mla_cfg, mode=mode, kv_dtype=kv_dtype)
                swaps.append((layer, "self_attn", mla,
                              "attention", i))
            else:
                report.skipped.append((f"{path}.self_attn", f"unknown module {type(a).__name__}"))
        m = layer.mlp
        if isinstance(m, (MoE, SwiGLUMLP)):
            if (moe and isinstance(m, MoE)) or (mlp and isinstance(m, SwiGLUMLP)):
                report.skipped.append((f"{path}.mlp", "already patched"))
        elif isinstance(m, moe_cls):
            if moe:
                swaps.append((layer, "mlp", MoE.from_hf(m, config), "moe", i))
        elif isinstance(m, mlp_cls):
            if mlp:
                swaps.append((layer, "mlp", SwiGLUMLP.from_hf(m, config), "mlp", i))
        else:
            report.skipped.append((f"{path}.mlp", f"unknown module {type(m).__name__}"))
    for parent, name, new, kind, i in swaps:
        object.__setattr__(new, _ORIGINAL, getattr(parent, name))
        new.train(getattr(parent, name).training)
        setattr(parent, name, new)
        getattr(report, kind).append(i)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Restore the transformers modules that :func:`patch` replaced in ``model``.

    Returns
    -------
    PatchReport (``action="unpatch"``; the lists name the restored layers)
    """
    decoder, _ = _decoder(model)
    report = PatchReport(type(model).__name__, "unpatch")
    for i, layer in enumerate(decoder.layers):
        for name in ("self_attn", "mlp"):
            mod = getattr(layer, name)
            orig = getattr(mod, _ORIGINAL, None)
            if orig is None:
                continue
            orig.train(mod.training)
            setattr(layer, name, orig)
            kind = "attention" if isinstance(mod, MLAAttention) else "moe" if isinstance(mod, MoE) else "mlp"
            getattr(report, kind).append(i)
    return report


def is_patched(model: nn.Module) -> bool:
    """True when any decoder module of ``model`` is a dsv2ext replacement."""
    decoder, _ = _decoder(model)
    return any(isinstance(getattr(layer, n), (MLAAttention, MoE, SwiGLUMLP))
               for layer in decoder.layers for n in ("self_attn", "mlp"))
