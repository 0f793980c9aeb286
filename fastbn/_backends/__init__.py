"""Built-in backends: thin adapters, one module each, registered at import.

Each adapter imports its kernels (and optional dependencies) lazily, so
registering costs nothing and a missing extra only makes a backend unavailable.
Third-party backends register through the ``fastbn.backends`` entry-point group;
the public function listing them all is :func:`fastbn.backends`.
"""
from .._registry import register_backend
from . import cupy_gpu, cython_omp, numba_cpu, numpy_ref

register_backend(numpy_ref.backend)
register_backend(cython_omp.backend)
register_backend(numba_cpu.backend)
register_backend(cupy_gpu.backend)
