"""Predictive uncertainty and its decomposition (bnn_course.uncertainty)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from bnn_course.uncertainty import (
    check_probabilities,
    decompose_uncertainty,
    entropy,
    expected_entropy,
    mutual_information,
    predictive_distribution,
    predictive_entropy,
    variation_ratio,
)


def _random_samples(seed: int, shape=(20, 300, 10), scale: float = 3.0,
                    dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    return logits.softmax(-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_total_is_aleatoric_plus_epistemic(dtype: torch.dtype) -> None:
    samples = _random_samples(123, dtype=dtype)
    parts = decompose_uncertainty(samples)
    # One floating-point addition away from exact: at most one ulp of the total.
    ulp = torch.finfo(parts.total.dtype).eps * parts.total.abs().clamp_min(1e-30)
    assert ((parts.aleatoric + parts.epistemic - parts.total).abs() <= ulp).all()
    assert (parts.epistemic >= 0).all()
    assert (parts.aleatoric >= 0).all()
    # Independent reference: scipy's entropy of the mean and mean of the entropies.
    p = samples.double().numpy()
    total = scipy.stats.entropy(p.mean(0), axis=-1)
    aleatoric = scipy.stats.entropy(p, axis=-1).mean(0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(parts.total.numpy(), total, rtol=0, atol=tol)
    np.testing.assert_allclose(parts.aleatoric.numpy(), aleatoric, rtol=0, atol=tol)
    np.testing.assert_allclose(parts.epistemic.numpy(), total - aleatoric, rtol=0, atol=2 * tol)
    # The single-purpose functions agree with the decomposition.
    torch.testing.assert_close(predictive_entropy(samples), parts.total)
    torch.testing.assert_close(mutual_information(samples), parts.epistemic)
    torch.testing.assert_close(predictive_distribution(samples), samples.to(parts.total.dtype)
                               .mean(0))
    assert (expected_entropy(samples) >= parts.aleatoric).all()
    torch.testing.assert_close(expected_entropy(samples), parts.aleatoric)


def test_disagreeing_samples_have_epistemic_uncertainty() -> None:
    # Two confident samples voting for different classes: all uncertainty is epistemic.
    samples = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])  # (S=2, N=1, K=3)
    parts = decompose_uncertainty(samples)
    assert torch.isfinite(parts.total).all()  # 0 log 0 = 0, no NaN
    assert parts.total.item() == pytest.approx(math.log(2), rel=1e-6)
    assert parts.aleatoric.item() == 0.0
    assert parts.epistemic.item() == pytest.approx(math.log(2), rel=1e-6)
    assert variation_ratio(samples).item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agreeing_samples_have_zero_epistemic_uncertainty(dtype: torch.dtype) -> None:
    # Identical samples: MI is 0 up to the rounding of the averages over samples (a few
    # ulps of the entropy), never negative (negative rounding errors are clamped), and
    # every sample votes for the same class.
    one = _random_samples(7, shape=(1, 500, 10), dtype=dtype)
    samples = one.expand(16, -1, -1)
    parts = decompose_uncertainty(samples)
    eps = torch.finfo(dtype).eps
    assert (parts.epistemic >= 0).all()
    assert (parts.epistemic <= 8 * eps * parts.total.clamp_min(1)).all()
    assert (parts.aleatoric <= parts.total).all()
    assert (variation_ratio(samples) == 0).all()
    # Where every number is exact (one-hot samples that agree), MI is exactly 0.
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 3, 1]), 4).to(dtype)
    exact = decompose_uncertainty(one_hot.expand(5, -1, -1))
    assert torch.equal(exact.epistemic, torch.zeros(3, dtype=dtype))
    assert torch.equal(exact.total, torch.zeros(3, dtype=dtype))


def test_entropy_known_values() -> None:
    uniform = torch.full((4, 10), 0.1)
    torch.testing.assert_close(entropy(uniform), torch.full((4,), math.log(10)))
    one_hot = torch.eye(5)
    assert torch.equal(entropy(one_hot), torch.zeros(5))


def test_variation_ratio_counts_the_modal_vote() -> None:
    # S = 4 samples; votes per input: (0, 0, 1, 2) -> 1 - 2/4; (1, 1, 1, 1) -> 0;
    # (0, 1, 2, 3) -> 1 - 1/4 (a four-way tie: the size of the largest vote counts).
    votes = torch.tensor([[0, 1, 0], [0, 1, 1], [1, 1, 2], [2, 1, 3]])  # (S, N)
    samples = torch.nn.functional.one_hot(votes, 4).float() * 0.7 + 0.075
    assert torch.allclose(samples.sum(-1), torch.ones(4, 3))
    torch.testing.assert_close(variation_ratio(samples), torch.tensor([0.5, 0.0, 0.75]))


@pytest.mark.parametrize("bad, message", [
    (torch.full((3, 4, 5), 0.3), "sum to one"),
    (torch.randn(3, 4, 5).log_softmax(-1), "non-negative"),
    (torch.randn(3, 4, 5), "non-negative"),
    (torch.full((4, 5), 0.2), r"\(S, N, K\)"),
    (torch.full((0, 4, 5), 0.2), "at least one sample"),
    (torch.ones(3, 4, 1, dtype=torch.int64), "floating"),
    (torch.full((3, 4, 2), float("nan")), "NaN"),
])
def test_bad_samples_raise(bad: torch.Tensor, message: str) -> None:
    for function in (predictive_distribution, predictive_entropy, expected_entropy,
                     mutual_information, variation_ratio, decompose_uncertainty):
        with pytest.raises(ValueError, match=message):
            function(bad)


def test_check_probabilities_tolerance() -> None:
    probs = torch.full((2, 4), 0.25)
    assert torch.equal(check_probabilities(probs + 1e-6), probs + 1e-6)  # within tolerance
    with pytest.raises(ValueError, match=r"row \(1,\) sums to 1.01"):
        check_probabilities(torch.tensor([[0.5, 0.5], [0.5, 0.51]]))
    # Half precision gets a looser tolerance, and is computed in float32.
    half = torch.full((2, 3), 1 / 3).to(torch.bfloat16)
    assert check_probabilities(half).dtype == torch.float32
