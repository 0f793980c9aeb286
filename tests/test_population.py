"""Chan's merge, PopulationStats, BatchNorm.recalibrate and fastbn.torch.recalibrate:
exact population statistics against NumPy over the concatenated data."""
import numpy as np
import pytest

import fastbn
from fastbn._merge import Moments, merge, merge_all
from fastbn.testing._helpers import assert_close


def _moments(x, axes):
    mean = x.mean(axis=axes)
    shape = [1] * x.ndim
    shape[1] = -1
    m2 = ((x - mean.reshape(shape)) ** 2).sum(axis=axes)
    return Moments(x.size // x.shape[1], mean, m2)


def _split(n, parts, rng):
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_merge_all_equals_whole(rng, parts):
    x = rng.normal(3.0, 2.0, (41, 5, 3))
    pieces = [x[idx] for idx in _split(len(x), parts, rng)]
    merged = merge_all([_moments(p, (0, 2)) if len(p) else Moments(0, np.zeros(5), np.zeros(5))
                        for p in pieces])
    whole = _moments(x, (0, 2))
    assert merged.count == whole.count
    assert_close(merged.mean, whole.mean, "float64")
    assert_close(merged.m2, whole.m2, "float64")


def test_merge_empty_side_returns_other_unchanged():
    # A mean never set may be anything, inf included: 0 * inf must not reach the result.
    full = Moments(4, np.array([1.0, -2.0]), np.array([3.0, 5.0]))
    empty = Moments(0, np.array([np.inf, np.nan]), np.array([np.inf, 0.0]))
    for merged in (merge(full, empty), merge(empty, full)):
        assert merged.count == 4
        np.testing.assert_array_equal(merged.mean, full.mean)
        np.testing.assert_array_equal(merged.m2, full.m2)


def test_merge_keeps_accuracy_at_large_mean(rng):
    # E[x^2] - E[x]^2 loses every digit of a unit variance at mean 1e8 in float64;
    # the pairwise merge keeps the parts' accuracy.
    x = rng.normal(1e8, 1.0, (4000, 2, 1))
    merged = merge_all([_moments(p, (0, 2)) for p in np.array_split(x, 8)])
    exact = x.var(axis=(0, 2))
    np.testing.assert_allclose(merged.m2 / merged.count, exact, rtol=1e-7)  # x itself holds ~1e-8
    naive = (x ** 2).mean(axis=(0, 2)) - x.mean(axis=(0, 2)) ** 2
    assert np.max(np.abs(naive / exact - 1)) > 1e-3  # the formula this replaces does fail


def test_merge_all_needs_a_part():
    with pytest.raises(ValueError, match="parts"):
        merge_all([])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis", [((16, 4), 1), ((8, 4, 5, 5), 1), ((8, 5, 5, 4), -1)])
def test_population_stats_equal_concatenation(rng, dtype, shape, axis):
    batches = [rng.normal(1e3, 3.0, (rng.integers(1, 9),) + shape[1:]).astype(dtype)
               for _ in range(9)]
    stats = fastbn.PopulationStats(4, axis=axis)
    for b in batches:
        assert stats.update(b) is stats
    data = np.moveaxis(np.concatenate(batches).astype(np.float64), axis, -1).reshape(-1, 4)
    assert stats.count == len(data)
    assert stats.mean.dtype == stats.var.dtype == np.float64
    assert_close(stats.mean, data.mean(axis=0), dtype, condition=1e-4 if dtype == "float32" else 0)
    assert_close(stats.var, data.var(axis=0, ddof=1), dtype)


def test_population_stats_merge_and_reset(rng):
    a, b = rng.normal(size=(10, 3)), rng.normal(2.0, 3.0, size=(7, 3))
    left = fastbn.PopulationStats(3).update(a)
    right = fastbn.PopulationStats(3).update(b)
    assert left.merge(right) is left
    both = np.concatenate([a, b])
    assert_close(left.mean, both.mean(axis=0), "float64")
    assert_close(left.var, both.var(axis=0, ddof=1), "float64")
    assert right.count == 7  # the other side is not consumed
    left.reset()
    assert left.count == 0 and np.isnan(left.mean).all() and np.isnan(left.var).all()
    left.update(a[:1])
    assert np.isnan(left.var).all()  # an unbiased variance needs two values


def test_population_stats_takes_other_array_libraries(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(12, 3, 4)).astype(np.float32)
    stats = fastbn.PopulationStats(3).update(torch.from_numpy(x))
    assert_close(stats.var, x.astype(np.float64).var(axis=(0, 2), ddof=1), "float32")


def test_population_stats_bad_input():
    with pytest.raises(TypeError, match="num_features"):
        fastbn.PopulationStats(2.5)
    stats = fastbn.PopulationStats(3)
    with pytest.raises(ValueError, match="3 channels"):
        stats.update(np.zeros((4, 2)))
    with pytest.raises(TypeError, match="x: expected an array"):
        stats.update([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="x: expected dtype float16"):
        stats.update(np.zeros((4, 3), np.int32))
    with pytest.raises(TypeError, match="other"):
        stats.merge(np.zeros(3))
    with pytest.raises(ValueError, match="other"):
        stats.merge(fastbn.PopulationStats(4))
    assert stats.count == 0  # nothing half-written


def test_layer_recalibrate(rng):
    bn = fastbn.BatchNorm(3, dtype="float64")
    batches = [rng.normal(5.0, 2.0, (6, 3, 4)) for _ in range(5)]
    for b in batches:  # running averages of a few steps: not the population's
        bn(b)
    weight = bn.weight.copy()
    tracked = bn.num_batches_tracked
    stats = bn.recalibrate(iter(batches))
    data = np.concatenate(batches)
    assert stats.count == data.size // 3
    assert_close(bn.running_mean, data.mean(axis=(0, 2)), "float64")
    assert_close(bn.running_var, data.var(axis=(0, 2), ddof=1), "float64")
    assert bn.num_batches_tracked == tracked and bn.training
    np.testing.assert_array_equal(bn.weight, weight)


def test_layer_recalibrate_refuses_without_writing(rng):
    bn = fastbn.BatchNorm(3, dtype="float64")
    before = bn.running_mean.copy(), bn.running_var.copy()
    with pytest.raises(ValueError, match="batches: expected more than 1"):
        bn.recalibrate([rng.normal(size=(1, 3))])
    with pytest.raises(ValueError, match="3 channels"):
        bn.recalibrate([rng.normal(size=(4, 3)), rng.normal(size=(4, 2))])
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    with pytest.raises(RuntimeError, match="track_running_stats"):
        fastbn.BatchNorm(3, track_running_stats=False).recalibrate([])


class _Capture:
    """The inputs reaching each batch norm of a torch model in training mode."""

    def __init__(self, model, torch):
        self.inputs = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in model.named_modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def _hook(self, name):
        def hook(module, args):
            self.inputs.setdefault(name, []).append(args[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("convert", [False, True])
def test_torch_recalibrate_exact(rng, convert):
    torch = pytest.importorskip("torch")
    import fastbn.torch as fbt
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 3), torch.nn.BatchNorm2d(3, momentum=None), torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 5), torch.nn.BatchNorm1d(5)).double()
    if convert:
        model = fbt.convert(model)
    model.eval()
    loader = [(torch.from_numpy(rng.normal(1.0, 2.0, (n, 2, 8, 8))), torch.zeros(n))
              for n in (4, 7, 5, 3)]
    tracked = {name: m.num_batches_tracked.clone() for name, m in model.named_modules()
               if hasattr(m, "num_batches_tracked")}
    stats = fbt.recalibrate(model, loader, num_batches=3)
    assert set(stats) == {"1", "4", "7"}
    recalibrated = {name: (model[int(name)].running_mean.clone(),
                           model[int(name)].running_var.clone()) for name in stats}
    assert not model.training
    assert model[4].momentum is None and model[1].momentum == 0.1
    for name, m in model.named_modules():
        if name in tracked:
            assert torch.equal(m.num_batches_tracked, tracked[name])
    # Expected: the same pass over the first three batches, inputs recorded, in training
    # mode with the running statistics as they are after recalibration (they do not
    # affect a training-mode pass).
    capture = _Capture(model, torch)
    model.train()
    with torch.no_grad():
        for x, _ in loader[:3]:
            model(x)
    capture.remove()
    for name in stats:
        layer = model[int(name)]
        data = torch.cat(capture.inputs[name]).transpose(0, 1).reshape(layer.num_features, -1)
        assert stats[name].count == data.shape[1]
        running_mean, running_var = recalibrated[name]
        assert_close(running_mean.numpy(), data.mean(dim=1).numpy(), "float64")
        assert_close(running_var.numpy(), data.var(dim=1).numpy(), "float64")


def test_torch_recalibrate_bad_input():
    torch = pytest.importorskip("torch")
    import fastbn.torch as fbt
    with pytest.raises(TypeError, match="model"):
        fbt.recalibrate(object(), [])
    with pytest.raises(ValueError, match="no batch norm"):
        fbt.recalibrate(torch.nn.Linear(2, 2), [])
    bn = torch.nn.BatchNorm1d(2)
    with pytest.raises(ValueError, match="num_batches"):
        fbt.recalibrate(bn, [], num_batches=0)
    with pytest.raises(ValueError, match="loader: expected more than 1"):
        fbt.recalibrate(bn, [])
    assert torch.equal(bn.running_var, torch.ones(2))  # nothing written
