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
