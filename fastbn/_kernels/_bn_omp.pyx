# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython + OpenMP kernels of fastbn.

This module holds only math on C-contiguous buffers. Every kernel takes
``n_threads`` resolved by the caller (``fastbn._threads``).
"""
from cython.parallel cimport prange

cdef extern from "_omp_compat.h":
    int FASTBN_OPENMP
    int omp_get_max_threads() noexcept nogil


def openmp_enabled():
    """True when this extension was compiled with OpenMP."""
    return bool(FASTBN_OPENMP)


def openmp_max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()


def stream_read(const float[::1] src, int n_threads=1):  # IN
    """Read every element once (the memory-read floor); returns their sum."""
    cdef Py_ssize_t i, n = src.shape[0]
    cdef double total = 0.0
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        total += src[i]
    return total
