"""The Sphinx documentation builds with warnings as errors, as CI builds it, and its API
reference lists every public name.

The build is ``sphinx-build -W --keep-going -b html docs <tmp>`` in a subprocess, run
from a temporary directory so that it documents the installed fastbn (from the checkout
root, ``-m`` would import the uncompiled source tree). About 20-40 s.
"""
import importlib
import posixpath
import re
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("sphinx", "numpydoc", "myst_parser"):
    pytest.importorskip(_module, reason=f"the docs build needs {_module}: pip install '.[docs]'")

from sphinx.util.inventory import InventoryFile  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
# each documented module, and its page in docs/api/
PAGES = {"fastbn": "fastbn", "fastbn.torch": "torch", "fastbn.jax": "jax",
         "fastbn.distributed": "distributed", "fastbn.testing": "testing"}


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out.parent / "doctrees"), str(DOCS), str(out)],
        cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _public_names(module):
    """``__all__``; for a module without one, the classes and functions it defines
    (or takes from its private helper modules, ``fastbn.torch`` from ``fastbn._torch_*``)."""
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if not n.startswith("__")]
    own = (module.__name__, module.__name__.replace("fastbn.", "fastbn._") + "_")
    return [n for n, obj in vars(module).items()
            if not n.startswith("_") and callable(obj)
            and getattr(obj, "__module__", "").startswith(own)]


def test_docs_build_without_warnings(html):
    assert (html / "index.html").exists()
    for page in ("guide/use", "examples", "backends", "numerics", "api/fastbn"):
        assert (html / f"{page}.html").exists(), page


@pytest.mark.parametrize("module_name", PAGES)
def test_api_reference_lists_every_public_name(html, module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.skip(f"{module_name} is not importable here, so not documented: {exc}")
    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    documented = {name for role, objects in inventory.items() if role.startswith("py:")
                  for name in objects}
    page = (html / "api" / f"{PAGES[module_name]}.html").read_text(encoding="utf-8")
    summary = "".join(re.findall(r'<table class="autosummary.*?</table>', page, re.S))
    names = _public_names(module)
    assert names
    missing = [n for n in names if f"{module_name}.{n}" not in documented]
    assert not missing, f"not in docs/api/{PAGES[module_name]}.rst's reference: {missing}"
    unlisted = [n for n in names if f'href="#{module_name}.{n}"' not in summary]
    assert not unlisted, f"not in docs/api/{PAGES[module_name]}.rst's summary tables: {unlisted}"
