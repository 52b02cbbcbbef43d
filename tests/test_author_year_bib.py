"""Tests of _ext/author_year_bib.py: the reference list is labelled as the text cites."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pybtex.database import BibliographyData, Entry, Person, parse_file
from pybtex.plugin import find_plugin

ROOT = Path(__file__).resolve().parents[1]


def _load_extension():
    spec = importlib.util.spec_from_file_location("author_year_bib",
                                                  ROOT / "_ext" / "author_year_bib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.setup(type("App", (), {})())  # setup only registers the pybtex plugins
    return module


def _labels(data: BibliographyData) -> dict[str, str]:
    style = find_plugin("pybtex.style.formatting", "author_year_plain")()
    return {entry.key: entry.label for entry in style.format_entries(data.entries.values())}


def test_labels_of_the_book_references_are_author_year() -> None:
    _load_extension()
    labels = _labels(parse_file(str(ROOT / "references.bib")))
    assert labels["blundell2015weight"] == "Blundell et al., 2015"
    assert labels["kingma2014autoencoding"] == "Kingma and Welling, 2014"
    assert labels["graves2011practical"] == "Graves, 2011"
    assert labels["simonyan2015very"] == "Simonyan and Zisserman, 2015"
    assert len(set(labels.values())) == len(labels)  # every label unique


def test_equal_labels_get_a_b_suffixes_and_latex_is_resolved() -> None:
    _load_extension()
    data = BibliographyData(entries={
        "x": Entry("article", fields={"title": "First", "journal": "J", "year": "2020"},
                   persons={"author": [Person("{\\'S}wi{\\k{a}}tkowski, Jakub")]}),
        "y": Entry("article", fields={"title": "Second", "journal": "J", "year": "2020"},
                   persons={"author": [Person("{\\'S}wi{\\k{a}}tkowski, Jakub")]}),
    })
    labels = _labels(data)
    assert sorted(labels.values()) == ["Świątkowski, 2020a", "Świątkowski, 2020b"]
