"""DLPack interop in the core, and the PyTorch and JAX adapters."""
import numpy as np
import pytest

import fastbn
from fastbn._backends.numpy_ref import NumpyReference
from fastbn.testing import assert_close, direct_forward

torch = pytest.importorskip("torch", reason="torch not installed (pip install fastbn[torch])")


class SpyBackend(NumpyReference):
    """The reference kernels, remembering the data pointers they were handed."""

    name = "spy"

    def __init__(self):
        self.pointers = {}

    def normalize(self, x3, mean, scale, shift, y3):
        self.pointers.update(x=x3.__array_interface__["data"][0],
                             y=y3.__array_interface__["data"][0], x_shape=x3.shape)
        return super().normalize(x3, mean, scale, shift, y3)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_torch_tensors_in_and_out_without_copies(memory_format):
    fmt = getattr(torch, "contiguous_format" if memory_format == "contiguous" else memory_format)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64).to(memory_format=fmt)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm_ptr = rm.data_ptr()
    spy = SpyBackend()
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv, backend=spy)
    assert isinstance(y, torch.Tensor) and isinstance(mean, torch.Tensor)
    assert spy.pointers["x"] == x.data_ptr()      # x viewed, not copied
    assert spy.pointers["y"] == y.data_ptr()      # y handed back, not copied
    assert y.is_contiguous(memory_format=fmt)     # memory format kept
    if memory_format == "channels_last":
        assert spy.pointers["x_shape"] == (4 * 5 * 6, 3, 1)  # rows kernels, no copy
    assert rm.data_ptr() == rm_ptr                # running stats updated in place
    assert_close(rm.numpy(), 0.1 * x.numpy().mean(axis=(0, 2, 3)))
    assert_close(y.numpy(), direct_forward(x.numpy())[0])


def test_torch_out_and_backward():
    x = torch.randn(8, 4, dtype=torch.float32)
    out = torch.empty_like(x)
    result = fastbn.batch_norm_forward(x, out=out)
    assert result.y is out
    assert_close(out.numpy(), direct_forward(x.numpy())[0])
    dx, dw, db = fastbn.batch_norm_backward(torch.ones_like(x), x, result.mean, result.invstd)
    assert isinstance(dx, torch.Tensor) and isinstance(dw, torch.Tensor)
    assert_close(db.numpy(), np.full(4, 8.0, np.float32))


def test_tensors_requiring_grad_are_accepted():
    w = torch.nn.Parameter(torch.ones(3))
    y = fastbn.batch_norm_forward(torch.randn(5, 3), w).y
    assert y.shape == (5, 3)


def test_mixed_libraries_are_rejected():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="weight: expected a numpy array like x, got torch"):
        fastbn.batch_norm_forward(x, torch.ones(3))
    with pytest.raises(TypeError, match="running_mean: expected a torch array like x"):
        fastbn.batch_norm_forward(torch.from_numpy(x), None, None, running_mean=np.zeros(3, np.float32),
                                  running_var=np.ones(3, np.float32))


class FakeDeviceArray:
    """A DLPack exporter claiming to live on cuda:0 (to test the device check here)."""

    def __init__(self, a, device=(1, 0)):
        self.a, self.device = a, device

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device


def test_mixed_devices_are_rejected():
    x = FakeDeviceArray(np.ones((4, 3), np.float32))
    w = FakeDeviceArray(np.ones(3, np.float32), device=(2, 0))
    with pytest.raises(ValueError, match="weight: is on cuda:0 but x is on cpu:0"):
        fastbn.batch_norm_forward(x, w)
    y = fastbn.batch_norm_forward(x, FakeDeviceArray(np.ones(3, np.float32))).y
    assert isinstance(y, np.ndarray)  # an unknown library without from_dlpack: NumPy back


# --- fastbn.torch -------------------------------------------------------------------------

fastbn_torch = pytest.importorskip("fastbn.torch")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 2, 3)])
def test_gradcheck(training, shape):
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(c, dtype=torch.float64, generator=g).add_(0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return fastbn_torch.batch_norm(x, None if training else rm, None if training else rv,
                                       w, b, training=training)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_functional_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g)
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    rm1, rv1 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    for _ in range(3):
        y1 = fastbn_torch.batch_norm(x, rm1, rv1, w, b, training=True, momentum=0.2)
        y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.2)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rm1, rm2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rv1, rv2, rtol=1e-10, atol=1e-12)


def small_cnn(bn2d):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), bn2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), bn2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))


def train(model, steps=20):
    g = torch.Generator().manual_seed(7)
    data = torch.randn(steps, 16, 3, 8, 8, generator=g)
    labels = torch.randint(0, 10, (steps, 16), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, t in zip(data, labels):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_small_cnn_trains_like_torch():
    torch.manual_seed(0)
    reference = small_cnn(torch.nn.BatchNorm2d)
    torch.manual_seed(0)
    ours = small_cnn(fastbn_torch.BatchNorm2d)
    losses_ref, losses_ours = train(reference), train(ours)
    np.testing.assert_allclose(losses_ours, losses_ref, rtol=2e-4, atol=2e-5)
    assert losses_ref[-1] < losses_ref[0]
    # state dicts interchange both ways, keys and all
    state = ours.state_dict()
    assert state.keys() == reference.state_dict().keys()
    torch.manual_seed(1)
    fresh_torch = small_cnn(torch.nn.BatchNorm2d)
    fresh_torch.load_state_dict(state)
    fresh_ours = small_cnn(fastbn_torch.BatchNorm2d)
    fresh_ours.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 8, 8)
    for m in (ours, fresh_torch, reference, fresh_ours):
        m.eval()
    torch.testing.assert_close(fresh_torch(x), ours(x))
    torch.testing.assert_close(fresh_ours(x), reference(x))


def test_convert_swaps_every_batch_norm_and_shares_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1),
                                                    torch.nn.BatchNorm3d(2, momentum=None)))
    weight = model[1].weight
    model.eval()
    converted = fastbn_torch.convert(model)
    assert type(converted[1]) is fastbn_torch.BatchNorm1d
    assert type(converted[2][1]) is fastbn_torch.BatchNorm3d
    assert converted[1].weight is weight and not converted[1].training
    assert converted[2][1].momentum is None
    converted.train()
    converted[1](torch.randn(5, 6))
    assert int(converted[1].num_batches_tracked) == 1


def test_momentum_none_and_no_running_stats_match_torch():
    x = [torch.randn(8, 3, 4) for _ in range(3)]
    for kwargs in (dict(momentum=None), dict(track_running_stats=False), dict(affine=False)):
        ref, ours = torch.nn.BatchNorm1d(3, **kwargs), fastbn_torch.BatchNorm1d(3, **kwargs)
        for xi in x:
            torch.testing.assert_close(ours(xi), ref(xi))
        torch.testing.assert_close(ours.state_dict(), ref.state_dict())
        ref.eval(), ours.eval()
        torch.testing.assert_close(ours(x[0]), ref(x[0]))
