"""Thread control: one pool owns the cores.

dsv2ext's kernels run on a single pool of worker threads; OpenBLAS (used for
large fp32 matrix products) is given the same thread count and is never called
from inside a parallel region.  The default is the number of CPUs this process
may run on, or the environment variable ``DSV2EXT_NUM_THREADS``.
"""
from __future__ import annotations

from typing import Optional

from ._native import _C

__all__ = ["set_num_threads", "get_num_threads", "get_isa", "set_isa", "get_prefetch", "set_prefetch",
           "amx_available"]


def set_num_threads(n: int) -> int:
    """Set the number of threads used by the kernels (and OpenBLAS).

    Parameters
    ----------
    n : int
        1 <= n <= 64.

    Returns
    -------
    int
        The number in force.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    return _C.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the kernels use."""
    return _C.get_num_threads()


def get_isa() -> str:
    """The instruction set the kernels use: 'amx', 'avx512', 'avx2' or 'portable'.

    'amx' is AVX-512 plus Intel AMX tiles: products of bfloat16 weights with 16
    or more activation rows (prefill) run on the tiles, with the same numerics
    as the AVX-512 kernels (see README, "AMX").
    """
    return _C.get_isa()


def set_isa(name: str) -> str:
    """Cap the instruction set ('portable', 'avx2', 'avx512', 'amx'); returns the level in force.

    The level never exceeds what the CPU supports; 'avx512' turns AMX off.  The
    environment variable ``DSV2EXT_ISA`` does the same at start-up.  Mainly for
    tests of every code path.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    return _C.set_isa(name)


def get_prefetch() -> Optional[int]:
    """The software-prefetch distance override of the decode kernels, in bytes (0: off), or
    None when every kernel family uses its own default (see :func:`set_prefetch`)."""
    return _C.get_prefetch()


def set_prefetch(nbytes: Optional[int]) -> Optional[int]:
    """Set how far ahead (bytes) the decode kernels prefetch the weight stream; 0 turns it off,
    None restores each kernel family's default.

    A tuning knob for memory-bound decode (``DSV2EXT_PREFETCH`` sets it at start-up).  It changes
    no result, only speed.  Defaults, measured on Zen 4 (lite-L4 decode, 2 threads): 4 KiB for
    the int4 row dots (~12% faster) and the int8 row dots (~4%), off for bf16 / fp8 (neutral to
    6% slower with it).
    Server cores that keep too few misses in flight per core may prefer it on.  Rounded down to a
    multiple of 64; returns the override in force.
    """
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)):
        raise TypeError(f"nbytes: expected an int or None, got {type(nbytes).__name__}")
    return _C.set_prefetch(nbytes)


def amx_available() -> bool:
    """Whether this CPU has AMX tiles (AMX-TILE + AMX-BF16) and the OS granted this process
    the tile state; the kernels use them while :func:`get_isa` is 'amx'."""
    return bool(_C.amx_available())
