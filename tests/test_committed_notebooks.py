"""Committed notebooks carry a full-mode run's outputs, or no outputs at all.

A notebook marks itself as a GPU chapter with ``"bnn_course": {"needs_gpu": true}`` in its
metadata; only such a chapter may be committed without outputs (awaiting its run on a GPU).
Smoke-mode outputs (from CI or pytest) must never be committed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bnn_course.provenance import PREFIX

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _outputs(notebook: dict) -> list[dict]:
    return [output for cell in notebook["cells"] if cell["cell_type"] == "code"
            for output in cell.get("outputs", [])]


def _output_text(output: dict) -> str:
    if "text" in output:
        text = output["text"]
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_come_from_a_full_run_or_are_absent(path: Path) -> None:
    notebook = json.loads(path.read_text())
    outputs = _outputs(notebook)
    needs_gpu = notebook["metadata"].get("bnn_course", {}).get("needs_gpu", False)
    if not outputs:
        assert needs_gpu, f"{path.name} is a CPU chapter and must be committed with outputs"
        return
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name} has errors"
    lines = [line for o in outputs for line in _output_text(o).splitlines()
             if line.startswith(PREFIX)]
    assert lines, f"{path.name} has outputs but no provenance line"
    assert all("full mode" in line for line in lines), f"{path.name}: {lines}"
    assert not any("smoke" in line for line in lines), f"{path.name} carries smoke outputs"
    counts = [cell.get("execution_count") for cell in notebook["cells"]
              if cell["cell_type"] == "code" and cell.get("execution_count") is not None]
    assert counts == sorted(counts), f"{path.name} was not executed top to bottom"


def _repository_url() -> str:
    config = (ROOT / "_config.yml").read_text()
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", config, flags=re.MULTILINE)
    assert match, "_config.yml must name the repository url"
    return match.group(1).rstrip("/")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_installs_the_package_in_colab_only(path: Path) -> None:
    notebook = json.loads(path.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    first = "".join(code_cells[0]["source"])
    assert 'if "google.colab" in sys.modules' in first
    assert f"git+{_repository_url()}" in first, "install URL differs from _config.yml"
