"""CIFAR-10 loading (offline formats, cache, stand-in) and the batched transforms."""

from __future__ import annotations

import math
import os
import pickle
import struct
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


def _py2_string(raw: bytes) -> bytes:
    """Python 2's ``str`` in pickle protocol 2: SHORT_BINSTRING or BINSTRING."""
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<i", len(raw)) + raw


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def python2_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the original files were (Python 2, protocol 2, numpy 1).

    Opcode by opcode: ``{"data": _reconstruct(ndarray, (0,), "b")`` with state ``(1, (N,
    3072), dtype("u1") with state (3, "|", None, None, None, -1, -1, 0), False, <bytes as a
    Python 2 str>)``, ``"labels": [...]}``; the module is ``numpy.core.multiarray``.
    """
    assert rows.dtype == np.uint8 and rows.ndim == 2 and rows.shape[1] == 3072
    return b"".join([
        b"\x80\x02}(", _py2_string(b"data"),
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n",
        _py2_int(0), b"\x85", _py2_string(b"b"), b"\x87R",
        b"(", _py2_int(1), _py2_int(rows.shape[0]), _py2_int(3072), b"\x86",
        b"cnumpy\ndtype\n", _py2_string(b"u1"), _py2_int(0), _py2_int(1), b"\x87R",
        b"(", _py2_int(3), _py2_string(b"|"), b"NNN", _py2_int(-1), _py2_int(-1),
        _py2_int(0), b"tb", b"\x89", _py2_string(rows.tobytes()), b"tb",
        _py2_string(b"labels"), b"](", *[_py2_int(y) for y in labels], b"eu."])


def write_pickle_folder(folder: Path, per_batch: int = 20,
                        label_names: tuple[str, ...] = CLASSES,
                        protocol: int | str = pickle.DEFAULT_PROTOCOL) -> dict[str, np.ndarray]:
    """A tiny ``cifar-10-batches-py`` in the real format: dicts with ``b"data"`` (N, 3072)
    uint8 rows (R plane, G plane, B plane) and ``b"labels"`` lists; ``batches.meta``.

    ``protocol``: a pickle protocol (keys ``bytes``, as Python 3 sees the original files
    with ``encoding="bytes"``), or ``"python2"`` for the original files' own encoding
    (:func:`python2_batch`).
    """
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    arrays = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        split = "test" if name == "test_batch" else "train"
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch_labels = [i % 10 for i in range(per_batch)]
        if protocol == "python2":
            (folder / name).write_bytes(python2_batch(rows, batch_labels))
        else:
            with open(folder / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"data": rows,
                             b"labels": batch_labels,
                             b"filenames": [f"{name}_{i}.png".encode()
                                            for i in range(per_batch)]}, f, protocol=protocol)
        arrays[split].append(rows)
        labels[split].extend(batch_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in label_names],
                     b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f,
                    protocol=2 if protocol == "python2" else protocol)
    return {"train": np.concatenate(arrays["train"]), "test": np.concatenate(arrays["test"]),
            "train_labels": np.array(labels["train"]), "test_labels": np.array(labels["test"])}


REAL_DATA = config.data_root()
"""``BNN_COURSE_DATA`` as set when the tests started (the fixture below unsets it)."""


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
    # Tiny and half PNG: described as found, never called "JPEG copy of CIFAR-10".
    assert first.is_jpeg
    assert first.name == ("PNG and JPEG image tree with CIFAR-10's classes "
                          "(30 train + 30 test images)")
    assert first.source == (f"PNG and JPEG image tree at {tree}, 30 train + 30 test images in "
                            "CIFAR-10's ten classes (not CIFAR-10's 50,000 + 10,000)")
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
    assert second.is_jpeg and second.source == first.source and second.name == first.name


def test_png_tree_is_not_called_jpeg(tmp_path) -> None:
    write_image_tree(tmp_path / "tree", per_class=2, jpeg_every=None)
    loaded = load_cifar10(tmp_path / "tree", smoke=False, allow_download=False)
    assert not loaded.is_jpeg
    assert loaded.name == "PNG image tree with CIFAR-10's classes (20 train + 20 test images)"
    assert "JPEG" not in loaded.source and str(tmp_path / "tree") in loaded.source


@pytest.mark.parametrize("jpeg_every, name", [
    (1, "JPEG copy of CIFAR-10"),
    (None, "PNG copy of CIFAR-10"),
    (2, "PNG and JPEG copy of CIFAR-10"),
])
def test_a_tree_of_cifar10s_size_is_called_a_copy(tmp_path, monkeypatch, jpeg_every,
                                                  name) -> None:
    # CIFAR-10's 5,000 + 1,000 images per class, scaled down to 3 + 3 for the test.
    monkeypatch.setitem(data.CIFAR10_PER_CLASS, "train", 3)
    monkeypatch.setitem(data.CIFAR10_PER_CLASS, "test", 3)
    write_image_tree(tmp_path / "tree", per_class=3, jpeg_every=jpeg_every)
    loaded = load_cifar10(tmp_path / "tree", smoke=True, train_per_class=2, test_per_class=1)
    assert loaded.name == name and loaded.is_jpeg == (jpeg_every is not None)
    kind = name.removesuffix(" copy of CIFAR-10")
    assert loaded.source == (f"{name}: {kind} image tree at {tmp_path / 'tree'}, 30 train + "
                             "30 test images; kept the first 2 train and 1 test images per "
                             "class")
    # One image more or less than CIFAR-10 has, and it is no longer called CIFAR-10.
    (tmp_path / "tree" / "test" / "dog" / "0001.png").unlink(missing_ok=True)
    (tmp_path / "tree" / "test" / "dog" / "0001.jpg").unlink(missing_ok=True)
    other = load_cifar10(tmp_path / "tree", smoke=True, train_per_class=2, test_per_class=1)
    assert "CIFAR-10" not in other.name.replace("CIFAR-10's classes", "")
    assert "30 train + 29 test images" in other.name


def test_pickled_batches_of_cifar10s_size_are_called_cifar10(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(data.CIFAR10_PER_CLASS, "train", 10)
    monkeypatch.setitem(data.CIFAR10_PER_CLASS, "test", 2)
    write_pickle_folder(tmp_path / "cifar-10-batches-py")  # 5 x 20 train, 20 test
    loaded = load_cifar10(tmp_path, smoke=False)
    assert loaded.name == "CIFAR-10" and not loaded.is_jpeg
    assert loaded.source == ("CIFAR-10: pickled batches at "
                             f"{tmp_path / 'cifar-10-batches-py'}, 100 train + 20 test images")


@pytest.mark.parametrize("mode", ["L", "LA", "1", "16-bit"])
def test_a_grayscale_image_is_an_error_naming_it(tmp_path, mode) -> None:
    write_image_tree(tmp_path / "tree", per_class=2, jpeg_every=None)
    gray = tmp_path / "tree" / "train" / "frog" / "0001.png"
    if mode == "16-bit":  # a 16-bit grayscale PNG (Pillow reads it as "I" or "I;16")
        Image.fromarray(np.full((32, 32), 40_000, dtype=np.uint16)).save(gray)
    else:
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).convert(mode).save(gray)
    mode = Image.open(gray).mode
    with pytest.raises(ValueError, match=rf"{gray} is grayscale \(Pillow mode '{mode}'\)"):
        load_cifar10(tmp_path / "tree", smoke=False)
    assert not list((tmp_path / "tree").glob(".bnn_course_cache_*"))


def test_palette_and_opaque_rgba_images_convert_losslessly(tmp_path) -> None:
    written = write_image_tree(tmp_path / "tree", per_class=2, jpeg_every=None)
    folder = tmp_path / "tree" / "train" / "airplane"
    palette = Image.open(folder / "0000.png").quantize(colors=256)
    palette.save(folder / "0000.png")
    expected_palette = np.array(palette.convert("RGB"))  # the palette's own colours
    Image.fromarray(written["train"][1]).convert("RGBA").save(folder / "0001.png")
    loaded = load_cifar10(tmp_path / "tree", smoke=False)
    assert Image.open(folder / "0000.png").mode == "P"
    assert torch.equal(loaded.train_images[0], torch.from_numpy(expected_palette).permute(2, 0, 1))
    assert torch.equal(loaded.train_images[1],
                       torch.from_numpy(written["train"][1]).permute(2, 0, 1))


def test_a_transparent_pixel_or_a_misnamed_file_is_an_error(tmp_path) -> None:
    write_image_tree(tmp_path / "tree", per_class=2, jpeg_every=None)
    image = tmp_path / "tree" / "test" / "ship" / "0000.png"
    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[3, 5, 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(image)
    with pytest.raises(ValueError, match=rf"{image} \(mode RGBA\) has 1 pixels that are not"):
        load_cifar10(tmp_path / "tree", smoke=False)
    Image.fromarray(rgba[..., :3]).save(image, format="JPEG")  # a JPEG named .png
    with pytest.raises(ValueError, match=rf"{image} holds a JPEG image, not PNG"):
        load_cifar10(tmp_path / "tree", smoke=False)


def test_cache_is_rebuilt_when_the_tree_changes(tmp_path) -> None:
    write_image_tree(tmp_path / "tree", per_class=2)
    assert load_cifar10(tmp_path / "tree", smoke=False).train_images.shape[0] == 20
    extra = np.zeros((32, 32, 3), dtype=np.uint8)
    Image.fromarray(extra).save(tmp_path / "tree" / "train" / "cat" / "9999.png")
    again = load_cifar10(tmp_path / "tree", smoke=False)
    assert again.train_images.shape[0] == 21
    assert torch.bincount(again.train_labels).tolist() == [2, 2, 2, 3, 2, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("same_size", [False, True])
def test_an_image_rewritten_in_place_is_decoded_again(tmp_path, monkeypatch,
                                                      same_size) -> None:
    # Regression: the cache was keyed by the file names only and served the old pixels.
    tree = tmp_path / "tree"
    write_image_tree(tree, per_class=2, jpeg_every=None)
    image = tree / "train" / "cat" / "0001.png"  # index 3 * 2 + 1 of the training set
    old_pixels = np.array(Image.open(image))
    # compress_level=0 stores the pixels uncompressed: every 32x32 RGB PNG has one size.
    level = 0 if same_size else 6
    Image.fromarray(old_pixels).save(image, compress_level=level)
    decoded: list[int] = []
    decode = data._decode

    def counting_decode(paths):
        decoded.append(len(paths))
        return decode(paths)

    monkeypatch.setattr(data, "_decode", counting_decode)
    first = load_cifar10(tree, smoke=False)
    assert decoded == [20, 20]
    assert torch.equal(first.train_images[7], torch.from_numpy(old_pixels).permute(2, 0, 1))

    before = os.stat(image)
    new_pixels = (255 - old_pixels) if same_size else np.zeros_like(old_pixels)
    Image.fromarray(new_pixels).save(image, compress_level=level)
    if same_size:  # only the modification time tells; make it differ on any file system
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    after = os.stat(image)
    assert (after.st_size == before.st_size) == same_size
    assert after.st_mtime_ns != before.st_mtime_ns or not same_size

    second = load_cifar10(tree, smoke=False)
    assert decoded == [20, 20, 20]  # the training split again, the test split from its cache
    assert torch.equal(second.train_images[7], torch.from_numpy(new_pixels).permute(2, 0, 1))
    unchanged = [i for i in range(20) if i != 7]
    assert torch.equal(second.train_images[unchanged], first.train_images[unchanged])
    assert torch.equal(second.test_images, first.test_images)

    third = load_cifar10(tree, smoke=False)  # untouched since: served from the cache
    assert decoded == [20, 20, 20]
    assert torch.equal(third.train_images, second.train_images)


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


@pytest.mark.parametrize("protocol", ["python2", 2, 5])
def test_pickled_batches_one_level_down(tmp_path, protocol) -> None:
    expected = write_pickle_folder(tmp_path / "cifar-10-batches-py", protocol=protocol)
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
    assert not loaded.is_jpeg and not loaded.is_synthetic
    assert loaded.name == "pickled batches with CIFAR-10's classes (100 train + 20 test images)"
    assert loaded.source.startswith(f"pickled batches at {tmp_path / 'cifar-10-batches-py'}, ")


class _RunsCode:
    """Pickles as a call of ``function(*args)``: what a crafted batch file would do."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "nested in the array"])
@pytest.mark.parametrize("victim", ["data_batch_3", "batches.meta"])
def test_a_crafted_batch_file_runs_no_code(tmp_path, attack, victim) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle_folder(folder, per_batch=10)
    marker = tmp_path / "pwned"
    if attack == "os.system":
        payload = _RunsCode(os.system, f"touch {marker}")
    elif attack == "builtins.exec":
        payload = _RunsCode(exec, f"open({str(marker)!r}, 'w').close()")
    else:  # an object array whose element is the crafted object
        payload = np.array([_RunsCode(os.system, f"touch {marker}")], dtype=object)
    rows = np.zeros((10, 3072), dtype=np.uint8)
    with open(folder / victim, "wb") as f:
        pickle.dump({b"data": rows, b"labels": list(range(10)), b"label_names": list(CLASSES),
                     b"extra": payload}, f, protocol=2)
    with pytest.raises(ValueError, match=rf"{folder / victim} is not a readable CIFAR-10 "
                                         r"batch: .*names the global .*refused"):
        load_cifar10(tmp_path, smoke=False)
    assert not marker.exists()
    # (The payload does run under plain pickle: the test would catch a permissive reader.)
    if attack != "os.system":
        with open(folder / victim, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_only_the_latin1_codec_may_be_called(tmp_path) -> None:
    import codecs

    folder = tmp_path / "cifar-10-batches-py"
    write_pickle_folder(folder, per_batch=10, protocol=2)  # bytes via _codecs.encode(latin1)
    assert load_cifar10(tmp_path, smoke=False).train_images.shape[0] == 50
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": [0] * 10,
                     b"extra": _RunsCode(codecs.encode, "x", "rot13")}, f, protocol=2)
    with pytest.raises(ValueError, match="never encodes with 'rot13'"):
        load_cifar10(tmp_path, smoke=False)


def test_a_batch_of_the_wrong_shape_or_type_is_refused(tmp_path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle_folder(folder, per_batch=10)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), dtype=np.int64), b"labels": [0] * 10}, f)
    with pytest.raises(ValueError, match="expected uint8 \\(N, 3072\\)"):
        load_cifar10(tmp_path, smoke=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": [0] * 9 + [10]}, f)
    with pytest.raises(ValueError, match="expected 10 labels in 0..9"):
        load_cifar10(tmp_path, smoke=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(ValueError, match="holds a list, not a CIFAR-10 batch"):
        load_cifar10(tmp_path, smoke=False)


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
    default = tmp_path / "home" / ".cache" / "bnn_course" / "data"
    with pytest.warns(UserWarning, match="SYNTHETIC STAND-IN, NOT CIFAR-10"):
        fake = load_cifar10(smoke=True, allow_download=False,
                            train_per_class=8, test_per_class=4)
    assert "SYNTHETIC STAND-IN, NOT CIFAR-10" in capsys.readouterr().out
    assert fake.is_synthetic and "not CIFAR-10" in fake.source and "not CIFAR-10" in fake.name
    assert fake.train_images.shape == (80, 3, 32, 32) and fake.test_images.shape == (40, 3, 32, 32)
    assert fake.train_images.dtype == torch.uint8 and fake.train_labels.dtype == torch.int64
    assert torch.bincount(fake.train_labels).tolist() == [8] * 10
    assert not set(fake.classes) & set(CLASSES)  # no CIFAR-10 names on fake images

    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(smoke=False, allow_download=False)
    message = str(error.value)
    assert "\n" not in message  # the command lines print it as one "error: ..." line
    for hint in (config.DATA_ENV, "cifar-10-batches-py", "train/<class>", "allow_download",
                 str(default)):
        assert hint in message


@pytest.mark.parametrize("smoke", [True, False])
@pytest.mark.parametrize("how", ["root", "environment"])
def test_a_missing_explicit_folder_is_an_error_and_nothing_is_created(
        tmp_path, monkeypatch, smoke, how) -> None:
    mistyped = tmp_path / "cifra10"  # the autouse fixture fails any download attempt
    if how == "root":
        call = lambda: load_cifar10(mistyped, smoke=smoke)  # noqa: E731
    else:
        monkeypatch.setenv(config.DATA_ENV, str(mistyped))
        call = lambda: load_cifar10(smoke=smoke)  # noqa: E731
    with pytest.raises(FileNotFoundError) as error:
        call()
    message = str(error.value)
    assert str(mistyped) in message and "does not exist" in message and "\n" not in message
    assert "Nothing was downloaded or created" in message
    assert (config.DATA_ENV if how == "environment" else "--data") in message
    assert not mistyped.exists() and not (tmp_path / "home").exists()
    mistyped.write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        call()


@pytest.mark.parametrize("smoke", [True, False])
def test_an_explicit_folder_without_cifar10_is_an_error_without_download(
        tmp_path, smoke) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(empty, smoke=smoke)  # allow_download=True: still no download here
    message = str(error.value)
    assert f"CIFAR-10 was not found in {empty}, the folder given explicitly" in message
    assert "nothing is downloaded into a folder given explicitly" in message
    assert list(empty.iterdir()) == [] and "\n" not in message


def test_resolve_data_root(tmp_path, monkeypatch) -> None:
    default = tmp_path / "home" / ".cache" / "bnn_course" / "data"
    assert data.resolve_data_root() == (default, False)
    assert data.resolve_data_root("") == (default, False)
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path))
    assert data.resolve_data_root() == (tmp_path, True)
    (tmp_path / "flag").mkdir()
    assert data.resolve_data_root(tmp_path / "flag") == (tmp_path / "flag", True)  # wins
    assert not default.exists()


def test_smoke_none_follows_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(config.SMOKE_ENV, "0")
    with pytest.raises(FileNotFoundError):
        load_cifar10(allow_download=False)
    monkeypatch.setenv(config.SMOKE_ENV, "1")
    with pytest.warns(UserWarning):
        assert load_cifar10(allow_download=False, train_per_class=1,
                            test_per_class=1).is_synthetic


def test_failed_download_falls_back_only_in_smoke_mode(tmp_path, monkeypatch) -> None:
    calls = []

    def offline(root):
        calls.append(root)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(FileNotFoundError, match="download failed with URLError"):
        load_cifar10(smoke=False)
    with pytest.warns(UserWarning):
        assert load_cifar10(smoke=True, train_per_class=1, test_per_class=1).is_synthetic
    assert calls == [tmp_path / "home" / ".cache" / "bnn_course" / "data"] * 2


def test_download_goes_only_into_the_default_folder_and_says_so(tmp_path, monkeypatch,
                                                                  capsys) -> None:
    default = tmp_path / "home" / ".cache" / "bnn_course" / "data"
    monkeypatch.setattr(data, "_download",
                        lambda root: write_pickle_folder(root / "cifar-10-batches-py"))
    loaded = load_cifar10(smoke=False, verbose=False)
    printed = capsys.readouterr().out
    assert printed == (f"No copy of CIFAR-10 in the default folder {default}; downloading it "
                       "there with torchvision (170 MB)\n")  # printed even when not verbose
    assert loaded.train_images.shape[0] == 100
    assert loaded.source.startswith(f"pickled batches at {default / 'cifar-10-batches-py'}")
    # The folder itself may also be named as the root; found there, nothing is downloaded.
    monkeypatch.setattr(data, "_download", lambda root: pytest.fail("downloaded again"))
    direct = load_cifar10(default / "cifar-10-batches-py", smoke=False)
    assert torch.equal(direct.train_images, loaded.train_images)
    assert torch.equal(load_cifar10(smoke=False).train_images, loaded.train_images)


def test_default_root_is_the_user_cache(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(data, "_download", calls.append)  # "downloads" nothing
    with pytest.raises(FileNotFoundError):
        load_cifar10(smoke=False)
    assert calls == [tmp_path / "home" / ".cache" / "bnn_course" / "data"]


@pytest.mark.skipif(not (REAL_DATA and data._is_image_tree(Path(REAL_DATA))),
                    reason="BNN_COURSE_DATA does not name an image-folder tree of CIFAR-10")
def test_the_real_jpeg_copy_is_described_as_found(monkeypatch) -> None:
    monkeypatch.setenv(config.DATA_ENV, REAL_DATA)
    loaded = load_cifar10(smoke=True, train_per_class=2, test_per_class=1, verbose=False)
    tree = Path(REAL_DATA).expanduser()
    assert loaded.name == "JPEG copy of CIFAR-10" and loaded.is_jpeg
    assert loaded.source == (f"JPEG copy of CIFAR-10: JPEG image tree at {tree}, 50,000 train "
                             "+ 10,000 test images; kept the first 2 train and 1 test images "
                             "per class")
    assert loaded.train_images.shape == (20, 3, 32, 32)
    assert loaded.train_labels.tolist() == [c for c in range(10) for _ in range(2)]


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


def test_smoke_mode_names_the_classes_a_small_copy_lacks(tmp_path) -> None:
    # Regression: the error was "n=0 must be a positive multiple of num_classes=10".
    write_pickle_folder(tmp_path / "cifar-10-batches-py", per_batch=5)  # classes 0..4 only
    with pytest.raises(ValueError, match=r"no images of the classes \['dog', 'frog', "):
        load_cifar10(tmp_path, smoke=True, allow_download=False)
