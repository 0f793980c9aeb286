"""Fused epilogues vs the same work as separate passes, side by side.

    python benchmarks/epilogue.py [--backend cython] [--threads 2] [--repeats 15]

For each shape (NCHW (32, 64, 56, 56), NC (4096, 1024), float32) it times, interleaved
with cold caches, through the public API:

* training forward: plain BN; BN+ReLU fused; BN then a separate ReLU pass;
  BN+add+ReLU fused; BN, add, ReLU as three passes;
* inference: the same;
* backward: plain BN backward; the fused backward of relu(bn(x) + z) (mask from the
  saved y, dz written); the unfused composition (mask pass, then BN backward).

The separate passes run on torch's multi-threaded elementwise kernels over the same
memory (torch.from_numpy, no copies) when torch is installed, else on NumPy, so the
composition is as fast as a framework user's. Printed: medians and 90th percentiles,
and the ratios the acceptance of issue 13 names (fused vs plain BN, fused vs composed).
"""
import argparse
import statistics
import time

import numpy as np

import fastbn
from fastbn.bench import CacheFlusher, aligned_empty, p90

SHAPES = {"NCHW": ((32, 64, 56, 56), 1), "NC": ((4096, 1024), 1)}


def _passes():
    """(relu_, add_, mask) as separate elementwise passes, multi-threaded when torch is here."""
    try:
        import torch
    except ImportError:
        return (lambda y: np.maximum(y, 0, out=y), lambda y, z: np.add(y, z, out=y),
                lambda dy, y: np.where(y > 0, dy, 0).astype(dy.dtype))
    t = torch.from_numpy
    return (lambda y: t(y).relu_(), lambda y, z: t(y).add_(t(z)),
            lambda dy, y: torch.ops.aten.threshold_backward(t(dy), t(y), 0).numpy())


def contenders(shape, axis, backend):
    relu_, add_, mask = _passes()
    rng = np.random.default_rng(0)
    x, z, dy, y, y2 = (aligned_empty(shape) for _ in range(5))
    x[...] = rng.normal(1.0, 2.0, shape)
    z[...] = rng.normal(size=shape)
    dy[...] = rng.normal(size=shape)
    c = shape[axis]
    w, b = np.linspace(0.5, 1.5, c, dtype=np.float32), np.linspace(-0.5, 0.5, c, dtype=np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    kw = dict(axis=axis, backend=backend)

    def fwd(training, **epi):
        return lambda: fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                                 training=training, out=y, **epi, **kw)

    def composed(training, add):
        plain = fwd(training)

        def run():
            plain()
            if add:
                add_(y, z)
            relu_(y)
        return run

    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, **kw)
    fastbn.batch_norm_forward(x, w, b, residual=z, activation="relu", out=y2, **kw)

    def bwd_plain():
        fastbn.batch_norm_backward(dy, x, mean, invstd, weight=w, **kw)

    def bwd_fused():
        fastbn.batch_norm_backward(dy, x, mean, invstd, weight=w, activation="relu", y=y2,
                                   residual=True, **kw)

    def bwd_composed():
        g = mask(dy, y2)  # also the residual's gradient
        fastbn.batch_norm_backward(g, x, mean, invstd, weight=w, **kw)

    runs = {}
    for training, mode in ((True, "train"), (False, "infer")):
        runs[f"{mode} BN"] = fwd(training)
        runs[f"{mode} BN+ReLU fused"] = fwd(training, activation="relu")
        runs[f"{mode} BN, ReLU"] = composed(training, add=False)
        runs[f"{mode} BN+add+ReLU fused"] = fwd(training, activation="relu", residual=z)
        runs[f"{mode} BN, add, ReLU"] = composed(training, add=True)
    runs["backward BN"] = bwd_plain
    runs["backward BN+add+ReLU fused"] = bwd_fused
    runs["backward mask, BN"] = bwd_composed
    return runs


RATIOS = [  # (fused, against, goal)
    ("train BN+ReLU fused", "train BN", 1.05),
    ("train BN+ReLU fused", "train BN, ReLU", 0.75),
    ("infer BN+ReLU fused", "infer BN, ReLU", 0.60),
    ("train BN+add+ReLU fused", "train BN, add, ReLU", 0.70),
    ("infer BN+add+ReLU fused", "infer BN, add, ReLU", 0.70),
    ("backward BN+add+ReLU fused", "backward mask, BN", 0.85),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cython")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    fastbn.set_num_threads(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    flush = CacheFlusher()
    print(f"fastbn {fastbn.__version__}, backend {args.backend}, float32, {args.threads} "
          f"threads, cold caches, {args.repeats} interleaved rounds")
    for layout, (shape, axis) in SHAPES.items():
        runs = contenders(shape, axis, args.backend)
        for fn in runs.values():
            fn()  # warm-up
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                flush()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{layout} {shape}")
        for name, ts in times.items():
            print(f"  {name:30s} median {med[name] * 1e3:7.2f} ms   p90 {p90(ts) * 1e3:7.2f} ms")
        for fused, other, goal in RATIOS:
            ratio = med[fused] / med[other]
            print(f"  {fused:30s} / {other:22s} {ratio:5.2f}  (goal <= {goal:.2f}) "
                  f"{'ok' if ratio <= goal else 'MISSED'}")


if __name__ == "__main__":
    main()
