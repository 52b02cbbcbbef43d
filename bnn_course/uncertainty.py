r"""Predictive uncertainty from posterior samples, and its split into aleatoric and epistemic.

**Convention.** Every function here takes the class **probabilities** of :math:`S` posterior
samples, a tensor ``sample_probs`` of shape ``(S, N, K)`` (samples, inputs, classes) whose
rows are non-negative and sum to one. The book's models return log-probabilities: pass
``sample_log_probs.exp()`` (as returned by
:func:`bnn_course.evaluation.predict_log_probs`). A tensor whose rows do not sum to one
(e.g. log-probabilities or logits passed by mistake) raises a :class:`ValueError`; see
:func:`check_probabilities` for the tolerance. A deterministic network is the case
:math:`S = 1` (``probs[None]``).

With :math:`p_s = p(y \mid x, w_s)` and :math:`\bar p = \frac1S \sum_s p_s`, in nats:

.. math::

    \underbrace{\mathbb{H}[\bar p]}_{\text{predictive entropy (total)}}
    = \underbrace{\frac1S \sum_s \mathbb{H}[p_s]}_{\text{expected entropy (aleatoric)}}
    + \underbrace{\mathbb{H}[\bar p] - \frac1S \sum_s \mathbb{H}[p_s]}_{\text{mutual information
      } \mathbb{I}[y; w \mid x] \text{ (epistemic)}}

with :math:`\mathbb{H}[p] = -\sum_k p_k \log p_k` and :math:`0 \log 0 = 0`
(:func:`torch.special.xlogy`). The mutual information is computed as that difference, so the
decomposition holds by construction. Mathematically it is :math:`\ge 0` (entropy is concave,
Jensen) and 0 when all samples agree. Numerically, for samples that agree, the rounding
of the two averages over samples leaves a few ulps of either sign; :func:`decompose_uncertainty`
clamps negative values at 0 **and** lowers the aleatoric part to the total in those
entries, so that ``total == aleatoric + epistemic`` still holds up to the rounding of one
floating-point addition (and a few positive ulps remain: "0 up to rounding").

The **variation ratio** is :math:`1 - f_{\text{mode}}`, where :math:`f_{\text{mode}}` is the
fraction of samples whose arg-max is the most frequent arg-max (the "modal vote"); it is 0
when every sample votes for the same class and at most :math:`1 - 1/K`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

PROBABILITY_ATOL = 1e-4
"""Tolerance on ``|sum_k p_k - 1|`` (and on negative values) for float32 and float64."""

PROBABILITY_ATOL_HALF = 1e-2
"""The same tolerance for float16 and bfloat16 inputs."""


def check_probabilities(probs: torch.Tensor, name: str = "probs",
                        dim: int | None = None) -> torch.Tensor:
    """Validate a tensor of probability vectors along its last axis; return it as float.

    Checks that ``probs`` is a floating tensor with ``dim`` axes (any number if ``None``),
    at least one class, finite, no entry below ``-atol`` and every row summing to one within
    ``atol`` (:data:`PROBABILITY_ATOL`; :data:`PROBABILITY_ATOL_HALF` for 16-bit floats).

    Returns
    -------
    ``probs`` as float32 (float64 stays float64), tiny negatives clamped to 0.

    Raises
    ------
    ValueError
        With a message naming the first row that fails, e.g. when log-probabilities or
        logits are passed where probabilities are expected.
    """
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of probabilities, got {probs.dtype}")
    if dim is not None and probs.dim() != dim:
        expected = {2: "(N, K)", 3: "(S, N, K)"}.get(dim, f"{dim} axes")
        raise ValueError(f"{name} must have shape {expected}, got {tuple(probs.shape)}")
    if probs.dim() == 0 or probs.shape[-1] == 0:
        raise ValueError(f"{name} needs at least one class on its last axis, "
                         f"got shape {tuple(probs.shape)}")
    atol = PROBABILITY_ATOL_HALF if probs.dtype in (torch.float16, torch.bfloat16) \
        else PROBABILITY_ATOL
    x = probs if probs.dtype == torch.float64 else probs.to(torch.float32)
    if x.numel() == 0:
        return x
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    minimum = x.min()
    if minimum < -atol:
        raise ValueError(f"{name} must be non-negative probabilities; the smallest entry is "
                         f"{minimum.item():.4g} (log-probabilities? pass .exp())")
    error = (x.sum(-1) - 1).abs()
    worst = error.argmax()
    if error.flatten()[worst] > atol:
        row = tuple(int(i) for i in torch.unravel_index(worst, error.shape))
        total = x.sum(-1).flatten()[worst].item()
        raise ValueError(f"{name} rows must sum to one over the last axis (tolerance {atol:g}); "
                         f"row {row} sums to {total:.6g} (logits or log-probabilities? "
                         f"apply softmax or exp)")
    return x.clamp_min(0)


def _check_samples(sample_probs: torch.Tensor) -> torch.Tensor:
    x = check_probabilities(sample_probs, "sample_probs", dim=3)
    if x.shape[0] == 0:
        raise ValueError("sample_probs needs at least one sample: shape (S >= 1, N, K), got "
                         f"{tuple(sample_probs.shape)}")
    return x


def entropy(probs: torch.Tensor) -> torch.Tensor:
    r"""Shannon entropy :math:`-\sum_k p_k \log p_k` in nats over the last axis, 0 log 0 = 0.

    ``probs`` ``(..., K)`` -> ``(...)``; validated by :func:`check_probabilities`.
    """
    p = check_probabilities(probs)
    return -torch.special.xlogy(p, p).sum(-1)


def predictive_distribution(sample_probs: torch.Tensor) -> torch.Tensor:
    r""":math:`\bar p = \frac1S \sum_s p_s`: ``(S, N, K)`` -> ``(N, K)``."""
    return _check_samples(sample_probs).mean(0)


def predictive_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    r"""Total uncertainty :math:`\mathbb{H}[\bar p]`: ``(S, N, K)`` -> ``(N,)``, nats."""
    p = predictive_distribution(sample_probs)
    return -torch.special.xlogy(p, p).sum(-1)


def expected_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    r"""Aleatoric uncertainty :math:`\frac1S \sum_s \mathbb{H}[p_s]`: ``(S, N, K)`` -> ``(N,)``."""
    p = _check_samples(sample_probs)
    return -torch.special.xlogy(p, p).sum(-1).mean(0)


class UncertaintyDecomposition(NamedTuple):
    """Output of :func:`decompose_uncertainty`; every field is per input, in nats."""

    predictive: torch.Tensor
    """The predictive distribution :math:`\\bar p`, ``(N, K)``."""
    total: torch.Tensor
    """Predictive entropy :math:`\\mathbb{H}[\\bar p]`, ``(N,)``."""
    aleatoric: torch.Tensor
    """Expected entropy (lowered to ``total`` where rounding put it above), ``(N,)``."""
    epistemic: torch.Tensor
    """Mutual information ``total - aleatoric``, clamped at 0, ``(N,)``."""


def decompose_uncertainty(sample_probs: torch.Tensor) -> UncertaintyDecomposition:
    """Predictive distribution, and total = aleatoric + epistemic uncertainty.

    Parameters
    ----------
    sample_probs:
        ``(S, N, K)`` class probabilities of ``S`` posterior samples.

    Returns
    -------
    :class:`UncertaintyDecomposition` with ``total == aleatoric + epistemic`` (up to the
    rounding of one addition) and ``epistemic >= 0`` everywhere.
    """
    p = _check_samples(sample_probs)
    predictive = p.mean(0)
    total = -torch.special.xlogy(predictive, predictive).sum(-1)
    aleatoric = -torch.special.xlogy(p, p).sum(-1).mean(0)
    # Where rounding makes E_s H[p_s] exceed H[p_bar] (samples that agree), the mutual
    # information is 0; lowering aleatoric to total there keeps the sum exact.
    aleatoric = torch.minimum(aleatoric, total)
    epistemic = (total - aleatoric).clamp_min(0)
    return UncertaintyDecomposition(predictive, total, aleatoric, epistemic)


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    r"""Epistemic uncertainty :math:`\mathbb{H}[\bar p] - \frac1S\sum_s \mathbb{H}[p_s] \ge 0`.

    ``(S, N, K)`` -> ``(N,)``, nats; tiny negative rounding errors are clamped to 0.
    """
    return decompose_uncertainty(sample_probs).epistemic


def variation_ratio(sample_probs: torch.Tensor) -> torch.Tensor:
    """``1 - (votes for the modal class) / S``, each sample voting for its arg-max class.

    ``(S, N, K)`` -> ``(N,)`` in ``[0, 1 - 1/K]``; 0 when all samples agree. Ties in the
    vote count do not matter: only the size of the largest vote is used.
    """
    p = _check_samples(sample_probs)
    num_samples, _, num_classes = p.shape
    votes = torch.nn.functional.one_hot(p.argmax(-1), num_classes).sum(0)  # (N, K)
    return 1 - votes.max(-1).values.to(p.dtype) / num_samples
