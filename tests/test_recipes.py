"""The named recipes of ``bnn_course.train``: the seed recipe stays at chance, the default learns.

``RECIPES["seed"]`` is the reconstructed first attempt of chapter 7 (the KL summed and added
unscaled, every log-sigma initialised at 0, a constant learning rate); ``RECIPES["default"]``
is the book's working recipe. Both run here on a tiny network for a few hundred steps.

Tolerances: a classifier that has learned nothing is right on each of ``n`` balanced test
images with probability 1/10, so its accuracy has standard error ``sqrt(0.09 / n)``.
"Near chance" means below ``0.1 + 4`` standard errors (exceeded by chance with probability
below 1e-4); "clearly learns" means above ``0.1 + 10`` standard errors.
"""

from __future__ import annotations

import math

import pytest

from bnn_course import config as run_config
from bnn_course.data import load_cifar10, synthetic_cifar10
from bnn_course.train import RECIPES, TrainConfig, TrainResult, train

SHORT = {"channels": (8, 16), "hidden_features": 32, "batch_size": 32, "device": "cpu",
         "progress": False, "epoch_eval_samples": 0, "eval_samples": 4}


def chance_bound(num_test: int, standard_errors: float) -> float:
    """Chance accuracy 1/10 plus ``standard_errors`` standard errors on ``num_test`` images."""
    return 0.1 + standard_errors * math.sqrt(0.09 / num_test)


def run(recipe: str, data, **overrides) -> TrainResult:
    config = TrainConfig(**{**RECIPES[recipe], **SHORT, **overrides})
    return train(config, data, log=lambda _: None)


def check_seed_fails_and_default_learns(data, **overrides) -> None:
    num_test = int(data.test_labels.shape[0])
    seed = run("seed", data, **overrides)
    default = run("default", data, **overrides)
    assert seed.config.kl_scaling == "unscaled" and seed.config.init_log_sigma == 0.0
    near_chance = chance_bound(num_test, 4)
    assert seed.final["accuracy_mean"] < near_chance, seed.final
    assert seed.final["accuracy_mc"] < near_chance, seed.final
    learned = chance_bound(num_test, 10)
    assert default.final["accuracy_mean"] > learned, default.final
    assert default.final["accuracy_mc"] > learned, default.final


def test_seed_recipe_stays_at_chance_and_default_learns_on_synthetic_data() -> None:
    # 600 training images, 19 steps per epoch, 228 steps; 500 test images.
    data = synthetic_cifar10(train_per_class=60, test_per_class=50, seed=3)
    check_seed_fails_and_default_learns(data, epochs=12)


@pytest.mark.skipif(run_config.data_root() is None,
                    reason="BNN_COURSE_DATA does not name a CIFAR-10 copy")
def test_seed_recipe_stays_at_chance_and_default_learns_on_cifar10() -> None:
    # 2,000 training images, 63 steps per epoch, 315 steps; 1,000 test images.
    data = load_cifar10(run_config.data_root(), smoke=False, allow_download=False,
                        test_per_class=100, verbose=False)
    assert not data.is_synthetic
    check_seed_fails_and_default_learns(data, epochs=5, train_subset=2000)
