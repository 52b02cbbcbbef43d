"""Out-of-distribution image sets for a CIFAR-10 classifier, as ``uint8 (N, 3, 32, 32)``.

:func:`load_ood_sets` returns whichever of these it can get, and says which it used:

* ``"svhn"`` -- the SVHN test split (26,032 house-number digits), through
  :class:`torchvision.datasets.SVHN`;
* ``"cifar100"`` -- the CIFAR-100 test split (10,000 images of 100 classes disjoint from
  CIFAR-10's), through :class:`torchvision.datasets.CIFAR100`;
* ``"sklearn-digits"`` -- offline: scikit-learn's 1,797 handwritten digits
  (:func:`sklearn.datasets.load_digits`, 8x8 grey levels 0..16, shipped with the package),
  scaled to 0..255, resized bilinearly to 32x32 and copied to three channels;
* ``"sklearn-photos"`` -- offline natural images: square crops of the two colour
  photographs scikit-learn ships (:func:`sklearn.datasets.load_sample_images`, 427x640 RGB:
  ``china.jpg``, a pagoda among trees above a lake, and ``flower.jpg``, a dahlia before
  blurred foliage), 32, 64, 96 or 128 pixels wide at random positions, shrunk to 32x32 by
  averaging blocks of 1x1 to 4x4 pixels (as CIFAR-10's images are shrunk photographs):
  textures and scenes of none of CIFAR-10's classes. The crops of one photograph overlap
  and share its colours and textures: they are *not* independent images, and a bootstrap
  over them must resample photographs, not crops (``groups`` of :func:`load_ood_sets`);
* ``"uniform-noise"``, ``"gaussian-noise"``, ``"blobs"`` -- offline, synthetic, following
  the noise sets of Hendrycks et al. (2019, Outlier Exposure, ``test.py``): i.i.d. uniform
  pixels; i.i.d. Gaussian pixels :math:`N(0.5, 0.25^2)` clipped to [0, 1] (their
  :math:`N(0, 0.5^2)` clipped to [-1, 1] on the [-1, 1] scale); and "blobs", Bernoulli(0.7)
  pixels smoothed by a Gaussian filter of standard deviation 1.5 pixels over height, width
  *and* channels (their ``gaussian(..., sigma=1.5, multichannel=False)``) with values below
  0.75 set to 0.

SVHN and CIFAR-100 are read from ``root``, else ``BNN_COURSE_DATA``, else
``~/.cache/bnn_course/data`` (torchvision's layouts: ``test_32x32.mat`` and
``cifar-100-python/``). They are downloaded only into that default folder, when missing and
``allow_download`` is true; a folder named explicitly must exist and is only read.
A set that cannot be had is skipped with a printed reason; the offline sets are always there.

Which items of a set belong together (the photograph each crop was cut from) is returned,
on request, through ``load_ood_sets(..., groups={})``, for a bootstrap by group
(:func:`bnn_course.comparison.resample_weights`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bnn_course.corruptions import gaussian_filter
from bnn_course.data import resolve_data_root

logger = logging.getLogger(__name__)

NUM_SYNTHETIC = 2000
"""Images in each synthetic set (Outlier Exposure uses a fifth of the test set: 2,000)."""

NUM_PHOTO_CROPS = 2000
"""Crops in ``"sklearn-photos"`` (as many as in each synthetic set)."""

PHOTO_CROP_SIZES: tuple[int, ...] = (32, 64, 96, 128)
"""Side lengths, in pixels, of the square windows cut from the photographs."""

PHOTO_FILES: tuple[str, ...] = ("china.jpg", "flower.jpg")
"""The photographs of :func:`sklearn_sample_photos`, in order: photograph ``i`` is
``PHOTO_FILES[i]`` (the group label of its crops in :func:`load_ood_sets`)."""

OOD_SET_NAMES: tuple[str, ...] = ("svhn", "cifar100", "sklearn-digits", "sklearn-photos",
                                  "uniform-noise", "gaussian-noise", "blobs")
"""Every set :func:`load_ood_sets` knows, in the order it tries them."""


def _say(message: str) -> None:
    logger.info(message)
    print(message)


def _random_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _subset(images: torch.Tensor, max_images: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """At most ``max_images``: a random subset (kept in order) with a generator, else the first."""
    if max_images is None or images.shape[0] <= max_images:
        return images
    if generator is None:
        return images[:max_images]
    keep = torch.randperm(images.shape[0], generator=generator,
                          device=_random_device(generator))[:max_images]
    return images[torch.sort(keep.cpu()).values]


# --------------------------------------------------------------------------------------
# Offline sets
# --------------------------------------------------------------------------------------


def sklearn_digits(image_size: int = 32) -> torch.Tensor:
    """scikit-learn's handwritten digits as ``uint8 (1797, 3, image_size, image_size)``.

    The 8x8 images (grey levels 0..16, ink bright on a dark background) are scaled to
    0..255, resized with bilinear interpolation (``align_corners=False``), rounded, and
    repeated over three channels.
    """
    from sklearn.datasets import load_digits

    digits = torch.as_tensor(load_digits().images, dtype=torch.float32)  # (1797, 8, 8)
    x = digits[:, None] * (255 / 16)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


def sklearn_sample_photos() -> list[torch.Tensor]:
    """scikit-learn's two sample photographs, ``china.jpg`` and ``flower.jpg``.

    Shipped with scikit-learn (:func:`sklearn.datasets.load_sample_images`, read with
    Pillow), so always available offline. Returns two ``uint8 (3, 427, 640)`` tensors.
    """
    from sklearn.datasets import load_sample_images

    return [torch.tensor(photo).permute(2, 0, 1).contiguous()
            for photo in load_sample_images().images]


def photo_crops(photos: list[torch.Tensor], n: int,
                generator: torch.Generator | None = None,
                crop_sizes: tuple[int, ...] = PHOTO_CROP_SIZES, image_size: int = 32,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``n`` square crops of ``photos``, shrunk to ``image_size`` by averaging blocks.

    For each crop a photograph :math:`p` and a side :math:`s` are drawn uniformly from
    ``photos`` and ``crop_sizes``, and a top-left corner :math:`(t, l)` uniformly among the
    positions where the window fits, :math:`0 \le t \le H_p - s`,
    :math:`0 \le l \le W_p - s`. With :math:`m` = ``image_size`` and :math:`k = s / m`,
    the crop is the window averaged over :math:`k \times k` blocks (area averaging, the
    antialiased way to shrink an image by an integer factor) and rounded:

    .. math::

        x_{cij} = \operatorname{round}\Big(\frac{1}{k^2} \sum_{a=0}^{k-1} \sum_{b=0}^{k-1}
        P_{p,\,c,\,t + ki + a,\,l + kj + b}\Big),
        \qquad 0 \le i, j < m.

    At :math:`s = m` (:math:`k = 1`) the crop is the window itself.

    Parameters
    ----------
    photos:
        ``uint8 (3, H, W)`` images, each at least ``max(crop_sizes)`` high and wide.
    n:
        Number of crops.
    generator:
        Random numbers for the photographs, sizes and positions (drawn on its device).
    crop_sizes:
        Window sides in pixels, each a multiple of ``image_size``.
    image_size:
        Side of the returned images.

    Returns
    -------
    (images, windows):
        ``uint8 (n, 3, image_size, image_size)`` and ``int64 (n, 4)``, each row the
        window of one crop: ``(photo index, top, left, side)``.
    """
    if any(size < image_size or size % image_size for size in crop_sizes):
        raise ValueError(f"crop_sizes must be multiples of image_size={image_size}, "
                         f"got {crop_sizes}")
    for photo in photos:
        if photo.ndim != 3 or min(photo.shape[1:]) < max(crop_sizes):
            raise ValueError(f"photos must be (3, H, W) with H, W >= {max(crop_sizes)}, got "
                             f"{tuple(photo.shape)}")
    device = _random_device(generator)
    photo_index = torch.randint(0, len(photos), (n,), generator=generator, device=device)
    sides = torch.tensor(crop_sizes, device=device)[
        torch.randint(0, len(crop_sizes), (n,), generator=generator, device=device)]
    # floor(u * q) with u ~ U[0, 1) is uniform on {0, ..., q - 1}; q = H - s + 1 rows fit.
    heights = torch.tensor([photo.shape[1] for photo in photos], device=device)[photo_index]
    widths = torch.tensor([photo.shape[2] for photo in photos], device=device)[photo_index]
    u = torch.rand((2, n), generator=generator, device=device)
    tops = (u[0] * (heights - sides + 1)).floor().long().clamp(max=heights - sides)
    lefts = (u[1] * (widths - sides + 1)).floor().long().clamp(max=widths - sides)
    windows = torch.stack((photo_index, tops, lefts, sides), dim=1).cpu()

    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    for side in crop_sizes:
        rows = (windows[:, 3] == side).nonzero().flatten().tolist()
        if not rows:
            continue
        cut = torch.stack([photos[photo][:, top:top + side, left:left + side]
                           for photo, top, left, _ in windows[rows].tolist()])
        # Block sums (at most 4 x 4 values <= 255) are exact in float32.
        shrunk = F.avg_pool2d(cut.to(torch.float32), side // image_size)
        images[rows] = shrunk.round().clamp(0, 255).to(torch.uint8)
    return images, windows


def sklearn_photos(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` crops of scikit-learn's sample photographs, ``uint8 (n, 3, 32, 32)``.

    :func:`photo_crops` of :func:`sklearn_sample_photos` with the windows of
    :data:`PHOTO_CROP_SIZES` (32 to 128 pixels, shrunk 1x to 4x).
    """
    return photo_crops(sklearn_sample_photos(), n, generator)[0]


def uniform_noise(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` images of i.i.d. uniform pixels 0..255, ``uint8 (n, 3, 32, 32)``."""
    return torch.randint(0, 256, (n, 3, 32, 32), generator=generator,
                         device=_random_device(generator), dtype=torch.uint8).cpu()


def gaussian_noise_images(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` images of i.i.d. :math:`N(0.5, 0.25^2)` pixels clipped to [0, 1], as ``uint8``."""
    z = torch.randn((n, 3, 32, 32), generator=generator, device=_random_device(generator))
    return ((0.5 + 0.25 * z).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def blobs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Outlier Exposure's "blobs": smoothed Bernoulli(0.7) noise, thresholded at 0.75.

    Each value of an ``(n, 32, 32, 3)`` array is 1 with probability 0.7; a Gaussian filter
    with standard deviation 1.5 runs over height, width and the channel axis (borders
    ``nearest``); values below 0.75 become 0. Returns ``uint8 (n, 3, 32, 32)``.
    """
    device = _random_device(generator)
    x = (torch.rand((n, 32, 32, 3), generator=generator, device=device) < 0.7).to(torch.float32)
    x = gaussian_filter(x.cpu(), 1.5, dims=(1, 2, 3))
    x = torch.where(x < 0.75, torch.zeros_like(x), x)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------
# torchvision sets
# --------------------------------------------------------------------------------------


def _svhn(folder: Path, download: bool) -> torch.Tensor:
    from torchvision.datasets import SVHN

    return torch.from_numpy(SVHN(str(folder), split="test", download=download).data)


def _cifar100(folder: Path, download: bool) -> torch.Tensor:
    from torchvision.datasets import CIFAR100

    data = CIFAR100(str(folder), train=False, download=download).data  # (N, 32, 32, 3)
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()


_TORCHVISION_SETS = {
    "svhn": (_svhn, "SVHN test split (street-view house numbers, torchvision)"),
    "cifar100": (_cifar100, "CIFAR-100 test split (torchvision)"),
}


def load_ood_sets(root: str | os.PathLike | None = None, allow_download: bool = True,
                  max_images: int | None = None,
                  generator: torch.Generator | None = None,
                  groups: dict[str, torch.Tensor] | None = None,
                  ) -> dict[str, tuple[torch.Tensor, str]]:
    """The out-of-distribution sets that can be had here, each with a description.

    Parameters
    ----------
    root:
        Folder of SVHN and CIFAR-100; default ``BNN_COURSE_DATA``, else
        ``~/.cache/bnn_course/data``. A folder given here or in ``BNN_COURSE_DATA`` must
        exist (``FileNotFoundError`` otherwise) and is never downloaded into.
    allow_download:
        Let torchvision download a missing SVHN or CIFAR-100 (about 64 MB and 161 MB) into
        the default folder.
        Without network the download fails, and the set is skipped with the reason.
    max_images:
        Keep at most this many images per set: a random subset (in the original order)
        drawn with ``generator``, or the first ``max_images`` when ``generator`` is ``None``.
        The synthetic sets have ``min(max_images, NUM_SYNTHETIC)`` images, and
        ``"sklearn-photos"`` has ``min(max_images, NUM_PHOTO_CROPS)`` crops.
    generator:
        Random numbers for the subsets, the crops and the synthetic sets; seed it for
        repeatable sets.
    groups:
        If a dict, it receives ``groups[name]``, ``int64 (n,)`` on the CPU, for every
        returned set: items with the same value are not independent and must be resampled
        together. For ``"sklearn-photos"`` the index of the photograph each crop comes from
        (:data:`PHOTO_FILES`: 0 = china.jpg, 1 = flower.jpg), so a bootstrap over that set
        has two independent units, not ``n``; for every other set ``arange(n)`` (each
        image its own group). Pass it to
        :func:`bnn_course.comparison.resample_weights`. The sets themselves are the same
        with or without it.

    Returns
    -------
    ``{name: (images, description)}`` with ``images`` ``uint8 (n, 3, 32, 32)`` on the CPU,
    names among :data:`OOD_SET_NAMES`, in that order. Which sets were used, and why any was
    skipped, is printed (and logged).
    """
    if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
        raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
    if groups is not None and not isinstance(groups, dict):
        raise ValueError(f"groups must be a dict to fill, or None, got {type(groups).__name__}")
    folder, explicit = resolve_data_root(root)
    # A folder the user named is read, never downloaded into: a mistyped path must not fill
    # up with 225 MB. Downloads go only into the default cache.
    download = allow_download and not explicit
    sets: dict[str, tuple[torch.Tensor, str]] = {}
    skipped: dict[str, str] = {}

    for name, (load, description) in _TORCHVISION_SETS.items():
        try:
            images = load(folder, download)
        except Exception as error:  # no network, not downloaded, corrupt file, no scipy ...
            why = f"{type(error).__name__}: {error}".strip()
            if download:
                skipped[name] = f"could not be loaded from, or downloaded to, {folder} ({why})"
            elif explicit:
                skipped[name] = (f"could not be loaded from {folder}, a folder given explicitly "
                                 f"and so never downloaded into ({why})")
            else:
                skipped[name] = (f"could not be loaded from {folder} and allow_download=False "
                                 f"({why})")
            continue
        images = _subset(images, max_images, generator)
        sets[name] = (images, f"{description}, {images.shape[0]} images from {folder}")

    digits = _subset(sklearn_digits(), max_images, generator)
    sets["sklearn-digits"] = (digits, f"scikit-learn handwritten digits (8x8, resized "
                                      f"bilinearly to 32x32 RGB), {digits.shape[0]} images")
    n = NUM_SYNTHETIC if max_images is None else min(max_images, NUM_SYNTHETIC)
    sets["uniform-noise"] = (uniform_noise(n, generator),
                             f"synthetic: i.i.d. uniform pixels, {n} images")
    sets["gaussian-noise"] = (gaussian_noise_images(n, generator),
                              f"synthetic: i.i.d. N(0.5, 0.25^2) pixels clipped, {n} images")
    sets["blobs"] = (blobs(n, generator),
                     f"synthetic: smoothed Bernoulli blobs (Outlier Exposure), {n} images")
    # Drawn after the synthetic sets, so that these stay what they were for a given seed.
    n_photos = NUM_PHOTO_CROPS if max_images is None else min(max_images, NUM_PHOTO_CROPS)
    crops, windows = photo_crops(sklearn_sample_photos(), n_photos, generator)
    photo_of_crop = windows[:, 0]
    per_photo = ", ".join(f"{int((photo_of_crop == i).sum())} from {file}"
                          for i, file in enumerate(PHOTO_FILES))
    sets["sklearn-photos"] = (
        crops,
        f"natural images: crops of scikit-learn's two sample photographs (china.jpg, a "
        f"pagoda, trees, lake and sky; flower.jpg, a dahlia before blurred foliage), "
        f"{'/'.join(map(str, PHOTO_CROP_SIZES))}-pixel windows at random positions, "
        f"area-averaged to 32x32, {n_photos} images ({per_photo}; crops of one photograph "
        f"are not independent)")

    sets = {name: sets[name] for name in OOD_SET_NAMES if name in sets}
    if groups is not None:
        for name, (images, _) in sets.items():
            groups[name] = (photo_of_crop.clone() if name == "sklearn-photos"
                            else torch.arange(images.shape[0]))
    used = ", ".join(f"{name} ({images.shape[0]})" for name, (images, _) in sets.items())
    _say(f"OOD sets used: {used}")
    for name, reason in skipped.items():
        _say(f"OOD set {name} skipped: {reason}")
    return sets
