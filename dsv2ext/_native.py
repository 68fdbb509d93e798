"""Loads the compiled extension ``dsv2ext._C`` and its OpenBLAS.

The extension links against ``libscipy_openblas`` from the ``scipy-openblas32``
wheel.  The installed extension finds it through a relative rpath; loading it
here first (RTLD_GLOBAL) also covers editable installs and unusual layouts, so
no LD_LIBRARY_PATH is ever needed.  With ``DSV2EXT_BLAS=system`` at build time
the extension links a system OpenBLAS instead and nothing is preloaded.
"""
from __future__ import annotations

import ctypes
import os


def _preload_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError:  # built against a system OpenBLAS
        return
    libdir = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library()
    for fname in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        path = os.path.join(libdir, fname)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return


_preload_openblas()

from . import _C  # noqa: E402

__all__ = ["_C"]
