"""fastbn.distributed: single-process checks here, and the multi-rank cases of tests/mpi
launched under ``mpiexec -n 2`` and ``-n 3``."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _mpiexec():
    """mpiexec beside this Python (the mpich wheel installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@pytest.mark.parametrize("ranks", [2, 3])
def test_cases_under_mpiexec(ranks):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'fastbn[mpi]')")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    # Open MPI refuses more ranks than cores unless told; MPICH's hydra needs no option
    extra = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    # a clean environment for the launcher: no PMI variables of an MPI this process started
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    command = [mpiexec, "-n", str(ranks), *extra, sys.executable, "-m", "pytest", "-q",
               "-p", "no:cacheprovider", "tests/mpi"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} did not finish in {exc.timeout} s (a rank hung?)\n"
                    f"{exc.stdout or ''}")
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count(" passed") == ranks, done.stdout


# --- one process ----------------------------------------------------------------------------

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed")
from fastbn import distributed  # noqa: E402  (after the skip)


@pytest.mark.parametrize("axis", [1, -1])
def test_comm_self_equals_batch_norm(backend, on_device, rng, axis):
    x = on_device(rng.normal(3.0, 2.0, (6, 4, 5)))
    dy = on_device(rng.normal(size=x.shape))
    c = x.shape[axis]
    w, b = on_device(rng.normal(size=c)), on_device(rng.normal(size=c))
    rm, rv, srm, srv = (on_device(np.full(c, v)) for v in (0.0, 1.0, 0.0, 1.0))
    want = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, axis=axis,
                                     backend=backend)
    got = distributed.sync_batch_norm_forward(x, w, b, running_mean=srm, running_var=srv,
                                              axis=axis, backend=backend, comm=MPI.COMM_SELF)
    want_grads = fastbn.batch_norm_backward(dy, x, want.mean, want.invstd, weight=w, axis=axis,
                                            backend=backend)
    grads = distributed.sync_batch_norm_backward(dy, x, got.mean, got.invstd, weight=w,
                                                 axis=axis, backend=backend,
                                                 comm=MPI.COMM_SELF)
    for a, e in [*zip(got, want), *zip(grads, want_grads), (srm, rm), (srv, rv)]:
        assert type(a) is type(e)
        assert_close(a, e, "float64")


def test_default_comm_is_comm_world():
    x = np.random.default_rng(0).normal(size=(5, 3))
    assert distributed.communicator() is MPI.COMM_WORLD
    assert_close(distributed.sync_batch_norm_forward(x).y, fastbn.batch_norm_forward(x).y,
                 "float64")


@pytest.mark.parametrize("comm", [42, "COMM_WORLD", MPI.COMM_NULL, MPI.COMM_WORLD.Get_group()])
def test_bad_comm(comm):
    x = np.ones((4, 3))
    rm = np.zeros(3)
    with pytest.raises(TypeError, match="comm: expected an mpi4py intracommunicator"):
        distributed.sync_batch_norm_forward(x, running_mean=rm, running_var=np.ones(3),
                                            comm=comm)
    assert (rm == 0).all()  # nothing half-written
    with pytest.raises(TypeError, match="comm"):
        distributed.sync_batch_norm_backward(x, x, np.zeros(3), np.ones(3), comm=comm)
    with pytest.raises(TypeError, match="comm"):
        distributed.SyncBatchNorm(3, comm=comm)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    with pytest.raises(ImportError, match=r'needs mpi4py: pip install mpi4py mpich .*"\.\[mpi\]"'):
        distributed.sync_batch_norm_forward(np.ones((4, 3)))


def test_import_fastbn_imports_no_mpi4py():
    code = ("import sys, fastbn, fastbn.distributed\n"
            "try:\n    import fastbn.torch\nexcept ImportError:\n    pass\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mpi_sync_merges_in_rank_order():
    """The Sync of one rank: its own part back, the count an int."""
    sync = distributed.MPISync(MPI.COMM_SELF)
    mean, m2 = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    n, got_mean, got_m2 = sync.stats(lambda: fastbn._merge.Moments(5, mean, m2))
    assert n == 5 and isinstance(n, int)
    assert (got_mean == mean).all() and (got_m2 == m2).all()
    n, s1, s2 = sync.sums(lambda: (5, mean, m2))
    assert n == 5 and (s1 == mean).all() and (s2 == m2).all()


def test_sync_batch_norm_layer_one_rank():
    x = np.random.default_rng(1).normal(2.0, 3.0, (8, 3, 4)).astype(np.float32)
    bn, ref = distributed.SyncBatchNorm(3, comm=MPI.COMM_SELF), fastbn.BatchNorm(3)
    assert_close(bn(x), ref(x), "float32")
    assert_close(bn.backward(np.ones_like(x)), ref.backward(np.ones_like(x)), "float32")
    assert_close(bn.grad_weight, ref.grad_weight, "float32")
    assert bn.state_dict().keys() == ref.state_dict().keys()
    assert repr(bn) == "Sync" + repr(ref)
    assert isinstance(bn, fastbn.BatchNorm)


# --- torch: module-level parity with torch.nn.SyncBatchNorm where torch runs it (CPU) --------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _pair(torch, **kwargs):
    import fastbn.torch
    torch.manual_seed(0)
    theirs = torch.nn.SyncBatchNorm(3, **kwargs)
    ours = fastbn.torch.SyncBatchNorm(3, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}, {"eps": 1e-3},
                                    {"dtype": "float64"}, {"bias": False}])
def test_torch_module_parity(torch, kwargs):
    """Construction, state_dict, repr; training without an initialized process group
    (torch: local batch norm; here an MPI world of one); eval mode."""
    if kwargs.get("dtype") == "float64":
        kwargs = {"dtype": torch.float64}
    ours, theirs = _pair(torch, **kwargs)
    assert repr(ours) == "fastbn.torch." + repr(theirs)  # fastbn's modules say so
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    dtype = kwargs.get("dtype", torch.float32)
    x = torch.randn(6, 3, 4, 5, dtype=dtype) * 2 + 1
    for _ in range(3):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        yo.backward(torch.ones_like(yo) + xo.detach())
        yt.backward(torch.ones_like(yt) + xt.detach())
        assert_close(yo.detach(), yt.detach(), str(dtype).split(".")[1])
        assert_close(xo.grad, xt.grad, str(dtype).split(".")[1])
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert_close(a, b, str(dtype).split(".")[1], err_msg=name)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close(a.grad, b.grad, str(dtype).split(".")[1], err_msg=name)
    ours.eval(), theirs.eval()
    assert_close(ours(x).detach(), theirs(x).detach(), str(dtype).split(".")[1])
    theirs.load_state_dict(ours.state_dict())  # and back


def test_torch_convert_sync_batchnorm(torch):
    import fastbn.torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False)),
                                fastbn.torch.BatchNorm2d(4, activation="relu"))
    model[1].weight.requires_grad_(False)
    model.eval()
    model[3].train()
    params = [model[1].weight, model[1].bias, model[1].running_mean, model[3].weight]
    theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    theirs_repr = repr(theirs)
    converted = fastbn.torch.convert_sync_batchnorm(model, comm=MPI.COMM_SELF)
    assert converted is model
    assert all(type(m) is fastbn.torch.SyncBatchNorm for m in (model[1], model[2][0], model[3]))
    assert (repr(converted).replace(", activation='relu'", "")
            .replace("fastbn.torch.SyncBatchNorm", "SyncBatchNorm")) == theirs_repr
    assert [model[1].weight, model[1].bias, model[1].running_mean, model[3].weight] == params
    assert not model[1].weight.requires_grad and model[3].weight.requires_grad
    assert not model[1].training and model[3].training and model[3].activation == "relu"
    assert model[1].comm is MPI.COMM_SELF
    single = fastbn.torch.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert type(single) is fastbn.torch.SyncBatchNorm


def test_torch_input_checks(torch):
    import fastbn.torch
    bn = fastbn.torch.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn(torch.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        fastbn.torch.SyncBatchNorm(0)(torch.ones(2, 0))
    with pytest.raises(TypeError, match="comm"):
        fastbn.torch.SyncBatchNorm(3, comm=object())


def test_torch_local_parameter_grads_one_rank(torch):
    """With one rank the local share is the whole gradient."""
    import fastbn.torch
    x = torch.randn(5, 3, requires_grad=True)
    bn, ref = fastbn.torch.SyncBatchNorm(3), torch.nn.BatchNorm1d(3)
    bn(x).sum().backward()
    ref(x.detach().requires_grad_()).sum().backward()
    assert_close(bn.weight.grad, ref.weight.grad, "float32")
    assert_close(bn.bias.grad, ref.bias.grad, "float32")
