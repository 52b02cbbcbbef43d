"""Accuracy, NLL, Brier, calibration, selective prediction, OOD detection (bnn_course.metrics).

Cross-checked against scikit-learn and torchmetrics on random data.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import multiclass_calibration_error

from bnn_course.metrics import (
    OOD_SCORES,
    accuracy,
    accuracy_at_coverage,
    auroc,
    average_precision,
    brier_score,
    calibrated_ece_expectation,
    ece_noise_bound,
    ece_noise_floor,
    excess_aurc,
    expected_calibration_error,
    fpr_at_tpr,
    misclassification_auroc,
    negative_log_likelihood,
    ood_detection,
    ood_scores,
    oracle_aurc,
    selective_prediction,
)
from bnn_course.uncertainty import decompose_uncertainty


def _random_predictions(seed: int, n: int = 2000, k: int = 10, temperature: float = 2.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of random logits (float64) and labels that agree with the arg-max ~half the time."""
    generator = torch.Generator().manual_seed(seed)
    logits = temperature * torch.randn(n, k, generator=generator, dtype=torch.float64)
    probs = logits.softmax(-1)
    labels = torch.where(torch.rand(n, generator=generator) < 0.5, probs.argmax(-1),
                         torch.randint(0, k, (n,), generator=generator))
    return probs, labels


def _synthetic_confidences(n: int, seed: int, k: int = 10, low: float = 0.1,
                           accuracy_of=lambda c: c) -> tuple[torch.Tensor, torch.Tensor]:
    """Top probability ``c ~ U(low, 1)`` on a random class, the rest spread evenly; the label
    is that class with probability ``accuracy_of(c)``, else another class."""
    generator = torch.Generator().manual_seed(seed)
    confidence = low + (1 - low) * torch.rand(n, generator=generator, dtype=torch.float64)
    predicted = torch.randint(0, k, (n,), generator=generator)
    probs = ((1 - confidence) / (k - 1))[:, None].expand(n, k).clone()
    probs[torch.arange(n), predicted] = confidence
    correct = torch.rand(n, generator=generator, dtype=torch.float64) < accuracy_of(confidence)
    other = (predicted + torch.randint(1, k, (n,), generator=generator)) % k
    return probs, torch.where(correct, predicted, other)


# --------------------------------------------------------------------------------------
# Accuracy, NLL, Brier against scikit-learn
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_agree_with_sklearn(seed: int) -> None:
    probs, labels = _random_predictions(seed)
    p, y = probs.numpy(), labels.numpy()
    assert accuracy(probs, labels) == pytest.approx(float((p.argmax(1) == y).mean()), abs=1e-12)
    assert negative_log_likelihood(probs, labels) == pytest.approx(
        log_loss(y, p, labels=list(range(10))), rel=1e-12)
    manual = ((p - np.eye(10)[y]) ** 2).sum(1).mean()
    assert brier_score(probs, labels) == pytest.approx(manual, rel=1e-12)
    assert brier_score(probs, labels) == pytest.approx(
        brier_score_loss(y, p, labels=list(range(10))), rel=1e-12)
    # float32 input gives the same numbers to float32 precision
    assert brier_score(probs.float(), labels) == pytest.approx(manual, rel=1e-5)


def test_known_small_case() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    labels = torch.tensor([0, 1, 0])
    assert accuracy(probs, labels) == pytest.approx(2 / 3)
    assert negative_log_likelihood(probs, labels) == pytest.approx(
        -(math.log(0.7) + math.log(0.1) + math.log(0.5)) / 3, rel=1e-6)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2)
             + (0.5**2 + 0.25**2 + 0.25**2)) / 3
    assert brier_score(probs, labels) == pytest.approx(brier, rel=1e-6)
    # A zero probability on the label gives a large but finite NLL.
    assert math.isfinite(negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, temperature", [(0, 0.5), (1, 2.0), (2, 5.0)])
def test_ece_agrees_with_torchmetrics(seed: int, temperature: float) -> None:
    probs, labels = _random_predictions(seed, n=5000, temperature=temperature)
    ours = expected_calibration_error(probs, labels, num_bins=15)
    theirs = multiclass_calibration_error(probs.float(), labels, num_classes=10, n_bins=15,
                                          norm="l1").item()
    assert ours.ece == pytest.approx(theirs, abs=1e-6)  # torchmetrics works in float32


def test_ece_bins_by_hand() -> None:
    probs, labels = _random_predictions(3, n=3000)
    result = expected_calibration_error(probs, labels, num_bins=15)
    confidence, prediction = probs.max(1)
    correct = (prediction == labels).double()
    assert torch.allclose(result.bin_edges, torch.linspace(0, 1, 16, dtype=torch.float64))
    assert int(result.count.sum()) == 3000
    ece = 0.0
    for m in range(15):
        lo, hi = m / 15, (m + 1) / 15
        inside = (confidence > lo) & (confidence <= hi)
        assert int(result.count[m]) == int(inside.sum())
        if inside.any():
            assert result.mean_confidence[m].item() == pytest.approx(
                confidence[inside].mean().item(), rel=1e-12)
            assert result.accuracy[m].item() == pytest.approx(correct[inside].mean().item())
            ece += inside.double().mean().item() * abs(
                correct[inside].mean().item() - confidence[inside].mean().item())
        else:
            assert math.isnan(result.mean_confidence[m]) and math.isnan(result.accuracy[m])
    assert result.ece == pytest.approx(ece, rel=1e-10)
    # confidence exactly on an edge goes to the bin it closes: (m/M, (m+1)/M]
    edge = expected_calibration_error(torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]),
                                      torch.tensor([0, 0, 0]), num_bins=4)
    assert edge.count.tolist() == [0, 1, 1, 1]


def test_ece_of_a_calibrated_predictor_is_near_zero() -> None:
    # The label is right with probability equal to the confidence, so every bin's accuracy
    # has the bin's mean confidence as expectation and the ECE is sampling noise only:
    # E[ECE] <= sum_m (n_m / N) sqrt(1 / (4 n_m)) <= sqrt(M / N) / 2 (Cauchy-Schwarz).
    n, bins = 200_000, 15
    probs, labels = _synthetic_confidences(n, seed=11)
    bound = math.sqrt(bins / n) / 2
    result = expected_calibration_error(probs, labels, num_bins=bins)
    assert result.ece < 3 * bound
    filled = result.count > 0
    gaps = (result.accuracy - result.mean_confidence)[filled].abs()
    assert (gaps < 5 / (2 * result.count[filled].double().sqrt())).all()  # 5 std devs


def test_ece_of_an_overconfident_predictor_matches_its_expected_value() -> None:
    # Right with probability c^2 < c: every bin is overconfident, so the ECE equals
    # E[c - c^2] for c ~ U(0.1, 1): (1 + 0.1)/2 - (1 + 0.1 + 0.01)/3 = 0.18.
    n, bins = 200_000, 15
    probs, labels = _synthetic_confidences(n, seed=12, accuracy_of=lambda c: c**2)
    expected = (1 + 0.1) / 2 - (1 + 0.1 + 0.01) / 3
    result = expected_calibration_error(probs, labels, num_bins=bins)
    assert result.ece == pytest.approx(expected, abs=3 * math.sqrt(bins / n) / 2)
    filled = result.count > 0
    assert (result.mean_confidence[filled] > result.accuracy[filled]).all()


def _with_correctness(probs: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Labels that make the arg-max of ``probs`` ``(N, K)`` right exactly where ``correct``."""
    predicted = probs.argmax(-1)
    return torch.where(correct, predicted, (predicted + 1) % probs.shape[1])


def test_calibrated_ece_expectation_by_enumerating_every_outcome() -> None:
    # Six predictions in three bins of 4: all 2^6 right/wrong patterns, each with its
    # probability prod c^z (1 - c)^(1 - z), through expected_calibration_error itself.
    confidence = torch.tensor([0.3, 0.55, 0.6, 0.7, 0.8, 0.95], dtype=torch.float64)
    probs = torch.cat([confidence[:, None], ((1 - confidence) / 3)[:, None].expand(6, 3)], 1)
    assert torch.equal(probs.max(-1).values, confidence)
    expected = 0.0
    for pattern in itertools.product([False, True], repeat=6):
        correct = torch.tensor(pattern)
        weight = torch.where(correct, confidence, 1 - confidence).prod().item()
        labels = _with_correctness(probs, correct)
        expected += weight * expected_calibration_error(probs, labels, num_bins=4).ece
    assert calibrated_ece_expectation(confidence, num_bins=4) == pytest.approx(expected,
                                                                               rel=1e-12)
    # certain predictions are always right: no noise at all
    assert calibrated_ece_expectation(torch.ones(7, dtype=torch.float64)) == 0.0


def test_ece_noise_floor_simulation_agrees_with_the_exact_expectation_and_the_bound() -> None:
    n, bins = 500, 15
    probs, _ = _synthetic_confidences(n, seed=21)
    confidence = probs.max(-1).values
    floor = ece_noise_floor(confidence, bins, num_simulations=4000,
                            generator=torch.Generator().manual_seed(0))
    exact = calibrated_ece_expectation(confidence, bins)
    assert floor.expected == exact and floor.level == 0.95
    assert floor.samples.shape == (4000,) and floor.samples.dtype == torch.float64
    monte_carlo_se = floor.samples.std().item() / math.sqrt(4000)
    assert abs(floor.mean - exact) < 4 * monte_carlo_se
    assert floor.upper == pytest.approx(torch.quantile(floor.samples, 0.95).item())
    assert floor.mean < floor.upper
    # chapter 8's derivation: E|S_m - mu_m| <= sigma_m (Jensen) <= sqrt(|B_m|)/2, and
    # sum_m sqrt(|B_m|) <= sqrt(M N) (Cauchy-Schwarz): exact <= jensen <= 1/2 sqrt(M/N)
    _, index = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1)[1:-1].double(),
                               right=False).unique(return_inverse=True)
    variance = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(
        0, index, confidence * (1 - confidence))
    jensen = variance.sqrt().sum().item() / n
    assert exact < jensen < floor.bound == pytest.approx(0.5 * math.sqrt(bins / n))
    assert ece_noise_bound(n, bins) == floor.bound
    # the normal approximation E|S - mu| ~ sqrt(2 / pi) sigma holds for bins of ~35
    assert exact == pytest.approx(math.sqrt(2 / math.pi) * jensen, rel=0.03)
    # the same generator state gives the same floor
    again = ece_noise_floor(confidence, bins, num_simulations=4000,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.samples, floor.samples)


def test_ece_noise_floor_shrinks_like_one_over_sqrt_n() -> None:
    # The same distribution of confidences (one draw, repeated) at N = 250 ... 16,000:
    # sqrt(N) E[ECE] is constant up to the O(1/|B_m|) non-normality of small bins.
    generator = torch.Generator().manual_seed(3)
    base = 0.1 + 0.9 * torch.rand(250, generator=generator, dtype=torch.float64)
    scaled = [calibrated_ece_expectation(base.repeat(r)) * math.sqrt(250 * r)
              for r in (1, 4, 16, 64)]
    assert max(scaled) / min(scaled) < 1.02
    # the simulated mean too, within its Monte Carlo error (2000 draws: ~1.5 % each)
    small = ece_noise_floor(base, num_simulations=2000, generator=generator)
    large = ece_noise_floor(base.repeat(16), num_simulations=2000, generator=generator)
    assert small.mean / large.mean == pytest.approx(4.0, rel=0.08)
    assert small.upper / large.upper == pytest.approx(4.0, rel=0.1)


def test_a_calibrated_predictor_stays_below_the_upper_quantile_95_percent_of_the_time() -> None:
    # Labels drawn from the predictor's own confidences, scored by expected_calibration_error
    # (not by the floor's own code): the fraction of ECEs at or below the floor's 95%
    # quantile is 0.95 up to the binomial noise of 1000 trials (sd 0.0069) and the
    # quantile's own Monte Carlo error (2000 draws: sd ~0.005); 4 combined sd: 0.034.
    n, trials = 500, 1000
    probs, _ = _synthetic_confidences(n, seed=31)
    confidence = probs.max(-1).values
    floor = ece_noise_floor(confidence, num_simulations=2000,
                            generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    below = 0
    for _ in range(trials):
        correct = torch.rand(n, generator=generator, dtype=torch.float64) < confidence
        ece = expected_calibration_error(probs, _with_correctness(probs, correct)).ece
        below += ece <= floor.upper
    assert abs(below / trials - 0.95) < 4 * math.sqrt(0.95 * 0.05 / trials + 0.95 * 0.05 / 2000)
    # a miscalibrated predictor (right with probability c^2) is far above it
    correct = torch.rand(n, generator=generator, dtype=torch.float64) < confidence**2
    overconfident = expected_calibration_error(probs, _with_correctness(probs, correct)).ece
    assert overconfident > 2 * floor.upper


def test_ece_noise_floor_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        ece_noise_floor(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        ece_noise_floor(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        calibrated_ece_expectation(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="num_simulations"):
        ece_noise_floor(torch.rand(5), num_simulations=1)
    with pytest.raises(ValueError, match="level"):
        ece_noise_floor(torch.rand(5), level=1.0)
    with pytest.raises(ValueError, match="num_bins"):
        calibrated_ece_expectation(torch.rand(5), num_bins=0)
    with pytest.raises(ValueError, match="num_items"):
        ece_noise_bound(0)
    # rounding just above 1 (within the probability tolerance) is accepted
    assert ece_noise_floor(torch.tensor([1 + 1e-7, 0.5]), num_simulations=10).bound > 0


# --------------------------------------------------------------------------------------
# Selective prediction
# --------------------------------------------------------------------------------------


def test_full_coverage_is_plain_accuracy() -> None:
    probs, labels = _random_predictions(4)
    uncertainty = decompose_uncertainty(probs[None]).total
    curve = selective_prediction(probs, labels, uncertainty)
    assert curve.coverage[-1].item() == 1.0
    assert curve.accuracy[-1].item() == pytest.approx(accuracy(probs, labels), abs=1e-12)
    assert accuracy_at_coverage(probs, labels, uncertainty, 1.0) == pytest.approx(
        accuracy(probs, labels), abs=1e-12)
    torch.testing.assert_close(curve.risk, 1 - curve.accuracy)
    assert curve.aurc == pytest.approx(curve.risk.mean().item())


def test_perfect_uncertainty_gives_the_oracle_aurc() -> None:
    probs, labels = _random_predictions(5, n=1000)
    correct = probs.argmax(1) == labels
    num_correct = int(correct.sum())
    perfect = (~correct).double()  # every error more uncertain than every right answer
    curve = selective_prediction(probs, labels, perfect)
    oracle = sum((k - num_correct) / k for k in range(num_correct + 1, 1001)) / 1000
    assert curve.aurc == pytest.approx(oracle, rel=1e-12)
    assert oracle_aurc(probs, labels) == pytest.approx(oracle, rel=1e-12)
    assert (curve.accuracy[:num_correct] == 1).all()
    # Geifman et al.'s approximation r + (1 - r) log(1 - r), r the error rate
    r = 1 - num_correct / 1000
    assert oracle == pytest.approx(r + (1 - r) * math.log(1 - r), abs=2e-3)
    # the opposite ranking is the worst possible, a random one lies in between
    worst = selective_prediction(probs, labels, correct.double()).aurc
    generator = torch.Generator().manual_seed(0)
    random = selective_prediction(probs, labels, torch.rand(1000, generator=generator)).aurc
    assert oracle < random < worst
    assert random == pytest.approx(1 - accuracy(probs, labels), abs=0.05)


def test_ties_in_uncertainty_do_not_depend_on_order() -> None:
    probs, labels = _random_predictions(6, n=500)
    constant = torch.zeros(500)
    curve = selective_prediction(probs, labels, constant)
    # all tied: the expected accuracy at every coverage is the plain accuracy
    assert torch.allclose(curve.accuracy, torch.full((500,), accuracy(probs, labels),
                                                     dtype=torch.float64))
    coarse = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(1)).float()
    permutation = torch.randperm(500, generator=torch.Generator().manual_seed(2))
    a = selective_prediction(probs, labels, coarse)
    b = selective_prediction(probs[permutation], labels[permutation], coarse[permutation])
    torch.testing.assert_close(a.accuracy, b.accuracy)
    assert accuracy_at_coverage(probs, labels, coarse, 0.5) == pytest.approx(
        a.accuracy[249].item())


def _aurc_by_hand(correct: torch.Tensor, uncertainty: torch.Tensor) -> float:
    """Mean over k = 1..N of the error rate of the k least uncertain inputs (no ties)."""
    order = sorted(range(len(correct)), key=lambda i: uncertainty[i].item())
    errors, total = 0, 0.0
    for k, i in enumerate(order, start=1):
        errors += not bool(correct[i])
        total += errors / k
    return total / len(correct)


def test_excess_aurc_is_aurc_minus_the_oracle_by_hand() -> None:
    probs, labels = _random_predictions(14, n=600)
    correct = probs.argmax(-1) == labels
    uncertainty = torch.rand(600, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64) + 0.3 * (~correct)  # distinct values
    aurc = _aurc_by_hand(correct, uncertainty)
    assert selective_prediction(probs, labels, uncertainty).aurc == pytest.approx(aurc,
                                                                                 rel=1e-12)
    # the oracle by hand: every error after every right prediction
    oracle = _aurc_by_hand(correct, (~correct).double() + torch.linspace(0, 0.5, 600,
                                                                          dtype=torch.float64))
    assert excess_aurc(probs, labels, uncertainty) == pytest.approx(aurc - oracle, rel=1e-10)
    assert 0 < excess_aurc(probs, labels, uncertainty) < excess_aurc(
        probs, labels, torch.rand(600, generator=torch.Generator().manual_seed(1)))
    # a perfect ranking has no excess; the default uncertainty is 1 - max_k p_k
    assert excess_aurc(probs, labels, (~correct).double()) == pytest.approx(0, abs=1e-15)
    softmax_response = 1 - probs.max(-1).values
    assert excess_aurc(probs, labels) == excess_aurc(probs, labels, softmax_response)


@pytest.mark.parametrize("levels", [None, 5])
def test_misclassification_auroc_agrees_with_sklearn(levels: int | None) -> None:
    probs, labels = _random_predictions(15, n=1500)
    wrong = (probs.argmax(-1) != labels).numpy()
    uncertainty = decompose_uncertainty(probs[None]).total
    if levels is not None:  # ties
        uncertainty = (uncertainty * levels).round()
    ours = misclassification_auroc(probs, labels, uncertainty)
    assert ours == pytest.approx(roc_auc_score(wrong, uncertainty.numpy()), abs=1e-12)
    assert 0.5 < ours < 1  # the entropy of these predictions does say something
    assert misclassification_auroc(probs, labels, torch.from_numpy(wrong).double()) == 1.0
    assert misclassification_auroc(probs, labels, -torch.from_numpy(wrong).double()) == 0.0


def test_misclassification_auroc_needs_right_and_wrong_predictions() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(ValueError, match="right and wrong"):
        misclassification_auroc(probs, torch.tensor([0, 1]), torch.rand(2))
    with pytest.raises(ValueError, match="right and wrong"):
        misclassification_auroc(probs, torch.tensor([1, 0]), torch.rand(2))
    with pytest.raises(ValueError, match="2 inputs"):
        misclassification_auroc(probs, torch.tensor([0, 0]), torch.rand(3))


# --------------------------------------------------------------------------------------
# OOD detection
# --------------------------------------------------------------------------------------


def test_auroc_extremes() -> None:
    score_in, score_out = torch.arange(100.0), torch.arange(100.0, 150.0)
    assert ood_detection(score_in, score_out).auroc == 1.0
    assert ood_detection(score_in, score_out).fpr_at_95_tpr == 0.0
    assert ood_detection(score_in, score_out).aupr == 1.0
    assert ood_detection(score_out, score_in).auroc == 0.0
    same = ood_detection(torch.ones(100), torch.ones(50))
    assert same.auroc == 0.5
    assert same.aupr == pytest.approx(50 / 150)  # the fraction of positives
    assert same.fpr_at_95_tpr == 1.0


@pytest.mark.parametrize("seed, levels", [(0, None), (1, 7), (2, 2)])
def test_ood_metrics_agree_with_sklearn(seed: int, levels: int | None) -> None:
    # Continuous scores, scores with many ties (7 levels) and with only two values.
    generator = torch.Generator().manual_seed(seed)
    n = 3000
    is_ood = torch.rand(n, generator=generator) < 0.3
    scores = torch.randn(n, generator=generator, dtype=torch.float64) + 0.8 * is_ood
    if levels is not None:
        scores = torch.floor(scores * levels / 4).clamp(-levels, levels)
    y, s = is_ood.numpy(), scores.numpy()
    assert auroc(scores, is_ood) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(scores, is_ood) == pytest.approx(
        average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for level in (0.95, 0.8, 0.5):
        expected = fpr[np.searchsorted(tpr, level, side="left")]
        assert fpr_at_tpr(scores, is_ood, level) == pytest.approx(expected, abs=1e-12)
    result = ood_detection(scores[~is_ood], scores[is_ood])
    assert result.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert result.aupr == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert result.fpr_at_95_tpr == pytest.approx(
        fpr[np.searchsorted(tpr, 0.95, side="left")], abs=1e-12)
    # OOD is the positive class: swapping the roles keeps AUROC's complement only
    swapped = ood_detection(-scores[is_ood], -scores[~is_ood])
    assert swapped.auroc == pytest.approx(result.auroc, abs=1e-12)
    assert swapped.aupr == pytest.approx(average_precision_score(~y, -s), abs=1e-12)


def test_ood_scores_from_samples() -> None:
    generator = torch.Generator().manual_seed(8)
    samples = (3 * torch.randn(10, 200, 10, generator=generator)).softmax(-1)
    scores = ood_scores(samples)
    assert tuple(scores) == OOD_SCORES
    parts = decompose_uncertainty(samples)
    torch.testing.assert_close(scores["entropy"], parts.total)
    torch.testing.assert_close(scores["mutual_information"], parts.epistemic)
    torch.testing.assert_close(scores["one_minus_max_prob"], 1 - samples.mean(0).max(-1).values)
    single = ood_scores(samples[:1])  # a deterministic network has no epistemic part
    assert single["mutual_information"].abs().max() <= 1e-6


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_input_raises() -> None:
    probs, labels = _random_predictions(9, n=20)
    with pytest.raises(ValueError, match="labels must have shape"):
        accuracy(probs, labels[:-1])
    with pytest.raises(ValueError, match="sum to one"):
        brier_score(probs * 1.1, labels)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        negative_log_likelihood(probs[None], labels)
    with pytest.raises(ValueError, match="lie in 0..9"):
        accuracy(probs, labels + 10)
    with pytest.raises(ValueError, match="integer"):
        accuracy(probs, labels.float())
    with pytest.raises(ValueError, match="non-negative"):
        expected_calibration_error(probs.log(), labels)
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(probs, labels, num_bins=0)
    with pytest.raises(ValueError, match="20 inputs"):
        selective_prediction(probs, labels, torch.rand(19))
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(probs, labels, torch.rand(20), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        ood_detection(torch.tensor([0.1, float("nan")]), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="one score per input"):
        ood_detection(torch.rand(5, 2), torch.rand(5))
    with pytest.raises(ValueError, match="need in- and out-of-distribution"):
        ood_detection(torch.rand(5), torch.rand(0))
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc(torch.rand(5), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        auroc(torch.rand(5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 and 1"):
        average_precision(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sum to one"):
        ood_scores(torch.rand(3, 4, 5))


def test_mc_log_predictive_is_exact_in_float64() -> None:
    # Regression: log S was a float32 tensor, an error of ~1e-8 on float64 inputs.
    from bnn_course.evaluation import mc_log_predictive

    probs = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64).softmax(-1)
    ours = mc_log_predictive(probs.log())
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, probs.mean(0).log(), rtol=0, atol=1e-13)


def test_brier_score_of_two_classes_is_twice_sklearns_default() -> None:
    # The docstring's warning for readers comparing with scikit-learn, checked.
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    ours = brier_score(probs, labels)
    assert ours == pytest.approx(2 * brier_score_loss(labels.numpy(), probs[:, 1].numpy()))
    assert ours == pytest.approx(brier_score_loss(labels.numpy(), probs.numpy(), labels=[0, 1],
                                                  scale_by_half=False))
