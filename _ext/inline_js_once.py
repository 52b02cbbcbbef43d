"""Sphinx extension: include each inline ``<script>`` once per page.

Sphinx 7 adds a script given to ``app.add_js_file(None, body=...)`` after the builder started
twice (once as filename ``None``, once as ``""``), so sphinx-thebe's
``const THEBE_JS_URL = ...`` is declared twice and every page raises
``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared`` in the browser. Sphinx
fixed this in 8.2 (sphinx-doc/sphinx#13402); Jupyter Book 1 pins Sphinx 7, so this applies
the same fix: the builder receives ``""`` instead of ``None``. Remove it with Sphinx >= 8.2.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def _normalise_inline_filename(app: Sphinx) -> None:
    builder = app.builder
    if not hasattr(builder, "add_js_file"):
        return
    add_js_file = builder.add_js_file

    def add_js_file_once(filename: str | None, **kwargs: Any) -> None:
        add_js_file(filename or "", **kwargs)

    builder.add_js_file = add_js_file_once


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", _normalise_inline_filename)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
