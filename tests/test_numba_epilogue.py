"""The numba backend's epilogue kernels, called directly, against the reference's.

``normalize_epilogue``, ``forward_train_epilogue``, ``backward_reduce_relu`` and
``backward_elemt_relu`` of ``fastbn._backends.numba_cpu.backend`` are called as
the core calls them (C-contiguous canonical ``(O, C, I)`` arrays, stat-dtype
``(C,)`` vectors) and held to ``fastbn._backends.numpy_ref.backend``'s epilogue
kernels (the definition) with the tolerances of ``fastbn.testing``, over both
kernel families (planes: NCL, NCHW, NCDHW-sized; rows: NC and channels-last),
float16, bfloat16 (ml_dtypes), float32 and float64, residual z absent or
given, relu on or off. Also: NaN and infinities through relu, relu's gradient
mask at exactly y == 0 (and -0, NaN), dz written when given (bit-identical to
the masked gradient) and the inputs left alone when not, streaming stores into
large aligned outputs, in place (y is x, y is z).

Skips, with the reason, without numba (bfloat16 cases also without ml_dtypes).
"""
import importlib.util

import numpy as np
import pytest

from fastbn._backends import numba_cpu
from fastbn._backends.numpy_ref import backend as ref
from fastbn.testing import assert_close, direct_forward
from fastbn.testing._helpers import numpy_dtype

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
HAVE_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None
pytestmark = [
    pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed (pip install fastbn[numba])"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]
nb = numba_cpu.backend

_NO_BF16 = pytest.mark.skipif(not HAVE_ML_DTYPES,
                              reason="ml_dtypes is not installed (bfloat16 arrays are ml_dtypes')")


def _param(dtype, *rest):
    return pytest.param(dtype, *rest, marks=[_NO_BF16] if dtype == "bfloat16" else [],
                        id="-".join([dtype] + [str(r) for r in rest]))


DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]
DTYPES = [_param(d) for d in DTYPE_NAMES]
# canonical (O, C, I) shapes: planes family (I > 1) and rows family (I == 1)
LAYOUTS = {
    "NC": (67, 6, 1),
    "NCL": (3, 5, 37),
    "NCHW": (2, 4, 9 * 7),
    "NCDHW": (2, 3, 4 * 5 * 6),
    "NHWC": (2 * 5 * 7, 12, 1),   # channels-last: rows of C values
}
EPILOGUES = [(False, False), (False, True), (True, False), (True, True)]  # (z given, relu)
# Every combination of flags is a specialization of its own, compiled on first use
# (a few seconds each): float32 takes them all, the other dtypes the relu ones.
EPILOGUE_CASES = [_param(d, add, relu) for d in DTYPE_NAMES for add, relu in EPILOGUES
                  if relu or d == "float32"]


def _stat(dtype):
    return np.float64 if dtype == "float64" else np.float32


def _data(rng, shape, dtype, loc=0.0, scale=1.0):
    return rng.normal(loc, scale, shape).astype(numpy_dtype(dtype))


def _vec(rng, c, dtype, lo, hi):
    return rng.uniform(lo, hi, c).astype(_stat(dtype))


def _setup(seed, layout, dtype):
    """(rng, shape, C, x) for one case: x with mean 0.3 and std 1.5."""
    rng = np.random.default_rng(seed)
    shape = LAYOUTS[layout]
    return rng, shape, shape[1], _data(rng, shape, dtype, 0.3, 1.5)


def _same(a, b):
    """Bit-for-bit as values (NaN equal to NaN), any dtype."""
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def _both_normalize(x, mean, scale, shift, z, relu):
    y = np.full_like(x, np.nan)
    want = np.full_like(x, np.nan)
    nb.normalize_epilogue(x, mean, scale, shift, z, relu, y)
    ref.normalize_epilogue(x, mean, scale, shift, z, relu, want)
    return y, want


# --- forward --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,add,relu", EPILOGUE_CASES)
def test_normalize_epilogue_matches_reference(dtype, layout, add, relu):
    rng, shape, c, x = _setup(1, layout, dtype)
    z = _data(rng, shape, dtype) if add else None
    mean = _vec(rng, c, dtype, -0.5, 0.5)
    scale = _vec(rng, c, dtype, 0.5, 1.5)
    shift = _vec(rng, c, dtype, -0.5, 0.5)
    y, want = _both_normalize(x, mean, scale, shift, z, relu)
    assert y.dtype == x.dtype
    assert_close(y, want, dtype)
    if relu:
        # relu's zeros are exact zeros, and exactly where the reference has them
        _same(y == 0, want == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NC", "NCHW"])
def test_relu_propagates_nan_and_clamps_infinities(dtype, layout):
    rng = np.random.default_rng(2)
    shape = LAYOUTS[layout]
    c = shape[1]
    x = _data(rng, shape, dtype)
    z = _data(rng, shape, dtype)
    flat_x, flat_z = x.reshape(-1), z.reshape(-1)
    flat_x[[0, 7, 20]] = np.nan
    flat_z[[3, 11]] = np.nan
    flat_z[[5, 13]] = -np.inf
    flat_z[[9, 17]] = np.inf
    mean = np.zeros(c, _stat(dtype))
    one = np.ones(c, _stat(dtype))
    for zz in (None, z):
        y, want = _both_normalize(x, mean, one, mean, zz, True)
        _same(y, want)       # exact: NaN where the reference has NaN, 0 for -inf, inf for inf
        assert np.isnan(y.reshape(-1)[[0, 7, 20]].astype(np.float64)).all()
    flat = y.reshape(-1).astype(np.float64)
    assert np.isnan(flat[[3, 11]]).all()
    assert (flat[[5, 13]] == 0).all() and (flat[[9, 17]] == np.inf).all()


@pytest.mark.parametrize("layout", ["NC", "NCL", "NCDHW", "NHWC"])
@pytest.mark.parametrize("dtype,add,relu", EPILOGUE_CASES)
def test_forward_train_epilogue_matches_reference(dtype, layout, add, relu):
    rng, shape, c, x = _setup(3, layout, dtype)
    z = _data(rng, shape, dtype) if add else None
    w = _vec(rng, c, dtype, 0.5, 1.5)
    b = _vec(rng, c, dtype, -0.5, 0.5)
    y = np.full_like(x, np.nan)
    mean, m2 = nb.forward_train_epilogue(x, w, b, 1e-5, z, relu, y)
    want_mean, want_m2 = ref.stats(x)
    assert mean.dtype == m2.dtype == _stat(dtype)
    assert_close(mean, want_mean, dtype)
    assert_close(m2, want_m2, dtype)
    # the epilogue on the reference's normalization with the same statistics
    bn, _, _ = direct_forward(x, w, b, eps=1e-5)
    want = bn + (0 if z is None else z.astype(np.float64))
    if relu:
        want = np.maximum(want, 0.0)
    assert_close(y, want.astype(x.dtype), dtype)
    if not add and not relu:
        # the plain training forward is the epilogue-free specialization
        plain = np.full_like(x, np.nan)
        nb.forward_train(x, w, b, 1e-5, plain)
        _same(plain, y)


# --- backward -------------------------------------------------------------------------

def _backward_inputs(seed, layout, dtype):
    """(rng, C, dy, y, x, mean), y a forward output of relu: >= 0, with exact
    zeros, and -0 and NaN sprinkled; and copies of (dy, y, x)."""
    rng, shape, c, x = _setup(seed, layout, dtype)
    dy = _data(rng, shape, dtype)
    y = np.maximum(_data(rng, shape, dtype), 0).astype(numpy_dtype(dtype))
    flat = y.reshape(-1)
    flat[1::11] = 0.0
    flat[2::13] = -0.0
    flat[3::17] = np.nan
    mean = _vec(rng, c, dtype, 0.0, 0.6)
    return rng, c, dy, y, x, mean, [a.copy() for a in (dy, y, x)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_reduce_relu_matches_reference(dtype, layout):
    _, c, dy, y, x, mean, copies = _backward_inputs(4, layout, dtype)
    got = nb.backward_reduce_relu(dy, y, x, mean)
    want = ref.backward_reduce_relu(dy, y, x, mean)
    for g, w_ in zip(got, want):
        assert g.dtype == _stat(dtype) and g.shape == (c,)
        assert_close(g, w_, dtype)
    for a, before in zip((dy, y, x), copies):
        _same(a, before)
    # the mask really is applied: the unmasked sums differ
    assert not np.allclose(ref.backward_reduce(dy, x, mean)[0], got[0])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,with_dz", [_param(d, True) for d in DTYPE_NAMES]
                         + [_param("float32", False)])
def test_backward_elemt_relu_matches_reference(dtype, layout, with_dz):
    rng, c, dy, y, x, mean, copies = _backward_inputs(5, layout, dtype)
    k_dy = _vec(rng, c, dtype, 0.5, 1.5)
    k_x = _vec(rng, c, dtype, -0.3, 0.3)
    k_c = _vec(rng, c, dtype, -0.3, 0.3)
    dx = np.full_like(x, np.nan)
    want_dx = np.full_like(x, np.nan)
    dz = np.full_like(x, 7.0) if with_dz else None
    want_dz = np.full_like(x, 7.0)
    nb.backward_elemt_relu(dy, y, x, mean, k_dy, k_x, k_c, dz, dx)
    ref.backward_elemt_relu(dy, y, x, mean, k_dy, k_x, k_c, want_dz, want_dx)
    assert_close(dx, want_dx, dtype)
    if with_dz:
        _same(dz, want_dz)   # g is dy or 0: exact
        yv = y.astype(np.float64)
        assert (dz[~(yv > 0)] == 0).all()       # the mask at y == 0, -0 and NaN
    for a, before in zip((dy, y, x), copies):
        _same(a, before)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("layout", ["NC", "NCHW"])
def test_mask_at_exactly_zero(dtype, layout):
    shape = LAYOUTS[layout]
    c = shape[1]
    y = np.zeros(shape, numpy_dtype(dtype))
    y.reshape(-1)[::2] = 1.0
    y.reshape(-1)[1::4] = -0.0
    dy = np.ones(shape, numpy_dtype(dtype))
    x = np.ones(shape, numpy_dtype(dtype))
    zero = np.zeros(c, _stat(dtype))
    one = np.ones(c, _stat(dtype))
    dx = np.empty_like(x)
    dz = np.empty_like(x)
    nb.backward_elemt_relu(dy, y, x, zero, one, zero, zero, dz, dx)
    _same(dx, (y > 0).astype(x.dtype))
    _same(dz, (y > 0).astype(x.dtype))
    sum_g, _ = nb.backward_reduce_relu(dy, y, x, zero)
    _same(sum_g, (y > 0).sum(axis=(0, 2)).astype(_stat(dtype)))


# --- streaming stores and aliasing ----------------------------------------------------

def _aligned_touched(shape, dtype):
    """An output the kernels stream into: >= 1 MiB, 64-byte aligned, pages touched."""
    dt = np.dtype(numpy_dtype(dtype))
    n = int(np.prod(shape))
    buf = np.empty(n + 64 // dt.itemsize, dt)
    off = (-buf.ctypes.data % 64) // dt.itemsize
    out = buf[off:off + n].reshape(shape)
    out.fill(3)
    return out


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 8, 65536 // 4 + 5), (2 * 65536 + 3, 4, 1)],
                         ids=["planes", "rows"])
def test_streaming_stores_with_epilogues(dtype, shape):
    from fastbn._kernels import bn_numba

    rng = np.random.default_rng(6)
    c = shape[1]
    x = _data(rng, shape, dtype)
    z = _data(rng, shape, dtype)
    dy = _data(rng, shape, dtype)
    y = _aligned_touched(shape, dtype)
    if not bn_numba._should_stream(y):
        pytest.skip("no streaming stores here (mincore unavailable)")
    mean = _vec(rng, c, dtype, -0.2, 0.2)
    one = np.ones(c, _stat(dtype))
    want = np.empty_like(x)
    nb.normalize_epilogue(x, mean, one, mean, z, True, y)
    ref.normalize_epilogue(x, mean, one, mean, z, True, want)
    assert_close(y, want, dtype)
    dx = _aligned_touched(shape, dtype)
    dz = np.empty_like(x)
    want_dx = np.empty_like(x)
    want_dz = np.empty_like(x)
    nb.backward_elemt_relu(dy, want, x, mean, one, mean, mean, dz, dx)
    ref.backward_elemt_relu(dy, want, x, mean, one, mean, mean, want_dz, want_dx)
    assert_close(dx, want_dx, dtype)
    _same(dz, want_dz)


@pytest.mark.parametrize("layout", ["NC", "NCHW"])
def test_in_place_output_over_x_or_z(layout):
    rng = np.random.default_rng(7)
    shape = LAYOUTS[layout]
    c = shape[1]
    x = _data(rng, shape, "float32")
    z = _data(rng, shape, "float32")
    mean = _vec(rng, c, "float32", -0.5, 0.5)
    scale = _vec(rng, c, "float32", 0.5, 1.5)
    _, want = _both_normalize(x, mean, scale, mean, z, True)
    for target in ("x", "z"):
        xx, zz = x.copy(), z.copy()
        out = xx if target == "x" else zz
        nb.normalize_epilogue(xx, mean, scale, mean, zz, True, out)
        assert_close(out, want, "float32")
