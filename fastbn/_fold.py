"""Folding an inference-mode batch norm into the convolution or linear layer before it.

The one place where the folding arithmetic lives; ``fastbn.torch.fold`` (a whole
model) calls :func:`fold` for each pair it finds.
"""
import operator

import numpy as np

from ._arrays import _CPU, _CUDA, _CUDA_MANAGED, Interop, _device, _device_text, _library
from ._arrays import device_scope
from ._registry import ArgumentError, ArgumentTypeError
from ._validate import array_module, check_eps, check_float

# (name, may be None) of the per-channel vectors, in signature order
_VECTORS = (("bias", True), ("running_mean", False), ("running_var", False),
            ("bn_weight", True), ("bn_bias", True))
_HALF = ("float16", "bfloat16")


def _type_name(a):
    return f"{type(a).__module__}.{type(a).__qualname__}".replace("builtins.", "")


def _is_array(a):
    return isinstance(a, np.ndarray) or _library(a) == "cupy" or (
        hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__") and hasattr(a, "shape"))


def _interop(weight):
    """The array library and device of the call, from ``weight``."""
    if not _is_array(weight):
        raise ArgumentTypeError(f"weight: expected an array (numpy.ndarray, cupy.ndarray, a torch "
                                f"tensor, a JAX array or another object with __dlpack__), got "
                                f"{_type_name(weight)}")
    if not (isinstance(weight, np.ndarray) or _library(weight) == "cupy"):
        device = _device(weight)
        if device[0] not in (_CPU, _CUDA, _CUDA_MANAGED):
            raise ArgumentError(f"weight: expected data on the CPU or a CUDA device, got "
                                f"{_device_text(device)}")
    return Interop(weight)


def _native(a, name, interop):
    """A per-channel argument as a NumPy/CuPy array; it must be of weight's library and device."""
    if not _is_array(a) or _library(a) != interop.library:
        raise ArgumentTypeError(f"{name}: expected a {interop.library} array like weight, got "
                                f"{_type_name(a)} (one array library per call)")
    if not interop.passthrough and _device(a) != interop.device:
        raise ArgumentError(f"{name}: is on {_device_text(_device(a))} but weight is on "
                            f"{_device_text(interop.device)} (fastbn never moves data between "
                            f"devices)")
    return interop.native(a, name)


def _check_axis(axis, ndim):
    if isinstance(axis, bool):
        raise ArgumentTypeError("axis: expected an int, got bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise ArgumentTypeError(f"axis: expected an int, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise ArgumentError(f"axis: expected an int in [{-ndim}, {ndim - 1}] for a {ndim}-D "
                            f"weight, got {axis}")
    return axis % ndim


def fold(weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, *, eps=1e-5,
         axis=0):
    """Fold an inference-mode batch norm into the layer that precedes it.

    A convolution or linear layer ``z = W x + b`` followed by a batch norm in
    inference mode, ``y = (z - running_mean) / sqrt(running_var + eps) * bn_weight
    + bn_bias``, is one layer ``y = W' x + b'`` with::

        s  = bn_weight / sqrt(running_var + eps)      # per output channel
        W' = W * s                                    # s broadcast along ``axis``
        b' = (b - running_mean) * s + bn_bias

    Parameters
    ----------
    weight : array
        The layer's weight: a NumPy or CuPy array, a torch tensor, a JAX array
        (any object with ``__dlpack__`` on the CPU or a CUDA device), float16,
        bfloat16, float32 or float64.
    bias : array or None
        The layer's bias, shape ``(C,)``; None for a layer without bias (0).
    running_mean, running_var : array
        The batch norm's running statistics, shape ``(C,)``.
    bn_weight, bn_bias : array or None
        The batch norm's affine parameters, shape ``(C,)``; None (``affine=False``)
        means 1 and 0.
    eps : float, optional
        The batch norm's epsilon, a finite number > 0.
    axis : int, optional
        The output-channel axis of ``weight``, with ``C = weight.shape[axis]``:
        0 for PyTorch's ``Conv*d`` and ``Linear`` weights ``(out, in, ...)``, 1 for
        ``ConvTranspose*d`` weights ``(in, out, ...)`` (``groups=1``), -1 for
        Flax/JAX kernels ``(..., in, out)``.

    Returns
    -------
    weight, bias : array
        The folded weight (``weight``'s shape) and bias (shape ``(C,)``), new arrays
        of ``weight``'s library, device and dtype. The inputs are not modified.

    Raises
    ------
    ArgumentTypeError
        An argument is not an array of ``weight``'s library, not a float array, or
        ``eps``/``axis`` has a wrong type; the message names it.
    ArgumentError
        A per-channel vector has not ``weight.shape[axis]`` entries, an array is on
        another device than ``weight``, ``axis`` is out of range or ``eps <= 0``.

    Notes
    -----
    The arithmetic runs in float64 (float32 for float16 and bfloat16 weights) and
    each result is rounded once to ``weight``'s dtype; both results take
    ``weight``'s dtype, which is what a layer's bias must have. The per-channel
    vectors may have any float dtype. torch tensors are read through DLPack
    without a copy and no autograd graph is recorded.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> w, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, -0.5])  # Linear(2, 2)
    >>> mean, var = np.array([1.0, 0.0]), np.array([4.0, 0.25])
    >>> gamma, beta = np.array([2.0, 1.0]), np.array([0.0, 1.0])
    >>> w2, b2 = fastbn.fold(w, b, mean, var, gamma, beta, eps=1e-5)
    >>> w2.round(3), b2.round(3)
    (array([[1., 2.],
           [6., 8.]]), array([-0.5,  0. ]))
    >>> x = np.array([0.3, -1.2])
    >>> bn = (w @ x + b - mean) / np.sqrt(var + 1e-5) * gamma + beta
    >>> bool(np.allclose(w2 @ x + b2, bn))
    True
    """
    interop = _interop(weight)
    w = interop.native(weight, "weight")
    dtype = check_float(w, "weight")
    if w.ndim == 0:
        raise ArgumentError("weight: expected an array with at least 1 dimension, got a 0-D one")
    axis = _check_axis(axis, w.ndim)
    eps = check_eps(eps)
    c = w.shape[axis]
    vectors = {}
    for (name, optional), value in zip(_VECTORS, (bias, running_mean, running_var, bn_weight,
                                                  bn_bias)):
        if value is None:
            if not optional:
                raise ArgumentTypeError(f"{name}: expected an array of shape ({c},), got None")
            vectors[name] = None
            continue
        v = _native(value, name, interop)
        check_float(v, name)
        if tuple(v.shape) != (c,):
            raise ArgumentError(f"{name}: expected shape ({c},), one entry per output channel "
                                f"(weight.shape[{axis}] = {c}), got {tuple(v.shape)}")
        vectors[name] = v
    xp = array_module(w)
    compute = xp.float32 if dtype in _HALF else xp.float64
    with device_scope(w):
        new_w, new_b = _fold(xp, w, axis, eps, compute, **vectors)
    return interop.wrap(new_w), interop.wrap(new_b)


def _fold(xp, w, axis, eps, compute, bias, running_mean, running_var, bn_weight, bn_bias):
    """The arithmetic, on NumPy/CuPy arrays, in ``compute``; results in ``w``'s dtype."""
    def up(v):
        return v.astype(compute)  # always a copy: the inputs are never written

    scale = 1 / xp.sqrt(up(running_var) + eps)
    if bn_weight is not None:
        scale = up(bn_weight) * scale
    shape = [1] * w.ndim
    shape[axis] = -1
    new_w = up(w) * scale.reshape(shape)
    shift = -up(running_mean) if bias is None else up(bias) - up(running_mean)
    new_b = shift * scale
    if bn_bias is not None:
        new_b = new_b + up(bn_bias)
    return new_w.astype(w.dtype), new_b.astype(w.dtype)
