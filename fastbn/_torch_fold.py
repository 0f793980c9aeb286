"""``fastbn.torch.fold``: fold every foldable batch norm of a PyTorch model into its layer.

The adapter only finds the pairs and moves tensors; the arithmetic is
:func:`fastbn.fold`'s.
"""
import warnings

import torch

from ._fold import fold as _fold_arrays
from ._registry import ArgumentError, ArgumentTypeError

_NN = torch.nn
# The layers whose output channels a batch norm can be folded into, and the axis of
# their weight that holds those channels.
_LAYERS = ((_NN.Conv1d, 0), (_NN.Conv2d, 0), (_NN.Conv3d, 0), (_NN.Linear, 0),
           (_NN.ConvTranspose1d, 1), (_NN.ConvTranspose2d, 1), (_NN.ConvTranspose3d, 1))
# torch's batch norms; fastbn.torch.BatchNorm{1,2,3}d subclass them, so they match too.
_BATCH_NORMS = (_NN.BatchNorm1d, _NN.BatchNorm2d, _NN.BatchNorm3d, _NN.SyncBatchNorm)


def _out_axis(layer):
    for cls, axis in _LAYERS:
        if isinstance(layer, cls):
            return axis
    return None


def _out_channels(layer):
    return layer.out_features if isinstance(layer, _NN.Linear) else layer.out_channels


def _why_not(layer, bn, uses):
    """None when ``bn`` can be folded into ``layer``, else the reason."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return ("it has no running statistics (track_running_stats=False), so it normalizes "
                "with batch statistics in eval mode too")
    tensors = [layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if any(t is not None and _NN.parameter.is_lazy(t) for t in tensors):
        return "a lazy module is not initialized yet (run one forward pass first)"
    if bn.num_features != _out_channels(layer):
        return (f"its {bn.num_features} channels are not the {_out_channels(layer)} output "
                f"channels of the layer before it")
    if uses[id(layer)] > 1 or uses[id(bn)] > 1:
        return "the layer or the batch norm is used at more than one place in the model"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, bn)):
        return "the layer or the batch norm has forward hooks, which would see other values"
    return None


def _fold_pair(layer, bn):
    axis = _out_axis(layer)
    weight = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    transposed = axis == 1 and groups > 1
    if transposed:
        # (in, out/g, k...) -> (in/g, out, k...): output channel g*(out/g)+j on axis 1
        w = weight.unflatten(0, (groups, -1)).movedim(0, 1)
        grouped_shape = w.shape
        weight = w.flatten(1, 2)
    new_w, new_b = _fold_arrays(
        weight, None if layer.bias is None else layer.bias.detach(), bn.running_mean,
        bn.running_var, None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(), eps=bn.eps, axis=axis)
    if transposed:
        new_w = new_w.unflatten(1, grouped_shape[1:3]).movedim(1, 0).flatten(0, 1)
    with torch.no_grad():
        layer.weight.copy_(new_w)  # the same Parameter: its memory format and any optimizer
        if layer.bias is None:
            layer.bias = _NN.Parameter(new_b, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(new_b)


def fold(model):
    """Fold each inference-mode batch norm into the layer before it; returns ``model``.

    For every ``torch.nn.Sequential`` in ``model`` (``model`` itself, nested
    ones, and those inside any child module), each ``Conv{1,2,3}d``,
    ``ConvTranspose{1,2,3}d`` or ``Linear`` directly followed by a batch norm —
    ``torch.nn.BatchNorm{1,2,3}d``, ``SyncBatchNorm`` or
    ``fastbn.torch.BatchNorm{1,2,3}d`` — gets the batch norm's affine transform
    folded into its weight and bias by :func:`fastbn.fold` (a bias is created
    for a layer without one), and the batch norm is replaced by
    ``torch.nn.Identity``. The eval-mode output is unchanged up to rounding;
    the model gets faster (one pass less per folded pair).

    Parameters
    ----------
    model : torch.nn.Module
        A model in eval mode (``model.eval()``), every submodule included.

    Returns
    -------
    torch.nn.Module
        ``model``, **modified in place** (as ``torch.ao.quantization.fuse_modules``
        with ``inplace=True``): the folded layers keep their ``Parameter`` objects,
        whose values change, and the batch norms are gone. Deep-copy the model
        first to keep the original. A folded model no longer trains as the
        original would: fold for inference only.

    Raises
    ------
    ArgumentTypeError
        ``model`` is not a ``torch.nn.Module``.
    ArgumentError
        ``model`` or one of its submodules is in training mode.

    Notes
    -----
    The rule for "the layer's output feeds only the batch norm" is adjacency in
    an ``nn.Sequential`` (one whose ``forward`` is ``nn.Sequential``'s): module
    ``i`` feeds module ``i + 1`` and nothing else. Pairs in other containers, or
    connected in a custom ``forward``, are left alone (trace the model with
    ``torch.fx`` for those). A ``Linear`` followed by ``BatchNorm1d`` is folded
    for 2-D ``(N, features)`` inputs, the only ones on which that batch norm
    normalizes the layer's output features. A pair is left alone, with a
    ``UserWarning`` saying why, when the batch norm tracks no running statistics
    (it normalizes with batch statistics even in eval mode), when its channels
    are not the layer's output channels, when the layer or the batch norm appears
    at more than one place in the model, when either has forward hooks, or while
    a lazy module is uninitialized.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                             torch.nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> before = model(x)
    >>> model = fastbn.torch.fold(model)
    >>> model[1]
    Identity()
    >>> torch.allclose(model(x), before, atol=1e-5)
    True
    """
    if not isinstance(model, _NN.Module):
        raise ArgumentTypeError(f"model: expected a torch.nn.Module, got "
                                f"{type(model).__module__}.{type(model).__qualname__}")
    training = [name or "model" for name, m in model.named_modules() if m.training]
    if training:
        raise ArgumentError(f"model: fold needs a model in eval mode (call model.eval() "
                            f"first); in training mode: {', '.join(training[:3])}"
                            + (f" and {len(training) - 3} more" if len(training) > 3 else ""))
    uses = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, _NN.Sequential) or type(seq).forward is not _NN.Sequential.forward:
            continue
        children = list(seq.named_children())
        for (_, layer), (bn_name, bn) in zip(children, children[1:]):
            if _out_axis(layer) is None or not isinstance(bn, _BATCH_NORMS):
                continue
            path = f"{seq_name}.{bn_name}" if seq_name else bn_name
            reason = _why_not(layer, bn, uses)
            if reason is not None:
                warnings.warn(f"fastbn.torch.fold: batch norm {path!r} ({type(bn).__name__}) "
                              f"not folded: {reason}", UserWarning, stacklevel=2)
                continue
            _fold_pair(layer, bn)
            setattr(seq, bn_name, _NN.Identity())
    return model
