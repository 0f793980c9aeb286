"""The Cython backend's epilogue kernels against the NumPy reference's.

``fastbn._backends.cython_omp.backend``'s ``normalize_epilogue``,
``forward_train_epilogue``, ``backward_reduce_relu``, ``backward_elemt_relu`` and
``backward_train_relu`` are called as the core calls them (C-contiguous ``(O, C, I)``
arrays, stat-dtype ``(C,)`` vectors) and held to ``fastbn._backends.numpy_ref``'s
epilogues (the definition; the reference has no fused training kernels, so those are
held to its stats/fold/epilogue composition), with the tolerances of
``fastbn.testing``: on both kernel families (planes ``I > 1``: NCL, NCHW, NCDHW-sized
planes, one huge channel; rows ``I == 1``: NC and channels-last), sizes with SIMD tails,
every data dtype, a residual or none, relu or identity, 1 and 2 threads, AVX2 and the
portable baseline (switched in-process with ``simd_level``), the training kernels'
fused per-channel paths and the composed ones, and streaming stores.

Also: NaN propagates through relu; the gradient mask is 0 where the saved output is
exactly 0 (either sign) or NaN; ``dz`` is written only when given; ``y3 is z3`` works.
"""
import contextlib

import numpy as np
import pytest

import fastbn
from fastbn._backends.cython_omp import backend as BE
from fastbn._backends.numpy_ref import backend as REF
from fastbn.testing import assert_close, tolerance

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays are ml_dtypes' bfloat16")

_ok, _why = BE.is_available()
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"cython backend unavailable: {_why}"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]

DTYPES = ["float16", "bfloat16", "float32", "float64"]
EPS = 1e-5
# (O, C, I) canonical views; the comment names the layout they stand for
SHAPES = [
    (37, 19, 1),       # NC, vector tails in every row
    (700, 100, 1),     # NC, rows split over the threads
    (20, 150, 1),      # NC, few rows: channels split over the threads
    (6 * 7 * 5, 24, 1),  # channels-last (N*H*W, C)
    (3, 5, 37),        # NCL, tails
    (4, 8, 4099),      # NCHW, planes cut between threads, fused training paths
    (2, 3, 120),       # NCDHW-sized planes (4*5*6)
    (2, 1, 70001),     # one huge channel: never fused, a thread cut inside a plane
]


def _module():
    from fastbn._kernels import _bn_omp
    return _bn_omp


@contextlib.contextmanager
def kernel_setting(setter, *value):
    """A module-level setting of the kernels (setter() reads it, setter(*value) sets it
    and returns what is in force), restored afterwards."""
    old = setter()
    try:
        yield setter(*value) if value else old
    finally:
        setter(*old) if isinstance(old, tuple) else setter(old)


@pytest.fixture(params=["avx2", "baseline"])
def simd(request):
    """The kernels' instruction set, in-process (simd_level), for the test."""
    with kernel_setting(_module().simd_level, request.param) as level:
        if level != request.param:
            pytest.skip(f"{request.param} loops not available on this CPU/build")
        yield level


@pytest.fixture(params=["fused", "composed"])
def fusion(request):
    """The training kernels' per-channel fused paths where they fit, or never."""
    never = (0, 0) if request.param == "composed" else ()
    with kernel_setting(_module()._fuse_limits, *never):
        yield request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """The thread count of the test's kernel calls (see call)."""
    return request.param


def call(n_threads, kernel, *args):
    """backend.kernel(*args) run with n_threads threads."""
    run = getattr(BE, kernel)
    with fastbn.num_threads(n_threads):
        return run(*args)


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------

def np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def stat_dtype(name):
    return np.float64 if name == "float64" else np.float32


def _rng(shape, salt):
    return np.random.default_rng([20261202, salt, *shape])


def data(shape, dtype, salt=0):
    """(O, C, I) data of `dtype`: per-channel location and scale."""
    rng = _rng(shape, salt)
    loc = rng.uniform(-2, 2, shape[1])[None, :, None]
    sd = rng.uniform(0.5, 2.0, shape[1])[None, :, None]
    return (loc + sd * rng.standard_normal(shape)).astype(np_dtype(dtype))


def vec(shape, dtype, lo, hi, salt):
    return _rng(shape, salt).uniform(lo, hi, shape[1]).astype(stat_dtype(dtype))


def saved_output(shape, dtype, salt=7):
    """A relu output: about half exact zeros (+0 and -0), the rest positive."""
    y = np.maximum(data(shape, dtype, salt).astype(np.float64), 0.0)
    y[..., ::7] *= -0.0   # some -0 (and 0 * positive stays +0 elsewhere)
    return y.astype(np_dtype(dtype))


def aligned_touched(shape, dtype):
    """An output that takes streaming stores: 64-byte aligned, written once already."""
    dt = np_dtype(dtype)
    n = int(np.prod(shape))
    buf = np.zeros(n * dt.itemsize + 64, dtype=np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off:off + n * dt.itemsize].view(dt).reshape(shape)


def f64(a):
    return np.asarray(a).astype(np.float64)


def epilogue64(v, z3, relu):
    """The epilogue in float64 on float64 values v."""
    if z3 is not None:
        v = v + f64(z3)
    return np.maximum(v, 0.0) if relu else v


def assert_sums(got, want, terms, dtype, what):
    """Per-channel sums within the stat dtype's tolerance of the sum of |terms|."""
    rtol, _ = tolerance(np.dtype(stat_dtype(dtype)).name)
    bound = rtol * (f64(terms) + 1e-30)
    err = np.abs(f64(got) - f64(want))
    assert np.all(err <= bound), f"{what}: max error {err.max()} (bound {bound[err.argmax()]})"


def assert_same(got, want, what):
    """Bit-for-value equal (NaN equal to NaN; -0 equal to +0)."""
    np.testing.assert_array_equal(f64(got), f64(want), err_msg=what)


# ----------------------------------------------------------------------------------------
# forward epilogues
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("residual", [True, False], ids=["z", "noz"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize_epilogue(shape, dtype, residual, relu, threads, simd):
    x3 = data(shape, dtype)
    z3 = data(shape, dtype, salt=5) if residual else None
    mean, scale, shift = (vec(shape, dtype, -2, 2, 1), vec(shape, dtype, 0.3, 2, 2),
                          vec(shape, dtype, -1, 1, 3))
    y3 = np.full(shape, 7, dtype=np_dtype(dtype))
    assert call(threads, "normalize_epilogue", x3, mean, scale, shift, z3, relu, y3) is None
    want = np.empty_like(y3)
    REF.normalize_epilogue(x3, mean, scale, shift, z3, relu, want)
    assert_close(y3, want, dtype, err_msg="normalize_epilogue")


def forward_reference(x3, weight, bias, z3, relu):
    """(y, mean, m2) of a training forward and its epilogue, in float64."""
    mean, m2 = REF.stats(x3)
    x = f64(x3)
    mean64 = x.mean(axis=(0, 2))
    m2_64 = ((x - mean64[None, :, None]) ** 2).sum(axis=(0, 2))
    n = x3.shape[0] * x3.shape[2]
    scale = f64(weight) / np.sqrt(m2_64 / n + EPS)
    v = (x - mean64[None, :, None]) * scale[None, :, None] + f64(bias)[None, :, None]
    return epilogue64(v, z3, relu), mean, m2


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("residual", [True, False], ids=["z", "noz"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_train_epilogue(shape, dtype, residual, relu, threads, simd, fusion):
    x3 = data(shape, dtype)
    z3 = data(shape, dtype, salt=5) if residual else None
    weight, bias = vec(shape, dtype, 0.5, 2, 1), vec(shape, dtype, -1, 1, 2)
    y3 = np.full(shape, 7, dtype=np_dtype(dtype))
    mean, m2 = call(threads, "forward_train_epilogue", x3, weight, bias, EPS, z3, relu, y3)
    want, mean_ref, m2_ref = forward_reference(x3, weight, bias, z3, relu)
    assert mean.dtype == stat_dtype(dtype) and m2.dtype == stat_dtype(dtype)
    assert_close(mean, mean_ref, stat_dtype(dtype), err_msg="mean")
    assert_close(m2, m2_ref, stat_dtype(dtype), err_msg="m2")
    assert_close(y3, want.astype(y3.dtype), dtype, err_msg="forward_train_epilogue")


# ----------------------------------------------------------------------------------------
# backward: the relu mask from the saved output
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_reduce_relu(shape, dtype, threads, simd):
    dy3, x3, y3 = data(shape, dtype, 1), data(shape, dtype, 2), saved_output(shape, dtype)
    mean = vec(shape, dtype, -2, 2, 3)
    got = call(threads, "backward_reduce_relu", dy3, y3, x3, mean)
    want = REF.backward_reduce_relu(dy3, y3, x3, mean)
    g = np.where(f64(y3) > 0, f64(dy3), 0.0)
    xm = f64(x3) - f64(mean)[None, :, None]
    assert all(v.dtype == stat_dtype(dtype) and v.shape == (shape[1],) for v in got)
    assert_sums(got[0], want[0], np.abs(g).sum(axis=(0, 2)), dtype, "sum(g)")
    assert_sums(got[1], want[1], np.abs(g * xm).sum(axis=(0, 2)), dtype, "sum(g*(x-mean))")


@pytest.mark.parametrize("with_dz", [True, False], ids=["dz", "nodz"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_elemt_relu(shape, dtype, with_dz, threads, simd):
    dy3, x3, y3 = data(shape, dtype, 1), data(shape, dtype, 2), saved_output(shape, dtype)
    mean, k_dy, k_x, k_c = (vec(shape, dtype, lo, hi, s)
                            for s, (lo, hi) in enumerate([(-2, 2), (0.5, 2), (-1, 1), (-1, 1)]))
    dx3 = np.full(shape, 7, dtype=dy3.dtype)
    dz3 = np.full(shape, 7, dtype=dy3.dtype) if with_dz else None
    before = (dy3.copy(), x3.copy(), y3.copy())
    assert call(threads, "backward_elemt_relu", dy3, y3, x3, mean, k_dy, k_x, k_c, dz3,
                dx3) is None
    want_dx = np.empty_like(dx3)
    want_dz = np.empty_like(dx3)
    REF.backward_elemt_relu(dy3, y3, x3, mean, k_dy, k_x, k_c, want_dz, want_dx)
    assert_close(dx3, want_dx, dtype, err_msg="dx")
    if with_dz:
        assert_same(dz3, want_dz, "dz = g exactly")
    for a, b in zip((dy3, x3, y3), before):
        assert_same(a, b, "inputs untouched")


def backward_reference(dy3, y3, x3, mean, invstd, weight):
    """(dx, g, sum_g, sum_g_xmu) of a training backward through relu, in float64."""
    g = np.where(f64(y3) > 0, f64(dy3), 0.0)
    xm = f64(x3) - f64(mean)[None, :, None]
    n = x3.shape[0] * x3.shape[2]
    sg, sgx = g.sum(axis=(0, 2)), (g * xm).sum(axis=(0, 2))
    w_is = f64(weight) * f64(invstd)
    k_dy, k_x, k_c = w_is, -w_is * f64(invstd) ** 2 * sgx / n, -w_is * sg / n
    dx = k_dy[None, :, None] * g + k_x[None, :, None] * xm + k_c[None, :, None]
    return dx, g, sg, sgx


@pytest.mark.parametrize("with_dz", [True, False], ids=["dz", "nodz"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_train_relu(shape, dtype, with_dz, threads, simd, fusion):
    dy3, x3, y3 = data(shape, dtype, 1), data(shape, dtype, 2), saved_output(shape, dtype)
    mean, m2 = REF.stats(x3)
    invstd = (1.0 / np.sqrt(f64(m2) / (shape[0] * shape[2]) + EPS)).astype(mean.dtype)
    weight = vec(shape, dtype, 0.5, 2, 4)
    dx3 = np.full(shape, 7, dtype=dy3.dtype)
    dz3 = np.full(shape, 7, dtype=dy3.dtype) if with_dz else None
    sg, sgx = call(threads, "backward_train_relu", dy3, y3, x3, mean, invstd, weight, dz3, dx3)
    want_dx, g, want_sg, want_sgx = backward_reference(dy3, y3, x3, mean, invstd, weight)
    xm = f64(x3) - f64(mean)[None, :, None]
    assert_sums(sg, want_sg, np.abs(g).sum(axis=(0, 2)), dtype, "sum(g)")
    assert_sums(sgx, want_sgx, np.abs(g * xm).sum(axis=(0, 2)), dtype, "sum(g*(x-mean))")
    # dx's k_x, k_c come from float32 sums: cancellation in them is the float32 error
    # of their terms, relative to dx's scale
    cond = float(tolerance(np.dtype(stat_dtype(dtype)).name)[0]) * 4
    assert_close(dx3, want_dx, dtype, err_msg="dx", condition=cond)
    if with_dz:
        assert_same(dz3, g, "dz = g exactly")


# ----------------------------------------------------------------------------------------
# streaming stores (large, aligned, touched outputs): the vector bodies with them
# ----------------------------------------------------------------------------------------

STREAM_SHAPES = [(4, 8, 33001), (8200, 130, 1)]   # >= 1 MiB of 16-bit data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=str)
def test_streaming_outputs(shape, dtype, simd):
    x3, z3, dy3 = data(shape, dtype), data(shape, dtype, 5), data(shape, dtype, 6)
    ys = saved_output(shape, dtype)
    mean, scale, shift = (vec(shape, dtype, -2, 2, 1), vec(shape, dtype, 0.3, 2, 2),
                          vec(shape, dtype, -1, 1, 3))
    y3 = aligned_touched(shape, dtype)
    call(2, "normalize_epilogue", x3, mean, scale, shift, z3, True, y3)
    want = np.empty_like(y3)
    REF.normalize_epilogue(x3, mean, scale, shift, z3, True, want)
    assert_close(y3, want, dtype, err_msg="normalize_epilogue, streamed")
    dx3, dz3 = aligned_touched(shape, dtype), aligned_touched(shape, dtype)
    # dz misaligned against dx: its stores are ordinary ones whatever dx's are
    dz_off = np.zeros(int(np.prod(shape)) + 1, dtype=dy3.dtype)[1:].reshape(shape)
    for dz in (dz3, dz_off):
        call(2, "backward_elemt_relu", dy3, ys, x3, mean, scale, shift, shift, dz, dx3)
        want_dx, want_dz = np.empty_like(dx3), np.empty_like(dx3)
        REF.backward_elemt_relu(dy3, ys, x3, mean, scale, shift, shift, want_dz, want_dx)
        assert_close(dx3, want_dx, dtype, err_msg="backward_elemt_relu, streamed")
        assert_same(dz, want_dz, "dz, ordinary stores")


# ----------------------------------------------------------------------------------------
# special values and aliasing
# ----------------------------------------------------------------------------------------

SPECIAL_SHAPES = [(3, 4, 45), (45, 21, 1)]   # planes and rows, with vector tails


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SPECIAL_SHAPES, ids=str)
def test_relu_propagates_nan(shape, dtype, simd):
    x3 = data(shape, dtype)
    z3 = data(shape, dtype, 5)
    flat_x, flat_z = x3.reshape(-1), z3.reshape(-1)
    n = flat_x.size
    nan_x = np.arange(0, n, 11)          # through x: bodies and tails alike
    nan_z = np.arange(5, n, 13)          # through the residual
    flat_x[nan_x] = np.nan
    flat_z[nan_z] = np.nan
    mean, scale, shift = (vec(shape, dtype, -2, 2, 1), vec(shape, dtype, 0.3, 2, 2),
                          vec(shape, dtype, -1, 1, 3))
    for z in (None, z3):
        y3 = np.zeros_like(x3)
        call(1, "normalize_epilogue", x3, mean, scale, shift, z, True, y3)
        want = np.empty_like(y3)
        REF.normalize_epilogue(x3, mean, scale, shift, z, True, want)
        nan_want = np.isnan(f64(want))
        assert nan_want.reshape(-1)[nan_x].all()
        np.testing.assert_array_equal(np.isnan(f64(y3)), nan_want, err_msg="NaN through relu")
        assert_close(np.where(nan_want, 0, y3), np.where(nan_want, 0, want), dtype)
        assert (f64(y3)[~nan_want] >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SPECIAL_SHAPES, ids=str)
def test_mask_at_zero_and_nan(shape, dtype, simd, fusion):
    """g = 0 where the saved output is exactly +0 or -0 or NaN; g = dy where it is the
    smallest positive value."""
    dy3, x3 = data(shape, dtype, 1), data(shape, dtype, 2)
    y64 = np.zeros(shape)
    flat = y64.reshape(-1)
    flat[0::4] = 0.0
    flat[1::4] = -0.0
    flat[2::4] = np.nan
    tiny = float(ml_dtypes.finfo(np_dtype(dtype)).smallest_subnormal)
    flat[3::4] = tiny
    y3 = y64.astype(np_dtype(dtype))
    assert (f64(y3).reshape(-1)[3::4] > 0).all()
    mean, m2 = REF.stats(x3)
    invstd = (1.0 / np.sqrt(f64(m2) / (shape[0] * shape[2]) + EPS)).astype(mean.dtype)
    weight = vec(shape, dtype, 0.5, 2, 4)
    g = np.where(f64(y3) > 0, f64(dy3), 0.0)
    assert np.count_nonzero(g) == flat[3::4].size
    k = [vec(shape, dtype, -1, 1, s) for s in range(3)]
    dx3, dz3 = np.empty_like(dy3), np.full_like(dy3, 7)
    call(1, "backward_elemt_relu", dy3, y3, x3, mean, *k, dz3, dx3)
    assert_same(dz3, g, "dz: the mask")
    want_dx, want_dz = np.empty_like(dx3), np.empty_like(dx3)
    REF.backward_elemt_relu(dy3, y3, x3, mean, *k, want_dz, want_dx)
    assert_close(dx3, want_dx, dtype, err_msg="dx")
    sums = call(1, "backward_reduce_relu", dy3, y3, x3, mean)
    ref = REF.backward_reduce_relu(dy3, y3, x3, mean)
    xm = f64(x3) - f64(mean)[None, :, None]
    assert_sums(sums[0], ref[0], np.abs(g).sum(axis=(0, 2)), dtype, "sum(g)")
    assert_sums(sums[1], ref[1], np.abs(g * xm).sum(axis=(0, 2)), dtype, "sum(g*(x-mean))")
    dz3.fill(7)
    sg, _ = call(2, "backward_train_relu", dy3, y3, x3, mean, invstd, weight, dz3, dx3)
    assert_same(dz3, g, "backward_train_relu: dz")
    assert_sums(sg, ref[0], np.abs(g).sum(axis=(0, 2)), dtype, "backward_train_relu: sum(g)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 45), (45, 21, 1), (4, 8, 4099)], ids=str)
def test_output_is_residual(shape, dtype, threads, simd, fusion):
    """y3 is z3: the residual is read before its element is overwritten."""
    x3 = data(shape, dtype)
    z3 = data(shape, dtype, 5)
    z_copy = z3.copy()
    mean, scale, shift = (vec(shape, dtype, -2, 2, 1), vec(shape, dtype, 0.3, 2, 2),
                          vec(shape, dtype, -1, 1, 3))
    call(threads, "normalize_epilogue", x3, mean, scale, shift, z3, True, z3)
    want = np.empty_like(z3)
    REF.normalize_epilogue(x3, mean, scale, shift, z_copy, True, want)
    assert_close(z3, want, dtype, err_msg="normalize_epilogue into z")
    z3 = z_copy.copy()
    weight, bias = vec(shape, dtype, 0.5, 2, 1), vec(shape, dtype, -1, 1, 2)
    call(threads, "forward_train_epilogue", x3, weight, bias, EPS, z3, True, z3)
    want, _, _ = forward_reference(x3, weight, bias, z_copy, True)
    assert_close(z3, want.astype(z3.dtype), dtype, err_msg="forward_train_epilogue into z")


def test_dz_written_only_when_given():
    """Without dz the kernels write dx alone: the same dx, and no array but dx changes."""
    shape = (4, 8, 4099)
    dy3, x3, y3 = (data(shape, "float32", 1), data(shape, "float32", 2),
                   saved_output(shape, "float32"))
    mean, m2 = REF.stats(x3)
    invstd = (1.0 / np.sqrt(f64(m2) / (shape[0] * shape[2]) + EPS)).astype(np.float32)
    weight = vec(shape, "float32", 0.5, 2, 4)
    inputs = (dy3.copy(), y3.copy(), x3.copy())
    dx_a, dx_b, dz = np.empty_like(x3), np.empty_like(x3), np.full_like(x3, 7)
    call(2, "backward_train_relu", dy3, y3, x3, mean, invstd, weight, None, dx_a)
    call(2, "backward_train_relu", dy3, y3, x3, mean, invstd, weight, dz, dx_b)
    assert_same(dx_a, dx_b, "dx with and without dz")
    for a, b in zip((dy3, y3, x3), inputs):
        assert_same(a, b, "inputs untouched")
    assert_same(dz, np.where(y3 > 0, dy3, 0), "dz")


def test_plain_kernels_unchanged_by_absent_epilogue():
    """relu=False and no residual: the epilogue kernels give the plain kernels' bits."""
    for shape in [(4, 8, 4099), (700, 100, 1)]:
        x3, dy3 = data(shape, "float32"), data(shape, "float32", 1)
        mean, scale, shift = (vec(shape, "float32", -2, 2, 1), vec(shape, "float32", 0.3, 2, 2),
                              vec(shape, "float32", -1, 1, 3))
        a, b = np.empty_like(x3), np.empty_like(x3)
        call(2, "normalize", x3, mean, scale, shift, a)
        call(2, "normalize_epilogue", x3, mean, scale, shift, None, False, b)
        assert_same(a, b, "normalize")
        ones = np.ones_like(x3)   # a saved output > 0 everywhere: g = dy
        for u, v in zip(call(2, "backward_reduce", dy3, x3, mean),
                        call(2, "backward_reduce_relu", dy3, ones, x3, mean)):
            assert_same(u, v, "backward_reduce")


def test_shape_mismatch_is_an_error():
    K = _module()
    x = np.zeros((2, 3, 4), np.float32)
    v = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="z: expected shape"):
        K.normalize(x, v, v, v, np.empty_like(x), 1, False, np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="dz: expected shape"):
        K.backward_elemt(x, x, v, v, v, v, np.empty_like(x), 1, False, x,
                         np.zeros((2, 4, 4), np.float32))
