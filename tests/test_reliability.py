"""Numerical stress through the public API, and the compiled kernels releasing the GIL."""
import threading
import time

import numpy as np
import pytest

import fastbn
from fastbn.testing import direct_forward, to_numpy


# NaN/inf staying in its channel, float16 whose squares overflow and concurrent calls
# are checks of the conformance kit (tests/test_conformance.py) for every backend.

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
