"""Dask arrays through fastbn's public functions: results equal fastbn's NumPy path for
chunkings along every kind of axis, on the threaded scheduler and on a dask.distributed
LocalCluster; the graph has one stats task per chunk and reads each chunk at most twice."""
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from fastbn.testing._helpers import assert_close

da = pytest.importorskip("dask.array",
                         reason="dask is an optional extra: pip install 'fastbn[dask]'")
import dask  # noqa: E402  (after the skip)

# (id, shape, axis, chunks): along the batch, channels, spatial axes, several at once, uneven
CASES = [
    ("NC-batch", (64, 6), 1, (16, 6)),
    ("NC-channels-uneven", (64, 7), 1, (64, 3)),
    ("NC-both", (50, 7), 1, (17, 4)),
    ("NCHW-batch", (6, 4, 5, 6), 1, (2, 4, 5, 6)),
    ("NCHW-channels", (6, 4, 5, 6), 1, (6, 1, 5, 6)),
    ("NCHW-spatial", (6, 4, 5, 6), 1, (6, 4, 2, 4)),
    ("NCHW-all-uneven", (7, 5, 5, 6), 1, (3, 2, 3, 4)),
    ("NHWC-axis-1", (4, 5, 6, 5), -1, (3, 2, 6, 2)),
    ("one-chunk", (6, 4, 5), 1, (6, 4, 5)),
]
DTYPES = [np.float32, np.float64]


def _case_params():
    return [pytest.param(shape, axis, chunks, id=name) for name, shape, axis, chunks in CASES]


def _data(shape, axis, dtype, seed=0):
    """x with a mean large against its spread, per-channel weight and bias, and dy."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    stat = np.float32 if dtype == np.float32 else np.float64
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    return (x, rng.normal(1.0, 0.3, c).astype(stat), rng.normal(0.0, 0.3, c).astype(stat), dy)


def _running(c, dtype):
    stat = np.float32 if dtype == np.float32 else np.float64
    rng = np.random.default_rng(7)
    return rng.normal(0.0, 1.0, c).astype(stat), rng.uniform(0.5, 2.0, c).astype(stat)


def _close_all(actual, desired, dtype):
    assert len(actual) == len(desired)
    for name, a, d in zip(getattr(desired, "_fields", range(len(desired))), actual, desired):
        assert_close(a, d, dtype, err_msg=f"{name}")


def _forward_backward_matches(shape, axis, chunks, dtype):
    """Training forward with running statistics, training backward, inference forward and
    backward: every result equal to the NumPy path's (on the scheduler in use)."""
    x, w, b, dy = _data(shape, axis, dtype)
    xd, dyd = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=chunks)
    rm, rv = _running(shape[axis], dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()

    ref = fastbn.batch_norm_forward(x, w, b, running_mean=rm_ref, running_var=rv_ref, axis=axis)
    got = fastbn.batch_norm_forward(xd, w, b, running_mean=rm, running_var=rv, axis=axis)
    assert all(isinstance(a, da.Array) for a in got)
    assert_close(rm, rm_ref, dtype, err_msg="running_mean (updated by the call)")
    assert_close(rv, rv_ref, dtype, err_msg="running_var (updated by the call)")
    _close_all(dask.compute(*got), ref, dtype)

    ref_grad = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, weight=w, axis=axis)
    grad = fastbn.batch_norm_backward(dyd, xd, got.mean, got.invstd, weight=w, axis=axis)
    _close_all(dask.compute(*grad), ref_grad, dtype)

    y_ref = fastbn.batch_norm(x, rm_ref, rv_ref, w, b, axis=axis)
    assert_close(fastbn.batch_norm(xd, rm, rv, w, b, axis=axis).compute(), y_ref, dtype)
    ref_eval = fastbn.batch_norm_forward(x, w, b, running_mean=rm_ref, running_var=rv_ref,
                                         training=False, axis=axis)
    ref_grad = fastbn.batch_norm_backward(dy, x, ref_eval.mean, ref_eval.invstd, weight=w,
                                          training=False, axis=axis)
    grad = fastbn.batch_norm_backward(dyd, xd, ref_eval.mean, ref_eval.invstd, weight=w,
                                      training=False, axis=axis)
    _close_all(dask.compute(*grad), ref_grad, dtype)


# --- threaded scheduler ----------------------------------------------------------------------

@pytest.fixture
def threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, chunks", _case_params())
def test_threaded_matches_numpy(threads, shape, axis, chunks, dtype):
    _forward_backward_matches(shape, axis, chunks, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, chunks", _case_params())
def test_lazy_training_forward_without_running_stats(threads, shape, axis, chunks, dtype):
    x, w, b, _ = _data(shape, axis, dtype)
    ref = fastbn.batch_norm_forward(x, w, b, axis=axis)
    _close_all(dask.compute(*fastbn.batch_norm_forward(da.from_array(x, chunks=chunks), w, b,
                                                       axis=axis)), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_residual_epilogue(threads, dtype):
    shape, axis, chunks = (6, 4, 5, 6), 1, (4, 3, 5, 4)
    x, w, b, dy = _data(shape, axis, dtype)
    z = np.random.default_rng(3).normal(size=shape).astype(dtype)
    ref = fastbn.batch_norm_forward(x, w, b, activation="relu", residual=z)
    got = fastbn.batch_norm_forward(da.from_array(x, chunks=chunks), w, b, activation="relu",
                                    residual=da.from_array(z, chunks=(3, 4, 5, 6)))
    _close_all(dask.compute(*got), ref, dtype)
    ref_grad = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, weight=w,
                                          activation="relu", y=ref.y, residual=True)
    grad = fastbn.batch_norm_backward(da.from_array(dy, chunks=chunks),
                                      da.from_array(x, chunks=chunks), got.mean, got.invstd,
                                      weight=w, activation="relu", y=got.y, residual=True)
    assert type(grad).__name__ == "ResidualBackwardResult"
    _close_all(dask.compute(*grad), ref_grad, dtype)


def test_numpy_arguments_beside_a_dask_x(threads):
    """dy, residual and the per-channel vectors may be NumPy arrays or Dask arrays chunked
    otherwise (rechunked like x)."""
    x, w, b, dy = _data((8, 4, 3), 1, np.float64)
    xd = da.from_array(x, chunks=(3, 2, 3))
    ref = fastbn.batch_norm_forward(x, w, b, residual=dy)
    got = fastbn.batch_norm_forward(xd, da.from_array(w, chunks=3), b, residual=dy)
    _close_all(dask.compute(*got), ref, np.float64)
    ref_grad = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, weight=w)
    grad = fastbn.batch_norm_backward(dy, xd, ref.mean, ref.invstd, weight=w)
    _close_all(dask.compute(*grad), ref_grad, np.float64)


def test_empty_batch(threads):
    x = np.empty((0, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    got = fastbn.batch_norm_forward(da.from_array(x), running_mean=rm, running_var=rv)
    y, mean, invstd = dask.compute(*got)
    assert y.shape == x.shape and np.isnan(mean).all() and np.isnan(invstd).all()
    assert (rm == 0).all() and (rv == 1).all()  # untouched, as the NumPy path leaves them


def test_weights_snapshot_at_call_time(threads):
    """NumPy per-channel arguments are copied: the lazy result uses their values at the call."""
    x, w, b, _ = _data((8, 4), 1, np.float64)
    ref = fastbn.batch_norm_forward(x, w, b).y
    y = fastbn.batch_norm_forward(da.from_array(x, chunks=(3, 4)), w, b).y
    w[:] = 0
    assert_close(y.compute(), ref, np.float64)


def test_use_backend_reaches_the_tasks(threads):
    """use_backend() is a context variable; the tasks, in other threads, still honour it."""
    x, w, b, _ = _data((8, 4), 1, np.float64)
    seen = []
    real = fastbn.get_backend("numpy")

    class Watching:
        name, devices, dtypes, priority = "watching", real.devices, real.dtypes, -1

        def __getattr__(self, kernel):
            attribute = getattr(real, kernel)
            if callable(attribute):
                seen.append((kernel, threading.get_ident()))
            return attribute

    with fastbn.use_backend(Watching()):
        y = fastbn.batch_norm_forward(da.from_array(x, chunks=(3, 4)), w, b).y
    assert_close(y.compute(), fastbn.batch_norm_forward(x, w, b).y, np.float64)
    assert any(kernel == "stats" for kernel, _ in seen)


# --- the graph ----------------------------------------------------------------------------

def _layer(graph, kind):
    (name,) = [n for n in graph.layers if n.startswith(f"fastbn-{kind}-")]
    return graph.layers[name]


def _x_chunk_keys(x):
    return set(dask.core.flatten(x.__dask_keys__()))


@pytest.mark.parametrize("chunks", [(2, 4, 5, 6), (3, 1, 2, 4), (6, 4, 5, 6)])
def test_one_stats_task_per_chunk(chunks):
    x = da.from_array(np.ones((6, 4, 5, 6)), chunks=chunks)
    graph = fastbn.batch_norm_forward(x).y.__dask_graph__()
    assert len(_layer(graph, "stats")) == x.npartitions
    assert len(_layer(graph, "normalize")) == x.npartitions
    dy = da.from_array(np.ones(x.shape), chunks=chunks)
    f = fastbn.batch_norm_forward(x)
    backward = fastbn.batch_norm_backward(dy, x, f.mean, f.invstd).dx.__dask_graph__()
    assert len(_layer(backward, "backward-reduce")) == x.npartitions
    assert len(_layer(backward, "backward-elemt")) == x.npartitions


def test_each_chunk_read_twice_and_no_task_gets_two_chunks():
    """In the graph: every chunk of x feeds exactly two tasks (stats, normalize; reduce,
    elemt), and no task takes more than one chunk of x (nothing is gathered)."""
    x = da.from_array(np.ones((6, 4, 5, 6)), chunks=(2, 3, 5, 4))
    dy = da.from_array(np.ones(x.shape), chunks=x.chunks)
    f = fastbn.batch_norm_forward(x)
    g = fastbn.batch_norm_backward(dy, x, np.zeros(4), np.ones(4))  # not f's: its stats read x
    chunk_keys = _x_chunk_keys(x)
    for result, kinds in ((f.y, {"stats", "normalize"}),
                          (g.dx, {"backward-reduce", "backward-elemt"})):
        graph = dict(result.__dask_graph__())
        dependents = {key: [] for key in chunk_keys}
        for key, task in graph.items():
            read = dask.core.get_dependencies(graph, key) & chunk_keys
            assert len(read) <= 1, f"{key} reads {len(read)} chunks of x"
            for chunk in read:
                dependents[chunk].append(key[0].split("-")[1:-1])
        for chunk, readers in dependents.items():
            assert sorted("-".join(r) for r in readers) == sorted(kinds), chunk


_reads = {}


def _counted_chunk(block_info=None):
    """A chunk of ones, counting how often each chunk is produced (read)."""
    index = block_info[None]["chunk-location"]
    _reads[index] = _reads.get(index, 0) + 1
    return np.ones(block_info[None]["chunk-shape"])


@pytest.mark.parametrize("running", [True, False])
def test_each_chunk_produced_at_most_twice(threads, running):
    """Counted at run time: with running statistics, statistics at call time and y when
    computed read each chunk once each; without, one compute produces each chunk once."""
    _reads.clear()
    x = da.map_blocks(_counted_chunk, chunks=((3, 3), (2, 2), (5,)), dtype=np.float64,
                      meta=np.empty((0, 0, 0)))
    stats = (np.zeros(4), np.ones(4)) if running else (None, None)
    f = fastbn.batch_norm_forward(x, running_mean=stats[0], running_var=stats[1])
    assert set(_reads.values()) == ({1} if running else set())
    dask.compute(*f)
    assert len(_reads) == x.npartitions
    assert set(_reads.values()) == ({2} if running else {1})


def test_import_fastbn_does_not_import_dask():
    code = "import sys, fastbn; sys.exit('dask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(out=np.empty((8, 4))), TypeError, "out: expected None for a Dask x"),
    (dict(weight=np.ones(3)), ValueError, r"weight: expected shape \(4,\)"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(axis=3), ValueError, "axis"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(running_var=np.ones(4)), ValueError, "running_mean"),
    (dict(residual=np.ones((8, 5))), ValueError, "residual: expected shape"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(backend="no-such-backend"), Exception, "no-such-backend"),
])
def test_bad_arguments_fail_before_anything_runs(kwargs, error, match):
    x = da.from_array(np.ones((8, 4)), chunks=(3, 4))
    rm, rv = np.zeros(4), np.ones(4)
    kwargs = {"running_mean": rm, "running_var": rv, **kwargs}
    if kwargs["running_mean"] is rm and kwargs["running_var"] is not rv:
        kwargs["running_mean"] = None
    with pytest.raises(error, match=match):
        fastbn.batch_norm_forward(x, **kwargs)
    assert (rm == 0).all() and (rv == 1).all()


def test_bad_dask_x():
    with pytest.raises(TypeError, match="x: expected dtype"):
        fastbn.batch_norm_forward(da.ones((4, 3), dtype=np.int32, chunks=2))
    with pytest.raises(ValueError, match="rank >= 2"):
        fastbn.batch_norm_forward(da.ones((4,), chunks=2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm_forward(da.ones((1, 3), chunks=1))
    x = da.ones((4, 3), chunks=2)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 3\)"):
        fastbn.batch_norm_backward(da.ones((4, 2), chunks=2), x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="invstd: expected an array"):
        fastbn.batch_norm_backward(x, x, np.zeros(3), None)
    with pytest.raises(TypeError, match="mean: expected dtype"):
        fastbn.batch_norm_backward(x, x, da.zeros(3, dtype=np.int64, chunks=3), np.ones(3))


# --- a dask.distributed LocalCluster with 2 worker processes ----------------------------------

@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, chunks", [
    pytest.param(*case[1:], id=case[0])
    for case in CASES if case[0] in ("NC-both", "NCHW-all-uneven", "NHWC-axis-1")])
def test_local_cluster_matches_numpy(cluster_client, shape, axis, chunks, dtype):
    with dask.config.set(scheduler=cluster_client):
        _forward_backward_matches(shape, axis, chunks, dtype)
        x, w, b, _ = _data(shape, axis, dtype)  # the lazy path too
        ref = fastbn.batch_norm_forward(x, w, b, axis=axis)
        got = fastbn.batch_norm_forward(da.from_array(x, chunks=chunks), w, b, axis=axis)
        _close_all(dask.compute(*got), ref, dtype)
