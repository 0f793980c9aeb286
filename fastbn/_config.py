"""Build and runtime configuration, for ``show_config`` and ``python -m fastbn info``."""
import sys

import numpy as np

from . import _registry, _threads
from ._version import __version__


def _extension():
    """(built, openmp, reason) of the compiled extension."""
    try:
        from ._kernels import _bn_omp
    except ImportError as exc:
        from ._backends.cython_omp import unbuilt_reason
        return False, False, unbuilt_reason(f"{type(exc).__name__}: {exc}")
    return True, _bn_omp.openmp_enabled(), ""


def config():
    built, openmp, reason = _extension()
    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "extension": {"built": built, "openmp": openmp, "reason": reason},
        "threads": _threads.get_num_threads(),
        "backends": [row._asdict() for row in _registry.backends()],
    }


def show_config(mode="stdout"):
    """Show the build and runtime configuration of fastbn.

    Parameters
    ----------
    mode : {"stdout", "dicts"}, default "stdout"
        Print a report, or return it as a dict.

    Returns
    -------
    dict or None
        With ``mode="dicts"``: versions, whether the extension was built with
        OpenMP (without it the CPU kernels run single-threaded), the thread
        count, and every backend with its availability and the reason if not.
    """
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode: expected 'stdout' or 'dicts', got {mode!r}")
    info = config()
    if mode == "dicts":
        return info
    ext = info["extension"]
    if not ext["built"]:
        build = f"no compiled kernels: {ext['reason']}"
    elif ext["openmp"]:
        build = "compiled extension with OpenMP"
    else:
        build = "compiled extension WITHOUT OpenMP: CPU kernels run single-threaded"
    print(f"fastbn {info['fastbn']} (python {info['python']}, numpy {info['numpy']})")
    print(f"build:   {build}")
    print(f"threads: {info['threads']} (fastbn.get_num_threads(); the Cython kernels use "
          f"them only with OpenMP)")
    print("backends (highest priority first):")
    for row in info["backends"]:
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"  {row['name']:<8} priority {row['priority']:>4}  "
              f"{'/'.join(sorted(row['devices'])):<5} "
              f"{','.join(sorted(row['dtypes'])):<24} {status}")
