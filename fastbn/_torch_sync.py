"""fastbn.torch.SyncBatchNorm: torch.nn.SyncBatchNorm's module over MPI (mpi4py) ranks.

The module mirrors ``torch.nn.SyncBatchNorm`` (constructor, parameters, buffers,
state_dict keys, ``num_batches_tracked``, ``momentum=None``, repr,
``convert_sync_batchnorm``) with ``comm=`` (an mpi4py communicator) in place of
``process_group``. Its training passes run :mod:`fastbn.distributed`'s synchronized
forward and backward (one collective each); eval mode is fastbn.torch's BatchNorm.

Gradients follow torch's SyncBatchNorm: ``input``'s gradient is computed from the
whole batch's sums, while ``weight`` and ``bias`` get this rank's own share
(``sum(dy * xhat)`` and ``sum(dy)`` over this rank's part); their sum over the ranks
is the whole batch's gradient, which DistributedDataParallel's gradient all-reduce
forms (it averages: torch's convention assumes the loss is averaged the same way).

It derives from torch's ``_BatchNorm``, not from ``nn.SyncBatchNorm``: DDP refuses
modules that are ``nn.SyncBatchNorm`` instances on the CPU, and this one runs there.
Eager mode only (an MPI collective is no graph operation for torch.compile).
"""
import torch

from . import distributed
from .torch import _FastbnBatchNorm, _like

_BatchNormBase = torch.nn.modules.batchnorm._BatchNorm


class _SyncBatchNorm(torch.autograd.Function):
    """y = act(BN(x) + z) with the whole batch's statistics; once differentiable."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, residual, momentum, eps,
                activation, backend, comm):
        y = torch.empty_like(input)  # input's memory format, as torch
        _, mean, invstd = distributed.sync_batch_norm_forward(
            input, weight, bias, running_mean=running_mean, running_var=running_var,
            momentum=momentum, eps=eps, activation=activation, residual=residual, out=y,
            backend=backend, comm=comm)
        ctx.save_for_backward(input, weight, mean, invstd, y if activation else None)
        ctx.activation, ctx.backend, ctx.comm = activation, backend, comm
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        input, weight, mean, invstd, y = ctx.saved_tensors
        masked = ctx.has_residual and ctx.activation is not None
        # every rank reaches this collective: dx needs the whole batch's sums
        result = distributed._sync_backward(
            dy, input, mean, invstd, weight, True, 1, ctx.activation, y, masked, ctx.backend,
            ctx.comm, local_parameter_grads=True)
        dx, dweight, dbias = result[:3]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dz = None
        if ctx.has_residual:  # relu's masked dy, or dy itself
            dz = _like(result[3], input) if masked else dy
        param = weight.dtype if weight is not None else dbias.dtype
        return (_like(dx, input) if need_x else None, dweight.to(param) if need_w else None,
                dbias.to(param) if need_b else None, None, None, dz,
                None, None, None, None, None)


class SyncBatchNorm(_FastbnBatchNorm, _BatchNormBase):
    r"""``torch.nn.SyncBatchNorm`` over MPI ranks (mpi4py), computed by fastbn.

    Same constructor, parameters, buffers, state_dict keys and modes as torch's,
    with ``comm`` (an mpi4py intracommunicator; default ``MPI.COMM_WORLD``, looked up
    at the first training call) in place of ``process_group``; plus fastbn's
    ``activation=None|"relu"``, ``forward(input, residual=None)`` and ``backend``.

    In training mode every rank of ``comm`` calls the module on its part of the
    batch (any size, an empty part included) and the whole batch's statistics
    normalize each part and update the running statistics, identically on every
    rank; this is always synchronized, also with one rank (torch falls back to
    local batch norm when torch.distributed is not initialized; here a process
    started without ``mpiexec`` is an MPI world of one, which gives the same
    result). Eval mode communicates nothing, as torch's. Gradients: ``input``'s
    from the whole batch, ``weight``'s and ``bias``'s this rank's own share, as
    torch's SyncBatchNorm (sum them over the ranks, e.g. with DDP, for the whole
    batch's).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, device=None, dtype=None, *, bias=True,
                 activation=None, backend=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias, activation=activation)
        self.comm = None if comm is None else distributed.communicator(comm)
        self.fastbn_backend = backend

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input, residual=None):
        if not self.training:  # no synchronization in eval mode, as torch
            return super().forward(input, residual)
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        # momentum and num_batches_tracked exactly as torch.nn.SyncBatchNorm
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        running = ((self.running_mean, self.running_var) if self.track_running_stats
                   else (None, None))  # updated in place by the forward
        return _SyncBatchNorm.apply(input, self.weight, self.bias, *running, residual,
                                    float(factor), float(self.eps), self.activation,
                                    self.fastbn_backend, self.comm)

    @classmethod
    def convert_sync_batchnorm(cls, module, comm=None):
        """Replace every batch-norm module in ``module`` (torch's ``BatchNorm*d`` and
        ``SyncBatchNorm``, fastbn.torch's) with this class, recursively.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new modules take the
        old ones' parameters and buffers (the same tensors, so ``requires_grad`` and an
        optimizer built earlier carry over) and training flag; fastbn.torch modules
        also keep their ``activation`` and backend. Returns the converted module
        (``module`` itself unless it is a batch norm).
        """
        output = module
        if isinstance(module, _BatchNormBase):
            output = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, comm, bias=module.bias is not None,
                         activation=getattr(module, "activation", None),
                         backend=getattr(module, "fastbn_backend", None))
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, comm))
        return output


def convert_sync_batchnorm(module, comm=None):
    """:meth:`SyncBatchNorm.convert_sync_batchnorm`: every batch-norm module in
    ``module`` becomes a :class:`SyncBatchNorm` over ``comm``."""
    return SyncBatchNorm.convert_sync_batchnorm(module, comm)
