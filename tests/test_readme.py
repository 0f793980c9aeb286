"""Every Python snippet in README.md runs as written, each in a fresh interpreter.

A snippet that needs an optional dependency (torch, jax, mpi4py, dask, cupy) skips with
the reason when it is missing; a snippet made to be read, not run, is marked with an
HTML comment ``<!-- not run: reason -->`` on the line before its fence.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?```python\n(?P<code>.*?)```",
                    re.S)
_OPTIONAL = ("torch", "jax", "mpi4py", "dask", "cupy", "flax")


def _snippets():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code"))
        yield pytest.param(m.group("code"), m.group("why"), id=f"line{line}")


@pytest.mark.parametrize("code,not_run", list(_snippets()))
def test_readme_snippet_runs(code, not_run, tmp_path):
    if not_run:
        pytest.skip(f"marked in README.md as not run: {not_run}")
    for name in _OPTIONAL:
        if re.search(rf"\b(import|from) {name}\b|\b{name}\.", code) and \
                importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, f"README snippet failed:\n{code}\n{result.stderr[-3000:]}"
