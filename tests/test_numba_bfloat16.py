"""bfloat16 in the numba backend, its kernels called directly.

The adapter ``fastbn._backends.numba_cpu.backend`` is called as the core calls it
(C-contiguous ``(O, C, I)`` ``ml_dtypes.bfloat16`` arrays, float32 ``(C,)``
vectors), not through the public API, on both kernel families (planes ``I > 1``,
rows ``I == 1``) and 1 and 2 threads; ``forward_train`` takes its fused
per-channel path on the small planes shapes and the composed one elsewhere. The
adapter has no ``backward_train`` (the core composes), so the kernel module's
``backward_train`` is called on its own int16 views.

What is held:

* element-wise outputs against float64 arithmetic rounded to float32 then to
  bfloat16: bit-identical, except that at most 0.1% of the elements may differ,
  by one ulp (float32 arithmetic rounding next to a bfloat16 rounding boundary,
  i.e. double rounding). Where the result is far smaller than its terms
  (cancellation), float32 arithmetic alone is off by more than a sliver of a
  bfloat16 ulp: every element is also held to "the bfloat16 rounding of a value
  within a few float32 ulps of its terms of the exact result";
* statistics: float32 vectors within 2e-5 relative of the float64 statistics of
  the bfloat16 data (the mean relative to |mean| + std; the data is chosen so
  that the backward sums are well away from zero and held purely relative);
* the two conversions (``_bfloat16_to_float``, ``_float_to_bfloat16``) against
  ml_dtypes over every bfloat16 pattern and a few million float32 patterns
  (ties, near-ties, the largest finite values, NaN payloads, infinities,
  subnormals, random bits);
* all 65,536 bfloat16 bit patterns through ``(x - 0) * 1 + 0``: finite values
  bit-identical (but -0, which IEEE arithmetic turns into +0), NaN stays NaN,
  ±inf stays ±inf;
* NaN and ±inf in one channel stay in that channel, the other channels are
  bit-identical to a run without them; ``y3 is x3`` (in place); streaming
  stores into a large, aligned, touched output.

Skips, with the reason, without numba or without ml_dtypes.
"""
import importlib.util

import numpy as np
import pytest

import fastbn

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
HAVE_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None
pytestmark = [
    pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed (pip install fastbn[numba])"),
    pytest.mark.skipif(not HAVE_ML_DTYPES,
                       reason="ml_dtypes is not installed (bfloat16 arrays are ml_dtypes')"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                               "ignore:overflow:RuntimeWarning"),
]

if HAVE_ML_DTYPES:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
else:
    BF16 = None

from fastbn._backends import numba_cpu  # noqa: E402  (imports without numba)

BE = numba_cpu.backend

SHAPES = [(4, 6, 9), (3, 5, 67), (16, 6, 1), (37, 130, 1), (2, 1, 300000), (5000, 64, 1)]
THREADS = [1, 2]
F32_EPS = 2.0 ** -24   # float32 unit roundoff
# scales of <= 10 significant bits: times a bfloat16 (8 bits), exact in float32; the
# first and last (the channels of the largest bfloat16 values in every layout used
# here) push those past the largest finite bfloat16
EXACT_SCALES = [1 + 2**-8, -(1 + 3 * 2**-9), 1 - 2**-9, 0.75 + 2**-10, 1.25 + 2**-9,
                -(0.5 + 2**-10), 1 + 2**-7 + 2**-9, -(1 + 2**-8)]


# --- helpers ------------------------------------------------------------------------------

def _bf16(a):
    """float64/float32 values -> bfloat16, rounded through float32 (the reference)."""
    return np.asarray(a, np.float64).astype(np.float32).astype(BF16)


def _data(rng, shape, loc=None):
    """(O, C, I) bfloat16 data, channels of different means (|mean| >= 1) and spreads."""
    c = shape[1]
    if loc is None:
        loc = rng.uniform(1, 3, (1, c, 1)) * rng.choice([-1, 1], (1, c, 1))
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, c, 1)) + loc
    return _bf16(x)


def _grad(rng, x):
    """dy correlated with x, with a positive mean: sum(dy) and sum(dy*(x - mean)) are
    far from zero, so they are held to a relative tolerance."""
    x64 = x.astype(np.float64)
    xm = x64 - x64.mean(axis=(0, 2), keepdims=True)
    return _bf16(0.5 * xm + rng.standard_normal(x.shape) * 0.5 + 1.0)


def _vec(rng, c, lo, hi):
    return rng.uniform(lo, hi, c).astype(np.float32)


def _col(v):
    return np.asarray(v, np.float64)[None, :, None]


def _ordered(bits):
    """bfloat16 bit patterns (uint16) -> integers ordered like their values."""
    i = bits.view(np.int16).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFF), i)


def _ulps(got, want):
    return np.abs(_ordered(got.view(np.uint16)) - _ordered(want.view(np.uint16)))


def _stats64(x):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    m2 = ((x64 - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    return mean, m2


def assert_stats(got_mean, got_m2, x, what=""):
    mean, m2 = _stats64(x)
    n = x.shape[0] * x.shape[2]
    std = np.sqrt(m2 / n)
    assert got_mean.dtype == np.float32 and got_m2.dtype == np.float32
    assert got_mean.shape == got_m2.shape == (x.shape[1],)
    err_mean = np.abs(got_mean.astype(np.float64) - mean) / (np.abs(mean) + std)
    err_m2 = np.abs(got_m2.astype(np.float64) - m2) / m2
    assert err_mean.max() <= 2e-5, f"{what} mean: relative error {err_mean.max():.2e}"
    assert err_m2.max() <= 2e-5, f"{what} m2: relative error {err_m2.max():.2e}"


def assert_sums(got, want, what=""):
    for g, w, name in zip(got, want, ("sum_dy", "sum_dy_xmu")):
        assert g.dtype == np.float32 and g.shape == w.shape
        err = np.abs(g.astype(np.float64) - w) / np.abs(w)
        assert err.max() <= 2e-5, f"{what} {name}: relative error {err.max():.2e}"


def assert_rounded(got, exact, terms, what="", slack=4.0):
    """``got`` (bfloat16) against ``exact`` (float64 arithmetic on the same inputs):

    * bit-identical to ``exact`` rounded to float32 then to bfloat16, but for at most
      0.1% of the elements;
    * those differ by at most one ulp where the result is not far smaller than its
      terms (|exact| >= terms / 4: no cancellation);
    * and every element is the bfloat16 rounding of some value within
      ``slack * 2**-24 * terms`` of the exact result (``terms``: the sum of the
      absolute values of the terms; float32 arithmetic is that close), which bounds
      the few elements that cancel.
    """
    assert got.dtype == BF16 and got.shape == exact.shape
    want = _bf16(exact)
    ulps = _ulps(got, want)
    differ = ulps != 0
    frac = differ.mean()
    assert frac <= 1e-3, (f"{what}: {differ.sum()} of {differ.size} elements "
                          f"({frac:.3%}) differ from the float32 result rounded to bfloat16")
    calm = np.abs(exact) >= terms / 4
    assert ulps[calm].max(initial=0) <= 1, (
        f"{what}: off by up to {ulps[calm].max()} ulp where nothing cancels")
    delta = slack * F32_EPS * terms
    lo = _bf16(exact - delta).astype(np.float64)
    hi = _bf16(exact + delta).astype(np.float64)
    g = got.astype(np.float64)
    bad = ~((lo <= g) & (g <= hi))
    assert not bad.any(), (f"{what}: {bad.sum()} elements outside the float32 error of "
                           f"their terms, e.g. got {g[bad][:3]}, exact {exact[bad][:3]}")


def _normalize64(x, mean, scale, shift):
    xm = x.astype(np.float64) - _col(mean)
    y = xm * _col(scale) + _col(shift)
    terms = np.abs(xm * _col(scale)) + np.abs(_col(shift))
    return y, terms


def _elemt64(dy, x, mean, k_dy, k_x, k_c):
    g = dy.astype(np.float64) * _col(k_dy)
    v = (x.astype(np.float64) - _col(mean)) * _col(k_x)
    return g + v + _col(k_c), np.abs(g) + np.abs(v) + np.abs(_col(k_c))


# --- the conversions ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def conversions():
    from numba import njit

    from fastbn._kernels import bn_numba as K

    @njit
    def to_float(h, out):
        for i in range(h.shape[0]):
            out[i] = K._bfloat16_to_float(h[i])

    @njit
    def to_bf16(f, out):
        for i in range(f.shape[0]):
            out[i] = K._float_to_bfloat16(f[i])

    return to_float, to_bf16


def test_every_bfloat16_converts_exactly(conversions):
    to_float, _ = conversions
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = bits.view(BF16).astype(np.float32).view(np.uint32)
    # exactly the upper half of a float32, NaN payloads included
    np.testing.assert_array_equal(want, bits.astype(np.uint32) << 16)
    for carrier in (np.int16, np.uint16):   # the kernels get int16; either reads unsigned
        got = np.full(bits.shape, np.nan, np.float32)
        to_float(bits.view(carrier), got)
        np.testing.assert_array_equal(got.view(np.uint32), want)


def _float32_patterns(rng):
    """A few million float32 bit patterns: random, and every bfloat16 value, tie,
    near-tie, NaN payload, infinity, subnormal and overflow edge."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    low = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF]   # exact, ties and their neighbours
    parts = [rng.integers(0, 1 << 32, 3_000_000, dtype=np.uint64).astype(np.uint32)]
    parts += [hi | np.uint32(lo) for lo in low]
    parts += [hi | rng.integers(0, 1 << 16, hi.size, dtype=np.uint32)]
    # NaNs with random payloads (both signs; signalling and quiet), +-inf
    mant = rng.integers(1, 1 << 23, 200_000, dtype=np.uint32)
    parts += [np.uint32(0x7F800000) | mant, np.uint32(0xFF800000) | mant,
              np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                        0x7FFFFFFF, 0xFFFFFFFF], np.uint32)]
    # float32 subnormals (bfloat16 has them too: 8-bit exponent)
    sub = rng.integers(0, 1 << 23, 200_000, dtype=np.uint32)
    parts += [sub, sub | np.uint32(0x80000000)]
    # around the largest finite bfloat16 (0x7f7f): the last ties round to inf
    top = np.arange(0x7F7E0000, 0x7F800000, 7, dtype=np.uint32)
    parts += [top, top | np.uint32(0x80000000),
              np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x00007FFF, 0x00008000,
                        0x00018000, 0x80008000], np.uint32)]
    return np.concatenate(parts).view(np.float32)


def test_float_to_bfloat16_rounds_like_ml_dtypes(conversions, rng):
    _, to_bf16 = conversions
    f = _float32_patterns(rng)
    got = np.empty(f.shape, np.uint16)
    to_bf16(f, got)
    with np.errstate(all="ignore"):
        want = f.astype(BF16).view(np.uint16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    g = got[nan]
    assert np.isnan(g.view(BF16).astype(np.float32)).all(), "a NaN did not stay NaN"
    assert ((g & 0x0040) != 0).all(), "NaN not quiet"
    np.testing.assert_array_equal(g & 0x8000, (f[nan].view(np.uint32) >> 16) & 0x8000)
    # what ml_dtypes does with NaN too (the quiet NaN of its sign)
    np.testing.assert_array_equal(g, want[nan])
    # the overflow edge and the infinities, spelled out
    edge = np.array([0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
                     0xFF7F8000, 0x00008000, 0x00018000, 0x80000000], np.uint32)
    out = np.empty(edge.shape, np.uint16)
    to_bf16(edge.view(np.float32), out)
    assert [hex(v) for v in out] == ["0x7f7f", "0x7f7f", "0x7f80", "0x7f80", "0x7f80", "0xff80",
                                     "0xff80", "0x0", "0x2", "0x8000"]


# --- the kernels against float64 arithmetic ---------------------------------------------------

@pytest.fixture
def rng():
    return np.random.default_rng(20261202)


def test_declares_bfloat16():
    assert "bfloat16" in BE.dtypes
    assert numba_cpu._bits(np.zeros(3, BF16)).dtype == np.int16   # the format's tag
    assert numba_cpu._bits(np.zeros(3, np.float16)).dtype == np.uint16


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_against_float64(rng, shape, threads):
    c = shape[1]
    x = _data(rng, shape)
    dy = _grad(rng, x)
    with fastbn.num_threads(threads):
        mean, m2 = BE.stats(x)
        assert_stats(mean, m2, x, "stats")

        scale, shift = _vec(rng, c, 0.5, 2) * rng.choice([-1, 1], c).astype(np.float32), \
            _vec(rng, c, -1, 1)
        y = np.full(shape, np.nan, BF16)
        assert BE.normalize(x, mean, scale, shift, y) is None
        assert_rounded(y, *_normalize64(x, mean, scale, shift), "normalize")
        # shift 0: no cancellation at all, only double rounding
        zero = np.zeros(c, np.float32)
        BE.normalize(x, mean, scale, zero, y)
        assert_rounded(y, *_normalize64(x, mean, scale, zero), "normalize, shift 0")

        sums = BE.backward_reduce(dy, x, mean)
        xm = x.astype(np.float64) - _col(mean)
        g = dy.astype(np.float64)
        assert_sums(sums, (g.sum(axis=(0, 2)), (g * xm).sum(axis=(0, 2))), "backward_reduce")

        k_dy, k_x, k_c = _vec(rng, c, 0.5, 2), _vec(rng, c, -1, 1), _vec(rng, c, -1, 1)
        dx = np.full(shape, np.nan, BF16)
        assert BE.backward_elemt(dy, x, mean, k_dy, k_x, k_c, dx) is None
        assert_rounded(dx, *_elemt64(dy, x, mean, k_dy, k_x, k_c), "backward_elemt")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_train_against_float64(rng, shape, threads):
    c, n = shape[1], shape[0] * shape[2]
    x = _data(rng, shape)
    w, b = _vec(rng, c, 0.5, 1.5), _vec(rng, c, -1, 1)
    eps = 1e-5
    y = np.full(shape, np.nan, BF16)
    with fastbn.num_threads(threads):
        mean, m2 = BE.forward_train(x, w, b, eps, y)
    assert_stats(mean, m2, x, "forward_train")
    mean64, m2_64 = _stats64(x)
    scale = w / np.sqrt(m2_64 / n + eps)
    xm = x.astype(np.float64) - _col(mean64)
    exact = xm * _col(scale) + _col(b)
    # the statistics are float32-accurate, not exact: a few float32 ulps more of slack
    assert_rounded(y, exact, np.abs(xm * _col(scale)) + np.abs(_col(b)), "forward_train",
                   slack=64.0)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", [(4, 6, 9), (3, 5, 67), (4, 8, 1000), (37, 130, 1),
                                   (2, 1, 300000)], ids=str)
def test_backward_train_of_the_kernel_module(rng, shape, threads):
    """bn_numba.backward_train (fused per channel, or composed), which the adapter
    leaves to the core, on the int16 views the adapter would pass."""
    from fastbn._kernels import bn_numba

    c, n = shape[1], shape[0] * shape[2]
    x = _data(rng, shape)
    dy = _grad(rng, x)
    mean64, m2_64 = _stats64(x)
    mean = mean64.astype(np.float32)
    invstd = (1 / np.sqrt(m2_64 / n + 1e-5)).astype(np.float32)
    w = _vec(rng, c, 0.5, 1.5)
    dx = np.full(shape, np.nan, BF16)
    bits = numba_cpu._bits
    sdy, sdyx = bn_numba.backward_train(bits(dy), bits(x), mean, invstd, w, bits(dx), threads)
    xm = x.astype(np.float64) - _col(mean)
    g = dy.astype(np.float64)
    want_sdy, want_sdyx = g.sum(axis=(0, 2)), (g * xm).sum(axis=(0, 2))
    assert_sums((sdy, sdyx), (want_sdy, want_sdyx), "backward_train")
    w_is = w.astype(np.float64) * invstd
    k_x = -w_is * invstd.astype(np.float64) ** 2 * want_sdyx / n
    k_c = -w_is * want_sdy / n
    gt, vt = g * _col(w_is), xm * _col(k_x)
    exact = gt + vt + _col(k_c)
    assert_rounded(dx, exact, np.abs(gt) + np.abs(vt) + np.abs(_col(k_c)), "backward_train",
                   slack=64.0)


# --- edges --------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", [(1, 1, 1 << 16), (1 << 13, 8, 1), (4, 8, 1 << 11)], ids=str)
def test_every_bfloat16_pattern_through_identity_normalize(shape, threads):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(BF16).reshape(shape)
    c = shape[1]
    zero, one = np.zeros(c, np.float32), np.ones(c, np.float32)
    y = np.full(shape, 7, BF16)
    with fastbn.num_threads(threads):
        BE.normalize(x, zero, one, zero, y)
    xf = x.astype(np.float32)
    yb = y.view(np.uint16)
    finite = np.isfinite(xf)
    negzero = bits.reshape(shape) == 0x8000
    keep = finite & ~negzero
    np.testing.assert_array_equal(yb[keep], x.view(np.uint16)[keep])
    # (-0 - 0) * 1 + 0 is +0 in IEEE arithmetic (and in float32, then rounded)
    assert (yb[negzero] == 0).all()
    assert np.isnan(y[np.isnan(xf)].astype(np.float32)).all()
    inf = np.isinf(xf)
    np.testing.assert_array_equal(y[inf].astype(np.float32), xf[inf])
    # the same as float32 arithmetic rounded with ml_dtypes, every pattern
    with np.errstate(invalid="ignore"):
        want = ((xf - np.float32(0)) * np.float32(1) + np.float32(0)).astype(BF16)
    np.testing.assert_array_equal(yb[~np.isnan(xf)], want.view(np.uint16)[~np.isnan(xf)])


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", [(1, 1, 1 << 16), (1 << 13, 8, 1), (4, 8, 1 << 11)], ids=str)
def test_exact_products_round_like_ml_dtypes(shape, threads):
    """Every bfloat16 pattern times scales whose products are exact in float32 (8-bit
    by <= 10-bit significands): the kernels' stores must give, bit for bit, what
    ml_dtypes rounds the float32 product to: ties to even, subnormals, and the
    largest values rounding up to inf among them."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(BF16).reshape(shape)
    xf = x.astype(np.float32)
    c = shape[1]
    s = np.resize(np.array(EXACT_SCALES, np.float32), c)
    zero = np.zeros(c, np.float32)
    y = np.empty(shape, BF16)
    with fastbn.num_threads(threads):
        BE.normalize(x, zero, s, zero, y)
    with np.errstate(all="ignore"):
        # (x - 0) * s + 0, as the kernels compute it (so -0 * s + 0 is +0)
        want = ((xf - np.float32(0)) * s[None, :, None] + np.float32(0)).astype(BF16)
    nan = np.isnan(xf)
    got = y.view(np.uint16)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(y[nan].astype(np.float32)).all()
    # the cases that matter were there: ties, and finite values rounded up to inf
    prod = xf * s[None, :, None]
    assert ((prod.view(np.uint32) & 0xFFFF) == 0x8000).sum() > 100
    assert (np.isfinite(prod) & np.isinf(want.astype(np.float32))).any()


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", [(4, 6, 9), (3, 5, 67), (37, 130, 1), (2, 3, 300000)],
                         ids=str)
def test_nonfinite_stays_in_its_channel(rng, shape, threads):
    O, C, I = shape
    x = _data(rng, shape)
    dy = _grad(rng, x)
    bad = x.copy()
    flat = bad[:, 1, :].reshape(-1).copy()
    idx = rng.choice(flat.size, 3, replace=False)
    flat[idx] = np.array([np.nan, np.inf, -np.inf], np.float32).astype(BF16)
    bad[:, 1, :] = flat.reshape(O, I)
    dy_bad = dy.copy()
    dy_bad[:, 1, :] = bad[:, 1, :]
    others = [c for c in range(C) if c != 1]
    mean0 = _vec(rng, C, -1, 1)
    one, zero = np.ones(C, np.float32), np.zeros(C, np.float32)
    w, b = _vec(rng, C, 0.5, 1.5), _vec(rng, C, -1, 1)
    with fastbn.num_threads(threads):
        clean, dirty = BE.stats(x), BE.stats(bad)
        assert not np.isfinite(dirty[1][1])
        for a, b_ in zip(clean, dirty):
            np.testing.assert_array_equal(a[others], b_[others])

        y_clean, y_bad = np.empty_like(x), np.empty_like(x)
        BE.normalize(x, mean0, one, zero, y_clean)
        BE.normalize(bad, mean0, one, zero, y_bad)
        yb = y_bad[:, 1, :].reshape(-1)[idx].astype(np.float32)
        assert np.isnan(yb[0]) and yb[1] == np.inf and yb[2] == -np.inf
        np.testing.assert_array_equal(y_bad[:, others].view(np.uint16),
                                      y_clean[:, others].view(np.uint16))

        ft_clean, ft_bad = np.empty_like(x), np.empty_like(x)
        s_clean = BE.forward_train(x, w, b, 1e-5, ft_clean)
        s_bad = BE.forward_train(bad, w, b, 1e-5, ft_bad)
        assert not np.isfinite(s_bad[1][1])
        assert not np.isfinite(ft_bad[:, 1, :].astype(np.float32)).any()
        for a, b_ in zip(s_clean, s_bad):
            np.testing.assert_array_equal(a[others], b_[others])
        np.testing.assert_array_equal(ft_bad[:, others].view(np.uint16),
                                      ft_clean[:, others].view(np.uint16))

        r_clean, r_bad = BE.backward_reduce(dy, x, mean0), BE.backward_reduce(dy_bad, bad, mean0)
        assert not np.isfinite(r_bad[0][1]) and not np.isfinite(r_bad[1][1])
        for a, b_ in zip(r_clean, r_bad):
            np.testing.assert_array_equal(a[others], b_[others])

        dx_clean, dx_bad = np.empty_like(x), np.empty_like(x)
        BE.backward_elemt(dy, x, mean0, one, w, b, dx_clean)
        BE.backward_elemt(dy_bad, bad, mean0, one, w, b, dx_bad)
        assert not np.isfinite(dx_bad[:, 1, :].reshape(-1)[idx].astype(np.float32)).any()
        np.testing.assert_array_equal(dx_bad[:, others].view(np.uint16),
                                      dx_clean[:, others].view(np.uint16))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", [(4, 6, 9), (3, 5, 67), (16, 6, 1), (37, 130, 1),
                                   (2, 1, 300000)], ids=str)
def test_in_place(rng, shape, threads):
    c = shape[1]
    x = _data(rng, shape)
    mean, scale, shift = _vec(rng, c, -1, 1), _vec(rng, c, 0.5, 2), _vec(rng, c, -1, 1)
    w, b = _vec(rng, c, 0.5, 1.5), _vec(rng, c, -1, 1)
    with fastbn.num_threads(threads):
        want = np.empty_like(x)
        BE.normalize(x, mean, scale, shift, want)
        x3 = x.copy()
        BE.normalize(x3, mean, scale, shift, x3)
        np.testing.assert_array_equal(x3.view(np.uint16), want.view(np.uint16))

        want = np.empty_like(x)
        stats_want = BE.forward_train(x, w, b, 1e-5, want)
        x3 = x.copy()
        stats_got = BE.forward_train(x3, w, b, 1e-5, x3)
        np.testing.assert_array_equal(x3.view(np.uint16), want.view(np.uint16))
        for a, b_ in zip(stats_got, stats_want):
            np.testing.assert_array_equal(a, b_)


def _aligned_touched(shape):
    """A 64-byte aligned, already written bfloat16 array (what streaming stores need)."""
    n = int(np.prod(shape))
    raw = np.zeros(n * 2 + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    out = raw[off:off + n * 2].view(BF16).reshape(shape)
    out.view(np.uint16)[...] = 0x7FC0
    return out


@pytest.mark.parametrize("shape", [(8, 4, 40000), (40000, 32, 1)], ids=str)
def test_streamed_stores_match_ordinary_ones(rng, shape):
    from fastbn._kernels import bn_numba

    c = shape[1]
    x, dy = _data(rng, shape), _data(rng, shape)
    vecs = [_vec(rng, c, -1, 1) for _ in range(4)]
    for kernel, args in (("normalize", (x, *vecs[:3])), ("backward_elemt", (dy, x, *vecs))):
        plain = np.full(shape, np.nan, BF16)    # fresh numpy memory: 16 mod 64, no streaming
        streamed = _aligned_touched(shape)
        assert bn_numba._should_stream(numba_cpu._bits(streamed))
        with fastbn.num_threads(2):
            getattr(BE, kernel)(*args, plain)
            getattr(BE, kernel)(*args, streamed)
        np.testing.assert_array_equal(streamed.view(np.uint16), plain.view(np.uint16),
                                      err_msg=kernel)
        exact, terms = (_normalize64(*args) if kernel == "normalize" else _elemt64(*args))
        assert_rounded(streamed, exact, terms, kernel)
