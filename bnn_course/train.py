r"""Training a (Bayesian) CNN on CIFAR-10: the engine and the command line.

The loss of one mini-batch :math:`B` is the negative ELBO per training example
(chapter 2), with an optional weight :math:`\beta` and a linear warm-up :math:`\gamma_t`:

.. math::

    \mathcal{L}_t = \underbrace{-\frac{1}{|B|}\sum_{n\in B}\log p(y_n \mid x_n, w_t)}_{\text{NLL}}
    \; + \; \beta\,\gamma_t\,\frac{\mathrm{KL}(q \,\|\, p)}{N},
    \qquad w_t \sim q \text{ (Flipout)},

where :math:`N` is the number of training examples (``kl_scaling="unscaled"`` leaves out
the :math:`1/N`). It is :func:`bnn_course.elbo.negative_elbo`, the loss of chapter 2. Both
terms are logged separately.

:func:`train` reads as its parts: :func:`_setup` (seed, data, model, optimizer),
:func:`_restore` (resume from a checkpoint), :func:`_train_one_epoch` (each of its steps
is :func:`training_step`, the step ``benchmarks/throughput.py`` times),
:func:`_evaluate_epoch`, :func:`_check_finite` and :func:`_checkpoint_state`.

* Device: CUDA when present, then Apple's MPS, then the CPU. On CUDA the forward pass runs
  under ``torch.autocast`` in bfloat16 (the KL and the log-probabilities stay float32) and
  TF32 matrix products are allowed while :func:`train` runs (the global settings are
  restored when it returns) — :mod:`bnn_course.run_folder` holds this policy.
* Data: the whole training set lives on the device as ``uint8``; batches are augmented and
  normalised there (:mod:`bnn_course.data`).
* A checkpoint is written atomically after every epoch; ``resume=True`` continues the same
  run (same data order, same noise) after an interruption. On the CPU with a fixed seed an
  interrupted and resumed run ends with exactly the weights of an uninterrupted one.
* A non-finite loss, weight or metric stops training with a message naming the likely
  causes, before anything of that epoch is saved.
* An output folder holds one run: a new run there needs ``resume`` or ``overwrite``.

Command line: ``python -m bnn_course.train --help`` (one flag per :class:`TrainConfig`
field). Expected failures print one line ``error: ...``; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import operator
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course import config as run_config
from bnn_course.data import (
    CIFAR10Data,
    iterate_batches,
    load_cifar10,
    stratified_subset,
    validation_split,
)
from bnn_course.elbo import KL_SCALINGS, negative_elbo
from bnn_course.evaluation import evaluate
from bnn_course.ivon import IVON
from bnn_course.layers import preferred_memory_format
from bnn_course.models import BayesianCNN, DeterministicCNN
from bnn_course.posterior import GaussianPosterior
from bnn_course.provenance import device_description
from bnn_course.run_folder import (
    RunFolderError,
    atomic_torch_save,
    atomic_write_text,
    autocast_dtype,
    config_differences,
    data_identity,
    fast_matmul,
    identity_differences,
    prepare_run_folder,
    provenance,
)
from bnn_course.seeding import seed_everything

CHECKPOINT_FORMAT = "bnn_course.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CHECKPOINT_FIELDS = ("config", "epoch", "model", "optimizer", "history", "rng", "data_source")
"""The entries every checkpoint written by :func:`train` has (besides format and version)."""

MODELS = ("bayesian", "deterministic", "mc_dropout")
OPTIMIZERS = ("adam", "ivon")
SCHEDULES = ("cosine", "constant")
PARAMETRIZATIONS = ("log", "softplus")
PRIOR_SCALINGS = ("none", "fan_in")

RESUME_FREE_FIELDS: tuple[str, ...] = ("device", "compile", "progress", "log_interval")
"""Fields that may differ between an interrupted run and its resumption."""


def _option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002
    """A dataclass field with its command-line help text (and e.g. ``choices``) beside it."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Everything that defines a training run (one level, no nesting).

    The defaults are the book's recipe for the seed-sized BayesianCNN (chapter 6; chapter
    9 asks whether its posterior converges). Every field is
    also a flag of ``python -m bnn_course.train`` (``kl_weight`` is ``--kl-weight``), with
    the help text written beside the field; invalid values are a ``ValueError`` here.
    """

    model: str = _option("bayesian", "the network: the BayesianCNN, its deterministic twin, "
                         "or the twin with dropout kept on at test time", choices=MODELS)
    optimizer: str = _option("adam", "adam: the gradient of the per-example negative ELBO "
                             "with Adam (Bayes by Backprop for the BayesianCNN); ivon: IVON's "
                             "natural-gradient variational learning of a Gaussian posterior "
                             "over the deterministic twin's weights (needs model "
                             "deterministic)", choices=OPTIMIZERS)
    epochs: int = _option(30, "passes over the training set")
    batch_size: int = _option(256, "examples per mini-batch")
    lr: float = _option(1e-3, "Adam learning rate")
    sigma_lr_factor: float = _option(1.0, "the sigma parameters (log_sigma or rho) learn "
                                     "at lr times this factor, in their own Adam group")
    schedule: str = _option("cosine", "learning-rate schedule: cosine-annealed to 0 over "
                            "the run, or constant", choices=SCHEDULES)
    lr_warmup_epochs: float = _option(0.0, "epochs over which the learning rate grows "
                                      "linearly from 0 before the schedule takes over")
    kl_weight: float = _option(1.0, "beta, the weight of the KL term (1: the ELBO)")
    kl_scaling: str = _option("per_example", "per_example divides the KL by N (the ELBO "
                              "per example); unscaled adds it as it is (the mistake of "
                              "chapter 7)", choices=KL_SCALINGS)
    kl_warmup_epochs: float = _option(0.0, "epochs over which the KL weight grows linearly "
                                      "from 0 to kl_weight")
    dropout: float = _option(0.1, "dropout probability of the mc_dropout model, before "
                             "its two dense layers")
    conv_dropout: float = _option(0.0, "dropout probability of the mc_dropout model after "
                                  "every convolution block (0: none)")
    init_log_sigma: float = _option(-5.0, "initial log standard deviation of every weight")
    prior_sigma: float = _option(1.0, "standard deviation s of the N(0, s^2) prior")
    prior_scaling: str = _option("none", "none: every weight and bias has the prior N(0, "
                                 "s^2); fan_in: those of a layer with fan-in n get N(0, "
                                 "2 s^2 / n), the scale of He initialisation, so that a "
                                 "network drawn from the prior passes signals through all "
                                 "its layers", choices=PRIOR_SCALINGS)
    parametrization: str = _option("log", "sigma = exp(log_sigma) or softplus(rho)",
                                   choices=PARAMETRIZATIONS)
    ivon_ess: int | None = _option(None, "IVON: the effective sample size lambda; none: the "
                                   "number of training images")
    ivon_hess_init: float = _option(0.5, "IVON: the initial Hessian estimate h0 (the "
                                    "initial sigma is 1/sqrt(lambda (h0 + delta)))")
    ivon_beta1: float = _option(0.9, "IVON: the averaging rate of the gradient")
    ivon_beta2: float = _option(0.99999, "IVON: the averaging rate of the Hessian estimate")
    ivon_weight_decay: float | None = _option(None, "IVON: delta, the prior precision per "
                                              "example; none: 1 / (lambda prior_sigma^2), "
                                              "the BayesianCNN's N(0, prior_sigma^2) prior")
    ivon_clip_radius: float | None = _option(None, "IVON: clip every element of the "
                                             "preconditioned step to [-r, r]; none: no clip")
    ivon_mc_samples: int = _option(1, "IVON: posterior samples per training step")
    channels: tuple[int, ...] = _option((32, 64, 128), "output channels of the convolution "
                                        "blocks, comma-separated")
    hidden_features: int = _option(256, "width of the hidden dense layer")
    augment: bool = _option(True, "random crops and horizontal flips of training batches")
    train_subset: int | None = _option(None, "train on the first N training images, N/10 "
                                       "per class; none: on all of them")
    validation_size: int = _option(0, "hold out this many of the training images (N/10 "
                                   "per class, a seeded split) for tuning and calibration; "
                                   "0: train on all of them")
    epoch_eval_samples: int = _option(4, "posterior samples of the test evaluation after "
                                      "every epoch (0: posterior means only)")
    eval_samples: int = _option(20, "posterior samples of the final test evaluation (0: "
                                "posterior means only)")
    seed: int = _option(0, "seed of the initialisation, the data order and the noise")
    log_interval: int = _option(50, "log the loss terms (and check they are finite) every "
                                "this many steps")
    device: str = _option("auto", "auto (CUDA, else MPS, else CPU), cuda, cuda:1, mps or cpu")
    amp: bool = _option(True, "bfloat16 autocast of the forward pass on CUDA")
    compile: bool = _option(False, "torch.compile the model")
    progress: bool = _option(True, "progress bars")

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_problems(config: TrainConfig) -> list[str]:
    """``"name=value (what it must be)"`` for every invalid field of ``config``."""
    try:
        config.channels = tuple(n if isinstance(n, bool) else operator.index(n)
                                for n in config.channels)
    except TypeError:
        pass  # reported below
    c = config
    # Finite, and small enough for float32, in which the parameters and the prior live.
    finite = {name: _is_number(getattr(c, name)) and math.isfinite(getattr(c, name))
              and abs(getattr(c, name)) <= FLOAT32_MAX
              for name in ("lr", "sigma_lr_factor", "kl_weight", "kl_warmup_epochs",
                           "dropout", "conv_dropout", "init_log_sigma", "prior_sigma",
                           "lr_warmup_epochs", "ivon_hess_init", "ivon_beta1", "ivon_beta2")}
    optional_positive = {name: getattr(c, name) is None
                         or (_is_number(getattr(c, name)) and math.isfinite(getattr(c, name))
                             and 0 < getattr(c, name) <= FLOAT32_MAX)
                         for name in ("ivon_weight_decay", "ivon_clip_radius")}
    checks = {
        "model": (c.model in MODELS, f"one of {MODELS}"),
        "schedule": (c.schedule in SCHEDULES, f"one of {SCHEDULES}"),
        "parametrization": (c.parametrization in PARAMETRIZATIONS,
                            f"one of {PARAMETRIZATIONS}"),
        "kl_scaling": (c.kl_scaling in KL_SCALINGS, f"one of {KL_SCALINGS}"),
        "prior_scaling": (c.prior_scaling in PRIOR_SCALINGS
                          and not (c.prior_scaling == "fan_in"
                                   and c.ivon_weight_decay is not None),
                          f"one of {PRIOR_SCALINGS}; fan_in sets IVON's weight decay per "
                          "layer, so it excludes ivon_weight_decay"),
        "optimizer": (c.optimizer in OPTIMIZERS and (c.optimizer != "ivon"
                                                     or c.model == "deterministic"),
                      f"one of {OPTIMIZERS}; ivon learns a posterior over the deterministic "
                      "twin's weights, so it needs model='deterministic'"),
        "lr_warmup_epochs": (finite["lr_warmup_epochs"] and c.lr_warmup_epochs >= 0,
                             "a finite number >= 0"),
        "validation_size": (_is_int(c.validation_size) and c.validation_size >= 0
                            and c.validation_size % 10 == 0,
                            "an integer >= 0, a multiple of 10 (N/10 per class)"),
        "ivon_ess": (c.ivon_ess is None or (_is_int(c.ivon_ess) and c.ivon_ess >= 1),
                     "None or an integer >= 1"),
        "ivon_hess_init": (finite["ivon_hess_init"] and c.ivon_hess_init > 0,
                           "a finite number > 0"),
        "ivon_beta1": (finite["ivon_beta1"] and 0 <= c.ivon_beta1 < 1, "a number in [0, 1)"),
        "ivon_beta2": (finite["ivon_beta2"] and 0 <= c.ivon_beta2 < 1, "a number in [0, 1)"),
        "ivon_weight_decay": (optional_positive["ivon_weight_decay"],
                              "None or a finite float32 number > 0"),
        "ivon_clip_radius": (optional_positive["ivon_clip_radius"],
                             "None or a finite float32 number > 0"),
        "ivon_mc_samples": (_is_int(c.ivon_mc_samples) and c.ivon_mc_samples >= 1,
                            "an integer >= 1"),
        "epochs": (_is_int(c.epochs) and c.epochs >= 1, "an integer >= 1"),
        "batch_size": (_is_int(c.batch_size) and c.batch_size >= 1, "an integer >= 1"),
        "lr": (finite["lr"] and c.lr > 0, "a finite float32 number > 0"),
        "sigma_lr_factor": (finite["sigma_lr_factor"] and c.sigma_lr_factor > 0
                            and (not finite["lr"] or c.lr * c.sigma_lr_factor <= FLOAT32_MAX),
                            "a finite number > 0 (lr times it a float32 number)"),
        "kl_weight": (finite["kl_weight"] and c.kl_weight >= 0,
                      "a finite float32 number >= 0"),
        "kl_warmup_epochs": (finite["kl_warmup_epochs"] and c.kl_warmup_epochs >= 0,
                             "a finite number >= 0"),
        "dropout": (finite["dropout"] and 0 <= c.dropout < 1, "a number in [0, 1)"),
        "conv_dropout": (finite["conv_dropout"] and 0 <= c.conv_dropout < 1,
                         "a number in [0, 1)"),
        # sigma = exp(init_log_sigma) must be a normal float32 number, not 0 or inf.
        "init_log_sigma": (finite["init_log_sigma"] and abs(c.init_log_sigma) <= 80,
                           "a number in [-80, 80]"),
        "prior_sigma": (finite["prior_sigma"] and FLOAT32_TINY <= c.prior_sigma,
                        f"a number in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}] (float32)"),
        "channels": (isinstance(c.channels, tuple) and len(c.channels) > 0
                     and all(_is_int(n) and n >= 1 for n in c.channels),
                     "a non-empty sequence of integers >= 1, e.g. (32, 64, 128)"),
        "hidden_features": (_is_int(c.hidden_features) and c.hidden_features >= 1,
                            "an integer >= 1"),
        "train_subset": (c.train_subset is None
                         or (_is_int(c.train_subset) and c.train_subset >= 10),
                         "None or an integer >= 10 (N/10 images per class)"),
        "epoch_eval_samples": (_is_int(c.epoch_eval_samples) and c.epoch_eval_samples >= 0,
                               "an integer >= 0"),
        "eval_samples": (_is_int(c.eval_samples) and c.eval_samples >= 0, "an integer >= 0"),
        # torch.manual_seed takes a 64-bit integer.
        "seed": (_is_int(c.seed) and 0 <= c.seed < 2**63, "an integer in [0, 2**63)"),
        "log_interval": (_is_int(c.log_interval) and c.log_interval >= 1, "an integer >= 1"),
        "device": (isinstance(c.device, str) and c.device.strip() != "",
                   "a device name such as auto, cpu or cuda"),
    }
    return [f"{name}={getattr(c, name)!r} (must be {requirement})"
            for name, (ok, requirement) in checks.items() if not ok]


# Named starting points for the command line (``--recipe``); explicit flags override them.
RECIPES: dict[str, dict[str, Any]] = {
    # The book's recipe (chapter 6): the TrainConfig defaults.
    "default": {},
    # The reconstructed first attempt that stayed at 10% (chapter 7): the KL summed over all
    # weights and added unscaled to the mean NLL, and every log-sigma initialised at 0
    # (sigma = 1, the prior's scale), with a constant learning rate.
    "seed": {"kl_scaling": "unscaled", "init_log_sigma": 0.0, "schedule": "constant"},
}


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the metrics became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, foreign, or from another run."""


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA, else MPS, else CPU. Any other name must be a device that exists here.

    Raises
    ------
    ValueError
        For a name ``torch.device`` does not know, or a device that is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N "
                         "or mps") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only "
                             f"{torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available here")
    return device


def build_model(config: TrainConfig, num_classes: int = 10) -> nn.Module:
    """The network named by ``config.model`` with the configured shape and priors."""
    if config.model in ("deterministic", "mc_dropout"):
        dropping = config.model == "mc_dropout"
        return DeterministicCNN(num_classes, channels=config.channels,
                                hidden_features=config.hidden_features,
                                dropout=config.dropout if dropping else 0.0,
                                conv_dropout=config.conv_dropout if dropping else 0.0)
    model = BayesianCNN(num_classes, channels=config.channels,
                        hidden_features=config.hidden_features, prior_sigma=config.prior_sigma,
                        init_log_sigma=config.init_log_sigma,
                        parametrization=config.parametrization)
    for layer, prior in zip(model.layers(), layer_prior_sigmas(config, num_classes).values(),
                            strict=True):
        layer.prior_sigma = prior
    return model


def layer_fan_ins(config: TrainConfig, num_classes: int = 10) -> dict[str, int]:
    """The fan-in (inputs per output unit) of every layer of ``config``'s network, by name
    (``convs.0`` ... ``hidden``, ``classifier``): ``C_in * 3 * 3`` for a convolution."""
    from bnn_course.models import flat_feature_count

    fans, previous = {}, 3
    for index, width in enumerate(config.channels):
        fans[f"convs.{2 * index}"] = previous * 9
        fans[f"convs.{2 * index + 1}"] = width * 9
        previous = width
    fans["hidden"] = flat_feature_count(32, config.channels)
    fans["classifier"] = config.hidden_features
    return fans


def layer_prior_sigmas(config: TrainConfig, num_classes: int = 10) -> dict[str, float]:
    r"""The prior standard deviation of every layer's weights and biases, by name:
    :math:`s` (``prior_scaling="none"``) or :math:`s\sqrt{2/n}` for fan-in :math:`n`
    (``"fan_in"``)."""
    fans = layer_fan_ins(config, num_classes)
    if config.prior_scaling == "none":
        return dict.fromkeys(fans, config.prior_sigma)
    return {name: config.prior_sigma * math.sqrt(2.0 / fan) for name, fan in fans.items()}


def learning_rate(config: TrainConfig, step: int, total_steps: int,
                  warmup_steps: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``: constant, or
    cosine-annealed from ``lr`` to 0 over ``total_steps``; with ``warmup_steps > 0``
    multiplied by ``(step + 1) / warmup_steps`` while that is below 1 (a linear warm-up,
    ``config.lr_warmup_epochs`` times the steps per epoch)."""
    if config.schedule == "constant":
        rate = config.lr
    else:
        rate = 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total_steps)
                                                 / total_steps))
    if warmup_steps > 0:
        rate *= min(1.0, (step + 1) / warmup_steps)
    return rate


def learning_rates(config: TrainConfig, num_train: int) -> list[float]:
    """The scheduled learning rate of every step of a run of ``config`` on ``num_train``
    training images (:func:`learning_rate`, before any group's ``lr_factor``)."""
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = config.lr_warmup_epochs * steps_per_epoch
    return [learning_rate(config, step, total, warmup) for step in range(total)]


def mean_sigma_per_layer(model: nn.Module) -> dict[str, float]:
    """Mean posterior standard deviation of the weights of every Bayesian layer."""
    return {name: layer.weight_sigma.mean().item() for name, layer in model.bayesian_layers()}


def mean_log_sigma_per_layer(model: nn.Module) -> dict[str, float]:
    r"""Mean of :math:`\log\sigma` over the weights of every Bayesian layer (the quantity
    whose movement :mod:`bnn_course.convergence` compares with the optimiser's bound)."""
    return {name: layer.weight_posterior.log_sigma_values().mean().item()
            for name, layer in model.bayesian_layers()}


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact
    (:func:`bnn_course.run_folder.atomic_torch_save`)."""
    atomic_torch_save(path, state)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def config_from_dict(saved: dict[str, Any], path: str | os.PathLike = "checkpoint") -> TrainConfig:
    """The :class:`TrainConfig` of a checkpoint's ``"config"`` entry.

    Fields it lacks take their defaults; the old name ``kl_scaling="none"`` is read as
    ``"unscaled"``. Unknown fields or invalid values are a :class:`CheckpointError`.
    """
    values = dict(saved)
    if values.get("kl_scaling") == "none":
        values["kl_scaling"] = "unscaled"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{path} has configuration fields this bnn_course does not "
                              f"know: {unknown}")
    if isinstance(values.get("channels"), list):
        values["channels"] = tuple(values["channels"])
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an invalid configuration: {error}") from error


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``weights_only=True``: no code runs).

    ``state["config"]`` is returned as a plain dict with current field names (see
    :func:`config_from_dict`).

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable (corrupt or truncated), not a bnn_course
        checkpoint of a known version, or lacks one of :data:`CHECKPOINT_FIELDS`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise CheckpointError(
            f"{path} could not be read as a checkpoint ({type(error).__name__}: "
            f"{_one_line(error)}); it is corrupt, truncated, or not a PyTorch file. "
            "Delete it to start afresh.") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a bnn_course training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, "
                              f"this bnn_course reads version {CHECKPOINT_VERSION}")
    missing = [name for name in CHECKPOINT_FIELDS if name not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the checkpoint fields {missing}; it was not "
                              "written by bnn_course.train.train (or was edited). Delete it "
                              "to start afresh.")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} has no configuration dict")
    state["config"] = dataclasses.asdict(config_from_dict(state["config"], path))
    malformed = _malformed_fields(state)
    if malformed:
        raise CheckpointError(f"{path} has malformed checkpoint fields ({'; '.join(malformed)})"
                              "; it was not written by bnn_course.train.train (or was "
                              "edited). Delete it to start afresh.")
    return state


def _malformed_fields(state: dict[str, Any]) -> list[str]:
    """What is wrong with the types of a checkpoint's entries (:data:`CHECKPOINT_FIELDS`),
    so that a damaged file is a :class:`CheckpointError`, not a ``KeyError`` in resuming."""
    epochs = state["config"]["epochs"]
    epoch, rng, history = state["epoch"], state["rng"], state["history"]
    byte_tensor = (lambda t: isinstance(t, torch.Tensor) and t.dtype == torch.uint8)  # noqa: E731
    checks = {
        "epoch": _is_int(epoch) and 0 <= epoch <= epochs,
        "model": isinstance(state["model"], dict)
        and all(isinstance(t, torch.Tensor) for t in state["model"].values()),
        "optimizer": isinstance(state["optimizer"], dict)
        and {"state", "param_groups"} <= set(state["optimizer"]),
        "history": isinstance(history, list) and len(history) == epoch
        and all(isinstance(record, dict) for record in history),
        "rng": isinstance(rng, dict) and byte_tensor(rng.get("shuffle"))
        and byte_tensor(rng.get("torch")) and (rng.get("cuda") is None
                                              or byte_tensor(rng.get("cuda"))),
        "data_source": isinstance(state["data_source"], str),
        "data_identity": isinstance(state.get("data_identity", {}), dict),
    }
    return [name for name, ok in checks.items() if not ok]


def _restore_model(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"{path} holds weights of another architecture: "
                              f"{_one_line(error)}") from error


# ---------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, the per-epoch history, final metrics."""

    model: nn.Module
    history: list[dict[str, Any]]
    final: dict[str, float]
    config: TrainConfig
    data_source: str
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """The state of one training run: what :func:`train`'s parts share."""

    config: TrainConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    generator: torch.Generator
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    data_source: str
    identity: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.config.batch_size)


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        import ipywidgets  # noqa: F401  (tqdm.auto needs it for notebook bars)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


LIKELY_CAUSES = (
    "Likely causes: a learning rate too high for this model; posterior sigmas initialised "
    "too large (init_log_sigma near 0 or above makes exp() blow up); an unscaled KL term "
    "(kl_scaling='unscaled') dominating the loss; overflow in reduced precision (try "
    "amp=False); or NaN/inf values in the input data.")


def _diverged_message(epoch: int, step: int, nll: float, kl: float) -> str:
    return (f"training diverged at epoch {epoch}, around step {step}: NLL={nll}, KL={kl}. "
            + LIKELY_CAUSES)


def _training_pool(config: TrainConfig, data: CIFAR10Data) -> tuple[torch.Tensor, torch.Tensor]:
    if config.train_subset is None:
        return data.train_images, data.train_labels
    return stratified_subset(data.train_images, data.train_labels, config.train_subset)


def training_set(config: TrainConfig, data: CIFAR10Data) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels ``config`` trains on: ``data``'s training set (or its
    stratified ``train_subset``) without the ``validation_size`` held-out images
    (:func:`validation_set`)."""
    images, labels = _training_pool(config, data)
    if config.validation_size == 0:
        return images, labels
    return validation_split(images, labels, config.validation_size)[:2]


def validation_set(config: TrainConfig, data: CIFAR10Data) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``validation_size`` training images that a run of ``config`` holds out (a
    stratified split seeded with 0, :func:`bnn_course.data.validation_split`): never trained
    on, for tuning and calibration. A ``ValueError`` when ``validation_size`` is 0."""
    if config.validation_size == 0:
        raise ValueError("this configuration holds out no validation images "
                         "(validation_size=0)")
    return validation_split(*_training_pool(config, data), config.validation_size)[2:]


def run_data_identity(config: TrainConfig, data: CIFAR10Data) -> dict[str, Any]:
    """:func:`bnn_course.run_folder.data_identity` of the sets a run of ``config`` on
    ``data`` uses (the training subset, the test set); stored in every checkpoint."""
    return data_identity(data.source, *training_set(config, data), data.test_images,
                         data.test_labels)


def data_differences(state: dict[str, Any], identity: dict[str, Any],
                     parts: Sequence[str] = ("train", "test")) -> list[str]:
    """How the data ``identity`` (:func:`run_data_identity`) differs from a checkpoint's
    ``state``, in words, comparing ``parts`` (``("train",)``: the training set only). A
    checkpoint written before ``data_identity`` was stored is compared by its source only."""
    if "data_identity" not in state:
        return identity_differences({"source": state.get("data_source")}, identity, ())
    return identity_differences(state["data_identity"], identity, parts)


def _setup(config: TrainConfig, data: CIFAR10Data, device: torch.device) -> _Run:
    """Seed, put the (sub)sets on ``device``, build the model and the optimizer."""
    generator = seed_everything(config.seed)
    train_images, train_labels = training_set(config, data)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    model = build_model(config, len(data.classes)).to(device)
    return _Run(config=config, device=device, autocast_dtype=autocast_dtype(device, config.amp),
                generator=generator, train_images=train_images, train_labels=train_labels,
                test_images=test_images, test_labels=test_labels, data_source=data.source,
                identity=data_identity(data.source, train_images, train_labels, test_images,
                                       test_labels),
                model=model, optimizer=build_optimizer(model, config, int(train_labels.shape[0])))


def build_optimizer(model: nn.Module, config: TrainConfig,
                    num_train: int | None = None) -> torch.optim.Optimizer:
    """The optimiser of ``config.optimizer`` over ``model``'s parameters.

    * ``"adam"``: Adam with learning rate ``lr``; with ``sigma_lr_factor`` other than 1, the
      sigma parameters (``log_sigma`` or ``rho`` of every
      :class:`~bnn_course.posterior.GaussianPosterior`) form a second group with learning
      rate ``lr * sigma_lr_factor``. Each group's ``"lr_factor"`` is its multiple of the
      scheduled rate (:func:`learning_rate`).
    * ``"ivon"``: :class:`~bnn_course.ivon.IVON` with the ``ivon_*`` settings
      (:func:`ivon_settings`; ``num_train``, the number of training images, is the default
      effective sample size); with ``prior_scaling="fan_in"`` each layer is a parameter
      group whose weight decay gives it its prior (:func:`layer_prior_sigmas`).
    """
    if config.optimizer == "ivon":
        if num_train is None and config.ivon_ess is None:
            raise ValueError("IVON's effective sample size defaults to the number of "
                             "training images: pass num_train (or set ivon_ess)")
        settings = ivon_settings(config, num_train or 0)
        groups = [{"params": list(model.parameters())}]
        if config.prior_scaling == "fan_in":  # one group per layer, with its prior
            priors = layer_prior_sigmas(config, model.num_classes)
            groups = [{"params": list(layer.parameters()),
                       "weight_decay": 1.0 / (settings["ess"] * priors[name] ** 2)}
                      for name, layer in zip(priors, model.layers(), strict=True)]
        return IVON(groups, lr=config.lr, ess=settings["ess"],
                    hess_init=config.ivon_hess_init, beta1=config.ivon_beta1,
                    beta2=config.ivon_beta2, weight_decay=settings["weight_decay"],
                    clip_radius=config.ivon_clip_radius, mc_samples=config.ivon_mc_samples)
    separate = config.sigma_lr_factor != 1.0
    sigma_ids = {id(m.sigma_parameter) for m in model.modules()
                 if separate and isinstance(m, GaussianPosterior)}
    others = [p for p in model.parameters() if id(p) not in sigma_ids]
    sigmas = [p for p in model.parameters() if id(p) in sigma_ids]
    groups = [{"params": others, "lr": config.lr, "lr_factor": 1.0}]
    if sigmas:
        groups.append({"params": sigmas, "lr": config.lr * config.sigma_lr_factor,
                       "lr_factor": config.sigma_lr_factor})
    device = next(model.parameters()).device
    return torch.optim.Adam(groups, lr=config.lr, **adam_options(device))


def ivon_settings(config: TrainConfig, num_train: int) -> dict[str, float]:
    r"""IVON's effective sample size :math:`\lambda` (``ivon_ess``, else ``num_train``) and
    weight decay :math:`\delta` (``ivon_weight_decay``, else :math:`1/(\lambda s^2)` with
    :math:`s` = ``prior_sigma``, so that IVON's prior :math:`\mathcal{N}(0,
    (\lambda\delta)^{-1})` is the BayesianCNN's :math:`\mathcal{N}(0, s^2)`), and that prior's
    standard deviation ``prior_sigma``."""
    ess = float(config.ivon_ess or num_train)
    if not ess >= 1:
        raise ValueError(f"IVON's effective sample size must be >= 1, got {ess}")
    decay = (config.ivon_weight_decay if config.ivon_weight_decay is not None
             else 1.0 / (ess * config.prior_sigma**2))
    return {"ess": ess, "weight_decay": decay, "prior_sigma": 1.0 / math.sqrt(ess * decay)}


def ivon_posterior_network(model: nn.Module, optimizer: IVON) -> BayesianCNN:
    r"""The BayesianCNN that holds IVON's posterior over ``model``'s weights.

    ``model`` is a :class:`~bnn_course.models.DeterministicCNN` trained by ``optimizer``:
    every Flipout layer of the returned network gets the twin layer's weights as means
    :math:`\mu` and IVON's :math:`\sigma = 1/\sqrt{\lambda(h+\delta)}`
    (:meth:`~bnn_course.ivon.IVON.posterior_std`), and the prior
    :math:`\mathcal{N}(0, (\lambda\delta)^{-1})` of the layer's parameter group. So it
    predicts, samples (Flipout, one
    weight sample per example), and has a KL divergence, exactly like a BayesianCNN trained
    by Bayes by Backprop. A new network on ``model``'s device, in evaluation mode.
    """
    sigma = {id(p): s for p, s in zip((p for g in optimizer.param_groups for p in g["params"]),
                                      optimizer.posterior_std(), strict=True)}
    prior = {id(p): 1.0 / math.sqrt(g["ess"] * g["weight_decay"])
             for g in optimizer.param_groups for p in g["params"]}
    channels = tuple(conv.out_channels for conv in model.convs[1::2])
    device = model.classifier.weight.device
    with torch.random.fork_rng(devices=[]):  # the means' initialisation is overwritten below
        network = BayesianCNN(model.num_classes, model.in_channels, model.image_size, channels,
                              model.hidden.out_features).to(device)
    with torch.no_grad():
        for twin_layer, layer in zip(model.layers(), network.layers(), strict=True):
            if twin_layer.bias is not None and prior[id(twin_layer.weight)] != prior[
                    id(twin_layer.bias)]:
                raise ValueError("a layer's weights and bias need the same prior (one IVON "
                                 "parameter group)")
            layer.prior_sigma = prior[id(twin_layer.weight)]
            pairs = [(twin_layer.weight, layer.weight_posterior)]
            if twin_layer.bias is not None:
                pairs.append((twin_layer.bias, layer.bias_posterior))
            for weight, posterior in pairs:
                if id(weight) not in sigma:
                    raise ValueError("the optimiser does not hold every weight of the model")
                posterior.mu.copy_(weight)
                posterior.log_sigma.copy_(sigma[id(weight)].log())
    return network.eval()


def adam_options(device: torch.device | str) -> dict[str, bool]:
    """How Adam updates the parameters on ``device``: one fused kernel for all of them on
    CUDA and the CPU (``fused=True``: 1 op per step instead of about ten per parameter
    tensor; 6x faster on a 2-core CPU for the BayesianCNN), the multi-tensor ``foreach``
    path elsewhere. The update is Adam's either way (the same math, rounded differently)."""
    return {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {"foreach": True}


def _restore(run: _Run, path: Path) -> None:
    """Continue ``run`` from the checkpoint at ``path``: same configuration (up to
    ``device``, ``compile``, ``progress``, ``log_interval``) and the same data required."""
    state = load_checkpoint(path)
    differences = config_differences(state["config"], dataclasses.asdict(run.config),
                                     ignore=RESUME_FREE_FIELDS)
    if differences:
        raise CheckpointError(f"{path} belongs to a different run; resuming needs the same "
                              "configuration. Differences: " + "; ".join(differences))
    differences = data_differences(state, run.identity, ("train", "test"))
    if differences:
        raise CheckpointError(f"{path} was trained on other data; resuming needs the same "
                              "data (training and test sets). Differences: "
                              + "; ".join(differences) + ". Use another output folder.")
    _restore_model(run.model, state["model"], path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.history = list(state["history"])
    run.start_epoch = int(state["epoch"])
    try:
        run.generator.set_state(state["rng"]["shuffle"])
        torch.set_rng_state(state["rng"]["torch"])
        if run.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    except RuntimeError as error:
        raise CheckpointError(f"{path} holds a damaged random-number state: "
                              f"{_one_line(error)}") from error


def _kl_term(run: _Run, kl: torch.Tensor, warmup: float) -> torch.Tensor:
    """The KL part of the loss, :func:`~bnn_course.elbo.negative_elbo` with a zero NLL."""
    return negative_elbo(0.0, kl.detach(), run.num_train, kl_scaling=run.config.kl_scaling,
                         kl_weight=run.config.kl_weight * warmup)


class StepResult(typing.NamedTuple):
    """What :func:`training_step` returns, every tensor detached."""

    log_probs: torch.Tensor
    """(B, K) log-probabilities of the sampled forward pass, float32."""
    nll: torch.Tensor
    """The batch's mean negative log-likelihood (a scalar)."""
    kl: torch.Tensor
    """``model.kl_divergence()``, unscaled (a scalar)."""
    loss: torch.Tensor
    """The loss that was minimised, :func:`~bnn_course.elbo.negative_elbo` (a scalar)."""


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_train: int,
    forward: Callable[..., torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    kl_scaling: str = "per_example",
    kl_weight: float = 1.0,
) -> StepResult:
    """One optimisation step on the batch ``(x, y)``: the engine's step, and the benchmark's.

    ``x`` (B, C, H, W), normalised, is laid out in
    :func:`~bnn_course.layers.preferred_memory_format` (channels-last on the CPU); the
    sampled forward pass ``forward(x, sample=True)`` (``forward`` defaults to ``model``; the
    engine passes the compiled model with ``compile``) runs under ``autocast_dtype``
    autocast; the loss is :func:`~bnn_course.elbo.negative_elbo` of the NLL of labels ``y``
    (B,) and ``model.kl_divergence()``, with ``kl_scaling`` and ``kl_weight`` (the KL
    warm-up folded in); then backward and ``optimizer.step()``. No device sync.
    """
    if x.shape[:1] != y.shape:
        raise ValueError(f"training_step needs one label per example: x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    forward = model if forward is None else forward
    if x.dim() == 4:
        x = x.contiguous(memory_format=preferred_memory_format(x.device))
    autocasting = torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                 enabled=autocast_dtype is not None)
    if isinstance(optimizer, IVON):
        return _ivon_step(forward, optimizer, x, y, autocasting)
    with autocasting:
        log_probs = forward(x, sample=True)
    nll = F.nll_loss(log_probs.float(), y)
    kl = model.kl_divergence()
    loss = negative_elbo(nll, kl, num_train, kl_scaling=kl_scaling, kl_weight=kl_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return StepResult(log_probs.detach(), nll.detach(), kl.detach(), loss.detach())


def _ivon_step(forward: Callable[..., torch.Tensor], optimizer: IVON, x: torch.Tensor,
               y: torch.Tensor, autocasting: torch.autocast) -> StepResult:
    """:func:`training_step` for :class:`~bnn_course.ivon.IVON`: the loss of each of its
    posterior samples is the batch's mean NLL alone (IVON adds the prior in its update).
    ``log_probs`` are those of the last sample; ``kl`` is 0 (IVON's KL is not a term of
    its loss; :func:`train` logs the posterior's KL separately)."""
    kept: dict[str, torch.Tensor] = {}

    def closure() -> torch.Tensor:
        with autocasting:
            log_probs = forward(x, sample=True)
        nll = F.nll_loss(log_probs.float(), y)
        nll.backward()
        kept["log_probs"] = log_probs.detach()
        return nll

    nll = optimizer.step(closure)
    return StepResult(kept["log_probs"], nll, nll.new_zeros(()), nll)


def posterior_network(model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
    """The network that predicts with the learned posterior: ``model`` itself, or for
    IVON the BayesianCNN of :func:`ivon_posterior_network`."""
    if isinstance(optimizer, IVON):
        return ivon_posterior_network(model, optimizer)
    return model


def _train_one_epoch(run: _Run, forward: nn.Module, epoch: int) -> dict[str, Any]:
    """One pass over the shuffled training set: the epoch's training part of its record."""
    config, device = run.config, run.device
    steps_per_epoch, num_train = run.steps_per_epoch, run.num_train
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    lr_warmup_steps = config.lr_warmup_epochs * steps_per_epoch
    run.model.train()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # nll, correct, loss
    kl_value, warmup = torch.zeros((), device=device), 1.0
    step_log: list[dict[str, float]] = []
    bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    batches = iterate_batches(run.train_images, run.train_labels, config.batch_size,
                              shuffle=True, generator=run.generator, augment=config.augment)
    try:
        for index, (x, y) in enumerate(batches):
            step = epoch * steps_per_epoch + index
            scheduled = learning_rate(config, step, total_steps, lr_warmup_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = scheduled * group.get("lr_factor", 1.0)
            warmup = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
            log_probs, nll, kl_value, loss = training_step(
                run.model, run.optimizer, x, y, num_train=num_train, forward=forward,
                autocast_dtype=run.autocast_dtype, kl_scaling=config.kl_scaling,
                kl_weight=config.kl_weight * warmup)
            with torch.no_grad():  # StepResult's tensors are already detached
                sums += torch.stack([nll.double() * y.shape[0],
                                     (log_probs.argmax(-1) == y).sum().double(),
                                     loss.double()])
            # One device sync every log_interval steps: check finiteness, log the two loss
            # terms of this step, refresh the bar.
            if (index + 1) % config.log_interval == 0 or index == steps_per_epoch - 1:
                if isinstance(run.optimizer, IVON):  # the KL of IVON's current posterior
                    kl_value = run.optimizer.kl_divergence()
                step_terms = [nll, kl_value, _kl_term(run, kl_value, warmup)]
                values = torch.cat([sums, torch.stack([t.double() for t in step_terms])]).tolist()
                summary, (step_nll, step_kl, step_kl_term) = values[:3], values[3:]
                step_log.append({"step": step + 1, "nll": step_nll, "kl": step_kl,
                                 "kl_term": step_kl_term})
                if not math.isfinite(summary[2]):
                    raise TrainingDiverged(_diverged_message(
                        epoch + 1, step + 1, step_nll, step_kl))
                if bar is not None:
                    seen = min((index + 1) * config.batch_size, num_train)
                    bar.set_postfix(nll=f"{summary[0] / seen:.3f}",
                                    kl=f"{step_kl:.3g}", acc=f"{summary[1] / seen:.3f}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    nll_sum, correct, _ = sums.tolist()
    return {
        "epoch": epoch + 1,
        "nll": nll_sum / num_train,
        "kl": kl_value.item(),
        "kl_term": _kl_term(run, kl_value, warmup).item(),
        "train_accuracy": correct / num_train,
        "images_per_second": num_train / seconds,
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "steps": step_log,
    }


def _evaluate_epoch(run: _Run) -> dict[str, Any]:
    """The test part of an epoch's record (``epoch_eval_samples`` samples) and the mean
    sigma and log sigma of every Bayesian layer (of :func:`posterior_network`)."""
    network = posterior_network(run.model, run.optimizer)
    test = evaluate(network, run.test_images, run.test_labels,
                    run.config.epoch_eval_samples, autocast_dtype=run.autocast_dtype)
    return {
        "test_accuracy_mean": test["accuracy_mean"],
        "test_nll_mean": test["nll_mean"],
        "test_accuracy_mc": test.get("accuracy_mc", test["accuracy_mean"]),
        "test_nll_mc": test.get("nll_mc", test["nll_mean"]),
        "test_entropy_mc": test.get("entropy_mc", test["entropy_mean"]),
        "sigma": mean_sigma_per_layer(network),
        "log_sigma": mean_log_sigma_per_layer(network),
    }


def _check_finite(run: _Run, record: dict[str, Any]) -> None:
    """:class:`TrainingDiverged` if a weight or a number of ``record`` is NaN or infinite:
    such a state is never checkpointed (the previous epoch's checkpoint stays)."""
    numbers = {key: value for key, value in record.items() if isinstance(value, float)}
    numbers.update({f"sigma/{name}": value for name, value in record["sigma"].items()})
    problems = [key for key, value in numbers.items() if not math.isfinite(value)]
    weights = {name: tensor for name, tensor in run.model.state_dict().items()
               if tensor.is_floating_point()}
    if isinstance(run.optimizer, IVON):  # its Hessian estimates are the posterior's sigmas
        weights.update({f"ivon hess {i}": h for i, h in enumerate(
            state["hess"] for state in run.optimizer.state.values() if "hess" in state)})
    with torch.no_grad():  # one device sync for all tensors
        finite = torch.stack([torch.isfinite(t).all() for t in weights.values()]).tolist()
    bad_weights = [name for name, ok in zip(weights, finite, strict=True) if not ok]
    if not problems and not bad_weights:
        return
    epoch = record["epoch"]
    found = []
    if problems:
        found.append(f"metrics {problems}")
    if bad_weights:
        found.append(f"weights {bad_weights[:5]}" + (" ..." if len(bad_weights) > 5 else ""))
    kept = f" (the checkpoint of epoch {epoch - 1} stays)" if epoch > 1 else ""
    raise TrainingDiverged(f"training diverged in epoch {epoch}: non-finite "
                           f"{'; '.join(found)}. Nothing of epoch {epoch} was saved{kept}. "
                           + LIKELY_CAUSES)


def _checkpoint_state(run: _Run, epoch: int) -> dict[str, Any]:
    """Everything :func:`_restore` needs to continue after ``epoch``."""
    device = run.device
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dataclasses.asdict(run.config),
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "history": run.history,
        "rng": {"shuffle": run.generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "data_source": run.data_source,
        "data_identity": run.identity,
    }


def _epoch_line(record: dict[str, Any], config: TrainConfig) -> str:
    """One line per epoch. The KL term is labelled as it enters the loss: ``kl/N`` (per
    example), or ``kl`` for the unscaled recipe, where the summed KL is added as it is."""
    kl_label = "kl/N" if config.kl_scaling == "per_example" else "kl"
    if config.kl_weight != 1.0:
        kl_label = f"{config.kl_weight:g} {kl_label}"
    return (f"epoch {record['epoch']:3d}/{config.epochs}  nll {record['nll']:.4f}  "
            f"{kl_label} {record['kl_term']:.4f}  train acc {record['train_accuracy']:.3f}  "
            f"test acc {record['test_accuracy_mean']:.3f} (mean) "
            f"{record['test_accuracy_mc']:.3f} (MC)  {record['images_per_second']:.0f} img/s")


def train(
    config: TrainConfig,
    data: CIFAR10Data,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``build_model(config)`` on ``data`` and evaluate it on the test set.

    Parameters
    ----------
    config:
        The run's configuration.
    data:
        Training and test images (``uint8`` ``(N, 3, 32, 32)``) and labels; moved to the
        training device here if they are not there yet.
    out_dir:
        Where ``checkpoint.pt`` is written after every epoch (``None``: no checkpoints).
        Temporary files of interrupted writes there are removed first. A folder that
        already holds a run (``checkpoint.pt`` or ``metrics.json``) is refused
        (:class:`~bnn_course.run_folder.RunFolderError`) unless ``resume`` or ``overwrite``.
    resume:
        Continue from ``out_dir/checkpoint.pt`` if it exists (same configuration and the
        same training and test data required, else :class:`CheckpointError`).
    on_epoch_end:
        Called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
    log:
        Receives one line per epoch (``print`` by default; pass ``lambda s: None`` to mute).
    overwrite:
        Delete a run found in ``out_dir`` and start afresh.

    Returns
    -------
    TrainResult
        ``history`` has one record per epoch: ``nll``, ``kl`` (total, unscaled),
        ``kl_term`` (as added to the loss; both at the epoch's last step),
        ``train_accuracy`` (of the sampled network on augmented batches),
        ``test_accuracy_mean``/``test_nll_mean`` (posterior means),
        ``test_accuracy_mc``/``test_nll_mc``/``test_entropy_mc`` (``epoch_eval_samples``
        samples), ``sigma`` (mean weight sigma per layer), ``images_per_second``, ``lr``,
        ``seconds``, and ``steps``: the NLL, KL and KL term of every ``log_interval``-th
        step (the batch's values, for the loss decomposition). ``final`` is
        :func:`~bnn_course.evaluation.evaluate` on the test set with ``eval_samples``
        samples; with ``validation_size``, ``extra["validation"]`` is the same on the
        held-out training images (for tuning: never the test set). ``model`` is the
        network that predicts with the learned posterior (:func:`posterior_network`: for
        IVON a BayesianCNN holding IVON's posterior, else the trained network); each
        record also has ``log_sigma``, the mean log sigma of every Bayesian layer.

    Raises
    ------
    TrainingDiverged
        When the loss, a weight or a metric becomes NaN or infinite (no checkpoint of that
        epoch is written).
    """
    device = select_device(config.device)
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        prepare_run_folder(folder, (CHECKPOINT_NAME, METRICS_NAME), resume=resume,
                           overwrite=overwrite)
    checkpoint_path = folder / CHECKPOINT_NAME if folder is not None else None
    with fast_matmul(device):
        run = _setup(config, data, device)
        if resume and checkpoint_path is not None and checkpoint_path.exists():
            _restore(run, checkpoint_path)
            log(f"resumed from {checkpoint_path} after epoch {run.start_epoch}")
        if folder is not None and run.start_epoch < config.epochs:
            (folder / METRICS_NAME).unlink(missing_ok=True)  # it would describe an older state
        forward = torch.compile(run.model) if config.compile else run.model
        for epoch in range(run.start_epoch, config.epochs):
            record = _train_one_epoch(run, forward, epoch)
            record.update(_evaluate_epoch(run))
            _check_finite(run, record)
            run.history.append(record)
            log(_epoch_line(record, config))
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, _checkpoint_state(run, epoch + 1))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
        network = posterior_network(run.model, run.optimizer)
        final = evaluate(network, run.test_images, run.test_labels, config.eval_samples,
                         autocast_dtype=run.autocast_dtype)
        extra = {}
        if config.validation_size:
            images, labels = validation_set(config, data)
            extra["validation"] = evaluate(network, images.to(device), labels.to(device),
                                           config.eval_samples,
                                           autocast_dtype=run.autocast_dtype)
    return TrainResult(model=network, history=run.history, final=final, config=config,
                       data_source=data.source, device=device_description(device),
                       extra=extra)


def set_aside_other_data(out_dir: str | os.PathLike, config: TrainConfig,
                         data: CIFAR10Data, *, other_configuration: bool = False,
                         ) -> Path | None:
    """Rename ``out_dir/checkpoint.pt`` to ``checkpoint-other-data-<mtime>.pt`` when it was
    trained on other data than ``data`` (the training subset that ``config`` selects, and
    the test set), so that :func:`train` with ``resume=True`` starts afresh instead of
    refusing; the old run is kept. With ``other_configuration``, a checkpoint of another
    configuration (other than in :data:`RESUME_FREE_FIELDS`) is set aside too, as
    ``checkpoint-other-run-<mtime>.pt``: for run folders a chapter owns, whose recipe may
    change between versions of the book. Returns the new path, or ``None`` when there is no
    checkpoint or it can be resumed.

    A notebook calls this before resuming, because the data can change under a run folder:
    smoke mode on the synthetic stand-in, then on a real copy of CIFAR-10.
    """
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    train_images, train_labels = training_set(config, data)
    identity = data_identity(data.source, train_images, train_labels, data.test_images,
                             data.test_labels)
    if data_differences(state, identity, ("train", "test")):
        kind = "data"
    elif other_configuration and config_differences(
            state["config"], dataclasses.asdict(config), ignore=RESUME_FREE_FIELDS):
        kind = "run"
    else:
        return None
    aside = path.with_name(f"checkpoint-other-{kind}-{int(path.stat().st_mtime)}.pt")
    path.rename(aside)
    return aside


def load_trained_model(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network stored in a checkpoint; returns ``(model, checkpoint_state)``.

    For a run trained with IVON the model is the posterior's BayesianCNN
    (:func:`ivon_posterior_network`), rebuilt from the twin's weights and the optimiser's
    Hessian estimates in the checkpoint."""
    path = Path(path)
    state = load_checkpoint(path)
    config = config_from_dict(state["config"], path)
    model = build_model(config)
    _restore_model(model, state["model"], path)
    model = model.to(device)
    if config.optimizer == "ivon":
        try:
            ess = float(state["optimizer"]["param_groups"][0]["ess"])
            optimizer = build_optimizer(model, dataclasses.replace(config, ivon_ess=None),
                                        num_train=max(1, round(ess)))
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} holds no usable IVON state: "
                                  f"{_one_line(error)}") from error
        model = ivon_posterior_network(model, optimizer)
    return model.eval(), state


# ---------------------------------------------------------------------- command line

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, CheckpointError, TrainingDiverged, RunFolderError)
"""Failures a command line reports as one ``error: ...`` line (a bad value, a missing file
or folder, a foreign checkpoint, a divergence, an occupied output folder)."""


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``error: ...``, exit status 2.

    Negative numbers in scientific notation (``--init-log-sigma -1e-3``) and ``-inf`` are
    read as values, as argparse already reads ``-5`` and ``-0.5``; none of our flags looks
    like them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.IGNORECASE)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _int_tuple(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 32,64,128, got {text!r}")
    return values


def _optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _optional_float(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_config_arguments(parser: argparse._ActionsContainer,
                         defaults: TrainConfig | None = None,
                         exclude: Sequence[str] = ()) -> list[str]:
    """Add one flag per :class:`TrainConfig` field (not in ``exclude``) to ``parser`` (a
    parser or an argument group).

    ``kl_weight`` becomes ``--kl-weight``, with the field's help text and ``choices``;
    a yes/no field ``augment`` becomes ``--augment`` / ``--no-augment``; ``channels`` takes
    ``32,64,128``. The destination of each flag is the field's name. Returns those names.
    """
    defaults = TrainConfig() if defaults is None else defaults
    hints = typing.get_type_hints(TrainConfig)
    names = []
    for item in dataclasses.fields(TrainConfig):
        if item.name in exclude:
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        default = getattr(defaults, item.name)
        shown = ("none" if default is None else ",".join(str(v) for v in default)
                 if isinstance(default, tuple) else "%(default)s")
        options: dict[str, Any] = {"dest": item.name, "default": default,
                                   "help": f"{item.metadata['help']} (default: {shown})"}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind == tuple[int, ...]:
            options.update(type=_int_tuple, metavar="C1,C2,...")
        elif kind == int | None:
            options.update(type=_optional_int, metavar="N")
        elif kind == float | None:
            options.update(type=_optional_float, metavar="X")
        else:
            options["type"] = kind
            if "choices" in item.metadata:
                options["choices"] = item.metadata["choices"]
        parser.add_argument(flag, **options)
        names.append(item.name)
    return names


def config_from_arguments(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags (those :func:`add_config_arguments` added),
    with ``overrides`` on top."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    return TrainConfig(**{**values, **overrides})


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among ``argv``, or ``BNN_COURSE_DEBUG`` set to a true word."""
    if "--debug" in argv:
        return True
    try:
        return run_config.env_flag(run_config.DEBUG_ENV)
    except ValueError:
        return False


def run_command_line(body: Callable[[list[str]], Any], argv: Sequence[str] | None) -> Any:
    """Run ``body(argv)``; turn an expected failure (:data:`EXPECTED_ERRORS`) into one line
    ``error: ...`` on stderr and exit status 1, unless :func:`debug_requested`, which lets
    the exception (and its traceback) through."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(arguments)
    except EXPECTED_ERRORS as error:
        if debug_requested(arguments):
            raise
        print(f"error: {_one_line(error)} (--debug or {run_config.DEBUG_ENV}=1 shows the "
              "traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def metrics_document(result: TrainResult, data: CIFAR10Data, smoke: bool) -> dict[str, Any]:
    """The content of ``metrics.json``: final metrics, history, config and provenance."""
    return {
        "final": {
            "test_accuracy_mean": result.final["accuracy_mean"],
            "test_nll_mean": result.final["nll_mean"],
            "test_accuracy_mc": result.final.get("accuracy_mc"),
            "test_nll_mc": result.final.get("nll_mc"),
            "test_entropy_mc": result.final.get("entropy_mc"),
            "eval_samples": result.config.eval_samples,
        },
        "validation": result.extra.get("validation"),
        "history": result.history,
        "config": dataclasses.asdict(result.config),
        "provenance": {
            **provenance(result.device, smoke=smoke, data_source=data.source),
            "data_is_jpeg_copy": data.is_jpeg,
            "data_is_synthetic": data.is_synthetic,
            "num_train": int(training_set(result.config, data)[1].shape[0]),
            "num_validation": result.config.validation_size,
            "num_test": int(data.test_labels.shape[0]),
        },
    }


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m bnn_course.train``: one flag per :class:`TrainConfig`
    field (:func:`add_config_arguments`) and the run's own flags."""
    parser = CommandLineParser(
        prog="python -m bnn_course.train",
        description="Train the BayesianCNN (or its deterministic twin) on CIFAR-10 with the "
                    "per-example ELBO; writes OUT/metrics.json and OUT/checkpoint.pt.")
    add = parser.add_argument
    add("--recipe", choices=sorted(RECIPES), default="default",
        help="a named configuration; 'seed' is the reconstructed failing first attempt "
             "(unscaled KL, log-sigma initialised at 0). Flags given explicitly override "
             "the recipe (default: %(default)s)")
    add("--data", default=None,
        help="folder with CIFAR-10 (cifar-10-batches-py or an image-folder tree train/, "
             "test/); default: $BNN_COURSE_DATA, else ~/.cache/bnn_course/data (downloaded "
             "there when missing)")
    add("--out", default="runs/cifar10", help="output folder (default: %(default)s)")
    add("--test-subset", type=_optional_int, default=None, metavar="N",
        help="evaluate on the first N test images, N/10 per class (default: all)")
    add("--resume", action="store_true",
        help="continue the run in OUT from its checkpoint (same settings and data required)")
    add("--overwrite", action="store_true",
        help="replace a run found in OUT (without it, and without --resume, an occupied "
             "OUT is an error)")
    add("--smoke", action="store_true",
        help="smoke mode (also selected by BNN_COURSE_SMOKE=1): a small subset of CIFAR-10 "
             "(or, without any copy, a synthetic stand-in), for checking that everything runs")
    add("--debug", action="store_true", help="show the full traceback of an error")
    add_config_arguments(parser)
    return parser


def _main(argv: list[str]) -> dict[str, Any]:
    parser = build_parser()
    recipe, _ = parser.parse_known_args(argv)
    parser.set_defaults(**RECIPES[recipe.recipe])
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:  # --overwrite would delete what --resume continues
        parser.error("--resume and --overwrite exclude each other")
    config = config_from_arguments(args)
    smoke = bool(args.smoke) or run_config.is_smoke()
    # Before the data are loaded, so that these fail fast: a bad device, an occupied folder.
    select_device(config.device)
    if not (args.resume or args.overwrite):
        prepare_run_folder(args.out, (CHECKPOINT_NAME, METRICS_NAME), resume=False,
                           overwrite=False)
    data = load_cifar10(args.data, smoke=smoke, device="cpu")
    if args.test_subset is not None:
        test_images, test_labels = stratified_subset(data.test_images, data.test_labels,
                                                     args.test_subset)
        data = dataclasses.replace(data, test_images=test_images, test_labels=test_labels)
    result = train(config, data, out_dir=args.out, resume=args.resume, overwrite=args.overwrite)
    document = metrics_document(result, data, smoke)
    document["recipe"] = args.recipe
    document["test_subset"] = args.test_subset
    out = Path(args.out)
    atomic_write_text(out / METRICS_NAME, json.dumps(document, indent=2))
    final = document["final"]
    mc = ("no MC evaluation (--eval-samples 0)" if final["test_accuracy_mc"] is None
          else f"{final['test_accuracy_mc']:.4f} (MC, {config.eval_samples} samples)")
    print(f"test accuracy {final['test_accuracy_mean']:.4f} (posterior means), {mc}; "
          f"data: {data.source}; device: {result.device}; wrote {out / METRICS_NAME}")
    return document


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m bnn_course.train``; returns the metrics document.

    An expected failure is one line ``error: ...`` on stderr and ``SystemExit(1)`` (bad
    flags: ``SystemExit(2)``); ``--debug`` or ``BNN_COURSE_DEBUG=1`` shows the traceback.
    """
    return run_command_line(_main, argv)


if __name__ == "__main__":
    main()
