"""The Numba CPU backend: a thin adapter over ``fastbn._kernels.bn_numba``.

The adapter holds no math: it hands 16-bit data to the kernels as its bit
pattern (numba has no 16-bit float arithmetic on the CPU), float16 as uint16
and bfloat16 (``ml_dtypes.bfloat16``) as int16, the view's integer type telling
the kernels which format it is; it makes the
per-channel vectors contiguous in the stat dtype, passes the thread count of
``fastbn.get_num_threads()`` (the kernels apply it with
``numba.set_num_threads`` at each call) and returns what the kernels return.
numba is an optional extra: nothing here imports it until a kernel runs, so
``import fastbn`` works without it and this backend then reports itself
unavailable with the reason.

Numba compiles each kernel once per signature (data dtype, read-only or not)
on its first call and caches the machine code on disk next to
``bn_numba.py`` (``cache=True``), so later processes load it instead.
"""
import importlib.util
import threading

import numpy as np

from .._hints import missing
from .._registry import Backend
from .._threads import get_num_threads

_INSTALL_HINT = missing("numba", "numba", "numba")
# stat dtype and (for 16-bit formats) the integer view the kernels take, by dtype
# name: ml_dtypes' bfloat16 is known by name, so nothing here imports ml_dtypes
_STAT = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32,
         "float64": np.float64}
_CARRIER = {"float16": np.uint16, "bfloat16": np.int16}

_module = None
# numba's "workqueue" threading layer (the fallback when neither TBB nor
# OpenMP is there) aborts the process when two Python threads run parallel
# kernels at once; with it, calls are serialised. TBB and OpenMP need no lock.
# numba picks the layer at the first parallel region: None until then.
_serial = None
_lock = threading.Lock()


def _kernels():
    """The numba kernels, imported (and numba with them) on first use."""
    global _module
    if _module is None:
        from .._kernels import bn_numba

        _module = bn_numba
    return _module


def _bits(a):
    """16-bit float arrays travel to the kernels as integer views (no copy):
    float16 as uint16, bfloat16 as int16; None (an absent z or dz) stays None."""
    if a is None:
        return None
    carrier = _CARRIER.get(a.dtype.name)
    return a if carrier is None else a.view(carrier)


def _vector(v, x3):
    """A per-channel vector as the kernels read it: contiguous, in x's stat dtype."""
    return np.ascontiguousarray(v, dtype=_STAT[x3.dtype.name])


def _call(fn, *args):
    """fn(*args, n_threads), serialised while the threading layer is unknown
    (before the first parallel region of the process) or not thread-safe."""
    global _serial
    if _serial is False:
        return fn(*args, get_num_threads())
    with _lock:
        result = fn(*args, get_num_threads())
        if _serial is None:
            import numba

            try:
                _serial = numba.threading_layer() == "workqueue"
            except ValueError:  # no parallel region ran yet (an empty input)
                pass
    return result


class NumbaBackend(Backend):
    """Numba ``@njit(parallel=True)`` kernels for float16/bfloat16/float32/float64 on the CPU.

    The same kernels as the ``cython`` backend (same structure and names, in
    ``fastbn/_kernels/bn_numba.py``), compiled on first use per dtype and
    cached on disk. Kernels run with ``fastbn.get_num_threads()`` threads
    (at most ``NUMBA_NUM_THREADS``), read at each call, without the GIL. The
    fused training forward picks per call between a per-channel fused loop (a
    channel's data re-read from L2) and the two-kernel composition; backward
    is always the two kernels (fusing measured no gain here).

    The epilogues (relu, residual add, their gradients; see
    ``fastbn._registry.Backend``) run inside the same kernels, in the same
    passes: each combination of them is its own specialization, compiled on
    first use.
    """

    name = "numba"
    priority = 50
    devices = frozenset({"cpu"})
    dtypes = frozenset({"float16", "bfloat16", "float32", "float64"})

    def is_available(self):
        if importlib.util.find_spec("numba") is None:
            return False, _INSTALL_HINT
        try:
            _kernels()
        except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
            return False, f"numba failed to import: {type(exc).__name__}: {exc}"
        return True, ""

    def stats(self, x3):
        return _call(_kernels().stats, _bits(x3))

    def normalize(self, x3, mean, scale, shift, y3):
        _call(_kernels().normalize, _bits(x3), _vector(mean, x3), _vector(scale, x3),
              _vector(shift, x3), _bits(y3))

    def backward_reduce(self, dy3, x3, mean):
        return _call(_kernels().backward_reduce, _bits(dy3), _bits(x3), _vector(mean, x3))

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        _call(_kernels().backward_elemt, _bits(dy3), _bits(x3), _vector(mean, x3),
              _vector(k_dy, x3), _vector(k_x, x3), _vector(k_c, x3), _bits(dx3))

    def forward_train(self, x3, weight, bias, eps, y3):
        return _call(_kernels().forward_train, _bits(x3), _vector(weight, x3),
                     _vector(bias, x3), float(eps), _bits(y3))

    def normalize_epilogue(self, x3, mean, scale, shift, z3, relu, y3):
        _call(_kernels().normalize_epilogue, _bits(x3), _vector(mean, x3), _vector(scale, x3),
              _vector(shift, x3), _bits(z3), bool(relu), _bits(y3))

    def forward_train_epilogue(self, x3, weight, bias, eps, z3, relu, y3):
        return _call(_kernels().forward_train_epilogue, _bits(x3), _vector(weight, x3),
                     _vector(bias, x3), float(eps), _bits(z3), bool(relu), _bits(y3))

    def backward_reduce_relu(self, dy3, y3, x3, mean):
        return _call(_kernels().backward_reduce_relu, _bits(dy3), _bits(y3), _bits(x3),
                     _vector(mean, x3))

    def backward_elemt_relu(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        _call(_kernels().backward_elemt_relu, _bits(dy3), _bits(y3), _bits(x3),
              _vector(mean, x3), _vector(k_dy, x3), _vector(k_x, x3), _vector(k_c, x3),
              _bits(dz3), _bits(dx3))

    # No fused backward: bn_numba.backward_train (fused per channel where (dy, x)
    # of a channel fit in L2) measured no faster than backward_reduce +
    # backward_elemt here (S NCHW 2.78 vs 2.61 ms, M 11.29 vs 11.24 ms, 2
    # threads, benchmarks/compare_numba.py), so the core composes the two; so
    # also with the relu gradient (backward_reduce_relu + backward_elemt_relu).
    backward_train = None
    backward_train_relu = None


backend = NumbaBackend()
