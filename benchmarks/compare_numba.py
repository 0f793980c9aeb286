"""fastbn's numba kernels against the cython backend and PyTorch, side by side.

Standalone: ``python benchmarks/compare_numba.py [--cases S-NCHW,...] [--repeats 9]
[--threads 2] [--no-torch] [--no-compile]``.

Two parts:

1. First call: each numba kernel's first call on a small input, in fresh
   processes: once with an empty ``NUMBA_CACHE_DIR`` (compilation), once more
   with the cache it left (loading from disk), against a steady-state call.
2. Steady state: every kernel already compiled and warmed up; forward
   training (``forward_train``, fused or composed as each backend decides),
   inference (``normalize``) and backward (``backward_train`` where the
   backend has it, else ``backward_reduce`` + ``backward_elemt`` as the core
   composes them) on the backend objects directly. The "numba other" column
   shows the alternative numba did not pick: for forward training the
   two-kernel composition, for backward the fused kernel
   ``bn_numba.backward_train`` (to show whether fusing pays). Each time is
   the median of interleaved rounds with cold caches (a 128 MiB buffer is
   written before every call, every contender once per round, so drift on a
   shared machine hits them all alike); the minima are reported too. Outputs go into preallocated, 64-byte aligned, touched
   buffers (the ``out=`` path), as in compare_torch.py.

Cases: NCHW float32 S=(32,64,56,56), M=(128,256,28,28), L=(256,64,112,112);
NHWC the same tensors with axis=-1 (rows of the canonical view); NC (4096, 1024).
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from fastbn.bench import CacheFlusher, aligned_empty, round_robin

from compare_torch import EPS, torch_contenders  # the same torch side, one eps

SHAPES = {
    "S": (32, 64, 56, 56),
    "M": (128, 256, 28, 28),
    "L": (256, 64, 112, 112),
}
CASES = ["S-NCHW", "M-NCHW", "L-NCHW", "S-NHWC", "M-NHWC", "L-NHWC", "NC"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_round_robin(contenders, repeats, cold):
    """(median, min) seconds per contender, running them interleaved."""
    times = round_robin(contenders, repeats, cold)
    return ({name: float(np.median(v)) for name, v in times.items()},
            {name: float(np.min(v)) for name, v in times.items()})


# --- part 1: first-call (compile) time ---------------------------------------------------

_PROBE = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import fastbn
from fastbn._backends.numba_cpu import backend as be
from fastbn._kernels import bn_numba as K
bits = lambda a: a.view(np.uint16) if a.dtype == np.float16 else a
fastbn.set_num_threads({threads})
rng = np.random.default_rng(0)
out = {{}}
for dtype in {dtypes!r}:
    stat = np.float64 if dtype == "float64" else np.float32
    for family, shape in (("planes", (8, 16, 64)), ("rows", (512, 16, 1))):
        x = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y, dx = np.empty_like(x), np.empty_like(x)
        C = shape[1]
        v = np.ones(C, stat)
        calls = {{
            "stats": lambda: be.stats(x),
            "normalize": lambda: be.normalize(x, v, v, v, y),
            "backward_reduce": lambda: be.backward_reduce(dy, x, v),
            "backward_elemt": lambda: be.backward_elemt(dy, x, v, v, v, v, dx),
            "forward_train": lambda: be.forward_train(x, v, v, 1e-5, y),
            "backward_train (kernel only)": lambda: K.backward_train(
                bits(dy), bits(x), v, v, v, bits(dx), {threads}),
        }}
        for op, fn in calls.items():
            t0 = time.perf_counter(); fn(); first = time.perf_counter() - t0
            steady = []
            for _ in range(5):
                t0 = time.perf_counter(); fn(); steady.append(time.perf_counter() - t0)
            out[f"{{dtype}} {{family}} {{op}}"] = (first, sorted(steady)[2])
print(json.dumps(out))
"""


def first_call_times(threads, dtypes):
    """{key: (compile s, from-cache s, steady s)} from two fresh processes."""
    with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        code = _PROBE.format(root=ROOT, threads=threads, dtypes=list(dtypes))
        t0 = time.perf_counter()
        cold = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                         capture_output=True, text=True).stdout)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                         capture_output=True, text=True).stdout)
        t_warm = time.perf_counter() - t0
    rows = {k: (cold[k][0], warm[k][0], warm[k][1]) for k in cold}
    return rows, t_cold, t_warm


def report_first_calls(threads):
    dtypes = ("float32", "float64", "float16")
    rows, t_cold, t_warm = first_call_times(threads, dtypes)
    print(f"First calls (small inputs; each process imports fastbn + numba): whole process "
          f"{t_cold:.1f} s with an empty cache, {t_warm:.1f} s loading it from disk")
    print(f"  {'dtype family kernel':48s} {'compile':>9s} {'from cache':>11s} {'steady':>9s}")
    for k, (c, w, s) in rows.items():
        print(f"  {k:48s} {c * 1e3:7.0f}ms {w * 1e3:9.1f}ms {s * 1e6:7.0f}us")
    total = {d: sum(v[0] for k, v in rows.items() if k.startswith(d)) for d in dtypes}
    print("  compile total per dtype (all kernels, both families): "
          + ", ".join(f"{d} {t:.1f} s" for d, t in total.items()))
    print()


# --- part 2: steady state ----------------------------------------------------------------

def canonical(a, layout):
    if layout == "NCHW":
        N, C, H, W = a.shape
        return a.reshape(N, C, H * W)
    if layout == "NHWC":
        N, H, W, C = a.shape
        return a.reshape(N * H * W, C, 1)
    return a.reshape(a.shape[0], a.shape[1], 1)


def fastbn_threads():
    import fastbn
    return fastbn.get_num_threads()


def make_contenders(backends, layout, x, dy, y, dx, torch_mod):
    x3, dy3, y3, dx3 = (canonical(a, layout) for a in (x, dy, y, dx))
    C = x3.shape[1]
    n = x3.shape[0] * x3.shape[2]
    w = np.linspace(0.5, 1.5, C, dtype=np.float32)
    b = np.linspace(-0.1, 0.1, C, dtype=np.float32)
    ref = backends["numba"]
    mean, m2 = ref.stats(x3)
    invstd = (1.0 / np.sqrt(m2 / n + EPS)).astype(np.float32)
    scale = (w * invstd).astype(np.float32)
    sdy, sdyx = ref.backward_reduce(dy3, x3, mean)
    k_dy = (w * invstd).astype(np.float32)
    k_x = (-w * invstd ** 3 * sdyx / n).astype(np.float32)
    k_c = (-w * invstd * sdy / n).astype(np.float32)

    def backward(be):
        """The training backward as the core runs it: fused if the backend has it."""
        if getattr(be, "backward_train", None) is not None:
            return be.backward_train(dy3, x3, mean, invstd, w, dx3)
        s1, s2 = be.backward_reduce(dy3, x3, mean)
        kd = w * invstd
        be.backward_elemt(dy3, x3, mean, kd, -kd * invstd * invstd * s2 / n, -kd * s1 / n, dx3)

    c = {}
    for name, be in backends.items():
        c[f"{name} fwd"] = (None, lambda be=be: be.forward_train(x3, w, b, EPS, y3))
        c[f"{name} infer"] = (None, lambda be=be: be.normalize(x3, mean, scale, b, y3))
        c[f"{name} bwd"] = (None, lambda be=be: backward(be))

    nb = backends["numba"]

    def fwd_two_kernel():
        mu, s2 = nb.stats(x3)
        istd = 1.0 / np.sqrt(s2 / n + EPS)
        nb.normalize(x3, mu, w * istd, b, y3)

    def bwd_two_kernel():
        nb.backward_reduce(dy3, x3, mean)
        nb.backward_elemt(dy3, x3, mean, k_dy, k_x, k_c, dx3)

    def bwd_fused():
        from fastbn._kernels import bn_numba
        bn_numba.backward_train(dy3, x3, mean, invstd, w, dx3, fastbn_threads())

    c["numba fwd 2-kernel"] = (None, fwd_two_kernel)
    c["numba bwd 2-kernel"] = (None, bwd_two_kernel)
    c["numba bwd fused"] = (None, bwd_fused)
    if torch_mod is not None:
        c.update(torch_contenders(torch_mod, layout, x, dy, w, b,
                                  running=(mean.copy(), 1 / invstd ** 2 - EPS)))
    return c


def case_arrays(case, rng):
    if case == "NC":
        shape, layout = (4096, 1024), "NC"
    else:
        sname, layout = case.split("-")
        N, C, H, W = SHAPES[sname]
        shape = (N, C, H, W) if layout == "NCHW" else (N, H, W, C)
    x = aligned_empty(shape)
    x[...] = rng.standard_normal(shape, dtype=np.float32)
    x += 3.0
    dy = aligned_empty(shape)
    dy[...] = rng.standard_normal(shape, dtype=np.float32)
    return layout, x, dy, aligned_empty(shape), aligned_empty(shape)


def load_backends():
    """numba, and cython when it builds (from the registry, else its module)."""
    import fastbn

    backends = {"numba": fastbn.get_backend("numba")}
    try:
        cy = fastbn.get_backend("cython")
    except ValueError:  # not registered by the core yet: use the adapter directly
        try:
            from fastbn._backends.cython_omp import backend as cy
        except ImportError as exc:
            print(f"(cython backend not importable: {exc})", file=sys.stderr)
            cy = None
    if cy is not None:
        ok, reason = cy.is_available()
        if ok:
            backends["cython"] = cy
        else:
            print(f"(cython backend unavailable: {reason})", file=sys.stderr)
    return backends


OPS = (("fwd", "forward training"), ("infer", "inference"), ("bwd", "backward"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=9, help="rounds (L cases: half, >= 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the first-call part")
    ap.add_argument("--json", metavar="PATH", help="also save the medians as JSON")
    args = ap.parse_args(argv)

    sys.path.insert(0, ROOT)
    import numba

    import fastbn

    fastbn.set_num_threads(args.threads)
    torch_mod = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
            torch_mod = torch
        except ImportError:
            print("(torch not installed: torch columns skipped)", file=sys.stderr)
    backends = load_backends()
    print(f"fastbn numba {numba.__version__} (threading layer chosen at first use) vs "
          f"{', '.join(b for b in backends if b != 'numba') or 'no cython'}"
          + (f" vs torch {torch_mod.__version__}" if torch_mod else "")
          + f"; float32, {args.threads} threads")
    if not args.no_compile:
        report_first_calls(args.threads)

    cold = CacheFlusher()
    rng = np.random.default_rng(0)
    results, minima = {}, {}
    for case in args.cases.split(","):
        layout, x, dy, y, dx = case_arrays(case, rng)
        cont = make_contenders(backends, layout, x, dy, y, dx, torch_mod)
        for _, (setup, fn) in cont.items():  # compile and warm up, untimed
            if setup is not None:
                setup()
            fn()
        repeats = args.repeats if not case.startswith("L") else max(5, args.repeats // 2)
        results[case], minima[case] = run_round_robin(cont, repeats, cold)
        del cont, x, dy, y, dx
        gc.collect()
        print(f"{case} ({repeats} rounds, median / min ms): "
              + ", ".join(f"{k} {v * 1e3:.2f}/{minima[case][k] * 1e3:.2f}"
                          for k, v in results[case].items()), flush=True)
    print(f"\nnumba threading layer: {numba.threading_layer()}; cold caches; medians of "
          f"interleaved rounds in ms (the last column: the ratio of the minima, which "
          f"preemption by other processes on a shared machine cannot inflate)")
    summary(results, minima)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "median": results, "min": minima}, f,
                      indent=1)


def summary(results, minima):
    have_cy = any("cython fwd" in t for t in results.values())
    have_torch = any("torch fwd" in t for t in results.values())
    head = f"| {'case':7s} | {'op':17s} | {'numba':>8s} |"
    if have_cy:
        head += f" {'cython':>8s} | {'numba/cython':>12s} |"
    if have_torch:
        head += f" {'torch':>8s} | {'torch/numba':>11s} |"
    head += f" {'numba other':>14s} |"
    if have_cy:
        head += f" {'numba/cython (min)':>18s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    worst, worst_min = [], []
    for case, t in results.items():
        tmin = minima[case]
        for key, label in OPS:
            nb = t[f"numba {key}"]
            line = f"| {case:7s} | {label:17s} | {nb * 1e3:8.2f} |"
            if have_cy:
                cy = t[f"cython {key}"]
                worst.append((nb / cy, case, label))
                line += f" {cy * 1e3:8.2f} | {nb / cy:11.2f}x |"
            if have_torch:
                line += f" {t[f'torch {key}'] * 1e3:8.2f} | {t[f'torch {key}'] / nb:10.2f}x |"
            other = t.get(f"numba {key} 2-kernel") if key == "fwd" else t.get(
                f"numba {key} fused")
            line += f" {other * 1e3:14.2f} |" if other is not None else f" {'':14s} |"
            if have_cy:
                r = tmin[f"numba {key}"] / tmin[f"cython {key}"]
                worst_min.append((r, case, label))
                line += f" {r:17.2f}x |"
            print(line)
    for name, rows in (("medians", worst), ("minima", worst_min)):
        if rows:
            r, case, label = max(rows)
            print(f"{name}: slowest relative to cython {case} {label} {r:.2f}x "
                  f"(target <= 1.5x); median ratio {statistics.median(w[0] for w in rows):.2f}x")


if __name__ == "__main__":
    main()
