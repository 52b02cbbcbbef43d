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
"""

from __future__ import annotations

import math

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
