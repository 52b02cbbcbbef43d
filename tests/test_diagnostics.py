"""Tests of bnn_course.diagnostics on constructed cases whose answers are known.

* Sigmas and means set by hand give known histograms, SNRs and movements from the start.
* A collapsed, a uniform and a perfect predictor give known shares, entropies and confusion
  matrices.
* One dense layer with equal means and equal sigmas fed one input of +-1 entries has signal
  ``|a sum_i x_i + b|`` and noise variance ``sigma^2 (d + 1)`` in every unit; its units are
  independent Gaussians, so the averaged sample variance over ``S`` passes and ``J`` units
  is ``sigma^2 (d + 1) chi^2_{(S-1)J} / ((S-1)J)``: relative standard error
  ``sqrt(2 / ((S-1)J))``, half of it for the RMS. Tolerances are five standard errors.
* The KL gradient has a closed form (``c mu / s^2`` and ``c (sigma^2 / s^2 - 1)`` per weight),
  checked to float32 precision; with ``sample=False`` the NLL cannot depend on the sigmas,
  and with every mean zero the softmax is uniform, so the NLL gradient is known too.
* Adam's bound on the movement of a log sigma is the sum of the scheduled learning rates
  (closed forms for the constant and the cosine schedule); torch's own Adam reaches it with
  a gradient of constant sign, and with random signs moves about ``sqrt(T)`` steps' worth in
  ``T`` steps (a random walk), so its share of the bound is ``O(1/sqrt(T))``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.data import synthetic_cifar10
from bnn_course.diagnostics import (
    activation_scales,
    adam_log_sigma_bound,
    break_even_log_sigma_shift,
    early_warning_signs,
    gradient_norms,
    kl_per_weight,
    loss_decomposition,
    objective_at_prior,
    plot_loss_decomposition,
    prediction_collapse,
    sigma_movement,
    sigma_summary,
)
from bnn_course.layers import BayesianDenseFlipout
from bnn_course.models import BayesianCNN
from bnn_course.posterior import gaussian_kl_divergence
from bnn_course.train import TrainConfig, learning_rate, train
from bnn_course.weight_noise import signal_to_noise_by_layer


class DenseClassifier(nn.Module):
    """One Bayesian dense layer and a log-softmax, with the BayesianCNN interface."""

    def __init__(self, in_features: int, num_classes: int, **layer_args: object) -> None:
        super().__init__()
        self.dense = BayesianDenseFlipout(in_features, num_classes, **layer_args)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return F.log_softmax(self.dense(x, sample=sample), dim=-1)

    def bayesian_layers(self):
        yield "dense", self.dense

    def kl_divergence(self) -> torch.Tensor:
        return self.dense.kl_divergence()


def tiny_cnn(**kwargs: object) -> BayesianCNN:
    """3x8x8 images, two blocks (4 and 8 channels), dense 32 -> 16 -> 10."""
    torch.manual_seed(123)
    return BayesianCNN(image_size=8, channels=(4, 8), hidden_features=16, **kwargs)


def tiny_batch(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(size, 3, 8, 8, generator=generator),
            torch.randint(0, 10, (size,), generator=generator))


def plus_minus_one(num_rows: int, num_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (num_rows, num_features), generator=generator) * 2 - 1).float()


# ---------------------------------------------------------------------- loss decomposition

HAND_HISTORY = [
    {"epoch": 1, "steps": [{"step": 2, "nll": 2.0, "kl": 1000.0, "kl_term": 1000.0},
                           {"step": 4, "nll": 1.0, "kl": 500.0, "kl_term": 500.0}]},
    {"epoch": 2, "steps": [{"step": 6, "nll": 0.5, "kl": 250.0, "kl_term": 250.0}]},
]


def test_loss_decomposition_of_a_hand_made_history() -> None:
    result = loss_decomposition(HAND_HISTORY, num_train=100)
    assert result["step"].tolist() == [2, 4, 6]
    assert result["epoch"].tolist() == [1, 1, 2]
    assert result["nll"].tolist() == [2.0, 1.0, 0.5]
    assert result["kl"].tolist() == [1000.0, 500.0, 250.0]
    assert result["kl_over_n"].tolist() == [10.0, 5.0, 2.5]
    assert result["kl_term"].tolist() == [1000.0, 500.0, 250.0]
    assert result["kl_term_over_nll"].tolist() == [500.0, 500.0, 500.0]


def test_loss_decomposition_ratio_is_infinite_at_zero_nll() -> None:
    history = [{"epoch": 1, "steps": [{"step": 1, "nll": 0.0, "kl": 3.0, "kl_term": 3.0}]}]
    assert loss_decomposition(history, 10)["kl_term_over_nll"].tolist() == [math.inf]


@pytest.mark.parametrize("history, num_train, message", [
    ([], 10, "empty"),
    ([{"epoch": 1, "nll": 1.0}], 10, "no 'steps'"),
    ([{"epoch": 1, "steps": [{"step": 1, "nll": 1.0, "kl": 2.0}]}], 10, "lacks"),
    ([{"epoch": 1, "steps": []}], 10, "no step"),
    (HAND_HISTORY + HAND_HISTORY, 10, "not increasing"),
    (HAND_HISTORY, 0, "num_train"),
])
def test_loss_decomposition_rejects_bad_input(history, num_train, message) -> None:
    with pytest.raises(ValueError, match=message):
        loss_decomposition(history, num_train)


def test_loss_decomposition_of_a_real_run_and_its_warnings() -> None:
    data = synthetic_cifar10(train_per_class=12, test_per_class=4, seed=1)
    config = TrainConfig(epochs=1, log_interval=2, channels=(4, 8), hidden_features=16,
                         batch_size=32, device="cpu", progress=False, epoch_eval_samples=1,
                         eval_samples=1)
    result = train(config, data, log=lambda _: None)
    decomposition = loss_decomposition(result.history, num_train=120)
    assert decomposition["step"].tolist() == [2, 4]  # 120 images / 32 = 4 steps
    # per_example scaling: the KL term is KL / N, logged as the training loop computed it
    torch.testing.assert_close(decomposition["kl_term"], decomposition["kl_over_n"],
                               rtol=1e-5, atol=0)
    warnings = early_warning_signs(result.history, prior_sigma=config.prior_sigma)
    assert all(isinstance(w, str) for w in warnings)
    assert not any("prior's" in w for w in warnings)  # sigma = e^-5, far from s = 1


def test_plot_loss_decomposition_draws_both_terms_on_a_log_axis() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots()
    try:
        plot_loss_decomposition(ax, loss_decomposition(HAND_HISTORY, 100), label="seed")
        assert ax.get_yscale() == "log"
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["seed: NLL", "seed: KL term"]
        assert lines[1].get_ydata().tolist() == [1000.0, 500.0, 250.0]
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------- objective


@pytest.mark.parametrize("delta, m, s", [(0.0, 0.0, 1.0), (-2.0, 0.0, 1.0), (0.7, 0.3, 0.5),
                                         (-0.01, 1.5, 2.0)])
def test_kl_per_weight_is_the_closed_form_kl(delta: float, m: float, s: float) -> None:
    expected = gaussian_kl_divergence(torch.tensor([m * s], dtype=torch.float64),
                                      torch.tensor([s * math.exp(delta)], dtype=torch.float64),
                                      s).item()
    assert kl_per_weight(delta, m) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_kl_per_weight_is_quadratic_near_the_prior() -> None:
    assert kl_per_weight(1e-3) == pytest.approx(1e-6, rel=2e-3)
    assert kl_per_weight(-1e-3) == pytest.approx(1e-6, rel=2e-3)
    assert kl_per_weight(0.0) == 0.0


@pytest.mark.parametrize("budget", [2.8e-6, 0.14, 1.0, 30.0])
def test_break_even_shift_spends_exactly_the_budget(budget: float) -> None:
    shift = break_even_log_sigma_shift(budget)
    assert shift < 0
    assert kl_per_weight(shift) == pytest.approx(budget, rel=1e-9)


def test_break_even_shift_edge_cases() -> None:
    assert break_even_log_sigma_shift(0.0) == 0.0
    assert break_even_log_sigma_shift(1e-8) == pytest.approx(-1e-4, rel=1e-3)
    with pytest.raises(ValueError, match="budget"):
        break_even_log_sigma_shift(-1.0)


@pytest.mark.parametrize("kl_scaling, scale", [("unscaled", 1.0), ("per_example", 1 / 500)])
def test_objective_at_prior_terms(kl_scaling: str, scale: float) -> None:
    model = tiny_cnn(init_log_sigma=-3.0)
    images, labels = tiny_batch()
    result = objective_at_prior(model, images, labels, num_train=500, kl_scaling=kl_scaling,
                                kl_weight=0.5)
    num_weights = sum(p.numel() for name, p in model.named_parameters() if name.endswith("mu"))
    assert result["num_weights"] == num_weights
    assert result["num_classes"] == 10
    assert result["uniform_loss"] == result["log_num_classes"] == pytest.approx(math.log(10))
    assert result["kl_scale"] == pytest.approx(0.5 * scale)
    assert result["current_kl"] == pytest.approx(model.kl_divergence().item())
    assert result["current_kl_term"] == pytest.approx(0.5 * scale * result["current_kl"])
    assert result["current_loss"] == pytest.approx(result["current_nll"]
                                                   + result["current_kl_term"])
    assert result["kl_budget"] == pytest.approx(math.log(10) / (0.5 * scale))
    spent = num_weights * kl_per_weight(result["break_even_log_sigma_shift"])
    assert result["kl_scale"] * spent == pytest.approx(math.log(10), rel=1e-9)
    assert result["break_even_sigma_ratio"] == pytest.approx(
        math.exp(result["break_even_log_sigma_shift"]))


@pytest.mark.parametrize("parametrization", ["log", "softplus"])
def test_prior_network_with_a_tiny_prior_predicts_uniformly(parametrization: str) -> None:
    # Every mean 0 and every sigma 1e-6: the logits are ~1e-6, the NLL is log K.
    model = tiny_cnn(prior_sigma=1e-6, init_log_sigma=-2.0, parametrization=parametrization)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = tiny_batch()
    result = objective_at_prior(model, images, labels, num_train=100)
    assert result["prior_nll"] == pytest.approx(math.log(10), abs=1e-4)
    assert result["prior_loss"] == result["prior_nll"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was modified"


def test_the_seed_recipe_prior_is_far_from_uniform() -> None:
    # sigma = s = 1 through six layers: noise amplified far beyond log K.
    model = tiny_cnn(init_log_sigma=0.0)
    images, labels = tiny_batch()
    result = objective_at_prior(model, images, labels, num_train=100, kl_scaling="unscaled")
    assert result["prior_nll"] > 10 * math.log(10)
    assert result["current_kl"] < 100  # sigma at the prior: only the means cost anything


def test_objective_at_prior_rejects_bad_input() -> None:
    model = tiny_cnn()
    images, labels = tiny_batch()
    with pytest.raises(ValueError, match="kl_scaling"):
        objective_at_prior(model, images, labels, 100, kl_scaling="per_batch")
    with pytest.raises(ValueError, match="num_train"):
        objective_at_prior(model, images, labels, 0)
    with pytest.raises(ValueError, match="labels"):
        objective_at_prior(model, images, labels[:-1], 100)
    with pytest.raises(ValueError, match="bayesian_layers"):
        objective_at_prior(nn.Linear(3, 3), images, labels, 100)


# ---------------------------------------------------------------------- sigmas

SHIFTS = [-2.0, -1.5, -1.0, -0.8, -0.2, 0.0, 0.5, 1.0]  # log sigma - init, sorted
SNRS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def hand_set_classifier(parametrization: str = "log") -> DenseClassifier:
    """2x4 weights with log sigma = -3 + SHIFTS and |mu| / sigma = SNRS, mixed signs."""
    model = DenseClassifier(4, 2, init_log_sigma=-3.0, prior_sigma=0.5,
                            parametrization=parametrization)
    sigma = torch.exp(-3.0 + torch.tensor(SHIFTS)).view(2, 4)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0]).view(2, 4)
    with torch.no_grad():
        posterior = model.dense.weight_posterior
        if parametrization == "log":
            posterior.log_sigma.copy_(sigma.log())
        else:
            posterior.rho.copy_(torch.log(torch.expm1(sigma)))
        posterior.mu.copy_(signs * torch.tensor(SNRS).view(2, 4) * sigma)
    return model


@pytest.mark.parametrize("parametrization", ["log", "softplus"])
def test_sigma_summary_of_hand_set_sigmas(parametrization: str) -> None:
    summary = sigma_summary(hand_set_classifier(parametrization))
    assert list(summary) == ["dense"]
    layer = summary["dense"]
    sigma = torch.exp(-3.0 + torch.tensor(SHIFTS))
    torch.testing.assert_close(layer["sigma"], sigma, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer["snr"], torch.tensor(SNRS), rtol=1e-4, atol=1e-6)
    assert layer["num_weights"] == 8
    assert layer["sigma_mean"] == pytest.approx(sigma.mean().item(), rel=1e-5)
    assert layer["sigma_median"] == pytest.approx(math.exp(-3.0 - 0.5) * math.cosh(0.3),
                                                  rel=1e-5)  # mean of e^-3.8 and e^-3.2
    assert layer["snr_mean"] == pytest.approx(3.5, rel=1e-4)
    assert layer["snr_median"] == pytest.approx(3.5, rel=1e-4)
    assert layer["init_log_sigma"] == -3.0
    assert layer["log_sigma_shift_median"] == pytest.approx(-0.5, abs=1e-5)
    # |shift| > log 2 = 0.693 for -2, -1.5, -1, -0.8 and 1: five of eight
    assert layer["fraction_moved_2x"] == 5 / 8
    assert layer["prior_sigma"] == 0.5
    assert layer["sigma_over_prior_median"] == pytest.approx(layer["sigma_median"] / 0.5)


def test_sigma_summary_with_another_start_and_the_biases() -> None:
    model = hand_set_classifier()
    moved = sigma_summary(model, init_log_sigma=-5.0)["dense"]
    assert moved["log_sigma_shift_median"] == pytest.approx(1.5, abs=1e-5)
    assert moved["fraction_moved_2x"] == 6 / 8  # shifts from -5: 0, 0.5, 1, 1.2, 1.8, 2, 2.5, 3
    with_bias = sigma_summary(model, include_bias=True)["dense"]
    assert with_bias["num_weights"] == 10
    assert with_bias["sigma"][-2:].tolist() == pytest.approx([math.exp(-3.0)] * 2, rel=1e-6)


def test_sigma_summary_of_a_fresh_cnn_has_not_moved() -> None:
    model = tiny_cnn(init_log_sigma=-4.0, prior_sigma=2.0)
    summary = sigma_summary(model)
    assert list(summary) == [name for name, _ in model.bayesian_layers()]
    for name, layer in summary.items():
        assert layer["log_sigma_shift_median"] == 0.0, name
        assert layer["fraction_moved_2x"] == 0.0, name
        assert layer["sigma_over_prior_median"] == pytest.approx(math.exp(-4.0) / 2.0)
        assert layer["sigma"].shape == (layer["num_weights"],)


def test_sigma_summary_rejects_a_model_without_bayesian_layers() -> None:
    with pytest.raises(ValueError, match="bayesian_layers"):
        sigma_summary(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init_log_sigma"):
        sigma_summary(hand_set_classifier(), init_log_sigma=math.nan)


# ---------------------------------------------------------------------- activations


@pytest.mark.parametrize("log_sigma", [-3.0, 0.0])
def test_activation_scales_of_one_dense_layer_match_the_closed_form(log_sigma: float) -> None:
    torch.manual_seed(0)
    d, units, passes = 20, 50, 200
    a, b = 0.1, 0.3
    model = DenseClassifier(d, units, init_log_sigma=log_sigma)
    with torch.no_grad():
        model.dense.weight_posterior.mu.fill_(a)
        model.dense.bias_posterior.mu.fill_(b)
    x = plus_minus_one(1, d, seed=1)
    scales = activation_scales(model, x, passes)["dense"]
    assert scales["signal_rms"] == pytest.approx(abs(a * x.sum().item() + b), rel=1e-6)
    expected_noise = math.exp(log_sigma) * math.sqrt(d + 1)
    tolerance = 5 * 0.5 * math.sqrt(2 / ((passes - 1) * units))
    assert scales["noise_rms"] == pytest.approx(expected_noise, rel=tolerance)
    assert scales["signal_to_noise"] == pytest.approx(scales["signal_rms"] / scales["noise_rms"])
    # E[h^2] = hbar^2 + var; the sample mean adds a cross term 2 hbar mean(d) whose error is
    # at most about 0.5 / sqrt(S J) relative, so this tolerance is still three standard errors.
    expected_sampled = math.sqrt(scales["signal_rms"] ** 2 + expected_noise**2)
    assert scales["sampled_rms"] == pytest.approx(expected_sampled, rel=tolerance)


class DenseStack(nn.Module):
    """Two dense Bayesian layers with a ReLU between: what weight_noise's functions run."""

    def __init__(self) -> None:
        super().__init__()
        self.first = BayesianDenseFlipout(12, 10, init_log_sigma=-1.0)
        self.second = BayesianDenseFlipout(10, 4, init_log_sigma=-0.5)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return self.second(F.relu(self.first(x, sample=sample)), sample=sample)

    def bayesian_layers(self):
        yield "first", self.first
        yield "second", self.second


def test_activation_scales_agree_with_weight_noise() -> None:
    torch.manual_seed(2)
    stack = DenseStack()
    x = torch.randn(5, 12)
    torch.manual_seed(3)
    expected = signal_to_noise_by_layer([stack.first, stack.second], x, 30)
    torch.manual_seed(3)  # same random draws in the same order
    scales = activation_scales(stack, x, 30)
    got = [scales[name]["signal_to_noise"] for name in ("first", "second")]
    assert got == pytest.approx(expected, rel=1e-9)
    assert not stack.first._forward_hooks and not stack.second._forward_hooks


def test_sigma_one_drowns_the_signal_from_the_first_layer_on() -> None:
    images, _ = tiny_batch()
    noisy = activation_scales(tiny_cnn(init_log_sigma=0.0), images, 8)
    quiet = activation_scales(tiny_cnn(init_log_sigma=-5.0), images, 8)
    names = list(noisy)
    assert names == [name for name, _ in tiny_cnn().bayesian_layers()]
    assert all(noisy[name]["signal_to_noise"] < 1 for name in names)
    noise = [noisy[name]["noise_rms"] for name in names]
    assert all(later > earlier for earlier, later in zip(noise[:-1], noise[1:], strict=True))
    assert quiet[names[0]]["signal_to_noise"] > 10


def test_activation_scales_accept_uint8_images_and_reject_one_pass() -> None:
    model = tiny_cnn()
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    scales = activation_scales(model, images, 2)
    assert all(math.isfinite(s["signal_rms"]) for s in scales.values())
    with pytest.raises(ValueError, match="num_samples"):
        activation_scales(model, images, 1)


# ---------------------------------------------------------------------- predictions


def test_a_collapsed_predictor() -> None:
    labels = torch.arange(40) % 10
    result = prediction_collapse(torch.full((40,), 3), labels)
    assert result["predicted_class_counts"].tolist() == [0, 0, 0, 40, 0, 0, 0, 0, 0, 0]
    assert result["top_class"] == 3
    assert result["top_class_share"] == 1.0
    assert result["predicted_class_entropy"] == 0.0
    assert result["normalized_entropy"] == 0.0
    assert result["num_predicted_classes"] == 1
    assert result["accuracy"] == 0.1
    confusion = result["confusion_matrix"]
    assert confusion[:, 3].tolist() == [4] * 10  # one full column: every true class -> 3
    assert confusion.sum().item() == 40 and confusion[:, 3].sum().item() == 40


def test_a_uniform_and_a_perfect_predictor() -> None:
    labels = torch.arange(50) % 5
    uniform = prediction_collapse(torch.arange(50).flip(0) % 5, labels, num_classes=5)
    assert uniform["predicted_class_counts"].tolist() == [10] * 5
    assert uniform["top_class_share"] == pytest.approx(0.2)
    assert uniform["predicted_class_entropy"] == pytest.approx(math.log(5))
    assert uniform["normalized_entropy"] == pytest.approx(1.0)
    perfect = prediction_collapse(labels.clone(), labels, num_classes=5)
    assert perfect["accuracy"] == 1.0
    assert torch.equal(perfect["confusion_matrix"], 10 * torch.eye(5, dtype=torch.int64))


def test_prediction_collapse_takes_the_argmax_of_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.randn(30, 4, generator=generator).log_softmax(-1)
    labels = torch.randint(0, 4, (30,), generator=generator)
    from_scores = prediction_collapse(log_probs, labels, num_classes=4)
    from_classes = prediction_collapse(log_probs.argmax(-1), labels, num_classes=4)
    assert torch.equal(from_scores["confusion_matrix"], from_classes["confusion_matrix"])
    assert from_scores["accuracy"] == from_classes["accuracy"]


@pytest.mark.parametrize("predictions, labels, message", [
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), "integer"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long), "matching"),
    (torch.full((4,), 10), torch.zeros(4, dtype=torch.long), "0..9"),
    (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), "columns"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(4), "labels must be integer"),
])
def test_prediction_collapse_rejects_bad_input(predictions, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        prediction_collapse(predictions, labels)


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kl_scaling, kl_weight, num_train",
                         [("unscaled", 1.0, 1000), ("per_example", 0.3, 1000)])
def test_kl_gradient_matches_its_closed_form(kl_scaling, kl_weight, num_train) -> None:
    s = 0.7
    model = tiny_cnn(prior_sigma=s)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in model.bayesian_layers():
            for posterior in (layer.weight_posterior, layer.bias_posterior):
                posterior.log_sigma.copy_(
                    torch.empty(posterior.shape).uniform_(-3.0, 1.0, generator=generator))
    images, labels = tiny_batch()
    norms = gradient_norms(model, images, labels, num_train, kl_scaling, kl_weight)
    c = kl_weight / (num_train if kl_scaling == "per_example" else 1)
    for name, layer in model.bayesian_layers():
        mu = torch.cat([layer.weight_mu.detach().flatten(), layer.bias_mu.detach().flatten()])
        sigma = torch.cat([layer.weight_sigma.detach().flatten(),
                           layer.bias_sigma.detach().flatten()]).double()
        expected_mu = c * mu.double().norm().item() / s**2
        expected_sigma = c * (sigma**2 / s**2 - 1).norm().item()
        assert norms[name]["kl_mu"] == pytest.approx(expected_mu, rel=1e-5), name
        assert norms[name]["kl_sigma"] == pytest.approx(expected_sigma, rel=1e-5), name


def test_kl_gradient_on_rho_for_the_softplus_parametrisation() -> None:
    # d KL / d rho = (sigma / s^2 - 1 / sigma) * sigmoid(rho)
    s = 1.0
    model = DenseClassifier(6, 3, prior_sigma=s, init_log_sigma=-1.0, parametrization="softplus")
    with torch.no_grad():
        model.dense.weight_posterior.rho.copy_(torch.linspace(-4.0, 2.0, 18).view(3, 6))
    norms = gradient_norms(model, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), 1,
                           kl_scaling="unscaled")
    rho = torch.cat([model.dense.weight_posterior.rho.detach().flatten(),
                     model.dense.bias_posterior.rho.detach().flatten()]).double()
    sigma = F.softplus(rho)
    expected = ((sigma / s**2 - 1 / sigma) * torch.sigmoid(rho)).norm().item()
    assert norms["dense"]["kl_sigma"] == pytest.approx(expected, rel=1e-5)


def test_nll_gradient_of_a_uniform_softmax_and_none_on_sigma_without_sampling() -> None:
    # Every mean 0: p = 1/K for every input. With every label 0, the gradient of the mean
    # NLL is (p - e_0) for the bias and (p - e_0) xbar^T for the weights, of norm
    # sqrt((K - 1) / K) * sqrt(1 + |xbar|^2). The sigmas do not enter a mean pass at all.
    k = 4
    model = DenseClassifier(5, k, init_log_sigma=-1.0)
    with torch.no_grad():
        model.dense.weight_posterior.mu.zero_()
        model.dense.bias_posterior.mu.zero_()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(8, dtype=torch.long)
    norms = gradient_norms(model, x, labels, 100, sample=False, num_samples=3)["dense"]
    expected = math.sqrt((k - 1) / k) * math.sqrt(1 + x.mean(0).norm().item() ** 2)
    assert norms["nll_mu"] == pytest.approx(expected, rel=1e-5)
    assert norms["nll_sigma"] == 0.0
    assert norms["kl_mu"] == 0.0  # mu = 0 is the prior mean
    sampled = gradient_norms(model, x, labels, 100, sample=True)["dense"]
    assert sampled["nll_sigma"] > 0


def test_gradient_norms_leave_grads_and_mode_alone() -> None:
    model = tiny_cnn()
    images, labels = tiny_batch()
    parameters = list(model.parameters())
    parameters[0].grad = torch.full_like(parameters[0], 7.0)
    model.eval()
    gradient_norms(model, images, labels, 100)
    assert not model.training
    assert torch.equal(parameters[0].grad, torch.full_like(parameters[0], 7.0))
    assert all(p.grad is None for p in parameters[1:])
    model.train()
    with torch.no_grad():  # also works when called under no_grad
        result = gradient_norms(model, images, labels, 100)
    assert model.training
    assert all(v["nll_mu"] > 0 for v in result.values())


def test_unscaled_kl_gradient_is_n_times_the_per_example_one() -> None:
    model = tiny_cnn(init_log_sigma=-2.0)
    images, labels = tiny_batch()
    torch.manual_seed(9)
    unscaled = gradient_norms(model, images, labels, 250, "unscaled")
    torch.manual_seed(9)
    per_example = gradient_norms(model, images, labels, 250, "per_example")
    for name in unscaled:
        assert unscaled[name]["kl_sigma"] == pytest.approx(250 * per_example[name]["kl_sigma"],
                                                           rel=1e-6)
        assert unscaled[name]["nll_sigma"] == per_example[name]["nll_sigma"]


# ---------------------------------------------------------------------- early warnings


def epoch_record(epoch: int, nll: float, kl: float, kl_term: float, accuracy: float,
                 sigma: float) -> dict:
    return {"epoch": epoch, "nll": nll, "kl": kl, "kl_term": kl_term,
            "train_accuracy": accuracy, "sigma": {"convs.0": sigma, "classifier": sigma}}


HEALTHY = [epoch_record(1, 1.6, 4e6, 80.0 / 1000, 0.42, 0.006),
           epoch_record(2, 1.2, 3.5e6, 70.0 / 1000, 0.58, 0.005)]
SEED_LIKE = [epoch_record(1, 2.31, 2e6, 2e6, 0.10, 0.98),
             epoch_record(2, 2.31, 1.9e6, 1.9e6, 0.10, 0.99)]


def test_a_healthy_run_raises_no_warning() -> None:
    collapse = prediction_collapse(torch.arange(100) % 10, torch.arange(100) % 10)
    assert early_warning_signs(HEALTHY, prior_sigma=1.0, collapse=collapse) == []


def test_the_seed_like_run_raises_every_warning() -> None:
    collapse = prediction_collapse(torch.full((100,), 6), torch.arange(100) % 10)
    warnings = early_warning_signs(SEED_LIKE, prior_sigma=1.0, collapse=collapse)
    expected = ["of chance", "log K", "mostly KL", "not decreased", "prior's", "class 6"]
    assert len(warnings) == len(expected)
    for fragment, warning in zip(expected, warnings, strict=True):
        assert fragment in warning


def test_warnings_after_the_first_epoch_only() -> None:
    warnings = early_warning_signs(SEED_LIKE[:1])
    assert len(warnings) == 3  # chance, log K, mostly KL; no trend, sigma or collapse check
    assert all(w.startswith("epoch 1:") for w in warnings)


def test_a_diverged_run_is_named() -> None:
    record = epoch_record(1, math.nan, math.inf, math.inf, 0.1, 1.0)
    assert "not finite" in early_warning_signs([record])[0]


def test_early_warning_signs_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        early_warning_signs([])
    with pytest.raises(ValueError, match="lacks"):
        early_warning_signs([{"epoch": 1, "nll": 1.0}])
    with pytest.raises(ValueError, match="prior_sigma"):
        early_warning_signs(HEALTHY, prior_sigma=0.0)


# ---------------------------------------------------------------------- Adam's bound


@pytest.mark.parametrize("schedule, sigma_lr_factor", [("constant", 1.0), ("cosine", 1.0),
                                                       ("cosine", 10.0)])
def test_adam_bound_has_its_closed_form(schedule: str, sigma_lr_factor: float) -> None:
    config = TrainConfig(epochs=3, lr=2e-3, schedule=schedule, sigma_lr_factor=sigma_lr_factor)
    total = 3 * 7
    # sum_{t<T} cos(pi t / T) = 1, so the cosine schedule sums to lr (T + 1) / 2
    expected = 2e-3 * total if schedule == "constant" else 2e-3 * (total + 1) / 2
    assert adam_log_sigma_bound(config, 7) == pytest.approx(sigma_lr_factor * expected,
                                                            rel=1e-12)
    assert adam_log_sigma_bound(config, 7, steps=0) == 0.0
    first_epoch = sum(learning_rate(config, t, total) for t in range(7))
    assert adam_log_sigma_bound(config, 7, steps=7) == pytest.approx(
        sigma_lr_factor * first_epoch, rel=1e-12)


def adam_walk(config: TrainConfig, steps_per_epoch: int, gradients: torch.Tensor) -> float:
    """How far torch's Adam moves one scalar under ``gradients``, with the engine's schedule."""
    parameter = nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.Adam([parameter], lr=config.lr)
    total = config.epochs * steps_per_epoch
    for t, gradient in enumerate(gradients):
        optimizer.param_groups[0]["lr"] = learning_rate(config, t, total) * config.sigma_lr_factor
        parameter.grad = gradient.reshape(())
        optimizer.step()
    return parameter.item()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_adam_moves_at_its_bound_when_the_gradient_keeps_its_sign(schedule: str) -> None:
    config = TrainConfig(epochs=4, schedule=schedule, sigma_lr_factor=3.0)
    gradients = torch.full((4 * 50,), -0.37, dtype=torch.float64)  # any size, one sign
    moved = adam_walk(config, 50, gradients)
    # m / sqrt(v) = 1 exactly for a constant gradient; eps = 1e-8 against |g| = 0.37
    assert moved == pytest.approx(adam_log_sigma_bound(config, 50), rel=1e-6)


def test_adam_moves_a_small_share_of_its_bound_when_the_sign_is_random() -> None:
    config = TrainConfig(epochs=10, schedule="constant")
    steps = 10 * 200
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (steps,), generator=generator).double() * 2 - 1
    share = adam_walk(config, 200, 5.0 * signs) / adam_log_sigma_bound(config, 200)
    # Each gradient enters the sum of Adam's steps with a total weight of about 1, and
    # sqrt(v) is about 5: the position is a random walk of T unit steps, of size sqrt(T).
    # Five of those standard deviations, as a share of the bound T:
    assert abs(share) < 5 / math.sqrt(steps)


def movement_history(log_sigma_moves: list[list[float]], start: float,
                     steps_per_epoch: int) -> list[dict]:
    return [{"epoch": e + 1, "sigma": {name: math.exp(start + move)
                                       for name, move in zip(("a", "b"), moves, strict=True)},
             "steps": [{"step": (e + 1) * steps_per_epoch, "nll": 1.0, "kl": 1.0,
                        "kl_term": 1.0}]}
            for e, moves in enumerate(log_sigma_moves)]


def test_sigma_movement_of_a_hand_made_history() -> None:
    config = TrainConfig(epochs=3, lr=1e-3, schedule="constant", init_log_sigma=-5.0)
    history = movement_history([[0.01, -0.002], [0.02, -0.001]], start=-5.0,
                               steps_per_epoch=10)
    movement = sigma_movement(history, config, steps_per_epoch=10)
    assert movement["layers"] == ["a", "b"]
    assert movement["epoch"].tolist() == [1, 2] and movement["step"].tolist() == [10, 20]
    torch.testing.assert_close(movement["bound"], torch.tensor([0.01, 0.02],
                                                               dtype=torch.float64))
    torch.testing.assert_close(movement["moved"], torch.tensor(
        [[0.01, -0.002], [0.02, -0.001]], dtype=torch.float64))
    torch.testing.assert_close(movement["share"], torch.tensor(
        [[1.0, -0.2], [1.0, -0.05]], dtype=torch.float64))
    # another start, per layer
    moved_from = sigma_movement(history, config, 10, initial_sigma={"a": math.exp(-5.01),
                                                                    "b": math.exp(-5.0)})
    torch.testing.assert_close(moved_from["moved"][:, 0],
                               torch.tensor([0.02, 0.03], dtype=torch.float64))


def test_sigma_movement_of_a_run_driven_by_the_kl_alone_is_at_the_bound() -> None:
    # Unscaled KL at sigma = e^-5: the KL's gradient of every log sigma, about -1 per
    # weight, outweighs the NLL's by orders of magnitude, so every step is Adam's largest.
    data = synthetic_cifar10(train_per_class=12, test_per_class=2, seed=1)
    config = TrainConfig(epochs=2, channels=(4, 8), hidden_features=16, batch_size=40,
                         kl_scaling="unscaled", schedule="constant", lr=1e-3, device="cpu",
                         progress=False, epoch_eval_samples=0, eval_samples=0, augment=False)
    result = train(config, data, log=lambda _: None)
    movement = sigma_movement(result.history, config, steps_per_epoch=3)  # 120 / 40
    assert movement["bound"].tolist() == pytest.approx([0.003, 0.006], rel=1e-12)
    assert movement["share"].min().item() > 0.99
    assert movement["share"].max().item() < 1.0 + 1e-6


def test_sigma_movement_rejects_bad_input() -> None:
    config = TrainConfig(epochs=2, schedule="constant")
    history = movement_history([[0.0, 0.0]], start=-5.0, steps_per_epoch=10)
    with pytest.raises(ValueError, match="empty"):
        sigma_movement([], config, 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        sigma_movement(history, config, 0)
    with pytest.raises(ValueError, match="is steps_per_epoch wrong"):
        sigma_movement(history, config, 12)
    with pytest.raises(ValueError, match="non-empty 'sigma'"):
        sigma_movement([{"epoch": 1, "sigma": {}}], config, 10)
    with pytest.raises(ValueError, match="1, 2, ..., E"):
        sigma_movement([{**history[0], "epoch": 2}], config, 10)
    with pytest.raises(ValueError, match="lacks the layers"):
        sigma_movement(history, config, 10, initial_sigma={"a": 1.0})
    with pytest.raises(ValueError, match="positive"):
        sigma_movement(history, config, 10, initial_sigma=0.0)
    with pytest.raises(ValueError, match="steps must be"):
        adam_log_sigma_bound(config, 10, steps=21)
