"""The NumPy reference backend: float64 arithmetic, two-pass statistics.

The oracle every other backend is tested against: simple and obviously right
beats fast. Each kernel is the formula of the protocol, written once.
"""
import numpy as np

from .._registry import Backend

_STAT = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32,
         "float64": np.float64}


def _per_channel(v):
    """(C,) -> (C, 1), which broadcasts against (O, C, I)."""
    return np.asarray(v, dtype=np.float64)[:, None]


class NumpyReference(Backend):
    name = "numpy"
    priority = 0
    devices = frozenset({"cpu"})
    dtypes = frozenset({"float16", "bfloat16", "float32", "float64"})

    def stats(self, x3):
        x = x3.astype(np.float64)
        mean = x.mean(axis=(0, 2))
        m2 = np.square(x - _per_channel(mean)).sum(axis=(0, 2))
        stat = _STAT[x3.dtype.name]
        return mean.astype(stat), m2.astype(stat)

    def normalize(self, x3, mean, scale, shift, y3):
        x = x3.astype(np.float64)
        y3[...] = (x - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)

    def backward_reduce(self, dy3, x3, mean):
        dy = dy3.astype(np.float64)
        xmu = x3.astype(np.float64) - _per_channel(mean)
        stat = _STAT[x3.dtype.name]
        return dy.sum(axis=(0, 2)).astype(stat), (dy * xmu).sum(axis=(0, 2)).astype(stat)

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        dy = dy3.astype(np.float64)
        xmu = x3.astype(np.float64) - _per_channel(mean)
        dx3[...] = _per_channel(k_dy) * dy + _per_channel(k_x) * xmu + _per_channel(k_c)


backend = NumpyReference()
