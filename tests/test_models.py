"""Tests of the BayesianCNN assembly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnn_course.layers import BayesianConv2dFlipout, BayesianDenseFlipout
from bnn_course.models import BayesianCNN, DeterministicCNN
from bnn_course.seeding import seed_everything


@pytest.fixture(scope="module")
def model() -> BayesianCNN:
    seed_everything(123)
    return BayesianCNN()


def test_output_is_normalised_log_probabilities(model) -> None:
    x = torch.randn(4, 3, 32, 32)
    for sample in (True, False):
        log_probs = model(x, sample=sample)
        assert log_probs.shape == (4, 10) and log_probs.dtype == torch.float32
        torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4))
        assert torch.all(log_probs <= 0)


def test_layers_and_kl_accounting(model) -> None:
    layers = dict(model.bayesian_layers())
    assert sum(isinstance(m, BayesianConv2dFlipout) for m in layers.values()) == 6
    assert sum(isinstance(m, BayesianDenseFlipout) for m in layers.values()) == 2
    total = sum(layer.kl_divergence() for layer in layers.values())
    torch.testing.assert_close(model.kl_divergence(), total)
    # Every learned tensor belongs to a Gaussian: as many log-sigmas as means.
    names = [name for name, _ in model.named_parameters()]
    assert len([n for n in names if n.endswith(".mu")]) == len(
        [n for n in names if n.endswith(".log_sigma")])


def test_kl_is_the_sum_of_the_layers_kl_with_a_prior_by_layer_in_float64() -> None:
    seed_everything(5)
    model = BayesianCNN(image_size=8, channels=(3, 4), hidden_features=6,
                        parametrization="softplus").double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".rho"):
                parameter.uniform_(-4.0, 1.0)
    for index, layer in enumerate(model.layers()):
        layer.prior_sigma = 0.2 * (index + 1)  # a "prior scale by layer" recipe
    kl = model.kl_divergence()
    reference = sum(layer.kl_divergence() for layer in model.layers())
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, reference, rtol=1e-13, atol=0)
    parameters = list(model.parameters())
    for got, expected in zip(torch.autograd.grad(kl, parameters),
                             torch.autograd.grad(reference, parameters), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_posterior_mean_pass_is_the_network_of_the_means() -> None:
    """``sample=False``: the plain convolutions and products with the means, no noise."""
    seed_everything(6)
    model = BayesianCNN(channels=(4, 8), hidden_features=16, init_log_sigma=0.0)
    x = torch.randn(3, 3, 32, 32)
    h = x
    for stage in model.stages():
        if isinstance(stage, BayesianConv2dFlipout):
            h = F.conv2d(h, stage.weight_mu, stage.bias_mu, padding=1)
        elif isinstance(stage, BayesianDenseFlipout):
            h = F.linear(h, stage.weight_mu, stage.bias_mu)
        else:
            h = stage(h)
    torch.testing.assert_close(model(x, sample=False), F.log_softmax(h, -1), rtol=0, atol=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model(x, sample=False)
    assert torch.equal(torch.get_rng_state(), state)  # draws no random numbers


def test_stochastic_and_deterministic_modes(model) -> None:
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x, sample=False), model(x, sample=False))
    assert not torch.equal(model(x), model(x))


def test_seeding_makes_forward_and_backward_repeatable() -> None:
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        seed_everything(7)
        model = BayesianCNN(channels=(8, 16), hidden_features=32)
        x = torch.randn(3, 3, 32, 32)
        loss = -model(x)[:, 0].mean() + model.kl_divergence() / 1000
        loss.backward()
        return model(x).detach(), model.hidden.weight_posterior.log_sigma.grad.clone()

    (out_a, grad_a), (out_b, grad_b) = run(), run()
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)


def test_configurable_shape_and_options() -> None:
    model = BayesianCNN(num_classes=5, in_channels=1, image_size=28, channels=(4, 8),
                        hidden_features=16, init_log_sigma=-3.0, parametrization="softplus")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    torch.testing.assert_close(model.classifier.weight_sigma,
                               torch.full((5, 16), torch.exp(torch.tensor(-3.0)).item()))


def test_bad_input_names_the_expected_shape(model) -> None:
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        BayesianCNN(image_size=30)


def test_autocast_keeps_log_probabilities_and_kl_in_float32(model) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs = model(torch.randn(2, 3, 32, 32))
        kl = model.kl_divergence()
    assert log_probs.dtype == torch.float32 and kl.dtype == torch.float32
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2))


def test_deterministic_twin_and_mc_dropout() -> None:
    seed_everything(123)
    twin = DeterministicCNN(channels=(4, 8), hidden_features=16)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(twin(x), twin(x, sample=False)) and twin.kl_divergence().item() == 0
    assert list(twin.bayesian_layers()) == []
    dropout = DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.5)
    dropout.load_state_dict(twin.state_dict())
    assert torch.equal(dropout(x, sample=False), twin(x))
    assert not torch.equal(dropout(x), dropout(x))
    torch.testing.assert_close(dropout(x).exp().sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="dropout"):
        DeterministicCNN(dropout=1.0)


def test_no_blocks_or_bad_widths_are_an_error() -> None:
    for channels in ((), (8, 0), (8.0,)):
        with pytest.raises(ValueError, match="channels"):
            BayesianCNN(channels=channels)
        with pytest.raises(ValueError, match="channels"):
            DeterministicCNN(channels=channels)
    with pytest.raises(ValueError, match="hidden_features"):
        BayesianCNN(hidden_features=0)


def test_uint8_images_are_an_error_naming_shape_and_dtype(model) -> None:
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"floating-point images of shape \(batch, 3, 32, 32\)"
                                         r".*uint8"):
        model(images)
    with pytest.raises(ValueError, match="uint8"):
        DeterministicCNN()(images)


def test_one_layout_for_every_network() -> None:
    """The stages in call order, and the same layers in BayesianCNN and DeterministicCNN."""
    bayesian = BayesianCNN(channels=(4, 8), hidden_features=16)
    plain = DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.2)
    expected = (["Conv", "ReLU", "Conv", "ReLU", "MaxPool2d"] * 2
                + ["Flatten", "Linear", "ReLU", "Linear"])
    kinds = {BayesianConv2dFlipout: "Conv", torch.nn.Conv2d: "Conv",
             BayesianDenseFlipout: "Linear", torch.nn.Linear: "Linear"}
    assert [kinds.get(type(s), type(s).__name__) for s in bayesian.stages()] == expected
    with_dropout = [kinds.get(type(s), type(s).__name__) for s in plain.stages()]
    assert with_dropout == expected[:11] + ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert bayesian.layers() == [*bayesian.convs, bayesian.hidden, bayesian.classifier]
    for ours, theirs in zip(bayesian.layers(), plain.layers(), strict=True):
        assert ours.weight_mu.shape == theirs.weight.shape
    # Only the layers hold state: the state dict keys are those of the layers.
    assert {key.split(".")[0] for key in bayesian.state_dict()} == {
        "convs", "hidden", "classifier"}


def test_a_checkpoint_without_prior_buffers_still_loads(model) -> None:
    old = {key: value for key, value in model.state_dict().items()
           if not key.endswith("_prior_sigma")}
    fresh = BayesianCNN()
    fresh.load_state_dict(old)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x, sample=False), model(x, sample=False))
    assert fresh.hidden.prior_sigma == model.hidden.prior_sigma


def test_a_float64_model_keeps_float64_log_probabilities_and_kl() -> None:
    torch.manual_seed(3)
    model = BayesianCNN(image_size=8, channels=(4,), hidden_features=8).double()
    log_probs = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert log_probs.dtype == model.kl_divergence().dtype == torch.float64
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, dtype=torch.float64))


def test_conv_dropout_adds_a_stage_after_every_block() -> None:
    seed_everything(123)
    twin = DeterministicCNN(channels=(4, 8), hidden_features=16)
    both = DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.2,
                            conv_dropout=0.3)
    both.load_state_dict(twin.state_dict())
    rates = [stage.p for stage in both.stages() if isinstance(stage, torch.nn.Dropout)]
    assert rates == [0.3, 0.3, 0.2, 0.2]
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(both(x, sample=False), twin(x))
    assert not torch.equal(both(x), both(x))
    with pytest.raises(ValueError, match="conv_dropout"):
        DeterministicCNN(conv_dropout=1.0)
