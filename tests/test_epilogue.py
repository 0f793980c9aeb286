"""Fused epilogues through the public API: y = relu(bn(x) + z) and its gradient.

Every backend (with its own epilogue kernels, or through the core's composition
for a backend without them) against the formula in float64, over the kit's
layouts, the four dtypes, training and inference; gradients also against finite
differences (float64).
"""
import numpy as np
import pytest

import fastbn
from fastbn.testing import assert_close, direct_backward, direct_forward
from fastbn.testing._helpers import numpy_dtype
from fastbn.testing._kit import LAYOUTS

DTYPES = ["float16", "bfloat16", "float32", "float64"]
EPILOGUES = {"relu": ("relu", False), "add": (None, True), "add+relu": ("relu", True)}


def _served(backend, dtype):
    if dtype not in fastbn.get_backend(backend).dtypes:
        pytest.skip(f"backend {backend!r} does not serve {dtype}")


def _inputs(rng, layout, dtype, on_device):
    shape, axis, memory = LAYOUTS[layout]
    dt = numpy_dtype(dtype)
    x = rng.normal(0.5, 2.0, shape).astype(dt)
    z = rng.normal(0.0, 1.0, shape).astype(dt)
    dy = rng.normal(0.0, 1.0, shape).astype(dt)
    if memory:
        x, z, dy = memory(x), memory(z), memory(dy)
    c = shape[axis]
    stat = np.float64 if dtype == "float64" else np.float32
    w = rng.uniform(0.5, 1.5, c).astype(stat)
    b = rng.normal(0.0, 0.5, c).astype(stat)
    return [on_device(a) for a in (x, z, dy, w, b)], axis


def _relu64(v):
    return np.maximum(v, 0.0)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_backward_match_the_formula(backend, on_device, rng, layout, dtype,
                                                training, epilogue):
    _served(backend, dtype)
    activation, add = EPILOGUES[epilogue]
    (x, z, dy, w, b), axis = _inputs(rng, layout, dtype, on_device)
    c = w.shape[0]
    rm, rv = on_device(np.linspace(0.0, 1.0, c).astype(w.dtype)), on_device(
        np.linspace(0.5, 2.0, c).astype(w.dtype))
    residual = z if add else None
    y, mean, invstd = fastbn.batch_norm_forward(
        x, w, b, running_mean=rm, running_var=rv, training=training, axis=axis,
        activation=activation, residual=residual, backend=backend)
    x64, z64, dy64 = (_host(a).astype(np.float64) for a in (x, z, dy))
    w64, b64 = _host(w).astype(np.float64), _host(b).astype(np.float64)
    if training:
        bn64 = direct_forward(x64, w64, b64, axis=axis)[0]
    else:
        shape = [1] * x64.ndim
        shape[axis] = c
        scale = (w64 / np.sqrt(np.linspace(0.5, 2.0, c) + 1e-5)).reshape(shape)
        bn64 = (x64 - np.linspace(0.0, 1.0, c).reshape(shape)) * scale + b64.reshape(shape)
    want = bn64 + (z64 if add else 0.0)
    if activation:
        want = _relu64(want)
    assert_close(_host(y), want, dtype, err_msg=f"{backend} y")
    assert _host(y).dtype == _host(x).dtype and y.shape == x.shape

    grads = fastbn.batch_norm_backward(
        dy, x, mean, invstd, weight=w, training=training, axis=axis, activation=activation,
        y=y if activation else None, residual=add, backend=backend)
    # the mask comes from the output the caller saved: exactly dy or 0
    g64 = np.where(_host(y).astype(np.float64) > 0, dy64, 0.0) if activation else dy64
    if training:
        dx64, dw64, db64 = direct_backward(g64, x64, w64, axis=axis)
    else:
        axes = tuple(a for a in range(x64.ndim) if a != axis)
        shape = [1] * x64.ndim
        shape[axis] = c
        inv = _host(invstd).astype(np.float64).reshape(shape)
        dx64 = g64 * inv * w64.reshape(shape)
        xhat = (x64 - _host(mean).astype(np.float64).reshape(shape)) * inv
        dw64, db64 = (g64 * xhat).sum(axis=axes), g64.sum(axis=axes)
    n = x64.size // c
    assert_close(_host(grads.dx), dx64, dtype, err_msg=f"{backend} dx")
    assert_close(_host(grads.dweight), dw64, dtype, err_msg=f"{backend} dweight",
                 condition=np.sqrt(n))
    assert_close(_host(grads.dbias), db64, dtype, err_msg=f"{backend} dbias",
                 condition=np.sqrt(n))
    if add:
        assert isinstance(grads, fastbn.ResidualBackwardResult)
        np.testing.assert_array_equal(_host(grads.dresidual).astype(np.float64), g64)
    else:
        assert len(grads) == 3


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_gradients_match_finite_differences(backend, on_device, rng, epilogue):
    """d/dx, d/dz, d/dweight, d/dbias of sum(c * y), float64, training."""
    _served(backend, "float64")
    activation, add = EPILOGUES[epilogue]
    (x, z, dy, w, b), axis = _inputs(rng, "NCL", "float64", on_device)
    x, z, dy, w, b = (_host(a) for a in (x, z, dy, w, b))

    def loss(x_, z_, w_, b_):
        y = fastbn.batch_norm_forward(
            on_device(x_), on_device(w_), on_device(b_), axis=axis, activation=activation,
            residual=on_device(z_) if add else None, backend=backend).y
        return float((_host(y) * dy).sum())

    y, mean, invstd = fastbn.batch_norm_forward(
        on_device(x), on_device(w), on_device(b), axis=axis, activation=activation,
        residual=on_device(z) if add else None, backend=backend)
    grads = fastbn.batch_norm_backward(
        on_device(dy), on_device(x), mean, invstd, weight=on_device(w), axis=axis,
        activation=activation, y=y if activation else None, residual=add, backend=backend)
    args = [x, z, w, b]
    analytic = [grads.dx, grads.dresidual if add else None, grads.dweight, grads.dbias]
    h = 1e-6
    for i, got in enumerate(analytic):
        if got is None:
            continue
        base = args[i]
        numeric = np.empty_like(base)
        for j in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[j] += h
            minus[j] -= h
            numeric[j] = (loss(*args[:i], plus, *args[i + 1:])
                          - loss(*args[:i], minus, *args[i + 1:])) / (2 * h)
        np.testing.assert_allclose(_host(got), numeric, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{backend} gradient {i}")


@pytest.mark.parametrize("layout", ["NCHW", "NC", "NHWC"])
def test_relu_keeps_nan_and_masks_at_zero(backend, on_device, rng, layout):
    """relu(NaN) is NaN (torch.relu), in its channel only; y == 0 passes no gradient."""
    _served(backend, "float32")
    (x, z, dy, w, b), axis = _inputs(rng, layout, "float32", on_device)
    x = _host(x).copy()
    index = [0] * x.ndim
    x[tuple(index)] = np.nan
    rm = on_device(np.zeros(w.shape[0], np.float32))
    rv = on_device(np.ones(w.shape[0], np.float32))
    y = _host(fastbn.batch_norm_forward(on_device(x), running_mean=rm, running_var=rv,
                                        training=False, axis=axis, activation="relu",
                                        backend=backend).y)
    assert np.isnan(y[tuple(index)])
    assert np.isnan(y).sum() == 1
    # y exactly 0 (x = 0 with running mean 0): the gradient is masked there, as torch
    x0 = np.zeros_like(x)
    y0 = fastbn.batch_norm_forward(on_device(x0), running_mean=rm, running_var=rv,
                                   training=False, axis=axis, activation="relu",
                                   backend=backend).y
    assert not _host(y0).any()
    ones = on_device(np.ones_like(x0))
    grads = fastbn.batch_norm_backward(ones, on_device(x0), rm, on_device(np.ones_like(_host(rv))),
                                       training=False, axis=axis, activation="relu", y=y0,
                                       residual=True, backend=backend)
    assert not _host(grads.dx).any() and not _host(grads.dresidual).any()


def test_out_may_be_the_residual_or_x(rng):
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    z = rng.normal(size=(4, 3, 5)).astype(np.float32)
    want = np.maximum(direct_forward(x)[0] + z, 0)
    z_in = z.copy()
    y = fastbn.batch_norm_forward(x, residual=z_in, activation="relu", out=z_in).y
    assert y is z_in
    assert_close(z_in, want, "float32")
    x_in = x.copy()
    fastbn.batch_norm_forward(x_in, residual=z, activation="relu", out=x_in)
    assert_close(x_in, want, "float32")


def test_bad_epilogue_arguments_name_the_argument(rng):
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    with pytest.raises(fastbn.ArgumentError, match="activation"):
        fastbn.batch_norm_forward(x, activation="gelu")
    with pytest.raises(fastbn.ArgumentTypeError, match="activation"):
        fastbn.batch_norm_forward(x, activation=True)
    with pytest.raises(fastbn.ArgumentError, match="residual"):
        fastbn.batch_norm_forward(x, residual=x[:2])
    with pytest.raises(fastbn.ArgumentTypeError, match="residual"):
        fastbn.batch_norm_forward(x, residual=x.astype(np.float64))
    buf = np.zeros((5, 3, 5), np.float32)
    with pytest.raises(fastbn.ArgumentError, match="out: overlaps residual"):
        fastbn.batch_norm_forward(x, residual=buf[1:], out=buf[:4])
    assert not buf.any()  # nothing half-written
    _, mean, invstd = fastbn.batch_norm_forward(x)
    with pytest.raises(fastbn.ArgumentError, match="y"):
        fastbn.batch_norm_backward(x, x, mean, invstd, activation="relu")
    with pytest.raises(fastbn.ArgumentError, match="y"):
        fastbn.batch_norm_backward(x, x, mean, invstd, y=x)
    with pytest.raises(fastbn.ArgumentTypeError, match="residual"):
        fastbn.batch_norm_backward(x, x, mean, invstd, residual=x)


def test_empty_batch_with_epilogue():
    x = np.empty((0, 3, 4), np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, residual=x, activation="relu")
    assert y.shape == x.shape
    grads = fastbn.batch_norm_backward(x, x, mean, invstd, activation="relu", y=y,
                                       residual=True)
    assert grads.dresidual.shape == x.shape and not grads.dweight.any()


def test_layer_with_activation_and_residual(backend, on_device, rng):
    _served(backend, "float32")
    x = rng.normal(1.0, 2.0, (8, 3, 5)).astype(np.float32)
    z = rng.normal(size=x.shape).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    bn = fastbn.BatchNorm(3, activation="relu", backend=backend)
    plain = fastbn.BatchNorm(3, backend="numpy")
    assert "activation='relu'" in repr(bn)
    y = _host(bn(on_device(x), on_device(z)))
    y_plain = plain(x) + z
    assert_close(y, np.maximum(y_plain, 0), "float32")
    assert_close(bn.running_mean if isinstance(bn.running_mean, np.ndarray)
                 else _host(bn.running_mean), plain.running_mean, "float32")
    dx, dz = bn.backward(on_device(dy))
    g = np.where(y > 0, dy, 0)
    assert_close(_host(dx), plain.backward(g), "float32")
    np.testing.assert_array_equal(_host(dz), g)
    # without a residual, backward returns dx alone
    bn(on_device(x))
    assert _host(bn.backward(on_device(dy))).shape == x.shape

