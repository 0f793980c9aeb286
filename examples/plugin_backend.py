"""A backend from another package: using and checking the example plugin.

``examples/plugin/`` is a complete fastbn backend shipped as its own package,
``fastbn_example_plugin`` (NumPy kernels, float32/float64, CPU). It registers
itself through the ``fastbn.backends`` entry point in its ``pyproject.toml``, so
after ``pip install ./examples/plugin`` nothing has to import it: fastbn finds it
the first time the backends are listed. This script walks through what a user of
such a plugin does:

1. list the backends, the plugin among them (``fastbn.backends()``);
2. pick it by name (``backend="example"``, ``fastbn.use_backend``) and see that
   automatic selection leaves it alone (its priority is negative);
3. see what it declines (a dtype it does not declare) and how the error says so;
4. run fastbn's conformance kit on it, ``fastbn.testing.check_backend("example")``,
   the checks every built-in backend passes, and print what ran;
5. time it against the built-in backends and save ``plugin_backend.png`` into
   ``--out`` (default ``examples/images/``): a NumPy plugin is correct, not fast.

Run::

    pip install ./examples/plugin                  # once, from fastbn's checkout
    python examples/plugin_backend.py              # about 15 s on 2 cores
    python examples/plugin_backend.py --fast       # the kit on float32 only, fewer timings

Needs matplotlib for the picture (``pip install '.[examples]'``).
"""
import importlib.metadata
import sys
import textwrap
import time

import numpy as np

import fastbn
import fastbn.testing
from _common import parse_args, pyplot, save


def main():
    args = parse_args(__doc__)
    try:
        import fastbn_example_plugin  # noqa: F401  (only to tell whether it is installed)
    except ImportError:
        sys.exit("the example plugin is not installed: pip install ./examples/plugin "
                 "(from fastbn's checkout), then run this script again")

    # 1. The entry point the plugin declares, and fastbn's list with it loaded.
    for ep in importlib.metadata.entry_points(group="fastbn.backends"):
        print(f"entry point fastbn.backends: {ep.name} = {ep.value}")
    print(f"\n{'backend':<10} {'available':<10} {'priority':>8}  dtypes")
    for info in fastbn.backends():
        print(f"{info.name:<10} {str(info.available):<10} {info.priority:>8}  "
              f"{','.join(sorted(info.dtypes))}  {info.reason}")

    # 2. Asked for by name it serves the call; left to itself fastbn picks the
    #    highest-priority backend that fits, which the plugin (priority -10) never is.
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(32, 16, 8, 8)).astype(np.float32)
    w, b = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    y_plugin, *_ = fastbn.batch_norm_forward(x, w, b, backend="example")
    print(f"\nbackend='example' -> served by {fastbn.last_backend()!r}")
    y_auto, *_ = fastbn.batch_norm_forward(x, w, b)
    print(f"automatic          -> served by {fastbn.last_backend()!r}; "
          f"max |difference| {np.abs(y_plugin - y_auto).max():.1e}")
    with fastbn.use_backend("example"):            # scoped to this thread
        bn = fastbn.BatchNorm(16)
        dx = bn.backward(np.ones_like(bn(x)))
        print(f"use_backend('example'): BatchNorm forward+backward served by "
              f"{fastbn.last_backend()!r}, |dx| max {np.abs(dx).max():.1e} (ones in: ~0)")

    # 3. A dtype it doesn't declare: named explicitly, the call raises (never a silent
    #    fallback to another backend); automatic selection would skip it.
    try:
        fastbn.batch_norm_forward(x.astype(np.float16), backend="example")
    except fastbn.BackendUnavailableError as exc:
        print(f"float16 on 'example': {type(exc).__name__}: {exc}")

    # 4. The conformance kit: each kernel alone and through the public paths, NaN/inf,
    #    aliasing, read-only inputs, threads... Raises on the first failure.
    t0 = time.perf_counter()
    ran = fastbn.testing.check_backend("example", dtypes=["float32"] if args.fast else None)
    print(f"\ncheck_backend('example'): {len(ran)} checks passed in "
          f"{time.perf_counter() - t0:.1f} s:")
    print(textwrap.fill(", ".join(ran), 96, initial_indent="  ", subsequent_indent="  "))

    # 5. Time a training forward + backward over sizes, per backend.
    sizes = [2 ** k for k in (range(8, 17, 4) if args.fast else range(8, 19, 2))]  # N x 64
    # the default CPU backend and the NumPy reference the plugin resembles
    names = [i.name for i in fastbn.backends()
             if i.available and i.name in ("cython", "numpy", "example")]
    times = {name: [] for name in names}
    for n in sizes:
        x = rng.normal(size=(n, 64)).astype(np.float32)
        for name in names:
            best = np.inf
            for _ in range(4 if args.fast else 8):        # best of: the least disturbed run
                start = time.perf_counter()
                y, mean, invstd = fastbn.batch_norm_forward(x, backend=name)
                fastbn.batch_norm_backward(y, x, mean, invstd, backend=name)
                best = min(best, time.perf_counter() - start)   # the first call warms up
            times[name].append(best)
    print(f"\nforward+backward, float32 (N, 64), best of several calls, ms:")
    print(f"{'N':>8} " + " ".join(f"{name:>9}" for name in names))
    for i, n in enumerate(sizes):
        print(f"{n:>8} " + " ".join(f"{times[name][i] * 1e3:>9.3f}" for name in names))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.loglog(np.array(sizes) * 64, times[name], marker="o",
                  label=name + (" (plugin)" if name == "example" else ""))
    ax.set_xlabel("elements (N x 64, float32)")
    ax.set_ylabel("forward + backward, s (best of several)")
    ax.set_title("a NumPy plugin next to the built-in backends")
    ax.legend()
    fig.tight_layout()
    save(fig, args, "plugin_backend.png")


if __name__ == "__main__":
    main()
