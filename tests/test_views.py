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
