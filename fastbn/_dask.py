"""Batch normalization of Dask arrays: a graph of fastbn calls on chunks.

:func:`fastbn.batch_norm_forward`, :func:`fastbn.batch_norm` and
:func:`fastbn.batch_norm_backward` hand a ``dask.array.Array`` here (fastbn._api tells
one by its type's module, so ``import fastbn`` never imports dask). For ``x`` chunked
along any axes, the layers of the graph, named ``fastbn-<kind>-<token>``, are:

training forward
    ``stats``          one task per chunk: the chunk's Moments (count, mean, m2) from
                       fastbn's stats kernel;
    ``merge-stats``    a tree per channel block (chunks along the channel axis are
                       separate blocks), :data:`SPLIT_EVERY` parts a task, Chan's merge;
    ``normalize``      one task per chunk: the chunk normalized with its block's merged
                       statistics, handed in by a Sync that never reads the chunk again;
    ``statistics``     one task per channel block: the whole batch's mean and invstd.
training backward
    ``backward-reduce`` one task per chunk: the chunk's (count, sum_dy, sum_dy_xmu);
    ``backward-sums``   a tree per channel block adding them;
    ``backward-elemt``  one task per chunk: dx from the whole batch's sums;
    ``gradients``       one task per channel block: dweight and dbias.
inference
    ``normalize`` / ``backward`` one task per chunk; the backward adds the chunks'
    dweight and dbias in a ``gradient-sums`` tree.

So every chunk is read twice at most (statistics then normalize; reduce then elemt)
and no task receives more than one chunk of any array. Each task is a plain fastbn
call on NumPy chunks through fastbn._api, with a Sync handing it the whole batch's
values, so the math lives in one place (fastbn._api, fastbn._merge). Task functions
are module-level: dask.distributed pickles them to its workers.

Running statistics (training, given): a task on a dask.distributed worker cannot
write into the caller's NumPy arrays, so the statistics pass runs at call time (one
``compute`` of the C-sized merged statistics: the first read of x), the running
statistics are updated before the call returns, and ``y`` stays lazy with those
statistics as constants of its graph (its normalize tasks are the second read).
Without running statistics nothing runs until a result is computed.
"""
import math
import operator

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from . import _registry
from ._api import (_FLOATS, BackwardResult, ForwardResult, ResidualBackwardResult, Sync,
                   backward_any_array, forward_any_array, local_backward_sums,
                   local_moments)
from ._merge import Moments, merge_all
from ._registry import ArgumentError, ArgumentTypeError
from ._validate import (STAT_DTYPE, Canonical, channel_vector, check_activation, check_axis,
                        check_eps, check_flag, check_float, check_like_x, check_momentum,
                        check_saved_output, check_training_count, name_of,
                        required_channel_vector, running_stats)

SPLIT_EVERY = 8  # parts combined by one task of a reduction tree (dask's own default is 4-32)


# --- Syncs of one chunk -------------------------------------------------------------

class _GivenStats(Sync):
    """The whole batch's Moments, computed by earlier tasks: the chunk is not read for them."""

    def __init__(self, moments):
        self.moments = moments

    def stats(self, local):
        return self.moments


class _GivenSums(Sync):
    """The whole batch's (count, sum_dy, sum_dy_xmu), computed by earlier tasks."""

    def __init__(self, sums):
        self.whole_batch_sums = sums

    def sums(self, local):
        return self.whole_batch_sums


# --- task functions (module-level: pickled to dask.distributed workers) -------------------

def _empty_part(c, dtype):
    """A part of the batch holding no values: a fastbn call on it computes only the
    per-channel results (statistics, gradients, running statistics) from a Sync's."""
    return np.empty((0, c), dtype)


def _whole_batch_statistics(moments, c, dtype, eps, backend, running_mean=None,
                            running_var=None, momentum=0.1):
    """(mean, invstd) of the whole batch from its Moments, updating the running statistics
    when given: fastbn's own forward on an empty part, so the formulas are its."""
    result = forward_any_array(_empty_part(c, dtype), None, None, running_mean, running_var,
                               True, momentum, eps, 1, None, None, None, backend,
                               _GivenStats(moments))
    return result.mean, result.invstd


def _forward_chunk(x, weight, bias, running_mean, running_var, moments, residual, eps, axis,
                   activation, backend):
    """y of one chunk: with the whole batch's ``moments`` (training) or the running
    statistics (inference, ``moments`` None)."""
    training = moments is not None
    sync = _GivenStats(moments) if training else None
    return forward_any_array(x, weight, bias, running_mean, running_var, training, 0.1, eps,
                             axis, activation, residual, None, backend, sync).y


def _concat_moments(parts):
    """The Moments of every channel block side by side (each block saw every value of its
    channels, so they share one count)."""
    return Moments(parts[0].count, np.concatenate([p.mean for p in parts]),
                   np.concatenate([p.m2 for p in parts]))


def _chunk_sums(dy, x, mean, invstd, axis, activation, y, backend):
    """(count, sum_dy, sum_dy_xmu) of one chunk."""
    return local_backward_sums(dy, x, mean, invstd, axis, activation, y, backend)


def _add_parts(parts):
    """Elementwise sum of tuples of counts and (C,) vectors (new arrays: inputs untouched)."""
    return tuple(sum(column[1:], column[0]) for column in zip(*parts))


def _chunk_gradient(dy, x, mean, invstd, weight, sums, axis, activation, y, residual,
                    backend):
    """batch_norm_backward's result for one chunk: dx from the whole batch's ``sums``
    (training), or the inference gradient with this chunk's dweight and dbias (``sums``
    None)."""
    training = sums is not None
    sync = _GivenSums(sums) if training else None
    return backward_any_array(dy, x, mean, invstd, weight, training, axis, activation, y,
                              residual, backend, sync)


def _whole_batch_gradients(sums, mean, invstd, c, dtype, backend):
    """(dweight, dbias) of the whole batch from its sums: fastbn's own backward on an
    empty part."""
    empty = _empty_part(c, dtype)
    result = backward_any_array(empty, empty, mean, invstd, None, True, 1, None, None, False,
                                backend, _GivenSums(sums))
    return result.dweight, result.dbias


# --- checks on a Dask array's metadata ------------------------------------------------------

def _is_dask(a):
    return isinstance(a, da.Array)


def _meta(a):
    """A NumPy stand-in with a Dask array's shape and dtype over one element of memory, for
    fastbn's validators (they read shapes and dtypes, never values); other values as given."""
    return np.broadcast_to(np.zeros((), a.dtype), a.shape) if _is_dask(a) else a


def _meta_view(x, axis):
    """x's canonical (O, C, I) view for the validators, over no data; the checks of
    fastbn._validate.canonical on the Dask array's metadata."""
    if not isinstance(x._meta, np.ndarray):
        raise ArgumentTypeError(f"x: expected a Dask array of NumPy chunks, got chunks of "
                                f"{type(x._meta).__module__}.{type(x._meta).__qualname__}")
    check_float(x, "x")
    if x.ndim < 2:
        raise ArgumentError(f"x: expected an array of rank >= 2 (N, C, ...), got shape {x.shape}")
    axis = check_axis(axis, x.ndim)
    if any(math.isnan(s) for s in x.shape):
        raise ArgumentError(f"x: expected known chunk sizes, got shape {x.shape}; call "
                            f"x.compute_chunk_sizes() first")
    shape = tuple(int(s) for s in x.shape)
    o, c, i = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    return Canonical(np.broadcast_to(np.zeros((), x.dtype), (o, c, i)), shape, axis, False, np)


def _channel_blocks(v, name, view, dtypes, chunks, required=False):
    """A per-channel argument, checked, as a Dask array chunked like x's channel axis
    (None stays None). A NumPy array is copied: the graph keeps its values of now, as a
    call on NumPy data would use them (a training loop goes on updating running stats)."""
    check = required_channel_vector if required else channel_vector
    check(_meta(v), name, view, dtypes, None)
    if v is None:
        return None
    if _is_dask(v):
        return v.rechunk((chunks,))
    return da.from_array(np.array(v), chunks=(chunks,))


def _like_x_blocks(a, name, view, chunks):
    """An argument shaped like x, checked, as a Dask array chunked like x (a NumPy array is
    wrapped, not copied)."""
    check_like_x(_meta(a), name, view)
    return a.rechunk(chunks) if _is_dask(a) else da.from_array(a, chunks=chunks)


def _task_backend(backend, view):
    """The backend request the tasks carry: the call's, else the caller's ``use_backend``
    (a context variable, which worker threads and processes do not see). Resolved now, so
    that an unknown or unavailable backend fails before any graph is built."""
    requested = backend if backend is not None else _registry._requested.get()
    if requested is not None:
        _registry.candidates("cpu", name_of(view.x3.dtype), view.family, requested)
    return requested


# --- the graph ---------------------------------------------------------------------------

class _Graph:
    """The layers of one fastbn call over those of its Dask inputs."""

    def __init__(self, inputs, *token_parts):
        self.token = tokenize(*token_parts)
        self.layers, self.dependencies = {}, {}
        for a in inputs:
            if a is not None:
                graph = a.__dask_graph__()
                self.layers.update(graph.layers)
                self.dependencies.update(graph.dependencies)

    def name(self, kind):
        return f"fastbn-{kind}-{self.token}"

    def add(self, name, tasks, *after):
        """Add layer ``name``; ``after``: the Dask arrays and layer names it reads."""
        needs = set()
        for a in after:
            if _is_dask(a):
                needs.update(a.__dask_layers__())
            elif a is not None:
                needs.add(a)
        self.dependencies[name] = (needs & self.layers.keys()) - {name}
        self.layers[name] = MaterializedLayer(tasks)

    def array(self, name, chunks, meta):
        return da.Array(HighLevelGraph(dict(self.layers), dict(self.dependencies)), name,
                        chunks, meta=meta)

    def compute(self, key):
        """The value of one key, on the scheduler in use (a dask.distributed Client's)."""
        graph = HighLevelGraph(dict(self.layers), dict(self.dependencies))
        return Delayed(key, graph, layer=key).compute()

    def per_block(self, kind, task, *after, blocks):
        """A layer of one task per block index (``task(index) -> task tuple``)."""
        name = self.name(kind)
        self.add(name, {(name, *index): task(index) for index in blocks}, *after)
        return name

    def tree(self, kind, combine, leaves, *after):
        """Per channel block ``j``, a tree of ``combine`` tasks of SPLIT_EVERY parts over the
        keys ``leaves[j]``; returns ``{j: root key}`` (a block's only leaf is its root)."""
        name, tasks, roots = self.name(kind), {}, {}
        for j, keys in leaves.items():
            level = 0
            while len(keys) > 1:
                groups = [keys[g:g + SPLIT_EVERY] for g in range(0, len(keys), SPLIT_EVERY)]
                keys = [(name, j, level, g) for g in range(len(groups))]
                tasks.update((key, (combine, group)) for key, group in zip(keys, groups))
                level += 1
            roots[j] = keys[0]
        self.add(name, tasks, *after)
        return roots


def _key(a, index):
    return None if a is None else (a.name, *index)


def _leaves_by_channel_block(name, blocks, axis):
    """``{j: [keys of layer name's blocks in channel block j]}``, in block order."""
    leaves = {}
    for index in blocks:
        leaves.setdefault(index[axis], []).append((name, *index))
    return leaves


def _pick(graph, kind, source_keys, item, *after):
    """A layer of ``source[item]`` per key of ``source_keys`` ({index: key})."""
    name = graph.name(kind)
    graph.add(name, {(name, *index): (operator.getitem, key, item)
                     for index, key in source_keys.items()}, *after)
    return name


def _vector_meta(dtype):
    return np.empty((0,), STAT_DTYPE[name_of(np.dtype(dtype))])


def _as_channel_array(v, chunks):
    return da.from_array(v, chunks=(chunks,))


# --- forward -----------------------------------------------------------------------------

def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
            activation, residual, out, backend):
    """:func:`fastbn.batch_norm_forward` of a Dask ``x``: a ForwardResult of Dask arrays."""
    view = _meta_view(x, axis)
    training = check_flag(training, "training")
    eps = check_eps(eps)
    check_activation(activation)
    dtype = name_of(x.dtype)
    stat = STAT_DTYPE[dtype]
    axis, cchunks = view.axis, x.chunks[view.axis]
    weight = _channel_blocks(weight, "weight", view, {dtype, stat}, cchunks)
    bias = _channel_blocks(bias, "bias", view, {dtype, stat}, cchunks)
    running_stats(running_mean, running_var, view, {dtype, stat}, training)
    updates = training and running_mean is not None
    if updates:
        momentum = check_momentum(momentum)
    if training:
        check_training_count(view)
    if out is not None:
        raise ArgumentTypeError(f"out: expected None for a Dask x (Dask arrays are immutable; "
                                f"write y with dask.array.store), got "
                                f"{type(out).__module__}.{type(out).__qualname__}")
    if residual is not None:
        residual = _like_x_blocks(residual, "residual", view, x.chunks)
    backend = _task_backend(backend, view)
    if x.size == 0:  # no data: fastbn's NumPy answer (NaN or running statistics), stats untouched
        y, mean, invstd = forward_any_array(np.empty(view.shape, x.dtype), None, None,
                                            running_mean, running_var, training, momentum, eps,
                                            axis, None, None, None, backend)
        return ForwardResult(da.from_array(y, chunks=x.chunks),
                             _as_channel_array(mean, cchunks), _as_channel_array(invstd, cchunks))

    running = ()  # inference: the running statistics as Dask arrays the tasks read
    if not training:
        mean, invstd = forward_any_array(_empty_part(view.x3.shape[1], x.dtype), None, None,
                                         running_mean, running_var, False, momentum, eps, 1,
                                         None, None, None, backend)[1:]
        mean, invstd = _as_channel_array(mean, cchunks), _as_channel_array(invstd, cchunks)
        running = tuple(_channel_blocks(v, name, view, {dtype, stat}, cchunks)
                        for v, name in ((running_mean, "running_mean"),
                                        (running_var, "running_var")))
    blocks = list(np.ndindex(*x.numblocks))
    graph = _Graph((x, weight, bias, residual, *running), "forward", x, weight, bias,
                   running_mean, running_var, training, momentum, eps, axis, activation,
                   residual, getattr(backend, "name", backend))
    if training:
        stats = graph.per_block("stats", lambda i: (local_moments, (x.name, *i), axis, backend),
                                x, blocks=blocks)
        moments_of = graph.tree("merge-stats", merge_all,
                                _leaves_by_channel_block(stats, blocks, axis), stats)
        if updates:
            mean, invstd, moments_of = _statistics_now(graph, moments_of, cchunks, x.dtype, eps,
                                                       backend, running_mean, running_var,
                                                       momentum)
        else:
            mean, invstd = _statistics_later(graph, moments_of, cchunks, x.dtype, eps, backend)
        running_mean = running_var = None
    else:
        moments_of = dict.fromkeys(range(len(cchunks)))
        running_mean, running_var = running

    def normalize(i):
        j = i[axis:axis + 1]
        return (_forward_chunk, (x.name, *i), _key(weight, j), _key(bias, j),
                _key(running_mean, j), _key(running_var, j), moments_of[i[axis]],
                _key(residual, i), eps, axis, activation, backend)

    y = graph.per_block("normalize", normalize, x, weight, bias, residual, *running,
                        *_moment_layers(graph), blocks=blocks)
    return ForwardResult(graph.array(y, x.chunks, np.empty((0,) * x.ndim, x.dtype)), mean,
                         invstd)


def _moment_layers(graph):
    """The layers a block's Moments may come from (a block of one chunk: its stats task)."""
    return graph.name("stats"), graph.name("merge-stats"), graph.name("given-stats")


def _statistics_now(graph, moments_of, cchunks, dtype, eps, backend, running_mean, running_var,
                    momentum):
    """Compute the whole batch's Moments now (the first read of x, at most SPLIT_EVERY
    C-sized results a task), update the running statistics; returns (mean, invstd, {j: key
    of block j's Moments}) with the Moments in the graph as constants."""
    gather = graph.name("gather-stats")
    graph.add(gather, {gather: (_concat_moments, [moments_of[j] for j in range(len(cchunks))])},
              *_moment_layers(graph))
    moments = graph.compute(gather)
    mean, invstd = _whole_batch_statistics(moments, sum(cchunks), dtype, eps, backend,
                                           running_mean, running_var, momentum)
    given, ends = graph.name("given-stats"), np.cumsum((0,) + cchunks)
    graph.add(given, {(given, j): (Moments, moments.count, moments.mean[start:end],
                                   moments.m2[start:end])
                      for j, (start, end) in enumerate(zip(ends[:-1], ends[1:]))})
    return (_as_channel_array(mean, cchunks), _as_channel_array(invstd, cchunks),
            {j: (given, j) for j in range(len(cchunks))})


def _statistics_later(graph, moments_of, cchunks, dtype, eps, backend):
    """Lazy (mean, invstd) of the whole batch, one task per channel block."""
    name = graph.per_block(
        "statistics",
        lambda j: (_whole_batch_statistics, moments_of[j[0]], cchunks[j[0]], dtype, eps, backend),
        *_moment_layers(graph), blocks=[(j,) for j in range(len(cchunks))])
    return _split_pair(graph, name, ("mean", "invstd"), cchunks, dtype)


def _split_pair(graph, name, kinds, cchunks, dtype):
    """Two channel arrays (layers named by ``kinds``) from layer ``name``'s per-block pairs
    of (C_j,) vectors."""
    pairs = {(j,): (name, j) for j in range(len(cchunks))}
    return tuple(graph.array(_pick(graph, kind, pairs, item, name), (cchunks,),
                             _vector_meta(dtype))
                 for item, kind in enumerate(kinds))


# --- backward ----------------------------------------------------------------------------

def backward(dy, x, mean, invstd, weight, training, axis, activation, y, residual, backend):
    """:func:`fastbn.batch_norm_backward` of a Dask ``x``: a BackwardResult (or
    ResidualBackwardResult) of Dask arrays."""
    view = _meta_view(x, axis)
    training = check_flag(training, "training")
    relu = check_activation(activation)
    residual = check_flag(residual, "residual")
    dtype = name_of(x.dtype)
    stat = STAT_DTYPE[dtype]
    axis, cchunks = view.axis, x.chunks[view.axis]
    dy = _like_x_blocks(dy, "dy", view, x.chunks)
    check_saved_output(_meta(y), relu, view)
    if y is not None:
        y = _like_x_blocks(y, "y", view, x.chunks)
    mean = _channel_blocks(mean, "mean", view, _FLOATS, cchunks, required=True)
    invstd = _channel_blocks(invstd, "invstd", view, _FLOATS, cchunks, required=True)
    weight = _channel_blocks(weight, "weight", view, {dtype, stat}, cchunks)
    backend = _task_backend(backend, view)
    if x.size == 0:  # no data: fastbn's NumPy answer (empty dx, zero gradients)
        empty, c = np.empty(view.shape, x.dtype), view.x3.shape[1]
        result = backward_any_array(empty, empty, np.zeros(c, stat), np.ones(c, stat), None,
                                    training, axis, activation, empty if relu else None,
                                    residual, backend)
        return type(result)(da.from_array(result.dx, chunks=x.chunks),
                            *(_as_channel_array(v, cchunks) for v in result[1:3]),
                            *((dy,) if residual else ()))

    blocks = list(np.ndindex(*x.numblocks))
    channel_blocks = [(j,) for j in range(len(cchunks))]
    graph = _Graph((dy, x, mean, invstd, weight, y), "backward", dy, x, mean, invstd, weight,
                   training, axis, activation, y, residual, getattr(backend, "name", backend))
    arrays = (dy, x, mean, invstd, weight, y)

    def chunk_inputs(i):
        j = i[axis:axis + 1]
        return (dy.name, *i), (x.name, *i), _key(mean, j), _key(invstd, j)

    if training:
        reduce = graph.per_block(
            "backward-reduce",
            lambda i: (_chunk_sums, *chunk_inputs(i), axis, activation, _key(y, i), backend),
            *arrays, blocks=blocks)
        sums_of = graph.tree("backward-sums", _add_parts,
                             _leaves_by_channel_block(reduce, blocks, axis), reduce)
        gradients = graph.per_block(
            "gradients",
            lambda j: (_whole_batch_gradients, sums_of[j[0]], _key(mean, j), _key(invstd, j),
                       cchunks[j[0]], x.dtype, backend),
            reduce, graph.name("backward-sums"), mean, invstd, blocks=channel_blocks)
    else:
        sums_of = dict.fromkeys(range(len(cchunks)))
    sums_layers = (graph.name("backward-reduce"), graph.name("backward-sums"))
    chunk = graph.per_block(
        "backward-elemt" if training else "backward",
        lambda i: (_chunk_gradient, *chunk_inputs(i), _key(weight, i[axis:axis + 1]),
                   sums_of[i[axis]], axis, activation, _key(y, i), residual, backend),
        *arrays, *sums_layers, blocks=blocks)
    chunk_results = {i: (chunk, *i) for i in blocks}
    if not training:  # dweight and dbias: the chunks' own, added
        partial = _pick(graph, "partial-gradients", chunk_results, slice(1, 3), chunk)
        roots = graph.tree("gradient-sums", _add_parts,
                           _leaves_by_channel_block(partial, blocks, axis), partial)
        gradients = graph.name("gradients")
        graph.add(gradients, {(gradients, j): (tuple, roots[j]) for j in roots},
                  partial, graph.name("gradient-sums"))
    dweight, dbias = _split_pair(graph, gradients, ("dweight", "dbias"), cchunks, x.dtype)
    like_x = np.empty((0,) * x.ndim, x.dtype)
    dx = graph.array(_pick(graph, "dx", chunk_results, 0, chunk), x.chunks, like_x)
    if not residual:
        return BackwardResult(dx, dweight, dbias)
    dresidual = (graph.array(_pick(graph, "dresidual", chunk_results, 3, chunk), x.chunks, like_x)
                 if relu else dy)
    return ResidualBackwardResult(dx, dweight, dbias, dresidual)
