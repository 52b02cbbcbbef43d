"""Sphinx extension: fail loudly when the local copy of MathJax is missing.

The book serves MathJax from ``_static/`` (``mathjax_path`` in ``_config.yml``) so that math
renders offline. Those files are not in git; ``.ci/fetch_mathjax`` puts them in place.
Without them every page would build and then show raw TeX, so say so at build time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _check_mathjax(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    path = app.config.mathjax_path
    if not path or "://" in path or path.startswith("/"):
        return
    static_dirs = [Path(app.confdir, d) for d in app.config.html_static_path]
    if not any((d / path).is_file() for d in static_dirs):
        logger.warning("MathJax is missing (no %s in any html_static_path), so math would "
                       "not render: run .ci/fetch_mathjax first", path)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", _check_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
