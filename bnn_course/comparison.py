r"""Is the uncertainty useful? The BayesianCNN against the simpler alternatives.

Four ways to get class probabilities *and* an uncertainty from the same architecture,
trained by the same engine (:func:`bnn_course.train.train`) with the same budget:

==============  =============================================  ===================
method          the :math:`S` probability vectors per input    :math:`S`
==============  =============================================  ===================
bayesian        weight samples :math:`w_s \sim q` (Flipout)     ``num_samples``
deterministic   the point-estimate twin, one pass               1
mc_dropout      dropout masks at test time (Gal & Ghahramani)  ``num_samples``
ensemble        one pass of each of :math:`M` twins, trained    :math:`M`
                from different seeds (Lakshminarayanan et al.)
==============  =============================================  ===================

A fifth row, ``posterior_mean`` (:data:`POSTERIOR_MEAN`), is the BayesianCNN evaluated at
its posterior means (one pass), to separate what the Bayesian average does from what the
network is (:func:`compared_models` adds it).

Every method is reduced to the same object, a tensor ``sample_probs`` of shape ``(S, N, K)``
(:func:`sample_probs_for`), and every metric is computed from it in the same way, following
Ovadia et al. (2019) and the uncertainty-baselines tables:

* the prediction is the average of the probabilities,
  :math:`\bar p_{nk} = \frac1S \sum_s p_{snk}` (for the ensemble: the uniform mixture of its
  members);
* accuracy, NLL :math:`-\frac1N\sum_n \log \bar p_{n y_n}`, Brier score and ECE (15 bins)
  of :math:`\bar p` on the clean test set (:mod:`bnn_course.metrics`), the ECE with its
  noise floor (the ECE a calibrated predictor with the same confidences would show on as
  many images), and how well the predictive entropy ranks the errors (AURC, excess AURC,
  misclassification AUROC);
* OOD detection: AUROC of each score of :func:`bnn_course.metrics.ood_scores` (predictive
  entropy, mutual information, :math:`1 - \max_k \bar p_k`), test set against each OOD set,
  OOD = positive. For a single network (:math:`S = 1`) the mutual information is 0 for every
  input; its AUROC is reported as NaN ("no such score"), not as 0.5;
* dataset shift: accuracy and ECE on the test set corrupted by each CIFAR-10-C-style
  corruption of :mod:`bnn_course.corruptions` (re-implemented with the parameters of
  ``make_cifar_c.py``, so not directly comparable with the released CIFAR-10-C) at each
  severity. Each ``(name, severity)`` is applied **once**, with a generator seeded from
  ``(seed, name, severity)``, and the same corrupted images are shown to every method.

:func:`evaluate_methods` does all of it and returns one flat ``dict`` per method
(:func:`comparison_rows` documents the keys); :func:`format_table` prints them.
:func:`choose_dropout` chooses MC dropout's rates on held-out training images
(:func:`validation_split`); :func:`paired_difference` (over test images),
:func:`seed_difference` (over training seeds), the bootstrap helpers
(:func:`resample_weights`, by item or by group, :func:`weighted_ece`,
:func:`weighted_auroc`) and :func:`verdict` turn differences between methods into words
with paired standard errors and, for the ECE, its noise floor;
:func:`cost_rows` says what each method costs to train and to predict.

Command line (trains every method with a given budget, writes ``OUT/comparison.json`` and
prints the table)::

    python -m bnn_course.comparison --data DIR --epochs 4 --train-subset 5000 --out runs/cmp
    python -m bnn_course.comparison --smoke --out /tmp/cmp   # tiny, to check that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from bnn_course import config as run_config
from bnn_course.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from bnn_course.data import CIFAR10Data, load_cifar10, stratified_subset, validation_split
from bnn_course.evaluation import predict_log_probs
from bnn_course.metrics import (
    OOD_SCORES,
    accuracy,
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    misclassification_auroc,
    negative_log_likelihood,
    ood_detection,
    ood_scores,
    oracle_aurc,
    selective_prediction,
)
from bnn_course.provenance import device_description
from bnn_course.run_folder import atomic_write_text, autocast_dtype, check_output_folder
from bnn_course.run_folder import config_differences as _differences
from bnn_course.run_folder import provenance as run_provenance
from bnn_course.train import (
    CHECKPOINT_NAME,
    RESUME_FREE_FIELDS,
    CommandLineParser,
    TrainConfig,
    add_config_arguments,
    config_from_arguments,
    data_differences,
    load_checkpoint,
    load_trained_model,
    run_command_line,
    run_data_identity,
    select_device,
    train,
)
from bnn_course.uncertainty import decompose_uncertainty

METHODS: tuple[str, ...] = ("bayesian", "deterministic", "mc_dropout", "ensemble")
"""The methods compared, in the order of the table's columns (the networks trained)."""

POSTERIOR_MEAN = "posterior_mean"
"""The BayesianCNN evaluated at its posterior means (one pass, ``sample=False``): the same
network as ``"bayesian"`` without the Bayesian average, so that the difference between the
two is what averaging over weight samples does."""

COMPARED: tuple[str, ...] = ("bayesian", POSTERIOR_MEAN, "deterministic", "mc_dropout",
                             "ensemble")
"""The rows of chapter 8's comparison: :data:`METHODS` and :data:`POSTERIOR_MEAN` (no
network of its own: it evaluates the ``"bayesian"`` one)."""

NUM_BINS = 15
"""Bins of the expected calibration error (the common choice, Guo et al. 2017)."""

HIGHER_IS_BETTER = ("accuracy", "auroc", "misclassification_auroc")
"""Metric names (last part of a row key) for which a larger value is better."""

LOWER_IS_BETTER = ("nll", "ece", "brier", "aurc", "excess_aurc")
"""Metric names for which a smaller value is better (``ece_floor`` and ``ece_floor_95``
are neither: they describe the test set's noise, not the method)."""

ECE_FLOOR_SIMULATIONS = 1000
"""Simulated label sets behind ``ece_floor_95`` in :func:`summary_metrics` (seeded with 0:
the same probabilities give the same quantile)."""

IGNORED_FOR_REUSE: tuple[str, ...] = (*RESUME_FREE_FIELDS, "epoch_eval_samples",
                                      "eval_samples")
""":class:`TrainConfig` fields that do not change what is learned; a saved network whose
configuration differs from the wanted one only in these is reused."""


def _as_list(models: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models]
    members = list(models)
    if not members or not all(isinstance(m, nn.Module) for m in members):
        raise ValueError("models must be a network or a non-empty sequence of networks")
    return members


# --------------------------------------------------------------------------------------
# Probabilities (S, N, K) for every method
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_probs_for(
    method: str,
    models: nn.Module | Sequence[nn.Module],
    images: torch.Tensor,
    num_samples: int,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Class probabilities ``(S, N, K)`` of ``method`` for ``uint8`` ``images (N, 3, H, W)``.

    * ``"bayesian"``: one BayesianCNN, :math:`S` = ``num_samples`` passes with fresh weight
      samples (``model(x, sample=True)``);
    * ``"deterministic"``: one network, one pass with ``sample=False``; :math:`S = 1`;
    * ``"posterior_mean"`` (:data:`POSTERIOR_MEAN`): one BayesianCNN, one pass with
      ``sample=False``, every weight at its posterior mean; :math:`S = 1`;
    * ``"mc_dropout"``: one DeterministicCNN with dropout > 0, :math:`S` = ``num_samples``
      passes with fresh dropout masks;
    * ``"ensemble"``: a sequence of :math:`M` networks, one ``sample=False`` pass each;
      :math:`S = M` and ``num_samples`` is ignored.

    The passes are those of :func:`bnn_course.evaluation.predict_log_probs`.
    ``images`` must be on the networks' device.

    Returns
    -------
    float32 ``(S, N, K)`` on ``images``' device, ``probs[s, n]`` = :math:`p(y \mid x_n, s)`,
    each row summing to one: the input of :mod:`bnn_course.uncertainty`.
    """
    members = _as_list(models)
    if method == "ensemble":
        return torch.stack([predict_log_probs(member, images, 0, batch_size,
                                              autocast_dtype)[0].exp() for member in members])
    if method not in COMPARED:
        raise ValueError(f"unknown method {method!r}; choose from {COMPARED}")
    if len(members) != 1:
        raise ValueError(f"method {method!r} takes one network, got {len(members)}")
    model = members[0]
    if method == POSTERIOR_MEAN and not any(True for _ in model.bayesian_layers()):
        raise ValueError(f"method {POSTERIOR_MEAN!r} needs a network with Bayesian layers")
    if method in ("deterministic", POSTERIOR_MEAN):
        return predict_log_probs(model, images, 0, batch_size, autocast_dtype)[0].exp()[None]
    if num_samples < 1:
        raise ValueError(f"method {method!r} needs num_samples >= 1, got {num_samples}")
    if method == "mc_dropout" and not (getattr(model, "dropout", 0.0) > 0
                                       or getattr(model, "conv_dropout", 0.0) > 0):
        raise ValueError("mc_dropout needs a network with dropout or conv_dropout > 0; "
                         "without dropout every pass gives the same probabilities")
    if method == "bayesian" and not any(True for _ in model.bayesian_layers()):
        raise ValueError("method 'bayesian' needs a network with Bayesian layers")
    return predict_log_probs(model, images, num_samples, batch_size, autocast_dtype,
                             include_mean=False)[1].exp()


def compared_models(models: Mapping[str, Sequence[nn.Module]]) -> dict[str, Sequence[nn.Module]]:
    """``models`` (e.g. :attr:`TrainedMethods.models`, every method of :data:`METHODS`) with
    :data:`POSTERIOR_MEAN` added, which evaluates the ``"bayesian"`` network, in the order of
    :data:`COMPARED`: the input of :func:`predict_methods` and :func:`evaluate_corruptions`
    for the comparison's five rows."""
    missing = [method for method in METHODS if method not in models]
    if missing:
        raise ValueError(f"models lacks {missing}; it needs every method of {METHODS}")
    return {name: models["bayesian" if name == POSTERIOR_MEAN else name] for name in COMPARED}


def predict_methods(
    models_by_method: Mapping[str, Sequence[nn.Module]],
    image_sets: Mapping[str, torch.Tensor],
    num_samples: int,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``probs[method][set]``: :func:`sample_probs_for` of every method on every image set.

    ``image_sets`` maps a name (e.g. ``"test"``, ``"svhn"``) to ``uint8 (N, 3, 32, 32)``
    images; they are moved to each method's device here.
    """
    probs: dict[str, dict[str, torch.Tensor]] = {}
    for method, models in models_by_method.items():
        device = _model_device(models)
        probs[method] = {name: sample_probs_for(method, models, images.to(device), num_samples,
                                                batch_size, autocast_dtype)
                         for name, images in image_sets.items()}
    return probs


def _model_device(models: nn.Module | Sequence[nn.Module]) -> torch.device:
    return next(_as_list(models)[0].parameters()).device


# --------------------------------------------------------------------------------------
# Metrics of one method
# --------------------------------------------------------------------------------------


def summary_metrics(sample_probs: torch.Tensor, labels: torch.Tensor,
                    num_bins: int = NUM_BINS) -> dict[str, float]:
    r"""The metrics of the predictive :math:`\bar p` of ``(S, N, K)`` on ``N`` labelled inputs.

    Keys:

    * ``"accuracy"``, ``"nll"``, ``"ece"`` (``num_bins`` bins), ``"brier"``;
    * ``"ece_floor"``: the ECE a perfectly calibrated predictor with the same confidences
      would show on these ``N`` inputs, in expectation
      (:func:`~bnn_course.metrics.calibrated_ece_expectation`, exact), and
      ``"ece_floor_95"``: its 95% quantile (:func:`~bnn_course.metrics.ece_noise_floor`,
      :data:`ECE_FLOOR_SIMULATIONS` simulations, seeded). An ECE below ``ece_floor_95`` is
      consistent with perfect calibration, and ECE differences smaller than the floor say
      nothing (:func:`verdict`'s ``noise_floor``);
    * selective prediction, rejecting by the predictive entropy :math:`\mathbb{H}[\bar p]`:
      ``"aurc"`` (:func:`~bnn_course.metrics.selective_prediction`), ``"excess_aurc"``
      (minus :func:`~bnn_course.metrics.oracle_aurc`, Geifman et al. 2019) and
      ``"misclassification_auroc"`` (:func:`~bnn_course.metrics.misclassification_auroc`:
      how well the entropy separates wrong from right predictions; NaN when all are right
      or all wrong);
    * ``"entropy"``, ``"mutual_information"``: their means over the ``N`` inputs (nats).
    """
    parts = decompose_uncertainty(sample_probs)
    p = parts.predictive
    fraction_right = accuracy(p, labels)  # checks the labels
    floor = ece_noise_floor(p.max(-1).values, num_bins, ECE_FLOOR_SIMULATIONS, 0.95,
                            torch.Generator().manual_seed(0))
    entropy = parts.total
    aurc = selective_prediction(p, labels, entropy).aurc
    return {
        "accuracy": fraction_right,
        "nll": negative_log_likelihood(p, labels),
        "ece": expected_calibration_error(p, labels, num_bins).ece,
        "ece_floor": floor.expected,
        "ece_floor_95": floor.upper,
        "brier": brier_score(p, labels),
        "aurc": aurc,
        "excess_aurc": aurc - oracle_aurc(p, labels),
        "misclassification_auroc": (misclassification_auroc(p, labels, entropy)
                                    if 0 < fraction_right < 1 else math.nan),
        "entropy": entropy.double().mean().item(),
        "mutual_information": parts.epistemic.double().mean().item(),
    }


def ood_aurocs(test_probs: torch.Tensor,
               ood_probs: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{"auroc/<set>/<score>": AUROC}`` of each OOD score, test set (negatives) against
    each OOD set (positives). ``test_probs`` ``(S, N, K)``, ``ood_probs[set]`` ``(S, M, K)``.

    The mutual information of a single network (``S = 1``) is 0 everywhere: NaN.
    """
    single = test_probs.shape[0] == 1
    score_in = ood_scores(test_probs)
    result = {}
    for name, probs in ood_probs.items():
        score_out = ood_scores(probs)
        for score in OOD_SCORES:
            key = f"auroc/{name}/{score}"
            if single and score == "mutual_information":
                result[key] = math.nan
            else:
                result[key] = ood_detection(score_in[score], score_out[score]).auroc
    return result


# --------------------------------------------------------------------------------------
# Dataset shift
# --------------------------------------------------------------------------------------


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """The seed of the generator that corrupts the test set with ``name`` at ``severity``.

    Depends only on its arguments (a CRC-32 of ``"name/severity"``), not on the order in
    which the corruptions are applied.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(f"{name}/{severity}".encode())) % 2**62


def iterate_corrupted(
    images: torch.Tensor,
    corruptions: Sequence[str],
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """Yield ``(name, severity, corrupted images)`` for every corruption and severity.

    Each is computed once, on ``images``' device, with a generator on that device seeded
    by :func:`corruption_seed`: the same arguments give the same images on the same device.
    ``images`` ``uint8 (N, 3, H, W)``; each yielded batch has the same shape.
    """
    for name in corruptions:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
        for severity in severities:
            generator = torch.Generator(device=images.device)
            generator.manual_seed(corruption_seed(seed, name, severity))
            yield name, severity, corrupt(images, name, severity, generator)


def evaluate_corruptions(
    models_by_method: Mapping[str, Sequence[nn.Module]],
    images: torch.Tensor,
    labels: torch.Tensor,
    corruptions: Sequence[str],
    severities: Sequence[int] = SEVERITIES,
    num_samples: int = 4,
    seed: int = 0,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_bins: int = NUM_BINS,
    keep_predictions: dict[str, dict[tuple[str, int], torch.Tensor]] | None = None,
) -> dict[str, dict[str, float]]:
    """Every method on every corrupted copy of the test set.

    The corrupted images of each ``(name, severity)`` are made once
    (:func:`iterate_corrupted`) and given to every method; ``images`` should be on the
    networks' device. If ``keep_predictions`` is a dict, it receives
    ``keep_predictions[method][(name, severity)]``: the averaged prediction
    :math:`\bar p` ``(N, K)``, float32 on the CPU (for paired standard errors).

    Returns
    -------
    ``{method: {"corruption/<name>/<severity>/<metric>": value}}`` with the metrics of
    :func:`summary_metrics` (accuracy, nll, ece, brier, entropy, mutual_information).
    """
    results: dict[str, dict[str, float]] = {method: {} for method in models_by_method}
    for name, severity, corrupted in iterate_corrupted(images, corruptions, severities, seed):
        for method, models in models_by_method.items():
            probs = sample_probs_for(method, models, corrupted.to(_model_device(models)),
                                     num_samples, batch_size, autocast_dtype)
            if keep_predictions is not None:
                kept = keep_predictions.setdefault(method, {})
                kept[(name, severity)] = probs.mean(0).float().cpu()
            for metric, value in summary_metrics(probs, labels, num_bins).items():
                results[method][f"corruption/{name}/{severity}/{metric}"] = value
    return results


def severity_means(shift: Mapping[str, float], metrics: Sequence[str] = ("accuracy", "ece"),
                   ) -> dict[str, float]:
    """``{"severity/<s>/<metric>": mean over corruptions}`` from one method's
    :func:`evaluate_corruptions` entries, ordered by metric, then severity."""
    sums: dict[str, list[float]] = {}
    for key, value in shift.items():
        _, _, severity, metric = key.split("/")
        if metric in metrics:
            sums.setdefault(f"severity/{severity}/{metric}", []).append(value)
    def order(key: str) -> tuple[int, int]:
        _, severity, metric = key.split("/")
        return list(metrics).index(metric), int(severity)

    return {key: sum(sums[key]) / len(sums[key]) for key in sorted(sums, key=order)}


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def comparison_rows(
    test_probs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    ood_probs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    shift: Mapping[str, Mapping[str, float]] | None = None,
    num_bins: int = NUM_BINS,
) -> list[dict[str, Any]]:
    """One flat row per method, from probabilities already computed.

    Parameters
    ----------
    test_probs:
        ``{method: (S, N, K)}`` on the clean test set.
    labels:
        ``(N,)`` test labels.
    ood_probs:
        ``{method: {set: (S, M, K)}}`` on the OOD sets (``None``: no AUROC keys).
    shift:
        ``{method: {...}}`` from :func:`evaluate_corruptions` (``None``: no shift keys).

    Returns
    -------
    A list of dicts with the keys ``method``, ``num_samples`` (S), the keys of
    :func:`summary_metrics` on the test set (``accuracy``, ``nll``, ``ece``, ``ece_floor``,
    ``ece_floor_95``, ``brier``, ``aurc``, ``excess_aurc``, ``misclassification_auroc``,
    ``entropy``, ``mutual_information``), ``auroc/<set>/<score>`` for every OOD set and
    score, every key of ``shift`` (``corruption/<name>/<severity>/<metric>``) and
    ``severity/<s>/accuracy``, ``severity/<s>/ece`` and ``severity/<s>/ece_floor``: the
    means over the corruptions at severity ``s`` (the mean of the floors is the floor of
    the mean ECE: expectations add).
    """
    rows = []
    for method, probs in test_probs.items():
        row: dict[str, Any] = {"method": method, "num_samples": int(probs.shape[0])}
        row.update(summary_metrics(probs, labels, num_bins))
        if ood_probs is not None:
            row.update(ood_aurocs(probs, ood_probs[method]))
        if shift is not None:
            row.update(shift[method])
            row.update(severity_means(shift[method], ("accuracy", "ece", "ece_floor")))
        rows.append(row)
    return rows


def evaluate_methods(
    models_by_method: Mapping[str, Sequence[nn.Module]],
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    ood_sets: Mapping[str, torch.Tensor] | None = None,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = SEVERITIES,
    num_samples: int = 20,
    corruption_samples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_bins: int = NUM_BINS,
) -> list[dict[str, Any]]:
    """The whole comparison: one row per method (keys: :func:`comparison_rows`).

    Parameters
    ----------
    models_by_method:
        ``{method: [networks]}``, methods among :data:`METHODS` (one network, except for
        ``"ensemble"``), e.g. ``train_methods(...).models``.
    test_images, test_labels:
        The clean test set, ``uint8 (N, 3, 32, 32)`` and ``(N,)``.
    ood_sets:
        ``{name: uint8 images}`` (e.g. from :func:`bnn_course.ood.load_ood_sets`, without
        the descriptions); ``None`` or empty: no OOD columns.
    corruptions, severities:
        Names in :data:`bnn_course.corruptions.CORRUPTIONS` and severities 1..5; each pair
        is applied once to the test set and shared by all methods.
    num_samples:
        Samples for ``"bayesian"`` and ``"mc_dropout"`` on the clean and OOD sets.
    corruption_samples:
        Samples on the corrupted sets (default ``num_samples``).
    seed:
        Seed of the corruptions' noise (:func:`corruption_seed`).
    """
    sets = {"test": test_images}
    ood_names = list(ood_sets or {})
    if "test" in ood_names:
        raise ValueError("an OOD set may not be called 'test'")
    sets.update(ood_sets or {})
    probs = predict_methods(models_by_method, sets, num_samples, batch_size, autocast_dtype)
    test_probs = {method: p["test"] for method, p in probs.items()}
    ood_probs = {method: {name: p[name] for name in ood_names} for method, p in probs.items()}
    shift = None
    if corruptions:
        device = _model_device(next(iter(models_by_method.values())))
        shift = evaluate_corruptions(
            models_by_method, test_images.to(device), test_labels, corruptions, severities,
            num_samples if corruption_samples is None else corruption_samples, seed,
            batch_size, autocast_dtype, num_bins)
    return comparison_rows(test_probs, test_labels, ood_probs if ood_names else None, shift,
                           num_bins)


def metric_direction(key: str) -> int:
    """+1 if a larger value of the row key ``key`` is better (accuracy, AUROC), -1 if a
    smaller one is (NLL, ECE, Brier), 0 if neither (entropy, mutual information, counts)."""
    last = key.split("/")[-1]
    first = key.split("/")[0]
    if first == "auroc" or last in HIGHER_IS_BETTER:
        return 1
    if last in LOWER_IS_BETTER:
        return -1
    return 0


def default_table_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys :func:`format_table` shows by default: the clean metrics (the ECE followed
    by its noise floor), the selective-prediction metrics, every OOD AUROC, and the mean
    accuracy, ECE and ECE floor over the corruptions at each severity."""
    keys = ["accuracy", "nll", "ece", "ece_floor", "ece_floor_95", "brier", "aurc",
            "excess_aurc", "misclassification_auroc"]
    seen = list(dict.fromkeys(k for row in rows for k in row))
    keys += [k for k in seen if k.startswith("auroc/")]
    keys += [k for k in seen if k.startswith("severity/")]
    return [k for k in keys if any(k in row for row in rows)]


def format_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None,
                 caption: str | None = None, digits: int = 4) -> str:
    """The rows as a plain-text table: one line per metric, one column per method.

    The best value of each line is marked with ``*`` (largest accuracy and AUROC, smallest
    NLL, ECE and Brier score; ties all marked). NaN is printed as ``n/a``. ``caption``, if
    given, is printed above the table (say there which data and OOD sets were used).
    """
    keys = list(keys) if keys is not None else default_table_keys(rows)
    methods = [str(row["method"]) for row in rows]
    width = max(12, *(len(m) + 2 for m in methods))
    name_width = max(len("metric"), *(len(k) for k in keys)) + 2
    lines = [] if caption is None else [caption]
    lines.append("metric".ljust(name_width) + "".join(m.rjust(width) for m in methods))
    lines.append("-" * (name_width + width * len(methods)))
    for key in keys:
        values = [row.get(key, math.nan) for row in rows]
        numbers = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        direction = metric_direction(key)
        best = None
        if direction and len(numbers) > 1:
            best = max(numbers) if direction > 0 else min(numbers)
        cells = []
        for value in values:
            if not isinstance(value, (int, float)) or math.isnan(value):
                cells.append("n/a".rjust(width))
                continue
            text = f"{value:.{digits}f}" + ("*" if best is not None and value == best else " ")
            cells.append(text.rjust(width))
        lines.append(key.ljust(name_width) + "".join(cells))
    return "\n".join(lines)


def describe_sets(data_name: str, num_test: int, ood_sets: Mapping[str, Any],
                  corruptions: Sequence[str], severities: Sequence[int],
                  corruption_test_size: int | None = None) -> str:
    """One line naming the test data, the OOD sets and the corruptions behind a result.

    ``corruption_test_size``: the corruptions were applied to a stratified subset of this
    many test images (``None``: to the whole test set)."""
    ood = ", ".join(f"{name} ({_length(value)})" for name, value in ood_sets.items()) or "none"
    shift = ", ".join(corruptions) or "none"
    levels = ",".join(str(s) for s in severities)
    line = (f"test set: {data_name}, {num_test} images | OOD sets: {ood} | "
            f"CIFAR-10-C-style corruptions: {shift} at severities {levels}")
    if corruptions and corruption_test_size is not None and corruption_test_size < num_test:
        line += f", on a stratified subset of {corruption_test_size} test images"
    return line


def _length(value: Any) -> int:
    images = value[0] if isinstance(value, tuple) else value
    return int(images.shape[0])


# --------------------------------------------------------------------------------------
# Training every method
# --------------------------------------------------------------------------------------


def method_configs(base_config: TrainConfig, methods: Sequence[str] = METHODS,
                   ensemble_size: int = 5) -> list[tuple[str, str, TrainConfig]]:
    """``(method, run name, config)`` of every network a comparison needs.

    All share ``base_config`` (architecture, epochs, batch size, learning rate, seed ...);
    only ``model`` differs, and the ensemble's members are deterministic twins with seeds
    ``base_config.seed + i``, ``i = 0..ensemble_size-1``. Member 0 therefore has exactly the
    configuration of ``"deterministic"`` (and :func:`train_methods` trains it only once).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if "ensemble" in methods and ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
    runs = []
    for method in methods:
        if method == "ensemble":
            runs += [(method, f"ensemble-{i}",
                      dataclasses.replace(base_config, model="deterministic",
                                          seed=base_config.seed + i))
                     for i in range(ensemble_size)]
        else:
            runs.append((method, method, dataclasses.replace(base_config, model=method)))
    return runs


BAYESIAN_ONLY_FIELDS: tuple[str, ...] = ("kl_weight", "kl_scaling", "kl_warmup_epochs",
                                         "init_log_sigma", "prior_sigma", "prior_scaling",
                                         "parametrization")
""":class:`TrainConfig` fields that only a ``"bayesian"`` model uses (:data:`DROPOUT_FIELDS`
are used only by ``"mc_dropout"``)."""

DROPOUT_FIELDS: tuple[str, ...] = ("dropout", "conv_dropout")
""":class:`TrainConfig` fields that only an ``"mc_dropout"`` model uses."""

IVON_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig)
                                     if f.name.startswith("ivon_"))
""":class:`TrainConfig` fields that only ``optimizer="ivon"`` uses (IVON also reads
``prior_sigma`` and ``prior_scaling`` when ``ivon_weight_decay`` is None)."""


def config_differences(saved: Mapping[str, Any], config: TrainConfig,
                       ignore: Sequence[str] = IGNORED_FOR_REUSE,
                       only_used: bool = True) -> list[str]:
    """``"field: saved X, now Y"`` for every field of ``config`` that ``saved`` (a
    checkpoint's ``"config"`` dict) has differently, apart from ``ignore`` and, if
    ``only_used``, the fields the run does not use (:data:`BAYESIAN_ONLY_FIELDS` unless
    ``"bayesian"`` or IVON's ``prior_sigma``, :data:`DROPOUT_FIELDS` unless
    ``"mc_dropout"``, :data:`IVON_FIELDS` unless ``optimizer="ivon"``, ``sigma_lr_factor``
    unless Adam trains a BayesianCNN).
    (:func:`bnn_course.run_folder.config_differences` does the comparing.)"""
    unused = set(ignore)
    if only_used and config.model != "bayesian":
        unused.update(BAYESIAN_ONLY_FIELDS)
    if only_used and config.model != "mc_dropout":
        unused.update(DROPOUT_FIELDS)
    if only_used and config.optimizer != "ivon":
        unused.update(IVON_FIELDS)
    if only_used and config.optimizer == "ivon":  # IVON reads the prior, not the rest
        unused.difference_update(("prior_sigma", "prior_scaling"))
    if only_used and (config.optimizer != "adam" or config.model != "bayesian"):
        unused.add("sigma_lr_factor")
    return _differences(saved, dataclasses.asdict(config), sorted(unused))


def reusable_checkpoint(path: str | os.PathLike, config: TrainConfig,
                        data: CIFAR10Data) -> tuple[bool, str]:
    """Whether the checkpoint at ``path`` holds a finished run of ``config`` on ``data``.

    Finished: trained for ``config.epochs`` epochs; same configuration up to
    :data:`IGNORED_FOR_REUSE`; trained on the same training set (source, size and digest,
    :func:`bnn_course.run_folder.data_identity`; the test set may differ). Returns
    ``(ok, reason)``, the reason in words either way.
    """
    path = Path(path)
    if not path.is_file():
        return False, f"no checkpoint at {path}"
    try:
        state = load_checkpoint(path)
    except Exception as error:  # CheckpointError, or an unreadable file
        return False, f"{path} could not be read ({error})"
    differences = config_differences(state["config"], config)
    if differences:
        return False, f"{path} has another configuration ({'; '.join(differences)})"
    differences = data_differences(state, run_data_identity(config, data), ("train",))
    if differences:
        return False, f"{path} was trained on other data ({'; '.join(differences)})"
    if int(state.get("epoch", 0)) != config.epochs:
        return False, f"{path} stopped after epoch {state.get('epoch')} of {config.epochs}"
    return True, f"{path} (trained on {data.name}, {config.epochs} epochs)"


class TrainedMethods(NamedTuple):
    """Output of :func:`train_methods`."""

    models: dict[str, list[nn.Module]]
    """``{method: [networks]}``: one network per method, ``ensemble_size`` for the ensemble."""
    origins: dict[str, str]
    """``{run name: how it was obtained}``: ``"trained ..."``, ``"reused ..."`` or
    ``"same network as ..."``."""
    seconds: dict[str, float]
    """``{run name: wall-clock seconds}`` spent training in this call (0 for a reused
    network)."""
    recorded_seconds: dict[str, float] = {}
    """``{run name: seconds its training took}``: the sum of the per-epoch ``"seconds"`` of
    its history (the epochs' training loops, without set-up and evaluation; for a reused
    network read from its checkpoint, for a resumed one including the epochs before the
    interruption); 0 for a run that is the same network as another (counted there)."""
    checkpoint_paths: dict[str, str] = {}
    """``{run name: the checkpoint file its network was loaded from or saved to}`` (for a
    run that is the same network as another, that run's file; absent for a network trained
    without ``out_dir``): where its configuration and history can be read back."""


def _history_seconds(history: Sequence[Mapping[str, Any]]) -> float:
    """The training time of a run: the sum of its history's per-epoch ``"seconds"`` (the
    training loops, without the per-epoch evaluations)."""
    return float(sum(record.get("seconds", 0.0) for record in history))


def train_methods(
    data: CIFAR10Data,
    base_config: TrainConfig,
    methods: Sequence[str] = METHODS,
    ensemble_size: int = 5,
    out_dir: str | os.PathLike | None = None,
    checkpoints: Mapping[str, str | os.PathLike] | None = None,
    log: Callable[[str], None] = print,
    train_log: Callable[[str], None] | None = None,
) -> TrainedMethods:
    """Train (or reuse) every network of :func:`method_configs` with :func:`train`.

    For each run, in order:

    1. a run of this call with the same configuration (ensemble member 0 and
       ``"deterministic"``) gives its network;
    2. a finished checkpoint (:func:`reusable_checkpoint`) at ``checkpoints[run name]`` (or
       ``checkpoints[method]``, e.g. ``{"bayesian": "runs/ch06/checkpoint.pt"}``), then at
       ``out_dir/<run name>/checkpoint.pt``, is loaded;
    3. otherwise the network is trained into ``out_dir/<run name>`` (no checkpoint when
       ``out_dir`` is ``None``), resuming an interrupted run of the same configuration and
       data, and replacing a run of another one.

    One line per run says which of the three happened (through ``log``). ``train_log``
    receives :func:`train`'s per-epoch lines (default: dropped).
    """
    checkpoints = dict(checkpoints or {})
    quiet = train_log if train_log is not None else (lambda _line: None)
    models: dict[str, list[nn.Module]] = {method: [] for method in methods}
    origins: dict[str, str] = {}
    seconds: dict[str, float] = {}
    recorded: dict[str, float] = {}
    paths: dict[str, str] = {}
    done: list[tuple[str, TrainConfig, nn.Module]] = []
    for method, name, config in method_configs(base_config, methods, ensemble_size):
        same = next(((other, model) for other, c, model in done if c == config), None)
        if same is not None:
            models[method].append(same[1])
            origins[name] = f"same network as {same[0]} (identical configuration and seed)"
            seconds[name] = 0.0
            recorded[name] = 0.0
            if same[0] in paths:
                paths[name] = paths[same[0]]
            log(f"{name}: {origins[name]}")
            continue
        run_dir = Path(out_dir) / name if out_dir is not None else None
        candidates = [checkpoints[key] for key in (name, method) if key in checkpoints]
        if run_dir is not None:
            candidates.append(run_dir / CHECKPOINT_NAME)
        reasons = []
        model = None
        for candidate in dict.fromkeys(str(c) for c in candidates):
            ok, reason = reusable_checkpoint(candidate, config, data)
            if ok:
                model, state = load_trained_model(candidate,
                                                  device=str(select_device(config.device)))
                origins[name] = f"reused {reason}"
                seconds[name] = 0.0
                recorded[name] = _history_seconds(state["history"])
                paths[name] = candidate
                break
            reasons.append(reason)
        if model is None:
            resume = False
            if run_dir is not None and (run_dir / CHECKPOINT_NAME).is_file():
                try:
                    saved = load_checkpoint(run_dir / CHECKPOINT_NAME)
                    resume = not (config_differences(saved["config"], config,
                                                     RESUME_FREE_FIELDS, only_used=False)
                                  or data_differences(saved, run_data_identity(config, data)))
                except Exception:  # unreadable: train afresh, overwriting it
                    resume = False
            started = time.perf_counter()
            # this run folder belongs to the comparison: a run of another configuration
            # there is replaced
            result = train(config, data, out_dir=run_dir, resume=resume, overwrite=not resume,
                           log=quiet)
            seconds[name] = time.perf_counter() - started
            recorded[name] = _history_seconds(result.history)
            model = result.model.eval()
            last = result.history[-1]
            why = "; ".join(reasons) if reasons else "no checkpoint given"
            done_before = int(saved["epoch"]) if resume else 0
            epochs = (f"epochs {done_before + 1}-{config.epochs} (resumed after epoch "
                      f"{done_before})" if 0 < done_before < config.epochs
                      else f"{config.epochs} epochs")
            origins[name] = (f"trained here: {epochs} in {seconds[name]:.1f} s "
                             f"({last['images_per_second']:,.0f} images/s in the last epoch), "
                             f"because {why}")
            if run_dir is not None:
                paths[name] = str(run_dir / CHECKPOINT_NAME)
        models[method].append(model)
        done.append((name, config, model))
        log(f"{name}: {origins[name]}")
    return TrainedMethods(models, origins, seconds, recorded, paths)


# --------------------------------------------------------------------------------------
# Choosing MC dropout's rates on held-out training images
# --------------------------------------------------------------------------------------


class DropoutSweep(NamedTuple):
    """Output of :func:`choose_dropout`."""

    rows: list[dict[str, Any]]
    """One dict per candidate: ``dropout``, ``conv_dropout``, ``nll``, ``accuracy``,
    ``ece``, ``brier`` (of the MC predictive on the held-out images), ``seconds``
    (its training time, :attr:`TrainedMethods.recorded_seconds`) and ``origin``."""
    chosen: tuple[float, float]
    """``(dropout, conv_dropout)`` of the candidate with the lowest held-out NLL."""
    seconds: float
    """Wall-clock seconds of this call (training what was not reused, and scoring)."""
    training_seconds: float
    """Training seconds of all candidates, reused ones included (what the sweep costs)."""
    checkpoint: str | None = None
    """The chosen candidate's checkpoint file (``None`` without ``out_dir``). When the
    configuration holds out the validation images itself, this network trained on the same
    images as every other network of that configuration: with ``epochs`` equal to the
    budget's, pass it to :func:`train_methods` (``checkpoints={"mc_dropout": ...}``) and it
    is reused as the final MC dropout network instead of being trained again."""


def choose_dropout(
    data: CIFAR10Data,
    base_config: TrainConfig,
    candidates: Sequence[tuple[float, float]],
    validation_size: int | None,
    epochs: int,
    num_samples: int,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_bins: int = NUM_BINS,
    log: Callable[[str], None] = print,
) -> DropoutSweep:
    r"""Choose MC dropout's ``(dropout, conv_dropout)`` by the NLL on held-out images.

    When ``base_config`` holds out validation images itself (``validation_size > 0``),
    those are the held-out images (:func:`bnn_course.train.validation_set`) and the
    candidates train on the rest, exactly as the final network of that configuration would
    (so a candidate trained for the budget's epochs *is* that network, and is reused);
    ``validation_size`` must then be ``None`` or the same number. Otherwise the training
    set of ``base_config`` (:func:`bnn_course.train.training_set`) is split by
    :func:`~bnn_course.data.validation_split` into ``validation_size`` held-out images and
    the rest. Each
    candidate ``(dense rate, conv rate)`` trains an ``"mc_dropout"`` network with
    ``base_config``'s budget but ``epochs`` epochs on the rest (:func:`train_methods`, so a
    finished run in ``out_dir/<candidate>/mc_dropout`` is reused), and is scored on the
    held-out images by the metrics of its MC predictive with ``num_samples`` passes
    (:func:`summary_metrics`). The chosen candidate minimises the NLL
    :math:`-\frac1V\sum_v \log \bar p(y_v \mid x_v)`, a proper scoring rule that judges the
    probabilities, not only the top class; accuracy, ECE and Brier score are reported too.
    The test set is never looked at.
    """
    if not candidates:
        raise ValueError("candidates must hold at least one (dropout, conv_dropout) pair")
    for dense, conv in candidates:
        if not (0 <= dense < 1 and 0 <= conv < 1 and (dense > 0 or conv > 0)):
            raise ValueError(f"candidate ({dense}, {conv}): both rates must be in [0, 1) "
                             "and at least one above 0")
    started = time.perf_counter()
    from bnn_course.train import training_set, validation_set

    if base_config.validation_size:
        if validation_size not in (None, base_config.validation_size):
            raise ValueError(f"validation_size={validation_size}, but the configuration "
                             f"already holds out {base_config.validation_size} images: use "
                             "those (pass None)")
        held_images, held_labels = validation_set(base_config, data)
        split, subset = data, base_config.train_subset
    else:
        if validation_size is None:
            raise ValueError("validation_size is needed when the configuration holds out "
                             "no images")
        images, labels = training_set(base_config, data)
        rest_images, rest_labels, held_images, held_labels = validation_split(
            images, labels, validation_size, seed)
        split = dataclasses.replace(
            data, train_images=rest_images, train_labels=rest_labels, test_images=held_images,
            test_labels=held_labels,
            source=f"{data.source}; {rest_labels.shape[0]:,} training images of a split "
                   f"holding out {validation_size:,} (seed {seed})")
        subset = None
    rows = []
    for dense, conv in candidates:
        config = dataclasses.replace(base_config, model="mc_dropout", dropout=dense,
                                     conv_dropout=conv, epochs=epochs, train_subset=subset)
        run_dir = (Path(out_dir) / f"dropout{dense:g}-conv{conv:g}"
                   if out_dir is not None else None)
        trained = train_methods(split, config, ("mc_dropout",), out_dir=run_dir,
                                log=lambda _line: None)
        model = trained.models["mc_dropout"][0]
        probs = sample_probs_for("mc_dropout", model, held_images.to(_model_device(model)),
                                 num_samples, batch_size, autocast_dtype)
        metrics = summary_metrics(probs, held_labels, num_bins)
        row = {"dropout": dense, "conv_dropout": conv,
               **{key: metrics[key] for key in ("nll", "accuracy", "ece", "brier")},
               "seconds": trained.recorded_seconds["mc_dropout"],
               "origin": trained.origins["mc_dropout"],
               "checkpoint": trained.checkpoint_paths.get("mc_dropout")}
        rows.append(row)
        log(f"dropout {dense:g}, conv_dropout {conv:g}: held-out NLL {row['nll']:.4f}, "
            f"accuracy {row['accuracy']:.4f}, ECE {row['ece']:.4f}; "
            f"{row['origin'].split(',')[0].split(' (')[0]}")
    best = min(rows, key=lambda row: row["nll"])
    return DropoutSweep([{k: v for k, v in row.items() if k != "checkpoint"} for row in rows],
                        (best["dropout"], best["conv_dropout"]),
                        time.perf_counter() - started, sum(row["seconds"] for row in rows),
                        best["checkpoint"])


# --------------------------------------------------------------------------------------
# Paired standard errors and verdicts in words
# --------------------------------------------------------------------------------------


def paired_difference(values_a: torch.Tensor, values_b: torch.Tensor) -> tuple[float, float]:
    r"""Mean of the per-image differences :math:`d_n = a_n - b_n` and its standard error
    :math:`\mathrm{sd}(d)/\sqrt{N}` (``values_a``, ``values_b`` of shape ``(N,)``, the same
    images in the same order; e.g. correctness or per-image NLL of two methods)."""
    if values_a.shape != values_b.shape or values_a.dim() != 1 or values_a.numel() < 2:
        raise ValueError(f"need two (N,) tensors with N >= 2, got {tuple(values_a.shape)} "
                         f"and {tuple(values_b.shape)}")
    d = values_a.double().cpu() - values_b.double().cpu()
    return d.mean().item(), d.std().item() / math.sqrt(d.numel())


def seed_difference(values_a: Sequence[float], values_b: Sequence[float],
                    ) -> tuple[float, float]:
    r"""Mean over training seeds of :math:`d_s = a_s - b_s` and its standard error.

    ``values_a[i]`` and ``values_b[i]`` are one measure (accuracy, NLL, ...) of two methods
    trained with the same seed :math:`s_i`, so the differences are paired by seed. Returns
    :math:`\bar d` and :math:`\mathrm{sd}(d)/\sqrt{n}` over the :math:`n` seeds: the
    standard error that covers the training run (initialisation, data order, noise), which
    the paired standard error over test images (:func:`paired_difference`) does not. With one
    seed the spread of training runs is not measured, and the standard error is NaN
    (:func:`verdict` then says ``"not measured"``); with :math:`n` seeds it has
    :math:`n - 1` degrees of freedom, so a few seeds give a rough one.
    """
    a = [float(value) for value in values_a]
    b = [float(value) for value in values_b]
    if len(a) != len(b) or not a:
        raise ValueError(f"need one value per seed for both methods, got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if len(d) < 2:
        return d.mean().item(), math.nan
    return d.mean().item(), d.std().item() / math.sqrt(len(d))


def resample_weights(size: int, num_resamples: int,
                     generator: torch.Generator | None = None,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    r"""Bootstrap resamples of ``size`` items as multiplicities: float64 ``(R, size)``.

    Row ``r`` counts how often each item is drawn in ``size`` draws with replacement, so a
    weighted statistic with row ``r`` as weights is the statistic of the ``r``-th resample.
    Giving two methods the same rows makes their bootstrap differences *paired*, and the
    standard deviation over rows of a statistic's difference is its bootstrap standard error.

    With ``groups``, whole groups are resampled (the cluster bootstrap, Davison & Hinkley
    1997, section 3.8): items of one group are not independent (crops of one photograph),
    so the :math:`G` groups are drawn :math:`G` times with replacement and every item gets
    its group's count, :math:`w_{rn} = C_{r, g(n)}`. Each group's count has mean 1, so each
    item's multiplicity has mean 1 and a row sums to ``size`` in expectation (exactly only
    when the groups have equal sizes). With one item per group this is the plain bootstrap:
    ``groups = torch.arange(size)`` gives the very same rows for the same generator state.
    With few groups the resamples are few (:math:`\binom{2G-1}{G}` distinct ones: 3 for two
    photographs), and so is the information in the standard error.

    Parameters
    ----------
    size:
        Number of items :math:`N`.
    num_resamples:
        Number of resamples :math:`R`.
    generator:
        CPU generator of the draws.
    groups:
        ``(size,)`` integers, equal for items of the same group (any values; e.g.
        :func:`bnn_course.ood.load_ood_sets`' ``groups``), or ``None`` for independent items.
    """
    if size < 1 or num_resamples < 1:
        raise ValueError(f"size and num_resamples must be >= 1, got {size}, {num_resamples}")
    if groups is None:
        group_of = None
        num_groups = size
    else:
        if not isinstance(groups, torch.Tensor) or groups.shape != (size,):
            shape = tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups)
            raise ValueError(f"groups must be a tensor of shape ({size},), got {shape}")
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise ValueError(f"groups must hold integer group labels, got {groups.dtype}")
        _, group_of = torch.unique(groups.cpu(), return_inverse=True)
        num_groups = int(group_of.max()) + 1
    draws = torch.randint(num_groups, (num_resamples, num_groups), generator=generator)
    counts = torch.zeros(num_resamples, num_groups, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return counts if group_of is None else counts[:, group_of]


def weighted_ece(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 num_bins: int = NUM_BINS) -> torch.Tensor:
    r"""The ECE of :func:`~bnn_course.metrics.expected_calibration_error` with item weights.

    :math:`\mathrm{ECE}_r = \sum_m |\sum_{n \in B_m} w_{rn}([\hat y_n = y_n] - c_n)| /
    \sum_n w_{rn}`, the same bins; with weights 1 it is the plain ECE, with
    :func:`resample_weights` the ECE of each bootstrap resample. ``probs`` ``(N, K)``,
    ``labels`` ``(N,)``, ``weights`` ``(R, N)``; returns float64 ``(R,)`` on the CPU.
    """
    confidence, prediction = probs.detach().cpu().double().max(-1)
    gap = (prediction == labels.cpu()).double() - confidence  # (N,)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    one_hot = torch.zeros(gap.numel(), num_bins, dtype=torch.float64)
    one_hot[torch.arange(gap.numel()), index] = gap
    w = weights.cpu().double()
    return (w @ one_hot).abs().sum(1) / w.sum(1)


def weighted_auroc(score_in: torch.Tensor, score_out: torch.Tensor,
                   weights_in: torch.Tensor, weights_out: torch.Tensor) -> torch.Tensor:
    r"""AUROC of a score, in-distribution (negatives) against OOD (positives), with weights.

    :math:`\mathrm{AUROC}_r = \sum_{j} v_{rj} \big(\sum_{i: s_i < t_j} w_{ri}
    + \tfrac12 \sum_{i: s_i = t_j} w_{ri}\big) / (\sum_i w_{ri} \sum_j v_{rj})` for
    negatives' scores :math:`s` ``(N,)`` with weights ``weights_in`` ``(R, N)`` and positives'
    scores :math:`t` ``(M,)`` with ``weights_out`` ``(R, M)``: with weights 1 it is
    :func:`~bnn_course.metrics.auroc`, with :func:`resample_weights` that of each bootstrap
    resample, all ``R`` from one sort. Returns float64 ``(R,)`` on the CPU.
    """
    s, order = torch.sort(score_in.detach().cpu().double())
    t = score_out.detach().cpu().double()
    below = torch.searchsorted(s, t, right=False)
    up_to = torch.searchsorted(s, t, right=True)
    w_in = weights_in.cpu().double()[:, order]
    cumulative = torch.cat([torch.zeros(w_in.shape[0], 1, dtype=torch.float64),
                            w_in.cumsum(1)], dim=1)  # (R, N + 1)
    lower = cumulative[:, below]
    tied = cumulative[:, up_to] - lower
    w_out = weights_out.cpu().double()
    return ((lower + 0.5 * tied) * w_out).sum(1) / (w_in.sum(1) * w_out.sum(1))


def _printed_digits(numbers: Sequence[float], agrees: Callable[[list[Decimal]], bool],
                    digits: int) -> int:
    """The fewest decimals, at least ``digits``, with which the absolute values of
    ``numbers`` as printed still satisfy ``agrees`` (the decision taken on the unrounded
    numbers) and a nonzero ``numbers[1]`` (a standard error) prints nonzero; at most
    ``digits + 8``."""
    for places in range(digits, digits + 9):
        printed = [Decimal(f"{abs(x):.{places}f}") for x in numbers]
        if (printed[1] > 0 or numbers[1] == 0) and agrees(printed):
            return places
    return digits + 8


def verdict(difference: float, standard_error: float, direction: int, digits: int = 3,
            threshold: float = 2.0, noise_floor: float | None = None) -> str:
    """A difference ``a - b`` and its paired standard error in words, from ``a``'s side.

    ``direction`` is +1 when larger is better (accuracy, AUROC), -1 when smaller is (NLL,
    ECE, Brier). The decision is taken on the unrounded numbers, in this order:

    1. ``"not measured"`` when either number is NaN;
    2. ``"no difference beyond 2 paired standard errors (+0.003 +- 0.004)"`` when
       ``|difference| <= threshold * standard_error``: not significant, which is not the
       same as equal;
    3. ``"below the noise floor of 0.043 (-0.022 +- 0.008)"`` when ``noise_floor`` is
       given and ``|difference| <= noise_floor``: beyond the standard errors, but smaller
       than the differences that noise alone produces. For an ECE pass the larger of the
       two methods' ``ece_floor`` (:func:`summary_metrics`; for the ECE under shift,
       ``severity/<s>/ece_floor``): two calibrated predictors would show ECEs of about that
       size, so a smaller difference is no win;
    4. ``"better by 0.012 +- 0.004"`` or ``"worse by ..."`` otherwise (followed by
       ``" (noise floor 0.043)"`` when a floor was given).

    The numbers are printed with ``digits`` decimals, or more where fewer would make the
    printed numbers contradict the decision (``-0.0065 +- 0.0033`` is within two standard
    errors; with three decimals, ``-0.007 +- 0.003``, it would not look so), and with
    enough decimals to show a nonzero standard error.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    if noise_floor is not None and not noise_floor >= 0:
        raise ValueError(f"noise_floor must be >= 0 or None, got {noise_floor}")
    if math.isnan(difference) or math.isnan(standard_error):
        return "not measured"
    if standard_error < 0:
        raise ValueError(f"standard_error must be >= 0, got {standard_error}")
    limit = Decimal(repr(float(threshold)))
    within_errors = abs(difference) <= threshold * standard_error
    below_floor = noise_floor is not None and abs(difference) <= noise_floor
    numbers = [difference, standard_error] + ([noise_floor] if noise_floor is not None else [])

    def agrees(printed: list[Decimal]) -> bool:
        same = (printed[0] <= limit * printed[1]) == within_errors
        if noise_floor is not None and not within_errors:
            same = same and (printed[0] <= printed[2]) == below_floor
        return same

    places = _printed_digits(numbers, agrees, digits)
    numbers_text = f"{difference:+.{places}f} +- {standard_error:.{places}f}"
    if within_errors:
        return f"no difference beyond {threshold:g} paired standard errors ({numbers_text})"
    if below_floor:
        return f"below the noise floor of {noise_floor:.{places}f} ({numbers_text})"
    word = "better" if difference * direction > 0 else "worse"
    text = f"{word} by {abs(difference):.{places}f} +- {standard_error:.{places}f}"
    if noise_floor is not None:
        text += f" (noise floor {noise_floor:.{places}f})"
    return text


# --------------------------------------------------------------------------------------
# What each method costs
# --------------------------------------------------------------------------------------


def cost_rows(trained: TrainedMethods, passes: Mapping[str, int],
              prediction_seconds: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per method of ``trained``: what it costs to train and to predict.

    Keys: ``method``; ``networks`` (networks the method needs: ``M`` for the ensemble);
    ``trained_here`` (of those, trained in this run); ``training_seconds`` (the sum of
    :attr:`TrainedMethods.recorded_seconds` of its networks; the ensemble's member 0, the
    same network as the deterministic twin, is counted with the twin's time, since an
    ensemble on its own would have to train it); ``passes`` (forward passes per prediction,
    ``passes[method]``); ``prediction_seconds`` (``prediction_seconds[method]``, measured
    by the caller).
    """
    runs = {method: [name for name in trained.origins
                     if name == method or name.startswith(f"{method}-")]
            for method in trained.models}
    rows = []
    for method, names in runs.items():
        seconds = 0.0
        for name in names:
            origin = trained.origins[name]
            if origin.startswith("same network as "):
                other = origin.removeprefix("same network as ").split(" ")[0]
                seconds += trained.recorded_seconds.get(other, 0.0)
            else:
                seconds += trained.recorded_seconds.get(name, 0.0)
        rows.append({"method": method, "networks": len(trained.models[method]),
                     "trained_here": sum(trained.origins[n].startswith("trained")
                                         for n in names),
                     "training_seconds": seconds, "passes": int(passes[method]),
                     "prediction_seconds": float(prediction_seconds[method])})
    return rows


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

SMOKE_DEFAULTS: dict[str, Any] = {
    "epochs": 1, "channels": (4, 8, 16), "hidden_features": 32, "batch_size": 100,
    "train_subset": 1000, "test_subset": 300, "ensemble_size": 2, "eval_samples": 4,
    "corruption_samples": 2, "corruptions": ("gaussian_noise", "contrast"),
    "ood_max_images": 200, "ood_sets": ("sklearn-digits", "uniform-noise"),
}
"""What ``--smoke`` changes (explicit flags still win): tiny networks and sets."""

COMPARISON_NAME = "comparison.json"


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


COMPARISON_DEFAULTS = TrainConfig(epoch_eval_samples=0, eval_samples=0, progress=False)
"""The training configuration the comparison starts from; every network is evaluated by the
comparison itself, so :func:`~bnn_course.train.train` makes no sampled evaluations (it still
makes one posterior-mean pass over the test set per epoch, for its history)."""

_NOT_FLAGS = ("model", "epoch_eval_samples", "eval_samples")
"""TrainConfig fields without a comparison flag: the method sets ``model``; the
comparison's own ``--eval-samples`` replaces the two evaluation fields."""


def _severities(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers in 1..5 such as "
                                         f"1,3,5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m bnn_course.comparison``: the comparison's own flags, and one
    flag per :class:`TrainConfig` field except ``model`` and the evaluation sample counts
    (:func:`bnn_course.train.add_config_arguments`), so every hyperparameter of the
    training command (the Bayesian ones included) can be set here too."""
    parser = CommandLineParser(
        prog="python -m bnn_course.comparison",
        description="Train the BayesianCNN, its deterministic twin, MC dropout and a deep "
                    "ensemble with one budget, and compare accuracy, NLL, ECE, Brier, OOD "
                    "AUROC and accuracy/ECE under corruptions. Writes OUT/comparison.json "
                    "and OUT/<run>/checkpoint.pt, prints the table.")
    add = parser.add_argument
    add("--data", default=None, help="folder with CIFAR-10 (default: $BNN_COURSE_DATA, "
                                     "else ~/.cache/bnn_course/data)")
    add("--out", default="runs/comparison", help="output folder (default: %(default)s)")
    add("--smoke", action="store_true",
        help="tiny budget and sets, to check that everything runs (also selected by "
             "BNN_COURSE_SMOKE=1): " + ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()))
    add("--debug", action="store_true", help="show the full traceback of an error")
    add("--methods", type=_names, default=METHODS, metavar="M1,M2,...",
        help="default: " + ",".join(METHODS))
    add("--ensemble-size", type=int, default=5, help="default: %(default)s")
    add("--test-subset", type=int, default=None, metavar="N",
        help="evaluate on N test images, N/10 per class (default: all)")
    add("--eval-samples", type=int, default=20,
        help="samples of bayesian and mc_dropout on clean and OOD sets (default: %(default)s)")
    add("--corruption-samples", type=int, default=4,
        help="samples on each corrupted set (default: %(default)s)")
    add("--corruptions", type=_names, default=tuple(CORRUPTIONS), metavar="NAME,...",
        help="corruptions of bnn_course.corruptions, or 'none' (default: all)")
    add("--severities", type=_severities, default=SEVERITIES,
        metavar="1,2,...", help="default: 1,2,3,4,5")
    add("--ood-sets", type=_names, default=None, metavar="NAME,...",
        help="keep only these of the OOD sets that can be loaded (default: all)")
    add("--ood-max-images", type=int, default=2000,
        help="at most this many images per OOD set (default: %(default)s)")
    add("--no-download", action="store_true",
        help="no download of CIFAR-10, SVHN or CIFAR-100 (only what is on disk)")
    add("--reuse", action="append", default=[], metavar="RUN=PATH",
        help="a finished checkpoint to reuse if its configuration matches, e.g. "
             "bayesian=runs/ch06/checkpoint.pt (repeatable)")
    group = parser.add_argument_group(
        "training (every network; the seed is also the corruptions' seed)")
    add_config_arguments(group, COMPARISON_DEFAULTS, exclude=_NOT_FLAGS)
    return parser


def base_config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The training configuration every network of the comparison starts from, from the
    parsed flags (the comparison evaluates the networks itself: no evaluation in
    :func:`~bnn_course.train.train`)."""
    return config_from_arguments(args, epoch_eval_samples=0, eval_samples=0)


def _main(argv: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    smoke = bool(first.smoke) or run_config.is_smoke()
    if smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
    args = parser.parse_args(argv)
    corruptions = () if args.corruptions in (("none",), ()) else args.corruptions
    if not args.methods:
        parser.error(f"--methods needs at least one of {','.join(METHODS)}")
    # Checked here, not after minutes of training: what the evaluation would refuse.
    sampled = [m for m in ("bayesian", "mc_dropout") if m in args.methods]
    if sampled and args.eval_samples < 1:
        parser.error(f"--eval-samples must be >= 1 for {', '.join(sampled)}, "
                     f"got {args.eval_samples}")
    if sampled and corruptions and args.corruption_samples < 1:
        parser.error(f"--corruption-samples must be >= 1 for {', '.join(sampled)}, "
                     f"got {args.corruption_samples}")
    unknown_corruptions = [name for name in corruptions if name not in CORRUPTIONS]
    if unknown_corruptions:
        parser.error(f"--corruptions: unknown {unknown_corruptions}; choose from "
                     f"{','.join(CORRUPTIONS)} or none")
    bad_severities = [s for s in args.severities if s not in SEVERITIES]
    if corruptions and (bad_severities or not args.severities):
        parser.error(f"--severities must be among {','.join(map(str, SEVERITIES))}, got "
                     f"{','.join(map(str, args.severities)) or 'none'}")
    if "mc_dropout" in args.methods and not (args.dropout > 0 or args.conv_dropout > 0):
        parser.error(f"mc_dropout needs --dropout > 0 or --conv-dropout > 0, got "
                     f"{args.dropout} and {args.conv_dropout}")
    from bnn_course.ood import OOD_SET_NAMES

    unknown_sets = [name for name in args.ood_sets or () if name not in OOD_SET_NAMES]
    if unknown_sets:
        parser.error(f"--ood-sets: unknown {unknown_sets}; choose from "
                     f"{','.join(OOD_SET_NAMES)}")
    checkpoints = {}
    for item in args.reuse:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--reuse expects RUN=PATH, got {item!r}")
        if name not in METHODS and not re.fullmatch(r"ensemble-\d+", name):
            parser.error(f"--reuse: unknown run {name!r}; runs are {', '.join(METHODS)} "
                         "and ensemble-0, ensemble-1, ...")
        checkpoints[name] = path

    base = base_config_from_arguments(args)
    device = select_device(base.device)  # before the data are loaded: fails fast
    check_output_folder(args.out)
    data = load_cifar10(args.data, smoke=smoke, device=device,
                        allow_download=not args.no_download)
    if args.test_subset is not None:
        images, labels = stratified_subset(data.test_images, data.test_labels, args.test_subset)
        data = dataclasses.replace(data, test_images=images, test_labels=labels)

    from bnn_course.ood import load_ood_sets

    generator = torch.Generator().manual_seed(args.seed)
    loaded = load_ood_sets(args.data, allow_download=not args.no_download,
                           max_images=args.ood_max_images, generator=generator)
    if args.ood_sets is not None:
        loaded = {name: value for name, value in loaded.items() if name in args.ood_sets}
    caption = describe_sets(data.name, int(data.test_labels.shape[0]), loaded, corruptions,
                            args.severities)
    print(caption)

    # An older comparison.json would describe other networks once any is (re)trained here.
    (Path(args.out) / COMPARISON_NAME).unlink(missing_ok=True)
    trained = train_methods(data, base, args.methods, args.ensemble_size, out_dir=args.out,
                            checkpoints=checkpoints)
    evaluation_started = time.perf_counter()
    rows = evaluate_methods(trained.models, data.test_images, data.test_labels,
                            {name: images for name, (images, _) in loaded.items()},
                            corruptions, args.severities, args.eval_samples,
                            args.corruption_samples, args.seed,
                            autocast_dtype=autocast_dtype(device, base.amp))
    evaluation_seconds = time.perf_counter() - evaluation_started
    document = {
        "rows": rows,
        "config": dataclasses.asdict(base),
        "methods": list(args.methods),
        "ensemble_size": args.ensemble_size,
        "eval_samples": args.eval_samples,
        "corruption_samples": args.corruption_samples,
        "corruptions": list(corruptions),
        "severities": list(args.severities),
        "ood_sets": {name: description for name, (_, description) in loaded.items()},
        "origins": trained.origins,
        "seconds": {"training": trained.seconds, "evaluation": evaluation_seconds,
                    "total": time.perf_counter() - started},
        "provenance": run_provenance(
            device_description(device), smoke=smoke, data_source=data.source,
            data_name=data.name,
            num_train=base.train_subset or int(data.train_labels.shape[0]),
            num_test=int(data.test_labels.shape[0])),
    }
    out = Path(args.out)
    atomic_write_text(out / COMPARISON_NAME, json.dumps(_without_nan(document), indent=2))
    print(format_table(rows, caption=caption))
    print(f"wrote {out / COMPARISON_NAME}; device: {document['provenance']['device']}; "
          f"{document['seconds']['total']:.1f} s in all "
          f"(evaluation {evaluation_seconds:.1f} s)")
    return document


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m bnn_course.comparison``; returns the JSON document.

    Expected failures are one line ``error: ...`` on stderr (see
    :func:`bnn_course.train.run_command_line`); ``--debug`` shows the traceback.
    """
    return run_command_line(_main, argv)


def _without_nan(value: Any) -> Any:
    """``value`` with every float NaN replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(item) for item in value]
    return value


if __name__ == "__main__":
    main()
