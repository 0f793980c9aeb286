"""pytest plugin of the conformance kit: ``pytest --fastbn-backend NAME``.

Runs :func:`fastbn.testing.check_backend`'s checks against the backend ``NAME`` as
separate test items (``NAME::stats[float32-cpu]``, ...), so one run shows every
failing check instead of the first. Installed with fastbn (entry point
``pytest11``); fastbn itself is imported only when the option is given.
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fastbn", "fastbn backend conformance kit")
    group.addoption("--fastbn-backend", action="append", default=[], metavar="NAME",
                    help="run fastbn's conformance kit against the backend NAME (a registered "
                         "or plugin backend); may be given more than once")


class BackendCheckItem(pytest.Item):
    """One check of the kit, for one backend, dtype and device."""

    def __init__(self, *, check, skip_reason=None, **kwargs):
        super().__init__(**kwargs)
        self.check, self.skip_reason = check, skip_reason

    def runtest(self):
        if self.skip_reason is not None:
            pytest.skip(self.skip_reason)
        self.check()

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, AssertionError):
            return str(excinfo.value)  # names the check, kernel, dtype and shape already
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return "fastbn-kit", None, self.name


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so they filter the kit's items too
def pytest_collection_modifyitems(session, config, items):
    names = config.getoption("fastbn_backend")
    if not names:
        return
    from fastbn import BackendUnavailableError
    from fastbn.testing import backend_checks
    for name in names:
        try:
            checks = backend_checks(name)
        except BackendUnavailableError as exc:
            items.append(BackendCheckItem.from_parent(session, name=f"{name}::unavailable",
                                                      check=None, skip_reason=str(exc)))
            continue
        items.extend(BackendCheckItem.from_parent(session, name=f"{name}::{check.id}",
                                                  check=check) for check in checks)
