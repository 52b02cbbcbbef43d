r"""Bayesian dense and convolutional layers with the Flipout estimator.

Both layers are :class:`BayesianLayer` s: they hold a
:class:`~bnn_course.posterior.GaussianPosterior` for their weights and (optionally) their
biases, and follow ``nn.Linear`` / ``nn.Conv2d`` in argument names (``device=`` and
``dtype=`` included), ``reset_parameters()`` and ``extra_repr()``.

* ``layer(x)`` draws one perturbation per call and applies Flipout
  (:mod:`bnn_course.flipout`): every example sees its own sample of the weights.
  ``layer(x, noise=...)`` takes that randomness drawn beforehand (a :class:`FlipoutNoise`);
  :func:`draw_flipout_noise` draws it for all layers of a network at once.
* ``layer(x, sample=False)`` uses the posterior means: a deterministic layer.
* ``layer.kl_divergence()`` is the closed-form
  :math:`\mathrm{KL}(q \,\|\, \mathcal{N}(0, s^2))` summed over all weights and biases, a
  scalar in at least float32 even under autocast (float64 for a float64 layer). In the ELBO
  it is divided by the number of training examples (chapter 2).
  :func:`summed_kl_divergence` sums it over many layers in a few multi-tensor ops.
* :func:`bayesian_layers` lists the Bayesian layers of any model, by name;
  :func:`preferred_memory_format` says in which layout to feed them images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from bnn_course.flipout import conv2d_flipout, dense_flipout, rademacher
from bnn_course.posterior import (
    GaussianPosterior,
    gaussian_perturbations,
    summed_gaussian_kl_divergence,
)

PADDING_MODES = ("same", "valid")
"""The string values ``padding`` may take, as in ``nn.Conv2d``."""


class FlipoutNoise(NamedTuple):
    r"""The randomness of one Flipout pass through one layer.

    Example :math:`n` of the pass sees the weights
    :math:`W_n = \mu + \Delta W \circ (s_n r_n^\top)` and the bias
    :math:`b_n = \mu_b + s_n \circ \Delta b`.
    """

    weight_delta: torch.Tensor
    r""":math:`\Delta W = \sigma_W \circ \varepsilon`, the shape of the weights."""
    bias_delta: torch.Tensor | None
    r""":math:`\Delta b`, (out,); ``None`` for a layer without bias."""
    sign_in: torch.Tensor
    r"""Input signs :math:`r_n \in \{\pm1\}`: (\*rows, in); a convolution also takes
    (B, C_in, 1, 1), broadcast over space."""
    sign_out: torch.Tensor
    r"""Output signs :math:`s_n \in \{\pm1\}`: (\*rows, out), or (B, C_out, 1, 1)."""


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

    spatial_dims = 0
    """Trailing singleton dimensions of the signs a pre-drawn :class:`FlipoutNoise` may
    have (2 for a convolution: (B, C, 1, 1) broadcasts over space)."""

    def sign_widths(self) -> tuple[int, int]:
        """How many input and output signs each example needs: ``(in, out)``."""
        raise NotImplementedError

    def _perturbations(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight_delta = self.weight_posterior.perturbation()
        bias_delta = None if self.bias_posterior is None else self.bias_posterior.perturbation()
        return weight_delta, bias_delta

    def draw_noise(self, rows: tuple[int, ...], *, like: torch.Tensor) -> FlipoutNoise:
        r"""This layer's randomness for a batch of ``rows`` examples: perturbations
        :math:`\Delta W, \Delta b` and signs (\*rows, in), (\*rows, out) on ``like``'s
        device and dtype. What ``forward`` draws when it is given no ``noise``."""
        weight_delta, bias_delta = self._perturbations()
        width_in, width_out = self.sign_widths()
        return FlipoutNoise(weight_delta, bias_delta, rademacher((*rows, width_in), like=like),
                            rademacher((*rows, width_out), like=like))

    def check_noise(self, noise: FlipoutNoise, rows: tuple[int, ...],
                    device: torch.device) -> None:
        """A ``ValueError`` unless ``noise`` fits this layer and a batch of ``rows`` examples.

        Shapes, dtypes (floating point) and devices are checked; the values are not (that
        would wait for the device): the signs must be :math:`\\pm 1` and the perturbations
        centred Gaussians, as :meth:`draw_noise` and :func:`draw_flipout_noise` draw them.
        """
        name = type(self).__name__
        if not isinstance(noise, FlipoutNoise):
            raise ValueError(f"{name}: noise must be a FlipoutNoise, got {type(noise).__name__}")
        width_in, width_out = self.sign_widths()
        allowed: dict[str, list[tuple[int, ...]]] = {
            "weight_delta": [self.weight_posterior.shape],
            "bias_delta": [self.bias_posterior.shape] if self.bias_posterior is not None else [],
            "sign_in": [(*rows, width_in)], "sign_out": [(*rows, width_out)]}
        if self.spatial_dims:  # signs broadcast over space: (B, C, 1, 1)
            allowed["sign_in"].append((*rows, width_in, *(1,) * self.spatial_dims))
            allowed["sign_out"].append((*rows, width_out, *(1,) * self.spatial_dims))
        for field, shapes in allowed.items():
            tensor = getattr(noise, field)
            shape = None if tensor is None else tuple(tensor.shape)
            if shape not in (shapes or [None]):
                wanted = " or ".join(map(str, shapes)) or "None (the layer has no bias)"
                raise ValueError(f"{name}: noise.{field} must have shape {wanted}, got {shape}")
            if tensor is not None and (not tensor.is_floating_point() or tensor.device != device):
                raise ValueError(f"{name}: noise.{field} must be floating point on {device}, "
                                 f"got {tensor.dtype} on {tensor.device}")

    def _check_dtype(self, x: torch.Tensor, expected_shape: str) -> None:
        if not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects a floating-point input of shape "
                f"{expected_shape}, got {x.dtype} (images stored as uint8 are normalised "
                "first, e.g. with bnn_course.data.normalize)")

    def kl_divergence(self) -> torch.Tensor:
        """Closed-form KL of all weights and biases to the prior (:func:`summed_kl_divergence`
        sums it over many layers at once).

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


def summed_kl_divergence(layers: Iterable[BayesianLayer]) -> torch.Tensor:
    r""":math:`\sum_l` ``layer.kl_divergence()``, in a few multi-tensor ops for all layers.

    Every weight and bias posterior of every layer, each with its layer's own
    :attr:`~BayesianLayer.prior_sigma`, goes to
    :func:`~bnn_course.posterior.summed_gaussian_kl_divergence`: about ten multi-tensor
    operations and one sum per tensor forward, four operations backward, instead of about
    twenty per tensor each way. A scalar in at least float32 (float64 for float64 layers),
    even under autocast; differentiable. Equal to the sum of the layers'
    :meth:`~BayesianLayer.kl_divergence` up to rounding.
    """
    posteriors: list[GaussianPosterior] = []
    prior_sigmas: list[float] = []
    for layer in layers:
        for posterior in layer.posteriors():
            posteriors.append(posterior)
            prior_sigmas.append(layer.prior_sigma)
    if not posteriors:
        raise ValueError("summed_kl_divergence needs at least one Bayesian layer")
    return summed_gaussian_kl_divergence(posteriors, prior_sigmas)


def _sign_dtype(like: torch.Tensor) -> torch.dtype:
    """``like``'s dtype, or the autocast dtype where autocast will cast to it: signs are
    exact in any floating dtype, and drawn in the one they are used in they need no cast."""
    device_type = like.device.type
    try:
        if like.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # no per-device autocast queries
        pass
    return like.dtype


def draw_flipout_noise(layers: Sequence[BayesianLayer], batch_size: int, *,
                       like: torch.Tensor) -> list[FlipoutNoise]:
    r"""The randomness of one sampled pass of ``batch_size`` examples through ``layers``.

    Everything is drawn at once and split into views, one :class:`FlipoutNoise` per layer:

    * **one** ``randn`` for the perturbations :math:`\Delta = \sigma \circ \varepsilon`
      of every weight and bias (:func:`~bnn_course.posterior.gaussian_perturbations`);
    * **one** ``randint`` for the Rademacher signs :math:`r_n, s_n` of every layer and
      example: a (B, :math:`\sum_l` (in_l + out_l)) matrix of independent :math:`\pm1`,
      whose columns are split among the layers; a convolution's share is viewed as
      (B, C, 1, 1), one sign per example and channel, constant over space.

    Each layer's share has the distribution of its own :meth:`BayesianLayer.draw_noise`,
    and all signs (of different layers, examples and channels) are independent, so the
    estimator is unchanged: example :math:`n` sees the weights
    :math:`W_n = \mu + \Delta W \circ (s_n r_n^\top)` in every layer.

    Parameters
    ----------
    layers:
        The Bayesian layers of the pass, all on one device and in one dtype.
    batch_size:
        The number B of examples (the first dimension of the input).
    like:
        The input: the signs are drawn on its device, in its dtype (in the autocast dtype
        under autocast: signs are exact in any dtype).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    posteriors = [posterior for layer in layers for posterior in layer.posteriors()]
    deltas = iter(gaussian_perturbations(posteriors))
    widths = [width for layer in layers for width in layer.sign_widths()]
    signs = rademacher((batch_size, sum(widths)), like=like, dtype=_sign_dtype(like))
    columns = {0: signs.split(widths, dim=1)}  # (B, width) per layer and side
    noises = []
    for index, layer in enumerate(layers):
        if layer.spatial_dims not in columns:  # (B, width, 1, 1) for a convolution
            spatial = (1,) * layer.spatial_dims
            columns[layer.spatial_dims] = signs.view(batch_size, -1, *spatial).split(widths, 1)
        sign_in, sign_out = columns[layer.spatial_dims][2 * index:2 * index + 2]
        weight_delta = next(deltas)
        bias_delta = next(deltas) if layer.bias_posterior is not None else None
        noises.append(FlipoutNoise(weight_delta, bias_delta, sign_in, sign_out))
    return noises


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

    def sign_widths(self) -> tuple[int, int]:
        """``(in_features, out_features)``: one sign per input and per output feature."""
        return self.in_features, self.out_features

    def forward(self, x: torch.Tensor, sample: bool = True, *,
                noise: FlipoutNoise | None = None) -> torch.Tensor:
        r"""Flipout sample (``sample=True``) or the posterior-mean layer (``sample=False``).

        ``noise``: this pass's perturbations and signs drawn beforehand (signs
        (\*rows, in) and (\*rows, out)), e.g. by :func:`draw_flipout_noise`; ``None``
        draws them here (:meth:`draw_noise`).
        """
        expected = f"(batch, *, {self.in_features})"
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input of shape {expected}, "
                             f"got {tuple(x.shape)}")
        self._check_dtype(x, expected)
        if not sample:
            _check_no_noise(self, noise)
            return nn.functional.linear(x, self.weight_mu, self.bias_mu)
        rows = tuple(x.shape[:-1])
        if noise is None:
            noise = self.draw_noise(rows, like=x)
        else:
            self.check_noise(noise, rows, x.device)
        return dense_flipout(x, self.weight_mu, noise.weight_delta, self.bias_mu,
                             noise.bias_delta, noise.sign_in, noise.sign_out)

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

    spatial_dims = 2  # signs (B, C, 1, 1): one per example and channel, over all positions

    def sign_widths(self) -> tuple[int, int]:
        """``(in_channels, out_channels)``: one sign per input and per output channel."""
        return self.in_channels, self.out_channels

    def forward(self, x: torch.Tensor, sample: bool = True, *,
                noise: FlipoutNoise | None = None) -> torch.Tensor:
        """Flipout sample (``sample=True``) or the posterior-mean layer (``sample=False``).

        ``noise``: this pass's perturbations and signs drawn beforehand (signs (B, C) or
        (B, C, 1, 1)), e.g. by :func:`draw_flipout_noise`; ``None`` draws them here
        (:meth:`draw_noise`).
        """
        min_h, min_w = self.minimum_input_size()
        expected = (f"(batch, {self.in_channels}, height >= {min_h}, width >= {min_w})")
        if (x.dim() != 4 or x.shape[1] != self.in_channels
                or x.shape[2] < min_h or x.shape[3] < min_w):
            raise ValueError(f"{type(self).__name__} expects input of shape {expected}, "
                             f"got {tuple(x.shape)}")
        self._check_dtype(x, expected)
        conv_args = (self.stride, self.padding, self.dilation, self.groups)
        if not sample:
            _check_no_noise(self, noise)
            return nn.functional.conv2d(x, self.weight_mu, self.bias_mu, *conv_args)
        rows = (x.shape[0],)
        if noise is None:
            noise = self.draw_noise(rows, like=x)
        else:
            self.check_noise(noise, rows, x.device)
        return conv2d_flipout(x, self.weight_mu, noise.weight_delta, self.bias_mu,
                              noise.bias_delta, noise.sign_in, noise.sign_out, *conv_args)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + ", " + self._prior_repr()


def _check_no_noise(layer: BayesianLayer, noise: FlipoutNoise | None) -> None:
    if noise is not None:
        raise ValueError(f"{type(layer).__name__}: noise is for sampled passes; "
                         "sample=False uses the posterior means")


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
