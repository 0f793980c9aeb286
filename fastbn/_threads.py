"""Thread-count control shared by the CPU backends.

One number, resolved in this order: the innermost ``num_threads(n)`` context of
the calling thread/task, then ``set_num_threads(n)``, then OpenMP's own default
for the compiled kernels (``omp_get_max_threads()``: ``OMP_NUM_THREADS``, or a
``threadpoolctl.threadpool_limits`` in force), then ``OMP_NUM_THREADS`` and the
CPUs this process may run on when the extension has no OpenMP.
"""
import contextlib
import contextvars
import os

_scoped = contextvars.ContextVar("fastbn_num_threads", default=None)
_global = None
_omp_max_threads = False  # the kernels' omp_get_max_threads, None without it; False: not looked up


def _openmp_default():
    """omp_get_max_threads of the compiled kernels (read at each call: threadpoolctl may
    change it), or None without OpenMP. The lookup is done once: it runs on every call."""
    global _omp_max_threads
    if _omp_max_threads is False:
        try:
            from ._kernels._bn_omp import openmp_enabled, openmp_max_threads
        except ImportError:
            _omp_max_threads = None
        else:
            _omp_max_threads = openmp_max_threads if openmp_enabled() else None
    return None if _omp_max_threads is None else _omp_max_threads()


def _default_num_threads():
    n = _openmp_default()
    if n is not None:
        return n
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check(n):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected a positive int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected a positive int, got {n}")
    return n


def set_num_threads(n):
    """Set the number of threads the CPU backends use, process-wide.

    Parameters
    ----------
    n : int or None
        A positive thread count, or ``None`` to go back to the default
        (``OMP_NUM_THREADS``, else the CPUs this process may use).
    """
    global _global
    _global = None if n is None else _check(n)


def get_num_threads():
    """Return the number of threads the CPU backends will use for the next call.

    Returns
    -------
    int
        The innermost ``num_threads`` context's value, else the value of
        ``set_num_threads``, else ``OMP_NUM_THREADS``, else the CPU count.
    """
    n = _scoped.get()
    if n is not None:
        return n
    if _global is not None:
        return _global
    return _default_num_threads()


# Bytes a kernel reads per thread below which one more thread does not pay: measured
# (Cython kernels, float32 (O, 2048) rows, hot caches, 1 vs 2 threads on 2 vCPUs):
# at 512 KiB read (x; dy and x for backward: 256 KiB each) the medians were alike
# (0.9-1.0x) while the 90th percentile of 2 threads was up to 100x worse when the
# second vCPU was busy (a thread team waits for its slowest member); at 1-2 MiB
# read, 2 threads were 0.6-0.8x the median time of one.
MIN_BYTES_PER_THREAD = 1 << 20


def threads_for(nbytes):
    """The threads for a kernel call that reads ``nbytes``: get_num_threads(), capped
    so each thread reads at least MIN_BYTES_PER_THREAD (at least 1 thread). The count
    of an enclosing ``num_threads(n)`` block is taken as given, uncapped (the kernels
    still use no more threads than their work fills)."""
    n = _scoped.get()
    if n is not None:
        return n
    n = get_num_threads()
    if n > 1:
        cap = nbytes // MIN_BYTES_PER_THREAD
        if cap < n:
            n = cap if cap > 1 else 1
    return n


@contextlib.contextmanager
def num_threads(n):
    """Context manager: use ``n`` threads inside the block, in this thread/task only.

    Examples
    --------
    >>> import fastbn
    >>> with fastbn.num_threads(1):
    ...     fastbn.get_num_threads()
    1
    """
    token = _scoped.set(_check(n))
    try:
        yield n
    finally:
        _scoped.reset(token)
