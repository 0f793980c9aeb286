"""The hostile-input catalogue: every validation error, as one table per function.

Each case asserts the exception type, a message naming the argument, and that
no running statistic or ``out`` changed. Every error is also a RuntimeError (the
class PyTorch raises). Decisions recorded here: ``out=x`` normalizes in place, a
partial overlap is an error; a zero-size batch is not an error (tests/test_views.py).
"""
import numpy as np
import pytest

import fastbn

C = 3


def good_forward_args():
    rng = np.random.default_rng(0)
    return dict(x=rng.normal(size=(4, C, 5)).astype(np.float32),
                weight=np.ones(C, np.float32), bias=np.zeros(C, np.float32),
                running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32),
                out=np.zeros((4, C, 5), np.float32))


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


# (id, changes to the good arguments, exception, words the message must contain)
FORWARD_CASES = [
    ("x-list", dict(x=[[1.0, 2.0], [3.0, 4.0]]), TypeError, ["x", "list"]),
    ("x-int", dict(x=np.ones((4, C, 5), np.int64), out=None), TypeError, ["x", "int64"]),
    ("x-bool", dict(x=np.ones((4, C, 5), bool), out=None), TypeError, ["x", "bool"]),
    ("x-complex", dict(x=np.ones((4, C, 5), np.complex64), out=None), TypeError,
     ["x", "complex64"]),
    ("x-object", dict(x=np.ones((4, C, 5), object), out=None), TypeError, ["x", "object"]),
    ("x-rank1", dict(x=np.ones(C, np.float32), out=None), ValueError, ["x", "rank"]),
    ("x-rank0", dict(x=np.float32(1.0), out=None), TypeError, ["x"]),
    ("x-rank0-array", dict(x=np.array(1.0, np.float32), out=None), ValueError, ["x", "rank"]),
    ("x-float128", dict(x=np.ones((4, C, 5), np.longdouble), out=None), TypeError,
     ["x", "float128"]),
    ("x-str", dict(x="abc", out=None), TypeError, ["x", "str"]),
    ("axis-out-of-range", dict(axis=3), ValueError, ["axis", "3"]),
    ("axis-float", dict(axis=1.0), TypeError, ["axis", "float"]),
    ("axis-wrong-channels", dict(axis=2), ValueError, ["weight", "(5,)"]),
    ("weight-shape", dict(weight=np.ones(C + 1, np.float32)), ValueError,
     ["weight", f"({C},)", f"({C + 1},)"]),
    ("weight-2d", dict(weight=np.ones((C, 1), np.float32)), ValueError, ["weight"]),
    ("weight-dtype", dict(weight=np.ones(C, np.float64)), TypeError, ["weight", "float64"]),
    ("mixed-bias-float16", dict(bias=np.ones(C, np.float16)), TypeError, ["bias", "float16"]),
    ("weight-int", dict(weight=np.ones(C, np.int32)), TypeError, ["weight", "int32"]),
    ("weight-list", dict(weight=[1.0] * C), TypeError, ["weight", "list"]),
    ("bias-shape", dict(bias=np.ones(C - 1, np.float32)), ValueError, ["bias"]),
    ("running_mean-alone", dict(running_var=None), ValueError, ["running_var", "running_mean"]),
    ("running_var-alone", dict(running_mean=None), ValueError, ["running_mean", "running_var"]),
    ("running_mean-shape", dict(running_mean=np.zeros(C + 2, np.float32)), ValueError,
     ["running_mean", f"({C},)"]),
    ("running_var-dtype", dict(running_var=np.ones(C, np.float64)), TypeError,
     ["running_var", "float64"]),
    ("running-stats-float32-for-float64-x",
     dict(x=np.ones((4, C, 5)), out=None, weight=None, bias=None), TypeError,
     ["running_mean", "float32"]),
    ("running_var-readonly", dict(running_var=_readonly(np.ones(C, np.float32))), ValueError,
     ["running_var", "read-only"]),
    ("running_mean-readonly", dict(running_mean=_readonly(np.zeros(C, np.float32))), ValueError,
     ["running_mean", "read-only"]),
    ("eps-zero", dict(eps=0.0), ValueError, ["eps"]),
    ("eps-negative", dict(eps=-1e-5), ValueError, ["eps"]),
    ("eps-nan", dict(eps=float("nan")), ValueError, ["eps", "nan"]),
    ("eps-inf", dict(eps=float("inf")), ValueError, ["eps", "inf"]),
    ("eps-str", dict(eps="1e-5"), TypeError, ["eps", "str"]),
    ("momentum-inf", dict(momentum=float("inf")), ValueError, ["momentum", "inf"]),
    ("momentum-nan", dict(momentum=float("nan")), ValueError, ["momentum"]),
    ("momentum-none", dict(momentum=None), TypeError, ["momentum"]),
    ("training-str", dict(training="yes"), TypeError, ["training", "str"]),
    ("out-shape", dict(out=np.zeros((4, C, 6), np.float32)), ValueError, ["out", "shape"]),
    ("out-dtype", dict(out=np.zeros((4, C, 5), np.float64)), TypeError, ["out", "float64"]),
    ("out-list", dict(out=[0.0] * 60), TypeError, ["out", "list"]),
    ("out-readonly", dict(out=_readonly(np.zeros((4, C, 5), np.float32))), ValueError,
     ["out", "read-only"]),
    ("one-value-per-channel", dict(x=np.ones((1, C), np.float32), out=None), ValueError,
     ["x", "more than 1 value per channel"]),
    ("one-value-per-channel-nchw", dict(x=np.ones((1, C, 1, 1), np.float32), out=None),
     ValueError, ["x", "more than 1 value per channel"]),
    ("unknown-backend", dict(backend="no-such-backend"), ValueError,
     ["backend", "no-such-backend"]),
    ("backend-not-a-name", dict(backend=3), TypeError, ["backend"]),
]


@pytest.mark.parametrize("changes,exc,words", [c[1:] for c in FORWARD_CASES],
                         ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects(backend, changes, exc, words):
    args = good_forward_args()
    args.update(changes)
    args.setdefault("backend", backend)
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc) as info:
        fastbn.batch_norm_forward(args.pop("x"), **args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert isinstance(info.value, RuntimeError), "except RuntimeError (torch's) must catch it"
    for key, value in before.items():  # nothing half-written
        if key in args and args[key] is not None:
            np.testing.assert_array_equal(args[key], value, err_msg=f"{key} was modified")


def test_out_overlapping_x_is_rejected():
    buf = np.random.default_rng(1).normal(size=(4, C, 6)).astype(np.float32)
    x, out = buf[..., :5], buf[..., 1:]
    before = buf.copy()
    with pytest.raises(ValueError, match="out: overlaps x"):
        fastbn.batch_norm_forward(x, out=out)
    np.testing.assert_array_equal(buf, before)


def test_inference_needs_running_stats():
    x = np.ones((4, C), np.float32)
    with pytest.raises(ValueError, match="running_mean.*training=False"):
        fastbn.batch_norm_forward(x, training=False)


def test_read_only_running_stats_allowed_in_inference():
    x = np.random.default_rng(0).normal(size=(4, C)).astype(np.float32)
    rm, rv = _readonly(np.zeros(C, np.float32)), _readonly(np.ones(C, np.float32))
    y = fastbn.batch_norm(x, rm, rv, training=False)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_zero_size_batch_in_inference_gives_empty_output():
    y = fastbn.batch_norm(np.ones((0, C, 4), np.float32), np.zeros(C, np.float32),
                          np.ones(C, np.float32), training=False)
    assert y.shape == (0, C, 4)


def test_inference_with_one_value_per_channel_is_fine():
    y = fastbn.batch_norm(np.ones((1, C), np.float32), np.zeros(C, np.float32),
                          np.ones(C, np.float32), training=False)
    assert y.shape == (1, C)


BACKWARD_CASES = [
    ("dy-shape", dict(dy=np.ones((4, C, 6), np.float32)), ValueError, ["dy", "shape"]),
    ("dy-dtype", dict(dy=np.ones((4, C, 5), np.float64)), TypeError, ["dy", "float64"]),
    ("dy-list", dict(dy=[1.0]), TypeError, ["dy", "list"]),
    ("mean-none", dict(mean=None), TypeError, ["mean"]),
    ("mean-shape", dict(mean=np.zeros(C + 1, np.float32)), ValueError, ["mean", f"({C},)"]),
    ("invstd-int", dict(invstd=np.ones(C, np.int64)), TypeError, ["invstd", "int64"]),
    ("weight-shape", dict(weight=np.ones(1, np.float32)), ValueError, ["weight"]),
    ("x-int", dict(x=np.ones((4, C, 5), np.int32)), TypeError, ["x", "int32"]),
    ("axis-bad", dict(axis=-4), ValueError, ["axis", "-4"]),
    ("training-int", dict(training=1), TypeError, ["training", "int"]),
]


@pytest.mark.parametrize("changes,exc,words", [c[1:] for c in BACKWARD_CASES],
                         ids=[c[0] for c in BACKWARD_CASES])
def test_backward_rejects(backend, changes, exc, words):
    rng = np.random.default_rng(0)
    args = dict(dy=rng.normal(size=(4, C, 5)).astype(np.float32),
                x=rng.normal(size=(4, C, 5)).astype(np.float32),
                mean=np.zeros(C, np.float32), invstd=np.ones(C, np.float32),
                weight=np.ones(C, np.float32), backend=backend)
    args.update(changes)
    with pytest.raises(exc) as info:
        fastbn.batch_norm_backward(args.pop("dy"), args.pop("x"), args.pop("mean"),
                                   args.pop("invstd"), **args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_same_error_on_every_backend():
    """The reference and every other backend refuse the same input the same way."""
    x = np.ones((4, C + 1, 2), np.float32)
    messages = set()
    for info in fastbn.backends():
        if info.available and "cpu" in info.devices:
            with pytest.raises(ValueError) as err:
                fastbn.batch_norm_forward(x, np.ones(C, np.float32), backend=info.name)
            messages.add(str(err.value))
    assert len(messages) == 1
