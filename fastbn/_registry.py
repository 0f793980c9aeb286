"""Backends: the protocol, the registry, entry points and the selection rules.

Selection order for one call: the ``backend=`` argument, then the innermost
``use_backend(...)`` of the calling thread/task, then ``FASTBN_BACKEND``, then
every available registered backend that serves the input's device and dtype,
highest priority first. A named backend serves the call or raises
``BackendUnavailableError``; among automatically chosen ones, a backend whose
kernel returns ``NotImplemented`` passes the call to the next.
"""
import contextlib
import contextvars
import importlib.metadata
import inspect
import os
import threading
import warnings
from typing import NamedTuple

ENTRY_POINT_GROUP = "fastbn.backends"
REQUIRED_KERNELS = ("stats", "normalize", "backward_reduce", "backward_elemt")
FUSED_KERNELS = ("forward_train", "backward_train")
# Optional epilogue kernels (activation="relu", residual=z); without them the core
# composes the plain kernels with array operations (one extra pass each).
EPILOGUE_KERNELS = ("normalize_epilogue", "forward_train_epilogue", "backward_reduce_relu",
                    "backward_elemt_relu", "backward_train_relu")
# Kernels that write their last argument AND return two (C,) vectors.
WRITE_AND_REDUCE_KERNELS = ("forward_train", "backward_train", "forward_train_epilogue",
                            "backward_train_relu")


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot serve this call (missing, unavailable, wrong
    device or dtype, or it declined); the message says which and why."""


class ArgumentError(ValueError, RuntimeError):
    """An argument of a batch-norm call has a wrong shape or value; the message names it.

    Also a ``RuntimeError``, the class PyTorch raises for the same mistakes, so code
    written against ``torch.nn.functional.batch_norm`` catches it unchanged."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of a batch-norm call has a wrong type or dtype; the message names it.
    Also a ``RuntimeError``, as :class:`ArgumentError`."""


class BackendContractError(RuntimeError):
    """A backend's kernel broke the kernel contract (returned the wrong arity, shape or
    dtype, or did not write its output in place); the message names ``backend.kernel``.
    Raised before the result reaches the caller or any running statistic."""


class Backend:
    """Base class for fastbn backends (subclassing is optional: the protocol is duck-typed).

    A backend computes four kernels on the canonical ``(O, C, I)`` view: a
    C-contiguous 3-D array with ``O`` outer positions, ``C`` channels and ``I``
    inner positions. Per-channel vectors have shape ``(C,)`` and the *stat
    dtype*: float32 for float16/float32 data, float64 for float64 data. The core
    folds every per-channel constant before calling, so kernels hold no BN
    arithmetic beyond what their docstrings state. A kernel may return
    ``NotImplemented`` (before writing anything) to decline a call.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"cython"``.
    priority : int
        Higher wins among backends that fit the input.
    devices : frozenset of str
        ``{"cpu"}`` or ``{"cuda"}``.
    dtypes : frozenset of str
        The input dtypes served, e.g. ``{"float16", "float32", "float64"}``.
    """

    name = None
    priority = 0
    devices = frozenset({"cpu"})
    dtypes = frozenset({"float16", "float32", "float64"})

    # Optional fused paths: None means "compose from the four kernels".
    forward_train = None   # (x3, weight, bias, eps, y3) -> (mean, m2)
    backward_train = None  # (dy3, x3, mean, invstd, weight, dx3) -> (sum_dy, sum_dy_xmu)

    # Optional epilogues: y = act(bn(x) + z), act = relu or identity, z = residual or
    # nothing. relu(v) = 0 where v < 0, else v (NaN stays NaN, as torch.relu); its
    # gradient mask is taken from the saved output: g = dy where y > 0, else 0.
    # z3/dz3 are None or (O, C, I) arrays like x3; relu is a bool. Values are computed
    # in the stat dtype and rounded once to the data dtype.
    #
    # normalize_epilogue(x3, mean, scale, shift, z3, relu, y3) -> None
    #     y3 = act((x3 - mean) * scale + shift [+ z3])
    # forward_train_epilogue(x3, weight, bias, eps, z3, relu, y3) -> (mean, m2)
    #     forward_train, then the epilogue on its output
    # backward_reduce_relu(dy3, y3, x3, mean) -> (sum(g), sum(g * (x3 - mean)))
    # backward_elemt_relu(dy3, y3, x3, mean, k_dy, k_x, k_c, dz3, dx3) -> None
    #     dx3 = k_dy * g + k_x * (x3 - mean) + k_c; and dz3 = g when dz3 is not None
    # backward_train_relu(dy3, y3, x3, mean, invstd, weight, dz3, dx3) -> (sum(g), sum(g*(x-mean)))
    #     backward_train with g in place of dy; and dz3 = g when dz3 is not None
    normalize_epilogue = None
    forward_train_epilogue = None
    backward_reduce_relu = None
    backward_elemt_relu = None
    backward_train_relu = None

    def is_available(self):
        """Return ``(ok, reason)``: whether this backend can run here, and why not."""
        return True, ""

    def stats(self, x3):
        """Per-channel mean and ``m2 = sum((x - mean)**2)`` over axes 0 and 2."""
        raise NotImplementedError

    def normalize(self, x3, mean, scale, shift, y3):
        """Write ``y3 = (x3 - mean) * scale + shift`` (per-channel vectors broadcast)."""
        raise NotImplementedError

    def backward_reduce(self, dy3, x3, mean):
        """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``, in one read."""
        raise NotImplementedError

    def backward_elemt(self, dy3, x3, mean, k_dy, k_x, k_c, dx3):
        """Write ``dx3 = k_dy * dy3 + k_x * (x3 - mean) + k_c``."""
        raise NotImplementedError

    def __repr__(self):
        return f"<fastbn backend {self.name!r} priority={self.priority}>"


class BackendInfo(NamedTuple):
    """One row of :func:`fastbn.backends`."""

    name: str
    available: bool
    devices: frozenset
    dtypes: frozenset
    priority: int
    reason: str


# --- the registry -----------------------------------------------------------------

_lock = threading.RLock()
_backends = {}           # name -> backend
_availability = {}       # name -> (ok, reason), probed once
_selection_cache = {}    # (device, dtype, family, requested) -> tuple of backends
_failed_plugins = {}     # entry-point name -> (reason, exception) of a plugin that failed to load
_entry_points_loaded = False
_requested = contextvars.ContextVar("fastbn_backend", default=None)
_last = threading.local()


def _check_protocol(backend):
    if inspect.isclass(backend):
        raise ArgumentTypeError(f"backend: expected a backend instance, got the class {backend.__name__}; "
                        f"pass {backend.__name__}()")
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"backend: expected a non-empty str attribute 'name', got {name!r}")
    for attr in ("devices", "dtypes"):
        value = getattr(backend, attr, None)
        if not isinstance(value, (set, frozenset)) or not value:
            raise ArgumentTypeError(f"backend {name!r}: attribute {attr!r} must be a non-empty set, "
                            f"got {value!r}")
    priority = getattr(backend, "priority", None)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ArgumentTypeError(f"backend {name!r}: attribute 'priority' must be an int, got {priority!r}")
    missing = [k for k in REQUIRED_KERNELS + ("is_available",)
               if not callable(getattr(backend, k, None))]
    if missing:
        raise ArgumentTypeError(f"backend {name!r}: missing required method(s) {', '.join(missing)}")
    for k in FUSED_KERNELS + EPILOGUE_KERNELS:
        fused = getattr(backend, k, None)
        if fused is not None and not callable(fused):
            raise ArgumentTypeError(f"backend {name!r}: optional {k!r} must be callable or None")


def register_backend(backend, *, replace=False):
    """Add a backend to the registry.

    Parameters
    ----------
    backend : Backend
        An object with the attributes ``name``, ``priority``, ``devices``,
        ``dtypes``, the methods ``is_available``, ``stats``, ``normalize``,
        ``backward_reduce``, ``backward_elemt`` and optionally the fused
        ``forward_train`` / ``backward_train`` (see :class:`fastbn._registry.Backend`).
    replace : bool, optional
        Replace a registered backend of the same name instead of raising.

    Raises
    ------
    TypeError
        If ``backend`` does not follow the protocol.
    ValueError
        If the name is taken and ``replace`` is False.
    """
    _check_protocol(backend)
    with _lock:
        if backend.name in _backends and not replace:
            raise ArgumentError(f"backend: a backend named {backend.name!r} is already registered; "
                             f"pass replace=True to replace it")
        _backends[backend.name] = backend
        _availability.pop(backend.name, None)
        _selection_cache.clear()
    return backend


def unregister_backend(name):
    """Remove a backend by name (for tests and plugin reloads)."""
    with _lock:
        _backends.pop(name, None)
        _availability.pop(name, None)
        _selection_cache.clear()


def _load_entry_points():
    """Register the plugins of the ``fastbn.backends`` entry-point group, once."""
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                backend = obj() if inspect.isclass(obj) or inspect.isfunction(obj) else obj
                register_backend(backend, replace=False)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break fastbn
                error = f"{type(exc).__name__}: {exc}"
                _failed_plugins[ep.name] = (f"plugin {ep.value!r} failed to load: {error}", exc)
                warnings.warn(f"fastbn: skipping backend plugin {ep.name!r} ({ep.value}): "
                              f"{error}", RuntimeWarning, stacklevel=2)


def _registered():
    if not _entry_points_loaded:
        _load_entry_points()
    return _backends


def _probe(backend):
    """Availability of ``backend``, probed once and remembered."""
    status = _availability.get(backend.name)
    if status is None:
        try:
            ok, reason = backend.is_available()
        except Exception as exc:  # noqa: BLE001 - a probe that crashes means unavailable
            ok, reason = False, f"is_available() raised {type(exc).__name__}: {exc}"
        status = (bool(ok), "" if ok else (reason or "unavailable"))
        _availability[backend.name] = status
    return status


def backends():
    """List every registered backend, available or not.

    Returns
    -------
    list of BackendInfo
        ``(name, available, devices, dtypes, priority, reason)`` per backend,
        highest priority first; ``reason`` says why an unavailable backend is.
    """
    rows = []
    for b in sorted(_registered().values(), key=lambda b: -b.priority):
        ok, reason = _probe(b)
        rows.append(BackendInfo(b.name, ok, frozenset(b.devices), frozenset(b.dtypes),
                                b.priority, reason))
    # plugins that failed to load: listed, unavailable, with their error
    rows += [BackendInfo(name, False, frozenset(), frozenset(), 0, reason)
             for name, (reason, _) in sorted(_failed_plugins.items()) if name not in _backends]
    return rows


def get_backend(name):
    """Return the registered backend called ``name``.

    Raises
    ------
    BackendUnavailableError
        If ``name`` is a plugin whose entry point failed to load (chained to its error).
    ValueError
        If no backend of that name is registered.
    """
    registry = _registered()
    if isinstance(name, str):
        try:
            return registry[name]
        except KeyError:
            pass
        if name in _failed_plugins:
            reason, exc = _failed_plugins[name]
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}") from exc
        raise ArgumentError(f"backend: unknown backend {name!r}; registered: "
                         f"{', '.join(sorted(registry)) or 'none'}")
    raise ArgumentTypeError(f"backend: expected a backend name (str), got {type(name).__name__}")


def _resolve(requested):
    """A name or backend object -> a registered/protocol-checked backend object."""
    if isinstance(requested, str):
        return get_backend(requested)
    _check_protocol(requested)
    return requested


@contextlib.contextmanager
def use_backend(backend):
    """Context manager: route calls in this thread/task to ``backend``.

    Parameters
    ----------
    backend : str or Backend
        A registered name or a backend object. Scoped with :mod:`contextvars`,
        so other threads and asyncio tasks are not affected. An explicit
        ``backend=`` argument still wins.
    """
    resolved = _resolve(backend)
    token = _requested.set(resolved)
    try:
        yield resolved
    finally:
        _requested.reset(token)


def last_backend():
    """Name of the backend that served the last fastbn call in this thread, or None."""
    return getattr(_last, "name", None)


def _fits(backend, device, dtype):
    return device in backend.devices and dtype in backend.dtypes


def candidates(device, dtype, family, backend=None):
    """The backends to try, in order, for data on ``device`` of ``dtype``.

    ``family`` is ``"planes"`` (I > 1) or ``"rows"`` (I == 1). The answer is
    cached per (device, dtype, family, request), so a hot call scans nothing.
    """
    requested = backend if backend is not None else _requested.get()
    if requested is None:
        requested = os.environ.get("FASTBN_BACKEND") or None
    key = (device, dtype, family, requested)
    try:
        return _selection_cache[key]
    except (KeyError, TypeError):
        pass
    if requested is not None:
        chosen = _resolve(requested)
        ok, reason = _probe(chosen)
        if not ok:
            raise BackendUnavailableError(f"backend {chosen.name!r} is unavailable: {reason}")
        if device not in chosen.devices:
            raise BackendUnavailableError(
                f"backend {chosen.name!r} serves devices {sorted(chosen.devices)}, "
                f"not {device!r} where the input lives")
        if dtype not in chosen.dtypes:
            raise BackendUnavailableError(
                f"backend {chosen.name!r} serves dtypes {sorted(chosen.dtypes)}, not {dtype}")
        found = (chosen,)
    else:
        # Not probed here: dispatch probes each in turn, so a backend below the one that
        # serves (numba under cython) is never imported for nothing.
        found = tuple(b for b in sorted(_registered().values(), key=lambda b: -b.priority)
                      if _fits(b, device, dtype))
    with _lock:
        try:
            _selection_cache[key] = found
        except TypeError:  # an unhashable backend object: just don't cache
            pass
    return found


def dispatch(device, dtype, family, backend, call):
    """Run ``call(b)`` on the first available candidate that does not return
    NotImplemented (availability probed once per backend, only when reached)."""
    declined = []
    for b in candidates(device, dtype, family, backend):
        if not _probe(b)[0]:
            continue
        result = call(b)
        if result is not NotImplemented:
            _last.name = b.name
            return result
        declined.append(b.name)
    if not declined:
        raise BackendUnavailableError(
            f"no available backend serves {dtype} data on {device!r}; "
            f"see fastbn.backends() for what is registered and why it is unavailable")
    raise BackendUnavailableError(f"backend(s) {', '.join(map(repr, declined))} declined this "
                                  f"call ({dtype} data on {device!r}, {family} layout)")
