r"""The Flipout estimator as plain functions (Wen et al., 2018).

A Bayesian layer that draws one weight sample per mini-batch gives every example the same
perturbation: their gradients are correlated and averaging over the batch removes little
noise. Drawing one sample per example removes it but costs a matrix product per example.
Flipout gets (almost) the best of both. Draw **one** perturbation :math:`\Delta W` per
forward pass, shared by the batch, and give example :math:`n` the weights

.. math::

    W_n = \mu + \Delta W \circ (s_n r_n^\top),

with independent Rademacher sign vectors :math:`r_n` (inputs) and :math:`s_n` (outputs),
entries :math:`\pm 1` with probability :math:`\tfrac12`. If :math:`\Delta W` is symmetric
about zero (a centred Gaussian is), :math:`\Delta W \circ (s_n r_n^\top)` has the same
distribution as :math:`\Delta W`, so every :math:`W_n` is a genuine sample of :math:`q`,
and different examples' samples are decorrelated. The product never has to be formed:

.. math::

    y_n = \mu x_n + \big[\Delta W (x_n \circ r_n)\big] \circ s_n,

two matrix products for the whole batch instead of one per example.

For a convolution the signs are per example and **per channel**, constant over spatial
positions (as in TensorFlow Probability's ``Conv2DFlipout``): example :math:`n` then sees one
sampled kernel :math:`W_n` at every position, exactly as a convolution with a sampled kernel
would. :func:`conv2d_flipout_per_pixel` draws a sign per pixel instead (as some libraries
do); it is a different estimator, in which one example's positions no longer share a kernel.

Biases: the bias perturbation :math:`\Delta b` is multiplied by the same output signs
:math:`s_n`, so :math:`(W_n, b_n)` is jointly one sample of the posterior for every example.
(TensorFlow Probability instead shares one bias sample across the batch; both give the same
per-example distribution.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rademacher(shape: tuple[int, ...], *, like: torch.Tensor) -> torch.Tensor:
    """Independent signs :math:`\\pm 1` with probability 1/2, on ``like``'s device and dtype."""
    # randint is about 2.5x faster than bernoulli_ on CPUs, and as fast on GPUs.
    signs = torch.randint(0, 2, shape, device=like.device, dtype=like.dtype)
    return signs.mul_(2).sub_(1)


def dense_flipout(
    x: torch.Tensor,
    weight_mu: torch.Tensor,
    weight_delta: torch.Tensor,
    bias_mu: torch.Tensor | None,
    bias_delta: torch.Tensor | None,
    sign_in: torch.Tensor,
    sign_out: torch.Tensor,
) -> torch.Tensor:
    r"""Flipout for a dense layer.

    .. math:: y_n = \mu x_n + b_\mu + s_n \circ \big[\Delta W (x_n \circ r_n) + \Delta b\big]

    Shapes: ``x`` (B, in), ``weight_mu`` and ``weight_delta`` (out, in), ``bias_*`` (out,),
    ``sign_in`` (B, in), ``sign_out`` (B, out); returns (B, out).
    """
    mean_output = F.linear(x, weight_mu, bias_mu)
    noise_output = F.linear(x * sign_in.to(x.dtype), weight_delta, bias_delta)
    # Signs are exact in any dtype; casting keeps bf16 outputs bf16 under autocast.
    return mean_output + noise_output * sign_out.to(noise_output.dtype)


def conv2d_flipout(
    x: torch.Tensor,
    weight_mu: torch.Tensor,
    weight_delta: torch.Tensor,
    bias_mu: torch.Tensor | None,
    bias_delta: torch.Tensor | None,
    sign_in: torch.Tensor,
    sign_out: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    r"""Flipout for a 2-D convolution, signs per example and channel.

    .. math:: y_n = \mu \star x_n + b_\mu + s_n \circ \big[\Delta W \star (x_n \circ r_n)
       + \Delta b\big]

    where :math:`\star` is the convolution and the signs broadcast over space.

    Shapes: ``x`` (B, C_in, H, W); ``weight_*`` (C_out, C_in / groups, kH, kW);
    ``bias_*`` (C_out,); ``sign_in`` (B, C_in) or broadcastable to ``x`` (e.g.
    (B, C_in, H, W) for per-pixel signs); ``sign_out`` (B, C_out) or broadcastable to the
    output (B, C_out, H', W'). Returns (B, C_out, H', W').
    """
    if sign_in.dim() == 2:
        sign_in = sign_in[:, :, None, None]
    if sign_out.dim() == 2:
        sign_out = sign_out[:, :, None, None]
    conv_args = (stride, padding, dilation, groups)
    mean_output = F.conv2d(x, weight_mu, bias_mu, *conv_args)
    noise_output = F.conv2d(x * sign_in.to(x.dtype), weight_delta, bias_delta, *conv_args)
    return mean_output + noise_output * sign_out.to(noise_output.dtype)


def conv2d_flipout_per_pixel(
    x: torch.Tensor,
    weight_mu: torch.Tensor,
    weight_delta: torch.Tensor,
    bias_mu: torch.Tensor | None,
    bias_delta: torch.Tensor | None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The per-pixel variant: one sign per example, channel **and position**.

    Shown for comparison only (chapter 4). Each output position of one example then
    combines the shared perturbation with different signs, so the positions of one image
    no longer see one common kernel sample. Same shapes as :func:`conv2d_flipout`.
    """
    conv_args = (stride, padding, dilation, groups)
    mean_output = F.conv2d(x, weight_mu, bias_mu, *conv_args)
    sign_in = rademacher(tuple(x.shape), like=x)
    noise_output = F.conv2d(x * sign_in, weight_delta, bias_delta, *conv_args)
    sign_out = rademacher(tuple(noise_output.shape), like=noise_output)
    return mean_output + noise_output * sign_out
