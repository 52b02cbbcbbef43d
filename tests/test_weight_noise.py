"""Tests of bnn_course.weight_noise on layers whose answer is known in closed form.

One dense layer with every weight mean equal to ``a``, every bias mean ``b`` and every
standard deviation ``s``, fed inputs with entries +-1 (so ``||x_n||^2 = d`` for every row):

* signal: every unit's posterior-mean pre-activation is ``a * sum_i x_ni + b``;
* noise: every unit's variance is ``s^2 * (d + 1)`` (weights and bias), exactly.

The units are independent Gaussians, so the averaged sample variance over ``S`` passes,
``N`` inputs and ``J`` units has relative standard error ``sqrt(2 / ((S - 1) N J))``, and the
SNR (a square root) half of that; tolerances are five such standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnn_course.layers import BayesianDenseFlipout
from bnn_course.weight_noise import (
    noise_statistics,
    pre_activations,
    signal_to_noise_by_layer,
    top_class_flip_rate,
)


def _constant_layer(in_features: int, out_features: int, weight_mu: float | torch.Tensor,
                    bias_mu: float, log_sigma: float, dtype: torch.dtype = torch.float32
                    ) -> BayesianDenseFlipout:
    layer = BayesianDenseFlipout(in_features, out_features, init_log_sigma=log_sigma).to(dtype)
    with torch.no_grad():
        if isinstance(weight_mu, torch.Tensor):
            layer.weight_posterior.mu.copy_(weight_mu)
        else:
            layer.weight_posterior.mu.fill_(weight_mu)
        layer.bias_posterior.mu.fill_(bias_mu)
    return layer


def _plus_minus_one(num_rows: int, num_features: int, seed: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (num_rows, num_features), generator=generator) * 2 - 1).to(dtype)


def _closed_form_snr(x: torch.Tensor, a: float, b: float, s: float) -> float:
    signal = (a * x.double().sum(1) + b).pow(2).mean().sqrt().item()
    noise = s * math.sqrt(x.shape[1] + 1)
    return signal / noise


@pytest.mark.parametrize("log_sigma", [-3.0, -1.0, 0.5])
def test_one_layer_snr_matches_the_closed_form(log_sigma: float) -> None:
    torch.manual_seed(0)
    d, units, rows, passes = 21, 30, 8, 400
    a, b = 0.1, 0.3
    layer = _constant_layer(d, units, a, b, log_sigma)
    x = _plus_minus_one(rows, d, seed=1)
    expected = _closed_form_snr(x, a, b, math.exp(log_sigma))
    (got,) = signal_to_noise_by_layer([layer], x, passes)
    tolerance = 5 * 0.5 * math.sqrt(2 / ((passes - 1) * rows * units))
    assert got == pytest.approx(expected, rel=tolerance)


def test_the_variance_estimate_is_unbiased_even_with_two_passes() -> None:
    # With S = 2 a biased estimator (dividing by S, or not subtracting the sample mean) is off
    # by a factor of 2 in the variance; many units make the unbiased one precise anyway.
    torch.manual_seed(10)
    d, units, rows, passes = 21, 200, 64, 2
    a, b, log_sigma = 0.1, 0.3, -1.0
    layer = _constant_layer(d, units, a, b, log_sigma)
    x = _plus_minus_one(rows, d, seed=11)
    (got,) = signal_to_noise_by_layer([layer], x, passes)
    tolerance = 5 * 0.5 * math.sqrt(2 / ((passes - 1) * rows * units))
    assert got == pytest.approx(_closed_form_snr(x, a, b, math.exp(log_sigma)), rel=tolerance)


def test_tiny_sigma_gives_a_huge_snr() -> None:
    torch.manual_seed(1)
    d, units, rows, passes = 21, 30, 8, 200
    a, b, log_sigma = 0.1, 0.3, -20.0
    x = _plus_minus_one(rows, d, seed=2)
    # In float64 the closed form still holds at sigma = 2e-9 ...
    layer64 = _constant_layer(d, units, a, b, log_sigma, dtype=torch.float64)
    (snr64,) = signal_to_noise_by_layer([layer64], x.double(), passes)
    expected = _closed_form_snr(x, a, b, math.exp(log_sigma))
    assert expected > 1e7
    tolerance = 5 * 0.5 * math.sqrt(2 / ((passes - 1) * rows * units))
    assert snr64 == pytest.approx(expected, rel=tolerance)
    # ... in float32 the noise is below rounding, but the SNR is still enormous.
    layer32 = _constant_layer(d, units, a, b, log_sigma)
    (snr32,) = signal_to_noise_by_layer([layer32], x, passes)
    assert snr32 > 1e5


def test_no_noise_at_all_gives_infinite_snr() -> None:
    layer = _constant_layer(5, 3, 0.2, 0.0, log_sigma=float("-inf"))
    assert signal_to_noise_by_layer([layer], torch.ones(2, 5), 3) == [math.inf]


def test_the_first_layer_of_a_stack_is_not_affected_by_the_layers_after_it() -> None:
    torch.manual_seed(3)
    d, units, rows, passes = 21, 30, 8, 400
    a, b, log_sigma = 0.1, 0.3, -1.0
    first = _constant_layer(d, units, a, b, log_sigma)
    second = BayesianDenseFlipout(units, 4, init_log_sigma=0.0)
    x = _plus_minus_one(rows, d, seed=4)
    snrs = signal_to_noise_by_layer([first, second], x, passes)
    assert len(snrs) == 2
    tolerance = 5 * 0.5 * math.sqrt(2 / ((passes - 1) * rows * units))
    assert snrs[0] == pytest.approx(_closed_form_snr(x, a, b, math.exp(log_sigma)), rel=tolerance)
    # The second layer inherits the first layer's noise and adds its own (sigma = 1 on a
    # fan-in of 30 against means of size 1/sqrt(90)): it must be far noisier.
    assert snrs[1] < snrs[0] / 3


def test_noise_accumulates_with_depth_when_sigma_is_large() -> None:
    torch.manual_seed(5)
    widths = (64, 64, 64, 64)
    layers = [BayesianDenseFlipout(i, o, init_log_sigma=0.0)
              for i, o in zip(widths[:-1], widths[1:], strict=True)]
    snrs = signal_to_noise_by_layer(layers, torch.randn(16, 64), 50)
    # Each layer multiplies 1 + 1/SNR^2 by about 1 + 3 sigma^2 d = 193.
    assert snrs[0] > 10 * snrs[1] > 100 * snrs[2]


def test_pre_activations_apply_the_activation_between_layers_only() -> None:
    torch.manual_seed(6)
    first = BayesianDenseFlipout(5, 4)
    second = BayesianDenseFlipout(4, 3)
    x = torch.randn(7, 5)
    h1, h2 = pre_activations([first, second], x, sample=False)
    expected_h1 = F.linear(x, first.weight_mu, first.bias_mu)
    expected_h2 = F.linear(F.relu(expected_h1), second.weight_mu, second.bias_mu)
    torch.testing.assert_close(h1, expected_h1)
    torch.testing.assert_close(h2, expected_h2)
    assert (h1 < 0).any() and (h2 < 0).any()  # no activation after a layer's output
    (h2_tanh,) = pre_activations([first, second], x, sample=False, activation=torch.tanh)[1:]
    torch.testing.assert_close(h2_tanh, F.linear(torch.tanh(expected_h1), second.weight_mu,
                                                 second.bias_mu))


def test_two_class_flip_rate_matches_the_normal_cdf() -> None:
    # Logit 0 has mean a * sum(x) + b, logit 1 has mean b; both have variance s^2 (d + 1) and
    # are independent, so the top class flips with probability Phi(-|a sum x| / sqrt(2 v)).
    torch.manual_seed(7)
    d, rows, passes = 21, 16, 400
    a, b, log_sigma = 0.2, 0.1, -1.0
    weight_mu = torch.zeros(2, d)
    weight_mu[0] = a
    layer = _constant_layer(d, 2, weight_mu, b, log_sigma)
    x = _plus_minus_one(rows, d, seed=8)  # d odd: sum(x) != 0, no ties in the mean network
    variance = math.exp(2 * log_sigma) * (d + 1)
    margins = (a * x.double().sum(1)).abs()
    probabilities = torch.distributions.Normal(0.0, 1.0).cdf(-margins / math.sqrt(2 * variance))
    expected = probabilities.mean().item()
    assert 0.05 < expected < 0.45  # a case where the answer is neither 0 nor 1/2
    got = top_class_flip_rate([layer], x, passes)
    standard_error = math.sqrt(expected * (1 - expected) / (rows * passes))
    assert abs(got - expected) < 5 * standard_error


def test_flip_rate_is_zero_without_noise_and_chance_when_noise_dominates() -> None:
    torch.manual_seed(9)
    classes, d, rows, passes = 5, 20, 16, 400
    x = torch.randn(rows, d, dtype=torch.float64)
    quiet = BayesianDenseFlipout(d, classes, init_log_sigma=-20.0).double()
    assert top_class_flip_rate([quiet], x, 50) == 0.0
    # sigma = e^4 against means of at most 1/sqrt(20): every pass is a fresh guess among
    # the classes, right with probability 1/C.
    loud = BayesianDenseFlipout(d, classes, init_log_sigma=4.0).double()
    got = top_class_flip_rate([loud], x, passes)
    expected = 1 - 1 / classes
    assert abs(got - expected) < 5 * math.sqrt(expected * (1 - expected) / (rows * passes))


def test_bad_arguments_are_errors() -> None:
    layer = BayesianDenseFlipout(3, 2)
    x = torch.ones(1, 3)
    with pytest.raises(ValueError, match="num_samples"):
        signal_to_noise_by_layer([layer], x, 1)
    with pytest.raises(ValueError, match="num_samples"):
        top_class_flip_rate([layer], x, 0)
    with pytest.raises(ValueError, match="empty"):
        pre_activations([], x)


def test_noise_statistics_of_known_gaussian_passes() -> None:
    """h = m + s * eps with known m and s: signal rms(m), noise s, sampled sqrt(m^2 + s^2)."""
    generator = torch.Generator().manual_seed(4)
    means = [torch.full((8, 25), 3.0), torch.linspace(-2.0, 2.0, 400).reshape(4, 100)]
    scales = [0.5, 4.0]

    def run(sample: bool) -> list[torch.Tensor]:
        return [m + (s * torch.randn(m.shape, generator=generator) if sample else 0.0)
                for m, s in zip(means, scales, strict=True)]

    passes = 60
    stats = noise_statistics(run, passes)
    for mean, scale, layer in zip(means, scales, stats, strict=True):
        signal = mean.double().pow(2).mean().sqrt().item()
        assert layer["signal_rms"] == pytest.approx(signal, rel=1e-12)
        # averaged sample variance: relative s.e. sqrt(2 / ((S - 1) J)), halved by the root
        tolerance = 5 * 0.5 * math.sqrt(2 / ((passes - 1) * mean.numel()))
        assert layer["noise_rms"] == pytest.approx(scale, rel=tolerance)
        assert layer["signal_to_noise"] == pytest.approx(signal / layer["noise_rms"])
        assert layer["sampled_rms"] == pytest.approx(math.sqrt(signal**2 + scale**2),
                                                     rel=2 * tolerance)


def test_noise_statistics_rejects_one_pass_and_a_changing_layer_count() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        noise_statistics(lambda sample: [torch.zeros(2)], 1)
    with pytest.raises(ValueError, match="pre-activations"):
        noise_statistics(lambda sample: [torch.zeros(2)] * (2 if sample else 1), 3)
