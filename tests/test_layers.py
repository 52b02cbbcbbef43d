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
from bnn_course.layers import (
    BayesianConv2dFlipout,
    BayesianDenseFlipout,
    BayesianLayer,
    bayesian_layers,
)
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
        (BayesianDenseFlipout(4, 3), torch.randn(5, 6), r"\(batch, \*, 4\)"),
        (BayesianDenseFlipout(4, 3), torch.randn(4), r"\(batch, \*, 4\)"),
        (BayesianConv2dFlipout(2, 3, 3), torch.randn(2, 5, 6, 6),
         r"\(batch, 2, height >= 3, width >= 3\)"),
        (BayesianConv2dFlipout(2, 3, 3), torch.randn(2, 6, 6),
         r"\(batch, 2, height >= 3, width >= 3\)"),
        # smaller than the kernel: 5x5 kernel, padding 1 needs 3x3 at least
        (BayesianConv2dFlipout(2, 3, 5, padding=1), torch.randn(2, 2, 2, 6),
         r"\(batch, 2, height >= 3, width >= 3\)"),
        (BayesianConv2dFlipout(2, 3, 3, dilation=2), torch.randn(2, 2, 4, 4),
         r"\(batch, 2, height >= 5, width >= 5\)"),
        # uint8 images: the expected dtype and shape
        (BayesianConv2dFlipout(2, 3, 3), torch.zeros(2, 2, 6, 6, dtype=torch.uint8),
         r"floating-point input of shape \(batch, 2, height >= 3, width >= 3\).*uint8"),
        (BayesianDenseFlipout(4, 3), torch.zeros(2, 4, dtype=torch.uint8),
         r"floating-point input of shape \(batch, \*, 4\).*uint8"),
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


# ---------------------------------------------------------------- like nn.Linear / nn.Conv2d


def test_dense_layer_takes_extra_batch_dimensions_row_by_row() -> None:
    """(B, *, in): every row is an example; the same draws as for the flattened batch."""
    layer = BayesianDenseFlipout(4, 3, init_log_sigma=-1.0)
    x = torch.randn(2, 5, 4)
    torch.manual_seed(11)
    stacked = layer(x)
    torch.manual_seed(11)
    flat = layer(x.reshape(10, 4))
    assert stacked.shape == (2, 5, 3)
    assert torch.equal(stacked.reshape(10, 3), flat)
    torch.testing.assert_close(layer(x, sample=False),
                               F.linear(x, layer.weight_mu, layer.bias_mu))


@pytest.mark.parametrize("make", [
    lambda **kw: BayesianDenseFlipout(4, 3, **kw),
    lambda **kw: BayesianConv2dFlipout(2, 3, 3, **kw),
], ids=["dense", "conv"])
def test_device_and_dtype_factory_arguments(make) -> None:
    layer = make(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.kl_divergence().dtype == torch.float64
    meta = make(device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize("make", [
    lambda **kw: BayesianDenseFlipout(30, 20, **kw),
    lambda **kw: BayesianConv2dFlipout(4, 6, 3, **kw),
], ids=["dense", "conv"])
def test_kl_of_a_float64_layer_is_exact_in_float64(make) -> None:
    seed_everything(5)
    layer = make(dtype=torch.float64, prior_sigma=0.3)
    _randomise_sigmas(layer, -6.0, 0.0)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    expected = sum(kl_divergence(Normal(p.mu, p.sigma), prior).sum() for p in layer.posteriors())
    got = layer.kl_divergence()
    assert got.dtype == torch.float64
    # float32 would be off by ~1e-7 relative; float64 agrees to rounding.
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.kl_divergence().dtype == torch.float64


@pytest.mark.parametrize("padding", ["same", "valid", 0, 1, (2, 1)])
def test_conv_padding_and_output_shape_as_nn_conv2d(padding) -> None:
    layer = BayesianConv2dFlipout(2, 3, (3, 5), padding=padding)
    plain = torch.nn.Conv2d(2, 3, (3, 5), padding=padding)
    x = torch.randn(2, 2, 7, 9)
    assert layer(x).shape == plain(x).shape == layer(x, sample=False).shape


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"padding": "full"}, "padding must be"),
    ({"padding": "SAME"}, "padding must be"),
    ({"padding": "same", "stride": 2}, "stride 1"),
    ({"padding": -1}, "non-negative"),
    ({"padding": (1, -1)}, "non-negative"),
    ({"stride": 0}, "stride must be positive"),
    ({"kernel_size": 0}, "kernel_size must be positive"),
])
def test_invalid_conv_arguments_are_rejected_at_construction(kwargs, message) -> None:
    arguments = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        BayesianConv2dFlipout(2, 3, **arguments)


# ---------------------------------------------------------------- prior scale in the state dict


def test_prior_sigma_is_saved_and_loaded_with_the_state_dict() -> None:
    import io

    source = BayesianConv2dFlipout(2, 3, 3, prior_sigma=0.25)
    assert source.state_dict()["_prior_sigma"].item() == 0.25
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = BayesianConv2dFlipout(2, 3, 3, prior_sigma=1.0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    assert target.prior_sigma == 0.25
    torch.testing.assert_close(target.kl_divergence(), source.kl_divergence())
    # A value that float32 cannot hold keeps its exact float when it round-trips.
    layer = BayesianDenseFlipout(4, 3, prior_sigma=0.1)
    layer.load_state_dict(BayesianDenseFlipout(4, 3, prior_sigma=0.1).state_dict())
    assert layer.prior_sigma == 0.1


def test_a_state_dict_from_before_the_prior_buffer_still_loads() -> None:
    source = BayesianDenseFlipout(4, 3, prior_sigma=0.5)
    old = {k: v for k, v in source.state_dict().items() if k != "_prior_sigma"}
    target = BayesianDenseFlipout(4, 3, prior_sigma=0.5)
    target.load_state_dict(old)  # strict: no missing key
    assert target.prior_sigma == 0.5
    assert torch.equal(target.weight_mu, source.weight_mu)


def test_a_bad_prior_sigma_in_a_state_dict_or_a_setter_is_an_error() -> None:
    layer = BayesianDenseFlipout(4, 3)
    state = layer.state_dict()
    for bad in (torch.tensor(-1.0), torch.tensor(math.nan), torch.ones(2)):
        state["_prior_sigma"] = bad
        with pytest.raises(RuntimeError, match="_prior_sigma must be one positive"):
            layer.load_state_dict(state)  # a RuntimeError, as for any bad state dict
    assert layer.prior_sigma == 1.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="prior_sigma"):
            layer.prior_sigma = bad
    layer.prior_sigma = 2.0
    assert layer.state_dict()["_prior_sigma"].item() == 2.0


# ---------------------------------------------------------------- the protocol


def test_bayesian_layers_finds_every_bayesian_layer_by_name() -> None:
    model = torch.nn.Sequential(BayesianConv2dFlipout(1, 2, 3), torch.nn.Flatten(),
                                torch.nn.Linear(2, 2), BayesianDenseFlipout(2, 2, bias=False))
    found = bayesian_layers(model)
    assert [name for name, _ in found] == ["0", "3"]
    assert all(isinstance(layer, BayesianLayer) for _, layer in found)
    assert bayesian_layers(torch.nn.Linear(2, 2)) == []
    conv, dense = found[0][1], found[1][1]
    assert conv.posteriors() == [conv.weight_posterior, conv.bias_posterior]
    assert dense.posteriors() == [dense.weight_posterior]
    assert dense.bias_mu is None and dense.bias_sigma is None


# ----------------------------------------------------------- the fused backward pass


def _plain_conv2d_flipout(x, weight_mu, weight_delta, bias_mu, bias_delta, sign_in, sign_out,
                          *conv_args):
    """The estimator written with autograd's generic backward (the reference)."""
    mean = F.conv2d(x, weight_mu, bias_mu, *conv_args)
    noise = F.conv2d(x * sign_in[:, :, None, None].to(x.dtype), weight_delta, bias_delta,
                     *conv_args)
    return mean + noise * sign_out[:, :, None, None].to(noise.dtype)


def _conv_operands(dtype=torch.float64, bias=True, groups=1, batch=3, c_in=4, c_out=6,
                   size=7, kernel=3):
    generator = torch.Generator().manual_seed(7)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    x = leaf(batch, c_in, size, size)
    weights = (leaf(c_out, c_in // groups, kernel, kernel),
               (0.3 * leaf(c_out, c_in // groups, kernel, kernel)).detach().requires_grad_())
    biases = (leaf(c_out), leaf(c_out)) if bias else (None, None)
    signs = (rademacher((batch, c_in), like=x.detach()), rademacher((batch, c_out),
                                                                     like=x.detach()))
    return x, *weights, *biases, *signs


CONV_CASES = [  # (stride, padding, dilation, groups, bias, kernel)
    (1, 1, 1, 1, True, 3),
    (2, 1, 1, 1, True, 3),
    (1, "same", 2, 1, True, 3),
    (1, "valid", 1, 2, False, 3),
    (2, (0, 2), (1, 2), 2, True, 3),
    (1, "same", 1, 1, True, 2),  # asymmetric padding: the plain path
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("stride, padding, dilation, groups, bias, kernel", CONV_CASES)
def test_conv_flipout_gradients_equal_autograds(stride, padding, dilation, groups, bias,
                                                kernel) -> None:
    operands = _conv_operands(bias=bias, groups=groups, kernel=kernel)
    leaves = [t for t in operands[:5] if t is not None]
    conv_args = (stride, padding, dilation, groups)
    output = conv2d_flipout(*operands, *conv_args)
    fused = "Conv2dFlipoutFunction" in type(output.grad_fn).__name__
    assert fused == (kernel % 2 == 1)  # "same" with an even kernel pads asymmetrically
    reference = _plain_conv2d_flipout(*operands, *conv_args)
    torch.testing.assert_close(output, reference, rtol=0, atol=0)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1),
                           dtype=output.dtype)
    got = torch.autograd.grad(output, leaves, upstream)
    expected = torch.autograd.grad(reference, leaves, upstream)
    for g, e in zip(got, expected, strict=True):  # bit-identical: sign products are exact
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    # And the hand-written backward is the derivative (finite differences, float64).
    assert torch.autograd.gradcheck(lambda *t: conv2d_flipout(
        *t[:3], *(t[3:] if bias else (None, None)), *operands[5:], *conv_args), leaves)


def test_conv_flipout_gradient_only_where_asked() -> None:
    x, weight_mu, weight_delta, bias_mu, bias_delta, sign_in, sign_out = _conv_operands()
    image = x.detach()  # a first layer: no gradient for the input
    output = conv2d_flipout(image, weight_mu, weight_delta, bias_mu, bias_delta, sign_in,
                            sign_out, 1, 1)
    output.sum().backward()
    assert image.grad is None
    assert all(p.grad is not None for p in (weight_mu, weight_delta, bias_mu, bias_delta))
    with torch.no_grad():  # the plain path, summing in place: the same numbers
        plain = conv2d_flipout(x, weight_mu, weight_delta, bias_mu, bias_delta, sign_in,
                               sign_out, 1, 1)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, output.detach(), rtol=0, atol=0)


def test_conv_flipout_under_bf16_autocast_matches_autograd() -> None:
    operands = list(_conv_operands(dtype=torch.float32))
    # Inside a network under autocast a layer's input is a bfloat16 activation.
    operands[0] = operands[0].detach().bfloat16().requires_grad_()
    leaves = operands[:5]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv2d_flipout(*operands, 1, 1)
        reference = _plain_conv2d_flipout(*operands, 1, 1, 1, 1)
    assert output.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(output, reference, rtol=0, atol=0)
    got = torch.autograd.grad(output.float().square().sum(), leaves)
    expected = torch.autograd.grad(reference.float().square().sum(), leaves)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_channels_last_input_gives_the_same_layer() -> None:
    seed_everything(3)
    layer = BayesianConv2dFlipout(4, 8, 3, padding=1, init_log_sigma=-1.0)
    x = torch.randn(5, 4, 9, 9)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for sample in (True, False):
        seed_everything(11)
        expected = layer(x, sample=sample)
        seed_everything(11)
        got = layer(channels_last, sample=sample)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
