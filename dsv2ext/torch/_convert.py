"""Zero-copy views of CPU torch tensors as the NumPy arguments of the kernels.

* float32 tensors -> ``tensor.numpy()`` (same memory);
* bfloat16 weights -> ``tensor.view(torch.int16).numpy().view(np.uint16)`` wrapped as
  :class:`dsv2ext.BF16` (same memory; bfloat16 is never guessed from a bare uint16 array);
* float8_e4m3fn weights with their block scales (transformers' fine-grained FP8 /
  DeepSeek-V3 layout) -> :func:`fp8_weight_view`, a :class:`dsv2ext.Fp8Weight` on the same
  memory for the ``dsv2ext.ops`` kernels;
* activations in another floating dtype (bfloat16, float16) are widened to float32 (a copy:
  the kernels compute in fp32); outputs are returned in the activation's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..dtypes import BF16
from ..fp8 import Fp8Weight

__all__ = ["weight_view", "opt_weight_view", "fp8_weight_view", "f32_view", "i64_view", "ACT_DTYPES",
           "WEIGHT_DTYPES"]

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense strided tensor, got layout {t.layout}")
    return t


def weight_view(t: torch.Tensor, name: str) -> Union[np.ndarray, BF16]:
    """A float32 ndarray or a BF16 sharing ``t``'s memory (never a copy).

    Raises
    ------
    TypeError
        Not a tensor, or dtype other than float32 / bfloat16.
    ValueError
        Not on the CPU, or not contiguous (a weight is never copied silently).
    """
    t = _check_tensor(t, name).detach()
    if t.dtype == torch.float8_e4m3fn:
        raise TypeError(f"{name}: a float8_e4m3fn weight needs its block scales: pass "
                        "dsv2ext.torch.fp8_weight_view(weight, weight_scale_inv, block_size) to the dsv2ext.ops "
                        "kernels (the torch operators take float32 / bfloat16 weights)")
    if t.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name}: expected a float32 or bfloat16 weight, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous weight (weights are never copied), got strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}; call .contiguous() once beforehand")
    if t.dtype == torch.float32:
        return t.numpy()
    return BF16(t.view(torch.int16).numpy().view(np.uint16))


def fp8_weight_view(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    block_size: Sequence[int] = (128, 128), name: str = "weight") -> Fp8Weight:
    """A :class:`dsv2ext.Fp8Weight` sharing the memory of a float8_e4m3fn weight and its scales.

    Parameters
    ----------
    weight : Tensor float8_e4m3fn [..., out, in], contiguous, on the CPU
    weight_scale_inv : Tensor float32 [..., ceil(out / B0), ceil(in / B1)], contiguous
        (transformers' fused ``gate_up_proj_scale_inv`` may carry extra rows; they are not used)
    block_size : (B0, B1)

    Raises
    ------
    TypeError / ValueError
        Other dtypes (e.g. UE8M0 scales), non-contiguous tensors, scales of the wrong shape.
    """
    w = _check_tensor(weight, name).detach()
    s = _check_tensor(weight_scale_inv, f"{name}_scale_inv").detach()
    if w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{name}: expected a float8_e4m3fn weight, got {w.dtype}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name}_scale_inv: expected float32 block scales, got {s.dtype}")
    for t, n in ((w, name), (s, f"{name}_scale_inv")):
        if not t.is_contiguous():
            raise ValueError(f"{n}: expected a contiguous tensor (weights are never copied)")
    if w.dim() < 2 or s.dim() != w.dim():
        raise ValueError(f"{name}: expected weight [..., out, in] and scales of the same rank, got shapes "
                         f"{tuple(w.shape)} and {tuple(s.shape)}")
    b0, b1 = int(block_size[0]), int(block_size[1])
    rows = -(-w.shape[-2] // max(b0, 1))
    if s.shape[-2] > rows:  # extra scale rows allocated for a fused projection
        s = s[..., :rows, :]
    codes = w.view(torch.uint8).numpy()
    scales = s.numpy() if s.is_contiguous() else np.ascontiguousarray(s.numpy())
    return Fp8Weight(codes, scales, (b0, b1))


def opt_weight_view(t: Optional[torch.Tensor], name: str) -> Union[np.ndarray, BF16, None]:
    return None if t is None else weight_view(t, name)


def f32_view(t: torch.Tensor, name: str, ndim: Optional[int] = None) -> np.ndarray:
    """A C-contiguous float32 ndarray of an activation (the tensor's own memory when it is
    already float32 and contiguous, else a widened copy)."""
    t = _check_tensor(t, name).detach()
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float32, bfloat16 or float16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.contiguous().numpy()


def cache_buffer(t: torch.Tensor, name: str) -> Union[np.ndarray, BF16]:
    """A latent cache the kernels read and write in place: a contiguous float32 tensor (fp32 rows)
    or bfloat16 tensor (bfloat16 rows, passed as a dsv2ext.BF16 view), [B, S, kv_lora + rope]."""
    t = _check_tensor(t, name).detach()
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{name}: expected dtype float32 or bfloat16 (the latent cache formats), got {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected 3 dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (it is written in place)")
    if t.dtype == torch.float32:
        return t.numpy()
    return BF16(t.view(torch.int16).numpy().view(np.uint16))


def i64_view(t: torch.Tensor, name: str) -> np.ndarray:
    t = _check_tensor(t, name).detach()
    if t.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected 1 dimension [T], got shape {tuple(t.shape)}")
    return t.contiguous().numpy()


def f32_vector(t: torch.Tensor, name: str) -> np.ndarray:
    """A small float32 vector (router correction bias, inv_freq); other float dtypes are widened."""
    t = _check_tensor(t, name).detach()
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {tuple(t.shape)}")
    return t.to(torch.float32).contiguous().numpy()
