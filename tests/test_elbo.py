"""Tests of bnn_course.elbo: the loss, the likelihood, the toy, the fit and the predictive."""

from __future__ import annotations

import math

import pytest
import torch

from bnn_course.elbo import (
    KL_SCALINGS,
    TOY_CLUSTERS,
    BayesianRegressor,
    fit_bayes_by_backprop,
    gaussian_nll,
    make_regression_toy,
    negative_elbo,
    predictive_samples,
    toy_function,
)
from bnn_course.layers import BayesianDenseFlipout

# --- negative_elbo ------------------------------------------------------------------------


def test_negative_elbo_is_nll_plus_kl_over_num_train() -> None:
    nll, kl = torch.tensor(0.75), torch.tensor(1234.0)
    assert negative_elbo(nll, kl, 1000).item() == pytest.approx(0.75 + 1.234, rel=1e-6)
    assert negative_elbo(nll, kl, 1).item() == pytest.approx(0.75 + 1234.0, rel=1e-6)
    unscaled = negative_elbo(nll, kl, 1000, kl_scaling="unscaled")
    assert unscaled.item() == pytest.approx(0.75 + 1234.0, rel=1e-6)
    # a warm-up factor multiplies the weight: beta = 0.1, gamma = 0.5
    assert negative_elbo(0.0, kl, 1000, kl_weight=0.1 * 0.5).item() == pytest.approx(
        0.0617, rel=1e-6)
    assert negative_elbo(nll, kl, 1000, kl_weight=0.5).item() == pytest.approx(
        0.75 + 0.617, rel=1e-6)
    assert negative_elbo(nll, kl, 1000, kl_weight=0.0).item() == pytest.approx(0.75)


def test_negative_elbo_gradients_are_one_and_weight_over_n() -> None:
    nll = torch.tensor(2.0, requires_grad=True)
    kl = torch.tensor(50.0, requires_grad=True)
    negative_elbo(nll, kl, 200, kl_weight=3.0).backward()
    assert nll.grad.item() == pytest.approx(1.0)
    assert kl.grad.item() == pytest.approx(3.0 / 200)


@pytest.mark.parametrize("num_train", [0, -5, 2.5, True])
def test_negative_elbo_rejects_bad_num_train(num_train) -> None:
    with pytest.raises(ValueError, match="num_train"):
        negative_elbo(torch.tensor(1.0), torch.tensor(1.0), num_train)


def test_negative_elbo_rejects_non_scalars_and_bad_weight() -> None:
    with pytest.raises(ValueError, match="nll must be a scalar"):
        negative_elbo(torch.ones(4), torch.tensor(1.0), 10)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        negative_elbo(torch.tensor(1.0), torch.ones(2, 2), 10)
    for weight in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="kl_weight"):
            negative_elbo(torch.tensor(1.0), torch.tensor(1.0), 10, kl_weight=weight)
    with pytest.raises(ValueError, match="kl_scaling"):
        negative_elbo(torch.tensor(1.0), torch.tensor(1.0), 10, kl_scaling="none")
    with pytest.raises(TypeError):  # the weight is keyword-only: no silent mix-up with N
        negative_elbo(torch.tensor(1.0), torch.tensor(1.0), 10, 0.5)  # type: ignore[misc]


# --- gaussian_nll -------------------------------------------------------------------------


@pytest.mark.parametrize("noise_sigma", [0.05, 0.3, 2.0])
def test_gaussian_nll_matches_torch_normal(noise_sigma: float) -> None:
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(37, 1, generator=generator)
    target = torch.randn(37, 1, generator=generator)
    expected = -torch.distributions.Normal(prediction, noise_sigma).log_prob(target).mean()
    assert gaussian_nll(prediction, target, noise_sigma).item() == pytest.approx(
        expected.item(), rel=1e-5, abs=1e-6)


def test_gaussian_nll_sums_outputs_and_averages_examples() -> None:
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(8, 3, generator=generator)
    target = torch.randn(8, 3, generator=generator)
    sigma = torch.tensor([0.5, 1.0, 2.0])  # one noise level per output, broadcast
    log_prob = torch.distributions.Normal(prediction, sigma).log_prob(target)
    expected = -log_prob.sum(dim=1).mean()
    assert gaussian_nll(prediction, target, sigma).item() == pytest.approx(expected.item(),
                                                                           rel=1e-5)


def test_gaussian_nll_at_a_perfect_fit_is_the_normalising_constant() -> None:
    y = torch.zeros(5, 1)
    expected = 0.5 * math.log(2 * math.pi) + math.log(0.1)
    assert gaussian_nll(y, y, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_gaussian_nll_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same shape"):
        gaussian_nll(torch.zeros(4, 1), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        gaussian_nll(torch.zeros(0, 1), torch.zeros(0, 1), 1.0)
    with pytest.raises(ValueError, match="positive"):
        gaussian_nll(torch.zeros(4, 1), torch.zeros(4, 1), 0.0)
    with pytest.raises(ValueError, match="positive"):
        gaussian_nll(torch.zeros(4, 2), torch.zeros(4, 2), torch.tensor([1.0, -1.0]))


# --- the toy ------------------------------------------------------------------------------


def test_toy_shapes_clusters_and_determinism() -> None:
    x, y = make_regression_toy(101, 0.2, torch.Generator().manual_seed(7))
    assert x.shape == (101, 1) and y.shape == (101, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    (low_a, high_a), (low_b, high_b) = TOY_CLUSTERS
    left, right = x[:51], x[51:]
    assert bool(((left >= low_a) & (left <= high_a)).all())
    assert bool(((right >= low_b) & (right <= high_b)).all())
    x2, y2 = make_regression_toy(101, 0.2, torch.Generator().manual_seed(7))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_regression_toy(101, 0.2, torch.Generator().manual_seed(8))
    assert not torch.equal(x, x3)


def test_toy_noise_has_the_requested_std() -> None:
    num_train, noise_sigma = 20_000, 0.3
    x, y = make_regression_toy(num_train, noise_sigma, torch.Generator().manual_seed(3))
    residual = y - toy_function(x)
    # the sample std of N normals has standard error sigma / sqrt(2 N)
    standard_error = noise_sigma / math.sqrt(2 * num_train)
    assert abs(residual.std().item() - noise_sigma) < 5 * standard_error
    assert abs(residual.mean().item()) < 5 * noise_sigma / math.sqrt(num_train)
    x0, y0 = make_regression_toy(10, 0.0, torch.Generator().manual_seed(3))
    assert torch.allclose(y0, toy_function(x0))


def test_toy_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_train"):
        make_regression_toy(0, 0.1)
    with pytest.raises(ValueError, match="noise_sigma"):
        make_regression_toy(10, -0.1)


# --- the model, the fit and the predictive -----------------------------------------------


def test_regressor_architecture_and_kl_is_the_sum_over_layers() -> None:
    model = BayesianRegressor(1, (16, 8), 2, prior_sigma=0.5)
    assert [type(layer) for layer in model.layers] == [BayesianDenseFlipout] * 3
    assert [(layer.in_features, layer.out_features) for layer in model.layers] == [
        (1, 16), (16, 8), (8, 2)]
    expected = sum(layer.kl_divergence() for layer in model.layers)
    assert model.kl_divergence().item() == pytest.approx(expected.item(), rel=1e-6)
    assert model(torch.zeros(5, 1)).shape == (5, 2)


def test_posterior_mean_network_is_deterministic_and_samples_vary() -> None:
    torch.manual_seed(0)
    model = BayesianRegressor(hidden_features=(16,), init_log_sigma=-1.0)
    x = torch.linspace(-3, 3, 11)[:, None]
    assert torch.equal(model(x, sample=False), model(x, sample=False))
    samples = predictive_samples(model, x, num_samples=50)
    assert samples.shape == (50, 11, 1)
    assert not samples.requires_grad
    assert bool((samples.std(dim=0) > 0).all())


def test_predictive_samples_rejects_bad_count() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        predictive_samples(BayesianRegressor(), torch.zeros(3, 1), 0)


def test_a_short_fit_reduces_the_loss_and_records_both_terms() -> None:
    torch.manual_seed(0)
    x, y = make_regression_toy(256, 0.3, torch.Generator().manual_seed(0))
    model = BayesianRegressor(hidden_features=(32,))
    history = fit_bayes_by_backprop(model, x, y, steps=100, lr=0.05, noise_sigma=0.3)
    assert set(history) == {"nll", "kl", "loss"}
    assert all(len(values) == 100 for values in history.values())
    for nll, kl, loss in zip(history["nll"], history["kl"], history["loss"], strict=True):
        assert loss == pytest.approx(nll + kl / 256, rel=1e-4, abs=1e-5)
    first, last = sum(history["loss"][:10]) / 10, sum(history["loss"][-10:]) / 10
    assert last < 0.5 * first


def test_unscaled_kl_is_added_raw_and_pulls_towards_the_prior() -> None:
    x, y = make_regression_toy(256, 0.3, torch.Generator().manual_seed(0))
    histories = {}
    for kl_scaling in KL_SCALINGS:
        torch.manual_seed(0)
        model = BayesianRegressor(hidden_features=(32,))
        histories[kl_scaling] = fit_bayes_by_backprop(model, x, y, steps=100, lr=0.05,
                                                      noise_sigma=0.3, kl_scaling=kl_scaling)
    unscaled = histories["unscaled"]
    for nll, kl, loss in zip(unscaled["nll"], unscaled["kl"], unscaled["loss"], strict=True):
        assert loss == pytest.approx(nll + kl, rel=1e-4)
    # the raw KL weighs 256 times more: the fit ends closer to the prior and fits worse
    assert unscaled["kl"][-1] < histories["per_example"]["kl"][-1]
    assert sum(unscaled["nll"][-10:]) > 2 * sum(histories["per_example"]["nll"][-10:])


def test_mini_batches_still_divide_the_kl_by_the_training_set_size() -> None:
    torch.manual_seed(0)
    x, y = make_regression_toy(40, 0.3, torch.Generator().manual_seed(0))
    history = fit_bayes_by_backprop(BayesianRegressor(hidden_features=(8,)), x, y, steps=5,
                                    lr=0.01, noise_sigma=0.3, batch_size=10)
    for nll, kl, loss in zip(history["nll"], history["kl"], history["loss"], strict=True):
        assert loss == pytest.approx(nll + kl / 40, rel=1e-4)


def test_fit_rejects_bad_arguments() -> None:
    x, y = make_regression_toy(8, 0.1, torch.Generator().manual_seed(0))
    model = BayesianRegressor(hidden_features=(4,))
    with pytest.raises(ValueError, match="kl_scaling"):
        fit_bayes_by_backprop(model, x, y, 1, 0.01, 0.1, kl_scaling="per_batch")
    with pytest.raises(ValueError, match="shapes"):
        fit_bayes_by_backprop(model, x, y[:4], 1, 0.01, 0.1)
    with pytest.raises(ValueError, match="steps"):
        fit_bayes_by_backprop(model, x, y, 0, 0.01, 0.1)
    with pytest.raises(ValueError, match="lr"):
        fit_bayes_by_backprop(model, x, y, 1, 0.0, 0.1)
    with pytest.raises(ValueError, match="batch_size"):
        fit_bayes_by_backprop(model, x, y, 1, 0.01, 0.1, batch_size=9)
