"""Temperature scaling: the fitted T against simulated truth, scipy, and its own optimality."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from bnn_course.calibration import TemperatureScaled, fit_temperature, temperature_scale
from bnn_course.comparison import sample_probs_for
from bnn_course.data import normalize
from bnn_course.evaluation import predict_log_probs
from bnn_course.models import DeterministicCNN


def simulated(temperature: float, n: int = 20_000, k: int = 10, scale: float = 3.0,
              seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z ~ N(0, scale^2) (N, K) in float64 and labels drawn from softmax(z / T0)."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, k, generator=generator, dtype=torch.float64)
    probs = torch.softmax(logits / temperature, dim=1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return logits, labels


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return F.cross_entropy(logits.double() / temperature, labels).item()


def temperature_standard_error(logits: torch.Tensor, temperature: float) -> float:
    """sd of T-hat from the Fisher information of beta = 1/T, I = mean_n Var_p[z_n], and the
    delta method sd(T) = sd(beta) * T^2."""
    p = torch.softmax(logits / temperature, dim=1)
    mean = (p * logits).sum(1, keepdim=True)
    fisher = (p * (logits - mean) ** 2).sum(1).mean().item()
    return temperature ** 2 / math.sqrt(logits.shape[0] * fisher)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_simulated_temperature(true_temperature):
    logits, labels = simulated(true_temperature)
    # float32 log-probabilities, as the networks return them, work as logits
    fitted = fit_temperature(torch.log_softmax(logits.float(), dim=1), labels)
    tolerance = 4 * temperature_standard_error(logits, true_temperature)
    assert abs(fitted - true_temperature) < tolerance, (fitted, true_temperature, tolerance)


def test_labels_drawn_from_softmax_of_the_logits_give_temperature_one():
    logits, labels = simulated(1.0, n=50_000, seed=7)
    fitted = fit_temperature(logits, labels)
    assert abs(fitted - 1.0) < 4 * temperature_standard_error(logits, 1.0)


@pytest.mark.parametrize("case", ["over_confident", "under_confident", "misspecified"])
def test_fit_temperature_agrees_with_scipy(case):
    if case == "over_confident":
        logits, labels = simulated(3.0, n=3000, seed=1)
    elif case == "under_confident":
        logits, labels = simulated(0.4, n=3000, seed=2)
    else:  # labels from other logits: no T is right, the minimiser still exists
        logits, labels = simulated(1.0, n=3000, seed=3)
        logits = logits + 2 * torch.randn(logits.shape, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(4))
    fitted = fit_temperature(logits, labels)
    result = minimize_scalar(lambda t: mean_nll(logits, labels, t), bounds=(0.05, 20.0),
                             method="bounded", options={"xatol": 1e-11})
    assert result.success
    assert fitted == pytest.approx(result.x, rel=1e-6)


def test_fitted_temperature_is_a_stationary_point_and_never_raises_the_nll():
    generator = torch.Generator().manual_seed(11)
    for trial in range(8):
        n, k = 200 + 300 * trial, 2 + trial
        logits = (0.5 + trial) * torch.randn(n, k, generator=generator, dtype=torch.float64)
        labels = torch.multinomial(torch.softmax(logits / (0.3 + 0.5 * trial), 1), 1,
                                   generator=generator).squeeze(1)
        fitted = fit_temperature(logits, labels)
        beta = torch.tensor(1 / fitted, dtype=torch.float64, requires_grad=True)
        F.cross_entropy(beta * logits, labels).backward()
        assert abs(beta.grad.item()) < 1e-10
        best = mean_nll(logits, labels, fitted)
        assert best <= mean_nll(logits, labels, 1.0) + 1e-12
        assert best <= mean_nll(logits, labels, fitted * 1.01)
        assert best <= mean_nll(logits, labels, fitted / 1.01)


def test_fit_temperature_accepts_any_device_dtype_and_label_dtype():
    logits, labels = simulated(2.0, n=2000, seed=5)
    reference = fit_temperature(logits, labels)
    assert fit_temperature(logits.float(), labels.int()) == pytest.approx(reference, rel=1e-5)
    assert isinstance(reference, float)


@pytest.mark.parametrize("scores, labels, message", [
    (torch.zeros(5), torch.zeros(5, dtype=torch.long), "shape"),
    (torch.zeros(5, 1), torch.zeros(5, dtype=torch.long), "shape"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "shape"),
    (torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long), "floating"),
    (torch.zeros(5, 3), torch.zeros(4, dtype=torch.long), "labels must have shape"),
    (torch.zeros(5, 3), torch.zeros(5), "integer"),
    (torch.zeros(5, 3), torch.full((5,), 3), "0..2"),
    (torch.zeros(5, 3), torch.full((5,), -1), "0..2"),
    (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]), "finite"),
    (torch.tensor([[0.0, -float("inf"), 1.0]]), torch.tensor([0]), "finite"),
])
def test_fit_temperature_rejects_bad_input(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(scores, labels)


def test_fit_temperature_rejects_data_without_a_finite_positive_minimiser():
    logits = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="arg-max"):  # NLL -> 0 as T -> 0
        fit_temperature(logits, logits.argmax(1))
    with pytest.raises(ValueError, match="class average"):  # minimum at T < 0
        fit_temperature(logits, logits.argmin(1))
    with pytest.raises(ValueError, match="class average"):  # constant rows: no information
        fit_temperature(torch.zeros(10, 3), torch.arange(10) % 3)


def test_temperature_scale_divides_logits_and_log_probabilities_alike():
    logits = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    expected = torch.log_softmax(logits / 2.5, dim=-1)
    torch.testing.assert_close(temperature_scale(logits, 2.5), expected)
    torch.testing.assert_close(temperature_scale(torch.log_softmax(logits, -1), 2.5), expected)
    log_probs = torch.log_softmax(logits, -1)
    torch.testing.assert_close(temperature_scale(log_probs, 1), log_probs)
    assert temperature_scale(log_probs.float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_temperature_scale_rejects_bad_temperatures(temperature):
    with pytest.raises(ValueError, match="temperature"):
        temperature_scale(torch.zeros(2, 3), temperature)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaled(DeterministicCNN(channels=(4,), hidden_features=8), temperature)


def test_temperature_scale_rejects_bad_log_probs():
    with pytest.raises(ValueError, match="floating"):
        temperature_scale(torch.zeros(2, 3, dtype=torch.long), 2.0)
    with pytest.raises(ValueError, match="shape"):
        temperature_scale(torch.tensor(1.0), 2.0)


def test_temperature_scaled_network_works_with_the_prediction_functions():
    torch.manual_seed(123)
    twin = DeterministicCNN(channels=(4, 8), hidden_features=16)
    scaled = TemperatureScaled(twin, 1.7)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        direct = scaled(normalize(images), sample=False)
        expected = temperature_scale(twin(normalize(images), sample=False), 1.7)
    torch.testing.assert_close(direct, expected)
    mean_log_probs, _ = predict_log_probs(scaled, images, 0, batch_size=5)
    torch.testing.assert_close(mean_log_probs, expected)
    probs = sample_probs_for("deterministic", scaled, images, 0, batch_size=5)
    assert probs.shape == (1, 12, 10)
    torch.testing.assert_close(probs[0], expected.exp())
    assert torch.equal(probs[0].argmax(1), expected.argmax(1))
    assert "temperature=1.7" in repr(scaled)


def test_fitting_on_a_networks_log_probabilities_and_rescaling_lowers_its_nll():
    torch.manual_seed(0)
    twin = DeterministicCNN(channels=(4, 8), hidden_features=16)
    with torch.no_grad():  # a confident network: sharpen the untrained logits
        twin.classifier.weight.mul_(40.0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(1))
    log_probs, _ = predict_log_probs(twin, images, 0)
    temperature = fit_temperature(log_probs, labels)
    scaled_log_probs, _ = predict_log_probs(TemperatureScaled(twin, temperature), images, 0)
    before = F.nll_loss(log_probs, labels).item()
    after = F.nll_loss(scaled_log_probs, labels).item()
    assert temperature > 1  # random labels: the confident network is over-confident
    assert after < before
