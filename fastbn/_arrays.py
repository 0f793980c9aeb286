"""Any array in, the same kind of array out.

NumPy and CuPy arrays pass through. Any other object with ``__dlpack__`` (torch
tensors, JAX arrays, ...) is viewed without a copy: ``numpy.from_dlpack`` on the
CPU, ``cupy.from_dlpack`` on CUDA; results go back through the caller's library
(``torch.from_dlpack``, ``jax.numpy.from_dlpack``). Running statistics and
``out`` are written through the view, so a torch buffer is updated in place as
PyTorch would. All arrays of one call must come from one library and device.
"""
import contextlib
import sys

import numpy as np

from ._registry import ArgumentError, ArgumentTypeError
from ._validate import numpy_dtype

_CPU, _CUDA, _CUDA_MANAGED = 1, 2, 13  # DLPack device types
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda-host", 13: "cuda-managed"}


def _library(a):
    return type(a).__module__.split(".")[0]


def _device(a):
    dev_type, dev_id = a.__dlpack_device__()
    return int(dev_type), int(dev_id)


def _is_bfloat16(a):
    return str(getattr(a, "dtype", "")).endswith("bfloat16")


# DLPack readers in NumPy know no bfloat16: such tensors travel as their 16-bit
# patterns and are viewed back (ml_dtypes' bfloat16 on the NumPy side), no copy.
def _to_bits(a, library):
    if library == "torch":
        import torch
        return a.view(torch.int16)
    import jax
    return jax.lax.bitcast_convert_type(a, jax.numpy.int16)  # JAX arrays are immutable anyway


def _from_bits(bits, library):
    if library == "torch":
        import torch
        return torch.from_dlpack(bits).view(torch.bfloat16)
    import jax
    return jax.lax.bitcast_convert_type(jax.numpy.from_dlpack(bits), jax.numpy.bfloat16)


def _device_text(device):
    dev_type, dev_id = device
    return f"{_DEVICE_NAMES.get(dev_type, f'device type {dev_type}')}:{dev_id}"


class Interop:
    """The array library and device of one call; converts arguments and results."""

    __slots__ = ("library", "device", "_from_dlpack")

    def __init__(self, x):
        self.library = _library(x)
        self.device = None
        self._from_dlpack = None
        if isinstance(x, np.ndarray) or self.library == "cupy":
            return
        if not hasattr(x, "__dlpack__") or not hasattr(x, "__dlpack_device__"):
            raise ArgumentTypeError(f"x: expected an array (numpy.ndarray, cupy.ndarray or an object "
                            f"with __dlpack__), got {type(x).__module__}.{type(x).__qualname__}"
                            .replace("builtins.", ""))
        self.device = _device(x)
        if self.device[0] not in (_CPU, _CUDA, _CUDA_MANAGED):
            raise ArgumentError(f"x: expected data on the CPU or a CUDA device, got "
                             f"{_device_text(self.device)}")

    @property
    def passthrough(self):
        return self.device is None

    def native(self, a, name):
        """``a`` as a NumPy/CuPy array sharing its memory (None stays None)."""
        if a is None:
            return None
        library = _library(a)
        if library != self.library:
            raise ArgumentTypeError(f"{name}: expected a {self.library} array like x, got "
                            f"{type(a).__module__}.{type(a).__qualname__}"
                            .replace("builtins.", "") + " (one array library per call)")
        if self.passthrough:
            return a
        if not hasattr(a, "__dlpack__"):
            raise ArgumentTypeError(f"{name}: expected an object with __dlpack__ like x, got "
                            f"{type(a).__qualname__}")
        device = _device(a)
        if device != self.device:
            raise ArgumentError(f"{name}: is on {_device_text(device)} but x is on "
                             f"{_device_text(self.device)} (fastbn never moves data between "
                             f"devices)")
        if getattr(a, "requires_grad", False):  # torch: fastbn records no autograd graph
            a = a.detach()
        if _is_bfloat16(a):
            if device[0] != _CPU:
                raise ArgumentTypeError(f"{name}: bfloat16 on a GPU has no CuPy dtype; fastbn "
                                        f"serves bfloat16 on the CPU")
            return np.from_dlpack(_to_bits(a, self.library)).view(numpy_dtype("bfloat16"))
        if device[0] == _CPU:
            return np.from_dlpack(a)
        import cupy
        return cupy.from_dlpack(a)

    def wrap(self, a):
        """A result (NumPy/CuPy array) back in the caller's library, without a copy."""
        if self.passthrough or a is None:
            return a
        if a.dtype.name == "bfloat16":
            return _from_bits(a.view(np.int16), self.library)
        if self._from_dlpack is None:
            module = sys.modules.get(self.library)
            if self.library in ("jax", "jaxlib"):  # jax.Array lives in jaxlib
                import jax.numpy
                module = jax.numpy
            self._from_dlpack = getattr(module, "from_dlpack", None) or (lambda arr: arr)
        return self._from_dlpack(a)


def device_scope(a):
    """Make ``a``'s GPU current for the block (CuPy arrays); a no-op for host arrays."""
    device = getattr(a, "device", None) if _library(a) == "cupy" else None
    return device if device is not None else contextlib.nullcontext()
