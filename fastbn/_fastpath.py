"""The common call, recognised in a few attribute checks and sent straight to the kernels.

Most calls are the same: a C-contiguous float32/float64 NumPy ``x`` (channels on any
axis: NCHW, NHWC with ``axis=-1``, NC), per-channel NumPy vectors in x's dtype, no
epilogue, no ``out``, and the Cython backend serving (chosen automatically or by
name). For those, the general path's validation, canonical view, dispatch and result
checks cost 15-20 µs warm, and several times that when the interpreter's own working
set has been evicted from the caches (a 2 MB batch norm between two convolutions):
more than the kernel itself on small inputs. Here such a call is *recognised* — every
condition is a cheap identity or attribute test — and run with the same kernels and
the same per-channel arithmetic, so the results are bit for bit the general path's.
Anything not recognised returns None and takes the general path, which validates it
(and raises its errors); this module raises only what the general path would raise
for the same call (an unknown or unavailable backend named).
"""
import math

import numpy as np

from . import _alloc, _perchannel, _registry
from ._threads import threads_for

_STAT = {np.dtype(np.float32): np.float32, np.dtype(np.float64): np.float64}
_kernels = None  # fastbn._kernels._bn_omp once the cython backend has been chosen


def _cython_serves(dtype, family, backend):
    """The kernels module when the built-in Cython backend would serve this call first
    (automatic selection, or ``backend`` naming it; the registry caches the answer),
    else None."""
    global _kernels
    if backend is not None and backend != "cython":
        return None
    first = _registry.candidates("cpu", dtype, family, backend)[0]
    if first.name != "cython" or type(first).__module__ != "fastbn._backends.cython_omp" \
            or not _registry._probe(first)[0]:
        return None
    if _kernels is None:
        from ._kernels import _bn_omp
        _kernels = _bn_omp
    return _kernels


def _vector(v, c, dtype, writable=False):
    """Whether ``v`` is a (C,) contiguous NumPy vector of ``dtype`` (None: acceptable)."""
    return v is None or (type(v) is np.ndarray and v.dtype is dtype and v.shape == (c,)
                         and v.flags.c_contiguous and (not writable or v.flags.writeable))


def _planes(x, axis):
    """(O, C, I) of a plain, C-contiguous NumPy ``x`` with channels on ``axis``, or None."""
    if type(x) is not np.ndarray or x.dtype not in _STAT or x.ndim < 2 \
            or not x.flags.c_contiguous or not x.flags.aligned or x.size == 0 \
            or type(axis) is not int or not -x.ndim <= axis < x.ndim:
        return None
    shape = x.shape
    c = shape[axis]
    o = math.prod(shape[:axis % x.ndim])
    return o, c, x.size // (o * c)


def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
            activation, residual, out, backend):
    """(y, mean, invstd) of a recognised batch_norm_forward call, else None."""
    if activation is not None or residual is not None or out is not None \
            or type(eps) is not float or not 0.0 < eps < math.inf:
        return None
    dims = _planes(x, axis)
    if dims is None:
        return None
    o, c, i = dims
    dtype = x.dtype
    updates = training is True and running_mean is not None
    if not (training is True or training is False) or not _vector(weight, c, dtype) \
            or not _vector(bias, c, dtype) \
            or not _vector(running_mean, c, dtype, updates) \
            or not _vector(running_var, c, dtype, updates) \
            or (running_mean is None) != (running_var is None) \
            or (training is False and running_mean is None) \
            or (training is True and o * i < 2) \
            or (updates and (type(momentum) is not float or not math.isfinite(momentum))):
        return None
    name = "float32" if dtype.itemsize == 4 else "float64"
    kernels = _cython_serves(name, "planes" if i > 1 else "rows", backend)
    if kernels is None:
        return None
    stat = _STAT[dtype]
    if weight is None:
        weight = np.ones(c, dtype=stat)
    if bias is None:
        bias = np.zeros(c, dtype=stat)
    y = _alloc.empty(np, x.shape, dtype)
    x3, y3 = x.reshape(o, c, i), y.reshape(o, c, i)
    threads = threads_for(x.nbytes)
    if training:
        stats = kernels.forward_train(x3, weight, bias, eps, y3, threads, False)
        if stats is NotImplemented:
            return None
        mean, m2 = stats
        n = o * i
        invstd = _perchannel.invstd(np, m2 / n, eps)
        if updates:
            _perchannel.update_running(running_mean, running_var, mean, m2, n, momentum, stat)
    else:
        mean, invstd = _perchannel.running_statistics(np, running_mean, running_var, eps, stat)
        kernels.normalize(x3, mean, weight * invstd, bias, y3, threads, False)
    _registry._last.name = "cython"
    return y, mean, invstd


def backward(dy, x, mean, invstd, weight, training, axis, activation, y, residual, backend):
    """(dx, dweight, dbias) of a recognised batch_norm_backward call in training mode,
    else None."""
    if training is not True or activation is not None or y is not None \
            or residual is not False:
        return None
    dims = _planes(x, axis)
    if dims is None or type(dy) is not np.ndarray or dy.dtype is not x.dtype \
            or dy.shape != x.shape or not dy.flags.c_contiguous or not dy.flags.aligned:
        return None
    o, c, i = dims
    dtype = x.dtype
    if mean is None or invstd is None or not _vector(mean, c, dtype) \
            or not _vector(invstd, c, dtype) or not _vector(weight, c, dtype):
        return None
    kernels = _cython_serves("float32" if dtype.itemsize == 4 else "float64",
                             "planes" if i > 1 else "rows", backend)
    if kernels is None:
        return None
    if weight is None:
        weight = np.ones(c, dtype=_STAT[dtype])
    dx = _alloc.empty(np, x.shape, dtype)
    sums = kernels.backward_train(dy.reshape(o, c, i), x.reshape(o, c, i), mean, invstd,
                                  weight, dx.reshape(o, c, i), threads_for(2 * x.nbytes), False)
    if sums is NotImplemented:
        return None
    sum_dy, sum_dy_xmu = sums
    _registry._last.name = "cython"
    return dx, sum_dy_xmu * invstd, sum_dy
