"""The backend conformance kit: what fastbn expects of a backend, checked against ONE.

Each check is a small named function run for one dtype and one device the backend
declares. Kernel checks come first and call each kernel on its own, on both
families and their edges (planes and rows, one channel, many channels, one huge
channel), against the NumPy reference computed in float64; then the public paths
run with the backend forced (fused kernels shown and hidden), then gradients,
running statistics, aliasing, read-only inputs, threads. Every kernel call made
by the kit is also checked for the contract itself: inputs (passed read-only)
left alone, the result's arity/shape/dtype, the output written in place, and a
``NotImplemented`` returned before anything was written. The first failure
raises :class:`BackendCheckError` naming the check, the kernel, dtype and shape.
"""
import sys
import threading
from typing import Callable, NamedTuple

import numpy as np

from .. import _api, _registry, _threads
from .._backends.numpy_ref import NumpyReference
from .._registry import (EPILOGUE_KERNELS, FUSED_KERNELS, REQUIRED_KERNELS,
                         WRITE_AND_REDUCE_KERNELS, BackendContractError)
from .._validate import STAT_DTYPE, canonical, kernel_vectors, kernel_wrote
from ._helpers import direct_backward, direct_forward, numpy_dtype, to_numpy, tolerance

#: The oracle: the NumPy reference backend (float64 arithmetic, two-pass statistics).
ReferenceBackend = NumpyReference
_REF = NumpyReference()
_WRITES = {"normalize", "backward_elemt", "forward_train", "backward_train",
           "normalize_epilogue", "forward_train_epilogue", "backward_elemt_relu",
           "backward_train_relu"}
_WRITES_DZ = {"backward_elemt_relu", "backward_train_relu"}  # dz3 (or None) before the output

# (O, C, I) views: both kernel families and their edges
SHAPES = {
    "planes": (4, 6, 9),
    "planes, odd run": (3, 5, 67),
    "rows": (16, 6, 1),
    "rows, wide": (37, 130, 1),
    "one channel, planes": (8, 1, 33),
    "one channel, rows": (301, 1, 1),
    "many channels, planes": (3, 1000, 2),
    "many channels, rows": (12, 1000, 1),
    "one huge channel": (2, 1, 300_000),
    "tall rows": (5000, 64, 1),
}


def _channels_last(a):
    """An NCHW-shaped array whose memory is NHWC (as torch's channels_last)."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(0, 3, 1, 2)


# logical inputs of the public functions: name -> (shape, channel axis, memory transform)
LAYOUTS = {
    "NC": ((16, 6), 1, None),
    "NCL": ((4, 6, 9), 1, None),
    "NCHW": ((3, 6, 5, 7), 1, None),
    "NCDHW": ((2, 6, 3, 4, 5), 1, None),
    "NHWC": ((3, 5, 7, 6), -1, None),
    "NCHW-channels_last": ((3, 6, 5, 7), 1, _channels_last),
    "NCHW-strided": ((3, 6, 5, 7), 1, lambda a: np.repeat(a, 2, axis=3)[..., ::2]),
    "NCL-reversed": ((4, 6, 9), 1, lambda a: np.ascontiguousarray(a[:, :, ::-1])[:, :, ::-1]),
}


class BackendCheckError(AssertionError):
    """A backend failed a check of the conformance kit; the message names the check,
    the kernel(s), the dtype and the shape."""


class BackendCheck(NamedTuple):
    """One check of the kit for one dtype and device; call it to run it."""

    check: str
    dtype: str
    device: str
    run: Callable[[], None]

    @property
    def id(self):
        return f"{self.check}[{self.dtype}-{self.device}]"

    def __call__(self):
        self.run()


# --- one check's context ------------------------------------------------------------------

class _Context:
    """The backend, dtype and device of one check; makes data, calls kernels, compares."""

    def __init__(self, backend, check, dtype, device):
        self.backend, self.check, self.dtype, self.device = backend, check, dtype, device
        self.np_dtype = numpy_dtype(dtype)  # bfloat16: ml_dtypes'
        self.stat = STAT_DTYPE[dtype]
        self.xp = np if device == "cpu" else _cupy()
        self.rng = np.random.default_rng(20261202)
        self.served = {}

    def fail(self, kernel, shape, detail):
        where = f"kernel {kernel!r}" if isinstance(kernel, str) else \
            "kernels " + (", ".join(repr(k) for k in kernel) or "(none)")
        raise BackendCheckError(
            f"backend {self.backend.name!r} failed check {self.check!r} ({where}, {self.dtype}, "
            f"{'shape (O, C, I) = ' if len(shape) == 3 else 'x of shape '}{tuple(shape)}, "
            f"device {self.device}): {detail}")

    # data: host NumPy arrays; dev() moves one to the device, read-only on the host
    def data(self, shape, axis=1, loc=3.0):
        """Channels with different means and scales, so a channel mix-up shows."""
        c = shape[axis]
        bshape = [1] * len(shape)
        bshape[axis] = c
        mean = self.rng.uniform(-loc, loc, c).reshape(bshape)
        scale = self.rng.uniform(0.5, 2.0, c).reshape(bshape)
        return (self.rng.standard_normal(shape) * scale + mean).astype(self.np_dtype)

    def vector(self, c, low, high):
        return self.rng.uniform(low, high, c).astype(self.stat)

    def dev(self, a, read_only=True):
        if self.xp is np:
            a = np.array(a)
            a.setflags(write=not read_only)
            return a
        return self.xp.asarray(a)

    def nan_like(self, shape):
        return self.xp.full(shape, np.nan, dtype=self.np_dtype)

    # kernels
    def call(self, kernel, *args):
        """One kernel call of the backend under test, held to the kernel contract.

        Returns the result, or NotImplemented when the kernel declined.
        """
        x3 = args[0]  # every (O, C, I) argument has x3's shape and dtype
        shape = tuple(x3.shape)
        out = args[-1] if kernel in _WRITES else None
        dz = args[-2] if kernel in _WRITES_DZ else None
        inputs = [a for a in args if hasattr(a, "shape") and a is not out and a is not dz]
        before = [self.xp.array(a, copy=True) for a in inputs + ([out] if out is not None
                                                                else [])]
        try:
            result = getattr(self.backend, kernel)(*args)
        except BackendCheckError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as this kernel's failure
            hint = (" (the kit passes inputs read-only: a kernel writes only its output)"
                    if "read-only" in str(exc) else "")
            self.fail(kernel, shape, f"raised {type(exc).__name__}: {exc}{hint}")
        for a, copy in zip(inputs, before):
            if out is not None and _shares(a, out):
                continue  # normalize(x3, ..., y3=x3): the input is the output
            if not _same_bits(a, copy):
                self.fail(kernel, shape, "modified an input array; kernels only write their "
                                         "output")
        if result is NotImplemented:
            if out is not None and not _same_bits(out, before[-1]):
                changed = int(to_numpy(_bits(out) != _bits(before[-1])).sum())
                self.fail(kernel, shape, f"returned NotImplemented after writing {changed} of "
                                         f"{out.size} output values; a kernel declines before "
                                         f"it writes anything")
            return NotImplemented
        where = (self.backend.name, kernel)
        try:
            if kernel in _WRITES and kernel not in WRITE_AND_REDUCE_KERNELS:
                kernel_wrote(result, where)
            else:
                kernel_vectors(result, where, canonical(x3, 1))
        except BackendContractError as exc:
            self.fail(kernel, shape, str(exc))
        self.served[kernel] = self.served.get(kernel, 0) + 1
        return result

    def require_served(self, kernel):
        if not self.served.get(kernel):
            self.fail(kernel, (), "declined every call of this check; a backend declares the "
                                  "dtypes and devices it serves and may decline only some calls")

    def expect(self, kernel, shape, what, got, want, dtype, factor=1.0):
        """``got`` within ``factor`` times the tolerance of ``dtype`` of ``want``."""
        got = to_numpy(got).astype(np.float64)
        want = np.asarray(want, dtype=np.float64)
        rtol, atol = (t * factor for t in tolerance(dtype))
        scale = float(np.max(np.abs(want[np.isfinite(want)]), initial=1.0))
        try:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)
        except AssertionError as exc:
            self.fail(kernel, shape, f"{what} differs from the reference:{exc}")


def _cupy():
    import cupy
    return cupy


def _bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _same_bits(a, b):
    return bool((_bits(a) == _bits(b)).all())


def _shares(a, b):
    return a is b or (a.shape == b.shape and a.data.ptr == b.data.ptr
                      if not isinstance(a, np.ndarray) else np.shares_memory(a, b))


# --- float64 expectations, from the reference kernels -----------------------------------

def _normalized(x3, mean, scale, shift):
    y = np.empty(x3.shape, np.float64)
    _REF.normalize(x3, mean, scale, shift, y)
    return y


def _sums64(dy3, x3, mean):
    dy = dy3.astype(np.float64)
    return dy.sum(axis=(0, 2)), (dy * (x3.astype(np.float64) - mean[:, None])).sum(axis=(0, 2))


def _elemt64(dy3, x3, mean, k_dy, k_x, k_c):
    dx = np.empty(x3.shape, np.float64)
    _REF.backward_elemt(dy3, x3, mean, k_dy, k_x, k_c, dx)
    return dx


def _batch_stats64(x3):
    x = x3.astype(np.float64)
    return x.mean(axis=(0, 2)), x.var(axis=(0, 2))


def _backward_coefficients(weight, invstd, sum_dy, sum_dy_xmu, n):
    """The core's fold for the training backward, in float64."""
    k_dy = weight.astype(np.float64) * invstd
    return k_dy, -k_dy * invstd * invstd * sum_dy_xmu / n, -k_dy * sum_dy / n


# --- kernel checks ----------------------------------------------------------------------------

def check_stats(ctx):
    for shape in SHAPES.values():
        x3 = ctx.data(shape)
        got = ctx.call("stats", ctx.dev(x3))
        if got is NotImplemented:
            continue
        mean, m2 = _REF.stats(x3)
        ctx.expect("stats", shape, "mean", got[0], mean, ctx.stat)
        ctx.expect("stats", shape, "m2 (sum of squared deviations)", got[1], m2, ctx.stat)
    ctx.require_served("stats")


def check_normalize(ctx):
    for shape in SHAPES.values():
        x3, c = ctx.data(shape), shape[1]
        mean, scale, shift = ctx.vector(c, -3, 3), ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1)
        y3 = ctx.nan_like(shape)
        if ctx.call("normalize", ctx.dev(x3), ctx.dev(mean), ctx.dev(scale), ctx.dev(shift),
                    y3) is NotImplemented:
            continue
        ctx.expect("normalize", shape, "y3", y3, _normalized(x3, mean, scale, shift), ctx.dtype)
    ctx.require_served("normalize")


def check_normalize_in_place(ctx):
    """``normalize(x3, ..., y3=x3)``: what ``out=x`` asks of a kernel."""
    for shape in SHAPES.values():
        x3, c = ctx.data(shape), shape[1]
        mean, scale, shift = ctx.vector(c, -3, 3), ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1)
        xy3 = ctx.dev(x3, read_only=False)
        if ctx.call("normalize", xy3, ctx.dev(mean), ctx.dev(scale), ctx.dev(shift),
                    xy3) is NotImplemented:
            continue
        ctx.expect("normalize", shape, "y3 written over x3 (y3 is x3)", xy3,
                   _normalized(x3, mean, scale, shift), ctx.dtype)
    ctx.require_served("normalize")


def check_backward_reduce(ctx):
    for shape in SHAPES.values():
        x3, dy3 = ctx.data(shape), ctx.data(shape, loc=1.0)
        mean = _batch_stats64(x3)[0].astype(ctx.stat)
        got = ctx.call("backward_reduce", ctx.dev(dy3), ctx.dev(x3), ctx.dev(mean))
        if got is NotImplemented:
            continue
        sum_dy, sum_dy_xmu = _sums64(dy3, x3, mean)
        ctx.expect("backward_reduce", shape, "sum_dy", got[0], sum_dy, ctx.stat)
        ctx.expect("backward_reduce", shape, "sum_dy_xmu", got[1], sum_dy_xmu, ctx.stat)
    ctx.require_served("backward_reduce")


def check_backward_elemt(ctx):
    for shape in SHAPES.values():
        x3, dy3, c = ctx.data(shape), ctx.data(shape, loc=1.0), shape[1]
        mean = ctx.vector(c, -3, 3)
        k_dy, k_x, k_c = ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1), ctx.vector(c, -1, 1)
        dx3 = ctx.nan_like(shape)
        if ctx.call("backward_elemt", ctx.dev(dy3), ctx.dev(x3), ctx.dev(mean), ctx.dev(k_dy),
                    ctx.dev(k_x), ctx.dev(k_c), dx3) is NotImplemented:
            continue
        ctx.expect("backward_elemt", shape, "dx3", dx3,
                   _elemt64(dy3, x3, mean, k_dy, k_x, k_c), ctx.dtype)
    ctx.require_served("backward_elemt")


def check_forward_train(ctx):
    """The fused training forward on its own: statistics and y of the composition."""
    eps = 1e-3
    for shape in SHAPES.values():
        x3, c = ctx.data(shape), shape[1]
        weight, bias = ctx.vector(c, 0.5, 1.5), ctx.vector(c, -1, 1)
        y3 = ctx.nan_like(shape)
        got = ctx.call("forward_train", ctx.dev(x3), ctx.dev(weight), ctx.dev(bias), eps, y3)
        if got is NotImplemented:
            continue
        mean, m2 = _REF.stats(x3)
        ctx.expect("forward_train", shape, "mean", got[0], mean, ctx.stat)
        ctx.expect("forward_train", shape, "m2", got[1], m2, ctx.stat)
        mean64, var64 = _batch_stats64(x3)
        ctx.expect("forward_train", shape, "y3", y3,
                   _normalized(x3, mean64, weight / np.sqrt(var64 + eps), bias), ctx.dtype)
    ctx.require_served("forward_train")


def check_backward_train(ctx):
    """The fused training backward on its own: the sums and dx of the composition."""
    for shape in SHAPES.values():
        x3, dy3, c = ctx.data(shape), ctx.data(shape, loc=1.0), shape[1]
        mean64, var64 = _batch_stats64(x3)
        mean, invstd = mean64.astype(ctx.stat), (1 / np.sqrt(var64 + 1e-3)).astype(ctx.stat)
        weight = ctx.vector(c, 0.5, 1.5)
        dx3 = ctx.nan_like(shape)
        got = ctx.call("backward_train", ctx.dev(dy3), ctx.dev(x3), ctx.dev(mean),
                       ctx.dev(invstd), ctx.dev(weight), dx3)
        if got is NotImplemented:
            continue
        sum_dy, sum_dy_xmu = _sums64(dy3, x3, mean)
        ctx.expect("backward_train", shape, "sum_dy", got[0], sum_dy, ctx.stat)
        ctx.expect("backward_train", shape, "sum_dy_xmu", got[1], sum_dy_xmu, ctx.stat)
        n = shape[0] * shape[2]
        k = _backward_coefficients(weight, invstd.astype(np.float64), sum_dy, sum_dy_xmu, n)
        ctx.expect("backward_train", shape, "dx3", dx3, _elemt64(dy3, x3, mean, *k), ctx.dtype)
    ctx.require_served("backward_train")


# --- epilogues: y = relu(bn(x) + z) and its gradient (optional kernels) ----------------------

_EPILOGUE_CASES = ((None, True), ("z", False), ("z", True))  # (residual, relu)


def _epilogue64(y64, z3, relu):
    y = y64 + (0.0 if z3 is None else z3.astype(np.float64))
    return np.maximum(y, 0.0) if relu else y


def check_normalize_epilogue(ctx):
    """y3 = relu((x3 - mean) * scale + shift + z3), also written over z3 (out=residual)."""
    for shape in SHAPES.values():
        x3, c = ctx.data(shape), shape[1]
        mean, scale, shift = ctx.vector(c, -3, 3), ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1)
        for residual, relu in _EPILOGUE_CASES + (("z is y3", True),):
            z3 = None if residual is None else ctx.data(shape, loc=0.0)
            want = _epilogue64(_normalized(x3, mean, scale, shift), z3, relu)
            if residual == "z is y3":
                y3 = z = ctx.dev(z3, read_only=False)
            else:
                y3, z = ctx.nan_like(shape), None if z3 is None else ctx.dev(z3)
            if ctx.call("normalize_epilogue", ctx.dev(x3), ctx.dev(mean), ctx.dev(scale),
                        ctx.dev(shift), z, relu, y3) is NotImplemented:
                continue
            ctx.expect("normalize_epilogue", shape, f"y3 (residual: {residual}, relu: {relu})",
                       y3, want, ctx.dtype)
    # relu keeps NaN (torch.relu): a max(v, 0) that drops it hides a poisoned input
    shape = SHAPES["planes, odd run"]
    x3, c = ctx.data(shape), shape[1]
    x3[1, 2, 5] = np.nan
    ones, zeros = np.ones(c, ctx.stat), np.zeros(c, ctx.stat)
    y3 = ctx.nan_like(shape)
    with np.errstate(invalid="ignore"):
        if ctx.call("normalize_epilogue", ctx.dev(x3), ctx.dev(zeros), ctx.dev(ones),
                    ctx.dev(zeros), None, True, y3) is not NotImplemented:
            y = to_numpy(y3)
            if not np.isnan(y[1, 2, 5]) or np.isnan(y).sum() != 1:
                ctx.fail("normalize_epilogue", shape, f"relu of a NaN gave {y[1, 2, 5]!r} "
                                                      f"({int(np.isnan(y).sum())} NaNs in y3); "
                                                      f"relu keeps NaN, as torch.relu")
    ctx.require_served("normalize_epilogue")


def check_forward_train_epilogue(ctx):
    """The fused training forward with the epilogue: statistics of x, y with the epilogue."""
    eps = 1e-3
    for shape in SHAPES.values():
        x3, c = ctx.data(shape), shape[1]
        weight, bias = ctx.vector(c, 0.5, 1.5), ctx.vector(c, -1, 1)
        mean64, var64 = _batch_stats64(x3)
        y64 = _normalized(x3, mean64, weight / np.sqrt(var64 + eps), bias)
        for residual, relu in _EPILOGUE_CASES:
            z3 = None if residual is None else ctx.data(shape, loc=0.0)
            y3 = ctx.nan_like(shape)
            got = ctx.call("forward_train_epilogue", ctx.dev(x3), ctx.dev(weight), ctx.dev(bias),
                           eps, None if z3 is None else ctx.dev(z3), relu, y3)
            if got is NotImplemented:
                continue
            mean, m2 = _REF.stats(x3)
            ctx.expect("forward_train_epilogue", shape, "mean", got[0], mean, ctx.stat)
            ctx.expect("forward_train_epilogue", shape, "m2", got[1], m2, ctx.stat)
            ctx.expect("forward_train_epilogue", shape,
                       f"y3 (residual: {residual}, relu: {relu})", y3,
                       _epilogue64(y64, z3, relu), ctx.dtype)
    ctx.require_served("forward_train_epilogue")


def _relu_case(ctx, shape):
    """x3, dy3 and a saved output y3 with about half its values <= 0 (some exactly 0)."""
    x3, dy3 = ctx.data(shape), ctx.data(shape, loc=1.0)
    y3 = ctx.data(shape, loc=0.0)
    y3 = np.where(y3 < 0, np.zeros((), y3.dtype), y3)
    g64 = np.where(y3.astype(np.float64) > 0, dy3.astype(np.float64), 0.0)
    return x3, dy3, y3, g64


def _expect_dz(ctx, kernel, shape, dz3, g64):
    if dz3 is not None and not np.array_equal(to_numpy(dz3).astype(np.float64), g64):
        ctx.fail(kernel, shape, "dz3 is not dy where y > 0 and 0 elsewhere, exactly")


def check_backward_relu(ctx):
    """backward_reduce_relu and backward_elemt_relu: dy masked where the saved y is not > 0."""
    for shape in SHAPES.values():
        x3, dy3, y3, g64 = _relu_case(ctx, shape)
        c = shape[1]
        mean = _batch_stats64(x3)[0].astype(ctx.stat)
        got = ctx.call("backward_reduce_relu", ctx.dev(dy3), ctx.dev(y3), ctx.dev(x3),
                       ctx.dev(mean))
        if got is not NotImplemented:
            sum_g, sum_g_xmu = _sums64(g64, x3, mean)
            ctx.expect("backward_reduce_relu", shape, "sum(g)", got[0], sum_g, ctx.stat)
            ctx.expect("backward_reduce_relu", shape, "sum(g * (x - mean))", got[1], sum_g_xmu,
                       ctx.stat)
        k_dy, k_x, k_c = ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1), ctx.vector(c, -1, 1)
        for with_dz in (False, True):
            dz3 = ctx.nan_like(shape) if with_dz else None
            dx3 = ctx.nan_like(shape)
            if ctx.call("backward_elemt_relu", ctx.dev(dy3), ctx.dev(y3), ctx.dev(x3),
                        ctx.dev(mean), ctx.dev(k_dy), ctx.dev(k_x), ctx.dev(k_c), dz3,
                        dx3) is NotImplemented:
                continue
            ctx.expect("backward_elemt_relu", shape, "dx3", dx3,
                       _elemt64(g64, x3, mean, k_dy, k_x, k_c), ctx.dtype)
            _expect_dz(ctx, "backward_elemt_relu", shape, dz3, g64)
    ctx.require_served("backward_reduce_relu")
    ctx.require_served("backward_elemt_relu")


def check_backward_train_relu(ctx):
    """The fused training backward with the relu mask (and dz3)."""
    for shape in SHAPES.values():
        x3, dy3, y3, g64 = _relu_case(ctx, shape)
        c = shape[1]
        mean64, var64 = _batch_stats64(x3)
        mean, invstd = mean64.astype(ctx.stat), (1 / np.sqrt(var64 + 1e-3)).astype(ctx.stat)
        weight = ctx.vector(c, 0.5, 1.5)
        for with_dz in (False, True):
            dz3 = ctx.nan_like(shape) if with_dz else None
            dx3 = ctx.nan_like(shape)
            got = ctx.call("backward_train_relu", ctx.dev(dy3), ctx.dev(y3), ctx.dev(x3),
                           ctx.dev(mean), ctx.dev(invstd), ctx.dev(weight), dz3, dx3)
            if got is NotImplemented:
                continue
            sum_g, sum_g_xmu = _sums64(g64, x3, mean)
            ctx.expect("backward_train_relu", shape, "sum(g)", got[0], sum_g, ctx.stat)
            ctx.expect("backward_train_relu", shape, "sum(g * (x - mean))", got[1], sum_g_xmu,
                       ctx.stat)
            k = _backward_coefficients(weight, invstd.astype(np.float64), sum_g, sum_g_xmu,
                                       shape[0] * shape[2])
            ctx.expect("backward_train_relu", shape, "dx3", dx3, _elemt64(g64, x3, mean, *k),
                       ctx.dtype)
            _expect_dz(ctx, "backward_train_relu", shape, dz3, g64)
    ctx.require_served("backward_train_relu")


def check_nonfinite_stays_in_its_channel(ctx):
    """A NaN or inf poisons its own channel's statistics and elements, and no other."""
    fused = {k for k in FUSED_KERNELS if getattr(ctx.backend, k, None) is not None}
    for shape in (SHAPES["planes"], SHAPES["rows"], SHAPES["planes, odd run"]):
        c, bad_c = shape[1], 2
        clean = np.arange(c) != bad_c
        for bad in (np.nan, np.inf, -np.inf):
            x3 = ctx.data(shape)
            x3[1, bad_c, shape[2] // 2] = bad

            def poisoned(kernel, what, got, want, dtype):
                got = to_numpy(got)
                if np.isfinite(got[bad_c]).all():
                    ctx.fail(kernel, shape, f"a {bad} in channel {bad_c} left {what} finite "
                                            f"there ({got[bad_c]!r}); it must be NaN or inf")
                ctx.expect(kernel, shape, f"{what} of the clean channels", got[clean],
                           np.asarray(want)[clean], dtype)

            with np.errstate(invalid="ignore", over="ignore"):
                got = ctx.call("stats", ctx.dev(x3))
                if got is not NotImplemented:
                    mean, m2 = _REF.stats(x3)
                    poisoned("stats", "m2", got[1], m2, ctx.stat)
                    ctx.expect("stats", shape, "mean of the clean channels",
                               to_numpy(got[0])[clean], mean[clean], ctx.stat)
                if "forward_train" in fused:
                    y3 = ctx.nan_like(shape)
                    w, b = np.ones(c, ctx.stat), np.zeros(c, ctx.stat)
                    got = ctx.call("forward_train", ctx.dev(x3), ctx.dev(w), ctx.dev(b), 1e-5, y3)
                    if got is not NotImplemented:
                        mean, m2 = _REF.stats(x3)
                        poisoned("forward_train", "m2", got[1], m2, ctx.stat)
                        if np.isfinite(to_numpy(y3)[:, bad_c]).any():
                            ctx.fail("forward_train", shape, f"a {bad} in channel {bad_c} left "
                                                             f"finite outputs in that channel")
                dy3 = ctx.data(shape, loc=1.0)
                mean = np.where(clean, _batch_stats64(np.where(np.isfinite(x3), x3, 0))[0], 0)
                mean = mean.astype(ctx.stat)
                got = ctx.call("backward_reduce", ctx.dev(dy3), ctx.dev(x3), ctx.dev(mean))
                if got is not NotImplemented:
                    sum_dy, sum_dy_xmu = _sums64(dy3, x3, mean)
                    poisoned("backward_reduce", "sum_dy_xmu", got[1], sum_dy_xmu, ctx.stat)
                    ctx.expect("backward_reduce", shape, "sum_dy", got[0], sum_dy, ctx.stat)
                ones, zeros = np.ones(c, ctx.stat), np.zeros(c, ctx.stat)
                y3 = ctx.nan_like(shape)
                if ctx.call("normalize", ctx.dev(x3), ctx.dev(mean), ctx.dev(ones),
                            ctx.dev(zeros), y3) is not NotImplemented:
                    y = to_numpy(y3)
                    if np.isfinite(y[1, bad_c, shape[2] // 2]):
                        ctx.fail("normalize", shape, f"normalized a {bad} to a finite value")
                    finite = np.isfinite(x3)
                    ctx.expect("normalize", shape, "y3 of the finite inputs", y[finite],
                               _normalized(x3, mean, ones, zeros)[finite], ctx.dtype)


def _half_ulps(got, want):
    """Distance in units in the last place of a 16-bit float (ordered bit patterns)."""
    def ordered(h):
        i = h.view(np.int16).astype(np.int32)
        return np.where(i < 0, -(i & 0x7FFF), i)
    return np.abs(ordered(got) - ordered(want))


def check_half_edges(ctx):
    """float16/bfloat16: every finite value passes through exactly, results are rounded to
    nearest, and (float16) data whose squares overflow gives finite statistics."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(ctx.np_dtype)
    halves = halves[np.isfinite(halves)]   # float16: 63,488 values, ±65504, subnormals
    for shape in ((1, 1, halves.size), (halves.size // 8, 8, 1)):
        x3, c = halves[:shape[0] * shape[1] * shape[2]].reshape(shape), shape[1]
        y3 = ctx.nan_like(shape)
        zeros, ones = np.zeros(c, np.float32), np.ones(c, np.float32)
        if ctx.call("normalize", ctx.dev(x3), ctx.dev(zeros), ctx.dev(ones), ctx.dev(zeros),
                    y3) is not NotImplemented:
            wrong = to_numpy(y3) != x3
            if wrong.any():
                i = np.flatnonzero(wrong)[0]
                ctx.fail("normalize", shape, f"(x - 0) * 1 + 0 changed {int(wrong.sum())} "
                                             f"{ctx.dtype} values, e.g. {x3.flat[i]!r} -> "
                                             f"{to_numpy(y3).flat[i]!r}")
    # rounding: float32 arithmetic rounded once to the nearest 16-bit value
    for shape in (SHAPES["planes, odd run"], SHAPES["rows, wide"]):
        x3, dy3, c = ctx.data(shape), ctx.data(shape, loc=1.0), shape[1]
        mean, scale, shift = ctx.vector(c, -3, 3), ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1)
        for kernel, args, want in (
                ("normalize", (x3, mean, scale, shift), _normalized(x3, mean, scale, shift)),
                ("backward_elemt", (dy3, x3, mean, scale, shift, mean),
                 _elemt64(dy3, x3, mean, scale, shift, mean))):
            out = ctx.nan_like(shape)
            if ctx.call(kernel, *(ctx.dev(a) for a in args), out) is NotImplemented:
                continue
            ulps = _half_ulps(to_numpy(out), want.astype(ctx.np_dtype))
            # near zero, float32 cancellation alone moves a 16-bit value by over one ulp
            large = np.abs(want) >= 2 ** -4
            if ulps[large].max(initial=0) > 1 or np.mean(ulps != 0) > 0.01:
                ctx.fail(kernel, shape, f"{ctx.dtype} outputs are not rounded to nearest: "
                                        f"{np.mean(ulps != 0):.1%} differ from the float64 "
                                        f"result rounded once, by up to "
                                        f"{int(ulps[large].max(initial=0))} ulp")
    if ctx.dtype != "float16":
        return  # bfloat16 has float32's range: its squares overflow the statistics too
    # |x| ~ 3e3: x**2 ~ 1e7 overflows float16, the statistics must not
    shape = SHAPES["planes, odd run"]
    x3 = (3000 + 300 * ctx.rng.standard_normal(shape)).astype(np.float16)
    got = ctx.call("stats", ctx.dev(x3))
    if got is not NotImplemented:
        mean, m2 = _REF.stats(x3)
        ctx.expect("stats", shape, "m2 of data whose squares overflow float16", got[1], m2,
                   "float32")


def check_stable_statistics(ctx):
    """|mean| / std = 1e4 (16-bit data: 300): a plain E[x^2] - E[x]^2 loses every digit here."""
    ratio = 300.0 if ctx.np_dtype.itemsize == 2 else 1e4
    fused = getattr(ctx.backend, "forward_train", None) is not None
    for shape in (SHAPES["planes, odd run"], SHAPES["rows, wide"], SHAPES["one huge channel"]):
        x3 = (ratio * (1 + ctx.rng.uniform(0, 1, shape[1]))[:, None]
              + ctx.rng.standard_normal(shape)).astype(ctx.np_dtype)
        c = shape[1]
        calls = [("stats", (ctx.dev(x3),))]
        if fused:
            calls.append(("forward_train", (ctx.dev(x3), ctx.dev(np.ones(c, ctx.stat)),
                                            ctx.dev(np.zeros(c, ctx.stat)), 1e-5,
                                            ctx.nan_like(shape))))
        for kernel, args in calls:
            got = ctx.call(kernel, *args)
            if got is not NotImplemented:
                ctx.expect(kernel, shape, "m2 of large-mean data", got[1], _REF.stats(x3)[1],
                           ctx.stat, factor=50)


# --- the public paths, with the backend forced ------------------------------------------------

class _Recorder:
    """The backend under test as the core sees it, recording which kernels ran;
    ``fused=False`` hides its fused kernels so the core composes the four."""

    def __init__(self, backend, fused=True):
        self.backend = backend
        self.name, self.priority = backend.name, backend.priority
        self.devices, self.dtypes = backend.devices, backend.dtypes
        self.ran = []
        for kernel in REQUIRED_KERNELS + FUSED_KERNELS + EPILOGUE_KERNELS:
            present = getattr(backend, kernel, None) is not None
            optional = kernel in FUSED_KERNELS or kernel in EPILOGUE_KERNELS
            if optional and not (present and (fused or kernel in EPILOGUE_KERNELS)):
                setattr(self, kernel, None)
            else:
                setattr(self, kernel, self._recording(kernel))

    def _recording(self, kernel):
        def run(*args):
            self.ran.append(kernel)
            return getattr(self.backend, kernel)(*args)
        return run

    def is_available(self):
        return self.backend.is_available()


def _public(ctx, recorder, shape, call):
    """Run a public function on the backend; failures name the kernels that ran."""
    recorder.ran.clear()
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - reported with the kernels that ran
        ctx.fail(tuple(recorder.ran), shape, f"raised {type(exc).__name__}: {exc}")
    if _registry.last_backend() != ctx.backend.name:
        ctx.fail(tuple(recorder.ran), shape, f"last_backend() is {_registry.last_backend()!r}, "
                                             f"not the backend forced")
    return result


def _layout_input(ctx, layout):
    shape, axis, memory = LAYOUTS[layout]
    x = ctx.data(shape, axis)
    return (memory(x) if memory else x), axis, shape[axis]


def _forward_both(ctx, recorder, x, params, residual=None, **kw):
    """The public forward on the backend and on the reference: two lists of host arrays."""
    runs = []
    for backend in (recorder, _REF):
        dev = ctx.dev if backend is recorder else (lambda a, read_only=True: np.array(a))
        w, b, rm, rv = (dev(p, read_only=False) for p in params)
        z = None if residual is None else dev(residual)
        call = lambda: _api.batch_norm_forward(dev(x), w, b, running_mean=rm, running_var=rv,
                                               residual=z, backend=backend, **kw)
        result = _public(ctx, recorder, x.shape, call) if backend is recorder else call()
        runs.append([to_numpy(a) for a in (*result, rm, rv)])
    return runs


def _params(ctx, c):
    return (ctx.vector(c, 0.5, 1.5), ctx.vector(c, -1, 1), ctx.vector(c, -1, 1),
            ctx.vector(c, 0.5, 2.0))


def _check_forward(ctx, training, fused=True):
    recorder = _Recorder(ctx.backend, fused=fused)
    for layout in LAYOUTS:
        x, axis, c = _layout_input(ctx, layout)
        params = _params(ctx, c)
        got, ref = _forward_both(ctx, recorder, x, params, training=training, momentum=0.2,
                                 eps=1e-3, axis=axis)
        ran = tuple(recorder.ran)
        for name, a, b, dtype in zip(("y", "mean", "invstd", "running_mean", "running_var"),
                                     got, ref, (ctx.dtype,) + (ctx.stat,) * 4):
            ctx.expect(ran, x.shape, f"{name} (axis={axis}, {layout})", a, b, dtype)
        if got[0].shape != x.shape or got[0].dtype != x.dtype:
            ctx.fail(ran, x.shape, f"y has shape {got[0].shape} and dtype {got[0].dtype}")
        if training:  # ... and the formula, independent of canonical views and kernels
            w, b = params[:2]
            ctx.expect(ran, x.shape, f"y vs the formula ({layout})", got[0],
                       direct_forward(x, w, b, eps=1e-3, axis=axis)[0], ctx.dtype)


def _check_backward(ctx, training, fused=True):
    recorder = _Recorder(ctx.backend, fused=fused)
    for layout in LAYOUTS:
        x, axis, c = _layout_input(ctx, layout)
        dy = ctx.data(x.shape, axis, loc=1.0)
        weight = ctx.vector(c, 0.5, 1.5)
        _, mean, var = direct_forward(x, eps=1e-3, axis=axis)
        if not training:
            mean, var = ctx.rng.normal(size=c), ctx.rng.uniform(0.5, 2, c)
        mean, invstd = mean.astype(ctx.stat), (1 / np.sqrt(var + 1e-3)).astype(ctx.stat)
        got = _public(ctx, recorder, x.shape, lambda: _api.batch_norm_backward(
            ctx.dev(dy), ctx.dev(x), ctx.dev(mean), ctx.dev(invstd), weight=ctx.dev(weight),
            training=training, axis=axis, backend=recorder))
        ran = tuple(recorder.ran)
        ref = _api.batch_norm_backward(dy, x, mean, invstd, weight=weight, training=training,
                                       axis=axis, backend=_REF)
        for name, a, b, dtype in zip(("dx", "dweight", "dbias"), got, ref,
                                     (ctx.dtype, ctx.stat, ctx.stat)):
            ctx.expect(ran, x.shape, f"{name} (axis={axis}, {layout})", a, b, dtype)
        if training:
            ctx.expect(ran, x.shape, f"dx vs the formula ({layout})", got[0],
                       direct_backward(dy, x, weight, eps=1e-3, axis=axis)[0], ctx.dtype)


def check_forward_training(ctx):
    _check_forward(ctx, training=True)


def check_epilogue_public(ctx):
    """relu(bn(x) + z) forward and backward through the public functions, every layout,
    training and inference: with the backend's epilogue kernels, or the core's composition."""
    recorder = _Recorder(ctx.backend)
    for layout in LAYOUTS:
        x, axis, c = _layout_input(ctx, layout)
        z, dy = ctx.data(x.shape, axis, loc=0.0), ctx.data(x.shape, axis, loc=1.0)
        for training in (True, False):
            got, ref = _forward_both(ctx, recorder, x, _params(ctx, c), training=training,
                                     eps=1e-3, axis=axis, activation="relu",
                                     residual=z)
            ran = tuple(recorder.ran)
            ctx.expect(ran, x.shape, f"relu(bn(x) + z) ({layout}, training={training})",
                       got[0], ref[0], ctx.dtype)
            y, mean, invstd = got[0], got[1].astype(ctx.stat), got[2].astype(ctx.stat)
            weight = ctx.vector(c, 0.5, 1.5)
            kw = dict(weight=weight, training=training, axis=axis, activation="relu",
                      residual=True)
            grads = _public(ctx, recorder, x.shape, lambda: _api.batch_norm_backward(
                ctx.dev(dy), ctx.dev(x), ctx.dev(mean), ctx.dev(invstd), y=ctx.dev(y),
                backend=recorder, **{**kw, "weight": ctx.dev(weight)}))
            ran = tuple(recorder.ran)
            want = _api.batch_norm_backward(dy, x, mean, invstd, y=y, backend=_REF, **kw)
            for name, a, b, dtype in zip(("dx", "dweight", "dbias", "dresidual"), grads, want,
                                         (ctx.dtype, ctx.stat, ctx.stat, ctx.dtype)):
                ctx.expect(ran, x.shape, f"{name} of relu(bn(x) + z) ({layout}, "
                                         f"training={training})", a, b, dtype)


def check_forward_inference(ctx):
    _check_forward(ctx, training=False)


def check_backward_training(ctx):
    _check_backward(ctx, training=True)


def check_backward_inference(ctx):
    _check_backward(ctx, training=False)


def check_composed_path(ctx):
    """The fused kernels hidden: the core composes training from the four kernels."""
    _check_forward(ctx, training=True, fused=False)
    _check_backward(ctx, training=True, fused=False)


def check_running_statistics(ctx):
    """Five training steps against PyTorch's rule, written out here."""
    c, momentum = 5, 0.3
    rm, rv = np.zeros(c), np.ones(c)
    rm_d, rv_d = ctx.dev(rm.astype(ctx.stat), False), ctx.dev(rv.astype(ctx.stat), False)
    recorder = _Recorder(ctx.backend)
    for step in range(5):
        x = (ctx.rng.standard_normal((8, c, 3)) * (1 + step) + step).astype(ctx.np_dtype)
        _public(ctx, recorder, x.shape, lambda: _api.batch_norm(
            ctx.dev(x), rm_d, rv_d, training=True, momentum=momentum, backend=recorder))
        x64 = x.astype(np.float64)
        rm = (1 - momentum) * rm + momentum * x64.mean(axis=(0, 2))
        rv = (1 - momentum) * rv + momentum * x64.var(axis=(0, 2), ddof=1)
        ctx.expect(tuple(recorder.ran), x.shape, f"running_mean after step {step + 1}", rm_d,
                   rm, ctx.stat)
        ctx.expect(tuple(recorder.ran), x.shape, f"running_var after step {step + 1}", rv_d,
                   rv, ctx.stat)


def _numeric_gradient(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every element of a (in place)."""
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        orig = a[idx]
        a[idx] = orig + h
        up = f()
        a[idx] = orig - h
        down = f()
        a[idx] = orig
        grad[idx] = (up - down) / (2 * h)
    return grad


def check_finite_differences(ctx):
    """float64 gradients of sum(g * y) against central differences, both modes."""
    recorder = _Recorder(ctx.backend)
    for (shape, axis), training in ((((3, 4, 5), 1), True), (((2, 3, 2, 4), -1), True),
                                    (((3, 4, 5), 1), False)):
        x = ctx.rng.normal(1.0, 2.0, shape)
        c = shape[axis]
        w, b, rm, rv = (a.astype(np.float64) for a in _params(ctx, c))
        g = ctx.rng.standard_normal(shape)

        def forward():
            return _api.batch_norm_forward(ctx.dev(x), ctx.dev(w), ctx.dev(b),
                                           running_mean=ctx.dev(rm, False),
                                           running_var=ctx.dev(rv, False), training=training,
                                           axis=axis, backend=recorder)

        def loss():
            return float((to_numpy(forward().y) * g).sum())

        _, mean, invstd = _public(ctx, recorder, shape, forward)
        grads = _public(ctx, recorder, shape, lambda: _api.batch_norm_backward(
            ctx.dev(g), ctx.dev(x), mean, invstd, weight=ctx.dev(w), training=training,
            axis=axis, backend=recorder))
        ran = tuple(recorder.ran)
        for name, got, wrt in zip(("dx", "dweight", "dbias"), grads, (x, w, b)):
            want = _numeric_gradient(loss, wrt)
            try:
                np.testing.assert_allclose(to_numpy(got), want, rtol=1e-6, atol=1e-7)
            except AssertionError as exc:
                ctx.fail(ran, shape, f"{name} ({'training' if training else 'inference'}) "
                                     f"differs from central differences:{exc}")


def check_out_aliasing(ctx):
    """``out=`` a separate array, and ``out=x`` (normalize in place), on every layout."""
    recorder = _Recorder(ctx.backend)
    for layout in LAYOUTS:
        x, axis, _ = _layout_input(ctx, layout)
        want = direct_forward(x, axis=axis)[0]
        out = ctx.xp.full(x.shape, np.nan, dtype=ctx.np_dtype)
        result = _public(ctx, recorder, x.shape, lambda: _api.batch_norm_forward(
            ctx.dev(x), out=out, axis=axis, backend=recorder))
        if result.y is not out:
            ctx.fail(tuple(recorder.ran), x.shape, "the result is not the out array given")
        ctx.expect(tuple(recorder.ran), x.shape, f"out ({layout})", out, want, ctx.dtype)
        xd = ctx.dev(x, read_only=False)
        _public(ctx, recorder, x.shape, lambda: _api.batch_norm_forward(
            xd, out=xd, axis=axis, backend=recorder))
        ctx.expect(tuple(recorder.ran), x.shape, f"out=x ({layout})", xd, want, ctx.dtype)


def check_read_only_inputs(ctx):
    """Read-only data, parameters and (in inference) running statistics are fine."""
    recorder = _Recorder(ctx.backend)
    x, axis, c = _layout_input(ctx, "NCHW")
    w, b, rm, rv = (ctx.dev(p) for p in _params(ctx, c))  # all read-only on the host
    xr = ctx.dev(x)
    for training in (True, False):
        y, mean, invstd = _public(ctx, recorder, x.shape, lambda: _api.batch_norm_forward(
            xr, w, b, running_mean=None if training else rm,
            running_var=None if training else rv, training=training, backend=recorder))
        want = _api.batch_norm_forward(x, np.array(w), np.array(b),
                                       running_mean=None if training else np.array(rm),
                                       running_var=None if training else np.array(rv),
                                       training=training, backend=_REF).y
        ctx.expect(tuple(recorder.ran), x.shape, "y from read-only inputs", y, want, ctx.dtype)
        dy = ctx.dev(ctx.data(x.shape, loc=1.0))
        dx = _public(ctx, recorder, x.shape, lambda: _api.batch_norm_backward(
            dy, xr, ctx.dev(to_numpy(mean)), ctx.dev(to_numpy(invstd)), weight=w,
            training=training, backend=recorder)).dx
        want = _api.batch_norm_backward(np.array(dy), x, to_numpy(mean), to_numpy(invstd),
                                        weight=np.array(w), training=training, backend=_REF).dx
        ctx.expect(tuple(recorder.ran), x.shape, "dx from read-only inputs", dx, want,
                   ctx.dtype)


# --- threads ----------------------------------------------------------------------------------

def _kernel_calls(ctx, shape):
    """For each kernel of the backend: (kernel, thunk running it on fresh data -> host results)."""
    x3, dy3, c = ctx.data(shape), ctx.data(shape, loc=1.0), shape[1]
    mean, scale, shift = ctx.vector(c, -3, 3), ctx.vector(c, 0.5, 2), ctx.vector(c, -1, 1)
    x, dy, m, s, t = (ctx.dev(a) for a in (x3, dy3, mean, scale, shift))

    def writing(kernel, *args):
        def run():
            out = ctx.nan_like(shape)
            result = ctx.call(kernel, *args, out)
            return [to_numpy(out)] + [to_numpy(r) for r in (result or ())
                                      if result is not NotImplemented]
        return kernel, run

    def reducing(kernel, *args):
        def run():
            result = ctx.call(kernel, *args)
            return [] if result is NotImplemented else [to_numpy(r) for r in result]
        return kernel, run
    calls = [reducing("stats", x), writing("normalize", x, m, s, t),
             reducing("backward_reduce", dy, x, m), writing("backward_elemt", dy, x, m, s, t, m)]
    if getattr(ctx.backend, "forward_train", None) is not None:
        calls.append(writing("forward_train", x, s, t, 1e-5))
    if getattr(ctx.backend, "backward_train", None) is not None:
        calls.append(writing("backward_train", dy, x, m, s, s))
    return calls


def check_concurrent_calls(ctx):
    """Eight Python threads calling each kernel at once get single-threaded results.

    The interpreter switches threads every microsecond meanwhile, so state shared
    between calls (a scratch buffer on the backend, a global) shows up.
    """
    shape = (4, 8, 2048)
    per_thread = [_kernel_calls(ctx, shape) for _ in range(8)]
    expected = [[run() for _, run in calls] for calls in per_thread]
    errors, start = [], threading.Barrier(8)

    def work(i):
        try:
            start.wait()
            for _ in range(16):  # a race shows in some rounds only: enough for every run
                for (kernel, run), want in zip(per_thread[i], expected[i]):
                    for got, w in zip(run(), want):
                        if not np.allclose(got, w, rtol=tolerance(ctx.dtype)[0] * 10,
                                           equal_nan=True):
                            errors.append(kernel)
                            return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    for error in errors:
        if isinstance(error, BaseException):
            raise error
    if errors:
        ctx.fail(errors[0], shape, "gave a different result when 8 threads called it at "
                                   "once (state shared between calls?)")


def check_num_threads(ctx):
    """Results hold with 1 and with 3 threads (``fastbn.num_threads``), which is restored."""
    outer = _threads.get_num_threads()
    for n in (1, 3):
        with _threads.num_threads(n):
            for shape in (SHAPES["one huge channel"], SHAPES["tall rows"]):
                x3 = ctx.data(shape)
                got = ctx.call("stats", ctx.dev(x3))
                if got is not NotImplemented:
                    mean, m2 = _REF.stats(x3)
                    ctx.expect("stats", shape, f"mean with {n} thread(s)", got[0], mean,
                               ctx.stat)
                    ctx.expect("stats", shape, f"m2 with {n} thread(s)", got[1], m2, ctx.stat)
            if _threads.get_num_threads() != n:
                ctx.fail("stats", (), f"fastbn.get_num_threads() is "
                                      f"{_threads.get_num_threads()} inside num_threads({n})")
    if _threads.get_num_threads() != outer:
        ctx.fail("stats", (), "the thread count was not restored after the kernels ran")


# --- the catalogue ----------------------------------------------------------------------------

# name -> (check, applies(backend, dtype, device)); kernel checks first, so the first
# failure names the kernel at fault rather than a public output built from several
def _has(kernel):
    return lambda backend, dtype, device: getattr(backend, kernel, None) is not None


def _always(backend, dtype, device):
    return True


CHECKS = {
    "stats": (check_stats, _always),
    "normalize": (check_normalize, _always),
    "normalize_in_place": (check_normalize_in_place, _always),
    "backward_reduce": (check_backward_reduce, _always),
    "backward_elemt": (check_backward_elemt, _always),
    "forward_train": (check_forward_train, _has("forward_train")),
    "backward_train": (check_backward_train, _has("backward_train")),
    "normalize_epilogue": (check_normalize_epilogue, _has("normalize_epilogue")),
    "forward_train_epilogue": (check_forward_train_epilogue, _has("forward_train_epilogue")),
    "backward_relu": (check_backward_relu, lambda b, t, d: _has("backward_reduce_relu")(b, t, d)
                      and _has("backward_elemt_relu")(b, t, d)),
    "backward_train_relu": (check_backward_train_relu, _has("backward_train_relu")),
    "nonfinite_stays_in_its_channel": (check_nonfinite_stays_in_its_channel, _always),
    "half_edges": (check_half_edges, lambda b, dtype, d: dtype in ("float16", "bfloat16")),
    "stable_statistics": (check_stable_statistics, _always),
    "forward_training": (check_forward_training, _always),
    "forward_inference": (check_forward_inference, _always),
    "epilogue_public": (check_epilogue_public, _always),
    "backward_training": (check_backward_training, _always),
    "backward_inference": (check_backward_inference, _always),
    "composed_path": (check_composed_path, lambda b, t, d: any(
        getattr(b, k, None) is not None for k in FUSED_KERNELS)),
    "running_statistics": (check_running_statistics, _always),
    "finite_differences": (check_finite_differences, lambda b, dtype, d: dtype == "float64"),
    "out_aliasing": (check_out_aliasing, _always),
    "read_only_inputs": (check_read_only_inputs, lambda b, t, device: device == "cpu"),
    "concurrent_calls": (check_concurrent_calls, _always),
    "num_threads": (check_num_threads, lambda b, t, device: device == "cpu"),
}


def _devices_here():
    devices = {"cpu"}
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            devices.add("cuda")
    except Exception:  # noqa: BLE001 - no CuPy or no GPU: CPU only
        pass
    return devices


def _resolve(backend, dtypes, devices):
    """The backend object and the (dtype, device) pairs to check, honouring its declarations."""
    backend = _registry._resolve(backend)  # a name (failed plugins raise) or a checked object
    ok, reason = backend.is_available()
    if not ok:
        raise _registry.BackendUnavailableError(
            f"backend {backend.name!r} is unavailable: {reason}")
    declared_dtypes = sorted(set(backend.dtypes) & set(STAT_DTYPE))
    for given, declared, what in ((dtypes, backend.dtypes, "dtypes"),
                                  (devices, backend.devices, "devices")):
        if given is not None and not set(given) <= set(declared):
            raise ValueError(f"{what}: backend {backend.name!r} declares {sorted(declared)}; "
                             f"cannot check {sorted(set(given) - set(declared))}")
    dtypes = [d for d in declared_dtypes if dtypes is None or d in dtypes]
    runnable = _devices_here()
    wanted = sorted(backend.devices if devices is None else devices)
    if not set(wanted) & runnable:
        raise _registry.BackendUnavailableError(
            f"backend {backend.name!r} serves {wanted}; this machine runs {sorted(runnable)}")
    return backend, dtypes, [d for d in wanted if d in runnable]


def backend_checks(backend, *, dtypes=None, devices=None):
    """The checks of :func:`check_backend`, one :class:`BackendCheck` each, in order.

    For test runners: each item's ``id`` names it, calling it runs it.
    """
    backend, dtypes, devices = _resolve(backend, dtypes, devices)
    items = []
    for name, (check, applies) in CHECKS.items():
        for device in devices:
            for dtype in dtypes:
                if applies(backend, dtype, device):
                    items.append(BackendCheck(name, dtype, device, _runner(
                        check, backend, name, dtype, device)))
    return items


def _runner(check, backend, name, dtype, device):
    def run():
        check(_Context(backend, name, dtype, device))
    return run


def check_backend(backend, *, dtypes=None, devices=None):
    """Run fastbn's conformance kit against one backend; raise on the first failure.

    Parameters
    ----------
    backend : str or Backend
        A registered name (a plugin included) or a backend object, registered or not.
    dtypes, devices : iterable of str, optional
        Check only these of the backend's declared dtypes / devices (default: all it
        declares that fastbn knows and this machine can run).

    Returns
    -------
    list of str
        The ids of the checks that ran, e.g. ``"stats[float32-cpu]"``.

    Raises
    ------
    BackendCheckError
        An ``AssertionError`` naming the check, the kernel, dtype and shape at fault.
    BackendUnavailableError
        If the backend cannot run here (unavailable, a plugin that failed to load, or
        no device it serves on this machine).
    ValueError
        If ``dtypes``/``devices`` ask for something the backend does not declare.

    Examples
    --------
    >>> import fastbn.testing
    >>> ran = fastbn.testing.check_backend("numpy", dtypes=["float64"])
    >>> ran[0]
    'stats[float64-cpu]'
    """
    ran = []
    for item in backend_checks(backend, dtypes=dtypes, devices=devices):
        item()
        ran.append(item.id)
    return ran
