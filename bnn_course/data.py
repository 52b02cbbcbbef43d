"""CIFAR-10 as uint8 tensors on the training device, and batched transforms that run there.

The whole data set (50,000 + 10,000 images of 3x32x32 bytes, 184 MB) fits in the memory of
any GPU, so it lives there as ``uint8`` and every batch is augmented and normalised on the
device: no ``DataLoader`` and no worker processes.

Where the images come from (:func:`load_cifar10` tries these in order):

1. a folder given as ``root`` (``--data``) or by ``BNN_COURSE_DATA``, which must exist and
   hold, at its top or one level down, either torchvision's ``cifar-10-batches-py``
   (pickled batches, read with a restricted unpickler that runs no code from the files) or
   an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/*`` (Kaggle's and
   fast.ai's copies, and the course's JPEG copy) of RGB images. A tree is decoded once with
   Pillow and cached next to itself as uint8 tensors, keyed by the files' names, sizes and
   modification times (a changed image is decoded again). A folder given explicitly that does
   not exist or holds neither is an error: nothing is downloaded there, and a mistyped
   path is never created;
2. otherwise the default cache ``~/.cache/bnn_course/data``, the same way, and if it holds
   no copy, ``torchvision.datasets.CIFAR10(download=True)`` into it (announced);
3. in smoke mode only, and only without an explicit folder, a synthetic CIFAR-shaped
   stand-in, announced loudly. In full mode a missing data set is an error that says how
   to get it.

The loaded data say what was found (:func:`describe_found`): the folder, the format and the
counts; a copy is called CIFAR-10 only when it has CIFAR-10's ten classes and sizes.

Transforms (any device, any batch size, no Python loop over images):

* :func:`normalize` -- bytes to floats with CIFAR-10's channel mean and standard deviation;
* :func:`augment` -- random 32x32 crop of the image padded by 4 zero pixels, and a random
  horizontal flip (the standard CIFAR-10 augmentation);
* :func:`iterate_batches` -- shuffled (optionally augmented) normalised mini-batches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import logging
import os
import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnn_course import config

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
"""CIFAR-10's class names in its label order (label ``i`` is ``CLASSES[i]``)."""

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel (R, G, B) mean of CIFAR-10's training images, pixel values in [0, 1]."""

CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel (R, G, B) standard deviation of CIFAR-10's training images, in [0, 1]."""

SMOKE_TRAIN_PER_CLASS = 256
"""Training images per class kept in smoke mode (2,560 in all)."""

SMOKE_TEST_PER_CLASS = 128
"""Test images per class kept in smoke mode (1,280 in all)."""

CIFAR10_PER_CLASS: dict[str, int] = {"train": 5000, "test": 1000}
"""Images per class in CIFAR-10's splits (50,000 training and 10,000 test images)."""

SYNTHETIC_SOURCE = "synthetic stand-in (not CIFAR-10)"
SYNTHETIC_BANNER = "SYNTHETIC STAND-IN, NOT CIFAR-10"

PICKLE_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_CACHE_VERSION = 3  # 2: images checked for RGB (no silent grayscale conversion);
#                     3: keyed by names, sizes and mtimes (was: names only)
_CACHE_NAME = ".bnn_course_cache_{split}.pt"


def user_cache_dir() -> Path:
    """``~/.cache/bnn_course``: default download folder and fallback for read-only caches."""
    return Path.home() / ".cache" / "bnn_course"


def _say(message: str, verbose: bool) -> None:
    logger.info(message)
    if verbose:
        print(message)


# --------------------------------------------------------------------------------------
# The data set object
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class CIFAR10Data:
    """CIFAR-10 (or its smoke-mode stand-in) as tensors.

    Attributes
    ----------
    train_images, test_images:
        ``uint8`` tensors of shape ``(N, 3, 32, 32)``, channels R, G, B.
    train_labels, test_labels:
        ``int64`` tensors of shape ``(N,)`` with values in ``0..9``.
    classes:
        The class names, label ``i`` being ``classes[i]``.
    source:
        What was found, in one line: name, format, path and counts (and the subset kept), e.g.
        ``"JPEG copy of CIFAR-10: JPEG image tree at /data/cifar10-jpeg, 50,000 train +
        10,000 test images"`` (:func:`describe_found`).
    name:
        A short name for provenance lines and figure captions: ``"CIFAR-10"``,
        ``"JPEG copy of CIFAR-10"``, ... only for a copy of CIFAR-10's size, otherwise the
        format and counts (:func:`describe_found`); :data:`SYNTHETIC_SOURCE` for the stand-in.
    is_synthetic:
        ``True`` for the synthetic stand-in (smoke mode without data only).
    is_jpeg:
        ``True`` when (some of) the images were decoded from JPEG files, whose pixels differ
        slightly from the original.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    source: str
    name: str
    is_synthetic: bool = False
    is_jpeg: bool = False

    @property
    def device(self) -> torch.device:
        """The device all tensors live on."""
        return self.train_images.device

    def to(self, device: torch.device | str) -> CIFAR10Data:
        """A copy with every tensor moved to ``device`` (images stay ``uint8``)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def __repr__(self) -> str:
        return (f"CIFAR10Data(train={tuple(self.train_images.shape)}, "
                f"test={tuple(self.test_images.shape)}, device={self.device}, "
                f"source={self.source!r})")


def stratified_subset(images: torch.Tensor, labels: torch.Tensor, n: int, *,
                      num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n / num_classes`` images of every class, in their original order.

    Parameters
    ----------
    images:
        Shape ``(N, ...)``.
    labels:
        Shape ``(N,)``, integers in ``0..num_classes-1``.
    n:
        Size of the subset; a multiple of ``num_classes``.

    Returns
    -------
    (images, labels) of shapes ``(n, ...)`` and ``(n,)``, on the input's device.

    Raises
    ------
    ValueError
        If ``n`` is not a positive multiple of ``num_classes`` or a class has fewer than
        ``n / num_classes`` images.
    """
    if n <= 0 or n % num_classes:
        raise ValueError(f"n={n} must be a positive multiple of num_classes={num_classes}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    per_class = n // num_classes
    keep = []
    for c in range(num_classes):
        indices = torch.nonzero(labels == c).flatten()
        if indices.numel() < per_class:
            raise ValueError(f"class {c} has {indices.numel()} images; a stratified subset "
                             f"of {n} needs {per_class} per class")
        keep.append(indices[:per_class])
    index = torch.sort(torch.cat(keep)).values
    return images[index], labels[index]


def validation_split(images: torch.Tensor, labels: torch.Tensor, size: int, seed: int = 0,
                     num_classes: int = 10,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stratified, seeded split of a training set into a rest and a held-out part.

    ``size / num_classes`` images of every class, drawn by a random permutation seeded with
    ``seed`` (a CPU generator: the same split on every device), are held out; both parts
    keep the original order.

    Parameters
    ----------
    images, labels:
        ``(N, ...)`` and ``(N,)``, labels in ``0..num_classes-1``.
    size:
        Images held out; a positive multiple of ``num_classes``, leaving every class at
        least one image in the rest.

    Returns
    -------
    ``(rest_images, rest_labels, held_out_images, held_out_labels)``: ``N - size`` and
    ``size`` images, on the input's device.
    """
    if size <= 0 or size % num_classes:
        raise ValueError(f"size={size} must be a positive multiple of num_classes="
                         f"{num_classes}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    per_class = size // num_classes
    generator = torch.Generator().manual_seed(seed)
    cpu_labels = labels.cpu()
    held_out = torch.zeros(cpu_labels.shape[0], dtype=torch.bool)
    for label in range(num_classes):
        members = (cpu_labels == label).nonzero().squeeze(1)
        if members.numel() <= per_class:
            raise ValueError(f"class {label} has {members.numel()} images; holding out "
                             f"{per_class} would leave none to train on")
        chosen = members[torch.randperm(members.numel(), generator=generator)[:per_class]]
        held_out[chosen] = True
    held_out = held_out.to(labels.device)
    return images[~held_out], labels[~held_out], images[held_out], labels[held_out]


# --------------------------------------------------------------------------------------
# Offline format 1: torchvision's pickled batches, read with a restricted unpickler
# --------------------------------------------------------------------------------------

_NUMPY_GLOBALS = (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                  ("numeric", "_frombuffer"))
_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(f"numpy.{core}.{module}", name) for core in ("core", "_core")
     for module, name in _NUMPY_GLOBALS}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {(builtins, name) for builtins in ("builtins", "__builtin__")
       for name in ("dict", "list", "bytes", "str", "int")})
"""The only globals a CIFAR-10 batch file may name (``(module, name)`` pairs).

A batch is a ``dict`` of ``bytes``/``str`` keys, a ``list`` of ``int`` labels and one
``uint8`` numpy array; the array is rebuilt by numpy's ``_reconstruct`` (protocols 0-4, as
in the original Python 2 files) or ``_frombuffer`` (protocol 5), with a ``dtype``; a bytes
object pickled with protocol 2 or lower needs ``_codecs.encode`` (allowed for the latin-1
codec only). None of these runs code named by the file, so a crafted batch (whose
``__reduce__`` names ``os.system``, ``eval``, ...) fails with
:class:`pickle.UnpicklingError` before anything is called."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` call it, and no other codec."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"a CIFAR-10 batch never encodes with {encoding!r}")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """:class:`pickle.Unpickler` that resolves only :data:`_PICKLE_GLOBALS`."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"the file names the global {module}.{name}, which a CIFAR-10 batch never "
                "holds (it may be crafted to run code); refused")
        if module == "_codecs":
            return _latin1_encode
        if module.startswith("numpy.core."):  # numpy >= 2 moved it; skip the warning shim
            try:
                return getattr(importlib.import_module("numpy._core." + module[11:]), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _unpickle_batch(path: Path) -> dict[str, object]:
    """A batch file's dictionary, keys as ``str``, read with :class:`_BatchUnpickler`.

    Raises
    ------
    ValueError
        If the file is not a pickled ``dict`` of allowed objects (naming the file).
    """
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as error:
        raise ValueError(f"{path} is not a readable CIFAR-10 batch: {error}; re-download or "
                         f"re-extract {PICKLE_FOLDER}") from error
    if not isinstance(entry, dict):
        raise ValueError(f"{path} holds a {type(entry).__name__}, not a CIFAR-10 batch dict")
    # Python 2's files give str keys under encoding="latin1"; re-pickled copies may give bytes.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _is_pickle_folder(folder: Path) -> bool:
    return (folder / _TEST_BATCH).is_file() or (folder / _TRAIN_BATCHES[0]).is_file()


def _read_pickle_folder(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read ``data_batch_1..5`` and ``test_batch`` with a restricted unpickler.

    (torchvision's reader insists on the original files' md5 sums and unpickles without
    restriction; this one also accepts a re-pickled copy and never runs code from a file.)

    Returns
    -------
    ``{"train": (images, labels), "test": (images, labels)}``, images ``uint8``
    ``(N, 3, 32, 32)`` (each row of a batch is the R plane, then G, then B, row by row),
    labels ``int64`` ``(N,)`` in ``0..9``.
    """
    missing = [f for f in (*_TRAIN_BATCHES, _TEST_BATCH) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} looks like torchvision's {PICKLE_FOLDER} but lacks "
                                f"{missing}; re-download or re-extract it")
    meta = folder / "batches.meta"
    if meta.is_file():
        names = tuple(n.decode("latin1") if isinstance(n, bytes) else n
                      for n in _unpickle_batch(meta).get("label_names", ()))
        if names != CLASSES:
            raise ValueError(f"{meta} names the classes {names}; expected CIFAR-10's {CLASSES}")
    splits = {}
    for split, files in (("train", _TRAIN_BATCHES), ("test", (_TEST_BATCH,))):
        data, labels = [], []
        for name in files:
            entry = _unpickle_batch(folder / name)
            if "data" not in entry or "labels" not in entry:
                raise ValueError(f"{folder / name} lacks 'data' or 'labels' "
                                 f"(keys: {sorted(map(str, entry))})")
            batch = entry["data"]
            if (not isinstance(batch, np.ndarray) or batch.dtype != np.uint8
                    or batch.ndim != 2 or batch.shape[1] != 3 * 32 * 32):
                raise ValueError(f"{folder / name}: data is {type(batch).__name__} "
                                 f"{getattr(batch, 'dtype', '')} of shape "
                                 f"{getattr(batch, 'shape', '?')}, expected uint8 (N, 3072)")
            batch_labels = [int(label) for label in entry["labels"]]
            if len(batch_labels) != batch.shape[0] or not all(0 <= y < 10 for y in batch_labels):
                raise ValueError(f"{folder / name}: expected {batch.shape[0]} labels in 0..9, "
                                 f"got {len(batch_labels)} with values "
                                 f"{sorted(set(batch_labels))[:12]}")
            data.append(batch)
            labels.extend(batch_labels)
        images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
        splits[split] = (images, torch.tensor(labels, dtype=torch.int64))
    return splits


# --------------------------------------------------------------------------------------
# Offline format 2: image-folder tree, decoded once and cached
# --------------------------------------------------------------------------------------


def _is_image_tree(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _list_image_tree(tree: Path, split: str) -> list[list[str]]:
    """File names per class (natural order), after checking the class folders."""
    split_dir = tree / split
    found = sorted(e.name for e in os.scandir(split_dir)
                   if e.is_dir() and not e.name.startswith("."))
    if set(found) != set(CLASSES):
        missing = sorted(set(CLASSES) - set(found))
        extra = sorted(set(found) - set(CLASSES))
        raise ValueError(
            f"{split_dir} must hold exactly one folder per CIFAR-10 class {list(CLASSES)}; "
            f"missing: {missing}, unexpected: {extra}")
    files = []
    for name in CLASSES:
        names = [e.name for e in os.scandir(split_dir / name)
                 if e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES)
                 and not e.name.startswith(".")]
        if not names:
            raise ValueError(f"{split_dir / name} holds no .png/.jpg/.jpeg images")
        files.append(sorted(names, key=_natural_key))
    return files


def _fingerprint(split_dir: Path, files: list[list[str]]) -> str:
    """A SHA-1 of every image's class, name, size in bytes and modification time (ns).

    ``files`` is :func:`_list_image_tree`'s listing of ``split_dir``. A cache is served only
    when the fingerprint it was saved with equals the tree's, so an image added, removed,
    renamed or rewritten in place (which changes its size or its modification time) makes the
    tree be decoded again.

    The key is the file metadata, not the contents: on the course's JPEG copy (60,000 files,
    55 MB) the ``stat`` calls take 0.4 s, while reading and hashing the contents take 0.9 s
    with the files in the page cache and 5.8 s on a first read (decoding all takes about 7 s),
    which would make the cache nearly useless on a slow or network disk. What the key misses:
    a rewrite that keeps the size and restores the old modification time (``touch -r``,
    ``cp -p`` of another image of the same size), or one within the file system's timestamp
    granularity of the previous write; delete the ``.bnn_course_cache_*.pt`` files then.
    """
    digest = hashlib.sha1()
    for name, names in zip(CLASSES, files, strict=True):
        digest.update(f"{name}:{len(names)}:".encode())
        for file_name in names:
            info = os.stat(split_dir / name / file_name)
            digest.update(f"{file_name}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _is_jpeg_name(name: str) -> bool:
    return name.lower().endswith(_JPEG_SUFFIXES)


_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B",
                              "I;16N"})
_ALPHA_MODES = frozenset({"P", "PA", "RGBA"})


def _rgb_pixels(image: object, path: Path) -> np.ndarray:
    """The ``(32, 32, 3)`` uint8 RGB pixels of an opened Pillow image, converting only
    where nothing is lost.

    * ``RGB``: as is.
    * ``P`` (palette), ``PA`` and ``RGBA``: converted, provided every pixel is fully
      opaque; a palette maps each index to one RGB colour, so that loses nothing, and
      neither does dropping an alpha channel that is 255 everywhere. A pixel that is
      (partly) transparent has no defined colour: an error naming the file.
    * Grayscale (``L``, ``LA``, ``I``, ``I;16``, ``F``, ``1``): an error naming the file;
      CIFAR-10 is in colour, and copying one channel three times would hide a wrong copy.
    * Anything else (``CMYK``, ``YCbCr``, ...): an error naming the file.
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"))
        transparent = int((rgba[..., 3] != 255).sum())
        if transparent:
            raise ValueError(f"{path} (mode {mode}) has {transparent} pixels that are not "
                             "fully opaque; CIFAR-10 images are opaque RGB, so their colour "
                             "is undefined. Replace the file with an RGB image.")
        return rgba[..., :3]
    what = "grayscale" if mode in _GRAYSCALE_MODES else "not RGB"
    raise ValueError(f"{path} is {what} (Pillow mode {mode!r}); CIFAR-10 images are RGB and "
                     "are not converted silently. Replace the file with the RGB original or "
                     "remove it from the tree.")


def _decode(paths: Sequence[Path]) -> torch.Tensor:
    """Decode images to a ``uint8`` tensor ``(len(paths), 3, 32, 32)`` with Pillow.

    Each file must be a 32x32 image in the format its suffix says (PNG or JPEG), in an RGB
    mode or one that converts to RGB losslessly (:func:`_rgb_pixels`).
    """
    from PIL import Image

    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            if image.size != (32, 32):
                raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}; "
                                 "CIFAR-10 images are 32x32")
            expected = "JPEG" if _is_jpeg_name(path.name) else "PNG"
            if image.format != expected:
                raise ValueError(f"{path} holds a {image.format} image, not {expected} as "
                                 "its name says; rename or re-encode it")
            out[i] = _rgb_pixels(image, path)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _cache_paths(tree: Path, split: str) -> tuple[Path, Path]:
    """(next to the tree, fallback under ``~/.cache/bnn_course`` keyed by the tree's path)."""
    name = _CACHE_NAME.format(split=split)
    absolute = str(tree.resolve())
    key = hashlib.sha256(absolute.encode()).hexdigest()[:16]
    return tree / name, user_cache_dir() / "image-tree-cache" / f"{tree.name}-{key}" / name


def _save_atomically(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; others may share the data folder
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_cache(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: decode again
        logger.warning("ignoring unreadable cache %s: %s", path, error)
        return None
    if cache.get("version") != _CACHE_VERSION or cache.get("fingerprint") != fingerprint:
        return None
    return cache


def _load_image_tree_split(tree: Path, split: str, files: list[list[str]],
                           per_class: int | None, cap: bool,
                           verbose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of an image-folder tree listed as ``files``.

    With ``per_class`` set and no cache yet, only the first ``per_class`` files of each
    class (at most as many as the smallest class has, if ``cap``) are decoded, for fast
    smoke runs, and nothing is cached; otherwise the whole split is decoded once and cached.
    A cache holds the whole split; the caller takes the subset.
    """
    fingerprint = _fingerprint(tree / split, files)
    for path in _cache_paths(tree, split):
        cache = _read_cache(path, fingerprint)
        if cache is not None:
            _say(f"{split}: {cache['images'].shape[0]} images from the cache {path}", verbose)
            return cache["images"], cache["labels"]

    if per_class is not None:
        if cap:
            per_class = min(per_class, min(len(names) for names in files))
        short = [c for c, names in zip(CLASSES, files, strict=True) if len(names) < per_class]
        if short:
            raise ValueError(f"{tree / split}: classes {short} have fewer than "
                             f"{per_class} images")
        files = [names[:per_class] for names in files]
    paths = [tree / split / c / n for c, names in zip(CLASSES, files, strict=True)
             for n in names]
    labels = torch.cat([torch.full((len(names),), c, dtype=torch.int64)
                        for c, names in enumerate(files)])
    start = time.perf_counter()
    images = _decode(paths)
    _say(f"{split}: decoded {len(paths)} images from {tree / split} "
         f"in {time.perf_counter() - start:.1f} s", verbose)
    if per_class is not None:
        return images, labels

    cache = {"version": _CACHE_VERSION, "fingerprint": fingerprint, "images": images,
             "labels": labels}
    beside, fallback = _cache_paths(tree, split)
    try:
        _save_atomically(cache, beside)
        _say(f"{split}: cached as {beside}", verbose)
    except OSError as error:
        try:
            _save_atomically(cache, fallback)
            _say(f"{split}: {tree} is not writable ({error.strerror or error}); "
                 f"cached under {fallback} instead", verbose)
        except OSError as second:
            _say(f"{split}: could not write a cache ({second}); the next load decodes again",
                 verbose)
    return images, labels


# --------------------------------------------------------------------------------------
# Describing what was found
# --------------------------------------------------------------------------------------


def describe_found(file_format: str, where: Path, train_per_class: Sequence[int],
                   test_per_class: Sequence[int]) -> tuple[str, str]:
    """``(name, source)`` of a data set found on disk, from what was found there.

    Parameters
    ----------
    file_format:
        ``"pickled batches"``, ``"PNG image tree"``, ``"JPEG image tree"`` or
        ``"PNG and JPEG image tree"``.
    where:
        The folder read.
    train_per_class, test_per_class:
        Images found per class (10 counts each), before any subset is taken.

    Returns
    -------
    name:
        A short name for provenance lines and captions. It says CIFAR-10 only when the copy
        has CIFAR-10's size, :data:`CIFAR10_PER_CLASS` images per class in each split:
        ``"CIFAR-10"`` (pickled batches), ``"JPEG copy of CIFAR-10"``, ``"PNG copy of
        CIFAR-10"`` or ``"PNG and JPEG copy of CIFAR-10"``; otherwise e.g. ``"JPEG image
        tree with CIFAR-10's classes (30 train + 30 test images)"``. (The pixels are not
        checked: a folder of the right size and classes is taken at its word.)
    source:
        One line with the name, format, path and counts, e.g. ``"JPEG copy of CIFAR-10:
        JPEG image tree at /data/cifar10-jpeg, 50,000 train + 10,000 test images"``.
    """
    n_train, n_test = sum(train_per_class), sum(test_per_class)
    counts = f"{n_train:,} train + {n_test:,} test images"
    full = (list(train_per_class) == [CIFAR10_PER_CLASS["train"]] * len(CLASSES)
            and list(test_per_class) == [CIFAR10_PER_CLASS["test"]] * len(CLASSES))
    if not full:
        name = f"{file_format} with CIFAR-10's classes ({counts})"
        expected = {s: f"{n * len(CLASSES):,}" for s, n in CIFAR10_PER_CLASS.items()}
        return name, (f"{file_format} at {where}, {counts} in CIFAR-10's ten classes (not "
                      f"CIFAR-10's {expected['train']} + {expected['test']})")
    if file_format == "pickled batches":
        name = "CIFAR-10"
    else:
        name = f"{file_format.removesuffix(' image tree')} copy of CIFAR-10"
    return name, f"{name}: {file_format} at {where}, {counts}"


# --------------------------------------------------------------------------------------
# Finding, downloading, or standing in for CIFAR-10
# --------------------------------------------------------------------------------------


def resolve_data_root(root: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The folder to search for CIFAR-10, and whether it was given explicitly.

    ``root`` (the ``--data`` flag) if given, else ``BNN_COURSE_DATA`` if set, else the
    default cache ``~/.cache/bnn_course/data`` (the only folder ever downloaded into).

    Returns
    -------
    (folder, explicit)

    Raises
    ------
    FileNotFoundError
        If the folder was given explicitly and is not an existing folder (a mistyped path
        is an error, never a download target). Nothing is created.
    """
    if root is not None and str(root).strip():
        given = f"the data folder {os.fspath(root)!r} (root= / --data)"
        folder = Path(root).expanduser()
    elif config.data_root() is not None:
        given = f"{config.DATA_ENV}={config.data_root()!r}"
        folder = Path(config.data_root()).expanduser()
    else:
        return user_cache_dir() / "data", False
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"{given} {what}; check the path (it should hold {PICKLE_FOLDER}/ or train/ and "
            f"test/), or give none to use the default {user_cache_dir() / 'data'}, where "
            "CIFAR-10 is downloaded when missing. Nothing was downloaded or created.")
    return folder, True


def _find_offline_copy(root: Path) -> tuple[str, Path] | None:
    """``("pickle", folder)`` or ``("tree", folder)`` at ``root`` or one level below.

    The original pickled batches win over an image-folder tree (exact pixels).
    """
    if not root.is_dir():
        return None
    candidates = [root] + sorted(p for p in root.iterdir()
                                 if p.is_dir() and not p.name.startswith("."))
    for folder in candidates:
        if _is_pickle_folder(folder):
            return "pickle", folder
    for folder in candidates:
        if _is_image_tree(folder):
            return "tree", folder
    return None


def _download(root: Path) -> None:
    """Download CIFAR-10 into ``root/cifar-10-batches-py`` with torchvision."""
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)


def _how_to_get_cifar10(root: Path, explicit: bool) -> str:
    """One line: where CIFAR-10 was looked for and how to provide it."""
    pickled = f"torchvision's '{PICKLE_FOLDER}' folder"
    tree = ("an image-folder tree 'train/<class>/*.png|jpg' and 'test/<class>/*' with the ten "
            f"CIFAR-10 class folders ({' '.join(CLASSES)}), at its top or one level down")
    if explicit:
        return (f"CIFAR-10 was not found in {root}, the folder given explicitly: it holds "
                f"neither {pickled} nor {tree}. Point root= / --data / {config.DATA_ENV} at "
                "a folder that does, or give none to use (and download into) the default "
                f"{user_cache_dir() / 'data'}; nothing is downloaded into a folder given "
                "explicitly.")
    return (f"CIFAR-10 was not found in the default folder {root}. Either set "
            f"{config.DATA_ENV} (or pass root= / --data) to a folder holding {pickled}, or "
            f"{tree}; or let load_cifar10(allow_download=True) download it into {root} "
            "(needs internet access to www.cs.toronto.edu, 170 MB).")


def synthetic_cifar10(train_per_class: int = SMOKE_TRAIN_PER_CLASS,
                      test_per_class: int = SMOKE_TEST_PER_CLASS, *,
                      seed: int = 0) -> CIFAR10Data:
    """A learnable, CIFAR-shaped stand-in with 10 classes (NOT CIFAR-10; smoke mode only).

    Class ``c`` has its own mean colour (hue ``36 c`` degrees) and a stripe pattern at
    ``18 c`` degrees; each image gets a random stripe phase, a random colour shift and pixel
    noise, so neither cue alone is perfect but a small CNN learns both quickly.

    Returns
    -------
    CIFAR10Data
        ``uint8`` images ``(10 * train_per_class, 3, 32, 32)`` and
        ``(10 * test_per_class, 3, 32, 32)``, labels in class-blocked order, classes named
        ``"synthetic 0"`` .. ``"synthetic 9"``, ``is_synthetic=True``.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(10, dtype=torch.float32)
    hue = 2 * torch.pi * classes / 10
    shifts = torch.tensor([0.0, -2 * torch.pi / 3, 2 * torch.pi / 3])
    colours = 128 + 45 * torch.cos(hue[:, None] + shifts[None, :])  # (10, 3)
    angle = torch.pi * classes / 10
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    frequency = 2 * torch.pi / 8  # stripes 8 pixels apart

    def make(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(10).repeat_interleave(per_class)
        n = labels.numel()
        phase = 2 * torch.pi * torch.rand(n, 1, 1, generator=generator)
        a = angle[labels][:, None, None]
        stripes = torch.sin(frequency * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)
        colour = colours[labels] + 25 * torch.randn(n, 3, generator=generator)
        images = (colour[:, :, None, None] + 40 * stripes[:, None]
                  + 40 * torch.randn(n, 3, 32, 32, generator=generator))
        return images.round().clamp(0, 255).to(torch.uint8), labels

    train_images, train_labels = make(train_per_class)
    test_images, test_labels = make(test_per_class)
    return CIFAR10Data(train_images, train_labels, test_images, test_labels,
                       classes=tuple(f"synthetic {i}" for i in range(10)),
                       source=SYNTHETIC_SOURCE, name=SYNTHETIC_SOURCE, is_synthetic=True,
                       is_jpeg=False)


def _announce_synthetic(reason: str) -> None:
    line = "!" * 72
    print(f"{line}\n!!  {SYNTHETIC_BANNER}  (smoke mode only)\n!!  {reason}\n{line}")
    warnings.warn(f"{SYNTHETIC_BANNER}: {reason}", UserWarning, stacklevel=3)


def _load_offline_copy(kind: str, where: Path, wanted: dict[str, int | None],
                       capped: dict[str, bool], verbose: bool
                       ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool, str, str]:
    """``(splits, is_jpeg, name, source)`` of the copy found at ``where`` (all of it, or for
    an uncached tree with ``wanted`` sizes, only the first images of each class)."""
    if kind == "pickle":
        splits = _read_pickle_folder(where)
        found = {split: torch.bincount(labels, minlength=10).tolist()
                 for split, (_, labels) in splits.items()}
        name, source = describe_found("pickled batches", where, found["train"], found["test"])
        return splits, False, name, source
    listed = {split: _list_image_tree(where, split) for split in ("train", "test")}
    jpeg = {_is_jpeg_name(n) for names in (*listed["train"], *listed["test"]) for n in names}
    file_format = {frozenset({True}): "JPEG", frozenset({False}): "PNG"}.get(
        frozenset(jpeg), "PNG and JPEG") + " image tree"
    splits = {split: _load_image_tree_split(where, split, files, wanted[split],
                                            capped[split], verbose)
              for split, files in listed.items()}
    name, source = describe_found(file_format, where,
                                  *([len(names) for names in listed[split]]
                                    for split in ("train", "test")))
    return splits, True in jpeg, name, source


def load_cifar10(root: str | os.PathLike | None = None, *, smoke: bool | None = None,
                 device: torch.device | str = "cpu", allow_download: bool = True,
                 train_per_class: int | None = None, test_per_class: int | None = None,
                 verbose: bool = True) -> CIFAR10Data:
    """Load CIFAR-10 as ``uint8`` tensors on ``device``.

    Search order:

    1. ``root``, else ``BNN_COURSE_DATA``: that folder, which must exist and hold
       torchvision's ``cifar-10-batches-py`` or an image-folder tree ``train/<class>/*``,
       ``test/<class>/*`` (PNG or JPEG) at its top or one level down; anything else is a
       :class:`FileNotFoundError` in either mode (nothing is downloaded there, and a folder
       that does not exist is not created);
    2. else the default cache ``~/.cache/bnn_course/data``, the same way; if it holds no
       copy and ``allow_download``, torchvision downloads CIFAR-10 there (a printed line
       says so);
    3. in smoke mode only, and only without an explicit folder, :func:`synthetic_cifar10`,
       with a warning and a banner. In full mode, :class:`FileNotFoundError` explaining how
       to get CIFAR-10.

    A tree is decoded once and cached beside itself (``.bnn_course_cache_<split>.pt``) or,
    if it is read-only, under ``~/.cache/bnn_course``; the cache is used only while every
    image keeps its name, size and modification time (:func:`_fingerprint`), so a tree
    changed in place is decoded again. Pickled batches are read with a
    restricted unpickler that runs no code from the files.

    Parameters
    ----------
    root:
        Folder to search (the command lines' ``--data``).
    smoke:
        Smoke mode; ``None`` asks :func:`bnn_course.config.is_smoke`.
    device:
        Where the returned tensors live.
    allow_download:
        Try torchvision's download into the default cache when it holds no copy.
    train_per_class, test_per_class:
        Keep only the first this many images of each class (:func:`stratified_subset`).
        ``None`` means all of them in full mode and :data:`SMOKE_TRAIN_PER_CLASS` /
        :data:`SMOKE_TEST_PER_CLASS` (at most what the data has) in smoke mode.
    verbose:
        Print what was loaded from where (also logged at INFO level).

    Returns
    -------
    CIFAR10Data
        Train images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64, and the same for
        the test split; ``name`` and ``source`` describe what was found
        (:func:`describe_found`).

    Raises
    ------
    FileNotFoundError
        An explicit folder that does not exist or holds no copy; no copy at all in full mode.
    ValueError
        A copy that is malformed: wrong class folders, a grayscale, transparent or
        non-32x32 image (naming the file), a batch file that is not a CIFAR-10 batch.
    """
    smoke = config.is_smoke() if smoke is None else smoke
    folder, explicit = resolve_data_root(root)
    # Smoke-mode defaults are capped at what the data has; explicit sizes are not.
    capped = {"train": smoke and train_per_class is None,
              "test": smoke and test_per_class is None}
    if capped["train"]:
        train_per_class = SMOKE_TRAIN_PER_CLASS
    if capped["test"]:
        test_per_class = SMOKE_TEST_PER_CLASS

    found = _find_offline_copy(folder)
    download_error: Exception | None = None
    if found is None and not explicit and allow_download:
        message = (f"No copy of CIFAR-10 in the default folder {folder}; downloading it "
                   f"there with torchvision (170 MB)")
        logger.info(message)
        print(message)
        try:
            _download(folder)
        except Exception as error:  # no network, no torchvision, disk full, ...
            download_error = error
            _say(f"Download failed: {type(error).__name__}: {error}", verbose)
        found = _find_offline_copy(folder)

    if found is None:
        reason = _how_to_get_cifar10(folder, explicit)
        if download_error is not None:
            reason += (f" The download failed with {type(download_error).__name__}: "
                       f"{download_error}")
        elif not explicit and not allow_download:
            reason += " (allow_download=False: no download was tried.)"
        if explicit or not smoke:
            raise FileNotFoundError(reason) from download_error
        _announce_synthetic(f"no CIFAR-10 in {folder}; using "
                            f"{train_per_class}+{test_per_class} random images per class")
        return synthetic_cifar10(train_per_class, test_per_class).to(device)

    wanted = {"train": train_per_class, "test": test_per_class}
    splits, is_jpeg, name, source = _load_offline_copy(*found, wanted, capped, verbose)
    subsets = []
    for split in ("train", "test"):
        images, labels = splits[split]
        per_class = wanted[split]
        if per_class is None:
            continue
        if capped[split]:
            counts = torch.bincount(labels, minlength=10)
            absent = [CLASSES[c] for c in range(10) if counts[c] == 0]
            if absent:  # else: "n=0 must be a positive multiple", naming nothing
                raise ValueError(f"the {split} set of {source} has no images of the classes "
                                 f"{absent}; a smoke-mode subset needs every class")
            per_class = min(per_class, int(counts.min()))
        splits[split] = stratified_subset(images, labels, 10 * per_class)
        subsets.append(f"{per_class} {split}")
    if subsets:
        source += f"; kept the first {' and '.join(subsets)} images per class"
    data = CIFAR10Data(*splits["train"], *splits["test"], classes=CLASSES, source=source,
                       name=name, is_synthetic=False, is_jpeg=is_jpeg)
    _say(f"Loaded {data.train_images.shape[0]} training and {data.test_images.shape[0]} "
         f"test images: {source}", verbose)
    return data.to(device)


# --------------------------------------------------------------------------------------
# Batched transforms on the device
# --------------------------------------------------------------------------------------


def normalize(images: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """``(x / 255 - mean_c) / std_c`` per channel ``c``.

    Parameters
    ----------
    images:
        ``uint8`` in ``0..255``, or floating point already scaled to ``[0, 1]``;
        shape ``(N, 3, H, W)`` (or ``(3, H, W)``).

    Returns
    -------
    float32 tensor (or the input's floating dtype) of the same shape, on the same device.
    """
    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 255
    elif images.is_floating_point():
        x = images
    else:
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")
    m, s = _channel_constants(tuple(mean), tuple(std), x.dtype, x.device)
    return (x - m) / s


@functools.lru_cache(maxsize=32)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``(C, 1, 1)`` tensors on ``device``, made once per device and
    dtype: copying them from host memory at every batch would make a CUDA step wait for the
    copy (a host sync per batch)."""
    return (torch.tensor(mean, dtype=dtype, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=dtype, device=device).view(-1, 1, 1))


def crop_and_flip(images: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor,
                  flip: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Pad by ``padding`` zeros, crop at per-image offsets, mirror where ``flip`` is set.

    Output pixel ``(i, c, y, x)`` is ``padded[i, c, offset_y[i] + y, offset_x[i] + x']``
    with ``x' = W - 1 - x`` where ``flip[i]`` and ``x' = x`` otherwise, so offsets
    ``(padding, padding)`` without flip return the image unchanged. One gather, no loop.

    Parameters
    ----------
    images:
        Shape ``(N, C, H, W)``, any dtype.
    offset_y, offset_x:
        Integer tensors ``(N,)`` in ``0..2 * padding``.
    flip:
        Boolean tensor ``(N,)``.

    Returns
    -------
    Tensor of the shape, dtype and device of ``images``.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = offset_y.to(device)[:, None] + torch.arange(h, device=device)  # (N, H)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flip.to(device)[:, None], cols.flip(1), cols)
    cols = offset_x.to(device)[:, None] + cols  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def augment(images: torch.Tensor, generator: torch.Generator | None = None, *,
            padding: int = 4, flip_prob: float = 0.5) -> torch.Tensor:
    """Standard CIFAR-10 augmentation: random crop of the zero-padded image, random flip.

    Each image gets its own offsets, uniform in ``0..2 * padding`` (a shift of up to
    ``padding`` pixels each way, the uncovered border filled with zeros, i.e. black for
    ``uint8`` images), and is mirrored left-right with probability ``flip_prob``.
    Runs on the images' device; the random numbers come from ``generator`` (on its own
    device) or from the global generator of the images' device.

    Parameters
    ----------
    images:
        Shape ``(N, C, H, W)``, ``uint8`` or floating point. Augment before
        :func:`normalize` so the padding is black.

    Returns
    -------
    Tensor of the shape, dtype and device of ``images``.
    """
    n = images.shape[0]
    device = generator.device if generator is not None else images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < flip_prob
    return crop_and_flip(images, offsets[0], offsets[1], flip, padding)


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                    shuffle: bool = False, generator: torch.Generator | None = None,
                    augment: bool = False,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches ``(normalize(x), y)`` on the device of ``images``.

    Parameters
    ----------
    images:
        ``uint8`` ``(N, 3, H, W)``.
    labels:
        ``(N,)``.
    shuffle:
        Visit the images in a random order (from ``generator``) instead of in order.
    augment:
        Apply :func:`augment` (training); leave ``False`` at test time.
    drop_last:
        Skip a last batch smaller than ``batch_size``.

    Yields
    ------
    (float32 ``(B, 3, H, W)``, labels ``(B,)``), ``B <= batch_size``.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shuffle:
        device = generator.device if generator is not None else images.device
        order = torch.randperm(n, generator=generator, device=device).to(images.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
        else:
            index = order[start:start + batch_size]
            x, y = images[index], labels[index.to(labels.device)]
        if augment:
            x = _random_crop_flip(x, generator)
        yield normalize(x), y


_random_crop_flip = augment  # iterate_batches' ``augment`` flag shadows the function
