r"""The evidence lower bound (ELBO) and Bayes by Backprop on a 1-D regression toy.

Variational inference fits a distribution :math:`q(w)` over the weights by maximising

.. math::

    \log p(\mathcal{D}) \;\ge\; \mathrm{ELBO}(q)
    = \mathbb{E}_{q(w)}\big[\log p(\mathcal{D} \mid w)\big]
      - \mathrm{KL}\big(q(w) \,\|\, p(w)\big).

For :math:`N` independent training pairs :math:`(x_n, y_n)` the likelihood is a sum over
examples; dividing the negative ELBO by :math:`N` gives the loss we minimise,

.. math::

    \mathcal{L}(q) = \frac{1}{N} \sum_{n=1}^{N}
        \mathbb{E}_{q(w)}\big[-\log p(y_n \mid x_n, w)\big]
      + \frac{\mathrm{KL}(q \,\|\, p)}{N},

estimated on a mini-batch by the mean negative log-likelihood (NLL) of the batch under one
weight sample per example plus the total KL **divided by the number of training examples**
:math:`N` (not by the batch size). Blundell et al. (2015) call minimising it with
reparameterised samples *Bayes by Backprop*.

Contents
--------
* :func:`negative_elbo` — the loss above from its two terms (the one loss of the package:
  the engine, the diagnostics and the benchmark use it too);
* :func:`gaussian_nll` — the NLL of a Gaussian likelihood with known noise;
* :func:`toy_function`, :func:`make_regression_toy` — a 1-D toy with a gap in the data;
* :class:`BayesianRegressor` — an MLP of :class:`~bnn_course.layers.BayesianDenseFlipout`;
* :func:`fit_bayes_by_backprop` — Adam on the negative ELBO, returning the training curves;
* :func:`predictive_samples` — network outputs under many posterior samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.layers import BayesianDenseFlipout

KL_SCALINGS: tuple[str, ...] = ("per_example", "unscaled")
"""How the total KL enters the loss: divided by :math:`N` (``"per_example"``, the ELBO per
training example) or added as it is (``"unscaled"``, the mistake of chapters 2 and 7)."""

TOY_CLUSTERS = ((-4.0, -2.0), (2.0, 4.0))
"""The two intervals the toy's inputs are drawn from; nothing is observed in between."""


def _as_scalar(value: torch.Tensor | float, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() != 0:
        raise ValueError(f"{name} must be a scalar (0-dim tensor or number), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor


def kl_divisor(num_train: int, kl_scaling: str = "per_example") -> int:
    r"""The :math:`N'` the total KL is divided by: :math:`N` for ``"per_example"``, 1 for
    ``"unscaled"`` (:data:`KL_SCALINGS`)."""
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train <= 0:
        raise ValueError(f"num_train must be a positive int, got {num_train!r}")
    if kl_scaling not in KL_SCALINGS:
        raise ValueError(f"kl_scaling must be one of {KL_SCALINGS}, got {kl_scaling!r}")
    return num_train if kl_scaling == "per_example" else 1


def negative_elbo(
    nll: torch.Tensor | float,
    kl: torch.Tensor | float,
    num_train: int,
    *,
    kl_scaling: str = "per_example",
    kl_weight: float = 1.0,
) -> torch.Tensor:
    r"""The per-example negative ELBO: :math:`\text{nll} + \beta\,\text{kl} / N'`.

    .. math::

        \mathcal{L} = \underbrace{\frac{1}{B}\sum_{n \in \text{batch}}
            -\log p(y_n \mid x_n, w_n)}_{\texttt{nll}}
          + \beta\,\frac{\overbrace{\mathrm{KL}(q \,\|\, p)}^{\texttt{kl}}}{N'},
        \qquad N' = \begin{cases} N & \texttt{kl\_scaling="per\_example"} \\
                                   1 & \texttt{kl\_scaling="unscaled"} \end{cases}

    Parameters
    ----------
    nll:
        The **mean** negative log-likelihood of a mini-batch, a scalar.
    kl:
        The **total** KL divergence of the posterior to the prior (summed over all weights),
        a scalar.
    num_train:
        :math:`N`, the number of examples in the whole training set (not the batch size).
    kl_scaling:
        ``"per_example"`` (the ELBO per example) or ``"unscaled"`` (the raw KL added to a
        mean NLL, the mistake chapters 2 and 7 show); see :data:`KL_SCALINGS`.
    kl_weight:
        :math:`\beta \ge 0`; 1 is the ELBO, other values "temper" the KL term. A KL warm-up
        factor :math:`\gamma_t \in [0, 1]` multiplies it (``kl_weight=beta * gamma``).

    Returns
    -------
    torch.Tensor
        A scalar, differentiable in ``nll`` and ``kl``; its dtype is that of
        ``nll + kl`` (pass ``nll=0.0`` to get the KL term :math:`\beta\,\text{kl}/N'`
        alone).
    """
    nll = _as_scalar(nll, "nll")
    kl = _as_scalar(kl, "kl")
    divisor = kl_divisor(num_train, kl_scaling)
    if isinstance(kl_weight, bool) or not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    return nll + kl_weight * kl / divisor


def gaussian_nll(
    prediction: torch.Tensor,
    target: torch.Tensor,
    noise_sigma: float | torch.Tensor,
) -> torch.Tensor:
    r"""Mean over the batch of :math:`-\log \mathcal{N}(y_n \mid f_n, \sigma^2 I)`, exactly.

    .. math::

        \frac{1}{B}\sum_{n=1}^{B} \sum_{d}\Big[\tfrac12\log(2\pi) + \log\sigma
            + \frac{(y_{nd} - f_{nd})^2}{2\sigma^2}\Big]

    Parameters
    ----------
    prediction, target:
        Tensors of the same shape (B, ...) with B >= 1: :math:`f_n` and :math:`y_n`. Every
        entry after the batch dimension is one independent output; they are summed.
    noise_sigma:
        The observation noise standard deviation :math:`\sigma > 0`: a number, or a tensor
        broadcastable to ``prediction`` (e.g. a learned one).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction and target must have the same shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")
    if prediction.dim() == 0 or prediction.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (B, ...), got shape "
                         f"{tuple(prediction.shape)}")
    noise_sigma = torch.as_tensor(noise_sigma, dtype=prediction.dtype, device=prediction.device)
    if not bool((noise_sigma > 0).all()):
        raise ValueError("noise_sigma must be positive")
    per_entry = (0.5 * math.log(2 * math.pi) + torch.log(noise_sigma)
                 + 0.5 * ((target - prediction) / noise_sigma) ** 2)
    return per_entry.reshape(prediction.shape[0], -1).sum(dim=1).mean()


def toy_function(x: torch.Tensor) -> torch.Tensor:
    r"""The toy's true regression function :math:`f(x) = \sin(1.5\,x) + 0.3\,x`."""
    return torch.sin(1.5 * x) + 0.3 * x


def make_regression_toy(
    num_train: int,
    noise_sigma: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A 1-D regression data set with two clusters and a gap between them.

    Half of the inputs (the first ``ceil(num_train / 2)``) are uniform on
    :math:`[-4, -2]`, the others uniform on :math:`[2, 4]` (:data:`TOY_CLUSTERS`); targets are
    :math:`y = f(x) + \sigma\varepsilon` with :func:`toy_function` :math:`f` and
    :math:`\varepsilon \sim \mathcal{N}(0, 1)`.

    Parameters
    ----------
    num_train:
        Number of pairs :math:`N \ge 1`.
    noise_sigma:
        Noise standard deviation :math:`\sigma \ge 0`.
    generator:
        The random stream (a seeded ``torch.Generator`` makes the data repeatable); ``None``
        uses PyTorch's global one.

    Returns
    -------
    x, y:
        float32 tensors of shape (N, 1).
    """
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"num_train must be a positive int, got {num_train!r}")
    if not (math.isfinite(noise_sigma) and noise_sigma >= 0):
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
    sizes = ((num_train + 1) // 2, num_train // 2)
    parts = [low + (high - low) * torch.rand(size, 1, generator=generator)
             for (low, high), size in zip(TOY_CLUSTERS, sizes, strict=True)]
    x = torch.cat(parts)
    y = toy_function(x) + noise_sigma * torch.randn(num_train, 1, generator=generator)
    return x, y


class BayesianRegressor(nn.Module):
    r"""A ReLU MLP whose every weight and bias is Gaussian (Flipout dense layers).

    ``in_features -> hidden_features[0] -> ... -> hidden_features[-1] -> out_features``, a
    ReLU after every hidden layer, a linear output :math:`f(x; w)` (the mean of a Gaussian
    likelihood).

    Parameters
    ----------
    in_features, out_features:
        Input and output widths.
    hidden_features:
        Widths of the hidden layers (may be empty: a Bayesian linear model).
    prior_sigma, init_log_sigma, parametrization:
        Passed to every :class:`~bnn_course.layers.BayesianDenseFlipout`.

    Shapes
    ------
    Input (B, in_features); output (B, out_features).
    """

    def __init__(
        self,
        in_features: int = 1,
        hidden_features: Sequence[int] = (64, 64),
        out_features: int = 1,
        prior_sigma: float = 1.0,
        init_log_sigma: float = -5.0,
        parametrization: str = "log",
    ) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden_features), int(out_features)]
        self.layers = nn.ModuleList(
            BayesianDenseFlipout(fan_in, fan_out, prior_sigma=prior_sigma,
                                 init_log_sigma=init_log_sigma, parametrization=parametrization)
            for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """One Flipout sample per example (``sample=True``) or the posterior-mean network."""
        for index, layer in enumerate(self.layers):
            x = layer(x, sample=sample)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def kl_divergence(self) -> torch.Tensor:
        """Total closed-form KL of all layers to the prior; a float32 scalar."""
        return torch.stack([layer.kl_divergence() for layer in self.layers]).sum()


def fit_bayes_by_backprop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    noise_sigma: float,
    kl_weight: float = 1.0,
    kl_scaling: str = "per_example",
    batch_size: int | None = None,
) -> dict[str, list[float]]:
    r"""Minimise the negative ELBO with Adam; return the curves of its two terms.

    Every step draws a mini-batch (all of ``x`` when ``batch_size`` is ``None``, else a random
    subset of ``batch_size`` examples), samples the weights once per example (the model's
    ``forward(x, sample=True)``) and takes one Adam step on

    .. math::

        \frac{1}{B}\sum_{n \in \text{batch}} -\log\mathcal{N}(y_n \mid f(x_n; w_n), \sigma^2)
        + \beta\,\frac{\mathrm{KL}(q\,\|\,p)}{N'},

    with :math:`N' = N` (the number of rows of ``x``) for ``kl_scaling="per_example"``, the
    ELBO, and :math:`N' = 1` for ``kl_scaling="unscaled"``, the mistake of adding the raw KL to
    a mean NLL: :func:`negative_elbo`.

    Parameters
    ----------
    model:
        A module with ``forward(x, sample=True)`` and ``kl_divergence()``, e.g.
        :class:`BayesianRegressor`.
    x, y:
        The whole training set, shapes (N, in_features) and (N, out_features).
    steps, lr:
        Number of Adam steps and learning rate.
    noise_sigma:
        Known observation noise :math:`\sigma` of the Gaussian likelihood.
    kl_weight:
        :math:`\beta`, see :func:`negative_elbo`.
    kl_scaling:
        ``"per_example"`` or ``"unscaled"`` (:data:`KL_SCALINGS`).
    batch_size:
        Mini-batch size, or ``None`` for full-batch steps.

    Returns
    -------
    dict
        ``{"nll": [...], "kl": [...], "loss": [...]}``, one float per step: the batch's mean
        NLL, the **total** KL and the loss that was minimised.
    """
    if kl_scaling not in KL_SCALINGS:
        raise ValueError(f"kl_scaling must be one of {KL_SCALINGS}, got {kl_scaling!r}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must have shapes (N, in) and (N, out) with the same N >= 1, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    num_train = x.shape[0]
    if batch_size is not None and not 1 <= batch_size <= num_train:
        raise ValueError(f"batch_size must be in [1, {num_train}] or None, got {batch_size!r}")

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict[str, list[float]] = {"nll": [], "kl": [], "loss": []}
    model.train()
    for _ in range(steps):
        if batch_size is None:
            x_batch, y_batch = x, y
        else:
            index = torch.randperm(num_train, device=x.device)[:batch_size]
            x_batch, y_batch = x[index], y[index]
        nll = gaussian_nll(model(x_batch, sample=True), y_batch, noise_sigma)
        kl = model.kl_divergence()
        loss = negative_elbo(nll, kl, num_train, kl_scaling=kl_scaling, kl_weight=kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["nll"].append(nll.item())
        history["kl"].append(kl.item())
        history["loss"].append(loss.item())
    return history


@torch.no_grad()
def predictive_samples(model: nn.Module, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    r"""Network outputs :math:`f(x_n; w^{(s)})` under ``num_samples`` posterior samples.

    Row :math:`s` is one call ``model(x, sample=True)``. With Flipout every example of a call
    gets its own weight sample, so each column is an i.i.d. sample of the predictive
    distribution of the mean :math:`f(x_n; w)`, but a row is not one function drawn from
    :math:`q`: use the columns (means, standard deviations per input), not rows as curves.
    Observation noise is not added.

    Shapes
    ------
    ``x`` (N, in_features); returns (num_samples, N, out_features).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return torch.stack([model(x, sample=True) for _ in range(num_samples)])
