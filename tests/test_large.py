"""Past 2**31 elements: 64-bit indexing in the compiled kernels (slow; ~13 GiB of memory).

Run with `pytest -m slow`. The data are periodic, so the exact statistics are
known without a float64 reference (which would need 17 GiB here).
"""
import numpy as np
import pytest

import fastbn
from fastbn.testing import to_numpy

pytestmark = pytest.mark.slow

BIG = 2 ** 31 + 64  # a multiple of the pattern's period
PATTERN = np.array([1.0, -1.0, 2.0, -2.0], np.float16)  # mean 0, variance 2.5, exact
EPS = 1e-5


@pytest.fixture
def big_backend(backend):
    if backend == "numpy":
        pytest.skip("the float64 reference would need ~17 GiB for this input")
    if "float16" not in fastbn.get_backend(backend).dtypes:
        pytest.skip(f"backend {backend!r} has no float16 kernels")
    return backend


def test_one_channel_longer_than_2_to_31(big_backend, on_device):
    x = on_device(np.tile(PATTERN, BIG // 4).reshape(1, 1, BIG))
    y, mean, invstd = fastbn.batch_norm_forward(x, backend=big_backend)
    expected_invstd = 1 / np.sqrt(2.5 + EPS)
    np.testing.assert_allclose(to_numpy(mean), [0.0], atol=1e-6)
    np.testing.assert_allclose(to_numpy(invstd), [expected_invstd], rtol=1e-6)
    tail = to_numpy(y[0, 0, -8:]).astype(np.float64)  # beyond element 2**31
    np.testing.assert_allclose(tail, np.tile(PATTERN, 2) * expected_invstd, rtol=2e-3)
    del y
    # backward with dy = x: sum(dy) = 0 and sum(dy * xhat) = n * 2.5 * invstd
    dx, dweight, dbias = fastbn.batch_norm_backward(x, x, mean, invstd, backend=big_backend)
    np.testing.assert_allclose(to_numpy(dbias), [0.0], atol=1e-3)
    np.testing.assert_allclose(to_numpy(dweight), [BIG * 2.5 * expected_invstd], rtol=1e-5)
    factor = expected_invstd * (1 - 2.5 * expected_invstd ** 2)  # dx = factor * x
    np.testing.assert_allclose(to_numpy(dx[0, 0, -8:]).astype(np.float64),
                               np.tile(PATTERN, 2) * factor, rtol=2e-2, atol=1e-7)


def test_rows_array_longer_than_2_to_31(big_backend, on_device):
    """(O, C) with O * C > 2**31: the rows family, channel 1 the negated pattern + 1."""
    rows = BIG // 2
    x = np.empty((rows, 2), np.float16)
    x[:, 0] = np.tile(PATTERN, rows // 4)
    x[:, 1] = 1 - x[:, 0]
    x = on_device(x)
    rm, rv = on_device(np.zeros(2, np.float32)), on_device(np.ones(2, np.float32))
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv, backend=big_backend)
    np.testing.assert_allclose(to_numpy(mean), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(to_numpy(invstd), [1 / np.sqrt(2.5 + EPS)] * 2, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(rv), 0.9 + 0.1 * 2.5 * rows / (rows - 1), rtol=1e-6)
    tail = to_numpy(y[-4:]).astype(np.float64)
    expected = np.stack([PATTERN, -PATTERN], axis=1) / np.sqrt(2.5 + EPS)
    np.testing.assert_allclose(tail, expected, rtol=2e-3)
