r"""Training throughput of the BayesianCNN, its deterministic twin and bayesian-torch's Flipout CNN.

The question: what does Bayesian inference with Flipout cost per training step, compared with
the deterministic network of the same shape, and compared with an off-the-shelf Flipout
implementation? Targets: ours at least **2x** as fast as bayesian-torch, and the deterministic
twin at most **2x** as fast as ours.

What is timed (images per second of full training steps, as in :func:`bnn_course.train.train`):

* the data already live on the device as ``uint8`` (a pool of random CIFAR-shaped images);
  every batch is augmented (random crop and flip, :func:`bnn_course.data.augment`, unless
  ``--no-augment``) and normalised (:func:`bnn_course.data.normalize`) on the device;
* forward pass with sampling (one Flipout perturbation per layer and call), under bfloat16
  autocast with ``--precision bf16``;
* the loss :math:`\mathrm{NLL} + \mathrm{KL}/N` with :math:`N = 50{,}000` (CIFAR-10's training
  set); the KL of each model as that model computes it;
* backward pass and an Adam step.

Timing: ``--warmup`` untimed steps per model, then ``--steps`` timed steps split into
``--windows`` windows. The models' windows are interleaved (window 1 of every model, then
window 2, ..., the order rotating), so a change of load on a shared machine hits all of
them alike. The device is synchronised before and after every window on CUDA (and MPS).
Reported: the median of the windows' images per second, and their min-max spread.

The three networks, all ``[conv3x3, ReLU, conv3x3, ReLU, maxpool2]`` per entry of
``channels``, then ``flatten -> dense(hidden) -> ReLU -> dense(classes) -> log-softmax``:

* ``bayesian``: :class:`bnn_course.models.BayesianCNN` (our Flipout layers);
* ``deterministic``: :class:`bnn_course.models.DeterministicCNN`, its point-estimate twin;
* ``bayesian-torch``: :class:`BayesianTorchCNN`, the same architecture built from
  ``bayesian_torch.layers.Conv2dFlipout`` and ``LinearFlipout`` (optional package
  ``bayesian-torch``, ``pip install "bnn-course[bench]"``); skipped when not importable.

bayesian-torch's Flipout is a **different estimator** for convolutions. In
``Conv2dFlipout.forward`` (bayesian-torch 0.5.0,
``bayesian_torch/layers/flipout_layers/conv_flipout.py``) the signs are drawn as
``sign_input = x.clone().uniform_(-1, 1).sign()`` and
``sign_output = outputs.clone().uniform_(-1, 1).sign()``: sign tensors of the full
activation shapes (B, C_in, H, W) and (B, C_out, H', W'), one sign per example, channel
**and pixel**, so the positions of one image do not share one kernel sample. Ours
(:func:`bnn_course.flipout.conv2d_flipout`) draws signs per example and channel, (B, C),
broadcast over space, as TensorFlow Probability does; the per-pixel variant is
:func:`bnn_course.flipout.conv2d_flipout_per_pixel`. Other differences worth knowing when
reading the numbers (they do not change the work per step much):

* bayesian-torch's layer KL is the **mean** of the per-weight KL terms of each tensor
  (``BaseVariationalLayer_.kl_div`` returns ``kl.mean()``), not their sum;
* its ``prior_variance`` argument is used as the prior's standard deviation;
* :math:`\sigma = \operatorname{softplus}(\rho)` with :math:`\rho` drawn from
  :math:`\mathcal{N}(\rho_0, 0.1^2)`; here :math:`\rho_0` is chosen so that :math:`\sigma`
  starts around ours (:math:`e^{-5}`), and the means are reset as in
  ``nn.Conv2d``/``nn.Linear`` (as ours) instead of its default :math:`\mathcal{N}(0, 0.1^2)`;
* its convolution computes ``x * sign_input`` twice (once into an unused ``x_tmp``).

Usage::

    python -m benchmarks.throughput                         # auto device, batch 256, fp32
    python -m benchmarks.throughput --precision bf16 --compile --json results.json
    python -m benchmarks.throughput --device cpu --steps 10 --warmup 2
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.data import augment as augment_images
from bnn_course.data import normalize
from bnn_course.elbo import negative_elbo
from bnn_course.models import BayesianCNN, CNNStack, DeterministicCNN
from bnn_course.provenance import device_description
from bnn_course.seeding import seed_everything
from bnn_course.train import select_device

MODELS: tuple[str, ...] = ("bayesian", "deterministic", "bayesian-torch")
"""Names accepted by ``--models``, in the order of the table."""

LABELS: dict[str, str] = {
    "bayesian": "BayesianCNN (ours)",
    "deterministic": "DeterministicCNN",
    "bayesian-torch": "bayesian-torch Flipout CNN",
}

TARGET_OURS_OVER_BAYESIAN_TORCH = 2.0
"""Ours should train at least this many times as fast as bayesian-torch."""

TARGET_DETERMINISTIC_OVER_OURS = 2.0
"""The deterministic twin should train at most this many times as fast as ours."""

NUM_TRAIN = 50_000
"""N in the KL/N of the loss: CIFAR-10's training set."""

PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------- bayesian-torch


def bayesian_torch_version() -> str | None:
    """The installed bayesian-torch version, or ``None`` when its Flipout layers don't import."""
    try:
        from bayesian_torch.layers import Conv2dFlipout, LinearFlipout  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return None
    try:
        return importlib.metadata.version("bayesian-torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


class BayesianTorchCNN(CNNStack):
    """The BayesianCNN's architecture built from bayesian-torch's Flipout layers.

    Same layers, widths, ReLUs, max pools and log-softmax as
    :class:`bnn_course.models.BayesianCNN` (the same layout,
    :class:`bnn_course.models.CNNStack`); every layer is a ``Conv2dFlipout`` or
    ``LinearFlipout`` and returns ``(output, kl)``. Its convolutions draw per-pixel signs
    (see the module docstring): a different estimator from ours.

    Shapes
    ------
    Input (B, in_channels, image_size, image_size); :meth:`forward` returns
    ``(log_probs, kl)``: log-probabilities (B, num_classes) in float32 and the sum of the
    layers' KL terms (a scalar; each layer's term is bayesian-torch's, a mean over weights).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        hidden_features: int = 256,
        prior_sigma: float = 1.0,
        init_log_sigma: float = -5.0,
    ) -> None:
        from bayesian_torch.layers import Conv2dFlipout, LinearFlipout

        # sigma = softplus(rho), rho ~ N(posterior_rho_init, 0.1^2): start around ours.
        rho = math.log(math.expm1(math.exp(init_log_sigma)))
        # bayesian-torch fills its prior "variance" buffers into prior_*_sigma: a std.
        layer_args = {"prior_mean": 0.0, "prior_variance": prior_sigma,
                      "posterior_mu_init": 0.0, "posterior_rho_init": rho}
        super().__init__(
            lambda c_in, c_out: Conv2dFlipout(c_in, c_out, 3, padding=1, **layer_args),
            lambda f_in, f_out: LinearFlipout(f_in, f_out, **layer_args),
            num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            channels=channels, hidden_features=hidden_features)
        self._reset_means()

    def _reset_means(self) -> None:
        """Means as in ``nn.Conv2d``/``nn.Linear`` (and as ours): uniform on 1/sqrt(fan_in)."""
        for layer in self.layers():
            weight = layer.mu_kernel if hasattr(layer, "mu_kernel") else layer.mu_weight
            with torch.no_grad():
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                if layer.mu_bias is not None:
                    bound = 1.0 / math.sqrt(weight[0].numel())
                    nn.init.uniform_(layer.mu_bias, -bound, bound)

    def flipout_layers(self) -> list[nn.Module]:
        """The Flipout layers, input to output."""
        return self.layers()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Flipout sample: ``(log_probs (B, num_classes), kl scalar)``."""
        kls = []

        def call(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
            output = stage(h)
            if isinstance(output, tuple):  # a Flipout layer: (output, kl)
                output, kl = output
                kls.append(kl)
            return output

        log_probs = self.run_stages(x, call)
        return log_probs, torch.stack(kls).float().sum()

    def kl_divergence(self) -> torch.Tensor:
        """The layers' KL terms recomputed from the parameters (``kl_loss()``), summed."""
        return torch.stack([layer.kl_loss() for layer in self.flipout_layers()]).sum()


def build_bayesian_torch_cnn(**kwargs: Any) -> BayesianTorchCNN:
    """``BayesianTorchCNN(**kwargs)``; raises ``ImportError`` when bayesian-torch is missing."""
    return BayesianTorchCNN(**kwargs)


def build_model(name: str, channels: Sequence[int] = (32, 64, 128),
                hidden_features: int = 256) -> nn.Module:
    """One of :data:`MODELS`, for 32x32 RGB images and 10 classes."""
    if name == "bayesian":
        return BayesianCNN(channels=channels, hidden_features=hidden_features)
    if name == "deterministic":
        return DeterministicCNN(channels=channels, hidden_features=hidden_features)
    if name == "bayesian-torch":
        return build_bayesian_torch_cnn(channels=channels, hidden_features=hidden_features)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(all parameters, mean parameters)``.

    Mean parameters are the posterior means (ours: ``*.mu``; bayesian-torch: ``mu_*``); for
    a network without any (the deterministic twin) every parameter is a point estimate and
    counts as a mean.
    """
    total = means = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "mu" or leaf.startswith("mu_"):
            means += parameter.numel()
    return total, (means or total)


# ------------------------------------------------------------------------------ timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_train: int) -> torch.Tensor:
    """NLL + KL/N of one sampled forward pass (:func:`bnn_course.elbo.negative_elbo`, the
    engine's loss); the KL as the model computes it."""
    output = model(x)
    if isinstance(output, tuple):  # bayesian-torch style: (log_probs, kl)
        log_probs, kl = output
    else:
        log_probs, kl = output, model.kl_divergence()
    return negative_elbo(F.nll_loss(log_probs.float(), y), kl.float(), num_train)


def make_train_step(
    model: nn.Module,
    device: torch.device,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    augment: bool = True,
    compile: bool = False,
    num_train: int = NUM_TRAIN,
    lr: float = 1e-3,
    pool_batches: int = 4,
) -> Callable[[], torch.Tensor]:
    """A closure running one full training step of ``model`` (already on ``device``).

    The images are a pool of ``pool_batches * batch_size`` random ``uint8`` images
    (3, 32, 32) on ``device`` with random labels, visited batch by batch; each call
    augments and normalises a batch, computes NLL + KL/N (under bfloat16 autocast for
    ``precision="bf16"``), backpropagates and takes an Adam step. With ``compile`` the loss
    computation (forward, NLL, KL) is ``torch.compile``-d; the data transforms and the
    optimiser step stay eager. Returns the step's loss, detached (no device sync).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    pool = pool_batches * batch_size
    images = torch.randint(0, 256, (pool, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (pool,), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.compile(_loss) if compile else _loss
    use_autocast = precision == "bf16"
    position = 0

    def step() -> torch.Tensor:
        nonlocal position
        start = (position % pool_batches) * batch_size
        position += 1
        x = images[start:start + batch_size]
        if augment:
            x = augment_images(x)
        x = normalize(x)
        y = labels[start:start + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = loss_fn(model, x, y, num_train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def window_sizes(steps: int, windows: int) -> list[int]:
    """``steps`` split into at most ``windows`` near-equal positive parts."""
    if steps < 1 or windows < 1:
        raise ValueError(f"steps ({steps}) and windows ({windows}) must be positive")
    windows = min(windows, steps)
    size, extra = divmod(steps, windows)
    return [size + (i < extra) for i in range(windows)]


def time_interleaved(
    train_steps: dict[str, Callable[[], torch.Tensor]],
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    windows: int,
) -> dict[str, list[tuple[int, float]]]:
    """Warm every model up, then time their windows interleaved.

    Returns ``{name: [(steps in window, seconds), ...]}``. Window ``w`` runs the models in
    an order rotated by ``w``; the device is synchronised before and after every window.
    A non-finite loss at the end raises ``FloatingPointError``.
    """
    names = list(train_steps)
    last: dict[str, torch.Tensor] = {}
    for name in names:
        for _ in range(warmup):
            last[name] = train_steps[name]()
    _synchronize(device)
    timings: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for index, size in enumerate(window_sizes(steps, windows)):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(size):
                last[name] = train_steps[name]()
            _synchronize(device)
            timings[name].append((size, time.perf_counter() - started))
    for name, loss in last.items():
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name}: the training loss became {loss.item()}")
    return timings


def summarize(windows: list[tuple[int, float]], batch_size: int) -> dict[str, Any]:
    """Median images/s over the windows, their min, max and spread (max - min) / median."""
    rates = [size * batch_size / seconds for size, seconds in windows]
    median = statistics.median(rates)
    return {
        "images_per_second": median,
        "window_images_per_second": rates,
        "min_images_per_second": min(rates),
        "max_images_per_second": max(rates),
        "spread_percent": 100 * (max(rates) - min(rates)) / median,
        "timed_steps": sum(size for size, _ in windows),
        "timed_seconds": sum(seconds for _, seconds in windows),
    }


def measure_training_throughput(
    model: nn.Module | Callable[[], nn.Module],
    *,
    device: torch.device | str = "auto",
    batch_size: int = 256,
    steps: int = 100,
    warmup: int = 10,
    windows: int = 5,
    precision: str = "fp32",
    augment: bool = True,
    compile: bool = False,
    num_train: int = NUM_TRAIN,
) -> dict[str, Any]:
    """Images per second of full training steps of one model (see the module docstring).

    Parameters
    ----------
    model:
        A module taking (B, 3, 32, 32) images and returning log-probabilities (with a
        ``kl_divergence()`` method) or ``(log_probs, kl)``; or a function building one.
        It is moved to ``device`` and trained in place.
    device:
        ``"auto"`` (CUDA, MPS, CPU) or a device.

    Returns
    -------
    dict with ``images_per_second`` (median over windows), ``window_images_per_second``,
    ``min_images_per_second``, ``max_images_per_second``, ``spread_percent``,
    ``timed_steps``, ``timed_seconds``, ``parameters``, ``mean_parameters``,
    ``batch_size``, ``device``.
    """
    device = select_device(device) if isinstance(device, str) else device
    if not isinstance(model, nn.Module):
        model = model()
    model = model.to(device).train()
    step = make_train_step(model, device, batch_size=batch_size, precision=precision,
                           augment=augment, compile=compile, num_train=num_train)
    timings = time_interleaved({"model": step}, device, steps=steps, warmup=warmup,
                               windows=windows)
    total, means = parameter_counts(model)
    return {**summarize(timings["model"], batch_size), "parameters": total,
            "mean_parameters": means, "batch_size": batch_size,
            "device": device_description(device)}


# ------------------------------------------------------------------------- the report


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator["images_per_second"] / denominator["images_per_second"]


def run_benchmark(
    models: Sequence[str] = MODELS,
    *,
    device: str = "auto",
    batch_size: int = 256,
    steps: int = 100,
    warmup: int = 10,
    windows: int = 5,
    precision: str = "fp32",
    augment: bool = True,
    compile: bool = False,
    channels: Sequence[int] = (32, 64, 128),
    hidden_features: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark ``models`` in one interleaved run on one device; returns the result document.

    ``bayesian-torch`` is skipped (and the reason recorded under ``skipped``) when the
    package does not import. On CUDA, fp32 runs with TF32 matrix products and convolutions
    allowed (the setting is restored afterwards).
    """
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {MODELS}")
    torch_device = select_device(device)
    bt_version = bayesian_torch_version()
    skipped: dict[str, str] = {}
    selected = [name for name in MODELS if name in models]
    if "bayesian-torch" in selected and bt_version is None:
        selected.remove("bayesian-torch")
        skipped["bayesian-torch"] = ("bayesian-torch is not installed "
                                     "(pip install 'bnn-course[bench]'); skipped")
    tf32 = torch_device.type == "cuda" and precision == "fp32"
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    started = time.perf_counter()
    try:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        built: dict[str, nn.Module] = {}
        train_steps = {}
        for name in selected:
            seed_everything(seed)
            built[name] = build_model(name, channels, hidden_features).to(torch_device).train()
            train_steps[name] = make_train_step(
                built[name], torch_device, batch_size=batch_size, precision=precision,
                augment=augment, compile=compile)
        timings = time_interleaved(train_steps, torch_device, steps=steps, warmup=warmup,
                                   windows=windows) if selected else {}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32

    results: dict[str, dict[str, Any]] = {}
    for name in selected:
        total, means = parameter_counts(built[name])
        results[name] = {"label": LABELS[name], "parameters": total, "mean_parameters": means,
                         **summarize(timings[name], batch_size)}
    ours = results.get("bayesian")
    for result in results.values():
        result["ratio_to_ours"] = _ratio(result, ours)
    ours_over_bt = _ratio(ours, results.get("bayesian-torch"))
    det_over_ours = _ratio(results.get("deterministic"), ours)
    return {
        "benchmark": "training throughput (images/s of full training steps)",
        "device": device_description(torch_device),
        "device_type": torch_device.type,
        "torch": torch.__version__,
        "bayesian_torch": bt_version,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "precision": "fp32/TF32" if tf32 else ("fp32" if precision == "fp32"
                                               else "bf16 (autocast)"),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "windows": len(window_sizes(steps, windows)),
        "augment": augment,
        "compile": compile,
        "channels": list(channels),
        "hidden_features": hidden_features,
        "num_train": NUM_TRAIN,
        "seed": seed,
        "models": results,
        "skipped": skipped,
        "ratios": {
            "ours_over_bayesian_torch": {
                "value": ours_over_bt, "target": f">= {TARGET_OURS_OVER_BAYESIAN_TORCH:g}",
                "met": None if ours_over_bt is None
                else ours_over_bt >= TARGET_OURS_OVER_BAYESIAN_TORCH},
            "deterministic_over_ours": {
                "value": det_over_ours, "target": f"<= {TARGET_DETERMINISTIC_OVER_OURS:g}",
                "met": None if det_over_ours is None
                else det_over_ours <= TARGET_DETERMINISTIC_OVER_OURS},
        },
        "seconds": time.perf_counter() - started,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def _ratio_line(label: str, ratio: dict[str, Any], missing: str) -> str:
    if ratio["value"] is None:
        return f"{label:<24} n/a ({missing})"
    verdict = "met" if ratio["met"] else "NOT met"
    return f"{label:<24} {ratio['value']:5.2f}x  (target {ratio['target']}x: {verdict})"


def format_report(document: dict[str, Any]) -> str:
    """The printed table: header, one row per model, the two target ratios, notes."""
    lines = [
        "Training throughput: full steps (sampled forward, NLL + KL/N, backward, Adam)",
        f"device: {document['device']}, torch threads {document['threads']} | "
        f"torch {document['torch']} | batch {document['batch_size']} | "
        f"precision {document['precision']} | augment {'on' if document['augment'] else 'off'}"
        f" | compile {'on' if document['compile'] else 'off'}",
        f"{document['steps']} timed steps in {document['windows']} interleaved windows after "
        f"{document['warmup']} warm-up steps per model; channels "
        f"{tuple(document['channels'])}, hidden {document['hidden_features']}",
        "",
        f"{'model':<28} {'params (means)':>15} {'images/s':>10} {'windows min-max':>17} "
        f"{'spread':>7} {'vs ours':>8}",
    ]
    for result in document["models"].values():
        ratio = result["ratio_to_ours"]
        counts = f"{_millions(result['parameters'])} ({_millions(result['mean_parameters'])})"
        lines.append(
            f"{result['label']:<28} {counts:>15} "
            f"{result['images_per_second']:>10.1f} "
            f"{result['min_images_per_second']:>8.1f}-{result['max_images_per_second']:<8.1f} "
            f"{result['spread_percent']:>6.1f}% "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x':>8}")
    for reason in document["skipped"].values():
        lines.append(f"{LABELS['bayesian-torch']:<28} {reason}")
    ratios = document["ratios"]
    bt_missing = ("bayesian-torch not installed" if "bayesian-torch" in document["skipped"]
                  else "needs both models")
    lines += [
        "",
        _ratio_line("ours / bayesian-torch:", ratios["ours_over_bayesian_torch"], bt_missing),
        _ratio_line("deterministic / ours:", ratios["deterministic_over_ours"],
                    "needs both models"),
    ]
    if document["bayesian_torch"] is not None and "bayesian-torch" in document["models"]:
        lines.append(f"bayesian-torch {document['bayesian_torch']}: per-pixel Flipout signs in "
                     "its convolutions (ours: per example and channel), a different estimator")
    lines.append(f"total time {document['seconds']:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Training throughput (images/s) of the BayesianCNN, its deterministic "
                    "twin and bayesian-torch's Flipout CNN, in one run on one device.")
    add = parser.add_argument
    add("--device", default="auto",
        help="auto (CUDA, MPS, CPU), cuda, cuda:1, mps or cpu (default: %(default)s)")
    add("--batch-size", type=int, default=256, help="default: %(default)s")
    add("--steps", type=int, default=100,
        help="timed steps per model, split into --windows windows (default: %(default)s)")
    add("--warmup", type=int, default=10,
        help="untimed steps per model first (default: %(default)s)")
    add("--windows", type=int, default=5,
        help="timed windows; the median is reported (default: %(default)s)")
    add("--precision", choices=PRECISIONS, default="fp32",
        help="fp32 (TF32 allowed on CUDA) or bf16 autocast (default: %(default)s)")
    add("--compile", action="store_true",
        help="torch.compile the loss computation (raise --warmup to cover compilation)")
    add("--no-augment", action="store_true", help="no random crops and flips")
    add("--models", nargs="+", choices=MODELS, default=list(MODELS),
        help="which models (default: all; bayesian-torch only when installed)")
    add("--channels", type=lambda text: tuple(int(c) for c in text.split(",")),
        default=(32, 64, 128), metavar="C1,C2,...",
        help="output channels of the convolution blocks (default: 32,64,128)")
    add("--hidden-features", type=int, default=256, help="default: %(default)s")
    add("--threads", type=int, default=None,
        help="torch.set_num_threads (default: leave PyTorch's default)")
    add("--seed", type=int, default=0, help="default: %(default)s")
    add("--json", metavar="PATH", default=None, help="also save the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks.throughput``; returns the result document."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    document = run_benchmark(
        args.models, device=args.device, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, windows=args.windows, precision=args.precision,
        augment=not args.no_augment, compile=args.compile, channels=args.channels,
        hidden_features=args.hidden_features, seed=args.seed)
    document["command"] = " ".join(
        ["python -m benchmarks.throughput", *(sys.argv[1:] if argv is None else argv)])
    print(format_report(document))
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        print(f"wrote {path}")
    return document


if __name__ == "__main__":
    main()
