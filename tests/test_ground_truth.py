"""Bayesian linear regression, the book's ground truth (bnn_course.ground_truth)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnn_course.ground_truth import (
    distance_to_optimum,
    exact_posterior,
    fit_bbb,
    make_problem,
    mean_field_optimum,
)


@pytest.fixture(scope="module")
def problem():
    return make_problem(num_examples=300, num_features=5, seed=1)


def test_exact_posterior_is_the_textbook_formula(problem) -> None:
    x, y = problem.inputs.numpy(), problem.targets.numpy()
    precision = x.T @ x / problem.noise_std**2 + np.eye(5) / problem.prior_std**2
    mean = np.linalg.solve(precision, x.T @ y / problem.noise_std**2)
    got_mean, got_precision = exact_posterior(problem)
    np.testing.assert_allclose(got_precision.numpy(), precision, rtol=1e-12)
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-10)


def test_the_mean_field_optimum_is_a_stationary_point_of_the_elbo(problem) -> None:
    # The expected Gaussian NLL under q is closed-form, so the negative ELBO is exact:
    # sum_n [(y_n - x_n mu)^2 + sum_i x_ni^2 s_i^2] / (2 noise^2) + KL(q || N(0, s^2)).
    mean, std = mean_field_optimum(problem)
    mu = mean.clone().requires_grad_(True)
    log_sigma = std.log().clone().requires_grad_(True)
    x, y = problem.inputs, problem.targets
    sigma = log_sigma.exp()
    expected_nll = (((y - x @ mu) ** 2).sum() + (x**2 @ sigma**2).sum()) / (
        2 * problem.noise_std**2)
    s = problem.prior_std
    kl = (torch.log(s / sigma) + (sigma**2 + mu**2) / (2 * s**2) - 0.5).sum()
    (expected_nll + kl).backward()
    assert mu.grad.abs().max() < 1e-9
    assert log_sigma.grad.abs().max() < 1e-9


def test_mean_field_widths_are_below_the_exact_marginals_when_features_correlate(problem):
    _, precision = exact_posterior(problem)
    marginal = torch.linalg.inv(precision).diagonal().sqrt()
    _, std = mean_field_optimum(problem)
    assert (std < marginal).all()


def test_the_widths_span_what_the_chapter_needs() -> None:
    # The default problem's optimal widths range over more than an order of magnitude, and
    # all lie well above the book's initial sigma = e^-5.
    _, std = mean_field_optimum(make_problem())
    assert std.max() / std.min() > 10 and std.min() > 3 * math.exp(-5)


def test_distance_to_the_optimum() -> None:
    optimum = (torch.tensor([1.0, 2.0], dtype=torch.float64),
               torch.tensor([0.5, 0.1], dtype=torch.float64))
    distance = distance_to_optimum(torch.tensor([1.05, 2.0]), torch.tensor([0.55, 0.1]), optimum)
    assert distance["sigma_error"] == pytest.approx(0.1)
    assert distance["mean_error"] == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError):
        distance_to_optimum(torch.zeros(3), torch.ones(3), optimum)


def test_invalid_problems_are_refused() -> None:
    with pytest.raises(ValueError):
        make_problem(num_examples=1)
    with pytest.raises(ValueError):
        make_problem(correlation=1.0)
    with pytest.raises(ValueError):
        make_problem(noise_std=0.0)


def test_bbb_moves_log_sigma_no_faster_than_adams_bound(problem) -> None:
    # 200 steps at lr 1e-3 (constant): Adam moves every log sigma by at most about
    # 200 x 1e-3 = 0.2 (a little more in rare transients), so from e^-5 no sigma can have
    # reached its optimum, whatever the gradient.
    trajectory = fit_bbb(problem, steps=200, lr=1e-3, schedule="constant", record_every=200)
    assert (trajectory.std.log() + 5).abs().max() <= 0.2 * 1.05
    assert trajectory.final["sigma_error"] > 0.9
