"""What every training command does with its output folder, written once.

:mod:`bnn_course.train` and :mod:`bnn_course.comparison` both keep runs in folders
(``checkpoint.pt``, ``metrics.json``, ``comparison.json``); this module is the one place for

* **atomic writes** (:func:`atomic_write_text`, :func:`atomic_torch_save`): the new content
  goes to a temporary file in the same folder, is flushed to disk and renamed over the old
  file, so a crash leaves either the old or the new file, never half of one. The temporary
  files a crash leaves behind are removed by :func:`remove_temporaries`;
* **one folder, one run** (:func:`prepare_run_folder`): a new run is refused in a folder
  holding another, unless it resumes that run or replaces it explicitly;
* **comparing configurations** (:func:`config_differences`) for resuming and reusing;
* **the identity of the data** (:func:`data_identity`, :func:`identity_differences`): the
  source, the sizes and a digest of the training and the test set;
* **provenance** (:func:`provenance`, with the git commit of the project's own repository
  and whether the tree was dirty);
* **the precision policy** (:func:`autocast_dtype`, :func:`fast_matmul`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from bnn_course import __version__
from bnn_course.provenance import device_description, git_state

TEMPORARY_MARKER = ".partial-"
"""Part of the name of every temporary file of an atomic write (``NAME.partial-XXXX.tmp``)."""


class RunFolderError(RuntimeError):
    """An output folder holds something that the requested run must not overwrite."""


# ---------------------------------------------------------------------- atomic writes


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + TEMPORARY_MARKER,
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return _atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def atomic_torch_save(path: str | os.PathLike, state: Any) -> Path:
    """``torch.save(state)`` to ``path`` atomically; returns the path."""
    return _atomic_write(path, lambda file: torch.save(state, file))


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in ``folder``; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted(p for p in folder.glob(f"*{TEMPORARY_MARKER}*.tmp") if p.is_file())
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def check_output_folder(folder: str | os.PathLike) -> None:
    """:class:`RunFolderError` unless ``folder`` is, or can be created as, a writable folder:
    checked before any work, so that a bad ``--out`` fails fast and creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} exists and is not a folder; choose another output "
                             "folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"{folder} cannot be created: {existing} is a file, not a "
                             "folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{folder} cannot be written: no write permission in "
                             f"{existing}; choose another output folder")


def prepare_run_folder(folder: str | os.PathLike, run_files: Sequence[str], *,
                       resume: bool, overwrite: bool) -> list[Path]:
    """Make ``folder`` ready for a run whose files are named ``run_files``.

    * temporary files of interrupted writes are removed (always);
    * if one of ``run_files`` exists: with ``overwrite`` they are all deleted; with
      ``resume`` they stay (the caller continues the run); otherwise
      :class:`RunFolderError`, since a new run there would leave files of two runs side by
      side.

    Returns the temporary files that were removed.
    """
    folder = Path(folder)
    check_output_folder(folder)
    removed = remove_temporaries(folder)
    present = [folder / name for name in run_files if (folder / name).exists()]
    if present and overwrite:
        for path in present:
            path.unlink()
    elif present and not resume:
        names = ", ".join(p.name for p in present)
        raise RunFolderError(
            f"{folder} already holds a run ({names}); pass --resume (resume=True) to continue "
            "it, --overwrite (overwrite=True) to replace it, or choose another output folder")
    return removed


# ---------------------------------------------------------------------- configurations


def _comparable(value: Any) -> Any:
    """Lists (as JSON and checkpoints store tuples) compared as tuples."""
    if isinstance(value, list):
        return tuple(_comparable(item) for item in value)
    return value


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore: Sequence[str] = ()) -> list[str]:
    """``"name: saved X, now Y"`` for every key of ``current`` (outside ``ignore``) whose
    value in ``saved`` differs; a key missing from ``saved`` counts as different."""
    missing = object()
    differences = []
    for name, value in current.items():
        if name in ignore:
            continue
        have = _comparable(saved.get(name, missing))
        if have is missing:
            differences.append(f"{name}: not saved, now {value!r}")
        elif have != _comparable(value):
            differences.append(f"{name}: saved {have!r}, now {value!r}")
    return differences


# ---------------------------------------------------------------------- data identity


def tensor_digest(tensor: torch.Tensor, max_rows: int = 512) -> str:
    """A short SHA-256 of the shape, the dtype and at most ``max_rows`` evenly spaced rows of
    ``tensor`` (all rows when it has fewer): cheap, and different for a different subset."""
    step = max(1, tensor.shape[0] // max_rows) if tensor.dim() else 1
    rows = tensor[::step] if tensor.dim() else tensor
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(rows.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_identity(source: str, train_images: torch.Tensor, train_labels: torch.Tensor,
                  test_images: torch.Tensor, test_labels: torch.Tensor) -> dict[str, Any]:
    """What identifies the data of a run: ``source`` (in words), and for ``train`` and
    ``test`` the number of examples and a digest of images and labels
    (:func:`tensor_digest`). Images ``(N, C, H, W)``, labels ``(N,)``."""
    return {
        "source": source,
        "train": {"size": int(train_labels.shape[0]),
                  "digest": tensor_digest(train_images) + tensor_digest(train_labels, 10**9)},
        "test": {"size": int(test_labels.shape[0]),
                 "digest": tensor_digest(test_images) + tensor_digest(test_labels, 10**9)},
    }


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                         parts: Sequence[str] = ("train", "test")) -> list[str]:
    """How the data ``current`` differs from ``saved`` (both :func:`data_identity`), in
    words; only ``parts`` of the two sets are compared.

    The sizes and digests identify the data. The ``source`` description (a sentence with the
    folder's path) is compared only when ``saved`` holds no digests (an older checkpoint):
    the same images reached through another path, a symlink or ``BNN_COURSE_DATA`` instead of
    ``--data`` are the same data.
    """
    differences = []
    has_digests = all((saved.get(part) or {}).get("digest") for part in parts)
    if not has_digests and saved.get("source") != current["source"]:
        differences.append(f"source: saved {saved.get('source')!r}, now {current['source']!r}")
    for part in parts:
        have, want = saved.get(part) or {}, current[part]
        if have.get("size") != want["size"]:
            differences.append(f"{part} set: {have.get('size')} examples saved, "
                               f"{want['size']} now")
        elif has_digests and have.get("digest") != want["digest"]:
            differences.append(f"{part} set: same size ({want['size']}), other examples")
    return differences


# ---------------------------------------------------------------------- provenance


def provenance(device: torch.device | str, *, smoke: bool, data_source: str,
               **extra: Any) -> dict[str, Any]:
    """How a result was produced: mode, device, software versions, data, git state.

    ``device`` is a device (described by :func:`~bnn_course.provenance.device_description`)
    or already its description.

    ``git_commit`` is the commit of the project's own repository and ``git_dirty`` whether
    its tracked files had uncommitted changes; both are ``None`` when the package is not in
    a project folder that is the top level of a git repository (an installed package, or a
    copy inside another repository), and ``git_note`` says which
    (:func:`~bnn_course.provenance.git_state`). ``extra`` entries are added as they are.
    """
    return {
        "mode": "smoke" if smoke else "full",
        "device": device if isinstance(device, str) and " " in device
        else device_description(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "bnn_course": __version__,
        "data_source": data_source,
        **extra,
        **git_state(),
    }


# ---------------------------------------------------------------------- precision


def autocast_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The forward passes' autocast dtype: bfloat16 on CUDA when ``amp``, else ``None``
    (full float32). The KL and the log-probabilities are always computed in float32."""
    return torch.bfloat16 if amp and device.type == "cuda" else None


@contextlib.contextmanager
def fast_matmul(device: torch.device) -> Iterator[None]:
    """On CUDA, allow TF32 matrix products and convolutions inside the block, and restore the
    previous global settings when it ends (also on an error). Elsewhere: nothing."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
