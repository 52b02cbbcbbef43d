r"""Chapter 9's contenders for "the posterior", and one scorecard for all of them.

Six ways to get class probabilities and an uncertainty from the book's CNN architecture:

======================  ==========================================================  ===========
contender               what it is                                                  ``kind``
======================  ==========================================================  ===========
the book's recipe       chapter 6's BayesianCNN: Bayes by Backprop, Adam, sigma     sampled
                        from :math:`e^{-5}` (Blundell et al. 2015)
sigma-aware BBB         the same objective with a recipe for sigma (its own Adam    sampled
                        group, its initialisation, the prior's scale)
IVON                    natural-gradient variational learning of the twin's         sampled
                        weights (Shen et al. 2024; :mod:`bnn_course.ivon`)
twin                    the deterministic twin, one network                         deterministic
temperature-scaled      the twin's logits divided by a temperature fitted on        deterministic
twin                    held-out training images (Guo et al. 2017)
Laplace twin            a Gaussian over the twin's last layer, after training       laplace
                        (Daxberger et al. 2021; :mod:`bnn_course.laplace`)
======================  ==========================================================  ===========

:func:`contender_sample_probs` reduces each to the ``(S, N, K)`` tensor of
:mod:`bnn_course.comparison`; :func:`scorecard` computes one row of metrics per contender
from the same images (clean test set, OOD sets, the same corrupted copies) and the same
number of samples :math:`S` for every stochastic one. :func:`negative_elbo_estimate` puts a
number on the objective the variational contenders share; :func:`target_checks` compares the
recommended learner with the twins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.comparison import (
    iterate_corrupted,
    ood_aurocs,
    paired_difference,
    sample_probs_for,
    summary_metrics,
)
from bnn_course.data import normalize
from bnn_course.evaluation import prediction_batch_size

KINDS = ("sampled", "deterministic", "laplace")
"""How a contender predicts: weight samples of a BayesianCNN, one pass of a network, or
last-layer samples of a fitted Laplace approximation."""


@dataclass
class Contender:
    """One row of chapter 9's table."""

    name: str
    kind: str
    """One of :data:`KINDS`."""
    model: Any
    """A BayesianCNN (``sampled``), a network (``deterministic``), or a fitted laplace-torch
    object (``laplace``)."""
    training_seconds: float = math.nan
    """Seconds of training (for a post-hoc method: of the twin it starts from, plus its
    own fit)."""
    convergence: Any = None
    """A :class:`bnn_course.convergence.ConvergenceReport`, for variational contenders."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


@torch.no_grad()
def contender_sample_probs(contender: Contender, images: torch.Tensor, num_samples: int,
                           batch_size: int | None = None,
                           autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities ``(S, N, K)`` of ``contender`` on ``uint8`` ``images``: ``S`` =
    ``num_samples`` for ``sampled`` and ``laplace`` contenders, 1 for ``deterministic``."""
    if contender.kind == "laplace":
        from bnn_course.laplace import laplace_sample_probs

        return laplace_sample_probs(contender.model, images, num_samples,
                                    batch_size=batch_size)
    method = "bayesian" if contender.kind == "sampled" else "deterministic"
    device = next(contender.model.parameters()).device
    return sample_probs_for(method, contender.model, images.to(device), num_samples,
                            batch_size, autocast_dtype)


@torch.no_grad()
def negative_elbo_estimate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           num_train: int, num_samples: int = 1,
                           batch_size: int | None = None) -> dict[str, float]:
    r"""The per-example negative ELBO of a BayesianCNN on training images, and its parts.

    .. math::

        -\frac{\mathrm{ELBO}}{N} = \underbrace{\frac1M \sum_{m=1}^{M}
        \mathbb{E}_{q}\big[-\log p(y_m \mid x_m, w)\big]}_{\texttt{nll}}
        + \underbrace{\frac{\mathrm{KL}(q \,\|\, p)}{N}}_{\texttt{kl\_per\_example}},

    the expectation estimated with ``num_samples`` Flipout passes over the ``M`` given
    images (every image its own weight sample), the KL in closed form. Used on the same
    (training) images for every variational contender, it compares how well each optimised
    the *same* objective, provided their priors are the same. ``images`` ``uint8``
    ``(M, 3, H, W)``, ``labels`` ``(M,)``; ``num_train`` is :math:`N`.
    """
    if num_samples < 1 or num_train < 1:
        raise ValueError(f"need num_samples >= 1 and num_train >= 1, got {num_samples} and "
                         f"{num_train}")
    if not any(True for _ in model.bayesian_layers()):
        raise ValueError("the negative ELBO needs a network with Bayesian layers")
    device = next(model.parameters()).device
    batch_size = batch_size or prediction_batch_size(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start:start + batch_size].to(device))
            y = labels[start:start + batch_size].to(device)
            for _ in range(num_samples):
                log_probs = model(x, sample=True)
                total += F.nll_loss(log_probs.float(), y, reduction="sum").double()
    finally:
        model.train(was_training)
    nll = total.item() / (images.shape[0] * num_samples)
    kl = model.kl_divergence().double().item() / num_train
    return {"nll": nll, "kl_per_example": kl, "negative_elbo": nll + kl}


@dataclass
class Scores:
    """What :func:`scorecard` returns."""

    rows: list[dict[str, Any]]
    """One dict per contender (keys: the module docstring of :func:`scorecard`)."""
    per_image: dict[str, dict[str, torch.Tensor]]
    """``per_image[name]`` holds float64 ``(N,)`` tensors ``correct``, ``nll``, ``brier``
    and the predictive ``probs`` ``(N, K)`` on the clean test set, for paired standard
    errors."""


def _per_image(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    p = probs.mean(0).double().cpu()
    y = labels.cpu()
    picked = p.gather(1, y[:, None]).squeeze(1)
    one_hot = F.one_hot(y, p.shape[1]).double()
    return {"correct": (p.argmax(1) == y).double(),
            "nll": -picked.clamp_min(torch.finfo(torch.float64).tiny).log(),
            "brier": (p - one_hot).square().sum(1), "probs": p}


def scorecard(contenders: Sequence[Contender], test_images: torch.Tensor,
              test_labels: torch.Tensor, *, num_samples: int,
              ood_sets: Mapping[str, torch.Tensor] | None = None,
              corruption_images: torch.Tensor | None = None,
              corruption_labels: torch.Tensor | None = None,
              corruptions: Sequence[str] = (), severities: Sequence[int] = (),
              seed: int = 0, batch_size: int | None = None,
              autocast_dtype: torch.dtype | None = None) -> Scores:
    """One row of metrics per contender, all from the same images and the same ``S``.

    Keys of each row: ``name``, ``kind``, ``num_samples``; the clean test set's metrics of
    :func:`bnn_course.comparison.summary_metrics` (``accuracy``, ``nll``, ``brier``, ``ece``,
    ``ece_floor``, ``ece_floor_95``, ...); ``auroc/<set>/<score>`` for every OOD set and
    ``auroc_entropy`` / ``auroc_mutual_information``, their means over the sets (NaN for a
    single network's mutual information); ``corrupted_nll`` and ``corrupted_accuracy``, the
    means over every ``(corruption, severity)`` copy of ``corruption_images`` (made once,
    :func:`bnn_course.comparison.iterate_corrupted`, and shown to every contender);
    ``training_seconds``.
    """
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    rows = {c.name: {"name": c.name, "kind": c.kind,
                     "num_samples": num_samples if c.kind != "deterministic" else 1,
                     "training_seconds": c.training_seconds} for c in contenders}
    per_image = {}
    for contender in contenders:
        probs = contender_sample_probs(contender, test_images, num_samples, batch_size,
                                       autocast_dtype)
        rows[contender.name].update(summary_metrics(probs, test_labels.to(probs.device)))
        per_image[contender.name] = _per_image(probs, test_labels.to(probs.device))
        if ood_sets:
            ood = {name: contender_sample_probs(contender, images, num_samples, batch_size,
                                                autocast_dtype)
                   for name, images in ood_sets.items()}
            aurocs = ood_aurocs(probs, ood)
            rows[contender.name].update(aurocs)
            for score in ("entropy", "mutual_information"):
                values = [aurocs[f"auroc/{name}/{score}"] for name in ood_sets]
                rows[contender.name][f"auroc_{score}"] = sum(values) / len(values)
    if corruptions and corruption_images is not None and corruption_labels is not None:
        sums = {name: {"nll": 0.0, "accuracy": 0.0} for name in names}
        count = 0
        for _, _, corrupted in iterate_corrupted(corruption_images, corruptions, severities,
                                                 seed):
            count += 1
            for contender in contenders:
                probs = contender_sample_probs(contender, corrupted, num_samples, batch_size,
                                               autocast_dtype)
                labels = corruption_labels.to(probs.device)
                p = probs.mean(0)
                picked = p.gather(1, labels[:, None]).squeeze(1).double()
                sums[contender.name]["nll"] += -picked.clamp_min(1e-300).log().mean().item()
                sums[contender.name]["accuracy"] += (p.argmax(1) == labels).double().mean(
                    ).item()
        for name in names:
            rows[name]["corrupted_nll"] = sums[name]["nll"] / count
            rows[name]["corrupted_accuracy"] = sums[name]["accuracy"] / count
    return Scores([rows[name] for name in names], per_image)


def paired_comparison(scores: Scores, first: str, second: str,
                      metric: str) -> tuple[float, float]:
    """``(mean, standard error)`` of the per-image difference ``first - second`` of
    ``metric`` (``"correct"``, ``"nll"`` or ``"brier"``) on the clean test set
    (:func:`bnn_course.comparison.paired_difference`)."""
    return paired_difference(scores.per_image[first][metric],
                             scores.per_image[second][metric])


@dataclass(frozen=True)
class TargetCheck:
    """One of chapter 9's targets for the recommended learner."""

    target: str
    value: float
    """The measured quantity the target is about (e.g. an accuracy difference)."""
    threshold: float
    holds: bool
    detail: str


def target_checks(rows: Sequence[Mapping[str, Any]], recommended: str, twin: str,
                  temperature_twin: str, converged: bool) -> list[TargetCheck]:
    """The issue's targets for the recommended variational learner, each with its numbers:

    * accuracy >= the twin's;
    * NLL at least 0.03 below the twin's, and no higher than the temperature-scaled twin's;
    * ECE <= the twin's;
    * mean OOD AUROC (by predictive entropy) >= the twin's + 0.02;
    * "converged" by :func:`bnn_course.convergence.convergence_report`.

    Point estimates on one test set: the chapter adds paired standard errors.
    """
    by_name = {row["name"]: row for row in rows}
    for name in (recommended, twin, temperature_twin):
        if name not in by_name:
            raise ValueError(f"no row named {name!r}; rows: {sorted(by_name)}")
    r, t, c = by_name[recommended], by_name[twin], by_name[temperature_twin]
    checks = [
        TargetCheck("accuracy >= twin's", r["accuracy"] - t["accuracy"], 0.0,
                    r["accuracy"] >= t["accuracy"],
                    f"{r['accuracy']:.4f} vs {t['accuracy']:.4f}"),
        TargetCheck("NLL <= twin's - 0.03", r["nll"] - t["nll"], -0.03,
                    r["nll"] <= t["nll"] - 0.03, f"{r['nll']:.4f} vs {t['nll']:.4f}"),
        TargetCheck("NLL <= temperature-scaled twin's", r["nll"] - c["nll"], 0.0,
                    r["nll"] <= c["nll"], f"{r['nll']:.4f} vs {c['nll']:.4f}"),
        TargetCheck("ECE <= twin's", r["ece"] - t["ece"], 0.0, r["ece"] <= t["ece"],
                    f"{r['ece']:.4f} vs {t['ece']:.4f} (noise floor about "
                    f"{max(r['ece_floor'], t['ece_floor']):.4f})"),
    ]
    if "auroc_entropy" in r:
        checks.append(TargetCheck(
            "OOD AUROC (entropy) >= twin's + 0.02", r["auroc_entropy"] - t["auroc_entropy"],
            0.02, r["auroc_entropy"] >= t["auroc_entropy"] + 0.02,
            f"{r['auroc_entropy']:.4f} vs {t['auroc_entropy']:.4f}"))
    checks.append(TargetCheck("converged", float(converged), 1.0, bool(converged),
                              "convergence_report's verdict"))
    return checks


def paired_ece_difference(scores: Scores, first: str, second: str, labels: torch.Tensor,
                          num_resamples: int = 200, seed: int = 0) -> tuple[float, float]:
    """``(ECE of first - ECE of second, bootstrap standard error)`` on the clean test set:
    both ECEs on the same resamples of the test images
    (:func:`bnn_course.comparison.resample_weights`,
    :func:`bnn_course.comparison.weighted_ece`), so the error bar is paired."""
    from bnn_course.comparison import resample_weights, weighted_ece

    size = labels.shape[0]
    ones = torch.ones(1, size, dtype=torch.float64)
    point = (weighted_ece(scores.per_image[first]["probs"], labels, ones)
             - weighted_ece(scores.per_image[second]["probs"], labels, ones)).item()
    weights = resample_weights(size, num_resamples, torch.Generator().manual_seed(seed))
    differences = (weighted_ece(scores.per_image[first]["probs"], labels, weights)
                   - weighted_ece(scores.per_image[second]["probs"], labels, weights))
    return point, differences.std().item()
