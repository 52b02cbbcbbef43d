"""Committed notebooks carry the outputs of a full-mode run of the whole notebook.

Every chapter has outputs, and its provenance line names full mode and the tier (GPU or CPU)
it ran on. Smoke-mode outputs (from CI or pytest) must never be committed.
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
def test_outputs_come_from_a_full_run(path: Path) -> None:
    notebook = json.loads(path.read_text())
    outputs = _outputs(notebook)
    assert outputs, f"{path.name} must be committed with the outputs of a full-mode run"
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name} has errors"
    lines = [line for o in outputs for line in _output_text(o).splitlines()
             if line.startswith(PREFIX)]
    assert lines, f"{path.name} has outputs but no provenance line"
    assert all("full mode" in line for line in lines), f"{path.name}: {lines}"
    assert all(re.search(r"full mode, (GPU|CPU) tier", line) for line in lines), (
        f"{path.name}: the provenance line must name the tier: {lines}")
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


def _glued_values(notebook: dict) -> dict[str, str]:
    values = {}
    for output in _outputs(notebook):
        data = output.get("data", {})
        if "application/papermill.record/text/plain" in data:
            name = output["metadata"]["scrapbook"]["name"]
            values[name] = data["application/papermill.record/text/plain"]
    return values


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_glue_reference_has_a_value_that_formats(path: Path) -> None:
    """``{glue:text}`name:fmt``` in the prose needs a glued ``name`` whose stored text
    MyST-NB can format with ``fmt`` (a NumPy scalar's repr, for one, cannot)."""
    format_plain_text = pytest.importorskip("myst_nb.core.variables").format_plain_text
    notebook = json.loads(path.read_text())
    values = _glued_values(notebook)
    prose = "".join("".join(cell["source"]) for cell in notebook["cells"]
                    if cell["cell_type"] == "markdown")
    problems = []
    for reference in re.findall(r"\{glue:text\}`([^`]+)`", prose):
        name, _, spec = reference.partition(":")
        if name not in values:
            problems.append(f"{name}: never glued")
            continue
        try:
            format_plain_text(values[name], spec)
        except Exception as error:  # noqa: BLE001 - any failure breaks the build
            problems.append(f"{name}:{spec}: {values[name][:40]!r} ({error})")
    assert not problems, f"{path.name}: {problems}"
