"""The numba backend beyond the parity suite: optional import, float16 bit
conversions, fused vs two-kernel paths, thread control and the on-disk cache.

The parity suite (test_parity.py and friends) already runs every kernel for
backend="numba" through the ``backend`` fixture; these tests skip, with the
reason, where numba is not installed.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn
from fastbn._backends import numba_cpu
from fastbn._backends.numpy_ref import backend as ref
from fastbn.testing import assert_close

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA,
                                 reason="numba is not installed (pip install fastbn[numba])")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env=None):
    """Run ``code`` in a fresh interpreter on this checkout; return its stdout."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=True, env=full_env).stdout


# --- optional dependency ------------------------------------------------------------------

def test_unavailable_without_numba_names_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba" else real(name, *a))
    ok, reason = numba_cpu.NumbaBackend().is_available()
    assert not ok and reason.startswith("numba is not installed: pip install numba")
    assert '".[numba]"' in reason  # the extra, spelled for fastbn's checkout


def test_registered_with_priority_below_cython():
    info = {b.name: b for b in fastbn.backends()}
    assert info["numba"].priority == 50
    assert info["numba"].devices == {"cpu"}
    assert info["numba"].dtypes == {"float16", "bfloat16", "float32", "float64"}
    assert info["numba"].available == HAVE_NUMBA
    if "cython" in info:
        assert info["cython"].priority > info["numba"].priority


def test_import_fastbn_does_not_import_numba():
    out = _run("""
        import sys, fastbn
        fastbn.get_backend("numba")
        print("numba" in sys.modules, "fastbn._kernels.bn_numba" in sys.modules)
    """)
    assert out.split() == ["False", "False"]


# --- float16: exact conversions -------------------------------------------------------------

@pytest.fixture(scope="module")
def half_kernels():
    if not HAVE_NUMBA:
        pytest.skip("numba is not installed (pip install fastbn[numba])")
    from numba import njit

    from fastbn._kernels import bn_numba as K

    @njit
    def h2f(h, out):
        for i in range(h.shape[0]):
            out[i] = K._half_to_float(h[i])

    @njit
    def f2h(f, out):
        for i in range(f.shape[0]):
            out[i] = K._float_to_half(f[i])

    return h2f, f2h


@needs_numba
def test_every_half_converts_exactly(half_kernels):
    h2f, _ = half_kernels
    bits = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(bits.shape, np.float32)
    h2f(bits, got)
    want = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _halves(lo, hi):
    """The float16 values of bit patterns lo..hi-1, as float64."""
    return np.arange(lo, hi, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
        np.float64)


@needs_numba
def test_float_to_half_rounds_like_numpy(half_kernels):
    _, f2h = half_kernels
    rng = np.random.default_rng(5)
    f = np.concatenate([
        rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        # every half, and the midpoints between finite neighbours (ties to even)
        np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        .astype(np.float32),
        (_halves(0, 0x7bff) * 0.5 + _halves(1, 0x7c00) * 0.5).astype(np.float32),
        np.array([np.inf, -np.inf, np.nan, 65504.0, 65520.0, 65519.99, 1e-8, -0.0],
                 np.float32),
    ])
    got = np.empty(f.shape, np.uint16)
    f2h(f, got)
    with np.errstate(over="ignore"):
        want = f.astype(np.float16).view(np.uint16)
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


# --- fused paths, thread control ------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 8, 1000), (3, 5, 7), (300, 9, 1)])
def test_fused_paths_match_the_four_kernels(dtype, shape):
    """forward_train / backward_train of the kernel module (fused per channel
    when a channel fits in L2, else composed) against the reference."""
    be = numba_cpu.backend
    rng = np.random.default_rng(6)
    stat = np.float64 if dtype == "float64" else np.float32
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C, n = shape[1], shape[0] * shape[2]
    w, b = rng.uniform(0.5, 1.5, C).astype(stat), rng.normal(size=C).astype(stat)
    y = np.empty_like(x)
    mean, m2 = be.forward_train(x, w, b, 1e-5, y)
    rmean, rm2 = ref.stats(x)
    assert_close(mean, rmean, dtype)
    assert_close(m2, rm2, dtype)
    invstd = (1 / np.sqrt(rm2.astype(np.float64) / n + 1e-5)).astype(stat)
    yr = np.empty_like(x)
    ref.normalize(x, rmean, w * invstd, b, yr)
    assert_close(y, yr, dtype)
    dx = np.empty_like(x)
    from fastbn._kernels import bn_numba  # the adapter leaves backward to the core
    bits = (lambda a: a.view(np.uint16)) if dtype == "float16" else (lambda a: a)
    sdy, sdyx = bn_numba.backward_train(bits(dy), bits(x), rmean, invstd, w, bits(dx), 2)
    rsdy, rsdyx = ref.backward_reduce(dy, x, rmean)
    assert_close(sdy, rsdy, dtype)
    assert_close(sdyx, rsdyx, dtype)
    k_dy = w * invstd
    dxr = np.empty_like(x)
    ref.backward_elemt(dy, x, rmean, k_dy, -k_dy * invstd ** 2 * rsdyx / n, -k_dy * rsdy / n,
                       dxr)
    assert_close(dx, dxr, dtype)


@needs_numba
def test_thread_count_reaches_numba():
    import numba

    x = np.random.default_rng(7).normal(size=(64, 4, 4096)).astype(np.float32)
    with fastbn.num_threads(1):
        one = fastbn.batch_norm_forward(x, backend="numba")
        assert numba.get_num_threads() == 1
    # more threads than numba's pool is capped, not an error
    with fastbn.num_threads(numba.config.NUMBA_NUM_THREADS + 7):
        many = fastbn.batch_norm_forward(x, backend="numba")
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    for a, b in zip(one, many):
        assert_close(a, b, "float32")


# --- compilation: once per signature, cached on disk ---------------------------------------

@needs_numba
def test_compiled_once_and_loaded_from_disk_cache(tmp_path):
    """A second process loads every kernel from NUMBA_CACHE_DIR: no compilation."""
    code = """
        import json, numpy as np, fastbn
        from fastbn._kernels import bn_numba as K
        x = np.random.default_rng(0).normal(size=(4, 3, 50)).astype(np.float32)
        for _ in range(2):   # a second call compiles nothing new
            fastbn.batch_norm_backward(x, x, *fastbn.batch_norm_forward(
                x, backend="numba")[1:], backend="numba")
        kernels = [K._forward_train_fused, K._backward_elemt_planes]
        print(json.dumps({"hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                          "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
                          "signatures": sum(len(k.signatures) for k in kernels)}))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = json.loads(_run(code, env))
    second = json.loads(_run(code, env))
    assert first["signatures"] == second["signatures"] == 2
    assert first["misses"] == 2 and first["hits"] == 0
    assert second["hits"] == 2 and second["misses"] == 0
