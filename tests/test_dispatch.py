"""The registry and dispatch core, driven by mock backends that count their calls."""
import asyncio
import collections
import sys
import threading
import warnings

import numpy as np
import pytest

import fastbn
from fastbn import _registry
from fastbn._backends.numpy_ref import NumpyReference
from fastbn.testing import assert_close, direct_forward


class CountingBackend(NumpyReference):
    """The reference kernels, counting calls; can decline or be unavailable."""

    def __init__(self, name="mock", priority=1000, decline=(), available=True,
                 dtypes=("float16", "float32", "float64")):
        self.name, self.priority = name, priority
        self.dtypes = frozenset(dtypes)
        self.decline = set(decline)
        self.available = available
        self.calls = collections.Counter()

    def is_available(self):
        self.calls["is_available"] += 1
        return (True, "") if self.available else (False, "mock switched off")

    def _count(kernel):
        def wrapped(self, *args):
            self.calls[kernel.__name__] += 1
            if kernel.__name__ in self.decline:
                return NotImplemented
            return kernel(self, *args)
        wrapped.__name__ = kernel.__name__
        return wrapped

    stats = _count(NumpyReference.stats)
    normalize = _count(NumpyReference.normalize)
    backward_reduce = _count(NumpyReference.backward_reduce)
    backward_elemt = _count(NumpyReference.backward_elemt)


class FusedBackend(CountingBackend):
    """Adds the optional fused paths, composed here from the reference kernels."""

    def forward_train(self, x3, weight, bias, eps, y3):
        self.calls["forward_train"] += 1
        mean, m2 = NumpyReference.stats(self, x3)
        n = x3.shape[0] * x3.shape[2]
        scale = weight / np.sqrt(m2 / n + eps)
        NumpyReference.normalize(self, x3, mean, scale, bias, y3)
        return mean, m2

    def backward_train(self, dy3, x3, mean, invstd, weight, dx3):
        self.calls["backward_train"] += 1
        sum_dy, sum_dy_xmu = NumpyReference.backward_reduce(self, dy3, x3, mean)
        n = x3.shape[0] * x3.shape[2]
        k_dy = weight * invstd
        NumpyReference.backward_elemt(self, dy3, x3, mean, k_dy,
                                      -k_dy * invstd ** 2 * sum_dy_xmu / n,
                                      -k_dy * sum_dy / n, dx3)
        return sum_dy, sum_dy_xmu


@pytest.fixture(autouse=True)
def only_the_reference(monkeypatch):
    """Dispatch tests see the reference and their own mocks, not the built-in fast backends."""
    monkeypatch.setattr(_registry, "_backends", {"numpy": _registry._backends["numpy"]})
    monkeypatch.setattr(_registry, "_availability", {})
    monkeypatch.setattr(_registry, "_selection_cache", {})
    monkeypatch.setattr(_registry, "_entry_points_loaded", True)
    monkeypatch.delenv("FASTBN_BACKEND", raising=False)


@pytest.fixture
def register():
    """Register backends for one test, and remove them afterwards."""
    added = []

    def add(b):
        fastbn.register_backend(b)
        added.append(b.name)
        return b
    yield add
    for name in added:
        _registry.unregister_backend(name)


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 5)).astype(np.float32)


def test_highest_priority_wins_and_is_reported(register, x):
    mock = register(CountingBackend())
    y = fastbn.batch_norm_forward(x).y
    assert fastbn.last_backend() == "mock"
    assert mock.calls["stats"] == 1 and mock.calls["normalize"] == 1
    assert_close(y, direct_forward(x)[0])
    low = register(CountingBackend("low", priority=-5))
    fastbn.batch_norm_forward(x)
    assert low.calls["stats"] == 0 and mock.calls["stats"] == 2


def test_composition_from_four_kernels(register, x):
    mock = register(CountingBackend())
    r = fastbn.batch_norm_forward(x)
    fastbn.batch_norm_backward(np.ones_like(x), x, r.mean, r.invstd)
    fastbn.batch_norm_backward(np.ones_like(x), x, r.mean, r.invstd, training=False)
    assert mock.calls == {"is_available": 1, "stats": 1, "normalize": 1,
                          "backward_reduce": 2, "backward_elemt": 2}


def test_fused_paths_used_when_present(register, x):
    fused = register(FusedBackend("fused"))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    r = fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv)
    dx = fastbn.batch_norm_backward(np.ones_like(x), x, r.mean, r.invstd).dx
    assert fused.calls["forward_train"] == 1 and fused.calls["backward_train"] == 1
    assert fused.calls["stats"] == fused.calls["normalize"] == 0
    ref = fastbn.batch_norm_forward(x, backend="numpy")
    assert_close(r.y, ref.y)
    assert_close(rm, x.astype(np.float64).mean(axis=(0, 2)) * 0.1)
    assert_close(dx, fastbn.batch_norm_backward(np.ones_like(x), x, r.mean, r.invstd,
                                                backend="numpy").dx, "float32")


def test_not_implemented_falls_through_to_next(register, x):
    mock = register(CountingBackend(decline={"normalize"}))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv)
    assert fastbn.last_backend() == "numpy"
    assert mock.calls["normalize"] == 1
    # the running statistics were updated once, not once per backend tried
    assert_close(rm, x.astype(np.float64).mean(axis=(0, 2)) * 0.1)


def test_explicitly_named_backend_that_declines_raises(register, x):
    register(CountingBackend(decline={"stats"}))
    with pytest.raises(fastbn.BackendUnavailableError, match="'mock' declined"):
        fastbn.batch_norm_forward(x, backend="mock")


def test_selection_order(register, x, monkeypatch):
    register(CountingBackend("a", priority=1))
    register(CountingBackend("b", priority=2))
    fastbn.batch_norm_forward(x)
    assert fastbn.last_backend() == "b"
    monkeypatch.setenv("FASTBN_BACKEND", "a")
    fastbn.batch_norm_forward(x)
    assert fastbn.last_backend() == "a"                   # env > priority
    with fastbn.use_backend("numpy"):
        fastbn.batch_norm_forward(x)
        assert fastbn.last_backend() == "numpy"           # use_backend > env
        fastbn.batch_norm_forward(x, backend="b")
        assert fastbn.last_backend() == "b"               # argument > use_backend
    fastbn.batch_norm_forward(x)
    assert fastbn.last_backend() == "a"                   # context restored


def test_backend_object_can_be_passed(x):
    unregistered = CountingBackend("adhoc")
    fastbn.batch_norm_forward(x, backend=unregistered)
    assert unregistered.calls["stats"] == 1 and fastbn.last_backend() == "adhoc"


def test_unavailable_and_unfit_backends(register, x):
    register(CountingBackend("off", available=False))
    register(CountingBackend("f64only", priority=2000, dtypes=("float64",)))
    fastbn.batch_norm_forward(x)
    assert fastbn.last_backend() == "numpy"  # skips both silently when choosing
    with pytest.raises(fastbn.BackendUnavailableError, match="'off' is unavailable: mock "
                                                                "switched off"):
        fastbn.batch_norm_forward(x, backend="off")
    with pytest.raises(fastbn.BackendUnavailableError, match="float64.*not float32"):
        fastbn.batch_norm_forward(x, backend="f64only")
    info = {row.name: row for row in fastbn.backends()}
    assert info["off"].available is False and info["off"].reason == "mock switched off"
    assert info["numpy"].available and info["numpy"].devices == {"cpu"}


def test_unknown_backend_name(x):
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fastbn.batch_norm_forward(x, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with fastbn.use_backend("nope"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        fastbn.get_backend("nope")


def test_register_rejects_bad_backends():
    with pytest.raises(TypeError, match="instance"):
        fastbn.register_backend(CountingBackend)
    with pytest.raises(ValueError, match="already registered"):
        fastbn.register_backend(NumpyReference())

    class NoKernels:
        name, priority = "broken", 1
        devices, dtypes = frozenset({"cpu"}), frozenset({"float32"})

        def is_available(self):
            return True, ""
    with pytest.raises(TypeError, match="missing required method.*stats"):
        fastbn.register_backend(NoKernels())


def test_replace_existing_backend(register, x):
    first = register(CountingBackend("dup"))
    second = CountingBackend("dup", priority=5000)
    fastbn.register_backend(second, replace=True)
    fastbn.batch_norm_forward(x)
    assert second.calls["stats"] == 1 and first.calls["stats"] == 0


def test_selection_is_cached(register, x, monkeypatch):
    mock = register(CountingBackend())
    fastbn.batch_norm_forward(x)
    monkeypatch.setattr(_registry, "_registered",
                        lambda: pytest.fail("hot call scanned the registry"))
    fastbn.batch_norm_forward(x)
    assert mock.calls["is_available"] == 1 and mock.calls["stats"] == 2


def test_use_backend_is_thread_local(register, x):
    register(CountingBackend())
    inside, outside = threading.Barrier(2), {}

    def other_thread():
        inside.wait()  # the main thread is inside use_backend("numpy") now
        fastbn.batch_norm_forward(x)
        outside["name"] = fastbn.last_backend()
        inside.wait()

    t = threading.Thread(target=other_thread)
    t.start()
    with fastbn.use_backend("numpy"):
        inside.wait()
        inside.wait()
        fastbn.batch_norm_forward(x)
        assert fastbn.last_backend() == "numpy"
    t.join()
    assert outside["name"] == "mock"


def test_use_backend_is_task_local(register, x):
    register(CountingBackend())

    async def run(name):
        if name is None:
            await asyncio.sleep(0.01)
            fastbn.batch_norm_forward(x)
            return fastbn.last_backend()
        with fastbn.use_backend(name):
            await asyncio.sleep(0.02)  # the other task runs meanwhile
            fastbn.batch_norm_forward(x)
            return fastbn.last_backend()

    async def main():
        return await asyncio.gather(run("numpy"), run(None))
    assert asyncio.run(main()) == ["numpy", "mock"]


# --- entry points ---------------------------------------------------------------------

PLUGIN = '''
from fastbn._backends.numpy_ref import NumpyReference

class PluginBackend(NumpyReference):
    name = "{name}"
    priority = -1
'''


def _fake_distribution(tmp_path, dist, body, entry):
    """Write an installed-looking distribution: a module and its dist-info."""
    (tmp_path / f"{dist}.py").write_text(body)
    info = tmp_path / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[fastbn.backends]\n{entry}\n")


@pytest.fixture
def reload_plugins(monkeypatch, tmp_path):
    """Make the registry read entry points again, from a path holding fake plugins."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_registry, "_entry_points_loaded", False)
    monkeypatch.setattr(_registry, "_failed_plugins", {})
    yield tmp_path
    for name in ("fromplugin", "fromfactory"):
        _registry.unregister_backend(name)
    for mod in ("fastbn_good_plugin", "fastbn_broken_plugin"):
        sys.modules.pop(mod, None)


def test_entry_point_plugins_load_and_broken_ones_warn(reload_plugins, x):
    tmp = reload_plugins
    _fake_distribution(tmp, "fastbn_good_plugin",
                       PLUGIN.format(name="fromplugin")
                       + "\ndef factory():\n    b = PluginBackend()\n    b.name = 'fromfactory'"
                       "\n    return b\n",
                       "good = fastbn_good_plugin:PluginBackend\n"
                       "factory = fastbn_good_plugin:factory")
    _fake_distribution(tmp, "fastbn_broken_plugin", "raise ImportError('missing dep xyz')\n",
                       "broken = fastbn_broken_plugin:Whatever")
    with pytest.warns(RuntimeWarning, match="skipping backend plugin 'broken'.*missing dep xyz"):
        names = [row.name for row in fastbn.backends()]
    assert "fromplugin" in names and "fromfactory" in names
    fastbn.batch_norm_forward(x, backend="fromplugin")
    assert fastbn.last_backend() == "fromplugin"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded once: no second warning
        rows = {row.name: row for row in fastbn.backends()}
    # the broken plugin is listed as unavailable, with its error ...
    assert not rows["broken"].available
    assert "ImportError: missing dep xyz" in rows["broken"].reason
    # ... and asking for it by name says why, chained to the original error
    with pytest.raises(fastbn.BackendUnavailableError, match="'broken' is unavailable: plugin "
                       "'fastbn_broken_plugin:Whatever' failed to load: ImportError: missing "
                       "dep xyz") as caught:
        fastbn.batch_norm_forward(x, backend="broken")
    assert isinstance(caught.value.__cause__, ImportError)
    with pytest.raises(fastbn.BackendUnavailableError, match="missing dep xyz"):
        fastbn.get_backend("broken")


def test_fastbn_info_shows_a_plugin_that_failed_to_load(reload_plugins, capsys):
    _fake_distribution(reload_plugins, "fastbn_broken_plugin",
                       "raise ImportError('missing dep xyz')\n",
                       "broken = fastbn_broken_plugin:Whatever")
    with pytest.warns(RuntimeWarning):
        fastbn.show_config()
    line = next(line for line in capsys.readouterr().out.splitlines() if "broken" in line)
    assert "unavailable: plugin 'fastbn_broken_plugin:Whatever' failed to load: ImportError: " \
           "missing dep xyz" in line


# --- the core trusts no kernel ------------------------------------------------------------

class WrongLengthStats(CountingBackend):
    def stats(self, x3):
        mean, m2 = NumpyReference.stats(self, x3)
        return mean[:1], m2[:1]


class NewArrayNormalize(CountingBackend):
    def normalize(self, x3, mean, scale, shift, y3):
        y = np.empty_like(y3)
        NumpyReference.normalize(self, x3, mean, scale, shift, y)
        return y


class CopyNormalize(CountingBackend):
    def normalize(self, x3, mean, scale, shift, y3):
        NumpyReference.normalize(self, x3, mean, scale, shift, np.empty_like(y3))


class ThreeSums(CountingBackend):
    def backward_reduce(self, dy3, x3, mean):
        return (*NumpyReference.backward_reduce(self, dy3, x3, mean), mean)


@pytest.mark.parametrize("broken, kernel, message", [
    (WrongLengthStats, "stats", r"a numpy array of shape \(1,\).*expected a tuple of two "
                                r"numpy arrays of shape \(3,\) and dtype float32"),
    (NewArrayNormalize, "normalize", r"numpy array of shape \(4, 3, 5\).*expected None"),
    (CopyNormalize, "normalize", r"without writing its output array"),
])
def test_kernel_results_are_checked_before_anything_is_written(register, x, broken, kernel,
                                                               message):
    register(broken("bad"))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(fastbn.BackendContractError, match=rf"^bad\.{kernel} returned {message}"):
        fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend="bad")
    np.testing.assert_array_equal(rm, 0)  # running statistics untouched
    np.testing.assert_array_equal(rv, 1)


def test_backward_kernel_arity_is_checked(register, x):
    register(ThreeSums("bad"))
    r = fastbn.batch_norm_forward(x, backend="numpy")
    with pytest.raises(fastbn.BackendContractError, match=r"bad\.backward_reduce returned a "
                                                          r"tuple of 3"):
        fastbn.batch_norm_backward(np.ones_like(x), x, r.mean, r.invstd, backend="bad")


def test_canary_does_not_flag_nan_outputs(register):
    """A NaN input may come out as any NaN: only finite inputs prove a missed write."""
    register(CountingBackend("ok"))
    x = np.full((4, 3, 5), np.nan, np.float32)
    y = fastbn.batch_norm_forward(x, backend="ok").y
    assert np.isnan(y).all()


class DecliningFused(FusedBackend):
    def forward_train(self, x3, weight, bias, eps, y3):
        self.calls["forward_train"] += 1
        return NotImplemented

    def backward_train(self, dy3, x3, mean, invstd, weight, dx3):
        self.calls["backward_train"] += 1
        return NotImplemented


def test_declined_fused_kernel_falls_back_to_the_same_backends_four(register, x):
    b = register(DecliningFused("fused"))
    r = fastbn.batch_norm_forward(x)
    assert fastbn.last_backend() == "fused"
    fastbn.batch_norm_backward(np.ones_like(x), x, r.mean, r.invstd)
    assert fastbn.last_backend() == "fused"
    assert b.calls["forward_train"] == 1 and b.calls["stats"] == 1 and b.calls["normalize"] == 1
    assert b.calls["backward_train"] == 1 and b.calls["backward_reduce"] == 1
    assert_close(r.y, direct_forward(x)[0])


def test_running_statistics_are_keyword_only(x):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    w, b = np.full(3, 2, np.float32), np.full(3, 5, np.float32)
    with pytest.raises(TypeError, match="positional"):
        fastbn.batch_norm_forward(x, rm, rv, w, b)   # torch's functional order
    np.testing.assert_array_equal(w, 2)              # nothing written
    with pytest.raises(TypeError, match="positional"):
        fastbn.batch_norm_backward(x, x, rm, rv, w)  # weight is keyword-only too
