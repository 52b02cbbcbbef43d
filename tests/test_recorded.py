"""Tests of bnn_course.recorded and of the chapter-7 configurations the records stand for.

* Every record in the package loads, carries its full provenance (device, torch, python,
  commit, command, date, who made it, notes), and its configuration equals today's
  GPU-tier configuration of the run it stands for, up to the fields that do not change
  what is learned (``IGNORED_FOR_REUSE``). A budget changed on purpose breaks that check.
* Broken record files fail with a message that names the problem.
* ``chapter_runs.diagnosis_configs`` builds chapter 7's table: A is the seed recipe, E the
  default recipe, and every other run changes exactly the setting its label names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from bnn_course.chapter_runs import DIAGNOSIS_LABELS, LONG_DIAGNOSIS_RUNS, diagnosis_configs
from bnn_course.comparison import IGNORED_FOR_REUSE
from bnn_course.config import BUDGETS
from bnn_course.diagnostics import loss_decomposition, sigma_movement
from bnn_course.recorded import (
    RECORD_FIELDS,
    RecordError,
    expected_config,
    load_record,
    record_differences,
    record_label,
    record_names,
    records_folder,
)
from bnn_course.run_folder import config_differences
from bnn_course.train import RECIPES, TrainConfig, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
SEED_RECORD = "seed-recipe-100-epochs"


# ---------------------------------------------------------------------- the package's records


def test_the_package_has_the_seed_record() -> None:
    assert SEED_RECORD in record_names()


@pytest.mark.parametrize("name", record_names())
def test_every_record_loads_with_full_provenance(name: str) -> None:
    record = load_record(name)
    assert set(RECORD_FIELDS) <= set(record.record)
    for key in RECORD_FIELDS:
        assert record.record[key], f"{name}: record.{key} is empty"
    assert re.fullmatch(r"[0-9a-f]{7,40}", record.record["commit"])
    assert record.record["command"].startswith("python -m bnn_course.")
    assert record.record["torch"] == record.provenance["torch"]
    assert record.provenance["mode"] == "full"
    assert not record.provenance["data_is_synthetic"]
    assert len(record.history) == record.config.epochs
    assert record.label == record_label(record)
    assert record.label.startswith("recorded on ") and "not this page's run" in record.label


@pytest.mark.parametrize("name", record_names())
def test_every_record_is_todays_gpu_tier_run(name: str) -> None:
    assert record_differences(name) == [], (
        f"{name} no longer matches the run it stands for: re-record it on a GPU, or restore "
        "the budget")


@pytest.mark.parametrize("name", record_names())
def test_a_record_differs_from_its_run_only_where_nothing_is_learned(name: str) -> None:
    record = load_record(name)
    everything = config_differences(dataclasses.asdict(record.config),
                                    dataclasses.asdict(expected_config(name)))
    differing = {line.split(":", 1)[0] for line in everything}
    assert differing <= set(IGNORED_FOR_REUSE)


@pytest.mark.parametrize("field, value", [("long_epochs", 50), ("batch_size", 128),
                                          ("hidden_features", 128)])
def test_a_changed_budget_makes_the_record_stale(monkeypatch, field: str,
                                                 value: object) -> None:
    monkeypatch.setitem(BUDGETS["diagnosis"]["gpu"], field, value)
    differences = record_differences(SEED_RECORD)
    assert len(differences) == 1
    config_field = {"long_epochs": "epochs"}.get(field, field)
    assert differences[0].startswith(f"{config_field}: saved ")


def test_a_changed_recipe_makes_the_record_stale(monkeypatch) -> None:
    monkeypatch.setitem(BUDGETS["diagnosis"]["gpu"], "channels", (16, 32, 64))
    assert [d.split(":")[0] for d in record_differences(SEED_RECORD)] == ["channels"]


def test_the_seed_record_is_what_chapter_7_quotes() -> None:
    record = load_record(SEED_RECORD)
    assert record.record["stands_for"] == {"chapter": "diagnosis", "tier": "gpu", "run": "A"}
    assert record.record["commit"] == "dccdc4a" and "H200" in record.record["device"]
    assert record.config.epochs == 100 and record.config.batch_size == 256
    # 50,000 images in batches of 256: 196 steps per epoch, the last of each one logged
    parts = loss_decomposition(record.history, num_train=record.provenance["num_train"])
    assert parts["step"].tolist() == [196 * e for e in range(1, 101)]
    movement = sigma_movement(record.history, record.config, steps_per_epoch=196)
    assert movement["bound"][-1].item() == pytest.approx(19.6)
    assert record.final["test_accuracy_mean"] == pytest.approx(0.1, abs=1e-6)
    assert record.history[0]["kl"] == pytest.approx(920.94, abs=0.01)
    assert record.history[-1]["kl"] == pytest.approx(8171.99, abs=0.01)
    assert any("interrupted" in note for note in record.record["notes"])
    assert any("git_commit" in note for note in record.record["notes"])


def test_records_are_package_data() -> None:
    # tomllib is Python 3.11+; the table is one line
    section = re.search(r"^\[tool\.setuptools\.package-data\]\s*\nbnn_course = \[([^\]]*)\]",
                        (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert section, "pyproject.toml must ship bnn_course's package data"
    patterns = re.findall(r'"([^"]+)"', section.group(1))
    assert patterns
    shipped = {path.name for pattern in patterns for path in (ROOT / "bnn_course").glob(pattern)}
    assert {f"{name}.json" for name in record_names()} <= shipped
    assert records_folder().is_dir()


# ---------------------------------------------------------------------- broken records


def write_record(folder: Path, name: str, change) -> None:
    """Copy the seed record into ``folder`` as ``name``, with ``change`` applied to it."""
    document = json.loads((records_folder() / f"{SEED_RECORD}.json").read_text())
    change(document)
    (folder / f"{name}.json").write_text(json.dumps(document))


def test_an_intact_copy_loads_from_another_folder(tmp_path: Path) -> None:
    write_record(tmp_path, "copy", lambda d: None)
    assert record_names(tmp_path) == ["copy"]
    assert load_record("copy", tmp_path).config == load_record(SEED_RECORD).config
    assert record_differences("copy", tmp_path) == []


def test_a_missing_record_names_those_there_are(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=SEED_RECORD):
        load_record("no-such-run")
    with pytest.raises(FileNotFoundError, match="none"):
        load_record("anything", tmp_path)
    with pytest.raises(ValueError, match="record name"):
        load_record("../secrets")


def test_invalid_json_is_a_record_error(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{\"final\": ")
    with pytest.raises(RecordError, match="not valid JSON"):
        load_record("broken", tmp_path)


def _drop(*path: str):
    def change(document: dict) -> None:
        for key in path[:-1]:
            document = document[key]
        del document[path[-1]]
    return change


def _set(value, *path: str):
    def change(document: dict) -> None:
        for key in path[:-1]:
            document = document[key]
        document[path[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_drop("record"), "no 'record'"),
    (_drop("history"), "no 'history'"),
    (_drop("record", "commit"), "record.commit is missing"),
    (_drop("record", "command"), "record.command is missing"),
    (_set("", "record", "made_by"), "record.made_by must be a non-empty string"),
    (_set("a few notes", "record", "notes"), "record.notes must be a list"),
    (_set("HEAD~1", "record", "commit"), "not a git commit hash"),
    (_set("4 Dec 2026", "record", "date"), "not YYYY-MM-DD"),
    (_set("2.4.0", "record", "torch"), "differs from the provenance"),
    (_set({"chapter": "diagnosis", "tier": "tpu", "run": "A"}, "record", "stands_for"),
     "tier 'tpu'"),
    (_set({"chapter": "nowhere", "tier": "gpu", "run": "A"}, "record", "stands_for"),
     "no configuration builder"),
    (_set([], "history"), "non-empty list"),
    (_set(-1.0, "config", "lr"), "invalid configuration"),
    (_set(99, "config", "epochs"), "an unfinished run"),
])
def test_a_malformed_record_says_what_is_wrong(tmp_path: Path, change, message: str) -> None:
    write_record(tmp_path, "bad", change)
    with pytest.raises(RecordError, match=re.escape(message)):
        load_record("bad", tmp_path)


def test_a_record_of_a_run_the_chapter_no_longer_has(tmp_path: Path) -> None:
    write_record(tmp_path, "gone", _set({"chapter": "diagnosis", "tier": "gpu", "run": "Z"},
                                        "record", "stands_for"))
    with pytest.raises(RecordError, match="run 'Z'"):
        expected_config("gone", tmp_path)


# ---------------------------------------------------------------------- chapter 7's runs


def _changed(first: TrainConfig, second: TrainConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig) if f.name != "epochs"
            and getattr(first, f.name) != getattr(second, f.name)}


@pytest.mark.parametrize("tier", ["gpu", "cpu", "smoke"])
def test_diagnosis_runs_change_one_setting_at_a_time(tier: str) -> None:
    configs = diagnosis_configs(tier)
    assert list(configs) == list(DIAGNOSIS_LABELS)
    steps = {("A", "B"): {"kl_scaling"}, ("A", "C"): {"init_log_sigma"},
             ("B", "D"): {"init_log_sigma"}, ("C", "D"): {"kl_scaling"},
             ("D", "E"): {"schedule"}, ("E", "F"): {"kl_weight"}, ("E", "G"): {"model"},
             ("E", "H"): {"prior_sigma"}, ("E", "I"): {"sigma_lr_factor"}}
    for (first, second), fields in steps.items():
        assert _changed(configs[first], configs[second]) == fields, (first, second)
    budget = BUDGETS["diagnosis"][tier]
    for key, config in configs.items():
        expected_epochs = budget["long_epochs"] if key in LONG_DIAGNOSIS_RUNS else budget["epochs"]
        assert config.epochs == expected_epochs
        assert config.batch_size == budget["batch_size"]
        assert config.log_interval == budget["log_interval"]


def test_run_a_is_the_seed_recipe_and_e_the_default() -> None:
    configs = diagnosis_configs("gpu")
    shared = {"batch_size", "channels", "hidden_features", "train_subset",
              "epoch_eval_samples", "eval_samples", "log_interval", "progress", "epochs"}
    seed = TrainConfig(**RECIPES["seed"])
    assert _changed(configs["A"], seed) <= shared
    assert _changed(configs["E"], TrainConfig()) <= shared
    assert math.isclose(configs["A"].lr, 1e-3)


def test_diagnosis_configs_take_a_budget_object() -> None:
    from types import SimpleNamespace

    budget = SimpleNamespace(**{**BUDGETS["diagnosis"]["cpu"], "long_epochs": 3})
    assert diagnosis_configs(budget)["A"].epochs == 3
    assert diagnosis_configs(budget)["C"].epochs == BUDGETS["diagnosis"]["cpu"]["epochs"]


def test_the_config_of_a_record_round_trips() -> None:
    record = load_record(SEED_RECORD)
    assert config_from_dict(dataclasses.asdict(record.config)) == record.config
