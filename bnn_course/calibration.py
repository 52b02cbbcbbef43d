r"""Temperature scaling: one number that recalibrates a trained network (Guo et al., 2017).

A network with logits :math:`z \in \mathbb{R}^K` predicts :math:`\mathrm{softmax}(z)`.
Temperature scaling predicts :math:`\mathrm{softmax}(z / T)` instead, with the single
:math:`T > 0` that minimises the mean negative log-likelihood on **held-out** labelled data
(e.g. :func:`bnn_course.comparison.validation_split`; never the test set):

.. math::

    \hat T = \arg\min_{T > 0} \; \frac1N \sum_{n=1}^N
        \Bigl[\log \sum_k e^{z_{nk} / T} - z_{n y_n} / T\Bigr].

:math:`T > 1` softens over-confident predictions, :math:`T < 1` sharpens under-confident
ones; the arg-max, hence the accuracy, never changes.

**Log-probabilities work as logits.** The networks of :mod:`bnn_course.models` return
:math:`\log p = z - \log\sum_k e^{z_k}`, the logits shifted by a constant per input, and
:math:`\mathrm{log\_softmax}(\log p / T) = \mathrm{log\_softmax}(z / T)` because a constant
per row divided by :math:`T` is still a constant per row. So every function here takes
either.

**The optimisation is exact, in** :math:`\beta = 1/T`. As a function of :math:`\beta`,

.. math::

    L(\beta) = \frac1N \sum_n \Bigl[\log \sum_k e^{\beta z_{nk}} - \beta z_{n y_n}\Bigr],
    \qquad
    L'(\beta) = \frac1N \sum_n \bigl(\mathbb{E}_{p_{n\beta}}[z_n] - z_{n y_n}\bigr),
    \qquad
    L''(\beta) = \frac1N \sum_n \mathrm{Var}_{p_{n\beta}}[z_n] \ge 0,

with :math:`p_{n\beta} = \mathrm{softmax}(\beta z_n)`: :math:`L` is convex and
:math:`L'` increases monotonically from
:math:`L'(0) = \frac1N\sum_n (\bar z_n - z_{n y_n})` (:math:`\bar z_n` the mean over classes)
to :math:`L'(\infty) = \frac1N\sum_n (\max_k z_{nk} - z_{n y_n}) \ge 0`. A minimiser
:math:`\beta^\star \in (0, \infty)` exists exactly when :math:`L'(0) < 0` (the labels score
above the class average) and :math:`L'(\infty) > 0` (at least one label is not an arg-max;
otherwise the NLL falls to 0 as :math:`T \to 0`). :func:`fit_temperature` checks both,
brackets the root of :math:`L'` by doubling, and finds it by Newton steps safeguarded by
bisection, in float64, to machine precision.

:class:`TemperatureScaled` wraps a network so that ``model(x, sample=...)`` returns the
scaled log-probabilities: :func:`bnn_course.evaluation.predict_log_probs` and
:func:`bnn_course.comparison.sample_probs_for` (method ``"deterministic"``) use it like the
network itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_MAX_DOUBLINGS = 1100
"""Doublings of the bracket's upper end :math:`\\beta`; ``2.0 ** 1100`` overflows float64,
so a root that is not bracketed by then does not exist in float64."""

_MAX_NEWTON_STEPS = 200
"""Safeguarded Newton steps; each halves the bracket at worst, so 200 reach float64's
resolution from any bracket that the doubling can produce."""


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive real number, got {temperature!r}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    return value


def _check_scores_and_labels(scores: torch.Tensor, labels: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float64 scores shifted to row maximum 0, and ``(N,)`` int64 labels, on
    the CPU; a ``ValueError`` for anything else."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(f"expected tensors, got {type(scores).__name__} and "
                         f"{type(labels).__name__}")
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] < 2:
        raise ValueError("log_probs_or_logits must have shape (N >= 1, K >= 2), got "
                         f"{tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"log_probs_or_logits must be floating point, got {scores.dtype}")
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"labels must have shape (N,) = ({scores.shape[0]},), got "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    z = scores.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.int64)
    if not torch.isfinite(z).all():
        raise ValueError("log_probs_or_logits must be finite (a log-probability of -inf "
                         "comes from log(0); pass logits or log_softmax outputs instead)")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}, got values from "
                         f"{y.min().item()} to {y.max().item()}")
    return z - z.max(dim=1, keepdim=True).values, y


def _nll_derivatives(z: torch.Tensor, z_label: torch.Tensor, beta: float
                     ) -> tuple[float, float]:
    r""":math:`L'(\beta)` and :math:`L''(\beta)` (module docstring) for scores ``z``
    ``(N, K)`` (row maximum 0) and the labels' scores ``z_label`` ``(N,)``."""
    p = torch.softmax(beta * z, dim=1)
    mean = (p * z).sum(dim=1)
    variance = (p * (z - mean[:, None]).square()).sum(dim=1)
    return (mean - z_label).mean().item(), variance.mean().item()


def fit_temperature(log_probs_or_logits: torch.Tensor, labels: torch.Tensor) -> float:
    r"""The temperature :math:`\hat T > 0` that minimises the mean NLL of
    :math:`\mathrm{softmax}(z / T)` on ``(log_probs_or_logits, labels)``.

    Solves :math:`L'(\beta) = 0` for :math:`\beta = 1 / T` in float64 (module docstring):
    bracket by doubling, then Newton steps safeguarded by bisection, until a step or the
    bracket is as small as float64's rounding.

    Parameters
    ----------
    log_probs_or_logits:
        ``(N, K)``, finite, floating point, any device: logits, or log-probabilities
        (e.g. the first output of :func:`bnn_course.evaluation.predict_log_probs`).
    labels:
        ``(N,)`` integer classes in ``0..K-1``.

    Returns
    -------
    :math:`\hat T` as a Python float.

    Raises
    ------
    ValueError
        For bad shapes or dtypes, labels out of range, non-finite scores, and when no
        finite positive minimiser exists: every label is an arg-max of its row (the NLL
        keeps falling as :math:`T \to 0`), or the labels score no higher than the class
        average, :math:`L'(0) \ge 0` (the minimum is at :math:`T = \infty` or :math:`T < 0`).
    """
    z, y = _check_scores_and_labels(log_probs_or_logits, labels)
    z_label = z.gather(1, y[:, None]).squeeze(1)
    slope_at_zero = (z.mean(dim=1) - z_label).mean().item()
    if not slope_at_zero < 0:
        raise ValueError("the labels score no higher than the class average (dNLL/dbeta at "
                         f"beta = 1/T = 0 is {slope_at_zero:.3g} >= 0): no finite positive "
                         "temperature minimises the NLL")
    if not (z_label < 0).any():  # z has row maximum 0: every label is an arg-max
        raise ValueError("every label is an arg-max of its scores: the NLL decreases towards "
                         "0 as T -> 0, so there is no minimising temperature")
    low, high = 0.0, 1.0
    for _ in range(_MAX_DOUBLINGS):
        slope, _ = _nll_derivatives(z, z_label, high)
        if slope >= 0:
            break
        low, high = high, 2 * high
    else:  # pragma: no cover - excluded above up to float64 rounding
        raise ValueError("could not bracket the minimising beta = 1/T below 2**1100")
    beta = (low + high) / 2
    for _ in range(_MAX_NEWTON_STEPS):
        slope, curvature = _nll_derivatives(z, z_label, beta)
        if slope == 0:
            break
        if slope > 0:
            high = beta
        else:
            low = beta
        newton = beta - slope / curvature if curvature > 0 else math.nan
        if abs(newton - beta) <= 4 * math.ulp(beta):  # converged: the step is rounding
            break
        beta = newton if low < newton < high else (low + high) / 2
        if high - low <= 4 * math.ulp(high):
            break
    return 1.0 / beta


def temperature_scale(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Log-probabilities at temperature :math:`T`:
    :math:`\mathrm{log\_softmax}(\log p / T)` over the last dimension.

    ``log_probs`` ``(..., K)`` (or logits; the result is the same) -> the same shape and
    dtype. ``temperature`` must be a positive, finite number; :math:`T = 1` gives
    ``log_softmax(log_probs)``, i.e. ``log_probs`` itself up to rounding.
    """
    value = _check_temperature(temperature)
    if not isinstance(log_probs, torch.Tensor) or not log_probs.is_floating_point():
        raise ValueError("log_probs must be a floating-point tensor")
    if log_probs.dim() == 0 or log_probs.shape[-1] == 0:
        raise ValueError(f"log_probs must have shape (..., K >= 1), got "
                         f"{tuple(log_probs.shape)}")
    return torch.log_softmax(log_probs / value, dim=-1)


class TemperatureScaled(nn.Module):
    """A network whose log-probabilities are rescaled by a fixed temperature.

    ``forward(x, sample=True)`` returns :func:`temperature_scale` of
    ``model(x, sample=sample)``, ``(B, K)``, so the wrapper is used like the network itself
    (for :func:`bnn_course.evaluation.predict_log_probs` and the ``"deterministic"`` method of
    :func:`bnn_course.comparison.sample_probs_for`).

    Parameters
    ----------
    model:
        Returns log-probabilities (or logits) ``(B, K)`` and takes ``sample=...``, like the
        networks of :mod:`bnn_course.models`.
    temperature:
        :math:`T > 0`, typically :func:`fit_temperature` on held-out data.
    """

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.temperature = _check_temperature(temperature)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Log-probabilities ``(B, K)`` at :attr:`temperature`."""
        return temperature_scale(self.model(x, sample=sample), self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.6g}"
