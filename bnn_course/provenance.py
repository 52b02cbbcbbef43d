"""The provenance line every executed notebook prints: mode, hardware, software, data;
and the git state (:func:`git_state`) that the training commands record with their runs.

Committed notebooks must carry the outputs of a full-mode run; a test reads this line to
tell full-mode outputs from smoke-mode ones (``tests/test_committed_notebooks.py``).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from bnn_course import __version__
from bnn_course.config import mode, tier

PREFIX = "Provenance:"


PACKAGE_DIR = Path(__file__).resolve().parent
"""The folder of this package (``bnn_course/``); the project's root is the folder above it."""


def _git(folder: Path, *arguments: str) -> str | None:
    """The output of ``git ARGUMENTS`` run in ``folder``, or ``None`` if git fails."""
    try:
        return subprocess.run(["git", *arguments], capture_output=True, text=True, check=True,
                              cwd=folder, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _is_project_root(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / "bnn_course").is_dir()


def project_root(folder: str | os.PathLike | None = None) -> Path | None:
    """The root of the bnn-course project holding ``folder``: the nearest folder at or above
    it (symbolic links resolved) that holds both ``pyproject.toml`` and ``bnn_course/``;
    ``None`` if there is none.

    Default: the root of the project this package was imported from, which is the folder
    above :data:`PACKAGE_DIR` when that holds ``pyproject.toml`` and ``None`` otherwise. The
    search does not go further up there: an installed package (in ``site-packages``, even in
    a virtual environment inside a checkout) belongs to no project folder.
    """
    if folder is None:
        return PACKAGE_DIR.parent if _is_project_root(PACKAGE_DIR.parent) else None
    folder = Path(folder).resolve()
    return next((candidate for candidate in (folder, *folder.parents)
                 if _is_project_root(candidate)), None)


def git_state(folder: str | os.PathLike | None = None) -> dict[str, str | bool | None]:
    """``{"git_commit": ..., "git_dirty": ..., "git_note": ...}`` of the project holding
    ``folder`` (default: this package's project; :func:`project_root`).

    ``git_commit`` is ``HEAD``'s hash and ``git_dirty`` is ``True`` when tracked files have
    uncommitted changes (untracked files are ignored), so a result can be traced to the exact
    code only when it is ``False``. They are recorded only when the project's root is the top
    level of its git repository. A project copied (without its ``.git``) into a folder of
    *another* repository would otherwise record that repository's commit, which says nothing
    about this code; there, as outside a git checkout (e.g. an installed wheel), without git,
    or before the first commit, both are ``None``. ``git_note`` says in words which case it
    is (and so why a commit is missing).
    """
    root = project_root(folder)
    if root is None and folder is None:
        return _no_commit(f"no commit recorded: the package {PACKAGE_DIR} is installed, not "
                          "in a project folder (there is no pyproject.toml beside it)")
    if root is None:
        return _no_commit("no commit recorded: no bnn-course project folder (one holding "
                          f"pyproject.toml and bnn_course/) at or above {folder}")
    top_level = _git(root, "rev-parse", "--show-toplevel")
    if top_level is None or not top_level.strip():
        return _no_commit(f"no commit recorded: the project {root} is not in a git checkout "
                          "(or git is not installed or cannot read it)")
    if Path(top_level.strip()).resolve() != root:
        return _no_commit(f"no commit recorded: the project {root} is not its own git "
                          f"repository but lies inside the repository {top_level.strip()}, "
                          "whose commit would not identify this code")
    commit = _git(root, "rev-parse", "--verify", "-q", "HEAD")
    if commit is None or not commit.strip():
        return _no_commit(f"no commit recorded: the repository {root} has no commit yet")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status.strip())
    changes = {False: "no uncommitted changes to tracked files",
               True: "with uncommitted changes to tracked files",
               None: "whether tracked files have uncommitted changes is unknown"}[dirty]
    return {"git_commit": commit.strip(), "git_dirty": dirty,
            "git_note": f"HEAD of the project's own repository {root}, {changes}"}


def _no_commit(note: str) -> dict[str, str | bool | None]:
    return {"git_commit": None, "git_dirty": None, "git_note": note}


def device_description(device: torch.device | str | None = None) -> str:
    """A human-readable name of ``device`` (default: CUDA when available, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def provenance_line(data: str, device: torch.device | str | None = None) -> str:
    """One line saying how a notebook's outputs were produced: the mode (and, in full
    mode, the tier of :func:`bnn_course.config.tier`), the device, the software and the data.

    Parameters
    ----------
    data:
        Which data the chapter used, e.g. ``"synthetic 1-D regression toy"`` or
        ``"JPEG copy of CIFAR-10"``.
    device:
        The device the chapter computed on (default: CUDA when available, else CPU).
    """
    current = mode()
    if current == "full":
        label = f"full mode, {tier().upper()} tier"
    else:
        label = "smoke mode (tiny budgets, not for reading)"
    today = datetime.date.today().isoformat()
    return (f"{PREFIX} {label} | {device_description(device)} | torch {torch.__version__} | "
            f"python {platform.python_version()} | bnn_course {__version__} | data: {data} | "
            f"{today}")
