"""The command lines ``python -m bnn_course.train`` and ``python -m bnn_course.comparison``.

Every expected failure is one line ``error: ...`` on stderr and a non-zero exit status,
without a traceback (``--debug`` or ``BNN_COURSE_DEBUG=1`` shows it). Most checks call
``main([...])`` in-process; a few run the real command in a subprocess. Runs use the
synthetic stand-in (smoke mode, no CIFAR-10 anywhere) and a tiny network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnn_course import comparison
from bnn_course import config as run_config
from bnn_course import train as engine
from bnn_course.train import CheckpointError, TrainConfig, main, run_command_line

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--batch-size", "64", "--train-subset", "200", "--eval-samples", "2",
        "--epoch-eval-samples", "1", "--device", "cpu", "--channels", "4,8",
        "--hidden-features", "16", "--no-progress"]

pytestmark = pytest.mark.filterwarnings("ignore:SYNTHETIC STAND-IN")


@pytest.fixture(autouse=True)
def no_cifar10_anywhere(monkeypatch, tmp_path):
    """A private HOME, no BNN_COURSE_DATA, no download: smoke mode uses the stand-in."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(run_config.DATA_ENV, raising=False)
    monkeypatch.delenv(run_config.DEBUG_ENV, raising=False)

    def refuse(root):
        raise OSError("no network in tests")

    monkeypatch.setattr("bnn_course.data._download", refuse)


def error_line(capsys, argv: list[str], status: int = 1, command=main) -> str:
    """Run ``command(argv)``, expect exit ``status`` and exactly one stderr line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    assert exit_info.value.code == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def run_module(module: str, *arguments: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment.pop(run_config.DEBUG_ENV, None) if run_config.DEBUG_ENV not in env else None
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------- real processes


def test_a_bad_value_is_one_error_line_in_a_real_process(tmp_path) -> None:
    done = run_module("bnn_course.train", "--lr", "inf", "--out", str(tmp_path / "run"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: invalid training configuration: lr=inf")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(tmp_path, how) -> None:
    arguments = ["--lr", "inf", "--out", str(tmp_path / "run")]
    if how == "flag":
        done = run_module("bnn_course.train", *arguments, "--debug")
    else:
        done = run_module("bnn_course.train", *arguments, **{run_config.DEBUG_ENV: "1"})
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ValueError" in done.stderr


def test_the_comparison_reports_errors_the_same_way_in_a_real_process(tmp_path) -> None:
    done = run_module("bnn_course.comparison", "--kl-weight", "nan", "--out", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: invalid training configuration: kl_weight=nan")


# ---------------------------------------------------------------------- in-process


def test_bad_flag_values_are_one_line(capsys) -> None:
    line = error_line(capsys, ["--kl-scaling", "none"], status=2)
    assert "--kl-scaling" in line and "invalid choice" in line
    assert "comma-separated positive integers" in error_line(capsys, ["--channels", ""], 2)
    assert "comma-separated positive integers" in error_line(capsys, ["--channels", "4,x"], 2)
    assert "init_log_sigma=nan" in error_line(capsys, ["--init-log-sigma", "nan"])
    assert "prior_sigma=inf" in error_line(capsys, ["--prior-sigma", "inf"])


def test_missing_data_and_unavailable_devices_are_one_line(capsys, tmp_path) -> None:
    missing = str(tmp_path / "mistyped")
    assert "does not exist" in error_line(capsys, [*TINY, "--data", missing])
    assert not Path(missing).exists()
    # the device is checked before the data are loaded: the device error comes first
    assert "not a device name" in error_line(capsys, ["--device", "gpu0", "--data", missing])
    if not torch.cuda.is_available():
        line = error_line(capsys, ["--device", "cuda", "--data", missing])
        assert "CUDA is not available" in line
    line = error_line(capsys, ["--device", "gpu0", "--data", missing], command=comparison.main)
    assert "not a device name" in line
    assert "does not exist" in error_line(capsys, ["--data", missing], command=comparison.main)


def test_foreign_and_damaged_checkpoints_are_one_line(capsys, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"some": "thing"}, out / "checkpoint.pt")
    line = error_line(capsys, [*TINY, "--out", str(out), "--resume"])
    assert "not a bnn_course training checkpoint" in line
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 not a zip")
    assert "corrupt, truncated" in error_line(capsys, [*TINY, "--out", str(out), "--resume"])


def test_multi_line_messages_become_one_line(capsys) -> None:
    def body(argv: list[str]) -> None:
        raise CheckpointError("Error(s) in loading state_dict:\n\tMissing key(s): a.b\n")

    line = error_line(capsys, [], command=lambda argv: run_command_line(body, argv))
    assert line.startswith("error: Error(s) in loading state_dict: Missing key(s): a.b")


def test_divergence_is_one_line(capsys, tmp_path) -> None:
    line = error_line(capsys, [*TINY, "--init-log-sigma", "30", "--out", str(tmp_path / "r")])
    assert line.startswith("error: training diverged")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_smoke_mode_comes_from_the_environment_too(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(run_config.SMOKE_ENV, "1")  # as the notebooks read it; no --smoke
    document = main([*TINY, "--out", str(tmp_path / "a")])
    assert document["provenance"]["mode"] == "smoke"
    assert document["provenance"]["data_is_synthetic"] is True
    monkeypatch.setenv(run_config.SMOKE_ENV, "maybe")
    assert run_config.SMOKE_ENV in error_line(capsys, [*TINY, "--out", str(tmp_path / "b")])
    monkeypatch.setenv(run_config.SMOKE_ENV, "0")  # full mode: no stand-in, a clear error
    assert "CIFAR-10" in error_line(capsys, [*TINY, "--out", str(tmp_path / "c")])


def test_zero_eval_samples_completes(capsys, tmp_path) -> None:
    document = main([*TINY, "--eval-samples", "0", "--out", str(tmp_path)])
    assert document["final"]["test_accuracy_mc"] is None
    assert document["final"]["eval_samples"] == 0
    assert "no MC evaluation" in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"] == document["final"]
    assert {"git_commit", "git_dirty"} <= set(saved["provenance"])


def test_an_occupied_output_folder_needs_resume_or_overwrite(capsys, tmp_path) -> None:
    main([*TINY, "--out", str(tmp_path)])
    line = error_line(capsys, [*TINY, "--lr", "0.01", "--out", str(tmp_path)])
    assert "already holds a run" in line and "--overwrite" in line
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["lr"] == 1e-3
    document = main([*TINY, "--lr", "0.01", "--out", str(tmp_path), "--overwrite"])
    assert document["config"]["lr"] == 0.01
    main([*TINY, "--lr", "0.01", "--out", str(tmp_path), "--resume"])  # finished: no epoch


# ---------------------------------------------------------------------- one definition


def test_every_field_is_a_flag_of_both_commands() -> None:
    train_flags = {a.dest for a in engine.build_parser()._actions}
    comparison_flags = {a.dest for a in comparison.build_parser()._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= train_flags
    assert fields - {"model", "eval_samples", "epoch_eval_samples"} <= comparison_flags


def test_flags_parse_to_the_config_they_name() -> None:
    wanted = TrainConfig(kl_weight=0.5, kl_scaling="unscaled", kl_warmup_epochs=1.5,
                         init_log_sigma=-4.0, prior_sigma=0.5, parametrization="softplus",
                         channels=(8, 16), train_subset=500, augment=False, amp=False,
                         dropout=0.2, lr=0.01, schedule="constant")
    flags = ["--kl-weight", "0.5", "--kl-scaling", "unscaled", "--kl-warmup-epochs", "1.5",
             "--init-log-sigma", "-4", "--prior-sigma", "0.5", "--parametrization", "softplus",
             "--channels", "8,16", "--train-subset", "500", "--no-augment", "--no-amp",
             "--dropout", "0.2", "--lr", "0.01", "--schedule", "constant"]
    args = engine.build_parser().parse_args(flags)
    assert engine.config_from_arguments(args) == wanted
    args = comparison.build_parser().parse_args(flags)
    base = comparison.base_config_from_arguments(args)
    assert base == dataclasses.replace(wanted, eval_samples=0, epoch_eval_samples=0,
                                       progress=False)
    help_text = engine.build_parser().format_help()
    assert "beta, the weight of the KL term" in help_text  # the help beside the field


def test_comparison_flags_naming_nothing_are_usage_errors(capsys, tmp_path) -> None:
    # Regression: an empty --methods ended in a StopIteration traceback; an unknown
    # --ood-sets name or --reuse run name was silently ignored.
    run = comparison.main
    assert "--methods needs at least one" in error_line(capsys, ["--methods", ","], 2, run)
    line = error_line(capsys, ["--ood-sets", "sklearn-digits,svnh"], 2, run)
    assert "unknown ['svnh']" in line
    line = error_line(capsys, ["--reuse", f"bayesain={tmp_path}/checkpoint.pt"], 2, run)
    assert "unknown run 'bayesain'" in line


def test_an_output_folder_below_a_file_fails_before_the_data_are_loaded(capsys, tmp_path,
                                                                        monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before the output folder was checked")

    monkeypatch.setattr(comparison, "load_cifar10", no_data)
    monkeypatch.setattr(engine, "load_cifar10", no_data)
    out = str(blocker / "run")
    assert "is a file, not a folder" in error_line(capsys, [*TINY, "--out", out])
    assert "is a file, not a folder" in error_line(capsys, ["--out", out], command=comparison.main)


@pytest.mark.parametrize(("flags", "message"), [
    (["--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["--corruption-samples", "0"], "--corruption-samples must be >= 1"),
    (["--corruptions", "gaussian_noise,fog"], "--corruptions: unknown ['fog']"),
    (["--severities", "0,3"], "--severities must be among 1,2,3,4,5"),
    (["--severities", "x"], "comma-separated integers in 1..5"),
    (["--dropout", "0"], "mc_dropout needs --dropout > 0"),
])
def test_comparison_refuses_what_its_evaluation_would_refuse_before_training(
        capsys, tmp_path, monkeypatch, flags, message) -> None:
    # Regression: these failed only after every network had been trained.
    def no_training(*args, **kwargs):
        raise AssertionError("training started before the flags were checked")

    monkeypatch.setattr(comparison, "load_cifar10", no_training)
    monkeypatch.setattr(comparison, "train_methods", no_training)
    line = error_line(capsys, ["--out", str(tmp_path), *flags], 2, comparison.main)
    assert message in line


def test_comparison_removes_its_old_result_before_training(capsys, tmp_path,
                                                           monkeypatch) -> None:
    # Regression: a comparison that failed while training left the previous comparison.json
    # beside the new checkpoints.
    (tmp_path / comparison.COMPARISON_NAME).write_text("{}")

    def failing_training(*args, **kwargs):
        raise ValueError("training failed")

    monkeypatch.setattr(comparison, "train_methods", failing_training)
    argv = ["--smoke", "--no-download", "--out", str(tmp_path), "--ood-max-images", "10"]
    assert "training failed" in error_line(capsys, argv, 1, comparison.main)
    assert not (tmp_path / comparison.COMPARISON_NAME).exists()


def test_resume_and_overwrite_together_are_a_usage_error(capsys, tmp_path) -> None:
    # Regression: --overwrite deleted the checkpoint that --resume was asked to continue.
    line = error_line(capsys, [*TINY, "--out", str(tmp_path), "--resume", "--overwrite"], 2)
    assert "--resume and --overwrite exclude each other" in line
