"""Small helpers for the book's notebooks that also work in Colab.

* :func:`glue` stores a number for the prose (MyST-NB's ``glue``) when MyST-NB is installed,
  and simply displays it otherwise (Colab), so no cell fails for a reader; :func:`glue_text`
  does the same for a verdict in words.
* :func:`show_source` displays the source of a ``bnn_course`` object, so a chapter shows the
  exact code it tests and uses.
"""

from __future__ import annotations

import inspect
from typing import Any


def _plain_number(value: Any) -> Any:
    """``value`` as a plain Python number when it is a NumPy scalar or a one-element tensor.

    MyST-NB stores the ``repr`` of a glued value and formats that text; the ``repr`` of a
    NumPy 2 scalar, ``np.float64(0.5)``, cannot be formatted as a number.
    """
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", None) == 0 and callable(item):
        return item()
    return value


def glue(name: str, value: Any, display: bool = False) -> None:
    """Glue ``value`` under ``name`` for ``{glue:}`` references in the book's prose.

    NumPy scalars and zero-dimensional tensors are glued as Python numbers, so that a
    format such as ``{glue:text}`name:.2f``` works on them.
    """
    value = _plain_number(value)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # Colab or plain Jupyter: show the value instead
        from IPython.display import display as ipython_display

        ipython_display(f"{name} = {value}")
        return
    myst_glue(name, value, display=display)


class _PlainText:
    """A string whose ``repr`` is itself, so that ``{glue:text}`` shows it without quotes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def glue_text(name: str, text: str) -> None:
    """Glue a sentence fragment (a verdict that depends on the run) for ``{glue:text}``.

    :func:`glue` of a ``str`` would show its ``repr``, quotes included.
    """
    if not isinstance(text, str):
        raise TypeError(f"glue_text expects a str, got {type(text).__name__}")
    glue(name, _PlainText(text))


def show_source(obj: Any) -> Any:
    """The source code of ``obj`` as a highlighted IPython display object."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


BOOK_FIGURE_WIDTH_INCHES = 7.0
"""Figures are drawn at about the width of the book's text column, so that a font size in
points on the figure is about the same size as the body text on the page."""


def use_book_style() -> None:
    """Figures as SVG, at column width, with text as large as the body text.

    Call once at the top of a chapter, after ``%matplotlib inline``. Vector output stays sharp
    at any zoom; fonts of 11-12 pt on a figure of :data:`BOOK_FIGURE_WIDTH_INCHES` inches are
    read at about the size of the surrounding prose. Outside IPython only the matplotlib
    settings change.
    """
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.figsize": (BOOK_FIGURE_WIDTH_INCHES, 4.0),
        "font.size": 12,
        "axes.titlesize": 12,
        "axes.labelsize": 12,
        "xtick.labelsize": 11,
        "ytick.labelsize": 11,
        "legend.fontsize": 11,
        # Glyphs as paths (matplotlib's default): math text uses fonts such as STIX that a
        # browser does not have, and as text they would show as empty boxes.
        "svg.fonttype": "path",
    })
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # not in IPython
        return
    set_matplotlib_formats("svg")
