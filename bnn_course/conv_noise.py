r"""The spatial structure of the noise of a Bayesian convolution (chapter 4).

A convolution with a sampled kernel :math:`W = \mu + \Delta W` adds to the output of image
:math:`x` the noise :math:`\Delta W \star x`. At output channel :math:`o` and positions
:math:`p, q` (with :math:`x_{j,p}` the :math:`j`-th entry of the input patch that position
:math:`p` sees, :math:`j` running over input channels and kernel offsets) it has the covariance

.. math::

    \operatorname{Cov}\big[(\Delta W \star x)_{o,p}, (\Delta W \star x)_{o,q}\big]
    = \sum_j \sigma_{o,j}^2\, x_{j,p}\, x_{j,q} + \sigma_{b,o}^2,

because the entries of :math:`\Delta W` are independent with variances :math:`\sigma^2`. The
channel-wise Flipout estimator has exactly this covariance within one image (its signs square
out); the per-pixel variant keeps the diagonal (the variance) and sets the rest to zero, and
so does the local reparameterisation trick (Kingma, Salimans and Welling, 2015), which draws
every output entry from its Gaussian marginal with independent noise.

* :func:`sample_conv_outputs` draws outputs of a
  :class:`~bnn_course.layers.BayesianConv2dFlipout` layer with one of five estimators;
* :func:`conv2d_local_reparameterization` is the local reparameterisation trick for a
  convolution;
* :func:`noise_correlation` measures the correlation, across draws, between one output entry
  and all others;
* :func:`kernel_noise_covariance` is the closed form above;
* :func:`single_kernel_residual` asks whether some single kernel reproduces an output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnn_course.flipout import conv2d_flipout_per_pixel
from bnn_course.layers import BayesianConv2dFlipout

ESTIMATORS = ("flipout", "per_pixel", "shared", "independent", "lrt")


def conv2d_local_reparameterization(
    x: torch.Tensor,
    weight_mu: torch.Tensor,
    weight_sigma: torch.Tensor,
    bias_mu: torch.Tensor | None = None,
    bias_sigma: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    r"""The local reparameterisation trick applied to a convolution.

    .. math::

        m = \mu \star x + \mu_b, \qquad
        v = (\sigma \circ \sigma) \star (x \circ x) + \sigma_b \circ \sigma_b, \qquad
        y = m + \sqrt{v} \circ \zeta,

    with :math:`\zeta \sim \mathcal{N}(0, I)` independent for every example, channel and
    **position**. Every output entry has the Gaussian marginal of a sampled kernel (the
    diagonal of :func:`kernel_noise_covariance`), but different positions of one image get
    independent noise: the off-diagonal covariance of a shared kernel is lost, as with
    per-pixel signs. Two convolutions. The variance is floored at the smallest positive float
    before the square root.

    Shapes: ``x`` (B, C_in, H, W); ``weight_*`` (C_out, C_in / groups, kH, kW); ``bias_*``
    (C_out,); returns (B, C_out, H', W').
    """
    if (bias_mu is None) != (bias_sigma is None):
        raise ValueError("give both bias_mu and bias_sigma, or neither")
    conv_args = (stride, padding, dilation, groups)
    mean = F.conv2d(x, weight_mu, bias_mu, *conv_args)
    bias_variance = None if bias_sigma is None else bias_sigma.pow(2)
    variance = F.conv2d(x.pow(2), weight_sigma.pow(2), bias_variance, *conv_args)
    floor = torch.finfo(variance.dtype).tiny
    return mean + variance.clamp_min(floor).sqrt() * torch.randn_like(mean)


def sample_conv_outputs(
    layer: BayesianConv2dFlipout,
    x: torch.Tensor,
    num_samples: int,
    estimator: str = "flipout",
) -> torch.Tensor:
    """Draw ``num_samples`` independent stochastic outputs of ``layer`` for the batch ``x``.

    Every draw is one forward pass with a fresh perturbation :math:`\\Delta W`, shared by the
    batch as in training. The estimators differ in what each example sees:

    ``"flipout"``
        ``layer(x)``: channel-wise Flipout, one kernel sample per example.
    ``"per_pixel"``
        :func:`~bnn_course.flipout.conv2d_flipout_per_pixel`: signs per example, channel and
        position.
    ``"shared"``
        The naive estimator: the single kernel :math:`\\mu + \\Delta W` for the whole batch.
    ``"independent"``
        A fresh kernel sample per example (one convolution per example): the reference.
    ``"lrt"``
        :func:`conv2d_local_reparameterization`: each output entry drawn from its marginal,
        independent noise per example, channel and position.

    Shapes: ``x`` (B, C_in, H, W); returns (num_samples, B, C_out, H', W'), detached.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def perturbations() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight_delta = layer.weight_posterior.perturbation()
        bias_delta = (None if layer.bias_posterior is None
                      else layer.bias_posterior.perturbation())
        return weight_delta, bias_delta

    def one_kernel(inputs: torch.Tensor) -> torch.Tensor:
        weight_delta, bias_delta = perturbations()
        bias = None if bias_delta is None else layer.bias_mu + bias_delta
        return F.conv2d(inputs, layer.weight_mu + weight_delta, bias, *conv_args)

    draws = []
    with torch.no_grad():
        for _ in range(num_samples):
            if estimator == "flipout":
                output = layer(x)
            elif estimator == "per_pixel":
                weight_delta, bias_delta = perturbations()
                output = conv2d_flipout_per_pixel(x, layer.weight_mu, weight_delta,
                                                  layer.bias_mu, bias_delta, *conv_args)
            elif estimator == "shared":
                output = one_kernel(x)
            elif estimator == "lrt":
                output = conv2d_local_reparameterization(
                    x, layer.weight_mu, layer.weight_sigma, layer.bias_mu, layer.bias_sigma,
                    *conv_args)
            else:
                output = torch.cat([one_kernel(x[n:n + 1]) for n in range(x.shape[0])])
            draws.append(output)
    return torch.stack(draws)


def noise_correlation(samples: torch.Tensor, reference: tuple[int, ...]) -> torch.Tensor:
    r"""Pearson correlation across draws between ``samples[:, *reference]`` and every entry.

    The noise of a draw is its deviation from the mean over draws, so this is the correlation
    of the noise. Entries that never vary get correlation ``nan``.

    Shapes: ``samples`` (S, *shape) with S >= 2 draws; ``reference`` indexes ``shape``
    completely; returns a tensor of ``shape`` (1 at ``reference``).
    """
    if samples.shape[0] < 2:
        raise ValueError("need at least two draws to estimate a correlation")
    if len(reference) != samples.dim() - 1:
        raise ValueError(f"reference {reference} must index all of shape "
                         f"{tuple(samples.shape[1:])}")
    noise = samples.double() - samples.double().mean(dim=0)
    ref = noise[(slice(None), *reference)]
    ref = ref.reshape(-1, *([1] * (noise.dim() - 1)))
    covariance = (noise * ref).mean(dim=0)
    scale = noise.pow(2).mean(dim=0).sqrt() * ref.pow(2).mean().sqrt()
    return (covariance / scale).to(samples.dtype)


def _unfold_patches(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
) -> torch.Tensor:
    if isinstance(padding, str):
        raise ValueError("padding must be an int or a pair of ints here, not a string")
    return F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)


def kernel_noise_covariance(
    x: torch.Tensor,
    weight_sigma: torch.Tensor,
    bias_sigma: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    r"""Covariance between output positions of the noise of one sampled kernel.

    .. math:: C_{o,p,q} = \sum_j \sigma_{o,j}^2\, x_{j,p}\, x_{j,q} + \sigma_{b,o}^2

    for a kernel with independent entries of standard deviations ``weight_sigma`` (any
    zero-mean distribution), applied to each image of ``x``. Channel-wise Flipout has this
    covariance within every image; per-pixel signs keep only its diagonal. Only ``groups=1``.

    Shapes: ``x`` (B, C_in, H, W); ``weight_sigma`` (C_out, C_in, kH, kW); ``bias_sigma``
    (C_out,); returns (B, C_out, L, L) with L = H' * W' positions in row-major order.
    """
    out_channels, in_channels, *kernel_size = weight_sigma.shape
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels, weight_sigma expects {in_channels} "
                         "(only groups=1 is supported)")
    patches = _unfold_patches(x, tuple(kernel_size), stride, padding, dilation)  # (B, J, L)
    variances = weight_sigma.reshape(out_channels, -1).pow(2)  # (O, J)
    weighted = variances[None, :, :, None] * patches[:, None]  # (B, O, J, L)
    covariance = weighted.transpose(-1, -2) @ patches[:, None]  # (B, O, L, L)
    if bias_sigma is not None:
        covariance = covariance + bias_sigma.pow(2)[None, :, None, None]
    return covariance


def single_kernel_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    r"""How far ``y[n]`` is from the output of the best single kernel (and bias) on ``x[n]``.

    For each example, fits :math:`y_{o,p} \approx \sum_j W_{o,j} x_{j,p} + b_o` over all
    positions :math:`p` by least squares (in float64) and returns
    :math:`\lVert y_n - \hat y_n \rVert / \lVert y_n \rVert`: about zero (float precision) when
    ``y[n]`` is a convolution of ``x[n]`` with some kernel, clearly positive otherwise.
    Needs at least as many output positions as the C_in * kH * kW + 1 unknowns per channel.

    Shapes: ``x`` (B, C_in, H, W); ``y`` (B, C_out, H', W'); returns (B,).
    """
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    patches = _unfold_patches(x.double(), kernel_size, stride, padding, dilation)  # (B, J, L)
    batch, unknowns, positions = patches.shape
    if y.shape[0] != batch or y.shape[-2] * y.shape[-1] != positions:
        raise ValueError(f"y of shape {tuple(y.shape)} does not match {positions} positions "
                         f"of a batch of {batch}")
    if positions < unknowns + 1:
        raise ValueError(f"{positions} positions cannot determine {unknowns + 1} unknowns")
    design = torch.cat([patches.transpose(1, 2),
                        torch.ones(batch, positions, 1, dtype=torch.float64)], dim=2)
    targets = y.double().reshape(batch, y.shape[1], positions).transpose(1, 2)  # (B, L, O)
    solution = torch.linalg.lstsq(design, targets).solution
    residual = targets - design @ solution
    norms = residual.flatten(1).norm(dim=1) / targets.flatten(1).norm(dim=1)
    return norms.to(y.dtype)
