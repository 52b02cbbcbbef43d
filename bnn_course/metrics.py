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
* **Selective prediction**: the inputs with the *lowest* uncertainty are kept. Risk is the
  error rate on the kept inputs; AURC (Geifman et al., 2019) is the mean risk over the
  coverages :math:`k/N`, :math:`k = 1..N`.
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

from bnn_course.uncertainty import check_probabilities, decompose_uncertainty

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
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    p, y = _check_labelled(probs, labels)
    # float64 on the CPU (float64 is not available on every accelerator)
    confidence, prediction = p.cpu().double().max(-1)
    correct = (prediction == y.cpu()).double()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    # bucketize(right=False) on the inner edges: index m for edges[m] < c <= edges[m + 1].
    index = torch.bucketize(confidence, edges[1:-1], right=False)
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
