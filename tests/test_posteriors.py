"""Chapter 9's contenders and their scorecard (bnn_course.posteriors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnn_course.calibration import TemperatureScaled
from bnn_course.data import normalize, synthetic_cifar10
from bnn_course.models import BayesianCNN, DeterministicCNN
from bnn_course.posteriors import (
    Contender,
    negative_elbo_estimate,
    paired_comparison,
    scorecard,
    target_checks,
)

SMALL = {"channels": (4, 8), "hidden_features": 16}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = synthetic_cifar10(train_per_class=6, test_per_class=6, seed=4)
    bayes = BayesianCNN(**SMALL, init_log_sigma=-3.0).eval()
    twin = DeterministicCNN(**SMALL).eval()
    return data, bayes, twin


def test_scorecard_rows_agree_with_the_per_image_values(setup) -> None:
    data, bayes, twin = setup
    contenders = [Contender("bbb", "sampled", bayes, 10.0),
                  Contender("twin", "deterministic", twin, 5.0),
                  Contender("cool twin", "deterministic", TemperatureScaled(twin, 2.0), 5.0)]
    torch.manual_seed(1)
    scores = scorecard(contenders, data.test_images, data.test_labels, num_samples=3,
                       ood_sets={"noise": torch.randint(0, 256, (20, 3, 32, 32),
                                                        dtype=torch.uint8)},
                       corruption_images=data.test_images[:20],
                       corruption_labels=data.test_labels[:20],
                       corruptions=("gaussian_noise", "contrast"), severities=(1, 3))
    rows = {row["name"]: row for row in scores.rows}
    assert [row["name"] for row in scores.rows] == ["bbb", "twin", "cool twin"]
    assert rows["bbb"]["num_samples"] == 3 and rows["twin"]["num_samples"] == 1
    for name, row in rows.items():
        per_image = scores.per_image[name]
        assert row["accuracy"] == pytest.approx(per_image["correct"].mean().item())
        assert row["nll"] == pytest.approx(per_image["nll"].mean().item(), rel=1e-5)
        assert row["brier"] == pytest.approx(per_image["brier"].mean().item(), rel=1e-5)
        assert 0 <= row["corrupted_accuracy"] <= 1 and row["corrupted_nll"] > 0
        assert "auroc_entropy" in row and row["training_seconds"] > 0
    assert math.isnan(rows["twin"]["auroc_mutual_information"])  # one network: no MI
    # a temperature changes confidence, never the top class
    assert rows["cool twin"]["accuracy"] == rows["twin"]["accuracy"]
    difference, se = paired_comparison(scores, "cool twin", "twin", "correct")
    assert difference == 0 and se == 0
    with pytest.raises(ValueError, match="unique"):
        scorecard([contenders[1], contenders[1]], data.test_images, data.test_labels,
                  num_samples=1)


def test_the_negative_elbo_estimate_is_mean_nll_plus_kl_over_n(setup) -> None:
    data, bayes, _ = setup
    images, labels = data.train_images[:30], data.train_labels[:30]
    torch.manual_seed(7)
    estimate = negative_elbo_estimate(bayes, images, labels, num_train=1000, num_samples=2,
                                      batch_size=30)
    torch.manual_seed(7)
    with torch.no_grad():
        x = normalize(images)
        nll = sum(F.nll_loss(bayes(x, sample=True), labels, reduction="sum").item()
                  for _ in range(2)) / 60
    assert estimate["nll"] == pytest.approx(nll, rel=1e-5)
    assert estimate["kl_per_example"] == pytest.approx(bayes.kl_divergence().item() / 1000,
                                                       rel=1e-5)
    assert estimate["negative_elbo"] == pytest.approx(estimate["nll"]
                                                      + estimate["kl_per_example"])
    with pytest.raises(ValueError, match="Bayesian layers"):
        negative_elbo_estimate(DeterministicCNN(**SMALL), images, labels, 1000)


def test_target_checks_compare_with_the_twins() -> None:
    rows = [{"name": "r", "accuracy": 0.70, "nll": 0.80, "ece": 0.02, "ece_floor": 0.01,
             "auroc_entropy": 0.75},
            {"name": "t", "accuracy": 0.69, "nll": 0.84, "ece": 0.03, "ece_floor": 0.01,
             "auroc_entropy": 0.72},
            {"name": "c", "accuracy": 0.69, "nll": 0.79, "ece": 0.01, "ece_floor": 0.01}]
    checks = {c.target: c.holds for c in target_checks(rows, "r", "t", "c", converged=True)}
    assert checks == {"accuracy >= twin's": True, "NLL <= twin's - 0.03": True,
                      "NLL <= temperature-scaled twin's": False, "ECE <= twin's": True,
                      "OOD AUROC (entropy) >= twin's + 0.02": True, "converged": True}
    with pytest.raises(ValueError, match="no row"):
        target_checks(rows, "x", "t", "c", converged=False)


def test_an_unknown_kind_is_refused(setup) -> None:
    with pytest.raises(ValueError, match="kind"):
        Contender("x", "ensemble", setup[2])


def test_the_paired_ece_difference_matches_the_ece_and_its_spread(setup) -> None:
    from bnn_course.metrics import expected_calibration_error
    from bnn_course.posteriors import paired_ece_difference

    data, bayes, twin = setup
    contenders = [Contender("bbb", "sampled", bayes), Contender("twin", "deterministic", twin)]
    torch.manual_seed(2)
    scores = scorecard(contenders, data.test_images, data.test_labels, num_samples=2)
    difference, se = paired_ece_difference(scores, "bbb", "twin", data.test_labels)
    ece = {name: expected_calibration_error(scores.per_image[name]["probs"].float(),
                                            data.test_labels).ece for name in ("bbb", "twin")}
    assert difference == pytest.approx(ece["bbb"] - ece["twin"], abs=1e-6)
    assert 0 < se < 1
    same, zero = paired_ece_difference(scores, "twin", "twin", data.test_labels)
    assert same == 0 and zero == 0
