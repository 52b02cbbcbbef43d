r"""How loud is the weight noise? Signal-to-noise ratios of a stack of Bayesian layers.

A Bayesian layer computes a random pre-activation :math:`h = W x + b` with
:math:`W \sim q`. For one fixed input, the **signal** is what the posterior means compute,
:math:`\bar h = \mu_W x + \mu_b` (the layer called with ``sample=False``), and the **noise**
is how much :math:`h` moves from one stochastic pass to the next. For one dense layer with
independent Gaussian weights,

.. math::

    \mathbb{E}[h_j] = \bar h_j, \qquad
    \operatorname{Var}[h_j] = \sum_i \sigma_{W,ji}^2 x_i^2 + \sigma_{b,j}^2 .

For a stack of layers with an activation in between, the noise of layer :math:`l` also
contains the noise its input inherited from the layers below.

:func:`signal_to_noise_by_layer` measures, for every layer :math:`l`
(with :func:`noise_statistics`, which :func:`bnn_course.diagnostics.activation_scales` uses
too),

.. math::

    \mathrm{SNR}_l = \sqrt{\frac{\sum_{n,j} \bar h_{l,nj}^2}
                              {\sum_{n,j} \widehat{\operatorname{Var}}_s\big[h^{(s)}_{l,nj}\big]}},

the ratio of the root-mean-square posterior-mean pre-activation to the root-mean-square
standard deviation across :math:`S` stochastic passes, where :math:`n` runs over the inputs,
:math:`j` over the units (all non-batch positions) and :math:`h^{(s)}` is the pre-activation
in pass :math:`s` (every layer sampled). Ratios of root-mean-squares rather than means of
per-unit ratios: a unit whose mean happens to be near zero does not blow the average up.

:func:`top_class_flip_rate` measures what the noise does to a prediction: how often the
arg-max class of a stochastic pass differs from that of the posterior-mean network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pre_activations(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    sample: bool = True,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
) -> list[torch.Tensor]:
    r"""The pre-activation of every layer of ``activation(layer_1) -> ... -> layer_L``.

    Parameters
    ----------
    layers:
        Bayesian layers called as ``layer(h, sample=sample)`` (e.g.
        :class:`~bnn_course.layers.BayesianDenseFlipout`); ``activation`` is applied between
        consecutive layers, not after the last.
    x:
        Inputs, shape (N, ...) as the first layer expects.
    sample:
        ``True``: one stochastic pass (every layer draws its weights). ``False``: the
        posterior-mean network.

    Returns
    -------
    list of torch.Tensor
        ``[h_1, ..., h_L]``, ``h_l`` of shape (N, ...) as layer ``l`` outputs.
    """
    if len(layers) == 0:
        raise ValueError("layers must not be empty")
    outputs = []
    h = x
    for index, layer in enumerate(layers):
        h = layer(h if index == 0 else activation(h), sample=sample)
        outputs.append(h)
    return outputs


@torch.no_grad()
def noise_statistics(
    run: Callable[[bool], Sequence[torch.Tensor]], num_samples: int
) -> list[dict[str, float]]:
    r"""Signal and sampling noise of each of a network's pre-activations, from repeated passes.

    ``run(False)`` returns the posterior-mean pre-activations :math:`[\bar h_1, \ldots,
    \bar h_L]` of one pass and ``run(True)`` those of one stochastic pass (fresh weights in
    every layer); each :math:`h_l` is a tensor (N, ...) of the same shape in every pass.
    Over :math:`S` = ``num_samples`` stochastic passes, with deviations
    :math:`d^{(s)} = h^{(s)} - \bar h` accumulated in float64 (centred on the mean
    network, so that tiny noise next to a large signal is not lost to cancellation),

    .. math::

        \text{signal}_l = \sqrt{\operatorname{mean}_{n,j} \bar h_{l,nj}^2}, \qquad
        \text{noise}_l = \sqrt{\operatorname{mean}_{n,j}
            \widehat{\operatorname{Var}}_s\big[h^{(s)}_{l,nj}\big]},

    with the unbiased variance :math:`\widehat{\operatorname{Var}}_s` over the passes,
    and :math:`\mathrm{SNR}_l = \text{signal}_l / \text{noise}_l`.

    Returns
    -------
    list of dict
        One per pre-activation, in ``run``'s order: ``signal_rms``, ``noise_rms``,
        ``signal_to_noise`` (``inf`` where there is no noise at all) and ``sampled_rms``
        (the root-mean-square of the sampled pre-activations themselves,
        :math:`\sqrt{\operatorname{mean}_{s,n,j} (h^{(s)}_{l,nj})^2}`).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    means = [h.detach().double() for h in run(False)]
    sums = [torch.zeros_like(m) for m in means]
    sums_of_squares = [torch.zeros_like(m) for m in means]
    for _ in range(num_samples):
        sampled = run(True)
        if len(sampled) != len(means):
            raise ValueError(f"a stochastic pass gave {len(sampled)} pre-activations, the "
                             f"posterior-mean pass {len(means)}")
        for index, h in enumerate(sampled):
            deviation = h.detach().double() - means[index]
            sums[index] += deviation
            sums_of_squares[index] += deviation**2
    statistics = []
    for mean, total, total_sq in zip(means, sums, sums_of_squares, strict=True):
        variance = (total_sq - total**2 / num_samples) / (num_samples - 1)
        signal = mean.pow(2).mean().sqrt().item()
        noise = variance.clamp_min(0).mean().sqrt().item()
        # mean_s h_s^2 = hbar^2 + 2 hbar mean_s(d_s) + mean_s(d_s^2), d_s = h_s - hbar
        sampled_sq = mean**2 + 2 * mean * total / num_samples + total_sq / num_samples
        statistics.append({
            "signal_rms": signal,
            "noise_rms": noise,
            "signal_to_noise": signal / noise if noise > 0 else float("inf"),
            "sampled_rms": sampled_sq.mean().sqrt().item(),
        })
    return statistics


def signal_to_noise_by_layer(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    num_samples: int,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
) -> list[float]:
    r"""Per-layer ratio of posterior-mean signal to sampling noise, :math:`\mathrm{SNR}_l`.

    See the module docstring for the definition; computed by :func:`noise_statistics` from
    ``num_samples`` independent stochastic passes of the whole stack (each pass calls every
    layer once, so every layer draws fresh weights).

    Parameters
    ----------
    layers, activation:
        As in :func:`pre_activations`.
    x:
        Fixed inputs, shape (N, ...).
    num_samples:
        Number :math:`S \ge 2` of stochastic passes.

    Returns
    -------
    list of float
        :math:`[\mathrm{SNR}_1, \ldots, \mathrm{SNR}_L]`. ``inf`` where a layer has no noise
        at all.
    """
    statistics = noise_statistics(
        lambda sample: pre_activations(layers, x, sample=sample, activation=activation),
        num_samples)
    return [layer["signal_to_noise"] for layer in statistics]


@torch.no_grad()
def top_class_flip_rate(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    num_samples: int,
    activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
) -> float:
    r"""Fraction of stochastic passes whose top class differs from the mean network's.

    .. math::

        \text{flip rate} = \frac{1}{SN}\sum_{s,n}
            \big[\arg\max_c h^{(s)}_{L,nc} \ne \arg\max_c \bar h_{L,nc}\big],

    where :math:`h_L` are the last layer's outputs (logits, shape (N, C)). Zero for a
    deterministic network; about :math:`1 - 1/C` when the noise drowns the means, i.e. the
    predicted class is a fresh random guess on every pass.

    Parameters
    ----------
    layers, activation:
        As in :func:`pre_activations`; the last layer must output (N, C).
    x:
        Fixed inputs, shape (N, ...).
    num_samples:
        Number :math:`S \ge 1` of stochastic passes.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    mean_class = pre_activations(layers, x, sample=False, activation=activation)[-1].argmax(-1)
    flips = 0
    for _ in range(num_samples):
        logits = pre_activations(layers, x, sample=True, activation=activation)[-1]
        flips += int((logits.argmax(-1) != mean_class).sum())
    return flips / (num_samples * mean_class.numel())
