"""fastbn's own backends through the conformance kit, one test per check.

The same checks a plugin author runs (``fastbn.testing.check_backend``, or
``pytest --fastbn-backend NAME``): every kernel on its own against the reference,
the public paths with the backend forced, fused and composed, gradients against
finite differences, running statistics, aliasing, read-only inputs, NaN/inf,
float16 edges, threads. Backends that cannot run here skip with their reason.
"""
import pytest

import fastbn
from fastbn.testing import backend_checks


def _checks():
    params = []
    for info in fastbn.backends():
        try:
            checks = backend_checks(info.name) if info.available else None
        except fastbn.BackendUnavailableError as exc:  # e.g. a GPU backend without a GPU
            info = info._replace(available=False, reason=str(exc))
        if not info.available:
            params.append(pytest.param(None, id=info.name, marks=pytest.mark.skip(
                reason=f"backend {info.name!r} unavailable: {info.reason}")))
            continue
        params += [pytest.param(check, id=f"{info.name}-{check.id}") for check in checks]
    return params


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                            "ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("check", _checks())
def test_backend_conforms(check):
    check()
