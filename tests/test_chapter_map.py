"""The chapter map of the introduction: read from the book, drawn reproducibly."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest

from bnn_course.diagrams import (
    CHAPTER_MAP_PATH,
    CHAPTER_PREREQUISITES,
    book_chapters,
    chapter_map_diagram,
    write_chapter_map,
)

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def test_the_chapters_are_read_from_the_toc_in_reading_order() -> None:
    chapters = book_chapters(ROOT)
    assert [c["number"] for c in chapters] == list(range(1, len(chapters) + 1))
    assert chapters[0]["title"] == "Weights as distributions"
    assert chapters[0]["part"] == "Foundations"
    # A module is "first used" by one chapter only, and helpers are never listed.
    listed = [m for c in chapters for m in c["new_modules"]]
    assert len(listed) == len(set(listed))
    assert not {"config", "notebook", "provenance", "seeding"} & set(listed)
    assert "posterior" in chapters[0]["new_modules"]
    # Every arrow of the map joins two chapters of the book, the earlier one first.
    numbers = {c["number"] for c in chapters}
    for number, before in CHAPTER_PREREQUISITES.items():
        assert number in numbers and set(before) <= numbers
        assert all(b < number for b in before)


def test_the_committed_chapter_map_equals_a_fresh_render(tmp_path: Path) -> None:
    fresh = write_chapter_map(tmp_path / "chapter_map.svg")
    committed = ROOT / CHAPTER_MAP_PATH
    assert committed.read_bytes() == fresh.read_bytes(), (
        "book/figures/chapter_map.svg is out of date: run `python -m bnn_course.diagrams`")


def test_rendering_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    first = write_chapter_map(tmp_path / "a.svg").read_bytes()
    second = write_chapter_map(tmp_path / "b.svg").read_bytes()
    assert first == second
    assert b"<dc:date>" not in first  # no timestamp in the file


def test_the_map_fits_the_column_and_its_text_is_readable() -> None:
    fig = chapter_map_diagram(book_chapters(ROOT))
    try:
        assert fig.get_figwidth() <= 7.0
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
        assert texts and min(t.get_fontsize() for t in texts) >= 10
        # Every chapter title is on the map.
        drawn = " ".join(t.get_text().replace("\n", " ") for t in texts)
        for chapter in book_chapters(ROOT):
            assert chapter["title"] in drawn
    finally:
        plt.close(fig)


def test_bad_chapter_lists_are_errors() -> None:
    chapter = {"part": "P", "title": "T", "file": "f", "new_modules": []}
    three_in_a_part = [dict(chapter, number=n) for n in (1, 2, 3)]
    with pytest.raises(ValueError, match="at most two"):
        chapter_map_diagram(three_in_a_part)
    missing_chapters = [dict(chapter, number=1)]
    with pytest.raises(ValueError, match="not in the map"):
        chapter_map_diagram(missing_chapters)


def _write_notebook(path: Path, heading: str, code: str) -> None:
    import json

    cells = [{"cell_type": "markdown", "metadata": {}, "source": [heading]},
             {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": [code]}]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                "nbformat_minor": 5}), encoding="utf-8")


def test_a_small_book_is_read_part_by_part(tmp_path: Path) -> None:
    (tmp_path / "book").mkdir()
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n"
        "  - caption: First part  # a comment\n    chapters:\n"
        "      - file: book/a\n      - file: book/b\n"
        "  - caption: \"Back matter\"\n    chapters:\n      - file: book/references\n",
        encoding="utf-8")
    _write_notebook(tmp_path / "book" / "a.ipynb", "# Chapter 1: Alpha",
                    "from bnn_course.posterior import x\nfrom bnn_course.config import y")
    _write_notebook(tmp_path / "book" / "b.ipynb", "# Chapter 2: Beta",
                    "from bnn_course.posterior import x\nimport bnn_course.elbo")
    (tmp_path / "book" / "references.md").write_text("# References\n", encoding="utf-8")
    chapters = book_chapters(tmp_path)
    assert [(c["part"], c["number"], c["title"]) for c in chapters] == [
        ("First part", 1, "Alpha"), ("First part", 2, "Beta")]
    assert chapters[0]["new_modules"] == ["posterior"]  # config is a helper
    assert chapters[1]["new_modules"] == ["elbo"]  # posterior was used first in chapter 1
    _write_notebook(tmp_path / "book" / "b.ipynb", "# Beta without a number", "")
    with pytest.raises(ValueError, match="Chapter N"):
        book_chapters(tmp_path)
