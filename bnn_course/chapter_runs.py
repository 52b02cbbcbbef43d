"""The training configurations of the book's chapters, built from their budgets.

A chapter asks :func:`bnn_course.config.budget` for its numbers and turns them into the
:class:`~bnn_course.train.TrainConfig` of each run it trains. That translation lives here,
not in the notebooks, so that a notebook, the command line and the tests build the very same
configuration: :mod:`bnn_course.recorded` compares every recorded run (a long GPU run shown to
CPU readers) with the configuration its chapter would train today, so a changed recipe cannot
leave a stale record behind.

Every builder takes a budget (the ``SimpleNamespace`` of :func:`~bnn_course.config.budget`, or
the name of a tier) and returns plain ``TrainConfig`` objects.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from bnn_course import config as run_config
from bnn_course.train import RECIPES, TrainConfig


def _budget(chapter: str, budget: SimpleNamespace | str | None) -> SimpleNamespace:
    """``budget`` itself, or the budget of ``chapter`` named by a tier/mode string, or the
    budget that applies now (``None``)."""
    if budget is None:
        return run_config.budget(chapter)
    if isinstance(budget, str):
        return SimpleNamespace(**run_config.BUDGETS[chapter][budget])
    return budget


def training_config(budget: SimpleNamespace | str | None = None, **overrides) -> TrainConfig:
    """Chapter 6's run: the BayesianCNN trained with the book's recipe on the budget's
    epochs, batch size, learning rate, augmentation and held-out validation images
    (``overrides`` change single fields, e.g. ``model="deterministic"`` for the twin)."""
    b = _budget("training", budget)
    settings = {"epochs": b.epochs, "batch_size": b.batch_size, "lr": b.lr,
                "augment": b.augment, "channels": b.channels,
                "hidden_features": b.hidden_features, "train_subset": b.train_subset,
                "validation_size": b.validation_size,
                "epoch_eval_samples": b.epoch_eval_samples, "eval_samples": b.eval_samples,
                "progress": False}
    return TrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------- chapter 7

DIAGNOSIS_LABELS: dict[str, str] = {
    "A": "A: seed recipe",
    "B": "B: A + KL/N",
    "C": "C: A + sigma0 = e^-5",
    "D": "D: B + sigma0 = e^-5",
    "E": "E: D + cosine lr (default)",
    "F": "F: E + KL weight 0.1",
    "G": "G: deterministic twin",
    "H": "H: E + prior s = 0.1",
    "I": "I: E + sigma lr x10",
}
"""Chapter 7's runs A-I, each named by the run it changes and how (one setting at a time)."""

LONG_DIAGNOSIS_RUNS: tuple[str, ...] = ("A", "B")
"""The runs that start at sigma = 1 and train for the budget's ``long_epochs`` (the "more
than 100 epochs" question); every other run trains for ``epochs``."""

_SEED = RECIPES["seed"]  # unscaled KL, log sigma initialised at 0, constant learning rate
_DIAGNOSIS_CHANGES: dict[str, dict[str, object]] = {
    "A": dict(_SEED),
    "B": {**_SEED, "kl_scaling": "per_example"},
    "C": {**_SEED, "init_log_sigma": -5.0},
    "D": {**_SEED, "kl_scaling": "per_example", "init_log_sigma": -5.0},
    "E": {},  # the TrainConfig defaults: the book's recipe
    "F": {"kl_weight": 0.1},
    "G": {"model": "deterministic"},
    "H": {"prior_sigma": 0.1},
    "I": {"sigma_lr_factor": 10.0},
}


def diagnosis_configs(budget: SimpleNamespace | str | None = None) -> dict[str, TrainConfig]:
    """Chapter 7's nine runs A-I (:data:`DIAGNOSIS_LABELS`) on a budget of ``"diagnosis"``.

    Every run has the budget's network (``channels``, ``hidden_features``), batch size,
    training subset, per-epoch test samples and ``log_interval``, and no final evaluation
    (``eval_samples=0``: the chapter predicts the test set itself). A and B train for
    ``long_epochs``, the others for ``epochs``. The settings of each run are those of
    :data:`DIAGNOSIS_LABELS`: A is the seed recipe, E the ``TrainConfig`` defaults, and
    every other run changes one setting of the run its label names.

    Parameters
    ----------
    budget:
        A budget of :func:`bnn_course.config.budget` (``SimpleNamespace``), the name of a
        tier or mode of ``BUDGETS["diagnosis"]`` (``"gpu"``, ``"cpu"``, ``"smoke"``), or
        ``None`` for the budget that applies now.

    Returns
    -------
    dict
        ``{"A": TrainConfig, ..., "I": TrainConfig}``, in the order of the chapter's table.
    """
    b = _budget("diagnosis", budget)
    common = {"batch_size": b.batch_size, "channels": b.channels,
              "hidden_features": b.hidden_features, "train_subset": b.train_subset,
              "epoch_eval_samples": b.epoch_eval_samples, "eval_samples": 0,
              "log_interval": b.log_interval, "progress": False}
    return {key: TrainConfig(**common, **changes,
                             epochs=b.long_epochs if key in LONG_DIAGNOSIS_RUNS else b.epochs)
            for key, changes in _DIAGNOSIS_CHANGES.items()}


POSTERIOR_RUNS: tuple[str, ...] = ("book", "sigma_aware", "ivon", "twin")
"""The trained networks of chapter 9: chapter 6's BayesianCNN and twin (reused), the
sigma-aware BBB recipe and IVON."""


def posterior_configs(budget: SimpleNamespace | str | None = None
                      ) -> dict[str, TrainConfig]:
    """Chapter 9's trained networks, by :data:`POSTERIOR_RUNS` name, at chapter 6's budget of
    the same tier (or mode): ``"book"`` and ``"twin"`` are chapter 6's two configurations,
    ``"sigma_aware"`` and ``"ivon"`` change the recipe as the "posterior" budget says
    (its ``sigma_aware_*`` and ``ivon_*`` settings). ``budget`` is the "posterior" budget
    or the name of a tier/mode; the "training" budget of the same name is used with it."""
    name = budget if isinstance(budget, str) else run_config.budget_name("posterior")
    b = _budget("posterior", budget)
    training = _budget("training", name)
    book = training_config(training)
    # The new learners are evaluated by chapter 9 itself: no MC evaluation inside train().
    new = dataclasses.replace(book, epoch_eval_samples=0, eval_samples=0)
    return {
        "book": book,
        "sigma_aware": dataclasses.replace(
            new, init_log_sigma=b.sigma_aware_init_log_sigma,
            sigma_lr_factor=b.sigma_aware_sigma_lr_factor,
            prior_scaling=b.sigma_aware_prior_scaling, kl_weight=b.sigma_aware_kl_weight),
        "ivon": dataclasses.replace(
            new, model="deterministic", optimizer="ivon", lr=b.ivon_lr, ivon_ess=b.ivon_ess,
            lr_warmup_epochs=b.ivon_lr_warmup_epochs, ivon_hess_init=b.ivon_hess_init,
            ivon_beta2=b.ivon_beta2, ivon_clip_radius=b.ivon_clip_radius,
            ivon_mc_samples=b.ivon_mc_samples, prior_scaling=b.ivon_prior_scaling),
        "twin": training_config(training, model="deterministic"),
    }


# ---------------------------------------------------------------------- chapter 8


def uncertainty_configs(budget: SimpleNamespace | str | None = None) -> dict[int, TrainConfig]:
    """Chapter 8's base configuration for every training seed of an ``"uncertainty"`` budget.

    Each is the book's recipe on the budget's epochs, batch size, learning rate,
    augmentation, network and ``validation_size`` held-out images, which the budgets keep
    equal to chapter 6's of the same tier (:func:`training_config`; a test compares them),
    with the budget's seed and no evaluation inside
    :func:`~bnn_course.train.train` (``epoch_eval_samples=0``, ``eval_samples=0``: the
    chapter evaluates every network itself; neither changes what is learned, so the first
    seed's BayesianCNN and twin *are* chapter 6's networks and are reused). Every method of
    :func:`bnn_course.comparison.method_configs` starts from one of them; the deep ensemble
    of seed :math:`s` has the members :math:`s, s + 1, \\dots, s + M - 1`, so the seeds must be
    at least ``ensemble_size`` apart for the ensembles of two seeds to share no network.

    Parameters
    ----------
    budget:
        A budget of ``"uncertainty"`` (``SimpleNamespace``), the name of one of its tiers or
        modes (``"gpu"``, ``"cpu"``, ``"smoke"``), or ``None`` for the budget that applies now.

    Returns
    -------
    dict
        ``{seed: TrainConfig}`` in the budget's order of ``seeds``; the first is the seed
        chapter 6 trained with.

    Raises
    ------
    ValueError
        For no seeds, a repeated seed, or two seeds closer than ``ensemble_size``.
    """
    b = _budget("uncertainty", budget)
    seeds = [int(seed) for seed in b.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"the budget needs one or more distinct seeds, got {b.seeds}")
    ordered = sorted(seeds)
    too_close = [(a, c) for a, c in zip(ordered[:-1], ordered[1:], strict=True)
                 if c - a < b.ensemble_size]
    if too_close:
        raise ValueError(f"seeds {too_close} are closer than ensemble_size={b.ensemble_size}: "
                         "their deep ensembles would share members")
    budget_fields = {"epochs": b.epochs, "batch_size": b.batch_size, "lr": b.lr,
                     "augment": b.augment, "channels": tuple(b.channels),
                     "hidden_features": b.hidden_features, "train_subset": b.train_subset,
                     "validation_size": b.validation_size}
    return {seed: TrainConfig(**budget_fields, epoch_eval_samples=0, eval_samples=0,
                              progress=False, seed=seed) for seed in seeds}


POSTERIOR_SWEEP: dict[str, tuple[str, dict[str, Any]]] = {
    "sigma-aware, beta 1": ("sigma_aware", {"kl_weight": 1.0}),
    "sigma-aware, beta 0.1": ("sigma_aware", {"kl_weight": 0.1}),
    "sigma-aware, beta 0.02": ("sigma_aware", {"kl_weight": 0.02}),
    "IVON, ess N": ("ivon", {"ivon_ess": None}),
    "IVON, ess 10N": ("ivon", {"ivon_ess": "10N"}),
    "IVON, ess 50N": ("ivon", {"ivon_ess": "50N"}),
}
r"""The candidates of chapter 9's recipe sweep (:mod:`bnn_course.tuning`): ``{name: (family,
changes)}``, each a change of the family's recipe in :func:`posterior_configs`. They differ
in how strongly the likelihood counts against the prior: ``kl_weight`` :math:`\beta` for
Bayes by Backprop, the effective sample size :math:`\lambda` for IVON (``"10N"``: ten times
the number of training images; :math:`\lambda = N/\beta` gives IVON the objective of
:math:`\beta`). :math:`\beta = 1` is the ELBO itself; smaller values temper the
likelihood (a tempered posterior, Wenzel et al. 2020)."""


def posterior_candidates(budget: SimpleNamespace | str | None = None
                         ) -> dict[str, tuple[str, TrainConfig]]:
    """``{name: (family, TrainConfig)}`` for every candidate of :data:`POSTERIOR_SWEEP` at the
    budget of ``budget`` (a tier or mode name, or the "posterior" budget)."""
    configs = posterior_configs(budget)
    num_train = _num_train(configs["book"])
    candidates = {}
    for name, (family, changes) in POSTERIOR_SWEEP.items():
        values = dict(changes)
        if isinstance(values.get("ivon_ess"), str):
            values["ivon_ess"] = int(values["ivon_ess"].removesuffix("N")) * num_train
        candidates[name] = (family, dataclasses.replace(configs[family], **values))
    return candidates


def _num_train(config: TrainConfig) -> int:
    """The number of CIFAR-10 training images a configuration trains on (50,000, or its
    ``train_subset``, less the held-out ``validation_size``)."""
    return (config.train_subset or 50_000) - config.validation_size
