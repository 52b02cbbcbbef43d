r"""Training and Monte Carlo prediction throughput of the BayesianCNN, its twin and bayesian-torch.

The questions: what does Bayesian inference with Flipout cost per training step, compared with
the deterministic network of the same shape and with an off-the-shelf Flipout implementation;
does the training engine run as fast as its own step; and what does Monte Carlo prediction
cost. Targets (:data:`TARGETS_BY_DEVICE`): on the CPU ours at least **2x** as fast as
bayesian-torch and at least **0.5x** the deterministic twin in training, :math:`S = 8`
prediction samples at least **0.4x** the twin's forward throughput per sample; on an
H100-class GPU **3x**, **0.6x** and **0.5x**; the engine within **10%** of the timed loop.
``--count-ops`` also counts the aten ops of one training step on the CPU (no GPU needed).

Training lines (images per second of full training steps): every model is trained by
:func:`bnn_course.train.training_step`, **the engine's step** (the sampled forward pass
under the engine's memory format and autocast, NLL + KL/N by
:func:`bnn_course.elbo.negative_elbo`, backward, Adam as the engine builds it:
:func:`bnn_course.train.adam_options`, fused on CUDA and the CPU), on batches made by the engine's
:func:`bnn_course.data.iterate_batches` (augmented and normalised on the device) from a pool
of random ``uint8`` CIFAR-shaped images already on the device. :math:`N = 50{,}000`.

* ``bayesian``: :class:`bnn_course.models.BayesianCNN` (our Flipout layers);
* ``deterministic``: :class:`bnn_course.models.DeterministicCNN`, its point-estimate twin;
* ``bayesian-torch``: :class:`BayesianTorchCNN`, the same architecture built from
  ``bayesian_torch.layers.Conv2dFlipout`` and ``LinearFlipout`` (optional package
  ``bayesian-torch``, ``pip install "bnn-course[bench]"``); skipped when not importable;
* ``engine``: the BayesianCNN trained by :func:`bnn_course.train.train` itself, one epoch per
  window on synthetic images, timed by the engine (its record's ``seconds``: the epoch's
  training loop, without setup and evaluation). Compared with the ``bayesian`` line it shows
  what the engine adds around the step (shuffling, learning-rate schedule, logging).

Prediction lines (:func:`bnn_course.evaluation.predict_log_probs`, as chapters 6-8 and the
corruption and OOD evaluations call it; no autograd state, the device's default batch): our
network with ``--samples`` weight samples per image and no posterior-mean pass, in images x
samples per second, against the twin's single forward pass, in images per second.

Timing: ``--warmup`` untimed steps per line, then ``--steps`` timed steps split into
``--windows`` windows (prediction: one pass over ``--predict-images`` images per window).
The windows of all lines are interleaved (window 1 of every line, then window 2, ..., the
order rotating), so a change of load on a shared machine hits all of them alike. The device
is synchronised around every window on CUDA (and MPS). Reported: the median of the windows'
rates, and their min-max spread.

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

All lines get the same input batches, in the same memory format (channels-last on the CPU,
:func:`bnn_course.layers.preferred_memory_format`).

Operator counts (``--count-ops``): a device-free measure of the launch overhead that bounds a
small training step on a GPU (at batch 256 on an H200 the BayesianCNN's step was 20.9 ms of
wall time for 4.5 ms of GPU work; most operators launch a kernel). Each selected model, built
afresh at the benchmark's shape, runs :func:`bnn_course.train.training_step` (fp32, fused Adam)
on the **CPU** under ``torch.profiler``; reported are the ``aten::`` operators per step, all of
them and the top-level ones (those not called from inside another ``aten::`` operator: what the
Python code, autograd and the optimizer dispatch), and ours over the twin's. The top-level count
depends only on the code and the torch version, not on the timing device or the machine's load;
the nested count also on the CPU's kernels (ours: 1,630 at one thread, 1,654 at two).
Target (:data:`OP_COUNT_TARGET`): at most 380 top-level operators per step of the
BayesianCNN at the book's shape (batch 256, channels (32, 64, 128), hidden 256), a third of the
1,140 counted before the layers' randomness and KL were computed for all layers at once (with
the per-tensor Adam of the time; 854 with fused Adam). With torch 2.14.1: 263, the twin 95.

Usage::

    python -m benchmarks.throughput                         # auto device, batch 256, fp32
    python -m benchmarks.throughput --precision bf16 --compile --json results.json
    python -m benchmarks.throughput --device cpu --steps 12 --warmup 2 --threads 1
    python -m benchmarks.throughput --device cpu --count-ops --steps 2 --no-engine --samples 0
    python -m benchmarks.throughput --markdown one_thread.json two_threads.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnn_course.data import iterate_batches, synthetic_cifar10
from bnn_course.evaluation import predict_log_probs
from bnn_course.layers import preferred_memory_format
from bnn_course.models import BayesianCNN, CNNStack, DeterministicCNN
from bnn_course.posterior import inverse_softplus
from bnn_course.provenance import device_description, git_state
from bnn_course.seeding import seed_everything
from bnn_course.train import TrainConfig, adam_options, select_device, train, training_step

MODELS: tuple[str, ...] = ("bayesian", "deterministic", "bayesian-torch")
"""Names accepted by ``--models``, in the order of the table."""

LABELS: dict[str, str] = {
    "bayesian": "BayesianCNN (ours)",
    "deterministic": "DeterministicCNN",
    "bayesian-torch": "bayesian-torch Flipout CNN",
    "engine": "engine: train(), ours",
}

TARGETS_BY_DEVICE: dict[str, dict[str, tuple[str, float]]] = {
    "cpu": {"ours_over_bayesian_torch": (">=", 2.0), "ours_over_deterministic": (">=", 0.5),
            "engine_over_loop": (">=", 0.9), "prediction_per_sample_over_twin": (">=", 0.4)},
    "cuda": {"ours_over_bayesian_torch": (">=", 3.0), "ours_over_deterministic": (">=", 0.6),
             "engine_over_loop": (">=", 0.9), "prediction_per_sample_over_twin": (">=", 0.5)},
}
"""Each ratio of the report and its target ``(comparison, value)``, per device type: on the
CPU ours at least 2x bayesian-torch and 0.5x the twin; on an H100-class GPU 3x and 0.6x
(and ours at least 45,000 training images/s at batch 256, which the report prints)."""

TARGETS = TARGETS_BY_DEVICE["cpu"]
"""The ratios the report has (and their CPU targets); :data:`TARGETS_BY_DEVICE` per device."""

RATIO_LABELS: dict[str, str] = {
    "ours_over_bayesian_torch": "ours / bayesian-torch",
    "ours_over_deterministic": "ours / deterministic",
    "engine_over_loop": "engine / its step loop",
    "prediction_per_sample_over_twin": "MC per sample / twin",
}

OP_COUNT_TARGET = 380
"""Most top-level ``aten::`` operators per training step of the BayesianCNN at the book's shape
(the issue's target: a third of the 1,140 counted before, with torch 2.14.1)."""

BOOK_SHAPE: dict[str, Any] = {"batch_size": 256, "channels": (32, 64, 128), "hidden_features": 256}
"""The shape :data:`OP_COUNT_TARGET` is stated for: the book's batch and network."""

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
    ``LinearFlipout``. Its convolutions draw per-pixel signs (see the module docstring): a
    different estimator from ours.

    bayesian-torch's layers return their KL term with their output; :meth:`forward` keeps
    the sum and :meth:`kl_divergence` returns it (what a bayesian-torch user adds to the
    loss), so the engine's :func:`~bnn_course.train.training_step` trains this network
    exactly as it trains ours.

    Shapes
    ------
    Input (B, in_channels, image_size, image_size); :meth:`forward` returns log-probabilities
    (B, num_classes) in float32.
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
        rho = inverse_softplus(math.exp(init_log_sigma))
        # bayesian-torch fills its prior "variance" buffers into prior_*_sigma: a std.
        layer_args = {"prior_mean": 0.0, "prior_variance": prior_sigma,
                      "posterior_mu_init": 0.0, "posterior_rho_init": rho}
        super().__init__(
            lambda c_in, c_out: Conv2dFlipout(c_in, c_out, 3, padding=1, **layer_args),
            lambda f_in, f_out: LinearFlipout(f_in, f_out, **layer_args),
            num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            channels=channels, hidden_features=hidden_features)
        self._reset_means()
        self.last_kl: torch.Tensor | None = None

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

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """One Flipout sample: log-probabilities (B, num_classes); the KL is kept.

        bayesian-torch's layers have no posterior-mean pass: ``sample=False`` is a
        ``ValueError``.
        """
        if not sample:
            raise ValueError("bayesian-torch's Flipout layers always sample; sample=False is "
                             "not available for BayesianTorchCNN")
        kls = []

        def call(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
            output = stage(h)
            if isinstance(output, tuple):  # a Flipout layer: (output, kl)
                output, kl = output
                kls.append(kl)
            return output

        log_probs = self.run_stages(x, call)
        self.last_kl = torch.stack(kls).float().sum()
        return log_probs

    def kl_divergence(self) -> torch.Tensor:
        """The KL of the last forward pass (the sum of its layers' terms, each a mean over
        weights, as bayesian-torch computes it); before any pass, recomputed from the
        parameters by the layers' ``kl_loss()``."""
        if self.last_kl is not None:
            return self.last_kl
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


# ------------------------------------------------------------------------ the workloads


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def random_images(count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random ``uint8`` images (3, 32, 32) and labels in 0..9, on ``device``."""
    return (torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, device=device),
            torch.randint(0, 10, (count,), device=device))


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
    """A closure running one engine training step of ``model`` (already on ``device``).

    The images are a pool of ``pool_batches * batch_size`` random ``uint8`` images
    (3, 32, 32) on ``device`` with random labels, shuffled into batches by the engine's
    :func:`~bnn_course.data.iterate_batches` (augmented unless ``augment=False``,
    normalised); each call takes the next batch and runs
    :func:`bnn_course.train.training_step` with an Adam optimizer (bfloat16 autocast for
    ``precision="bf16"``; ``compile``: the forward pass ``torch.compile``-d, as the
    engine's ``compile`` option does). Adam is configured as the engine configures it
    (:func:`bnn_course.train.adam_options`: fused on CUDA and the CPU). Returns the step's
    loss, detached (no device sync).
    """
    dtype = _autocast_dtype(precision)
    images, labels = random_images(pool_batches * batch_size, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, **adam_options(device))
    forward = torch.compile(model) if compile else model
    batches = iter(())

    def step() -> torch.Tensor:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iterate_batches(images, labels, batch_size, shuffle=True,
                                      augment=augment, drop_last=True)
            batch = next(batches)
        x, y = batch
        return training_step(model, optimizer, x, y, num_train=num_train, forward=forward,
                             autocast_dtype=dtype).loss

    return step


def steps_runner(step: Callable[[], torch.Tensor],
                 device: torch.device) -> Callable[[int], float]:
    """``run(n)``: ``n`` calls of ``step`` between two device syncs; returns the seconds.
    A non-finite loss at the end raises ``FloatingPointError``."""

    def run(count: int) -> float:
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(count):
            loss = step()
        _synchronize(device)
        seconds = time.perf_counter() - started
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the training loss became {loss.item()}")
        return seconds

    return run


def engine_runner(
    device: torch.device,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    augment: bool = True,
    compile: bool = False,
    channels: Sequence[int] = (32, 64, 128),
    hidden_features: int = 256,
    seed: int = 0,
) -> Callable[[int], float]:
    """``run(n)``: one epoch of :func:`bnn_course.train.train` (the BayesianCNN) over ``n``
    batches of synthetic images; returns the epoch's training seconds as the engine
    measures them (its record's ``seconds``: the loop, without setup and evaluation).

    The engine decides the autocast itself (bfloat16 on CUDA with ``amp``); with
    ``precision="bf16"`` on another device it would not match the other lines, so that is
    a ``ValueError``.
    """
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("the engine runs bf16 autocast on CUDA only")
    config_args = {"model": "bayesian", "epochs": 1, "batch_size": batch_size,
                   "channels": tuple(channels), "hidden_features": hidden_features,
                   "augment": augment, "amp": precision == "bf16", "compile": compile,
                   "eval_samples": 0, "epoch_eval_samples": 0, "progress": False,
                   "seed": seed, "device": str(device)}
    pool: dict[int, Any] = {}

    def run(count: int) -> float:
        if count not in pool:
            images = count * batch_size
            data = synthetic_cifar10(train_per_class=-(-images // 10), test_per_class=1,
                                     seed=seed)
            pool[count] = dataclasses.replace(data, train_images=data.train_images[:images],
                                              train_labels=data.train_labels[:images])
        result = train(TrainConfig(**config_args), pool[count], log=lambda line: None)
        return float(result.history[0]["seconds"])

    return run


def prediction_runner(model: nn.Module, images: torch.Tensor, num_samples: int,
                      precision: str = "fp32") -> Callable[[int], float]:
    """``run(n)``: ``n`` calls of :func:`bnn_course.evaluation.predict_log_probs` on
    ``images`` with ``num_samples`` samples (none: the single ``sample=False`` pass, and
    no posterior-mean pass otherwise); returns the seconds."""
    dtype = _autocast_dtype(precision)

    def run(count: int) -> float:
        _synchronize(images.device)
        started = time.perf_counter()
        for _ in range(count):
            predict_log_probs(model, images, num_samples, autocast_dtype=dtype,
                              include_mean=num_samples == 0)
        _synchronize(images.device)
        return time.perf_counter() - started

    return run


def window_sizes(steps: int, windows: int) -> list[int]:
    """``steps`` split into at most ``windows`` near-equal positive parts."""
    if steps < 1 or windows < 1:
        raise ValueError(f"steps ({steps}) and windows ({windows}) must be positive")
    windows = min(windows, steps)
    size, extra = divmod(steps, windows)
    return [size + (i < extra) for i in range(windows)]


def time_interleaved(
    runners: dict[str, Callable[[int], float]],
    *,
    sizes: dict[str, list[int]],
    warmup: dict[str, int],
) -> dict[str, list[tuple[int, float]]]:
    """Warm every runner up, then time their windows interleaved.

    ``runners[name](n)`` runs ``n`` units of work and returns the seconds they took;
    ``sizes[name]`` lists the units per window, ``warmup[name]`` the untimed units first.
    Window ``w`` runs the lines in an order rotated by ``w``. Returns
    ``{name: [(units in window, seconds), ...]}``.
    """
    names = list(runners)
    for name in names:
        if warmup[name] > 0:
            runners[name](warmup[name])
    timings: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for index in range(max(len(sizes[name]) for name in names)):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if index < len(sizes[name]):
                size = sizes[name][index]
                timings[name].append((size, runners[name](size)))
    return timings


def summarize(windows: list[tuple[int, float]], batch_size: int) -> dict[str, Any]:
    """Median images/s over the windows, their min, max and spread (max - min) / median.

    ``batch_size``: images per unit of work (a step's batch; for prediction, the images of
    one pass times the samples).
    """
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
        A module taking (B, 3, 32, 32) images and returning log-probabilities, with a
        ``kl_divergence()`` method; or a function building one. It is moved to ``device``
        and trained in place.
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
    timings = time_interleaved({"model": steps_runner(step, device)},
                               sizes={"model": window_sizes(steps, windows)},
                               warmup={"model": warmup})
    total, means = parameter_counts(model)
    return {**summarize(timings["model"], batch_size), "parameters": total,
            "mean_parameters": means, "batch_size": batch_size,
            "device": device_description(device)}


# ------------------------------------------------------------------- operator counts


def _inside_aten_op(event: Any) -> bool:
    """Whether a profiler event was called from inside an ``aten::`` operator."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count_step_ops(model: nn.Module, *, batch_size: int = 256, steps: int = 2,
                   num_train: int = NUM_TRAIN) -> dict[str, float]:
    """``aten::`` operators per training step of ``model`` on the CPU, by ``torch.profiler``.

    ``model`` (taking (B, 3, 32, 32) images) is moved to the CPU and trained in place: one
    untimed step of :func:`bnn_course.train.training_step` (fp32, Adam with
    :func:`bnn_course.train.adam_options`, which creates its state), then ``steps`` profiled
    steps on one random batch. Returns ``{"top_level": ..., "all": ...}`` per step: the
    operators not called from inside another ``aten::`` operator, and all of them.
    """
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size ({batch_size}) and steps ({steps}) must be positive")
    from torch.profiler import ProfilerActivity, profile

    cpu = torch.device("cpu")
    model = model.to(cpu).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **adam_options(cpu))
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        training_step(model, optimizer, images, labels, num_train=num_train)

    step()  # Adam creates its state in the first step
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    operators = [event for event in profiler.events() if event.name.startswith("aten::")]
    top_level = [event for event in operators if not _inside_aten_op(event)]
    return {"top_level": len(top_level) / steps, "all": len(operators) / steps}


def count_training_ops(
    models: Sequence[str] = ("bayesian", "deterministic"),
    *,
    batch_size: int = 256,
    channels: Sequence[int] = (32, 64, 128),
    hidden_features: int = 256,
    steps: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`count_step_ops` of each of ``models`` (names of :data:`MODELS`), built afresh
    at this shape; the document stored under ``op_counts``.

    Keys: ``device`` (always ``"cpu"``), ``batch_size``, ``channels``, ``hidden_features``,
    ``steps``, ``models`` (``{name: {"top_level", "all"}}``), ``target_top_level``
    (:data:`OP_COUNT_TARGET`), ``ours_top_level_met`` (``None`` without ours or away from
    :data:`BOOK_SHAPE`, where the target is not stated) and
    ``ours_over_deterministic_top_level`` (``None`` where a model is missing).
    """
    counts: dict[str, dict[str, float]] = {}
    for name in models:
        seed_everything(seed)
        counts[name] = count_step_ops(build_model(name, channels, hidden_features),
                                      batch_size=batch_size, steps=steps)
    ours, twin = counts.get("bayesian"), counts.get("deterministic")
    book_shape = (batch_size == BOOK_SHAPE["batch_size"]
                  and tuple(channels) == BOOK_SHAPE["channels"]
                  and hidden_features == BOOK_SHAPE["hidden_features"])
    return {
        "device": "cpu",
        "batch_size": batch_size,
        "channels": list(channels),
        "hidden_features": hidden_features,
        "steps": steps,
        "models": counts,
        "target_top_level": OP_COUNT_TARGET,
        "ours_top_level_met": (ours["top_level"] <= OP_COUNT_TARGET
                               if ours is not None and book_shape else None),
        "ours_over_deterministic_top_level": (None if ours is None or twin is None
                                              else ours["top_level"] / twin["top_level"]),
    }


# ------------------------------------------------------------------------- the report


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator["images_per_second"] / denominator["images_per_second"]


def _judge(name: str, value: float | None, device_type: str = "cpu") -> dict[str, Any]:
    comparison, target = TARGETS_BY_DEVICE.get(device_type, TARGETS_BY_DEVICE["cuda"])[name]
    return {"value": value, "target": f"{comparison} {target:g}",
            "met": None if value is None else value >= target}


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
    engine: bool = True,
    prediction_samples: int = 8,
    prediction_images: int = 512,
    count_ops: bool = False,
) -> dict[str, Any]:
    """Benchmark ``models`` (and the engine, and prediction) in one interleaved run on one
    device; returns the result document.

    With ``count_ops`` the document's ``op_counts`` holds :func:`count_training_ops` of the
    selected models at the benchmark's shape (on the CPU, whatever ``device``); ``None``
    otherwise.

    ``bayesian-torch`` is skipped (and the reason recorded under ``skipped``) when the
    package does not import; the engine line needs ``bayesian`` among ``models`` and is
    skipped for bf16 off CUDA (the engine's autocast is CUDA-only); the prediction lines
    (``prediction_samples`` > 0) need ``bayesian`` and ``deterministic``. On CUDA, fp32 runs
    with TF32 matrix products and convolutions allowed (the setting is restored afterwards).
    """
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {MODELS}")
    if prediction_samples < 0 or prediction_images < 1:
        raise ValueError(f"prediction_samples ({prediction_samples}) must be >= 0 and "
                         f"prediction_images ({prediction_images}) positive")
    torch_device = select_device(device)
    bt_version = bayesian_torch_version()
    skipped: dict[str, str] = {}
    selected = [name for name in MODELS if name in models]
    if "bayesian-torch" in selected and bt_version is None:
        selected.remove("bayesian-torch")
        skipped["bayesian-torch"] = ("bayesian-torch is not installed "
                                     "(pip install 'bnn-course[bench]'); skipped")
    with_engine = engine and "bayesian" in selected
    if with_engine and precision == "bf16" and torch_device.type != "cuda":
        with_engine = False
        skipped["engine"] = "the engine's bf16 autocast is CUDA-only; skipped"
    with_prediction = (prediction_samples > 0
                       and {"bayesian", "deterministic"} <= set(selected))
    tf32 = torch_device.type == "cuda" and precision == "fp32"
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    started = time.perf_counter()
    train_sizes = window_sizes(steps, windows)
    try:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        built: dict[str, nn.Module] = {}
        runners: dict[str, Callable[[int], float]] = {}
        sizes: dict[str, list[int]] = {}
        warmups: dict[str, int] = {}
        for name in selected:
            seed_everything(seed)
            built[name] = build_model(name, channels, hidden_features).to(torch_device).train()
            step = make_train_step(built[name], torch_device, batch_size=batch_size,
                                   precision=precision, augment=augment, compile=compile)
            runners[name], sizes[name], warmups[name] = (
                steps_runner(step, torch_device), train_sizes, warmup)
        if with_engine:
            runners["engine"] = engine_runner(
                torch_device, batch_size=batch_size, precision=precision, augment=augment,
                compile=compile, channels=channels, hidden_features=hidden_features, seed=seed)
            sizes["engine"], warmups["engine"] = train_sizes, 0
            runners["engine"](max(1, warmup))  # compiles, warms the caches
        if with_prediction:
            images, _ = random_images(prediction_images, torch_device)
            for name, samples in (("bayesian", prediction_samples), ("deterministic", 0)):
                runners[f"predict:{name}"] = prediction_runner(built[name], images, samples,
                                                               precision)
                sizes[f"predict:{name}"] = [1] * len(train_sizes)
                warmups[f"predict:{name}"] = 1
        timings = time_interleaved(runners, sizes=sizes, warmup=warmups) if runners else {}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32

    op_counts = (count_training_ops(selected, batch_size=batch_size, channels=channels,
                                    hidden_features=hidden_features, seed=seed)
                 if count_ops else None)
    results: dict[str, dict[str, Any]] = {}
    for name in selected:
        total, means = parameter_counts(built[name])
        results[name] = {"label": LABELS[name], "parameters": total, "mean_parameters": means,
                         **summarize(timings[name], batch_size)}
    ours = results.get("bayesian")
    for result in results.values():
        result["ratio_to_ours"] = _ratio(result, ours)
    engine_result = None
    if with_engine:
        engine_result = {"label": LABELS["engine"], **summarize(timings["engine"], batch_size)}
        engine_result["ratio_to_ours"] = _ratio(engine_result, ours)
    prediction: dict[str, dict[str, Any]] = {}
    if with_prediction:
        for name, samples in (("bayesian", prediction_samples), ("deterministic", 1)):
            prediction[name] = {
                "label": (f"MC: ours, S = {prediction_samples} (images x samples/s)"
                          if name == "bayesian" else "MC: twin, one forward pass (images/s)"),
                "samples": samples,
                **summarize(timings[f"predict:{name}"], prediction_images * samples)}
    return {
        "benchmark": "training and MC-prediction throughput (images/s)",
        "device": device_description(torch_device),
        "device_type": torch_device.type,
        "torch": torch.__version__,
        "bayesian_torch": bt_version,
        "python": sys.version.split()[0],
        **git_state(Path(__file__).resolve().parent),
        "threads": torch.get_num_threads(),
        "environment": {key: os.environ[key] for key in sorted(os.environ)
                        if key.startswith(("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD"))},
        "precision": "fp32/TF32" if tf32 else ("fp32" if precision == "fp32"
                                               else "bf16 (autocast)"),
        "memory_format": str(preferred_memory_format(torch_device)).removeprefix("torch."),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "windows": len(train_sizes),
        "augment": augment,
        "compile": compile,
        "channels": list(channels),
        "hidden_features": hidden_features,
        "num_train": NUM_TRAIN,
        "seed": seed,
        "models": results,
        "engine": engine_result,
        "prediction": prediction,
        "prediction_images": prediction_images,
        "op_counts": op_counts,
        "skipped": skipped,
        "ratios": {
            "ours_over_bayesian_torch": _judge(
                "ours_over_bayesian_torch", _ratio(ours, results.get("bayesian-torch")),
                torch_device.type),
            "ours_over_deterministic": _judge(
                "ours_over_deterministic", _ratio(ours, results.get("deterministic")),
                torch_device.type),
            "engine_over_loop": _judge("engine_over_loop", _ratio(engine_result, ours),
                                       torch_device.type),
            "prediction_per_sample_over_twin": _judge(
                "prediction_per_sample_over_twin",
                _ratio(prediction.get("bayesian"), prediction.get("deterministic")),
                torch_device.type),
        },
        "seconds": time.perf_counter() - started,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def ratio_text(ratio: dict[str, Any]) -> str:
    """A ratio's value with two decimals, or three when two would round it onto its target
    (0.497 is "0.497x", not "0.50x", against a target of 0.5)."""
    threshold = float(str(ratio["target"]).split()[-1])
    value = ratio["value"]
    return f"{value:.3f}x" if round(value, 2) == threshold else f"{value:.2f}x"


def _ratio_line(name: str, ratio: dict[str, Any], missing: str) -> str:
    label = RATIO_LABELS[name] + ":"
    if ratio["value"] is None:
        return f"{label:<26} n/a ({missing})"
    verdict = "met" if ratio["met"] else "NOT met"
    return f"{label:<26} {ratio_text(ratio):>6}  (target {ratio['target']}x: {verdict})"


def _rate_row(result: dict[str, Any], counts: str = "", ratio: str = "") -> str:
    return (f"{result['label']:<44} {counts:>15} {result['images_per_second']:>10.1f} "
            f"{result['min_images_per_second']:>8.1f}-{result['max_images_per_second']:<8.1f} "
            f"{result['spread_percent']:>6.1f}% {ratio:>8}")


def format_report(document: dict[str, Any]) -> str:
    """The printed table: header, the training lines, the prediction lines, the ratios."""
    lines = [
        "Training throughput: engine steps (sampled forward, NLL + KL/N, backward, Adam)",
        f"device: {document['device']}, torch threads {document['threads']} | "
        f"torch {document['torch']} | batch {document['batch_size']} | "
        f"precision {document['precision']} | augment {'on' if document['augment'] else 'off'}"
        f" | compile {'on' if document['compile'] else 'off'} | "
        f"memory format {document.get('memory_format', 'contiguous_format')}",
        f"{document['steps']} timed steps in {document['windows']} interleaved windows after "
        f"{document['warmup']} warm-up steps per model; channels "
        f"{tuple(document['channels'])}, hidden {document['hidden_features']}",
        "",
        f"{'line':<44} {'params (means)':>15} {'images/s':>10} {'windows min-max':>17} "
        f"{'spread':>7} {'vs ours':>8}",
    ]
    for result in document["models"].values():
        ratio = result["ratio_to_ours"]
        counts = f"{_millions(result['parameters'])} ({_millions(result['mean_parameters'])})"
        lines.append(_rate_row(result, counts, "n/a" if ratio is None else f"{ratio:.2f}x"))
    engine = document.get("engine")
    if engine is not None:
        ratio = engine["ratio_to_ours"]
        lines.append(_rate_row(engine, "", "n/a" if ratio is None else f"{ratio:.2f}x"))
    for name, reason in document["skipped"].items():
        lines.append(f"{LABELS[name]:<44} {reason}")
    prediction = document.get("prediction") or {}
    if prediction:
        lines += ["", f"Monte Carlo prediction (predict_log_probs, no autograd), "
                      f"{document['prediction_images']} images per window"]
        lines += [_rate_row(result) for result in prediction.values()]
    op_counts = document.get("op_counts")
    if op_counts:
        lines += ["", f"aten operators per training step (torch.profiler on the CPU, fp32, fused "
                      f"Adam; batch {op_counts['batch_size']}, channels "
                      f"{tuple(op_counts['channels'])}, hidden {op_counts['hidden_features']})",
                  f"{'line':<44} {'top-level':>10} {'with nested':>12}"]
        lines += [f"{LABELS[name]:<44} {counts['top_level']:>10.0f} {counts['all']:>12.0f}"
                  for name, counts in op_counts["models"].items()]
        if op_counts["ours_top_level_met"] is not None:
            verdict = "met" if op_counts["ours_top_level_met"] else "NOT met"
            lines.append(f"ours, top-level operators: target <= "
                         f"{op_counts['target_top_level']} (book's shape): {verdict}")
        if op_counts["ours_over_deterministic_top_level"] is not None:
            lines.append(f"ours / deterministic, top-level operators: "
                         f"{op_counts['ours_over_deterministic_top_level']:.2f}x")
    ratios = document["ratios"]
    missing = {
        "ours_over_bayesian_torch": ("bayesian-torch not installed"
                                     if "bayesian-torch" in document["skipped"]
                                     else "needs both models"),
        "ours_over_deterministic": "needs both models",
        "engine_over_loop": "needs the engine line",
        "prediction_per_sample_over_twin": "needs the prediction lines",
    }
    lines.append("")
    lines += [_ratio_line(name, ratios[name], missing[name]) for name in TARGETS
              if name in ratios]
    if document["bayesian_torch"] is not None and "bayesian-torch" in document["models"]:
        lines.append(f"bayesian-torch {document['bayesian_torch']}: per-pixel Flipout signs in "
                     "its convolutions (ours: per example and channel), a different estimator")
    lines.append(f"total time {document['seconds']:.1f} s")
    return "\n".join(lines)


def markdown_table(documents: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of one or more result documents, one column per document.

    Rows: the training lines (images/s), the prediction lines (images x samples/s and
    images/s), the target ratios with a check mark when met and, where a document has them
    (``--count-ops``), the operator counts. The README's speed table is this function's
    output (``--markdown``).
    """
    if not documents:
        raise ValueError("markdown_table needs at least one result document")

    def header(document: dict[str, Any]) -> str:
        threads = document["threads"]
        return (f"{document['device']}, {threads} thread{'s' if threads != 1 else ''}, "
                f"{document['precision']}")

    def rate(result: dict[str, Any] | None) -> str:
        return "–" if result is None else f"{result['images_per_second']:.0f}"

    rows: list[tuple[str, list[str]]] = []
    for name in MODELS:
        rows.append((f"training: {LABELS[name]} (images/s)",
                     [rate(d["models"].get(name)) for d in documents]))
    rows.append((f"training: {LABELS['engine']} (images/s)",
                 [rate(d.get("engine")) for d in documents]))
    samples = {d["prediction"]["bayesian"]["samples"] for d in documents
               if d.get("prediction")}
    rows.append((f"prediction: ours, S = {'/'.join(map(str, sorted(samples))) or 'n/a'} "
                 "(images x samples/s)",
                 [rate((d.get("prediction") or {}).get("bayesian")) for d in documents]))
    rows.append(("prediction: twin, one forward pass (images/s)",
                 [rate((d.get("prediction") or {}).get("deterministic")) for d in documents]))
    for name in TARGETS:
        cells = []
        for document in documents:
            ratio = document["ratios"].get(name, {"value": None})
            cells.append("–" if ratio["value"] is None else
                         f"{ratio_text(ratio)} (target {ratio['target']}x) "
                         f"{'✓' if ratio['met'] else '✗'}")
        rows.append((RATIO_LABELS[name], cells))
    if any(d.get("op_counts") for d in documents):

        def operators(document: dict[str, Any], name: str) -> str:
            counts = ((document.get("op_counts") or {}).get("models") or {}).get(name)
            return "–" if counts is None else f"{counts['top_level']:.0f} ({counts['all']:.0f})"

        for name in MODELS:
            rows.append((f"aten ops per training step, top-level (all): {LABELS[name]}",
                         [operators(d, name) for d in documents]))
    lines = ["| | " + " | ".join(header(d) for d in documents) + " |",
             "|---|" + "---|" * len(documents)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    commits = sorted({f"{d.get('git_commit') or 'unknown'}"[:10]
                      + ("+dirty" if d.get("git_dirty") else "") for d in documents})
    lines += ["", f"torch {documents[0]['torch']}, batch {documents[0]['batch_size']}, "
                  f"commit {', '.join(commits)}; commands: "
              + "; ".join(f"`{d.get('command', 'n/a')}`" for d in documents)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Training throughput (images/s) of the BayesianCNN, its deterministic "
                    "twin, bayesian-torch's Flipout CNN and the training engine, and Monte "
                    "Carlo prediction throughput, in one run on one device.")
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
        help="torch.compile the forward pass (raise --warmup to cover compilation)")
    add("--no-augment", action="store_true", help="no random crops and flips")
    add("--models", nargs="+", choices=MODELS, default=list(MODELS),
        help="which models (default: all; bayesian-torch only when installed)")
    add("--no-engine", action="store_true", help="leave out the engine line")
    add("--samples", type=int, default=8,
        help="weight samples per image of the prediction line; 0 leaves the prediction "
             "lines out (default: %(default)s)")
    add("--predict-images", type=int, default=512,
        help="images per prediction window (default: %(default)s)")
    add("--channels", type=lambda text: tuple(int(c) for c in text.split(",")),
        default=(32, 64, 128), metavar="C1,C2,...",
        help="output channels of the convolution blocks (default: 32,64,128)")
    add("--hidden-features", type=int, default=256, help="default: %(default)s")
    add("--threads", type=int, default=None,
        help="torch.set_num_threads (default: leave PyTorch's default)")
    add("--seed", type=int, default=0, help="default: %(default)s")
    add("--count-ops", action="store_true",
        help="also count the aten operators of a training step of each model with "
             "torch.profiler, on the CPU (needs no GPU)")
    add("--json", metavar="PATH", default=None, help="also save the results as JSON here")
    add("--markdown", metavar="JSON", nargs="+", default=None,
        help="print the Markdown table of saved results (one column per file) and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks.throughput``; returns the result document
    (with ``--markdown``: ``{"markdown": table}``)."""
    args = build_parser().parse_args(argv)
    if args.markdown is not None:
        table = markdown_table([json.loads(Path(path).read_text()) for path in args.markdown])
        print(table)
        return {"markdown": table}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    document = run_benchmark(
        args.models, device=args.device, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, windows=args.windows, precision=args.precision,
        augment=not args.no_augment, compile=args.compile, channels=args.channels,
        hidden_features=args.hidden_features, seed=args.seed, engine=not args.no_engine,
        prediction_samples=args.samples, prediction_images=args.predict_images,
        count_ops=args.count_ops)
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
