"""The four dense sampling estimators and the gradient-variance measurement (chapter 3).

Statistical tests use fixed seeds and tolerances of 5 standard errors derived from the
number of draws, never tuned until green.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnn_course.gradient_variance import (
    ESTIMATORS,
    dense_independent_samples,
    dense_local_reparameterization,
    dense_mean_weights,
    dense_shared_sample,
    gradient_variance,
    loglog_slope,
    time_forward_backward,
)
from bnn_course.layers import BayesianDenseFlipout
from bnn_course.seeding import seed_everything


def _layer(in_features: int = 5, out_features: int = 3, sigma: float = 0.4,
           parametrization: str = "log") -> BayesianDenseFlipout:
    """A layer with unequal sigmas, so that a wrong index in sigma^2 x^2 would show."""
    seed_everything(0)
    layer = BayesianDenseFlipout(in_features, out_features, init_log_sigma=math.log(sigma),
                                 parametrization=parametrization)
    with torch.no_grad():
        for posterior in (layer.weight_posterior, layer.bias_posterior):
            if parametrization == "log":
                posterior.log_sigma.add_(0.5 * torch.randn_like(posterior.log_sigma))
            else:
                posterior.rho.add_(0.5 * torch.randn_like(posterior.rho))
    return layer


def test_shared_sample_gives_identical_inputs_identical_outputs() -> None:
    layer = _layer()
    seed_everything(1)
    x0 = torch.randn(5)
    x = torch.stack([x0, torch.randn(5), x0, x0])
    output = dense_shared_sample(layer, x)
    assert torch.equal(output[0], output[2]) and torch.equal(output[0], output[3])
    assert not torch.allclose(output[0], output[1])
    # ... and it is one linear map: the output of a difference is the difference of outputs
    # up to the (shared) bias, which cancels in a second difference.
    assert torch.allclose(output[1] - output[0], output[1] - output[2])


def test_independent_samples_give_identical_inputs_different_outputs() -> None:
    layer = _layer()
    seed_everything(2)
    x = torch.randn(1, 5).expand(6, 5)
    output = dense_independent_samples(layer, x)
    differences = (output[1:] - output[0]).abs().amin(dim=1)
    assert (differences > 0).all()


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_all_estimators_have_the_same_per_example_mean_and_variance(name: str) -> None:
    layer = _layer()
    seed_everything(3)
    x0 = torch.randn(5)
    x = torch.stack([x0, x0, torch.randn(5)])  # two identical examples and another
    num_draws = 4000
    with torch.no_grad():
        outputs = torch.stack([ESTIMATORS[name](layer, x) for _ in range(num_draws)])
        expected_mean = dense_mean_weights(layer, x)  # (3, out)
        # Var y_nj = sum_i sigma_ji^2 x_ni^2 + sigma_bj^2
        expected_var = x.pow(2) @ layer.weight_sigma.pow(2).T + layer.bias_sigma.pow(2)
    mean_error = (outputs.mean(dim=0) - expected_mean).abs()
    assert (mean_error < 5 * (expected_var / num_draws).sqrt()).all()
    var_error = (outputs.var(dim=0) - expected_var).abs()
    assert (var_error < 5 * expected_var * math.sqrt(2 / (num_draws - 1))).all()
    # Correlation of the two identical examples' outputs, unit by unit.
    noise = outputs - outputs.mean(dim=0)
    correlation = (noise[:, 0] * noise[:, 1]).mean(0) / (noise[:, 0].std(0) * noise[:, 1].std(0))
    if name == "shared":
        assert torch.allclose(correlation, torch.ones_like(correlation), atol=1e-3)
    else:  # independent or sign-decorrelated: zero up to 5 standard errors 1/sqrt(n)
        assert (correlation.abs() < 5 / math.sqrt(num_draws)).all()


def _ratio_and_tolerance(a: dict, b: dict, key: str) -> tuple[float, float]:
    """a[key] / b[key] and 5 standard errors of the ratio (delta method)."""
    ratio = a[key] / b[key]
    relative_se = math.hypot(a[f"{key}_se"] / a[key], b[f"{key}_se"] / b[key])
    return ratio, 5 * relative_se * ratio


def test_independent_variance_falls_like_one_over_b_for_copies_of_one_example() -> None:
    # B copies of one example: the B per-example gradients are i.i.d. under independent
    # samples, so Var(mean) = Var(single)/B exactly; under a shared sample they are all
    # equal, so Var(mean) = Var(single).
    layer = _layer(sigma=0.6)
    seed_everything(4)
    batch = 8
    x1, y1 = torch.rand(1, 5), torch.tensor([1])
    xb, yb = x1.expand(batch, 5), y1.expand(batch)
    repeats = 500
    single = gradient_variance(dense_independent_samples, layer, x1, y1, F.cross_entropy, repeats)
    independent = gradient_variance(dense_independent_samples, layer, xb, yb, F.cross_entropy,
                                    repeats)
    shared = gradient_variance(dense_shared_sample, layer, xb, yb, F.cross_entropy, repeats)
    for key in ("mu", "sigma"):
        ratio, tolerance = _ratio_and_tolerance(independent, single, key)
        assert abs(ratio - 1 / batch) < tolerance, (key, ratio, tolerance)
        ratio, tolerance = _ratio_and_tolerance(shared, single, key)
        assert abs(ratio - 1) < tolerance, (key, ratio, tolerance)
        assert shared[key] > batch / 2 * independent[key]


def test_expected_noise_variance_over_random_batches_falls_like_one_over_b() -> None:
    # E_batch tr Var(g | batch) = mean_n tr Var(g_n) / B for independent samples and
    # distinct examples; the shared sample stays far above for non-negative inputs.
    layer = _layer(in_features=8, out_features=4, sigma=0.5)
    seed_everything(5)
    x = torch.rand(64, 8)
    y = torch.randint(0, 4, (64,))
    generator = torch.Generator().manual_seed(5)
    repeats, batch = 400, 16
    results = {
        (name, size): gradient_variance(ESTIMATORS[name], layer, x, y, F.cross_entropy,
                                        repeats, batch_size=size, generator=generator)
        for name in ("independent", "shared") for size in (1, batch)
    }
    for key in ("mu", "sigma"):
        ratio, tolerance = _ratio_and_tolerance(results["independent", batch],
                                                results["independent", 1], key)
        assert abs(ratio - 1 / batch) < tolerance, (key, ratio, tolerance)
        # At B = 1 the estimators coincide in distribution.
        ratio, tolerance = _ratio_and_tolerance(results["shared", 1],
                                                results["independent", 1], key)
        assert abs(ratio - 1) < tolerance, (key, ratio, tolerance)
        # The shared sample adds (1 - 1/B) times the mean covariance of two examples'
        # gradients, positive here: significantly (5 SE) and at least 2x above.
        shared, independent = results["shared", batch], results["independent", batch]
        excess_se = math.hypot(shared[f"{key}_se"], independent[f"{key}_se"])
        assert shared[key] - independent[key] > 5 * excess_se
        assert shared[key] > 2 * independent[key]


def test_paired_estimate_equals_sample_variance_when_the_batch_is_everything() -> None:
    # batch_size = N draws every example each round (in a different order, which a mean
    # loss ignores): half the squared difference of two draws must estimate the same
    # variance as the sample variance over draws of the fixed batch.
    layer = _layer(sigma=0.5)
    seed_everything(7)
    x, y = torch.rand(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    fixed = gradient_variance(dense_shared_sample, layer, x, y, F.cross_entropy, 800)
    paired = gradient_variance(dense_shared_sample, layer, x, y, F.cross_entropy, 800,
                               batch_size=6, generator=torch.Generator().manual_seed(7))
    for key in ("mu", "sigma"):
        ratio, tolerance = _ratio_and_tolerance(paired, fixed, key)
        assert abs(ratio - 1) < tolerance, (key, ratio, tolerance)


def test_mean_weights_have_no_gradient_noise() -> None:
    layer = _layer()
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    result = gradient_variance(dense_mean_weights, layer, x, y, F.cross_entropy, 5)
    assert result["mu"] == pytest.approx(0.0, abs=1e-12)
    assert result["sigma"] == 0.0  # the mean output does not depend on sigma at all


@pytest.mark.parametrize("parametrization", ["log", "softplus"])
def test_both_parameter_groups_are_measured(parametrization: str) -> None:
    layer = _layer(parametrization=parametrization)
    seed_everything(6)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    result = gradient_variance(dense_shared_sample, layer, x, y, F.cross_entropy, 10)
    assert result["mu"] > 0 and result["sigma"] > 0
    assert result["mu_se"] > 0 and result["num_repeats"] == 10
    assert all(p.grad is None for p in layer.parameters())  # no gradients left behind


def test_loglog_slope_recovers_a_power_law() -> None:
    sizes = [1, 2, 4, 8, 16]
    variances = [3.0 * b ** -0.7 for b in sizes]
    slope, slope_se = loglog_slope(sizes, variances)
    assert slope == pytest.approx(-0.7, abs=1e-12) and slope_se == pytest.approx(0, abs=1e-9)
    ses = [0.01 * v for v in variances]  # relative SE 1% -> SE(log v) = 0.01
    slope, slope_se = loglog_slope(sizes, variances, ses)
    sxx = sum((math.log(b) - math.log(2 ** 2)) ** 2 for b in sizes)
    assert slope == pytest.approx(-0.7, abs=1e-12)
    assert slope_se == pytest.approx(0.01 / math.sqrt(sxx), rel=1e-9)


def test_time_forward_backward_is_positive_and_cleans_up() -> None:
    layer = _layer()
    seconds = time_forward_backward(dense_independent_samples, layer, torch.randn(4, 5),
                                    num_repeats=2, num_warmup=1)
    assert 0 < seconds < 1
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("forward_fn", [dense_shared_sample, dense_independent_samples,
                                        dense_local_reparameterization])
def test_wrong_input_shape_is_an_error(forward_fn) -> None:
    with pytest.raises(ValueError, match="batch"):
        forward_fn(_layer(), torch.randn(4, 6))


def test_local_reparameterization_is_mean_plus_scaled_noise_per_output() -> None:
    # The algebra with the noise replayed: y = m + sqrt(v) * zeta, zeta drawn after nothing
    # else, one number per example and unit.
    layer = _layer()
    x = torch.randn(4, 5)
    seed_everything(12)
    output = dense_local_reparameterization(layer, x)
    seed_everything(12)
    zeta = torch.randn(4, 3)
    mean = x @ layer.weight_mu.T + layer.bias_mu
    variance = x.pow(2) @ layer.weight_sigma.pow(2).T + layer.bias_sigma.pow(2)
    torch.testing.assert_close(output, mean + variance.sqrt() * zeta)


def test_local_reparameterization_matches_independent_samples_in_distribution() -> None:
    # Per example the output is Gaussian with the moments of independent weight samples.
    # Compare the two estimators' draws directly: means within 5 standard errors of a
    # difference of means, variances within 5 standard errors of a difference of sample
    # variances (Gaussian: Var(s^2) = 2 sigma^4 / (K - 1)); and a Gaussian fourth moment
    # (kurtosis 3, standard error sqrt(24 / K)) for both.
    layer = _layer()
    seed_everything(13)
    x = torch.randn(3, 5)
    num_draws = 6000
    with torch.no_grad():
        lrt = torch.stack([dense_local_reparameterization(layer, x)
                           for _ in range(num_draws)]).double()
        independent = torch.stack([dense_independent_samples(layer, x)
                                   for _ in range(num_draws)]).double()
        variance = (x.pow(2) @ layer.weight_sigma.pow(2).T + layer.bias_sigma.pow(2)).double()
    mean_se = (2 * variance / num_draws).sqrt()
    assert ((lrt.mean(0) - independent.mean(0)).abs() < 5 * mean_se).all()
    var_se = variance * math.sqrt(2 * 2 / (num_draws - 1))
    assert ((lrt.var(0) - independent.var(0)).abs() < 5 * var_se).all()
    for draws in (lrt, independent):
        centred = draws - draws.mean(0)
        kurtosis = centred.pow(4).mean(0) / centred.pow(2).mean(0).pow(2)
        assert ((kurtosis - 3).abs() < 5 * math.sqrt(24 / num_draws)).all()


def test_local_reparameterization_gradient_variance_against_independent_samples() -> None:
    # The batch's outputs have the same joint distribution (independent Gaussians), so the
    # gradient with respect to the means, which depends on the weights only through the
    # outputs, has the same variance. The gradient with respect to log sigma does not: under
    # weight samples it is dL/dy_j * sigma_ji eps_ji x_i, and the local reparameterisation
    # gives its conditional expectation given the outputs, dL/dy_j * sigma_ji^2 x_i^2
    # zeta_j / sqrt(v_j) (Rao-Blackwell): never more variance, here clearly less. Both fall
    # like 1/B.
    layer = _layer(in_features=8, out_features=4, sigma=0.5)
    seed_everything(14)
    x = torch.rand(64, 8)
    y = torch.randint(0, 4, (64,))
    generator = torch.Generator().manual_seed(14)
    repeats, batch = 400, 16
    results = {
        (name, size): gradient_variance(ESTIMATORS[name], layer, x, y, F.cross_entropy,
                                        repeats, batch_size=size, generator=generator)
        for name in ("independent", "lrt") for size in (1, batch)
    }
    for size in (1, batch):
        ratio, tolerance = _ratio_and_tolerance(results["lrt", size],
                                                results["independent", size], "mu")
        assert abs(ratio - 1) < tolerance, (size, ratio, tolerance)
        lrt, independent = results["lrt", size], results["independent", size]
        gap_se = math.hypot(lrt["sigma_se"], independent["sigma_se"])
        assert independent["sigma"] - lrt["sigma"] > 5 * gap_se, size
    for key in ("mu", "sigma"):
        ratio, tolerance = _ratio_and_tolerance(results["lrt", batch], results["lrt", 1], key)
        assert abs(ratio - 1 / batch) < tolerance, (key, ratio, tolerance)


def test_local_reparameterization_has_finite_gradients_for_a_zero_input() -> None:
    layer = BayesianDenseFlipout(3, 2, bias=False)
    output = dense_local_reparameterization(layer, torch.zeros(2, 3))
    output.sum().backward()
    assert output.abs().max().item() < 1e-15  # sqrt of the floor, 1e-19 in float32
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
