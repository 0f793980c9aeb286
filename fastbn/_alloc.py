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
    caller's included, has ``raw`` as its base), and ``start``, its 64-byte-aligned
    offset. Counting references to ``raw`` through the slot gives the same number
    wherever the cache looks, when nobody else holds it."""

    __slots__ = ("raw", "start")

    def __init__(self, nbytes):
        self.raw = np.empty(nbytes + _ALIGN, np.uint8)
        self.start = -self.raw.ctypes.data % _ALIGN

    def array(self, shape, dtype, nbytes):
        return self.raw[self.start:self.start + nbytes].view(dtype).reshape(shape)

    def free(self):
        return sys.getrefcount(self.raw) <= _FREE_REFS


_PROBE = _Slot(1)
_FREE_REFS = sys.getrefcount(_PROBE.raw)  # the slot's reference and the call's
del _PROBE


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
        with self._lock:
            slot = next((s for s in self._slots.get(nbytes, ()) if s.free()), None)
            if slot is not None:
                return slot.array(shape, dtype, nbytes)
            slot = _Slot(nbytes)
            self._slots.setdefault(nbytes, []).append(slot)
            array = slot.array(shape, dtype, nbytes)  # holds the buffer from here on
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
