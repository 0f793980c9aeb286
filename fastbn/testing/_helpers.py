"""Helpers for testing fastbn backends (ours and plugins) against the reference.

``tolerance(dtype)`` is the one place where accuracy expectations live: every
parity test of fastbn, and any plugin's, takes its tolerances from here.
"""
import numpy as np

from .._validate import numpy_dtype  # noqa: F401 (re-exported for the kit)

# rtol, atol (atol is relative to the largest magnitude of the expected result)
_TOLERANCE = {
    "float16": (2e-3, 2e-3),   # 10-bit mantissa: one rounding of y is ~5e-4 relative
    "bfloat16": (1.6e-2, 1.6e-2),  # 7-bit mantissa: one rounding is ~2e-3, an ulp ~8e-3
    "float32": (2e-5, 2e-5),
    "float64": (1e-12, 1e-12),
}


def tolerance(dtype):
    """``(rtol, atol)`` for comparing results of ``dtype`` against the reference.

    ``atol`` is scaled by the largest magnitude of the expected array in
    :func:`assert_close`, so it serves outputs of any scale.
    """
    return _TOLERANCE[dtype_name(dtype)]


def dtype_name(dtype):
    """The name of a dtype given as a string, NumPy dtype or type (bfloat16: ml_dtypes')."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name



def to_numpy(a):
    """A host NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def assert_close(actual, desired, dtype=None, err_msg="", condition=0.0):
    """Assert ``actual`` matches ``desired`` within :func:`tolerance` of ``dtype``.

    ``dtype`` defaults to ``actual``'s dtype. ``condition`` widens the absolute
    tolerance by that many units of the largest magnitude, for results whose
    inputs were rounded first (see :func:`mean_rounding`).
    """
    actual, desired = to_numpy(actual), to_numpy(desired)
    rtol, atol = tolerance(dtype if dtype is not None else actual.dtype)
    scale = float(np.max(np.abs(desired.astype(np.float64)), initial=1.0))
    np.testing.assert_allclose(actual.astype(np.float64), desired.astype(np.float64),
                               rtol=rtol, atol=(atol + condition) * scale, err_msg=err_msg)


def mean_rounding(mean, invstd):
    """Relative error that rounding the mean to its stat dtype can put in ``x - mean``.

    Per-channel vectors travel in the stat dtype (float32 for float16/float32
    data), so two correct backends may subtract means that differ by half an
    ulp: ``|mean| * invstd * eps`` of a normalized value, large when
    ``|mean| / std`` is (PyTorch's CPU kernel has the same limit).
    """
    mean, invstd = to_numpy(mean), to_numpy(invstd)
    eps = float(np.finfo(mean.dtype).eps)
    return float(np.max(np.abs(mean.astype(np.float64)) * invstd, initial=0.0)) * eps


def direct_forward(x, weight=None, bias=None, eps=1e-5, axis=1):
    """Batch norm with batch statistics, straight from the formula, in float64.

    Independent of fastbn's canonical view and kernels: reduces the logical
    array over every axis but ``axis``. Returns ``(y, mean, biased_var)``.
    """
    x = to_numpy(x).astype(np.float64)
    axis = axis % x.ndim
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    w = np.ones(x.shape[axis]) if weight is None else to_numpy(weight).astype(np.float64)
    b = np.zeros(x.shape[axis]) if bias is None else to_numpy(bias).astype(np.float64)
    y = ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape)
         + b.reshape(shape))
    return y, mean, var


def direct_backward(dy, x, weight=None, eps=1e-5, axis=1):
    """The training-mode BN gradient written out on the logical arrays, float64.

    Returns ``(dx, dweight, dbias)``.
    """
    dy = to_numpy(dy).astype(np.float64)
    x = to_numpy(x).astype(np.float64)
    axis = axis % x.ndim
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    w = np.ones(shape) if weight is None else to_numpy(weight).astype(np.float64).reshape(shape)
    xhat = (x - mean) * invstd
    dx = invstd * w * (dy - dy.mean(axis=axes, keepdims=True)
                       - xhat * (dy * xhat).mean(axis=axes, keepdims=True))
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
