"""Tests of bnn_course.inspection: counts by hand, KL in closed form, a constructed spread."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnn_course.inspection import (
    count_parameters,
    deterministic_twin,
    layer_table,
    prediction_spread,
)
from bnn_course.models import BayesianCNN, DeterministicCNN


def tiny_model(**kwargs: float) -> BayesianCNN:
    """1x4x4 images, one block of two 3x3 convs (1->2->2), pool to 2x2, dense 8->5->3."""
    torch.manual_seed(0)
    return BayesianCNN(num_classes=3, in_channels=1, image_size=4, channels=(2,),
                       hidden_features=5, **kwargs)


# Counts by hand: conv 1->2: 2*1*9 = 18 weights, 2 biases; conv 2->2: 36, 2;
# flatten 2 * 2 * 2 = 8; dense 8->5: 40, 5; dense 5->3: 15, 3.
HAND_WEIGHTS = [18, 36, 40, 15]
HAND_BIASES = [2, 2, 5, 3]


def test_count_parameters_matches_a_hand_count() -> None:
    counts = count_parameters(tiny_model())
    assert counts["weights"] == sum(HAND_WEIGHTS) == 109
    assert counts["biases"] == sum(HAND_BIASES) == 12
    assert counts["learned"] == 2 * (109 + 12)


def test_count_parameters_of_a_plain_network_counts_weight_and_bias_tensors() -> None:
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    assert count_parameters(plain) == {"weights": 12 + 6, "biases": 3, "learned": 21}


def test_layer_table_shapes_counts_and_order() -> None:
    rows = layer_table(tiny_model(), (7, 1, 4, 4))
    assert [r["name"] for r in rows] == ["convs.0", "convs.1", "hidden", "classifier"]
    assert [r["type"] for r in rows] == ["BayesianConv2dFlipout"] * 2 + ["BayesianDenseFlipout"] * 2
    assert [r["input_shape"] for r in rows] == [(7, 1, 4, 4), (7, 2, 4, 4), (7, 8), (7, 5)]
    assert [r["output_shape"] for r in rows] == [(7, 2, 4, 4), (7, 2, 4, 4), (7, 5), (7, 3)]
    assert [r["weights"] for r in rows] == HAND_WEIGHTS
    assert [r["biases"] for r in rows] == HAND_BIASES
    assert [r["learned"] for r in rows] == [2 * (w + b) for w, b in zip(HAND_WEIGHTS,
                                                                       HAND_BIASES, strict=True)]


@pytest.mark.parametrize(("init_log_sigma", "prior_sigma"), [(-5.0, 1.0), (-2.0, 0.5), (0.0, 1.0)])
def test_layer_table_kl_matches_the_closed_form_with_zero_means(
    init_log_sigma: float, prior_sigma: float
) -> None:
    model = tiny_model(init_log_sigma=init_log_sigma, prior_sigma=prior_sigma)
    with torch.no_grad():
        for _, layer in model.bayesian_layers():
            layer.weight_mu.zero_()
            layer.bias_mu.zero_()
    sigma = math.exp(init_log_sigma)
    per_weight = (math.log(prior_sigma / sigma) + sigma**2 / (2 * prior_sigma**2) - 0.5)
    rows = layer_table(model, (2, 1, 4, 4))
    for row, w, b in zip(rows, HAND_WEIGHTS, HAND_BIASES, strict=True):
        assert row["kl"] == pytest.approx((w + b) * per_weight, rel=1e-5, abs=1e-6)


def test_layer_table_kl_includes_the_mean_term() -> None:
    model = tiny_model(init_log_sigma=0.0)  # sigma = prior sigma: KL = sum(mu^2) / 2
    rows = layer_table(model, (1, 1, 4, 4))
    for row, (_, layer) in zip(rows, model.bayesian_layers(), strict=True):
        expected = 0.5 * (layer.weight_mu.pow(2).sum() + layer.bias_mu.pow(2).sum()).item()
        assert row["kl"] == pytest.approx(expected, rel=1e-5)


def test_layer_table_of_a_plain_network_lists_every_leaf_with_no_kl() -> None:
    twin = deterministic_twin(tiny_model())
    rows = layer_table(twin, (3, 1, 4, 4))
    assert [r["type"] for r in rows] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d",
                                         "Flatten", "Linear", "ReLU", "Linear", "LogSoftmax"]
    assert rows[4]["output_shape"] == (3, 2, 2, 2)
    assert rows[5]["output_shape"] == (3, 8)
    assert all(r["kl"] is None for r in rows)
    assert sum(r["learned"] for r in rows) == 109 + 12


def test_layer_table_removes_its_hooks() -> None:
    model = tiny_model()
    layer_table(model, (1, 1, 4, 4))
    assert all(not m._forward_hooks for m in model.modules())


def test_deterministic_twin_computes_the_mean_network_with_half_the_parameters() -> None:
    torch.manual_seed(1)
    model = BayesianCNN(channels=(4, 8), image_size=8, hidden_features=6)
    twin = deterministic_twin(model)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x, sample=False), rtol=1e-5, atol=1e-6)
    twin_count = sum(p.numel() for p in twin.parameters())
    assert 2 * twin_count == count_parameters(model)["learned"]


def test_deterministic_twin_follows_the_model_layout_dtype_and_parametrisation() -> None:
    torch.manual_seed(2)
    model = BayesianCNN(channels=(4,), image_size=4, hidden_features=6,
                        parametrization="softplus").double()
    twin = deterministic_twin(model)
    kinds = [type(m).__name__ for m in twin]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear",
                     "ReLU", "Linear", "LogSoftmax"]
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x, sample=False), rtol=1e-12, atol=1e-12)
    assert count_parameters(twin)["weights"] == count_parameters(model)["weights"]


class _ScriptedModel:
    """Deterministic pass p0; stochastic passes alternate between p1 and p2 (log-probs)."""

    def __init__(self) -> None:
        self.p0 = torch.tensor([[0.6, 0.4]])
        self.p = [torch.tensor([[0.9, 0.1]]), torch.tensor([[0.2, 0.8]])]
        self.calls = 0

    def __call__(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        if not sample:
            return self.p0.log()
        probs = self.p[self.calls % 2]
        self.calls += 1
        return probs.log()


def test_prediction_spread_on_a_constructed_case() -> None:
    # TV(p1, p0) = 0.3 (argmax agrees), TV(p2, p0) = 0.4 (argmax differs).
    spread = prediction_spread(_ScriptedModel(), torch.zeros(1, 1), num_samples=4)
    assert spread["samples"].shape == (4, 1, 2)
    torch.testing.assert_close(spread["total_variation"][:, 0],
                               torch.tensor([0.3, 0.4, 0.3, 0.4]))
    assert spread["mean_total_variation"] == pytest.approx(0.35, abs=1e-6)
    assert spread["argmax_disagreement"] == pytest.approx(0.5)
    torch.testing.assert_close(spread["mean"], torch.tensor([[0.55, 0.45]]))


def test_prediction_spread_vanishes_when_sigma_is_tiny() -> None:
    model = tiny_model(init_log_sigma=-25.0)
    spread = prediction_spread(model, torch.randn(6, 1, 4, 4), num_samples=5)
    assert spread["mean_total_variation"] < 1e-6
    assert spread["argmax_disagreement"] == 0.0


def test_prediction_spread_is_large_when_sigma_equals_one() -> None:
    # sigma = 1 dwarfs means of size 1/sqrt(fan_in): each pass gives near one-hot outputs
    # whose class is uniform by symmetry (rows of the noise are i.i.d.), so a sample's argmax
    # differs from the deterministic one with probability 1 - 1/K = 0.9, and its TV to the
    # near-uniform deterministic probabilities is about 1 - 1/K as well.
    torch.manual_seed(2)
    model = BayesianCNN(channels=(8, 8), image_size=8, hidden_features=32, init_log_sigma=0.0)
    num_samples = 25
    spread = prediction_spread(model, torch.randn(8, 3, 8, 8), num_samples=num_samples)
    # Images of one pass share the noise, so count only the passes as independent.
    standard_error = math.sqrt(0.9 * 0.1 / num_samples)
    assert abs(spread["argmax_disagreement"] - 0.9) < 5 * standard_error
    assert spread["mean_total_variation"] > 0.8


def test_prediction_spread_rejects_zero_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        prediction_spread(tiny_model(), torch.zeros(1, 1, 4, 4), num_samples=0)


def test_the_twin_of_a_deterministic_stack_is_an_independent_copy_without_dropout() -> None:
    # Regression: it reused the model's own modules and kept live dropout stages.
    torch.manual_seed(0)
    model = DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.5)
    twin = deterministic_twin(model)
    twin_parameters = {id(p) for p in twin.parameters()}
    assert not twin_parameters & {id(p) for p in model.parameters()}
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x, sample=False))
        torch.testing.assert_close(twin(x), twin(x))  # no dropout left in the twin
