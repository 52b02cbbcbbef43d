"""Sphinx extension: label the reference list author-year, as the text cites.

With ``bibtex_reference_style: author_year`` the prose cites "(Blundell et al., 2015)", but
pybtex's formatting styles label the list at the end alphabetically ("[BCKW15]"), so a
reader cannot find a citation in the list by what the text shows. This registers

* the pybtex label style ``author_year``: "Graves, 2011", "Kingma and Welling, 2014",
  "Blundell et al., 2015" (the same names and year as the in-text citation; "2015a",
  "2015b" where two entries would otherwise share a label), and
* the pybtex formatting style ``author_year_plain``: pybtex's ``plain`` (entries sorted by
  author, year, title) with that label style,

and selects the latter as ``bibtex_default_style`` unless the configuration names another.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pybtex.database import Entry
from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx


def _last_name(person: Any) -> str:
    """A person's last name(s) as plain text (LaTeX accents and braces resolved)."""
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as(
        "text")


def author_year_label(entry: Entry) -> str:
    """"Surname, year" for one author, "A and B, year" for two, "A et al., year" beyond."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(p) for p in persons]
    if not names:
        authors = entry.fields.get("organization") or entry.fields.get("title", entry.key)
    elif len(names) == 1:
        authors = names[0]
    elif len(names) == 2:
        authors = f"{names[0]} and {names[1]}"
    else:
        authors = f"{names[0]} et al."
    return f"{authors}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """pybtex label style: author-year labels, made unique with a, b, ... after the year."""

    def format_labels(self, sorted_entries: Iterable[Entry]) -> Iterator[str]:
        entries = list(sorted_entries)
        labels = [author_year_label(entry) for entry in entries]
        counts = Counter(labels)
        seen: Counter[str] = Counter()
        for label in labels:
            if counts[label] > 1:
                suffix = chr(ord("a") + seen[label])
                seen[label] += 1
                yield label + suffix
            else:
                yield label


class AuthorYearPlainStyle(PlainStyle):
    """pybtex's ``plain`` formatting style with :class:`AuthorYearLabelStyle` labels."""

    default_label_style = "author_year"


def setup(app: Sphinx) -> dict[str, Any]:
    register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle, force=True)
    register_plugin("pybtex.style.formatting", "author_year_plain", AuthorYearPlainStyle,
                    force=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
