"""The Cython + OpenMP CPU backend: a thin adapter over ``fastbn._kernels._bn_omp``.

The adapter holds no math: it resolves the thread count for each call, hands
float16 and bfloat16 data to the kernels as its uint16 bit pattern (Cython
memoryviews have no 16-bit float type) with the kernels' ``bf16`` flag saying
which of the two it is, and returns what the kernels return. The compiled module is
imported lazily, so a broken or missing build makes this backend unavailable
instead of breaking ``import fastbn``.
"""
import numpy as np

from .._registry import Backend
from .._threads import threads_for
from .._validate import name_of

_module = None


def _kernels():
    """The compiled kernels, imported on first use."""
    global _module
    if _module is None:
        from .._kernels import _bn_omp

        _module = _bn_omp
    return _module


def unbuilt_reason(exc):
    """Why the compiled extension cannot be used, and what to do (one wording for
    ``fastbn info`` and this backend's availability)."""
    import os
    reason = f"the compiled extension fastbn._kernels._bn_omp failed to import ({exc})"
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(checkout, "setup.py")):
        return (reason + f"; this fastbn was imported from its source checkout {checkout}, "
                f"which is not compiled: run from another directory to use the installed "
                f"fastbn, or build the checkout in place with `pip install -e .`")
    return reason + "; reinstall fastbn on a machine with a C compiler"


def _bits(a):
    """16-bit float arrays (float16, ml_dtypes' bfloat16) travel to the kernels as
    uint16 views (no copy)."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _opt_bits(a):
    """_bits of an optional epilogue array (None stays None)."""
    return None if a is None else _bits(a)


def _bf16(a):
    """The kernels' ``bf16`` flag: True when the data is bfloat16 (not float16)."""
    return name_of(a.dtype) == "bfloat16"


def _threads(x3, arrays):
    """Threads for a kernel call that reads ``arrays`` arrays like x3: see
    fastbn._threads.threads_for."""
    return threads_for(x3.nbytes * arrays)


class CythonBackend(Backend):
    """Cython + OpenMP kernels for float16/bfloat16/float32/float64 on the CPU.

    Kernels run with ``fastbn.get_num_threads()`` threads, read at each call and
    capped for small inputs (``fastbn._threads.threads_for``: at least
    ``MIN_BYTES_PER_THREAD`` read per thread), and release the GIL for the whole
    computation. The fused training paths
    pick per call between a per-channel fused loop (a channel's data re-read
    from L2) and the two-kernel composition; both give the same results within
    rounding.
    """

    name = "cython"
    priority = 100
    devices = frozenset({"cpu"})
    dtypes = frozenset({"float16", "bfloat16", "float32", "float64"})

    def is_available(self):
        try:
            _kernels()
        except Exception as exc:  # noqa: BLE001 - any import failure means unavailable
            return False, unbuilt_reason(f"{type(exc).__name__}: {exc}")
        return True, ""

    def stats(self, x3):
        return _kernels().stats(_bits(x3), _threads(x3, 1), _bf16(x3))

    def normalize(self, x3, mean, scale, shift, y3):
        _kernels().normalize(_bits(x3), mean, scale, shift, _bits(y3), _threads(x3, 1),
                             _bf16(x3))

    def backward_reduce(self, dy3, x3, mean):
        return _kernels().backward_reduce(_bits(dy3), _bits(x3), mean, _threads(x3, 2),
                                          _bf16(x3))

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        _kernels().backward_elemt(_bits(dy3), _bits(x3), mean, k_dy, k_x, k_c, _bits(dx3),
                                  _threads(x3, 2), _bf16(x3))

    def forward_train(self, x3, weight, bias, eps, y3):
        return _kernels().forward_train(_bits(x3), weight, bias, float(eps), _bits(y3),
                                        _threads(x3, 1), _bf16(x3))

    def backward_train(self, dy3, x3, mean, invstd, weight, dx3):
        return _kernels().backward_train(_bits(dy3), _bits(x3), mean, invstd, weight,
                                         _bits(dx3), _threads(x3, 2), _bf16(x3))

    # Epilogues (see fastbn._registry.Backend): the kernels above with their optional
    # arrays (z: residual, ys: saved output for the relu mask, dz: residual's gradient)
    # and relu flag; None passes through (the kernels then read and write nothing more).

    def normalize_epilogue(self, x3, mean, scale, shift, z3, relu, y3):
        _kernels().normalize(_bits(x3), mean, scale, shift, _bits(y3),
                             _threads(x3, 1 if z3 is None else 2), _bf16(x3), _opt_bits(z3),
                             bool(relu))

    def forward_train_epilogue(self, x3, weight, bias, eps, z3, relu, y3):
        return _kernels().forward_train(_bits(x3), weight, bias, float(eps), _bits(y3),
                                        _threads(x3, 1 if z3 is None else 2), _bf16(x3),
                                        _opt_bits(z3), bool(relu))

    def backward_reduce_relu(self, dy3, y3, x3, mean):
        return _kernels().backward_reduce(_bits(dy3), _bits(x3), mean, _threads(x3, 3),
                                          _bf16(x3), _bits(y3))

    def backward_elemt_relu(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        _kernels().backward_elemt(_bits(dy3), _bits(x3), mean, k_dy, k_x, k_c, _bits(dx3),
                                  _threads(x3, 3), _bf16(x3), _bits(y3), _opt_bits(dz3))

    def backward_train_relu(self, dy3, y3, x3, mean, invstd, weight, dz3, dx3):
        return _kernels().backward_train(_bits(dy3), _bits(x3), mean, invstd, weight,
                                         _bits(dx3), _threads(x3, 3), _bf16(x3), _bits(y3),
                                         _opt_bits(dz3))


backend = CythonBackend()
