"""The host output cache: a buffer is reused only when nothing refers to it any more."""
import numpy as np
import pytest

import fastbn
from fastbn._alloc import OutputCache, cache

SHAPE = (64, 16, 32, 32)  # 4 MiB of float32: through the cache


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def test_a_held_result_is_never_overwritten():
    x1, x2 = _x(1), _x(2)
    y1 = fastbn.batch_norm_forward(x1).y
    keep = y1.copy()
    view = y1[1:, ::2]            # a view alone keeps the buffer alive
    del y1
    y2 = fastbn.batch_norm_forward(x2).y
    assert not np.shares_memory(view, y2)
    np.testing.assert_array_equal(view, keep[1:, ::2])


def test_a_released_buffer_is_reused_aligned():
    y = fastbn.batch_norm_forward(_x()).y
    address = y.ctypes.data
    assert address % 64 == 0
    del y
    y = fastbn.batch_norm_forward(_x()).y
    assert y.ctypes.data == address


def test_a_tensor_sharing_the_result_keeps_it():
    torch = pytest.importorskip("torch")
    y = fastbn.batch_norm_forward(_x()).y
    t = torch.from_numpy(y)
    address = y.ctypes.data
    del y
    y2 = fastbn.batch_norm_forward(_x(3)).y
    assert y2.ctypes.data != address and t.data_ptr() == address


def test_limit_and_clear():
    small = OutputCache(3 << 20)
    held = [small.empty((1 << 20,), np.float32) for _ in range(3)]  # 12 MiB in use
    assert small.nbytes() == (12 << 20, 0)
    del held
    assert small.nbytes() == (12 << 20, 12 << 20)
    grown = small.empty((1 << 21,), np.float32)  # grows: idle beyond 3 MiB dropped
    assert small.nbytes() == (8 << 20, 0)
    del grown
    small.clear()
    assert small.nbytes() == (0, 0)


def test_small_outputs_and_a_zero_limit_bypass_the_cache():
    off = OutputCache(0)
    a = off.empty((1 << 20,), np.float32)
    assert off.nbytes() == (0, 0) and a.shape == (1 << 20,)
    tiny = cache.empty((16, 16), np.float64)
    assert tiny.base is None  # a plain numpy array, not a cached buffer


def test_clear_output_cache_keeps_what_is_held():
    y = fastbn.batch_norm_forward(_x()).y
    before = y.copy()
    fastbn.clear_output_cache()
    held, free = cache.nbytes()
    assert free == 0 and held >= y.nbytes
    np.testing.assert_array_equal(y, before)
