"""An example fastbn backend plugin: NumPy kernels for float32 and float64 on the CPU.

What a plugin author writes: the four kernels on the canonical ``(O, C, I)`` view,
one optional fused kernel, the declarations (name, priority, devices, dtypes), and
an entry point in ``pyproject.toml``. The core folds every per-channel constant,
so the kernels below are the formulas of the contract and nothing else. Checked
with ``fastbn.testing.check_backend("example")``.
"""
import numpy as np

import fastbn


def _column(v):
    """(C,) -> (C, 1): broadcasts over (O, C, I)."""
    return v[:, None]


class ExampleBackend(fastbn.Backend):
    name = "example"
    priority = -10                        # below every built-in: runs when asked for by name
    devices = frozenset({"cpu"})
    dtypes = frozenset({"float32", "float64"})  # no float16: the kit skips what isn't declared

    def is_available(self):
        return True, ""

    # Statistics dtype = data dtype here (float32 -> float32, float64 -> float64).
    def stats(self, x3):
        # two passes, accumulated in float64: exact enough for any mean/std ratio
        mean = x3.mean(axis=(0, 2), dtype=np.float64)
        xmu = x3 - _column(mean)
        m2 = np.einsum("oci,oci->c", xmu, xmu)
        return mean.astype(x3.dtype), m2.astype(x3.dtype)

    def normalize(self, x3, mean, scale, shift, y3):
        # the right-hand side is computed before y3 is written, so y3 may be x3
        y3[...] = (x3 - _column(mean)) * _column(scale) + _column(shift)

    def backward_reduce(self, dy3, x3, mean):
        sum_dy = dy3.sum(axis=(0, 2), dtype=np.float64)
        sum_dy_xmu = np.einsum("oci,oci->c", dy3.astype(np.float64),
                               x3 - _column(mean.astype(np.float64)))
        return sum_dy.astype(x3.dtype), sum_dy_xmu.astype(x3.dtype)

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        dx3[...] = _column(k_dy) * dy3 + _column(k_x) * (x3 - _column(mean)) + _column(k_c)

    def forward_train(self, x3, weight, bias, eps, y3):
        """Fused training forward; declines the rows family (I == 1), where it saves
        nothing, so the core runs this backend's stats + normalize instead."""
        if x3.shape[2] == 1:
            return NotImplemented          # before writing anything
        mean, m2 = self.stats(x3)
        n = x3.shape[0] * x3.shape[2]
        self.normalize(x3, mean, weight / np.sqrt(m2 / n + eps), bias, y3)
        return mean, m2
