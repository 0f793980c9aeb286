"""fastbn: batch normalization for array code, routed to the fastest backend.

One API (:func:`batch_norm_forward`, :func:`batch_norm_backward`,
:func:`batch_norm`, :class:`BatchNorm`) over NumPy and CuPy arrays, served by
registered backends: a NumPy reference, Cython+OpenMP, Numba and CuPy kernels,
and any plugin in the ``fastbn.backends`` entry-point group.
"""
from ._version import __version__
from . import _backends  # noqa: F401 (the built-in backends register themselves)
from ._api import (BackwardResult, ForwardResult, ResidualBackwardResult, batch_norm,
                   batch_norm_backward, batch_norm_forward)
from ._alloc import clear_output_cache
from ._config import show_config
from ._fold import fold
from ._population import PopulationStats
from ._registry import (ArgumentError, ArgumentTypeError, Backend, BackendContractError,
                        BackendInfo, BackendUnavailableError, backends, get_backend,
                        last_backend, register_backend, use_backend)
from ._threads import get_num_threads, num_threads, set_num_threads
from .layer import BatchNorm

__all__ = [
    "ArgumentError", "ArgumentTypeError", "Backend", "BackendContractError", "BackendInfo", "BackendUnavailableError", "BackwardResult", "BatchNorm", "clear_output_cache",
    "ForwardResult", "PopulationStats", "ResidualBackwardResult", "__version__", "backends", "batch_norm", "batch_norm_backward",
    "batch_norm_forward", "fold", "get_backend", "get_num_threads", "last_backend", "num_threads",
    "register_backend", "set_num_threads", "show_config", "use_backend",
]
