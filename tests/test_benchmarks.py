"""Tests of the training-throughput benchmark (``benchmarks/throughput.py``).

Everything runs on the CPU with tiny models and a handful of steps; the numbers are not
checked, only the structure of the results and the arithmetic of the ratios. The
bayesian-torch tests are skipped when that optional package is not installed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import throughput
from benchmarks.throughput import (
    build_bayesian_torch_cnn,
    main,
    make_train_step,
    measure_training_throughput,
    parameter_counts,
    run_benchmark,
    summarize,
    window_sizes,
)
from bnn_course.layers import BayesianConv2dFlipout
from bnn_course.models import BayesianCNN, DeterministicCNN
from bnn_course.seeding import seed_everything

HAS_BAYESIAN_TORCH = throughput.bayesian_torch_version() is not None
needs_bayesian_torch = pytest.mark.skipif(
    not HAS_BAYESIAN_TORCH,
    reason="optional package bayesian-torch not installed (pip install 'bnn-course[bench]')")

PINNED_TORCH = re.search(r"^torch==(\S+)$", (Path(__file__).resolve().parents[1]
                                                / "requirements.txt").read_text(),
                         flags=re.MULTILINE).group(1)
"""The torch version of requirements.txt, for which the operator count's target is stated."""

TINY = ["--device", "cpu", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--windows", "2", "--channels", "4,8", "--hidden-features", "16", "--samples", "3",
        "--predict-images", "12"]



def _check_timing(result: dict, steps: int, windows: int) -> None:
    assert result["timed_steps"] == steps
    assert len(result["window_images_per_second"]) == windows
    assert result["images_per_second"] > 0 and result["timed_seconds"] > 0
    assert (result["min_images_per_second"] <= result["images_per_second"]
            <= result["max_images_per_second"])


def _check_result(result: dict, batch_size: int, steps: int, windows: int) -> None:
    assert result["timed_steps"] == steps
    assert len(result["window_images_per_second"]) == windows
    assert result["images_per_second"] > 0 and result["timed_seconds"] > 0
    assert (result["min_images_per_second"] <= result["images_per_second"]
            <= result["max_images_per_second"])
    assert result["spread_percent"] >= 0
    assert result["parameters"] >= result["mean_parameters"] > 0


def test_main_prints_the_table_and_saves_consistent_results(tmp_path, capsys) -> None:
    path = tmp_path / "out" / "throughput.json"
    document = main([*TINY, "--threads", "1", "--json", str(path)])
    printed = capsys.readouterr().out

    expected = {"bayesian", "deterministic"} | ({"bayesian-torch"} if HAS_BAYESIAN_TORCH
                                                else set())
    assert set(document["models"]) == expected
    for result in document["models"].values():
        _check_result(result, batch_size=8, steps=2, windows=2)
    models = document["models"]
    ours = models["bayesian"]["images_per_second"]
    assert models["bayesian"]["ratio_to_ours"] == 1.0
    assert models["deterministic"]["ratio_to_ours"] == pytest.approx(
        models["deterministic"]["images_per_second"] / ours)
    ours_over_det = document["ratios"]["ours_over_deterministic"]
    assert ours_over_det["value"] == pytest.approx(
        ours / models["deterministic"]["images_per_second"])
    assert ours_over_det["met"] == (ours_over_det["value"] >= 0.6)
    engine = document["engine"]
    _check_timing(engine, steps=2, windows=2)
    engine_ratio = document["ratios"]["engine_over_loop"]
    assert engine_ratio["value"] == pytest.approx(engine["images_per_second"] / ours)
    assert engine_ratio["met"] == (engine_ratio["value"] >= 0.9)
    prediction = document["prediction"]
    assert prediction["bayesian"]["samples"] == 3 and prediction["deterministic"]["samples"] == 1
    for result in prediction.values():
        _check_timing(result, steps=2, windows=2)
    # One window = one pass over the images: images x samples / seconds.
    first_window = prediction["bayesian"]["timed_seconds"] / 2
    assert 0 < first_window
    mc_ratio = document["ratios"]["prediction_per_sample_over_twin"]
    assert mc_ratio["value"] == pytest.approx(prediction["bayesian"]["images_per_second"]
                                              / prediction["deterministic"]["images_per_second"])
    assert mc_ratio["met"] == (mc_ratio["value"] >= 0.4)
    for key in ("git_commit", "git_dirty", "torch", "threads", "precision", "device",
                "memory_format"):
        assert key in document
    assert document["memory_format"] == "channels_last"
    ours_over_bt = document["ratios"]["ours_over_bayesian_torch"]
    if HAS_BAYESIAN_TORCH:
        assert ours_over_bt["value"] == pytest.approx(
            ours / models["bayesian-torch"]["images_per_second"])
        assert ours_over_bt["met"] == (ours_over_bt["value"] >= 2.0)
        assert "per-pixel" in printed
    else:
        assert ours_over_bt["value"] is None and ours_over_bt["met"] is None
        assert "not installed" in printed

    assert document["op_counts"] is None  # counted only with --count-ops
    assert document["threads"] == 1 and document["batch_size"] == 8
    assert document["precision"] == "fp32" and document["device_type"] == "cpu"
    assert document["command"].endswith(" ".join([*TINY, "--threads", "1", "--json",
                                                  str(path)]))
    for text in ("images/s", "vs ours", "ours / bayesian-torch:", "ours / deterministic:",
                 "engine / its step loop:", "MC per sample / twin:", "MC: ours, S = 3",
                 f"torch {torch.__version__}", "batch 8", "precision fp32",
                 document["device"], "BayesianCNN (ours)", "DeterministicCNN"):
        assert text in printed, text
    assert json.loads(path.read_text()) == json.loads(json.dumps(document))


def test_missing_bayesian_torch_is_said_and_skipped(monkeypatch) -> None:
    monkeypatch.setattr(throughput, "bayesian_torch_version", lambda: None)
    document = run_benchmark(["bayesian", "bayesian-torch"], device="cpu", batch_size=4,
                             steps=1, warmup=0, windows=1, channels=(4,), hidden_features=8)
    assert list(document["models"]) == ["bayesian"]
    assert "not installed" in document["skipped"]["bayesian-torch"]
    assert document["bayesian_torch"] is None
    assert document["ratios"]["ours_over_bayesian_torch"]["value"] is None
    assert document["ratios"]["ours_over_deterministic"]["value"] is None
    assert document["prediction"] == {}  # needs the twin
    assert document["engine"] is not None
    report = throughput.format_report(document)
    assert "n/a (bayesian-torch not installed)" in report
    assert "ours / deterministic:      n/a (needs both models)" in report
    assert "MC per sample / twin:      n/a (needs the prediction lines)" in report


def test_measure_one_model_from_a_builder_in_bf16() -> None:
    def build() -> DeterministicCNN:
        return DeterministicCNN(channels=(4, 8), hidden_features=16)

    result = measure_training_throughput(build, device="cpu", batch_size=4, steps=3,
                                         warmup=1, windows=2, precision="bf16")
    _check_result(result, batch_size=4, steps=3, windows=2)
    assert result["parameters"] == result["mean_parameters"] == sum(
        p.numel() for p in build().parameters())
    assert result["batch_size"] == 4 and result["device"].startswith("CPU")


def test_a_train_step_updates_every_parameter() -> None:
    seed_everything(123)
    model = BayesianCNN(channels=(4,), hidden_features=8)
    before = [p.detach().clone() for p in model.parameters()]
    step = make_train_step(model, torch.device("cpu"), batch_size=4)
    loss = step()
    assert loss.dim() == 0 and math.isfinite(loss.item())
    # Adam moves every parameter with a nonzero gradient by about lr in the first step.
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_windows_and_summary_arithmetic() -> None:
    assert window_sizes(10, 3) == [4, 3, 3]
    assert window_sizes(2, 5) == [1, 1]
    with pytest.raises(ValueError):
        window_sizes(0, 3)
    summary = summarize([(2, 1.0), (2, 0.5), (2, 2.0)], batch_size=4)
    assert summary["window_images_per_second"] == [8.0, 16.0, 4.0]
    assert summary["images_per_second"] == 8.0
    assert summary["min_images_per_second"] == 4.0 and summary["max_images_per_second"] == 16.0
    assert summary["spread_percent"] == pytest.approx(150.0)
    assert summary["timed_steps"] == 6 and summary["timed_seconds"] == pytest.approx(3.5)


@needs_bayesian_torch
def test_bayesian_torch_cnn_gives_log_probs_and_a_positive_kl() -> None:
    seed_everything(123)
    model = build_bayesian_torch_cnn(channels=(4, 8), hidden_features=16)
    x = torch.randn(5, 3, 32, 32)
    recomputed = model.kl_divergence()  # before a pass: from the parameters
    log_probs = model(x)
    kl = model.kl_divergence()  # the KL its layers returned with the pass
    assert log_probs.shape == (5, 10) and log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(5))
    assert kl.dim() == 0 and math.isfinite(kl.item()) and kl.item() > 0
    assert kl.requires_grad
    # The KL returned by the forward pass is the one its layers compute from the parameters.
    torch.testing.assert_close(kl, recomputed)
    torch.testing.assert_close(kl, torch.stack([layer.kl_loss()
                                                for layer in model.flipout_layers()]).sum())
    assert not torch.equal(log_probs, model(x))  # every call draws a new sample
    with pytest.raises(ValueError, match="always sample"):
        model(x, sample=False)
    log_probs = model(x)
    kl = model.kl_divergence()
    loss = F.nll_loss(log_probs, torch.zeros(5, dtype=torch.long)) + kl / 50_000
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_bayesian_torch
@pytest.mark.parametrize(("channels", "hidden"), [((4, 8), 16), ((32, 64, 128), 256)])
def test_same_architecture_as_ours(channels, hidden) -> None:
    ours = BayesianCNN(channels=channels, hidden_features=hidden)
    theirs = build_bayesian_torch_cnn(channels=channels, hidden_features=hidden)
    twin = DeterministicCNN(channels=channels, hidden_features=hidden)
    total, means = parameter_counts(ours)
    assert parameter_counts(theirs) == (total, means)
    assert means == sum(p.numel() for p in twin.parameters()) and total == 2 * means
    our_means = [layer.weight_mu.shape for _, layer in ours.bayesian_layers()]
    their_means = [(layer.mu_kernel if hasattr(layer, "mu_kernel") else layer.mu_weight).shape
                   for layer in theirs.flipout_layers()]
    assert our_means == their_means


@needs_bayesian_torch
def test_bayesian_torch_sigma_starts_around_ours() -> None:
    # bayesian-torch draws rho ~ N(posterior_rho_init, 0.1^2); for rho near -5,
    # log softplus(rho) = rho + O(e^rho), so log sigma ~ N(-5, 0.1^2) to within 0.01.
    seed_everything(123)
    model = build_bayesian_torch_cnn(channels=(4,), hidden_features=8, init_log_sigma=-5.0)
    rhos = torch.cat([p.detach().flatten() for name, p in model.named_parameters()
                      if name.rsplit(".", 1)[-1].startswith("rho_")])
    log_sigma = F.softplus(rhos).log()
    n = rhos.numel()
    assert n == parameter_counts(model)[1]
    assert abs(log_sigma.mean().item() + 5.0) < 0.01 + 4 * 0.1 / math.sqrt(n)
    assert abs(log_sigma.std().item() - 0.1) < 4 * 0.1 / math.sqrt(2 * n)


@needs_bayesian_torch
def test_bayesian_torch_convolution_signs_are_per_pixel() -> None:
    """The "different estimator": per-pixel signs vary the noise across one image.

    A 1x1 convolution of a spatially constant input: with signs per example and channel
    (ours) every position of an image sees the same kernel sample, so the output is
    constant over space; with per-pixel signs (bayesian-torch) it is not.
    """
    from bayesian_torch.layers import Conv2dFlipout

    seed_everything(123)
    x = torch.ones(4, 2, 6, 6)
    ours = BayesianConv2dFlipout(2, 3, 1, init_log_sigma=0.0)
    theirs = Conv2dFlipout(2, 3, 1, posterior_rho_init=1.0)
    with torch.no_grad():
        our_out = ours(x)
        their_out, _ = theirs(x)
    spatial_std = lambda out: out.flatten(2).std(-1)  # noqa: E731  (B, C_out)
    assert spatial_std(our_out).max().item() < 1e-5
    assert spatial_std(their_out).min().item() > 1e-3


def test_the_benchmark_trains_with_the_engines_step(monkeypatch) -> None:
    """The benchmark measures what the engine does: both call train.training_step."""
    import bnn_course.train as engine

    assert throughput.training_step is engine.training_step
    calls: list[tuple[bool, int]] = []
    real_step = engine.training_step

    def counting_step(model, optimizer, x, y, **kwargs):
        calls.append((x.is_contiguous(memory_format=torch.channels_last), x.shape[0]))
        return real_step(model, optimizer, x, y, **kwargs)

    monkeypatch.setattr(engine, "training_step", counting_step)
    monkeypatch.setattr(throughput, "training_step", counting_step)
    run = throughput.engine_runner(torch.device("cpu"), batch_size=4, channels=(4,),
                                   hidden_features=8)
    assert run(3) > 0
    assert calls == [(False, 4)] * 3  # the engine hands NCHW batches to the step ...
    calls.clear()
    model = BayesianCNN(channels=(4,), hidden_features=8)
    seen: list[bool] = []
    model.convs[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(
            memory_format=torch.channels_last)))
    step = make_train_step(model, torch.device("cpu"), batch_size=4, pool_batches=2)
    for _ in range(3):
        step()
    assert [n for _, n in calls] == [4, 4, 4]
    assert seen == [True] * 3  # ... and the step lays them out channels-last on the CPU


def test_markdown_table_from_saved_results(tmp_path, capsys) -> None:
    paths = []
    for threads in (1, 2):
        path = tmp_path / f"t{threads}.json"
        main([*TINY, "--threads", str(threads), "--json", str(path), "--models", "bayesian",
              "deterministic"])
        paths.append(path)
    torch.set_num_threads(1)
    capsys.readouterr()
    table = main(["--markdown", *map(str, paths)])["markdown"]
    assert capsys.readouterr().out.strip() == table.strip()
    lines = table.splitlines()
    assert "1 thread," in lines[0] and "2 threads," in lines[0]
    documents = [json.loads(p.read_text()) for p in paths]
    ours = next(line for line in lines if line.startswith("| training: BayesianCNN"))
    assert ours.split(" | ")[1:] == [
        f"{d['models']['bayesian']['images_per_second']:.0f}" for d in documents[:1]] + [
        f"{documents[1]['models']['bayesian']['images_per_second']:.0f} |"]
    assert any(line.startswith("| training: bayesian-torch") and "–" in line for line in lines)
    ratio = documents[0]["ratios"]["ours_over_deterministic"]
    row = next(line for line in lines if line.startswith("| ours / deterministic"))
    assert (f"{throughput.ratio_text(ratio)} (target {ratio['target']}x) "
            f"{'✓' if ratio['met'] else '✗'}") in row
    assert "S = 3" in table and documents[0]["command"] in table


def test_training_step_minimises_the_negative_elbo() -> None:
    from bnn_course.elbo import negative_elbo
    from bnn_course.train import training_step

    seed_everything(0)
    model = BayesianCNN(channels=(4,), hidden_features=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay put
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    seed_everything(1)
    result = training_step(model, optimizer, x, y, num_train=1000, kl_weight=0.5)
    seed_everything(1)  # the same weight sample by hand
    log_probs = model(x)
    torch.testing.assert_close(result.log_probs, log_probs.detach())
    nll = F.nll_loss(log_probs, y)
    torch.testing.assert_close(result.nll, nll.detach())
    torch.testing.assert_close(result.kl, model.kl_divergence().detach())
    torch.testing.assert_close(
        result.loss, negative_elbo(nll, model.kl_divergence(), 1000, kl_weight=0.5).detach())
    assert not any(t.requires_grad for t in result)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="one label per example"):
        training_step(model, optimizer, x, y[:5], num_train=1000)


def test_a_training_step_of_the_book_network_takes_few_operators() -> None:
    """The device-free measure of the launch overhead: aten operators per training step
    of the BayesianCNN at the book's shape, at most 380 top-level (a third of the 1,140
    before) with the pinned torch, and at most 3x the deterministic twin's with any."""
    counts = throughput.count_training_ops(["bayesian", "deterministic"])  # the book's shape
    ours, twin = counts["models"]["bayesian"], counts["models"]["deterministic"]
    assert counts["batch_size"] == 256 and counts["channels"] == [32, 64, 128]
    assert counts["hidden_features"] == 256 and counts["device"] == "cpu"
    assert ours["all"] > ours["top_level"] > twin["top_level"] > 0
    ratio = counts["ours_over_deterministic_top_level"]
    assert ratio == pytest.approx(ours["top_level"] / twin["top_level"])
    assert ratio <= 3.0, counts
    if torch.__version__.split("+")[0] == PINNED_TORCH:
        assert ours["top_level"] <= throughput.OP_COUNT_TARGET == 380, counts
        assert counts["ours_top_level_met"] is True


def test_count_ops_goes_into_the_report_and_the_json(tmp_path, capsys) -> None:
    path = tmp_path / "counts.json"
    document = main([*TINY, "--models", "bayesian", "deterministic", "--no-engine",
                     "--samples", "0", "--count-ops", "--json", str(path)])
    printed = capsys.readouterr().out
    counts = document["op_counts"]
    assert set(counts["models"]) == {"bayesian", "deterministic"}
    assert counts["batch_size"] == 8 and counts["channels"] == [4, 8]
    assert counts["ours_top_level_met"] is None  # the target is stated for the book's shape
    ours = counts["models"]["bayesian"]["top_level"]
    assert counts["ours_over_deterministic_top_level"] == pytest.approx(
        ours / counts["models"]["deterministic"]["top_level"])
    assert "aten operators per training step" in printed and "top-level" in printed
    assert f"{ours:.0f}" in printed
    assert json.loads(path.read_text())["op_counts"] == json.loads(json.dumps(counts))
    table = main(["--markdown", str(path)])["markdown"]
    row = next(line for line in table.splitlines()
               if line.startswith("| aten ops per training step, top-level (all): BayesianCNN"))
    assert f"| {ours:.0f} ({counts['models']['bayesian']['all']:.0f}) |" in row
    with pytest.raises(ValueError, match="steps"):
        throughput.count_step_ops(DeterministicCNN(channels=(4,), hidden_features=8), steps=0)


def test_the_targets_depend_on_the_device() -> None:
    from benchmarks.throughput import TARGETS_BY_DEVICE, _judge

    assert TARGETS_BY_DEVICE["cpu"]["ours_over_deterministic"] == (">=", 0.5)
    assert TARGETS_BY_DEVICE["cuda"]["ours_over_bayesian_torch"] == (">=", 3.0)
    assert _judge("ours_over_deterministic", 0.55, "cpu")["met"] is True
    assert _judge("ours_over_deterministic", 0.55, "cuda")["met"] is False
    assert _judge("prediction_per_sample_over_twin", None, "cuda")["met"] is None


def test_a_ratio_next_to_its_target_shows_three_decimals() -> None:
    assert throughput.ratio_text({"value": 0.4972, "target": ">= 0.5"}) == "0.497x"
    assert throughput.ratio_text({"value": 0.5031, "target": ">= 0.5"}) == "0.503x"
    assert throughput.ratio_text({"value": 1.4612, "target": ">= 2"}) == "1.46x"
    assert throughput.ratio_text({"value": 1.996, "target": ">= 2"}) == "1.996x"
