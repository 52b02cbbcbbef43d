"""Convergence of a posterior's sigma (bnn_course.convergence)."""

from __future__ import annotations

import math

import pytest

from bnn_course.convergence import (
    HELD_BACK_SHARE,
    LATE_DRIFT_LIMIT,
    VERDICTS,
    convergence_report,
)
from bnn_course.data import synthetic_cifar10
from bnn_course.train import TrainConfig, learning_rates, train

NUM_TRAIN = 1000  # 10 steps per epoch at batch 100


def _history(log_sigmas: list[dict[str, float]], kl: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "nll": 1.0, "kl": k, "log_sigma": ls}
            for i, (ls, k) in enumerate(zip(log_sigmas, kl, strict=True))]


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 5, "batch_size": 100, "lr": 1e-2, "schedule": "constant",
                          **overrides})


def test_learning_rates_sum_to_the_schedules_integral() -> None:
    # Cosine from lr to 0 over T steps sums to about lr T / 2; a warm-up over W steps
    # removes about lr W / 2 of it.
    config = TrainConfig(epochs=10, batch_size=100, lr=2e-3)
    rates = learning_rates(config, 10_000)
    assert len(rates) == 1000
    assert sum(rates) == pytest.approx(2e-3 * 1000 / 2, rel=2e-3)
    warm = learning_rates(TrainConfig(epochs=10, batch_size=100, lr=2e-3, schedule="constant",
                                      lr_warmup_epochs=2), 10_000)
    assert warm[0] == pytest.approx(2e-3 / 200) and warm[199] == pytest.approx(2e-3)
    assert sum(warm) == pytest.approx(2e-3 * (1000 - 100) + 2e-3 / 200 * 100, rel=1e-9)


def test_a_layer_still_moving_at_adams_limit_is_held_back() -> None:
    # Constant lr 1e-2, 10 steps per epoch: the bound is 0.1 per epoch. Layer "a" moves
    # 0.09 per epoch to the end (90% of the bound), "b" settles after epoch 2.
    a = [-5 + 0.09 * (e + 1) for e in range(5)]
    b = [-5 + 0.05, -4.9, -4.9, -4.9, -4.9]
    report = convergence_report(_history([{"a": x, "b": y} for x, y in zip(a, b, strict=True)],
                                         [100.0] * 5), _config(), NUM_TRAIN)
    assert report.verdict == "held back by the step size"
    layer_a, layer_b = report.layers
    assert layer_a.bound == pytest.approx(0.5) and layer_a.share == pytest.approx(0.9)
    assert layer_a.late_share == pytest.approx(0.9) and layer_a.late_share >= HELD_BACK_SHARE
    assert layer_b.late_moved == pytest.approx(0.0)
    assert "a: 90%" in report.reason


def test_settled_layers_and_a_stable_kl_are_converged() -> None:
    logs = [{"a": v} for v in (-4.5, -4.2, -4.1, -4.1, -4.1)]
    report = convergence_report(_history(logs, [50.0, 40.0, 38.0, 37.9, 37.9]), _config(),
                                NUM_TRAIN)
    assert report.verdict == "converged"
    assert report.negative_elbo == pytest.approx([1 + k / NUM_TRAIN
                                                  for k in (50, 40, 38, 37.9, 37.9)])


def test_slow_drift_or_a_changing_kl_is_still_moving() -> None:
    # Drift of 0.06 in the last epoch (> LATE_DRIFT_LIMIT) at a constant lr of 1 per step
    # is a small share of Adam's bound: not held back, but not converged either.
    drift = [{"a": v} for v in (-4.5, -4.4, -4.3, -4.2, -4.2 + 1.2 * LATE_DRIFT_LIMIT)]
    report = convergence_report(_history(drift, [10.0] * 5), _config(lr=1.0), NUM_TRAIN)
    assert report.verdict == "still moving"
    kl_rising = [{"a": -1.0}] * 5
    report = convergence_report(_history(kl_rising, [10, 20, 30, 40, 50.0]), _config(lr=1.0),
                                NUM_TRAIN)
    assert report.verdict == "still moving" and "KL/N" in report.reason


def test_ivon_is_judged_by_how_much_of_its_initial_hessian_remains() -> None:
    config = _config(model="deterministic", optimizer="ivon", ivon_beta2=0.999)
    logs = [{"a": -3.0}] * 5
    report = convergence_report(_history(logs, [10.0] * 5), config, NUM_TRAIN)
    assert report.hessian_memory == pytest.approx(0.999**50)
    assert report.verdict == "held back by the step size"
    assert math.isnan(report.layers[0].share)
    report = convergence_report(_history(logs, [10.0] * 5),
                                _config(model="deterministic", optimizer="ivon",
                                        ivon_beta2=0.9), NUM_TRAIN)
    assert report.verdict == "converged"
    # IVON starts at sigma = 1/sqrt(ess (h0 + delta)), delta = 1/(ess s^2)
    expected = -0.5 * math.log(NUM_TRAIN * (0.5 + 1 / NUM_TRAIN))
    assert report.layers[0].initial == pytest.approx(expected)


def test_old_histories_without_log_sigma_use_the_log_of_the_mean_sigma() -> None:
    history = [{"epoch": e + 1, "nll": 1.0, "kl": 5.0, "sigma": {"a": math.exp(-4.0)}}
               for e in range(5)]
    report = convergence_report(history, _config(), NUM_TRAIN)
    assert report.approximate and report.layers[0].final == pytest.approx(-4.0)


def test_what_cannot_be_judged_is_an_error() -> None:
    with pytest.raises(ValueError, match="no posterior"):
        convergence_report(_history([{"a": 0.0}] * 5, [0.0] * 5),
                           _config(model="deterministic"), NUM_TRAIN)
    with pytest.raises(ValueError, match="finished"):
        convergence_report(_history([{"a": 0.0}] * 3, [0.0] * 3), _config(), NUM_TRAIN)
    with pytest.raises(ValueError, match="empty"):
        convergence_report([], _config(epochs=1), NUM_TRAIN)


@pytest.mark.parametrize("optimizer", ["adam", "ivon"])
def test_a_real_run_gets_a_verdict(optimizer) -> None:
    data = synthetic_cifar10(train_per_class=10, test_per_class=2, seed=3)
    model = "bayesian" if optimizer == "adam" else "deterministic"
    config = TrainConfig(model=model, optimizer=optimizer, epochs=3, batch_size=20,
                         channels=(4,), hidden_features=8, device="cpu", progress=False,
                         epoch_eval_samples=0, eval_samples=0)
    result = train(config, data, log=lambda _: None)
    report = convergence_report(result.history, config, 100)
    assert report.verdict in VERDICTS
    assert [m.name for m in report.layers] == ["convs.0", "convs.1", "hidden", "classifier"]
    assert not report.approximate
