"""Out-of-distribution image sets (bnn_course.ood). No test touches the network: the
torchvision sets are either absent (allow_download=False, empty folder) or faked."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bnn_course import data as data_module
from bnn_course import ood
from bnn_course.ood import (
    OOD_SET_NAMES,
    blobs,
    gaussian_noise_images,
    load_ood_sets,
    sklearn_digits,
    uniform_noise,
)

OFFLINE = ("sklearn-digits", "uniform-noise", "gaussian-noise", "blobs")


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
