"""The git state recorded with a run: the commit of the project's own repository, or none."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bnn_course import provenance as provenance_module
from bnn_course.provenance import git_state, project_root
from bnn_course.run_folder import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture(autouse=True)
def git_sees_only_the_test_repositories(monkeypatch, tmp_path) -> None:
    """No repository around the temporary folder, nor one named by the environment (a git
    hook sets ``GIT_DIR``), changes what git finds."""
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def git(folder: Path, *arguments: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
         *arguments], cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def make_project(folder: Path) -> Path:
    """The minimal layout of the project: ``pyproject.toml``, ``bnn_course/``, ``benchmarks/``."""
    (folder / "bnn_course").mkdir(parents=True)
    (folder / "bnn_course" / "__init__.py").write_text('__version__ = "0"\n')
    (folder / "benchmarks").mkdir()
    (folder / "benchmarks" / "throughput.py").write_text("x = 1\n")
    (folder / "pyproject.toml").write_text('[project]\nname = "bnn-course"\n')
    return folder


def commit_everything(repository: Path) -> str:
    """Commit all files of ``repository``; returns the commit's hash."""
    git(repository, "add", "-A")
    git(repository, "commit", "-q", "-m", "a commit")
    return git(repository, "rev-parse", "HEAD")


def test_the_projects_own_repository_records_its_commit_and_changes(tmp_path) -> None:
    tmp_path = tmp_path.resolve()  # git names folders with symbolic links resolved
    project = make_project(tmp_path / "bnn-course")
    git(project, "init", "-q")
    head = commit_everything(project)
    assert len(head) == 40
    for folder in (project, project / "bnn_course", project / "benchmarks"):
        assert project_root(folder) == project.resolve()
        state = git_state(folder)
        assert (state["git_commit"], state["git_dirty"]) == (head, False)
        assert state["git_note"] == (f"HEAD of the project's own repository {project}, no "
                                     "uncommitted changes to tracked files")
    (project / "untracked.txt").write_text("not code")
    assert git_state(project)["git_dirty"] is False
    (project / "bnn_course" / "__init__.py").write_text('__version__ = "1"\n')
    state = git_state(project / "benchmarks")
    assert (state["git_commit"], state["git_dirty"]) == (head, True)
    assert state["git_note"].endswith("with uncommitted changes to tracked files")


def test_a_copy_inside_another_repository_records_no_commit(tmp_path) -> None:
    tmp_path = tmp_path.resolve()  # git names folders with symbolic links resolved
    # Regression: the copy recorded the commit of the repository around it.
    outer = tmp_path / "outer"
    outer.mkdir()
    git(outer, "init", "-q")
    (outer / "README.md").write_text("another project\n")
    copy = make_project(outer / "courses" / "bnn-course")
    outer_head = commit_everything(outer)
    assert git(copy / "bnn_course", "rev-parse", "HEAD") == outer_head  # what git would say
    for folder in (copy, copy / "bnn_course", copy / "benchmarks"):
        assert project_root(folder) == copy.resolve()
        state = git_state(folder)
        assert state["git_commit"] is None and state["git_dirty"] is None
        assert state["git_note"] == (
            f"no commit recorded: the project {copy} is not its own git repository but lies "
            f"inside the repository {outer}, whose commit would not identify this code")
    # Given its own repository (nested in the other one), the copy records its own commit.
    git(copy, "init", "-q")
    own_head = commit_everything(copy)
    assert own_head != outer_head
    assert git_state(copy / "bnn_course")["git_commit"] == own_head


def test_no_commit_outside_a_repository_or_a_project_or_before_the_first_commit(
        tmp_path) -> None:
    tmp_path = tmp_path.resolve()  # git names folders with symbolic links resolved
    project = make_project(tmp_path / "bnn-course")
    state = git_state(project)
    assert (state["git_commit"], state["git_dirty"]) == (None, None)
    assert "is not in a git checkout" in state["git_note"]
    git(project, "init", "-q")
    assert git_state(project) == {
        "git_commit": None, "git_dirty": None,
        "git_note": f"no commit recorded: the repository {project} has no commit yet"}
    (tmp_path / "elsewhere").mkdir()
    assert project_root(tmp_path / "elsewhere") is None
    state = git_state(tmp_path / "elsewhere")
    assert state["git_commit"] is None and "no bnn-course project folder" in state["git_note"]
    (project / "pyproject.toml").unlink()  # bnn_course/ alone is not the project's root
    assert project_root(project / "bnn_course") is None


def test_a_runs_provenance_records_the_commit_of_the_packages_own_project(
        tmp_path, monkeypatch) -> None:
    tmp_path = tmp_path.resolve()  # git names folders with symbolic links resolved
    own = make_project(tmp_path / "own")
    git(own, "init", "-q")
    own_head = commit_everything(own)
    outer = tmp_path / "outer"
    outer.mkdir()
    git(outer, "init", "-q")
    copy = make_project(outer / "bnn-course")
    commit_everything(outer)
    # An installed package in a virtual environment inside the checkout: no project of its
    # own, although the folders above it hold one.
    installed = own / ".venv" / "lib" / "site-packages" / "bnn_course"
    installed.mkdir(parents=True)

    monkeypatch.setattr(provenance_module, "PACKAGE_DIR", own / "bnn_course")
    record = provenance("cpu", smoke=True, data_source="somewhere", num_test=3)
    assert (record["git_commit"], record["git_dirty"]) == (own_head, False)
    assert record["mode"] == "smoke" and record["num_test"] == 3
    assert record["data_source"] == "somewhere" and record["device"].startswith("CPU")
    assert {"torch", "python", "bnn_course", "git_note"} <= set(record)

    monkeypatch.setattr(provenance_module, "PACKAGE_DIR", copy / "bnn_course")
    record = provenance("cpu", smoke=True, data_source="somewhere")
    assert (record["git_commit"], record["git_dirty"]) == (None, None)
    assert f"lies inside the repository {outer}" in record["git_note"]

    monkeypatch.setattr(provenance_module, "PACKAGE_DIR", installed)
    assert project_root() is None
    assert git_state() == {
        "git_commit": None, "git_dirty": None,
        "git_note": f"no commit recorded: the package {installed} is installed, not in a "
                    "project folder (there is no pyproject.toml beside it)"}
