"""CIFAR-10-C corruptions in torch (bnn_course.corruptions), checked against the libraries
that Hendrycks & Dietterich's ``make_cifar_c.py`` calls (scipy.ndimage for scikit-image's
Gaussian filter, colorsys for the HSV conversion, PIL for BOX resizing and JPEG)."""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

from bnn_course.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    SEVERITY_PARAMETERS,
    brightness,
    contrast,
    corrupt,
    gaussian_blur,
    gaussian_filter,
    gaussian_noise,
    hsv_to_rgb,
    impulse_noise,
    jpeg_compression,
    pixelate,
    rgb_to_hsv,
    shot_noise,
)

NOISY = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    """Natural-looking test images: smooth random colour fields plus a little texture."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=generator)
    smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    texture = 0.08 * torch.randn(n, 3, 32, 32, generator=generator)
    return ((0.1 + 0.8 * smooth + texture).clamp(0, 1) * 255).round().to(torch.uint8)


def _mean_abs_change(name: str, severity: int, images: torch.Tensor) -> float:
    out = corrupt(images, name, severity, torch.Generator().manual_seed(5))
    return (out.float() - images.float()).abs().mean().item()


def test_registry_is_complete() -> None:
    assert set(CORRUPTIONS) == set(SEVERITY_PARAMETERS)
    assert {"gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast",
            "brightness", "pixelate", "jpeg_compression"} <= set(CORRUPTIONS)
    assert all(len(values) == 5 for values in SEVERITY_PARAMETERS.values())
    # spot checks of the CIFAR-10-C values (ImageNet-C's differ)
    assert SEVERITY_PARAMETERS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert SEVERITY_PARAMETERS["jpeg_compression"] == (80, 65, 58, 50, 40)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_shape_dtype_device_and_determinism(name: str, device: str) -> None:
    images = _images().to(device)
    for severity in SEVERITIES:
        first = corrupt(images, name, severity, torch.Generator().manual_seed(1))
        assert first.shape == images.shape
        assert first.dtype == torch.uint8
        assert first.device == images.device
        again = corrupt(images, name, severity, torch.Generator().manual_seed(1))
        assert torch.equal(first, again)
        assert not torch.equal(first, images)
    seeded = corrupt(images, name, 3, torch.Generator().manual_seed(1))
    other = corrupt(images, name, 3, torch.Generator().manual_seed(2))
    assert torch.equal(other, seeded) == (name not in NOISY)  # noise changes with the seed
    assert corrupt(images[:0], name, 3).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_strength_grows_with_severity(name: str) -> None:
    images = _images()
    change = [_mean_abs_change(name, severity, images) for severity in SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change
    assert change[0] > 0.3  # grey levels: even severity 1 does something


def test_contrast_and_brightness_go_the_right_way() -> None:
    images = _images()
    x = images.float()
    spread = [contrast(images, s).float().std(dim=(-2, -1)).mean().item() for s in SEVERITIES]
    assert x.std(dim=(-2, -1)).mean().item() > spread[0]
    assert all(a > b for a, b in zip(spread, spread[1:], strict=False)), spread
    for severity in SEVERITIES:  # the channel means stay (up to truncation: < 1 level)
        out = contrast(images, severity).float()
        shift = x.mean(dim=(-2, -1)) - out.mean(dim=(-2, -1))
        assert (shift > -0.01).all() and (shift < 1.01).all()
    means = [brightness(images, s).float().mean().item() for s in SEVERITIES]
    assert x.mean().item() < means[0]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    assert (brightness(images, 5) >= images).all()  # nothing gets darker


def test_gaussian_blur_matches_scipy() -> None:
    # make_cifar_c.py: skimage.filters.gaussian(x / 255, sigma=c, multichannel=True), i.e.
    # scipy.ndimage.gaussian_filter with mode="nearest", truncate=4, no blur across channels.
    images = _images(8)
    for severity, sigma in zip(SEVERITIES, SEVERITY_PARAMETERS["gaussian_blur"], strict=True):
        x = images.permute(0, 2, 3, 1).double().numpy() / 255
        reference = scipy.ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")
        expected = np.uint8(np.clip(reference, 0, 1) * 255 + 1e-3)
        ours = gaussian_blur(images, severity).permute(0, 2, 3, 1).numpy()
        difference = np.abs(ours.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.01
    data = torch.rand(2, 5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = scipy.ndimage.gaussian_filter(data.numpy(), sigma=(0, 1.5, 1.5, 1.5),
                                             mode="nearest")
    np.testing.assert_allclose(gaussian_filter(data, 1.5, dims=(1, 2, 3)).numpy(), expected,
                               rtol=0, atol=1e-12)


def test_hsv_matches_colorsys_and_round_trips() -> None:
    generator = torch.Generator().manual_seed(4)
    rgb = torch.rand(1, 3, 12, 12, dtype=torch.float64, generator=generator)
    rgb[0, :, 0, 0] = 0  # black
    rgb[0, :, 0, 1] = 0.5  # grey
    rgb[0, 1, 0, 2] = rgb[0, 0, 0, 2]  # red and green tie
    hsv = rgb_to_hsv(rgb)
    pixels = rgb[0].reshape(3, -1).T.tolist()
    expected = torch.tensor([colorsys.rgb_to_hsv(*pixel) for pixel in pixels],
                            dtype=torch.float64).T.reshape(rgb.shape)
    torch.testing.assert_close(hsv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, rtol=0, atol=1e-12)


def test_brightness_matches_the_hsv_recipe() -> None:
    images = _images(2)
    for severity, c in zip(SEVERITIES, SEVERITY_PARAMETERS["brightness"], strict=True):
        ours = brightness(images, severity)
        for n in range(2):
            for i in range(0, 32, 5):
                for j in range(0, 32, 3):
                    h, s, v = colorsys.rgb_to_hsv(*(images[n, :, i, j].double() / 255).tolist())
                    rgb = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
                    expected = [math.floor(min(max(value, 0), 1) * 255 + 1e-3) for value in rgb]
                    assert np.abs(ours[n, :, i, j].numpy().astype(int) - expected).max() <= 1
    black = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    assert (brightness(black, 5) == math.floor(0.3 * 255)).all()  # black turns grey


def test_pixelate_equals_pil_box_resizing() -> None:
    images = _images(6)
    for severity, c in zip(SEVERITIES, SEVERITY_PARAMETERS["pixelate"], strict=True):
        ours = pixelate(images, severity)
        size = int(32 * c)
        for n in range(images.shape[0]):
            image = Image.fromarray(images[n].permute(1, 2, 0).numpy())
            expected = np.array(image.resize((size, size), Image.BOX).resize((32, 32), Image.BOX))
            assert np.array_equal(ours[n].permute(1, 2, 0).numpy(), expected)


def test_jpeg_equals_pil() -> None:
    images = _images(6)
    for severity, quality in zip(SEVERITIES, SEVERITY_PARAMETERS["jpeg_compression"],
                                 strict=True):
        ours = jpeg_compression(images, severity)
        for n in range(images.shape[0]):
            buffer = io.BytesIO()
            Image.fromarray(images[n].permute(1, 2, 0).numpy()).save(buffer, "JPEG",
                                                                      quality=quality)
            expected = np.array(Image.open(buffer)).astype(int)
            difference = np.abs(ours[n].permute(1, 2, 0).numpy().astype(int) - expected)
            assert difference.max() == 0


def test_noise_has_the_published_strength() -> None:
    # On a mid-grey image nothing clips, so the noise statistics are those of the recipe.
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    n = grey.numel()
    x = 128 / 255
    for severity in (1, 5):
        generator = torch.Generator().manual_seed(severity)
        c = SEVERITY_PARAMETERS["gaussian_noise"][severity - 1]
        residual = (gaussian_noise(grey, severity, generator).double() + 0.5) / 255 - x
        assert residual.std().item() == pytest.approx(c, rel=0.02)  # truncation adds 1/sqrt(12)/255
        rate = SEVERITY_PARAMETERS["shot_noise"][severity - 1]
        counts = shot_noise(grey, severity, generator).double() / 255 * rate
        assert counts.var().item() == pytest.approx(x * rate, rel=0.05)  # Poisson: var = mean
        amount = SEVERITY_PARAMETERS["impulse_noise"][severity - 1]
        out = impulse_noise(grey, severity, generator)
        flipped = (out != 128).double().mean().item()
        assert flipped == pytest.approx(amount, abs=5 * math.sqrt(amount / n))
        assert set(out.unique().tolist()) <= {0, 128, 255}
        salt = (out == 255).double().sum() / (out != 128).double().sum()
        assert salt.item() == pytest.approx(0.5, abs=0.05)


def test_bad_input_raises() -> None:
    images = _images(2)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.float(), "contrast", 1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        corrupt(images[:, :1], "contrast", 1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        corrupt(images[0], "contrast", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(images, "contrast", severity)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
