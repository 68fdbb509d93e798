"""Build of dsv2ext: plain setuptools, one C extension `dsv2ext._C`.

Environment variables
---------------------
DSV2EXT_BLAS=system      link a system OpenBLAS (-lopenblas) instead of the
                         scipy-openblas32 wheel (the default).
DSV2EXT_SANITIZE=1       build with AddressSanitizer + UndefinedBehaviorSanitizer.
DSV2EXT_NATIVE=1         add -march=native (off by default: the kernels pick
                         AVX-512 / AVX2 / portable code at run time).
"""
import glob
import os
import sys

import numpy
from setuptools import Extension, setup

sources = sorted(glob.glob("csrc/*.c")) + sorted(glob.glob("python/*.c"))

# -ffp-contract=off: no fused multiply-add where the C source writes a product and a
# sum (the int4 quantizer is specified operation by operation and matched bit for
# bit by a NumPy model); kernels that want FMAs use the intrinsics.
cflags = ["-O3", "-std=gnu11", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing",
          "-ffp-contract=off", "-Wall", "-Wno-unused-function"]
ldflags = ["-pthread"]
define_macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
include_dirs = [numpy.get_include(), "csrc"]
library_dirs = []
libraries = ["m"]

if os.environ.get("DSV2EXT_NATIVE") == "1":
    cflags.append("-march=native")
if os.environ.get("DSV2EXT_SANITIZE") == "1":
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    ldflags += ["-fsanitize=address,undefined"]

if os.environ.get("DSV2EXT_BLAS", "").lower() == "system":
    define_macros.append(("DSV2_BLAS_SYSTEM", "1"))
    libraries.append("openblas")
    for d in ("/usr/include/openblas", "/usr/include/x86_64-linux-gnu/openblas-pthread",
              "/usr/include/x86_64-linux-gnu"):
        if os.path.exists(os.path.join(d, "cblas.h")):
            include_dirs.append(d)
            break
else:
    import scipy_openblas32

    include_dirs.append(scipy_openblas32.get_include_dir())
    library_dirs.append(scipy_openblas32.get_lib_dir())
    libraries.append(scipy_openblas32.get_library())
    # installed layout: site-packages/dsv2ext/_C*.so next to site-packages/scipy_openblas32/lib;
    # dsv2ext/__init__.py also preloads the library, which covers editable installs.
    ldflags.append("-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib")

ext = Extension(
    "dsv2ext._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    library_dirs=library_dirs,
    libraries=libraries,
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("python/*.h")),
)

setup(ext_modules=[ext])
