"""Thread control: one pool owns the cores.

dsv2ext's kernels run on a single pool of worker threads; OpenBLAS (used for
large fp32 matrix products) is given the same thread count and is never called
from inside a parallel region.  The default is the number of CPUs this process
may run on, or the environment variable ``DSV2EXT_NUM_THREADS``.
"""
from __future__ import annotations

from ._native import _C

__all__ = ["set_num_threads", "get_num_threads", "get_isa", "set_isa"]


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
    """The vector instruction set the kernels use: 'avx512', 'avx2' or 'portable'."""
    return _C.get_isa()


def set_isa(name: str) -> str:
    """Cap the instruction set ('portable', 'avx2', 'avx512'); returns the level in force.

    The level never exceeds what the CPU supports.  The environment variable
    ``DSV2EXT_ISA`` does the same at start-up.  Mainly for tests of every code path.
    """
    return _C.set_isa(name)
