r"""How good are the predictions and their uncertainties: accuracy, NLL, Brier, calibration,
selective prediction and out-of-distribution detection.

Conventions (every function validates its input and raises :class:`ValueError` otherwise):

* ``probs`` ``(N, K)``: predicted class probabilities, rows summing to one (for a Bayesian
  network the predictive distribution, :func:`bnn_course.uncertainty.predictive_distribution`);
  ``labels`` ``(N,)``: integer classes in ``0..K-1``.
* Scalar metrics are returned as Python floats.
* **Brier score**: :math:`\frac1N \sum_n \sum_k (p_{nk} - [y_n = k])^2`, the *sum* over
  classes (range 0..2), the original definition of Brier (1950); some libraries divide by
  :math:`K` or by 2.
* **Expected calibration error** (Guo et al., 2017): top-label confidence
  :math:`\max_k p_{nk}` in ``num_bins`` equal-width bins :math:`((m-1)/M, m/M]`,
  :math:`\mathrm{ECE} = \sum_m \frac{|B_m|}{N} |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|`.
* **ECE noise floor**: the ECE a *perfectly calibrated* predictor with the same
  confidences would show on the same :math:`N` inputs (each prediction right with
  probability equal to its confidence); an ECE, or a difference of ECEs, below it is not
  evidence of miscalibration.
* **Selective prediction**: the inputs with the *lowest* uncertainty are kept. Risk is the
  error rate on the kept inputs; AURC (Geifman et al., 2019) is the mean risk over the
  coverages :math:`k/N`, :math:`k = 1..N`; excess AURC subtracts the AURC of the ideal
  ranking (every error rejected first) at the same error rate. Misclassification AUROC:
  the AUROC of the uncertainty separating wrong (positive) from right predictions.
* **OOD detection**: a score per input, **higher = more out-of-distribution**; OOD inputs are
  the **positive** class for AUROC, AUPR and "FPR at 95% TPR" (the fraction of in-distribution
  inputs flagged as OOD at the threshold that catches 95% of the OOD ones), as in Hendrycks et
  al. (2019, Outlier Exposure). Papers that take in-distribution as positive report a
  different AUPR ("AUPR-In") and FPR; AUROC is the same either way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bnn_course.uncertainty import PROBABILITY_ATOL, check_probabilities, decompose_uncertainty

# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _check_labelled(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    p = check_probabilities(probs, "probs", dim=2)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != p.shape[0]:
        raise ValueError(f"labels must have shape (N,) = ({p.shape[0]},) to match probs "
                         f"{tuple(p.shape)}, got {tuple(labels.shape)}")
    if p.shape[0] == 0:
        raise ValueError("need at least one example, got N = 0")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.to(p.device, torch.int64)
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}, got values from "
                         f"{labels.min().item()} to {labels.max().item()}")
    return p, labels


def _check_scores(scores: torch.Tensor, name: str, n: int | None = None) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(f"{name} must be one score per input, shape (N,), "
                         f"got {tuple(scores.shape)}")
    if n is not None and scores.shape[0] != n:
        raise ValueError(f"{name} has {scores.shape[0]} entries but there are {n} inputs")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {scores.dtype}")
    # Ranks and cumulative sums in float64 on the CPU: exact, and float64 works everywhere.
    scores = scores.detach().to("cpu", torch.float64)
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")
    return scores


def _check_binary(scores: torch.Tensor, is_positive: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    scores = _check_scores(scores, "scores")
    if not isinstance(is_positive, torch.Tensor) or is_positive.shape != scores.shape:
        shape = tuple(is_positive.shape) if isinstance(is_positive, torch.Tensor) else None
        raise ValueError(f"is_positive must be a tensor of shape {tuple(scores.shape)} like "
                         f"scores, got {shape}")
    positive = is_positive.detach().cpu()
    if positive.dtype != torch.bool:
        if positive.is_complex() or not torch.isin(positive, torch.tensor([0, 1])).all():
            raise ValueError("is_positive must hold booleans or only the values 0 and 1")
        positive = positive != 0
    num_pos = int(positive.sum())
    if num_pos == 0 or num_pos == positive.numel():
        raise ValueError(f"need both positives and negatives, got {num_pos} positives among "
                         f"{positive.numel()}")
    return scores, positive


# --------------------------------------------------------------------------------------
# Accuracy, NLL, Brier
# --------------------------------------------------------------------------------------


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose arg-max class is the label. ``(N, K)``, ``(N,)`` -> float."""
    p, y = _check_labelled(probs, labels)
    return (p.argmax(-1) == y).cpu().double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Mean :math:`-\log p_{n, y_n}` in nats.

    Probabilities are clipped below at the dtype's machine epsilon (as
    :func:`sklearn.metrics.log_loss` does), so a zero probability on the label gives a large
    finite value instead of infinity.
    """
    p, y = _check_labelled(probs, labels)
    picked = p.gather(1, y[:, None]).squeeze(1).clamp_min(torch.finfo(p.dtype).eps)
    return (-picked.cpu().double().log()).mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    r""":math:`\frac1N \sum_n \sum_k (p_{nk} - [y_n = k])^2`, summed over classes (0..2).

    This is :func:`sklearn.metrics.brier_score_loss` ``(y, probs, labels=range(K))`` for
    :math:`K > 2`; for two classes scikit-learn's default halves it (``scale_by_half``),
    the binary Brier score of the positive class. ``torchmetrics`` has no Brier score.
    """
    p, y = _check_labelled(probs, labels)
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return (p - one_hot).cpu().double().pow(2).sum(-1).mean().item()


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


class Calibration(NamedTuple):
    """Output of :func:`expected_calibration_error`; tensors on the CPU, float64."""

    ece: float
    """Expected calibration error."""
    bin_edges: torch.Tensor
    """``(M + 1,)`` edges ``0, 1/M, ..., 1``; bin ``m`` is ``(edges[m], edges[m + 1]]``."""
    mean_confidence: torch.Tensor
    """``(M,)`` mean top probability of the inputs in each bin (NaN for an empty bin)."""
    accuracy: torch.Tensor
    """``(M,)`` accuracy of the inputs in each bin (NaN for an empty bin)."""
    count: torch.Tensor
    """``(M,)`` number of inputs in each bin (int64)."""


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")


def _calibration_bins(confidence: torch.Tensor,
                      num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges ``(M + 1,)`` and the bin ``(N,)`` of each float64 CPU confidence: bin ``m`` is
    ``(edges[m], edges[m + 1]]``, a confidence of exactly 0 in bin 0."""
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    # bucketize(right=False) on the inner edges: index m for edges[m] < c <= edges[m + 1].
    return edges, torch.bucketize(confidence, edges[1:-1], right=False)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               num_bins: int = 15) -> Calibration:
    r"""Top-label ECE with ``num_bins`` equal-width bins, and a reliability diagram's data.

    Bin :math:`m` holds the inputs whose confidence :math:`\max_k p_{nk}` lies in
    :math:`((m-1)/M, m/M]` (a confidence of exactly 0 goes to the first bin).
    :math:`\mathrm{ECE} = \sum_m \frac{|B_m|}{N} |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|`
    (Guo et al., 2017). ``torchmetrics``' ``multiclass_calibration_error(norm="l1")`` bins
    ``[lo, hi)`` and gives a confidence of exactly 1.0 (a saturated float32 softmax) a bin
    of its own, so it differs from this function only when confidences fall exactly on an
    edge.

    Parameters
    ----------
    probs, labels:
        ``(N, K)`` probabilities and ``(N,)`` labels.
    num_bins:
        Number :math:`M` of bins (15 is the common choice).

    Returns
    -------
    :class:`Calibration`: ``ece`` and per-bin edges, mean confidence, accuracy and count;
    plot ``accuracy`` against ``mean_confidence`` (or bin centres) for a reliability diagram.
    """
    _check_num_bins(num_bins)
    p, y = _check_labelled(probs, labels)
    # float64 on the CPU (float64 is not available on every accelerator)
    confidence, prediction = p.cpu().double().max(-1)
    correct = (prediction == y.cpu()).double()
    edges, index = _calibration_bins(confidence, num_bins)
    count = torch.zeros(num_bins, dtype=torch.int64).index_add_(
        0, index, torch.ones_like(index))
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    filled = count > 0
    n = count.sum()
    mean_confidence = torch.where(filled, conf_sum / count.clamp_min(1), math.nan)
    bin_accuracy = torch.where(filled, correct_sum / count.clamp_min(1), math.nan)
    gaps = (bin_accuracy - mean_confidence).abs()[filled]
    ece = (count[filled].double() / n * gaps).sum().item()
    return Calibration(ece, edges, mean_confidence, bin_accuracy, count)


# --------------------------------------------------------------------------------------
# The noise floor of the ECE
# --------------------------------------------------------------------------------------


def _check_confidences(confidences: torch.Tensor) -> torch.Tensor:
    """``(N,)`` confidences in [0, 1], N >= 1, as float64 on the CPU (values outside by
    less than :data:`~bnn_course.uncertainty.PROBABILITY_ATOL` are clamped)."""
    if not isinstance(confidences, torch.Tensor):
        raise ValueError(f"confidences must be a torch.Tensor, got {type(confidences).__name__}")
    if confidences.dim() != 1 or confidences.numel() == 0:
        raise ValueError(f"confidences must be one value per input, shape (N,) with N >= 1, "
                         f"got {tuple(confidences.shape)}")
    if confidences.is_complex() or confidences.dtype == torch.bool:
        raise ValueError(f"confidences must be real numbers, got {confidences.dtype}")
    c = confidences.detach().to("cpu", torch.float64)
    # as check_probabilities: rounding may leave a probability PROBABILITY_ATOL outside [0, 1]
    if (not torch.isfinite(c).all() or c.min() < -PROBABILITY_ATOL
            or c.max() > 1 + PROBABILITY_ATOL):
        raise ValueError(f"confidences must lie in [0, 1], got values from {c.min().item()} "
                         f"to {c.max().item()}")
    return c.clamp(0, 1)


def ece_noise_bound(num_items: int, num_bins: int = 15) -> float:
    r"""Chapter 8's upper bound on the expected ECE of a calibrated predictor:
    :math:`\frac12 \sqrt{M / N}`.

    Each bin's correct count :math:`S_m` has standard deviation
    :math:`\sigma_m \le \sqrt{|B_m|}/2`, so
    :math:`\mathbb{E}[\mathrm{ECE}] \le \frac1N \sum_m \sigma_m
    \le \frac{1}{2N} \sum_m \sqrt{|B_m|} \le \frac12\sqrt{M/N}` (Jensen, then
    Cauchy-Schwarz). It holds for any confidences, and is loose: confidences near 1 (small
    :math:`\sigma_m`) or few filled bins give a floor well below it; use
    :func:`calibrated_ece_expectation` or :func:`ece_noise_floor` for the floor of given
    confidences.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    _check_num_bins(num_bins)
    return 0.5 * math.sqrt(num_bins / num_items)


def _poisson_binomial_pmf(probabilities: torch.Tensor) -> torch.Tensor:
    """``(n + 1,)`` float64: P(S = k) for S the number of successes of independent
    Bernoulli trials with success ``probabilities`` ``(n,)`` (float64, CPU), by adding one
    trial at a time: :math:`P_{j+1}(k) = (1 - c) P_j(k) + c P_j(k - 1)`."""
    pmf = torch.zeros(probabilities.numel() + 1, dtype=torch.float64)
    pmf[0] = 1.0
    for j, c in enumerate(probabilities.tolist()):  # support 0..j before this trial
        pmf[1:j + 2] = pmf[1:j + 2] * (1 - c) + pmf[:j + 1] * c
        pmf[0] *= 1 - c
    return pmf


def calibrated_ece_expectation(confidences: torch.Tensor, num_bins: int = 15) -> float:
    r"""The exact expected ECE of a perfectly calibrated predictor with these confidences.

    Calibrated: prediction :math:`n` is right with probability :math:`c_n`, independently.
    Then bin :math:`m`'s correct count :math:`S_m = \sum_{n \in B_m} z_n`,
    :math:`z_n \sim \mathrm{Bernoulli}(c_n)`, is Poisson-binomial with mean
    :math:`\mu_m = \sum_{n \in B_m} c_n`, the ECE is
    :math:`\frac1N \sum_m |S_m - \mu_m|`, and

    .. math::

        \mathbb{E}[\mathrm{ECE}] = \frac1N \sum_m \sum_{k=0}^{|B_m|}
        P(S_m = k)\, |k - \mu_m|,

    with :math:`P(S_m = k)` computed exactly (one trial at a time, :math:`O(|B_m|^2)`).
    For large bins :math:`\mathbb{E}|S_m - \mu_m| \approx \sqrt{2/\pi}\,\sigma_m`,
    :math:`\sigma_m^2 = \sum_{n \in B_m} c_n (1 - c_n)`: for a fixed distribution of
    confidences the floor shrinks like :math:`1/\sqrt{N}`. Always below
    :func:`ece_noise_bound`.

    Parameters
    ----------
    confidences:
        ``(N,)`` top-label confidences :math:`\max_k p_{nk}` in [0, 1].
    num_bins:
        The bins of :func:`expected_calibration_error`.
    """
    _check_num_bins(num_bins)
    c = _check_confidences(confidences)
    _, index = _calibration_bins(c, num_bins)
    total = 0.0
    for m in index.unique().tolist():
        in_bin = c[index == m]
        pmf = _poisson_binomial_pmf(in_bin)
        k = torch.arange(pmf.numel(), dtype=torch.float64)
        total += (pmf * (k - in_bin.sum()).abs()).sum().item()
    return total / c.numel()


class ECENoiseFloor(NamedTuple):
    """Output of :func:`ece_noise_floor`: the ECE a calibrated predictor would show."""

    mean: float
    """Mean of the simulated ECEs (Monte Carlo estimate of ``expected``)."""
    upper: float
    """Their ``level`` quantile: a calibrated predictor's ECE exceeds it with probability
    about ``1 - level``."""
    level: float
    """The quantile level of ``upper`` (e.g. 0.95)."""
    expected: float
    """The exact expected value, :func:`calibrated_ece_expectation`."""
    bound: float
    """Chapter 8's bound :math:`\\frac12\\sqrt{M/N}`, :func:`ece_noise_bound` (>= ``expected``)."""
    samples: torch.Tensor
    """``(num_simulations,)`` float64: the simulated ECEs (for a histogram)."""


def ece_noise_floor(confidences: torch.Tensor, num_bins: int = 15,
                    num_simulations: int = 1000, level: float = 0.95,
                    generator: torch.Generator | None = None) -> ECENoiseFloor:
    r"""The distribution of the ECE of a perfectly calibrated predictor, by simulation.

    Keeps the confidences :math:`c_n` (and so the bins) and draws, ``num_simulations``
    times, whether each prediction is right, :math:`z_n \sim \mathrm{Bernoulli}(c_n)`,
    independently: labels drawn from a predictor's own probabilities, as chapter 8 does
    once. Each draw gives
    :math:`\mathrm{ECE} = \frac1N \sum_m |\sum_{n \in B_m} (z_n - c_n)|`
    (:func:`expected_calibration_error`'s bins). An observed ECE below ``upper`` is
    consistent with perfect calibration at this :math:`N`, and an ECE difference smaller
    than the floor is no evidence that one predictor is better calibrated.

    Parameters
    ----------
    confidences:
        ``(N,)`` top-label confidences :math:`\max_k p_{nk}` in [0, 1].
    num_bins:
        The bins of the ECE.
    num_simulations:
        Number of simulated label sets; the Monte Carlo standard error of ``mean`` is the
        standard deviation of ``samples`` over :math:`\sqrt{\text{num\_simulations}}`.
    level:
        Quantile level of ``upper``, in (0, 1).
    generator:
        Random numbers (drawn on its device); seed it for a repeatable floor.

    Returns
    -------
    :class:`ECENoiseFloor` with the simulated mean and ``level`` quantile, the exact
    expectation (:func:`calibrated_ece_expectation`) and chapter 8's bound
    (:func:`ece_noise_bound`).
    """
    _check_num_bins(num_bins)
    c = _check_confidences(confidences)
    if (isinstance(num_simulations, bool) or not isinstance(num_simulations, int)
            or num_simulations < 2):
        raise ValueError(f"num_simulations must be an int >= 2, got {num_simulations!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = c.numel()
    _, index = _calibration_bins(c, num_bins)
    expected_correct = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, c)
    device = generator.device if generator is not None else torch.device("cpu")
    # float64 is not available on every accelerator; float32 uniforms move P(z = 1) by < 1e-7
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    threshold = c.to(device, dtype)
    chunk = max(1, 2**21 // n)  # at most ~2M draws at a time
    samples = []
    for start in range(0, num_simulations, chunk):
        rows = min(chunk, num_simulations - start)
        u = torch.rand((rows, n), generator=generator, device=device, dtype=dtype)
        correct = (u < threshold).cpu().to(torch.float64)  # (rows, N)
        per_bin = torch.zeros(rows, num_bins, dtype=torch.float64).index_add_(1, index, correct)
        samples.append((per_bin - expected_correct).abs().sum(1) / n)
    ece = torch.cat(samples)
    return ECENoiseFloor(ece.mean().item(), torch.quantile(ece, level).item(), float(level),
                         calibrated_ece_expectation(c, num_bins), ece_noise_bound(n, num_bins),
                         ece)


# --------------------------------------------------------------------------------------
# Selective prediction
# --------------------------------------------------------------------------------------


class RiskCoverage(NamedTuple):
    """Output of :func:`selective_prediction`: curves ``(N,)`` (CPU, float64) and AURC."""

    coverage: torch.Tensor
    """``k / N`` for ``k = 1..N``: the fraction of inputs kept."""
    accuracy: torch.Tensor
    """Accuracy on the ``k`` kept (least uncertain) inputs."""
    risk: torch.Tensor
    """``1 - accuracy``: the error rate on the kept inputs."""
    aurc: float
    """Area under the risk-coverage curve: the mean of ``risk``."""


def _risk_coverage(correct: torch.Tensor, uncertainty: torch.Tensor) -> RiskCoverage:
    n = correct.numel()
    sorted_uncertainty, order = torch.sort(uncertainty, stable=True)
    correct = correct[order]
    # Inputs with equal uncertainty are kept or rejected together, in no defined order:
    # inside such a group, count the *expected* number of correct ones under a random order
    # (a linear interpolation), so the curve does not depend on how ties are sorted.
    _, counts = torch.unique_consecutive(sorted_uncertainty, return_counts=True)
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    group_correct = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, correct)
    ends = counts.cumsum(0)
    starts = ends - counts
    correct_before = group_correct.cumsum(0) - group_correct
    k = torch.arange(1, n + 1, dtype=torch.float64)
    kept_in_group = k - starts[group]
    expected_correct = correct_before[group] + kept_in_group * group_correct[group] / counts[group]
    acc = expected_correct / k
    risk = 1 - acc
    return RiskCoverage(k / n, acc, risk, risk.mean().item())


def selective_prediction(probs: torch.Tensor, labels: torch.Tensor,
                         uncertainty: torch.Tensor) -> RiskCoverage:
    """Accuracy and risk against coverage when the most uncertain inputs are rejected.

    For each ``k = 1..N`` keep the ``k`` inputs with the lowest ``uncertainty`` and measure
    the accuracy of the arg-max prediction on them. Inputs with equal uncertainty count
    with their average correctness (the expectation over random tie-breaking), so e.g. a
    constant uncertainty gives the plain accuracy at every coverage.

    Parameters
    ----------
    probs, labels:
        ``(N, K)`` probabilities and ``(N,)`` labels.
    uncertainty:
        ``(N,)``, higher = less sure (e.g. predictive entropy, ``1 - max_k p_k``).

    Returns
    -------
    :class:`RiskCoverage`; ``accuracy[-1]`` (coverage 1) is :func:`accuracy`.
    """
    p, y = _check_labelled(probs, labels)
    u = _check_scores(uncertainty, "uncertainty", p.shape[0])
    correct = (p.argmax(-1) == y).cpu().double()
    return _risk_coverage(correct, u)


def accuracy_at_coverage(probs: torch.Tensor, labels: torch.Tensor,
                         uncertainty: torch.Tensor, coverage: float) -> float:
    """Accuracy on the ``ceil(coverage * N)`` least uncertain inputs, ``0 < coverage <= 1``."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    curve = selective_prediction(probs, labels, uncertainty)
    n = curve.coverage.numel()
    k = max(1, math.ceil(coverage * n - 1e-9))
    return curve.accuracy[k - 1].item()


def oracle_aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    r"""The smallest possible AURC: every wrong prediction rejected before any right one.

    With :math:`c` correct of :math:`N`:
    :math:`\frac1N \sum_{k=c+1}^{N} \frac{k - c}{k}` (Geifman et al., 2019).
    """
    p, y = _check_labelled(probs, labels)
    n = p.shape[0]
    num_correct = int((p.argmax(-1) == y).sum())
    k = torch.arange(num_correct + 1, n + 1, dtype=torch.float64)
    return ((k - num_correct) / k).sum().item() / n


def excess_aurc(probs: torch.Tensor, labels: torch.Tensor,
                uncertainty: torch.Tensor | None = None) -> float:
    r"""Excess AURC (E-AURC, Geifman et al., 2019): the AURC minus the oracle AURC.

    :math:`\mathrm{E\text{-}AURC} = \mathrm{AURC}(u) - \mathrm{AURC}^*`, with
    :math:`\mathrm{AURC}(u)` the mean risk of :func:`selective_prediction` when the inputs
    are rejected by ``uncertainty`` and :math:`\mathrm{AURC}^*` (:func:`oracle_aurc`) that
    of the ideal ranking at the same error rate. The AURC mixes two things, how many
    predictions are wrong and how well the uncertainty ranks them; E-AURC keeps only the
    second, so methods of different accuracy can be compared on their ranking. 0 for a
    perfect ranking, :math:`\ge 0` always.

    Parameters
    ----------
    probs, labels:
        ``(N, K)`` probabilities and ``(N,)`` labels.
    uncertainty:
        ``(N,)``, higher = less sure; default :math:`1 - \max_k p_{nk}` (the softmax
        response of Geifman et al.).
    """
    p, _ = _check_labelled(probs, labels)
    if uncertainty is None:
        uncertainty = 1 - p.max(-1).values
    return selective_prediction(probs, labels, uncertainty).aurc - oracle_aurc(probs, labels)


def misclassification_auroc(probs: torch.Tensor, labels: torch.Tensor,
                            uncertainty: torch.Tensor) -> float:
    r"""AUROC of ``uncertainty`` separating wrong predictions (positives) from right ones.

    The probability that a randomly chosen wrong prediction is more uncertain than a
    randomly chosen right one (ties count one half), :func:`auroc` with
    :math:`[\arg\max_k p_{nk} \ne y_n]` as the positive class. 0.5: the uncertainty says
    nothing about errors; 1: every error is more uncertain than every right prediction.
    Unlike the AURC it does not depend on the error rate.

    Parameters
    ----------
    probs, labels:
        ``(N, K)`` probabilities and ``(N,)`` labels, with at least one right and one
        wrong prediction (``ValueError`` otherwise).
    uncertainty:
        ``(N,)``, higher = less sure (e.g. predictive entropy).
    """
    p, y = _check_labelled(probs, labels)
    u = _check_scores(uncertainty, "uncertainty", p.shape[0])
    wrong = (p.argmax(-1) != y).cpu()
    num_wrong = int(wrong.sum())
    if num_wrong in (0, wrong.numel()):
        raise ValueError(f"the misclassification AUROC needs right and wrong predictions, got "
                         f"{num_wrong} wrong of {wrong.numel()}")
    return auroc(u, wrong)


# --------------------------------------------------------------------------------------
# Out-of-distribution detection
# --------------------------------------------------------------------------------------


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (float64, CPU), ties sharing their average rank."""
    sorted_values, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = average[inverse]
    return ranks


def auroc(scores: torch.Tensor, is_positive: torch.Tensor) -> float:
    r"""Area under the ROC curve, exactly, by ranks (Mann-Whitney U).

    :math:`\mathrm{AUROC} = \frac{R_+ - n_+(n_+ + 1)/2}{n_+ n_-}` with :math:`R_+` the sum
    of the positives' ranks among all scores, tied scores sharing their average rank; it is
    the probability that a random positive scores higher than a random negative, ties
    counting one half (= :func:`sklearn.metrics.roc_auc_score`).

    Parameters
    ----------
    scores:
        ``(N,)``, higher = more likely positive.
    is_positive:
        ``(N,)`` booleans (or 0/1), with at least one of each.
    """
    scores, positive = _check_binary(scores, is_positive)
    ranks = _average_ranks(scores)
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    u = ranks[positive].sum().item() - num_pos * (num_pos + 1) / 2
    return u / (num_pos * num_neg)


def _roc_points(scores: torch.Tensor,
                positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """True and false positive counts at every distinct threshold, highest score first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_scores = scores[order]
    hits = positive[order].to(torch.float64)
    last_of_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_group[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_pos = hits.cumsum(0)[last_of_group]
    false_pos = torch.arange(1, scores.numel() + 1, dtype=torch.float64)[last_of_group] - true_pos
    return true_pos, false_pos


def average_precision(scores: torch.Tensor, is_positive: torch.Tensor) -> float:
    r"""Area under the precision-recall curve as average precision, positives = ``True``.

    :math:`\mathrm{AP} = \sum_t (R_t - R_{t-1}) P_t` over the distinct score thresholds
    from the highest down (:math:`R_0 = 0`), no interpolation
    (= :func:`sklearn.metrics.average_precision_score`). A random detector scores the
    fraction of positives.
    """
    scores, positive = _check_binary(scores, is_positive)
    true_pos, false_pos = _roc_points(scores, positive)
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / true_pos[-1]
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return (steps * precision).sum().item()


def fpr_at_tpr(scores: torch.Tensor, is_positive: torch.Tensor,
               tpr_level: float = 0.95) -> float:
    """False positive rate at the highest threshold whose true positive rate is >= ``tpr_level``.

    The ROC curve is not interpolated: this is ``fpr[i]`` for the first ROC point ``i``
    (thresholds from high to low) with ``tpr[i] >= tpr_level``, as read off
    :func:`sklearn.metrics.roc_curve` with ``drop_intermediate=False``.
    """
    if not 0 < tpr_level <= 1:
        raise ValueError(f"tpr_level must be in (0, 1], got {tpr_level}")
    scores, positive = _check_binary(scores, is_positive)
    true_pos, false_pos = _roc_points(scores, positive)
    tpr = true_pos / true_pos[-1]
    fpr = false_pos / false_pos[-1]
    first = int(torch.nonzero(tpr >= tpr_level)[0])
    return fpr[first].item()


class OODDetection(NamedTuple):
    """Output of :func:`ood_detection` (OOD = positive class)."""

    auroc: float
    aupr: float
    """Average precision with OOD as positive ("AUPR-Out")."""
    fpr_at_95_tpr: float
    """Fraction of in-distribution inputs scored above the threshold catching 95% of OOD."""


def ood_detection(score_in: torch.Tensor, score_out: torch.Tensor) -> OODDetection:
    """AUROC, AUPR and FPR at 95% TPR of a score separating OOD from in-distribution inputs.

    Parameters
    ----------
    score_in:
        ``(N_in,)`` scores of in-distribution inputs (e.g. the test set).
    score_out:
        ``(N_out,)`` scores of out-of-distribution inputs. **Higher = more OOD**: use an
        uncertainty (:func:`ood_scores`), not a confidence.

    Returns
    -------
    :class:`OODDetection`; for another TPR level than 95%, call :func:`fpr_at_tpr`.
    """
    score_in = _check_scores(score_in, "score_in")
    score_out = _check_scores(score_out, "score_out")
    if score_in.numel() == 0 or score_out.numel() == 0:
        raise ValueError(f"need in- and out-of-distribution scores, got {score_in.numel()} "
                         f"and {score_out.numel()}")
    scores = torch.cat((score_in, score_out))
    is_ood = torch.cat((torch.zeros(score_in.numel(), dtype=torch.bool),
                        torch.ones(score_out.numel(), dtype=torch.bool)))
    return OODDetection(auroc(scores, is_ood), average_precision(scores, is_ood),
                        fpr_at_tpr(scores, is_ood, 0.95))


OOD_SCORES: tuple[str, ...] = ("entropy", "mutual_information", "one_minus_max_prob")
"""The scores :func:`ood_scores` computes, each higher for more OOD-looking inputs."""


def ood_scores(sample_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""OOD scores from posterior samples ``(S, N, K)``: a dict of ``(N,)`` tensors.

    * ``"entropy"``: predictive entropy :math:`\mathbb{H}[\bar p]` (total uncertainty);
    * ``"mutual_information"``: its epistemic part (0 for a deterministic network, ``S = 1``);
    * ``"one_minus_max_prob"``: :math:`1 - \max_k \bar p_k`, the baseline of Hendrycks &
      Gimpel (2017).
    """
    parts = decompose_uncertainty(sample_probs)
    return {
        "entropy": parts.total,
        "mutual_information": parts.epistemic,
        "one_minus_max_prob": 1 - parts.predictive.max(-1).values,
    }
