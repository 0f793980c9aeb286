"""Built-in backends: thin adapters, one module each, registered at import.

Each adapter imports its kernels (and optional dependencies) lazily, so
registering costs nothing and a missing extra only makes a backend unavailable.
Third-party backends register through the ``fastbn.backends`` entry-point group.
"""
from .._registry import register_backend
from . import numpy_ref

register_backend(numpy_ref.backend)
