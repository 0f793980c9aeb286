"""Every backend against the NumPy reference and against the formula written out.

Layouts x dtypes x training/inference x running statistics x backward; the
tolerances all come from fastbn.testing.tolerance.
"""
import numpy as np
import pytest

import fastbn
from fastbn._validate import STAT_DTYPE, canonical
from fastbn.testing import assert_close, direct_backward, direct_forward, to_numpy

DTYPES = ["float16", "float32", "float64"]


def _channels_last(shape):
    """An NCHW-shaped array whose memory is NHWC (as torch's channels_last)."""
    def make(a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(0, 3, 1, 2)
    return make


# name -> (logical shape, channel axis, memory transform of a C-contiguous array)
LAYOUTS = {
    "NC": ((16, 6), 1, None),
    "NCL": ((4, 6, 9), 1, None),
    "NCHW": ((3, 6, 5, 7), 1, None),
    "NCDHW": ((2, 6, 3, 4, 5), 1, None),
    "NHWC": ((3, 5, 7, 6), -1, None),
    "NCHW-channels_last": ((3, 6, 5, 7), 1, _channels_last((3, 6, 5, 7))),
    "NCHW-strided": ((3, 6, 5, 7), 1, lambda a: np.repeat(a, 2, axis=3)[..., ::2]),
    "NCL-reversed": ((4, 6, 9), 1, lambda a: np.ascontiguousarray(a[:, :, ::-1])[:, :, ::-1]),
}


def make_input(rng, layout, dtype):
    """Channels with different means and scales, so a channel mix-up shows."""
    shape, axis, memory = LAYOUTS[layout]
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    loc = rng.uniform(-3, 3, c).reshape(bshape)
    scale = rng.uniform(0.5, 2.0, c).reshape(bshape)
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    if memory is not None:
        x = memory(x)
        assert x.shape == shape
    return x, axis, c


def make_params(rng, c, dtype):
    stat = STAT_DTYPE[dtype]
    weight = rng.uniform(0.5, 1.5, c).astype(stat)
    bias = rng.normal(size=c).astype(stat)
    running_mean = rng.normal(size=c).astype(stat)
    running_var = rng.uniform(0.5, 2.0, c).astype(stat)
    return weight, bias, running_mean, running_var


def forward_on(backend, on_device, x, params, **kw):
    w, b, rm, rv = (on_device(p.copy()) for p in params)
    result = fastbn.batch_norm_forward(on_device(x), w, b, running_mean=rm, running_var=rv, backend=backend, **kw)
    assert fastbn.last_backend() == backend
    return [to_numpy(a) for a in (*result, rm, rv)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_training(backend, on_device, rng, layout, dtype):
    x, axis, c = make_input(rng, layout, dtype)
    params = make_params(rng, c, dtype)
    momentum, eps = 0.2, 1e-3
    y, mean, invstd, rm, rv = forward_on(backend, on_device, x, params, training=True,
                                         momentum=momentum, eps=eps, axis=axis)
    ref = forward_on("numpy", lambda a: a, x, params, training=True,
                     momentum=momentum, eps=eps, axis=axis)
    stat = STAT_DTYPE[dtype]
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.dtype == invstd.dtype == np.dtype(stat)
    for got, want, name in zip((y, mean, invstd, rm, rv), ref, ("y", "mean", "invstd",
                                                                 "running_mean", "running_var")):
        assert_close(got, want, dtype if name == "y" else stat, err_msg=name)

    # ... and the formula, independent of canonical views and kernels
    w, b, rm0, rv0 = params
    y_direct, mean_direct, var_direct = direct_forward(x, w, b, eps=eps, axis=axis)
    n = x.size // c
    assert_close(y, y_direct, dtype, err_msg="y vs formula")
    assert_close(mean, mean_direct, stat, err_msg="mean vs formula")
    assert_close(invstd, 1 / np.sqrt(var_direct + eps), stat, err_msg="invstd vs formula")
    assert_close(rm, (1 - momentum) * rm0 + momentum * mean_direct, stat)
    assert_close(rv, (1 - momentum) * rv0 + momentum * var_direct * n / (n - 1), stat)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_inference(backend, on_device, rng, layout, dtype):
    x, axis, c = make_input(rng, layout, dtype)
    params = make_params(rng, c, dtype)
    y, mean, invstd, rm, rv = forward_on(backend, on_device, x, params, training=False,
                                         eps=1e-4, axis=axis)
    w, b, rm0, rv0 = params
    np.testing.assert_array_equal(rm, rm0)  # inference leaves running stats alone
    np.testing.assert_array_equal(rv, rv0)
    ref = forward_on("numpy", lambda a: a, x, params, training=False, eps=1e-4, axis=axis)
    assert_close(y, ref[0], dtype)
    bshape = [1] * x.ndim
    bshape[axis] = c
    x64 = x.astype(np.float64)
    y_direct = ((x64 - rm0.reshape(bshape)) / np.sqrt(rv0.reshape(bshape) + 1e-4)
                * w.reshape(bshape) + b.reshape(bshape))
    assert_close(y, y_direct, dtype)
    assert_close(mean, rm0, STAT_DTYPE[dtype])
    assert_close(invstd, 1 / np.sqrt(rv0.astype(np.float64) + 1e-4), STAT_DTYPE[dtype])


def backward_on(backend, on_device, dy, x, mean, invstd, w, **kw):
    result = fastbn.batch_norm_backward(on_device(dy), on_device(x), on_device(mean),
                                        on_device(invstd), weight=on_device(w), backend=backend, **kw)
    assert fastbn.last_backend() == backend
    return [to_numpy(a) for a in result]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward(backend, on_device, rng, layout, dtype, training):
    x, axis, c = make_input(rng, layout, dtype)
    w = make_params(rng, c, dtype)[0]
    dy = rng.standard_normal(x.shape).astype(dtype)
    stat = STAT_DTYPE[dtype]
    eps = 1e-3
    if training:
        _, mean, var = direct_forward(x, eps=eps, axis=axis)
    else:
        mean, var = rng.normal(size=c), rng.uniform(0.5, 2, c)
    mean, invstd = mean.astype(stat), (1 / np.sqrt(var + eps)).astype(stat)
    dx, dw, db = backward_on(backend, on_device, dy, x, mean, invstd, w, training=training,
                             axis=axis)
    ref = backward_on("numpy", lambda a: a, dy, x, mean, invstd, w, training=training, axis=axis)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, ref[0], dtype, err_msg="dx")
    assert_close(dw, ref[1], stat, err_msg="dweight")
    assert_close(db, ref[2], stat, err_msg="dbias")

    bshape = [1] * x.ndim
    bshape[axis] = c
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    xhat = (x.astype(np.float64) - mean.reshape(bshape)) * invstd.reshape(bshape)
    if training:
        dx_direct = direct_backward(dy, x, w, eps=eps, axis=axis)[0]
    else:
        dx_direct = dy.astype(np.float64) * (invstd * w).reshape(bshape)
    assert_close(dx, dx_direct, dtype, err_msg="dx vs formula")
    assert_close(dw, (dy * xhat).sum(axis=axes), stat, err_msg="dweight vs formula")
    assert_close(db, dy.astype(np.float64).sum(axis=axes), stat, err_msg="dbias vs formula")


def _numeric_gradient(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every element of a (in place)."""
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        orig = a[idx]
        a[idx] = orig + h
        up = f()
        a[idx] = orig - h
        down = f()
        a[idx] = orig
        grad[idx] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["NCL", "NHWC"])
def test_backward_matches_finite_differences(backend, on_device, rng, layout, training):
    if "float64" not in fastbn.get_backend(backend).dtypes:
        pytest.skip(f"backend {backend!r} has no float64 kernels")
    shape, axis = {"NCL": ((3, 4, 5), 1), "NHWC": ((2, 3, 2, 4), -1)}[layout]
    x = rng.normal(1.0, 2.0, shape)
    c = shape[axis]
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    g = rng.standard_normal(shape)  # loss = sum(g * y)

    def loss():
        y = fastbn.batch_norm_forward(on_device(x), on_device(w), on_device(b),
                                      running_mean=on_device(rm.copy()), running_var=on_device(rv.copy()),
                                      training=training, axis=axis, backend=backend).y
        return float((to_numpy(y) * g).sum())

    _, mean, invstd = fastbn.batch_norm_forward(on_device(x), on_device(w), on_device(b),
                                                running_mean=on_device(rm.copy()), running_var=on_device(rv.copy()),
                                                training=training, axis=axis, backend=backend)
    dx, dw, db = backward_on(backend, on_device, g, x, to_numpy(mean), to_numpy(invstd), w,
                             training=training, axis=axis)
    np.testing.assert_allclose(dx, _numeric_gradient(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, _numeric_gradient(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, _numeric_gradient(loss, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_running_stats_follow_pytorch_rule(backend, on_device, rng, dtype):
    """Five steps against PyTorch's documented update, written out here."""
    c, momentum = 5, 0.3
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    rm_d, rv_d = on_device(rm.copy()), on_device(rv.copy())
    for step in range(5):
        x = rng.normal(step, 1 + step, (8, c, 3)).astype(dtype)
        fastbn.batch_norm(on_device(x), rm_d, rv_d, training=True, momentum=momentum,
                          backend=backend)
        batch_mean = x.astype(np.float64).mean(axis=(0, 2))
        batch_var_unbiased = x.astype(np.float64).var(axis=(0, 2), ddof=1)
        rm = (1 - momentum) * rm + momentum * batch_mean
        rv = (1 - momentum) * rv + momentum * batch_var_unbiased
    assert_close(rm_d, rm, dtype)
    assert_close(rv_d, rv, dtype)


@pytest.mark.parametrize("mean", [1e4, 1e5])
def test_large_mean_float32_is_stable(backend, on_device, rng, mean):
    """|mean|/std = 1e4: a naive E[x^2] - E[x]^2 in float32 gives garbage here."""
    x = (rng.standard_normal((16, 4, 32, 32)) + mean).astype(np.float32)
    y = to_numpy(fastbn.batch_norm_forward(on_device(x), backend=backend).y)
    y_direct = direct_forward(x)[0]
    # rounding x to float32 at 1e5 alone costs ~4e-3 of a unit std; allow 2e-3 per 1e4
    assert np.max(np.abs(y - y_direct)) < 2e-3 * mean / 1e4


def test_out_argument(backend, on_device, rng):
    x, axis, c = make_input(rng, "NCHW", "float32")
    xd = on_device(x)
    out = on_device(np.full_like(x, np.nan))
    result = fastbn.batch_norm_forward(xd, out=out, backend=backend)
    assert result.y is out
    assert_close(out, direct_forward(x)[0], "float32")
    # out may be x itself: normalize in place
    fastbn.batch_norm_forward(xd, out=xd, backend=backend)
    assert_close(xd, direct_forward(x)[0], "float32")


def test_out_with_other_memory_layout(rng):
    """A non-contiguous out is filled through a buffer."""
    x, _, _ = make_input(rng, "NCHW", "float64")
    out_mem = np.full((3, 6, 5, 14), np.nan)
    out = out_mem[..., ::2]
    fastbn.batch_norm_forward(x, out=out)
    assert_close(out, direct_forward(x)[0], "float64")
    assert np.isnan(out_mem[..., 1::2]).all()


def test_channels_last_is_viewed_without_copy_and_kept(backend, on_device, rng):
    x, axis, c = make_input(rng, "NCHW-channels_last", "float32")
    view = canonical(x, 1)
    assert view.family == "rows" and view.x3.shape == (3 * 5 * 7, 6, 1)
    assert np.shares_memory(view.x3, x)
    y = fastbn.batch_norm_forward(x).y
    assert np.moveaxis(y, 1, -1).flags.c_contiguous  # output keeps the memory format


def test_read_only_input_works(backend, on_device, rng):
    if "cpu" not in fastbn.get_backend(backend).devices:
        pytest.skip("only host arrays have a read-only flag")
    x, _, _ = make_input(rng, "NCHW", "float64")
    x.setflags(write=False)
    y = fastbn.batch_norm_forward(x, backend=backend).y
    assert_close(y, direct_forward(x)[0], "float64")


def test_float16_parameters_accepted(rng):
    x, _, c = make_input(rng, "NCL", "float16")
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    y = fastbn.batch_norm_forward(x, w.astype(np.float16), b.astype(np.float16)).y
    assert_close(y, direct_forward(x, w.astype(np.float16), b.astype(np.float16))[0], "float16")
