"""Sphinx configuration for fastbn's documentation.

Build (from the repository root; warnings are errors, as in CI)::

    pip install ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference is generated from the numpydoc docstrings of the installed
``fastbn``; the guide pages are README.md's sections, included (not copied) by
heading, so README.md stays the one source.
"""
import importlib
import os
import re
from pathlib import Path


import fastbn  # noqa: E402  (the installed package: its version, its docstrings)

project = "fastbn"
author = "fastbn contributors"
copyright = "fastbn contributors, BSD-3-Clause"
release = fastbn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]
templates_path = []
html_theme = "alabaster"
html_static_path = []
html_title = f"fastbn {release}"

# -- MyST ---------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# -- autodoc / autosummary / numpydoc -----------------------------------------------
# Optional dependencies that need hardware or a launcher are mocked, so the build needs
# neither a GPU nor MPI (fastbn imports both lazily anyway). The framework adapters
# import their framework at import time (fastbn.torch subclasses torch's modules, and
# mocks do not survive that), so an adapter whose framework is missing here, or a
# module this checkout does not have, is left out of the reference (excluded, and
# dropped from api/index.rst's toctree by _drop_left_out_pages below).
autodoc_mock_imports = ["cupy", "cupyx", "mpi4py"]
_LEFT_OUT = []  # API pages (in api/) of modules that cannot be imported here
for _module, _page in (("fastbn.torch", "torch"), ("fastbn.jax", "jax"),
                       ("fastbn.distributed", "distributed")):
    try:
        importlib.import_module(_module)
    except ImportError as _exc:
        print(f"fastbn docs: leaving {_module} out of the API reference ({_exc})")
        exclude_patterns.append(f"api/{_page}.rst")
        _LEFT_OUT.append(_page)

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"            # signatures as written; types live in the docstrings
autosummary_generate = False          # the reference pages are written out, no stub files
numpydoc_show_class_members = False   # autodoc lists members; no per-class stub tables
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()    # numpydoc's style checks are advice, not build errors

intersphinx_mapping = {}              # offline build: no inventories fetched
suppress_warnings = []


# -- included markdown: README.md's sections as pages, examples/README.md ------------
ROOT = Path(__file__).resolve().parent.parent
# Repository paths that are no page of this site but are shown on one (links to them
# go there); every other link to a file of the repository that is not a page becomes
# a download link (Sphinx copies the file into the site).
_SHOWN_ON = {"examples/plugin": "examples.md#fastbn-example-plugin",
             "CHANGELOG.md": "changelog.md"}
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _fenced(lines):
    """(line, inside a fenced code block) for each line of markdown."""
    fence = None
    for line in lines:
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if marker and fence is None:
            fence = marker.group(1)[0]
            yield line, True
        elif marker and marker.group(1)[0] == fence:
            fence = None
            yield line, True
        else:
            yield line, fence is not None


def _included_markdown(app, relative_path, parent_docname, content):
    """Adapt a markdown file of the repository to the page that includes it.

    - README.md: a README section on its own page has the page's title for its ``##``
      heading, so the section's ``###`` headings become ``##`` (index.md includes only
      the introduction, which has no headings).
    - Links (in any included markdown file of the repository): resolved against the
      included file's folder; a page of this site becomes a link to it, a path of
      ``_SHOWN_ON`` a link to the page that shows it, any other existing file a
      download link. Images are left to the include's ``relative-images`` option.
    """
    source = (Path(app.srcdir) / relative_path).resolve()
    if source.suffix != ".md" or ROOT not in source.parents:
        return
    page_dir = (Path(app.srcdir) / app.env.docname).parent

    def link(match):
        bang, text, target = match.groups()
        if bang or re.match(r"[a-zA-Z][a-zA-Z+.-]*:|#", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve()
        repo_path = resolved.relative_to(ROOT).as_posix() if ROOT in resolved.parents else None
        if repo_path in _SHOWN_ON:
            new = Path(app.srcdir, _SHOWN_ON[repo_path]).as_posix()
        elif resolved.suffix == ".md" and Path(app.srcdir) in resolved.parents:
            new = resolved.as_posix() + (f"#{anchor}" if anchor else "")
        elif resolved.is_file():
            return f"[{text}](path:{os.path.relpath(resolved, page_dir)})"
        else:
            return match.group(0)   # a broken link: the build says so
        return f"[{text}]({os.path.relpath(new, page_dir)})"

    readme = source == ROOT / "README.md"
    out = []
    for line, in_code in _fenced(content[0].split("\n")):
        if not in_code:
            if readme and line.startswith("###"):
                line = line[1:]
            line = _LINK.sub(link, line)
        out.append(line)
    content[0] = "\n".join(out)


# -- module docstrings --------------------------------------------------------------
def _module_usage_as_code(app, what, name, obj, options, lines):
    """fastbn's module docstrings open with a usage snippet indented under the summary
    (plain-text style); reST would read it as a block quote. Render each indented
    block that follows a blank line as a literal (code) block, unless the paragraph
    before it already introduces one with ``::``.
    """
    if what != "module":
        return
    out, previous = [], ""
    for i, line in enumerate(lines):
        starts_block = (line.startswith("    ") and i > 0 and not lines[i - 1].strip()
                        and previous.strip() and not previous.rstrip().endswith("::"))
        if starts_block:
            out[-1:] = ["", "::", ""]
        out.append(line)
        if line.strip():
            previous = line
    lines[:] = out


def _drop_left_out_pages(app, docname, source):
    """Take the pages of modules that cannot be imported here out of the API toctree."""
    if docname == "api/index" and _LEFT_OUT:
        source[0] = "\n".join(line for line in source[0].split("\n")
                               if line.strip() not in _LEFT_OUT)


def setup(app):
    app.connect("source-read", _drop_left_out_pages)
    app.connect("include-read", _included_markdown)
    app.connect("autodoc-process-docstring", _module_usage_as_code)
