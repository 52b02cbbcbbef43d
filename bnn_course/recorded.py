"""Recorded runs: the book's long GPU runs, kept as JSON with their provenance.

Some questions of the book need more training than a reader's CPU can give in a chapter's
time, e.g. chapter 7's "would 100 epochs of the seed recipe have helped?". Such a run is
made once, on a GPU, with the project's own command line (``python -m bnn_course.train``),
and its ``metrics.json`` is kept in ``bnn_course/recorded/NAME.json`` (package data, so a
``pip install`` in Colab has it too), exactly as the command wrote it, plus one block
``"record"`` that says where and how it was made:

==============  ===========================================================================
``stands_for``  ``{"chapter", "tier", "run"}``: the chapter's budget (``"diagnosis"``), the
                tier whose run it is (``"gpu"``) and the run's key in the chapter's table
``device``      the machine, in words; ``hardware``: the same, short (for labels)
``torch``       torch's version (also ``python``; both equal to the provenance's)
``commit``      the project's commit the run was made at
``command``     the command line, with ``DATA`` for the data folder
``date``        ISO date; ``made_by``: who or what made it; ``source``: where it came from
``notes``       a list of sentences: interruptions, known wrong fields, anything unusual
==============  ===========================================================================

A chapter shows a record beside the reader's own run, labelled by :func:`record_label`
("recorded on ...: not this page's run"), never as the reader's result. A record stays
valid only while the chapter would still train the same run: :func:`expected_config`
builds today's configuration of the run the record stands for with the chapter's own
builder (:mod:`bnn_course.chapter_runs`), and :func:`record_differences` lists the fields in
which the record differs from it, ignoring those that do not change what is learned
(:data:`bnn_course.comparison.IGNORED_FOR_REUSE`: device, logging, evaluation samples).
``tests/test_recorded.py`` requires that list to be empty for every record.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnn_course import chapter_runs
from bnn_course.comparison import IGNORED_FOR_REUSE
from bnn_course.config import BUDGETS, TIERS
from bnn_course.run_folder import config_differences
from bnn_course.train import CheckpointError, TrainConfig, config_from_dict

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; only the annotations need it
    from importlib.resources.abc import Traversable

DOCUMENT_FIELDS: tuple[str, ...] = ("final", "history", "config", "provenance")
"""The parts of a ``metrics.json`` (:func:`bnn_course.train.metrics_document`) a record
must have."""

RECORD_FIELDS: tuple[str, ...] = ("stands_for", "device", "hardware", "torch", "python",
                                  "commit", "command", "date", "made_by", "source", "notes")
"""The fields of a record's ``"record"`` block (the module docstring says what each is)."""

STANDS_FOR_FIELDS: tuple[str, ...] = ("chapter", "tier", "run")

CONFIG_BUILDERS: dict[str, Callable[[str], dict[str, TrainConfig]]] = {
    "diagnosis": chapter_runs.diagnosis_configs,
}
"""For each chapter (its ``BUDGETS`` key) with records: the builder of its runs'
configurations from the name of a tier, the one the chapter itself uses."""

_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class RecordError(ValueError):
    """A record file that is not a valid record (its message says what is wrong)."""


@dataclass(frozen=True)
class RecordedRun:
    """One recorded run, read and checked by :func:`load_record`.

    ``config`` is the run's :class:`~bnn_course.train.TrainConfig`; ``history``, ``final``
    and ``provenance`` are the ``metrics.json`` parts of the same names (``history``: one
    record per epoch, as ``TrainResult.history``); ``record`` is the ``"record"`` block and
    ``document`` the whole file.
    """

    name: str
    config: TrainConfig
    history: list[dict[str, Any]]
    final: dict[str, Any]
    provenance: dict[str, Any]
    record: dict[str, Any]
    document: dict[str, Any]

    @property
    def label(self) -> str:
        """:func:`record_label` of this record."""
        return record_label(self)


def records_folder() -> Traversable:
    """The folder ``bnn_course/recorded`` of the installed package (also in a wheel)."""
    return resources.files("bnn_course") / "recorded"


def _folder(folder: str | Path | Traversable | None) -> Traversable | Path:
    return records_folder() if folder is None else (
        Path(folder) if isinstance(folder, str) else folder)


def record_names(folder: str | Path | Traversable | None = None) -> list[str]:
    """The names of the records in ``folder`` (default: the package's), sorted: every
    ``NAME.json``."""
    place = _folder(folder)
    if not place.is_dir():
        return []
    return sorted(entry.name[:-len(".json")] for entry in place.iterdir()
                  if entry.name.endswith(".json") and entry.is_file())


def _problems(document: Any) -> list[str]:
    """What is wrong with a record's parsed JSON, in words (empty when nothing is)."""
    if not isinstance(document, dict):
        return [f"the file holds a {type(document).__name__}, not a JSON object"]
    problems = [f"no {key!r}" for key in (*DOCUMENT_FIELDS, "record") if key not in document]
    if problems:
        return problems
    block = document["record"]
    if not isinstance(block, dict):
        return ["'record' is not an object"]
    problems += [f"record.{key} is missing" for key in RECORD_FIELDS if key not in block]
    texts = [key for key in RECORD_FIELDS if key not in ("stands_for", "notes")]
    problems += [f"record.{key} must be a non-empty string" for key in texts
                 if key in block and not (isinstance(block[key], str) and block[key].strip())]
    notes = block.get("notes")
    if "notes" in block and not (isinstance(notes, list)
                                 and all(isinstance(n, str) and n.strip() for n in notes)):
        problems.append("record.notes must be a list of sentences")
    if isinstance(block.get("commit"), str) and not _COMMIT.fullmatch(block["commit"]):
        problems.append(f"record.commit {block['commit']!r} is not a git commit hash")
    if isinstance(block.get("date"), str) and not _DATE.fullmatch(block["date"]):
        problems.append(f"record.date {block['date']!r} is not YYYY-MM-DD")
    stands_for = block.get("stands_for")
    if "stands_for" in block:
        if not (isinstance(stands_for, dict)
                and all(isinstance(stands_for.get(k), str) for k in STANDS_FOR_FIELDS)):
            problems.append(f"record.stands_for must name {list(STANDS_FOR_FIELDS)}")
        elif stands_for["chapter"] not in CONFIG_BUILDERS:
            problems.append(f"record.stands_for.chapter {stands_for['chapter']!r} has no "
                            f"configuration builder (known: {sorted(CONFIG_BUILDERS)})")
        elif stands_for["tier"] not in TIERS:
            problems.append(f"record.stands_for.tier {stands_for['tier']!r} is not one of "
                            f"{TIERS}")
    provenance = document["provenance"]
    if not isinstance(provenance, dict):
        problems.append("'provenance' is not an object")
    else:
        for key in ("torch", "python"):
            if isinstance(block.get(key), str) and provenance.get(key) != block[key]:
                problems.append(f"record.{key} {block[key]!r} differs from the provenance's "
                                f"{provenance.get(key)!r}")
    if not isinstance(document["final"], dict) or "test_accuracy_mean" not in document["final"]:
        problems.append("'final' has no test_accuracy_mean")
    history = document["history"]
    if not (isinstance(history, list) and history
            and all(isinstance(r, dict) for r in history)):
        problems.append("'history' must be a non-empty list of epoch records")
    elif [r.get("epoch") for r in history] != list(range(1, len(history) + 1)):
        problems.append("the history's epochs are not 1, 2, ..., E")
    return problems


def load_record(name: str, folder: str | Path | Traversable | None = None) -> RecordedRun:
    """Read and check the record ``name`` (``folder``: default the package's records).

    Raises
    ------
    FileNotFoundError
        When there is no such record (the message lists those there are).
    RecordError
        When the file is not valid JSON, lacks a part of ``metrics.json`` or a field of the
        ``"record"`` block, holds an invalid configuration, or a history whose length is
        not the configuration's epochs (a record of an unfinished run).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a record name is lower-case letters, digits and '-', got {name!r}")
    place = _folder(folder)
    path = place / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded run {name!r} in {place}; recorded runs: "
                                f"{record_names(place) or 'none'}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(f"record {name!r} ({path}) is not valid JSON: {error}") from error
    problems = _problems(document)
    if problems:
        raise RecordError(f"record {name!r} ({path}) is malformed: " + "; ".join(problems))
    try:
        config = config_from_dict(document["config"], path=str(path))
    except CheckpointError as error:
        raise RecordError(f"record {name!r}: {error}") from error
    if len(document["history"]) != config.epochs:
        raise RecordError(f"record {name!r} has {len(document['history'])} epochs of history "
                          f"but its configuration trains {config.epochs}: an unfinished run")
    return RecordedRun(name=name, config=config, history=document["history"],
                       final=document["final"], provenance=document["provenance"],
                       record=document["record"], document=document)


def record_label(record: RecordedRun) -> str:
    """One line for a figure's legend or a table's caption, e.g. ``"recorded on 1x H200,
    torch 2.11.0+cu130, commit dccdc4a: not this page's run"``."""
    block = record.record
    return (f"recorded on {block['hardware']}, torch {block['torch']}, commit "
            f"{block['commit']}: not this page's run")


def _as_record(record: str | RecordedRun,
               folder: str | Path | Traversable | None) -> RecordedRun:
    return record if isinstance(record, RecordedRun) else load_record(record, folder)


def expected_config(record: str | RecordedRun,
                    folder: str | Path | Traversable | None = None) -> TrainConfig:
    """Today's configuration of the run ``record`` (a name or a loaded record) stands for:
    the chapter's builder (:data:`CONFIG_BUILDERS`) applied to the tier of
    ``record.stands_for``, today's budget of that tier, and its run.

    Raises
    ------
    RecordError
        When the chapter's table has no such run any more.
    """
    loaded = _as_record(record, folder)
    chapter, tier, run = (loaded.record["stands_for"][k] for k in STANDS_FOR_FIELDS)
    if tier not in BUDGETS[chapter]:
        raise RecordError(f"record {loaded.name!r} stands for the {tier} tier of {chapter!r}, "
                          f"which has the budgets {sorted(BUDGETS[chapter])}")
    configs = CONFIG_BUILDERS[chapter](tier)
    if run not in configs:
        raise RecordError(f"record {loaded.name!r} stands for run {run!r} of {chapter!r}, "
                          f"which has the runs {sorted(configs)}")
    return configs[run]


def record_differences(record: str | RecordedRun,
                       folder: str | Path | Traversable | None = None) -> list[str]:
    """``"field: saved X, now Y"`` for every field of :func:`expected_config` outside
    :data:`~bnn_course.comparison.IGNORED_FOR_REUSE` in which the record's configuration
    differs (:func:`bnn_course.run_folder.config_differences`); empty while the record is
    still the chapter's run."""
    loaded = _as_record(record, folder)
    return config_differences(dataclasses.asdict(loaded.config),
                              dataclasses.asdict(expected_config(loaded)),
                              ignore=IGNORED_FOR_REUSE)
