"""Property-based parity: random ranks, axes, sizes, strides, dtypes and options.

Every backend equals the NumPy reference (and the reference equals the formula)
within the dtype tolerance, forward and backward, and updates the running
statistics identically. `--hypothesis-profile=nightly` runs many more examples.
"""
import math

import numpy as np
import pytest

import fastbn
from fastbn._validate import STAT_DTYPE, numpy_dtype
from fastbn.testing import assert_close, direct_forward, mean_rounding, to_numpy

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed")
st = hypothesis.strategies

SIZES = [1, 2, 3, 4, 5, 7, 11, 13, 17]
MEMORY = ["C", "F", "permuted", "sliced", "negative"]


def lay_out(x, memory, rng):
    """The same logical array, in another memory order."""
    if memory == "F":
        return np.asfortranarray(x)
    if memory == "permuted":
        perm = rng.permutation(x.ndim)
        return np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    if memory == "sliced":
        return np.repeat(x, 2, axis=-1)[..., ::2]
    if memory == "negative":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    return x


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.sampled_from(SIZES)) for _ in range(ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    training = draw(st.booleans())
    if training:
        hypothesis.assume(math.prod(shape) // shape[axis] > 1)
    return dict(
        shape=shape, axis=axis, training=training,
        dtype=draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"])),
        momentum=draw(st.floats(0.0, 1.0)),
        eps=10.0 ** draw(st.floats(-6, -1)),
        affine=draw(st.booleans()),
        running=draw(st.booleans()) or not training,
        memory=draw(st.sampled_from(MEMORY)),
        # |loc|/scale stays <= 100: rounding the mean to float32 costs loc/scale * 6e-8
        loc=draw(st.floats(-10, 10)), scale=draw(st.floats(0.1, 10)),
        seed=draw(st.integers(0, 2 ** 32 - 1)))


def make(case):
    rng = np.random.default_rng(case["seed"])
    shape, axis, dtype = case["shape"], case["axis"] % len(case["shape"]), case["dtype"]
    c, stat = shape[axis], STAT_DTYPE[dtype]
    bshape = [1] * len(shape)
    bshape[axis] = c
    channel_loc = case["loc"] + rng.uniform(-1, 1, c).reshape(bshape)
    x = (rng.standard_normal(shape) * case["scale"] + channel_loc).astype(numpy_dtype(dtype))
    x = lay_out(x, case["memory"], rng)
    dy = rng.standard_normal(shape).astype(numpy_dtype(dtype))
    weight = rng.uniform(0.5, 1.5, c).astype(stat) if case["affine"] else None
    bias = rng.normal(size=c).astype(stat) if case["affine"] else None
    running = ((case["loc"] + rng.normal(size=c)).astype(stat),
               (case["scale"] ** 2 * rng.uniform(0.5, 2, c)).astype(stat)) \
        if case["running"] else (None, None)
    return x, dy, weight, bias, running


def run(backend, on_device, case, x, dy, weight, bias, running):
    rm, rv = (None if r is None else on_device(r.copy()) for r in running)
    dev = [None if a is None else on_device(a) for a in (x, dy, weight, bias)]
    y, mean, invstd = fastbn.batch_norm_forward(
        dev[0], dev[2], dev[3], running_mean=rm, running_var=rv, training=case["training"],
        momentum=case["momentum"], eps=case["eps"], axis=case["axis"], backend=backend)
    dx, dw, db = fastbn.batch_norm_backward(dev[1], dev[0], mean, invstd, weight=dev[2],
                                            training=case["training"], axis=case["axis"],
                                            backend=backend)
    return {k: None if v is None else to_numpy(v) for k, v in dict(
        y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv, dx=dx,
        dweight=dw, dbias=db).items()}


@hypothesis.given(case=cases())
def test_backend_matches_reference(backend, on_device, case):
    hypothesis.assume(case["dtype"] in fastbn.get_backend(backend).dtypes)  # what it declares
    data = make(case)
    got = run(backend, on_device, case, *data)
    want = run("numpy", lambda a: a, case, *data)
    dtype, stat = case["dtype"], STAT_DTYPE[case["dtype"]]
    # backends may round the float64 mean to float32 differently (the reference
    # rounds it, the compiled kernels fold the rounding into the shift)
    condition = mean_rounding(want["mean"], want["invstd"])
    for key, value in got.items():
        if value is None:
            assert want[key] is None
            continue
        assert value.shape == want[key].shape and value.dtype == want[key].dtype
        elementwise = key in ("y", "dx")
        assert_close(value, want[key], dtype if elementwise else stat, err_msg=key,
                     condition=condition if elementwise else 0.0)
    if case["training"]:  # and the reference itself against the formula
        x, _, weight, bias, _ = data
        assert_close(want["y"], direct_forward(x, weight, bias, case["eps"], case["axis"])[0],
                     dtype, err_msg="reference y vs formula", condition=condition)
