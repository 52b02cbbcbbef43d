"""Monte Carlo prediction and its summaries (bnn_course.evaluation)."""

from __future__ import annotations

import math

import pytest
import torch

from bnn_course.data import normalize
from bnn_course.evaluation import (
    accuracy_against_num_samples,
    classification_summary,
    evaluate,
    mc_log_predictive,
    predict_log_probs,
    prediction_batch_size,
)
from bnn_course.models import BayesianCNN
from bnn_course.seeding import seed_everything


def test_mc_predictive_averages_probabilities_not_logits() -> None:
    # Two samples: one sure of class 0, one sure of class 1. Averaging probabilities gives
    # (0.5, 0.5); averaging log-probabilities would pick neither with the same weights.
    sure = torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]]).log()
    predictive = mc_log_predictive(sure[:, None, :])  # (S=2, N=1, K=3)
    torch.testing.assert_close(predictive.exp()[0], torch.tensor([0.495, 0.495, 0.01]))
    geometric = sure.mean(0).softmax(-1)
    assert not torch.allclose(geometric, predictive.exp()[0], atol=1e-2)


def test_summary_on_a_known_case() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    labels = torch.tensor([0, 1, 0])
    summary = classification_summary(probs.log(), labels)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    expected_nll = -(math.log(0.7) + math.log(0.1) + math.log(0.5)) / 3
    assert summary["nll"] == pytest.approx(expected_nll, rel=1e-6)
    expected_entropy = float(-(probs * probs.log()).sum(-1).mean())
    assert summary["entropy"] == pytest.approx(expected_entropy, rel=1e-6)


def test_accuracy_against_num_samples_matches_direct_computation() -> None:
    seed_everything(123)
    samples = torch.randn(8, 50, 10).log_softmax(-1)
    labels = torch.randint(0, 10, (50,))
    curve = accuracy_against_num_samples(samples, labels, [1, 3, 8])
    for count, accuracy in curve.items():
        direct = (samples[:count].exp().mean(0).argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(direct)
    with pytest.raises(ValueError, match="outside"):
        accuracy_against_num_samples(samples, labels, [9])


def test_evaluate_on_a_model() -> None:
    seed_everything(123)
    model = BayesianCNN(channels=(4, 8), hidden_features=16)
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (30,))
    mean_log_probs, samples = predict_log_probs(model, images, num_samples=3, batch_size=7)
    assert mean_log_probs.shape == (30, 10) and samples.shape == (3, 30, 10)
    torch.testing.assert_close(samples.exp().sum(-1), torch.ones(3, 30))
    result = evaluate(model, images, labels, num_samples=3)
    assert set(result) == {f"{m}_{k}" for m in ("accuracy", "nll", "entropy")
                           for k in ("mean", "mc")}
    assert 0 <= result["accuracy_mc"] <= 1 and result["nll_mean"] > 0
    assert model.training, "evaluation must restore the training mode"
    no_mean, only_samples = predict_log_probs(model, images, 2, include_mean=False)
    assert no_mean is None and only_samples.shape == (2, 30, 10)
    with pytest.raises(ValueError, match="nothing to predict"):
        predict_log_probs(model, images, 0, include_mean=False)
    assert set(evaluate(model, images, labels, num_samples=0)) == {
        "accuracy_mean", "nll_mean", "entropy_mean"}


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"\(S >= 1, N, K\)"):
        mc_log_predictive(torch.zeros(0, 3, 10))
    with pytest.raises(ValueError, match="labels"):
        classification_summary(torch.zeros(4, 10), torch.zeros(5, dtype=torch.long))


class _Recorder(torch.nn.Module):
    """Uniform log-probabilities; records every batch it sees (shape, layout, autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool, bool, bool]] = []

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        self.calls.append((x.shape[0], sample, x.is_contiguous(memory_format=torch.channels_last),
                           torch.is_grad_enabled()))
        return torch.full((x.shape[0], 10), -math.log(10.0))


def test_prediction_batches_layout_and_passes() -> None:
    assert prediction_batch_size("cpu") == 256 and prediction_batch_size("cuda") == 4096
    model = _Recorder()
    images = torch.randint(0, 256, (600, 3, 8, 8), dtype=torch.uint8)
    mean, samples = predict_log_probs(model, images, 2, include_mean=False)
    assert mean is None and samples.shape == (2, 600, 10)
    # The CPU default batch, channels-last, no autograd, only the sampled passes.
    assert model.calls == [(256, True, True, False)] * 4 + [(88, True, True, False)] * 2
    model.calls.clear()
    predict_log_probs(model, images, 1, batch_size=500)
    assert [(n, sample) for n, sample, _, _ in model.calls] == [
        (500, False), (500, True), (100, False), (100, True)]
    with pytest.raises(ValueError, match="batch_size"):
        predict_log_probs(model, images, 1, batch_size=0)


def test_channels_last_prediction_equals_the_plain_layout() -> None:
    seed_everything(5)
    model = BayesianCNN(channels=(4, 8), hidden_features=16, init_log_sigma=-2.0).eval()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    seed_everything(9)
    mean, samples = predict_log_probs(model, images, 3, batch_size=20)
    x = normalize(images)  # contiguous (NCHW): the same passes by hand, same random numbers
    seed_everything(9)
    with torch.no_grad():
        expected_mean = model(x, sample=False)
        expected = torch.stack([model(x, sample=True) for _ in range(3)])
    torch.testing.assert_close(mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(samples, expected, rtol=1e-4, atol=1e-5)


def test_mc_prediction_waits_for_no_device_value_and_draws_once_per_pass() -> None:
    """No .item() or test of a tensor value in the prediction loop (each would be an
    aten::_local_scalar_dense, a host sync on a GPU), and one randn and one randint per
    sampled pass of the BayesianCNN (all layers' perturbations and signs at once)."""
    from torch.profiler import ProfilerActivity, profile

    seed_everything(11)
    model = BayesianCNN(channels=(4, 8), hidden_features=16)
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        mean, samples = predict_log_probs(model, images, 3, batch_size=16)
    names = [event.name for event in profiler.events()]
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
    passes = 3 * 2  # three samples of two batches
    assert names.count("aten::randn") == passes and names.count("aten::randint") == passes
    assert mean.shape == (30, 10) and samples.shape == (3, 30, 10)
