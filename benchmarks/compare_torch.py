"""fastbn's Cython+OpenMP kernels against memory-bandwidth floors and PyTorch.

Standalone: ``python benchmarks/compare_torch.py [--shapes S,M,L] [--repeats 9]
[--threads 2] [--no-torch]``.

Every time is the median of interleaved repeats with cold caches (a 128 MiB
buffer is written between runs, every contender once per round, so drift on a
shared machine hits them all alike). Outputs go into preallocated, 64-byte
aligned, already-touched buffers (the ``out=`` path); the public API's
allocating path is timed separately when it is available.

Floors, measured in the same process with the same threads:
  read = ``stream_read`` (every byte read once), copy = ``stream_copy``
  (non-temporal stores into an aligned, touched buffer).
  stats ~ read; forward training ~ read + copy; inference ~ copy;
  backward ~ 2 reads + copy.
Ratios below 1 mean part of the data came back from cache (a fused path
re-reads a channel from L2).
"""
import argparse
import gc
import sys
import time

import numpy as np

from fastbn.bench import CacheFlusher, aligned_empty, p90, round_robin

SHAPES = {
    "S": (32, 64, 56, 56),
    "M": (128, 256, 28, 28),
    "L": (256, 64, 112, 112),
    # (N, C) = (4096, 1024) as N x C x 1 x 1: with --layouts NHWC it is the rows view
    # (4096, 1024, 1) that an NC input gets
    "NC": (4096, 1024, 1, 1),
    "NCs": (256, 2048, 1, 1),  # a wide MLP layer's BatchNorm1d: 2 MB, per-call cost shows
}
EPS = 1e-5


def run_round_robin(contenders, repeats, cold):
    """Median and 90th-percentile seconds per contender, running them interleaved."""
    times = round_robin(contenders, repeats, cold)
    return ({name: float(np.median(v)) for name, v in times.items()},
            {name: p90(v) for name, v in times.items()})


def check_team(K, threads, cold):
    """Warn when n threads read slower than one: on a shared VM a starved vCPU
    makes every parallel region wait (seen here: 26 MB read 0.4 ms -> 8 ms)."""
    if threads < 2:
        return
    buf = np.ones(32 << 20 >> 2, dtype=np.float32)
    t = {}
    for n in (1, threads):
        ts = []
        for _ in range(5):
            cold()
            t0 = time.perf_counter()
            K.stream_read(buf, n)
            ts.append(time.perf_counter() - t0)
        t[n] = float(np.median(ts))
    print(f"read 32 MiB: 1 thread {t[1] * 1e3:.2f} ms, {threads} threads {t[threads] * 1e3:.2f} ms")
    if t[threads] > t[1]:
        print("WARNING: more threads read slower than one: a CPU is starved (shared "
              "machine); multi-thread ratios below are unreliable, rerun later.")


def torch_contenders(torch, layout, x, dy, w, b, running=None):
    """torch.nn.functional.batch_norm on the same data: forward, autograd backward and,
    given ``running = (mean, var)``, inference; NHWC data is viewed channels_last."""
    F = torch.nn.functional
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    if layout == "NHWC":  # an NCHW-shaped tensor with channels_last strides, zero-copy
        xt, dyt = xt.permute(0, 3, 1, 2), dyt.permute(0, 3, 1, 2)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    graph = {}

    def torch_fwd():
        with torch.no_grad():
            F.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)

    def torch_bwd_setup():
        graph.clear()
        xg = xt.detach().requires_grad_(True)
        wg = wt.detach().requires_grad_(True)
        bg = bt.detach().requires_grad_(True)
        graph["y"] = F.batch_norm(xg, None, None, wg, bg, training=True, eps=EPS)
        graph["in"] = (xg, wg, bg)

    def torch_bwd():
        graph["y"].backward(dyt)

    c = {"torch fwd": (None, torch_fwd)}
    if running is not None:
        rm, rv = (torch.from_numpy(r) for r in running)

        def torch_infer():
            with torch.no_grad():
                F.batch_norm(xt, rm, rv, wt, bt, training=False, eps=EPS)
        c["torch infer"] = (None, torch_infer)
    c["torch bwd"] = (torch_bwd_setup, torch_bwd)
    return c


def make_contenders(K, be, layout, x, dy, y, dx, threads, torch_mod, fastbn_api):
    """The kernels and floors for one tensor; x, dy are the user's arrays (NCHW
    or NHWC), y, dx aligned outputs of the same shape."""
    if layout == "NCHW":
        N, C, H, W = x.shape
        x3 = x.reshape(N, C, H * W)
        dy3 = dy.reshape(N, C, H * W)
        y3 = y.reshape(N, C, H * W)
        dx3 = dx.reshape(N, C, H * W)
    else:
        N, H, W, C = x.shape
        x3 = x.reshape(N * H * W, C, 1)
        dy3 = dy.reshape(N * H * W, C, 1)
        y3 = y.reshape(N * H * W, C, 1)
        dx3 = dx.reshape(N * H * W, C, 1)
    flat_x, flat_dy, flat_y = x.reshape(-1), dy.reshape(-1), y.reshape(-1)
    n = x3.shape[0] * x3.shape[2]
    w = np.linspace(0.5, 1.5, C, dtype=np.float32)
    b = np.linspace(-0.1, 0.1, C, dtype=np.float32)
    mean, m2 = K.stats(x3, threads)
    invstd = (1.0 / np.sqrt(m2 / n + EPS)).astype(np.float32)
    scale = (w * invstd).astype(np.float32)
    sdy, sdyx = K.backward_reduce(dy3, x3, mean, threads)
    k_dy = (w * invstd).astype(np.float32)
    k_x = (-w * invstd ** 3 * sdyx / n).astype(np.float32)
    k_c = (-w * invstd * sdy / n).astype(np.float32)

    def fwd_two_kernel():
        mu, s2 = be.stats(x3)
        istd = 1.0 / np.sqrt(s2 / n + EPS)
        be.normalize(x3, mu, w * istd, b, y3)

    def bwd_two_kernel():
        s1, s2 = be.backward_reduce(dy3, x3, mean)
        be.backward_elemt(dy3, x3, mean, k_dy, k_x, k_c, dx3)

    c = {
        "read": (None, lambda: K.stream_read(flat_x, threads)),
        "read dy": (None, lambda: K.stream_read(flat_dy, threads)),
        "copy": (None, lambda: K.stream_copy(flat_x, flat_y, threads)),
        "stats": (None, lambda: be.stats(x3)),
        "fwd fused/auto": (None, lambda: be.forward_train(x3, w, b, EPS, y3)),
        "fwd 2-kernel": (None, fwd_two_kernel),
        "infer": (None, lambda: be.normalize(x3, mean, scale, b, y3)),
        "bwd fused/auto": (None, lambda: be.backward_train(dy3, x3, mean, invstd, w, dx3)),
        "bwd 2-kernel": (None, bwd_two_kernel),
    }
    # a fresh output costs page faults on first touch: the allocating path's own floor
    # (last in the round: freeing 16+ MB just before a kernel slowed that kernel)
    c["alloc+touch"] = (None, lambda: np.empty_like(x).fill(0))
    if fastbn_api is not None:
        axis = 1 if layout == "NCHW" else -1
        c["fwd api alloc"] = (None, lambda: fastbn_api.batch_norm_forward(
            x, w, b, axis=axis, backend="cython"))
    if torch_mod is not None:
        c.update(torch_contenders(torch_mod, layout, x, dy, w, b))
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="S,M,L")
    ap.add_argument("--layouts", default="NCHW,NHWC")
    ap.add_argument("--repeats", type=int, default=9, help="rounds for S and M (L: half, >= 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    from fastbn._kernels import _bn_omp as K
    from fastbn._backends.cython_omp import backend as be
    import fastbn._threads as fthreads

    fthreads.set_num_threads(args.threads)
    fastbn_api = None
    try:
        import fastbn

        if hasattr(fastbn, "batch_norm_forward"):
            try:
                fastbn.get_backend("cython")
            except Exception:  # noqa: BLE001 - not registered yet by the core
                fastbn.register_backend(be)
            fastbn.set_num_threads(args.threads)
            fastbn_api = fastbn
    except Exception as exc:  # noqa: BLE001 - the public API is optional here
        print(f"(public API not used: {type(exc).__name__}: {exc})", file=sys.stderr)
    torch_mod = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(args.threads)
            torch_mod = torch
        except ImportError:
            print("(torch not installed: torch columns skipped)", file=sys.stderr)

    print(f"fastbn cython kernels, float32, {args.threads} threads, OpenMP "
          f"{'on' if K.openmp_enabled() else 'OFF'}, cold caches, medians of interleaved "
          f"rounds" + (f", torch {torch_mod.__version__}" if torch_mod else ""))
    cold = CacheFlusher()
    check_team(K, args.threads, cold)
    rng = np.random.default_rng(0)
    rows = []
    for sname in args.shapes.split(","):
        shape = SHAPES[sname]
        N, C, H, W = shape
        repeats = args.repeats if sname != "L" else max(5, args.repeats // 2)
        for layout in args.layouts.split(","):
            ushape = shape if layout == "NCHW" else (N, H, W, C)
            x = aligned_empty(ushape)
            x[...] = rng.standard_normal(ushape, dtype=np.float32)
            x += 3.0
            dy = aligned_empty(ushape)
            dy[...] = rng.standard_normal(ushape, dtype=np.float32)
            y = aligned_empty(ushape)
            dx = aligned_empty(ushape)
            cont = make_contenders(K, be, layout, x, dy, y, dx, args.threads, torch_mod,
                                   fastbn_api)
            t, t90 = run_round_robin(cont, repeats, cold)
            rows.append((sname, layout, x.nbytes, t, t90))
            del cont, x, dy, y, dx
            gc.collect()
            report_one(sname, layout, rows[-1][2], t, t90)
    print()
    summary(rows)


GOALS = {  # kernel: (floor expression, goal for S/M NCHW, goal otherwise)
    "stats": ("read", 1.10, 1.10),
    "fwd fused/auto": ("read+copy", 0.90, 1.00),
    "fwd 2-kernel": ("read+copy", None, None),
    "fwd api alloc": ("alloc+read+copy", 1.00, 1.00),
    "infer": ("copy", 1.05, 1.05),
    "bwd fused/auto": ("2read+copy", 1.10, 1.10),
    "bwd 2-kernel": ("2read+copy", None, None),
}


def floor_of(expr, t):
    return {"read": t["read"], "copy": t["copy"], "read+copy": t["read"] + t["copy"],
            "2read+copy": t["read"] + t["read dy"] + t["copy"],
            "alloc+read+copy": t["alloc+touch"] + t["read"] + t["copy"]}[expr]


def report_one(sname, layout, nbytes, t, t90):
    gbs = nbytes / t["read"] / 1e9
    print(f"\n{sname} {layout} ({nbytes / 2**20:.0f} MiB): read {t['read'] * 1e3:.2f} ms "
          f"({gbs:.1f} GB/s), copy {t['copy'] * 1e3:.2f} ms")
    print(f"  {'kernel':16s} {'ms':>8s} {'p90 ms':>8s} {'floor':>15s} {'ratio':>6s} {'goal':>6s}")
    for k, (expr, g_small, g_big) in GOALS.items():
        if k not in t:
            continue
        goal = g_small if (sname in ("S", "M") and layout == "NCHW") else g_big
        r = t[k] / floor_of(expr, t)
        mark = "" if goal is None else ("  ok" if r <= goal else "  MISSED")
        gtxt = "" if goal is None else f"<={goal:.2f}"
        print(f"  {k:16s} {t[k] * 1e3:8.2f} {t90[k] * 1e3:8.2f} {expr:>15s} {r:6.2f} "
              f"{gtxt:>6s}{mark}")
    if "torch fwd" in t:
        fgoal = 4.0 if layout == "NCHW" else 2.0
        sp = t["torch fwd"] / t["fwd fused/auto"]
        print(f"  {'torch fwd':16s} {t['torch fwd'] * 1e3:8.2f}  fastbn {sp:5.2f}x faster "
              f"(goal >= {fgoal}x){'  ok' if sp >= fgoal else '  MISSED'}")
        sp = t["torch bwd"] / t["bwd fused/auto"]
        if layout == "NCHW":
            print(f"  {'torch bwd':16s} {t['torch bwd'] * 1e3:8.2f}  fastbn {sp:5.2f}x faster "
                  f"(goal >= 2.5x){'  ok' if sp >= 2.5 else '  MISSED'}")
        else:
            print(f"  {'torch bwd':16s} {t['torch bwd'] * 1e3:8.2f}  fastbn {sp:5.2f}x faster")


def summary(rows):
    cols = ["stats", "fwd fused/auto", "fwd 2-kernel", "fwd api alloc", "infer",
            "bwd fused/auto", "bwd 2-kernel"]
    head = f"{'shape':9s}" + "".join(f"{c:>15s}" for c in cols)
    extra = any("torch fwd" in t for *_, t, _ in rows)
    if extra:
        head += f"{'vs torch fwd':>14s}{'vs torch bwd':>14s}{'p90 fwd':>9s}{'p90 bwd':>9s}"
    print("ratios to floors (stats/read, fwd/(read+copy), fwd api alloc/(alloc+touch+read+copy), "
          "infer/copy, bwd/(2 reads+copy))")
    print(head)
    for sname, layout, _, t, t90 in rows:
        line = f"{sname + ' ' + layout:9s}"
        for c in cols:
            expr = GOALS[c][0]
            line += f"{t[c] / floor_of(expr, t):15.2f}"
        if extra and "torch fwd" in t:
            line += f"{t['torch fwd'] / t['fwd fused/auto']:13.2f}x"
            line += f"{t['torch bwd'] / t['bwd fused/auto']:13.2f}x"
            line += f"{t90['torch fwd'] / t90['fwd fused/auto']:8.2f}x"
            line += f"{t90['torch bwd'] / t90['bwd fused/auto']:8.2f}x"
        print(line)


if __name__ == "__main__":
    main()
