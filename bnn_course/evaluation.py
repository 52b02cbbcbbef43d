r"""Predicting with a Bayesian network: posterior means, and Monte Carlo averages.

With :math:`S` weight samples :math:`w_s \sim q`, the predictive distribution is estimated by
averaging **probabilities** (not logits):

.. math::

    p(y \mid x, \mathcal{D}) \approx \bar p(y \mid x)
    = \frac{1}{S} \sum_{s=1}^{S} p(y \mid x, w_s).

Averaging logits (or log-probabilities) instead computes a renormalised geometric mean, a
different and over-confident quantity. The *posterior-mean* prediction uses
:math:`w = \mu` (``model(x, sample=False)``): one pass, no uncertainty.

Reported per set: accuracy and mean negative log-likelihood
:math:`-\frac1N\sum_n \log \bar p(y_n \mid x_n)` for both, and the mean predictive entropy
:math:`\mathbb{H}[\bar p] = -\sum_k \bar p_k \log \bar p_k` of the MC predictive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bnn_course.data import normalize
from bnn_course.layers import preferred_memory_format

PREDICTION_BATCH_SIZES = {"cpu": 256, "cuda": 4096, "mps": 1024}
"""Default images per forward pass of :func:`predict_log_probs`, by device type.

On the CPU a batch whose activations stay in the caches is fastest (256 ran the
seed-sized networks 1.5-2x faster than 1000 or 2000 images, one thread); a GPU wants the
largest batch that fits, and without autograd state 4096 CIFAR images need about
0.5 GB per activation tensor of the first block."""


def prediction_batch_size(device: torch.device | str) -> int:
    """:data:`PREDICTION_BATCH_SIZES` for ``device``'s type (1000 for any other)."""
    return PREDICTION_BATCH_SIZES.get(torch.device(device).type, 1000)


@torch.no_grad()
def predict_log_probs(
    model: nn.Module,
    images: torch.Tensor,
    num_samples: int,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    include_mean: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Posterior-mean and per-sample log-probabilities for ``images``.

    Forward passes only: no autograd state, each batch normalised once and laid out as
    :func:`~bnn_course.layers.preferred_memory_format` says, then passed through the
    network ``num_samples`` times (and once more with the means if ``include_mean``).
    Nothing in the loop reads a value back from the device (no ``.item()``, no test of a
    tensor's value), so on a GPU the passes are queued without waiting; a BayesianCNN draws
    the randomness of each sampled pass at once
    (:func:`~bnn_course.layers.draw_flipout_noise`).

    Parameters
    ----------
    model:
        Returns log-probabilities ``(B, K)``; ``model(x, sample=False)`` uses the means.
    images:
        ``uint8`` ``(N, 3, H, W)`` on the model's device (normalised here, batch by batch).
    num_samples:
        Number :math:`S \\ge 0` of stochastic passes.
    batch_size:
        Images per pass; ``None``: :func:`prediction_batch_size` of ``images``' device.
    autocast_dtype:
        Run the passes under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on
        CUDA); ``None`` for full precision.
    include_mean:
        Also make the ``sample=False`` pass; ``False`` skips it (callers that only need the
        samples) and returns ``None`` in its place.

    Returns
    -------
    (mean_log_probs ``(N, K)`` or ``None``, sample_log_probs ``(S, N, K)``), float32, on
    ``images``' device.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_samples == 0 and not include_mean:
        raise ValueError("nothing to predict: num_samples is 0 and include_mean is False")
    if batch_size is None:
        batch_size = prediction_batch_size(images.device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    means, samples = [], []
    device_type = images.device.type
    memory_format = preferred_memory_format(images.device)
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start:start + batch_size])
            if x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                if include_mean:
                    means.append(model(x, sample=False).float())
                if num_samples:
                    samples.append(torch.stack(
                        [model(x, sample=True).float() for _ in range(num_samples)]))
    finally:
        model.train(was_training)
    mean_log_probs = torch.cat(means) if include_mean else None
    if num_samples:
        sample_log_probs = torch.cat(samples, dim=1)
    else:
        sample_log_probs = mean_log_probs.new_empty((0, *mean_log_probs.shape))
    return mean_log_probs, sample_log_probs


def mc_log_predictive(sample_log_probs: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \frac1S \sum_s p_s`, computed stably with ``logsumexp``.

    ``sample_log_probs`` ``(S, N, K)`` -> ``(N, K)``.
    """
    if sample_log_probs.dim() != 3 or sample_log_probs.shape[0] == 0:
        raise ValueError("expected sample log-probabilities of shape (S >= 1, N, K), got "
                         f"{tuple(sample_log_probs.shape)}")
    # log S as a Python float: a float32 tensor would cost float64 inputs ~1e-8 of accuracy
    return torch.logsumexp(sample_log_probs, dim=0) - math.log(sample_log_probs.shape[0])


def classification_summary(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean NLL and mean predictive entropy of log-probabilities ``(N, K)``."""
    if log_probs.dim() != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(f"expected log_probs (N, K) and labels (N,), got "
                         f"{tuple(log_probs.shape)} and {tuple(labels.shape)}")
    labels = labels.to(log_probs.device)
    probs = log_probs.exp()
    entropy = -(probs * log_probs.clamp_min(-1e4)).sum(-1)
    return {
        "accuracy": (log_probs.argmax(-1) == labels).float().mean().item(),
        "nll": -log_probs.gather(1, labels[:, None]).mean().item(),
        "entropy": entropy.mean().item(),
    }


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Posterior-mean and MC-averaged accuracy, NLL and predictive entropy.

    Keys: ``accuracy_mean``, ``nll_mean``, ``entropy_mean`` (posterior means) and, when
    ``num_samples > 0``, ``accuracy_mc``, ``nll_mc``, ``entropy_mc`` (:math:`S` samples).
    """
    mean_log_probs, sample_log_probs = predict_log_probs(
        model, images, num_samples, batch_size, autocast_dtype)
    result = {f"{k}_mean": v for k, v in classification_summary(mean_log_probs, labels).items()}
    if num_samples:
        mc = classification_summary(mc_log_predictive(sample_log_probs), labels)
        result.update({f"{k}_mc": v for k, v in mc.items()})
    return result


def accuracy_against_num_samples(
    sample_log_probs: torch.Tensor, labels: torch.Tensor, sample_counts: Sequence[int]
) -> dict[int, float]:
    """Accuracy of the MC predictive that uses the first ``S`` samples, for each ``S``.

    ``sample_log_probs`` ``(S_max, N, K)``; every count must be in ``1..S_max``.
    """
    total = sample_log_probs.shape[0]
    result = {}
    for count in sample_counts:
        if not 1 <= count <= total:
            raise ValueError(f"sample count {count} outside 1..{total}")
        predictive = mc_log_predictive(sample_log_probs[:count])
        result[int(count)] = classification_summary(predictive, labels)["accuracy"]
    return result
