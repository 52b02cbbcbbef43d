"""Out-of-distribution image sets (bnn_course.ood). No test touches the network: the
torchvision sets are either absent (allow_download=False, empty folder) or faked."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images

from bnn_course import data as data_module
from bnn_course import ood
from bnn_course.ood import (
    NUM_PHOTO_CROPS,
    OOD_SET_NAMES,
    PHOTO_CROP_SIZES,
    PHOTO_FILES,
    blobs,
    gaussian_noise_images,
    load_ood_sets,
    photo_crops,
    sklearn_digits,
    sklearn_photos,
    sklearn_sample_photos,
    uniform_noise,
)

OFFLINE = ("sklearn-digits", "sklearn-photos", "uniform-noise", "gaussian-noise", "blobs")


def test_offline_sets_without_network(tmp_path, capsys) -> None:
    sets = load_ood_sets(root=tmp_path, allow_download=False, max_images=50,
                         generator=torch.Generator().manual_seed(0))
    assert tuple(sets) == OFFLINE
    for name, (images, description) in sets.items():
        assert images.shape == (50, 3, 32, 32), name
        assert images.dtype == torch.uint8
        assert isinstance(description, str) and description
    printed = capsys.readouterr().out
    assert "OOD sets used: sklearn-digits (50)" in printed
    assert "svhn skipped" in printed and "cifar100 skipped" in printed
    assert "never downloaded into" in printed


def test_digits_are_the_sklearn_digits_upscaled() -> None:
    digits = sklearn_digits()
    assert digits.shape == (1797, 3, 32, 32) and digits.dtype == torch.uint8
    assert torch.equal(digits[:, 0], digits[:, 1]) and torch.equal(digits[:, 0], digits[:, 2])
    assert digits.min().item() == 0 and digits.max().item() == 255
    # Averaging 4x4 blocks undoes the bilinear upscaling up to blur: the 8x8 originals.
    original = torch.as_tensor(load_digits().images, dtype=torch.float32) * (255 / 16)
    pooled = F.avg_pool2d(digits[:, :1].float(), 4)[:, 0]
    correlation = torch.corrcoef(torch.stack((pooled.flatten(), original.flatten())))[0, 1]
    assert correlation > 0.95
    assert (pooled - original).abs().mean() < 20  # grey levels


def _find_block(photo: torch.Tensor, block: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where ``block`` (3, h, w) sits in ``photo`` (3, H, W), by search."""
    h, w = block.shape[1:]
    corner = (photo[:, :photo.shape[1] - h + 1, :photo.shape[2] - w + 1]
              == block[:, :1, :1]).all(dim=0)
    return [(top, left) for top, left in corner.nonzero().tolist()
            if torch.equal(photo[:, top:top + h, left:left + w], block)]


def test_photos_are_the_sklearn_sample_images() -> None:
    photos = sklearn_sample_photos()
    assert len(photos) == 2
    for photo in photos:
        assert photo.shape == (3, 427, 640) and photo.dtype == torch.uint8
        assert photo.float().std() > 20  # a photograph, not a blank
    assert not torch.equal(photos[0], photos[1])


def test_photo_crops_are_seeded_and_shaped() -> None:
    a = sklearn_photos(300, torch.Generator().manual_seed(6))
    b = sklearn_photos(300, torch.Generator().manual_seed(6))
    c = sklearn_photos(300, torch.Generator().manual_seed(7))
    assert a.shape == (300, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sklearn_photos(0).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="multiples"):
        photo_crops(sklearn_sample_photos(), 5, crop_sizes=(32, 48))


def test_photo_windows_are_drawn_uniformly_and_fit() -> None:
    n = 4000
    photos = sklearn_sample_photos()
    _, windows = photo_crops(photos, n, torch.Generator().manual_seed(8))
    photo, top, left, side = windows.T
    assert ((photo == 0) | (photo == 1)).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + side <= 427).all() and (left + side <= 640).all()
    # Each photo with probability 1/2, each side 1/4: within 4 standard errors.
    assert (photo == 0).double().mean().item() == pytest.approx(0.5, abs=4 * (0.25 / n)**0.5)
    for size in PHOTO_CROP_SIZES:
        share = (side == size).double().mean().item()
        assert share == pytest.approx(0.25, abs=4 * (0.25 * 0.75 / n)**0.5), size
    # Corners uniform over the positions that fit: top / (H - side) ~ U[0, 1], mean 1/2,
    # standard deviation 1/sqrt(12) (up to the discreteness of positions, < 1/300).
    for corner, extent in ((top, 427), (left, 640)):
        relative = corner.double() / (extent - side).double()
        assert relative.mean().item() == pytest.approx(0.5, abs=4 / (12 * n)**0.5)
        assert relative.min().item() < 0.01 and relative.max().item() > 0.99


def test_native_scale_crops_are_blocks_of_the_photos() -> None:
    photos = sklearn_sample_photos()
    images, windows = photo_crops(photos, 200, torch.Generator().manual_seed(9))
    # photo_crops is what the set "sklearn-photos" is made of.
    assert torch.equal(images, sklearn_photos(200, torch.Generator().manual_seed(9)))
    native = (windows[:, 3] == 32).nonzero().flatten().tolist()
    assert len(native) > 20
    for row in native[:20]:
        photo, top, left, _ = windows[row].tolist()
        assert torch.equal(images[row], photos[photo][:, top:top + 32, left:left + 32])
        # Found by search too, without the window: the crop is an unaltered 32x32 block.
        assert (top, left) in _find_block(photos[photo], images[row])


def test_larger_crops_are_area_averaged_views_of_their_window() -> None:
    photos = sklearn_sample_photos()
    images, windows = photo_crops(photos, 400, torch.Generator().manual_seed(10))
    checked = {size: 0 for size in PHOTO_CROP_SIZES[1:]}
    cropped_look_alikes = 0
    for image, (photo, top, left, side) in zip(images, windows.tolist(), strict=True):
        if side == 32:
            continue
        k = side // 32
        window = photos[photo][:, top:top + side, left:left + side]
        # Mean of each k x k block, in float64: exact sums, and x.5 ties only for k = 2, 4,
        # where float32 is exact too.
        averaged = window.double().reshape(3, 32, k, 32, k).mean(dim=(2, 4)).round()
        assert torch.equal(image, averaged.to(torch.uint8)), (photo, top, left, side)
        # Neither a crop of the window's corner nor every k-th pixel (no antialiasing).
        cropped_look_alikes += torch.equal(image, window[:, :32, :32])
        cropped_look_alikes += torch.equal(image, window[:, ::k, ::k])
        checked[side] += 1
    assert min(checked.values()) > 50
    # Only a window of one flat colour (saturated sky) would look the same.
    assert cropped_look_alikes <= 0.05 * sum(checked.values())


def test_photo_set_in_load_ood_sets(tmp_path) -> None:
    sets = load_ood_sets(root=tmp_path, allow_download=False, max_images=3 * NUM_PHOTO_CROPS,
                         generator=torch.Generator().manual_seed(11))
    images, description = sets["sklearn-photos"]
    assert images.shape == (NUM_PHOTO_CROPS, 3, 32, 32) and images.dtype == torch.uint8
    assert "china.jpg" in description and "flower.jpg" in description
    assert f"{NUM_PHOTO_CROPS} images" in description
    small = load_ood_sets(root=tmp_path, allow_download=False, max_images=7)
    assert small["sklearn-photos"][0].shape == (7, 3, 32, 32)
    assert list(sets).index("sklearn-photos") == list(sets).index("sklearn-digits") + 1


def test_photo_files_name_the_photographs_in_order() -> None:
    names = [path.replace("\\", "/").rsplit("/", 1)[-1]
             for path in load_sample_images().filenames]
    assert tuple(names) == PHOTO_FILES
    photos = sklearn_sample_photos()
    for photo, image in zip(photos, load_sample_images().images, strict=True):
        assert torch.equal(photo, torch.tensor(image).permute(2, 0, 1))


def test_groups_say_which_photograph_each_crop_comes_from(tmp_path, monkeypatch) -> None:
    recorded = []
    original = ood.photo_crops

    def recording_photo_crops(*args, **kwargs):
        images, windows = original(*args, **kwargs)
        recorded.append((images, windows))
        return images, windows

    monkeypatch.setattr(ood, "photo_crops", recording_photo_crops)
    groups: dict[str, torch.Tensor] = {}
    sets = load_ood_sets(root=tmp_path, allow_download=False, max_images=60,
                         generator=torch.Generator().manual_seed(12), groups=groups)
    assert list(groups) == list(sets)
    (crops, windows), = recorded
    assert torch.equal(sets["sklearn-photos"][0], crops)
    photo_of = groups["sklearn-photos"]
    assert photo_of.dtype == torch.int64 and torch.equal(photo_of, windows[:, 0])
    assert set(photo_of.tolist()) == {0, 1}  # 60 crops: both photographs
    for index, file in enumerate(PHOTO_FILES):
        assert f"{int((photo_of == index).sum())} from {file}" in sets["sklearn-photos"][1]
    for name in OFFLINE:
        if name != "sklearn-photos":  # independent images: each its own group
            assert torch.equal(groups[name], torch.arange(60)), name
    # asking for the groups changes no set (old callers get the same images)
    plain = load_ood_sets(root=tmp_path, allow_download=False, max_images=60,
                          generator=torch.Generator().manual_seed(12))
    for name, (images, description) in plain.items():
        assert torch.equal(images, sets[name][0]) and description == sets[name][1], name
    with pytest.raises(ValueError, match="groups"):
        load_ood_sets(root=tmp_path, allow_download=False, max_images=2, groups=[])


def test_synthetic_sets_are_seeded_and_have_the_right_statistics() -> None:
    n = 500
    for make in (uniform_noise, gaussian_noise_images, blobs):
        a = make(n, torch.Generator().manual_seed(1))
        b = make(n, torch.Generator().manual_seed(1))
        c = make(n, torch.Generator().manual_seed(2))
        assert a.shape == (n, 3, 32, 32) and a.dtype == torch.uint8
        assert torch.equal(a, b) and not torch.equal(a, c)
    count = n * 3 * 32 * 32
    uniform = uniform_noise(n, torch.Generator().manual_seed(3)).double()
    assert uniform.mean().item() == pytest.approx(127.5, abs=5 * 73.9 / count**0.5)
    gaussian = gaussian_noise_images(n, torch.Generator().manual_seed(3)).double()
    assert gaussian.mean().item() == pytest.approx(127.5, abs=0.5)
    # std of N(0.5, 0.25^2) clipped to [0, 1] (clipping at 2 sigma trims ~2.5%): 0.2375
    assert gaussian.std().item() / 255 == pytest.approx(0.2375, abs=0.005)
    blob = blobs(n, torch.Generator().manual_seed(3))
    nonzero = blob[blob > 0]
    assert nonzero.min().item() >= int(0.75 * 255)  # values below 0.75 were set to 0
    assert 0.05 < nonzero.numel() / blob.numel() < 0.5


def test_subsets_follow_the_generator(tmp_path) -> None:
    first = load_ood_sets(root=tmp_path, allow_download=False, max_images=100)
    digits = sklearn_digits()
    assert torch.equal(first["sklearn-digits"][0], digits[:100])
    seeded = [load_ood_sets(root=tmp_path, allow_download=False, max_images=100,
                            generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    for name in OFFLINE:
        assert torch.equal(seeded[0][name][0], seeded[1][name][0])
    assert not torch.equal(seeded[0]["sklearn-digits"][0], digits[:100])
    assert first["uniform-noise"][0].shape[0] == 100


def test_torchvision_sets_are_used_when_available_and_skipped_when_not(
        tmp_path, monkeypatch, capsys) -> None:
    fake_svhn = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(5))

    default_folder = tmp_path / "cache" / "data"
    monkeypatch.delenv("BNN_COURSE_DATA", raising=False)
    monkeypatch.setattr(data_module, "user_cache_dir", lambda: tmp_path / "cache")

    def svhn(folder, download):
        assert folder == default_folder and download is True
        return fake_svhn

    def cifar100(folder, download):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ood, "_TORCHVISION_SETS", {
        "svhn": (svhn, "SVHN test split"), "cifar100": (cifar100, "CIFAR-100 test split")})
    sets = load_ood_sets(max_images=20)
    assert tuple(sets) == ("svhn", *OFFLINE)
    assert tuple(sets) == tuple(name for name in OOD_SET_NAMES if name in sets)
    assert torch.equal(sets["svhn"][0], fake_svhn[:20])
    assert sets["svhn"][1].startswith("SVHN test split")
    printed = capsys.readouterr().out
    assert "cifar100 skipped" in printed and "no network" in printed


def test_default_root_comes_from_the_environment(tmp_path, monkeypatch) -> None:
    seen = []
    monkeypatch.setenv("BNN_COURSE_DATA", str(tmp_path))
    monkeypatch.setattr(ood, "_TORCHVISION_SETS", {
        "svhn": (lambda folder, download: seen.append(folder) or torch.zeros(
            2, 3, 32, 32, dtype=torch.uint8), "fake")})
    load_ood_sets(allow_download=False, max_images=2)
    assert seen == [tmp_path]


def test_bad_max_images_raises(tmp_path) -> None:
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="max_images"):
            load_ood_sets(root=tmp_path, allow_download=False, max_images=bad)


def test_an_explicit_folder_is_read_but_never_downloaded_into(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(ood, "_TORCHVISION_SETS", {
        "svhn": (lambda folder, download: calls.append((folder, download)) or torch.zeros(
            2, 3, 32, 32, dtype=torch.uint8), "fake")})
    load_ood_sets(root=tmp_path, allow_download=True, max_images=2)
    monkeypatch.setenv("BNN_COURSE_DATA", str(tmp_path))
    load_ood_sets(allow_download=True, max_images=2)
    assert calls == [(tmp_path, False), (tmp_path, False)]


def test_a_missing_explicit_folder_is_an_error_and_nothing_is_created(tmp_path,
                                                                     monkeypatch) -> None:
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="typo"):
        load_ood_sets(root=missing, max_images=2)
    monkeypatch.setenv("BNN_COURSE_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="BNN_COURSE_DATA"):
        load_ood_sets(max_images=2)
    assert not missing.exists()
