"""The randomness of a Flipout pass drawn beforehand, for one layer or a whole network.

``layer(x, noise=...)`` (a :class:`~bnn_course.layers.FlipoutNoise`),
:func:`~bnn_course.layers.draw_flipout_noise` (one ``randn`` and one ``randint`` for all
layers), :func:`~bnn_course.layers.summed_kl_divergence`, and the BayesianCNN built on them.

Statistical tests use fixed seeds and tolerances of five standard errors, computed from the
number of samples (or, where the samples of one pass are dependent, from the spread of the
independent passes), so they fail when the estimator is wrong, not by bad luck.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bnn_course.flipout import conv2d_flipout, dense_flipout
from bnn_course.layers import (
    BayesianConv2dFlipout,
    BayesianDenseFlipout,
    BayesianLayer,
    FlipoutNoise,
    draw_flipout_noise,
    summed_kl_divergence,
)
from bnn_course.models import BayesianCNN
from bnn_course.seeding import seed_everything

Z = 5.0  # tolerance in standard errors


def _randomise_sigmas(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every weight and bias its own sigma in [e^-2, e^0], so a mix-up of layers shows."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("log_sigma"):
                parameter.copy_(-2 * torch.rand(parameter.shape, generator=generator,
                                                dtype=parameter.dtype))


def _record_noise(model: torch.nn.Module) -> list[tuple[BayesianLayer, torch.Tensor,
                                                        FlipoutNoise]]:
    """Hooks that record (layer, input, noise) of every Bayesian layer call."""
    calls: list[tuple[BayesianLayer, torch.Tensor, FlipoutNoise]] = []

    def hook(module, args, kwargs):
        calls.append((module, args[0], kwargs.get("noise")))

    for module in model.modules():
        if isinstance(module, BayesianLayer):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _example_weights(layer: BayesianLayer, noise: FlipoutNoise
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """W_n = mu + dW o (s_n r_n^T) and b_n = mu_b + s_n o db for every example n:
    (B, *weight shape) and (B, out)."""
    batch = noise.sign_in.shape[0]
    sign_in, sign_out = noise.sign_in.reshape(batch, -1), noise.sign_out.reshape(batch, -1)
    signs = sign_out[:, :, None] * sign_in[:, None, :]  # (B, out, in)
    signs = signs.reshape(batch, *signs.shape[1:], *(1,) * (layer.weight_mu.dim() - 2))
    weights = layer.weight_mu + noise.weight_delta * signs
    biases = layer.bias_mu + noise.bias_delta * sign_out
    return weights, biases


# ---------------------------------------------------------------- one layer


@pytest.mark.parametrize("make, x_shape", [
    (lambda: BayesianDenseFlipout(5, 3, init_log_sigma=-1.0), (4, 5)),
    (lambda: BayesianConv2dFlipout(2, 3, 3, padding=1, init_log_sigma=-1.0), (4, 2, 6, 6)),
])
def test_a_layer_given_noise_computes_its_own_draw_and_the_flipout_formula(make, x_shape
                                                                           ) -> None:
    seed_everything(1)
    layer = make()
    x = torch.randn(x_shape)
    rows = (x_shape[0],)
    seed_everything(2)
    drawn_here = layer(x)
    seed_everything(2)
    noise = layer.draw_noise(rows, like=x)  # what forward draws without noise
    torch.testing.assert_close(layer(x, noise=noise), drawn_here, rtol=0, atol=0)
    assert noise.sign_in.shape == (4, layer.sign_widths()[0])
    # Example n sees one weight sample W_n, b_n.
    weights, biases = _example_weights(layer, noise)
    output = layer(x, noise=noise)
    for n in range(x_shape[0]):
        if isinstance(layer, BayesianDenseFlipout):
            expected = weights[n] @ x[n] + biases[n]
        else:
            expected = F.conv2d(x[n:n + 1], weights[n], biases[n], padding=1)[0]
        torch.testing.assert_close(output[n], expected)


def test_noise_for_a_convolution_may_be_per_channel_images() -> None:
    seed_everything(3)
    layer = BayesianConv2dFlipout(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    noise = layer.draw_noise((4,), like=x)
    as_images = noise._replace(sign_in=noise.sign_in[:, :, None, None],
                               sign_out=noise.sign_out[:, :, None, None])
    torch.testing.assert_close(layer(x, noise=as_images), layer(x, noise=noise))


def test_bad_noise_is_an_error_naming_the_field() -> None:
    seed_everything(4)
    dense, conv = BayesianDenseFlipout(5, 3), BayesianConv2dFlipout(2, 3, 3)
    no_bias = BayesianDenseFlipout(5, 3, bias=False)
    x, images = torch.randn(4, 5), torch.randn(4, 2, 6, 6)
    noise = dense.draw_noise((4,), like=x)
    for bad, match in [
        (noise._replace(weight_delta=torch.zeros(5, 3)), r"weight_delta must have shape \(3, 5\)"),
        (noise._replace(bias_delta=None), "bias_delta must have shape"),
        (noise._replace(sign_in=noise.sign_in[:3]), r"sign_in must have shape \(4, 5\)"),
        (noise._replace(sign_out=noise.sign_out[:, :, None, None]), "sign_out must have shape"),
        (noise._replace(sign_in=noise.sign_in.long()), "sign_in must be floating point"),
        (tuple(noise), "must be a FlipoutNoise"),
    ]:
        with pytest.raises(ValueError, match=match):
            dense(x, noise=bad)
    with pytest.raises(ValueError, match="has no bias"):
        no_bias(x, noise=noise)
    with pytest.raises(ValueError, match="sample=False"):
        dense(x, sample=False, noise=noise)
    conv_noise = conv.draw_noise((4,), like=images)
    with pytest.raises(ValueError, match=r"sign_out must have shape \(4, 3\) or \(4, 3, 1, 1\)"):
        conv(images, noise=conv_noise._replace(sign_out=torch.ones(4, 3, 2, 2)))
    with pytest.raises(ValueError, match="sample=False"):
        conv(images, sample=False, noise=conv_noise)


# ---------------------------------------------------------------- all layers at once


def test_draw_flipout_noise_takes_one_randn_and_one_randint() -> None:
    seed_everything(5)
    model = BayesianCNN(channels=(4, 8), hidden_features=16)
    x = torch.randn(6, 3, 32, 32)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        noises = draw_flipout_noise(model.layers(), 6, like=x)
    names = [event.name for event in profiler.events()]
    assert names.count("aten::randn") == 1 and names.count("aten::randint") == 1
    assert "aten::randn_like" not in names
    for layer, noise in zip(model.layers(), noises, strict=True):
        width_in, width_out = layer.sign_widths()
        spatial = (1, 1) if isinstance(layer, BayesianConv2dFlipout) else ()
        assert noise.sign_in.shape == (6, width_in, *spatial)
        assert noise.sign_out.shape == (6, width_out, *spatial)
        assert noise.weight_delta.shape == layer.weight_mu.shape
        assert noise.bias_delta.shape == layer.bias_mu.shape
        layer.check_noise(noise, (6,), x.device)  # what the layer accepts
    # The model's sampled pass draws exactly this much, once.
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(x)
    names = [event.name for event in profiler.events()]
    assert names.count("aten::randn") == 1 and names.count("aten::randint") == 1
    with pytest.raises(ValueError, match="batch_size"):
        draw_flipout_noise(model.layers(), 0, like=x)


def test_signs_are_fair_and_independent_across_layers_examples_and_channels() -> None:
    seed_everything(6)
    model = BayesianCNN(channels=(8, 16), hidden_features=32)
    batch = 4000
    noises = draw_flipout_noise(model.layers(), batch, like=torch.empty(0))
    columns = torch.cat([sign.reshape(batch, -1) for noise in noises
                         for sign in (noise.sign_in, noise.sign_out)], dim=1).double()
    count = columns.shape[1]  # every layer's input and output signs side by side
    assert count == sum(sum(layer.sign_widths()) for layer in model.layers())
    assert set(columns.unique().tolist()) == {-1.0, 1.0}
    assert abs(columns.mean().item()) < Z / math.sqrt(columns.numel())
    # Independent columns (layers, sides, channels): correlations of `batch` pairs near 0.
    across_columns = torch.corrcoef(columns.T)[~torch.eye(count, dtype=torch.bool)]
    assert across_columns.abs().max() < 5.5 / math.sqrt(batch)
    # Independent examples: the first 200 rows' correlations over the `count` columns.
    rows = columns[:200]
    across_examples = (rows @ rows.T / count)[~torch.eye(200, dtype=torch.bool)]
    assert across_examples.abs().max() < 5.5 / math.sqrt(count)
    # A new pass draws new signs.
    again = draw_flipout_noise(model.layers(), batch, like=torch.empty(0))
    assert not torch.equal(again[0].sign_in, noises[0].sign_in)


def test_the_model_gives_every_example_its_own_sample_of_every_layer() -> None:
    """In the model's sampled pass, example n sees W_n = mu + dW o (s_n r_n^T) in every layer:
    its outputs are those of the per-example weights, and over passes the per-example
    weights have the posterior's mean and variance and are uncorrelated between examples."""
    generator = torch.Generator().manual_seed(7)
    seed_everything(7)
    # Four convolutions of the same shape (3 -> 3): a mix-up of their noises would show.
    model = BayesianCNN(image_size=8, channels=(3, 3), hidden_features=4).double()
    _randomise_sigmas(model, generator)
    calls = _record_noise(model)
    batch, passes = 6, 300
    x = torch.randn(batch, 3, 8, 8, dtype=torch.float64, generator=generator)
    layers = model.layers()
    # per layer, one value per pass: mean z, mean z^2, mean z_n z_m (n != m)
    means, squares, pairs = ([[] for _ in layers] for _ in range(3))
    with torch.no_grad():
        for index in range(passes):
            calls.clear()
            model(x)
            recorded = list(calls)  # (the checks below call the layers again)
            assert [call[0] for call in recorded] == layers
            for k, (layer, h, noise) in enumerate(recorded):
                weights, biases = _example_weights(layer, noise)
                if index < 2:  # the layer computed exactly the per-example weights' output
                    output = layer(h, noise=noise)
                    for n in range(batch):
                        expected = (F.conv2d(h[n:n + 1], weights[n], biases[n], padding=1)[0]
                                    if isinstance(layer, BayesianConv2dFlipout)
                                    else weights[n] @ h[n] + biases[n])
                        torch.testing.assert_close(output[n], expected)
                z = torch.cat([((weights - layer.weight_mu) / layer.weight_sigma).flatten(1),
                               ((biases - layer.bias_mu) / layer.bias_sigma)], dim=1)  # (B, P)
                means[k].append(z.mean())
                squares[k].append((z**2).mean())
                gram = z @ z.T / z.shape[1]
                pairs[k].append(gram[~torch.eye(batch, dtype=torch.bool)].mean())
    for k, layer in enumerate(layers):
        entries = layer.weight_mu.numel() + layer.bias_mu.numel()
        mean, square, pair = (torch.stack(v[k]) for v in (means, squares, pairs))
        # Passes are independent: standard errors from their spread, or for z^2 (each entry's
        # z^2 = epsilon^2, chi-square with 1 degree of freedom) from the count exactly.
        assert mean.mean().abs() < Z * mean.std() / math.sqrt(passes)
        assert (square.mean() - 1).abs() < Z * math.sqrt(2 / (entries * passes))
        assert pair.mean().abs() < Z * pair.std() / math.sqrt(passes)
        # Shared signs (one sample for the batch) would give pair correlations near 1.
        assert pair.std() < 0.5


def test_the_models_gradients_equal_those_of_the_layer_by_layer_computation() -> None:
    """The model's sampled pass and KL, differentiated, equal the same pass computed layer by
    layer with the recorded signs and noise (sigma * epsilon by plain autograd) and the sum
    of the layers' own KL divergences, in float64."""
    generator = torch.Generator().manual_seed(8)
    seed_everything(8)
    model = BayesianCNN(image_size=8, channels=(3, 4), hidden_features=5).double()
    _randomise_sigmas(model, generator)
    for k, layer in enumerate(model.layers()):
        layer.prior_sigma = 0.5 + 0.25 * k  # a prior scale by layer
    calls = _record_noise(model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.tensor([0, 3, 9, 3])
    loss = F.nll_loss(model(x), y) + model.kl_divergence() / 100
    parameters = list(model.parameters())
    gradients = torch.autograd.grad(loss, parameters)

    noises = {layer: noise for layer, _, noise in calls}
    h = x
    for stage in model.stages():
        if not isinstance(stage, BayesianLayer):
            h = stage(h)
            continue
        noise = noises[stage]
        weight_delta = stage.weight_sigma * (noise.weight_delta / stage.weight_sigma).detach()
        bias_delta = stage.bias_sigma * (noise.bias_delta / stage.bias_sigma).detach()
        if isinstance(stage, BayesianConv2dFlipout):
            h = conv2d_flipout(h, stage.weight_mu, weight_delta, stage.bias_mu, bias_delta,
                               noise.sign_in, noise.sign_out, padding=1)
        else:
            h = dense_flipout(h, stage.weight_mu, weight_delta, stage.bias_mu, bias_delta,
                              noise.sign_in, noise.sign_out)
    kl = sum(layer.kl_divergence() for layer in model.layers())
    reference = F.nll_loss(F.log_softmax(h, -1), y) + kl / 100
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for got, expected in zip(gradients, torch.autograd.grad(reference, parameters),
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the KL of many layers


def test_summed_kl_of_layers_with_their_own_priors_in_float64() -> None:
    generator = torch.Generator().manual_seed(9)
    layers = [BayesianConv2dFlipout(2, 3, 3, prior_sigma=0.3, dtype=torch.float64),
              BayesianDenseFlipout(4, 2, bias=False, prior_sigma=2.0, dtype=torch.float64),
              BayesianDenseFlipout(3, 5, prior_sigma=1.0, parametrization="softplus",
                                   dtype=torch.float64)]
    for layer in layers:
        _randomise_sigmas(layer, generator)
        with torch.no_grad():
            for posterior in layer.posteriors():
                posterior.mu.normal_(generator=generator)
    summed = summed_kl_divergence(layers)
    reference = sum(layer.kl_divergence() for layer in layers)
    torch.testing.assert_close(summed, reference, rtol=1e-13, atol=0)
    parameters = [p for layer in layers for p in layer.parameters()]
    for got, expected in zip(torch.autograd.grad(summed, parameters),
                             torch.autograd.grad(reference, parameters), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="at least one Bayesian layer"):
        summed_kl_divergence([])


def test_a_training_step_waits_for_no_device_value() -> None:
    """No .item(), .tolist() or Python test of a tensor value in the sampled forward pass,
    the KL and the backward pass: each would be an aten::_local_scalar_dense (a host sync
    on a GPU)."""
    seed_everything(10)
    model = BayesianCNN(channels=(4, 8), hidden_features=16)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        loss = F.nll_loss(model(x), y) + model.kl_divergence() / 1000
        loss.backward()
    names = {event.name for event in profiler.events()}
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
    assert all(p.grad is not None for p in model.parameters())
