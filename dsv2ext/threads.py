"""Thread control: one pool owns the cores.

dsv2ext's kernels run on a single pool of worker threads; OpenBLAS (used for
large fp32 matrix products) is given the same thread count and is never called
from inside a parallel region.  The default is the number of CPUs this process
may run on, or the environment variable ``DSV2EXT_NUM_THREADS``.
"""
from __future__ import annotations

from typing import Dict, Optional

from ._native import _C

__all__ = ["set_num_threads", "get_num_threads", "get_isa", "set_isa", "get_prefetch", "set_prefetch",
           "prefetch_defaults", "set_chunks_per_thread", "get_chunks_per_thread", "amx_available"]


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


def set_chunks_per_thread(n: Optional[int]) -> int:
    """Cut every parallel region into ``n`` chunks per thread (1..64), or None for the automatic
    choice, ``min(threads, 16)``; returns the setting in force (0: automatic).

    The threads claim the chunks of a region in order, so threads that happen to run faster take
    up the share of slower ones (with one chunk per thread a region lasts as long as its slowest
    thread).  ``DSV2EXT_CHUNKS`` sets it at start-up.  It changes no result, only speed: on a
    16-vCPU Xeon at 16 threads, 16 chunks per thread against 1 gave lite-L4 decode bf16 95 vs 79
    tokens/s, int8 165 vs 141, 512-token prefill bf16 2103 vs 1814 (interleaved rounds, medians);
    at 2 threads 4 and 1 were level.
    """
    if n is None:
        n = 0
    elif isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int or None, got {type(n).__name__}")
    elif not 1 <= n <= 64:
        raise ValueError(f"n: expected 1..64 chunks per thread or None, got {n}")
    return _C.set_chunks_per_thread(n)


def get_chunks_per_thread() -> int:
    """Chunks per thread that a parallel region on all threads is cut into now."""
    return _C.get_chunks_per_thread()


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


def prefetch_defaults() -> Dict[str, int]:
    """Each decode row-dot family's software-prefetch distance on this CPU, in bytes (0: off),
    used where no override is set: ``{"bf16": ..., "int8": ..., "int4": ..., "fp8": ...}``."""
    return dict(_C.prefetch_defaults())


def get_prefetch() -> Optional[int]:
    """The software-prefetch distance override of the decode kernels, in bytes (0: off), or
    None when every kernel family uses its own default (see :func:`set_prefetch`)."""
    return _C.get_prefetch()


def set_prefetch(nbytes: Optional[int]) -> Optional[int]:
    """Set how far ahead (bytes) the decode kernels prefetch the weight stream; 0 turns it off,
    None restores each kernel family's default (:func:`prefetch_defaults`).

    A tuning knob for memory-bound decode (``DSV2EXT_PREFETCH`` sets it at start-up).  It changes
    no result, only speed.  The defaults depend on the CPU's vendor, as measured with
    ``benchmarks/bench_stream.py``: on Intel server cores (a 16-core Xeon with AMX), 4 KiB for
    every weight type (one core then streams bf16 rows at 10.4 GB/s instead of 6.4; 16 threads
    109 GB/s instead of 75); elsewhere (Zen 4) 4 KiB for the int4 and int8 rows and off for bf16
    and fp8 (bf16 rows stream slower with it there).  Rounded down to a multiple of 64; returns
    the override in force.
    """
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)):
        raise TypeError(f"nbytes: expected an int or None, got {type(nbytes).__name__}")
    return _C.set_prefetch(nbytes)


def amx_available() -> bool:
    """Whether this CPU has AMX tiles (AMX-TILE + AMX-BF16) and the OS granted this process
    the tile state; the kernels use them while :func:`get_isa` is 'amx'."""
    return bool(_C.amx_available())
