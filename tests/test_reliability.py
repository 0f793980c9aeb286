"""NaN/inf policy, numerical stress and concurrency, for every backend."""
import threading
import time

import numpy as np
import pytest

import fastbn
from fastbn.testing import assert_close, direct_forward, to_numpy


# --- NaN / inf: a bad value poisons its own channel, and only that channel ---------------

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_nonfinite_stays_in_its_channel(backend, on_device, layout, bad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 3, 3)).astype(np.float32)
    axis = 1
    if layout == "NHWC":
        x, axis = np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
    poisoned = 2
    index = (1, poisoned, 2, 0) if layout == "NCHW" else (1, 2, 0, poisoned)
    x[index] = bad
    rm, rv = on_device(np.zeros(5, np.float32)), on_device(np.ones(5, np.float32))
    y, mean, invstd = (to_numpy(a) for a in fastbn.batch_norm_forward(
        on_device(x), None, None, running_mean=rm, running_var=rv, axis=axis, backend=backend))
    y_c = np.moveaxis(y, axis, 0)
    assert np.isnan(y_c[poisoned]).all()          # inf - inf, 0 * inf, nan: all NaN
    clean = [c for c in range(5) if c != poisoned]
    assert np.isfinite(y_c[clean]).all()
    ref = np.moveaxis(direct_forward(x, axis=axis)[0], axis, 0)
    assert_close(y_c[clean], ref[clean], "float32")
    assert not np.isfinite(to_numpy(rm)[poisoned]) and np.isfinite(to_numpy(rm)[clean]).all()
    assert np.isfinite(to_numpy(rv)[clean]).all()


# --- numerical stress ------------------------------------------------------------------

def test_constant_channel_gives_bias(backend, on_device):
    x = np.random.default_rng(1).normal(size=(6, 3, 4)).astype(np.float32)
    x[:, 1, :] = 1234.5
    bias = np.array([0.0, 0.75, 0.0], np.float32)
    y = to_numpy(fastbn.batch_norm_forward(on_device(x), on_device(np.ones(3, np.float32)),
                                           on_device(bias), backend=backend).y)
    np.testing.assert_allclose(y[:, 1, :], 0.75, atol=1e-6)
    dx = to_numpy(fastbn.batch_norm_backward(
        on_device(np.ones_like(x)), on_device(x),
        *fastbn.batch_norm_forward(on_device(x), backend=backend)[1:], backend=backend).dx)
    assert np.isfinite(dx).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_variance(backend, on_device, dtype):
    rng = np.random.default_rng(2)
    x = (1.0 + 1e-4 * rng.standard_normal((32, 2, 16))).astype(dtype)
    y = to_numpy(fastbn.batch_norm_forward(on_device(x), eps=1e-12, backend=backend).y)
    # std 1e-4 against a mean of 1: float32 keeps ~3 of its 7 digits for x - mean
    assert np.max(np.abs(y - direct_forward(x, eps=1e-12)[0])) < (2e-3 if dtype == "float32"
                                                                  else 1e-9)


def test_float16_whose_squares_overflow(backend, on_device):
    """|x| ~ 3e3: x**2 ~ 1e7 > float16's 65504; kernels compute in float32."""
    rng = np.random.default_rng(3)
    x = (3000 + 300 * rng.standard_normal((16, 3, 8))).astype(np.float16)
    rm, rv = on_device(np.zeros(3, np.float32)), on_device(np.ones(3, np.float32))
    y = to_numpy(fastbn.batch_norm_forward(on_device(x), None, None, running_mean=rm, running_var=rv,
                                           backend=backend).y)
    assert np.isfinite(y).all() and np.isfinite(to_numpy(rv)).all()
    assert_close(y, direct_forward(x)[0], "float16")
    assert_close(to_numpy(rv), 0.9 + 0.1 * x.astype(np.float64).var(axis=(0, 2), ddof=1),
                 "float32")


# --- concurrency ------------------------------------------------------------------------

def test_eight_threads_get_single_threaded_results(backend, on_device):
    """Each thread normalizes its own data, forward and backward, many times over."""
    rng = np.random.default_rng(4)
    inputs = [rng.normal(i, 1 + i, (16, 8, 6, 6)).astype(np.float32) for i in range(8)]

    def work(x):
        x = on_device(x)
        rm, rv = on_device(np.zeros(8, np.float32)), on_device(np.ones(8, np.float32))
        y, mean, invstd = fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv, backend=backend)
        dx = fastbn.batch_norm_backward(x, x, mean, invstd, backend=backend).dx
        return [to_numpy(a) for a in (y, dx, rm, rv)]

    expected = [work(x) for x in inputs]
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def thread(i):
        try:
            start.wait()
            for _ in range(10):
                got = work(inputs[i])
                for a, b in zip(got, expected[i]):
                    np.testing.assert_array_equal(a, b)
            results[i] = got
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(r is not None for r in results)


def test_compiled_kernels_release_the_gil(backend):
    """While one thread runs a kernel, another thread's Python code keeps running."""
    info = fastbn.get_backend(backend)
    if backend == "numpy" or "cpu" not in info.devices:
        pytest.skip("checks the compiled CPU kernels (nogil); NumPy's own loops are NumPy's")
    x = np.random.default_rng(5).standard_normal((16, 16, 256, 256), dtype=np.float32)
    fastbn.batch_norm_forward(x[:2], backend=backend)  # compile/warm up first
    ticks, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        t0, before = time.perf_counter(), ticks[0]
        time.sleep(0.05)
        idle_rate = (ticks[0] - before) / (time.perf_counter() - t0)
        with fastbn.num_threads(1):  # leave the other core to the spinner
            t0, before = time.perf_counter(), ticks[0]
            for _ in range(3):
                fastbn.batch_norm_forward(x, backend=backend)
            kernel_rate = (ticks[0] - before) / (time.perf_counter() - t0)
    finally:
        stop.set()
        spinner.join()
    # holding the GIL for the whole kernel would leave the spinner at ~0 ticks
    assert kernel_rate > 0.2 * idle_rate, (kernel_rate, idle_rate)
