"""PyTorch adapter: fastbn's batch norm as torch operators, with autograd, and drop-in modules.

    import fastbn.torch
    y = fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    model = fastbn.torch.convert(model)      # every nn.BatchNorm*d now runs on fastbn
    y = fastbn.torch.batch_norm(x, rm, rv, w, b, training=True, activation="relu", residual=z)
    model = fastbn.torch.convert(model, fuse_relu=True)  # and Sequential's BN, ReLU fused

Two custom operators are registered with ``torch.library`` — ``fastbn::batch_norm``
(forward, with the fused epilogue ``relu(bn(x) + z)``; the running statistics come back
to be copied in) and ``fastbn::batch_norm_backward`` (from the saved output with relu;
also the residual's gradient) — each with a fake (shape-only) implementation and
a vmap rule, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through
them and run fastbn's kernels. Autograd is a ``torch.autograd.Function`` around
them: reverse mode through the backward operator, forward mode (``jvp``), and
double backward (the backward is itself differentiable: its derivative recomputes
the gradient formula with torch operations). Tensors reach fastbn through DLPack
without a copy; the only batch-norm math here is those derivative formulas, which
fastbn's kernels do not provide. torch is imported when this module is, never by
``import fastbn``.
"""
try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ._hints import install_hint
    raise ImportError(f"fastbn.torch needs PyTorch: {install_hint('torch==2.13.0', 'torch')}") \
        from exc

from . import _api
from ._validate import check_activation
from ._torch_fold import fold  # noqa: F401 (fastbn.torch.fold)
from ._torch_recalibrate import recalibrate  # noqa: F401 (fastbn.torch.recalibrate)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert",
           "convert_sync_batchnorm", "fold", "recalibrate"]

Tensor = torch.Tensor


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_name(backend):
    """Operators take strings: a backend object travels by its registered name."""
    if backend is None:
        return ""
    return backend if isinstance(backend, str) else backend.name


def _like(t, input):
    """``t`` with the strides ``torch.empty_like(input)`` has (what the fake kernels promise)."""
    expected = torch.empty_like(input)
    return t if t.stride() == expected.stride() else expected.copy_(t)


def _fake_outputs(input, axis):
    c, stat = input.shape[axis], _stat_dtype(input.dtype)
    return torch.empty_like(input), input.new_empty(c, dtype=stat), input.new_empty(c, dtype=stat)


# --- the operators ----------------------------------------------------------------------------
# The epilogue travels as ``activation`` ("" or "relu") and ``residual`` (z of
# y = act(bn(x) + z), or None); the backward operator takes the saved output y (relu's
# mask) and returns the residual's gradient as a fourth tensor (empty when not asked for).

@torch.library.custom_op("fastbn::batch_norm", mutates_args=())
def _forward_op(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None,
                residual: Tensor | None, training: bool, momentum: float, eps: float,
                axis: int, activation: str,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, new running_mean, new running_var) with y = act(bn(x) + residual):
    functional, so that autograd can be registered with it; the caller copies the new
    running statistics in (empty tensors when there is nothing to update)."""
    updates = training and running_mean is not None
    running = [None if r is None else (r.clone() if updates else r)
               for r in (running_mean, running_var)]
    y = torch.empty_like(input)  # input's memory format, empty inputs included (as torch)
    _, mean, invstd = _api.batch_norm_forward(
        input, weight, bias, running_mean=running[0], running_var=running[1],
        training=training, momentum=momentum, eps=eps, axis=axis,
        activation=activation or None, residual=residual, out=y, backend=backend or None)
    if not updates:
        running = [input.new_empty(0, dtype=mean.dtype) for _ in range(2)]
    return y, mean, invstd, running[0], running[1]


@_forward_op.register_fake
def _(input, weight, bias, running_mean, running_var, residual, training, momentum, eps, axis,
      activation, backend):
    y, mean, invstd = _fake_outputs(input, axis)
    if training and running_mean is not None:
        return y, mean, invstd, torch.empty_like(running_mean), torch.empty_like(running_var)
    empty = input.new_empty(0, dtype=mean.dtype)
    return y, mean, invstd, empty, empty.clone()


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def _backward_op(grad: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                 weight: Tensor | None, output: Tensor | None, training: bool, axis: int,
                 activation: str, residual: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); ``output`` is the forward's y (needed with relu);
    dresidual is ``grad`` masked by the activation when ``residual``, else empty."""
    result = _api.batch_norm_backward(
        grad, input, mean, invstd, weight=weight, training=training, axis=axis,
        activation=activation or None, y=output, residual=residual, backend=backend or None)
    dx, dweight, dbias = result[:3]
    if not residual:
        dz = grad.new_empty(0)
    elif activation:
        dz = _like(result[3], input)
    else:  # the core hands back grad itself, and an operator returns no alias of an input
        dz = torch.empty_like(input).copy_(grad)
    return _like(dx, input), dweight, dbias, dz


@_backward_op.register_fake
def _(grad, input, mean, invstd, weight, output, training, axis, activation, residual,
      backend):
    dz = torch.empty_like(input) if residual else grad.new_empty(0)
    return (*_fake_outputs(input, axis), dz)


# --- vmap: a vmapped batch norm is one batch norm over B*C channels ---------------------------

def _merge(t, dim, batch, axis):
    """Per-sample tensors (B at ``dim``, channels on ``axis``) -> one tensor with B*C
    channels on ``axis`` (B outer), materialising an unbatched ``t`` over B; None stays
    None."""
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)
    t = t.movedim(0, axis)                         # (..., B, C, ...)
    shape = t.shape
    return t.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])


def _split(t, batch, axis):
    """The inverse of :func:`_merge`: B back in front."""
    shape = t.shape
    return t.reshape(*shape[:axis], batch, shape[axis] // batch, *shape[axis + 1:]).movedim(
        axis, 0)


def _flat(v, dim, batch):
    """A (C,) or batched (B, C) vector as (B*C,); None stays None."""
    if v is None:
        return None
    return (v.movedim(dim, 0) if dim is not None else v.expand(batch, *v.shape)).reshape(-1)


@_forward_op.register_vmap
def _(info, in_dims, input, weight, bias, running_mean, running_var, residual, training,
      momentum, eps, axis, activation, backend):
    x_dim, w_dim, b_dim, rm_dim, rv_dim, z_dim = in_dims[:6]
    batch = info.batch_size
    axis %= input.dim() - (x_dim is not None)
    y, mean, invstd, rm, rv = _forward_op(
        _merge(input, x_dim, batch, axis), _flat(weight, w_dim, batch), _flat(bias, b_dim, batch),
        _flat(running_mean, rm_dim, batch), _flat(running_var, rv_dim, batch),
        _merge(residual, z_dim, batch, axis), training, momentum, eps, axis, activation,
        backend)
    per_sample = [v.view(batch, -1) for v in (mean, invstd, rm, rv)]
    return (_split(y, batch, axis), *per_sample), (0, 0, 0, 0, 0)


@_backward_op.register_vmap
def _(info, in_dims, grad, input, mean, invstd, weight, output, training, axis, activation,
      residual, backend):
    g_dim, x_dim, m_dim, s_dim, w_dim, y_dim = in_dims[:6]
    batch = info.batch_size
    axis %= input.dim() - (x_dim is not None)
    dx, dweight, dbias, dz = _backward_op(
        _merge(grad, g_dim, batch, axis), _merge(input, x_dim, batch, axis),
        _flat(mean, m_dim, batch), _flat(invstd, s_dim, batch), _flat(weight, w_dim, batch),
        _merge(output, y_dim, batch, axis), training, axis, activation, residual, backend)
    dz, z_dim = (_split(dz, batch, axis), 0) if residual else (dz, None)
    return ((_split(dx, batch, axis), dweight.view(batch, -1), dbias.view(batch, -1), dz),
            (0, 0, 0, z_dim))


# --- autograd --------------------------------------------------------------------------------
# The derivatives torch needs beyond fastbn's kernels: forward mode, and the derivative
# of the backward (double backward), as differentiable torch operations. relu's mask is
# taken from the saved output (torch's threshold_backward: the gradient passes where
# y > 0) and is a constant to every derivative (relu'' = 0).

def _reduce_dims(x, axis):
    return [d for d in range(x.dim()) if d != axis]


def _per_channel(v, x, axis):
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def _scale_and_xhat(x, mean, invstd, eps, training, axis):
    """(invstd, xhat) broadcastable over x; recomputed from x when training, so that
    their dependence on x is differentiated too."""
    if training:
        dims = _reduce_dims(x, axis)
        scale = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        return scale, (x - x.mean(dims, keepdim=True)) * scale
    scale = _per_channel(invstd, x, axis)
    return scale, (x - _per_channel(mean, x, axis)) * scale


def _masked(t, output):
    """``t`` where the relu's output is positive, else 0 (no mask without relu)."""
    return t if output is None else torch.where(output > 0, t, t.new_zeros(()))


def _gradients(dy, x, weight, mean, invstd, eps, training, axis, output, residual):
    """(dx, dweight, dbias[, dresidual]) of act(bn(x) + z), as differentiable torch
    operations; ``output`` is the saved y with relu, else None."""
    dy = _masked(dy, output)
    xf, dyf = x.to(mean.dtype), dy.to(mean.dtype)
    scale, xhat = _scale_and_xhat(xf, mean, invstd, eps, training, axis)
    dims = _reduce_dims(x, axis)
    w = _per_channel(weight.to(mean.dtype), x, axis) if weight is not None else 1.0
    if training:
        dx = scale * w * (dyf - dyf.mean(dims, keepdim=True)
                          - xhat * (dyf * xhat).mean(dims, keepdim=True))
    else:
        dx = dyf * scale * w
    return (dx.to(x.dtype), (dyf * xhat).sum(dims), dyf.sum(dims)) + ((dy,) if residual else ())


class _BatchNorm(torch.autograd.Function):
    """y = act(BN(x) + z) on fastbn's operator; its gradient on fastbn's backward operator."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, residual, training, momentum,
                eps, axis, activation, backend):
        return _forward_op(input, weight, bias, running_mean, running_var, residual, training,
                           momentum, eps, axis, activation, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _, _, _, training, _, eps, axis, activation, backend = inputs
        y, mean, invstd, new_mean, new_var = output
        ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)
        ctx.set_materialize_grads(False)  # a missing tangent is None: running stats have none
        saved_y = y if activation else None  # relu's mask
        ctx.save_for_backward(input, weight, mean, invstd, saved_y)
        ctx.save_for_forward(input, weight, mean, invstd, saved_y)
        ctx.training, ctx.eps, ctx.axis, ctx.backend = training, eps, axis % input.dim(), backend
        ctx.activation = activation

    @staticmethod
    def backward(ctx, dy, *_statistics_grads):
        if dy is None:  # y was not used
            return (None,) * 12
        input, weight, mean, invstd, output = ctx.saved_tensors
        need_x, need_w, need_b, _, _, need_z = ctx.needs_input_grad[:6]
        function = (_BatchNormBackward if torch.compiler.is_compiling()
                    else _BatchNormBackwardWithJvp)
        dx, dweight, dbias, dz = function.apply(
            dy, input, weight, mean, invstd, output, ctx.training, ctx.eps, ctx.axis,
            ctx.activation, need_z and output is not None, ctx.backend)
        if need_z and output is None:  # z's gradient without an activation: dy itself
            dz = dy
        param = weight.dtype if weight is not None else dbias.dtype
        return (dx if need_x else None, dweight.to(param) if need_w else None,
                dbias.to(param) if need_b else None, None, None, dz if need_z else None,
                None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, residual_t, *_):
        if input_t is not None and (running_mean_t is not None or running_var_t is not None):
            raise RuntimeError("batch_norm is not differentiable wrt running_mean and "
                               "running_var, they cannot have forward grad defined")
        input, weight, mean, invstd, output = ctx.saved_tensors
        axis, x = ctx.axis, input.to(mean.dtype)
        scale, xhat = _scale_and_xhat(x, mean, invstd, ctx.eps, ctx.training, axis)
        y_t = torch.zeros_like(x)
        if input_t is not None:
            x_t = input_t.to(mean.dtype)
            if ctx.training:
                dims = _reduce_dims(x, axis)
                x_t = (x_t - x_t.mean(dims, keepdim=True)
                       - xhat * (xhat * x_t).mean(dims, keepdim=True))
            w = _per_channel(weight.to(mean.dtype), x, axis) if weight is not None else 1.0
            y_t = y_t + x_t * scale * w
        if weight_t is not None:
            y_t = y_t + xhat * _per_channel(weight_t.to(mean.dtype), x, axis)
        if bias_t is not None:
            y_t = y_t + _per_channel(bias_t.to(mean.dtype), x, axis)
        if residual_t is not None:
            y_t = y_t + residual_t.to(mean.dtype)
        return _masked(y_t.to(input.dtype), output), None, None, None, None


class _BatchNormBackward(torch.autograd.Function):
    """(dx, dweight, dbias, dresidual) on fastbn's backward operator, itself
    differentiable (dresidual is empty unless ``residual``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, input, weight, mean, invstd, output, training, eps, axis, activation,
                residual, backend):
        return _backward_op(dy, input, mean, invstd, weight, output, training, axis,
                            activation, residual, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, input, weight, mean, invstd, saved_y, training, eps, axis, _, residual, _ = inputs
        ctx.save_for_backward(dy, input, weight, mean, invstd, saved_y)
        ctx.training, ctx.eps, ctx.axis, ctx.residual = training, eps, axis, residual

    @staticmethod
    def backward(ctx, ddx, ddweight, ddbias, ddresidual):
        dy, input, weight, mean, invstd, saved_y = ctx.saved_tensors
        outputs, vjp = _formula_vjp(ctx, dy, input, weight, mean, invstd, saved_y)
        cotangents = [torch.zeros_like(o) if g is None else g.to(o.dtype)
                      for o, g in zip(outputs, (ddx, ddweight, ddbias, ddresidual))]
        grads = list(vjp(tuple(cotangents))) + [None] * (weight is None)
        return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])],
                None, None, None, None, None, None, None, None, None)


def _formula_vjp(ctx, dy, input, weight, mean, invstd, saved_y):
    """torch.func.vjp of the gradient formula at (dy, input[, weight]): composes with
    torch.func transforms and with create_graph (it is differentiable itself)."""
    def gradients(dy, input, weight=None):
        return _gradients(dy, input, weight, mean, invstd, ctx.eps, ctx.training, ctx.axis,
                          saved_y, ctx.residual)
    primals = (dy, input) if weight is None else (dy, input, weight)
    return torch.func.vjp(gradients, *primals)


class _BatchNormBackwardWithJvp(_BatchNormBackward):
    """Eager twin with forward mode too (forward-over-reverse); Dynamo traces no jvp, so
    compiled code uses :class:`_BatchNormBackward`."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _BatchNormBackward.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:6])

    @staticmethod
    def jvp(ctx, dy_t, input_t, weight_t, *_):
        dy, input, weight, mean, invstd, saved_y = ctx.saved_tensors
        primals = [t for t in (dy, input, weight) if t is not None]
        tangents = [torch.zeros_like(p) if t is None else t
                    for p, t in zip(primals, (dy_t, input_t, weight_t))]

        # J t through reverse mode twice (nested forward mode is not supported): the vjp
        # u -> J^T u is linear, and its own vjp at t is J t
        outputs, vjp = _formula_vjp(ctx, dy, input, weight, mean, invstd, saved_y)
        _, vjp_of_vjp = torch.func.vjp(vjp, tuple(torch.zeros_like(o) for o in outputs))
        result = vjp_of_vjp(tuple(t.to(p.dtype) for p, t in zip(primals, tangents)))[0]
        return (*result, *(() if ctx.residual else (dy.new_zeros(0),)))


# The compiled path: Dynamo traces no autograd.Function that has a jvp, so under
# torch.compile the forward operator is called directly, with this autograd.

def _op_setup_context(ctx, inputs, output):
    _BatchNorm.setup_context(ctx, inputs, output)


def _op_backward(ctx, dy, *statistics_grads):
    return _BatchNorm.backward(ctx, dy, *statistics_grads)


torch.library.register_autograd("fastbn::batch_norm", _op_backward,
                                setup_context=_op_setup_context)


# --- public ----------------------------------------------------------------------------------

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, activation=None, residual=None,
               backend=None):
    """``torch.nn.functional.batch_norm`` computed by fastbn, differentiable.

    Same arguments, order and semantics as PyTorch's (``running_mean`` and
    ``running_var`` updated in place when training), plus fastbn's ``axis``,
    ``backend`` and fused epilogue: ``activation="relu"`` and/or ``residual=z``
    give ``relu(bn(x) + z)`` in the same pass (``z`` with ``input``'s shape and
    dtype, any memory layout), as ``F.relu(F.batch_norm(...) + z)`` would. Gradients
    flow to ``input``, ``weight``, ``bias`` and ``residual`` in reverse mode (to any
    order; relu's mask is taken from the output, as ``torch.relu``'s) and forward
    mode; ``torch.func`` transforms, ``torch.compile`` and ``torch.export`` work.
    """
    check_activation(activation)
    if input.dim() == 1 and input.numel() == 0:  # torch's (0,) input: no channels at all
        return batch_norm(input.view(0, 0), running_mean, running_var, weight, bias, training,
                          momentum, eps, axis=axis, activation=activation,
                          residual=None if residual is None else residual.view(0, 0),
                          backend=backend).view(0)
    args = (input, weight, bias, running_mean, running_var, residual, bool(training),
            float(momentum), float(eps), int(axis), activation or "", _backend_name(backend))
    apply = _forward_op if torch.compiler.is_compiling() else _BatchNorm.apply
    y, _, _, new_mean, new_var = apply(*args)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


class _FastbnBatchNorm:
    """The forward of torch's _BatchNorm, with fastbn doing the normalization (and, with
    ``activation="relu"``, the ReLU after it; ``forward(input, residual)`` adds a residual
    before the activation: ResNet's BN-add-ReLU)."""

    fastbn_backend = None
    activation = None  # modules made by convert() or unpickled from before it get None

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        check_activation(activation)
        self.activation = activation

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        # momentum and num_batches_tracked exactly as torch.nn.modules.batchnorm._BatchNorm
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None,
                          self.running_var if track else None, self.weight, self.bias,
                          use_batch_stats, factor, self.eps, activation=self.activation,
                          residual=residual, backend=self.fastbn_backend)

    def extra_repr(self):
        text = super().extra_repr()
        return text + f", activation={self.activation!r}" if self.activation else text

    def _get_name(self):  # print(model) shows which batch norms fastbn runs
        return f"fastbn.torch.{type(self).__name__}"


class BatchNorm1d(_FastbnBatchNorm, torch.nn.BatchNorm1d):
    """Drop-in ``torch.nn.BatchNorm1d`` computed by fastbn (same arguments, state, modes),
    plus the keyword ``activation=None|"relu"`` and ``forward(input, residual=None)``."""


class BatchNorm2d(_FastbnBatchNorm, torch.nn.BatchNorm2d):
    """Drop-in ``torch.nn.BatchNorm2d`` computed by fastbn (same arguments, state, modes),
    plus the keyword ``activation=None|"relu"`` and ``forward(input, residual=None)``."""


class BatchNorm3d(_FastbnBatchNorm, torch.nn.BatchNorm3d):
    """Drop-in ``torch.nn.BatchNorm3d`` computed by fastbn (same arguments, state, modes),
    plus the keyword ``activation=None|"relu"`` and ``forward(input, residual=None)``."""


_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d}


def _hooked(module):
    """Whether a hook could see (or change) the module's own output."""
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _fusable(bn, relu):
    """fastbn's BatchNorm without an activation and a plain nn.ReLU after it, neither with
    hooks that would observe the value between them."""
    return (type(bn) in _REPLACEMENTS.values() and bn.activation is None
            and type(relu) is torch.nn.ReLU and not _hooked(bn) and not _hooked(relu))


def _fuse_relus(model):
    """In every nn.Sequential (recursively): BN, ReLU -> BN(activation="relu"), Identity."""
    for child in model.children():
        _fuse_relus(child)
    if not isinstance(model, torch.nn.Sequential):
        return
    children = list(model._modules.items())
    for (_, bn), (relu_name, relu) in zip(children, children[1:]):
        if bn is not None and _fusable(bn, relu):
            bn.activation = "relu"
            setattr(model, relu_name, torch.nn.Identity())


def convert(model, *, backend=None, fuse_relu=False):
    """Swap every ``torch.nn.BatchNorm{1,2,3}d`` in ``model`` for fastbn's, in place.

    The new modules take over the old ones' parameters and buffers (the same
    tensor objects, so an optimizer built earlier keeps working) and their
    train/eval mode. Returns ``model`` (or the replacement, if ``model`` itself
    is a batch-norm module).

    ``fuse_relu=True`` also fuses each ReLU that directly follows a batch norm:
    the rule is adjacency in an ``nn.Sequential`` only (at any depth) — a
    ``BatchNorm{1,2,3}d`` at index i and an ``nn.ReLU`` (``inplace`` or not; not a
    subclass) at index i + 1 of the same Sequential become fastbn's batch norm with
    ``activation="relu"`` and an ``nn.Identity``. A ReLU called from a ``forward``
    method or as ``F.relu`` is not seen, nor a pair where either module has hooks
    (they would observe the value between the two). Parameters and state_dict keys
    are unchanged (a ReLU has none).
    """
    def replacement(module):
        cls = _REPLACEMENTS.get(type(module))
        if cls is None:
            return None
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: shared
        new.fastbn_backend = backend
        return new

    def swap(model):
        top = replacement(model)
        if top is not None:
            return top
        for name, child in list(model.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(model, name, new)
            else:
                swap(child)
        return model

    model = swap(model)
    if fuse_relu:
        _fuse_relus(model)
    return model

from ._torch_sync import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402,F401 (MPI)
