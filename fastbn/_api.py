"""The public functions: validate -> canonical view -> pick backend -> call -> wrap.

The core owns every per-channel computation (folding constants, eps, running
statistics) so that each backend only moves data: see the composition below.
"""
from typing import Any, NamedTuple

from . import _fastpath, _perchannel, _registry
from ._arrays import Interop, device_scope
from ._merge import Moments
from ._registry import WRITE_AND_REDUCE_KERNELS
from ._validate import (STAT_DTYPE, canary_left, canonical, channel_vector, check_activation,
                        check_canary, check_eps, check_flag, check_like_x, check_momentum,
                        check_out, check_residual, check_saved_output, check_training_count,
                        check_whole_batch_count,
                        device_of, kernel_vectors, kernel_wrote, name_of, plant_canary,
                        required_channel_vector, running_stats)

_FLOATS = frozenset(STAT_DTYPE)


class ForwardResult(NamedTuple):
    """Result of :func:`batch_norm_forward`.

    Attributes
    ----------
    y : array
        The normalized output, same shape, dtype, array library and device as ``x``.
    mean : array, shape (C,)
        The batch mean when training, else the running mean used.
    invstd : array, shape (C,)
        ``1 / sqrt(var + eps)`` with the biased batch variance when training,
        else with the running variance.
    """

    y: Any
    mean: Any
    invstd: Any


class BackwardResult(NamedTuple):
    """Result of :func:`batch_norm_backward`.

    Attributes
    ----------
    dx : array
        Gradient with respect to ``x``.
    dweight : array, shape (C,)
        ``sum(dy * xhat)`` per channel (the gradient at ``weight``; computed even
        when ``weight`` is None, as the gradient an affine scale of 1 would get).
    dbias : array, shape (C,)
        ``sum(dy)`` per channel.
    """

    dx: Any
    dweight: Any
    dbias: Any


class ResidualBackwardResult(NamedTuple):
    """Result of :func:`batch_norm_backward` with ``residual=True``.

    Attributes
    ----------
    dx, dweight, dbias : array
        As in :class:`BackwardResult`.
    dresidual : array
        Gradient with respect to the residual ``z`` of ``y = act(bn(x) + z)``: ``dy``
        masked by the activation (``dy`` itself, not a copy, without one).
    """

    dx: Any
    dweight: Any
    dbias: Any
    dresidual: Any


# --- composition of the four kernels ------------------------------------------------
# Kernel results are checked (arity, shape, dtype, written in place) before use. A
# fused kernel that declines hands the call to the same backend's four kernels.

def _reduce(be, kernel, view, *args):
    """Call a kernel that returns two (C,) vectors, and check what it returned."""
    return kernel_vectors(getattr(be, kernel)(*args), (be.name, kernel), view)


def _fill(be, kernel, view, fresh, *args):
    """Call a kernel that writes its last argument; check it did, in place.

    ``fresh``: the output is a buffer fastbn allocated, so a canary can show
    whether the kernel wrote it.
    """
    out3 = args[-1]
    planted = fresh and plant_canary(out3)
    result = getattr(be, kernel)(*args)
    if kernel in WRITE_AND_REDUCE_KERNELS:
        result = kernel_vectors(result, (be.name, kernel), view)
    else:
        kernel_wrote(result, (be.name, kernel))
    if planted and result is not NotImplemented and canary_left(out3):
        check_canary(out3, args, result, (be.name, kernel))
    return result


def _has(be, kernel):
    return getattr(be, kernel, None) is not None


def _normalize(be, view, fresh, mean, scale, shift, y3, epilogue):
    """y3 = act(normalize(x) + z) on one backend: its epilogue kernel when it has one,
    else its plain normalize and the epilogue as array operations."""
    x3 = view.x3
    if epilogue is None:
        return _fill(be, "normalize", view, fresh, x3, mean, scale, shift, y3)
    z3, relu = epilogue
    if _has(be, "normalize_epilogue"):
        done = _fill(be, "normalize_epilogue", view, fresh, x3, mean, scale, shift, z3, relu,
                     y3)
        if done is not NotImplemented:
            return done
    if z3 is not None and view.xp.may_share_memory(z3, y3):  # out=residual: keep z
        z3 = z3.copy()
    if _fill(be, "normalize", view, fresh, x3, mean, scale, shift, y3) is NotImplemented:
        return NotImplemented
    _epilogue_by_array_ops(view, y3, z3, relu)
    return None


def _epilogue_by_array_ops(view, y3, z3, relu):
    """y3 = act(y3 + z3) in the stat dtype: the composition for backends without epilogues."""
    xp = view.xp
    if z3 is None and y3.dtype.itemsize > 2:
        xp.maximum(y3, 0, out=y3)  # NaN stays NaN
        return
    y = y3.astype(STAT_DTYPE[name_of(y3.dtype)])
    if z3 is not None:
        y += z3.astype(y.dtype)
    y3[...] = xp.maximum(y, 0) if relu else y


def _train_forward(be, view, weight, bias, eps, y3, fresh, epilogue):
    """Statistics and normalization on one backend: (mean, m2, invstd) or NotImplemented."""
    xp, x3, n = view.xp, view.x3, view.count
    fused, args = "forward_train", (x3, weight, bias, eps)
    if epilogue is not None:
        fused, args = "forward_train_epilogue", args + epilogue
    if _has(be, fused):
        stats = _fill(be, fused, view, fresh, *args, y3)
        if stats is not NotImplemented:
            mean, m2 = stats
            return mean, m2, _perchannel.invstd(xp, m2 / n, eps)
    stats = _reduce(be, "stats", view, x3)
    if stats is NotImplemented:
        return NotImplemented
    mean, m2 = stats
    invstd = _perchannel.invstd(xp, m2 / n, eps)
    if _normalize(be, view, fresh, mean, weight * invstd, bias, y3,
                  epilogue) is NotImplemented:
        return NotImplemented
    return mean, m2, invstd


class _Gradient:
    """The gradient reaching BN's output, ``g = dy`` masked by the activation: the backward
    kernels that read it, with or without the backend's relu kernels.

    ``y3`` is the saved forward output (relu) or None; ``dz3`` the residual's gradient
    buffer or None. Without relu kernels the mask is applied once by array operations and
    the plain kernels read ``g``."""

    def __init__(self, be, view, dy3, y3, dz3):
        self.be, self.view, self.dy3, self.y3, self.dz3 = be, view, dy3, y3, dz3
        relu_kernels = _has(be, "backward_reduce_relu") and _has(be, "backward_elemt_relu")
        if y3 is not None and not relu_kernels:
            xp = view.xp
            self.dy3 = xp.where(y3 > 0, dy3, xp.zeros((), dtype=dy3.dtype))
            if dz3 is not None:
                dz3[...] = self.dy3
            self.y3 = None

    def fused(self, mean, invstd, weight, dx3):
        be, view = self.be, self.view
        if self.y3 is None:
            if not _has(be, "backward_train"):
                return NotImplemented
            return _fill(be, "backward_train", view, True, self.dy3, view.x3, mean, invstd,
                         weight, dx3)
        if not _has(be, "backward_train_relu"):
            return NotImplemented
        return self._with_dz("backward_train_relu", self.dy3, self.y3, view.x3, mean, invstd,
                             weight, self.dz3, dx3)

    def reduce(self, mean):
        if self.y3 is None:
            return _reduce(self.be, "backward_reduce", self.view, self.dy3, self.view.x3, mean)
        return _reduce(self.be, "backward_reduce_relu", self.view, self.dy3, self.y3,
                       self.view.x3, mean)

    def elemt(self, mean, k_dy, k_x, k_c, dx3):
        x3 = self.view.x3
        if self.y3 is None:
            return _fill(self.be, "backward_elemt", self.view, True, self.dy3, x3, mean, k_dy,
                         k_x, k_c, dx3)
        return self._with_dz("backward_elemt_relu", self.dy3, self.y3, x3, mean, k_dy, k_x,
                             k_c, self.dz3, dx3)

    def _with_dz(self, kernel, *args):
        """_fill, and the same check that the kernel wrote dz (args[-2]) when it is given."""
        dz3 = args[-2]
        planted = dz3 is not None and plant_canary(dz3)
        result = _fill(self.be, kernel, self.view, True, *args)
        if planted and result is not NotImplemented and canary_left(dz3):
            check_canary(dz3, args[:-2] + (dz3,), result, (self.be.name, kernel))
        return result


def _train_backward(grad, mean, invstd, weight, dx3):
    """Reductions and dx on one backend: (sum_dy, sum_dy_xmu) or NotImplemented."""
    sums = grad.fused(mean, invstd, weight, dx3)
    if sums is not NotImplemented:
        return sums
    sums = grad.reduce(mean)
    if sums is NotImplemented:
        return NotImplemented
    sum_dy, sum_dy_xmu = sums
    n = grad.view.count
    k_dy = weight * invstd
    k_x = -k_dy * invstd * invstd * sum_dy_xmu / n
    k_c = -k_dy * sum_dy / n
    if grad.elemt(mean, k_dy, k_x, k_c, dx3) is NotImplemented:
        return NotImplemented
    return sum_dy, sum_dy_xmu


def _eval_backward(grad, mean, invstd, weight, dx3):
    """dx = dy * invstd * weight, plus the reductions for dweight and dbias."""
    sums = grad.reduce(mean)
    if sums is NotImplemented:
        return NotImplemented
    zeros = grad.view.xp.zeros_like(mean)
    if grad.elemt(mean, weight * invstd, zeros, zeros, dx3) is NotImplemented:
        return NotImplemented
    return sums


# --- a part of a batch: statistics and reductions combined by a Sync -----------------

class Sync:
    """How the statistics of one part of a batch become those of the whole batch.

    The core calls each method once per synchronized call, on every part, with a
    callable that computes the part's own values (a Sync may skip calling it when it
    already knows the whole batch's values, as Dask's per-chunk tasks do). Both
    return values in the array module of ``x``; the core casts them to the stat dtype.
    """

    def stats(self, local):
        """``local() -> Moments`` of this part; returns the whole batch's Moments."""
        raise NotImplementedError

    def sums(self, local):
        """``local() -> (count, sum_dy, sum_dy_xmu)`` of this part; returns the whole
        batch's ``(count, sum_dy, sum_dy_xmu)``."""
        raise NotImplementedError


def _local_moments(view, device, backend):
    """Moments of this part on one backend (count 0 and zeros for an empty part)."""
    xp, c = view.xp, view.x3.shape[1]
    if view.x3.size == 0:
        stat = STAT_DTYPE[name_of(view.x3.dtype)]
        return Moments(0, xp.zeros(c, dtype=stat), xp.zeros(c, dtype=stat))
    mean, m2 = _registry.dispatch(device, name_of(view.x3.dtype), view.family, backend,
                                  lambda be: _reduce(be, "stats", view, view.x3))
    return Moments(view.count, mean, m2)


def _in_stat_dtype(view, *vectors):
    stat = STAT_DTYPE[name_of(view.x3.dtype)]
    return [view.xp.asarray(v, dtype=stat) for v in vectors]


def _synced_train_forward(view, device, backend, weight, bias, eps, y3, fresh, epilogue, sync):
    """Statistics of the whole batch (this part's stats kernel, then ``sync``), then this
    part normalized with them: (count, mean, m2, invstd) of the whole batch."""
    n, mean, m2 = sync.stats(lambda: _local_moments(view, device, backend))
    n = int(n)
    check_whole_batch_count(n)
    mean, m2 = _in_stat_dtype(view, mean, m2)
    if n == 0:  # every part empty: NaN statistics, as an empty batch gets (and no 0/0)
        mean = view.xp.full_like(mean, view.xp.nan)
        return n, mean, m2, mean.copy()
    invstd = _perchannel.invstd(view.xp, m2 / n, eps)
    if view.x3.size:
        _registry.dispatch(device, name_of(view.x3.dtype), view.family, backend,
                           lambda be: _normalize(be, view, fresh, mean, weight * invstd, bias,
                                                 y3, epilogue))
    return n, mean, m2, invstd


def _local_sums(view, backend, dy3, y3, mean):
    """(count, sum_dy, sum_dy_xmu) of this part on one backend (0 and zeros when empty);
    ``dy`` is masked by the relu of the saved output ``y3`` when given."""
    xp = view.xp
    if view.x3.size == 0:
        return 0, xp.zeros_like(mean), xp.zeros_like(mean)
    sums = _registry.dispatch(device_of(xp), name_of(view.x3.dtype), view.family, backend,
                              lambda be: _Gradient(be, view, dy3, y3, None).reduce(mean))
    return (view.count, *sums)


def _synced_train_backward(view, backend, dy3, y3, dz3, mean, invstd, weight, dx3, sync):
    """This part's reductions, ``sync``, then this part's dx from the whole batch's sums:
    ``(sum_dy, sum_dy_xmu)`` of the whole batch, and this part's ``(sum_dy, sum_dy_xmu)``
    (None when the sync did not ask for them)."""
    device, dtype = device_of(view.xp), name_of(view.x3.dtype)
    part = []

    def local():
        sums = _local_sums(view, backend, dy3, y3, mean)
        part.extend(sums[1:])
        return sums

    n, sum_dy, sum_dy_xmu = sync.sums(local)
    sum_dy, sum_dy_xmu = _in_stat_dtype(view, sum_dy, sum_dy_xmu)
    if view.x3.size:
        n = int(n)
        k_dy = weight * invstd
        k_x = -k_dy * invstd * invstd * sum_dy_xmu / n
        k_c = -k_dy * sum_dy / n
        _registry.dispatch(device, dtype, view.family, backend,
                           lambda be: _Gradient(be, view, dy3, y3, dz3).elemt(
                               mean, k_dy, k_x, k_c, dx3))
    return sum_dy, sum_dy_xmu, (part or None)


# --- public functions ---------------------------------------------------------------

def _is_dask(a):
    """A Dask collection, told by its type's module: dask is an optional extra that
    ``import fastbn`` never imports."""
    return type(a).__module__.startswith("dask.")


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, axis=1, activation=None,
                       residual=None, out=None, backend=None):
    r"""Batch-normalize ``x`` over every axis but ``axis``.

    .. math::

        y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \, \gamma_c + \beta_c

    optionally followed, in the same pass over memory, by a residual add and an
    activation: ``y = act(bn(x) + residual)``.

    When ``training``, :math:`\mu_c, \sigma^2_c` are the batch mean and biased
    variance of channel ``c`` over the other axes, and the running statistics
    (if given) are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    variance :math:`\sigma^2_c \, n / (n - 1)`. Otherwise the running statistics
    are used and left unchanged.

    Parameters
    ----------
    x : array, rank >= 2, float16/float32/float64
        Input, channels on ``axis``: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``,
        ``(N, C, D, H, W)``, or channels-last with ``axis=-1``.
    weight, bias : array of shape (C,), optional
        Scale :math:`\gamma` (default 1) and shift :math:`\beta` (default 0), in
        ``x``'s dtype or the statistics dtype.
    running_mean, running_var : array of shape (C,), optional, keyword-only
        Running statistics, given together, in the statistics dtype (float32 for
        float16/float32 ``x``, float64 for float64 ``x``). Required when not training.
        Keyword-only because :func:`batch_norm` takes them positionally in
        PyTorch's order, before ``weight`` and ``bias``.
    training : bool, default True
        Use batch statistics (and update running ones) or running statistics.
    momentum : float, default 0.1
        Weight of the batch statistics in the running-statistics update; any finite
        number, as in PyTorch (outside [0, 1] the average extrapolates). Checked only
        when it is used (training with running statistics).
    eps : float > 0, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis; negative values count from the end.
    activation : {None, "relu"}, default None
        Applied to the normalized (and residual-added) values before they are stored:
        ``relu(v) = max(v, 0)`` with NaN kept, as :func:`torch.relu`.
    residual : array, optional
        ``z`` of ``y = act(bn(x) + z)``: shape and dtype of ``x``, any memory layout.
        Added in the statistics dtype, rounded once.
    out : array, optional
        Where to write ``y`` (same shape and dtype as ``x``); may be ``x`` itself or
        ``residual`` itself.
    backend : str or Backend, optional
        Run on this backend (or raise :class:`BackendUnavailableError`), overriding
        :func:`use_backend` and ``FASTBN_BACKEND``.

    Returns
    -------
    ForwardResult
        ``(y, mean, invstd)``: the output and the statistics a backward pass needs,
        with ``invstd = 1 / sqrt(var + eps)``, in the statistics dtype.

    Raises
    ------
    TypeError
        For a wrong type or dtype of any argument.
    ValueError
        For wrong shapes or values (``eps <= 0``, a non-finite ``momentum``,
        one value per channel when training, ...). Nothing is written then.
    BackendUnavailableError
        If the backend asked for cannot serve the call.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5, 5)).astype(np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> bool(abs(y.mean()) < 1e-5)
    True
    """
    fast = _fastpath.forward(x, weight, bias, running_mean, running_var, training, momentum,
                             eps, axis, activation, residual, out, backend)
    if fast is not None:
        return ForwardResult(*fast)
    if _is_dask(x):  # a graph of calls on chunks (docs/dask.md)
        from . import _dask
        return _dask.forward(x, weight, bias, running_mean, running_var, training, momentum,
                             eps, axis, activation, residual, out, backend)
    return forward_any_array(x, weight, bias, running_mean, running_var, training, momentum,
                             eps, axis, activation, residual, out, backend)


def forward_any_array(x, weight, bias, running_mean, running_var, training, momentum, eps,
                      axis, activation, residual, out, backend, sync=None):
    """batch_norm_forward for any supported array library (DLPack exchange), with the
    optional ``sync`` of :func:`_forward`."""
    io = Interop(x)
    caller_out = out
    if not io.passthrough:
        x, weight, bias, running_mean, running_var, residual, out = (
            io.native(a, name) for a, name in (
                (x, "x"), (weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                (running_var, "running_var"), (residual, "residual"), (out, "out")))
    with device_scope(x):  # CuPy: allocate on x's GPU, not the current one
        y, mean, invstd = _forward(x, weight, bias, running_mean, running_var, training,
                                   momentum, eps, axis, activation, residual, out, backend, sync)
    if io.passthrough:
        return ForwardResult(y, mean, invstd)
    return ForwardResult(caller_out if caller_out is not None else io.wrap(y),
                         io.wrap(mean), io.wrap(invstd))


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
             activation, residual, out, backend, sync=None):
    """Validate, view, dispatch and update running statistics; returns (y, mean, invstd).

    ``sync`` (training only): a :class:`Sync` that turns this call's statistics into
    those of the whole batch it is a part of."""
    view = canonical(x, axis)
    training = check_flag(training, "training")
    eps = check_eps(eps)
    relu = check_activation(activation)
    dtype = name_of(view.x3.dtype)
    stat = STAT_DTYPE[dtype]
    weight = channel_vector(weight, "weight", view, {dtype, stat}, stat)
    bias = channel_vector(bias, "bias", view, {dtype, stat}, stat)
    running_stats(running_mean, running_var, view, {dtype, stat}, training)
    updates = training and running_mean is not None
    if updates:  # checked only where it is used, as PyTorch does
        momentum = check_momentum(momentum)
    synced = training and sync is not None
    if training and not synced:  # a part of a batch may hold one value, or none
        check_training_count(view)
    # Write straight into out when its memory is the canonical layout, else
    # into a buffer copied to out once the call has succeeded.
    y3 = check_out(out, x, view) if out is not None else None
    if residual is not None:
        check_residual(residual, out, view)
    xp, c = view.xp, view.x3.shape[1]
    if view.x3.size == 0 and not synced:  # an empty batch: empty y in x's layout, statistics untouched
        y = out if out is not None else xp.empty_like(x)
        if training:
            nan = xp.full(c, xp.nan, dtype=stat)
            return y, nan, nan.copy()
        return (y, *_perchannel.running_statistics(xp, running_mean, running_var, eps, stat))
    epilogue = None
    if relu or residual is not None:
        epilogue = (None if residual is None else view.like(residual), relu)
    staged = None
    fresh = y3 is None  # fastbn's own buffer, not the caller's memory
    if fresh:
        y3, staged = view.empty()
    y = staged if out is None else out

    if weight is None:
        weight = xp.ones(c, dtype=stat)
    if bias is None:
        bias = xp.zeros(c, dtype=stat)
    device = device_of(xp)
    if synced:
        n, mean, m2, invstd = _synced_train_forward(view, device, backend, weight, bias, eps,
                                                    y3, fresh, epilogue, sync)
    elif training:
        n = view.count
        mean, m2, invstd = _registry.dispatch(
            device, dtype, view.family, backend,
            lambda be: _train_forward(be, view, weight, bias, eps, y3, fresh, epilogue))
    if training and updates:
        _perchannel.update_running(running_mean, running_var, mean, m2, n, momentum, stat)
    if not training:
        mean, invstd = _perchannel.running_statistics(xp, running_mean, running_var, eps, stat)
        scale = weight * invstd
        _registry.dispatch(device, dtype, view.family, backend,
                           lambda be: _normalize(be, view, fresh, mean, scale, bias, y3,
                                                 epilogue))
    if out is not None and staged is not None:
        out[...] = staged
    return y, mean, invstd


def local_moments(x, axis=1, backend=None):
    """:class:`~fastbn._merge.Moments` of ``x`` (count 0 for an empty ``x``), from a
    backend's stats kernel, in x's array library (DLPack exchange as elsewhere)."""
    io = Interop(x)
    if not io.passthrough:
        x = io.native(x, "x")
    with device_scope(x):
        view = canonical(x, axis)
        n, mean, m2 = _local_moments(view, device_of(view.xp), backend)
    return Moments(n, io.wrap(mean), io.wrap(m2))


def batch_norm_backward(dy, x, mean, invstd, *, weight=None, training=True, axis=1,
                        activation=None, y=None, residual=False, backend=None):
    r"""Gradients of batch normalization with respect to ``x``, ``weight`` and ``bias``.

    With :math:`\hat{x} = (x - \mu_c)\,\mathrm{invstd}_c` and :math:`n` values per channel:

    .. math::

        dx = \mathrm{invstd}_c \, \gamma_c \left( dy - \overline{dy}_c
             - \hat{x} \, \overline{dy\,\hat{x}}_c \right) \quad \text{(training)},
        \qquad dx = dy \, \mathrm{invstd}_c \, \gamma_c \quad \text{(inference)},

    :math:`d\gamma_c = \sum dy\,\hat{x}`, :math:`d\beta_c = \sum dy`, where bars are
    means over the channel's :math:`n` values.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to ``y``; shape and dtype of ``x``.
    x : array
        The forward input.
    mean, invstd : array of shape (C,)
        As returned by :func:`batch_norm_forward` for this ``x``.
    weight : array of shape (C,), optional, keyword-only
        The scale used in the forward pass (default 1). Keyword-only: PyTorch's
        ``native_batch_norm_backward`` puts weight before the statistics, and a
        positional mix-up would go unnoticed.
    training : bool, default True
        Whether the forward pass used batch statistics (the full gradient, in
        which the statistics depend on ``x``) or running statistics.
    axis : int, default 1
        The channel axis.
    activation : {None, "relu"}, default None
        The forward's activation: ``dy`` is masked where the saved output ``y`` is not
        positive (``torch.relu``'s gradient) before it enters batch norm's gradient.
    y : array, optional
        The forward's output, required with ``activation="relu"``.
    residual : bool, default False
        The forward added a residual ``z``: also return its gradient.
    backend : str or Backend, optional
        As in :func:`batch_norm_forward`.

    Returns
    -------
    BackwardResult or ResidualBackwardResult
        ``(dx, dweight, dbias)``, and ``dresidual`` when ``residual``; ``dweight`` and
        ``dbias`` in the statistics dtype.
    """
    fast = _fastpath.backward(dy, x, mean, invstd, weight, training, axis, activation, y,
                              residual, backend)
    if fast is not None:
        return BackwardResult(*fast)
    if _is_dask(x):  # a graph of calls on chunks (docs/dask.md)
        from . import _dask
        return _dask.backward(dy, x, mean, invstd, weight, training, axis, activation, y,
                              residual, backend)
    return backward_any_array(dy, x, mean, invstd, weight, training, axis, activation, y,
                              residual, backend)


def backward_any_array(dy, x, mean, invstd, weight, training, axis, activation, y, residual,
                       backend, sync=None, part_parameter_grads=False):
    """batch_norm_backward for any supported array library, with the optional ``sync`` and
    ``part_parameter_grads`` of :func:`_backward`."""
    io = Interop(x)
    if not io.passthrough:
        dy, x, mean, invstd, weight, y = (
            io.native(a, name) for a, name in (
                (dy, "dy"), (x, "x"), (mean, "mean"), (invstd, "invstd"), (weight, "weight"),
                (y, "y")))
    with device_scope(x):
        dx, dweight, dbias, dz = _backward(dy, x, mean, invstd, weight, training, axis,
                                           activation, y, residual, backend, sync,
                                           part_parameter_grads)
    if dz is None:
        return BackwardResult(io.wrap(dx), io.wrap(dweight), io.wrap(dbias))
    return ResidualBackwardResult(io.wrap(dx), io.wrap(dweight), io.wrap(dbias), io.wrap(dz))


class _BackwardInputs(NamedTuple):
    """A backward call's arguments, validated, on the canonical view."""

    view: Any
    dy3: Any
    y3: Any          # the saved output (relu), else None
    mean: Any
    invstd: Any
    weight: Any      # None: a scale of 1
    relu: bool
    residual: bool
    training: bool


def _backward_inputs(dy, x, mean, invstd, weight, training, axis, activation, y, residual):
    """Validate a backward call's arguments (nothing is computed or written)."""
    view = canonical(x, axis)
    training = check_flag(training, "training")
    relu = check_activation(activation)
    residual = check_flag(residual, "residual")
    check_like_x(dy, "dy", view)
    check_saved_output(y, relu, view)
    dtype = name_of(view.x3.dtype)
    stat = STAT_DTYPE[dtype]
    mean = required_channel_vector(mean, "mean", view, _FLOATS, stat)
    invstd = required_channel_vector(invstd, "invstd", view, _FLOATS, stat)
    weight = channel_vector(weight, "weight", view, {dtype, stat}, stat)
    return _BackwardInputs(view, view.like(dy), view.like(y) if relu else None, mean, invstd,
                           weight, relu, residual, training)


def _backward(dy, x, mean, invstd, weight, training, axis, activation, y, residual, backend,
              sync=None, part_parameter_grads=False):
    """Validate, view and dispatch; returns (dx, dweight, dbias, dresidual or None).

    ``sync`` (training only): a :class:`Sync` that turns this call's reductions into
    those of the whole batch it is a part of; dweight and dbias are then the whole
    batch's, or this part's share with ``part_parameter_grads`` (torch's SyncBatchNorm
    convention: DDP adds the shares)."""
    inputs = _backward_inputs(dy, x, mean, invstd, weight, training, axis, activation, y,
                              residual)
    view, dy3, y3, mean, invstd, weight, relu, residual, training = inputs
    xp, c = view.xp, view.x3.shape[1]
    synced = training and sync is not None
    if view.x3.size == 0 and not synced:  # an empty batch: empty dx, zero weight/bias gradients
        zeros = xp.zeros(c, dtype=mean.dtype)
        dz = (xp.empty_like(x) if relu else dy) if residual else None
        return xp.empty_like(x), zeros, zeros.copy(), dz
    if weight is None:
        weight = xp.ones(c, dtype=mean.dtype)
    dx3, dx = view.empty()
    dz3, dz = view.empty() if residual and relu else (None, dy if residual else None)
    if synced:
        sum_dy, sum_dy_xmu, part = _synced_train_backward(view, backend, dy3, y3, dz3, mean,
                                                          invstd, weight, dx3, sync)
        if part_parameter_grads:
            sum_dy, sum_dy_xmu = part
        return dx, sum_dy_xmu * invstd, sum_dy, dz
    compose = _train_backward if training else _eval_backward
    sum_dy, sum_dy_xmu = _registry.dispatch(
        device_of(xp), name_of(view.x3.dtype), view.family, backend,
        lambda be: compose(_Gradient(be, view, dy3, y3, dz3), mean, invstd, weight, dx3))
    return dx, sum_dy_xmu * invstd, sum_dy, dz


def local_backward_sums(dy, x, mean, invstd, axis=1, activation=None, y=None, backend=None):
    """``(count, sum_dy, sum_dy_xmu)`` of one part of a batch (count 0 for an empty part),
    from a backend's reduction kernel, validated as :func:`batch_norm_backward` validates
    its arguments; vectors in x's array library."""
    io = Interop(x)
    if not io.passthrough:
        dy, x, mean, invstd, y = (io.native(a, name) for a, name in (
            (dy, "dy"), (x, "x"), (mean, "mean"), (invstd, "invstd"), (y, "y")))
    with device_scope(x):
        inputs = _backward_inputs(dy, x, mean, invstd, None, True, axis, activation, y, False)
        n, sum_dy, sum_dy_xmu = _local_sums(inputs.view, backend, inputs.dy3, inputs.y3,
                                            inputs.mean)
    return n, io.wrap(sum_dy), io.wrap(sum_dy_xmu)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, activation=None, residual=None,
               backend=None):
    r"""Batch normalization with :func:`torch.nn.functional.batch_norm`'s arguments.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \, \gamma + \beta

    Same positional order, defaults and meaning as PyTorch: ``training=False``
    uses the running statistics; ``training=True`` uses batch statistics and
    updates ``running_mean``/``running_var`` in place when they are not None.
    See :func:`batch_norm_forward` for the parameters (``activation`` and ``residual``
    fuse ``act(bn(x) + residual)`` into the same pass).

    Returns
    -------
    array
        ``y``, same shape, dtype and array library as ``x``.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.ones((4, 3), np.float32); x[0] = 3
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = fastbn.batch_norm(x, rm, rv, training=True)
    >>> rm
    array([0.05, 0.05, 0.05], dtype=float32)
    """
    return batch_norm_forward(x, weight, bias, running_mean=running_mean,
                              running_var=running_var, training=training,
                              momentum=momentum, eps=eps, axis=axis, activation=activation,
                              residual=residual, backend=backend).y
