"""Exact per-channel population statistics over many batches ("precise BN").

After training (or after averaging weights, as SWA does) the running averages a batch
norm kept are estimates from batches of an older network. detectron2 and pycls
recompute them over many batches of the final network; :class:`PopulationStats`
does so exactly: each batch's moments come from the backend's stats kernel and are
merged with Chan's formula (fastbn._merge), so the result is the mean and unbiased
variance of all the values seen, not an average of per-batch estimates.
"""
import numpy as np

from . import _api
from ._merge import Moments, merge
from ._validate import check_channels, check_num_features


def _host_float64(v):
    """A per-channel vector from any array library as a NumPy float64 copy."""
    if hasattr(v, "get") and not isinstance(v, np.ndarray):  # CuPy
        v = v.get()
    elif not isinstance(v, np.ndarray):
        v = np.from_dlpack(v)
    return np.array(v, dtype=np.float64)


class PopulationStats:
    """Per-channel count, mean and unbiased variance of every value seen, merged exactly.

    Parameters
    ----------
    num_features : int
        Channels (C).
    axis : int, default 1
        The channel axis of the batches passed to :meth:`update`.

    Notes
    -----
    Each batch's moments are computed by fastbn's stats kernel in the data's stat
    dtype (float32 for 16-bit and float32 data) and accumulated on the host in
    float64, whatever the array library of the batches (NumPy, CuPy, torch, JAX).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.normal(5.0, 2.0, (64, 3)) for _ in range(10)]
    >>> stats = fastbn.PopulationStats(3)
    >>> for b in batches:
    ...     _ = stats.update(b)
    >>> stats.count
    640
    >>> bool(np.allclose(stats.var, np.concatenate(batches).var(axis=0, ddof=1)))
    True
    """

    def __init__(self, num_features, *, axis=1):
        self.num_features = check_num_features(num_features)
        self.axis = axis
        self.reset()

    def reset(self):
        """Forget every value seen; returns self."""
        zeros = np.zeros(self.num_features)
        self._moments = Moments(0, zeros, zeros.copy())
        return self

    @property
    def count(self):
        """Values per channel seen so far (int)."""
        return self._moments.count

    @property
    def mean(self):
        """Per-channel mean, float64 (NaN before any value)."""
        if self.count == 0:
            return np.full(self.num_features, np.nan)
        return self._moments.mean.copy()

    @property
    def var(self):
        """Per-channel unbiased variance, float64 (NaN with fewer than 2 values)."""
        if self.count < 2:
            return np.full(self.num_features, np.nan)
        return self._moments.m2 / (self.count - 1)

    @property
    def moments(self):
        """The accumulated :class:`~fastbn._merge.Moments` (count, mean, m2), float64."""
        count, mean, m2 = self._moments
        return Moments(count, mean.copy(), m2.copy())

    def update(self, x):
        """Add a batch: an array with ``num_features`` channels on ``axis``; returns self."""
        check_channels(x, self.num_features, self.axis)
        count, mean, m2 = _api.local_moments(x, self.axis)
        batch = Moments(count, _host_float64(mean), _host_float64(m2))
        self._moments = merge(self._moments, batch)
        return self

    def merge(self, other):
        """Add everything ``other`` (a PopulationStats of as many channels) has seen;
        returns self."""
        if not isinstance(other, PopulationStats):
            raise TypeError(f"other: expected a PopulationStats, got {type(other).__name__}")
        if other.num_features != self.num_features:
            raise ValueError(f"other: has {other.num_features} channels, this one "
                             f"{self.num_features}")
        self._moments = merge(self._moments, other.moments)
        return self

    def allreduce(self, comm=None):
        """Merge the statistics of every rank of an MPI communicator (default
        ``COMM_WORLD``) in rank order, so every rank ends with the same values; returns
        self. Needs mpi4py (``pip install "fastbn[mpi]"``)."""
        from .distributed import MPISync  # mpi4py only when asked for
        merged = MPISync(comm).stats(lambda: self.moments)
        self._moments = Moments(int(merged.count), _host_float64(merged.mean),
                                _host_float64(merged.m2))
        return self

    def __repr__(self):
        return (f"PopulationStats({self.num_features}, axis={self.axis}) "
                f"with {self.count} value(s) per channel")
