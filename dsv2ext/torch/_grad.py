"""Gradient policy of the dsv2ext torch ops.

The C kernels compute forward passes only.  What happens when autograd would have to
differentiate through one of them is explicit:

``"error"`` (default)
    The forward runs the kernel; a backward pass that reaches the op raises a
    ``RuntimeError`` naming the op and how to enable the fallback.  Nothing is ever detached
    silently: the op's outputs keep ``requires_grad`` and a ``grad_fn``.
``"fallback"``
    The forward still runs the kernel (same values as in ``"error"`` mode); the backward
    recomputes the op with PyTorch operations from the saved inputs (like activation
    checkpointing) and differentiates that.

The mode is read when the forward runs (it is passed to the op as its ``grad_mode``
argument), so ``with grad_mode("fallback"): loss = model(x)`` followed by ``loss.backward()``
outside the block works.  Under ``torch.compile`` the mode is a guarded constant: changing it
recompiles.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["GRAD_MODES", "set_grad_mode", "get_grad_mode", "grad_mode"]

GRAD_MODES = ("error", "fallback")


class _State:
    """Process-wide mode (a plain attribute so that torch.compile can guard on it)."""

    mode: str = "error"


_STATE = _State()


def _check(mode: str) -> str:
    if not isinstance(mode, str) or mode not in GRAD_MODES:
        raise ValueError(f"mode: expected one of {GRAD_MODES}, got {mode!r}")
    return mode


def set_grad_mode(mode: str) -> str:
    """Set the gradient policy (process-wide); returns the previous mode.

    Parameters
    ----------
    mode : {"error", "fallback"}
        ``"error"``: a backward through a dsv2ext kernel raises ``RuntimeError``.
        ``"fallback"``: the backward recomputes the op with PyTorch ops and differentiates it.
    """
    prev = _STATE.mode
    _STATE.mode = _check(mode)
    return prev


def get_grad_mode() -> str:
    """The gradient policy in force: ``"error"`` or ``"fallback"``."""
    return _STATE.mode


@contextlib.contextmanager
def grad_mode(mode: str) -> Iterator[str]:
    """Context manager setting the gradient policy for the forwards run inside it.

    >>> with dsv2ext.torch.grad_mode("fallback"):
    ...     loss = model(input_ids, labels=input_ids).loss
    >>> loss.backward()          # recomputed with PyTorch ops
    """
    prev = set_grad_mode(mode)
    try:
        yield mode
    finally:
        _STATE.mode = prev


def backward_error_message(op: str) -> str:
    return (f"dsv2ext::{op}: no backward: the dsv2ext C kernel computes the forward pass only. "
            "To train through it, run the forward with the PyTorch fallback enabled "
            "(dsv2ext.torch.set_grad_mode('fallback') or `with dsv2ext.torch.grad_mode('fallback'):`), "
            "which recomputes the op with PyTorch ops in the backward pass; for inference, run under "
            "torch.no_grad() or torch.inference_mode().")
