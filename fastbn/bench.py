"""The comparison harness behind ``python -m fastbn bench`` and ``benchmarks/``.

Every contender (a registered fastbn backend, or a peer: PyTorch's CPU batch
norm, a plain NumPy implementation) runs the same case — operation x layout x
shape x dtype — on the same data with the same thread count, interleaved with
the others, and is reported as a median time, GB/s of the bytes the operation
must move, and a multiple of the memory-bandwidth floor measured in the same
run by the yardstick kernels (a noisy machine moves the floor with everything
else, so the ratio is what to compare over time).

Floors (bytes of ``x`` = B): forward training = read + copy (the statistics
read plus the normalize read-and-write: 3B), inference = copy (2B), backward =
2 reads + copy (x and dy for the reductions, again for dx, written: 5B). An
operation that returns a new array pays for its first touch (page faults,
which swing with the OS's memory state far more than bandwidth does), so its
floor copies into a freshly allocated buffer too; ``forward-training-out``
writes into a preallocated, touched ``out=`` and its floor copy does the same.
"""
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import _registry, _threads
from ._hints import install_hint, missing
from ._validate import numpy_dtype
from ._version import __version__

OPS = ("forward-training", "forward-training-out", "inference", "backward")
LAYOUTS = ("NCHW", "NHWC", "NC")
PEERS = ("torch", "numpy-naive")
DEFAULT_SHAPES = {"NCHW": [(32, 64, 56, 56)], "NHWC": [(32, 64, 56, 56)],
                  # a wide MLP layer's BatchNorm1d too: 2 MB, where per-call cost shows
                  "NC": [(4096, 1024), (256, 2048)]}
# per operation: bytes moved per byte of x; reads of x's bytes in the floor (plus one
# copy); whether the output is freshly allocated
TRAFFIC = {"forward-training": (3, 1, True), "forward-training-out": (3, 1, False),
           "inference": (2, 0, True), "backward": (5, 2, True)}


class Skip(Exception):
    """This contender cannot run this case; the message says why."""


@dataclass(frozen=True)
class Case:
    op: str
    layout: str
    shape: tuple   # logical (N, C, ...) shape; NHWC is this tensor stored channels-last
    dtype: str

    @property
    def channels(self):
        return self.shape[1]

    @property
    def nbytes(self):
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize

    @property
    def bytes_moved(self):
        return TRAFFIC[self.op][0] * self.nbytes

    @property
    def label(self):
        return f"{self.op} {self.layout} {'x'.join(map(str, self.shape))} {self.dtype}"


def git_revision():
    """The checkout's git revision, ``-dirty`` when its tree has uncommitted changes,
    when fastbn runs from one (else None: label the run with ``--label``)."""
    import os
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=here,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --- data -----------------------------------------------------------------------------

def make_data(case, seed=0):
    """x, dy (fastbn's layout for the case) and per-channel parameters, all touched."""
    rng = np.random.default_rng(seed)
    stat = np.float64 if case.dtype == "float64" else np.float32
    x = rng.standard_normal(case.shape, dtype=np.float32).astype(numpy_dtype(case.dtype))
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(numpy_dtype(case.dtype))
    if case.layout == "NHWC":  # the same tensor, channels-last in memory
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    c = case.channels
    params = dict(weight=rng.uniform(0.5, 1.5, c).astype(stat),
                  bias=rng.normal(size=c).astype(stat),
                  running_mean=np.zeros(c, stat), running_var=np.ones(c, stat))
    return x, dy, params


def _axis(case):
    return -1 if case.layout == "NHWC" else 1


def aligned_empty(shape, dtype=np.float32, align=64):
    """A 64-byte-aligned array, touched (zero-filled: its pages are faulted in, so
    streaming stores into it don't page-fault; np.zeros alone would not touch them)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    out = raw[offset:offset + n].view(dtype).reshape(shape)
    out.fill(0)
    return out


# --- contenders -----------------------------------------------------------------------

def available_contenders(requested=None):
    """Names of the fastbn CPU backends available here, then the peers installed."""
    names = [info.name for info in _registry.backends() if info.available and "cpu" in info.devices]
    names += [p for p in PEERS if peer_unavailable_reason(p) is None]
    if requested:
        unknown = [r for r in requested if r not in names]
        if unknown:
            raise ValueError(f"backend: {', '.join(unknown)} not available here; "
                             f"available: {', '.join(names)}")
        names = [n for n in names if n in requested]
    return names


def unavailable_contenders():
    """(name, reason) of every CPU backend and peer that cannot run here."""
    left_out = [(info.name, info.reason) for info in _registry.backends()
                if not info.available and "cpu" in info.devices]
    left_out += [(p, peer_unavailable_reason(p)) for p in PEERS if peer_unavailable_reason(p)]
    return left_out


def peer_unavailable_reason(name):
    if name == "torch":
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            return missing("torch", "torch==2.13.0", "bench")
    return None


def prepare(contender, case, threads):
    """A zero-argument callable running ``case`` on ``contender`` (inputs prepared once)."""
    if contender == "torch":
        return _prepare_torch(case, threads)
    if contender == "numpy-naive":
        return _prepare_numpy_naive(case)
    return _prepare_fastbn(contender, case, threads)


def _prepare_fastbn(name, case, threads):
    import fastbn
    backend = fastbn.get_backend(name)
    if case.dtype not in backend.dtypes:
        raise Skip(f"{name} does not serve {case.dtype}")
    x, dy, p = make_data(case)
    axis = _axis(case)
    out = aligned_empty(x.shape, x.dtype) if case.op == "forward-training-out" else None

    # the thread count is set once for the run (run_cases), as torch's is: no per-call context
    def forward():
        fastbn.batch_norm_forward(x, p["weight"], p["bias"], running_mean=p["running_mean"],
                                  running_var=p["running_var"], training=True, axis=axis, out=out,
                                  backend=name)

    def inference():
        fastbn.batch_norm_forward(x, p["weight"], p["bias"], running_mean=p["running_mean"],
                                  running_var=p["running_var"], training=False, axis=axis,
                                  backend=name)

    if case.op == "backward":  # the statistics a backward pass is handed
        fwd = fastbn.batch_norm_forward(x, p["weight"], p["bias"], axis=axis, backend=name)

    def backward():
        fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, weight=p["weight"], axis=axis,
                                   backend=name)

    return {"inference": inference, "backward": backward}.get(case.op, forward)


def _prepare_torch(case, threads):
    import torch
    import torch.nn.functional as F
    if case.op == "forward-training-out":
        raise Skip("torch.nn.functional.batch_norm has no out= argument")
    torch.set_num_threads(threads)
    x, dy, p = make_data(case)
    if case.dtype == "bfloat16":  # torch reads no ml_dtypes array: the same bits, as int16
        x, dy = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for a in (x, dy))
    else:
        x, dy = torch.from_numpy(x), torch.from_numpy(dy)
    if case.layout == "NHWC":  # back to logical NCHW, channels_last memory: no copy
        xt, dyt = (a.permute(0, 3, 1, 2) for a in (x, dy))
        assert xt.is_contiguous(memory_format=torch.channels_last)
    else:
        xt, dyt = x, dy
    pt = {k: torch.from_numpy(v) for k, v in p.items()}
    eps = 1e-5

    def forward():
        F.batch_norm(xt, pt["running_mean"], pt["running_var"], pt["weight"], pt["bias"],
                     training=True, momentum=0.1, eps=eps)

    def inference():
        F.batch_norm(xt, pt["running_mean"], pt["running_var"], pt["weight"], pt["bias"],
                     training=False, eps=eps)

    # the backward kernel alone (what autograd calls), with the saved statistics
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        xt, pt["weight"], pt["bias"], None, None, True, 0.1, eps)

    def backward():
        torch.ops.aten.native_batch_norm_backward(
            dyt, xt, pt["weight"], None, None, save_mean, save_invstd, True, eps,
            [True, True, True])

    return {"inference": inference, "backward": backward}.get(case.op, forward)


def _prepare_numpy_naive(case):
    """BN as a NumPy user would write it: mean, var, then the formula.

    (In float16 its variance overflows for large inputs: that is the peer's
    behaviour, measured as is, with the warnings silenced.)
    """
    if case.op == "forward-training-out":
        raise Skip("the plain NumPy version allocates its output")
    x, dy, p = make_data(case)
    axis = _axis(case) % x.ndim
    axes = tuple(a for a in range(x.ndim) if a != axis)
    bshape = [1] * x.ndim
    bshape[axis] = x.shape[axis]
    w, b = p["weight"].reshape(bshape), p["bias"].reshape(bshape)
    rm, rv = p["running_mean"].reshape(bshape), p["running_var"].reshape(bshape)
    eps = 1e-5

    def forward():
        with np.errstate(over="ignore", invalid="ignore"):
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            return (x - mean) / np.sqrt(var + eps) * w + b

    def inference():
        return (x - rm) / np.sqrt(rv + eps) * w + b

    with np.errstate(over="ignore", invalid="ignore"):
        mean = x.mean(axis=axes, keepdims=True)
        invstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)

    def backward():
        xhat = (x - mean) * invstd
        dbias = dy.sum(axis=axes, keepdims=True)
        dweight = (dy * xhat).sum(axis=axes, keepdims=True)
        n = x.size / x.shape[axis]
        return w * invstd * (dy - dbias / n - xhat * dweight / n), dweight, dbias

    return {"inference": inference, "backward": backward}.get(case.op, forward)


# --- floors ---------------------------------------------------------------------------

def floor_kernels(case, threads):
    """A callable doing the floor traffic of ``case`` with the yardstick kernels."""
    try:
        from ._kernels._bn_omp import stream_copy, stream_read
        kind = "yardstick"
    except ImportError:  # no extension: NumPy's own sum and copy, flagged in results
        def stream_read(a, _):
            a.sum()

        def stream_copy(a, b, _):
            np.copyto(b, a)
        kind = "numpy"
    _, reads, allocates = TRAFFIC[case.op]
    n = case.nbytes // 4
    sources = [aligned_empty((n,), np.float32) for _ in range(max(1, reads))]
    for k, a in enumerate(sources):
        a[...] = k + 1.0
    touched = aligned_empty((n,), np.float32)

    def run():
        for a in sources[:reads]:
            stream_read(a, threads)
        stream_copy(sources[0], np.empty(n, np.float32) if allocates else touched, threads)
    return run, kind


# --- timing ---------------------------------------------------------------------------

def _time_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class CacheFlusher:
    """Evicts the caches by writing a buffer larger than the last-level cache.

    S and M shapes fit in this machine kind's 32 MiB L3: without a flush a
    contender re-reads its input from cache and beats the memory floor.
    """

    def __init__(self, nbytes=128 << 20):
        self.buffer = np.ones(nbytes // 8)

    def __call__(self):
        self.buffer[::8] += 1.0  # one write per 64-byte line


def round_robin(contenders, repeats, flush):
    """{name: [seconds, ...]}: every contender once per round, in turn, each after a flush.

    ``contenders`` maps a name to ``(setup, fn)``; ``setup`` (or None) runs untimed
    before the flush.
    """
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (setup, fn) in contenders.items():
            if setup is not None:
                setup()
            flush()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def p90(times):
    """The 90th percentile (nearest rank): the time 9 calls in 10 stay within."""
    ordered = sorted(times)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def run_cases(cases, contenders, *, threads=None, repeats=15, progress=None, cold=True):
    """Time every contender on every case, interleaved; one result dict per pair.

    Per case: one warm-up call each, then ``repeats`` rounds in which every
    contender and the floor run once, in turn, each after a cache flush when
    ``cold``. Medians and 90th percentiles are reported, and each contender's
    ratios to torch for both.
    """
    threads = threads or _threads.get_num_threads()
    before = _threads._global
    _threads.set_num_threads(threads)  # fastbn's count, set once as torch's is
    try:
        return _run_cases(cases, contenders, threads, repeats, progress, cold)
    finally:
        _threads.set_num_threads(before)


def _run_cases(cases, contenders, threads, repeats, progress, cold):
    flush = CacheFlusher() if cold else (lambda: None)
    results = []
    total = len(cases) * len(contenders)
    done = 0
    for case in cases:
        runners, skipped = {}, {}
        for name in contenders:
            try:
                runners[name] = prepare(name, case, threads)
            except Skip as why:
                skipped[name] = str(why)
        floor_fn, floor_kind = floor_kernels(case, threads)
        for fn in list(runners.values()) + [floor_fn]:
            fn()  # warm-up: first-touch, caches, JIT
        times = {name: [] for name in runners}
        floor_times = []
        for _ in range(repeats):
            flush()
            floor_times.append(_time_once(floor_fn))
            for name, fn in runners.items():
                flush()
                times[name].append(_time_once(fn))
        floor = statistics.median(floor_times)
        torch_median = statistics.median(times["torch"]) if "torch" in times else None
        torch_p90 = p90(times["torch"]) if "torch" in times else None
        for name in contenders:
            done += 1
            if progress:
                progress(done, total, f"{name} {case.label}")
            row = dict(contender=name, **asdict(case), threads=threads, repeats=repeats,
                       caches="cold" if cold else "warm",
                       bytes_moved=case.bytes_moved, floor_s=floor, floor_kind=floor_kind,
                       fastbn=__version__)
            if name in skipped:
                results.append(dict(row, skipped=skipped[name]))
                continue
            median, tail = statistics.median(times[name]), p90(times[name])
            fastest = min(times[name])
            results.append(dict(row, median_s=median, p90_s=tail, min_s=fastest,
                                floor_ratio_min=fastest / min(floor_times),
                                gbps=case.bytes_moved / median / 1e9,
                                floor_ratio=median / floor,
                                speedup_vs_torch=(torch_median / median
                                                  if torch_median else None),
                                p90_speedup_vs_torch=(torch_p90 / tail if torch_p90 else None)))
    return results


def progress_bar(done, total, label, width=30, stream=sys.stderr):
    filled = int(width * done / total)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
    if done == total:
        stream.write("\n")
    stream.flush()


_COLUMNS = ("backend", "operation", "layout", "shape", "dtype", "median ms", "p90 ms", "GB/s",
            "x floor", "vs torch", "p90 vs torch")


def _cells(r):
    """One result as the table's cells (a skipped one: the reason in the first number's)."""
    head = [r["contender"], r["op"], r["layout"], "x".join(map(str, r["shape"])), r["dtype"]]
    if "skipped" in r:
        return head + [f"skipped: {r['skipped']}"]
    vs, vs90 = (f"{r[k]:.2f}x" if r[k] else "-"
                for k in ("speedup_vs_torch", "p90_speedup_vs_torch"))
    return head + [f"{r['median_s'] * 1e3:.3f}", f"{r['p90_s'] * 1e3:.3f}", f"{r['gbps']:.1f}",
                   f"{r['floor_ratio']:.2f}", vs, vs90]


def format_table(results):
    """A text table: one row per contender and case."""
    widths = (12, 21, 5, 14, 8, 10, 8, 7, 8, 9, 12)
    def row(cells):
        text = [f"{c:<{w}}" if i < 5 else f"{c:>{w}}"
                for i, (c, w) in enumerate(zip(cells, widths))]
        return " ".join(text) if len(cells) == len(widths) else " ".join(text[:5]) + " " + cells[5]
    header = row(_COLUMNS)
    return "\n".join([header, "-" * len(header)] + [row(_cells(r)) for r in results])


def format_markdown(results, settings, left_out=()):
    """The table as Markdown, with the run's settings and what was left out, for a README."""
    lines = [f"*{settings}.*", "", "| " + " | ".join(_COLUMNS) + " |",
             "|" + "|".join("---" if i < 5 else "---:" for i in range(len(_COLUMNS))) + "|"]
    for r in results:
        cells = _cells(r)
        cells += [""] * (len(_COLUMNS) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    if left_out:
        lines += [""] + [f"- `{name}` left out: {why}" for name, why in left_out]
    return "\n".join(lines)


def plot(results, path):
    """Bar chart of the floor ratio (lower is better) per case and contender."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit(f"--plot needs matplotlib: {install_hint('matplotlib', 'bench')}") \
            from None
    rows = [r for r in results if "skipped" not in r]
    cases = list(dict.fromkeys((r["op"], r["layout"], r["dtype"]) for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    ratio = {(r["op"], r["layout"], r["dtype"], r["contender"]): r["floor_ratio"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(9, 1.2 * len(cases) + 2), 5))
    width = 0.8 / max(1, len(contenders))
    for k, name in enumerate(contenders):
        xs = [i + k * width for i in range(len(cases))]
        ys = [ratio.get(c + (name,), float("nan")) for c in cases]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{op}\n{layout} {dtype}" for op, layout, dtype in cases], fontsize=8)
    ax.set_ylabel("time / memory-bandwidth floor (lower is better)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%g")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    threads = rows[0]["threads"] if rows else "?"
    ax.set_title(f"fastbn {__version__}: batch norm vs the memory floor ({threads} threads)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
