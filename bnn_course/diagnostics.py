r"""Diagnosing a Bayesian network that does not learn (chapter 7).

Each function answers one question about a run or a model, and returns plain dicts, tensors
and floats that a notebook plots; nothing here draws, except the small
:func:`plot_loss_decomposition`.

* :func:`loss_decomposition` -- which term of the loss dominates, step by step?
* :func:`objective_at_prior`, :func:`kl_per_weight`, :func:`break_even_log_sigma_shift` --
  where does the objective's optimum lie, and what may the data buy?
* :func:`sigma_summary` -- did the posterior standard deviations move, and how loud are they
  next to the means?
* :func:`adam_log_sigma_bound`, :func:`sigma_movement` -- did they move as far as Adam's step
  size allows (the step size decides where they are), or less (the objective does)?
* :func:`activation_scales` -- how large is the sampling noise next to the signal, layer by
  layer?
* :func:`prediction_collapse` -- does the network predict one class for everything?
* :func:`gradient_norms` -- which part of the loss pushes the means and the sigmas?
* :func:`early_warning_signs` -- all of the above as sentences, after the first epoch.

The loss is the one of :mod:`bnn_course.train`: for a mini-batch,

.. math::

    \mathcal{L}(q) = \underbrace{-\frac{1}{|B|}\sum_{n \in B} \log p(y_n \mid x_n, w)}_{
        \text{NLL},\ w \sim q}
    \; + \; c\,\mathrm{KL}(q \,\|\, p),
    \qquad c = \begin{cases} \beta / N & \texttt{kl\_scaling="per\_example"},\\
                             \beta & \texttt{kl\_scaling="unscaled"},\end{cases}

with :math:`N` training examples and KL weight :math:`\beta`. :math:`c\,\mathrm{KL}` is
computed by :func:`bnn_course.elbo.negative_elbo`, the loss the engine trains with, so the
two cannot drift apart.

The models are those of :mod:`bnn_course.models`: ``model(x, sample=...)`` returns
log-probabilities (B, K), :func:`bnn_course.layers.bayesian_layers` finds its
``(name, layer)`` pairs and
``model.kl_divergence()`` is the total KL. Images may be ``uint8`` (normalised here with
:func:`bnn_course.data.normalize`, as in :mod:`bnn_course.evaluation`) or already-normalised
floats.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.data import normalize
from bnn_course.elbo import negative_elbo
from bnn_course.layers import BayesianLayer, bayesian_layers
from bnn_course.train import TrainConfig, learning_rate
from bnn_course.weight_noise import noise_statistics

STEP_KEYS = ("step", "nll", "kl", "kl_term")
"""Keys of every entry of a history record's ``"steps"`` (:func:`bnn_course.train.train`)."""


# ---------------------------------------------------------------------- helpers


def _require_bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    layers = bayesian_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Bayesian layers to diagnose "
                         "(bayesian_layers(model) is empty); expected a model like "
                         "bnn_course.models.BayesianCNN")
    return layers


def _as_inputs(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return normalize(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images


def _checked_batch(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_train: int,
    num_samples: int,
) -> tuple[list[tuple[str, BayesianLayer]], torch.Tensor]:
    """Check the arguments shared by the per-batch diagnostics; the layers and the inputs."""
    _check_num_train(num_train)
    _check_batch(images, labels)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return _require_bayesian_layers(model), _as_inputs(images)


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of images (B, ...) and labels (B,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")


def _check_num_train(num_train: int) -> None:
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"num_train must be a positive int, got {num_train!r}")


def _kl_term(kl: torch.Tensor | float, num_train: int, kl_scaling: str,
             kl_weight: float) -> torch.Tensor:
    r"""The KL part :math:`c\,\mathrm{KL}` of the loss: :func:`bnn_course.elbo.negative_elbo`
    with a zero NLL (which also validates the settings)."""
    return negative_elbo(0.0, kl, num_train, kl_scaling=kl_scaling, kl_weight=kl_weight)


def _median(values: torch.Tensor) -> float:
    """The median; the mean of the two middle values for an even count."""
    ordered = values.flatten().sort().values
    middle = ordered.numel() // 2
    if ordered.numel() % 2:
        return ordered[middle].item()
    return 0.5 * (ordered[middle - 1] + ordered[middle]).item()


# ---------------------------------------------------------------------- loss decomposition


def loss_decomposition(
    history: Sequence[Mapping[str, Any]], num_train: int
) -> dict[str, torch.Tensor]:
    r"""The two terms of the loss at every logged step of a run.

    :func:`bnn_course.train.train` logs every ``log_interval``-th step (and the last step of
    each epoch) in ``record["steps"]``: the batch's NLL, the total unscaled
    :math:`\mathrm{KL}(q\,\|\,p)` and the KL term :math:`c\,\mathrm{KL}` as added to the
    loss. This function puts them side by side over the whole run.

    Parameters
    ----------
    history:
        ``TrainResult.history`` or the ``"history"`` of a ``metrics.json``: one record per
        epoch, each with ``"epoch"`` and ``"steps"``.
    num_train:
        :math:`N`, the number of training examples of the run.

    Returns
    -------
    dict of 1-D tensors, all of shape (T,) for the T logged steps in order
        ``step`` and ``epoch`` (int64; ``step`` counts optimiser steps from 1), and float64
        ``nll`` (batch mean), ``kl`` (total, unscaled), ``kl_over_n``
        (:math:`\mathrm{KL}/N`, the per-example KL whatever the run's scaling), ``kl_term``
        (as in the loss) and ``kl_term_over_nll`` (:math:`c\,\mathrm{KL}/\text{NLL}`: how
        many times the KL part outweighs the data part; ``inf`` where the NLL is 0).

    Raises
    ------
    ValueError
        On an empty history, a record without ``"steps"`` (a run from before the steps were
        logged), a step without one of :data:`STEP_KEYS`, or steps out of order (two runs
        concatenated).
    """
    _check_num_train(num_train)
    if len(history) == 0:
        raise ValueError("history is empty: train for at least one epoch")
    columns: dict[str, list[float]] = {key: [] for key in (*STEP_KEYS, "epoch")}
    for index, record in enumerate(history):
        if "steps" not in record:
            raise ValueError(f"history record {index} has no 'steps'; it comes from a run "
                             "that did not log per-step losses (rerun with this bnn_course)")
        for entry in record["steps"]:
            missing = [key for key in STEP_KEYS if key not in entry]
            if missing:
                raise ValueError(f"a step of history record {index} lacks {missing}")
            for key in STEP_KEYS:
                columns[key].append(entry[key])
            columns["epoch"].append(record.get("epoch", index + 1))
    if not columns["step"]:
        raise ValueError("no step was logged in history")
    step = torch.tensor(columns["step"], dtype=torch.int64)
    if (step[1:] <= step[:-1]).any():
        raise ValueError("history's steps are not increasing; is it two runs concatenated?")
    nll = torch.tensor(columns["nll"], dtype=torch.float64)
    kl = torch.tensor(columns["kl"], dtype=torch.float64)
    kl_scaled = torch.tensor(columns["kl_term"], dtype=torch.float64)
    ratio = torch.where(nll == 0, torch.full_like(nll, math.inf), kl_scaled / nll)
    return {
        "step": step,
        "epoch": torch.tensor(columns["epoch"], dtype=torch.int64),
        "nll": nll,
        "kl": kl,
        "kl_over_n": kl / num_train,
        "kl_term": kl_scaled,
        "kl_term_over_nll": ratio,
    }


def plot_loss_decomposition(ax: Any, decomposition: Mapping[str, torch.Tensor],
                            label: str = "") -> Any:
    """Plot the NLL and the KL term of :func:`loss_decomposition` against the step.

    Log-scaled y axis (the two terms differ by orders of magnitude in a failing run); NLL
    solid, KL term dashed, in one colour per call so that two runs can share ``ax``.
    Returns ``ax``.
    """
    prefix = f"{label}: " if label else ""
    steps = decomposition["step"].numpy()
    (line,) = ax.plot(steps, decomposition["nll"].numpy(), label=f"{prefix}NLL")
    ax.plot(steps, decomposition["kl_term"].numpy(), linestyle="--", color=line.get_color(),
            label=f"{prefix}KL term")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per example")
    ax.legend()
    return ax


# ---------------------------------------------------------------------- where the optimum is


def kl_per_weight(log_sigma_shift: float, mean_over_prior: float = 0.0) -> float:
    r"""The KL of one weight whose :math:`\sigma` is :math:`e^\delta` times the prior's.

    With :math:`\sigma = s\,e^{\delta}` and :math:`\mu = m\,s` in the closed form of
    :func:`bnn_course.posterior.gaussian_kl_divergence`,

    .. math::

        \mathrm{KL}\big(\mathcal{N}(\mu, \sigma^2) \,\|\, \mathcal{N}(0, s^2)\big)
        = \frac{e^{2\delta} - 1}{2} - \delta + \frac{m^2}{2}
        \;\approx\; \delta^2 + \frac{m^2}{2} \quad (|\delta| \ll 1),

    zero only at the prior (:math:`\delta = m = 0`), quadratic near it, and growing like
    :math:`|\delta|` (one nat per factor :math:`e` of shrinking) far below it.

    Parameters
    ----------
    log_sigma_shift:
        :math:`\delta = \log(\sigma / s)`.
    mean_over_prior:
        :math:`m = \mu / s`.
    """
    if not (math.isfinite(log_sigma_shift) and math.isfinite(mean_over_prior)):
        raise ValueError(f"expected finite values, got log_sigma_shift={log_sigma_shift}, "
                         f"mean_over_prior={mean_over_prior}")
    # expm1 keeps the quadratic term exact when delta is tiny.
    return 0.5 * math.expm1(2.0 * log_sigma_shift) - log_sigma_shift + 0.5 * mean_over_prior**2


def break_even_log_sigma_shift(kl_budget_per_weight: float) -> float:
    r"""The :math:`\delta^* \le 0` at which shrinking a :math:`\sigma` costs a given KL.

    Solves :math:`\frac{e^{2\delta} - 1}{2} - \delta = b` (see :func:`kl_per_weight`, with
    :math:`\mu = 0`) for the negative root, by bisection to float64 precision. For a small
    budget :math:`b`, :math:`\delta^* \approx -\sqrt b`.
    """
    budget = float(kl_budget_per_weight)
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"kl_budget_per_weight must be finite and >= 0, got {budget}")
    if budget == 0:
        return 0.0
    low, high = -1.0, 0.0
    while kl_per_weight(low) < budget:  # f(delta) > -delta - 1/2, so this ends
        low *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if kl_per_weight(middle) > budget:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@torch.no_grad()
def objective_at_prior(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_train: int,
    kl_scaling: str = "per_example",
    kl_weight: float = 1.0,
    num_samples: int = 4,
) -> dict[str, float]:
    r"""The loss of the current model against that of networks that ignore the data.

    **What the data can buy.** A network that ignores its input does best by predicting the
    label frequencies; for balanced classes that is the uniform prediction, with
    :math:`\text{NLL} = \log K` (:math:`\approx 2.30` for :math:`K = 10`). A perfect
    classifier has NLL 0. Fitting the data therefore lowers the NLL term by **at most**
    :math:`\log K` nats, while every bit of it has to be paid in :math:`c\,\mathrm{KL}`.
    So the data can pay for a KL of at most :math:`\log K / c` nats (``kl_budget``), i.e.
    :math:`b = \log K / (c\,n)` per weight for a network of :math:`n` Bayesian weights and
    biases (``kl_budget_per_weight``).

    **What a moved sigma costs.** One weight whose :math:`\sigma` moved from the prior's
    :math:`s` to :math:`s e^\delta` (mean still 0) costs
    :math:`\frac{e^{2\delta}-1}{2} - \delta \approx \delta^2` nats (:func:`kl_per_weight`).
    Shrinking **every** :math:`\sigma` by the factor :math:`e^{\delta^*}`
    (``break_even_sigma_ratio``) with :math:`\delta^*` from
    :func:`break_even_log_sigma_shift` (:math:`b`) already costs the whole budget.

    * Unscaled KL (the seed recipe: :math:`c = 1`), :math:`n = 814{,}122` weights of the
      seed-sized BayesianCNN, :math:`K = 10`: :math:`b = 2.8\times10^{-6}` nats,
      :math:`\delta^* \approx -0.0017`: moving every sigma by 0.17 % already costs more
      than a perfect fit of the training set could ever return. Learning features (means of
      size :math:`\pm 1/\sqrt{\text{fan-in}}`, sigmas far below 1) costs millions of nats.
      The minimum of that objective does not use the data, and more epochs only bring the
      network closer to it.
    * KL per example (:math:`c = 1/N`, :math:`N = 50{,}000`): :math:`b \approx 0.14`
      nats per weight, :math:`\delta^* \approx -0.43` (every sigma times 0.65): there is
      room to learn.

    **Caveat: the prior itself is not uniform.** :math:`q = p` has :math:`\mathrm{KL} = 0`
    but its sampled networks are not uniform predictors: with :math:`s = 1` the weight noise
    is amplified layer after layer (see :func:`activation_scales`): the seed-sized network's
    sampled logits are of order :math:`10^9` and so is :math:`\mathbb{E}_p[\text{NLL}]`
    (``prior_nll``), against a KL of about 100 nats at the seed initialisation. The
    objective's minimum is therefore not :math:`p` exactly but the KL-cheapest way of
    taming those logits without using the data (e.g. shrinking the last layer's sigmas).
    The budget argument holds against that network too: a posterior :math:`q^*` whose loss
    is no larger than that of a data-blind :math:`q_b` satisfies
    :math:`c\,[\mathrm{KL}(q^*) - \mathrm{KL}(q_b)] \le \text{NLL}(q_b) - \text{NLL}(q^*)`,
    about :math:`\log K` nats at most.

    Parameters
    ----------
    model:
        A Bayesian model (see the module docstring).
    images, labels:
        One batch, (B, C, H, W) and (B,), on the model's device.
    num_train:
        :math:`N`, the number of training examples.
    kl_scaling, kl_weight:
        As in :func:`bnn_course.elbo.negative_elbo`: ``"per_example"`` or ``"unscaled"``.
    num_samples:
        Sampled passes averaged for ``current_nll`` and ``prior_nll``.

    Returns
    -------
    dict of float
        ``num_classes`` :math:`K`, ``log_num_classes``, ``num_weights`` :math:`n`,
        ``kl_scale`` :math:`c`; the current model's ``current_nll`` (mean over sampled
        passes), ``current_kl``, ``current_kl_term`` and ``current_loss``; ``uniform_loss``
        (:math:`\log K` with KL 0: a data-blind reference no network can beat by more than
        :math:`\log K`); ``prior_nll`` (:math:`\mathbb{E}_p` NLL on the batch: every
        :math:`\mu = 0`, :math:`\sigma = s`; its loss, KL being 0); ``kl_budget``,
        ``kl_budget_per_weight``, ``break_even_log_sigma_shift`` :math:`\delta^*` and
        ``break_even_sigma_ratio`` :math:`e^{\delta^*}`.
    """
    layers, x = _checked_batch(model, images, labels, num_train, num_samples)
    _kl_term(0.0, num_train, kl_scaling, kl_weight)  # invalid settings fail before any pass

    def mean_sampled_nll(network: nn.Module) -> tuple[float, int]:
        total, width = 0.0, 0
        for _ in range(num_samples):
            log_probs = network(x, sample=True).float()
            width = log_probs.shape[-1]
            total += F.nll_loss(log_probs, labels).item()
        return total / num_samples, width

    current_nll, num_classes = mean_sampled_nll(model)
    current_kl = model.kl_divergence()
    current_kl_term = _kl_term(current_kl, num_train, kl_scaling, kl_weight).item()

    prior_model = copy.deepcopy(model)
    for _, layer in bayesian_layers(prior_model):
        for posterior in layer.posteriors():
            posterior.mu.zero_()
            posterior.set_sigma(layer.prior_sigma)
    prior_nll, _ = mean_sampled_nll(prior_model)
    del prior_model

    kl_scale = _kl_term(torch.tensor(1.0, dtype=torch.float64), num_train, kl_scaling,
                        kl_weight).item()
    num_weights = sum(p.mu.numel() for _, layer in layers for p in layer.posteriors())
    log_k = math.log(num_classes)
    budget = math.inf if kl_scale == 0 else log_k / kl_scale
    per_weight = budget / num_weights
    shift = -math.inf if math.isinf(per_weight) else break_even_log_sigma_shift(per_weight)
    return {
        "num_classes": num_classes,
        "log_num_classes": log_k,
        "num_weights": num_weights,
        "kl_scale": kl_scale,
        "current_nll": current_nll,
        "current_kl": current_kl.item(),
        "current_kl_term": current_kl_term,
        "current_loss": current_nll + current_kl_term,
        "uniform_loss": log_k,
        "prior_nll": prior_nll,
        "prior_loss": prior_nll,
        "kl_budget": budget,
        "kl_budget_per_weight": per_weight,
        "break_even_log_sigma_shift": shift,
        "break_even_sigma_ratio": math.exp(shift),
    }


# ---------------------------------------------------------------------- sigmas


@torch.no_grad()
def sigma_summary(
    model: nn.Module, init_log_sigma: float | None = None, include_bias: bool = False
) -> dict[str, dict[str, Any]]:
    r"""Per Bayesian layer: the posterior sigmas, their signal-to-noise ratio, their movement.

    For each weight :math:`i` of a layer, with posterior :math:`\mathcal{N}(\mu_i,
    \sigma_i^2)`, initial :math:`\log\sigma_0` and prior :math:`\mathcal{N}(0, s^2)`:

    * the signal-to-noise ratio :math:`\mathrm{SNR}_i = |\mu_i| / \sigma_i` (below 1: a
      sample of the weight is mostly noise);
    * the movement :math:`\log\sigma_i - \log\sigma_0`; a weight *moved by more than a
      factor 2* when :math:`|\log\sigma_i - \log\sigma_0| > \log 2`.

    A network that learned has moved many sigmas (usually down, where the data pin the
    weights) and has SNRs well above 1 somewhere; one sitting at its initialisation or at
    the prior (:math:`\sigma_i \approx s`) has not.

    Parameters
    ----------
    model:
        A Bayesian model (see the module docstring).
    init_log_sigma:
        :math:`\log\sigma_0` for every layer; ``None`` takes each layer's
        ``weight_posterior.init_log_sigma``.
    include_bias:
        Also count the biases (by default only the weights, as the training history's
        ``"sigma"``).

    Returns
    -------
    dict
        ``{layer_name: summary}`` in input-to-output order; every ``summary`` has the
        flattened CPU float32 tensors ``sigma`` and ``snr`` (shape (n,), for histograms) and
        the floats ``sigma_mean``, ``sigma_median``, ``snr_mean``, ``snr_median``,
        ``init_log_sigma``, ``log_sigma_shift_median`` (median of
        :math:`\log\sigma_i - \log\sigma_0`), ``fraction_moved_2x``, ``prior_sigma`` and
        ``sigma_over_prior_median`` (median :math:`\sigma_i / s`; 1 at the prior), and
        ``num_weights`` :math:`n`.
    """
    if init_log_sigma is not None and not math.isfinite(init_log_sigma):
        raise ValueError(f"init_log_sigma must be finite, got {init_log_sigma}")
    summaries = {}
    for name, layer in _require_bayesian_layers(model):
        posteriors = layer.posteriors() if include_bias else [layer.weight_posterior]
        log_sigma = torch.cat([p.log_sigma_values().flatten() for p in posteriors])
        mu = torch.cat([p.mu.detach().double().flatten() for p in posteriors])
        sigma = log_sigma.exp()
        snr = mu.abs() / sigma
        start = layer.weight_posterior.init_log_sigma if init_log_sigma is None \
            else float(init_log_sigma)
        shift = log_sigma - start
        summaries[name] = {
            "sigma": sigma.float().cpu(),
            "snr": snr.float().cpu(),
            "sigma_mean": sigma.mean().item(),
            "sigma_median": _median(sigma),
            "snr_mean": snr.mean().item(),
            "snr_median": _median(snr),
            "init_log_sigma": start,
            "log_sigma_shift_median": _median(shift),
            "fraction_moved_2x": (shift.abs() > math.log(2.0)).double().mean().item(),
            "prior_sigma": layer.prior_sigma,
            "sigma_over_prior_median": _median(sigma) / layer.prior_sigma,
            "num_weights": sigma.numel(),
        }
    return summaries


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) \
            or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")


def adam_log_sigma_bound(config: TrainConfig, steps_per_epoch: int,
                         steps: int | None = None) -> float:
    r"""About the farthest Adam moves one :math:`\log\sigma` in the first ``steps`` steps.

    Adam changes a parameter by :math:`\eta_t\,\hat m_t / (\sqrt{\hat v_t} + \epsilon)`, where
    :math:`\hat m_t` and :math:`\hat v_t` are running means of the gradient and of its square.
    Since :math:`|\hat m_t| \lesssim \sqrt{\hat v_t}`, a step is at most about the learning
    rate :math:`\eta_t`, whatever the gradient's size, and it is that large when the
    gradient keeps its sign and size from step to step (chapter 6's "speed limit"). Over the
    first :math:`T` steps of the run of ``config`` the change of a :math:`\log\sigma` is
    therefore at most about

    .. math::

        B(T) = f \sum_{t=0}^{T-1} \eta_t,

    with :math:`\eta_t` = :func:`bnn_course.train.learning_rate` ``(config, t, total)`` for
    ``total = config.epochs * steps_per_epoch`` (the engine's schedule) and
    :math:`f` = ``config.sigma_lr_factor`` (the sigma parameters' own Adam group). For the
    constant schedule :math:`B(T) = f\eta T`; for the cosine schedule over the whole run,
    :math:`B = f\eta\,(\text{total} + 1)/2`.

    Parameters
    ----------
    config:
        The run's configuration.
    steps_per_epoch:
        Optimiser steps per epoch, :math:`\lceil N / \text{batch size} \rceil`.
    steps:
        :math:`T`, in ``[0, total]``; ``None`` for the whole run.
    """
    _check_steps_per_epoch(steps_per_epoch)
    total = config.epochs * steps_per_epoch
    steps = total if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= total:
        raise ValueError(f"steps must be an int in [0, {total}] (the run's steps), got "
                         f"{steps!r}")
    return config.sigma_lr_factor * math.fsum(learning_rate(config, t, total)
                                              for t in range(steps))


def sigma_movement(history: Sequence[Mapping[str, Any]], config: TrainConfig,
                   steps_per_epoch: int,
                   initial_sigma: float | Mapping[str, float] | None = None
                   ) -> dict[str, Any]:
    r"""How far each layer's :math:`\sigma` moved after every epoch, against Adam's bound.

    With :math:`\bar\sigma_{e,l}` the mean weight :math:`\sigma` of layer :math:`l` after
    epoch :math:`e` (``history[e]["sigma"]``), :math:`\bar\sigma_{0,l}` its initial value and
    :math:`B` of :func:`adam_log_sigma_bound` after :math:`e` epochs of :math:`T` steps,

    .. math::

        \text{moved}_{e,l} = \log\bar\sigma_{e,l} - \log\bar\sigma_{0,l}, \qquad
        \text{share}_{e,l} = \text{moved}_{e,l} / B(eT).

    Every :math:`\log\sigma_i` of the layer moves by at most about :math:`B`, so
    :math:`\bar\sigma` does too, and :math:`|\text{share}| \lesssim 1`. A share near
    :math:`\pm 1` means the layer's :math:`\sigma` moved as fast as Adam allows: the step
    size, not the objective, set where they are, and the gradient of :math:`\log\sigma` kept
    its sign (as when the KL alone drives it). A share near 0 after many steps means the
    gradient's sign kept changing, or pointed nowhere any more: Adam's normalised steps
    cancelled.

    Parameters
    ----------
    history:
        ``TrainResult.history`` or the ``"history"`` of a ``metrics.json``: records with
        ``"epoch"`` (1, 2, ...) and ``"sigma"`` (``{layer: mean weight sigma}``), and
        optionally the logged ``"steps"``, whose last step of epoch :math:`e` must then be
        :math:`eT` (a check of ``steps_per_epoch``).
    config:
        The run's configuration (schedule, learning rate, ``sigma_lr_factor``, epochs).
    steps_per_epoch:
        :math:`T`.
    initial_sigma:
        :math:`\bar\sigma_{0,l}`: one value for every layer, or one per layer; ``None`` takes
        :math:`e^{\texttt{init\_log\_sigma}}`, where every :math:`\sigma` of a fresh model
        starts.

    Returns
    -------
    dict
        ``layers`` (the L layer names, input to output), ``epoch`` and ``step`` (int64, shape
        (E,)), ``bound`` (float64, (E,)), ``moved`` and ``share`` (float64, (E, L)).

    Raises
    ------
    ValueError
        On an empty history, records without ``"sigma"`` or with other layers than the
        first, epochs that are not 1, 2, ..., E with E at most ``config.epochs``, logged
        steps that disagree with ``steps_per_epoch``, or a non-positive sigma.
    """
    _check_steps_per_epoch(steps_per_epoch)
    if len(history) == 0:
        raise ValueError("history is empty: train for at least one epoch")
    if any("sigma" not in record or not record["sigma"] for record in history):
        raise ValueError("every history record needs a non-empty 'sigma' (mean sigma per "
                         "layer); a deterministic network has none")
    layers = list(history[0]["sigma"])
    epochs = [record.get("epoch") for record in history]
    if epochs != list(range(1, len(history) + 1)) or len(history) > config.epochs:
        raise ValueError(f"history's epochs must be 1, 2, ..., E with E <= config.epochs = "
                         f"{config.epochs}; got {epochs[:5]}{' ...' if len(epochs) > 5 else ''}")
    for record in history:
        if list(record["sigma"]) != layers:
            raise ValueError(f"epoch {record['epoch']} has the layers {list(record['sigma'])}, "
                             f"epoch 1 has {layers}")
        logged = record.get("steps") or []
        if logged and logged[-1]["step"] != record["epoch"] * steps_per_epoch:
            raise ValueError(f"epoch {record['epoch']} ends at step {logged[-1]['step']}, not "
                             f"at {record['epoch']} x steps_per_epoch = "
                             f"{record['epoch'] * steps_per_epoch}: is steps_per_epoch wrong?")
    if initial_sigma is None:
        initial_sigma = math.exp(config.init_log_sigma)
    if isinstance(initial_sigma, Mapping):
        missing = [name for name in layers if name not in initial_sigma]
        if missing:
            raise ValueError(f"initial_sigma lacks the layers {missing}")
        start = torch.tensor([float(initial_sigma[name]) for name in layers],
                             dtype=torch.float64)
    else:
        start = torch.full((len(layers),), float(initial_sigma), dtype=torch.float64)
    sigma = torch.tensor([[float(record["sigma"][name]) for name in layers]
                          for record in history], dtype=torch.float64)
    if not (start > 0).all() or not (sigma > 0).all():
        raise ValueError("every sigma (initial and logged) must be positive")
    # B(e T) for every epoch e from one pass over the run's schedule.
    total = config.epochs * steps_per_epoch
    rates = torch.tensor([learning_rate(config, t, total) for t in range(total)],
                         dtype=torch.float64)
    cumulative = config.sigma_lr_factor * torch.cumsum(rates, 0)
    epoch = torch.arange(1, len(history) + 1, dtype=torch.int64)
    step = epoch * steps_per_epoch
    bound = cumulative[step - 1]
    moved = sigma.log() - start.log()
    return {"layers": layers, "epoch": epoch, "step": step, "bound": bound, "moved": moved,
            "share": moved / bound[:, None]}


# ---------------------------------------------------------------------- activations


@torch.no_grad()
def activation_scales(
    model: nn.Module, images: torch.Tensor, num_samples: int
) -> dict[str, dict[str, float]]:
    r"""Signal and sampling noise of every Bayesian layer's pre-activation.

    Forward hooks on every Bayesian layer record its output :math:`h_l` (before the ReLU)
    for one pass of the posterior-mean network (``model(x, sample=False)``) and
    :math:`S` sampled passes (``model(x, sample=True)``, every layer drawing its weights).
    With :math:`\bar h_l` the posterior-mean pre-activation and
    :math:`\widehat{\operatorname{Var}}_s` the unbiased variance across the :math:`S`
    passes (accumulated in float64, centred on :math:`\bar h_l`),

    .. math::

        \text{signal}_l = \sqrt{\operatorname{mean}_{n,j} \bar h_{l,nj}^2}, \qquad
        \text{noise}_l = \sqrt{\operatorname{mean}_{n,j}
            \widehat{\operatorname{Var}}_s\big[h^{(s)}_{l,nj}\big]},

    where :math:`n` runs over the images and :math:`j` over every other position (units,
    or channels and pixels). This is the measurement of
    :func:`bnn_course.weight_noise.signal_to_noise_by_layer`, for any model, and both are
    computed by :func:`bnn_course.weight_noise.noise_statistics`. For one dense
    layer and a fixed input, :math:`\operatorname{Var}[h_j] = \sum_i \sigma_{W,ji}^2 x_i^2
    + \sigma_{b,j}^2`; deeper layers also inherit the noise of the layers below. With
    :math:`\sigma = 1` the noise exceeds the signal from the first layer on and grows by
    about :math:`\sqrt{\text{fan-in}/2}` per layer.

    Parameters
    ----------
    model:
        A Bayesian model (see the module docstring); every Bayesian layer must be called
        exactly once per forward pass.
    images:
        A fixed batch (B, C, H, W), ``uint8`` or normalised floats.
    num_samples:
        :math:`S \ge 2` sampled passes.

    Returns
    -------
    dict
        ``{layer_name: {"signal_rms", "noise_rms", "signal_to_noise", "sampled_rms"}}`` in
        input-to-output order; ``signal_to_noise`` is ``inf`` for a noiseless layer and
        ``sampled_rms`` is the RMS of the sampled pre-activations themselves (what the next
        layer receives, before the ReLU).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    layers = _require_bayesian_layers(model)
    x = _as_inputs(images)
    captured: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if name in captured:
                raise ValueError(f"layer {name!r} was called twice in one forward pass")
            captured[name] = output.detach()
        return hook

    def run(sample: bool) -> list[torch.Tensor]:
        captured.clear()
        model(x, sample=sample)
        missing = [name for name, _ in layers if name not in captured]
        if missing:
            raise ValueError(f"layers {missing} were not called in the forward pass")
        return [captured[name] for name, _ in layers]

    handles = [layer.register_forward_hook(recorder(name)) for name, layer in layers]
    try:
        statistics = noise_statistics(run, num_samples)
    finally:
        for handle in handles:
            handle.remove()
    return {name: layer for (name, _), layer in zip(layers, statistics, strict=True)}


# ---------------------------------------------------------------------- predictions


def prediction_collapse(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int = 10
) -> dict[str, Any]:
    r"""Is the network predicting (almost) one class for everything?

    With :math:`c_k` the number of images predicted as class :math:`k` and
    :math:`p_k = c_k / N`, the entropy of the predicted-class histogram

    .. math:: H = -\sum_k p_k \log p_k \qquad (0 \log 0 = 0)

    is 0 when every prediction is one class and :math:`\log K` when the classes are
    predicted equally often. A collapsed network has a top-class share near 1, a tiny
    :math:`H`, accuracy near that class's frequency, and a confusion matrix with one full
    column.

    Parameters
    ----------
    predictions:
        Predicted classes (N,) as integers, or scores (N, K) (log-probabilities,
        probabilities or logits; the arg-max is taken).
    labels:
        True classes (N,).
    num_classes:
        :math:`K \ge 2`.

    Returns
    -------
    dict
        ``predicted_class_counts`` (K,) int64; ``confusion_matrix`` (K, K) int64 of counts,
        rows the true class and columns the predicted class; floats ``top_class_share``
        (:math:`\max_k p_k`), ``accuracy``, ``predicted_class_entropy`` (:math:`H`, nats)
        and ``normalized_entropy`` (:math:`H / \log K \in [0, 1]`); ints ``top_class``
        (the most predicted, lowest index on ties) and ``num_predicted_classes`` (classes
        predicted at least once).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if predictions.dim() == 2:
        if predictions.shape[1] != num_classes:
            raise ValueError(f"scores have {predictions.shape[1]} columns, expected "
                             f"num_classes={num_classes}")
        predicted = predictions.argmax(dim=1)
    elif predictions.dim() == 1:
        if predictions.is_floating_point() or predictions.dtype == torch.bool:
            raise ValueError("1-D predictions must be integer classes; pass scores as (N, K)")
        predicted = predictions
    else:
        raise ValueError(f"predictions must be (N,) classes or (N, K) scores, got "
                         f"{tuple(predictions.shape)}")
    if labels.dim() != 1 or labels.shape[0] != predicted.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"expected non-empty labels (N,) matching predictions, got "
                         f"{tuple(labels.shape)} for {tuple(predictions.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer classes, got {labels.dtype}")
    predicted, labels = predicted.long().cpu(), labels.long().cpu()
    for name, values in (("predictions", predicted), ("labels", labels)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, got values in "
                             f"{values.min().item()}..{values.max().item()}")
    counts = torch.bincount(predicted, minlength=num_classes)
    confusion = torch.bincount(labels * num_classes + predicted,
                               minlength=num_classes**2).view(num_classes, num_classes)
    shares = counts.double() / predicted.numel()
    nonzero = shares[shares > 0]
    entropy = -(nonzero * nonzero.log()).sum().item()
    return {
        "predicted_class_counts": counts,
        "confusion_matrix": confusion,
        "top_class": int(counts.argmax()),
        "top_class_share": shares.max().item(),
        "accuracy": (predicted == labels).double().mean().item(),
        "predicted_class_entropy": entropy,
        "normalized_entropy": entropy / math.log(num_classes),
        "num_predicted_classes": int((counts > 0).sum()),
    }


# ---------------------------------------------------------------------- gradients


def gradient_norms(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_train: int,
    kl_scaling: str = "per_example",
    kl_weight: float = 1.0,
    *,
    sample: bool = True,
    num_samples: int = 1,
) -> dict[str, dict[str, float]]:
    r"""L2 norms of the gradients of the NLL part and the KL part of the loss, per layer.

    The loss is :mod:`bnn_course.train`'s, :math:`\text{NLL} + c\,\mathrm{KL}` (KL term
    from :func:`bnn_course.elbo.negative_elbo`, no warm-up). For every Bayesian layer the
    parameters are split into the means (weight and bias :math:`\mu`) and the sigma
    parameters (:math:`\lambda = \log\sigma`, or :math:`\rho` for softplus), and four norms
    are returned: :math:`\|\nabla_\mu \text{NLL}\|`, :math:`\|\nabla_\sigma \text{NLL}\|`,
    :math:`\|\nabla_\mu c\,\mathrm{KL}\|`, :math:`\|\nabla_\sigma c\,\mathrm{KL}\|`.

    The KL part has a closed form: per weight, with prior :math:`\mathcal{N}(0, s^2)`,

    .. math::

        \frac{\partial\, c\,\mathrm{KL}}{\partial \mu_i} = c\,\frac{\mu_i}{s^2}, \qquad
        \frac{\partial\, c\,\mathrm{KL}}{\partial \log\sigma_i}
            = c\left(\frac{\sigma_i^2}{s^2} - 1\right),

    zero at the prior and :math:`-c` per weight once :math:`\sigma_i \ll s`: with
    :math:`c = 1` (unscaled) every shrunk :math:`\log\sigma_i` is pulled back towards the
    prior with a gradient of about 1, however little the data gain from it. (At the seed
    initialisation :math:`\sigma = s` the KL gradient on the sigmas is exactly 0, and the
    gradient of the huge sampled NLL dominates; the pull appears as the sigmas shrink.)

    ``.grad`` is never touched (gradients come from :func:`torch.autograd.grad`) and the
    training mode is left as it is.

    Parameters
    ----------
    model:
        A Bayesian model (see the module docstring).
    images, labels:
        One batch, (B, C, H, W) and (B,), on the model's device.
    num_train, kl_scaling, kl_weight:
        :math:`N` and the KL settings, as in :func:`bnn_course.elbo.negative_elbo`.
    sample:
        ``True``: the NLL of sampled (Flipout) passes, as in training. ``False``: of the
        posterior-mean network, whose NLL does not depend on the sigmas (gradient 0).
    num_samples:
        Passes whose NLL gradients are averaged before taking norms (a less noisy
        estimate of the gradient of the expected NLL).

    Returns
    -------
    dict
        ``{layer_name: {"nll_mu", "nll_sigma", "kl_mu", "kl_sigma"}}`` of floats, in
        input-to-output order.
    """
    layers, x = _checked_batch(model, images, labels, num_train, num_samples)
    _kl_term(0.0, num_train, kl_scaling, kl_weight)  # invalid settings fail before any pass
    groups = []  # (layer name, "mu" or "sigma"), one per parameter
    parameters = []
    for name, layer in layers:
        for posterior in layer.posteriors():
            groups += [(name, "mu"), (name, "sigma")]
            parameters += [posterior.mu, posterior.sigma_parameter]

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach()
                for p, g in zip(parameters, grads, strict=True)]

    with torch.enable_grad():
        nll_grads = [torch.zeros_like(p) for p in parameters]
        for _ in range(num_samples):
            nll = F.nll_loss(model(x, sample=sample).float(), labels)
            for total, grad in zip(nll_grads, gradients(nll), strict=True):
                total += grad / num_samples
        kl_grads = gradients(_kl_term(model.kl_divergence(), num_train, kl_scaling, kl_weight))

    squares: dict[str, dict[str, float]] = {
        name: {"nll_mu": 0.0, "nll_sigma": 0.0, "kl_mu": 0.0, "kl_sigma": 0.0}
        for name, _ in layers}
    for (name, kind), nll_grad, kl_grad in zip(groups, nll_grads, kl_grads, strict=True):
        squares[name][f"nll_{kind}"] += nll_grad.double().pow(2).sum().item()
        squares[name][f"kl_{kind}"] += kl_grad.double().pow(2).sum().item()
    return {name: {key: math.sqrt(value) for key, value in norms.items()}
            for name, norms in squares.items()}


# ---------------------------------------------------------------------- early warnings


def early_warning_signs(
    history: Sequence[Mapping[str, Any]],
    num_classes: int = 10,
    prior_sigma: float | None = None,
    collapse: Mapping[str, Any] | None = None,
    *,
    chance_margin: float = 0.05,
    kl_to_nll_factor: float = 1000.0,
    sigma_tolerance: float = 0.1,
    top_class_share_limit: float = 0.5,
) -> list[str]:
    r"""Sentences naming the signs that a Bayesian network is not learning; [] if none.

    Checks the latest epoch of ``history`` (usable from the first epoch on, e.g. in
    ``train(..., on_epoch_end=...)`` with the records so far):

    1. a non-finite NLL or KL;
    2. training accuracy within ``chance_margin`` of chance, :math:`1/K`;
    3. training NLL at or above :math:`0.95 \log K`: no better than a uniform guess;
    4. the KL term more than ``kl_to_nll_factor`` times the NLL: the loss is mostly KL
       (with the KL unscaled, check ``kl_scaling``). The default, 1000, separates the two
       regimes: a healthy KL/N of the book's CNN starts at ~30x log K (73 nats per example
       at sigma = e^-5, N = 50,000) while an unscaled KL is ~10^6x;
    5. with two epochs or more, a training NLL that has not decreased since the first;
    6. given ``prior_sigma``, layers whose mean weight sigma (``record["sigma"]``) is within
       a factor ``1 ± sigma_tolerance`` of the prior's: the posterior has not left the prior;
    7. given ``collapse`` (from :func:`prediction_collapse`), a top-class share above
       ``top_class_share_limit``.

    Parameters
    ----------
    history:
        Per-epoch records of :func:`bnn_course.train.train` (``nll``, ``kl``, ``kl_term``,
        ``train_accuracy``, ``sigma``, ``epoch``).
    num_classes:
        :math:`K`.
    prior_sigma:
        :math:`s`, to compare the sigmas with; ``None`` skips check 6.
    collapse:
        The result of :func:`prediction_collapse` on recent predictions; ``None`` skips
        check 7.
    """
    if len(history) == 0:
        raise ValueError("history is empty: train for at least one epoch")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    latest = history[-1]
    missing = [key for key in ("nll", "kl", "kl_term", "train_accuracy") if key not in latest]
    if missing:
        raise ValueError(f"the latest history record lacks {missing}")
    epoch = latest.get("epoch", len(history))
    nll, kl, scaled_kl = float(latest["nll"]), float(latest["kl"]), float(latest["kl_term"])
    chance, log_k = 1.0 / num_classes, math.log(num_classes)
    warnings = []
    if not all(math.isfinite(v) for v in (nll, kl, scaled_kl)):
        warnings.append(f"epoch {epoch}: the loss is not finite (NLL {nll}, KL {kl}); see "
                        "bnn_course.train's divergence message for the likely causes.")
    accuracy = float(latest["train_accuracy"])
    if accuracy <= chance + chance_margin:
        warnings.append(f"epoch {epoch}: training accuracy {accuracy:.3f} is within "
                        f"{chance_margin} of chance (1/{num_classes} = {chance:.3f}): the "
                        "network is not learning from the data.")
    if nll >= 0.95 * log_k:
        warnings.append(f"epoch {epoch}: training NLL {nll:.4g} is not below log K = "
                        f"{log_k:.3f}, the NLL of a uniform guess.")
    if scaled_kl > kl_to_nll_factor * nll:
        warnings.append(f"epoch {epoch}: the KL term ({scaled_kl:.4g}) is "
                        f"{scaled_kl / nll if nll > 0 else math.inf:.3g} times the NLL "
                        f"({nll:.4g}): the loss is mostly KL; is the KL divided by the number "
                        "of training examples (kl_scaling='per_example')?")
    if len(history) >= 2 and not nll < float(history[0]["nll"]):
        warnings.append(f"epoch {epoch}: training NLL {nll:.4g} has not decreased since "
                        f"epoch {history[0].get('epoch', 1)} ({float(history[0]['nll']):.4g}).")
    if prior_sigma is not None:
        if prior_sigma <= 0:
            raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
        if "sigma" not in latest:
            raise ValueError("the latest history record has no 'sigma' to compare with "
                             "prior_sigma")
        at_prior = [name for name, value in latest["sigma"].items()
                    if abs(value / prior_sigma - 1.0) <= sigma_tolerance]
        if at_prior:
            warnings.append(f"epoch {epoch}: the mean sigma of {len(at_prior)} of "
                            f"{len(latest['sigma'])} layers ({', '.join(at_prior)}) is within "
                            f"{sigma_tolerance:.0%} of the prior's {prior_sigma}: the "
                            "posterior has not left the prior there.")
    if collapse is not None:
        share = float(collapse["top_class_share"])
        if share > top_class_share_limit:
            warnings.append(f"{share:.0%} of the predictions are class "
                            f"{collapse['top_class']}: the predictions have collapsed onto "
                            "one class.")
    return warnings
