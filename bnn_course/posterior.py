r"""A factorised Gaussian posterior over a tensor of weights.

Every weight :math:`w_i` of a Bayesian layer has its own Normal distribution

.. math::

    q(w_i) = \mathcal{N}(\mu_i, \sigma_i^2), \qquad \sigma_i = \exp(\lambda_i)
    \quad\text{(log parametrisation)} \qquad\text{or}\qquad
    \sigma_i = \log(1 + e^{\rho_i}) \quad\text{(softplus parametrisation)},

with learned :math:`\mu_i` and :math:`\lambda_i` (or :math:`\rho_i`). Both parametrisations
keep :math:`\sigma_i > 0` for any real parameter. ``exp`` is the one the book starts from;
``softplus`` grows only linearly for large :math:`\rho`, which some find more stable.

Sampling uses the reparameterisation trick (Kingma & Welling 2014): with
:math:`\varepsilon \sim \mathcal{N}(0, I)`, :math:`w = \mu + \sigma \odot \varepsilon`, so
gradients flow into :math:`\mu` and :math:`\sigma`.

The KL divergence to the prior :math:`p(w_i) = \mathcal{N}(0, s^2)` has the closed form

.. math::

    \mathrm{KL}(q \,\|\, p) = \sum_i \Big[\log\frac{s}{\sigma_i}
        + \frac{\sigma_i^2 + \mu_i^2}{2 s^2} - \frac12\Big].

A network has many such tensors. :func:`summed_gaussian_kl_divergence` and
:func:`gaussian_perturbations` treat all of them at once, in a fixed number of multi-tensor
(``torch._foreach_*``) operations instead of a few per tensor: the same numbers, but on a GPU
a handful of kernel launches instead of hundreds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PARAMETRIZATIONS = ("log", "softplus")


def gaussian_kl_divergence(
    mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float
) -> torch.Tensor:
    r"""Closed-form :math:`\sum_i \mathrm{KL}(\mathcal{N}(\mu_i,\sigma_i^2) \| \mathcal{N}(0,s^2))`.

    Parameters
    ----------
    mu, sigma:
        Tensors of the same shape (any shape); ``sigma > 0``.
    prior_sigma:
        The prior standard deviation :math:`s > 0`.

    Returns
    -------
    torch.Tensor
        A scalar in at least float32 (float64 for float64 inputs), whatever an enclosing
        autocast: a sum over millions of weights in bfloat16 would lose most of its digits.
    """
    if not prior_sigma > 0:
        raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
    if mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma must have the same shape, got {tuple(mu.shape)} "
                         f"and {tuple(sigma.shape)}")
    dtype = torch.promote_types(torch.promote_types(mu.dtype, sigma.dtype), torch.float32)
    mu_, sigma_ = mu.to(dtype), sigma.to(dtype)
    ratio = sigma_ / prior_sigma
    # log(ratio) rather than log(ratio**2): the square underflows for sigma/s < 1e-19.
    kl = 0.5 * (ratio**2 + (mu_ / prior_sigma) ** 2 - 1.0) - torch.log(ratio)
    return kl.sum()


def inverse_softplus(sigma: float) -> float:
    r""":math:`\rho` with :math:`\log(1 + e^\rho) = \sigma`, i.e. :math:`\log(e^\sigma - 1)`.

    Written as :math:`\sigma + \log(1 - e^{-\sigma})` for large :math:`\sigma` (where
    :math:`e^\sigma` overflows) and as ``log(expm1(sigma))`` otherwise (exact for tiny
    :math:`\sigma`).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    if sigma > 20.0:
        return sigma + math.log(-math.expm1(-sigma))
    return math.log(math.expm1(sigma))


class GaussianPosterior(nn.Module):
    r"""A tensor of independent Normal weights :math:`\mathcal{N}(\mu, \sigma^2)`.

    Parameters
    ----------
    shape:
        Shape of the weight tensor, e.g. ``(out_features, in_features)``.
    init_log_sigma:
        :math:`\log \sigma` at initialisation, the same for every weight. The default
        :math:`-5` gives :math:`\sigma \approx 0.0067`: the network starts almost
        deterministic and the data decide where to add noise. :math:`0` gives
        :math:`\sigma = 1`, which drowns every signal (chapter 1 shows why).
    parametrization:
        ``"log"`` (:math:`\sigma = e^\lambda`, parameter ``log_sigma``) or ``"softplus"``
        (:math:`\sigma = \log(1 + e^\rho)`, parameter ``rho``).

    Attributes
    ----------
    mu : nn.Parameter
        The means, of shape ``shape``, initialised to zero; layers call
        :meth:`reset_parameters` with their own scheme.
    sigma : torch.Tensor
        The standard deviations, of shape ``shape`` (a tensor computed from the parameter).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        init_log_sigma: float = -5.0,
        parametrization: str = "log",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.shape = tuple(int(s) for s in shape)
        self.parametrization = parametrization
        self.init_log_sigma = float(init_log_sigma)
        self.mu = nn.Parameter(torch.zeros(self.shape, **factory))
        if parametrization == "log":
            self.log_sigma = nn.Parameter(torch.empty(self.shape, **factory))
        else:
            self.rho = nn.Parameter(torch.empty(self.shape, **factory))
        self.reset_sigma()

    @property
    def sigma_parameter(self) -> nn.Parameter:
        r"""The learned parameter behind :math:`\sigma`: ``log_sigma`` or ``rho``."""
        return self.log_sigma if self.parametrization == "log" else self.rho

    def reset_sigma(self) -> None:
        """Set every :math:`\\sigma` to ``exp(init_log_sigma)``."""
        if self.parametrization == "log":
            with torch.no_grad():
                self.log_sigma.fill_(self.init_log_sigma)
        else:
            self.set_sigma(math.exp(self.init_log_sigma))

    @torch.no_grad()
    def set_sigma(self, sigma: float) -> None:
        r"""Set every :math:`\sigma` to ``sigma``, in either parametrisation.

        Writes :math:`\lambda = \log\sigma` (log) or :math:`\rho = \log(e^\sigma - 1)`
        (softplus, :func:`inverse_softplus`) into the parameter, in place.

        Parameters
        ----------
        sigma:
            The standard deviation, positive and finite.
        """
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        if self.parametrization == "log":
            self.log_sigma.fill_(math.log(sigma))
        else:
            self.rho.fill_(inverse_softplus(sigma))

    def log_sigma_values(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        r""":math:`\log\sigma`, detached, in ``dtype`` (float64 by default).

        Exact for the log parametrisation (the parameter itself, no ``exp``/``log`` trip);
        :math:`\log\operatorname{softplus}(\rho)` computed in ``dtype`` otherwise.
        """
        if self.parametrization == "log":
            return self.log_sigma.detach().to(dtype)
        return torch.log(F.softplus(self.rho.detach().to(dtype)))

    @property
    def sigma(self) -> torch.Tensor:
        """Standard deviations, same shape as :attr:`mu`."""
        if self.parametrization == "log":
            return torch.exp(self.log_sigma)
        return F.softplus(self.rho)

    def perturbation(self) -> torch.Tensor:
        r""":math:`\Delta w = \sigma \odot \varepsilon`, :math:`\varepsilon \sim \mathcal{N}(0, I)`.

        The zero-mean part of one reparameterised sample; ``mu + perturbation()`` is a
        sample of :math:`q`.
        """
        sigma = self.sigma
        return sigma * torch.randn_like(sigma)

    def sample(self) -> torch.Tensor:
        """One reparameterised sample :math:`w = \\mu + \\sigma \\odot \\varepsilon`."""
        return self.mu + self.perturbation()

    def kl_divergence(self, prior_sigma: float) -> torch.Tensor:
        """Closed-form KL to :math:`\\mathcal{N}(0, \\text{prior\\_sigma}^2)`.

        A scalar in at least float32 (see :func:`gaussian_kl_divergence`).
        """
        return gaussian_kl_divergence(self.mu, self.sigma, prior_sigma)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, parametrization={self.parametrization!r}, "
                f"init_log_sigma={self.init_log_sigma}")


# --------------------------------------------------------- many posteriors at once


def _log_sigma(posterior: GaussianPosterior) -> torch.Tensor:
    r""":math:`\log\sigma`, differentiable: the parameter itself for the log parametrisation."""
    if posterior.parametrization == "log":
        return posterior.log_sigma
    return torch.log(posterior.sigma)


def _common_device_and_dtype(posteriors: Sequence[GaussianPosterior],
                             what: str) -> tuple[torch.device, torch.dtype]:
    devices = {p.mu.device for p in posteriors}
    dtypes = {p.mu.dtype for p in posteriors}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(f"{what} needs posteriors on one device and in one dtype, got "
                         f"devices {sorted(map(str, devices))} and dtypes "
                         f"{sorted(map(str, dtypes))}")
    return devices.pop(), dtypes.pop()


class _SummedGaussianKL(torch.autograd.Function):
    r"""The summed KL of :func:`summed_gaussian_kl_divergence` and its closed-form gradient.

    Inputs: the prior scales :math:`s_t` (floats), then the means :math:`\mu_t`, then the
    :math:`\log\sigma_t`. With :math:`u = \mu/s` and :math:`v = \log\sigma - \log s` the KL
    of one weight is :math:`k = \tfrac12 u^2 + \tfrac12 (e^{2v} - 1) - v`, and

    .. math:: \partial k / \partial\mu = u / s, \qquad
              \partial k / \partial\log\sigma = e^{2v} - 1.

    Forward and backward are multi-tensor ops over the lists (a fixed number of them, however
    many tensors); :math:`u` and :math:`e^{2v} - 1` are kept for the backward pass.
    """

    @staticmethod
    def forward(ctx: Any, prior_sigmas: tuple[float, ...],  # type: ignore[override]
                *tensors: torch.Tensor) -> torch.Tensor:
        count = len(prior_sigmas)
        mus, log_sigmas = list(tensors[:count]), list(tensors[count:])
        u = torch._foreach_div(mus, list(prior_sigmas))                        # mu / s
        v = torch._foreach_sub(log_sigmas, [math.log(s) for s in prior_sigmas])  # log(sigma/s)
        w = torch._foreach_expm1(torch._foreach_mul(v, 2.0))                   # sigma^2/s^2 - 1
        terms = torch._foreach_addcmul(w, u, u)                                # + mu^2/s^2
        torch._foreach_mul_(terms, 0.5)
        torch._foreach_sub_(terms, v)                                          # k per weight
        # One sum per tensor: torch's multi-tensor norm would do all at once, but on the CPU
        # it accumulates float32 naively (1e-3 relative error for 500,000 weights).
        kl = torch.stack([term.sum() for term in terms]).sum()
        ctx.prior_sigmas = prior_sigmas
        ctx.save_for_backward(*u, *w)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        count = len(ctx.prior_sigmas)
        saved = ctx.saved_tensors
        u, w = list(saved[:count]), list(saved[count:])
        grad_mu = torch._foreach_div(u, list(ctx.prior_sigmas))  # mu / s^2
        torch._foreach_mul_(grad_mu, grad_kl)
        grad_log_sigma = torch._foreach_mul(w, grad_kl)          # sigma^2/s^2 - 1
        return (None, *grad_mu, *grad_log_sigma)


def summed_gaussian_kl_divergence(
    posteriors: Sequence[GaussianPosterior], prior_sigmas: Sequence[float]
) -> torch.Tensor:
    r""":math:`\sum_t \mathrm{KL}(q_t \,\|\, \mathcal{N}(0, s_t^2))` of many posteriors at once.

    Posterior :math:`t` has its own prior scale :math:`s_t` (layers may have different
    priors). In terms of :math:`u = \mu / s_t` and :math:`v = \log(\sigma / s_t)` the KL
    of one weight (the summand of :func:`gaussian_kl_divergence`) is

    .. math::

        k = \tfrac12 u^2 + \tfrac12 \big(e^{2v} - 1\big) - v \;\ge\; 0, \qquad
        \frac{\partial k}{\partial \mu} = \frac{\mu}{s_t^2}, \qquad
        \frac{\partial k}{\partial \log\sigma} = \frac{\sigma^2}{s_t^2} - 1.

    Every step of :math:`k` is computed for all tensors by one multi-tensor op
    (``torch._foreach_*``), and each tensor's terms are summed once. The gradient is the
    closed form above, again a few multi-tensor ops (a custom autograd function; first
    derivatives only). The value equals the sum of the posteriors'
    :meth:`GaussianPosterior.kl_divergence` up to rounding, in about ten operations plus
    one sum per tensor forward and four backward, instead of about twenty per tensor each
    way.

    Parameters
    ----------
    posteriors:
        At least one posterior, all on one device and in one dtype (either
        parametrisation; a softplus :math:`\sigma` enters through :math:`\log\sigma`).
    prior_sigmas:
        One prior standard deviation :math:`s_t > 0` per posterior.

    Returns
    -------
    torch.Tensor
        A scalar in at least float32 (float64 for float64 posteriors), whatever an enclosing
        autocast (multi-tensor ops are not autocast), differentiable in every parameter.
    """
    if len(posteriors) != len(prior_sigmas) or not posteriors:
        raise ValueError(f"need one prior_sigma per posterior and at least one posterior, got "
                         f"{len(posteriors)} posteriors and {len(prior_sigmas)} prior_sigmas")
    scales = tuple(float(s) for s in prior_sigmas)
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"every prior_sigma must be positive and finite, got {scales}")
    _, dtype = _common_device_and_dtype(posteriors, "summed_gaussian_kl_divergence")
    kl_dtype = torch.promote_types(dtype, torch.float32)
    mus = [p.mu for p in posteriors]
    log_sigmas = [_log_sigma(p) for p in posteriors]
    if dtype != kl_dtype:  # e.g. a bfloat16 network: sum in float32
        mus = [t.to(kl_dtype) for t in mus]
        log_sigmas = [t.to(kl_dtype) for t in log_sigmas]
    return _SummedGaussianKL.apply(scales, *mus, *log_sigmas)


class _ScaledNoise(torch.autograd.Function):
    r""":math:`\Delta_t = e^{\lambda_t} \odot \varepsilon_t` for lists of log-sigmas and noises.

    Inputs: the number :math:`T` of tensors, then :math:`\lambda_1..\lambda_T`, then
    :math:`\varepsilon_1..\varepsilon_T` (no gradient). Since
    :math:`\partial \Delta / \partial \lambda = e^\lambda \odot \varepsilon = \Delta`, the
    backward pass is one multi-tensor product of the output gradients with the outputs.
    """

    @staticmethod
    def forward(ctx: Any, count: int,  # type: ignore[override]
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        deltas = torch._foreach_exp(list(tensors[:count]))
        torch._foreach_mul_(deltas, list(tensors[count:]))
        ctx.count = count
        ctx.save_for_backward(*deltas)
        return tuple(deltas)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_deltas: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_log_sigmas = torch._foreach_mul(list(grad_deltas), list(ctx.saved_tensors))
        return (None, *grad_log_sigmas, *([None] * ctx.count))


def gaussian_perturbations(posteriors: Sequence[GaussianPosterior]) -> list[torch.Tensor]:
    r""":meth:`GaussianPosterior.perturbation` of every posterior, drawn at once.

    :math:`\Delta_t = \sigma_t \odot \varepsilon_t` with the standard normal noise
    :math:`\varepsilon_t` of all posteriors drawn by **one** ``randn`` and split into views.
    For the log parametrisation the products :math:`e^{\lambda_t} \odot \varepsilon_t` are
    one multi-tensor op, and so is their gradient
    (:math:`\partial\Delta_t / \partial\lambda_t = \Delta_t`); a softplus
    :math:`\sigma_t` is multiplied tensor by tensor. The distribution is that of calling
    ``perturbation()`` on each posterior; the random numbers are not the same ones.

    Parameters
    ----------
    posteriors:
        Posteriors on one device and in one dtype (an empty list gives an empty list).

    Returns
    -------
    list[torch.Tensor]
        :math:`\Delta_t` of the shape of posterior :math:`t`, in its order, differentiable in
        its :math:`\sigma` parameter.
    """
    if not posteriors:
        return []
    device, dtype = _common_device_and_dtype(posteriors, "gaussian_perturbations")
    sizes = [p.mu.numel() for p in posteriors]
    noise = torch.randn(sum(sizes), device=device, dtype=dtype)  # every epsilon at once
    epsilons = [chunk.view(p.shape) for chunk, p in zip(noise.split(sizes), posteriors,
                                                         strict=True)]
    deltas: list[torch.Tensor | None] = [None] * len(posteriors)
    log_indices = [i for i, p in enumerate(posteriors) if p.parametrization == "log"]
    if log_indices:
        scaled = _ScaledNoise.apply(len(log_indices),
                                    *[posteriors[i].log_sigma for i in log_indices],
                                    *[epsilons[i] for i in log_indices])
        for i, delta in zip(log_indices, scaled, strict=True):
            deltas[i] = delta
    for i, posterior in enumerate(posteriors):
        if deltas[i] is None:  # softplus: sigma times epsilon, tensor by tensor
            deltas[i] = posterior.sigma * epsilons[i]
    return deltas  # type: ignore[return-value]
