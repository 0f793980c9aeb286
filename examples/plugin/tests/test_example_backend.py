"""The example plugin, installed (`pip install examples/plugin`), checked with fastbn's kit."""
import numpy as np
import pytest

import fastbn
import fastbn.testing


def test_registered_through_its_entry_point():
    info = {row.name: row for row in fastbn.backends()}
    assert info["example"].available and info["example"].dtypes == {"float32", "float64"}


def test_passes_the_conformance_kit():
    ran = fastbn.testing.check_backend("example")
    assert "composed_path[float32-cpu]" in ran
    assert not any("float16" in check for check in ran)  # not declared, so not checked


def test_serves_calls_by_name_and_declines_rows_to_its_own_kernels():
    x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    y = fastbn.batch_norm_forward(x, backend="example").y
    assert fastbn.last_backend() == "example"
    np.testing.assert_allclose(y, fastbn.testing.direct_forward(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(fastbn.BackendUnavailableError, match="float16"):
        fastbn.batch_norm_forward(x.astype(np.float16), backend="example")
