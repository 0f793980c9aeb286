"""The BatchNorm layer: modes, running statistics, gradients, state."""
import numpy as np
import pytest

import fastbn
from fastbn.testing import assert_close, direct_backward, direct_forward


@pytest.fixture
def batches():
    rng = np.random.default_rng(3)
    return [rng.normal(i, 1 + i, (8, 4, 3, 3)).astype(np.float32) for i in range(4)]


def test_defaults():
    bn = fastbn.BatchNorm(4)
    np.testing.assert_array_equal(bn.weight, np.ones(4))
    np.testing.assert_array_equal(bn.bias, np.zeros(4))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(4))
    np.testing.assert_array_equal(bn.running_var, np.ones(4))
    assert bn.num_batches_tracked == 0 and bn.training
    assert bn.weight.dtype == np.float32
    assert fastbn.BatchNorm(4, dtype="float64").running_var.dtype == np.float64
    assert fastbn.BatchNorm(4, dtype="float16").weight.dtype == np.float32


def test_train_then_eval(backend, batches):
    bn = fastbn.BatchNorm(4, momentum=0.25, backend=backend)
    rm, rv = np.zeros(4), np.ones(4)
    for x in batches:
        y = bn(x)
        assert_close(y, direct_forward(x)[0], "float32")
        x64 = x.astype(np.float64)
        rm = 0.75 * rm + 0.25 * x64.mean(axis=(0, 2, 3))
        rv = 0.75 * rv + 0.25 * x64.var(axis=(0, 2, 3), ddof=1)
    assert bn.num_batches_tracked == len(batches)
    assert_close(bn.running_mean, rm, "float32")
    assert_close(bn.running_var, rv, "float32")
    bn.eval()
    x = batches[0]
    expected = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5)
    assert_close(bn(x), expected, "float32")
    assert bn.num_batches_tracked == len(batches)  # eval changes nothing


def test_momentum_none_is_cumulative_average(batches):
    bn = fastbn.BatchNorm(4, momentum=None)
    for x in batches:
        bn(x)
    means = [x.astype(np.float64).mean(axis=(0, 2, 3)) for x in batches]
    variances = [x.astype(np.float64).var(axis=(0, 2, 3), ddof=1) for x in batches]
    assert_close(bn.running_mean, np.mean(means, axis=0), "float32")
    assert_close(bn.running_var, np.mean(variances, axis=0), "float32")


def test_no_affine_no_running_stats(batches):
    bn = fastbn.BatchNorm(4, affine=False, track_running_stats=False)
    assert bn.weight is None and bn.running_mean is None and bn.num_batches_tracked is None
    bn.eval()  # still batch statistics: nothing else to use
    x = batches[1]
    assert_close(bn(x), direct_forward(x)[0], "float32")
    dx = bn.backward(np.ones_like(x))
    assert bn.grad_weight is None and bn.grad_bias is None
    assert_close(dx, np.zeros_like(x), "float32")
    assert bn.state_dict() == {}


def test_backward_uses_saved_statistics(backend, batches):
    rng = np.random.default_rng(5)
    bn = fastbn.BatchNorm(4, dtype="float64", backend=backend)
    bn.weight[:] = rng.uniform(0.5, 1.5, 4)
    x = batches[2].astype(np.float64)
    dy = rng.standard_normal(x.shape)
    bn(x)
    dx = bn.backward(dy)
    dx_ref, dw_ref, db_ref = direct_backward(dy, x, bn.weight)
    assert_close(dx, dx_ref)
    assert_close(bn.grad_weight, dw_ref)
    assert_close(bn.grad_bias, db_ref)
    bn.eval()
    bn(x)  # eval forward: backward is dy * invstd * weight
    dx = bn.backward(dy)
    invstd = 1 / np.sqrt(bn.running_var + 1e-5)
    assert_close(dx, dy * (invstd * bn.weight)[:, None, None])


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward"):
        fastbn.BatchNorm(2).backward(np.ones((2, 2)))


def test_channels_last_axis(batches):
    bn = fastbn.BatchNorm(4, axis=-1)
    x = np.ascontiguousarray(np.moveaxis(batches[0], 1, -1))
    assert_close(bn(x), direct_forward(x, axis=-1)[0], "float32")


def test_state_dict_round_trip(batches):
    bn = fastbn.BatchNorm(4)
    for x in batches:
        bn(x)
    bn.weight[:] = 2.0
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked"]
    state["weight"][:] = 7.0  # a copy, not a view
    assert bn.weight[0] == 2.0
    fresh = fastbn.BatchNorm(4)
    fresh.load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value)
    fresh.eval(), bn.eval()
    np.testing.assert_array_equal(fresh(batches[0]), bn(batches[0]))


def test_load_state_dict_checks_before_writing():
    bn = fastbn.BatchNorm(3)
    good = bn.state_dict()
    bad = dict(good, running_var=np.ones(4, np.float32), running_mean=np.full(3, 9.0))
    with pytest.raises(ValueError, match=r"running_var.*\(3,\)"):
        bn.load_state_dict(bad)
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))  # nothing half-written
    with pytest.raises(ValueError, match="missing.*bias"):
        bn.load_state_dict({k: v for k, v in good.items() if k != "bias"})
    with pytest.raises(ValueError, match="unexpected.*extra"):
        bn.load_state_dict(dict(good, extra=np.ones(3)))


def test_wrong_dtype_for_layer():
    with pytest.raises(TypeError, match="x: expected dtype float64"):
        fastbn.BatchNorm(3, dtype="float64")(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        fastbn.BatchNorm(3, dtype="int8")
    with pytest.raises(ValueError, match="num_features"):
        fastbn.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.BatchNorm(3, momentum=float("nan"))


def test_layer_names_its_num_features_when_channels_differ():
    bn = fastbn.BatchNorm(3)
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1 \(the layer's "
                                         r"num_features\), got shape \(4, 5\)"):
        bn(np.ones((4, 5), np.float32))
    assert bn.num_batches_tracked == 0 and not bn.running_mean.any()


def test_state_dict_interchanges_with_torch(batches):
    torch = pytest.importorskip("torch", reason="torch not installed")
    tbn = torch.nn.BatchNorm2d(4)
    for x in batches:
        tbn(torch.from_numpy(x))
    bn = fastbn.BatchNorm(4)
    bn.load_state_dict({k: v.detach().numpy() for k, v in tbn.state_dict().items()})
    assert bn.num_batches_tracked == 4
    tbn.eval(), bn.eval()
    assert_close(bn(batches[0]), tbn(torch.from_numpy(batches[0])).detach().numpy(), "float32")
    tbn.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
