"""Run mode, budgets and seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bnn_course import config
from bnn_course.seeding import seed_everything


@pytest.mark.parametrize("value, smoke", [("1", True), ("yes", True), ("TRUE", True),
                                          ("0", False), ("off", False), ("", False)])
def test_mode_from_environment(monkeypatch, value, smoke) -> None:
    monkeypatch.setenv(config.SMOKE_ENV, value)
    assert config.is_smoke() is smoke
    assert config.mode() == ("smoke" if smoke else "full")


def test_unset_means_full_mode(monkeypatch) -> None:
    monkeypatch.delenv(config.SMOKE_ENV, raising=False)
    assert config.mode() == "full"


def test_typo_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv(config.SMOKE_ENV, "smoke")
    with pytest.raises(ValueError, match=config.SMOKE_ENV):
        config.is_smoke()


def test_pytest_runs_in_smoke_mode() -> None:
    assert config.is_smoke(), "conftest.py must select smoke mode under pytest"


@pytest.mark.parametrize("chapter", sorted(config.BUDGETS))
def test_every_budget_has_the_same_knobs_in_every_mode(chapter, monkeypatch) -> None:
    budgets = config.BUDGETS[chapter]
    assert set(budgets) in ({"full", "smoke"}, {"gpu", "cpu", "smoke"})
    assert all(set(knobs) == set(budgets["smoke"]) for knobs in budgets.values())
    monkeypatch.setenv(config.SMOKE_ENV, "0")
    full = {}
    for tier in config.TIERS:
        monkeypatch.setenv(config.TIER_ENV, tier)
        full[tier] = vars(config.budget(chapter))
        assert full[tier] == budgets.get("full", budgets.get(tier))
    monkeypatch.setenv(config.SMOKE_ENV, "1")
    assert vars(config.budget(chapter)) == budgets["smoke"] != full["gpu"]


def test_the_tier_follows_the_hardware_unless_forced(monkeypatch) -> None:
    monkeypatch.delenv(config.TIER_ENV, raising=False)
    assert config.tier() == ("gpu" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(config.TIER_ENV, "auto")
    assert config.tier() == ("gpu" if torch.cuda.is_available() else "cpu")
    for forced in ("GPU", " cpu "):
        monkeypatch.setenv(config.TIER_ENV, forced)
        assert config.tier() == forced.strip().lower()
    monkeypatch.setenv(config.TIER_ENV, "tpu")
    with pytest.raises(ValueError, match=config.TIER_ENV):
        config.tier()


def test_smoke_mode_ignores_the_tier(monkeypatch) -> None:
    monkeypatch.setenv(config.SMOKE_ENV, "1")
    monkeypatch.setenv(config.TIER_ENV, "gpu")
    assert config.budget_name("training") == "smoke"
    monkeypatch.setenv(config.SMOKE_ENV, "0")
    assert config.budget_name("training") == "gpu"
    assert config.budget_name("elbo") == "full"
    monkeypatch.setenv(config.TIER_ENV, "cpu")
    assert config.budget("training").epochs < config.BUDGETS["training"]["gpu"]["epochs"]


def test_unknown_chapter_is_an_error() -> None:
    with pytest.raises(KeyError, match="known chapters"):
        config.budget("no-such-chapter")


def test_data_root(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(config.DATA_ENV, raising=False)
    assert config.data_root() is None
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path))
    assert config.data_root() == str(tmp_path)


def test_seed_everything_repeats_every_generator() -> None:
    def draw() -> tuple:
        generator = seed_everything(42)
        return (random.random(), np.random.rand(), torch.rand(1).item(),  # noqa: NPY002
                torch.rand(1, generator=generator).item())

    assert draw() == draw()


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_an_error(seed) -> None:
    with pytest.raises(ValueError, match="seed"):
        seed_everything(seed)


def test_env_flag_reads_yes_and_no_words(monkeypatch) -> None:
    monkeypatch.delenv(config.DEBUG_ENV, raising=False)
    assert config.env_flag(config.DEBUG_ENV) is False
    monkeypatch.setenv(config.DEBUG_ENV, "Yes")
    assert config.env_flag(config.DEBUG_ENV) is True
    monkeypatch.setenv(config.DEBUG_ENV, "perhaps")
    with pytest.raises(ValueError, match=f"{config.DEBUG_ENV}='perhaps' is not understood"):
        config.env_flag(config.DEBUG_ENV)
