"""Synchronized batch norm over MPI: one batch split over the ranks of a communicator.

    from mpi4py import MPI
    from fastbn.distributed import sync_batch_norm_forward, sync_batch_norm_backward
    y, mean, invstd = sync_batch_norm_forward(x_part, w, b, running_mean=rm, running_var=rv)
    dx, dw, db = sync_batch_norm_backward(dy_part, x_part, mean, invstd, weight=w)

Every rank holds a part of the batch (any size, none at all included) and gets the
result the whole batch would give on one process: each rank's ``stats`` kernel, ONE
collective of the packed per-channel ``(count, mean, m2)``, Chan's merge
(:mod:`fastbn._merge`), then each rank normalizes its part; the backward is each
rank's ``backward_reduce``, ONE collective of ``(count, sum_dy, sum_dy_xmu)``, then
``backward_elemt``. The transport is mpi4py (``pip install "fastbn[mpi]"``, whose
``mpich`` wheel ships ``mpiexec``); mpi4py is imported on first use, never by
``import fastbn``. Like every collective these are calls every rank of ``comm`` makes,
in the same order, with the same channel count and dtype. ``docs/distributed.md``
has the design.
"""
import numpy as np

from . import _api
from ._hints import install_hint
from ._merge import Moments, merge_all
from ._validate import array_module, check_comm
from .layer import BatchNorm

__all__ = ["sync_batch_norm_forward", "sync_batch_norm_backward", "SyncBatchNorm", "MPISync"]


def _mpi():
    """mpi4py's MPI module (importing it initializes MPI), or an ImportError saying how
    to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"fastbn.distributed needs mpi4py: "
                          f"{install_hint('mpi4py mpich', 'mpi')}") from exc
    return MPI


def communicator(comm=None):
    """``comm`` checked to be an mpi4py intracommunicator; ``MPI.COMM_WORLD`` for None."""
    MPI = _mpi()
    return MPI.COMM_WORLD if comm is None else check_comm(comm, MPI.Intracomm)


class MPISync(_api.Sync):
    """A :class:`fastbn._api.Sync` over an mpi4py communicator: one ``Allgather`` a call.

    Each rank packs its ``count`` and two per-channel vectors into one float64 buffer
    of ``1 + 2*C`` values; ``Allgather`` hands every rank every rank's buffer, and each
    rank combines them itself, in rank order: statistics with
    :func:`fastbn._merge.merge_all`, backward sums by adding rank 0's, then rank 1's,
    and so on. So every rank computes the same float64 operations on the same inputs
    and holds bitwise-identical results. An ``Allreduce`` with a user-defined
    operation would move as little data, but MPI may combine the contributions in
    a different order (a different tree) on different ranks, and floating-point
    addition is not associative: ranks could then normalize with statistics that
    differ in the last bits, and their running statistics drift apart. The payload
    is tiny (``8 * (1 + 2*C)`` bytes a rank), so gathering costs nothing over reducing.

    CuPy arrays: the packed buffer is built on the device and copied to the host
    once (a ``C``-sized copy, which also waits for the kernels before it), the
    collective and the merge run on the host, and the core copies the merged
    vectors back to the device. mpi4py offers no reliable query of whether the MPI
    library is CUDA-aware (there is no binding of MPICH's or Open MPI's extension
    for it), and the merge of ``size`` small vectors is host work anyway, so this
    host-staging path is the only one.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``; anything but an intracommunicator is a TypeError.

    Attributes
    ----------
    comm : mpi4py.MPI.Intracomm
    """

    def __init__(self, comm=None):
        self.comm = communicator(comm)

    def stats(self, local):
        count, mean, m2 = local()
        parts = self._allgather(count, mean, m2)
        c = (parts.shape[1] - 1) // 2
        return merge_all(Moments(int(p[0]), p[1:1 + c], p[1 + c:]) for p in parts)

    def sums(self, local):
        parts = self._allgather(*local())
        total = parts[0].copy()
        for part in parts[1:]:  # in rank order, the same on every rank
            total += part
        c = (total.shape[0] - 1) // 2
        return int(total[0]), total[1:1 + c], total[1 + c:]

    def _allgather(self, count, a, b):
        """Every rank's ``(count, a, b)`` packed as the rows of a host float64 array
        ``(size, 1 + 2*C)``, in rank order."""
        xp = array_module(a)
        c = a.shape[0]
        packed = xp.empty(1 + 2 * c, dtype=np.float64)
        packed[0] = count
        packed[1:1 + c] = a
        packed[1 + c:] = b
        if xp is not np:  # CuPy: the one device -> host copy
            packed = packed.get()
        gathered = np.empty((self.comm.Get_size(), 1 + 2 * c), dtype=np.float64)
        self.comm.Allgather(packed, gathered)
        return gathered


def sync_batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                            training=True, momentum=0.1, eps=1e-5, axis=1, activation=None,
                            residual=None, out=None, backend=None, comm=None):
    """:func:`fastbn.batch_norm_forward` of a batch split over the ranks of ``comm``.

    Every rank passes its part of the batch as ``x`` and gets its part of ``y``,
    normalized with the statistics of the whole batch (all ranks' parts together),
    as one process holding the concatenated batch would compute them; ``mean`` and
    ``invstd`` are the whole batch's, identical on every rank. Running statistics
    are updated with the whole batch's mean and unbiased variance (``m2 / (n - 1)``,
    ``n`` the whole batch's count), identically on every rank. A rank may hold any
    number of samples, none included (its ``y`` is empty); more than one value per
    channel is required of the whole batch, not of each part.

    Parameters
    ----------
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
    activation, residual, out, backend
        As :func:`fastbn.batch_norm_forward`, for this rank's part.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the batch (default ``MPI.COMM_WORLD``). Every rank of
        ``comm`` must make the call, with the same channel count and dtype.

    Returns
    -------
    ForwardResult
        ``(y, mean, invstd)``. With ``training=False`` the running statistics
        normalize and nothing is communicated (as torch's SyncBatchNorm in eval mode).

    Raises
    ------
    ImportError
        mpi4py is not installed.
    TypeError
        ``comm`` is not an mpi4py intracommunicator, or as batch_norm_forward.
    ValueError
        The whole batch has one value per channel, or as batch_norm_forward.
    """
    sync = MPISync(comm)
    return _api.forward_any_array(x, weight, bias, running_mean, running_var, training,
                                  momentum, eps, axis, activation, residual, out, backend, sync)


def sync_batch_norm_backward(dy, x, mean, invstd, *, weight=None, training=True, axis=1,
                             activation=None, y=None, residual=False, backend=None, comm=None):
    """:func:`fastbn.batch_norm_backward` of a batch split over the ranks of ``comm``.

    ``mean`` and ``invstd`` are what :func:`sync_batch_norm_forward` returned. Each
    rank gets ``dx`` of its own part, computed with the sums of the whole batch; the
    returned ``dweight`` and ``dbias`` are the whole batch's gradients (the sum over
    the ranks), identical on every rank. (``fastbn.torch.SyncBatchNorm`` follows
    torch's convention instead: each rank's own share, for DDP to all-reduce.)

    Parameters
    ----------
    dy, x, mean, invstd, weight, training, axis, activation, y, residual, backend
        As :func:`fastbn.batch_norm_backward`, for this rank's part.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the batch (default ``MPI.COMM_WORLD``).

    Returns
    -------
    BackwardResult or ResidualBackwardResult
        ``(dx, dweight, dbias)``, and ``dresidual`` when ``residual``. With
        ``training=False``, ``dx = dy * invstd * weight`` of this part and the
        parameter gradients of this part; nothing is communicated.
    """
    return _sync_backward(dy, x, mean, invstd, weight, training, axis, activation, y, residual,
                          backend, comm)


def _sync_backward(dy, x, mean, invstd, weight, training, axis, activation, y, residual,
                   backend, comm, local_parameter_grads=False):
    """sync_batch_norm_backward; with ``local_parameter_grads`` the returned dweight and
    dbias are this rank's own share (torch's SyncBatchNorm convention), dx unchanged."""
    return _api.backward_any_array(dy, x, mean, invstd, weight, training, axis, activation, y,
                                   residual, backend, MPISync(comm), local_parameter_grads)


class SyncBatchNorm(BatchNorm):
    """:class:`fastbn.BatchNorm` whose training passes are synchronized over MPI ranks.

    Every rank of ``comm`` holds a copy of the layer and calls it on its part of the
    batch: in training mode the forward normalizes with the whole batch's statistics
    and updates the running statistics with them (identically on every rank), and
    :meth:`backward` returns this rank's ``dx`` with ``grad_weight``/``grad_bias``
    set to the whole batch's gradients (identical on every rank, so no further
    all-reduce is needed). In eval mode nothing is communicated, as with torch's
    SyncBatchNorm (with ``track_running_stats=False`` each rank then uses its own
    part's statistics).

    Parameters
    ----------
    num_features : int
        ``C``, the size of the channel axis.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share each batch; default ``MPI.COMM_WORLD``, looked up at the
        first synchronized call.
    **kwargs
        The other keyword arguments of :class:`fastbn.BatchNorm` (``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, ``axis``, ``dtype``,
        ``activation``, ``backend``).

    Examples
    --------
    Under ``mpiexec -n 2 python script.py``, each rank with its half of the batch::

        bn = fastbn.distributed.SyncBatchNorm(64)
        y = bn(x_part)
        dx_part = bn.backward(dy_part)   # bn.grad_weight: the whole batch's
    """

    def __init__(self, num_features, *, comm=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.comm = None if comm is None else communicator(comm)
        self._synced = False  # whether the last forward was synchronized

    def _batch_norm_forward(self, x, weight, bias, **kwargs):
        self._synced = self.training
        if not self._synced:
            return super()._batch_norm_forward(x, weight, bias, **kwargs)
        return sync_batch_norm_forward(x, weight, bias, comm=self.comm, **kwargs)

    def _batch_norm_backward(self, dy, x, mean, invstd, **kwargs):
        if not self._synced:
            return super()._batch_norm_backward(dy, x, mean, invstd, **kwargs)
        return sync_batch_norm_backward(dy, x, mean, invstd, comm=self.comm, **kwargs)

    def __repr__(self):
        return "Sync" + super().__repr__()
