r"""A model whose best mean-field posterior is known: Bayesian linear regression.

Before we ask whether a variational learner found a good posterior for a CNN, we ask it on a
problem where the answer is known in closed form. Take :math:`N` examples
:math:`(x_n, y_n)`, :math:`x_n \in \mathbb{R}^d`, the likelihood
:math:`y_n \sim \mathcal{N}(x_n^\top w, \sigma_n^2)` with **known** noise :math:`\sigma_n`,
and the prior :math:`w \sim \mathcal{N}(0, s^2 I)`. The exact posterior is Gaussian,

.. math::

    p(w \mid \mathcal{D}) = \mathcal{N}(\mu^\star, \Lambda^{-1}), \qquad
    \Lambda = \frac{X^\top X}{\sigma_n^2} + \frac{I}{s^2}, \qquad
    \mu^\star = \Lambda^{-1} \frac{X^\top y}{\sigma_n^2},

and the best *mean-field* Gaussian :math:`q(w) = \prod_i \mathcal{N}(\mu_i, \sigma_i^2)`,
the maximiser of the ELBO (the minimiser of :math:`\mathrm{KL}(q \,\|\, p(w \mid
\mathcal{D}))`), has

.. math::

    \mu_i = \mu^\star_i, \qquad \sigma_i^2 = 1 / \Lambda_{ii}

(Bishop 2006, section 10.1.2): the exact means, and variances that ignore the correlations
(smaller than the exact marginal variances :math:`(\Lambda^{-1})_{ii}` whenever features are
correlated). So we can measure how far a learner is from the optimum of its own objective,
weight by weight.

:func:`fit_bbb` trains the book's own Flipout dense layer with Adam on the per-example
negative ELBO (the engine's optimiser, :func:`bnn_course.train.build_optimizer`, and
schedule, :func:`bnn_course.train.learning_rate`); :func:`fit_ivon` trains ``nn.Linear``'s
weights with :class:`bnn_course.ivon.IVON`. Both record the distance to the optimum
(:func:`distance_to_optimum`) as they go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from bnn_course.elbo import gaussian_nll, negative_elbo
from bnn_course.ivon import IVON
from bnn_course.layers import BayesianDenseFlipout


@dataclass(frozen=True)
class LinearRegressionProblem:
    """A data set for Bayesian linear regression with known noise and an isotropic prior."""

    inputs: torch.Tensor
    """(N, d) float64."""
    targets: torch.Tensor
    """(N,) float64."""
    noise_std: float
    r""":math:`\sigma_n`, the known standard deviation of the noise."""
    prior_std: float
    """:math:`s`, the prior is :math:`\\mathcal{N}(0, s^2 I)`."""

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.inputs.shape[1])


def make_problem(num_examples: int = 1000, num_features: int = 8, *, noise_std: float = 1.0,
                 prior_std: float = 1.0, correlation: float = 0.6,
                 feature_scales: tuple[float, float] = (0.02, 1.0),
                 seed: int = 0) -> LinearRegressionProblem:
    r"""A regression problem whose optimal posterior widths span two orders of magnitude.

    Features are jointly Gaussian with pairwise correlation ``correlation`` (so the
    mean-field optimum differs from the exact marginals), scaled from ``feature_scales[0]``
    to ``feature_scales[1]`` (log-spaced): a feature with a small scale constrains its
    weight little, so its optimal :math:`\sigma_i` is close to the prior's, while a large
    scale pins its weight down. True weights are drawn from the prior, targets from the
    likelihood. Everything in float64, from a CPU generator seeded with ``seed``.
    """
    if num_examples < 2 or num_features < 1:
        raise ValueError(f"need num_examples >= 2 and num_features >= 1, got "
                         f"{num_examples} and {num_features}")
    if not (0 <= correlation < 1):
        raise ValueError(f"correlation must be in [0, 1), got {correlation}")
    if not (noise_std > 0 and prior_std > 0 and 0 < feature_scales[0] <= feature_scales[1]):
        raise ValueError("noise_std, prior_std and the feature scales must be positive "
                         "(feature_scales increasing)")
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(num_examples, 1, generator=generator, dtype=torch.float64)
    own = torch.randn(num_examples, num_features, generator=generator, dtype=torch.float64)
    standard = math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * own
    scales = torch.logspace(math.log10(feature_scales[0]), math.log10(feature_scales[1]),
                            num_features, dtype=torch.float64)
    inputs = standard * scales
    weights = prior_std * torch.randn(num_features, generator=generator, dtype=torch.float64)
    targets = inputs @ weights + noise_std * torch.randn(num_examples, generator=generator,
                                                         dtype=torch.float64)
    return LinearRegressionProblem(inputs, targets, float(noise_std), float(prior_std))


def exact_posterior(problem: LinearRegressionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The exact posterior :math:`\mathcal{N}(\mu^\star, \Lambda^{-1})`: returns
    ``(mean (d,), precision (d, d))``, float64."""
    x, y = problem.inputs, problem.targets
    precision = x.T @ x / problem.noise_std**2 + torch.eye(
        problem.num_features, dtype=x.dtype) / problem.prior_std**2
    mean = torch.linalg.solve(precision, x.T @ y / problem.noise_std**2)
    return mean, precision


def mean_field_optimum(problem: LinearRegressionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ELBO's maximiser among mean-field Gaussians: ``(mean, std)``, each (d,), with
    mean :math:`\mu^\star` and :math:`\sigma_i = \Lambda_{ii}^{-1/2}`."""
    mean, precision = exact_posterior(problem)
    return mean, precision.diagonal().rsqrt()


def distance_to_optimum(mean: torch.Tensor, std: torch.Tensor,
                        optimum: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    r"""How far ``(mean, std)`` (each (d,)) is from the mean-field ``optimum``.

    * ``sigma_error``: :math:`\max_i |\sigma_i / \sigma^\star_i - 1|`, the worst relative
      error of a width (0.05: every :math:`\sigma_i` within 5%);
    * ``log_sigma_error``: :math:`\max_i |\log\sigma_i - \log\sigma^\star_i|`;
    * ``mean_error``: :math:`\max_i |\mu_i - \mu^\star_i| / \sigma^\star_i`, the worst error
      of a mean in units of its optimal width.
    """
    best_mean, best_std = optimum
    mean, std = mean.detach().double().reshape(-1), std.detach().double().reshape(-1)
    if mean.shape != best_mean.shape or std.shape != best_std.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must match the "
                         f"optimum's {tuple(best_mean.shape)}")
    return {"sigma_error": (std / best_std - 1).abs().max().item(),
            "log_sigma_error": (std.log() - best_std.log()).abs().max().item(),
            "mean_error": ((mean - best_mean).abs() / best_std).max().item()}


@dataclass
class Trajectory:
    """What a learner did: the distance to the optimum every ``record_every`` steps."""

    name: str
    steps: list[int] = field(default_factory=list)
    sigma_error: list[float] = field(default_factory=list)
    log_sigma_error: list[float] = field(default_factory=list)
    mean_error: list[float] = field(default_factory=list)
    mean: torch.Tensor | None = None
    """The final means (d,)."""
    std: torch.Tensor | None = None
    """The final standard deviations (d,)."""

    def record(self, step: int, distance: dict[str, float]) -> None:
        self.steps.append(step)
        for key in ("sigma_error", "log_sigma_error", "mean_error"):
            getattr(self, key).append(distance[key])

    @property
    def final(self) -> dict[str, float]:
        """The last recorded distances."""
        return {"sigma_error": self.sigma_error[-1],
                "log_sigma_error": self.log_sigma_error[-1],
                "mean_error": self.mean_error[-1]}


def _batches(problem: LinearRegressionProblem, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches ``(x, y)`` of ``problem``."""
    n = problem.num_examples
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield problem.inputs[index], problem.targets[index]


def _check_run(steps: int, batch_size: int, record_every: int,
               problem: LinearRegressionProblem) -> None:
    if steps < 1 or record_every < 1 or not (1 <= batch_size <= problem.num_examples):
        raise ValueError(f"need steps >= 1, record_every >= 1 and 1 <= batch_size <= N, got "
                         f"{steps}, {record_every} and {batch_size}")


def _scheduled(lr: float, schedule: str, step: int, steps: int) -> float:
    from bnn_course.train import SCHEDULES

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


def fit_bbb(problem: LinearRegressionProblem, *, steps: int, lr: float = 1e-3,
            init_log_sigma: float = -5.0, sigma_lr_factor: float = 1.0,
            schedule: str = "cosine", batch_size: int = 100, record_every: int = 50,
            seed: int = 0, name: str = "Adam-BBB") -> Trajectory:
    r"""Bayes by Backprop with Adam, as the book trains the BayesianCNN, on ``problem``.

    The model is the book's :class:`~bnn_course.layers.BayesianDenseFlipout` (``d -> 1``,
    no bias, prior :math:`\mathcal{N}(0, s^2)`, float64) with means starting at 0 and every
    :math:`\log\sigma` at ``init_log_sigma``; the loss of a step is the per-example negative
    ELBO (:func:`~bnn_course.elbo.negative_elbo`: the mini-batch's mean Gaussian NLL under a
    Flipout sample plus KL/N); Adam with the engine's parameter groups (``sigma_lr_factor``)
    and schedule (cosine to 0, or constant).
    """
    _check_run(steps, batch_size, record_every, problem)
    from bnn_course.train import TrainConfig, build_optimizer

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    layer = BayesianDenseFlipout(problem.num_features, 1, bias=False,
                                 prior_sigma=problem.prior_std,
                                 init_log_sigma=init_log_sigma, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_posterior.mu.zero_()
    optimizer = build_optimizer(layer, TrainConfig(lr=lr, sigma_lr_factor=sigma_lr_factor))
    optimum = mean_field_optimum(problem)
    trajectory = Trajectory(name)
    batches = _batches(problem, batch_size, generator)

    def measure(step: int) -> None:
        trajectory.record(step, distance_to_optimum(layer.weight_mu[0], layer.weight_sigma[0],
                                                    optimum))

    measure(0)
    for step in range(steps):
        scheduled = _scheduled(lr, schedule, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = scheduled * group["lr_factor"]
        x, y = next(batches)
        nll = gaussian_nll(layer(x).squeeze(-1), y, problem.noise_std)
        loss = negative_elbo(nll, layer.kl_divergence(), problem.num_examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % record_every == 0 or step + 1 == steps:
            measure(step + 1)
    trajectory.mean = layer.weight_mu[0].detach().clone()
    trajectory.std = layer.weight_sigma[0].detach().clone()
    return trajectory


def fit_ivon(problem: LinearRegressionProblem, *, steps: int, lr: float = 1.0,
             hess_init: float = 0.5, beta1: float = 0.9, beta2: float = 0.999,
             clip_radius: float | None = None, mc_samples: int = 1,
             schedule: str = "cosine", batch_size: int = 100, record_every: int = 50,
             seed: int = 0, name: str = "IVON") -> Trajectory:
    r""":class:`~bnn_course.ivon.IVON` on ``problem``, for the same posterior as
    :func:`fit_bbb`.

    ``nn.Linear(d, 1, bias=False)`` in float64, means starting at 0; effective sample size
    :math:`\lambda = N` and weight decay :math:`\delta = 1/(N s^2)`, so IVON's prior
    :math:`\mathcal{N}(0, (\lambda\delta)^{-1})` is the problem's; the Hessian starts at
    ``hess_init`` (every :math:`\sigma` at :math:`1/\sqrt{N(h_0 + \delta)}`); the loss of a
    step is the mini-batch's mean Gaussian NLL (IVON adds the prior itself). The means move
    by :math:`\alpha (h_0 + \delta)` times a Newton step, so ``lr`` times ``hess_init`` must
    stay well below 2.
    """
    _check_run(steps, batch_size, record_every, problem)
    n = problem.num_examples
    weight_decay = 1.0 / (n * problem.prior_std**2)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(problem.num_features, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = IVON(model.parameters(), lr=lr, ess=n, hess_init=hess_init, beta1=beta1,
                     beta2=beta2, weight_decay=weight_decay, clip_radius=clip_radius,
                     mc_samples=mc_samples)
    optimum = mean_field_optimum(problem)
    trajectory = Trajectory(name)
    batches = _batches(problem, batch_size, generator)

    def measure(step: int) -> None:
        trajectory.record(step, distance_to_optimum(
            model.weight[0], optimizer.posterior_std()[0][0], optimum))

    measure(0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _scheduled(lr, schedule, step, steps)
        x, y = next(batches)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = gaussian_nll(model(x).squeeze(-1), y, problem.noise_std)
            loss.backward()
            return loss

        optimizer.step(closure)
        if (step + 1) % record_every == 0 or step + 1 == steps:
            measure(step + 1)
    trajectory.mean = model.weight[0].detach().clone()
    trajectory.std = optimizer.posterior_std()[0][0].detach().clone()
    return trajectory


REGRESSION_LEARNERS: dict[str, dict[str, float | int | str]] = {
    "book's recipe": {"algorithm": "Adam-BBB", "lr": 1e-3, "init_log_sigma": -5.0,
                      "sigma_lr_factor": 1.0, "schedule": "cosine"},
    "sigma-aware": {"algorithm": "Adam-BBB", "lr": 1e-3, "init_log_sigma": -5.0,
                    "sigma_lr_factor": 10.0, "schedule": "cosine"},
    "IVON": {"algorithm": "IVON", "lr": 1.0, "hess_init": 0.5, "beta2": 0.999,
             "mc_samples": 4, "schedule": "cosine"},
}
"""The three learners of chapter 9's ground truth and their settings: the book's recipe
(chapter 6's Adam-BBB), the same with the sigma parameters at ten times the learning rate,
and IVON (the means move half a Newton step at first, ``lr * hess_init = 0.5``; the
Hessian average forgets its start at ``beta2 = 0.999``, i.e. ``e^{-10}`` after 10,000 steps,
and averages 4 samples per step)."""


def fit_learners(problem: LinearRegressionProblem, steps: int, record_every: int = 100,
                 seed: int = 0) -> dict[str, Trajectory]:
    """Run every learner of :data:`REGRESSION_LEARNERS` on ``problem`` for ``steps`` steps
    (mini-batches of 100, or all examples if fewer), by name."""
    batch = min(100, problem.num_examples)
    trajectories = {}
    for name, settings in REGRESSION_LEARNERS.items():
        options = {k: v for k, v in settings.items() if k != "algorithm"}
        fit = fit_bbb if settings["algorithm"] == "Adam-BBB" else fit_ivon
        trajectories[name] = fit(problem, steps=steps, batch_size=batch,
                                 record_every=record_every, seed=seed, name=name, **options)
    return trajectories


def cosine_rates(steps: int) -> list[float]:
    """The cosine schedule's factors of the learning rate, step by step: their sum times
    ``lr`` bounds how far Adam can move a parameter over ``steps`` steps."""
    return [_scheduled(1.0, "cosine", step, steps) for step in range(steps)]
