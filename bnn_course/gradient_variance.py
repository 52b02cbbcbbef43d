r"""Four ways to sample a Bayesian dense layer for a mini-batch, and their gradient variance.

A :class:`~bnn_course.layers.BayesianDenseFlipout` holds a factorised Gaussian
:math:`q(W, b)` with means :math:`\mu` and standard deviations :math:`\sigma`. For a
mini-batch :math:`x_1, \dots, x_B` every example needs weights drawn from :math:`q`. Four
estimators do this (chapter 3), all with the same per-example output distribution:

* **shared perturbation** (:func:`dense_shared_sample`): one :math:`W \sim q` for the whole
  batch, as a naive implementation of Bayes by Backprop does. One matrix product, but the
  examples' gradients are correlated through the common :math:`\Delta W`.
* **Flipout** (:func:`dense_flipout_samples`, the layer's own ``forward``): one
  :math:`\Delta W` decorrelated per example by random signs,
  :math:`W_n = \mu + \Delta W \circ (s_n r_n^\top)`. Two matrix products.
* **independent samples** (:func:`dense_independent_samples`): one :math:`W_n \sim q` per
  example. Exact, but :math:`B` times the memory and a batched product of :math:`B` matrices.
* **local reparameterisation** (:func:`dense_local_reparameterization`, Kingma, Salimans
  and Welling, 2015): sample the pre-activations instead of the weights. For a fixed input
  the output of a Gaussian layer is Gaussian with mean :math:`\mu x_n + \mu_b` and variance
  :math:`\sigma^2 x_n^2 + \sigma_b^2` (squares elementwise), so draw it directly with fresh
  noise per example and unit. Two matrix products and exactly the per-example distribution
  of independent samples. The weights are never drawn; that is exact because in a dense
  layer each weight enters one output of an example once. In a convolution a weight
  enters every position, and sampling outputs independently breaks that (chapter 4).

:func:`gradient_variance` measures how much of the mini-batch gradient's variance comes from
the weight noise; :func:`loglog_slope` fits how it falls with the batch size and
:func:`time_forward_backward` measures what each estimator costs.

Why the shared perturbation cannot average its noise away: with
:math:`g = \frac1B \sum_n g_n`,

.. math::

    \operatorname{tr}\operatorname{Var}(g) = \frac{\bar v}{B}
        + \Big(1 - \frac1B\Big)\,\bar c,

where :math:`\bar v` is the average over examples of
:math:`\operatorname{tr}\operatorname{Var}(g_n)` and :math:`\bar c` the average over
pairs :math:`n \ne m` of
:math:`\operatorname{tr}\operatorname{Cov}(g_n, g_m)`. Independent samples have
:math:`\bar c = 0`; a shared perturbation has :math:`\bar c > 0` and the variance levels off
at :math:`\bar c`; Flipout's signs remove every part of :math:`\bar c` that is odd in the
perturbation (Wen et al., 2018). The local reparameterisation draws every example's
noise independently, so its :math:`\bar c` is zero as for independent samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from bnn_course.layers import BayesianDenseFlipout

ForwardFn = Callable[[BayesianDenseFlipout, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_input(layer: BayesianDenseFlipout, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"expected input of shape (batch, {layer.in_features}), "
                         f"got {tuple(x.shape)}")


def dense_shared_sample(layer: BayesianDenseFlipout, x: torch.Tensor) -> torch.Tensor:
    r"""One weight sample shared by the whole mini-batch.

    .. math::

        W = \mu_W + \sigma_W \circ \varepsilon, \quad b = \mu_b + \sigma_b \circ \eta,
        \qquad y_n = W x_n + b \quad\text{for every } n,

    with a single :math:`\varepsilon \sim \mathcal{N}(0, I)` (and :math:`\eta`) per call.

    Shapes: ``x`` (B, in_features); returns (B, out_features).
    """
    _check_input(layer, x)
    weight = layer.weight_posterior.sample()
    bias = None if layer.bias_posterior is None else layer.bias_posterior.sample()
    return F.linear(x, weight, bias)


def dense_flipout_samples(layer: BayesianDenseFlipout, x: torch.Tensor) -> torch.Tensor:
    r"""Flipout, i.e. ``layer(x)``: pseudo-independent weights per example.

    .. math::

        y_n = \mu_W x_n + \mu_b + s_n \circ \big[\Delta W (x_n \circ r_n) + \Delta b\big],

    one :math:`\Delta W = \sigma_W \circ \varepsilon` per call, Rademacher signs
    :math:`r_n, s_n` per example (see :mod:`bnn_course.flipout`).

    Shapes: ``x`` (B, in_features); returns (B, out_features).
    """
    return layer(x)


def dense_independent_samples(layer: BayesianDenseFlipout, x: torch.Tensor) -> torch.Tensor:
    r"""An independent weight sample for every example of the mini-batch.

    .. math::

        W_n = \mu_W + \sigma_W \circ \varepsilon_n, \quad b_n = \mu_b + \sigma_b \circ \eta_n,
        \qquad y_n = W_n x_n + b_n,

    with independent :math:`\varepsilon_1, \dots, \varepsilon_B`. Computed as
    :math:`\mu_W x_n + \mu_b + \Delta W_n x_n + \Delta b_n`, the noise part a batched
    matrix-vector product over a (B, out, in) tensor of perturbations: :math:`B` times the
    memory and the random numbers of one sample.

    Shapes: ``x`` (B, in_features); returns (B, out_features).
    """
    _check_input(layer, x)
    batch = x.shape[0]
    sigma = layer.weight_sigma
    weight_delta = sigma * torch.randn((batch, *sigma.shape), dtype=sigma.dtype,
                                       device=sigma.device)  # (B, out, in)
    output = F.linear(x, layer.weight_mu, layer.bias_mu)
    output = output + torch.einsum("boi,bi->bo", weight_delta, x)
    if layer.bias_posterior is not None:
        bias_sigma = layer.bias_sigma
        output = output + bias_sigma * torch.randn((batch, *bias_sigma.shape),
                                                   dtype=bias_sigma.dtype,
                                                   device=bias_sigma.device)
    return output


def dense_local_reparameterization(layer: BayesianDenseFlipout,
                                   x: torch.Tensor) -> torch.Tensor:
    r"""The local reparameterisation trick: sample each example's output, not the weights.

    .. math::

        m_n = \mu_W x_n + \mu_b, \qquad
        v_n = (\sigma_W \circ \sigma_W)(x_n \circ x_n) + \sigma_b \circ \sigma_b,
        \qquad y_n = m_n + \sqrt{v_n} \circ \zeta_n,

    with :math:`\zeta_n \sim \mathcal{N}(0, I)` independent for every example and output
    unit (Kingma, Salimans and Welling, 2015). For a fixed input this is exactly the
    distribution of :math:`W_n x_n + b_n` with :math:`W_n, b_n \sim q` independent per
    example: a sum of independent Gaussians is Gaussian with the summed variances, and the
    units of one example are independent because the rows of :math:`W_n` are. For a batch
    it is two matrix products, :math:`X \mu_W^\top` and
    :math:`(X \circ X)(\sigma_W \circ \sigma_W)^\top`, and :math:`B \times \text{out}`
    Gaussian numbers. The variance is floored at the smallest positive float before the
    square root, so an all-zero input without bias has a finite gradient.

    Shapes: ``x`` (B, in_features); returns (B, out_features).
    """
    _check_input(layer, x)
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)
    bias_variance = None if layer.bias_sigma is None else layer.bias_sigma.pow(2)
    variance = F.linear(x.pow(2), layer.weight_sigma.pow(2), bias_variance)
    floor = torch.finfo(variance.dtype).tiny
    return mean + variance.clamp_min(floor).sqrt() * torch.randn_like(mean)


def dense_mean_weights(layer: BayesianDenseFlipout, x: torch.Tensor) -> torch.Tensor:
    """The deterministic layer with the posterior means, ``layer(x, sample=False)``."""
    return layer(x, sample=False)


#: The four sampling estimators of chapter 3, by name.
ESTIMATORS: dict[str, ForwardFn] = {
    "shared": dense_shared_sample,
    "flipout": dense_flipout_samples,
    "independent": dense_independent_samples,
    "lrt": dense_local_reparameterization,
}


def _parameter_groups(layer: BayesianDenseFlipout) -> dict[str, list[torch.Tensor]]:
    """The layer's parameters split into means (``mu``) and sigma parameters (``sigma``)."""
    groups: dict[str, list[torch.Tensor]] = {"mu": [], "sigma": []}
    for name, parameter in layer.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        groups["mu" if leaf == "mu" else "sigma"].append(parameter)
    return groups


def _flat_gradients(
    forward_fn: ForwardFn,
    layer: BayesianDenseFlipout,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    groups: dict[str, list[torch.Tensor]],
) -> dict[str, torch.Tensor]:
    parameters = groups["mu"] + groups["sigma"]
    loss = loss_fn(forward_fn(layer, x), y)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    flat = [torch.zeros_like(p).flatten() if g is None else g.flatten()
            for p, g in zip(parameters, grads, strict=True)]
    num_mu = len(groups["mu"])
    return {"mu": torch.cat(flat[:num_mu]), "sigma": torch.cat(flat[num_mu:])}


def gradient_variance(
    forward_fn: ForwardFn,
    layer: BayesianDenseFlipout,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    num_repeats: int,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    r"""Variance of the mini-batch gradient caused by the weight noise, summed over entries.

    The gradient :math:`g` of ``loss_fn(forward_fn(layer, x_batch), y_batch)`` (a mean over
    the batch) is taken with respect to the weight and bias means (group ``"mu"``) and the
    parameters of the standard deviations, ``log_sigma`` or ``rho`` (group ``"sigma"``). The
    layer's parameters stay fixed; only the noise of ``forward_fn`` varies.

    * ``batch_size=None``: the mini-batch is all of ``(x, y)``, fixed. Returns the unbiased
      sample estimate over ``num_repeats`` noise draws :math:`g^{(1)}, \dots, g^{(R)}` of

      .. math::

          \operatorname{tr}\operatorname{Var}(g \mid x)
          = \sum_k \operatorname{Var}(g_k \mid x)
          \approx \frac{1}{R - 1} \sum_{r=1}^R \lVert g^{(r)} - \bar g \rVert^2 .

    * ``batch_size=B``: each of ``num_repeats`` rounds draws a mini-batch of ``B`` distinct
      examples uniformly from ``(x, y)`` and computes **two** gradients
      :math:`g^{(r,1)}, g^{(r,2)}` on it with independent noise. Since both are
      independent given the batch, :math:`\tfrac12 \mathbb{E}\lVert g^{(r,1)} - g^{(r,2)}
      \rVert^2 = \mathbb{E}_\text{batch} \operatorname{tr}\operatorname{Var}(g \mid
      \text{batch})`: the weight-noise part of the gradient variance, averaged over
      mini-batches. (The other part, from which examples are in the batch, is the same for
      every unbiased estimator and is not included.)

    Parameters
    ----------
    forward_fn:
        ``forward_fn(layer, x_batch) -> outputs``, e.g. one of :data:`ESTIMATORS`.
    layer:
        The Bayesian layer whose gradients are measured.
    x, y:
        Inputs (N, in_features) and targets (N, ...) accepted by ``loss_fn``.
    loss_fn:
        ``loss_fn(outputs, targets) -> scalar``, a mean over the batch (e.g.
        ``F.cross_entropy``).
    num_repeats:
        Number of noise draws (fixed batch, at least 2) or of mini-batches (at least 2).
    batch_size:
        ``None`` for a fixed batch, else the size of the random mini-batches.
    generator:
        Optional generator for drawing the mini-batches (the weight noise uses the global
        generator, as the layers do).

    Returns
    -------
    dict
        ``"mu"`` and ``"sigma"``: the estimated total variances (floats); ``"mu_se"`` and
        ``"sigma_se"``: their standard errors (the standard deviation of the per-round
        terms over :math:`\sqrt R`); ``"num_repeats"``.
    """
    if num_repeats < 2:
        raise ValueError(f"num_repeats must be at least 2, got {num_repeats}")
    if batch_size is not None and not 1 <= batch_size <= x.shape[0]:
        raise ValueError(f"batch_size must be in [1, {x.shape[0]}], got {batch_size}")
    groups = _parameter_groups(layer)
    terms: dict[str, list[torch.Tensor]] = {"mu": [], "sigma": []}
    if batch_size is None:
        draws = [_flat_gradients(forward_fn, layer, x, y, loss_fn, groups)
                 for _ in range(num_repeats)]
        for key in terms:
            stacked = torch.stack([d[key] for d in draws])  # (R, num_entries)
            deviations = stacked - stacked.mean(dim=0)
            # Per-draw terms whose mean is the unbiased sample variance, summed over entries.
            terms[key] = list(deviations.pow(2).sum(dim=1) * num_repeats / (num_repeats - 1))
    else:
        for _ in range(num_repeats):
            index = torch.randperm(x.shape[0], generator=generator)[:batch_size]
            first = _flat_gradients(forward_fn, layer, x[index], y[index], loss_fn, groups)
            second = _flat_gradients(forward_fn, layer, x[index], y[index], loss_fn, groups)
            for key in terms:
                terms[key].append(0.5 * (first[key] - second[key]).pow(2).sum())
    result: dict[str, float] = {"num_repeats": num_repeats}
    for key, values in terms.items():
        per_round = torch.stack(values).double()
        result[key] = per_round.mean().item()
        result[f"{key}_se"] = (per_round.std() / math.sqrt(num_repeats)).item()
    return result


def loglog_slope(
    batch_sizes: Sequence[int],
    variances: Sequence[float],
    standard_errors: Sequence[float] | None = None,
) -> tuple[float, float]:
    r"""Fit :math:`\log v = a + k \log B` by (weighted) least squares; return :math:`k` and its SE.

    A variance that falls like :math:`1/B` has slope :math:`k = -1`; one that levels off has
    :math:`k \to 0`. With ``standard_errors``, point :math:`B` gets weight
    :math:`1/\operatorname{SE}(\log v_B)^2 = (v_B / \operatorname{SE}_B)^2` and the returned
    standard error is that of a weighted fit; without, all weights are 1 and the standard
    error comes from the residuals (``nan`` for two points).
    """
    if len(batch_sizes) != len(variances) or len(batch_sizes) < 2:
        raise ValueError("need at least two batch sizes and one variance per batch size")
    log_b = torch.tensor([math.log(b) for b in batch_sizes], dtype=torch.float64)
    log_v = torch.tensor([math.log(v) for v in variances], dtype=torch.float64)
    if standard_errors is None:
        weights = torch.ones_like(log_b)
    else:
        weights = torch.tensor([(v / se) ** 2 for v, se in zip(variances, standard_errors,
                                                                strict=True)],
                               dtype=torch.float64)
    mean_b = (weights * log_b).sum() / weights.sum()
    mean_v = (weights * log_v).sum() / weights.sum()
    sxx = (weights * (log_b - mean_b) ** 2).sum()
    slope = (weights * (log_b - mean_b) * (log_v - mean_v)).sum() / sxx
    if standard_errors is not None:
        slope_se = math.sqrt(1.0 / sxx.item())
    elif len(batch_sizes) > 2:
        residuals = log_v - mean_v - slope * (log_b - mean_b)
        slope_se = math.sqrt((residuals.pow(2).sum() / (len(batch_sizes) - 2) / sxx).item())
    else:
        slope_se = math.nan
    return slope.item(), slope_se


def time_forward_backward(
    forward_fn: ForwardFn,
    layer: BayesianDenseFlipout,
    x: torch.Tensor,
    num_repeats: int = 20,
    num_warmup: int = 3,
) -> float:
    """Wall-clock seconds of one ``forward_fn(layer, x).square().mean().backward()``.

    The minimum over ``num_repeats`` timed calls, after ``num_warmup`` untimed ones. Other
    processes can only make a call slower, never faster, so the minimum is the most
    repeatable summary on a shared machine (the advice of Python's ``timeit``). On a GPU the
    clock waits for the device (``torch.cuda.synchronize``) before reading the time.
    """
    def synchronize() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    times = []
    for index in range(num_warmup + num_repeats):
        layer.zero_grad(set_to_none=True)
        synchronize()
        start = time.perf_counter()
        forward_fn(layer, x).square().mean().backward()
        synchronize()
        if index >= num_warmup:
            times.append(time.perf_counter() - start)
    layer.zero_grad(set_to_none=True)
    return min(times)
