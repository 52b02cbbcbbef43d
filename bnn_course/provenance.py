"""The provenance line every executed notebook prints: mode, hardware, software, data.

Committed notebooks must carry the outputs of a full-mode run; a test reads this line to
tell full-mode outputs from smoke-mode ones (``tests/test_committed_notebooks.py``).
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

from bnn_course import __version__
from bnn_course.config import mode

PREFIX = "Provenance:"


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
    """One line saying how a notebook's outputs were produced.

    Parameters
    ----------
    data:
        Which data the chapter used, e.g. ``"synthetic 1-D regression toy"`` or
        ``"JPEG copy of CIFAR-10"``.
    device:
        The device the chapter computed on (default: CUDA when available, else CPU).
    """
    current = mode()
    label = "full mode" if current == "full" else "smoke mode (tiny budgets, not for reading)"
    today = datetime.date.today().isoformat()
    return (f"{PREFIX} {label} | {device_description(device)} | torch {torch.__version__} | "
            f"python {platform.python_version()} | bnn_course {__version__} | data: {data} | "
            f"{today}")
