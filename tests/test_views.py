"""The core's views of the caller's arrays: memory formats, out buffers, parameter dtypes.

Every backend's results over layouts x dtypes x modes are checked by the
conformance kit (tests/test_conformance.py, fastbn.testing.check_backend); these
tests cover what the core does around the kernels.
"""
import numpy as np

import fastbn
from fastbn._validate import canonical
from fastbn.testing import assert_close, direct_forward
from fastbn.testing._kit import LAYOUTS


def _layout(rng, layout, dtype):
    shape, axis, memory = LAYOUTS[layout]
    x = rng.normal(1.0, 2.0, shape).astype(dtype)
    return (memory(x) if memory else x), shape[axis]


def test_out_with_other_memory_layout(rng):
    """A non-contiguous out is filled through a buffer."""
    x, _ = _layout(rng, "NCHW", "float64")
    out_mem = np.full((3, 6, 5, 14), np.nan)
    out = out_mem[..., ::2]
    fastbn.batch_norm_forward(x, out=out)
    assert_close(out, direct_forward(x)[0], "float64")
    assert np.isnan(out_mem[..., 1::2]).all()


def test_channels_last_is_viewed_without_copy_and_kept(rng):
    x, _ = _layout(rng, "NCHW-channels_last", "float32")
    view = canonical(x, 1)
    assert view.family == "rows" and view.x3.shape == (3 * 5 * 7, 6, 1)
    assert np.shares_memory(view.x3, x)
    y = fastbn.batch_norm_forward(x).y
    assert np.moveaxis(y, 1, -1).flags.c_contiguous  # output keeps the memory format


def test_float16_parameters_accepted(rng):
    x, c = _layout(rng, "NCL", "float16")
    w, b = rng.uniform(0.5, 1.5, c).astype(np.float16), rng.normal(size=c).astype(np.float16)
    y = fastbn.batch_norm_forward(x, w, b).y
    assert_close(y, direct_forward(x, w, b)[0], "float16")


def test_empty_batch_is_an_empty_result_as_in_torch(rng):
    """PyTorch returns an empty output (zero gradients) and leaves running statistics alone."""
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    for training in (True, False):
        x = np.empty((0, 3, 4), np.float32)
        y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv,
                                                    training=training)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(rm, 0.5)
        np.testing.assert_array_equal(rv, 2.0)
        assert np.isnan(mean).all() if training else (mean == 0.5).all()
        dx, dw, db = fastbn.batch_norm_backward(x, x, mean, invstd, training=training)
        assert dx.shape == x.shape and not dw.any() and not db.any()


def test_one_value_per_channel_still_raises_when_training():
    with np.testing.assert_raises(ValueError):
        fastbn.batch_norm_forward(np.ones((1, 3), np.float32))
    fastbn.batch_norm_forward(np.ones((1, 3), np.float32), running_mean=np.zeros(3, np.float32),
                              running_var=np.ones(3, np.float32), training=False)


def test_running_statistics_in_the_data_dtype(rng):
    """A model.half() keeps float16 running statistics: updated in float32, stored in float16."""
    x = rng.normal(2.0, 3.0, (16, 3, 5)).astype(np.float16)
    rm, rv = np.zeros(3, np.float16), np.ones(3, np.float16)
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(rm, 0.5 * x64.mean(axis=(0, 2)), rtol=2e-3)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * x64.var(axis=(0, 2), ddof=1), rtol=2e-3)
    assert rm.dtype == np.float16


def test_momentum_is_checked_only_where_it_is_used():
    """As torch: any finite momentum (outside [0, 1] it extrapolates), unchecked in eval."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fastbn.batch_norm(x, rm, rv, training=False, momentum=float("nan"))  # eval: unused
    fastbn.batch_norm(x, rm, rv, training=True, momentum=-1.0)
    np.testing.assert_allclose(rm, -x.mean(axis=0))               # 2 * 0 - 1 * mean
    with np.testing.assert_raises(ValueError):
        fastbn.batch_norm(x, rm, rv, training=True, momentum=float("nan"))
