r"""Choosing chapter 9's recipes on held-out training images: the sweep, and its record.

Chapter 9's two new variational learners, the sigma-aware BBB recipe and IVON, have
settings that must be chosen, and the test set must play no part in choosing them. Every
candidate of :func:`bnn_course.chapter_runs.posterior_candidates` is trained at chapter 6's
budget of one tier on the 45,000 training images it keeps, and scored on the 5,000 it holds
out (:func:`bnn_course.train.validation_set`): the NLL of its predictive with ``S`` weight
samples, its accuracy, and the verdict of :func:`bnn_course.convergence.convergence_report`.
Within each family the chosen candidate is

* the one with the lowest held-out NLL among those whose :math:`\sigma` converged, or,
  when none did, the one with the lowest held-out NLL (and the record says so).

``python -m bnn_course.tuning --tier cpu --out runs/posterior-sweep-cpu`` runs the sweep
(resuming finished candidates) and writes ``sweep.json`` there; with ``--record PATH`` it
also writes the same document with a ``"record"`` block (machine, torch, commit, command,
date), which is kept in ``bnn_course/recorded/sweeps/posterior-sweep-<tier>.json`` and shown
in chapter 9 as a recorded run. The "posterior" budget of that tier takes the chosen
settings (``tests/test_tuning.py`` checks that they agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bnn_course import config as run_config
from bnn_course.chapter_runs import posterior_candidates
from bnn_course.convergence import convergence_report
from bnn_course.data import load_cifar10
from bnn_course.evaluation import evaluate
from bnn_course.run_folder import atomic_write_text, provenance
from bnn_course.seeding import seed_everything
from bnn_course.train import (
    CommandLineParser,
    run_command_line,
    train,
    training_set,
    validation_set,
)

SWEEP_NAME = "sweep.json"


def choose(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The chosen candidate of every family, with the rule that chose it.

    ``rows`` have ``name``, ``family``, ``validation_nll`` and ``verdict``. Returns
    ``{family: {"name": ..., "rule": ...}}``: the lowest held-out NLL among the converged
    candidates of the family, or among all of them when none converged.
    """
    chosen = {}
    for family in dict.fromkeys(row["family"] for row in rows):
        members = [row for row in rows if row["family"] == family]
        converged = [row for row in members if row["verdict"] == "converged"]
        pool = converged or members
        best = min(pool, key=lambda row: row["validation_nll"])
        rule = ("lowest held-out NLL among the converged candidates" if converged else
                "lowest held-out NLL; no candidate converged")
        chosen[family] = {"name": best["name"], "rule": rule}
    return chosen


def run_sweep(tier: str, data_root: str | None, out_dir: str | Path,
              names: Sequence[str] | None = None, log=print) -> dict[str, Any]:
    """Train and score every candidate of ``tier`` (or those in ``names``) and return the
    sweep document (also written to ``out_dir/sweep.json``)."""
    if tier not in (*run_config.TIERS, "smoke"):
        raise ValueError(f"tier must be one of {(*run_config.TIERS, 'smoke')}, got {tier!r}")
    candidates = posterior_candidates(tier)
    unknown = sorted(set(names or ()) - set(candidates))
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; choose from {sorted(candidates)}")
    budget = run_config.BUDGETS["posterior"][tier]
    data = load_cifar10(data_root, smoke=tier == "smoke", device="cpu")
    out = Path(out_dir)
    rows = []
    device = None
    for name, (family, config) in candidates.items():
        if names and name not in names:
            continue
        folder = out / name.replace(" ", "-").replace(",", "")
        started = time.perf_counter()
        result = train(config, data, out_dir=folder, resume=True,
                       log=lambda line, name=name: log(f"{name}: {line}"))
        device = result.device
        images, labels = validation_set(config, data)
        model_device = next(result.model.parameters()).device
        seed_everything(0)
        scores = evaluate(result.model, images.to(model_device), labels.to(model_device),
                          budget["num_samples"])
        num_train = int(training_set(config, data)[1].shape[0])
        report = convergence_report(result.history, config, num_train)
        rows.append({
            "name": name, "family": family, "config": dataclasses.asdict(config),
            "validation_nll": scores["nll_mc"], "validation_accuracy": scores["accuracy_mc"],
            "validation_samples": budget["num_samples"], "verdict": report.verdict,
            "reason": report.reason, "max_share": report.max_share,
            "hessian_memory": report.hessian_memory,
            "kl_per_example": report.kl_per_example[-1], "train_nll": report.nll[-1],
            "kl_per_example_by_epoch": report.kl_per_example,
            "train_nll_by_epoch": report.nll,
            "training_seconds": sum(r["seconds"] for r in result.history),
            "wall_seconds": time.perf_counter() - started,
        })
        log(f"{name}: held-out NLL {scores['nll_mc']:.4f}, accuracy "
            f"{scores['accuracy_mc']:.4f}; {report.verdict}")
    document = {
        "tier": tier,
        "candidates": [_finite(row) for row in rows],
        "chosen": choose(rows),
        "held_out_images": int(candidates[next(iter(candidates))][1].validation_size),
        "provenance": provenance(device or "cpu", smoke=tier == "smoke",
                                 data_source=data.source),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SWEEP_NAME, json.dumps(document, indent=2))
    return document


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (IVON's step-bound share, Adam's Hessian memory) as ``None`` for JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def record_block(document: Mapping[str, Any], argv: Sequence[str]) -> dict[str, Any]:
    """Where and how a sweep was made, for its record: the fields of
    :data:`bnn_course.recorded.RECORD_FIELDS` (``stands_for`` names chapter 9's sweep)."""
    import datetime
    import platform
    import shlex

    from bnn_course.provenance import git_state

    git = git_state()
    prov = document["provenance"]
    kept, skip = [], False
    for argument in argv:  # the command without --record PATH (where the copy went)
        if skip or argument.startswith("--record="):
            skip = False
            continue
        if argument == "--record":
            skip = True
            continue
        kept.append(shlex.quote(argument))
    command = "python -m bnn_course.tuning " + " ".join(kept)
    return {
        "stands_for": {"chapter": "posterior", "tier": document["tier"], "run": "sweep"},
        "device": prov["device"], "hardware": prov["device"], "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": (git["git_commit"] or "unknown") + ("+dirty" if git["git_dirty"] else ""),
        "command": command, "date": datetime.date.today().isoformat(),
        "made_by": "bnn_course.tuning (this project's command line)",
        "source": "runs of python -m bnn_course.train's engine, scored on the held-out "
                  "training images",
        "notes": [],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m bnn_course.tuning",
        description="Train chapter 9's candidate recipes at chapter 6's budget of a tier and "
                    "score them on the held-out training images; writes OUT/sweep.json.")
    parser.add_argument("--tier", choices=(*run_config.TIERS, "smoke"), required=True,
                        help="whose budget: gpu, cpu, or smoke (tiny, to check it runs)")
    parser.add_argument("--data", default=None, help="folder with CIFAR-10 (default: "
                        "$BNN_COURSE_DATA, else ~/.cache/bnn_course/data)")
    parser.add_argument("--out", required=True, help="output folder (one run folder per "
                        "candidate; finished ones are reused)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="train only this candidate (repeatable)")
    parser.add_argument("--record", default=None, metavar="PATH",
                        help="also write the sweep with its provenance block to PATH")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback")
    return parser


def _main(argv: list[str]) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    document = run_sweep(args.tier, args.data, args.out, args.only)
    if args.record is not None:
        atomic_write_text(args.record, json.dumps(
            {**document, "record": record_block(document, argv)}, indent=2))
    for family, chosen in document["chosen"].items():
        print(f"{family}: {chosen['name']} ({chosen['rule']})")
    return document


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m bnn_course.tuning`` (errors as one ``error: ...`` line)."""
    return run_command_line(_main, argv)


if __name__ == "__main__":
    main()
