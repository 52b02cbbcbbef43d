"""Tests of bnn_course.conv_noise: closed forms with known answers and Monte Carlo checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnn_course.conv_noise import (
    ESTIMATORS,
    conv2d_local_reparameterization,
    kernel_noise_covariance,
    noise_correlation,
    sample_conv_outputs,
    single_kernel_residual,
)
from bnn_course.layers import BayesianConv2dFlipout


def _layer(seed: int = 0) -> BayesianConv2dFlipout:
    torch.manual_seed(seed)
    layer = BayesianConv2dFlipout(2, 3, kernel_size=3, init_log_sigma=math.log(0.3))
    with torch.no_grad():  # unequal sigmas, so a wrong index in a closed form shows
        layer.weight_posterior.log_sigma.uniform_(math.log(0.1), math.log(0.5))
    return layer


# --- noise_correlation -----------------------------------------------------------------


def test_noise_correlation_of_affine_copies_is_plus_or_minus_one() -> None:
    torch.manual_seed(1)
    a = torch.randn(500)
    samples = torch.stack([a, 2 * a + 1, -0.5 * a + 3], dim=1)  # (S, 3)
    corr = noise_correlation(samples, (0,))
    torch.testing.assert_close(corr, torch.tensor([1.0, 1.0, -1.0]))


def test_noise_correlation_of_independent_draws_is_within_five_standard_errors() -> None:
    torch.manual_seed(2)
    num_samples = 4000
    samples = torch.randn(num_samples, 4, 5)
    corr = noise_correlation(samples, (2, 3))
    assert corr[2, 3].item() == pytest.approx(1.0)
    off = corr.flatten()[torch.arange(20) != 13]
    assert off.abs().max().item() < 5 / math.sqrt(num_samples)


def test_noise_correlation_matches_a_known_correlation() -> None:
    torch.manual_seed(3)
    num_samples, rho = 20_000, 0.6
    a, b = torch.randn(2, num_samples)
    samples = torch.stack([a, rho * a + math.sqrt(1 - rho**2) * b], dim=1)
    corr = noise_correlation(samples, (0,))[1].item()
    # the standard error of a sample correlation is about (1 - rho^2) / sqrt(S)
    assert abs(corr - rho) < 5 * (1 - rho**2) / math.sqrt(num_samples)


def test_noise_correlation_rejects_a_partial_reference() -> None:
    with pytest.raises(ValueError):
        noise_correlation(torch.randn(10, 3, 4), (1,))


# --- kernel_noise_covariance -----------------------------------------------------------


def test_kernel_noise_covariance_of_a_one_by_one_kernel() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    weight_sigma = torch.tensor([[[[0.5]]]])
    bias_sigma = torch.tensor([0.1])
    cov = kernel_noise_covariance(x, weight_sigma, bias_sigma)
    pixels = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = 0.25 * torch.outer(pixels, pixels) + 0.01
    torch.testing.assert_close(cov[0, 0], expected)


def test_kernel_noise_covariance_diagonal_is_the_convolution_of_squares() -> None:
    layer = _layer()
    torch.manual_seed(4)
    x = torch.randn(2, 2, 7, 6)
    for stride, padding, dilation in [(1, 0, 1), (2, 1, 1), (1, 2, 2)]:
        cov = kernel_noise_covariance(x, layer.weight_sigma, layer.bias_sigma,
                                      stride, padding, dilation)
        variance = F.conv2d(x**2, layer.weight_sigma**2, layer.bias_sigma**2,
                            stride, padding, dilation)
        torch.testing.assert_close(cov.diagonal(dim1=-2, dim2=-1), variance.flatten(2))


def test_kernel_noise_covariance_matches_monte_carlo_of_genuine_kernel_samples() -> None:
    layer = _layer()
    torch.manual_seed(5)
    x = torch.rand(1, 2, 5, 5)
    num_samples = 3000
    samples = sample_conv_outputs(layer, x, num_samples, "independent")[:, 0]  # (S, O, 3, 3)
    noise = (samples - samples.mean(0)).flatten(2).double()  # (S, O, L)
    empirical = torch.einsum("sop,soq->opq", noise, noise) / (num_samples - 1)
    exact = kernel_noise_covariance(x, layer.weight_sigma, layer.bias_sigma)[0].double()
    # Gaussian noise: Var[x_p x_q] = C_pp C_qq + C_pq^2, so the standard error is known
    diagonal = exact.diagonal(dim1=-2, dim2=-1)
    standard_error = ((diagonal[:, :, None] * diagonal[:, None, :] + exact**2)
                      / num_samples).sqrt()
    assert ((empirical - exact).abs() / standard_error).max().item() < 5


def test_kernel_noise_covariance_rejects_string_padding() -> None:
    with pytest.raises(ValueError):
        kernel_noise_covariance(torch.randn(1, 2, 5, 5), torch.ones(3, 2, 3, 3),
                                padding="same")


# --- single_kernel_residual ------------------------------------------------------------


def test_single_kernel_residual_is_zero_for_a_convolution() -> None:
    torch.manual_seed(6)
    x = torch.randn(3, 2, 12, 12)
    weight, bias = torch.randn(4, 2, 3, 3), torch.randn(4)
    for stride, padding, dilation in [(1, 0, 1), (1, 1, 1), (1, 2, 2)]:
        y = F.conv2d(x, weight, bias, stride, padding, dilation)
        residual = single_kernel_residual(x, y, 3, stride, padding, dilation)
        assert residual.shape == (3,)
        assert residual.max().item() < 1e-5


def test_single_kernel_residual_is_large_for_random_outputs() -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 2, 16, 16)
    y = torch.randn(2, 3, 14, 14)
    residual = single_kernel_residual(x, y, 3)
    # least squares with 19 unknowns explains about 19 of 196 dimensions of pure noise
    assert residual.min().item() > 0.85


def test_single_kernel_residual_needs_enough_positions() -> None:
    with pytest.raises(ValueError):
        single_kernel_residual(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2), 3)


# --- sample_conv_outputs ---------------------------------------------------------------


def test_sample_conv_outputs_shape_and_unknown_estimator() -> None:
    layer = _layer()
    x = torch.randn(2, 2, 6, 6)
    for estimator in ESTIMATORS:
        assert sample_conv_outputs(layer, x, 3, estimator).shape == (3, 2, 3, 4, 4)
    with pytest.raises(ValueError):
        sample_conv_outputs(layer, x, 3, "per_example")


def test_each_estimator_shares_a_kernel_within_an_image_or_not() -> None:
    layer = _layer()
    torch.manual_seed(8)
    x = torch.randn(2, 2, 16, 16)
    mean_output = layer(x, sample=False)
    residuals = {}
    for estimator in ESTIMATORS:
        noise = sample_conv_outputs(layer, x, 1, estimator)[0] - mean_output
        residuals[estimator] = single_kernel_residual(x, noise, 3).max().item()
    assert residuals["flipout"] < 1e-5
    assert residuals["shared"] < 1e-5
    assert residuals["independent"] < 1e-5
    assert residuals["per_pixel"] > 0.8
    assert residuals["lrt"] > 0.8


def test_shared_estimator_gives_identical_images_identical_outputs_flipout_does_not() -> None:
    layer = _layer()
    torch.manual_seed(9)
    x = torch.randn(1, 2, 6, 6).expand(2, -1, -1, -1)
    shared = sample_conv_outputs(layer, x, 5, "shared")
    torch.testing.assert_close(shared[:, 0], shared[:, 1])
    flipout = sample_conv_outputs(layer, x, 5, "flipout")
    assert (flipout[:, 0] - flipout[:, 1]).abs().max().item() > 1e-3


def test_flipout_per_pixel_and_lrt_have_the_same_mean_and_variance() -> None:
    layer = _layer()
    torch.manual_seed(10)
    x = torch.rand(2, 2, 6, 6)
    num_samples = 2000
    mean_output = layer(x, sample=False).detach()
    variance = F.conv2d(x**2, layer.weight_sigma**2, layer.bias_sigma**2).detach()
    for estimator in ("flipout", "per_pixel", "lrt"):
        samples = sample_conv_outputs(layer, x, num_samples, estimator)
        mean_error = (samples.mean(0) - mean_output) / (variance / num_samples).sqrt()
        assert mean_error.abs().max().item() < 5
        # Gaussian noise given the signs: the sample variance has s.e. var * sqrt(2 / S)
        var_error = (samples.var(0) - variance) / (variance * math.sqrt(2 / num_samples))
        assert var_error.abs().max().item() < 5


def test_per_pixel_noise_is_uncorrelated_between_positions_flipout_is_not() -> None:
    layer = _layer()
    torch.manual_seed(11)
    x = torch.ones(1, 2, 5, 5)  # every position sees the same patch
    num_samples = 2000
    flipout = sample_conv_outputs(layer, x, num_samples, "flipout")[:, 0, 0]  # (S, 3, 3)
    per_pixel = sample_conv_outputs(layer, x, num_samples, "per_pixel")[:, 0, 0]
    torch.testing.assert_close(noise_correlation(flipout, (1, 1)), torch.ones(3, 3))
    corr = noise_correlation(per_pixel, (1, 1)).flatten()
    off = torch.cat([corr[:4], corr[5:]])
    assert off.abs().max().item() < 5 / math.sqrt(num_samples)


def test_local_reparameterization_is_mean_plus_scaled_noise_per_position() -> None:
    layer = _layer()
    x = torch.randn(2, 2, 7, 7)
    args = (layer.weight_mu, layer.weight_sigma, layer.bias_mu, layer.bias_sigma)
    torch.manual_seed(12)
    y = conv2d_local_reparameterization(x, *args, stride=2, padding=1)
    torch.manual_seed(12)
    zeta = torch.randn(2, 3, 4, 4)
    mean = F.conv2d(x, layer.weight_mu, layer.bias_mu, stride=2, padding=1)
    variance = F.conv2d(x**2, layer.weight_sigma**2, layer.bias_sigma**2, stride=2, padding=1)
    torch.testing.assert_close(y, mean + variance.sqrt() * zeta)
    with pytest.raises(ValueError, match="bias"):
        conv2d_local_reparameterization(x, layer.weight_mu, layer.weight_sigma, layer.bias_mu)


def test_local_reparameterization_noise_is_independent_between_positions_and_images() -> None:
    # Every position sees the same patch: one kernel sample would give them correlation 1;
    # the local reparameterisation gives 0 (within 5 standard errors 1/sqrt(S)), and also 0
    # between two identical images of the batch.
    layer = _layer()
    torch.manual_seed(13)
    x = torch.ones(2, 2, 5, 5)
    num_samples = 2000
    samples = sample_conv_outputs(layer, x, num_samples, "lrt")[:, :, 0]  # (S, 2, 3, 3)
    corr = noise_correlation(samples, (0, 1, 1)).flatten()
    off = torch.cat([corr[:4], corr[5:]])  # all but the reference itself
    assert off.abs().max().item() < 5 / math.sqrt(num_samples)
