"""The comparison of the BayesianCNN with its baselines (bnn_course.comparison).

Tiny networks on the synthetic stand-in keep every test to seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from bnn_course.chapter_runs import training_config, uncertainty_configs
from bnn_course.comparison import (
    COMPARED,
    ECE_FLOOR_SIMULATIONS,
    METHODS,
    POSTERIOR_MEAN,
    choose_dropout,
    compared_models,
    comparison_rows,
    config_differences,
    corruption_seed,
    cost_rows,
    evaluate_corruptions,
    evaluate_methods,
    format_table,
    iterate_corrupted,
    main,
    method_configs,
    metric_direction,
    ood_aurocs,
    paired_difference,
    resample_weights,
    sample_probs_for,
    seed_difference,
    summary_metrics,
    train_methods,
    validation_split,
    verdict,
    weighted_auroc,
    weighted_ece,
)
from bnn_course.data import normalize, stratified_subset, synthetic_cifar10
from bnn_course.metrics import (
    OOD_SCORES,
    auroc,
    calibrated_ece_expectation,
    ece_noise_floor,
    excess_aurc,
    expected_calibration_error,
    misclassification_auroc,
    ood_scores,
    selective_prediction,
)
from bnn_course.models import BayesianCNN, DeterministicCNN
from bnn_course.ood import uniform_noise
from bnn_course.train import TrainConfig, load_checkpoint, train, validation_set
from bnn_course.uncertainty import decompose_uncertainty, mutual_information

TINY = {"channels": (4, 8), "hidden_features": 16, "batch_size": 40, "device": "cpu",
        "progress": False, "epoch_eval_samples": 0, "eval_samples": 0, "epochs": 1}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_data():
    return synthetic_cifar10(train_per_class=8, test_per_class=4, seed=3)


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    bayesian = BayesianCNN(channels=(4, 8), hidden_features=16, init_log_sigma=-2.0).eval()
    deterministic = DeterministicCNN(channels=(4, 8), hidden_features=16).eval()
    dropout = DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.5).eval()
    members = [DeterministicCNN(channels=(4, 8), hidden_features=16).eval() for _ in range(3)]
    return {"bayesian": [bayesian], "deterministic": [deterministic],
            "mc_dropout": [dropout], "ensemble": members}


def test_sample_probs_shapes_and_rows(networks, tiny_data) -> None:
    images = tiny_data.test_images[:12]
    expected_samples = {"bayesian": 5, "deterministic": 1, "mc_dropout": 5, "ensemble": 3}
    for method in METHODS:
        probs = sample_probs_for(method, networks[method], images, num_samples=5)
        assert probs.shape == (expected_samples[method], 12, 10), method
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5)
        assert (probs >= 0).all()


def test_mutual_information_zero_for_one_network_positive_for_samples(networks,
                                                                      tiny_data) -> None:
    images = tiny_data.test_images[:12]
    single = sample_probs_for("deterministic", networks["deterministic"], images, 5)
    assert torch.equal(mutual_information(single), torch.zeros(12))
    # sampled weights (sigma = e^-2) and dropout masks disagree: MI > 0 for every input
    for method in ("bayesian", "mc_dropout", "ensemble"):
        probs = sample_probs_for(method, networks[method], images, 5)
        assert (mutual_information(probs) > 1e-7).all(), method


def test_ensemble_samples_are_the_members_passes(networks, tiny_data) -> None:
    images = tiny_data.test_images[:12]
    members = networks["ensemble"]
    probs = sample_probs_for("ensemble", members, images, num_samples=99)
    for index, member in enumerate(members):
        alone = sample_probs_for("deterministic", [member], images, 1)[0]
        assert torch.equal(probs[index], alone)


def test_sample_probs_rejects_mismatched_inputs(networks, tiny_data) -> None:
    images = tiny_data.test_images[:4]
    with pytest.raises(ValueError, match="one network"):
        sample_probs_for("bayesian", networks["ensemble"], images, 2)
    with pytest.raises(ValueError, match="dropout"):
        sample_probs_for("mc_dropout", networks["deterministic"], images, 2)
    with pytest.raises(ValueError, match="Bayesian layers"):
        sample_probs_for("bayesian", networks["deterministic"], images, 2)
    with pytest.raises(ValueError, match="unknown method"):
        sample_probs_for("laplace", networks["deterministic"], images, 2)


def test_metrics_use_the_average_of_probabilities() -> None:
    # Two samples, certain of different classes: the predictive is (1/2, 1/2), so the NLL is
    # log 2 and the Brier score 1/2 (averaging log-probabilities would give infinity).
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, N=1, K=2)
    labels = torch.tensor([0])
    metrics = summary_metrics(probs, labels)
    assert metrics["nll"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["brier"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["entropy"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["mutual_information"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["ece"] == pytest.approx(0.5, abs=1e-6)  # confidence 1/2, right: |1 - 1/2|


def test_ood_auroc_by_score_and_set() -> None:
    # In-distribution: confident single predictions; OOD: uniform -> perfectly separated
    confident = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2]])
    test = torch.stack([confident, confident])  # (2, 3, 2), samples agree: MI = 0
    ood = {"flat": torch.full((2, 4, 2), 0.5)}
    aurocs = ood_aurocs(test, ood)
    assert set(aurocs) == {f"auroc/flat/{score}" for score in OOD_SCORES}
    assert aurocs["auroc/flat/entropy"] == 1.0
    assert aurocs["auroc/flat/one_minus_max_prob"] == 1.0
    assert aurocs["auroc/flat/mutual_information"] == 0.5  # all zero: ties, chance
    assert math.isnan(ood_aurocs(test[:1], ood)["auroc/flat/mutual_information"])


def test_corruptions_are_repeatable_and_distinct(tiny_data) -> None:
    images = tiny_data.test_images[:6]
    first = list(iterate_corrupted(images, ["gaussian_noise", "contrast"], (1, 3), seed=5))
    again = list(iterate_corrupted(images, ["contrast", "gaussian_noise"], (3, 1), seed=5))
    assert [(n, s) for n, s, _ in first] == [("gaussian_noise", 1), ("gaussian_noise", 3),
                                             ("contrast", 1), ("contrast", 3)]
    by_key = {(n, s): x for n, s, x in again}
    for name, severity, corrupted in first:  # same images whatever the order
        assert torch.equal(corrupted, by_key[(name, severity)])
        assert corrupted.shape == images.shape and corrupted.dtype == torch.uint8
    assert corruption_seed(5, "gaussian_noise", 1) != corruption_seed(5, "gaussian_noise", 3)
    other = next(iterate_corrupted(images, ["gaussian_noise"], (1,), seed=6))[2]
    assert not torch.equal(other, first[0][2])


def test_rows_have_every_key_and_an_ensemble_of_copies_is_one_network(networks,
                                                                      tiny_data) -> None:
    member = networks["deterministic"][0]
    models = {"bayesian": networks["bayesian"], "deterministic": [member],
              "mc_dropout": networks["mc_dropout"], "ensemble": [member, member, member]}
    ood = {"noise": uniform_noise(10, torch.Generator().manual_seed(0)),
           "digits-ish": uniform_noise(8, torch.Generator().manual_seed(1)) // 2}
    corruptions = ["gaussian_noise", "contrast"]
    rows = evaluate_methods(models, tiny_data.test_images, tiny_data.test_labels, ood,
                            corruptions, severities=(1, 2, 3, 4, 5), num_samples=3,
                            corruption_samples=2, seed=0)
    assert [row["method"] for row in rows] == list(METHODS)
    summary = ("accuracy", "nll", "ece", "ece_floor", "ece_floor_95", "brier", "aurc",
               "excess_aurc", "misclassification_auroc", "entropy", "mutual_information")
    expected = {"method", "num_samples", *summary}
    expected |= {f"auroc/{name}/{score}" for name in ood for score in OOD_SCORES}
    expected |= {f"corruption/{name}/{s}/{metric}" for name in corruptions for s in range(1, 6)
                 for metric in summary}
    expected |= {f"severity/{s}/{metric}" for s in range(1, 6)
                 for metric in ("accuracy", "ece", "ece_floor")}
    for row in rows:
        assert set(row) == expected
    by_method = {row["method"]: row for row in rows}
    assert by_method["ensemble"]["num_samples"] == 3
    assert by_method["mc_dropout"]["num_samples"] == 3
    assert by_method["deterministic"]["num_samples"] == 1
    # three identical members: the same predictions as the member alone (corruptions
    # included, since every method sees the same corrupted images), and no disagreement
    single, ensemble = by_method["deterministic"], by_method["ensemble"]
    # The mean of three copies equals the member's probabilities up to float32 rounding
    # (a few 1e-8), so every metric agrees to 1e-6, except where rounding can reorder two
    # near-equal scores: an AUROC counts orderings of (test, OOD) pairs, and a pair whose
    # two float32 scores (about 2.3, spacing 2.4e-7) lie within 1e-6 may flip, moving the
    # AUROC by at most 1 / (number of pairs). The tolerance counts such pairs in the
    # member's own scores (an untrained network has near-ties; machines round differently).
    member_test = sample_probs_for("deterministic", [member], tiny_data.test_images, 1)
    member_scores = ood_scores(member_test)
    for key, value in single.items():
        if key in ("method", "num_samples") or "mutual_information" in key:
            continue
        if "misclassification_auroc" in key and math.isnan(value):
            assert math.isnan(ensemble[key]), key
            continue
        if key in ("aurc", "excess_aurc", "misclassification_auroc"):
            # ranked by the entropy: a near-tied pair (within 1e-6) may swap, moving the
            # AUROC by 1 / (wrong x right) and the AURC by at most (1 + log N) / N
            entropy = decompose_uncertainty(member_test).total.double()
            near = int((((entropy[:, None] - entropy[None, :]).abs() < 1e-6).sum().item()
                        - entropy.numel()) // 2)
            n = entropy.numel()
            wrong = int((member_test.mean(0).argmax(-1) != tiny_data.test_labels).sum())
            pairs = max(1, wrong * (n - wrong))
            step = 1 / pairs if key == "misclassification_auroc" else (1 + math.log(n)) / n
            assert ensemble[key] == pytest.approx(value, abs=1e-6 + near * step), key
            continue
        tolerance = 1e-6
        if key.startswith("auroc/"):
            _, name, score = key.split("/")
            inside = member_scores[score].double()
            outside = ood_scores(sample_probs_for("deterministic", [member], ood[name], 1))[
                score].double()
            near = ((inside[:, None] - outside[None, :]).abs() < 1e-6).sum().item()
            tolerance = 1e-12 + near / (inside.numel() * outside.numel())
        assert ensemble[key] == pytest.approx(value, abs=tolerance), key
    assert ensemble["mutual_information"] < 1e-6
    # the severity columns are the means over the corruptions
    for s in range(1, 6):
        for metric in ("accuracy", "ece_floor"):
            mean = sum(single[f"corruption/{n}/{s}/{metric}"] for n in corruptions) / 2
            assert single[f"severity/{s}/{metric}"] == pytest.approx(mean)
    table = format_table(rows, caption="test caption")
    lines = table.splitlines()
    assert lines[0] == "test caption"
    assert all(method in lines[1] for method in METHODS)
    assert sum(line.startswith("severity/") for line in lines) == 15
    # the ECE is shown with its floor, and the floor is never marked best
    keys = [line.split()[0] for line in lines[3:]]
    assert keys[keys.index("ece") + 1] == "ece_floor"
    assert "*" not in next(line for line in lines if line.startswith("ece_floor "))
    assert "n/a" in next(line for line in lines if "mutual_information" in line)


def test_comparison_rows_match_direct_metrics() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 50, 10), -1)
    labels = torch.randint(0, 10, (50,))
    row = comparison_rows({"bayesian": probs}, labels)[0]
    predictive = probs.mean(0)
    nll = -predictive[torch.arange(50), labels].double().log().mean().item()
    assert row["nll"] == pytest.approx(nll, rel=1e-6)
    assert row["accuracy"] == (predictive.argmax(-1) == labels).double().mean().item()
    one_hot = torch.nn.functional.one_hot(labels, 10)
    assert row["brier"] == pytest.approx((predictive - one_hot).pow(2).sum(-1).mean().item(),
                                         rel=1e-5)


def test_format_table_marks_the_best_value() -> None:
    rows = [{"method": "a", "accuracy": 0.9, "nll": 0.5},
            {"method": "b", "accuracy": 0.8, "nll": 0.4}]
    lines = format_table(rows, keys=["accuracy", "nll"]).splitlines()
    assert "0.9000*" in lines[2] and "0.8000*" not in lines[2]
    assert "0.4000*" in lines[3] and "0.5000*" not in lines[3]


def test_method_configs_share_the_budget() -> None:
    base = TrainConfig(epochs=3, seed=10, **{k: v for k, v in TINY.items() if k != "epochs"})
    runs = method_configs(base, METHODS, ensemble_size=3)
    assert [name for _, name, _ in runs] == ["bayesian", "deterministic", "mc_dropout",
                                             "ensemble-0", "ensemble-1", "ensemble-2"]
    configs = {name: config for _, name, config in runs}
    assert configs["mc_dropout"].model == "mc_dropout"
    assert [configs[f"ensemble-{i}"].seed for i in range(3)] == [10, 11, 12]
    assert configs["ensemble-0"] == configs["deterministic"]
    assert all(c.epochs == 3 and c.channels == (4, 8) for c in configs.values())


def test_train_methods_reuses_and_trains(tiny_data, tmp_path) -> None:
    base = TrainConfig(**TINY)
    # a finished Bayesian run, as chapter 6 leaves one
    saved = train(base, tiny_data, out_dir=tmp_path / "ch06", log=quiet)
    lines: list[str] = []
    result = train_methods(tiny_data, base, METHODS, ensemble_size=2, out_dir=tmp_path / "cmp",
                           checkpoints={"bayesian": tmp_path / "ch06" / "checkpoint.pt"},
                           log=lines.append)
    assert len(lines) == 5 and lines[0].startswith("bayesian: reused")
    bayesian = result.models["bayesian"][0]
    for key, value in saved.model.state_dict().items():
        assert torch.equal(bayesian.state_dict()[key], value)
    assert result.origins["ensemble-0"].startswith("same network as deterministic")
    assert result.models["ensemble"][0] is result.models["deterministic"][0]
    one, two = result.models["ensemble"]
    assert not torch.equal(one.classifier.weight, two.classifier.weight)  # other seed
    assert result.origins["mc_dropout"].startswith("trained here")
    assert result.models["mc_dropout"][0].dropout == base.dropout
    # a second call finds the finished runs in out_dir; another budget is not reused
    again = train_methods(tiny_data, base, ["deterministic"], out_dir=tmp_path / "cmp", log=quiet)
    assert again.origins["deterministic"].startswith("reused")
    other = TrainConfig(**{**TINY, "hidden_features": 8})
    lines.clear()
    train_methods(tiny_data, other, ["bayesian"], log=lines.append,
                  checkpoints={"bayesian": tmp_path / "ch06" / "checkpoint.pt"})
    assert lines[0].startswith("bayesian: trained here") and "hidden_features" in lines[0]


@pytest.fixture
def no_cifar10_anywhere(monkeypatch, tmp_path):
    """A private HOME, no BNN_COURSE_DATA: smoke mode falls back to the synthetic stand-in."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BNN_COURSE_DATA", raising=False)


@pytest.mark.filterwarnings("ignore:SYNTHETIC STAND-IN")
def test_command_line_smoke(tmp_path, capsys, no_cifar10_anywhere) -> None:
    out = tmp_path / "out"
    document = main(["--smoke", "--no-download",
                     "--out", str(out), "--train-subset", "100", "--test-subset", "50",
                     "--ood-max-images", "20", "--severities", "1,5",
                     "--corruption-samples", "1", "--eval-samples", "2"])
    written = json.loads((out / "comparison.json").read_text())
    assert written["methods"] == list(METHODS)
    assert [row["method"] for row in written["rows"]] == list(METHODS)
    assert set(written["ood_sets"]) == {"sklearn-digits", "uniform-noise"}
    assert written["provenance"]["data_name"] == "synthetic stand-in (not CIFAR-10)"
    assert written["rows"][1]["auroc/uniform-noise/mutual_information"] is None  # NaN
    assert "severity/5/accuracy" in written["rows"][0] and len(document["rows"]) == 4
    printed = capsys.readouterr().out
    assert "OOD sets: sklearn-digits (20), uniform-noise (20)" in printed
    assert "severity/1/ece" in printed and "wrote" in printed


def test_an_interrupted_run_of_the_comparison_says_it_resumed(tiny_data, tmp_path) -> None:
    # Regression: the log said "trained here: 2 epochs" after training only the second.
    base = TrainConfig(**{**TINY, "epochs": 2})
    interrupted = dataclasses.replace(base, model="deterministic", epochs=1)
    train(interrupted, tiny_data, out_dir=tmp_path / "deterministic", log=quiet)
    path = tmp_path / "deterministic" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["epochs"] = 2  # as if killed after epoch 1 of 2
    torch.save(state, path)
    lines: list[str] = []
    train_methods(tiny_data, base, ["deterministic"], out_dir=tmp_path, log=lines.append)
    assert "trained here: epochs 2-2 (resumed after epoch 1)" in lines[0]


def test_validation_split_is_stratified_disjoint_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(7)  # 7 images per class, class-blocked
    images = torch.arange(70)  # each image is its own index
    rest, rest_labels, held, held_labels = validation_split(images, labels, 30, seed=5)
    assert torch.equal(torch.bincount(held_labels, minlength=10), torch.full((10,), 3))
    assert torch.equal(torch.bincount(rest_labels, minlength=10), torch.full((10,), 4))
    assert torch.equal(torch.sort(torch.cat([rest, held])).values, images)  # a partition
    assert torch.equal(labels[held], held_labels) and torch.equal(labels[rest], rest_labels)
    assert bool((held[1:] > held[:-1]).all())  # original order kept
    again = validation_split(images, labels, 30, seed=5)[2]
    other = validation_split(images, labels, 30, seed=6)[2]
    assert torch.equal(again, held) and not torch.equal(other, held)
    # not simply the first images of each class (what stratified_subset takes)
    assert not torch.equal(held, stratified_subset(images, labels, 30)[0])
    with pytest.raises(ValueError, match="multiple"):
        validation_split(images, labels, 25)
    with pytest.raises(ValueError, match="leave none"):
        validation_split(images, labels, 70)


def test_choose_dropout_picks_the_lowest_held_out_nll_and_reuses_its_runs(tmp_path) -> None:
    data = synthetic_cifar10(train_per_class=12, test_per_class=2, seed=4)
    base = TrainConfig(**TINY)
    candidates = [(0.1, 0.0), (0.5, 0.3), (0.0, 0.2)]
    torch.manual_seed(0)
    sweep = choose_dropout(data, base, candidates, validation_size=40, epochs=1,
                           num_samples=3, out_dir=tmp_path, log=quiet)
    assert [(row["dropout"], row["conv_dropout"]) for row in sweep.rows] == candidates
    best = min(sweep.rows, key=lambda row: row["nll"])
    assert sweep.chosen == (best["dropout"], best["conv_dropout"])
    assert all(row["origin"].startswith("trained here") for row in sweep.rows)
    assert sweep.training_seconds == pytest.approx(sum(row["seconds"] for row in sweep.rows))
    for row in sweep.rows:
        assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0 and 0 <= row["brier"] <= 2
    # each candidate trained its own mc_dropout network on the 80 remaining images
    saved = torch.load(tmp_path / "dropout0.5-conv0.3" / "mc_dropout" / "checkpoint.pt",
                       weights_only=True)
    assert saved["config"]["dropout"] == 0.5 and saved["config"]["conv_dropout"] == 0.3
    assert saved["config"]["epochs"] == 1
    assert saved["data_identity"]["train"]["size"] == 80
    again = choose_dropout(data, base, candidates, validation_size=40, epochs=1,
                           num_samples=3, out_dir=tmp_path, log=quiet)
    assert all(row["origin"].startswith("reused") for row in again.rows)
    assert again.training_seconds == pytest.approx(sweep.training_seconds, rel=1e-6)
    with pytest.raises(ValueError, match="at least one above 0"):
        choose_dropout(data, base, [(0.0, 0.0)], 40, 1, 3, log=quiet)


def test_only_mc_dropout_is_compared_on_the_dropout_rates() -> None:
    saved = dataclasses.asdict(TrainConfig(**TINY, model="deterministic"))
    wanted = TrainConfig(**TINY, model="deterministic", dropout=0.4, conv_dropout=0.2)
    assert config_differences(saved, wanted) == []
    dropping = dataclasses.replace(wanted, model="mc_dropout")
    saved["model"] = "mc_dropout"
    assert len(config_differences(saved, dropping)) == 2


def test_conv_dropout_alone_makes_mc_dropout_stochastic(tiny_data) -> None:
    torch.manual_seed(1)
    model = DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.0,
                             conv_dropout=0.5).eval()
    probs = sample_probs_for("mc_dropout", model, tiny_data.test_images, 6)
    assert mutual_information(probs).min().item() > 0


def test_paired_difference_and_its_bootstrap_agree_with_the_formula() -> None:
    generator = torch.Generator().manual_seed(7)
    n = 400
    a = (torch.rand(n, generator=generator) < 0.7).double()
    b = torch.where(torch.rand(n, generator=generator) < 0.8, a, 1 - a)
    mean, se = paired_difference(a, b)
    d = a - b
    assert mean == pytest.approx(d.mean().item())
    assert se == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum().item() / (n - 1) / n))
    weights = resample_weights(n, 400, generator)
    assert torch.equal(weights.sum(1), torch.full((400,), float(n), dtype=torch.float64))
    replicas = (weights @ d) / n
    # the SD of R = 400 bootstrap replicas has relative error ~ 1/sqrt(2R) = 3.5 %: 4 of them
    assert replicas.std().item() == pytest.approx(se, rel=0.15)


def test_weighted_ece_and_auroc_are_the_metrics_of_the_resample() -> None:
    generator = torch.Generator().manual_seed(2)
    probs = torch.softmax(3 * torch.randn(300, 10, generator=generator), -1)
    labels = torch.randint(10, (300,), generator=generator)
    ones = torch.ones(1, 300, dtype=torch.float64)
    plain = expected_calibration_error(probs, labels, 15).ece
    assert weighted_ece(probs, labels, ones).item() == pytest.approx(plain, abs=1e-12)
    draws = torch.randint(300, (300,), generator=generator)
    counts = torch.bincount(draws, minlength=300).double()[None]
    resampled = expected_calibration_error(probs[draws], labels[draws], 15).ece
    assert weighted_ece(probs, labels, counts).item() == pytest.approx(resampled, abs=1e-12)
    # AUROC, with ties (scores rounded to one decimal)
    score_in = (torch.rand(200, generator=generator) * 10).round() / 10
    score_out = (torch.rand(50, generator=generator) * 10 + 2).round() / 10
    is_out = torch.cat([torch.zeros(200), torch.ones(50)])
    plain = auroc(torch.cat([score_in, score_out]), is_out)
    got = weighted_auroc(score_in, score_out, torch.ones(1, 200), torch.ones(1, 50))
    assert got.item() == pytest.approx(plain, abs=1e-12)
    draw_in = torch.randint(200, (200,), generator=generator)
    draw_out = torch.randint(50, (50,), generator=generator)
    resampled = auroc(torch.cat([score_in[draw_in], score_out[draw_out]]), is_out)
    got = weighted_auroc(score_in, score_out,
                         torch.bincount(draw_in, minlength=200).double()[None],
                         torch.bincount(draw_out, minlength=50).double()[None])
    assert got.item() == pytest.approx(resampled, abs=1e-12)


def test_verdict_words() -> None:
    assert verdict(0.02, 0.005, +1) == "better by 0.020 +- 0.005"
    assert verdict(0.02, 0.005, -1) == "worse by 0.020 +- 0.005"
    assert verdict(-0.3, 0.1, -1, digits=1) == "better by 0.3 +- 0.1"
    assert verdict(0.009, 0.005, +1).startswith("no difference beyond 2 paired standard")
    assert verdict(math.nan, 0.1, +1) == "not measured"
    with pytest.raises(ValueError):
        verdict(0.1, 0.1, 0)
    with pytest.raises(ValueError, match="noise_floor"):
        verdict(0.1, 0.01, 1, noise_floor=-0.1)


def test_verdict_prints_enough_digits_not_to_contradict_itself() -> None:
    # Chapter 8 printed "no difference beyond 2 paired SE (-0.007 +- 0.003)": the decision
    # (0.00654 <= 2 x 0.00329) was right, the rounded numbers said otherwise.
    assert verdict(-0.00654, 0.00329, -1) == ("no difference beyond 2 paired standard "
                                              "errors (-0.0065 +- 0.0033)")
    assert verdict(-0.00649, 0.0032, -1) == "better by 0.0065 +- 0.0032"  # not 0.006, 0.003
    assert verdict(0.02, 1e-5, 1) == "better by 0.02000 +- 0.00001"  # a nonzero SE shows


def _printed(words: str) -> list[float]:
    return [float(x) for x in re.findall(r"[+-]?\d+\.\d+", words)]


def test_verdict_wording_agrees_with_its_printed_numbers() -> None:
    # Random differences, standard errors and floors near the decision boundaries: the
    # numbers as printed must lead a reader to the verdict taken on the unrounded ones.
    generator = torch.Generator().manual_seed(10)
    for _ in range(3000):
        se = 10 ** (-4 * torch.rand(1, generator=generator).item() - 1)
        difference = (2 * se * (1 + 0.02 * torch.randn(1, generator=generator).item())
                      * (1 if torch.rand(1, generator=generator).item() < 0.5 else -1))
        floor = abs(difference) * (1 + 0.02 * torch.randn(1, generator=generator).item())
        direction = 1 if torch.rand(1, generator=generator).item() < 0.5 else -1
        words = verdict(difference, se, direction, noise_floor=floor)
        assert not re.search(r"\b(equal|same|tie)\b", words), words
        if words.startswith("no difference"):
            d, s = _printed(words)
            assert abs(d) <= 2 * s + 1e-12 and abs(difference) <= 2 * se, words
        elif words.startswith("below the noise floor"):
            f, d, s = _printed(words)
            assert 2 * s < abs(d) <= f + 1e-12, words
            assert 2 * se < abs(difference) <= floor, words
        else:
            d, s, f = _printed(words)
            assert d > 2 * s and d > f and abs(difference) > max(2 * se, floor), words
            better = difference * direction > 0
            assert words.startswith("better" if better else "worse"), words


def test_verdict_below_the_noise_floor() -> None:
    # chapter 8's ECE under shift on 500 images: beyond 2 SE, but below the floor
    assert verdict(0.022, 0.008, -1, noise_floor=0.0433) == (
        "below the noise floor of 0.043 (+0.022 +- 0.008)")
    assert verdict(0.1, 0.008, -1, noise_floor=0.0433) == (
        "worse by 0.100 +- 0.008 (noise floor 0.043)")
    # within 2 SE is said first, whatever the floor
    assert verdict(0.01, 0.008, -1, noise_floor=0.0433).startswith("no difference beyond 2")
    assert verdict(0.0433, 0.008, -1, noise_floor=0.04334).startswith("below the noise floor")


def test_summary_metrics_add_the_ece_floor_and_the_selective_prediction_metrics() -> None:
    generator = torch.Generator().manual_seed(4)
    probs = torch.softmax(2 * torch.randn(3, 400, 10, generator=generator), -1)
    labels = torch.randint(10, (400,), generator=generator)
    labels[:150] = probs.mean(0)[:150].argmax(-1)  # some right, most of the rest wrong
    metrics = summary_metrics(probs, labels)
    p = probs.mean(0)
    confidence = p.max(-1).values
    entropy = decompose_uncertainty(probs).total
    assert metrics["ece_floor"] == pytest.approx(calibrated_ece_expectation(confidence),
                                                 rel=1e-12)
    floor = ece_noise_floor(confidence, 15, ECE_FLOOR_SIMULATIONS, 0.95,
                            torch.Generator().manual_seed(0))
    assert metrics["ece_floor_95"] == floor.upper > metrics["ece_floor"]
    assert metrics["aurc"] == pytest.approx(selective_prediction(p, labels, entropy).aurc)
    assert metrics["excess_aurc"] == pytest.approx(excess_aurc(p, labels, entropy))
    assert metrics["misclassification_auroc"] == pytest.approx(
        misclassification_auroc(p, labels, entropy))
    assert summary_metrics(probs, labels) == metrics  # the floor's simulation is seeded
    # every prediction right: no misclassification AUROC, and no excess AURC
    all_right = summary_metrics(probs, p.argmax(-1))
    assert math.isnan(all_right["misclassification_auroc"])
    assert all_right["aurc"] == all_right["excess_aurc"] == 0.0
    # directions: the floor is not a property of the method
    assert metric_direction("excess_aurc") == metric_direction("aurc") == -1
    assert metric_direction("misclassification_auroc") == 1
    assert metric_direction("ece_floor") == metric_direction("severity/5/ece_floor") == 0


def test_grouped_resampling_with_one_item_per_group_is_the_plain_bootstrap() -> None:
    plain = resample_weights(50, 30, torch.Generator().manual_seed(5))
    grouped = resample_weights(50, 30, torch.Generator().manual_seed(5),
                               groups=torch.arange(50))
    assert torch.equal(plain, grouped)
    # any labels, in any order: the same distribution (each row a multinomial(50, 1/50))
    shuffled = resample_weights(50, 4000, torch.Generator().manual_seed(6),
                                groups=torch.randperm(50) * 7 - 3)
    assert torch.equal(shuffled.sum(1), torch.full((4000,), 50.0, dtype=torch.float64))
    # a multiplicity is binomial(50, 1/50): mean 1, variance 0.98; 4000 x 50 of them
    assert shuffled.mean().item() == pytest.approx(1.0, abs=4 * math.sqrt(0.98 / 200_000))
    assert shuffled.var().item() == pytest.approx(0.98, rel=0.03)


def test_grouped_resampling_keeps_groups_together() -> None:
    # 12 groups of sizes 1..12 (78 items), labels scattered
    sizes = torch.arange(1, 13)
    groups = torch.repeat_interleave(torch.arange(12) * 10 + 100, sizes)
    groups = groups[torch.randperm(78, generator=torch.Generator().manual_seed(7))]
    resamples = 4000
    weights = resample_weights(78, resamples, torch.Generator().manual_seed(8), groups=groups)
    assert weights.shape == (resamples, 78) and weights.dtype == torch.float64
    for label in groups.unique():
        members = weights[:, groups == label]
        assert torch.equal(members, members[:, :1].expand_as(members))  # one multiplicity
    counts = torch.stack([weights[:, groups == label][:, 0] for label in groups.unique()], 1)
    assert torch.equal(counts.sum(1), torch.full((resamples,), 12.0, dtype=torch.float64))
    # a row's total is the sum of 12 draws of a uniformly chosen group's size: mean 78
    # (= N) and variance 12 * var(1..12) = 12 * 143 / 12 = 143
    totals = weights.sum(1)
    assert totals.mean().item() == pytest.approx(78, abs=4 * math.sqrt(143 / resamples))
    assert totals.var().item() == pytest.approx(143, rel=0.1)
    assert not torch.equal(totals, torch.full_like(totals, 78.0))
    with pytest.raises(ValueError, match="shape"):
        resample_weights(78, 2, groups=groups[:-1])
    with pytest.raises(ValueError, match="integer"):
        resample_weights(78, 2, groups=groups.double())


def test_grouped_bootstrap_standard_error_is_that_of_the_group_means() -> None:
    # 40 groups of 5 items sharing a group effect: the items are far from independent.
    # For equal sizes the resampled mean is the mean of 40 group means drawn with
    # replacement, so its bootstrap SD is sd(group means, divisor G) / sqrt(G); the
    # item-level bootstrap would claim sd(items) / sqrt(N), much smaller here.
    generator = torch.Generator().manual_seed(9)
    effect = torch.randn(40, generator=generator, dtype=torch.float64)
    values = effect.repeat_interleave(5) + 0.1 * torch.randn(200, generator=generator,
                                                             dtype=torch.float64)
    groups = torch.arange(40).repeat_interleave(5)
    weights = resample_weights(200, 800, generator, groups=groups)
    replicas = (weights @ values) / weights.sum(1)
    group_means = values.view(40, 5).mean(1)
    expected = group_means.std(unbiased=False).item() / math.sqrt(40)
    # the SD of 800 replicas: relative error ~ 1/sqrt(1600) = 2.5 %; 4 of them
    assert replicas.std().item() == pytest.approx(expected, rel=0.1)
    naive = resample_weights(200, 800, generator)
    assert ((naive @ values) / 200).std().item() < 0.6 * expected


def test_cost_rows_count_the_networks_and_the_twin_inside_the_ensemble(tiny_data,
                                                                      tmp_path) -> None:
    base = TrainConfig(**TINY)
    saved = train(dataclasses.replace(base, model="deterministic"), tiny_data,
                  out_dir=tmp_path / "twin", log=quiet)
    trained = train_methods(tiny_data, base, ("deterministic", "ensemble"), ensemble_size=3,
                            out_dir=tmp_path / "cmp", log=quiet,
                            checkpoints={"deterministic": tmp_path / "twin" / "checkpoint.pt"})
    twin_seconds = sum(record["seconds"] for record in saved.history)
    assert trained.recorded_seconds["deterministic"] == pytest.approx(twin_seconds)
    assert trained.recorded_seconds["ensemble-0"] == 0.0
    rows = {row["method"]: row for row in cost_rows(
        trained, {"deterministic": 1, "ensemble": 3}, {"deterministic": 0.5, "ensemble": 1.5})}
    assert rows["ensemble"]["networks"] == 3 and rows["ensemble"]["trained_here"] == 2
    assert rows["ensemble"]["training_seconds"] == pytest.approx(
        twin_seconds + trained.recorded_seconds["ensemble-1"]
        + trained.recorded_seconds["ensemble-2"])
    assert rows["deterministic"] == {"method": "deterministic", "networks": 1,
                                     "trained_here": 0, "training_seconds": twin_seconds,
                                     "passes": 1, "prediction_seconds": 0.5}


def test_evaluate_corruptions_can_keep_the_averaged_predictions(networks, tiny_data) -> None:
    kept: dict = {}
    shift = evaluate_corruptions(networks, tiny_data.test_images, tiny_data.test_labels,
                                 ("contrast",), (1, 5), num_samples=2, keep_predictions=kept)
    assert set(kept) == set(METHODS) and set(kept["ensemble"]) == {("contrast", 1),
                                                                   ("contrast", 5)}
    p = kept["ensemble"][("contrast", 5)]
    assert p.shape == (tiny_data.test_labels.shape[0], 10)
    assert shift["ensemble"]["corruption/contrast/5/accuracy"] == pytest.approx(
        (p.argmax(-1) == tiny_data.test_labels).double().mean().item())


def test_posterior_mean_is_one_pass_of_the_bayesian_network_at_its_means(networks,
                                                                         tiny_data) -> None:
    images = tiny_data.test_images[:12]
    bayesian = networks["bayesian"][0]
    probs = sample_probs_for(POSTERIOR_MEAN, bayesian, images, num_samples=5)
    assert probs.shape == (1, 12, 10)
    with torch.no_grad():
        expected = torch.softmax(bayesian(normalize(images), sample=False), -1)
    assert torch.allclose(probs[0], expected, atol=1e-5)
    sampled = sample_probs_for("bayesian", bayesian, images, 5)
    assert not torch.allclose(sampled.mean(0), probs[0], atol=1e-4)  # sigma = e^-2 matters
    with pytest.raises(ValueError, match="Bayesian layers"):
        sample_probs_for(POSTERIOR_MEAN, networks["deterministic"], images, 1)
    rows = compared_models(networks)
    assert tuple(rows) == COMPARED and rows[POSTERIOR_MEAN] is networks["bayesian"]
    assert all(rows[method] is networks[method] for method in METHODS)
    with pytest.raises(ValueError, match="lacks"):
        compared_models({"bayesian": networks["bayesian"]})


def test_seed_difference_is_the_mean_and_standard_error_over_seeds() -> None:
    a, b = [0.71, 0.69, 0.74], [0.70, 0.66, 0.70]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)  # n - 1 in the denominator
    assert seed_difference(a, b) == pytest.approx((mean, sd / math.sqrt(3)), rel=1e-12)
    one = seed_difference([0.7], [0.6])
    assert one[0] == pytest.approx(0.1) and math.isnan(one[1])
    assert verdict(*one, direction=1) == "not measured"
    with pytest.raises(ValueError, match="one value per seed"):
        seed_difference([0.7, 0.8], [0.6])


def test_train_methods_says_where_each_checkpoint_is(tiny_data, tmp_path) -> None:
    base = TrainConfig(**TINY)
    train(base, tiny_data, out_dir=tmp_path / "ch06", log=quiet)
    reused_path = str(tmp_path / "ch06" / "checkpoint.pt")
    trained = train_methods(tiny_data, base, ("bayesian", "deterministic", "ensemble"),
                            ensemble_size=2, out_dir=tmp_path / "cmp", log=quiet,
                            checkpoints={"bayesian": reused_path})
    paths = trained.checkpoint_paths
    assert paths["bayesian"] == reused_path
    assert paths["deterministic"] == str(tmp_path / "cmp" / "deterministic" / "checkpoint.pt")
    assert paths["ensemble-0"] == paths["deterministic"]  # the same network
    for name, path in paths.items():
        assert load_checkpoint(path)["config"]["seed"] == (1 if name == "ensemble-1" else 0)
    unsaved = train_methods(tiny_data, base, ("deterministic",), log=quiet)
    assert unsaved.checkpoint_paths == {}


def test_a_sweep_of_the_full_budget_gives_the_final_mc_dropout_network(tmp_path) -> None:
    data = synthetic_cifar10(train_per_class=12, test_per_class=2, seed=4)
    base = TrainConfig(**{**TINY, "validation_size": 40})
    torch.manual_seed(0)
    sweep = choose_dropout(data, base, [(0.1, 0.0), (0.5, 0.3)], None, epochs=base.epochs,
                           num_samples=3, out_dir=tmp_path / "sweep", log=quiet)
    chosen = dataclasses.replace(base, dropout=sweep.chosen[0], conv_dropout=sweep.chosen[1])
    saved = load_checkpoint(sweep.checkpoint)
    assert (saved["config"]["dropout"], saved["config"]["conv_dropout"]) == sweep.chosen
    assert saved["data_identity"]["train"]["size"] == 80  # 120 images, 40 held out
    trained = train_methods(data, chosen, ("mc_dropout",), out_dir=tmp_path / "final",
                            checkpoints={"mc_dropout": sweep.checkpoint}, log=quiet)
    assert trained.origins["mc_dropout"].startswith(f"reused {sweep.checkpoint}")
    model = trained.models["mc_dropout"][0]
    assert all(torch.equal(value, saved["model"][key])
               for key, value in model.state_dict().items())
    # the held-out images of the sweep are the configuration's own validation images
    held_images, held_labels = validation_set(base, data)
    assert held_labels.shape == (40,)
    probs = sample_probs_for("mc_dropout", model, held_images, 3)
    assert probs.shape == (3, 40, 10)
    assert "checkpoint" not in sweep.rows[0]


@pytest.mark.parametrize("tier", ["gpu", "cpu", "smoke"])
def test_chapter_8_reuses_chapter_6_and_its_seeds_share_no_network(tier) -> None:
    from bnn_course.config import BUDGETS

    configs = uncertainty_configs(tier)
    budget = BUDGETS["uncertainty"][tier]
    assert list(configs) == list(budget["seeds"])
    first = configs[budget["seeds"][0]]
    # chapter 6's BayesianCNN and twin are reusable: the same run up to evaluation settings
    assert config_differences(dataclasses.asdict(training_config(tier)), first) == []
    twin = dataclasses.replace(training_config(tier), model="deterministic")
    assert config_differences(dataclasses.asdict(twin),
                              dataclasses.replace(first, model="deterministic")) == []
    assert first.validation_size == BUDGETS["training"][tier]["validation_size"] > 0
    seeds = [config.seed for base in configs.values()
             for method, _, config in method_configs(base, METHODS, budget["ensemble_size"])
             if method == "ensemble"]
    assert len(seeds) == len(set(seeds)) == len(configs) * budget["ensemble_size"]


def test_uncertainty_configs_refuse_seeds_whose_ensembles_overlap() -> None:
    from types import SimpleNamespace

    from bnn_course.config import BUDGETS

    budget = dict(BUDGETS["uncertainty"]["smoke"])
    with pytest.raises(ValueError, match="closer than ensemble_size"):
        uncertainty_configs(SimpleNamespace(**{**budget, "seeds": (0, 1)}))
    with pytest.raises(ValueError, match="distinct seeds"):
        uncertainty_configs(SimpleNamespace(**{**budget, "seeds": ()}))
