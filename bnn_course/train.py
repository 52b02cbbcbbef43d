r"""Training a (Bayesian) CNN on CIFAR-10: the engine and the command line.

The loss of one mini-batch :math:`B` is the negative ELBO per training example
(chapter 2), with an optional weight :math:`\beta` and a linear warm-up :math:`\gamma_t`:

.. math::

    \mathcal{L}_t = \underbrace{-\frac{1}{|B|}\sum_{n\in B}\log p(y_n \mid x_n, w_t)}_{\text{NLL}}
    \; + \; \beta\,\gamma_t\,\frac{\mathrm{KL}(q \,\|\, p)}{N},
    \qquad w_t \sim q \text{ (Flipout)},

where :math:`N` is the number of training examples. Both terms are logged separately.

* Device: CUDA when present, then Apple's MPS, then the CPU. On CUDA the forward pass runs
  under ``torch.autocast`` in bfloat16 (the KL and the log-probabilities stay float32) and
  TF32 matrix products are allowed.
* Data: the whole training set lives on the device as ``uint8``; batches are augmented and
  normalised there (:mod:`bnn_course.data`).
* A checkpoint is written atomically after every epoch; ``resume=True`` continues the same
  run (same data order, same noise) after an interruption. On the CPU with a fixed seed an
  interrupted and resumed run ends with exactly the weights of an uninterrupted one.
* A non-finite loss stops training with a message naming the likely causes.

Command line: ``python -m bnn_course.train --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course import __version__
from bnn_course.data import CIFAR10Data, iterate_batches, load_cifar10, stratified_subset
from bnn_course.evaluation import evaluate
from bnn_course.models import BayesianCNN, DeterministicCNN
from bnn_course.provenance import device_description
from bnn_course.seeding import seed_everything

CHECKPOINT_FORMAT = "bnn_course.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"

KL_SCALINGS = ("per_example", "none")
MODELS = ("bayesian", "deterministic", "mc_dropout")
SCHEDULES = ("cosine", "constant")

# Fields that may differ between an interrupted run and its resumption.
_RESUME_FREE_FIELDS = ("device", "compile", "progress", "log_interval")


@dataclass
class TrainConfig:
    """Everything that defines a training run (one level, no nesting).

    The defaults are the book's working recipe for the seed-sized BayesianCNN.
    """

    model: str = "bayesian"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    schedule: str = "cosine"
    kl_weight: float = 1.0
    kl_scaling: str = "per_example"
    kl_warmup_epochs: float = 0.0
    dropout: float = 0.1
    init_log_sigma: float = -5.0
    prior_sigma: float = 1.0
    parametrization: str = "log"
    channels: tuple[int, ...] = (32, 64, 128)
    hidden_features: int = 256
    augment: bool = True
    train_subset: int | None = None
    epoch_eval_samples: int = 4
    eval_samples: int = 20
    seed: int = 0
    log_interval: int = 50
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        checks = {
            "model": self.model in MODELS,
            "schedule": self.schedule in SCHEDULES,
            "parametrization": self.parametrization in ("log", "softplus"),
            "kl_scaling": self.kl_scaling in KL_SCALINGS,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "kl_weight": self.kl_weight >= 0,
            "kl_warmup_epochs": self.kl_warmup_epochs >= 0,
            "dropout": 0 <= self.dropout < 1,
            "prior_sigma": self.prior_sigma > 0,
            "train_subset": self.train_subset is None or self.train_subset >= 10,
            "epoch_eval_samples": self.epoch_eval_samples >= 0,
            "eval_samples": self.eval_samples >= 0,
            "log_interval": self.log_interval >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid training configuration: " + ", ".join(
                f"{name}={getattr(self, name)!r}" for name in bad))


# Named starting points for the command line (``--recipe``); explicit flags override them.
RECIPES: dict[str, dict[str, Any]] = {
    # The book's working recipe: the TrainConfig defaults.
    "default": {},
    # The reconstructed first attempt that stayed at 10% (chapter 7): the KL summed over all
    # weights and added unscaled to the mean NLL, and every log-sigma initialised at 0
    # (sigma = 1, the prior's scale), with a constant learning rate.
    "seed": {"kl_scaling": "none", "init_log_sigma": 0.0, "schedule": "constant"},
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, foreign, or from another run."""


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA, else MPS, else CPU. Any other name is passed to ``torch.device``."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_model(config: TrainConfig, num_classes: int = 10) -> nn.Module:
    """The network named by ``config.model`` with the configured shape and priors."""
    if config.model in ("deterministic", "mc_dropout"):
        return DeterministicCNN(num_classes, channels=config.channels,
                                hidden_features=config.hidden_features,
                                dropout=config.dropout if config.model == "mc_dropout" else 0.0)
    return BayesianCNN(num_classes, channels=config.channels,
                       hidden_features=config.hidden_features, prior_sigma=config.prior_sigma,
                       init_log_sigma=config.init_log_sigma,
                       parametrization=config.parametrization)


def kl_term(kl: torch.Tensor, config: TrainConfig, num_train: int, warmup: float) -> torch.Tensor:
    r"""The KL part of the loss: :math:`\beta\gamma\,\mathrm{KL}/N` (``kl_scaling="none"``
    drops the :math:`1/N`, the mistake chapter 7 reproduces)."""
    scale = config.kl_weight * warmup
    if config.kl_scaling == "per_example":
        scale /= num_train
    return kl * scale


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Constant, or cosine-annealed from ``lr`` to 0 over ``total_steps``."""
    if config.schedule == "constant":
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def mean_sigma_per_layer(model: nn.Module) -> dict[str, float]:
    """Mean posterior standard deviation of the weights of every Bayesian layer."""
    return {name: layer.weight_sigma.mean().item() for name, layer in model.bayesian_layers()}


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``weights_only=True``: no code runs).

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable (corrupt or truncated) or not a bnn_course
        checkpoint of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise CheckpointError(
            f"{path} could not be read as a checkpoint ({type(error).__name__}: {error}); "
            "it is corrupt, truncated, or not a PyTorch file. Delete it to start afresh."
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a bnn_course training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, "
                              f"this bnn_course reads version {CHECKPOINT_VERSION}")
    return state


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = dataclasses.asdict(config)
    saved_config = dict(saved)
    saved_config["channels"] = tuple(saved_config.get("channels", ()))
    differences = [f"{key}: checkpoint {saved_config.get(key)!r}, now {value!r}"
                   for key, value in current.items()
                   if key not in _RESUME_FREE_FIELDS and saved_config.get(key) != value]
    if differences:
        raise CheckpointError(
            f"{path} belongs to a different run; resuming needs the same configuration. "
            "Differences: " + "; ".join(differences))


def _restore_model(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"{path} holds weights of another architecture: {error}") from error


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


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        import ipywidgets  # noqa: F401  (tqdm.auto needs it for notebook bars)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def _diverged_message(epoch: int, step: int, nll: float, kl: float) -> str:
    return (
        f"training diverged at epoch {epoch}, around step {step}: NLL={nll}, KL={kl}. "
        "Likely causes: a learning rate too high for this model; posterior sigmas "
        "initialised too large (init_log_sigma near 0 or above makes exp() blow up); an "
        "unscaled KL term (kl_scaling='none') dominating the loss; overflow in reduced "
        "precision (try amp=False); or NaN/inf values in the input data."
    )


def train(
    config: TrainConfig,
    data: CIFAR10Data,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
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
    resume:
        Continue from ``out_dir/checkpoint.pt`` if it exists (same configuration required).
    on_epoch_end:
        Called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint.
    log:
        Receives one line per epoch (``print`` by default; pass ``lambda s: None`` to mute).

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
        :func:`~bnn_course.evaluation.evaluate` with ``eval_samples`` samples.
    """
    device = select_device(config.device)
    generator = seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = torch.bfloat16 if (config.amp and device.type == "cuda") else None

    train_images, train_labels = data.train_images, data.train_labels
    if config.train_subset is not None:
        train_images, train_labels = stratified_subset(train_images, train_labels,
                                                       config.train_subset)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    num_train = train_images.shape[0]
    steps_per_epoch = math.ceil(num_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch

    model = build_model(config, len(data.classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None

    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        _check_resumable(state["config"], config, checkpoint_path)
        if state.get("data_source") != data.source:
            raise CheckpointError(
                f"{checkpoint_path} was trained on {state.get('data_source')!r}, not on "
                f"{data.source!r}; resuming needs the same data. Use another output folder.")
        _restore_model(model, state["model"], checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        generator.set_state(state["rng"]["shuffle"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        log(f"resumed from {checkpoint_path} after epoch {start_epoch}")

    forward = torch.compile(model) if config.compile else model
    for epoch in range(start_epoch, config.epochs):
        model.train()
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # nll, correct, loss
        kl_value = torch.zeros((), device=device)
        kl_scaled = torch.zeros((), device=device)
        step_log: list[dict[str, float]] = []
        bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}",
                            config.progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        batches = iterate_batches(train_images, train_labels, config.batch_size, shuffle=True,
                                  generator=generator, augment=config.augment)
        for index, (x, y) in enumerate(batches):
            step = epoch * steps_per_epoch + index
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total_steps)
            warmup = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                log_probs = forward(x, sample=True)
            nll = F.nll_loss(log_probs.float(), y)
            kl_value = model.kl_divergence()
            kl_scaled = kl_term(kl_value, config, num_train, warmup)
            loss = nll + kl_scaled
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                sums += torch.stack([nll.detach().double() * y.shape[0],
                                     (log_probs.argmax(-1) == y).sum().double(),
                                     loss.detach().double()])
            # One device sync every log_interval steps: check finiteness, log the two loss
            # terms of this step, refresh the bar.
            if (index + 1) % config.log_interval == 0 or index == steps_per_epoch - 1:
                summary = sums.tolist()
                step_log.append({"step": step + 1, "nll": nll.item(), "kl": kl_value.item(),
                                 "kl_term": kl_scaled.item()})
                if not math.isfinite(summary[2]):
                    if bar is not None:
                        bar.close()
                    raise TrainingDiverged(_diverged_message(
                        epoch + 1, step + 1, nll.item(), kl_value.item()))
                if bar is not None:
                    seen = min((index + 1) * config.batch_size, num_train)
                    bar.set_postfix(nll=f"{summary[0] / seen:.3f}", kl=f"{kl_value.item():.3g}",
                                    acc=f"{summary[1] / seen:.3f}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        nll_sum, correct, _ = sums.tolist()
        test = evaluate(model, test_images, test_labels, config.epoch_eval_samples,
                        autocast_dtype=autocast_dtype)
        record = {
            "epoch": epoch + 1,
            "nll": nll_sum / num_train,
            "kl": kl_value.item(),
            "kl_term": kl_scaled.item(),
            "train_accuracy": correct / num_train,
            "test_accuracy_mean": test["accuracy_mean"],
            "test_nll_mean": test["nll_mean"],
            "test_accuracy_mc": test.get("accuracy_mc", test["accuracy_mean"]),
            "test_nll_mc": test.get("nll_mc", test["nll_mean"]),
            "test_entropy_mc": test.get("entropy_mc", test["entropy_mean"]),
            "sigma": mean_sigma_per_layer(model),
            "images_per_second": num_train / seconds,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "steps": step_log,
        }
        history.append(record)
        log(f"epoch {epoch + 1:3d}/{config.epochs}  nll {record['nll']:.4f}  "
            f"kl/N {record['kl_term']:.4f}  train acc {record['train_accuracy']:.3f}  "
            f"test acc {record['test_accuracy_mean']:.3f} (mean) "
            f"{record['test_accuracy_mc']:.3f} (MC)  {record['images_per_second']:.0f} img/s")
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": dataclasses.asdict(config),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "rng": {"shuffle": generator.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device)
                        if device.type == "cuda" else None},
                "data_source": data.source,
            })
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)

    final = evaluate(model, test_images, test_labels, config.eval_samples,
                     autocast_dtype=autocast_dtype)
    return TrainResult(model=model, history=history, final=final, config=config,
                       data_source=data.source, device=device_description(device))


def load_trained_model(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a checkpoint; returns ``(model, checkpoint_state)``."""
    path = Path(path)
    state = load_checkpoint(path)
    config = TrainConfig(**{**state["config"], "channels": tuple(state["config"]["channels"])})
    model = build_model(config)
    _restore_model(model, state["model"], path)
    return model.to(device).eval(), state


# ---------------------------------------------------------------------- command line


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
        "history": result.history,
        "config": dataclasses.asdict(result.config),
        "provenance": {
            "mode": "smoke" if smoke else "full",
            "device": result.device,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "bnn_course": __version__,
            "data_source": data.source,
            "data_is_jpeg_copy": data.is_jpeg,
            "data_is_synthetic": data.is_synthetic,
            "num_train": result.config.train_subset or int(data.train_labels.shape[0]),
            "num_test": int(data.test_labels.shape[0]),
            "git_commit": _git_commit(),
        },
    }


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
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
    add("--model", choices=MODELS, default=defaults.model, help="default: %(default)s")
    add("--dropout", type=float, default=defaults.dropout,
        help="dropout probability of --model mc_dropout (default: %(default)s)")
    add("--epochs", type=int, default=defaults.epochs, help="default: %(default)s")
    add("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    add("--lr", type=float, default=defaults.lr, help="Adam learning rate (default: %(default)s)")
    add("--schedule", choices=SCHEDULES, default=defaults.schedule,
        help="learning-rate schedule (default: %(default)s)")
    add("--kl-weight", type=float, default=defaults.kl_weight,
        help="beta, the weight of the KL term (default: %(default)s)")
    add("--kl-scaling", choices=KL_SCALINGS, default=defaults.kl_scaling,
        help="per_example divides the KL by N (the ELBO per example); none adds it "
             "unscaled (default: %(default)s)")
    add("--kl-warmup-epochs", type=float, default=defaults.kl_warmup_epochs,
        help="epochs over which the KL weight grows linearly from 0 (default: %(default)s)")
    add("--init-log-sigma", type=float, default=defaults.init_log_sigma,
        help="initial log standard deviation of every weight (default: %(default)s)")
    add("--prior-sigma", type=float, default=defaults.prior_sigma,
        help="standard deviation of the N(0, s^2) prior (default: %(default)s)")
    add("--parametrization", choices=("log", "softplus"), default=defaults.parametrization,
        help="sigma = exp(log_sigma) or softplus(rho) (default: %(default)s)")
    add("--log-interval", type=int, default=defaults.log_interval,
        help="log the loss terms (and check they are finite) every this many steps "
             "(default: %(default)s)")
    add("--channels", type=lambda text: tuple(int(c) for c in text.split(",")),
        default=defaults.channels, metavar="C1,C2,...",
        help="output channels of the convolution blocks (default: 32,64,128)")
    add("--hidden-features", type=int, default=defaults.hidden_features,
        help="width of the hidden dense layer (default: %(default)s)")
    add("--train-subset", type=int, default=None, metavar="N",
        help="train on the first N training images, N/10 per class")
    add("--test-subset", type=int, default=None, metavar="N",
        help="evaluate on the first N test images, N/10 per class (default: all)")
    add("--no-augment", action="store_true", help="no random crops and flips")
    add("--eval-samples", type=int, default=defaults.eval_samples,
        help="posterior samples for the final MC evaluation (default: %(default)s)")
    add("--epoch-eval-samples", type=int, default=defaults.epoch_eval_samples,
        help="posterior samples for the per-epoch evaluation (default: %(default)s)")
    add("--device", default=defaults.device,
        help="auto (CUDA, MPS, CPU), cuda, cuda:1, mps or cpu (default: %(default)s)")
    add("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    add("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--no-progress", action="store_true", help="no progress bars")
    add("--resume", action="store_true",
        help="continue the run in OUT from its checkpoint (same settings required)")
    add("--smoke", action="store_true",
        help="smoke mode: a small subset of CIFAR-10 (or, without any copy, a synthetic "
             "stand-in), for checking that everything runs")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m bnn_course.train``; returns the metrics document."""
    parser = build_parser()
    recipe, _ = parser.parse_known_args(argv)
    parser.set_defaults(**RECIPES[recipe.recipe])
    args = parser.parse_args(argv)
    # Flags named like TrainConfig fields map onto them; the negated switches are explicit.
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    config = TrainConfig(**given, augment=not args.no_augment, amp=not args.no_amp,
                         progress=not args.no_progress)
    smoke = bool(args.smoke)
    data = load_cifar10(args.data, smoke=smoke)
    if args.test_subset is not None:
        test_images, test_labels = stratified_subset(data.test_images, data.test_labels,
                                                     args.test_subset)
        data = dataclasses.replace(data, test_images=test_images, test_labels=test_labels)
    result = train(config, data, out_dir=args.out, resume=args.resume)
    document = metrics_document(result, data, smoke)
    document["recipe"] = args.recipe
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / (METRICS_NAME + ".tmp")
    temporary.write_text(json.dumps(document, indent=2))
    os.replace(temporary, out / METRICS_NAME)
    final = document["final"]
    print(f"test accuracy {final['test_accuracy_mean']:.4f} (posterior means), "
          f"{final['test_accuracy_mc']:.4f} (MC, {config.eval_samples} samples); "
          f"data: {data.source}; device: {result.device}; wrote {out / METRICS_NAME}")
    return document


if __name__ == "__main__":
    main()
