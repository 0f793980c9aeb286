"""Host output buffers: reused once the caller has let go of them.

A fresh multi-megabyte NumPy array costs page faults on its first write (the
kernel's stores then wait for the kernel to zero each page, and with NumPy's
huge-page advice a fault may wait for memory compaction): on this machine kind
that made the allocating path 1.3-3x slower than ``out=`` with long tails. So
outputs of at least ``_MIN_BYTES`` come from a small cache of buffers that the
kernels have written before (resident, 64-byte aligned: the kernels' streaming
stores apply). A buffer is handed out again only when nothing but the cache refers
to it: every array or view the caller holds keeps a reference to its buffer, so a
live result is never reused. Whenever the cache allocates, it drops idle buffers
beyond ``FASTBN_OUTPUT_CACHE_MB`` (default: 1/16 of the memory, at most 1 GiB; 0
turns the cache off); :func:`fastbn.clear_output_cache` releases them all.
"""
import os
import sys
import threading

import numpy as np

_MIN_BYTES = 1 << 20   # smaller outputs: malloc's own free lists are as good
_ALIGN = 64


def _default_limit():
    env = os.environ.get("FASTBN_OUTPUT_CACHE_MB", "").strip()
    if env:
        try:
            return max(0, int(float(env) * (1 << 20)))
        except ValueError:
            pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return min(1 << 30, memory // 16)


class _Slot:
    """One cached buffer: ``raw``, the array that owns the memory (every view of it, the
    caller's included, has ``raw`` as its base); ``aligned``, its 64-byte-aligned bytes;
    and ``last``, the array handed out last. Counting references to ``raw`` and ``last``
    through the slot gives the same numbers wherever the cache looks, when nobody else
    holds them."""

    __slots__ = ("raw", "aligned", "last")

    def __init__(self, nbytes, shape, dtype):
        self.raw = np.empty(nbytes + _ALIGN, np.uint8)
        start = -self.raw.ctypes.data % _ALIGN
        self.aligned = self.raw[start:start + nbytes]
        self.last = self.aligned.view(dtype).reshape(shape)

    def free(self):
        return sys.getrefcount(self.raw) <= _RAW_FREE and sys.getrefcount(self.last) <= _LAST_FREE

    def take(self, shape, dtype):
        """The buffer as an array of ``shape`` and ``dtype`` when it is free, else None.
        The array handed out last is handed out again when nobody changed it (so a loop
        of same-shaped calls creates no array object: with cold caches, making one costs
        more than the cache's bookkeeping)."""
        if not self.free():
            return None
        last = self.last
        if not (last.shape == shape and last.dtype is dtype and last.flags.writeable
                and last.flags.c_contiguous):
            self.last = last = self.aligned.view(dtype).reshape(shape)
        return last


def _reference_counts():
    probe = _Slot(8, (2,), np.dtype(np.float32))
    return sys.getrefcount(probe.raw), sys.getrefcount(probe.last)


# raw: the slot's, aligned's and last's bases, the call's; last: the slot's, the call's
_RAW_FREE, _LAST_FREE = _reference_counts()


class OutputCache:
    """Buffers by size; a buffer is free when only the cache refers to it."""

    def __init__(self, limit):
        self.limit = limit
        self._slots = {}   # nbytes -> [_Slot]
        self._lock = threading.Lock()

    def empty(self, shape, dtype):
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``."""
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if nbytes < _MIN_BYTES or self.limit <= 0:
            return np.empty(shape, dtype)
        shape = tuple(shape)
        with self._lock:
            for slot in self._slots.get(nbytes, ()):
                array = slot.take(shape, dtype)
                if array is not None:
                    return array
            slot = _Slot(nbytes, shape, dtype)
            self._slots.setdefault(nbytes, []).append(slot)
            array = slot.last  # holds the buffer from here on
            self._trim()  # when the cache grows (a reuse adds nothing to keep track of)
        return array

    def _free_slots(self):
        return [(nbytes, slot) for nbytes, slots in self._slots.items() for slot in slots
                if slot.free()]

    def _trim(self, limit=None):
        """Drop free buffers beyond the limit, largest first."""
        limit = self.limit if limit is None else limit
        free = sorted(self._free_slots(), key=lambda item: -item[0])
        total = sum(nbytes for nbytes, _ in free)
        for nbytes, slot in free:
            if total <= limit:
                break
            slots = self._slots[nbytes]
            slots.remove(slot)
            if not slots:
                del self._slots[nbytes]
            total -= nbytes

    def clear(self):
        """Release every free buffer (those the caller still holds stay theirs)."""
        with self._lock:
            self._trim(limit=0)

    def nbytes(self):
        """(bytes held in all, bytes free): what the cache keeps, and what is idle."""
        with self._lock:
            held = sum(n * len(slots) for n, slots in self._slots.items())
            return held, sum(n for n, _ in self._free_slots())


cache = OutputCache(_default_limit())


def empty(xp, shape, dtype):
    """``xp.empty(shape, dtype)``; host outputs through the cache."""
    if xp is np:
        return cache.empty(shape, dtype)
    return xp.empty(shape, dtype=dtype)


def clear_output_cache():
    """Release the host output buffers fastbn keeps for reuse.

    fastbn reuses the memory of large outputs (1 MiB and more) once nothing refers to
    them any more, so that a training loop's steps write into memory that is already
    mapped instead of page-faulting on every call. Whenever it allocates, the cache drops
    idle buffers beyond ``FASTBN_OUTPUT_CACHE_MB`` (default 1/16 of the memory, at most
    1 GiB); this releases every idle buffer now. Arrays you still hold are not affected.
    """
    cache.clear()
