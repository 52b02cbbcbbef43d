r"""Has the posterior converged, or is :math:`\sigma` where the optimiser's budget left it?

A variational posterior is only as good as the optimisation that found it. Bayes by
Backprop trains :math:`\lambda = \log\sigma` with Adam, and Adam moves a parameter by at most
about one learning rate per step, however strong the gradient: over a run, the mean
:math:`\log\sigma` of a layer can move at most

.. math::

    B = \sum_{t=1}^{T} \alpha_t \, c_\sigma

(:math:`\alpha_t` the scheduled learning rate of step :math:`t`, :math:`c_\sigma` the
``sigma_lr_factor`` of the sigma parameters' Adam group). A layer whose :math:`\log\sigma`
moved a large share of :math:`B` was pushed in one direction all the way; if it still moves
at that speed at the end of the run, its :math:`\sigma` is set by the step budget, not by the
ELBO. IVON has no step bound on :math:`\sigma`: its :math:`\sigma = 1/\sqrt{\lambda(h +
\delta)}` follows an average of Hessian estimates that forgets its initial value
:math:`h_0` at the rate :math:`\beta_2` (after :math:`T` steps :math:`h_0` still carries the
weight :math:`\beta_2^T`).

:func:`convergence_report` reads a run's history (one record per epoch, as
:func:`bnn_course.train.train` writes it) and says, per epoch, the negative ELBO per example
with its two parts, and per layer, how far the mean :math:`\log\sigma` moved, over the run
and over its last 20% of epochs, as a share of what the optimiser allowed. Its verdict:

* ``"held back by the step size"``: with Adam, a layer moved at least half of its bound
  during the last 20% of the epochs (it was still running at the optimiser's speed limit
  when the run ended); with IVON, :math:`\beta_2^T > 0.05` (the initial Hessian still
  weighs more than 5%);
* ``"still moving"``: not that, but a layer's mean :math:`\log\sigma` still moved by more
  than 0.05 (5% in :math:`\sigma`) in the last 20% of the epochs, or the KL term changed by
  more than 2% there;
* ``"converged"``: otherwise.

These are checks of the optimisation, not of the posterior's quality: a converged posterior
of a poor model is still poor (chapter 9 measures both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnn_course.train import TrainConfig, ivon_settings, layer_prior_sigmas, learning_rates

LATE_FRACTION = 0.2
"""The share of the epochs at the end of a run in which movement is judged."""

HELD_BACK_SHARE = 0.5
"""Adam: a layer that moved at least this share of its bound in the late window is held
back by the step size."""

HESSIAN_MEMORY_LIMIT = 0.05
r"""IVON: held back while the initial Hessian weighs more than this (:math:`\beta_2^T`)."""

LATE_DRIFT_LIMIT = 0.05
r"""Any optimiser: a layer whose mean :math:`\log\sigma` moved more than this in the late
window is still moving."""

KL_CHANGE_LIMIT = 0.02
"""Any optimiser: a KL term that changed by more than this fraction in the late window is
still moving."""

VERDICTS = ("converged", "held back by the step size", "still moving")


@dataclass(frozen=True)
class LayerMovement:
    """How the mean :math:`\\log\\sigma` of one layer's weights moved during a run."""

    name: str
    initial: float
    """Mean log sigma at initialisation."""
    final: float
    """Mean log sigma after the last epoch."""
    bound: float
    """Adam: the most the optimiser could have moved it over the run (NaN for IVON)."""
    late_moved: float
    """Its change over the late window (the last 20% of the epochs)."""
    late_bound: float
    """Adam: the most it could have moved in the late window (NaN for IVON)."""

    @property
    def moved(self) -> float:
        """Its change over the whole run."""
        return self.final - self.initial

    @property
    def share(self) -> float:
        """``|moved| / bound``: the share of the step bound it used (NaN for IVON)."""
        return abs(self.moved) / self.bound if self.bound > 0 else math.nan

    @property
    def late_share(self) -> float:
        """``|late_moved| / late_bound`` (NaN for IVON)."""
        return abs(self.late_moved) / self.late_bound if self.late_bound > 0 else math.nan


@dataclass(frozen=True)
class ConvergenceReport:
    """What :func:`convergence_report` found."""

    optimizer: str
    epochs: list[int]
    nll: list[float]
    """Training NLL per example (the epoch's mean, under sampled weights)."""
    kl_per_example: list[float]
    """KL(q || p) / N after every epoch."""
    layers: list[LayerMovement]
    late_epochs: int
    """Epochs in the late window."""
    hessian_memory: float
    r"""IVON: :math:`\beta_2^T`, the weight its initial Hessian still has (NaN for Adam)."""
    verdict: str
    """One of :data:`VERDICTS`."""
    reason: str
    """Why, in words, with the numbers."""
    approximate: bool
    """True when the history had no mean log sigma and ``log(mean sigma)`` stood in."""

    @property
    def negative_elbo(self) -> list[float]:
        """NLL + KL/N per example, per epoch (the ELBO's negative, per training example)."""
        return [a + b for a, b in zip(self.nll, self.kl_per_example, strict=True)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer: name, initial, final, moved, share, late_moved, late_share."""
        return [{"layer": m.name, "initial": m.initial, "final": m.final, "moved": m.moved,
                 "bound": m.bound, "share": m.share, "late_moved": m.late_moved,
                 "late_share": m.late_share} for m in self.layers]

    @property
    def max_share(self) -> float:
        """The largest share of the step bound any layer used (NaN for IVON)."""
        shares = [m.share for m in self.layers if not math.isnan(m.share)]
        return max(shares) if shares else math.nan


def _mean_log_sigmas(record: Mapping[str, Any]) -> tuple[dict[str, float], bool]:
    if "log_sigma" in record and record["log_sigma"]:
        return dict(record["log_sigma"]), False
    if record.get("sigma"):
        return {name: math.log(value) for name, value in record["sigma"].items()}, True
    raise ValueError("the history has no per-layer sigma: was the network Bayesian?")


def _initial_log_sigmas(config: TrainConfig, num_train: int) -> dict[str, float]:
    r"""Every layer's log sigma at initialisation: ``init_log_sigma`` (Adam), or IVON's
    :math:`-\frac12\log(\lambda(h_0 + \delta_l))` with the layer's weight decay."""
    priors = layer_prior_sigmas(config)
    if config.optimizer != "ivon":
        return dict.fromkeys(priors, config.init_log_sigma)
    ess = ivon_settings(config, num_train)["ess"]
    decays = {name: (config.ivon_weight_decay if config.ivon_weight_decay is not None
                     else 1.0 / (ess * prior**2)) for name, prior in priors.items()}
    return {name: -0.5 * math.log(ess * (config.ivon_hess_init + decay))
            for name, decay in decays.items()}


def convergence_report(history: Sequence[Mapping[str, Any]], config: TrainConfig,
                       num_train: int) -> ConvergenceReport:
    """Judge a run's posterior from its per-epoch ``history`` (see the module docstring).

    Parameters
    ----------
    history:
        The run's records, one per epoch, each with ``nll``, ``kl`` and per-layer
        ``log_sigma`` (or, from older runs, ``sigma``: its log then stands in, and the
        report says so).
    config:
        The run's configuration (its schedule and optimiser give the bounds).
    num_train:
        The number of images it trained on (steps per epoch, and KL/N).

    Raises
    ------
    ValueError
        For a deterministic network (no posterior), an empty or incomplete history.
    """
    if config.model != "bayesian" and config.optimizer != "ivon":
        raise ValueError(f"a {config.model!r} network trained with {config.optimizer} has no "
                         "posterior sigma to judge")
    if not history:
        raise ValueError("the history is empty")
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if len(history) != config.epochs:
        raise ValueError(f"the history has {len(history)} epochs, the configuration "
                         f"{config.epochs}: judge finished runs only")
    epochs = len(history)
    late = max(1, round(LATE_FRACTION * epochs))
    per_epoch = math.ceil(num_train / config.batch_size)
    logs = [_mean_log_sigmas(record) for record in history]
    approximate = any(flag for _, flag in logs)
    final = logs[-1][0]
    initial = _initial_log_sigmas(config, num_train)
    if set(initial) != set(final):  # a network of another layout: one initial value
        initial = dict.fromkeys(final, next(iter(initial.values())))
    start_of_late = logs[epochs - late - 1][0] if epochs > late else initial
    if config.optimizer == "adam":
        rates = learning_rates(config, num_train)
        factor = config.sigma_lr_factor
        bound = factor * sum(rates)
        late_bound = factor * sum(rates[(epochs - late) * per_epoch:])
        memory = math.nan
    else:
        bound = late_bound = math.nan
        memory = config.ivon_beta2 ** (per_epoch * epochs)
    layers = [LayerMovement(name, initial[name], final[name], bound,
                            final[name] - start_of_late[name], late_bound) for name in final]
    kl = [float(record["kl"]) / num_train for record in history]
    kl_before = kl[epochs - late - 1] if epochs > late else None
    verdict, reason = _verdict(config.optimizer, layers, memory, kl, kl_before, late)
    return ConvergenceReport(config.optimizer, [int(r["epoch"]) for r in history],
                             [float(r["nll"]) for r in history], kl, layers, late, memory,
                             verdict, reason, approximate)


def _verdict(optimizer: str, layers: list[LayerMovement], memory: float, kl: list[float],
             kl_before: float | None, late: int) -> tuple[str, str]:
    window = f"the last {late} epoch{'s' if late > 1 else ''}"
    if optimizer == "adam":
        pushed = [m for m in layers if m.late_share >= HELD_BACK_SHARE]
        if pushed:
            worst = max(pushed, key=lambda m: m.late_share)
            return VERDICTS[1], (
                f"{len(pushed)} of {len(layers)} layers still moved log sigma by at least "
                f"{HELD_BACK_SHARE:.0%} of what Adam allowed in {window} ({worst.name}: "
                f"{worst.late_share:.0%}, {worst.late_moved:+.3f} of {worst.late_bound:.3f})")
    elif memory > HESSIAN_MEMORY_LIMIT:
        return VERDICTS[1], (
            f"the initial Hessian still weighs {memory:.0%} of IVON's estimate (beta2^T > "
            f"{HESSIAN_MEMORY_LIMIT:.0%}): sigma is still close to where it started")
    drifting = [m for m in layers if abs(m.late_moved) > LATE_DRIFT_LIMIT]
    if drifting:
        worst = max(drifting, key=lambda m: abs(m.late_moved))
        return VERDICTS[2], (
            f"{len(drifting)} of {len(layers)} layers still moved mean log sigma by more than "
            f"{LATE_DRIFT_LIMIT} in {window} ({worst.name}: {worst.late_moved:+.3f})")
    if kl_before is not None and abs(kl[-1] - kl_before) > KL_CHANGE_LIMIT * abs(kl_before):
        return VERDICTS[2], (f"KL/N still changed from {kl_before:.3g} to {kl[-1]:.3g} in "
                             f"{window} (more than {KL_CHANGE_LIMIT:.0%})")
    if optimizer == "adam":
        worst = max(layers, key=lambda m: m.late_share)
        detail = (f"no layer moved more than {worst.late_share:.0%} of Adam's bound in "
                  f"{window}")
    else:
        detail = f"IVON's initial Hessian weighs {memory:.1e}"
    return VERDICTS[0], (f"{detail}; mean log sigma moved at most "
                         f"{max(abs(m.late_moved) for m in layers):.3f} there")
