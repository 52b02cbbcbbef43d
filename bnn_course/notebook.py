"""Small helpers for the book's notebooks that also work in Colab.

* :func:`glue` stores a number for the prose (MyST-NB's ``glue``) when MyST-NB is installed,
  and simply displays it otherwise (Colab), so no cell fails for a reader.
* :func:`show_source` displays the source of a ``bnn_course`` object, so a chapter shows the
  exact code it tests and uses.
"""

from __future__ import annotations

import inspect
from typing import Any


def glue(name: str, value: Any, display: bool = False) -> None:
    """Glue ``value`` under ``name`` for ``{glue:}`` references in the book's prose."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # Colab or plain Jupyter: show the value instead
        from IPython.display import display as ipython_display

        ipython_display(f"{name} = {value}")
        return
    myst_glue(name, value, display=display)


def show_source(obj: Any) -> Any:
    """The source code of ``obj`` as a highlighted IPython display object."""
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")
