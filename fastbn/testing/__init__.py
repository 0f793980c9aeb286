"""Testing fastbn backends, ours and plugins: the conformance kit and its helpers.

:func:`check_backend` runs the whole kit against ONE backend (see
``docs/backends.md``); :func:`backend_checks` returns the same checks one by one,
for a test runner (the pytest option ``--fastbn-backend NAME`` runs them as test
items). :func:`tolerance` is the one place where accuracy expectations live:
every parity test of fastbn and the kit take their tolerances from it.
"""
from ._helpers import (assert_close, direct_backward, direct_forward, mean_rounding, to_numpy,
                       tolerance)
from ._kit import BackendCheck, BackendCheckError, ReferenceBackend, backend_checks, check_backend

__all__ = ["BackendCheck", "BackendCheckError", "ReferenceBackend", "assert_close",
           "backend_checks", "check_backend", "direct_backward", "direct_forward",
           "mean_rounding", "to_numpy", "tolerance"]
