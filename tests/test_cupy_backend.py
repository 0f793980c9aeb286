"""The CuPy backend beyond the parity suite.

Without cupy or a GPU: the adapter imports, says why it is unavailable, and its
launch planning (pure functions of the shape) keeps CUDA's limits and the
32-bit index rule. With cupy and NVRTC: every module compiles through CuPy's
own compiler options. With a GPU: results stay CuPy arrays on the input's
device with no synchronisation, split reductions (several blocks per channel,
merged by the last block) and the 64-bit index kernels match the reference, for
every dtype (bfloat16 where this CuPy has ml_dtypes' bfloat16 arrays), and bfloat16
stores round to nearest even.
The parity suite (tests/test_parity.py) covers the rest for every registered
backend, cupy included.
"""
import importlib
import importlib.util
import io
import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn
from fastbn._registry import unregister_backend
from fastbn.testing import assert_close, direct_forward, to_numpy

cupy_gpu = importlib.import_module("fastbn._backends.cupy_gpu")
ref = importlib.import_module("fastbn._backends.numpy_ref").backend
backend = cupy_gpu.backend

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _np_dtype(name):
    """The NumPy dtype called ``name``; bfloat16 is ml_dtypes'."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --- everywhere: import, availability, planning -----------------------------------------

def test_adapter_imports_without_importing_cupy(tmp_path):
    code = textwrap.dedent("""
        import sys
        import fastbn
        from fastbn._backends import cupy_gpu
        cupy_gpu.plan_reduce_planes(4, 3, 5, 132)
        assert "cupy" not in sys.modules, "cupy imported at module import"
    """)
    # run outside the checkout, so that the installed fastbn is imported
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unavailable_without_cupy_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "cupy" else real(name, *args))
    ok, reason = backend.is_available()
    assert not ok
    assert "pip install fastbn[cupy]" in reason


def test_availability_has_a_reason():
    ok, reason = backend.is_available()
    assert ok or reason.strip()


def test_backends_lists_cupy_with_its_reason():
    before = fastbn._registry._backends.get("cupy")
    fastbn.register_backend(backend, replace=True)
    try:
        row = next(r for r in fastbn.backends() if r.name == "cupy")
        ok, reason = backend.is_available()
        assert row.available == ok and row.reason == ("" if ok else reason)
        assert row.devices == {"cuda"} and row.dtypes == set(DTYPES) and row.priority == 100
    finally:
        if before is None:
            unregister_backend("cupy")
        else:
            fastbn.register_backend(before, replace=True)


def test_index_type_follows_the_byte_extent():
    assert cupy_gpu.index_type(0) == "i32"
    assert cupy_gpu.index_type(2**31 - 1) == "i32"
    assert cupy_gpu.index_type(2**31) == "i64"
    assert cupy_gpu.index_type(2**40) == "i64"


def test_compile_options_select_one_dtype():
    for dtype in DTYPES:
        flags = [o for o in cupy_gpu.compile_options(dtype) if o.startswith("-DFASTBN_")]
        assert sorted(flags) == sorted(f"-DFASTBN_{d.upper()}={int(d == dtype)}" for d in DTYPES)


def _pow2(n):
    return n > 0 and n & (n - 1) == 0


# (O, C, I) shapes from tiny to the int32 limit and past it
SHAPES = [(1, 1, 2), (2, 3, 5), (16, 6, 1), (3, 6, 35), (256, 64, 12544), (256 * 12544, 64, 1),
          (1, 1, 2**30 - 1), (2**30 - 1, 1, 1), (1, 2**29, 2), (2**15, 2**15, 1), (3, 2**28, 1),
          (2**20, 7, 3), (1, 3, 2**33), (2**33, 3, 1), (2**31 - 1, 2, 2), (1, 2**31 - 1, 1)]
DEVICES = [(1, 2048), (108, 2048), (132, 2048), (200, 1536)]


def _i32_overshoot_ok(limit, stride, elements):
    """A loop counter below ``limit`` steps ``UNROLL`` strides past it: must fit an int."""
    return limit + cupy_gpu.UNROLL * stride < 2**31 or elements * 2 >= 2**31


@pytest.mark.parametrize("sm, per_sm", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reduction_plans_respect_cuda_limits(shape, sm, per_sm):
    O, C, I = shape
    n = O * C * I
    if I > 1:
        (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_reduce_planes(O, C, I, sm, per_sm)
        assert gx == C
        assert _pow2(bx * by) and 32 <= bx * by <= cupy_gpu.THREADS  # whole warps
        assert bx < 2 * I
        assert gy * by < 2 * O + by and gz * bx < 2 * I + bx  # every slice has work
        assert _i32_overshoot_ok(O, gy * by, n) and _i32_overshoot_ok(I, gz * bx, n)
    else:
        (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_reduce_rows(O, C, sm, per_sm)
        assert gx * bx >= C > (gx - 1) * bx
        assert _pow2(bx) and _pow2(by) and bx * by <= cupy_gpu.THREADS
        assert gy <= max(1, O)
        assert _i32_overshoot_ok(O, gy * by, n)
    assert bz == 1 and gx <= cupy_gpu.MAX_GRID_X
    assert 1 <= gy <= cupy_gpu.MAX_GRID_YZ and 1 <= gz <= cupy_gpu.MAX_GRID_YZ
    assert gy * by <= cupy_gpu.MAX_STRIDE and gz * bx <= cupy_gpu.MAX_STRIDE


@pytest.mark.parametrize("sm, per_sm", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_elementwise_plans_respect_cuda_limits(shape, sm, per_sm):
    O, C, I = shape
    n = O * C * I
    if I > 1:
        (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_elementwise_planes(O * C, I, sm, per_sm)
        assert bx * by == cupy_gpu.ELEMENTWISE_THREADS
        assert _i32_overshoot_ok(O * C, gx * by, n) and _i32_overshoot_ok(I, gy * bx, n)
        assert gx * by <= cupy_gpu.MAX_STRIDE
    else:
        (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_elementwise_rows(O, C, sm, per_sm)
        assert gx * bx >= C > (gx - 1) * bx
        assert bx * by <= cupy_gpu.ELEMENTWISE_THREADS
        assert _i32_overshoot_ok(O, gy * by, n)
    assert gz == 1 and bz == 1 and 1 <= gx <= cupy_gpu.MAX_GRID_X
    assert 1 <= gy <= cupy_gpu.MAX_GRID_YZ and gy * by <= cupy_gpu.MAX_STRIDE


def test_big_inputs_split_their_reductions():
    """The benchmark shapes fill an H100 (132 SMs) instead of one block per channel."""
    grid, _ = cupy_gpu.plan_reduce_planes(256, 64, 112 * 112, 132)
    assert grid[0] * grid[1] * grid[2] >= 2 * 132
    grid, _ = cupy_gpu.plan_reduce_rows(256 * 112 * 112, 64, 132)
    assert grid[0] * grid[1] >= 2 * 132


def test_modules_compile_with_cupys_compiler_options():
    """NVRTC, with the include paths CuPy adds (cuda_fp16.h for float16), no GPU needed."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed (pip install fastbn[cupy])")
    try:
        cupy.cuda.nvrtc.getVersion()
        from cupy._core.core import assemble_cupy_compiler_options
        from cupy.cuda.compiler import _NVRTCProgram
        assemble_cupy_compiler_options(())  # finds the CUDA headers, or raises
    except Exception as exc:  # noqa: BLE001 - no NVRTC or headers, or CuPy moved its internals
        pytest.skip(f"cannot drive CuPy's NVRTC here: {type(exc).__name__}: {exc}")
    for dtype in DTYPES:
        log = io.StringIO()
        options = assemble_cupy_compiler_options(cupy_gpu.compile_options(dtype))
        ptx, _ = _NVRTCProgram(cupy_gpu.kernel_source(), "bn_cuda.cu").compile(
            options + ("-arch=compute_80",), log)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert log.getvalue().strip() == "", log.getvalue()
        entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
        assert entries == set(cupy_gpu.kernel_names(dtype))


# --- with a GPU ----------------------------------------------------------------------

@pytest.fixture
def cp():
    ok, reason = backend.is_available()
    if not ok:
        pytest.skip(f"backend 'cupy' unavailable: {reason}")
    import cupy
    return cupy


def _input(rng, shape, dtype):
    """(O, C, I) data whose channels have different means and spreads."""
    c = shape[1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, c, 1)) + rng.uniform(-3, 3, (1, c, 1))
    return x.astype(_np_dtype(dtype))


def _needs_dtype(cp, dtype):
    """Skip, with the reason, where this CuPy cannot hold arrays of ``dtype``."""
    try:
        cp.empty(1, _np_dtype(dtype))
    except Exception as exc:  # noqa: BLE001 - older CuPy: no ml_dtypes bfloat16 arrays
        pytest.skip(f"this CuPy has no {dtype} arrays: {type(exc).__name__}: {exc}")


def _sm(cp):
    return cupy_gpu._device_facts(cp, cp.cuda.Device().id)


# shapes whose reductions are split over several blocks per channel on any GPU of
# >= 16 SMs: planes split over O, planes split over I (O too small), rows
SPLIT_SHAPES = [(64, 3, 2048), (4, 3, 65536), (131072, 5, 1), (40000, 70, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_split_reductions_match_reference(cp, rng, shape, dtype):
    _needs_dtype(cp, dtype)
    O, C, I = shape
    sm, per_sm = _sm(cp)
    if I > 1:
        grid, _ = cupy_gpu.plan_reduce_planes(O, C, I, sm, per_sm)
        assert grid[1] * grid[2] > 1, "shape chosen to exercise the last-block merge"
    else:
        grid, _ = cupy_gpu.plan_reduce_rows(O, C, sm, per_sm)
        assert grid[1] > 1, "shape chosen to exercise the last-block merge"
    stat = cupy_gpu.STAT_DTYPE[dtype]
    x = _input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(_np_dtype(dtype))
    mean_ref, m2_ref = ref.stats(x)
    mean, m2 = backend.stats(cp.asarray(x))
    assert isinstance(mean, cp.ndarray) and mean.dtype == stat and m2.dtype == stat
    assert_close(mean, mean_ref, stat, err_msg="mean")
    assert_close(m2, m2_ref, stat, err_msg="m2")
    sums_ref = ref.backward_reduce(dy, x, mean_ref)
    sums = backend.backward_reduce(cp.asarray(dy), cp.asarray(x), cp.asarray(mean_ref))
    assert_close(sums[0], sums_ref[0], stat, err_msg="sum_dy")
    assert_close(sums[1], sums_ref[1], stat, err_msg="sum_dy_xmu")


def _all_kernels_against_reference(cp, rng, shape, dtype):
    _needs_dtype(cp, dtype)
    stat = cupy_gpu.STAT_DTYPE[dtype]
    c = shape[1]
    x = _input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(_np_dtype(dtype))
    vecs = [rng.normal(size=c).astype(stat) for _ in range(3)]
    mean_ref, m2_ref = ref.stats(x)
    mean, m2 = backend.stats(cp.asarray(x))
    assert_close(mean, mean_ref, stat)
    assert_close(m2, m2_ref, stat)
    y_ref = np.empty_like(x)
    ref.normalize(x, mean_ref, vecs[0], vecs[1], y_ref)
    y = cp.empty(shape, _np_dtype(dtype))
    backend.normalize(cp.asarray(x), cp.asarray(mean_ref), cp.asarray(vecs[0]),
                      cp.asarray(vecs[1]), y)
    assert_close(y, y_ref, dtype)
    sums_ref = ref.backward_reduce(dy, x, mean_ref)
    sums = backend.backward_reduce(cp.asarray(dy), cp.asarray(x), cp.asarray(mean_ref))
    assert_close(sums[0], sums_ref[0], stat)
    assert_close(sums[1], sums_ref[1], stat)
    dx_ref = np.empty_like(x)
    ref.backward_elemt(dy, x, mean_ref, *vecs, dx_ref)
    dx = cp.empty(shape, _np_dtype(dtype))
    backend.backward_elemt(cp.asarray(dy), cp.asarray(x), cp.asarray(mean_ref),
                           *(cp.asarray(v) for v in vecs), dx)
    assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 9), (16, 6, 1), (64, 3, 2048), (131072, 5, 1)],
                         ids=str)
def test_64bit_index_kernels_match_reference(cp, rng, monkeypatch, shape, dtype):
    """The i64 instantiations, on small arrays (the rule would pick i32 for them)."""
    monkeypatch.setattr(cupy_gpu, "index_type", lambda nbytes: "i64")
    _all_kernels_against_reference(cp, rng, shape, dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1 << 16), (1 << 13, 8, 1)], ids=["planes", "rows"])
def test_bfloat16_stores_round_to_nearest_even(cp, shape):
    """Every bfloat16 pattern through normalize: with scale 1, finite values unchanged
    (-0 becomes +0, as in IEEE arithmetic), NaN stays NaN, inf stays inf; with scales
    whose products are exact in float32 (ties and overflows to inf among them), bit for
    bit what ml_dtypes rounds the float32 product to."""
    _needs_dtype(cp, "bfloat16")
    bf16 = _np_dtype("bfloat16")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(bf16).reshape(shape)
    xf = x.astype(np.float32)
    c = shape[1]
    zero = cp.zeros(c, cp.float32)
    # scales of <= 10 significant bits: their products with bfloat16 values are exact
    exact = [1 + 2**-8, -(1 + 3 * 2**-9), 1 - 2**-9, 0.75 + 2**-10, 1.25 + 2**-9,
             -(0.5 + 2**-10), 1 + 2**-7 + 2**-9, -(1 + 2**-8)]
    for scales in ([1.0] * c, exact * c):
        s = np.asarray(scales[:c], np.float32)
        y = cp.empty(shape, bf16)
        backend.normalize(cp.asarray(x), zero, cp.asarray(s), zero, y)
        got = to_numpy(y).view(np.uint16)
        with np.errstate(all="ignore"):
            want = (xf * s[None, :, None] + np.float32(0)).astype(bf16).view(np.uint16)
        nan = np.isnan(xf)
        np.testing.assert_array_equal(got[~nan], want[~nan])
        assert np.isnan(got[nan].view(bf16).astype(np.float32)).all()


def test_results_stay_on_device_without_synchronising(cp, rng):
    import cupyx
    x = cp.asarray(_input(rng, (8, 4, 25), "float32").reshape(8, 4, 5, 5))
    rm, rv = cp.zeros(4, cp.float32), cp.ones(4, cp.float32)
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend)  # compile
    with cupyx.allow_synchronize(False):
        y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv,
                                                    backend=backend)
        dx, dw, db = fastbn.batch_norm_backward(cp.ones_like(y), x, mean, invstd,
                                                backend=backend)
        y_eval = fastbn.batch_norm(x, rm, rv, backend=backend)
    assert fastbn.last_backend() == "cupy"
    for a in (y, mean, invstd, dx, dw, db, y_eval):
        assert isinstance(a, cp.ndarray) and a.device.id == x.device.id
    assert_close(y, direct_forward(to_numpy(x))[0], "float32")


def test_results_on_the_inputs_device(cp, rng):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    x_host = _input(rng, (4, 3, 10), "float32")
    with cp.cuda.Device(1):
        x = cp.asarray(x_host)
        y = cp.empty_like(x)
        one, zero = cp.ones(3, cp.float32), cp.zeros(3, cp.float32)
    with cp.cuda.Device(0):
        mean, m2 = backend.stats(x)
        assert mean.device.id == 1 and m2.device.id == 1
        backend.normalize(x, mean, one, zero, y)
        assert_close(mean, ref.stats(x_host)[0], "float32")
        with pytest.raises(ValueError, match="device"):
            backend.normalize(x, cp.zeros(3, cp.float32), one, zero, y)


def test_large_mean_float32_with_split_reduction(cp, rng):
    """|mean|/std = 1e5 over a reduction split across blocks: the shifted Welford holds."""
    x = (rng.standard_normal((32, 2, 16384)) + 1e5).astype(np.float32)
    mean, m2 = backend.stats(cp.asarray(x))
    x64 = x.astype(np.float64)
    n = x.size // 2
    np.testing.assert_allclose(to_numpy(mean), x64.mean(axis=(0, 2)), rtol=0, atol=8e-3)
    np.testing.assert_allclose(to_numpy(m2) / n, x64.var(axis=(0, 2)), rtol=1e-4)


def test_empty_inputs(cp):
    mean, m2 = backend.stats(cp.empty((0, 3, 4), cp.float32))
    assert np.isnan(to_numpy(mean)).all() and (to_numpy(m2) == 0).all()
    x = cp.empty((0, 3), cp.float32)
    rm, rv = cp.zeros(3, cp.float32), cp.ones(3, cp.float32)
    assert fastbn.batch_norm(x, rm, rv, backend=backend).shape == (0, 3)


def test_selected_automatically_for_cupy_arrays(cp, rng):
    if "cupy" not in fastbn._registry._backends:
        pytest.skip("backend 'cupy' is not registered (fastbn.backends())")
    fastbn.batch_norm_forward(cp.asarray(_input(rng, (4, 3, 6), "float32")))
    assert fastbn.last_backend() == "cupy"


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2**15, 2, 2**14), (2**29, 2, 1)], ids=["planes", "rows"])
def test_past_2_31_bytes_uses_64bit_indices(cp, shape):
    """float16 arrays of 2 GiB: the i64 kernels, checked against CuPy on the device."""
    x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32).astype(cp.float16)
    assert cupy_gpu.index_type(x.nbytes) == "i64"
    mean, m2 = backend.stats(x)
    n = shape[0] * shape[2]
    for c in range(shape[1]):
        xc = x[:, c, :].astype(cp.float64)
        want_mean = float(xc.mean())
        want_var = float(((xc - want_mean) ** 2).mean())
        del xc
        assert math.isclose(float(mean[c]), want_mean, abs_tol=1e-4)
        assert math.isclose(float(m2[c]) / n, want_var, rel_tol=1e-4)
    y = cp.empty_like(x)
    scale = cp.asarray([2.0, 0.5], cp.float32)
    shift = cp.asarray([1.0, -1.0], cp.float32)
    backend.normalize(x, mean, scale, shift, y)
    tail = (slice(-3, None), slice(None), slice(-5, None))  # the far end of the array
    want = ((x[tail].astype(cp.float32) - mean[None, :, None]) * scale[None, :, None]
            + shift[None, :, None])
    assert_close(y[tail], want, "float16")
