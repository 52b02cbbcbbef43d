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
``BNN_COURSE_DEBUG``
    A true word makes the command lines show the full traceback of an error instead of one
    ``error: ...`` line (as their ``--debug`` flag does).
"""

from __future__ import annotations

import os
from types import MappingProxyType, SimpleNamespace

SMOKE_ENV = "BNN_COURSE_SMOKE"
DATA_ENV = "BNN_COURSE_DATA"
DEBUG_ENV = "BNN_COURSE_DEBUG"

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
            "smoke": {"num_samples": 400, "num_pool_samples": 20, "image_sizes": (6, 10),
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
        # Chapter 7. Ablation runs of `epochs` epochs on all 50,000 images; the two sigma = 1
        # recipes run `long_epochs` (the "more than 100 epochs" question). Estimate on one
        # H100 (bf16; ~27k training images/s for the BayesianCNN, ~80k/s for the twin;
        # sampled forward passes ~80k/s): 2 x 20 epochs ~ 77 s, 4 x 8 epochs ~ 61 s, the twin
        # 8 epochs ~ 5 s (per-epoch test evaluation with the means only, ~0.1 s an epoch);
        # final predictions 6 x 10k images x 11 passes ~ 8 s; diagnostics on 500 images
        # ~ 5 s; start-up, data and figures ~ 15-20 s. About 2.9 minutes (3.8 at 20k/s).
        "diagnosis": {
            "full": {"epochs": 8, "long_epochs": 20, "batch_size": 256,
                     "channels": (32, 64, 128), "hidden_features": 256, "train_subset": None,
                     "test_per_class": None, "epoch_eval_samples": 0, "eval_samples": 10,
                     "log_interval": 20, "diagnostic_batch": 500, "num_noise_samples": 16,
                     "num_gradient_samples": 4, "num_logit_check": 10_000},
            "smoke": {"epochs": 1, "long_epochs": 2, "batch_size": 50,
                      "channels": (4, 8, 16), "hidden_features": 32, "train_subset": 500,
                      "test_per_class": 20, "epoch_eval_samples": 0, "eval_samples": 4,
                      "log_interval": 2, "diagnostic_batch": 40, "num_noise_samples": 4,
                      "num_gradient_samples": 2, "num_logit_check": 200},
        },
        # Chapter 8. Every method gets chapter 6's training budget (same architecture, 30
        # epochs of 50,000 images), so chapter 6's BayesianCNN is reused when present.
        # Estimate on one H100 (bf16; ~27k training images/s for the BayesianCNN, ~80k/s for
        # the twins; forward passes ~80k/s and ~250k/s): training the twin, MC dropout and 4
        # new ensemble members (member 0 is the twin) 5 x 1.5M images ~ 95 s (+ ~55 s if the
        # BayesianCNN is not reused); clean test + OOD sets (~28k images) x 21 passes ~ 10 s;
        # 9 corruptions x 5 severities x 10k images x (1 + 4) passes ~ 50 s, with ~10 s
        # to corrupt (JPEG on the CPU); data, OOD sets, figures ~ 30 s. About 3.5 minutes
        # with runs/ch06 reused, about 4.5 without.
        "uncertainty": {
            "full": {"epochs": 30, "batch_size": 256, "channels": (32, 64, 128),
                     "hidden_features": 256, "train_subset": None, "test_per_class": None,
                     "dropout": 0.1, "ensemble_size": 5, "eval_samples": 20,
                     "corruption_samples": 4,
                     "corruptions": ("gaussian_noise", "shot_noise", "impulse_noise",
                                     "speckle_noise", "gaussian_blur", "contrast",
                                     "brightness", "pixelate", "jpeg_compression"),
                     "severities": (1, 2, 3, 4, 5), "ood_max_images": 5000,
                     "ood_download": True, "num_shown": 8, "run_dir": "runs/ch08",
                     "bayesian_checkpoint": "runs/ch06/checkpoint.pt"},
            "smoke": {"epochs": 2, "batch_size": 100, "channels": (4, 8, 16),
                      "hidden_features": 32, "train_subset": 1000, "test_per_class": 30,
                      "dropout": 0.1, "ensemble_size": 2, "eval_samples": 4,
                      "corruption_samples": 2,
                      "corruptions": ("gaussian_noise", "contrast", "jpeg_compression"),
                      "severities": (1, 3, 5), "ood_max_images": 200,
                      "ood_download": False, "num_shown": 4, "run_dir": "runs/ch08-smoke",
                      "bayesian_checkpoint": "runs/ch06-smoke/checkpoint.pt"},
        },
    }
)


def env_flag(name: str) -> bool:
    """The yes/no environment variable ``name``: ``True`` for a true word, ``False`` for a
    false word or when unset.

    Raises
    ------
    ValueError
        If the variable holds something that is neither a true nor a false word.
    """
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(
        f"{name}={os.environ[name]!r} is not understood; use one of {sorted(_TRUE)} "
        f"for yes or {sorted(_FALSE - {''})} for no."
    )


def is_smoke() -> bool:
    """Return ``True`` when ``BNN_COURSE_SMOKE`` selects smoke mode.

    Raises
    ------
    ValueError
        If the variable holds something that is neither a true nor a false word.
    """
    try:
        return env_flag(SMOKE_ENV)
    except ValueError:
        raise ValueError(
            f"{SMOKE_ENV}={os.environ[SMOKE_ENV]!r} is not understood; use one of "
            f"{sorted(_TRUE)} for smoke mode or {sorted(_FALSE - {''})} for full mode."
        ) from None


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
