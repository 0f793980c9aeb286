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
    assert "pip install cupy-cuda13x" in reason and '".[cupy]"' in reason


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


def test_index_type_follows_the_element_count():
    assert cupy_gpu.index_type(0) == "i32"
    assert cupy_gpu.index_type(2**30) == "i32"  # 4 GiB of float32: still 32-bit indices
    assert cupy_gpu.index_type(cupy_gpu.I32_MAX_ELEMENTS - 1) == "i32"
    assert cupy_gpu.index_type(cupy_gpu.I32_MAX_ELEMENTS) == "i64"
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
    """A loop counter below ``limit`` steps ``UNROLL`` strides (+ UNROLL) past it: must fit
    an int wherever the 32-bit kernels run."""
    return (limit + cupy_gpu.UNROLL * (stride + 1) < 2**31
            or cupy_gpu.index_type(elements) == "i64")


@pytest.mark.parametrize("sm, per_sm", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reduction_plans_respect_cuda_limits(shape, sm, per_sm):
    O, C, I = shape
    n = O * C * I
    if I > 1:
        (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_reduce_planes(O, C, I, sm, per_sm)
        assert gx == C and by == 1 and gz == 1
        assert bx % 32 == 0 and 32 <= bx <= cupy_gpu.THREADS  # whole warps
        assert (gy - 1) * bx < O * I  # every slice has work
        assert _i32_overshoot_ok(O, gy * bx, n)
    else:
        (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_reduce_rows(O, C, sm, per_sm)
        assert gx * bx >= C > (gx - 1) * bx
        assert bx <= 32 and _pow2(by) and bx * by <= cupy_gpu.THREADS
        assert gy <= max(1, O)
        assert _i32_overshoot_ok(O, gy * by, n)
    assert bz == 1 and gx <= cupy_gpu.MAX_GRID_X
    assert 1 <= gy <= cupy_gpu.MAX_GRID_YZ and 1 <= gz <= cupy_gpu.MAX_GRID_YZ
    assert gy * by <= cupy_gpu.MAX_STRIDE and gy * bx <= cupy_gpu.MAX_STRIDE


@pytest.mark.parametrize("sm, per_sm", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_elementwise_plans_respect_cuda_limits(shape, sm, per_sm):
    O, C, I = shape
    n = O * C * I
    (gx, gy, gz), (bx, by, bz) = cupy_gpu.plan_elementwise(n, sm, per_sm)
    assert bx % 32 == 0 and bx <= cupy_gpu.ELEMENTWISE_THREADS
    assert gy == gz == by == bz == 1 and 1 <= gx <= cupy_gpu.MAX_GRID_X
    assert gx * bx <= cupy_gpu.MAX_STRIDE
    assert _i32_overshoot_ok(n, gx * bx, n)


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
    monkeypatch.setattr(cupy_gpu, "index_type", lambda size: "i64")
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
@pytest.mark.parametrize("shape", [(2**15, 2, 2**15), (2**30, 2, 1)], ids=["planes", "rows"])
def test_past_the_32bit_index_range_uses_64bit_indices(cp, shape):
    """float16 arrays of 2^31 elements (4 GiB): the i64 kernels, checked against CuPy."""
    x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32).astype(cp.float16)
    assert cupy_gpu.index_type(x.size) == "i64"
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


# --- the adapter's launches, recorded without a GPU ------------------------------------------
#
# A stand-in for CuPy records each launch (kernel name, grid, block, arguments), so that
# every adapter method, the epilogue ones included, runs here: each launch must pass
# exactly the parameters its entry point in bn_cuda.cu declares, null pointers where
# z/dz are None, the relu flag, and the vector flag the alignment rule allows.

def _entry_parameters():
    """kernel (without dtype and index) -> its parameter names, from bn_cuda.cu's macro."""
    text = cupy_gpu.kernel_source().replace("\\\n", "\n")
    found = {}
    for name, params in re.findall(r"bn_(\w+?)_##DTYPE##_##INDEX\(([^)]*)\)", text):
        found["bn_" + name] = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
    return found


class _FakeData:
    def __init__(self, ptr, device_id=0):
        self.ptr, self.device_id = ptr, device_id


class _FakeArray:
    """What the adapter reads of a CuPy array: shape, dtype, size, data.ptr/device_id."""
    _next = [1 << 20]

    def __init__(self, shape, dtype, offset=0):
        self.shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        self.dtype = _np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self.data = _FakeData(self._next[0] + offset)
        self._next[0] += 1 << 20

    def __getitem__(self, j):
        return _FakeArray(self.shape[1:], self.dtype)


class _FakeCupy:
    class cuda:  # noqa: N801 - mirrors cupy.cuda
        class Device:
            def __init__(self, device_id):
                self.id = device_id

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

    @staticmethod
    def ascontiguousarray(a, dtype):
        return _FakeArray(a.shape, dtype)

    @staticmethod
    def empty(shape, dtype):
        return _FakeArray(shape, dtype)

    zeros = empty

    @staticmethod
    def full(shape, value, dtype):
        return _FakeArray(shape, dtype)


@pytest.fixture
def launches(monkeypatch):
    """The adapter wired to the stand-in; yields the list of recorded launches."""
    recorded = []

    def function(cupy, device_id, dtype, kernel, index):
        def launch(grid, block, args):
            recorded.append((kernel, dtype, index, grid, block, args))
        return launch

    monkeypatch.setattr(cupy_gpu, "_cupy", lambda: _FakeCupy)
    monkeypatch.setattr(cupy_gpu, "_device_facts", lambda cupy, device_id: (132, 2048))
    monkeypatch.setattr(cupy_gpu, "_function", function)
    return recorded


# (O, C, I): NC, NCL, NCHW (I a multiple of the vector width and not), NHWC as rows
LAYOUTS = {"NC": (16, 6, 1), "NCL": (4, 3, 10), "NCHW": (2, 3, 49), "NCHW-vec": (2, 3, 64),
           "NHWC": (4 * 7 * 7, 8, 1)}


def _checked(launch, params, **expect):
    kernel, dtype, index, grid, block, args = launch
    names = params[kernel]
    assert len(args) == len(names), f"{kernel}: {len(args)} arguments for {names}"
    by_name = dict(zip(names, args))
    for name, want in expect.items():
        got = by_name[name]
        if want is None:
            assert got is None, f"{kernel}: {name} should be a null pointer"
        elif isinstance(want, (bool, int)) and not isinstance(want, _FakeArray):
            assert int(got) == int(want), f"{kernel}: {name} = {got}, expected {want}"
        else:
            assert got is want, f"{kernel}: {name} is not the array passed"
    return by_name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_launches_match_the_kernel_signatures(launches, layout, dtype):
    params = _entry_parameters()
    assert set(params) == set(cupy_gpu.KERNELS)  # every kernel the adapter may launch, parsed
    O, C, I = shape = LAYOUTS[layout]
    family = "planes" if I > 1 else "rows"
    x, y, dy, dx = (_FakeArray(shape, dtype) for _ in range(4))
    vecs = [_FakeArray(C, cupy_gpu.STAT_DTYPE[dtype]) for _ in range(4)]
    vec = int(cupy_gpu.vector_ok(dtype, C, I, [0]))
    expected_index = cupy_gpu.index_type(O * C * I)
    for z in (None, _FakeArray(shape, dtype)):
        for relu in (False, True):
            backend.normalize_epilogue(x, vecs[0], vecs[1], vecs[2], z, relu, y)
            assert launches[-1][0] == f"bn_normalize_epilogue_{family}"
            _checked(launches[-1], params, x=x, z=z, relu=relu, y=y, vec=vec, n=x.size, C=C)
    for dz in (None, _FakeArray(shape, dtype)):
        backend.backward_elemt_relu(dy, y, x, *vecs, dz, dx)
        assert launches[-1][0] == f"bn_backward_elemt_relu_{family}"
        _checked(launches[-1], params, dy=dy, y=y, x=x, dz=dz, dx=dx, vec=vec)
    sums = backend.backward_reduce_relu(dy, y, x, vecs[0])
    assert launches[-1][0] == f"bn_backward_reduce_relu_{family}"
    by_name = _checked(launches[-1], params, dy=dy, y=y, x=x, vec=vec, O=O, C=C)
    assert by_name["sum_dy"] is sums[0] and by_name["sum_dy_xmu"] is sums[1]
    # the plain kernels: the same entry points' siblings, no epilogue arguments
    backend.normalize(x, *vecs[:3], y)
    _checked(launches[-1], params, x=x, y=y, vec=vec)
    backend.backward_elemt(dy, x, *vecs, dx)
    _checked(launches[-1], params, dy=dy, x=x, dx=dx, vec=vec)
    backend.backward_reduce(dy, x, vecs[0])
    _checked(launches[-1], params, dy=dy, x=x, vec=vec)
    backend.stats(x)
    _checked(launches[-1], params, x=x, vec=vec)
    assert {launch[1] for launch in launches} == {dtype}
    assert {launch[2] for launch in launches} == {expected_index}
    for kernel, _, _, grid, block, _ in launches:
        assert kernel.endswith(family)
        assert int(np.prod(block)) <= cupy_gpu.THREADS


def test_adapter_takes_the_scalar_path_for_misaligned_views(launches):
    params = _entry_parameters()
    x = _FakeArray((2, 3, 64), "float32")
    y = _FakeArray((2, 3, 64), "float32", offset=4)  # a view 1 element in: not 16-byte aligned
    z = _FakeArray((2, 3, 64), "float32", offset=8)
    vecs = [_FakeArray(3, "float32") for _ in range(3)]
    backend.normalize_epilogue(x, *vecs, None, True, _FakeArray((2, 3, 64), "float32"))
    _checked(launches[-1], params, vec=1)
    backend.normalize_epilogue(x, *vecs, z, True, _FakeArray((2, 3, 64), "float32"))
    _checked(launches[-1], params, vec=0)
    backend.normalize(x, *vecs, y)
    _checked(launches[-1], params, vec=0)


def test_epilogue_methods_skip_empty_arrays(launches):
    x = _FakeArray((0, 3, 5), "float32")
    vecs = [_FakeArray(3, "float32") for _ in range(4)]
    assert backend.normalize_epilogue(x, *vecs[:3], None, True, x) is None
    assert backend.backward_elemt_relu(x, x, x, *vecs, None, x) is None
    backend.backward_reduce_relu(x, x, x, vecs[0])
    assert launches == []


# --- the epilogue kernels on a GPU, against the reference -----------------------------------

EPILOGUE_SHAPES = {"NC": (32, 6, 1), "NCL": (8, 3, 33), "NCHW": (4, 5, 7, 7),
                   "NCHW-vec": (4, 5, 8, 8), "NHWC": (4, 7, 7, 8)}


def _epilogue_inputs(rng, layout, dtype):
    """x as the (O, C, I) view the core hands a backend for this layout (NHWC: rows of C),
    the mean, three per-channel vectors, a residual z and a gradient dy."""
    shape = EPILOGUE_SHAPES[layout]
    if layout == "NHWC":
        canonical = (int(np.prod(shape[:-1])), shape[-1], 1)
    else:
        canonical = (shape[0], shape[1], int(np.prod(shape[2:])))
    x = _input(rng, canonical, dtype)
    c = x.shape[1]
    stat = cupy_gpu.STAT_DTYPE[dtype]
    mean, _ = ref.stats(x)
    vecs = [rng.normal(size=c).astype(stat) for _ in range(3)]
    z = rng.standard_normal(x.shape).astype(_np_dtype(dtype))
    dy = rng.standard_normal(x.shape).astype(_np_dtype(dtype))
    return x, mean, vecs, z, dy


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True], ids=["z=None", "z"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", EPILOGUE_SHAPES)
def test_normalize_epilogue_matches_reference(cp, rng, layout, dtype, residual, relu):
    _needs_dtype(cp, dtype)
    x, mean, (scale, shift, _), z, _ = _epilogue_inputs(rng, layout, dtype)
    z = z if residual else None
    want = np.empty_like(x)
    ref.normalize_epilogue(x, mean, scale, shift, z, relu, want)
    got = cp.empty(x.shape, x.dtype)
    assert backend.normalize_epilogue(
        cp.asarray(x), cp.asarray(mean), cp.asarray(scale), cp.asarray(shift),
        None if z is None else cp.asarray(z), relu, got) is None
    assert_close(got, want, dtype)
    if relu:
        assert (to_numpy(got).astype(np.float64) >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", EPILOGUE_SHAPES)
def test_relu_backward_kernels_match_reference(cp, rng, layout, dtype):
    _needs_dtype(cp, dtype)
    x, mean, vecs, z, dy = _epilogue_inputs(rng, layout, dtype)
    stat = cupy_gpu.STAT_DTYPE[dtype]
    y = np.empty_like(x)  # a saved relu output: about half of it zero
    ref.normalize_epilogue(x, mean, vecs[0], vecs[1], z, True, y)
    sums_ref = ref.backward_reduce_relu(dy, y, x, mean)
    sums = backend.backward_reduce_relu(cp.asarray(dy), cp.asarray(y), cp.asarray(x),
                                        cp.asarray(mean))
    assert sums[0].dtype == stat and sums[1].dtype == stat
    assert_close(sums[0], sums_ref[0], stat, err_msg="sum(g)")
    assert_close(sums[1], sums_ref[1], stat, err_msg="sum(g * (x - mean))")
    k = [rng.normal(size=x.shape[1]).astype(stat) for _ in range(3)]
    for with_dz in (False, True):
        dx_ref, dz_ref = np.empty_like(x), (np.empty_like(x) if with_dz else None)
        ref.backward_elemt_relu(dy, y, x, mean, *k, dz_ref, dx_ref)
        dx = cp.empty(x.shape, x.dtype)
        dz = cp.full(x.shape, np.nan, x.dtype) if with_dz else None
        backend.backward_elemt_relu(cp.asarray(dy), cp.asarray(y), cp.asarray(x),
                                    cp.asarray(mean), *(cp.asarray(v) for v in k), dz, dx)
        assert_close(dx, dx_ref, dtype, err_msg="dx")
        if with_dz:  # g itself: dy or 0, exact
            np.testing.assert_array_equal(to_numpy(dz).astype(np.float64),
                                          dz_ref.astype(np.float64))


def test_relu_epilogue_propagates_nan_and_masks_on_the_output(cp):
    x = np.array([[[np.nan, -1.0, 0.5, 2.0]]], np.float32)  # (1, 1, 4)
    one, zero = cp.ones(1, cp.float32), cp.zeros(1, cp.float32)
    y = cp.empty_like(cp.asarray(x))
    backend.normalize_epilogue(cp.asarray(x), zero, one, zero, None, True, y)
    got = to_numpy(y)[0, 0]
    assert np.isnan(got[0]) and got[1] == 0 and got[2] == 0.5 and got[3] == 2.0
    dy = cp.full(x.shape, 3.0, cp.float32)
    dz = cp.empty_like(dy)
    dx = cp.empty_like(dy)
    backend.backward_elemt_relu(dy, y, cp.asarray(x), zero, one, zero, zero, dz, dx)
    np.testing.assert_array_equal(to_numpy(dz)[0, 0], [0, 0, 3, 3])  # NaN output: masked
