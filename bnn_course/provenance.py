"""The provenance line every executed notebook prints: mode, hardware, software, data.

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


def _git(folder: Path, *arguments: str) -> str | None:
    """The output of ``git ARGUMENTS`` run in ``folder``, or ``None`` if git fails."""
    try:
        return subprocess.run(["git", *arguments], capture_output=True, text=True, check=True,
                              cwd=folder, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(folder: str | os.PathLike | None = None) -> dict[str, str | bool | None]:
    """``{"git_commit": ..., "git_dirty": ...}`` of the repository holding ``folder``
    (default: this package's folder).

    ``git_commit`` is ``HEAD``'s hash; ``git_dirty`` is ``True`` when tracked files have
    uncommitted changes (untracked files are ignored), so a result can be traced to the
    exact code only when it is ``False``. Both are ``None`` outside a git checkout (e.g. an
    installed wheel) or without git.
    """
    folder = Path(__file__).resolve().parent if folder is None else Path(folder)
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None or not commit.strip():
        return {"git_commit": None, "git_dirty": None}
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status.strip())
    return {"git_commit": commit.strip(), "git_dirty": dirty}


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
