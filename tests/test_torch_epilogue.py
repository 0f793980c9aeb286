"""fastbn.torch's fused epilogue, y = relu(bn(x) + z), against torch's own composition
(F.batch_norm, then + z, then F.relu): outputs, running statistics and gradients (x,
weight, bias, residual), derivatives of every order and mode, torch.func, torch.compile,
torch.export, the modules' ``activation`` and ``convert(fuse_relu=True)``.
"""
import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastbn.torch as ft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch._dynamo",
                                        "ignore::UserWarning:torch._functorch",
                                        "ignore:`torch.jit.script:DeprecationWarning")

EPILOGUES = {"relu": ("relu", False), "add": (None, True), "add+relu": ("relu", True)}
LAYOUTS = {  # shape, channels_last
    "NC": ((16, 5), False),
    "NCHW": ((4, 5, 3, 4), False),
    "channels_last": ((4, 5, 3, 4), True),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(20261202)


def _reference(x, rm, rv, w, b, training, activation, residual, momentum=0.1, eps=1e-5):
    """torch's composition: what the fused call must equal."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation else y


def _fused(x, rm, rv, w, b, training, activation, residual, momentum=0.1, eps=1e-5):
    return ft.batch_norm(x, rm, rv, w, b, training, momentum, eps, activation=activation,
                         residual=residual)


def _data(layout, dtype, z_layout="same"):
    shape, channels_last = LAYOUTS[layout]
    c = shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.3
    z = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        if z_layout == "same":
            z = z.contiguous(memory_format=torch.channels_last)
    w = torch.rand(c, dtype=dtype) + 0.5
    b = torch.randn(c, dtype=dtype) * 0.5
    rm = torch.randn(c, dtype=dtype) * 0.1
    rv = torch.rand(c, dtype=dtype) + 0.5
    return x, z, w, b, rm, rv


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, equal_nan=True, **kw)


# --- forward, running statistics and gradients vs torch's composition ----------------------

@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_torch_composition(layout, dtype, training, epilogue):
    activation, add = EPILOGUES[epilogue]
    x, z, w, b, rm, rv = _data(layout, DTYPES[dtype])
    results = []
    for fn in (_fused, _reference):
        xl, zl, wl, bl = _leaves(x, z, w, b)
        rml, rvl = rm.clone(), rv.clone()
        y = fn(xl, rml, rvl, wl, bl, training, activation, zl if add else None)
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
        inputs = [xl, wl, bl] + ([zl] if add else [])
        grads = torch.autograd.grad(y, inputs, dy)
        results.append((y, rml, rvl, grads))
    (y, rm1, rv1, grads), (y_ref, rm_ref, rv_ref, grads_ref) = results
    _close(y, y_ref)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == y_ref.stride()
    _close((rm1, rv1), (rm_ref, rv_ref))
    if not training:
        _close((rm1, rv1), (rm, rv), rtol=0, atol=0)
    for name, g, g_ref in zip(["x", "weight", "bias", "residual"], grads, grads_ref):
        _close(g, g_ref, msg=lambda m, name=name: f"d{name}: {m}")
        assert g.dtype == g_ref.dtype


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_in_another_layout_and_relu_mask_at_zero(training):
    # channels_last x with a contiguous z; a y exactly 0 (bias -100 channel) gets no gradient
    x, z, w, b, rm, rv = _data("channels_last", torch.float64, z_layout="contiguous")
    b = b.clone()
    b[0] = -100.0
    results = []
    for fn in (_fused, _reference):
        xl, zl = _leaves(x, z)
        y = fn(xl, rm.clone(), rv.clone(), w, b, training, "relu", zl)
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(5))
        results.append((y, *torch.autograd.grad(y, (xl, zl), dy)))
        assert zl.is_contiguous() and not y.is_contiguous()
    _close(results[0], results[1])
    assert (results[0][0][:, 0] == 0).all() and (results[0][2][:, 0] == 0).all()


def test_no_relu_residual_gradient_is_dy():
    x, z, w, b, rm, rv = _data("NCHW", torch.float64)
    zl = z.clone().requires_grad_()
    y = _fused(x, rm, rv, w, b, True, None, zl)
    dy = torch.randn_like(y)
    (dz,) = torch.autograd.grad(y, zl, dy)
    _close(dz, dy, rtol=0, atol=0)


def test_module_residual_and_eval_inference():
    ref = nn.BatchNorm2d(5)
    bn = ft.BatchNorm2d(5, activation="relu")
    bn.load_state_dict(ref.state_dict())
    x, z = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
    for training in (True, False):
        ref.train(training)
        bn.train(training)
        _close(bn(x, z), F.relu(ref(x) + z))
        _close(bn(x), F.relu(ref(x)))
        with torch.no_grad():
            _close(bn(x, residual=z), F.relu(ref(x) + z))
    _close(dict(bn.named_buffers()), dict(ref.named_buffers()))


# --- gradcheck, gradgradcheck ---------------------------------------------------------------

def _gradcheck_inputs(add, training):
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    z = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    inputs = _leaves(x, w, b) + (_leaves(z) if add else [])
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    return inputs, rm, rv


def _function(training, activation, rm, rv):
    def f(x, w, b, z=None):
        return ft.batch_norm(x, None if training else rm, None if training else rv, w, b,
                             training, activation=activation, residual=z)
    return f


def _away_from_the_kink(f, inputs):
    """relu is not differentiable at 0: finite differences need every pre-activation value
    farther from 0 than their step (a seeded draw; this guards the seed)."""
    with torch.no_grad():
        y = f(*inputs)
    assert (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(training, epilogue):
    activation, add = EPILOGUES[epilogue]
    inputs, rm, rv = _gradcheck_inputs(add, training)
    f = _function(training, activation, rm, rv)
    if activation:
        _away_from_the_kink(f, inputs)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True,
                                        check_batched_grad=True)


def test_gradient_penalty_matches_torch():
    # double backward through the epilogue, against torch's composition
    inputs, rm, rv = _gradcheck_inputs(True, True)
    results = []
    for fn in (_fused, _reference):
        x, w, b, z = _leaves(*inputs)
        y = fn(x, None, None, w, b, True, "relu", z)
        gx, gz = torch.autograd.grad((y ** 2).sum(), (x, z), create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum() + gz.pow(3).sum(), (x, w, b, z)))
    _close(results[0], results[1])


# --- torch.func -----------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_vmap_with_residual(training):
    # an ensemble: everything batched, the residual like the input (and once unbatched)
    ensemble, c = 3, 4
    x = torch.randn(ensemble, 8, c, 3, 3)
    z = torch.randn(ensemble, 8, c, 3, 3)
    w, b = torch.rand(ensemble, c) + 0.5, torch.randn(ensemble, c)
    rm, rv = torch.randn(ensemble, c), torch.rand(ensemble, c) + 0.5

    def run(bn):
        return lambda x, z, rm, rv, w, b: bn(x, rm, rv, w, b, training, "relu", z)

    for z_dim in (0, None):
        zs = z if z_dim == 0 else z[0]
        rm_v, rv_v = rm.clone(), rv.clone()
        actual = torch.func.vmap(run(_fused), in_dims=(0, z_dim, 0, 0, 0, 0))(
            x, zs, rm_v, rv_v, w, b)
        rm_l, rv_l = rm.clone(), rv.clone()
        expected = torch.stack([
            run(_reference)(x[e], z[e] if z_dim == 0 else zs, rm_l[e], rv_l[e], w[e], b[e])
            for e in range(ensemble)])
        _close(actual, expected)
        _close((rm_v, rv_v), (rm_l, rv_l))


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_jvp_vjp(training, epilogue):
    activation, add = EPILOGUES[epilogue]
    inputs, rm, rv = _gradcheck_inputs(add, training)
    inputs = tuple(t.detach() for t in inputs)

    def as_function(fn):
        def f(x, w, b, z=None):
            return fn(x, None if training else rm, None if training else rv, w, b, training,
                      activation, z)
        return f

    f, f_ref = as_function(_fused), as_function(_reference)
    argnums = tuple(range(len(inputs)))
    loss = (lambda g: lambda *a: (g(*a) * torch.linspace(-1, 2, a[0].numel(),
                                                         dtype=a[0].dtype).view(a[0].shape)
                                  ).pow(2).sum())
    _close(torch.func.grad(loss(f), argnums=argnums)(*inputs),
           torch.func.grad(loss(f_ref), argnums=argnums)(*inputs))
    tangents = tuple(torch.randn_like(t) for t in inputs)
    _close(torch.func.jvp(f, inputs, tangents), torch.func.jvp(f_ref, inputs, tangents))
    out, vjp = torch.func.vjp(f, *inputs)
    out_ref, vjp_ref = torch.func.vjp(f_ref, *inputs)
    cotangent = torch.randn_like(out)
    _close(out, out_ref)
    _close(vjp(cotangent), vjp_ref(cotangent))
    # per-sample gradients (eval): vmap of grad, the residual batched like the input
    if training:
        return
    in_dims = (0, None, None) + ((0,) if add else ())
    batched = [t.unsqueeze(1) if d == 0 else t for t, d in zip(inputs, in_dims)]
    _close(torch.func.vmap(torch.func.grad(loss(f), argnums=argnums), in_dims)(*batched),
           torch.func.vmap(torch.func.grad(loss(f_ref), argnums=argnums), in_dims)(*batched))


def test_func_hessian_matches_torch():
    inputs, rm, rv = _gradcheck_inputs(True, True)
    x, _, _, z = (t.detach() for t in inputs)
    w, b = inputs[1].detach(), inputs[2].detach()

    def scalar(fn):
        return lambda x, z: (fn(x, None, None, w, b, True, "relu", z) ** 3).sum()
    _close(torch.func.hessian(scalar(_fused), argnums=(0, 1))(x, z),
           torch.func.hessian(scalar(_reference), argnums=(0, 1))(x, z))


# --- the operators: schema, fake kernels, vmap ----------------------------------------------

def test_opcheck_forward_and_backward_operators():
    x, z, w, b, rm, rv = _data("channels_last", torch.float32)
    for training in (True, False):
        for activation, residual in (("relu", z), ("", z), ("relu", None), ("", None)):
            torch.library.opcheck(torch.ops.fastbn.batch_norm.default,
                                  (x, w, b, rm.clone(), rv.clone(), residual, training, 0.1,
                                   1e-5, 1, activation, ""))
            y, mean, invstd, _, _ = torch.ops.fastbn.batch_norm(
                x, w, b, rm.clone(), rv.clone(), residual, training, 0.1, 1e-5, 1, activation,
                "")
            for want_dz in (True, False):
                args = (torch.randn_like(x), x, mean, invstd, w, y if activation else None,
                        training, 1, activation, want_dz, "")
                torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default, args,
                                      test_utils=("test_schema", "test_faketensor"))
                dx, dw, db, dz = torch.ops.fastbn.batch_norm_backward(*args)
                assert dz.shape == (x.shape if want_dz else (0,))
                if want_dz:
                    want = args[0] * (y > 0) if activation else args[0]
                    _close(dz, want, rtol=0, atol=0)
                    assert dz.data_ptr() != args[0].data_ptr()


# --- torch.compile and torch.export ---------------------------------------------------------

class _ResidualBlock(nn.Module):
    """conv -> BN+ReLU -> conv -> BN(+x)+ReLU: the second BN takes the residual."""

    def __init__(self, bn1, bn2, fused):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = bn1
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = bn2
        self.fused = fused

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        if self.fused:
            return self.bn2(self.conv2(h), x)
        return F.relu(self.bn2(self.conv2(F.relu(h))) + x)


def _block_pair():
    ref = _ResidualBlock(nn.BatchNorm2d(4), nn.BatchNorm2d(4), fused=False)
    model = _ResidualBlock(ft.BatchNorm2d(4, activation="relu"),
                           ft.BatchNorm2d(4, activation="relu"), fused=True)
    model.load_state_dict(ref.state_dict())
    return model, ref


def _same_outputs_and_gradients(run, model, ref, x, training):
    """``run`` (``model`` or its compiled form) and ``ref`` in the same mode: same output,
    same parameter gradients."""
    model.train(training)
    ref.train(training)
    out, out_ref = run(x), ref(x)
    _close(out, out_ref)
    g = torch.randn_like(out)
    _close(torch.autograd.grad(out, list(model.parameters()), g),
           torch.autograd.grad(out_ref, list(ref.parameters()), g), rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_with_activation():
    torch._dynamo.reset()
    try:
        model, ref = _block_pair()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        for step in range(3):
            x = torch.randn(4, 4, 5, 5)
            for training in (True, False):
                _same_outputs_and_gradients(compiled, model, ref, x, training)
        _close(dict(model.named_buffers()), dict(ref.named_buffers()))
        # and the plain op still compiles next to it
        plain = torch.compile(lambda x: ft.batch_norm(x, None, None, training=True),
                              backend="aot_eager", fullgraph=True)
        x = torch.randn(4, 3, 2)
        _close(plain(x), F.batch_norm(x, None, None, training=True))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_holds_the_fastbn_op(training):
    model, ref = _block_pair()
    with torch.no_grad():  # some running statistics
        for _ in range(2):
            x = torch.randn(8, 4, 5, 5)
            model(x)
            ref(x)
    model.train(training)
    ref.train(training)
    x = torch.randn(2, 4, 5, 5)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fastbn.batch_norm.default) == 2
    x2 = torch.randn(2, 4, 5, 5)
    _close(exported.module()(x2), ref(x2))


# --- modules ---------------------------------------------------------------------------------

def test_module_activation_keyword_repr_and_pickle():
    bn = ft.BatchNorm2d(4, eps=1e-3, activation="relu")
    assert bn.activation == "relu"
    assert "activation='relu'" in repr(bn)
    # no activation: torch's text after fastbn's class name
    assert repr(ft.BatchNorm2d(4)) == "fastbn.torch." + repr(nn.BatchNorm2d(4))
    assert repr(ft.BatchNorm1d(4, activation=None)) == "fastbn.torch." + repr(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="activation"):
        ft.BatchNorm3d(4, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        ft.batch_norm(torch.randn(4, 3), None, None, training=True, activation="sigmoid")
    x = torch.randn(4, 4, 3, 3)
    out = bn(x)
    assert (out >= 0).all()
    with io.BytesIO() as f:
        torch.save(bn, f)
        f.seek(0)
        loaded = torch.load(f, weights_only=False)
    for copied in (loaded, pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert copied.activation == "relu"
        _close(copied(x), bn(x))


@pytest.mark.parametrize("cls,shape", [(ft.BatchNorm1d, (6, 3)), (ft.BatchNorm1d, (6, 3, 4)),
                                       (ft.BatchNorm3d, (2, 3, 2, 3, 2))])
def test_modules_1d_3d_with_residual(cls, shape):
    torch_cls = {ft.BatchNorm1d: nn.BatchNorm1d, ft.BatchNorm3d: nn.BatchNorm3d}[cls]
    ref, bn = torch_cls(3), cls(3, activation="relu")
    x, z = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    out, out_ref = bn(x, z), F.relu(ref(x) + z)
    _close(out, out_ref)
    _close(torch.autograd.grad(out.sum(), (x, z)), torch.autograd.grad(out_ref.sum(), (x, z)))


# --- convert(fuse_relu=True) -----------------------------------------------------------------

def _conv_bn_relu_x2(inplace=False):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu_inplace"])
def test_convert_fuse_relu_model(inplace):
    ref = _conv_bn_relu_x2(inplace)
    model = ft.convert(copy.deepcopy(ref), fuse_relu=True)
    assert [type(m) for m in model[:6]] == [nn.Conv2d, ft.BatchNorm2d, nn.Identity,
                                            nn.Conv2d, ft.BatchNorm2d, nn.Identity]
    assert model[1].activation == model[4].activation == "relu"
    assert str(model).count("activation='relu'") == 2
    assert "ReLU" not in str(model)
    assert list(model.state_dict()) == list(ref.state_dict())

    x = torch.randn(8, 3, 6, 6)
    for training in (True, False):
        _same_outputs_and_gradients(model, model, ref, x, training)

    model.train()
    ref.train()
    xs, ys = torch.randn(20, 8, 3, 6, 6), torch.randint(0, 3, (20, 8))
    losses = []
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        history = []
        for step in range(20):
            opt.zero_grad()
            loss = F.cross_entropy(m(xs[step]), ys[step])
            loss.backward()
            opt.step()
            history.append(loss.detach())
        losses.append(torch.stack(history))
    _close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    _close(dict(model.named_buffers()), dict(ref.named_buffers()), rtol=1e-4, atol=1e-5)


def test_convert_fuse_relu_rule_is_sequential_adjacency():
    class Functional(nn.Module):  # a ReLU called from forward is not seen
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(2)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(x))

    hooked = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())
    hooked[1].register_forward_hook(lambda *a: None)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())),
        nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.ReLU(),           # not adjacent
        nn.BatchNorm2d(2), nn.LeakyReLU(),                          # not an nn.ReLU
        Functional(), hooked)
    ref = copy.deepcopy(model)
    ft.convert(model, fuse_relu=True)
    assert isinstance(model[0][1][1], nn.Identity) and model[0][1][0].activation == "relu"
    assert model[1].activation is None and isinstance(model[3], nn.ReLU)
    assert model[4].activation is None and isinstance(model[5], nn.LeakyReLU)
    assert model[6].bn.activation is None and isinstance(model[6].relu, nn.ReLU)
    assert model[7][0].activation is None and isinstance(model[7][1], nn.ReLU)
    x = torch.randn(4, 2, 3, 3)
    _close(model(x), ref(x))

    plain = ft.convert(_conv_bn_relu_x2())  # the default: nothing fused
    assert isinstance(plain[2], nn.ReLU) and plain[1].activation is None
    assert "activation" not in str(plain)
    assert ft.convert(nn.BatchNorm1d(3), fuse_relu=True).activation is None
