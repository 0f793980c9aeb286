"""Python overhead of one fastbn call, measured with a backend whose kernels do no math.

    python benchmarks/overhead.py

Prints the median time per call of the whole public path (validation, canonical
view, cached selection, per-channel arithmetic, result wrapping) on a small
(8, 16) float32 input; the target is under 30 microseconds. Then the fast path's
(fastbn/_fastpath.py: the common call recognised and sent to the Cython kernels).
"""
import statistics
import timeit

import numpy as np

import fastbn
from fastbn._registry import Backend


class NullBackend(Backend):
    """Kernels that only fill their output (the core checks it was written): what is
    left is fastbn's own overhead."""

    name, priority = "null", -100

    def stats(self, x3):
        c = x3.shape[1]
        return np.zeros(c, np.float32), np.ones(c, np.float32)

    def normalize(self, x3, mean, scale, shift, y3):
        y3.fill(0)

    def backward_reduce(self, dy3, x3, mean):
        c = x3.shape[1]
        return np.zeros(c, np.float32), np.zeros(c, np.float32)

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        dx3.fill(0)


def median_us(fn, number=2000, repeat=15):
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main():
    fastbn.register_backend(NullBackend())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    w, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    dy = np.ones_like(x)
    mean, invstd = np.zeros(16, np.float32), np.ones(16, np.float32)
    rows = []
    with fastbn.use_backend("null"):
        rows.append(("forward, training, running stats",
                     median_us(lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv))))
        rows.append(("forward, training, bare",
                     median_us(lambda: fastbn.batch_norm_forward(x))))
        rows.append(("forward, inference",
                     median_us(lambda: fastbn.batch_norm(x, rm, rv, w, b))))
        rows.append(("backward, training",
                     median_us(lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, weight=w))))
    # the fast path (fastbn/_fastpath.py) serves the common call with the Cython kernels,
    # which on (8, 16) do almost no work: what is left is the recognition and the call
    if fastbn.get_backend("cython").is_available()[0]:
        rows.append(("fast path (cython): forward, training",
                     median_us(lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm,
                                                                 running_var=rv))))
        rows.append(("fast path (cython): inference",
                     median_us(lambda: fastbn.batch_norm(x, rm, rv, w, b))))
        rows.append(("fast path (cython): backward",
                     median_us(lambda: fastbn.batch_norm_backward(dy, x, mean, invstd,
                                                                  weight=w))))
    rows.append(("[for scale] np.empty_like(x)", median_us(lambda: np.empty_like(x))))
    print(f"fastbn {fastbn.__version__}: Python overhead per call, (8, 16) float32, "
          f"median of 15 x 2000 calls (target < 30 us)")
    for name, us in rows:
        print(f"  {name:<36} {us:7.2f} us")


if __name__ == "__main__":
    main()
