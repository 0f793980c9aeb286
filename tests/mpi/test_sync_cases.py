"""Synchronized batch norm on every rank of ``mpiexec -n N python -m pytest tests/mpi``.

Every rank builds the same global batch from a seed, takes its slice along the
batch axis, runs the synchronized call and asserts that its part equals the
single-process computation on the whole batch. Each test makes its collectives
before any assertion, so a failure on one rank leaves the ranks in step.
"""
import copy

import numpy as np
import pytest

import fastbn
from fastbn.distributed import SyncBatchNorm, sync_batch_norm_backward, sync_batch_norm_forward
from fastbn.testing import assert_close, mean_rounding

MPI = pytest.importorskip("mpi4py.MPI")
COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()

CPU_BACKENDS = [pytest.param(info.name, id=info.name,
                             marks=() if info.available else pytest.mark.skip(reason=info.reason))
                for info in fastbn.backends()
                if info.name in ("numpy", "cython", "numba")]
# (shape of the whole batch, channel axis); the batch axis is 0 in each
LAYOUTS = {"NC": ((13, 5), 1), "NCHW": ((13, 4, 3, 5), 1), "NHWC": ((13, 3, 5, 4), -1)}


def counts(split, n):
    """Samples per rank for a whole batch of ``n``."""
    if split == "equal":
        return [n // SIZE + (r < n % SIZE) for r in range(SIZE)]
    if split == "unequal":  # rank r gets a share ~ r + 1
        cuts = np.round(np.cumsum([0] + [r + 1 for r in range(SIZE)]) * n
                        / (SIZE * (SIZE + 1) / 2)).astype(int)
        return list(np.diff(cuts))
    if split == "empty":  # the last rank holds nothing
        return [n // (SIZE - 1) + (r < n % (SIZE - 1)) for r in range(SIZE - 1)] + [0] \
            if SIZE > 1 else [n]
    if split == "one":  # rank 0 holds one sample
        rest = n - 1
        return [1] + [rest // (SIZE - 1) + (r < rest % (SIZE - 1)) for r in range(SIZE - 1)] \
            if SIZE > 1 else [n]
    raise AssertionError(split)


def part(a, split):
    """This rank's slice of the whole batch ``a`` along axis 0."""
    sizes = counts(split, a.shape[0])
    start = sum(sizes[:RANK])
    return a[start:start + sizes[RANK]]


def batch(layout, dtype, mean=0.0, seed=0):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.normal(mean, 1.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    stat = np.float64 if dtype == np.float64 else np.float32
    w, b = rng.normal(size=c).astype(stat), rng.normal(size=c).astype(stat)
    return x, dy, w, b, axis


def all_equal(vector):
    """Whether ``vector`` is bitwise the same on every rank."""
    gathered = COMM.allgather(np.ascontiguousarray(vector).tobytes())
    return all(g == gathered[0] for g in gathered)


@pytest.mark.parametrize("split", ["equal", "unequal", "empty", "one"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_equals_whole_batch(backend, layout, split):
    x, dy, w, b, axis = batch(layout, np.float64)
    c = x.shape[axis]
    rm, rv = np.zeros(c), np.ones(c)
    ref = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, axis=axis,
                                    backend=backend)
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, weight=w, axis=axis,
                                           backend=backend)
    srm, srv = np.zeros(c), np.ones(c)
    y, mean, invstd = sync_batch_norm_forward(part(x, split), w, b, running_mean=srm,
                                              running_var=srv, axis=axis, backend=backend)
    grads = sync_batch_norm_backward(part(dy, split), part(x, split), mean, invstd, weight=w,
                                     axis=axis, backend=backend)
    identical = [all_equal(v) for v in (mean, invstd, srm, srv, grads.dweight, grads.dbias)]
    assert y.shape == part(x, split).shape and grads.dx.shape == y.shape
    for got, want in [(y, part(ref.y, split)), (mean, ref.mean), (invstd, ref.invstd),
                      (srm, rm), (srv, rv), (grads.dx, part(ref_grads.dx, split)),
                      (grads.dweight, ref_grads.dweight), (grads.dbias, ref_grads.dbias)]:
        assert_close(got, want, "float64")
    assert all(identical), "ranks hold different statistics or gradients"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_large_mean(backend, layout):
    # mean 1e4, std 1: E[x^2] - E[x]^2 would lose every digit in float32
    x, dy, w, b, axis = batch(layout, np.float32, mean=1e4, seed=1)
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    ref = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, axis=axis,
                                    backend=backend)
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, weight=w, axis=axis,
                                           backend=backend)
    srm, srv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, invstd = sync_batch_norm_forward(part(x, "unequal"), w, b, running_mean=srm,
                                              running_var=srv, axis=axis, backend=backend)
    grads = sync_batch_norm_backward(part(dy, "unequal"), part(x, "unequal"), mean, invstd,
                                     weight=w, axis=axis, backend=backend)
    rounding = mean_rounding(ref.mean, ref.invstd)  # x - mean of float32 data near 1e4
    assert_close(y, part(ref.y, "unequal"), "float32", condition=rounding)
    assert_close(grads.dx, part(ref_grads.dx, "unequal"), "float32", condition=rounding)
    for got, want in [(mean, ref.mean), (invstd, ref.invstd), (srm, rm), (srv, rv),
                      (grads.dweight, ref_grads.dweight), (grads.dbias, ref_grads.dbias)]:
        assert_close(got, want, "float32", condition=rounding)
    # and the whole batch's variance is right, not only self-consistent
    var = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, c).var(axis=0, ddof=1)
    assert_close(srv, 0.9 + 0.1 * var, "float32")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_relu_and_residual(backend, residual):
    x, dy, w, b, axis = batch("NCHW", np.float64, seed=2)
    z = np.random.default_rng(3).normal(size=x.shape) if residual else None
    kw = dict(axis=axis, activation="relu", backend=backend)
    ref = fastbn.batch_norm_forward(x, w, b, residual=z, **kw)
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, weight=w, y=ref.y,
                                           residual=residual, **kw)
    y, mean, invstd = sync_batch_norm_forward(part(x, "empty"), w, b,
                                              residual=None if z is None else part(z, "empty"),
                                              **kw)
    grads = sync_batch_norm_backward(part(dy, "empty"), part(x, "empty"), mean, invstd,
                                     weight=w, y=y, residual=residual, **kw)
    assert_close(y, part(ref.y, "empty"), "float64")
    assert_close(grads.dx, part(ref_grads.dx, "empty"), "float64")
    assert_close(grads.dweight, ref_grads.dweight, "float64")
    assert_close(grads.dbias, ref_grads.dbias, "float64")
    if residual:
        assert_close(grads.dresidual, part(ref_grads.dresidual, "empty"), "float64")


def test_one_value_in_the_whole_batch_raises_on_every_rank():
    x = np.random.default_rng(4).normal(size=(1, 3))  # one sample in all: rank 0 has it
    with pytest.raises(ValueError, match="whole batch"):
        sync_batch_norm_forward(x if RANK == 0 else x[:0])


@pytest.mark.filterwarnings("error")  # NaN statistics without a 0/0 warning
def test_every_rank_empty():
    y, mean, invstd = sync_batch_norm_forward(np.zeros((0, 3)))
    assert y.shape == (0, 3) and np.isnan(mean).all()


def test_eval_mode_communicates_nothing():
    x, dy, w, b, axis = batch("NCHW", np.float64)
    rm, rv = np.full(4, 0.5), np.full(4, 2.0)
    if RANK == 0:  # only rank 0 calls: a collective would hang, eval mode makes none
        got = sync_batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)
        want = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                         training=False)
        assert_close(got.y, want.y, "float64")
    COMM.Barrier()


def test_sub_communicator():
    """A Split of COMM_WORLD: even and odd ranks each normalize their own batch."""
    sub = COMM.Split(RANK % 2, RANK)
    x = np.random.default_rng(10 + RANK % 2).normal(size=(4 * sub.Get_size(), 3))
    mine = x[4 * sub.Get_rank():4 * sub.Get_rank() + 4]
    y = sync_batch_norm_forward(mine, comm=sub).y
    sub.Free()
    assert_close(y, fastbn.batch_norm_forward(x).y[4 * (RANK // 2):4 * (RANK // 2) + 4],
                 "float64")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batch_norm_layer(momentum):
    x, dy, _, _, axis = batch("NHWC", np.float64, seed=5)
    ref = fastbn.BatchNorm(x.shape[axis], axis=axis, dtype="float64", momentum=momentum)
    bn = SyncBatchNorm(x.shape[axis], axis=axis, dtype="float64", momentum=momentum)
    for step in range(2):
        scale = 1.0 + step
        want_y = ref(x * scale)
        want_dx = ref.backward(dy)
        y = bn(part(x * scale, "unequal"))
        dx = bn.backward(part(dy, "unequal"))
        assert_close(y, part(want_y, "unequal"), "float64")
        assert_close(dx, part(want_dx, "unequal"), "float64")
        assert_close(bn.grad_weight, ref.grad_weight, "float64")  # the whole batch's
        assert_close(bn.grad_bias, ref.grad_bias, "float64")
    assert bn.num_batches_tracked == 2
    assert_close(bn.running_mean, ref.running_mean, "float64")
    assert_close(bn.running_var, ref.running_var, "float64")
    bn.eval()
    ref.eval()
    assert_close(bn(part(x, "unequal")), part(ref(x), "unequal"), "float64")


# --- torch ----------------------------------------------------------------------------------

def _torch_split(t, split):
    import torch
    sizes = counts(split, t.shape[0])
    return torch.split(t, sizes)[RANK]


@pytest.mark.parametrize("split", ["unequal", "empty"])
def test_torch_sync_batch_norm_equals_batch_norm_on_the_whole_batch(split):
    """torch's SyncBatchNorm is defined as BatchNorm over the concatenated batch; input
    grads are the slice, weight/bias grads this rank's share (torch's convention: their
    sum over the ranks is the whole batch's)."""
    torch = pytest.importorskip("torch")
    import fastbn.torch
    torch.manual_seed(6)
    x = torch.randn(11, 4, 3, 3, dtype=torch.float64) * 3 + 2
    dy = torch.randn_like(x)
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    bn = fastbn.torch.SyncBatchNorm(4, dtype=torch.float64)
    bn.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    xs = _torch_split(x, split).clone().requires_grad_()
    y = bn(xs)
    y.backward(_torch_split(dy, split))
    total_w = torch.from_numpy(COMM.allreduce(bn.weight.grad.numpy()))
    total_b = torch.from_numpy(COMM.allreduce(bn.bias.grad.numpy()))
    with torch.no_grad():
        dims = (0, 2, 3)
        xhat = (xs - x.mean(dims, keepdim=True)) * torch.rsqrt(
            x.var(dims, unbiased=False, keepdim=True) + 1e-5)
        local_w = (_torch_split(dy, split) * xhat).sum(dims)
        local_b = _torch_split(dy, split).sum(dims)
    assert_close(y.detach(), _torch_split(torch.nn.functional.batch_norm(
        x, None, None, ref.weight.detach(), ref.bias.detach(), True), split), "float64")
    assert_close(xs.grad, _torch_split(xr.grad, split), "float64")
    assert_close(bn.weight.grad, local_w, "float64")
    assert_close(bn.bias.grad, local_b, "float64")
    assert_close(total_w, ref.weight.grad, "float64")
    assert_close(total_b, ref.bias.grad, "float64")
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(bn, key), getattr(ref, key), "float64")


def test_torch_convert_sync_batchnorm_model():
    """A model converted with fastbn.torch.convert_sync_batchnorm, trained one step on
    each rank's part: output slices, and conv gradients summed over the ranks, equal the
    single-process model on the whole batch; fused relu and a residual kept."""
    torch = pytest.importorskip("torch")
    import fastbn.torch
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64),
                                torch.nn.BatchNorm2d(4, dtype=torch.float64),
                                torch.nn.ReLU())
    fused = fastbn.torch.convert(copy.deepcopy(model), fuse_relu=True)
    synced = fastbn.torch.convert_sync_batchnorm(copy.deepcopy(fused))
    assert isinstance(synced[1], fastbn.torch.SyncBatchNorm) and synced[1].activation == "relu"
    x = torch.randn(9, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn(9, 4, 5, 5, dtype=torch.float64)
    want_y = model(x)
    want_y.backward(dy)
    y = synced(_torch_split(x, "unequal"))
    y.backward(_torch_split(dy, "unequal"))
    conv_grad = torch.from_numpy(COMM.allreduce(synced[0].weight.grad.numpy()))
    bn_grad = torch.from_numpy(COMM.allreduce(synced[1].weight.grad.numpy()))
    assert_close(y.detach(), _torch_split(want_y.detach(), "unequal"), "float64")
    assert_close(conv_grad, model[0].weight.grad, "float64")
    assert_close(bn_grad, model[1].weight.grad, "float64")
    assert_close(synced[1].running_var, model[1].running_var, "float64")


def test_torch_residual_and_momentum_none():
    torch = pytest.importorskip("torch")
    import fastbn.torch
    torch.manual_seed(8)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    z = torch.randn_like(x)
    dy = torch.randn_like(x)
    ref = fastbn.torch.BatchNorm1d(3, momentum=None, activation="relu", dtype=torch.float64)
    bn = fastbn.torch.SyncBatchNorm(3, momentum=None, activation="relu", dtype=torch.float64)
    xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
    for _ in range(2):
        ref(xr, zr).backward(dy)
    xs, zs = (_torch_split(t, "empty").clone().requires_grad_() for t in (x, z))
    for _ in range(2):
        bn(xs, zs).backward(_torch_split(dy, "empty"))
    assert_close(xs.grad, _torch_split(xr.grad, "empty"), "float64")
    assert_close(zs.grad, _torch_split(zr.grad, "empty"), "float64")
    assert_close(bn.running_mean, ref.running_mean, "float64")
    assert_close(bn.running_var, ref.running_var, "float64")
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("split", ["unequal", "empty"])
def test_population_stats_allreduce(split):
    """fastbn.PopulationStats.allreduce goes through the same MPISync."""
    x = np.random.default_rng(9).normal(1e3, 2.0, (10, 3, 4))
    stats = fastbn.PopulationStats(3)
    mine = part(x, split)
    if mine.shape[0]:
        stats.update(mine)
    stats.allreduce(COMM)
    identical = [all_equal(v) for v in (stats.mean, stats.var)]
    assert stats.count == 40
    assert_close(stats.mean, x.mean(axis=(0, 2)), "float64")
    assert_close(stats.var, x.var(axis=(0, 2), ddof=1), "float64")
    assert all(identical)
