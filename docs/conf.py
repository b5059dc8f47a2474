"""Sphinx configuration of the Incoming!! documentation (`make docs`: HTML in build/docs,
warnings as errors, every reference checked)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # incoming.backend for autodoc, from this checkout

from incoming import __version__  # noqa: E402

project = "Incoming!!"
author = "the Incoming!! developers"
copyright = "2014-2026, the Incoming!! developers"  # noqa: A001 (Sphinx's name for it)
version = release = __version__

extensions = ["sphinx.ext.autodoc"]
exclude_patterns: list[str] = []
# `name` in a docstring is code, as the package's docstrings mean it
default_role = "code"
highlight_language = "none"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Types that would resolve through intersphinx, which needs the network at build time:
# named here instead, so that -n (nitpicky) still catches every reference of ours.
nitpick_ignore = [
    ("py:class", name)
    for name in (
        "Path", "pathlib.Path", "Any", "Callable", "Mapping", "Iterator",
        "collections.abc.Callable", "collections.abc.Mapping", "HTTPClient",
        "treq.client.HTTPClient", "FormFields", "incoming.backend.FormFields",
    )
]  # fmt: skip
nitpick_ignore_regex = [("py:class", r"collections\.abc\.\w+\[.*")]  # Mapping[str, str]

html_theme = "furo"
html_title = f"Incoming!! {__version__}"
html_static_path: list[str] = []
html_show_sourcelink = False
