"""bfloat16 in the Cython+OpenMP backend, its kernels called directly.

The adapter ``fastbn._backends.cython_omp.backend`` is called as the core calls it
(C-contiguous ``(O, C, I)`` ml_dtypes.bfloat16 arrays, float32 ``(C,)`` vectors), not
through the public API, on both kernel families (planes ``I > 1``, rows ``I == 1``),
1 and 2 threads, both instruction sets (AVX2 and the portable baseline) and, for the
training kernels, the fused per-channel paths and the composed ones.

What is held:

* element-wise outputs against float64 arithmetic rounded to float32 then to
  bfloat16: bit-identical, except that at most 0.1% of the elements may differ, by one
  ulp (float32 arithmetic rounding next to a bfloat16 rounding boundary). Where the
  result is far smaller than its terms (cancellation), float32 arithmetic alone is off
  by more than a sliver of a bfloat16 ulp: those few elements are held to the float32
  error of their terms instead;
* statistics: float32 vectors within 2e-5 relative of the float64 statistics of the
  bfloat16 data (the mean relative to max(|mean|, std), sums relative to the sum of
  the absolute terms: a small result of a cancelling sum has no relative accuracy);
* rounding of the stores: float32 values (ties, the largest finite, NaN payloads,
  subnormals, random bit patterns) stored bit-identical to ml_dtypes' ``astype``;
* all 65,536 bfloat16 bit patterns through ``(x - 0) * 1 + 0``: finite values
  unchanged (-0 gives +0, as IEEE arithmetic does), NaN stays NaN, ±inf stays ±inf;
* NaN and ±inf in one channel stay in that channel; ``y3 is x3`` (in place);
  streaming stores into a large, aligned, touched output.
"""
import numpy as np
import pytest

import fastbn

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays are ml_dtypes' bfloat16")

from fastbn._backends.cython_omp import backend as BE  # noqa: E402

_ok, _why = BE.is_available()
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"cython backend unavailable: {_why}"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                               "ignore:overflow:RuntimeWarning"),
]

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(4, 6, 9), (3, 5, 67), (16, 6, 1), (37, 130, 1), (2, 1, 300000), (5000, 64, 1)]
EPS = 1e-5


def _module():
    from fastbn._kernels import _bn_omp
    return _bn_omp


# ----------------------------------------------------------------------------------------
# fixtures: instruction set, fused paths, threads
# ----------------------------------------------------------------------------------------

@pytest.fixture(params=["avx2", "baseline"])
def simd(request):
    """The kernels' instruction set for the test (restored after it)."""
    K = _module()
    old = K.simd_level()
    try:
        if K.simd_level(request.param) != request.param:
            pytest.skip(f"{request.param} loops not available on this CPU/build")
        yield request.param
    finally:
        K.simd_level(old)


@pytest.fixture(params=["fused", "composed"])
def fusion(request):
    """The training kernels' per-channel fused paths where they fit, or never."""
    K = _module()
    old = K._fuse_limits()
    try:
        if request.param == "composed":
            K._fuse_limits(0, 0)
        yield request.param
    finally:
        K._fuse_limits(*old)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    return request.param


def call(n_threads, kernel, *args):
    with fastbn.num_threads(n_threads):
        return getattr(BE, kernel)(*args)


# ----------------------------------------------------------------------------------------
# data and references
# ----------------------------------------------------------------------------------------

def _rng(shape, salt=0):
    return np.random.default_rng([20260501, salt, *shape])


def data(shape, salt=0):
    """bfloat16 (O, C, I): per-channel location and scale, a few values per ulp apart."""
    rng = _rng(shape, salt)
    c = shape[1]
    loc = rng.uniform(-3, 3, c)[None, :, None]
    sd = rng.uniform(0.5, 2.0, c)[None, :, None]
    return (loc + sd * rng.standard_normal(shape)).astype(BF16)


def vec(shape, lo, hi, salt):
    return _rng(shape, salt).uniform(lo, hi, shape[1]).astype(np.float32)


def f64(a):
    return np.asarray(a).astype(np.float64)


def b(v):
    """A (C,) vector broadcast against (O, C, I), in float64."""
    return f64(v)[None, :, None]


def stats64(x3):
    x = f64(x3)
    mean = x.mean(axis=(0, 2))
    return mean, ((x - mean[None, :, None]) ** 2).sum(axis=(0, 2))


def bits(a):
    return np.asarray(a).view(np.uint16)


def ulps(got, want):
    """Distance in bfloat16 ulps (ordered bit patterns; +0 and -0 are 0 apart)."""
    def ordered(h):
        i = bits(h).view(np.int16).astype(np.int32)
        return np.where(i < 0, -(i & 0x7FFF), i)
    return np.abs(ordered(got) - ordered(want))


def assert_rounded(kernel, got, want64, terms):
    """got (bfloat16) is want64 (float64) rounded to float32 then bfloat16: bit-identical
    but for at most 0.1% of the elements, by one ulp; where float32 arithmetic on terms of
    magnitude `terms` can move the result by over 1/16 of a bfloat16 ulp (cancellation),
    within that arithmetic error instead."""
    assert got.dtype == BF16, f"{kernel}: output dtype {got.dtype}"
    assert np.isfinite(want64).all()
    want = want64.astype(np.float32).astype(BF16)
    d = ulps(got, want)
    err32 = 2.0 ** -20 * terms             # float32 arithmetic, a few roundings of the terms
    ill = err32 > 2.0 ** -12 * np.abs(want64)
    gotf = f64(got)
    off = np.abs(gotf - want64)[ill] > err32[ill] + 2.0 ** -8 * np.abs(want64[ill])
    assert not off.any(), (f"{kernel}: {int(off.sum())} cancelling results off by more "
                           f"than float32 arithmetic allows")
    assert d[~ill].max(initial=0) <= 1, (
        f"{kernel}: an output {int(d[~ill].max())} ulp from the float64 result rounded, "
        f"e.g. got {gotf[~ill][np.argmax(d[~ill])]!r}, want "
        f"{want64[~ill][np.argmax(d[~ill])]!r}")
    assert np.count_nonzero(d) <= 1e-3 * d.size, (
        f"{kernel}: {np.count_nonzero(d)} of {d.size} outputs differ by an ulp from the "
        f"float64 result rounded (> 0.1%)")


def assert_vec(kernel, name, got, want, scale, rtol=2e-5):
    got = np.asarray(got)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, (
        f"{kernel}: {name} is {type(got).__name__} {getattr(got, 'dtype', None)}, not float32")
    assert got.shape == want.shape, f"{kernel}: {name} shape {got.shape}"
    err = np.abs(f64(got) - want)
    bad = ~(err <= rtol * scale)
    assert not bad.any(), (f"{kernel}: {name}[{np.flatnonzero(bad)[0]}] = "
                           f"{got[bad][0]!r}, want {want[bad][0]!r} (relative {rtol})")


def assert_stats(kernel, got, x3):
    mean, m2 = stats64(x3)
    n = x3.shape[0] * x3.shape[2]
    assert_vec(kernel, "mean", got[0], mean, np.maximum(np.abs(mean), np.sqrt(m2 / n)))
    assert_vec(kernel, "m2", got[1], m2, m2)


def assert_sums(kernel, got, dy3, x3, mean):
    g, xm = f64(dy3), f64(x3) - b(mean)
    assert_vec(kernel, "sum_dy", got[0], g.sum(axis=(0, 2)), np.abs(g).sum(axis=(0, 2)))
    assert_vec(kernel, "sum_dy_xmu", got[1], (g * xm).sum(axis=(0, 2)),
               np.abs(g * xm).sum(axis=(0, 2)))


# ----------------------------------------------------------------------------------------
# each kernel against float64
# ----------------------------------------------------------------------------------------

def test_declares_bfloat16():
    assert "bfloat16" in BE.dtypes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stats(shape, threads, simd):
    x3 = data(shape)
    got = call(threads, "stats", x3)
    assert_stats("stats", got, x3)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize(shape, threads, simd):
    x3 = data(shape)
    mean, scale, shift = vec(shape, -3, 3, 1), vec(shape, 0.3, 2, 2), vec(shape, -1, 1, 3)
    y3 = np.full(shape, np.nan, BF16)
    assert call(threads, "normalize", x3, mean, scale, shift, y3) is None
    xm = f64(x3) - b(mean)
    assert_rounded("normalize", y3, xm * b(scale) + b(shift),
                   np.abs(xm * b(scale)) + np.abs(b(shift)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_reduce(shape, threads, simd):
    x3, dy3 = data(shape), data(shape, salt=7)
    mean = stats64(x3)[0].astype(np.float32)
    got = call(threads, "backward_reduce", dy3, x3, mean)
    assert_sums("backward_reduce", got, dy3, x3, mean)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_elemt(shape, threads, simd):
    x3, dy3 = data(shape), data(shape, salt=7)
    mean, k_dy = vec(shape, -3, 3, 1), vec(shape, 0.3, 2, 2)
    k_x, k_c = vec(shape, -0.5, 0.5, 3), vec(shape, -1, 1, 4)
    dx3 = np.full(shape, np.nan, BF16)
    assert call(threads, "backward_elemt", dy3, x3, mean, k_dy, k_x, k_c, dx3) is None
    t1, t2 = b(k_dy) * f64(dy3), b(k_x) * (f64(x3) - b(mean))
    assert_rounded("backward_elemt", dx3, t1 + t2 + b(k_c),
                   np.abs(t1) + np.abs(t2) + np.abs(b(k_c)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_train(shape, threads, simd, fusion):
    x3 = data(shape)
    weight, bias = vec(shape, 0.5, 1.5, 5), vec(shape, -1, 1, 6)
    y3 = np.full(shape, np.nan, BF16)
    got = call(threads, "forward_train", x3, weight, bias, EPS, y3)
    assert_stats("forward_train", got, x3)
    mean, m2 = stats64(x3)
    n = shape[0] * shape[2]
    scale = f64(weight) / np.sqrt(m2 / n + EPS)
    xm = (f64(x3) - b(mean)) * b(scale)
    assert_rounded("forward_train", y3, xm + b(bias), np.abs(xm) + np.abs(b(bias)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_train(shape, threads, simd, fusion):
    x3, dy3 = data(shape), data(shape, salt=7)
    mean64, m2 = stats64(x3)
    n = shape[0] * shape[2]
    mean = mean64.astype(np.float32)
    invstd = (1 / np.sqrt(m2 / n + EPS)).astype(np.float32)
    weight = vec(shape, 0.5, 1.5, 5)
    dx3 = np.full(shape, np.nan, BF16)
    got = call(threads, "backward_train", dy3, x3, mean, invstd, weight, dx3)
    assert_sums("backward_train", got, dy3, x3, mean)
    # dx from the kernel's own sums (checked just above): the float64 sums would move
    # k_x by their float32 rounding, which the 0.1% budget is not there to absorb
    sdy, sdyx = f64(got[0]), f64(got[1])
    w_is = f64(weight) * f64(invstd)
    k_x, k_c = -w_is * f64(invstd) ** 2 * sdyx / n, -w_is * sdy / n
    t1, t2 = b(w_is) * f64(dy3), b(k_x) * (f64(x3) - b(mean))
    assert_rounded("backward_train", dx3, t1 + t2 + b(k_c),
                   np.abs(t1) + np.abs(t2) + np.abs(b(k_c)))


@pytest.mark.parametrize("shape", [(3, 5, 67), (37, 130, 1), (5000, 64, 1), (2, 1, 300000)],
                         ids=str)
def test_stable_statistics(shape, threads, simd, fusion):
    """|mean| / std = 300: E[x^2] - E[x]^2 in float32, or a tile shifted by anything
    but a value near the mean, loses the variance."""
    rng = _rng(shape, 9)
    x3 = (300 * (1 + rng.uniform(0, 1, shape[1]))[None, :, None]
          + 4 * rng.standard_normal(shape)).astype(BF16)
    assert_stats("stats", call(threads, "stats", x3), x3)
    y3 = np.empty(shape, BF16)
    ones, zeros = np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32)
    assert_stats("forward_train", call(threads, "forward_train", x3, ones, zeros, EPS, y3), x3)


# ----------------------------------------------------------------------------------------
# rounding and special values
# ----------------------------------------------------------------------------------------

def _float32_cases():
    """float32 bit patterns to round: ties both ways, the largest finite and what rounds
    past it, inf, NaN payloads (never rounded into inf), subnormals, random patterns."""
    special = [0x00000000, 0x00008000, 0x00018000, 0x00017FFF, 0x0000FFFF, 0x00010000,
               0x007FFFFF, 0x00800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,
               0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x7F7F0000, 0x7F800000, 0x7F800001,
               0x7F807FFF, 0x7F808000, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF, 0x7F80FFFF]
    special += [s | 0x80000000 for s in special]
    rng = np.random.default_rng(12)
    rand = rng.integers(0, 1 << 32, 8000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, 1000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    return np.concatenate([np.array(special, np.uint32), rand, ties]).view(np.float32)


@pytest.mark.parametrize("family", ["planes", "rows"])
def test_store_rounding(family, threads, simd):
    """y = (0 - 0) * 1 + shift is shift itself, stored: bit-identical to ml_dtypes'
    float32 -> bfloat16 (round to nearest even, overflow to inf, NaN quiet, never inf)."""
    shift = _float32_cases()
    c = shift.size
    shape = (1, c, 9) if family == "planes" else (7, c, 1)
    x3 = np.zeros(shape, BF16)
    zeros, ones = np.zeros(c, np.float32), np.ones(c, np.float32)
    y3 = np.full(shape, 1.0, BF16)
    call(threads, "normalize", x3, zeros, ones, shift, y3)
    with np.errstate(invalid="ignore"):
        want = np.broadcast_to((np.float32(0) + shift).astype(BF16)[None, :, None], shape)
    nan = np.isnan(f64(want))
    assert (np.isnan(f64(y3)) == nan).all(), "a NaN was not stored as NaN (or a number as NaN)"
    assert ((bits(y3)[nan] & 0x7FC0) == 0x7FC0).all(), "a NaN was stored as a signalling NaN"
    wrong = bits(y3)[~nan] != bits(want)[~nan]
    if wrong.any():
        i = np.flatnonzero(wrong)[0]
        got_b, want_b = bits(y3)[~nan][i], bits(want)[~nan][i]
        src = np.broadcast_to(shift[None, :, None], shape)[~nan][i]
        pytest.fail(f"{int(wrong.sum())} stores not rounded as ml_dtypes does, e.g. float32 "
                    f"0x{src.view(np.uint32):08x} -> 0x{got_b:04x}, want 0x{want_b:04x}")


@pytest.mark.parametrize("family", ["planes", "rows"])
def test_every_bfloat16_through_normalize(family, threads, simd):
    allv = np.arange(1 << 16, dtype=np.uint16).view(BF16)
    shape = (1, 1, allv.size) if family == "planes" else (allv.size // 8, 8, 1)
    x3 = allv.reshape(shape)
    zeros, ones = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    y3 = np.full(shape, np.nan, BF16)
    call(threads, "normalize", x3, zeros, ones, zeros, y3)
    x, y = bits(x3).ravel(), bits(y3).ravel()
    xf = f64(x3).ravel()
    finite = np.isfinite(xf)
    negzero = x == 0x8000
    keep = finite & ~negzero
    assert (y[keep] == x[keep]).all(), (
        f"(x - 0) * 1 + 0 changed {int((y[keep] != x[keep]).sum())} finite bfloat16 values, "
        f"e.g. 0x{x[keep][y[keep] != x[keep]][0]:04x}")
    assert (y[negzero] == 0).all(), "-0 - 0 + 0 is +0 in IEEE arithmetic"
    inf = np.isinf(xf)
    assert (y[inf] == x[inf]).all(), "an infinity changed"
    nan = np.isnan(xf)
    assert np.isnan(f64(y3).ravel()[nan]).all(), "a NaN became a number"
    assert ((y[nan] & 0x7FC0) == 0x7FC0).all(), "a NaN left unquieted"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(3, 5, 67), (37, 130, 1), (5000, 64, 1), (4, 3, 30000)],
                         ids=str)
def test_nonfinite_stays_in_its_channel(shape, bad, threads, simd, fusion):
    clean = data(shape)
    dy3 = data(shape, salt=7)
    c_bad = shape[1] // 2
    x3 = clean.copy()
    x3[shape[0] // 2, c_bad, shape[2] // 2] = bad
    others = np.arange(shape[1]) != c_bad
    weight, bias = vec(shape, 0.5, 1.5, 5), vec(shape, -1, 1, 6)

    def run(x):
        y = np.empty(shape, BF16)
        st = call(threads, "forward_train", x, weight, bias, EPS, y)
        st0 = call(threads, "stats", x)
        mean = np.where(others, stats64(clean)[0], 0).astype(np.float32)
        sums = call(threads, "backward_reduce", dy3, x, mean)
        invstd = np.ones(shape[1], np.float32)
        dx = np.empty(shape, BF16)
        bsums = call(threads, "backward_train", dy3, x, mean, invstd, weight, dx)
        yn = np.empty(shape, BF16)
        call(threads, "normalize", x, mean, weight, bias, yn)
        return st, st0, sums, bsums, y, dx, yn

    ref, got = run(clean), run(x3)
    for name, g, r in zip(("forward_train", "stats", "backward_reduce", "backward_train"),
                          got[:4], ref[:4]):
        for k in range(2):
            assert (g[k].view(np.uint32)[others] == r[k].view(np.uint32)[others]).all(), (
                f"{name}: the other channels changed")
        if name != "backward_reduce":
            assert not np.isfinite(g[1][c_bad]), f"{name}: the channel's result is finite"
    assert not np.isfinite(got[2][1][c_bad]), "backward_reduce: sum_dy_xmu is finite"
    for name, g, r in zip(("forward_train y", "backward_train dx"), got[4:6], ref[4:6]):
        assert (bits(g)[:, others] == bits(r)[:, others]).all(), f"{name}: others changed"
        assert not np.isfinite(f64(g[:, c_bad])).any(), f"{name}: a finite output in the channel"
    yn, yr = got[6], ref[6]
    hit = np.zeros(shape, bool)
    hit[shape[0] // 2, c_bad, shape[2] // 2] = True
    assert (bits(yn)[~hit] == bits(yr)[~hit]).all(), "normalize: another element changed"
    assert not np.isfinite(f64(yn[hit])).any(), "normalize: the non-finite input came out finite"


# ----------------------------------------------------------------------------------------
# in place, streaming stores, the flag
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 67), (37, 130, 1), (2, 1, 300000), (5000, 64, 1)],
                         ids=str)
def test_in_place(shape, threads, simd, fusion):
    x3 = data(shape)
    mean, scale, shift = vec(shape, -3, 3, 1), vec(shape, 0.3, 2, 2), vec(shape, -1, 1, 3)
    want = np.empty(shape, BF16)
    call(threads, "normalize", x3, mean, scale, shift, want)
    y3 = x3.copy()
    call(threads, "normalize", y3, mean, scale, shift, y3)
    assert (bits(y3) == bits(want)).all(), "normalize with y3 is x3 differs"
    weight, bias = vec(shape, 0.5, 1.5, 5), vec(shape, -1, 1, 6)
    want_st = call(threads, "forward_train", x3, weight, bias, EPS, want)
    y3 = x3.copy()
    st = call(threads, "forward_train", y3, weight, bias, EPS, y3)
    assert (bits(y3) == bits(want)).all(), "forward_train with y3 is x3 differs"
    assert all((s == w).all() for s, w in zip(st, want_st))


def touched(shape, aligned):
    """An already written bfloat16 array, 64-byte aligned (where large outputs are
    streamed) or 2 bytes past it (never streamed)."""
    n = int(np.prod(shape))
    raw = np.ones(n + 64, np.uint16)
    off = (-raw.ctypes.data % 64) // 2 + (0 if aligned else 1)
    return raw[off:off + n].view(BF16).reshape(shape)


@pytest.mark.parametrize("shape", [(2, 1, 300001), (9001, 64, 1), (32, 32, 601)], ids=str)
def test_streaming_stores(shape, threads, simd, fusion):
    """Outputs >= 1 MiB, aligned and touched are streamed: same bits as ordinary stores."""
    x3, dy3 = data(shape), data(shape, salt=7)
    c = shape[1]
    mean, scale, shift = vec(shape, -3, 3, 1), vec(shape, 0.3, 2, 2), vec(shape, -1, 1, 3)
    k_x = vec(shape, -0.5, 0.5, 4)
    for kernel, args in (("normalize", (x3, mean, scale, shift)),
                         ("backward_elemt", (dy3, x3, mean, scale, k_x, shift)),
                         ("forward_train", (x3, scale, shift, EPS)),
                         ("backward_train", (dy3, x3, mean, scale, shift))):
        plain, streamed = touched(shape, aligned=False), touched(shape, aligned=True)
        r1 = call(threads, kernel, *args, plain)
        r2 = call(threads, kernel, *args, streamed)
        assert (bits(streamed) == bits(plain)).all(), f"{kernel}: streamed output differs"
        if r1 is not None:
            assert all((a == b_).all() for a, b_ in zip(r1, r2)) and r1[0].shape == (c,)
        if kernel == "normalize":
            xm = f64(x3) - b(mean)
            assert_rounded(kernel, streamed, xm * b(scale) + b(shift),
                           np.abs(xm * b(scale)) + np.abs(b(shift)))


def test_bf16_flag_needs_16_bit_data():
    K = _module()
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(TypeError, match="bf16"):
        K.stats(x, 1, True)
    with pytest.raises(TypeError, match="bf16"):
        K.normalize(x, np.zeros(3, np.float32), np.ones(3, np.float32),
                    np.zeros(3, np.float32), x.copy(), 1, True)


def test_float16_unchanged_by_the_flag():
    """float16 data still goes the float16 way (bf16=False from the adapter)."""
    x3 = np.linspace(-2, 2, 4 * 3 * 5).reshape(4, 3, 5).astype(np.float16)
    y3 = np.empty_like(x3)
    z, o = np.zeros(3, np.float32), np.ones(3, np.float32)
    BE.normalize(x3, z, o, z, y3)
    assert (y3 == x3).all()
