"""JAX adapter: fastbn batch norm as a differentiable, jit-able JAX function.

    import fastbn.jax
    y, running_mean, running_var = fastbn.jax.batch_norm(x, weight, bias, running_mean,
                                                         running_var, training=True)

JAX arrays are immutable, so the running statistics come back updated instead
of being written in place. The kernels run through ``jax.pure_callback`` (on
the host: CPU arrays) and the gradient is fastbn's backward, wired in with
``jax.custom_vjp``; it works under ``jax.grad``, ``jax.jit`` and ``jax.vmap``
(sequentially). jax is imported when this module is, never by ``import fastbn``.
"""
from functools import partial
from typing import Any, NamedTuple

try:
    import jax
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ._hints import install_hint
    raise ImportError(f"fastbn.jax needs JAX: {install_hint('jax', 'jax')}") from exc
import jax.numpy as jnp
import numpy as np

from . import _api


__all__ = ["BatchNormResult", "batch_norm"]


class BatchNormResult(NamedTuple):
    """``y`` and the running statistics after this call (None when not tracked)."""

    y: Any
    running_mean: Any
    running_var: Any


def _stat_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _callback(fn, shapes, *args):
    return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")


def _forward_host(x, weight, bias, mean, var, training, eps, axis):
    """numpy in, numpy out: fastbn's forward (running stats, if any, are inputs only)."""
    result = _api.batch_norm_forward(np.asarray(x), np.asarray(weight), np.asarray(bias),
                                     running_mean=None if mean is None else np.array(mean),
                                     running_var=None if var is None else np.array(var),
                                     training=training, eps=eps, axis=axis)
    return tuple(np.asarray(a) for a in result)


def _backward_host(dy, x, mean, invstd, weight, training, axis):
    result = _api.batch_norm_backward(np.asarray(dy), np.asarray(x), np.asarray(mean),
                                      np.asarray(invstd), weight=np.asarray(weight),
                                      training=training, axis=axis)
    return tuple(np.asarray(a) for a in result)


def _out_shapes(x, axis):
    stat = _stat_dtype(x)
    c = x.shape[axis]
    return (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((c,), stat),
            jax.ShapeDtypeStruct((c,), stat))


def _grad_shapes(x, weight):
    return (jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(weight.shape, _stat_dtype(x)),
            jax.ShapeDtypeStruct(weight.shape, _stat_dtype(x)))


def _per_channel(v, x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return v.reshape(shape)


# --- training: batch statistics; outputs (y, mean, invstd) are all differentiable ----

@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _train(x, weight, bias, eps, axis):
    return _callback(partial(_forward_host, mean=None, var=None, training=True, eps=eps,
                             axis=axis), _out_shapes(x, axis), x, weight, bias)


def _train_fwd(x, weight, bias, eps, axis):
    y, mean, invstd = _train(x, weight, bias, eps, axis)
    return (y, mean, invstd), (x, weight, mean, invstd)


def _train_bwd(eps, axis, saved, cotangents):
    x, weight, mean, invstd = saved
    dy, dmean, dinvstd = cotangents
    dx, dweight, dbias = _callback(partial(_backward_host, training=True, axis=axis),
                                   _grad_shapes(x, weight), dy, x, mean, invstd, weight)
    # mean and invstd are outputs too: d mean/dx = 1/n, d invstd/dx = -invstd^3 (x - mean)/n
    n = x.size // x.shape[axis]
    xmu = x - _per_channel(mean, x, axis).astype(x.dtype)
    extra = (_per_channel(dmean / n, x, axis)
             - _per_channel(dinvstd * invstd ** 3 / n, x, axis) * xmu)
    return (dx + extra.astype(dx.dtype), dweight.astype(weight.dtype),
            dbias.astype(weight.dtype))


_train.defvjp(_train_fwd, _train_bwd)


# --- inference: running statistics are constants ------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _infer(x, weight, bias, running_mean, running_var, eps, axis):
    return _callback(partial(_forward_host, training=False, eps=eps, axis=axis),
                     _out_shapes(x, axis), x, weight, bias, running_mean, running_var)[0]


def _infer_fwd(x, weight, bias, running_mean, running_var, eps, axis):
    y = _infer(x, weight, bias, running_mean, running_var, eps, axis)
    return y, (x, weight, running_mean, running_var)


def _infer_bwd(eps, axis, saved, dy):
    x, weight, running_mean, running_var = saved
    invstd = (1.0 / jnp.sqrt(running_var + eps)).astype(running_mean.dtype)
    dx, dweight, dbias = _callback(partial(_backward_host, training=False, axis=axis),
                                   _grad_shapes(x, weight), dy, x, running_mean, invstd,
                                   weight)
    return (dx, dweight.astype(weight.dtype), dbias.astype(weight.dtype),
            jnp.zeros_like(running_mean), jnp.zeros_like(running_var))


_infer.defvjp(_infer_fwd, _infer_bwd)


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
               training=True, momentum=0.1, eps=1e-5, axis=1):
    """Batch normalization of a JAX array by fastbn; differentiable in x, weight, bias.

    Semantics as :func:`fastbn.batch_norm_forward` (PyTorch's), except that the
    running statistics are returned updated, not written in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    batch variance.

    Returns
    -------
    BatchNormResult
        ``(y, running_mean, running_var)``; the statistics are those given when
        not training, and None when none were given.
    """
    axis = axis % x.ndim
    c = x.shape[axis]
    stat = _stat_dtype(x)
    w = jnp.ones(c, stat) if weight is None else weight
    b = jnp.zeros(c, stat) if bias is None else bias
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean: expected running_mean and running_var when "
                             "training=False (inference uses running statistics), got None")
        return BatchNormResult(_infer(x, w, b, running_mean, running_var, eps, axis),
                               running_mean, running_var)
    y, mean, invstd = _train(x, w, b, eps, axis)
    if running_mean is None:
        return BatchNormResult(y, None, None)
    n = x.size // c
    mean, invstd = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(invstd)
    var_unbiased = (1.0 / invstd ** 2 - eps) * (n / (n - 1))
    return BatchNormResult(y, (1 - momentum) * running_mean + momentum * mean,
                           (1 - momentum) * running_var + momentum * var_unbiased)
