"""Shared fixtures: every registered backend, and arrays on that backend's device."""
import numpy as np
import pytest

import fastbn

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # property tests skip themselves
    pass
else:
    # `pytest --hypothesis-profile=nightly` for the long run; CI uses "ci".
    settings.register_profile("ci", max_examples=60, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.function_scoped_fixture])
    settings.register_profile("nightly", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.function_scoped_fixture])
    settings.load_profile("ci")


def _backend_params():
    """One param per registered backend; unavailable ones skip with their reason."""
    params = []
    for info in fastbn.backends():
        marks = () if info.available else pytest.mark.skip(
            reason=f"backend {info.name!r} unavailable: {info.reason}")
        params.append(pytest.param(info.name, marks=marks, id=info.name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """Name of a registered, available backend (each one in turn)."""
    return request.param


@pytest.fixture
def on_device(backend):
    """Move a host NumPy array to the device ``backend`` serves (identity on CPU)."""
    if "cuda" in fastbn.get_backend(backend).devices:
        import cupy
        return cupy.asarray
    return lambda a: a


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)
