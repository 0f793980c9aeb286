"""Every input check of fastbn, and the canonical (O, C, I) view.

Backends see C-contiguous 3-D arrays ``(O, C, I)``: ``O = prod(shape[:axis])``,
``C = shape[axis]``, ``I = prod(shape[axis+1:])``. An input whose memory is
channels-last (the channel axis has the smallest stride and the rest are in
order, e.g. a torch ``channels_last`` tensor) is viewed as rows ``(O*I, C, 1)``
without a copy; any other non-contiguous input is copied once. Errors:
``TypeError`` for wrong types and dtypes, ``ValueError`` for wrong shapes and
values; every message names the argument, what it got and what it expects.
"""
import math
import operator
from typing import NamedTuple

import numpy as np

from . import _alloc
from ._registry import ArgumentError, ArgumentTypeError, BackendContractError

# data dtype -> dtype of saved and running statistics (and of kernel vectors)
STAT_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}
_FLOAT_NAMES = "float16, bfloat16, float32 or float64"
_DTYPE_NAMES = {}


def name_of(dtype):
    """``dtype.name``, cached: NumPy builds that string anew at every access (about a
    microsecond, several times per call on the per-call path)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        return _DTYPE_NAMES.setdefault(dtype, dtype.name)


class Canonical(NamedTuple):
    """An input seen as a C-contiguous (O, C, I) array, and how to undo the view."""

    x3: object          # the (O, C, I) C-contiguous array handed to backends
    shape: tuple        # the caller's logical shape
    axis: int           # non-negative channel axis
    channels_last: bool  # x3 is (O*I, C, 1) rows over channel-last memory
    xp: object          # the array module (numpy or cupy)

    @property
    def family(self):
        return "rows" if self.x3.shape[2] == 1 else "planes"

    @property
    def count(self):
        """Values per channel, n = O * I."""
        return self.x3.shape[0] * self.x3.shape[2]

    def moved_shape(self):
        return self.shape[:self.axis] + self.shape[self.axis + 1:] + (self.shape[self.axis],)

    def empty(self):
        """Allocate (y3, y): a canonical output buffer and its logical view (host memory
        through fastbn's output cache, see fastbn._alloc)."""
        xp = self.xp
        if self.channels_last:
            y_mem = _alloc.empty(xp, self.moved_shape(), self.x3.dtype)
            return y_mem.reshape(self.x3.shape), xp.moveaxis(y_mem, -1, self.axis)
        y3 = _alloc.empty(xp, self.x3.shape, self.x3.dtype)
        return y3, y3.reshape(self.shape)

    def view(self, a):
        """``a`` (same logical shape) in this canonical layout, or None if that needs a copy."""
        xp = self.xp
        if self.channels_last:
            moved = xp.moveaxis(a, self.axis, -1)
            return moved.reshape(self.x3.shape) if moved.flags.c_contiguous else None
        return a.reshape(self.x3.shape) if a.flags.c_contiguous else None

    def like(self, a):
        """``a`` in this canonical layout, copied once if it isn't already."""
        a3 = self.view(a)
        if a3 is not None:
            return a3
        xp = self.xp
        if self.channels_last:
            return xp.ascontiguousarray(xp.moveaxis(a, self.axis, -1)).reshape(self.x3.shape)
        return xp.ascontiguousarray(a).reshape(self.x3.shape)


# --- arrays and devices ------------------------------------------------------------

def array_module(a):
    """numpy for NumPy arrays, cupy for CuPy arrays (cupy is never imported here)."""
    if isinstance(a, np.ndarray):
        return np
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return None


def device_of(xp):
    return "cpu" if xp is np else "cuda"


def check_array(a, name, xp=None):
    """``a`` must be an array of the call's array library ``xp``; returns its module."""
    mod = array_module(a)
    if mod is not None and (xp is None or mod is xp):
        return mod
    got = f"{type(a).__module__}.{type(a).__qualname__}".replace("builtins.", "")
    if xp is None:
        raise ArgumentTypeError(f"{name}: expected a numpy.ndarray or cupy.ndarray, got {got}")
    raise ArgumentTypeError(f"{name}: expected a {xp.__name__} array like x, got {got} "
                    f"(one array library per call; fastbn never moves data between devices)")


def check_float(a, name):
    """``a.dtype`` must be float16/32/64; returns the dtype name."""
    dtype = name_of(a.dtype)
    if dtype not in STAT_DTYPE:
        raise ArgumentTypeError(f"{name}: expected dtype {_FLOAT_NAMES}, got {dtype}")
    return dtype


def check_writable(a, name):
    if not a.flags.writeable:
        raise ArgumentError(f"{name}: expected a writable array, got a read-only one")


# --- scalars -------------------------------------------------------------------

def check_axis(axis, ndim):
    try:
        axis = operator.index(axis)
    except TypeError:
        raise ArgumentTypeError(f"axis: expected an int, got {type(axis).__name__}") from None
    if isinstance(axis, bool):
        raise ArgumentTypeError("axis: expected an int, got bool")
    if not -ndim <= axis < ndim:
        raise ArgumentError(f"axis: expected an int in [{-ndim}, {ndim - 1}] for a {ndim}-D x, "
                         f"got {axis}")
    return axis % ndim


def _real(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"{name}: expected a real number, got {type(value).__name__}")
    return float(value)


def check_eps(eps):
    eps = _real(eps, "eps")
    if not (eps > 0 and math.isfinite(eps)):
        raise ArgumentError(f"eps: expected a finite number > 0 (eps must be positive), "
                            f"got {eps!r}")
    return eps


def check_momentum(momentum):
    """Any finite number, as PyTorch: outside [0, 1] the running average extrapolates."""
    momentum = _real(momentum, "momentum")
    if not math.isfinite(momentum):
        raise ArgumentError(f"momentum: expected a finite number, got {momentum!r}")
    return momentum


def check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


# --- the canonical view -----------------------------------------------------------

def canonical(x, axis):
    """Validate ``x`` and ``axis``; return its :class:`Canonical` view."""
    xp = check_array(x, "x")
    check_float(x, "x")
    if x.ndim < 2:
        raise ArgumentError(f"x: expected an array of rank >= 2 (N, C, ...), got shape {x.shape}")
    axis = check_axis(axis, x.ndim)
    shape = tuple(x.shape)
    c = shape[axis]
    o = math.prod(shape[:axis])
    i = math.prod(shape[axis + 1:])
    if x.flags.c_contiguous:
        return Canonical(x.reshape(o, c, i), shape, axis, False, xp)
    if i > 1:
        moved = xp.moveaxis(x, axis, -1)
        if moved.flags.c_contiguous:  # channels-last memory: rows, no copy
            return Canonical(moved.reshape(o * i, c, 1), shape, axis, True, xp)
    return Canonical(xp.ascontiguousarray(x).reshape(o, c, i), shape, axis, False, xp)


def check_training_count(view):
    """More than one value per channel, or none at all (an empty batch), as PyTorch."""
    if view.count == 1:
        raise ArgumentError(f"x: expected more than 1 value per channel when training, got "
                         f"shape {view.shape} with axis={view.axis} "
                         f"({view.count} value(s) per channel)")


def check_whole_batch_count(count):
    """check_training_count for a batch split in parts (one part may hold 0 or 1 value)."""
    if count == 1:
        raise ArgumentError("x: expected more than 1 value per channel when training, got 1 "
                            "in the whole batch (all parts together)")


def channel_vector(v, name, view, dtypes, stat_dtype):
    """A per-channel (C,) vector of one of ``dtypes``, returned contiguous in ``stat_dtype``
    (None: in its own dtype)."""
    if v is None:
        return None
    xp = view.xp
    check_array(v, name, xp)
    c = view.x3.shape[1]
    if v.shape != (c,):
        raise ArgumentError(f"{name}: expected shape ({c},) (one value per channel of x), "
                         f"got {tuple(v.shape)}")
    if name_of(v.dtype) not in dtypes:
        raise ArgumentTypeError(f"{name}: expected dtype {' or '.join(sorted(dtypes))} for "
                        f"{view.x3.dtype.name} x, got {v.dtype.name}")
    return xp.ascontiguousarray(v, dtype=stat_dtype)


def required_channel_vector(v, name, view, dtypes, stat_dtype):
    """:func:`channel_vector` for an argument that may not be None."""
    if v is None:
        raise ArgumentTypeError(f"{name}: expected an array of shape ({view.x3.shape[1]},), "
                                f"got None")
    return channel_vector(v, name, view, dtypes, stat_dtype)


def check_like_x(a, name, view):
    """``a`` (e.g. dy) must be an array of x's library, shape and dtype."""
    check_array(a, name, view.xp)
    if tuple(a.shape) != view.shape:
        raise ArgumentError(f"{name}: expected shape {view.shape} like x, got {tuple(a.shape)}")
    if a.dtype != view.x3.dtype:
        raise ArgumentTypeError(f"{name}: expected dtype {view.x3.dtype.name} like x, got "
                                f"{a.dtype.name}")


def running_stats(running_mean, running_var, view, dtypes, training):
    """Check the running statistics: both or neither, (C,), one of ``dtypes`` (the stat dtype
    or x's, as a ``model.half()`` keeps them), writable when updated."""
    if (running_mean is None) != (running_var is None):
        given, missing = (("running_mean", "running_var") if running_var is None
                          else ("running_var", "running_mean"))
        raise ArgumentError(f"{missing}: expected an array since {given} is given "
                         f"(running statistics come in pairs), got None")
    if running_mean is None:
        if not training:
            raise ArgumentError("running_mean: expected arrays running_mean and running_var "
                             "when training=False (inference uses running statistics), got None")
        return
    for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        channel_vector(v, name, view, dtypes, None)
        if training:
            check_writable(v, name)


def check_out(out, x, view):
    """Check ``out``; return its canonical view or None when results go through a buffer."""
    xp = view.xp
    check_array(out, "out", xp)
    if tuple(out.shape) != view.shape:
        raise ArgumentError(f"out: expected shape {view.shape} like x, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise ArgumentTypeError(f"out: expected dtype {x.dtype.name} like x, got {out.dtype.name}")
    check_writable(out, "out")
    _whole_or_apart(out, x, "x", "normalize in place", xp)
    # out is x itself: elementwise kernels read each value before writing it
    return view.view(out)


_ACTIVATIONS = (None, "relu")


def check_activation(activation):
    """The epilogue's activation: None or "relu"; returns whether it is relu."""
    if activation is not None and not isinstance(activation, str):
        raise ArgumentTypeError(f"activation: expected None or a str, got "
                                f"{type(activation).__name__}")
    if activation not in _ACTIVATIONS:
        raise ArgumentError(f"activation: expected None or 'relu', got {activation!r}")
    return activation == "relu"


def check_residual(residual, out, view):
    """``residual`` (z of act(bn(x) + z)) is like x; ``out`` may be it, not overlap it."""
    check_like_x(residual, "residual", view)
    if out is not None:
        _whole_or_apart(out, residual, "residual", "add in place", view.xp)


def check_saved_output(y, relu, view):
    """The backward of a relu epilogue needs the forward's output ``y`` (its mask)."""
    if not relu:
        if y is not None:
            raise ArgumentError("y: the saved output is used only with activation='relu'; "
                                "pass activation='relu' or leave y out")
        return
    if y is None:
        raise ArgumentError("y: activation='relu' needs the forward's output y (the "
                            "gradient is masked where y is not positive), got None")
    check_like_x(y, "y", view)


def _whole_or_apart(out, a, name, purpose, xp):
    """``out`` may be the array ``a`` itself (elementwise kernels read each value before
    writing it) or apart from it, never a partial overlap."""
    if xp.may_share_memory(out, a) and not _same_memory(out, a):
        raise ArgumentError(f"out: overlaps {name} without being {name} itself; pass "
                            f"out={name} to {purpose}, or a separate array")


def _data_pointer(a):
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr


def _same_memory(a, b):
    return _data_pointer(a) == _data_pointer(b) and a.strides == b.strides


# --- what kernels return ----------------------------------------------------------------
# The core trusts no kernel: a result that breaks the contract is an error naming
# "backend.kernel" before it can reach the caller or a running statistic. These run
# on every call, so the passing case is a few attribute checks; messages are built
# only on failure. ``where`` is the pair (backend name, kernel name).

_STAT_OF = {data: np.dtype(stat) for data, stat in STAT_DTYPE.items()}  # by dtype name


def _describe(value):
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__module__.split('.')[0]} array of shape {tuple(value.shape)} " \
               f"and dtype {value.dtype}"
    return type(value).__name__


def kernel_vectors(result, where, view):
    """A kernel's ``(a, b)`` result: two (C,) arrays of the call's library in the stat dtype."""
    if result is NotImplemented:
        return result
    shape, stat = (view.x3.shape[1],), _STAT_OF[name_of(view.x3.dtype)]
    array = np.ndarray if view.xp is np else view.xp.ndarray
    if isinstance(result, tuple) and len(result) == 2 and all(
            isinstance(v, array) and v.shape == shape and v.dtype == stat for v in result):
        return result
    expected = (f"a tuple of two {view.xp.__name__} arrays of shape {shape} and dtype {stat} "
                f"(or NotImplemented)")
    if isinstance(result, tuple) and len(result) == 2:
        got = next(_describe(v) for v in result
                   if not (isinstance(v, array) and v.shape == shape and v.dtype == stat))
        got = f"a {got}"
    else:
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else _describe(result)
    raise BackendContractError(f"{where[0]}.{where[1]} returned {got}; expected {expected}")


def kernel_wrote(result, where):
    """An element-wise kernel writes its output in place and returns None (or NotImplemented)."""
    if result is None or result is NotImplemented:
        return result
    raise BackendContractError(f"{where[0]}.{where[1]} returned {_describe(result)}; expected "
                               f"None (the result written into its output array in place) "
                               f"or NotImplemented")


# Quiet NaNs with a payload that arithmetic on finite values never makes (invalid
# operations give the default NaN), planted at both ends of an output buffer that
# fastbn allocated: a kernel that leaves one behind did not write its output.
_CANARY = {"float16": np.uint16(0x7E5B), "bfloat16": np.uint16(0x7FE5),
           "float32": np.uint32(0x7FE5A5A5), "float64": np.uint64(0x7FFDA5A5A5A5A5A5)}
_ENDS = ((0, 0, 0), (-1, -1, -1))


def plant_canary(out3):
    """Mark both ends of a fresh host (O, C, I) output buffer; returns whether it did."""
    if not isinstance(out3, np.ndarray) or out3.size == 0:
        return False  # device buffers: checking would synchronise the stream
    canary = _CANARY[name_of(out3.dtype)]
    bits = out3.view(canary.dtype)
    bits[_ENDS[0]] = bits[_ENDS[1]] = canary
    return True


def canary_left(out3):
    canary = _CANARY[name_of(out3.dtype)]
    bits = out3.view(canary.dtype)
    return bits[_ENDS[0]] == canary or bits[_ENDS[1]] == canary


def check_canary(out3, args, result, where):
    """After :func:`canary_left`: raise unless non-finite inputs can explain the canary.

    ``args`` are the kernel's arguments (the output last), ``result`` what it returned.
    """
    canary = _CANARY[name_of(out3.dtype)]
    bits = out3.view(canary.dtype)
    data = [a for a in args[:-1] if getattr(a, "ndim", 0) == 3]
    vectors = [a for a in args if getattr(a, "ndim", 0) == 1] + list(result or ())
    for end in _ENDS:
        if bits[end] != canary:
            continue
        channel = end[1]
        finite = all(np.isfinite(a[end]) for a in data) and all(
            np.isfinite(v[channel]) for v in vectors)
        if finite:  # NaN inputs may carry any payload: only finite ones prove it
            raise BackendContractError(
                f"{where[0]}.{where[1]} returned without writing its output array (its "
                f"{'first' if end[0] == 0 else 'last'} element kept the value fastbn planted "
                f"there); kernels must write y3/dx3 in place, not a copy")


# --- the layer -----------------------------------------------------------------------

def check_num_features(num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
        raise ArgumentTypeError(f"num_features: expected a positive int, got "
                        f"{type(num_features).__name__}")
    if num_features < 1:
        raise ArgumentError(f"num_features: expected a positive int, got {num_features}")
    return int(num_features)


def numpy_dtype(name):
    """The NumPy dtype called ``name``; ``"bfloat16"`` is ml_dtypes' (imported on demand)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_dtype_name(dtype):
    try:
        name = dtype if dtype == "bfloat16" else np.dtype(dtype).name
    except TypeError:
        raise ArgumentTypeError(f"dtype: expected {_FLOAT_NAMES}, got {dtype!r}") from None
    if name not in STAT_DTYPE:
        raise ArgumentTypeError(f"dtype: expected {_FLOAT_NAMES}, got {name}")
    return name


def check_layer_input(x, stat_dtype, num_features, axis):
    """A layer takes data with its statistics dtype and ``num_features`` channels on ``axis``."""
    check_array(x, "x")
    dtype = check_float(x, "x")
    if STAT_DTYPE[dtype] != stat_dtype:
        allowed = [d for d, s in STAT_DTYPE.items() if s == stat_dtype]
        raise ArgumentTypeError(f"x: expected dtype {' or '.join(allowed)} for a layer whose "
                        f"parameters are {stat_dtype}, got {dtype}")
    check_channels(x, num_features, axis)


def check_optional_positive_int(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name}: expected a positive int or None, got "
                                f"{type(value).__name__}")
    if value < 1:
        raise ArgumentError(f"{name}: expected a positive int or None, got {value}")
    return int(value)


def check_population_count(count, name):
    """Recalibration needs an unbiased variance: more than one value per channel."""
    if count < 2:
        raise ArgumentError(f"{name}: expected more than 1 value per channel in all, got "
                            f"{count}; the running statistics are left as they were")


def check_channels(x, num_features, axis):
    """``num_features`` channels on ``axis`` (x of any array library; ranks below 2 are
    left to canonical(), which says what is wrong with them)."""
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) >= 2:  # a non-array: the caller's converter says so
        channels = shape[check_axis(axis, len(shape))]
        if channels != num_features:
            raise ArgumentError(f"x: expected {num_features} channels on axis {axis} (the layer's "
                             f"num_features), got shape {tuple(x.shape)} with {channels}")


def state_entries(state, expected, num_features, stat_dtype):
    """Check a state dict against the layer's keys; return {key: numpy array} to copy in."""
    if not hasattr(state, "keys"):
        raise ArgumentTypeError(f"state_dict: expected a mapping, got {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArgumentError(f"state_dict: expected keys {sorted(expected)}, "
                         f"missing {missing}, unexpected {unexpected}")
    entries = {}
    for key in expected:
        value = np.asarray(state[key])
        if key == "num_batches_tracked":
            if value.shape != () or value.dtype.kind not in "iu":
                raise ArgumentError(f"state_dict['num_batches_tracked']: expected an integer "
                                 f"scalar, got {value.dtype} of shape {value.shape}")
            entries[key] = int(value)
            continue
        if value.shape != (num_features,):
            raise ArgumentError(f"state_dict[{key!r}]: expected shape ({num_features},), "
                             f"got {value.shape}")
        if value.dtype.kind != "f":
            raise ArgumentTypeError(f"state_dict[{key!r}]: expected a floating array, got {value.dtype}")
        entries[key] = value.astype(stat_dtype)
    return entries


# --- distributed -----------------------------------------------------------------------

def check_comm(comm, intracomm):
    """An mpi4py intracommunicator (``intracomm`` is ``MPI.Intracomm``, passed in so that
    this module never imports mpi4py); MPI.COMM_NULL is not one."""
    if not isinstance(comm, intracomm):
        got = f"{type(comm).__module__}.{type(comm).__qualname__}".replace("builtins.", "")
        raise ArgumentTypeError(f"comm: expected an mpi4py intracommunicator (e.g. "
                                f"MPI.COMM_WORLD or a Split of it), got {got}")
    return comm
