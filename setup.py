"""Build the compiled kernels of fastbn.

The one extension, ``fastbn._kernels._bn_omp``, is built with OpenMP when the
compiler accepts it (gcc/clang ``-fopenmp``, MSVC ``/openmp``) and without it
otherwise: the kernels then run single-threaded and ``fastbn.show_config()``
says so. Set ``FASTBN_DISABLE_OPENMP=1`` to force a build without OpenMP and
``FASTBN_EXTRA_CFLAGS`` to add compiler flags (e.g. sanitizers).
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _openmp_flags(compiler):
    """Return (compile_args, link_args) enabling OpenMP, or None if the compiler can't."""
    if os.environ.get("FASTBN_DISABLE_OPENMP"):
        return None
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    flags = ["-fopenmp"]
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
    except Exception:  # noqa: BLE001 - any failure means "no OpenMP here"
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flags, flags


class BuildExtWithOpenMP(build_ext):
    """build_ext that probes for OpenMP once and records the answer."""

    def build_extensions(self):
        openmp = _openmp_flags(self.compiler)
        if self.compiler.compiler_type == "msvc":
            base = ["/O2"]
        else:
            # -O3 with a portable x86-64 baseline: the loops carry `omp simd`
            # hints, and the wheel must run on any x86-64.
            base = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
        extra = os.environ.get("FASTBN_EXTRA_CFLAGS", "").split()
        for ext in self.extensions:
            ext.extra_compile_args = base + extra + (openmp[0] if openmp else [])
            ext.extra_link_args = extra + (openmp[1] if openmp else [])
        if openmp is None:
            print("fastbn: building WITHOUT OpenMP; kernels will run single-threaded",
                  file=sys.stderr)
        super().build_extensions()


extensions = [
    Extension(
        "fastbn._kernels._bn_omp",
        ["fastbn/_kernels/_bn_omp.pyx"],
        include_dirs=[np.get_include(), "fastbn/_kernels"],
        depends=[f"fastbn/_kernels/{h}" for h in ("_bn_simd.h", "_bn_simd_t.h", "_bn_simd_d.h",
                                                  "_omp_compat.h")],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3},
        include_path=["fastbn/_kernels"],
    ),
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
