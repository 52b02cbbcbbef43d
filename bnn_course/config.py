"""Run mode (smoke or full) and the compute budget of every chapter.

A notebook never branches on the mode itself: it asks :func:`budget` for its numbers.

* **full** mode is what readers and the rendered book get: budgets large enough that the
  figures and numbers mean something.
* **smoke** mode is what CI and ``pytest`` get (``conftest.py`` sets ``BNN_COURSE_SMOKE=1``):
  the same code paths on tiny budgets, only to prove that every cell runs.

Environment variables
---------------------
``BNN_COURSE_SMOKE``
    ``1``/``true``/``yes``/``on`` selects smoke mode; ``0``/``false``/``no``/``off`` or unset
    selects full mode. Anything else is an error (a typo must not silently pick a mode).
``BNN_COURSE_DATA``
    A folder holding CIFAR-10 (used from chapter 6 on).
"""

from __future__ import annotations

import os
from types import MappingProxyType, SimpleNamespace

SMOKE_ENV = "BNN_COURSE_SMOKE"
DATA_ENV = "BNN_COURSE_DATA"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# One flat dictionary per chapter and mode. Keys are the knobs a chapter turns.
BUDGETS: MappingProxyType = MappingProxyType(
    {
        "weights": {
            "full": {"num_samples": 20_000, "num_inputs": 32, "num_passes": 40,
                     "num_init_trials": 8},
            "smoke": {"num_samples": 500, "num_inputs": 4, "num_passes": 2,
                      "num_init_trials": 1},
        },
        "elbo": {
            "full": {"num_train": 512, "steps": 2000, "num_predictive_samples": 200,
                     "num_kl_check": 20_000},
            "smoke": {"num_train": 32, "steps": 30, "num_predictive_samples": 10,
                      "num_kl_check": 500},
        },
        "flipout_dense": {
            "full": {"num_repeats": 1000, "batch_sizes": (1, 2, 4, 8, 16, 32, 64, 128),
                     "num_data": 512, "num_mean_check": 20_000, "timing_features": 256,
                     "timing_batch": 128, "timing_repeats": 20},
            "smoke": {"num_repeats": 20, "batch_sizes": (1, 4, 16), "num_data": 64,
                      "num_mean_check": 300, "timing_features": 32, "timing_batch": 8,
                      "timing_repeats": 3},
        },
        "flipout_conv": {
            "full": {"num_samples": 4000, "num_pool_samples": 1000,
                     "image_sizes": (6, 8, 12, 16, 24, 32), "timing_repeats": 50},
            "smoke": {"num_samples": 50, "num_pool_samples": 20, "image_sizes": (6, 10),
                      "timing_repeats": 3},
        },
        "bayesian_cnn": {
            "full": {"batch_size": 8, "num_samples": 100, "num_shown": 3,
                     "num_log_sigmas": 17, "timing_repeats": 10},
            "smoke": {"batch_size": 4, "num_samples": 5, "num_shown": 3,
                      "num_log_sigmas": 3, "timing_repeats": 1},
        },
        "training": {
            "full": {"epochs": 30, "batch_size": 256, "channels": (32, 64, 128),
                     "hidden_features": 256, "train_subset": None, "test_per_class": None,
                     "epoch_eval_samples": 4, "eval_samples": 20, "max_mc_samples": 32,
                     "num_shown": 8, "num_augment_check": 20_000, "run_dir": "runs/ch06"},
            "smoke": {"epochs": 2, "batch_size": 100, "channels": (4, 8, 16),
                      "hidden_features": 32, "train_subset": 1000, "test_per_class": 30,
                      "epoch_eval_samples": 2, "eval_samples": 4, "max_mc_samples": 4,
                      "num_shown": 4, "num_augment_check": 2000,
                      "run_dir": "runs/ch06-smoke"},
        },
    }
)


def is_smoke() -> bool:
    """Return ``True`` when ``BNN_COURSE_SMOKE`` selects smoke mode.

    Raises
    ------
    ValueError
        If the variable holds something that is neither a true nor a false word.
    """
    raw = os.environ.get(SMOKE_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(
        f"{SMOKE_ENV}={os.environ[SMOKE_ENV]!r} is not understood; "
        f"use one of {sorted(_TRUE)} for smoke mode or {sorted(_FALSE - {''})} for full mode."
    )


def mode() -> str:
    """``"smoke"`` or ``"full"``, from :func:`is_smoke`."""
    return "smoke" if is_smoke() else "full"


def budget(chapter: str) -> SimpleNamespace:
    """The budget of ``chapter`` in the current mode, as attributes.

    >>> b = budget("elbo")
    >>> b.steps  # doctest: +SKIP
    4000
    """
    if chapter not in BUDGETS:
        raise KeyError(f"unknown chapter {chapter!r}; known chapters: {sorted(BUDGETS)}")
    return SimpleNamespace(**BUDGETS[chapter][mode()])


def data_root() -> str | None:
    """The folder named by ``BNN_COURSE_DATA``, or ``None`` when the variable is unset."""
    root = os.environ.get(DATA_ENV, "").strip()
    return root or None
