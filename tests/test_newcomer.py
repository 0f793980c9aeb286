"""A new user's first run: the command line's version and usage lines, what bench says
about contenders it leaves out, the Markdown table, the first call's cost with numba
installed, import errors that say what to install, print(model) after convert."""
import os
import subprocess
import sys

import pytest

import fastbn
from fastbn import bench
from fastbn.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, cwd=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastbn {fastbn.__version__}"


@pytest.mark.parametrize("argv0,prog", [("/venv/bin/fastbn", "fastbn"),
                                        ("/x/fastbn/__main__.py", "python -m fastbn")])
def test_usage_names_the_command_as_run(monkeypatch, capsys, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0, "bench", "--help"])
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert capsys.readouterr().out.startswith(f"usage: {prog} bench")


class _Unavailable(fastbn.Backend):
    name, priority = "never-here", -50

    def is_available(self):
        return False, "needs hardware this machine lacks"


def test_bench_lists_what_it_leaves_out(monkeypatch, capsys):
    fastbn.register_backend(_Unavailable())
    try:
        assert ("never-here", "needs hardware this machine lacks") in \
            bench.unavailable_contenders()
        main(["bench", "--layout", "NC", "--shape", "16,4", "--op", "inference",
              "--repeats", "1", "--dtype", "float64"])
        out = capsys.readouterr().out
        assert "(never-here left out: needs hardware this machine lacks)" in out
    finally:
        from fastbn import _registry
        _registry.unregister_backend("never-here")


def test_bench_markdown(capsys):
    main(["bench", "--layout", "NC", "--shape", "16,4", "--op", "inference", "--repeats", "1",
          "--backend", "numpy", "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("*fastbn ") and "medians and p90s of 1" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:2] == ["backend", "operation"] and header[-1] == "p90 vs torch"
    row = [c.strip() for c in lines[4].strip("|").split("|")]
    assert row[:5] == ["numpy", "inference", "NC", "16x4", "float32"]
    assert float(row[5]) > 0 and len(row) == len(header)


def test_first_call_does_not_import_lower_backends(tmp_path):
    # The numba backend ranks below cython: probing it would import numba (~0.2 s) for
    # a call cython serves. (Run outside the checkout, which holds an uncompiled tree.)
    if not fastbn.get_backend("cython").is_available()[0]:
        pytest.skip("the cython backend is not built here")
    result = _python("import sys, numpy as np, fastbn\n"
                     "fastbn.batch_norm_forward(np.ones((4, 3), np.float32))\n"
                     "assert fastbn.last_backend() == 'cython', fastbn.last_backend()\n"
                     "print('numba' in sys.modules)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("module,package", [("torch", "torch==2.13.0"), ("jax", "jax")])
def test_adapter_without_its_framework_says_what_to_install(module, package, tmp_path):
    result = _python(f"import sys; sys.modules[{module!r}] = None\nimport fastbn.{module}",
                     cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastbn.") and f"pip install {package}" in last
    assert f'".[{module}]"' in last


def test_checkout_advice_is_one_wording():
    from fastbn._backends.cython_omp import unbuilt_reason
    reason = unbuilt_reason("ImportError: no module")
    imported_from = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    if os.path.exists(os.path.join(imported_from, "setup.py")):  # an editable checkout
        assert "source checkout" in reason and "pip install -e ." in reason
    else:  # an installed fastbn: no checkout to point at
        assert "reinstall fastbn on a machine with a C compiler" in reason
    info = fastbn.show_config("dicts")
    assert info["threads"] == fastbn.get_num_threads()


def test_print_converted_model_shows_fastbn():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import fastbn.torch
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    text = str(fastbn.torch.convert(model))
    assert "(1): fastbn.torch.BatchNorm2d(4, eps=1e-05" in text
    assert "(0): Conv2d(" in text


def test_bench_json_carries_label_revision_and_minima(tmp_path, capsys):
    path = tmp_path / "run.json"
    main(["bench", "--layout", "NC", "--shape", "16,4", "--op", "inference", "--repeats", "2",
          "--backend", "numpy", "--json", str(path), "--label", "v1-candidate"])
    import json
    run = json.loads(path.read_text())
    assert run["label"] == "v1-candidate"
    if run["git_revision"] is not None:  # a checkout: uncommitted changes are named
        import subprocess
        package = os.path.dirname(os.path.abspath(fastbn.__file__))  # where bench asks git
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=package, capture_output=True, text=True).stdout.strip()
        assert run["git_revision"].endswith("-dirty") == bool(dirty)
    row = run["results"][0]
    assert 0 < row["min_s"] <= row["median_s"] <= row["p90_s"]
    assert row["floor_ratio_min"] > 0
