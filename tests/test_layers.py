"""Statistical and exact tests of the Flipout layers (bnn_course.layers, bnn_course.flipout).

Statistical tests use fixed seeds and tolerances of five standard errors derived from the
number of samples, so a correct implementation fails with negligible probability and a wrong
estimator (a wrong variance, a missing sign, a per-pixel sign) fails by a wide margin.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from bnn_course.flipout import conv2d_flipout, conv2d_flipout_per_pixel, rademacher
from bnn_course.layers import BayesianConv2dFlipout, BayesianDenseFlipout
from bnn_course.seeding import seed_everything

NUM_DRAWS = 4000
Z = 5.0  # tolerance in standard errors


def _randomise_sigmas(layer, low: float = -2.0, high: float = -0.5) -> None:
    """Give every weight and bias its own sigma, so tests see per-entry variances."""
    with torch.no_grad():
        layer.weight_posterior.log_sigma.uniform_(low, high)
        if layer.bias_posterior is not None:
            layer.bias_posterior.log_sigma.uniform_(low, high)


def _draws(layer, x: torch.Tensor, num_draws: int = NUM_DRAWS) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([layer(x) for _ in range(num_draws)])


# ---------------------------------------------------------------- dense layer


def test_dense_flipout_mean_equals_mean_weight_output() -> None:
    seed_everything(123)
    layer = BayesianDenseFlipout(6, 4)
    _randomise_sigmas(layer)
    x = torch.randn(5, 6)
    draws = _draws(layer, x)
    mean_output = layer(x, sample=False).detach()
    standard_error = draws.std(0) / math.sqrt(NUM_DRAWS)
    assert torch.all((draws.mean(0) - mean_output).abs() < Z * standard_error)


def test_dense_flipout_variance_is_sum_sigma2_x2_plus_bias_variance() -> None:
    seed_everything(123)
    layer = BayesianDenseFlipout(6, 4)
    _randomise_sigmas(layer)
    x = torch.randn(5, 6)
    draws = _draws(layer, x)
    with torch.no_grad():
        expected = (x**2) @ (layer.weight_sigma**2).T + layer.bias_sigma**2  # (5, 4)
    relative_error = draws.var(0) / expected - 1.0
    # The sample variance of n Gaussian draws has relative standard error sqrt(2/(n-1)).
    assert relative_error.abs().max() < Z * math.sqrt(2.0 / (NUM_DRAWS - 1))


def test_dense_flipout_decorrelates_identical_examples() -> None:
    """Two copies of one input in a batch get independent-looking noise (unlike a shared
    weight sample, which would give them identical outputs)."""
    seed_everything(123)
    layer = BayesianDenseFlipout(8, 3)
    _randomise_sigmas(layer)
    x = torch.randn(1, 8).repeat(2, 1)
    draws = _draws(layer, x)
    noise = draws - layer(x, sample=False).detach()
    correlation = torch.stack([torch.corrcoef(noise[:, :, j].T)[0, 1] for j in range(3)])
    assert correlation.abs().max() < Z / math.sqrt(NUM_DRAWS)
    assert not torch.allclose(draws[:, 0], draws[:, 1])


def test_dense_example_sees_one_genuine_weight_sample() -> None:
    """y_n = (mu + dW * s_n r_n^T) x_n + b_mu + db * s_n, exactly."""
    seed_everything(123)
    batch, n_in, n_out = 4, 5, 3
    x = torch.randn(batch, n_in)
    weight_mu, weight_delta = torch.randn(n_out, n_in), torch.randn(n_out, n_in)
    bias_mu, bias_delta = torch.randn(n_out), torch.randn(n_out)
    sign_in = rademacher((batch, n_in), like=x)
    sign_out = rademacher((batch, n_out), like=x)
    from bnn_course.flipout import dense_flipout

    output = dense_flipout(x, weight_mu, weight_delta, bias_mu, bias_delta, sign_in, sign_out)
    for n in range(batch):
        weight_n = weight_mu + weight_delta * torch.outer(sign_out[n], sign_in[n])
        bias_n = bias_mu + bias_delta * sign_out[n]
        torch.testing.assert_close(output[n], weight_n @ x[n] + bias_n)


def test_rademacher_signs_are_fair_coins() -> None:
    seed_everything(123)
    signs = rademacher((100_000,), like=torch.empty(0))
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    # mean of n fair signs has standard error 1/sqrt(n)
    assert abs(signs.mean().item()) < Z / math.sqrt(signs.numel())


# ---------------------------------------------------------------- convolution


def test_conv_flipout_mean_equals_mean_kernel_output() -> None:
    seed_everything(123)
    layer = BayesianConv2dFlipout(2, 3, 3, padding=1)
    _randomise_sigmas(layer)
    x = torch.randn(2, 2, 5, 5)
    draws = _draws(layer, x)
    mean_output = layer(x, sample=False).detach()
    standard_error = draws.std(0) / math.sqrt(NUM_DRAWS)
    # 150 outputs at 5 standard errors: a correct layer fails with probability ~1e-4.
    assert torch.all((draws.mean(0) - mean_output).abs() < Z * standard_error)


def test_conv_flipout_variance_matches_kernel_variance() -> None:
    """Var y[n, c, i, j] = sum over the receptive field of sigma^2 x^2, plus sigma_b^2."""
    seed_everything(123)
    layer = BayesianConv2dFlipout(2, 3, 3, padding=1)
    _randomise_sigmas(layer)
    x = torch.randn(2, 2, 5, 5)
    draws = _draws(layer, x)
    with torch.no_grad():
        expected = F.conv2d(x**2, layer.weight_sigma**2, layer.bias_sigma**2, padding=1)
    relative_error = draws.var(0) / expected - 1.0
    assert relative_error.abs().max() < Z * math.sqrt(2.0 / (NUM_DRAWS - 1))


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (1, "same")])
def test_conv_example_output_is_a_convolution_with_one_sampled_kernel(stride, padding) -> None:
    seed_everything(123)
    batch, c_in, c_out = 3, 2, 4
    x = torch.randn(batch, c_in, 7, 7)
    weight_mu, weight_delta = torch.randn(c_out, c_in, 3, 3), torch.randn(c_out, c_in, 3, 3)
    bias_mu, bias_delta = torch.randn(c_out), torch.randn(c_out)
    sign_in = rademacher((batch, c_in), like=x)
    sign_out = rademacher((batch, c_out), like=x)
    output = conv2d_flipout(x, weight_mu, weight_delta, bias_mu, bias_delta, sign_in,
                            sign_out, stride=stride, padding=padding)
    for n in range(batch):
        signs = torch.outer(sign_out[n], sign_in[n])[:, :, None, None]
        kernel_n = weight_mu + weight_delta * signs
        bias_n = bias_mu + bias_delta * sign_out[n]
        expected = F.conv2d(x[n : n + 1], kernel_n, bias_n, stride=stride, padding=padding)
        torch.testing.assert_close(output[n : n + 1], expected)


def test_conv_positions_seeing_the_same_patch_are_perfectly_correlated() -> None:
    """A constant image: every interior position sees the same patch. Under channel-wise
    Flipout one example uses one kernel sample everywhere, so those outputs are equal in
    every draw (correlation 1); under per-pixel signs they are not."""
    seed_everything(123)
    layer = BayesianConv2dFlipout(3, 4, 3, padding=0)
    _randomise_sigmas(layer)
    x = torch.ones(2, 3, 6, 6) * torch.tensor([0.5, -1.0, 2.0])[None, :, None, None]
    draws = _draws(layer, x, num_draws=500)  # (draws, batch, 4, 4, 4)
    reference = draws[..., :1, :1]
    assert torch.allclose(draws, reference.expand_as(draws), atol=1e-5)
    noise = (draws - layer(x, sample=False).detach())[:, 0, 0]  # example 0, channel 0
    correlation = torch.corrcoef(torch.stack([noise[:, 0, 0], noise[:, 2, 3]]))[0, 1]
    assert correlation > 0.9999
    # The two examples (identical images) are decorrelated by their own signs.
    other = (draws - layer(x, sample=False).detach())[:, 1, 0, 0, 0]
    assert torch.corrcoef(torch.stack([noise[:, 0, 0], other]))[0, 1].abs() < Z / math.sqrt(500)

    with torch.no_grad():
        per_pixel = torch.stack([
            conv2d_flipout_per_pixel(x, layer.weight_mu, layer.weight_posterior.perturbation(),
                                     layer.bias_mu, layer.bias_posterior.perturbation())
            for _ in range(500)
        ])
    per_pixel_noise = (per_pixel - layer(x, sample=False).detach())[:, 0, 0]
    per_pixel_corr = torch.corrcoef(
        torch.stack([per_pixel_noise[:, 0, 0], per_pixel_noise[:, 2, 3]]))[0, 1]
    assert per_pixel_corr.abs() < Z / math.sqrt(500)


# ---------------------------------------------------------------- both layers


def _layers():
    return [BayesianDenseFlipout(4, 3), BayesianConv2dFlipout(2, 3, 3, padding=1)]


def _input_for(layer) -> torch.Tensor:
    if isinstance(layer, BayesianDenseFlipout):
        return torch.randn(5, 4)
    return torch.randn(5, 2, 6, 6)


@pytest.mark.parametrize("layer", _layers(), ids=["dense", "conv"])
def test_gradients_reach_means_and_sigmas(layer) -> None:
    seed_everything(123)
    layer(_input_for(layer)).pow(2).sum().backward()
    for posterior in (layer.weight_posterior, layer.bias_posterior):
        assert posterior.mu.grad is not None and posterior.mu.grad.abs().sum() > 0
        assert posterior.log_sigma.grad is not None and posterior.log_sigma.grad.abs().sum() > 0


@pytest.mark.parametrize("layer", _layers(), ids=["dense", "conv"])
def test_deterministic_mode_is_deterministic_and_ignores_sigma(layer) -> None:
    x = _input_for(layer)
    first, second = layer(x, sample=False), layer(x, sample=False)
    assert torch.equal(first, second)
    first.sum().backward()
    assert layer.weight_posterior.log_sigma.grad is None
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("layer", _layers(), ids=["dense", "conv"])
def test_kl_matches_torch_distributions(layer) -> None:
    seed_everything(123)
    _randomise_sigmas(layer)
    layer.prior_sigma = 0.7
    expected = sum(
        kl_divergence(Normal(p.mu, p.sigma), Normal(0.0, 0.7)).sum()
        for p in (layer.weight_posterior, layer.bias_posterior)
    )
    torch.testing.assert_close(layer.kl_divergence(), expected)
    assert layer.kl_divergence().shape == ()


@pytest.mark.parametrize("layer", _layers(), ids=["dense", "conv"])
def test_autocast_bf16_output_and_float32_kl(layer) -> None:
    x = _input_for(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stochastic, mean = layer(x), layer(x, sample=False)
        kl = layer.kl_divergence()
    assert stochastic.dtype == torch.bfloat16 and mean.dtype == torch.bfloat16
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, layer.kl_divergence())
    # bf16 has 8 bits of mantissa: the mean layer agrees with fp32 to about 1%.
    torch.testing.assert_close(mean.float(), layer(x, sample=False), rtol=0.03, atol=0.03)


def test_sigma_attributes_and_no_bias() -> None:
    layer = BayesianDenseFlipout(4, 3, bias=False, init_log_sigma=-3.0)
    assert layer.bias_mu is None and layer.bias_sigma is None
    torch.testing.assert_close(layer.weight_sigma, torch.full((3, 4), math.exp(-3.0)))
    assert layer(torch.randn(2, 4)).shape == (2, 3)
    conv = BayesianConv2dFlipout(2, 4, 3, bias=False, parametrization="softplus",
                                 init_log_sigma=-3.0)
    torch.testing.assert_close(conv.weight_sigma, torch.full((4, 2, 3, 3), math.exp(-3.0)))
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 4, 3, 3)


def test_conv_arguments_as_in_nn_conv2d() -> None:
    layer = BayesianConv2dFlipout(4, 6, (3, 5), stride=2, padding=(1, 2), groups=2)
    reference = torch.nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), groups=2)
    assert layer.weight_mu.shape == reference.weight.shape
    x = torch.randn(2, 4, 9, 9)
    assert layer(x).shape == reference(x).shape
    assert "stride=(2, 2)" in repr(layer) and "groups=2" in repr(layer)


def test_means_are_initialised_like_torch_layers() -> None:
    seed_everything(123)
    layer = BayesianDenseFlipout(400, 300)
    bound = 1 / math.sqrt(400)
    assert layer.weight_mu.abs().max() <= bound
    # uniform(-b, b) has standard deviation b / sqrt(3)
    assert abs(layer.weight_mu.std().item() / (bound / math.sqrt(3)) - 1) < 0.02


@pytest.mark.parametrize(
    "layer, bad_input, expected",
    [
        (BayesianDenseFlipout(4, 3), torch.randn(5, 6), r"\(batch, 4\)"),
        (BayesianDenseFlipout(4, 3), torch.randn(2, 5, 4), r"\(batch, 4\)"),
        (BayesianConv2dFlipout(2, 3, 3), torch.randn(2, 5, 6, 6), r"\(batch, 2, height, width\)"),
        (BayesianConv2dFlipout(2, 3, 3), torch.randn(2, 6, 6), r"\(batch, 2, height, width\)"),
    ],
)
def test_bad_input_names_the_expected_shape(layer, bad_input, expected) -> None:
    with pytest.raises(ValueError, match=expected):
        layer(bad_input)
    with pytest.raises(ValueError, match=expected):
        layer(bad_input, sample=False)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="prior_sigma"):
        BayesianDenseFlipout(4, 3, prior_sigma=0.0)
    with pytest.raises(ValueError, match="parametrization"):
        BayesianConv2dFlipout(2, 3, 3, parametrization="exp")
    with pytest.raises(ValueError, match="groups"):
        BayesianConv2dFlipout(3, 4, 3, groups=2)
