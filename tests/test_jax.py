"""JAX arrays through the core (read-only DLPack views) and the fastbn.jax adapter."""
import numpy as np
import pytest

import fastbn
from fastbn.testing import assert_close, direct_forward

jax = pytest.importorskip("jax", reason="jax not installed (pip install fastbn[jax])")
jnp = jax.numpy
fastbn_jax = pytest.importorskip("fastbn.jax")


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (6, 3, 5)).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    return x, w, b, g


def test_jax_arrays_in_jax_arrays_out(data):
    x, w, b, _ = data
    y, mean, invstd = fastbn.batch_norm_forward(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    assert isinstance(y, jax.Array) and isinstance(mean, jax.Array)
    assert_close(np.asarray(y), direct_forward(x, w, b)[0])


def test_immutable_outputs_are_a_clear_error(data):
    x = jnp.asarray(data[0])
    with pytest.raises(ValueError, match="running_mean: expected a writable array"):
        fastbn.batch_norm_forward(x, None, None, running_mean=jnp.zeros(3), running_var=jnp.ones(3))
    with pytest.raises(ValueError, match="out: expected a writable array"):
        fastbn.batch_norm_forward(x, out=jnp.zeros_like(x))
    # inference only reads them: fine
    fastbn.batch_norm_forward(x, None, None, running_mean=jnp.zeros(3), running_var=jnp.ones(3), training=False)


def _formula(x, w, b, eps=1e-5):
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * w[None, :, None] + b[None, :, None]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_matches_jax_autodiff(data, jit):
    x, w, b, g = (jnp.asarray(a) for a in data)

    def loss_fastbn(x, w, b):
        return (fastbn_jax.batch_norm(x, w, b).y * g).sum()

    def loss_formula(x, w, b):
        return (_formula(x, w, b) * g).sum()

    grad = jax.grad(loss_fastbn, argnums=(0, 1, 2))
    if jit:
        grad = jax.jit(grad)
    ours, theirs = grad(x, w, b), jax.grad(loss_formula, argnums=(0, 1, 2))(x, w, b)
    for name, a, t in zip(("dx", "dweight", "dbias"), ours, theirs):
        assert_close(np.asarray(a), np.asarray(t), "float32", err_msg=name)


def test_inference_grad_and_running_stats(data):
    x, w, b, g = (jnp.asarray(a) for a in data)
    rm, rv = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.0, 4.0, 0.25])
    result = fastbn_jax.batch_norm(x, w, b, rm, rv, training=True, momentum=0.3)
    x64 = np.asarray(x, np.float64)
    assert_close(np.asarray(result.running_mean), 0.7 * np.asarray(rm)
                 + 0.3 * x64.mean(axis=(0, 2)), "float32")
    assert_close(np.asarray(result.running_var), 0.7 * np.asarray(rv)
                 + 0.3 * x64.var(axis=(0, 2), ddof=1), "float32")

    def loss(x, w, b):
        return (fastbn_jax.batch_norm(x, w, b, rm, rv, training=False).y * g).sum()

    def formula(x, w, b):
        y = ((x - rm[None, :, None]) / jnp.sqrt(rv[None, :, None] + 1e-5) * w[None, :, None]
             + b[None, :, None])
        return (y * g).sum()
    for a, t in zip(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b),
                    jax.grad(formula, argnums=(0, 1, 2))(x, w, b)):
        assert_close(np.asarray(a), np.asarray(t), "float32")
