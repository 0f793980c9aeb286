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

    # --- epilogues: y = act(bn(x) + z) and its gradient (see fastbn._registry.Backend)

    def normalize_epilogue(self, x3, mean, scale, shift, z3, relu, y3):
        x = x3.astype(np.float64)
        y = (x - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)
        if z3 is not None:
            y += z3.astype(np.float64)
        y3[...] = _relu(y) if relu else y

    def backward_reduce_relu(self, dy3, y3, x3, mean):
        return self.backward_reduce(_relu_grad(dy3, y3), x3, mean)

    def backward_elemt_relu(self, dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3):
        g = _relu_grad(dy3, y3)
        self.backward_elemt(g, x3, mean, k_dy, k_x, k_c, dx3)
        if dz3 is not None:
            dz3[...] = g


def _relu(y):
    """0 where y < 0, else y: NaN stays NaN (np.maximum propagates it), as torch.relu."""
    return np.maximum(y, 0.0)


def _relu_grad(dy3, y3):
    """dy where the activation's output is positive, else 0 (torch's threshold_backward)."""
    return np.where(y3.astype(np.float64) > 0, dy3.astype(np.float64), 0.0).astype(dy3.dtype)


backend = NumpyReference()
