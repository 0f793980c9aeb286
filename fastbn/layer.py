"""BatchNorm: the stateful layer (parameters, running statistics, train/eval)."""
import numpy as np

from . import _api
from ._population import PopulationStats
from ._validate import (STAT_DTYPE, check_activation, check_dtype_name, check_eps, check_flag,
                        check_layer_input, check_momentum, check_num_features,
                        check_population_count, state_entries)


class BatchNorm:
    r"""Batch normalization layer over NumPy arrays, with PyTorch's semantics.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \, \gamma + \beta

    In training mode the batch statistics normalize ``x`` and update the running
    statistics, ``running = (1 - momentum) * running + momentum * batch``
    (unbiased batch variance); in eval mode the running statistics normalize.

    Parameters
    ----------
    num_features : int
        ``C``, the size of the channel axis.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of the batch statistics in the running average; ``None`` gives a
        cumulative (equal-weight) average, factor ``1 / num_batches_tracked``.
        Note Flax's ``momentum`` is the weight of the *old* value: Flax 0.9 is ours 0.1.
    affine : bool, default True
        Learn a scale ``weight`` (init 1) and shift ``bias`` (init 0).
    track_running_stats : bool, default True
        Keep running statistics; when False, batch statistics are used in eval mode too.
    axis : int, default 1
        The channel axis of the inputs (``-1`` for channels-last).
    dtype : {"float32", "float64", "float16"}, default "float32"
        Dtype of the data. Parameters and running statistics are float32 for
        float16/float32 data and float64 for float64 data.
    activation : {None, "relu"}, default None
        Fuse an activation into the layer: ``y = relu(bn(x) [+ residual])`` in one pass
        over memory, and its gradient into :meth:`backward` (the layer then saves ``y``).
    backend : str or Backend, optional
        Run every call on this backend.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
    running_mean, running_var : ndarray of shape (C,) or None
    num_batches_tracked : int or None
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set (overwritten, not accumulated) by :meth:`backward`.
    training : bool

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(size=(16, 3, 4, 4)).astype(np.float32)
    >>> y = bn(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.num_batches_tracked
    1
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype="float32", activation=None,
                 backend=None):
        self.num_features = check_num_features(num_features)
        self.eps = check_eps(eps)
        self.momentum = None if momentum is None else check_momentum(momentum)
        self.affine = check_flag(affine, "affine")
        self.track_running_stats = check_flag(track_running_stats, "track_running_stats")
        self.axis = axis
        self.dtype = check_dtype_name(dtype)
        check_activation(activation)
        self.activation = activation
        self.backend = backend
        stat = STAT_DTYPE[self.dtype]
        c = self.num_features
        self.weight = np.ones(c, stat) if self.affine else None
        self.bias = np.zeros(c, stat) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, stat)
            self.running_var = np.ones(c, stat)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None  # (x, mean, invstd, used_batch_statistics, y, residual) of the last forward

    # --- mode ---
    def train(self, mode=True):
        """Set training mode (batch statistics); returns self."""
        self.training = check_flag(mode, "mode")
        return self

    def eval(self):
        """Set eval mode (running statistics); returns self."""
        return self.train(False)

    # --- compute ---
    def forward(self, x, residual=None):
        """Normalize ``x``; in training mode also update the running statistics.

        ``residual``: an array like ``x`` added after the affine step and before the
        activation, ``y = act(bn(x) + residual)`` (ResNet's BN-add-ReLU), in the same pass.
        """
        check_layer_input(x, STAT_DTYPE[self.dtype], self.num_features, self.axis)
        use_batch_stats = self.training or not self.track_running_stats
        updates = self.training and self.track_running_stats
        momentum = self.momentum
        if updates and momentum is None:  # cumulative moving average
            momentum = 1.0 / (self.num_batches_tracked + 1)
        result = self._batch_norm_forward(
            x, self.weight, self.bias,
            running_mean=self.running_mean if self.track_running_stats else None,
            running_var=self.running_var if self.track_running_stats else None,
            training=use_batch_stats, momentum=0.0 if momentum is None else momentum,
            eps=self.eps, axis=self.axis, activation=self.activation, residual=residual,
            backend=self.backend)
        if updates:
            self.num_batches_tracked += 1
        saved_y = result.y if self.activation is not None else None
        self._saved = (x, result.mean, result.invstd, use_batch_stats, saved_y,
                       residual is not None)
        return result.y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to the last forward's input; sets ``grad_weight``/``grad_bias``.

        Uses the input and statistics saved by the last :meth:`forward`, in the
        mode that forward ran in (batch statistics: the full BN gradient;
        running statistics: ``dx = dy * invstd * weight``). Returns ``dx``, or
        ``(dx, dresidual)`` when the last forward added a residual.
        """
        if self._saved is None:
            raise RuntimeError("backward: call forward(x) first; no statistics are saved")
        x, mean, invstd, used_batch_stats, y, residual = self._saved
        grads = self._batch_norm_backward(
            dy, x, mean, invstd, weight=self.weight, training=used_batch_stats, axis=self.axis,
            activation=self.activation, y=y, residual=residual, backend=self.backend)
        if self.affine:
            self.grad_weight, self.grad_bias = grads.dweight, grads.dbias
        return (grads.dx, grads.dresidual) if residual else grads.dx

    # The functional calls the layer makes: fastbn.distributed.SyncBatchNorm overrides them.
    def _batch_norm_forward(self, x, weight, bias, **kwargs):
        return _api.batch_norm_forward(x, weight, bias, **kwargs)

    def _batch_norm_backward(self, dy, x, mean, invstd, **kwargs):
        return _api.batch_norm_backward(dy, x, mean, invstd, **kwargs)

    def recalibrate(self, batches):
        """Set the running statistics to the exact population statistics of ``batches``.

        "Precise BN" (detectron2, pycls): after training, or after averaging weights
        (SWA), the running averages are estimates from batches of older weights; this
        replaces them with the mean and unbiased variance of every value in ``batches``
        (an iterable of arrays shaped like this layer's inputs), merged exactly across
        batches (:class:`fastbn.PopulationStats`). Parameters, mode and
        ``num_batches_tracked`` are left as they are. Returns the PopulationStats.
        """
        if not self.track_running_stats:
            raise RuntimeError("recalibrate: this layer has no running statistics "
                               "(track_running_stats=False)")
        stats = PopulationStats(self.num_features, axis=self.axis)
        for x in batches:
            check_layer_input(x, STAT_DTYPE[self.dtype], self.num_features, self.axis)
            stats.update(x)
        check_population_count(stats.count, "batches")
        self.running_mean[...] = stats.mean
        self.running_var[...] = stats.var
        return stats

    # --- state ---
    def _state_keys(self):
        keys = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self):
        """Copies of the parameters and running statistics, under PyTorch's key names."""
        state = {}
        for key in self._state_keys():
            value = getattr(self, key)
            state[key] = np.array(value, dtype=np.int64) if key == "num_batches_tracked" \
                else value.copy()
        return state

    def load_state_dict(self, state_dict):
        """Copy a state dict in (a torch BatchNorm's works too); checked whole before any write."""
        entries = state_entries(state_dict, self._state_keys(), self.num_features,
                                STAT_DTYPE[self.dtype])
        for key, value in entries.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype!r}"
                + (f", activation={self.activation!r})" if self.activation else ")"))
