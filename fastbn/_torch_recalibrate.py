"""``fastbn.torch.recalibrate``: exact population statistics for a model's batch norms.

The adapter only finds the layers and moves tensors: the statistics are
:class:`fastbn.PopulationStats`' (fastbn's stats kernel, Chan's merge).
"""
import torch

from ._population import PopulationStats
from ._registry import ArgumentError, ArgumentTypeError
from ._validate import check_optional_positive_int, check_population_count

# torch's batch norms; fastbn.torch's subclass them (SyncBatchNorm included).
_BATCH_NORM = torch.nn.modules.batchnorm._BatchNorm


def _first_tensor(batch):
    """What a loader yields: a tensor, or a list/tuple whose first item is the input
    (as torch.optim.swa_utils.update_bn reads it)."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def recalibrate(model, loader, *, num_batches=None, device=None, comm=None):
    """Set every batch norm's running statistics to the exact population statistics.

    "Precise BN" (detectron2's ``update_bn_stats``, pycls): runs ``model`` in training
    mode over ``loader`` and records, for every batch-norm layer, the exact mean and
    unbiased variance of all the values reaching it (merged across batches with
    Chan's formula, not averaged per batch as ``torch.optim.swa_utils.update_bn``
    does), then stores them as ``running_mean``/``running_var``. The running
    statistics are not touched during the pass (momentum 0), and the model's mode,
    momenta and ``num_batches_tracked`` are restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Holds torch or fastbn.torch batch norms with ``track_running_stats=True``.
    loader : iterable
        Yields input tensors, or lists/tuples whose first item is the input.
    num_batches : int, optional
        Stop after this many batches (default: the whole loader).
    device : torch.device or str, optional
        Move each input there first.
    comm : mpi4py communicator, optional
        Merge the statistics of every rank (data-parallel recalibration).

    Returns
    -------
    dict
        ``{layer name: PopulationStats}`` for every recalibrated layer.
    """
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_optional_positive_int(num_batches, "num_batches")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, _BATCH_NORM) and m.track_running_stats}
    if not layers:
        raise ArgumentError("model: has no batch norm with running statistics to recalibrate")
    stats = {name: PopulationStats(m.num_features, axis=getattr(m, "axis", 1))
             for name, m in layers.items()}
    saved = {name: (m.momentum, m.num_batches_tracked.clone()) for name, m in layers.items()}
    was_training = model.training

    def recorder(name):
        def hook(module, args):
            stats[name].update(args[0].detach())
        return hook

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in layers.items()]
    try:
        for m in layers.values():
            m.momentum = 0.0  # batch statistics in the pass, running statistics untouched
        model.train()
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            x = _first_tensor(batch)
            model(x if device is None else x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for name, m in layers.items():
            m.momentum = saved[name][0]
            m.num_batches_tracked.copy_(saved[name][1])
        model.train(was_training)
    if comm is not None:
        for s in stats.values():
            s.allreduce(comm)
    for name, m in layers.items():
        check_population_count(stats[name].count, "loader")
    for name, m in layers.items():  # written only once every layer is known to be fine
        m.running_mean.copy_(torch.from_numpy(stats[name].mean))
        m.running_var.copy_(torch.from_numpy(stats[name].var))
    return stats
