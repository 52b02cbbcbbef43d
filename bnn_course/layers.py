r"""Bayesian dense and convolutional layers with the Flipout estimator.

Both layers are :class:`BayesianLayer` s: they hold a
:class:`~bnn_course.posterior.GaussianPosterior` for their weights and (optionally) their
biases, and follow ``nn.Linear`` / ``nn.Conv2d`` in argument names (``device=`` and
``dtype=`` included), ``reset_parameters()`` and ``extra_repr()``.

* ``layer(x)`` draws one perturbation per call and applies Flipout
  (:mod:`bnn_course.flipout`): every example sees its own sample of the weights.
* ``layer(x, sample=False)`` uses the posterior means: a deterministic layer.
* ``layer.kl_divergence()`` is the closed-form
  :math:`\mathrm{KL}(q \,\|\, \mathcal{N}(0, s^2))` summed over all weights and biases, a
  scalar in at least float32 even under autocast (float64 for a float64 layer). In the ELBO
  it is divided by the number of training examples (chapter 2).
* :func:`bayesian_layers` lists the Bayesian layers of any model, by name;
  :func:`preferred_memory_format` says in which layout to feed them images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from bnn_course.flipout import conv2d_flipout, dense_flipout, rademacher
from bnn_course.posterior import GaussianPosterior

PADDING_MODES = ("same", "valid")
"""The string values ``padding`` may take, as in ``nn.Conv2d``."""


class BayesianLayer(nn.Module):
    r"""What every Bayesian layer offers; the base of the dense and the convolutional layer.

    * ``forward(x, sample=True)``: a stochastic pass (``sample=True``) or the
      posterior-mean layer (``sample=False``);
    * :meth:`kl_divergence`: the closed-form :math:`\mathrm{KL}(q \,\|\, p)` of all its
      weights and biases, :math:`p = \mathcal{N}(0, s^2)` with :math:`s` =
      :attr:`prior_sigma`;
    * :meth:`posteriors`: its :class:`~bnn_course.posterior.GaussianPosterior` s
      (``weight_posterior`` and, with a bias, ``bias_posterior``), and the shortcuts
      :attr:`weight_mu`, :attr:`weight_sigma`, :attr:`bias_mu`, :attr:`bias_sigma`.

    The prior scale is a buffer: it is saved in the state dict (key ``_prior_sigma``) and a
    loaded state dict sets it; a state dict from before it was saved loads as well and
    keeps the layer's own value.
    """

    weight_posterior: GaussianPosterior
    bias_posterior: GaussianPosterior | None
    _prior_sigma: torch.Tensor

    def _build_posteriors(
        self,
        weight_shape: tuple[int, ...],
        out_features: int,
        bias: bool,
        prior_sigma: float,
        init_log_sigma: float,
        parametrization: str,
        factory: dict[str, Any],
    ) -> None:
        buffer_dtype = torch.float64 if factory.get("dtype") == torch.float64 else torch.float32
        self.register_buffer("_prior_sigma", torch.ones((), dtype=buffer_dtype,
                                                        device=factory.get("device")))
        self.prior_sigma = prior_sigma
        self.weight_posterior = GaussianPosterior(weight_shape, init_log_sigma, parametrization,
                                                  **factory)
        self.bias_posterior = (
            GaussianPosterior((out_features,), init_log_sigma, parametrization, **factory)
            if bias else None
        )
        self.reset_parameters()

    @property
    def prior_sigma(self) -> float:
        """The prior standard deviation :math:`s` (a Python float; also a saved buffer)."""
        return self._prior_sigma_value

    @prior_sigma.setter
    def prior_sigma(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"prior_sigma must be positive and finite, got {value}")
        self._prior_sigma_value = value
        with torch.no_grad():
            self._prior_sigma.fill_(value)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
        strict: bool, missing_keys: list[str], unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "_prior_sigma"
        if key not in state_dict:  # saved before the prior scale was a buffer: keep ours
            state_dict[key] = self._prior_sigma.detach().clone()
        value = state_dict[key]
        loaded = float(value.item()) if isinstance(value, torch.Tensor) and value.numel() == 1 \
            else math.nan
        if not (math.isfinite(loaded) and loaded > 0):
            error_msgs.append(f"{key} must be one positive, finite prior standard deviation, "
                              f"got {value!r}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        # Keep the exact float when the buffer only holds its rounding (float32).
        rounded = torch.tensor(self._prior_sigma_value, dtype=self._prior_sigma.dtype).item()
        if rounded != loaded:
            self._prior_sigma_value = loaded

    def posteriors(self) -> list[GaussianPosterior]:
        """The weight posterior, then the bias posterior if there is a bias."""
        return [p for p in (self.weight_posterior, self.bias_posterior) if p is not None]

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

    def _check_dtype(self, x: torch.Tensor, expected_shape: str) -> None:
        if not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects a floating-point input of shape "
                f"{expected_shape}, got {x.dtype} (images stored as uint8 are normalised "
                "first, e.g. with bnn_course.data.normalize)")

    def kl_divergence(self) -> torch.Tensor:
        """Closed-form KL of all weights and biases to the prior.

        A scalar in float32, or float64 for a float64 layer, even under autocast.
        """
        kl = self.weight_posterior.kl_divergence(self.prior_sigma)
        if self.bias_posterior is not None:
            kl = kl + self.bias_posterior.kl_divergence(self.prior_sigma)
        return kl

    def _prior_repr(self) -> str:
        return (f"bias={self.bias_posterior is not None}, prior_sigma={self.prior_sigma}, "
                f"init_log_sigma={self.weight_posterior.init_log_sigma}, "
                f"parametrization={self.weight_posterior.parametrization!r}")


def preferred_memory_format(device: torch.device | str) -> torch.memory_format:
    """The memory format in which convolutional networks run fastest on ``device``.

    ``torch.channels_last`` (NHWC) on the CPU, where oneDNN runs convolutions natively in
    it (a training step of the seed-sized BayesianCNN about 1.3x faster than in NCHW, its
    deterministic twin 1.2x, one thread; ``benchmarks/throughput.py``);
    ``torch.contiguous_format`` (NCHW) elsewhere, where it has not been measured. Convert a
    batch ``x`` (B, C, H, W) with ``x.contiguous(memory_format=...)``: the layers keep the
    format, only the layout changes (no value, no random number; a convolution may round
    its last bit differently).
    """
    device = torch.device(device)
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    """``(name, layer)`` for every :class:`BayesianLayer` inside ``model``, in module order.

    The names are those of ``model.named_modules()`` (``""`` if ``model`` itself is one);
    the list is empty for a model without Bayesian layers.
    """
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, BayesianLayer)]


class BayesianDenseFlipout(BayesianLayer):
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
    device, dtype:
        Where and in which dtype the parameters are created, as in ``nn.Linear``.

    Shapes
    ------
    Input (B, \*, in_features); output (B, \*, out_features). As in ``nn.Linear`` the
    leading dimensions are batch dimensions: every row ``x[b, ..., :]`` is an example with
    its own signs :math:`r_n, s_n`, hence its own weight sample.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior_sigma: float = 1.0,
        init_log_sigma: float = -5.0,
        parametrization: str = "log",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features ({in_features}) and out_features ({out_features}) "
                             "must be positive")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._build_posteriors((self.out_features, self.in_features), self.out_features, bias,
                               prior_sigma, init_log_sigma, parametrization,
                               {"device": device, "dtype": dtype})

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Flipout sample (``sample=True``) or the posterior-mean layer (``sample=False``)."""
        expected = f"(batch, *, {self.in_features})"
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input of shape {expected}, "
                             f"got {tuple(x.shape)}")
        self._check_dtype(x, expected)
        if not sample:
            return nn.functional.linear(x, self.weight_mu, self.bias_mu)
        weight_delta, bias_delta = self._perturbations()
        rows = tuple(x.shape[:-1])
        sign_in = rademacher((*rows, self.in_features), like=x)
        sign_out = rademacher((*rows, self.out_features), like=x)
        return dense_flipout(x, self.weight_mu, weight_delta, self.bias_mu, bias_delta,
                             sign_in, sign_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + self._prior_repr())


class BayesianConv2dFlipout(BayesianLayer):
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
        As in ``nn.Conv2d``: ``padding`` is a non-negative int, a pair, ``"valid"`` or
        ``"same"`` (only with stride 1); anything else is a ``ValueError`` here.
    bias, prior_sigma, init_log_sigma, parametrization, device, dtype:
        As in :class:`BayesianDenseFlipout`.

    Shapes
    ------
    Input (B, in_channels, H, W), floating point, at least as large as the (dilated)
    kernel after padding; output (B, out_channels, H', W') with H', W' as in ``nn.Conv2d``.
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError(f"in_channels ({in_channels}), out_channels ({out_channels}) and "
                             f"groups ({groups}) must be positive")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must both be divisible by groups ({groups})")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        for name, pair in (("kernel_size", self.kernel_size), ("stride", self.stride),
                           ("dilation", self.dilation)):
            if min(pair) < 1:
                raise ValueError(f"{name} must be positive, got {pair}")
        self.padding = _check_padding(padding, self.stride)
        weight_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._build_posteriors(weight_shape, self.out_channels, bias,
                               prior_sigma, init_log_sigma, parametrization,
                               {"device": device, "dtype": dtype})

    def minimum_input_size(self) -> tuple[int, int]:
        """The smallest (H, W) the convolution accepts: the dilated kernel, less padding."""
        if self.padding == "same":
            return (1, 1)
        padding = (0, 0) if self.padding == "valid" else self.padding
        assert not isinstance(padding, str)
        return tuple(  # type: ignore[return-value]
            max(1, d * (k - 1) + 1 - 2 * p)
            for k, d, p in zip(self.kernel_size, self.dilation, padding, strict=True))

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Flipout sample (``sample=True``) or the posterior-mean layer (``sample=False``)."""
        min_h, min_w = self.minimum_input_size()
        expected = (f"(batch, {self.in_channels}, height >= {min_h}, width >= {min_w})")
        if (x.dim() != 4 or x.shape[1] != self.in_channels
                or x.shape[2] < min_h or x.shape[3] < min_w):
            raise ValueError(f"{type(self).__name__} expects input of shape {expected}, "
                             f"got {tuple(x.shape)}")
        self._check_dtype(x, expected)
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
        return text + ", " + self._prior_repr()


def _check_padding(
    padding: int | tuple[int, int] | str, stride: tuple[int, int]
) -> tuple[int, int] | str:
    """``padding`` as ``nn.Conv2d`` accepts it, or a ``ValueError`` saying what is wrong."""
    if isinstance(padding, str):
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be an int, a pair of ints or one of "
                             f"{PADDING_MODES}, got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride "
                             f"{stride}; give the padding as ints instead")
        return padding
    pair = _pair(padding)
    if len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0
                             for p in pair):
        raise ValueError(f"padding must be a non-negative int, a pair of them or one of "
                         f"{PADDING_MODES}, got {padding!r}")
    return (int(pair[0]), int(pair[1]))
