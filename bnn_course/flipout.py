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

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def rademacher(shape: tuple[int, ...], *, like: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Independent signs :math:`\\pm 1` with probability 1/2, on ``like``'s device, in
    ``dtype`` (default: ``like``'s dtype)."""
    # randint is about 2.5x faster than bernoulli_ on CPUs, and as fast on GPUs.
    signs = torch.randint(0, 2, shape, device=like.device, dtype=dtype or like.dtype)
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

    Shapes: ``x`` (B, \*, in), ``weight_mu`` and ``weight_delta`` (out, in), ``bias_*``
    (out,), ``sign_in`` (B, \*, in), ``sign_out`` (B, \*, out); returns (B, \*, out). Every
    row of the leading dimensions is an example with its own signs.
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

    When gradients are needed, the same numbers come from :class:`_Conv2dFlipoutFunction`,
    whose backward pass makes one fewer pass over the activations (see there); without
    them the sum is taken in place (a fresh output buffer costs as much as the sum on a
    CPU: Monte Carlo prediction ran 1.2x faster).
    """
    if sign_in.dim() == 2:
        sign_in = sign_in[:, :, None, None]
    if sign_out.dim() == 2:
        sign_out = sign_out[:, :, None, None]
    conv_args = (stride, padding, dilation, groups)
    fused = _fused_conv2d_flipout(x, weight_mu, weight_delta, bias_mu, bias_delta, sign_in,
                                  sign_out, conv_args)
    if fused is not None:
        return fused
    mean_output = F.conv2d(x, weight_mu, bias_mu, *conv_args)
    noise_output = F.conv2d(x * sign_in.to(x.dtype), weight_delta, bias_delta, *conv_args)
    sign_out = sign_out.to(noise_output.dtype)
    if mean_output.requires_grad:  # a call the fused function does not take
        return torch.addcmul(mean_output, noise_output, sign_out)
    return mean_output.addcmul_(noise_output, sign_out)  # no autograd: in place


ConvArgs = tuple[Any, Any, Any, int]
"""``(stride, padding, dilation, groups)`` as ``F.conv2d`` takes them."""


class _Conv2dFlipoutFunction(torch.autograd.Function):
    r""":func:`conv2d_flipout` with a hand-written backward pass; the same numbers.

    Forward, as in :func:`conv2d_flipout`: :math:`y = \mu \star x + b_\mu
    + s \circ (\Delta W \star (x \circ r) + \Delta b)`, the last sum and product in one
    ``addcmul_`` into the mean output. Backward, with :math:`g = \partial L / \partial y`:

    .. math::

        \partial_x L = \mu \star^\top g + r \circ \big(\Delta W \star^\top (s \circ g)\big),

    the weight gradients those of the two convolutions with output gradients :math:`g`
    and :math:`s \circ g`. Autograd's generic backward multiplies by :math:`r` and then
    adds the two input gradients (two passes over the input-sized tensors); here one
    ``addcmul_`` does both. Products with signs :math:`\pm 1` are exact, so the results
    are bit-identical to autograd's. Everything inside runs in one dtype: the caller casts
    the operands first (as autocast would) and calls :meth:`apply` with autocast off.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight_mu: torch.Tensor, weight_delta: torch.Tensor,
        bias_mu: torch.Tensor | None, bias_delta: torch.Tensor | None,
        sign_in: torch.Tensor, sign_out: torch.Tensor, conv_args: ConvArgs,
    ) -> torch.Tensor:
        x_signed = x * sign_in
        output = F.conv2d(x, weight_mu, bias_mu, *conv_args)
        output.addcmul_(F.conv2d(x_signed, weight_delta, bias_delta, *conv_args), sign_out)
        ctx.save_for_backward(x, x_signed, weight_mu, weight_delta, sign_in, sign_out)
        ctx.conv_args = conv_args
        ctx.has_bias = (bias_mu is not None, bias_delta is not None)
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, x_signed, weight_mu, weight_delta, sign_in, sign_out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        needs = ctx.needs_input_grad
        mean_bias, delta_bias = ctx.has_bias

        def conv_backward(grad_out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor,
                          has_bias: bool, weight_needed: bool, bias_needed: bool) -> tuple:
            return torch.ops.aten.convolution_backward(
                grad_out, inputs, weight, [weight.shape[0]] if has_bias else None,
                stride, padding, dilation, False, [0, 0], groups,
                [needs[0], weight_needed, bias_needed and has_bias])

        grad_x, grad_mu, grad_bias_mu = conv_backward(
            grad, x, weight_mu, mean_bias, needs[1], needs[3])
        grad_x_signed, grad_delta, grad_bias_delta = conv_backward(
            grad * sign_out, x_signed, weight_delta, delta_bias, needs[2], needs[4])
        if needs[0]:
            grad_x = grad_x.addcmul_(grad_x_signed, sign_in)
        return grad_x, grad_mu, grad_delta, grad_bias_mu, grad_bias_delta, None, None, None


def _explicit_padding(padding: Any, kernel: tuple[int, int],
                      dilation: tuple[int, int]) -> tuple[int, int] | None:
    """``padding`` as a pair of ints, or ``None`` when it is not symmetric ("same" with an
    even dilated kernel pads one more on one side, which a pair cannot say)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
    return _pair(padding)


def _fused_conv2d_flipout(
    x: torch.Tensor, weight_mu: torch.Tensor, weight_delta: torch.Tensor,
    bias_mu: torch.Tensor | None, bias_delta: torch.Tensor | None,
    sign_in: torch.Tensor, sign_out: torch.Tensor, conv_args: ConvArgs,
) -> torch.Tensor | None:
    """:class:`_Conv2dFlipoutFunction` when a gradient is needed and the call fits it
    (padding expressible as a pair, ``sign_in`` no larger than ``x``); ``None`` otherwise.

    Under autocast the operands are cast first, as autocast casts a convolution's inputs,
    so the function sees one dtype; the casts are ordinary differentiable ops.
    """
    tensors = [t for t in (x, weight_mu, weight_delta, bias_mu, bias_delta) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    stride, padding, dilation, groups = conv_args
    padding = _explicit_padding(padding, tuple(weight_mu.shape[-2:]), _pair(dilation))
    if padding is None or torch.broadcast_shapes(x.shape, sign_in.shape) != x.shape:
        return None
    device_type = x.device.type
    try:
        autocasting = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type) if autocasting else None
    except (AttributeError, TypeError):  # a torch without per-device autocast queries
        return None
    if autocasting and any(t.dtype == torch.float64 for t in tensors):
        return None  # autocast leaves float64 alone; so does the plain path
    # Without autocast nothing is cast (mixed dtypes fail as they do in F.conv2d).
    dtype = autocast_dtype if autocasting else x.dtype

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(dtype) if t is not None and autocasting else t

    def cast_sign(signs: torch.Tensor) -> torch.Tensor:  # exact; no op when drawn in dtype
        return signs if signs.dtype == dtype else signs.to(dtype)

    with torch.autocast(device_type, enabled=False):
        output = _Conv2dFlipoutFunction.apply(
            cast(x), cast(weight_mu), cast(weight_delta), cast(bias_mu), cast(bias_delta),
            cast_sign(sign_in), cast_sign(sign_out),
            (list(_pair(stride)), list(padding), list(_pair(dilation)), groups))
    return output


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
