"""CIFAR-10 loading (offline formats, cache, stand-in) and the batched transforms."""

from __future__ import annotations

import math
import pickle
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnn_course import config, data
from bnn_course.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSES,
    augment,
    crop_and_flip,
    iterate_batches,
    load_cifar10,
    normalize,
    stratified_subset,
    synthetic_cifar10,
)

# --------------------------------------------------------------------------------------
# Tiny data sets in both offline formats
# --------------------------------------------------------------------------------------


def write_image_tree(tree: Path, per_class: int = 3, jpeg_every: int | None = 3,
                     classes: tuple[str, ...] = CLASSES) -> dict[str, list[np.ndarray]]:
    """``tree/{train,test}/<class>/NNNN.png|jpg``; returns the PNG pixels per split, in order.

    Every ``jpeg_every``-th image (counting from the first) is a JPEG; ``None``: only PNGs.
    JPEG entries of the returned lists are ``None`` (their pixels change on encoding).
    """
    rng = np.random.default_rng(0)
    written: dict[str, list] = {}
    for split in ("train", "test"):
        written[split] = []
        for name in classes:
            folder = tree / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                if jpeg_every is not None and i % jpeg_every == 0:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
                    written[split].append(None)
                else:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.png")
                    written[split].append(pixels)
    return written


def write_pickle_folder(folder: Path, per_batch: int = 20,
                        label_names: tuple[str, ...] = CLASSES) -> dict[str, np.ndarray]:
    """A tiny ``cifar-10-batches-py`` in the real format: dicts with ``data`` (N, 3072)
    uint8 rows (R plane, G plane, B plane) and ``labels`` lists; ``batches.meta``."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    arrays = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        split = "test" if name == "test_batch" else "train"
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch_labels = [i % 10 for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": batch_labels,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f)
        arrays[split].append(rows)
        labels[split].extend(batch_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(label_names), "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f)
    return {"train": np.concatenate(arrays["train"]), "test": np.concatenate(arrays["test"]),
            "train_labels": np.array(labels["train"]), "test_labels": np.array(labels["test"])}


@pytest.fixture(autouse=True)
def no_download_and_private_home(monkeypatch, tmp_path):
    """No test reaches the network or the real ``~/.cache``."""

    def refuse(root):
        raise AssertionError(f"a test tried to download into {root}")

    monkeypatch.setattr(data, "_download", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(config.DATA_ENV, raising=False)


def test_image_tree_loads_png_and_jpeg_and_is_cached(tmp_path, monkeypatch, capsys) -> None:
    tree = tmp_path / "cifar10-jpeg"
    written = write_image_tree(tree)
    first = load_cifar10(tree, smoke=False, allow_download=False)
    assert first.train_images.shape == (30, 3, 32, 32) == first.test_images.shape
    assert first.train_images.dtype == torch.uint8 and first.train_labels.dtype == torch.int64
    assert first.train_labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert first.classes == CLASSES and not first.is_synthetic
    assert first.is_jpeg and first.name == "JPEG copy of CIFAR-10"
    assert "JPEG copy of CIFAR-10" in first.source and str(tree) in first.source
    for split, images in (("train", first.train_images), ("test", first.test_images)):
        for i, pixels in enumerate(written[split]):
            if pixels is not None:  # PNG: lossless, channels first
                assert torch.equal(images[i], torch.from_numpy(pixels).permute(2, 0, 1))
    for split in ("train", "test"):
        assert (tree / f".bnn_course_cache_{split}.pt").is_file()
    assert not list(tree.glob("*.tmp"))  # the atomic write left no temporary file

    def no_decoding(paths):
        raise AssertionError("the second load decoded images instead of reading the cache")

    monkeypatch.setattr(data, "_decode", no_decoding)
    capsys.readouterr()
    start = time.perf_counter()
    second = load_cifar10(tree, smoke=False, allow_download=False)
    assert time.perf_counter() - start < 1.0
    assert "from the cache" in capsys.readouterr().out
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.is_jpeg and second.source == first.source


def test_png_tree_is_not_called_jpeg(tmp_path) -> None:
    write_image_tree(tmp_path / "tree", per_class=2, jpeg_every=None)
    loaded = load_cifar10(tmp_path / "tree", smoke=False, allow_download=False)
    assert not loaded.is_jpeg and loaded.name == "CIFAR-10"
    assert "JPEG" not in loaded.source


def test_cache_is_rebuilt_when_the_tree_changes(tmp_path) -> None:
    write_image_tree(tmp_path / "tree", per_class=2)
    assert load_cifar10(tmp_path / "tree", smoke=False).train_images.shape[0] == 20
    extra = np.zeros((32, 32, 3), dtype=np.uint8)
    Image.fromarray(extra).save(tmp_path / "tree" / "train" / "cat" / "9999.png")
    again = load_cifar10(tmp_path / "tree", smoke=False)
    assert again.train_images.shape[0] == 21
    assert torch.bincount(again.train_labels).tolist() == [2, 2, 2, 3, 2, 2, 2, 2, 2, 2]


def test_read_only_tree_caches_under_home(tmp_path, monkeypatch, capsys) -> None:
    tree = tmp_path / "readonly-tree"
    write_image_tree(tree, per_class=2)
    save = data._save_atomically

    def read_only_beside_the_tree(obj, path):
        if path.parent == tree:
            raise PermissionError(13, "Permission denied")
        save(obj, path)

    # (chmod does not stop root, who runs these tests in containers; refuse the write instead.)
    monkeypatch.setattr(data, "_save_atomically", read_only_beside_the_tree)
    first = load_cifar10(tree, smoke=False)
    out = capsys.readouterr().out
    assert "not writable" in out and str(tmp_path / "home" / ".cache" / "bnn_course") in out
    assert not list(tree.glob(".bnn_course_cache_*"))
    cached = list((tmp_path / "home" / ".cache" / "bnn_course").rglob(".bnn_course_cache_*"))
    assert len(cached) == 2
    monkeypatch.setattr(data, "_decode", lambda paths: pytest.fail("decoded again"))
    second = load_cifar10(tree, smoke=False)
    assert torch.equal(first.train_images, second.train_images)


@pytest.mark.parametrize("bad, message", [
    (("airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
     r"missing: \['automobile'\], unexpected: \['car'\]"),
    (CLASSES[:9], r"missing: \['truck'\], unexpected: \[\]"),
])
def test_wrong_class_folders_are_a_clear_error(tmp_path, bad, message) -> None:
    write_image_tree(tmp_path / "tree", per_class=1, classes=bad)
    with pytest.raises(ValueError, match=message):
        load_cifar10(tmp_path / "tree", smoke=False, allow_download=False)


def test_pickled_batches_one_level_down(tmp_path) -> None:
    expected = write_pickle_folder(tmp_path / "cifar-10-batches-py")
    loaded = load_cifar10(tmp_path, smoke=False, allow_download=False)
    assert loaded.train_images.shape == (100, 3, 32, 32)
    assert loaded.test_images.shape == (20, 3, 32, 32)
    assert loaded.train_images.dtype == torch.uint8 and loaded.test_labels.dtype == torch.int64
    assert torch.equal(loaded.train_images.flatten(1), torch.from_numpy(expected["train"]))
    assert torch.equal(loaded.test_images.flatten(1), torch.from_numpy(expected["test"]))
    # Row layout: the first 1024 bytes are the red plane, row by row.
    assert torch.equal(loaded.train_images[0, 0, 1],
                       torch.from_numpy(expected["train"][0, 32:64]))
    assert loaded.train_labels.tolist() == expected["train_labels"].tolist()
    assert not loaded.is_jpeg and not loaded.is_synthetic and loaded.name == "CIFAR-10"
    assert "pickled batches" in loaded.source


def test_pickled_batches_with_other_class_names_are_refused(tmp_path) -> None:
    write_pickle_folder(tmp_path / "cifar-10-batches-py", per_batch=10,
                        label_names=tuple(f"c{i}" for i in range(10)))
    with pytest.raises(ValueError, match="expected CIFAR-10's"):
        load_cifar10(tmp_path, smoke=False, allow_download=False)


def test_environment_variable_names_the_root(tmp_path, monkeypatch) -> None:
    write_image_tree(tmp_path / "somewhere" / "cifar10", per_class=1, jpeg_every=None)
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path / "somewhere"))
    assert load_cifar10(smoke=False, allow_download=False).train_images.shape[0] == 10


def test_smoke_mode_takes_a_stratified_subset(tmp_path) -> None:
    write_pickle_folder(tmp_path / "cifar-10-batches-py")  # 10 train, 2 test per class
    small = load_cifar10(tmp_path, smoke=True, train_per_class=4, test_per_class=1)
    assert torch.bincount(small.train_labels).tolist() == [4] * 10
    assert torch.bincount(small.test_labels).tolist() == [1] * 10
    assert "first 4 train and 1 test images per class" in small.source
    capped = load_cifar10(tmp_path, smoke=True)  # defaults are capped at what there is
    assert capped.train_images.shape[0] == 100 and capped.test_images.shape[0] == 20
    with pytest.raises(ValueError, match="needs 11 per class"):
        load_cifar10(tmp_path, smoke=True, train_per_class=11)


def test_smoke_subset_of_an_uncached_tree_decodes_only_the_subset(tmp_path) -> None:
    tree = tmp_path / "tree"
    write_image_tree(tree, per_class=3, jpeg_every=None)
    full = load_cifar10(tree, smoke=False)  # decodes everything and writes the cache
    for cache in tree.glob(".bnn_course_cache_*"):
        cache.unlink()
    small = load_cifar10(tree, smoke=True, train_per_class=2, test_per_class=1)
    assert not list(tree.glob(".bnn_course_cache_*"))  # a subset is never cached
    expected = stratified_subset(full.train_images, full.train_labels, 20)
    assert torch.equal(small.train_images, expected[0])
    assert torch.equal(small.train_labels, expected[1])


def test_synthetic_stand_in_only_in_smoke_mode(tmp_path, capsys) -> None:
    with pytest.warns(UserWarning, match="SYNTHETIC STAND-IN, NOT CIFAR-10"):
        fake = load_cifar10(tmp_path, smoke=True, allow_download=False,
                            train_per_class=8, test_per_class=4)
    assert "SYNTHETIC STAND-IN, NOT CIFAR-10" in capsys.readouterr().out
    assert fake.is_synthetic and "not CIFAR-10" in fake.source and "not CIFAR-10" in fake.name
    assert fake.train_images.shape == (80, 3, 32, 32) and fake.test_images.shape == (40, 3, 32, 32)
    assert fake.train_images.dtype == torch.uint8 and fake.train_labels.dtype == torch.int64
    assert torch.bincount(fake.train_labels).tolist() == [8] * 10
    assert not set(fake.classes) & set(CLASSES)  # no CIFAR-10 names on fake images

    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(tmp_path, smoke=False, allow_download=False)
    message = str(error.value)
    for hint in (config.DATA_ENV, "cifar-10-batches-py", "train/<class>", "allow_download",
                 str(tmp_path)):
        assert hint in message


def test_smoke_none_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(config.SMOKE_ENV, "0")
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path, allow_download=False)
    monkeypatch.setenv(config.SMOKE_ENV, "1")
    with pytest.warns(UserWarning):
        assert load_cifar10(tmp_path, allow_download=False, train_per_class=1,
                            test_per_class=1).is_synthetic


def test_failed_download_falls_back_only_in_smoke_mode(tmp_path, monkeypatch) -> None:
    calls = []

    def offline(root):
        calls.append(root)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(FileNotFoundError, match="download failed with URLError"):
        load_cifar10(tmp_path / "dl", smoke=False)
    with pytest.warns(UserWarning):
        assert load_cifar10(tmp_path / "dl", smoke=True, train_per_class=1,
                            test_per_class=1).is_synthetic
    assert calls == [tmp_path / "dl"] * 2


def test_successful_download_is_read_from_the_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "_download",
                        lambda root: write_pickle_folder(root / "cifar-10-batches-py"))
    loaded = load_cifar10(tmp_path / "dl", smoke=False)
    assert loaded.train_images.shape[0] == 100 and "pickled batches" in loaded.source
    # The folder itself may also be named as the root.
    direct = load_cifar10(tmp_path / "dl" / "cifar-10-batches-py", smoke=False)
    assert torch.equal(direct.train_images, loaded.train_images)


def test_default_root_is_the_user_cache(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(data, "_download", calls.append)  # "downloads" nothing
    with pytest.raises(FileNotFoundError):
        load_cifar10(smoke=False)
    assert calls == [tmp_path / "home" / ".cache" / "bnn_course" / "data"]


def test_to_moves_every_tensor() -> None:
    small = synthetic_cifar10(2, 1)
    moved = small.to("meta")
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert getattr(moved, field).device.type == "meta"
        assert getattr(moved, field).dtype == getattr(small, field).dtype
    assert small.device.type == "cpu" and moved.source == small.source


# --------------------------------------------------------------------------------------
# Subsets and transforms
# --------------------------------------------------------------------------------------


def test_stratified_subset_takes_the_first_of_each_class() -> None:
    labels = torch.tensor([3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 3] + list(range(10)))
    images = torch.arange(labels.numel())
    sub_images, sub_labels = stratified_subset(images, labels, 20)
    assert torch.bincount(sub_labels).tolist() == [2] * 10
    assert sub_images.tolist() == sorted(sub_images.tolist())  # original order kept
    assert 12 not in sub_images.tolist()  # the third 3 is left out
    assert torch.equal(labels[sub_images], sub_labels)
    with pytest.raises(ValueError, match="multiple"):
        stratified_subset(images, labels, 15)
    with pytest.raises(ValueError, match="needs 3 per class"):
        stratified_subset(images, labels, 30)


def test_normalize_matches_the_formula() -> None:
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    for c in range(3):
        expected = (images[:, c].double() / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert torch.allclose(out[:, c].double(), expected, atol=1e-5)
    assert torch.allclose(normalize(images.float() / 255), out, atol=1e-6)
    with pytest.raises(TypeError):
        normalize(images.long())


def _image_batch(n: int = 6) -> torch.Tensor:
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


def test_centre_crop_without_flip_is_the_identity() -> None:
    images = _image_batch()
    four = torch.full((6,), 4)
    assert torch.equal(crop_and_flip(images, four, four, torch.zeros(6, dtype=torch.bool)),
                       images)


def test_crop_and_flip_matches_a_loop_over_images() -> None:
    images = _image_batch()
    g = torch.Generator().manual_seed(2)
    oy, ox = torch.randint(0, 9, (2, 6), generator=g)
    flip = torch.tensor([True, False, True, False, False, True])
    out = crop_and_flip(images, oy, ox, flip)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(6):
        crop = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    # Offsets (0, 0) shift the image 4 pixels down and right, with a black border.
    zero = torch.zeros(6, dtype=torch.long)
    shifted = crop_and_flip(images, zero, zero, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(shifted[:, :, 4:, 4:], images[:, :, :28, :28])
    assert (shifted[:, :, :4] == 0).all() and (shifted[:, :, :, :4] == 0).all()


def test_forced_flip_is_the_mirror_image() -> None:
    images = _image_batch()
    assert torch.equal(augment(images, padding=0, flip_prob=1.0), images.flip(-1))
    assert torch.equal(augment(images, padding=0, flip_prob=0.0), images)


def test_flip_probability_is_one_half() -> None:
    n = 4000
    images = torch.arange(8.0).expand(n, 1, 1, 8)  # every row reads 0..7
    out = augment(images, torch.Generator().manual_seed(3), padding=0)
    mirrored = (out[:, 0, 0, 0] == 7)
    assert ((out == images) | (out == images.flip(-1))).all()
    # Binomial(4000, 1/2): standard deviation of the fraction is 0.0079; allow 4 of them.
    assert abs(mirrored.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


def test_crops_stay_inside_the_padded_image() -> None:
    constant = torch.full((500, 3, 32, 32), 200, dtype=torch.uint8)
    out = augment(constant, torch.Generator().manual_seed(4))
    assert set(out.unique().tolist()) <= {0, 200}
    # The visible part of each crop is one rectangle of at least 28x28 pixels.
    assert ((out[:, 0] == 200).sum((1, 2)) >= 28 * 28).all()


def test_every_offset_in_zero_to_eight_occurs() -> None:
    n = 2000
    positions = torch.arange(1.0, 32 * 32 + 1).view(1, 1, 32, 32).expand(n, 1, 32, 32)
    out = augment(positions, torch.Generator().manual_seed(5), flip_prob=0.0)
    centre = out[:, 0, 16, 16].long() - 1  # = (16 + dy) * 32 + (16 + dx), dy, dx in -4..4
    dy, dx = centre // 32 - 16, centre % 32 - 16
    assert dy.min() == -4 and dy.max() == 4 and dx.min() == -4 and dx.max() == 4
    # 81 equally likely offsets, about 25 draws each: missing one has probability < 1e-9.
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == 81


def test_augment_repeats_with_a_seeded_generator() -> None:
    images = _image_batch()
    first = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(6)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(7)))


def test_iterate_batches_keeps_images_and_labels_together() -> None:
    n = 50
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32)
    labels = torch.arange(n)
    g = torch.Generator().manual_seed(8)
    seen = []
    for x, y in iterate_batches(images, labels, 16, shuffle=True, generator=g, augment=True):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        # The centre pixel is never padding; undo the normalisation to read the image id.
        value = x[:, 0, 16, 16] * CIFAR10_STD[0] + CIFAR10_MEAN[0]
        assert torch.allclose(value * 255, y.float(), atol=1e-3)
        seen.extend(y.tolist())
    assert sorted(seen) == list(range(n)) and seen != list(range(n))
    plain = list(iterate_batches(images, labels, 16))
    assert [len(y) for _, y in plain] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([x for x, _ in plain]), normalize(images))
    assert len(list(iterate_batches(images, labels, 16, drop_last=True))) == 3


def test_transforms_stay_on_the_device_of_the_images() -> None:
    # "meta" tensors carry no data; any tensor made on the CPU by mistake would clash.
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8, device="meta")
    labels = torch.zeros(4, dtype=torch.int64, device="meta")
    assert augment(images).device.type == "meta"
    for x, y in iterate_batches(images, labels, 3, shuffle=True, augment=True):
        assert x.device.type == "meta" == y.device.type and x.dtype == torch.float32


def test_synthetic_stand_in_is_learnable() -> None:
    fake = synthetic_cifar10(train_per_class=50, test_per_class=50)
    assert torch.equal(fake.train_images, synthetic_cifar10(50, 50).train_images)
    train = fake.train_images.float().flatten(1)
    test = fake.test_images.float().flatten(1)
    means = torch.stack([train[fake.train_labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(test, means).argmin(1) == fake.test_labels).float().mean().item()
    # Chance is 0.1 with a standard deviation of 0.013 over 500 test images; the
    # nearest-class-mean classifier gets about 0.5 (a small CNN gets above 0.9).
    assert accuracy > 0.3
