"""PyTorch adapter: fastbn batch norm with autograd, and drop-in BatchNorm modules.

    import fastbn.torch
    y = fastbn.torch.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    model = fastbn.torch.convert(model)      # every nn.BatchNorm*d now runs on fastbn

Tensors reach fastbn through DLPack without a copy (CPU tensors as NumPy arrays,
CUDA tensors as CuPy arrays); running statistics are updated in place like
PyTorch's. torch is imported when this module is, never by ``import fastbn``.
"""
import torch

from . import _api


class _BatchNormFunction(torch.autograd.Function):
    """y = BN(x) with fastbn's forward; backward is fastbn.batch_norm_backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                axis, backend):
        y, mean, invstd = _api.batch_norm_forward(
            x, weight, bias, running_mean=running_mean, running_var=running_var, training=training,
            momentum=momentum, eps=eps, axis=axis, backend=backend)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training, ctx.axis, ctx.backend = training, axis, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _api.batch_norm_backward(
            dy, x, mean, invstd, weight=weight, training=ctx.training, axis=ctx.axis,
            backend=ctx.backend)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None,
                dweight.to(weight.dtype) if need_w else None,
                dbias.to(weight.dtype if weight is not None else dbias.dtype) if need_b else None,
                None, None, None, None, None, None, None)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, backend=None):
    """``torch.nn.functional.batch_norm`` computed by fastbn, differentiable.

    Same arguments, order and semantics as PyTorch's (``running_mean`` and
    ``running_var`` updated in place when training), plus fastbn's ``axis``
    and ``backend``. Gradients flow to ``input``, ``weight`` and ``bias``.
    """
    return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                    bool(training), float(momentum), float(eps), axis, backend)


class _FastbnBatchNorm:
    """The forward of torch's _BatchNorm, with fastbn doing the normalization."""

    def forward(self, input):
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
                          use_batch_stats, factor, self.eps, backend=self.fastbn_backend)


class BatchNorm1d(_FastbnBatchNorm, torch.nn.BatchNorm1d):
    """Drop-in ``torch.nn.BatchNorm1d`` computed by fastbn (same arguments, state, modes)."""

    fastbn_backend = None


class BatchNorm2d(_FastbnBatchNorm, torch.nn.BatchNorm2d):
    """Drop-in ``torch.nn.BatchNorm2d`` computed by fastbn (same arguments, state, modes)."""

    fastbn_backend = None


class BatchNorm3d(_FastbnBatchNorm, torch.nn.BatchNorm3d):
    """Drop-in ``torch.nn.BatchNorm3d`` computed by fastbn (same arguments, state, modes)."""

    fastbn_backend = None


_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d}


def convert(model, *, backend=None):
    """Swap every ``torch.nn.BatchNorm{1,2,3}d`` in ``model`` for fastbn's, in place.

    The new modules take over the old ones' parameters and buffers (the same
    tensor objects, so an optimizer built earlier keeps working) and their
    train/eval mode. Returns ``model`` (or the replacement, if ``model`` itself
    is a batch-norm module).
    """
    def replacement(module):
        cls = _REPLACEMENTS.get(type(module))
        if cls is None:
            return None
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: shared
        new.fastbn_backend = backend
        return new

    top = replacement(model)
    if top is not None:
        return top
    for name, child in list(model.named_children()):
        new = replacement(child)
        if new is not None:
            setattr(model, name, new)
        else:
            convert(child, backend=backend)
    return model
