"""Sphinx configuration of the mbn-ref documentation.

Build (what ``tests/test_docs.py`` runs; nothing is fetched at build time)::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

The prose pages are MyST Markdown, readable on GitHub as they are; the API reference is
autodoc over numpydoc docstrings; math is rendered by MathJax in the browser.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Importing mbn_tf imports Keras: pin its backend and quiet TensorFlow before any import.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

ROOT = Path(__file__).resolve().parent.parent
# The packages as the source tree lays them out (an editable install gives the same paths).
for _path in (ROOT / "conformance", ROOT / "adapters", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import mbn_ref  # noqa: E402

project = "mbn-ref"
author = "the mbn-ref authors"
copyright = "the mbn-ref authors, Apache-2.0"
release = mbn_ref.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "**/.ipynb_checkpoints",
    # a table included into conformance.md, not a page of its own
    "conformance_catch_table.md",
    # the framework reports are data read by frameworks.md
    "frameworks/*.json",
]

# --- MyST ---------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
# GitHub-style anchors for "#92-batch-count-known-only-at-run-time"-style links
myst_heading_anchors = 4
myst_dmath_double_inline = True

# --- autodoc / numpydoc -------------------------------------------------------------------
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections document the types
autodoc_mock_imports: list[str] = []
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()
numpydoc_xref_param_type = False

# --- HTML ---------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = "mbn-ref"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
html_show_sourcelink = False
# MathJax is loaded by the reader's browser (from its CDN); the build fetches nothing.
mathjax3_config = {"tex": {"tags": "ams"}}

nitpicky = False
