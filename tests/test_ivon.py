"""IVON (bnn_course.ivon): the update of Algorithm 1, its Hessian estimator, its state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bnn_course.elbo import gaussian_nll
from bnn_course.ground_truth import (
    exact_posterior,
    fit_ivon,
    make_problem,
    mean_field_optimum,
)
from bnn_course.ivon import IVON
from bnn_course.posterior import gaussian_kl_divergence


def _linear(seed: int = 0, features: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, 1, bias=False, dtype=torch.float64)


def test_one_step_follows_algorithm_1_by_hand() -> None:
    model = _linear()
    lr, ess, h0, b1, b2, delta = 0.3, 50.0, 0.7, 0.8, 0.9, 0.01
    optimizer = IVON(model.parameters(), lr=lr, ess=ess, hess_init=h0, beta1=b1, beta2=b2,
                     weight_decay=delta)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    m = model.weight.detach().clone()
    sigma = 1 / math.sqrt(ess * (h0 + delta))
    torch.manual_seed(11)
    noise = torch.randn_like(m)  # what sampled_params will draw after the same seed
    theta = (m + sigma * noise).requires_grad_(True)
    ((theta @ x.T).squeeze(0) - y).square().mean().backward()
    g_hat = theta.grad
    h_hat = g_hat * noise / sigma
    g = (1 - b1) * g_hat
    h = b2 * h0 + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h0 - h_hat) ** 2 / (h0 + delta)
    expected = m - lr * (h0 + delta) * (g / (1 - b1) + delta * m) / (h + delta)

    torch.manual_seed(11)
    optimizer.step(lambda: ((model(x).squeeze(-1) - y).square().mean()).backward() or
                   torch.zeros(()))
    assert torch.allclose(model.weight, expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(optimizer.state[model.weight]["hess"], h, rtol=1e-12)
    assert torch.allclose(optimizer.posterior_std()[0], (ess * (h + delta)).rsqrt())


def test_clip_radius_bounds_every_element_of_the_step() -> None:
    model = _linear(features=6)
    before = model.weight.detach().clone()
    optimizer = IVON(model.parameters(), lr=2.0, ess=10.0, hess_init=0.5, clip_radius=1e-3)
    optimizer.step(lambda: (1e3 * model.weight.sum()).backward() or torch.zeros(()))
    step = (model.weight - before).abs()
    assert step.max() <= 2.0 * (0.5 + 1e-4) * 1e-3 * (1 + 1e-12)
    assert step.min() > 0.99 * 2.0 * (0.5 + 1e-4) * 1e-3  # all clipped: a huge gradient


def test_the_hessian_estimate_is_unbiased_on_a_quadratic() -> None:
    # For l(w) = 0.5 (w - a)^T H (w - a), E[g_hat * eps / sigma] = diag(H), at any mean.
    # Averaging n draws: standard error of entry i <= sqrt(sum_j H_ij^2 sigma_j^2 /
    # sigma_i^2 + ...) / sqrt(n); we bound it from the draws themselves.
    torch.manual_seed(0)
    a = torch.randn(4, dtype=torch.float64)
    root = torch.randn(4, 4, dtype=torch.float64)
    hessian = root @ root.T + 0.5 * torch.eye(4, dtype=torch.float64)
    weight = nn.Parameter(torch.randn(4, dtype=torch.float64))
    optimizer = IVON([weight], lr=0.0, ess=3.0, hess_init=0.8, weight_decay=0.1)
    draws = []
    for _ in range(20_000):
        with optimizer.sampled_params(train=True):
            d = weight - a
            (0.5 * d @ hessian @ d).backward()
        draws.append(optimizer.state[weight]["hess_sum"].clone())
        optimizer._accumulated = 0
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - hessian.diagonal()).abs() < 5 * se).all(), (mean, hessian.diagonal(), se)


def test_sampled_params_restores_the_means_exactly_and_samples_have_ivon_sigma() -> None:
    model = _linear(features=2000)
    optimizer = IVON(model.parameters(), lr=0.1, ess=100.0, hess_init=0.25,
                     weight_decay=0.01)
    before = model.weight.detach().clone()
    with optimizer.sampled_params():
        sample = model.weight.detach().clone()
    assert torch.equal(model.weight, before)
    deviations = (sample - before) * math.sqrt(100.0 * 0.26)  # standardised
    n = deviations.numel()
    assert abs(deviations.mean().item()) < 5 / math.sqrt(n)
    assert abs(deviations.var().item() - 1) < 5 * math.sqrt(2 / n)


def test_h_plus_delta_stays_positive_even_with_negative_hessian_estimates() -> None:
    # A concave loss at a fixed mean (lr 0) gives h_hat = -20 eps^2 < 0 every step. Without
    # the correction term, the first update b2 h0 + (1 - b2) h_hat would already be below
    # -delta for most weights; with it, h + delta stays positive.
    weight = nn.Parameter(torch.zeros(50, dtype=torch.float64))
    h0, beta2, delta = 0.1, 0.5, 1e-3
    optimizer = IVON([weight], lr=0.0, ess=10.0, hess_init=h0, beta2=beta2, weight_decay=delta)
    torch.manual_seed(5)
    noise = torch.randn(50, dtype=torch.float64)
    uncorrected = beta2 * h0 + (1 - beta2) * (-20 * noise.square())
    assert (uncorrected + delta < 0).float().mean() > 0.5
    torch.manual_seed(5)
    for _ in range(50):
        optimizer.step(lambda: (-10 * weight.square().sum()).backward() or torch.zeros(()))
        assert (optimizer.state[weight]["hess"] + delta > 0).all()


def test_kl_divergence_is_the_closed_form_to_ivons_prior() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = IVON(model.parameters(), lr=0.1, ess=20.0, hess_init=0.3, weight_decay=0.05)
    prior = 1 / math.sqrt(20.0 * 0.05)
    assert optimizer.prior_std() == [pytest.approx(prior)]
    by_hand = sum(gaussian_kl_divergence(p.detach(), s, prior)
                  for p, s in zip(model.parameters(), optimizer.posterior_std(), strict=True))
    assert optimizer.kl_divergence().item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(64, 5), torch.randn(64)

    def run(model: nn.Module, optimizer: IVON, steps: int) -> None:
        for _ in range(steps):
            optimizer.step(lambda: gaussian_nll(model(x).squeeze(-1), y, 1.0).backward()
                           or torch.zeros(()))

    def fresh() -> tuple[nn.Module, IVON]:
        torch.manual_seed(0)
        model = nn.Linear(5, 1)
        return model, IVON(model.parameters(), lr=0.05, ess=64.0, beta2=0.99,
                           weight_decay=0.01, mc_samples=2)

    model, optimizer = fresh()
    torch.manual_seed(1)
    run(model, optimizer, 6)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), torch.get_rng_state()))
    run(model, optimizer, 6)
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer = fresh()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    run(model, optimizer, 6)
    for p, q in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"ess": 0.0}, {"hess_init": 0.0},
                                 {"beta1": 1.0}, {"beta2": -0.1}, {"weight_decay": 0.0},
                                 {"clip_radius": -1e-3}, {"lr": math.nan}])
def test_invalid_hyperparameters_are_named(bad) -> None:
    settings = {"lr": 0.1, "ess": 10.0, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        IVON(_linear().parameters(), **settings)


def test_misuse_is_a_clear_error() -> None:
    model = _linear()
    optimizer = IVON(model.parameters(), lr=0.1, ess=10.0)
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="nested"), optimizer.sampled_params(), \
            optimizer.sampled_params():
        pass
    with pytest.raises(RuntimeError, match="backward"), optimizer.sampled_params(train=True):
        pass
    with pytest.raises(ValueError, match="mc_samples"):
        IVON(model.parameters(), lr=0.1, ess=10.0, mc_samples=0)


def test_ivon_reaches_the_mean_field_optimum_of_linear_regression() -> None:
    # The fixed point of IVON is the mean-field optimum: means mu*, 1/sigma^2 = Lambda_ii.
    # Settings for a fast test: 3,000 steps; beta2 = 0.998 forgets the initial Hessian
    # (0.998^3000 < 0.003) and averages ~500 steps x 4 samples of the Hessian estimate.
    problem = make_problem(num_examples=400, num_features=4, seed=2)
    trajectory = fit_ivon(problem, steps=3000, lr=1.0, hess_init=1 / (400 * 0.3**2),
                          beta2=0.998, mc_samples=4, batch_size=100, record_every=1000)
    assert trajectory.final["sigma_error"] < 0.05
    assert trajectory.final["mean_error"] < 0.1
    mean, precision = exact_posterior(problem)
    assert torch.allclose(mean_field_optimum(problem)[0], mean)
    assert precision.shape == (4, 4)
