"""Chapter 9's recipe sweep (bnn_course.tuning) and its recorded outcome."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from bnn_course.chapter_runs import POSTERIOR_SWEEP, posterior_candidates, posterior_configs
from bnn_course.comparison import IGNORED_FOR_REUSE
from bnn_course.run_folder import config_differences
from bnn_course.tuning import choose, main


def _row(name: str, family: str, nll: float, verdict: str) -> dict:
    return {"name": name, "family": family, "validation_nll": nll, "verdict": verdict}


def test_the_lowest_held_out_nll_among_converged_candidates_is_chosen() -> None:
    rows = [_row("a", "x", 0.9, "held back by the step size"), _row("b", "x", 1.0, "converged"),
            _row("c", "x", 1.1, "converged"), _row("d", "y", 2.0, "still moving"),
            _row("e", "y", 1.5, "held back by the step size")]
    chosen = choose(rows)
    assert chosen["x"]["name"] == "b" and "converged" in chosen["x"]["rule"]
    assert chosen["y"]["name"] == "e" and "no candidate converged" in chosen["y"]["rule"]


@pytest.mark.parametrize("tier", ["gpu", "cpu", "smoke"])
def test_every_candidate_changes_only_its_family_recipe(tier) -> None:
    configs = posterior_configs(tier)
    for name, (family, config) in posterior_candidates(tier).items():
        assert family == POSTERIOR_SWEEP[name][0]
        changed = {k for k in POSTERIOR_SWEEP[name][1]}
        differing = {field for field in changed
                     if getattr(config, field) != getattr(configs[family], field)}
        assert differing <= changed
        assert config.validation_size == configs["book"].validation_size > 0


def _recorded_sweeps() -> list[str]:
    folder = resources.files("bnn_course") / "recorded" / "sweeps"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("posterior-sweep-"))


@pytest.mark.parametrize("name", _recorded_sweeps())
def test_the_budget_uses_the_recipes_its_recorded_sweep_chose(name) -> None:
    document = json.loads(
        (resources.files("bnn_course") / "recorded" / "sweeps" / name).read_text())
    tier = document["tier"]
    configs = posterior_configs(tier)
    rows = {row["name"]: row for row in document["candidates"]}
    assert choose(document["candidates"]) == document["chosen"]
    for family, chosen in document["chosen"].items():
        differences = config_differences(rows[chosen["name"]]["config"],
                                         configs[family].__dict__, ignore=IGNORED_FOR_REUSE)
        assert differences == [], (family, differences)
    assert document["record"]["commit"] and document["record"]["command"]


def test_the_command_line_runs_the_sweep_in_smoke_mode(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BNN_COURSE_DATA", raising=False)
    monkeypatch.setattr("bnn_course.data._download", lambda root: (_ for _ in ()).throw(
        OSError("no network in tests")))
    document = main(["--tier", "smoke", "--out", str(tmp_path / "sweep"),
                     "--only", "sigma-aware, beta 1", "--only", "IVON, ess N",
                     "--record", str(tmp_path / "record.json")])
    record = json.loads((tmp_path / "record.json").read_text())["record"]
    assert record["stands_for"] == {"chapter": "posterior", "tier": "smoke", "run": "sweep"}
    assert "--tier smoke" in record["command"] and "--record" not in record["command"]
    assert "record.json" not in record["command"]
    assert [row["name"] for row in document["candidates"]] == ["sigma-aware, beta 1",
                                                              "IVON, ess N"]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["chosen"] == document["chosen"] and set(saved["chosen"]) == {"sigma_aware",
                                                                               "ivon"}
    for row in saved["candidates"]:
        assert 0 <= row["validation_accuracy"] <= 1 and row["validation_nll"] > 0
    with pytest.raises(SystemExit) as stop:
        main(["--tier", "smoke", "--out", str(tmp_path / "x"), "--only", "nonsense"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error: unknown candidates")
