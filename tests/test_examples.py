"""The examples/ scripts run, in their fast mode, and draw their pictures.

Each runs in its own process, as a user runs it (``python examples/NAME.py``),
with ``--fast --out TMP``; a test skips, with the reason, when an optional
package the example needs is missing.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# script -> (modules it needs, the PNGs it writes)
CASES = {
    "train_numpy_mlp.py": (["matplotlib", "sklearn"],
                           ["numpy_mlp_curves.png", "numpy_mlp_activations.png"]),
    "train_torch_convert.py": (["matplotlib", "sklearn", "torch"], ["torch_convert.png"]),
    "plugin_backend.py": (["matplotlib", "fastbn_example_plugin"], ["plugin_backend.png"]),
    "bench_history.py": (["matplotlib"], ["bench_history.png"]),
}


def run(args, tmp_path, **kwargs):
    env = dict(os.environ, FASTBN_EXAMPLES_FAST="1", MPLBACKEND="Agg")
    # cwd outside the checkout, so `import fastbn` finds the installed (compiled) package
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180, **kwargs)


def missing(modules):
    for name in modules:
        if importlib.util.find_spec(name) is None:
            hint = ("pip install ./examples/plugin" if name == "fastbn_example_plugin"
                    else "pip install '.[examples]'")
            return f"{name} is not installed ({hint})"
    return None


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_and_draws(script, tmp_path):
    needs, images = CASES[script]
    reason = missing(needs)
    if reason:
        pytest.skip(reason)
    out = tmp_path / "images"
    proc = run([os.path.join(EXAMPLES, script), "--fast", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in images:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}"


def test_plugin_example_says_how_to_install_the_plugin(tmp_path):
    # None in sys.modules makes `import fastbn_example_plugin` fail as if not installed
    code = ("import runpy, sys; sys.modules['fastbn_example_plugin'] = None; "
            f"sys.argv = ['plugin_backend.py', '--out', {str(tmp_path)!r}]; "
            f"sys.path.insert(0, {EXAMPLES!r}); "
            f"runpy.run_path({os.path.join(EXAMPLES, 'plugin_backend.py')!r}, "
            "run_name='__main__')")
    proc = run(["-c", code], tmp_path)
    assert proc.returncode != 0
    assert "pip install ./examples/plugin" in proc.stderr


def test_bench_history_flags_a_regression_beyond_the_spread(tmp_path):
    """A candidate 3x slower in one fastbn row, and the control unchanged: flagged, exit 1."""
    if missing(["matplotlib"]):
        pytest.skip(missing(["matplotlib"]))
    import json
    base = os.path.join(EXAMPLES, "data", "bench_032788c.json")
    with open(base) as f:
        data = json.load(f)
    slow = next(r for r in data["results"] if r["contender"] == "cython")
    slow["median_s"] *= 3
    cand = tmp_path / "slower.json"
    cand.write_text(json.dumps(data))
    proc = run([os.path.join(EXAMPLES, "bench_history.py"), "--baseline", base,
                "--candidate", str(cand), "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("REGRESSED") == 1
    assert "moved x1.00" in proc.stdout              # the control did not move
