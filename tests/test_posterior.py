"""Tests of bnn_course.posterior: the closed-form KL, sampling, parametrisations, errors.

Statistical tests use fixed seeds and tolerances of five standard errors computed from the
sample size, so they fail when the math is wrong, not by bad luck.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from bnn_course.posterior import (
    PARAMETRIZATIONS,
    GaussianPosterior,
    _ScaledNoise,
    _SummedGaussianKL,
    gaussian_kl_divergence,
    gaussian_perturbations,
    inverse_softplus,
    summed_gaussian_kl_divergence,
)

PRIOR_SIGMAS = (0.1, 0.5, 1.0, 3.0)


def _reference_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """KL summed over elements, by torch.distributions, in float64."""
    q = Normal(mu.double(), sigma.double())
    p = Normal(torch.zeros((), dtype=torch.float64), torch.tensor(prior_sigma, dtype=torch.float64))
    return kl_divergence(q, p).sum()


def _random_mu_sigma(seed: int, shape: tuple[int, ...] = (40, 7)) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    mu = 0.7 * torch.randn(shape, generator=generator)
    sigma = torch.exp(torch.randn(shape, generator=generator) - 1.0)  # roughly 0.05 .. 2
    return mu, sigma


def _posterior_with(mu: torch.Tensor, sigma: torch.Tensor, parametrization: str
                    ) -> GaussianPosterior:
    posterior = GaussianPosterior(tuple(mu.shape), parametrization=parametrization)
    with torch.no_grad():
        posterior.mu.copy_(mu)
        if parametrization == "log":
            posterior.log_sigma.copy_(sigma.log())
        else:
            posterior.rho.copy_(torch.expm1(sigma.double()).log().float())  # inverse softplus
    return posterior


# --------------------------------------------------------------------------- the KL


@pytest.mark.parametrize("prior_sigma", PRIOR_SIGMAS)
def test_gaussian_kl_matches_torch_distributions(prior_sigma: float) -> None:
    mu, sigma = _random_mu_sigma(seed=0)
    expected = _reference_kl(mu, sigma, prior_sigma)
    got = gaussian_kl_divergence(mu, sigma, prior_sigma)
    assert got.shape == ()
    # float32 arithmetic on 280 terms: a relative error of a few 1e-7 per term.
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("prior_sigma", PRIOR_SIGMAS)
def test_posterior_kl_matches_torch_distributions(parametrization: str, prior_sigma: float
                                                  ) -> None:
    mu, sigma = _random_mu_sigma(seed=1)
    posterior = _posterior_with(mu, sigma, parametrization)
    torch.testing.assert_close(posterior.sigma, sigma, rtol=1e-5, atol=0)
    expected = _reference_kl(posterior.mu.detach(), posterior.sigma.detach(), prior_sigma)
    got = posterior.kl_divergence(prior_sigma)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_of_a_single_weight_by_hand() -> None:
    # log(s/sigma) + (sigma^2 + mu^2) / (2 s^2) - 1/2 with mu=1, sigma=0.5, s=2
    expected = math.log(2 / 0.5) + (0.25 + 1.0) / 8 - 0.5
    got = gaussian_kl_divergence(torch.tensor([1.0]), torch.tensor([0.5]), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("prior_sigma", PRIOR_SIGMAS)
def test_kl_is_zero_when_q_equals_the_prior(prior_sigma: float) -> None:
    mu = torch.zeros(30, 4)
    sigma = torch.full((30, 4), prior_sigma)
    assert abs(gaussian_kl_divergence(mu, sigma, prior_sigma).item()) < 1e-5
    posterior = GaussianPosterior((30, 4), init_log_sigma=math.log(prior_sigma))
    assert abs(posterior.kl_divergence(prior_sigma).item()) < 1e-5


@pytest.mark.parametrize("prior_sigma", PRIOR_SIGMAS)
def test_kl_is_positive_and_grows_away_from_the_prior(prior_sigma: float) -> None:
    sigma = torch.full((10,), prior_sigma)
    kls = [gaussian_kl_divergence(torch.full((10,), m), sigma, prior_sigma).item()
           for m in (0.0, 0.1, 1.0)]
    assert kls[0] < kls[1] < kls[2]
    mu, sigma = _random_mu_sigma(seed=2)
    assert gaussian_kl_divergence(mu, sigma, prior_sigma).item() > 0


@pytest.mark.parametrize(("dtype", "kl_dtype", "rel"), [
    (torch.bfloat16, torch.float32, 1e-5),
    (torch.float16, torch.float32, 1e-5),
    (torch.float64, torch.float64, 1e-12),
])
def test_kl_is_in_at_least_float32(dtype: torch.dtype, kl_dtype: torch.dtype,
                                   rel: float) -> None:
    mu, sigma = _random_mu_sigma(seed=3)
    mu, sigma = mu.to(dtype), sigma.to(dtype)
    got = gaussian_kl_divergence(mu, sigma, 1.0)
    assert got.dtype == kl_dtype
    # Compared with the exact KL of the (already rounded) low-precision values; float64
    # inputs keep float64 precision (float32 would be off by about 1e-7 relative).
    expected = _reference_kl(mu, sigma, 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=rel)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_kl_is_float32_under_bfloat16_autocast(parametrization: str) -> None:
    mu, sigma = _random_mu_sigma(seed=4)
    posterior = _posterior_with(mu, sigma, parametrization)
    expected = _reference_kl(posterior.mu.detach(), posterior.sigma.detach(), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_posterior = posterior.kl_divergence(0.5)
        from_function = gaussian_kl_divergence(mu, sigma, 0.5)
    for got in (from_posterior, from_function):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_gradients_match_the_closed_form() -> None:
    # d KL / d mu = mu / s^2 and d KL / d log sigma = sigma^2 / s^2 - 1
    mu, sigma = _random_mu_sigma(seed=5)
    posterior = _posterior_with(mu, sigma, "log")
    prior_sigma = 0.8
    posterior.kl_divergence(prior_sigma).backward()
    torch.testing.assert_close(posterior.mu.grad, mu / prior_sigma**2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(posterior.log_sigma.grad, sigma**2 / prior_sigma**2 - 1,
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_samples_have_the_posterior_mean_and_std(parametrization: str) -> None:
    torch.manual_seed(0)
    mu = torch.tensor([-2.0, -0.5, 0.0, 0.3, 4.0])
    sigma = torch.tensor([0.01, 0.1, 1.0, 2.0, 0.5])
    posterior = _posterior_with(mu, sigma, parametrization)
    n = 20_000
    with torch.no_grad():
        samples = torch.stack([posterior.sample() for _ in range(n)]).double()
    mean, std = samples.mean(0), samples.std(0)
    # Standard errors: sigma / sqrt(n) for the mean, about sigma / sqrt(2n) for the std.
    assert torch.all((mean - mu.double()).abs() < 5 * sigma / math.sqrt(n))
    assert torch.all((std - sigma.double()).abs() < 5 * sigma / math.sqrt(2 * n))
    # Independent weights: sample correlations within 5 / sqrt(n) of zero.
    correlation = torch.corrcoef(samples.T)
    off_diagonal = correlation[~torch.eye(5, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5 / math.sqrt(n)


def test_each_sample_is_fresh_and_perturbation_is_centred() -> None:
    torch.manual_seed(1)
    posterior = GaussianPosterior((1000,), init_log_sigma=0.0)
    with torch.no_grad():
        posterior.mu.fill_(3.0)
        first, second = posterior.sample(), posterior.sample()
        delta = posterior.perturbation()
    assert not torch.equal(first, second)
    # 1000 draws of N(0, 1): mean within 5 / sqrt(1000), std within 5 / sqrt(2000) of 1.
    assert abs(delta.mean().item()) < 5 / math.sqrt(1000)
    assert abs(delta.std().item() - 1.0) < 5 / math.sqrt(2000)


# --------------------------------------------------------------------------- parametrisations


@pytest.mark.parametrize("init_log_sigma", [-8.0, -5.0, -3.0, -1.0, 0.0, 2.0])
def test_both_parametrisations_start_at_the_same_sigma(init_log_sigma: float) -> None:
    log_posterior = GaussianPosterior((3, 4), init_log_sigma, "log")
    softplus_posterior = GaussianPosterior((3, 4), init_log_sigma, "softplus")
    expected = torch.full((3, 4), math.exp(init_log_sigma))
    torch.testing.assert_close(log_posterior.sigma, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(softplus_posterior.sigma, expected, rtol=1e-5, atol=0)
    assert torch.all(softplus_posterior.mu == 0) and torch.all(log_posterior.mu == 0)
    assert hasattr(log_posterior, "log_sigma") and not hasattr(log_posterior, "rho")
    assert hasattr(softplus_posterior, "rho") and not hasattr(softplus_posterior, "log_sigma")


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_sigma_is_positive_and_finite_for_any_raw_parameter(parametrization: str) -> None:
    posterior = GaussianPosterior((7,), parametrization=parametrization)
    raw = posterior.log_sigma if parametrization == "log" else posterior.rho
    with torch.no_grad():
        raw.copy_(torch.tensor([-50.0, -20.0, -5.0, 0.0, 5.0, 20.0, 50.0]))
    sigma = posterior.sigma
    assert torch.all(sigma > 0) and torch.all(torch.isfinite(sigma))
    assert torch.all(sigma[1:] > sigma[:-1])  # increasing in the raw parameter


def test_softplus_parameter_matches_its_definition() -> None:
    posterior = GaussianPosterior((5,), parametrization="softplus")
    rho = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    with torch.no_grad():
        posterior.rho.copy_(rho)
    torch.testing.assert_close(posterior.sigma, torch.log1p(torch.exp(rho)))


def test_reset_sigma_restores_the_initial_value() -> None:
    for parametrization in PARAMETRIZATIONS:
        posterior = GaussianPosterior((4,), init_log_sigma=-2.0, parametrization=parametrization)
        raw = posterior.log_sigma if parametrization == "log" else posterior.rho
        with torch.no_grad():
            raw.add_(1.0)
        posterior.reset_sigma()
        torch.testing.assert_close(posterior.sigma, torch.full((4,), math.exp(-2.0)),
                                   rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gradients_reach_mu_and_sigma_parameter_through_sample(parametrization: str) -> None:
    torch.manual_seed(2)
    posterior = GaussianPosterior((6, 3), init_log_sigma=-1.0, parametrization=parametrization)
    with torch.no_grad():
        posterior.mu.normal_()
    w = posterior.sample()
    w.sum().backward()
    # w = mu + sigma * eps: dw/dmu = 1; eps = (w - mu) / sigma is the noise that was drawn.
    torch.testing.assert_close(posterior.mu.grad, torch.ones(6, 3))
    eps = ((w - posterior.mu) / posterior.sigma).detach()
    if parametrization == "log":
        # d sigma / d log_sigma = sigma, so d w / d log_sigma = sigma * eps = w - mu.
        torch.testing.assert_close(posterior.log_sigma.grad, eps * posterior.sigma.detach())
    else:
        # d softplus(rho) / d rho = sigmoid(rho).
        torch.testing.assert_close(posterior.rho.grad, eps * torch.sigmoid(posterior.rho.detach()))
    assert posterior.mu.grad.abs().sum() > 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("prior_sigma", [0.0, -1.0])
def test_non_positive_prior_sigma_is_an_error(prior_sigma: float) -> None:
    with pytest.raises(ValueError, match="prior_sigma"):
        gaussian_kl_divergence(torch.zeros(3), torch.ones(3), prior_sigma)
    with pytest.raises(ValueError, match="prior_sigma"):
        GaussianPosterior((3,)).kl_divergence(prior_sigma)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl_divergence(torch.zeros(3, 2), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl_divergence(torch.zeros(3), torch.ones(()), 1.0)


def test_unknown_parametrization_is_an_error() -> None:
    with pytest.raises(ValueError, match="parametrization"):
        GaussianPosterior((3,), parametrization="exp")


def test_extra_repr_names_the_settings() -> None:
    text = repr(GaussianPosterior((2, 3), init_log_sigma=-4.0, parametrization="softplus"))
    assert "shape=(2, 3)" in text and "'softplus'" in text and "init_log_sigma=-4.0" in text


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("sigma", [1e-8, 0.0067, 0.7, 3.0, 50.0])
def test_set_sigma_in_either_parametrisation(parametrization: str, sigma: float) -> None:
    posterior = GaussianPosterior((3, 4), parametrization=parametrization)
    posterior.set_sigma(sigma)
    torch.testing.assert_close(posterior.sigma, torch.full((3, 4), sigma), rtol=1e-6, atol=0)
    assert posterior.sigma_parameter is (posterior.log_sigma if parametrization == "log"
                                         else posterior.rho)
    log_sigma = posterior.log_sigma_values()
    assert log_sigma.dtype == torch.float64 and not log_sigma.requires_grad
    torch.testing.assert_close(log_sigma, torch.full((3, 4), math.log(sigma),
                                                     dtype=torch.float64),
                               rtol=0, atol=4e-6)  # float32 parameters near |log| = 18


def test_set_sigma_rejects_non_positive_or_non_finite_values() -> None:
    posterior = GaussianPosterior((2,), parametrization="softplus")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="sigma"):
            posterior.set_sigma(bad)


def test_inverse_softplus_inverts_softplus_without_overflow() -> None:
    for sigma in (1e-12, 1e-3, 1.0, 20.0, 20.5, 800.0):
        rho = inverse_softplus(sigma)
        assert math.isfinite(rho)
        # log(1 + e^rho), written stably for large rho
        back = rho + math.log1p(math.exp(-rho)) if rho > 0 else math.log1p(math.exp(rho))
        assert back == pytest.approx(sigma, rel=1e-12)


def test_log_sigma_values_are_exact_for_the_log_parametrisation() -> None:
    posterior = GaussianPosterior((5,), init_log_sigma=-7.3)
    assert torch.equal(posterior.log_sigma_values(),
                       posterior.log_sigma.detach().double())


def test_device_and_dtype_factory_arguments() -> None:
    posterior = GaussianPosterior((2, 3), parametrization="softplus", dtype=torch.float64)
    assert posterior.mu.dtype == posterior.rho.dtype == posterior.sigma.dtype == torch.float64
    assert posterior.kl_divergence(1.0).dtype == torch.float64
    meta = GaussianPosterior((2, 3), device="meta")
    assert meta.mu.device.type == meta.log_sigma.device.type == "meta"


# ------------------------------------------------------------- many posteriors at once

SHAPES = ((6, 5), (7,), (4, 3, 3, 3), (1,), (11, 2))


def _random_posteriors(seed: int, dtype: torch.dtype = torch.float64,
                       parametrizations: tuple[str, ...] = ("log", "softplus", "log", "log",
                                                            "softplus")
                       ) -> list[GaussianPosterior]:
    """Posteriors of different shapes, both parametrisations, random means and sigmas."""
    generator = torch.Generator().manual_seed(seed)
    posteriors = []
    for shape, parametrization in zip(SHAPES, parametrizations, strict=True):
        posterior = GaussianPosterior(shape, parametrization=parametrization, dtype=dtype)
        with torch.no_grad():
            posterior.mu.copy_(0.7 * torch.randn(shape, generator=generator))
            posterior.sigma_parameter.copy_(torch.randn(shape, generator=generator) - 1.0)
        posteriors.append(posterior)
    return posteriors


PRIORS = (0.3, 1.0, 2.5, 0.05, 1.7)  # a different prior scale for every posterior


def test_summed_kl_equals_the_sum_of_the_kls_and_its_gradient_in_float64() -> None:
    posteriors = _random_posteriors(seed=1)
    parameters = [p for posterior in posteriors for p in posterior.parameters()]
    summed = summed_gaussian_kl_divergence(posteriors, PRIORS)
    reference = sum(p.kl_divergence(s) for p, s in zip(posteriors, PRIORS, strict=True))
    assert summed.dtype == torch.float64
    torch.testing.assert_close(summed, reference, rtol=1e-13, atol=0)
    # ... and torch.distributions agrees (an independent reference)
    distributions = sum(_reference_kl(p.mu, p.sigma, s) for p, s in zip(posteriors, PRIORS,
                                                                      strict=True))
    torch.testing.assert_close(summed, distributions, rtol=1e-12, atol=0)
    for got, expected in zip(torch.autograd.grad(summed, parameters),
                             torch.autograd.grad(reference, parameters), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_summed_kl_gradient_by_finite_differences() -> None:
    generator = torch.Generator().manual_seed(2)
    mus = [torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
           for shape in SHAPES[:3]]
    log_sigmas = [torch.randn(shape, dtype=torch.float64, generator=generator,
                              requires_grad=True) for shape in SHAPES[:3]]
    assert torch.autograd.gradcheck(lambda *t: _SummedGaussianKL.apply(PRIORS[:3], *t),
                                    (*mus, *log_sigmas))


def test_summed_kl_closed_form_gradient_and_zero_at_the_prior() -> None:
    # d KL / d mu = mu / s^2, d KL / d log sigma = sigma^2 / s^2 - 1, per posterior's s
    posteriors = _random_posteriors(seed=3, parametrizations=("log",) * 5)
    summed_gaussian_kl_divergence(posteriors, PRIORS).backward()
    for posterior, s in zip(posteriors, PRIORS, strict=True):
        torch.testing.assert_close(posterior.mu.grad, posterior.mu.detach() / s**2)
        torch.testing.assert_close(posterior.log_sigma.grad,
                                   posterior.sigma.detach() ** 2 / s**2 - 1)
    for posterior, s in zip(posteriors, PRIORS, strict=True):
        posterior.set_sigma(s)
        with torch.no_grad():
            posterior.mu.zero_()
    assert summed_gaussian_kl_divergence(posteriors, PRIORS).abs().item() < 1e-12


def test_summed_kl_in_float32_and_under_bfloat16_autocast() -> None:
    posteriors = _random_posteriors(seed=4, dtype=torch.float32)
    reference = sum(_reference_kl(p.mu.detach(), p.sigma.detach(), s)
                    for p, s in zip(posteriors, PRIORS, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summed = summed_gaussian_kl_divergence(posteriors, PRIORS)
    assert summed.dtype == torch.float32 and summed.requires_grad
    assert summed.item() == pytest.approx(reference.item(), rel=1e-5)
    halves = _random_posteriors(seed=4, dtype=torch.bfloat16)
    assert summed_gaussian_kl_divergence(halves, PRIORS).dtype == torch.float32
    # Half a million float32 weights (the hidden layer's size): summed as accurately as
    # torch sums one tensor (a naive float32 accumulation would be off by about 1e-3).
    large = GaussianPosterior((512, 1024), init_log_sigma=-5.0)
    with torch.no_grad():
        large.mu.uniform_(-0.05, 0.05)
    exact = _reference_kl(large.mu.detach(), large.sigma.detach(), 1.0)
    got = summed_gaussian_kl_divergence([large], [1.0])
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)


def test_summed_kl_rejects_bad_input() -> None:
    posteriors = _random_posteriors(seed=5)
    with pytest.raises(ValueError, match="one prior_sigma per posterior"):
        summed_gaussian_kl_divergence(posteriors, PRIORS[:2])
    with pytest.raises(ValueError, match="at least one posterior"):
        summed_gaussian_kl_divergence([], [])
    with pytest.raises(ValueError, match="positive"):
        summed_gaussian_kl_divergence(posteriors, (1.0, 1.0, 0.0, 1.0, 1.0))
    mixed = [GaussianPosterior((2,)), GaussianPosterior((2,), dtype=torch.float64)]
    with pytest.raises(ValueError, match="one dtype"):
        summed_gaussian_kl_divergence(mixed, (1.0, 1.0))
    with pytest.raises(ValueError, match="one dtype"):
        gaussian_perturbations(mixed)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_perturbations_drawn_at_once_have_mean_zero_and_the_posterior_sigmas(
        parametrization: str) -> None:
    torch.manual_seed(6)
    posteriors = _random_posteriors(seed=6, dtype=torch.float32,
                                    parametrizations=(parametrization,) * 5)
    n = 4000
    with torch.no_grad():
        draws = [torch.stack(d) for d in zip(*(gaussian_perturbations(posteriors)
                                               for _ in range(n)), strict=True)]
    for posterior, delta in zip(posteriors, draws, strict=True):
        assert delta.shape == (n, *posterior.shape)
        z = (delta / posterior.sigma.detach()).double()  # N(0, 1) entry by entry
        # standard errors 1/sqrt(n) for a mean and sqrt(2/n) for a mean of squares
        assert z.mean(0).abs().max() < 5 / math.sqrt(n)
        assert ((z**2).mean(0) - 1).abs().max() < 5 * math.sqrt(2 / n)
    # Independent across tensors and entries: all entries' correlations near zero.
    flat = torch.cat([d.flatten(1) / p.sigma.detach().flatten() for d, p in
                      zip(draws, posteriors, strict=True)], dim=1).double()
    correlation = torch.corrcoef(flat.T)
    off_diagonal = correlation[~torch.eye(flat.shape[1], dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5.5 / math.sqrt(n)


def test_perturbation_gradients_are_those_of_sigma_times_epsilon() -> None:
    torch.manual_seed(7)
    posteriors = _random_posteriors(seed=7)  # both parametrisations, float64
    deltas = gaussian_perturbations(posteriors)
    # The noise behind each perturbation, then the same perturbation by plain autograd.
    epsilons = [(d / p.sigma).detach() for d, p in zip(deltas, posteriors, strict=True)]
    weights = [torch.randn(p.shape, dtype=torch.float64) for p in posteriors]
    loss = sum((w * d).sum() for w, d in zip(weights, deltas, strict=True))
    reference = sum((w * p.sigma * e).sum() for w, p, e in
                    zip(weights, posteriors, epsilons, strict=True))
    parameters = [p.sigma_parameter for p in posteriors]
    for got, expected in zip(torch.autograd.grad(loss, parameters),
                             torch.autograd.grad(reference, parameters), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    log_sigmas = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
                  for shape in SHAPES[:2]]
    noises = [torch.randn(shape, dtype=torch.float64) for shape in SHAPES[:2]]
    assert torch.autograd.gradcheck(lambda *t: _ScaledNoise.apply(2, *t, *noises),
                                    tuple(log_sigmas))


def test_perturbations_take_one_random_draw() -> None:
    from torch.profiler import ProfilerActivity, profile

    posteriors = _random_posteriors(seed=8, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        deltas = gaussian_perturbations(posteriors)
    names = [event.name for event in profiler.events()]
    assert names.count("aten::randn") == 1 and "aten::randn_like" not in names
    assert [tuple(d.shape) for d in deltas] == [p.shape for p in posteriors]
    assert gaussian_perturbations([]) == []
