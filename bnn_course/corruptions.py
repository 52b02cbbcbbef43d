r"""CIFAR-10-C-style corruptions, batched, in torch, on any device.

These are *re-implementations* of nine of the corruptions of CIFAR-10-C (Hendrycks &
Dietterich, 2019), with the per-severity parameters of Hendrycks' ``make_cifar_c.py``;
they are not the released CIFAR-10-C files. The noise is drawn from another generator and
some filters are re-implemented, so accuracies measured on these images are *not directly
comparable* with numbers reported on the released CIFAR-10-C (they should be close, not
equal).

Hendrycks and Dietterich build CIFAR-10-C by applying 15 (+4 extra) corruptions at five
severities to the CIFAR-10 test set. Their script processes one PIL image at a time with
NumPy, scikit-image, OpenCV, Wand and PIL; here a corruption takes a whole batch of
``uint8`` images ``(N, 3, H, W)`` on any device and returns one of the same shape, dtype
and device.

**Source of the parameters.** Every per-severity constant below is copied from
``ImageNet-C/create_c/make_cifar_c.py`` in https://github.com/hendrycks/robustness (commit
ca360085d57889288c4143fddd8a707bbcae01bd), the script that generated CIFAR-10-C. The CIFAR
values differ from the ImageNet-C ones (``make_imagenet_c.py``, and the ``imagecorruptions``
package, which follows ImageNet-C): e.g. Gaussian noise has standard deviations
0.04..0.10 here and 0.08..0.38 for ImageNet-C. See :data:`SEVERITY_PARAMETERS`.

Corruptions (names as in their file; ``speckle_noise`` and ``gaussian_blur`` are two of the
four "extra" corruptions of CIFAR-10-C, the others are in the main 15):

==================  ====================================================  =================
name                what it does, per severity ``c``                      exact?
==================  ====================================================  =================
gaussian_noise      ``x + N(0, c^2)``, ``x`` in [0, 1]                    same recipe
shot_noise          ``Poisson(c x) / c``                                  same recipe
impulse_noise       salt-and-pepper on a fraction ``c`` of the values     same recipe
speckle_noise       ``x + x N(0, c^2)``                                   same recipe
gaussian_blur       Gaussian filter, std ``c`` pixels                     = scipy.ndimage
contrast            ``(x - mean) c + mean``, per image and channel        yes
brightness          HSV value channel ``V + c``, clipped                  = scikit-image
pixelate            PIL ``BOX`` resize to ``int(32 c)``, then back        = PIL
jpeg_compression    JPEG at quality ``c`` (on the CPU)                    = PIL (libjpeg)
==================  ====================================================  =================

"Same recipe" means the same distribution of noise, from torch's generator instead of
NumPy's. ``pixelate`` re-implements PIL's ``BOX`` resampling (which is not an exact area
average: it weighs input pixels by whether their centres fall in the footprint) as two
small matrices, with PIL's rounding to ``uint8`` between the horizontal and vertical pass;
the tests check it equals PIL bit for bit. ``jpeg_compression`` is the only corruption that
runs on the CPU: it moves the batch there, encodes and decodes each image with PIL at the
published quality, exactly as ``make_cifar_c.py`` does, and moves the batch back.

**Rounding.** Their script stores ``np.uint8(result * 255)``, which truncates. We truncate
as well, so the deterministic corruptions reproduce CIFAR-10-C up to float rounding, but add
``1e-3`` grey levels first so that float32 rounding cannot turn an exact 200 into 199.

**Randomness.** The noise corruptions draw from ``generator`` (on its own device; the
result is moved to the images' device) or, without one, from the global generator of the
images' device. A seeded generator makes a corruption deterministic; a CPU generator also
gives the same noise whatever device the images are on.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

SEVERITY_PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of the noise, x in [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values flipped
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # std of the multiplicative noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # std of the filter in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value channel
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # relative size of the downscaled image
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}
"""The parameter of each CIFAR-10-C-style corruption at severities 1..5, as published in
``make_cifar_c.py``."""

_TRUNCATION_TOLERANCE = 1e-3  # grey levels; see "Rounding" in the module docstring


# --------------------------------------------------------------------------------------
# Checks and conversions
# --------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (values 0..255), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")


def _parameter(name: str, severity: int) -> float:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    return SEVERITY_PARAMETERS[name][severity - 1]


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` to float32 in [0, 1]."""
    return images.to(torch.float32) / 255


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] (clipped here) to ``uint8`` by truncation, like ``np.uint8(x * 255)``."""
    return torch.floor(x.clamp(0, 1) * 255 + _TRUNCATION_TOLERANCE).clamp_(0, 255).to(torch.uint8)


def _random_device(images: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else images.device


def _normal(shape: Sequence[int], images: torch.Tensor,
            generator: torch.Generator | None) -> torch.Tensor:
    device = _random_device(images, generator)
    return torch.randn(tuple(shape), generator=generator, device=device).to(images.device)


def _uniform(shape: Sequence[int], images: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    device = _random_device(images, generator)
    return torch.rand(tuple(shape), generator=generator, device=device).to(images.device)


# --------------------------------------------------------------------------------------
# Building blocks: Gaussian filter, HSV, PIL's BOX resize
# --------------------------------------------------------------------------------------


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    r"""scipy's 1-D Gaussian kernel: :math:`w_i \propto e^{-i^2 / 2\sigma^2}`, normalised.

    ``i`` runs over ``-r..r`` with radius ``r = int(truncate * sigma + 0.5)``, as in
    :func:`scipy.ndimage.gaussian_filter1d`. Returns float64 ``(2r + 1,)`` on the CPU.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets**2 / sigma**2)
    return weights / weights.sum()


def gaussian_filter(x: torch.Tensor, sigma: float, dims: Sequence[int],
                    truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter along ``dims``, borders extended with the edge value.

    Equals :func:`scipy.ndimage.gaussian_filter` with ``mode="nearest"`` (the default of
    :func:`skimage.filters.gaussian`, which ``make_cifar_c.py`` calls) and ``sigma`` on
    ``dims``, 0 on the other axes.

    Parameters
    ----------
    x:
        Floating tensor of any shape, on any device.
    sigma:
        Standard deviation in pixels (the same along each of ``dims``).
    dims:
        The axes to filter.

    Returns
    -------
    Tensor of the shape, dtype and device of ``x``.
    """
    if not x.is_floating_point():
        raise ValueError(f"gaussian_filter needs a floating tensor, got {x.dtype}")
    kernel = gaussian_kernel1d(sigma, truncate)
    radius = (kernel.numel() - 1) // 2
    for dim in dims:
        n = x.shape[dim]
        # The filter along one axis as an (n, n) matrix: output i takes kernel weight w_o
        # from input clamp(i + o, 0, n - 1) (edge extension, for any radius), so the
        # whole pass is one matrix product.
        source = (torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)).clamp(0, n - 1)
        matrix = torch.zeros(n, n, dtype=torch.float64).scatter_add_(
            1, source, kernel.expand(n, -1).contiguous())
        matrix = matrix.to(x.dtype).to(x.device)  # dtype first: no float64 on some devices
        x = (x.movedim(dim, -1) @ matrix.T).movedim(-1, dim)
    return x


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB to HSV, channels on dim ``-3``, all components in [0, 1].

    Follows :func:`skimage.color.rgb2hsv` (used by ``make_cifar_c.py``): ``V = max``,
    ``S = (max - min) / max`` (0 where ``max - min = 0``), hue in [0, 1) with 0 for greys;
    where two channels tie for the maximum, the later channel's formula is used (the hue is
    the same either way).

    Parameters
    ----------
    rgb:
        Floating ``(..., 3, H, W)`` in [0, 1].

    Returns
    -------
    ``(..., 3, H, W)``: hue, saturation, value.
    """
    r, g, b = rgb.unbind(-3)
    value = torch.maximum(torch.maximum(r, g), b)
    delta = value - torch.minimum(torch.minimum(r, g), b)
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    saturation = torch.where(grey, torch.zeros_like(delta),
                             delta / torch.where(value == 0, torch.ones_like(value), value))
    hue = (g - b) / safe_delta
    hue = torch.where(g == value, 2 + (b - r) / safe_delta, hue)
    hue = torch.where(b == value, 4 + (r - g) / safe_delta, hue)
    hue = torch.remainder(hue / 6, 1.0)
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack((hue, saturation, value), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV to RGB, the inverse of :func:`rgb_to_hsv` (:func:`skimage.color.hsv2rgb`).

    Parameters
    ----------
    hsv:
        Floating ``(..., 3, H, W)``: hue in [0, 1), saturation and value in [0, 1].

    Returns
    -------
    ``(..., 3, H, W)`` RGB in [0, 1].
    """
    h, s, v = hsv.unbind(-3)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = torch.remainder(sector, 6).long()
    candidates = torch.stack([
        torch.stack((v, t, p), dim=-3),
        torch.stack((q, v, p), dim=-3),
        torch.stack((p, v, t), dim=-3),
        torch.stack((p, q, v), dim=-3),
        torch.stack((t, p, v), dim=-3),
        torch.stack((v, p, q), dim=-3),
    ])  # (6, ..., 3, H, W)
    index = sector.unsqueeze(-3).expand_as(hsv).unsqueeze(0)
    return torch.gather(candidates, 0, index).squeeze(0)


def pil_box_weights(in_size: int, out_size: int) -> torch.Tensor:
    """The ``(out_size, in_size)`` matrix of PIL's ``BOX`` resampling along one axis.

    A transcription of ``precompute_coeffs`` in Pillow's ``libImaging/Resample.c``: output
    pixel ``i`` has centre ``(i + 0.5) * scale`` in input coordinates (``scale = in/out``)
    and averages, with equal weights, the input pixels whose centres lie inside a box of
    width ``max(scale, 1)`` around it. Returns float64 on the CPU; rows sum to one.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for j in range(lo, hi):
            u = (j - center + 0.5) / filter_scale
            if -0.5 < u <= 0.5:
                weights[i, j] = 1.0
        weights[i] /= weights[i].sum()
    return weights


def pil_box_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``PIL.Image.resize(size, Image.BOX)`` of each ``uint8`` image, batched.

    Horizontal pass, rounding to ``uint8`` (as PIL does between passes), vertical pass,
    rounding again. ``size`` is ``(height, width)``. Returns ``uint8 (N, C, *size)``.
    """
    height, width = size
    dtype = torch.float32
    x = images.to(dtype)
    if width != images.shape[-1]:
        w = pil_box_weights(images.shape[-1], width).to(dtype).to(images.device)
        x = torch.floor(x @ w.T + 0.5).clamp_(0, 255)
    if height != images.shape[-2]:
        w = pil_box_weights(images.shape[-2], height).to(dtype).to(images.device)
        x = torch.floor(w @ x + 0.5).clamp_(0, 255)
    return x.to(torch.uint8)


# --------------------------------------------------------------------------------------
# The corruptions: uint8 (N, 3, H, W) -> uint8 (N, 3, H, W)
# --------------------------------------------------------------------------------------


def gaussian_noise(images: torch.Tensor, severity: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Additive Gaussian noise: :math:`x + \varepsilon`, :math:`\varepsilon \sim N(0, c^2)`.

    ``c`` in (0.04, 0.06, 0.08, 0.09, 0.10) on the [0, 1] scale, independent per pixel and
    channel. ``images``: ``uint8 (N, 3, H, W)``; returns the same shape, dtype and device.
    """
    _check_images(images)
    c = _parameter("gaussian_noise", severity)
    x = _to_unit(images)
    return _to_uint8(x + c * _normal(x.shape, images, generator))


def shot_noise(images: torch.Tensor, severity: int = 1,
               generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Poisson (photon) noise: :math:`\mathrm{Poisson}(c\,x) / c`.

    ``c`` in (500, 250, 100, 75, 50): fewer photons, more noise. The Poisson draws are made
    on ``generator``'s device (the images' device without one).
    """
    _check_images(images)
    c = _parameter("shot_noise", severity)
    x = _to_unit(images)
    rates = (x * c).to(_random_device(images, generator))
    counts = torch.poisson(rates, generator=generator).to(images.device)
    return _to_uint8(counts / c)


def impulse_noise(images: torch.Tensor, severity: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt-and-pepper noise, as ``skimage.util.random_noise(mode="s&p", amount=c)``.

    Each value (pixel and channel independently) is replaced with probability ``c`` in
    (0.01, 0.02, 0.03, 0.05, 0.07), by 255 or 0 with equal probability.
    """
    _check_images(images)
    c = _parameter("impulse_noise", severity)
    flipped = _uniform(images.shape, images, generator) < c
    salted = _uniform(images.shape, images, generator) < 0.5
    out = images.clone()
    out[flipped & salted] = 255
    out[flipped & ~salted] = 0
    return out


def speckle_noise(images: torch.Tensor, severity: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Multiplicative noise :math:`x + x\,\varepsilon`, :math:`\varepsilon \sim N(0, c^2)`.

    ``c`` in (0.06, 0.1, 0.12, 0.16, 0.2).
    """
    _check_images(images)
    c = _parameter("speckle_noise", severity)
    x = _to_unit(images)
    return _to_uint8(x + x * (c * _normal(x.shape, images, generator)))


def gaussian_blur(images: torch.Tensor, severity: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with standard deviation ``c`` in (0.4, 0.6, 0.7, 0.8, 1) pixels.

    :func:`gaussian_filter` over height and width (``skimage.filters.gaussian`` with
    ``multichannel=True``: borders ``nearest``, kernel truncated at 4 standard deviations).
    Deterministic; ``generator`` is accepted for a uniform interface and ignored.
    """
    _check_images(images)
    c = _parameter("gaussian_blur", severity)
    return _to_uint8(gaussian_filter(_to_unit(images), c, dims=(-2, -1)))


def contrast(images: torch.Tensor, severity: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Lower contrast: :math:`(x - \bar x)\,c + \bar x`, ``c`` in (0.75, 0.5, 0.4, 0.3, 0.15).

    :math:`\bar x` is the mean of each image's channel (``np.mean(x, axis=(0, 1))`` on an
    ``H x W x 3`` image). Deterministic; ``generator`` is ignored.
    """
    _check_images(images)
    c = _parameter("contrast", severity)
    x = _to_unit(images)
    means = x.mean(dim=(-2, -1), keepdim=True)
    return _to_uint8((x - means) * c + means)


def brightness(images: torch.Tensor, severity: int = 1,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Brighter: HSV value channel ``V + c``, clipped to 1, ``c`` in (0.05, ..., 0.3).

    As in ``make_cifar_c.py``: :func:`rgb_to_hsv`, add ``c`` to ``V``, :func:`hsv_to_rgb`.
    Hue and saturation are kept, so a colour pixel is scaled by ``V' / V`` and a black one
    becomes grey ``V' = c``. Deterministic; ``generator`` is ignored.
    """
    _check_images(images)
    c = _parameter("brightness", severity)
    hsv = rgb_to_hsv(_to_unit(images))
    hsv = torch.cat((hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)), dim=1)
    return _to_uint8(hsv_to_rgb(hsv))


def pixelate(images: torch.Tensor, severity: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Downscale to ``int(32 c)`` pixels with PIL's ``BOX`` filter and back up with it.

    ``c`` in (0.95, 0.9, 0.85, 0.75, 0.65): 30, 28, 27, 24, 20 pixels for 32x32 images
    (``int(H c)`` by ``int(W c)`` in general). Upscaling with ``BOX`` picks, for each output
    pixel, the input pixel under its centre (nearest-neighbour), exactly as PIL does; see
    :func:`pil_box_resize`. Deterministic; ``generator`` is ignored.
    """
    _check_images(images)
    c = _parameter("pixelate", severity)
    height, width = images.shape[-2:]
    small = pil_box_resize(images, (max(int(height * c), 1), max(int(width * c), 1)))
    return pil_box_resize(small, (height, width))


def jpeg_compression(images: torch.Tensor, severity: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG encode and decode at quality ``c`` in (80, 65, 58, 50, 40), with PIL.

    **Runs on the CPU**, one image at a time: exactly ``make_cifar_c.py``'s
    ``PIL.Image.save(buffer, "JPEG", quality=c)`` (libjpeg-turbo, 4:2:0 chroma subsampling)
    and decode; the batch is moved back to the images' device. Deterministic; ``generator``
    is ignored. (torchvision's ``encode_jpeg`` gives the same bytes but is deprecated as of
    torchvision 0.29.)
    """
    _check_images(images)
    quality = _parameter("jpeg_compression", severity)
    if images.shape[0] == 0:
        return images.clone()
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as jpeg:
            decoded.append(np.asarray(jpeg.convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    return out.to(images.device)


Corruption = Callable[..., torch.Tensor]

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
"""Name -> ``f(images, severity, generator=None)``, for every corruption of this module."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def corrupt(images: torch.Tensor, name: str, severity: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the corruption ``name`` at ``severity`` (1..5) to a batch of images.

    Parameters
    ----------
    images:
        ``uint8 (N, 3, H, W)`` on any device (the parameters are those for 32x32 CIFAR-10).
    name:
        A key of :data:`CORRUPTIONS`.
    severity:
        1 (mildest) to 5.
    generator:
        Source of the noise; a seeded one makes the result deterministic.

    Returns
    -------
    ``uint8 (N, 3, H, W)`` on the device of ``images``.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name](images, severity, generator)

