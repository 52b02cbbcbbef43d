r"""Looking inside a Bayesian network: shapes, parameter and KL accounting, prediction spread.

Chapter 5 uses these functions to take the :class:`~bnn_course.models.BayesianCNN` apart
before it has seen any data.

* :func:`count_parameters` counts the random variables (weights and biases) of the Bayesian
  layers and the learned parameters (two per random variable: :math:`\mu` and
  :math:`\log\sigma`).
* :func:`layer_table` runs one forward pass with hooks and returns, per layer, the input and
  output shapes, the counts and the layer's closed-form KL divergence.
* :func:`deterministic_twin` builds the ordinary CNN of the same shape whose weights are the
  posterior means, i.e. what ``model(x, sample=False)`` computes.
* :func:`prediction_spread` compares stochastic forward passes with the deterministic one:
  average total variation distance and how often the predicted class changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bnn_course.layers import (
    BayesianConv2dFlipout,
    BayesianDenseFlipout,
    BayesianLayer,
    bayesian_layers,
)
from bnn_course.models import CNNStack


def _weight_and_bias_counts(module: nn.Module) -> tuple[int, int]:
    """Numbers of weights and biases of one layer (random variables for a Bayesian layer)."""
    if isinstance(module, BayesianLayer):
        biases = 0 if module.bias_mu is None else module.bias_mu.numel()
        return module.weight_mu.numel(), biases
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weights = weight.numel() if isinstance(weight, torch.Tensor) else 0
    biases = bias.numel() if isinstance(bias, torch.Tensor) else 0
    return weights, biases


def _learned(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> dict[str, int]:
    r"""Weights, biases and learned parameters of ``model``.

    ``weights`` and ``biases`` count the random variables of the Bayesian layers (one per
    weight or bias of the equivalent deterministic layer); for a model without Bayesian layers
    they count the ``weight`` and ``bias`` tensors of its leaf modules instead. ``learned``
    counts every trainable scalar of ``model`` (for a Bayesian layer :math:`\mu` and
    :math:`\log\sigma` of each random variable, i.e. twice ``weights + biases``).

    Returns
    -------
    dict
        ``{"weights": int, "biases": int, "learned": int}``.
    """
    layers: list[nn.Module] = [layer for _, layer in bayesian_layers(model)]
    if not layers:
        layers = [m for m in model.modules() if not list(m.children())]
    weights = biases = 0
    for layer in layers:
        w, b = _weight_and_bias_counts(layer)
        weights += w
        biases += b
    return {"weights": weights, "biases": biases, "learned": _learned(model)}


def _reported_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Bayesian layers, and leaf modules that are not inside a Bayesian layer."""
    reported: list[tuple[str, nn.Module]] = []
    bayesian_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in bayesian_prefixes):
            continue
        if isinstance(module, BayesianLayer):
            bayesian_prefixes.append(name)
            reported.append((name, module))
        elif not list(module.children()) and module is not model:
            reported.append((name, module))
    return reported


def layer_table(
    model: nn.Module, input_shape: Sequence[int], sample: bool = False
) -> list[dict[str, Any]]:
    """One forward pass with hooks: a row per layer, in the order the layers were called.

    The layers are the Bayesian layers and every leaf module outside them (``nn.ReLU``,
    ``nn.MaxPool2d``, ...). Operations applied as functions (``F.relu``, ``F.max_pool2d``
    inside :class:`~bnn_course.models.BayesianCNN`) have no module and no row; they show up
    as a difference between one row's output shape and the next row's input shape.

    Parameters
    ----------
    model:
        Any module; it is called as ``model(x, sample=sample)`` when it contains Bayesian
        layers and as ``model(x)`` otherwise, under ``torch.no_grad()``.
    input_shape:
        Shape of the input batch, e.g. ``(32, 3, 32, 32)``; the input is zeros (the shapes
        do not depend on the values).
    sample:
        Passed to a Bayesian model's forward.

    Returns
    -------
    list of dict
        Keys ``name``, ``type``, ``input_shape``, ``output_shape`` (tuples of ints),
        ``weights``, ``biases``, ``learned`` (ints), and ``kl`` (the layer's closed-form KL
        as a float, ``None`` for a layer that is not Bayesian).
    """
    reported = _reported_modules(model)
    rows: list[dict[str, Any]] = []
    handles = []

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            weights, biases = _weight_and_bias_counts(module)
            kl = (float(module.kl_divergence().item())
                  if isinstance(module, BayesianLayer) else None)
            rows.append({
                "name": name,
                "type": type(module).__name__,
                "input_shape": tuple(inputs[0].shape),
                "output_shape": tuple(output.shape),
                "weights": weights,
                "biases": biases,
                "learned": _learned(module),
                "kl": kl,
            })
        return hook

    for name, module in reported:
        handles.append(module.register_forward_hook(make_hook(name, module)))
    try:
        parameter = next(model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else torch.device("cpu")
        x = torch.zeros(tuple(input_shape), dtype=dtype, device=device)
        is_bayesian = any(isinstance(m, BayesianLayer) for _, m in reported)
        with torch.no_grad():
            if is_bayesian:
                model(x, sample=sample)
            else:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _posterior_mean_layer(layer: nn.Module) -> nn.Module:
    """``nn.Conv2d``/``nn.Linear`` with a Bayesian layer's means; ``nn.Identity`` for dropout
    (the ``sample=False`` network has none); a copy of any other stage, never the model's own
    module."""
    plain: nn.Conv2d | nn.Linear
    factory = {"device": layer.weight_mu.device, "dtype": layer.weight_mu.dtype} \
        if isinstance(layer, BayesianLayer) else {}
    if isinstance(layer, BayesianConv2dFlipout):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                          stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                          groups=layer.groups, bias=layer.bias_mu is not None, **factory)
    elif isinstance(layer, BayesianDenseFlipout):
        plain = nn.Linear(layer.in_features, layer.out_features,
                          bias=layer.bias_mu is not None, **factory)
    elif isinstance(layer, BayesianLayer):
        raise ValueError(f"no deterministic counterpart for {type(layer).__name__}")
    elif isinstance(layer, nn.Dropout):
        return nn.Identity()
    else:
        return copy.deepcopy(layer)
    with torch.no_grad():
        plain.weight.copy_(layer.weight_mu)
        if layer.bias_mu is not None and plain.bias is not None:
            plain.bias.copy_(layer.bias_mu)
    return plain


def deterministic_twin(model: CNNStack) -> nn.Sequential:
    """The ordinary CNN of the same shape as ``model``, with the posterior means as weights.

    ``deterministic_twin(model)(x)`` equals ``model(x, sample=False)`` (up to floating-point
    rounding). For a BayesianCNN it has half as many parameters as ``model``: a deterministic
    network learns one number per weight, the Bayesian one two (:math:`\\mu`,
    :math:`\\log\\sigma`); for a deterministic stack it is an independent copy.
    The layout is the model's own (:meth:`~bnn_course.models.CNNStack.stages`), every
    Bayesian layer replaced by an ``nn.Conv2d`` or ``nn.Linear`` holding its means.

    Returns
    -------
    nn.Sequential
        ``[Conv2d, ReLU, Conv2d, ReLU, MaxPool2d] * blocks, Flatten, Linear, ReLU, Linear,
        LogSoftmax``; input (B, C, H, W), output (B, num_classes) of log-probabilities.
    """
    return nn.Sequential(*(_posterior_mean_layer(stage) for stage in model.stages()),
                         nn.LogSoftmax(dim=-1))


def prediction_spread(
    model: Callable[..., torch.Tensor], images: torch.Tensor, num_samples: int
) -> dict[str, Any]:
    r"""How far stochastic predictions stray from the deterministic (posterior-mean) one.

    Runs ``model(images, sample=False)`` once and ``model(images, sample=True)``
    ``num_samples`` times (each call draws fresh weights), under ``torch.no_grad()``. The
    model must return log-probabilities. With :math:`p_0` the deterministic probabilities
    and :math:`p_s` those of sample :math:`s` for one image, the total variation distance is

    .. math:: \mathrm{TV}(p_s, p_0) = \tfrac12 \sum_k |p_{s,k} - p_{0,k}| \in [0, 1].

    Parameters
    ----------
    model:
        A callable ``model(x, sample=bool) -> (B, K)`` log-probabilities, e.g. a
        :class:`~bnn_course.models.BayesianCNN`.
    images:
        Input batch (B, ...).
    num_samples:
        Number of stochastic passes, at least 1.

    Returns
    -------
    dict
        ``deterministic`` (B, K) and ``samples`` (S, B, K) probabilities, ``mean`` (B, K)
        (the Monte Carlo predictive, average of the samples), ``total_variation`` (S, B),
        and two floats: ``mean_total_variation`` (average over samples and images) and
        ``argmax_disagreement`` (fraction of (sample, image) pairs whose most probable class
        differs from the deterministic one).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    with torch.no_grad():
        deterministic = model(images, sample=False).exp().float()
        samples = torch.stack(
            [model(images, sample=True).exp().float() for _ in range(num_samples)]
        )
    total_variation = 0.5 * (samples - deterministic).abs().sum(dim=-1)
    disagree = samples.argmax(dim=-1) != deterministic.argmax(dim=-1)
    return {
        "deterministic": deterministic,
        "samples": samples,
        "mean": samples.mean(dim=0),
        "total_variation": total_variation,
        "mean_total_variation": float(total_variation.mean().item()),
        "argmax_disagreement": float(disagree.float().mean().item()),
    }
