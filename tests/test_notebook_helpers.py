"""Notebook helpers (bnn_course.notebook): glued verdicts read as words, not as repr()."""

from __future__ import annotations

import pytest

from bnn_course import notebook


def test_glue_text_glues_the_words_without_quotes(monkeypatch) -> None:
    glued = {}
    monkeypatch.setattr(notebook, "glue", lambda name, value: glued.update({name: value}))
    notebook.glue_text("verdict", "a coincidence, not a bug")
    assert repr(glued["verdict"]) == "a coincidence, not a bug"


def test_glue_text_refuses_what_is_not_a_string() -> None:
    with pytest.raises(TypeError, match="str"):
        notebook.glue_text("verdict", 0.5)


def test_numpy_and_tensor_scalars_are_glued_as_numbers_that_format(monkeypatch) -> None:
    import numpy as np
    import torch
    from myst_nb.core.variables import format_plain_text

    glued = {}
    monkeypatch.setattr("myst_nb.glue", lambda name, value, display=False:
                        glued.update({name: value}))
    notebook.glue("numpy", np.float64(0.125))
    notebook.glue("tensor", torch.tensor(0.25))
    notebook.glue("integer", np.int64(3))
    notebook.glue("vector", np.arange(2))  # not a scalar: left alone
    assert type(glued["numpy"]) is float and type(glued["tensor"]) is float
    assert type(glued["integer"]) is int and isinstance(glued["vector"], np.ndarray)
    assert format_plain_text(repr(glued["numpy"]), ".2f") == "0.12"
    assert format_plain_text(repr(glued["integer"]), ",") == "3"
