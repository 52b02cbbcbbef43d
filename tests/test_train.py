"""The training engine and its command line (bnn_course.train).

Small networks on the synthetic stand-in keep these tests to seconds on a CPU. A real-data
test runs only when ``BNN_COURSE_DATA`` names a CIFAR-10 copy (``.ci/run`` extracts one).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bnn_course import config as run_config
from bnn_course.data import load_cifar10, stratified_subset, synthetic_cifar10
from bnn_course.run_folder import RunFolderError
from bnn_course.train import (
    CHECKPOINT_FIELDS,
    CheckpointError,
    TrainConfig,
    TrainingDiverged,
    load_checkpoint,
    load_trained_model,
    main,
    save_checkpoint,
    train,
)

TINY = {"channels": (4, 8), "hidden_features": 16, "batch_size": 32, "device": "cpu",
        "progress": False, "epoch_eval_samples": 2, "eval_samples": 2}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_data():
    return synthetic_cifar10(train_per_class=12, test_per_class=4, seed=1)


def test_the_logged_kl_term_follows_scaling_weight_and_warmup(tiny_data) -> None:
    # 120 images, 4 steps per epoch; warm-up over 2 epochs: the last step (index 3) of
    # epoch 1 has gamma = 3/8, and beta = 0.1. Unscaled: no division by N = 120.
    for scaling, divisor in (("per_example", 120), ("unscaled", 1)):
        config = TrainConfig(epochs=1, log_interval=1, kl_weight=0.1, kl_warmup_epochs=2,
                             kl_scaling=scaling, **TINY)
        steps = train(config, tiny_data, log=quiet).history[0]["steps"]
        for index, step in enumerate(steps):
            gamma = index / 8
            assert step["kl_term"] == pytest.approx(0.1 * gamma * step["kl"] / divisor,
                                                    rel=1e-5, abs=1e-12), (scaling, index)


def test_loss_terms_are_logged_and_kl_is_per_example(tiny_data) -> None:
    result = train(TrainConfig(epochs=1, log_interval=2, **TINY), tiny_data, log=quiet)
    record = result.history[0]
    assert record["kl_term"] == pytest.approx(record["kl"] / 120, rel=1e-5)
    assert set(record["sigma"]) == {name for name, _ in result.model.bayesian_layers()}
    steps = record["steps"]  # 120 images / 32 per batch = 4 steps, logged every 2
    assert [s["step"] for s in steps] == [2, 4]
    assert steps[-1]["kl_term"] == pytest.approx(steps[-1]["kl"] / 120, rel=1e-5)
    assert record["images_per_second"] > 0 and math.isfinite(record["nll"])


def test_resume_after_interruption_equals_uninterrupted_run(tiny_data, tmp_path) -> None:
    config = TrainConfig(epochs=3, kl_warmup_epochs=1.5, **TINY)
    uninterrupted = train(config, tiny_data, out_dir=tmp_path / "a", log=quiet)

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(epoch: int, _: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, tiny_data, out_dir=tmp_path / "b", on_epoch_end=stop_after_first_epoch,
              log=quiet)
    resumed = train(config, tiny_data, out_dir=tmp_path / "b", resume=True, log=quiet)
    for (name, a), (_, b) in zip(uninterrupted.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert [r["nll"] for r in resumed.history] == [r["nll"] for r in uninterrupted.history]


def test_resume_refuses_another_configuration(tiny_data, tmp_path) -> None:
    train(TrainConfig(epochs=1, **TINY), tiny_data, out_dir=tmp_path, log=quiet)
    with pytest.raises(CheckpointError, match="lr"):
        train(TrainConfig(epochs=1, **{**TINY, "lr": 0.5}), tiny_data, out_dir=tmp_path,
              resume=True, log=quiet)


def test_resume_refuses_other_data(tiny_data, tmp_path) -> None:
    train(TrainConfig(epochs=1, **TINY), tiny_data, out_dir=tmp_path, log=quiet)
    other = synthetic_cifar10(train_per_class=12, test_per_class=4, seed=2)
    other = dataclasses.replace(other, source="another copy")
    with pytest.raises(CheckpointError, match="same data"):
        train(TrainConfig(epochs=1, **TINY), other, out_dir=tmp_path, resume=True, log=quiet)


def test_divergence_stops_training_with_causes(tiny_data) -> None:
    # sigma = e^30: the first sampled pass overflows to inf/NaN.
    config = TrainConfig(epochs=1, init_log_sigma=30.0, **TINY)
    with pytest.raises(TrainingDiverged, match="learning rate.*sigma"):
        train(config, tiny_data, log=quiet)


def test_checkpoint_is_written_atomically_and_damage_is_reported(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": "bnn_course.checkpoint", "version": 1, "x": 1})
    good = path.read_bytes()

    class Boom(Exception):
        pass

    class Exploding:
        def __reduce__(self):
            raise Boom

    with pytest.raises(Boom):
        save_checkpoint(path, {"format": "bnn_course.checkpoint", "payload": Exploding()})
    assert path.read_bytes() == good, "a failed write must leave the old checkpoint intact"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(path)
    torch.save({"some": "thing"}, path)
    with pytest.raises(CheckpointError, match="not a bnn_course"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture_is_refused(tiny_data, tmp_path) -> None:
    train(TrainConfig(epochs=1, **TINY), tiny_data, out_dir=tmp_path, log=quiet)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["config"]["hidden_features"] = 32  # the stored weights are still 16 wide
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_trained_model(tmp_path / "checkpoint.pt")


def test_seeded_cpu_runs_are_identical(tiny_data) -> None:
    first = train(TrainConfig(epochs=1, seed=3, **TINY), tiny_data, log=quiet)
    second = train(TrainConfig(epochs=1, seed=3, **TINY), tiny_data, log=quiet)
    assert first.history[0]["nll"] == second.history[0]["nll"]
    assert first.final == second.final


@pytest.mark.parametrize("model", ["deterministic", "mc_dropout"])
def test_baselines_train_with_the_same_engine(tiny_data, model) -> None:
    result = train(TrainConfig(model=model, epochs=1, **TINY), tiny_data, log=quiet)
    assert result.history[0]["kl"] == 0.0 and result.history[0]["sigma"] == {}
    assert math.isfinite(result.final["nll_mc"])


def test_invalid_configuration_is_an_error() -> None:
    with pytest.raises(ValueError, match="kl_scaling"):
        TrainConfig(kl_scaling="sum")
    with pytest.raises(ValueError, match="kl_scaling"):
        TrainConfig(kl_scaling="none")  # the old name of "unscaled"
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"channels=\(\) \(must be a non-empty"):
        TrainConfig(channels=())
    assert TrainConfig(channels=[4, 8]).channels == (4, 8)
    for seed in (-1, 2**63, 1.5):  # torch.manual_seed takes a 64-bit integer
        with pytest.raises(ValueError, match="seed"):
            TrainConfig(seed=seed)
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1
    # Settings that float32 parameters cannot hold are errors here, not overflows later.
    for name, value in (("lr", 1e300), ("prior_sigma", 1e300), ("prior_sigma", 1e-300),
                        ("init_log_sigma", -100.0), ("init_log_sigma", 100.0)):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: value})


@pytest.mark.parametrize("name", ["lr", "kl_weight", "kl_warmup_epochs", "init_log_sigma",
                                  "prior_sigma", "dropout"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_settings_are_rejected(name, value) -> None:
    with pytest.raises(ValueError, match=f"{name}=(inf|-inf|nan)"):
        TrainConfig(**{name: value})


def test_checkpoint_with_missing_fields_names_them(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": "bnn_course.checkpoint", "version": 1, "epoch": 1,
                           "model": {}})
    with pytest.raises(CheckpointError, match=r"lacks the checkpoint fields \['config', "
                                              r"'optimizer', 'history', 'rng', 'data_source'\]"):
        load_checkpoint(path)
    assert set(CHECKPOINT_FIELDS) >= {"config", "model", "optimizer", "rng"}


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tiny_data, tmp_path) -> None:
    config = TrainConfig(epochs=1, **TINY)
    train(config, tiny_data, out_dir=tmp_path, log=quiet)
    (tmp_path / "metrics.json").write_text("{}")  # as main() writes it
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(TrainConfig(epochs=1, **{**TINY, "lr": 0.01}), tiny_data, out_dir=tmp_path,
              log=quiet)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["lr"] == config.lr
    # resuming a finished run trains nothing and keeps its metrics
    train(config, tiny_data, out_dir=tmp_path, resume=True, log=quiet)
    assert (tmp_path / "metrics.json").exists()
    # --overwrite replaces the run: the old checkpoint and metrics.json go
    longer = TrainConfig(epochs=2, **TINY)
    train(longer, tiny_data, out_dir=tmp_path, overwrite=True, log=quiet)
    assert not (tmp_path / "metrics.json").exists()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_resume_refuses_another_test_subset(tiny_data, tmp_path) -> None:
    config = TrainConfig(epochs=2, **TINY)

    def stop(epoch: int, _: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_data, out_dir=tmp_path, on_epoch_end=stop, log=quiet)
    images, labels = stratified_subset(tiny_data.test_images, tiny_data.test_labels, 20)
    fewer = dataclasses.replace(tiny_data, test_images=images, test_labels=labels)
    with pytest.raises(CheckpointError, match="test set: 40 examples saved, 20 now"):
        train(config, fewer, out_dir=tmp_path, resume=True, log=quiet)
    resumed = train(config, tiny_data, out_dir=tmp_path, resume=True, log=quiet)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_half_written_temporaries_are_removed_at_the_next_start(tiny_data, tmp_path) -> None:
    crashed = tmp_path / "checkpoint.pt.partial-k3j2.tmp"
    crashed.write_bytes(b"half a checkpoint")
    train(TrainConfig(epochs=1, **TINY), tiny_data, out_dir=tmp_path, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_non_finite_weights_are_never_checkpointed(tiny_data, tmp_path, monkeypatch) -> None:
    # 120 images, 32 per batch: 4 steps an epoch. After the last step of epoch 2 (the 8th
    # Adam step) a weight becomes NaN; the loss of every step was finite.
    config = TrainConfig(epochs=2, **TINY)
    real_step = torch.optim.Adam.step
    steps = []

    def poisoning_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 8:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.nan
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    with pytest.raises(TrainingDiverged, match="epoch 2: non-finite.*weights"):
        train(config, tiny_data, out_dir=tmp_path, log=quiet)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in saved["model"].values()
               if t.is_floating_point())


def test_non_finite_metrics_are_never_checkpointed(tiny_data, tmp_path, monkeypatch) -> None:
    from bnn_course import train as engine

    real_evaluate = engine.evaluate
    calls = []

    def evaluate_nan_second_time(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        calls.append(1)
        return {**result, "nll_mean": math.nan} if len(calls) == 2 else result

    monkeypatch.setattr(engine, "evaluate", evaluate_nan_second_time)
    with pytest.raises(TrainingDiverged, match=r"metrics \['test_nll_mean'\]"):
        train(TrainConfig(epochs=2, **TINY), tiny_data, out_dir=tmp_path, log=quiet)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_train_leaves_the_global_tf32_settings_as_they_were(tiny_data) -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    train(TrainConfig(epochs=1, **TINY), tiny_data, log=quiet)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_old_checkpoints_with_kl_scaling_none_still_load(tiny_data, tmp_path) -> None:
    config = TrainConfig(epochs=1, kl_scaling="unscaled", **TINY)
    train(config, tiny_data, out_dir=tmp_path, log=quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["config"]["kl_scaling"] = "none"
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["kl_scaling"] == "unscaled"
    train(config, tiny_data, out_dir=tmp_path, resume=True, log=quiet)  # same run


def test_command_line_end_to_end_in_smoke_mode(tmp_path, monkeypatch) -> None:
    # no copy anywhere (a private HOME, no BNN_COURSE_DATA, no download): the stand-in
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(run_config.DATA_ENV, raising=False)
    monkeypatch.setattr("bnn_course.data._download", lambda root: (_ for _ in ()).throw(
        OSError("no network in tests")))
    out = tmp_path / "run"
    document = main(["--smoke", "--epochs", "1", "--batch-size", "64", "--train-subset", "200",
                     "--eval-samples", "2", "--epoch-eval-samples", "1", "--device", "cpu",
                     "--channels", "4,8", "--hidden-features", "16",
                     "--no-progress", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(document))
    assert saved["provenance"]["mode"] == "smoke"
    assert saved["provenance"]["data_is_synthetic"] is True
    assert saved["config"]["train_subset"] == 200 and len(saved["history"]) == 1
    assert saved["config"]["channels"] == [4, 8]
    assert 0 <= saved["final"]["test_accuracy_mc"] <= 1
    model, state = load_trained_model(out / "checkpoint.pt")
    assert state["epoch"] == 1 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_seed_recipe_sets_the_failing_configuration_and_flags_override_it(monkeypatch) -> None:
    captured = {}

    def fake_train(config, data, out_dir=None, resume=False, overwrite=False):
        captured["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("bnn_course.train.train", fake_train)
    monkeypatch.setattr("bnn_course.train.load_cifar10", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        main(["--recipe", "seed", "--lr", "0.01"])
    config = captured["config"]
    assert (config.kl_scaling, config.init_log_sigma, config.lr) == ("unscaled", 0.0, 0.01)
    with pytest.raises(SystemExit):
        main(["--recipe", "seed", "--init-log-sigma", "-5"])
    assert captured["config"].init_log_sigma == -5.0
    assert captured["config"].kl_scaling == "unscaled"
    with pytest.raises(SystemExit):
        main([])
    assert captured["config"] == TrainConfig()


def test_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--recipe", "--data", "--epochs", "--batch-size", "--lr", "--kl-weight",
                 "--train-subset", "--device", "--seed", "--out", "--resume", "--smoke"):
        assert flag in text


@pytest.mark.skipif(run_config.data_root() is None,
                    reason="BNN_COURSE_DATA does not name a CIFAR-10 copy")
def test_real_cifar10_clearly_beats_chance_on_cpu() -> None:
    """A short CPU budget on real CIFAR-10: 2,000 images, 3 epochs. Chance is 10%; with
    1,000 test images its standard error is 0.95 points, so 20% is >10 standard errors."""
    data = load_cifar10(run_config.data_root(), smoke=False, allow_download=False,
                        test_per_class=100)
    assert not data.is_synthetic
    config = TrainConfig(epochs=3, train_subset=2000, batch_size=64, lr=2e-3,
                         channels=(16, 32, 64), hidden_features=128, device="cpu",
                         progress=False, epoch_eval_samples=0, eval_samples=4)
    result = train(config, data, log=quiet)
    assert result.final["accuracy_mean"] > 0.2, result.final


@pytest.mark.parametrize("damage", [
    {"rng": {}}, {"rng": None}, {"epoch": "1"}, {"epoch": 7}, {"history": 5},
    {"model": 7}, {"optimizer": {}}, {"data_identity": 5},
    {"rng": {"shuffle": torch.zeros(3), "torch": torch.get_rng_state(), "cuda": None}},
])
def test_checkpoint_with_malformed_fields_is_a_checkpoint_error(tiny_data, tmp_path,
                                                                damage) -> None:
    # Regression: these reached _restore and ended in a KeyError or TypeError traceback.
    config = TrainConfig(epochs=1, **TINY)
    train(config, tiny_data, out_dir=tmp_path, log=quiet)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state.update(damage)
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="malformed checkpoint fields"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="malformed"):
        train(config, tiny_data, out_dir=tmp_path, resume=True, log=quiet)


def test_damaged_random_state_of_the_right_type_is_a_checkpoint_error(tiny_data,
                                                                     tmp_path) -> None:
    config = TrainConfig(epochs=2, **TINY)
    train(dataclasses.replace(config, epochs=2), tiny_data, out_dir=tmp_path, log=quiet)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]
    state["rng"]["shuffle"] = torch.zeros(3, dtype=torch.uint8)
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="damaged random-number state"):
        train(config, tiny_data, out_dir=tmp_path, resume=True, log=quiet)


@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_the_sigma_parameters_learn_at_their_own_rate(tiny_data, factor) -> None:
    # Adam's first step moves every parameter with a non-zero gradient by lr * sign(g)
    # (up to eps / |g|): the log sigmas by lr * factor, the means by lr.
    from bnn_course.train import build_model, build_optimizer

    config = TrainConfig(lr=1e-3, sigma_lr_factor=factor, schedule="constant", **TINY)
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    assert len(optimizer.param_groups) == (1 if factor == 1.0 else 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = tiny_data.train_images[:32].float() / 255, tiny_data.train_labels[:32]
    loss = torch.nn.functional.nll_loss(model(x), y) + model.kl_divergence() / 120
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()
        expected = 1e-3 * (factor if name.endswith("log_sigma") else 1.0)
        active = p.grad.abs() > 1e-5  # there eps = 1e-8 changes the step by < 0.1%
        assert active.any(), name
        torch.testing.assert_close(moved[active], torch.full_like(moved[active], expected),
                                   rtol=2e-2, atol=0)


def test_the_sigma_learning_rate_follows_the_schedule(tiny_data, tmp_path) -> None:
    # at the last step the means sit at the scheduled (cosine) rate, the sigmas at 5 times it
    config = TrainConfig(epochs=1, lr=2e-3, sigma_lr_factor=5.0, **TINY)
    train(config, tiny_data, out_dir=tmp_path, log=quiet)
    groups = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"]
    assert len(groups) == 2
    assert groups[0]["lr"] > 0
    assert groups[1]["lr"] == pytest.approx(5.0 * groups[0]["lr"], rel=1e-12)
    with pytest.raises(ValueError, match="sigma_lr_factor"):
        TrainConfig(sigma_lr_factor=0.0)
    with pytest.raises(ValueError, match="conv_dropout"):
        TrainConfig(conv_dropout=1.0)


def test_a_checkpoint_of_other_data_is_set_aside_not_resumed(tiny_data, tmp_path) -> None:
    from bnn_course.train import set_aside_other_data

    config = TrainConfig(epochs=1, **TINY)
    assert set_aside_other_data(tmp_path, config, tiny_data) is None  # nothing there
    train(config, tiny_data, out_dir=tmp_path, log=quiet)
    assert set_aside_other_data(tmp_path, config, tiny_data) is None  # same data
    other = synthetic_cifar10(train_per_class=12, test_per_class=4, seed=2)
    aside = set_aside_other_data(tmp_path, config, other)
    assert aside is not None and aside.is_file()
    assert not (tmp_path / "checkpoint.pt").exists()
    result = train(config, other, out_dir=tmp_path, resume=True, log=quiet)
    assert len(result.history) == 1


# ---------------------------------------------------------------------- IVON in the engine

IVON_TINY = {**TINY, "model": "deterministic", "optimizer": "ivon", "lr": 0.05,
             "ivon_beta2": 0.99}


def test_ivon_resume_after_interruption_equals_uninterrupted_run(tiny_data, tmp_path) -> None:
    config = TrainConfig(epochs=3, ivon_mc_samples=2, **IVON_TINY)
    uninterrupted = train(config, tiny_data, out_dir=tmp_path / "a", log=quiet)

    class Interrupt(Exception):
        pass

    def stop(epoch: int, _: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, tiny_data, out_dir=tmp_path / "b", on_epoch_end=stop, log=quiet)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    hess = [s["hess"] for s in saved["optimizer"]["state"].values()]
    assert hess and all(torch.isfinite(h).all() for h in hess)  # the Hessian is checkpointed
    resumed = train(config, tiny_data, out_dir=tmp_path / "b", resume=True, log=quiet)
    for (name, a), (_, b) in zip(uninterrupted.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert [r["nll"] for r in resumed.history] == [r["nll"] for r in uninterrupted.history]


def test_an_ivon_run_predicts_with_its_posterior(tiny_data, tmp_path) -> None:
    from bnn_course.models import BayesianCNN
    from bnn_course.train import build_model, build_optimizer, ivon_posterior_network

    config = TrainConfig(epochs=1, **IVON_TINY)
    result = train(config, tiny_data, out_dir=tmp_path, log=quiet)
    assert isinstance(result.model, BayesianCNN)  # samples, means and KL like BBB's network
    model, state = load_trained_model(tmp_path / "checkpoint.pt")
    twin = build_model(config)
    twin.load_state_dict(state["model"])
    optimizer = build_optimizer(twin, config, num_train=120)
    optimizer.load_state_dict(state["optimizer"])
    sigmas = optimizer.posterior_std()
    layers = [posterior for layer in model.layers() for posterior in layer.posteriors()]
    for posterior, weight, sigma in zip(layers, twin.parameters(), sigmas, strict=True):
        assert torch.equal(posterior.mu, weight)
        assert torch.allclose(posterior.sigma, sigma, rtol=1e-6)
    # the prior is IVON's: N(0, 1/(ess delta)) = N(0, prior_sigma^2) by default
    assert all(layer.prior_sigma == pytest.approx(1.0) for layer in model.layers())
    assert model.kl_divergence().item() == pytest.approx(optimizer.kl_divergence().item(),
                                                         rel=1e-4)
    assert result.history[0]["kl"] == pytest.approx(optimizer.kl_divergence().item(),
                                                    rel=1e-4)
    rebuilt = ivon_posterior_network(twin, optimizer)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(rebuilt(x, sample=False), model(x, sample=False))
    assert torch.allclose(model(x, sample=False), twin(x), atol=1e-5)


def test_ivon_settings_are_validated_and_need_the_twin() -> None:
    with pytest.raises(ValueError, match="model='deterministic'"):
        TrainConfig(optimizer="ivon")
    for name, value in (("ivon_beta2", 1.0), ("ivon_beta1", -0.1), ("ivon_hess_init", 0.0),
                        ("ivon_weight_decay", 0.0), ("ivon_clip_radius", -1.0),
                        ("ivon_mc_samples", 0), ("ivon_ess", 0), ("ivon_hess_init", math.inf)):
        with pytest.raises(ValueError, match=name):
            TrainConfig(model="deterministic", optimizer="ivon", **{name: value})


def test_ivon_command_line_flags(monkeypatch, capsys) -> None:
    captured = {}

    def fake_train(config, data, out_dir=None, resume=False, overwrite=False):
        captured["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("bnn_course.train.train", fake_train)
    monkeypatch.setattr("bnn_course.train.load_cifar10", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        main(["--model", "deterministic", "--optimizer", "ivon", "--ivon-clip-radius", "1e-3",
              "--ivon-weight-decay", "none", "--ivon-ess", "none", "--validation-size", "5000",
              "--lr-warmup-epochs", "1"])
    config = captured["config"]
    assert (config.optimizer, config.ivon_clip_radius, config.ivon_weight_decay,
            config.ivon_ess, config.validation_size) == ("ivon", 1e-3, None, None, 5000)
    with pytest.raises(SystemExit) as stop:
        main(["--optimizer", "ivon"])  # the BayesianCNN: refused before anything is written
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "deterministic" in err


def test_the_validation_images_are_held_out_of_training(tiny_data) -> None:
    from bnn_course.train import training_set, validation_set

    config = TrainConfig(validation_size=20, **TINY)
    train_images, train_labels = training_set(config, tiny_data)
    held_images, held_labels = validation_set(config, tiny_data)
    assert train_images.shape[0] == 100 and held_images.shape[0] == 20
    assert torch.bincount(held_labels, minlength=10).tolist() == [2] * 10
    flat = {tuple(image.flatten().tolist()) for image in train_images}
    assert not any(tuple(image.flatten().tolist()) in flat for image in held_images)
    again = validation_set(config, tiny_data)[0]
    assert torch.equal(again, held_images)  # the same split every time
    result = train(TrainConfig(epochs=1, validation_size=20, **TINY), tiny_data, log=quiet)
    assert result.history[0]["steps"][-1]["step"] == 4  # 100 images / 32 per batch
    with pytest.raises(ValueError, match="validation_size=0"):
        validation_set(TrainConfig(**TINY), tiny_data)


def test_the_learning_rate_warms_up_linearly() -> None:
    from bnn_course.train import learning_rate

    config = TrainConfig(lr=0.1, schedule="constant", lr_warmup_epochs=1)
    assert [learning_rate(config, s, 100, warmup_steps=4) for s in range(6)] == \
        pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_the_epoch_line_names_the_kl_term_as_it_enters_the_loss(tiny_data) -> None:
    lines = []
    train(TrainConfig(epochs=1, **TINY), tiny_data, log=lines.append)
    train(TrainConfig(epochs=1, kl_scaling="unscaled", **TINY), tiny_data, log=lines.append)
    assert " kl/N " in lines[0] and " kl/N " not in lines[1] and " kl " in lines[1]


def test_a_checkpoint_of_another_recipe_is_set_aside_when_asked(tiny_data, tmp_path) -> None:
    from bnn_course.train import set_aside_other_data

    train(TrainConfig(epochs=1, **TINY), tiny_data, out_dir=tmp_path, log=quiet)
    changed = TrainConfig(epochs=1, **{**TINY, "lr": 0.01})
    assert set_aside_other_data(tmp_path, changed, tiny_data) is None  # only data by default
    log_only = TrainConfig(epochs=1, **{**TINY, "log_interval": 7})
    assert set_aside_other_data(tmp_path, log_only, tiny_data,
                                other_configuration=True) is None  # resumable
    aside = set_aside_other_data(tmp_path, changed, tiny_data, other_configuration=True)
    assert aside is not None and aside.name.startswith("checkpoint-other-run-")
    assert not (tmp_path / "checkpoint.pt").exists()
    train(changed, tiny_data, out_dir=tmp_path, resume=True, log=quiet)  # starts afresh
