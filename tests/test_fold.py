"""fastbn.fold (arrays of any library) and fastbn.torch.fold (whole models): a folded
layer computes what the layer followed by its inference-mode batch norm computes."""
import copy
import warnings

import numpy as np
import pytest

import fastbn
from fastbn.testing import assert_close, tolerance

torch = pytest.importorskip("torch", reason="torch not installed (pip install fastbn[torch])")
import fastbn.torch  # noqa: E402

DTYPES = ["float32", "float64"]


def _bn_vectors(rng, c, affine=True, dtype="float64"):
    """(running_mean, running_var, bn_weight, bn_bias) with non-trivial values."""
    vectors = [rng.normal(0.5, 1.0, c), rng.uniform(0.3, 3.0, c)]
    vectors += [rng.uniform(0.5, 2.0, c), rng.normal(0.0, 1.0, c)] if affine else [None, None]
    return [None if v is None else v.astype(dtype) for v in vectors]


def _unfused(z, mean, var, gamma, beta, eps, axis):
    """The batch norm in inference mode, in float64, on channel ``axis`` of ``z``."""
    shape = [1] * z.ndim
    shape[axis] = -1
    y = (z - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if gamma is not None:
        y = y * gamma.reshape(shape) + beta.reshape(shape)
    return y


def _f64(v):
    return None if v is None else np.asarray(v, dtype=np.float64)


# --- NumPy -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_numpy_linear_matches_linear_then_bn(dtype, has_bias, affine):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5)).astype(dtype)
    b = rng.normal(size=6).astype(dtype) if has_bias else None
    stats = _bn_vectors(rng, 6, affine, dtype)
    x = rng.normal(size=(7, 5)).astype(dtype)
    w2, b2 = fastbn.fold(w, b, *stats, eps=1e-3)
    assert type(w2) is np.ndarray and w2.dtype == w.dtype and w2.shape == w.shape
    assert b2.dtype == w.dtype and b2.shape == (6,)
    z = _f64(x) @ _f64(w).T + (0.0 if b is None else _f64(b))
    expected = _unfused(z, *map(_f64, stats), 1e-3, axis=1)
    assert_close(x @ w2.T + b2, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_conv_weight_matches_conv_then_bn(dtype):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3)).astype(dtype)
    b = rng.normal(size=4).astype(dtype)
    stats = _bn_vectors(rng, 4, True, dtype)
    x = rng.normal(size=(2, 3, 6, 6)).astype(dtype)
    w2, b2 = fastbn.fold(w, b, *stats)
    conv = torch.nn.functional.conv2d
    folded = conv(torch.from_numpy(x), torch.from_numpy(w2), torch.from_numpy(b2)).numpy()
    z = conv(*(torch.from_numpy(_f64(a)) for a in (x, w, b))).numpy()
    assert_close(folded, _unfused(z, *map(_f64, stats), 1e-5, axis=1), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_weights_are_folded_in_float32_and_keep_their_dtype(dtype):
    from fastbn._validate import numpy_dtype
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 4, 3)).astype(numpy_dtype(dtype))
    b = rng.normal(size=8).astype(numpy_dtype(dtype))
    stats = _bn_vectors(rng, 8, True, "float32")
    w2, b2 = fastbn.fold(w, b, *stats)
    assert w2.dtype == w.dtype and b2.dtype == w.dtype
    w64, b64 = fastbn.fold(_f64(w), _f64(b), *map(_f64, stats))
    assert_close(w2, w64, dtype)
    assert_close(b2, b64, dtype)
    # torch tensors of that dtype: the same numbers, back as torch tensors of that dtype
    tdtype = getattr(torch, dtype)
    tw, tb = fastbn.fold(torch.from_numpy(w.astype(np.float32)).to(tdtype),
                         torch.from_numpy(b.astype(np.float32)).to(tdtype),
                         *(torch.from_numpy(v) for v in stats))
    assert tw.dtype == tdtype and tb.dtype == tdtype
    assert np.array_equal(tw.float().numpy(), w2.astype(np.float32))
    assert np.array_equal(tb.float().numpy(), b2.astype(np.float32))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(3)
    args = [rng.normal(size=(4, 2, 3)), rng.normal(size=4), *_bn_vectors(rng, 4)]
    saved = [a.copy() for a in args]
    w2, b2 = fastbn.fold(*args)
    assert all(np.array_equal(a, s) for a, s in zip(args, saved))
    assert not np.shares_memory(w2, args[0]) and not np.shares_memory(b2, args[1])
    targs = [torch.from_numpy(s.copy()).float().requires_grad_(i in (0, 1, 4, 5))
             for i, s in enumerate(saved)]
    tsaved = [t.detach().clone() for t in targs]
    tw, tb = fastbn.fold(*targs)
    assert all(torch.equal(t, s) for t, s in zip(targs, tsaved))
    assert tw.data_ptr() != targs[0].data_ptr() and not tw.requires_grad


def test_stat_dtypes_may_differ_from_the_weight_dtype():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    stats = _bn_vectors(rng, 3, True, "float64")
    w2, b2 = fastbn.fold(w, None, *stats)
    w64, b64 = fastbn.fold(_f64(w), None, *stats)
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    assert_close(w2, w64, "float32")
    assert_close(b2, b64, "float32")


# --- JAX: Flax kernels hold the output channels last ------------------------------------

def test_jax_dense_and_conv_kernels_fold_on_the_last_axis():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(5)
    stats = _bn_vectors(rng, 6, True, "float32")
    jstats = [jnp.asarray(v) for v in stats]
    # Dense: kernel (in, out), y = x @ kernel + bias
    kernel, bias = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=6).astype(
        np.float32)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    k2, b2 = fastbn.fold(jnp.asarray(kernel), jnp.asarray(bias), *jstats, axis=-1)
    assert isinstance(k2, jax.Array) and k2.dtype == jnp.float32 and k2.shape == (5, 6)
    expected = _unfused(_f64(x) @ _f64(kernel) + _f64(bias), *map(_f64, stats), 1e-5, axis=1)
    assert_close(np.asarray(jnp.asarray(x) @ k2 + b2), expected, "float32")
    # Conv: kernel (h, w, in, out) on NHWC data, no bias
    kernel = rng.normal(size=(3, 3, 2, 6)).astype(np.float32)
    x = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
    k2, b2 = fastbn.fold(jnp.asarray(kernel), None, *jstats, axis=-1)

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)
    z = np.asarray(conv(jnp.asarray(x), jnp.asarray(kernel)), dtype=np.float64)
    expected = _unfused(z, *map(_f64, stats), 1e-5, axis=-1)
    assert_close(np.asarray(conv(jnp.asarray(x), k2) + b2), expected, "float32",
                 condition=tolerance("float32")[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_half_kernels_keep_their_dtype(dtype):
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(3, 2, 5)).astype(np.float32)
    stats = _bn_vectors(rng, 5, True, "float32")
    k2, b2 = fastbn.fold(jax.numpy.asarray(kernel, dtype=dtype), None,
                         *(jax.numpy.asarray(v) for v in stats), axis=-1)
    assert isinstance(k2, jax.Array) and k2.dtype == dtype and b2.dtype == dtype
    k64, b64 = fastbn.fold(_f64(np.asarray(jax.numpy.asarray(kernel, dtype=dtype),
                                           dtype=np.float32)), None, *stats, axis=-1)
    assert_close(np.asarray(k2, dtype=np.float32), k64, dtype)
    assert_close(np.asarray(b2, dtype=np.float32), b64, dtype)


# --- bad arguments -----------------------------------------------------------------------

def _good():
    rng = np.random.default_rng(6)
    return dict(weight=rng.normal(size=(4, 3)), bias=rng.normal(size=4),
                running_mean=rng.normal(size=4), running_var=rng.uniform(1, 2, 4),
                bn_weight=np.ones(4), bn_bias=np.zeros(4))


def _call(**changes):
    args = {**_good(), **changes}
    eps, axis = args.pop("eps", 1e-5), args.pop("axis", 0)
    return fastbn.fold(*args.values(), eps=eps, axis=axis)


@pytest.mark.parametrize("name", ["bias", "running_mean", "running_var", "bn_weight", "bn_bias"])
@pytest.mark.parametrize("shape", [(3,), (5,), (4, 1), ()])
def test_per_channel_vectors_of_the_wrong_shape_are_named(name, shape):
    with pytest.raises(fastbn.ArgumentError, match=rf"^{name}: expected shape \(4,\)"):
        _call(**{name: np.ones(shape)})


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_eps_must_be_positive(eps):
    with pytest.raises(fastbn.ArgumentError, match=r"^eps: "):
        _call(eps=eps)


@pytest.mark.parametrize("name, value", [
    ("weight", [[1.0, 2.0]]), ("weight", None), ("weight", 3.0),
    ("weight", np.ones((4, 3), dtype=np.int64)),
    ("running_mean", [0.0] * 4), ("running_mean", None), ("running_var", None),
    ("running_var", torch.ones(4, dtype=torch.float64)), ("bias", np.ones(4, dtype=bool)),
    ("bn_weight", np.ones(4, dtype=np.complex128)), ("eps", "1e-5"), ("axis", 0.5),
    ("axis", True)])
def test_wrong_types_raise_argument_type_error_naming_the_argument(name, value):
    with pytest.raises(fastbn.ArgumentTypeError, match=rf"^{name}: "):
        _call(**{name: value})


def test_torch_weight_with_numpy_statistics_is_refused():
    args = _good()
    with pytest.raises(fastbn.ArgumentTypeError, match=r"^running_mean: expected a torch array"):
        fastbn.fold(torch.from_numpy(args["weight"]), None, args["running_mean"],
                    torch.from_numpy(args["running_var"]))


@pytest.mark.parametrize("axis", [2, -3])
def test_axis_out_of_range(axis):
    with pytest.raises(fastbn.ArgumentError, match=r"^axis: "):
        _call(axis=axis)


def test_zero_dimensional_weight():
    with pytest.raises(fastbn.ArgumentError, match=r"^weight: "):
        fastbn.fold(np.ones(()), None, np.zeros(1), np.ones(1))


# --- torch layers and fastbn.torch.fold ----------------------------------------------------

LAYERS = {
    "conv1d": lambda bias: torch.nn.Conv1d(3, 4, 3, padding=1, bias=bias),
    "conv2d": lambda bias: torch.nn.Conv2d(3, 4, 3, padding=1, bias=bias),
    "conv3d": lambda bias: torch.nn.Conv3d(3, 4, 2, bias=bias),
    "conv2d_groups": lambda bias: torch.nn.Conv2d(4, 6, 3, groups=2, bias=bias),
    "conv_transpose2d": lambda bias: torch.nn.ConvTranspose2d(3, 4, 3, stride=2, bias=bias),
    "conv_transpose2d_groups": lambda bias: torch.nn.ConvTranspose2d(4, 6, 3, groups=2,
                                                                     bias=bias),
    "linear": lambda bias: torch.nn.Linear(5, 4, bias=bias),
}
INPUTS = {"conv1d": (2, 3, 7), "conv2d": (2, 3, 6, 6), "conv3d": (2, 3, 4, 4, 4),
          "conv2d_groups": (2, 4, 5, 5), "conv_transpose2d": (2, 3, 4, 4),
          "conv_transpose2d_groups": (2, 4, 4, 4), "linear": (6, 5)}
BN_CLASSES = {1: (torch.nn.BatchNorm1d, fastbn.torch.BatchNorm1d),
              2: (torch.nn.BatchNorm2d, fastbn.torch.BatchNorm2d),
              3: (torch.nn.BatchNorm3d, fastbn.torch.BatchNorm3d)}


def _randomize_bn(bn, generator):
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=generator))
        bn.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.3)
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=generator))
    return bn


def _pair(kind, bias, affine, dtype, fastbn_bn):
    torch.manual_seed(0)
    layer = LAYERS[kind](bias)
    dims = len(INPUTS[kind]) - 2 or 1
    bn = BN_CLASSES[dims][fastbn_bn](_out(layer), affine=affine)
    _randomize_bn(bn, torch.Generator().manual_seed(1))
    return torch.nn.Sequential(layer, bn).to(getattr(torch, dtype)).eval()


def _out(layer):
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_torch_layer_then_bn_folds(kind, bias, affine, dtype):
    model = _pair(kind, bias, affine, dtype, fastbn_bn=(kind.endswith("2d") == bias))
    x = torch.randn(*INPUTS[kind], generator=torch.Generator().manual_seed(2),
                    dtype=getattr(torch, dtype))
    with torch.no_grad():
        expected = model.double()(x.double())
        model.to(x.dtype)
        weight_param = model[0].weight
        assert fastbn.torch.fold(model) is model
        got = model(x)
    assert isinstance(model[1], torch.nn.Identity)
    assert model[0].weight is weight_param  # the same Parameter, new values
    assert model[0].bias is not None and model[0].bias.dtype == x.dtype
    assert_close(got.numpy(), expected.numpy(), dtype)


def test_fold_with_torch_tensors_returns_torch_tensors():
    layer = LAYERS["conv2d"](True)
    bn = _randomize_bn(torch.nn.BatchNorm2d(4), torch.Generator().manual_seed(3))
    w, b = fastbn.fold(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight,
                       bn.bias, eps=bn.eps)
    assert isinstance(w, torch.Tensor) and w.shape == layer.weight.shape
    assert w.dtype == torch.float32 and b.shape == (4,) and w.device == layer.weight.device


def _block(cin, cout, bn):
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn(cout),
                               torch.nn.ReLU())


class Residual(torch.nn.Module):
    """x + body(x): the Sequential inside is folded, the addition stays."""

    def __init__(self, c, bn):
        super().__init__()
        self.body = torch.nn.Sequential(_block(c, c, bn),
                                        torch.nn.Conv2d(c, c, 3, padding=1), bn(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def _resnet():
    torch.manual_seed(0)
    tbn, fbn = torch.nn.BatchNorm2d, fastbn.torch.BatchNorm2d
    model = torch.nn.Sequential(
        _block(3, 8, fbn), Residual(8, tbn), Residual(8, fbn),
        torch.nn.Sequential(_block(8, 16, tbn), _block(16, 16, fbn)),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 12), fastbn.torch.BatchNorm1d(12), torch.nn.ReLU(),
        torch.nn.Linear(12, 10, bias=False), torch.nn.BatchNorm1d(10, affine=False))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            _randomize_bn(m, g)
    return model


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_resnet_like_model_folds_every_batch_norm():
    model = _resnet().eval()
    assert len(_batch_norms(model)) == 9
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fastbn.torch.fold(model)
        got = model(x)
    assert _batch_norms(model) == []
    assert sum(isinstance(m, torch.nn.Identity) for m in model.modules()) == 9
    assert isinstance(model[1].body[2], torch.nn.Identity)
    assert_close(got.numpy(), expected.numpy(), "float32")


def test_training_mode_is_refused():
    model = _resnet()
    with pytest.raises(fastbn.ArgumentError, match=r"^model: .*eval"):
        fastbn.torch.fold(model)
    model.eval()
    model[1].body[2].train()  # one submodule still training
    with pytest.raises(fastbn.ArgumentError, match=r"1\.body\.2"):
        fastbn.torch.fold(model)
    assert len(_batch_norms(model)) == 9  # nothing folded


def test_not_a_module_is_refused():
    with pytest.raises(fastbn.ArgumentTypeError, match=r"^model: "):
        fastbn.torch.fold([torch.nn.Conv2d(1, 1, 1)])


def test_batch_norm_without_running_statistics_is_left_with_a_warning():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1),
                                torch.nn.BatchNorm2d(4, track_running_stats=False),
                                torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    with pytest.warns(UserWarning, match=r"'1'.*track_running_stats=False"):
        fastbn.torch.fold(model)
    assert isinstance(model[1], torch.nn.BatchNorm2d) and isinstance(model[3], torch.nn.Identity)


def test_shared_layers_and_hooked_modules_are_left_with_a_warning():
    conv = torch.nn.Conv2d(3, 3, 1)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(3), conv).eval()
    with pytest.warns(UserWarning, match="more than one place"):
        fastbn.torch.fold(model)
    assert isinstance(model[1], torch.nn.BatchNorm2d)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).eval()
    model[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="hooks"):
        fastbn.torch.fold(model)
    assert isinstance(model[1], torch.nn.BatchNorm1d)


def test_pairs_outside_plain_sequentials_are_not_touched():
    class Custom(torch.nn.Sequential):
        def forward(self, x):  # the BN does not follow the conv here
            return self[0](self[1](x)) if x.shape[1] == 3 else x

    model = torch.nn.Sequential(Custom(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))).eval()
    fastbn.torch.fold(model)
    assert isinstance(model[0][1], torch.nn.BatchNorm2d)


def test_folded_model_in_copy_keeps_the_original():
    model = _resnet().eval()
    folded = fastbn.torch.fold(copy.deepcopy(model))
    assert len(_batch_norms(model)) == 9 and _batch_norms(folded) == []
