"""The fast path for the common call: taken exactly when it should be, and bit for bit the
general path's results (fastbn._api.forward_any_array/backward_any_array, which the
public functions call when the fast path declines)."""
import numpy as np
import pytest

import fastbn
from fastbn import _api, _fastpath

pytestmark = pytest.mark.skipif(not fastbn.get_backend("cython").is_available()[0],
                                reason="the cython backend is not built here")

SHAPES = [(64, 16), (8, 16, 7), (4, 16, 5, 5), (2, 16, 3, 4, 5), (3, 1, 1000)]
AXES = [1, -1]


def _args(rng, shape, dtype):
    c = shape[1]
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    rm, rv = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype)
    return x, w, b, rm, rv


def _args_on(rng, shape, dtype, axis):
    """_args with the channels on ``axis`` (shape given channels second)."""
    if axis == 1:
        return _args(rng, shape, dtype)
    moved = shape[:1] + shape[2:] + shape[1:2]
    x, *vectors = _args(rng, shape, dtype)
    return (np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(moved), *vectors)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("axis", AXES)
def test_forward_equals_general_path(rng, shape, dtype, training, affine, axis):
    x, w, b, rm, rv = _args_on(rng, shape, dtype, axis)
    if not affine:
        w = b = None
    rm2, rv2 = rm.copy(), rv.copy()
    assert _fastpath.forward(x, w, b, rm.copy(), rv.copy(), training, 0.3, 1e-3, axis, None,
                             None, None, None) is not None
    fast = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                     training=training, momentum=0.3, eps=1e-3, axis=axis)
    assert fastbn.last_backend() == "cython"
    general = _api.forward_any_array(x, w, b, rm2, rv2, training, 0.3, 1e-3, axis, None, None,
                                     None, "cython")
    for got, want in zip(fast, general):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", AXES)
def test_backward_equals_general_path(rng, shape, dtype, axis):
    x, w, _, _, _ = _args_on(rng, shape, dtype, axis)
    dy = rng.normal(size=x.shape).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, axis=axis)
    assert _fastpath.backward(dy, x, mean, invstd, w, True, axis, None, None, False,
                              None) is not None
    for weight in (w, None):
        fast = fastbn.batch_norm_backward(dy, x, mean, invstd, weight=weight, axis=axis)
        general = _api.backward_any_array(dy, x, mean, invstd, weight, True, axis, None, None,
                                          False, "cython")
        for got, want in zip(fast, general):
            np.testing.assert_array_equal(got, want)


def _forward_variants(x, w, b, rm, rv):
    """Calls the fast path must leave to the general path (name, batch_norm_forward kwargs)."""
    c = x.shape[1]
    return [
        ("float16", dict(x=x.astype(np.float16))),
        ("byte-swapped", dict(x=x.astype(x.dtype.newbyteorder()))),
        ("non-contiguous", dict(x=np.asfortranarray(x))),
        ("subclass", dict(x=np.ma.masked_array(x))),
        ("axis out of range", dict(axis=3)),
        ("axis a float", dict(axis=1.0)),
        ("out", dict(out=np.empty_like(x))),
        ("activation", dict(activation="relu")),
        ("residual", dict(residual=np.zeros_like(x))),
        ("another backend named", dict(backend="numpy")),
        ("int eps", dict(eps=1)),
        ("int momentum", dict(momentum=1)),
        ("training=1", dict(training=1)),
        ("weight in float16", dict(weight=w.astype(np.float16))),
        ("weight too short", dict(weight=w[:-1])),
        ("strided running_mean", dict(running_mean=np.repeat(rm, 2)[::2])),
        ("read-only running_var", dict(running_var=_read_only(rv))),
        ("one value per channel", dict(x=x[:1, :, :1])),
        ("empty", dict(x=x[:0])),
    ]


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def test_unusual_calls_take_the_general_path(rng, monkeypatch):
    x, w, b, rm, rv = _args(rng, (4, 6, 3), "float32")
    base = dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv, training=True,
                momentum=0.1, eps=1e-5, axis=1, activation=None, residual=None, out=None,
                backend=None)
    assert _fastpath.forward(**base) is not None
    for name, change in _forward_variants(x, w, b, rm, rv):
        assert _fastpath.forward(**dict(base, **change)) is None, name
    assert _fastpath.forward(**dict(base, backend="cython")) is not None
    with fastbn.use_backend("numpy"):
        assert _fastpath.forward(**base) is None
    monkeypatch.setenv("FASTBN_BACKEND", "numpy")
    assert _fastpath.forward(**base) is None


def test_general_path_still_raises_what_it_raises(rng):
    x, w, b, rm, rv = _args(rng, (4, 6, 3), "float32")
    with pytest.raises(ValueError, match="running_var: expected a writable"):
        fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=_read_only(rv))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm_forward(x[:1, :, :1])
    with pytest.raises(ValueError, match="eps"):
        fastbn.batch_norm_forward(x, eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=float("nan"))
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_norm_forward(x, training=False)


def test_backward_variants_take_the_general_path(rng):
    x, w, _, _, _ = _args(rng, (4, 6, 3), "float32")
    dy = np.ones_like(x)
    _, mean, invstd = fastbn.batch_norm_forward(x, w)
    base = dict(dy=dy, x=x, mean=mean, invstd=invstd, weight=w, training=True, axis=1,
                activation=None, y=None, residual=False, backend=None)
    assert _fastpath.backward(**base) is not None
    for change in (dict(training=False), dict(dy=dy.astype(np.float64)),
                   dict(mean=mean.astype(np.float64)), dict(dy=np.asfortranarray(dy)),
                   dict(activation="relu", y=x), dict(residual=True), dict(axis=5),
                   dict(backend="numpy"), dict(dy=dy[:, :, :2])):
        assert _fastpath.backward(**dict(base, **change)) is None, change
