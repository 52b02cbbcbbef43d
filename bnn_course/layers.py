r"""Bayesian dense and convolutional layers with the Flipout estimator.

Both layers hold a :class:`~bnn_course.posterior.GaussianPosterior` for their weights and
(optionally) their biases, and follow ``nn.Linear`` / ``nn.Conv2d`` in argument names,
``reset_parameters()`` and ``extra_repr()``.

* ``layer(x)`` draws one perturbation per call and applies Flipout
  (:mod:`bnn_course.flipout`): every example sees its own sample of the weights.
* ``layer(x, sample=False)`` uses the posterior means: a deterministic layer.
* ``layer.kl_divergence()`` is the closed-form
  :math:`\mathrm{KL}(q \,\|\, \mathcal{N}(0, s^2))` summed over all weights and biases, a
  float32 scalar even under autocast. In the ELBO it is divided by the number of training
  examples (chapter 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from bnn_course.flipout import conv2d_flipout, dense_flipout, rademacher
from bnn_course.posterior import GaussianPosterior


class _BayesianLayer(nn.Module):
    """What the two layers share: posteriors, sigma accessors, the KL, initialisation."""

    weight_posterior: GaussianPosterior
    bias_posterior: GaussianPosterior | None

    def _build_posteriors(
        self,
        weight_shape: tuple[int, ...],
        out_features: int,
        bias: bool,
        prior_sigma: float,
        init_log_sigma: float,
        parametrization: str,
    ) -> None:
        if prior_sigma <= 0:
            raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
        self.prior_sigma = float(prior_sigma)
        self.weight_posterior = GaussianPosterior(weight_shape, init_log_sigma, parametrization)
        self.bias_posterior = (
            GaussianPosterior((out_features,), init_log_sigma, parametrization) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Means as in ``nn.Linear``/``nn.Conv2d``; every :math:`\sigma` at its initial value.

        Weight means: Kaiming-uniform with :math:`a = \sqrt5`, i.e. uniform on
        :math:`\pm 1/\sqrt{\text{fan\_in}}`; bias means: uniform on the same interval.
        """
        nn.init.kaiming_uniform_(self.weight_posterior.mu, a=math.sqrt(5))
        self.weight_posterior.reset_sigma()
        if self.bias_posterior is not None:
            fan_in = self.weight_posterior.mu[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias_posterior.mu, -bound, bound)
            self.bias_posterior.reset_sigma()

    @property
    def weight_mu(self) -> torch.Tensor:
        """Posterior means of the weights."""
        return self.weight_posterior.mu

    @property
    def weight_sigma(self) -> torch.Tensor:
        """Posterior standard deviations of the weights."""
        return self.weight_posterior.sigma

    @property
    def bias_mu(self) -> torch.Tensor | None:
        """Posterior means of the biases, or ``None`` without bias."""
        return None if self.bias_posterior is None else self.bias_posterior.mu

    @property
    def bias_sigma(self) -> torch.Tensor | None:
        """Posterior standard deviations of the biases, or ``None`` without bias."""
        return None if self.bias_posterior is None else self.bias_posterior.sigma

    def _perturbations(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight_delta = self.weight_posterior.perturbation()
        bias_delta = None if self.bias_posterior is None else self.bias_posterior.perturbation()
        return weight_delta, bias_delta

    def kl_divergence(self) -> torch.Tensor:
        """Closed-form KL of all weights and biases to the prior; a float32 scalar."""
        kl = self.weight_posterior.kl_divergence(self.prior_sigma)
        if self.bias_posterior is not None:
            kl = kl + self.bias_posterior.kl_divergence(self.prior_sigma)
        return kl


class BayesianDenseFlipout(_BayesianLayer):
    r"""A fully connected layer with Gaussian weights and biases, sampled with Flipout.

    .. math::

        y_n = \mu_W x_n + \mu_b + s_n \circ \big[\Delta W (x_n \circ r_n) + \Delta b\big],
        \qquad \Delta W = \sigma_W \circ \varepsilon,\ \varepsilon \sim \mathcal{N}(0, I),

    with Rademacher signs :math:`r_n \in \{\pm1\}^{\text{in}}`,
    :math:`s_n \in \{\pm1\}^{\text{out}}` drawn per example (Wen et al., 2018). For a fixed
    input the output of unit :math:`j` has mean :math:`\mu_{W,j} x + \mu_{b,j}` and variance
    :math:`\sum_i \sigma_{W,ji}^2 x_i^2 + \sigma_{b,j}^2`.

    Parameters
    ----------
    in_features, out_features:
        As in ``nn.Linear``.
    bias:
        Learn a Gaussian bias as well.
    prior_sigma:
        Standard deviation :math:`s` of the prior :math:`\mathcal{N}(0, s^2)` on every weight
        and bias.
    init_log_sigma:
        Initial :math:`\log\sigma` of every weight and bias (see
        :class:`~bnn_course.posterior.GaussianPosterior`).
    parametrization:
        ``"log"`` (:math:`\sigma = e^\lambda`) or ``"softplus"``.

    Shapes
    ------
    Input (B, in_features); output (B, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior_sigma: float = 1.0,
        init_log_sigma: float = -5.0,
        parametrization: str = "log",
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._build_posteriors((self.out_features, self.in_features), self.out_features, bias,
                               prior_sigma, init_log_sigma, parametrization)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Flipout sample (``sample=True``) or the posterior-mean layer (``sample=False``)."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        if not sample:
            return nn.functional.linear(x, self.weight_mu, self.bias_mu)
        weight_delta, bias_delta = self._perturbations()
        batch = x.shape[0]
        sign_in = rademacher((batch, self.in_features), like=x)
        sign_out = rademacher((batch, self.out_features), like=x)
        return dense_flipout(x, self.weight_mu, weight_delta, self.bias_mu, bias_delta,
                             sign_in, sign_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_posterior is not None}, prior_sigma={self.prior_sigma}, "
                f"init_log_sigma={self.weight_posterior.init_log_sigma}, "
                f"parametrization={self.weight_posterior.parametrization!r}")


class BayesianConv2dFlipout(_BayesianLayer):
    r"""A 2-D convolution with Gaussian kernels and biases, sampled with Flipout.

    .. math::

        y_n = \mu_W \star x_n + \mu_b
        + s_n \circ \big[\Delta W \star (x_n \circ r_n) + \Delta b\big],

    with Rademacher signs per example and channel, :math:`r_n \in \{\pm1\}^{C_\text{in}}`,
    :math:`s_n \in \{\pm1\}^{C_\text{out}}`, constant over spatial positions. Example
    :math:`n` therefore sees one kernel sample
    :math:`W_n = \mu_W + \Delta W \circ (s_n r_n^\top)` at every position, exactly what a
    convolution with a sampled kernel computes (TensorFlow Probability's ``Conv2DFlipout``).

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups:
        As in ``nn.Conv2d`` (``padding`` may be ``"same"`` or ``"valid"``).
    bias, prior_sigma, init_log_sigma, parametrization:
        As in :class:`BayesianDenseFlipout`.

    Shapes
    ------
    Input (B, in_channels, H, W); output (B, out_channels, H', W') with H', W' as in
    ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        prior_sigma: float = 1.0,
        init_log_sigma: float = -5.0,
        parametrization: str = "log",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must both be divisible by groups ({groups})")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        weight_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._build_posteriors(weight_shape, self.out_channels, bias,
                               prior_sigma, init_log_sigma, parametrization)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Flipout sample (``sample=True``) or the posterior-mean layer (``sample=False``)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape "
                f"(batch, {self.in_channels}, height, width), got {tuple(x.shape)}"
            )
        conv_args = (self.stride, self.padding, self.dilation, self.groups)
        if not sample:
            return nn.functional.conv2d(x, self.weight_mu, self.bias_mu, *conv_args)
        weight_delta, bias_delta = self._perturbations()
        batch = x.shape[0]
        sign_in = rademacher((batch, self.in_channels), like=x)
        sign_out = rademacher((batch, self.out_channels), like=x)
        return conv2d_flipout(x, self.weight_mu, weight_delta, self.bias_mu, bias_delta,
                              sign_in, sign_out, *conv_args)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return (text + f", bias={self.bias_posterior is not None}, "
                f"prior_sigma={self.prior_sigma}, "
                f"init_log_sigma={self.weight_posterior.init_log_sigma}, "
                f"parametrization={self.weight_posterior.parametrization!r}")
