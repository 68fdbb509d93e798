"""PyTorch interop: the dsv2ext kernels inside existing PyTorch / transformers code (CPU).

``import dsv2ext.torch`` (needs PyTorch; ``import dsv2ext`` alone never imports torch).

Three levels:

1. Operators on CPU tensors, registered with ``torch.library`` under ``torch.ops.dsv2ext``
   (with fake implementations, so ``torch.compile(fullgraph=True)`` traces them): weights are
   handed to the kernels without copies (float32 through ``tensor.numpy()``, bfloat16 through
   an int16 view wrapped as :class:`dsv2ext.BF16`).  Python wrappers: :func:`rms_norm`,
   :func:`linear`, :func:`swiglu_mlp`, :func:`apply_rope`, :func:`moe_route`,
   :func:`moe_block`, :func:`mla_attention`, :func:`mla_compress_kv`,
   :func:`mla_attention_block`.  FP8 weights (float8_e4m3fn + block scales, as transformers'
   fine-grained FP8 modules hold them) go to the ``dsv2ext.ops`` kernels as
   :func:`fp8_weight_view` (zero-copy :class:`dsv2ext.Fp8Weight`); the torch operators and
   modules take float32 / bfloat16 weights.
2. Drop-in modules built from transformers' DeepSeek-V2 / V3 modules:
   :class:`MLAAttention` (latent 576-wide cache kept inside transformers' ``DynamicCache``),
   :class:`MoE` (fused 3-D experts of transformers 5), :class:`SwiGLUMLP`.
3. :func:`patch` / :func:`unpatch` for a whole ``DeepseekV2ForCausalLM`` /
   ``DeepseekV3ForCausalLM`` instance; ``generate()`` keeps working.

Gradients: the kernels are forward-only.  By default a backward through one raises a
``RuntimeError`` saying so; :func:`set_grad_mode` ``("fallback")`` or the :func:`grad_mode`
context manager make the backward recompute the op with PyTorch ops instead.  Outputs are
never detached silently.

>>> import dsv2ext.torch
>>> report = dsv2ext.torch.patch(model)          # transformers DeepseekV2ForCausalLM
>>> print(report)
>>> out = model.generate(input_ids, max_new_tokens=32)
>>> dsv2ext.torch.unpatch(model)
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("dsv2ext.torch needs PyTorch: pip install 'dsv2ext[torch]' (or torch>=2.4)") from _e

from ._convert import fp8_weight_view
from ._grad import GRAD_MODES, get_grad_mode, grad_mode, set_grad_mode
from .ops import (apply_rope, linear, mla_attention, mla_attention_block, mla_compress_kv, moe_block, moe_route,
                  rms_norm, swiglu_mlp)
from .modules import MLAAttention, MoE, SwiGLUMLP
from .patch import PatchReport, is_patched, patch, unpatch

__all__ = ["GRAD_MODES", "set_grad_mode", "get_grad_mode", "grad_mode", "rms_norm", "linear", "swiglu_mlp",
           "apply_rope", "moe_route", "moe_block", "mla_attention", "mla_compress_kv", "mla_attention_block",
           "MLAAttention", "MoE", "SwiGLUMLP", "LatentCacheLayer", "PatchReport", "patch", "unpatch", "is_patched",
           "fp8_weight_view"]


def __getattr__(name: str):
    if name == "LatentCacheLayer":  # imports transformers: only on demand
        from ._cache import LatentCacheLayer

        return LatentCacheLayer
    raise AttributeError(f"module 'dsv2ext.torch' has no attribute {name!r}")
