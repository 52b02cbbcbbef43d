r"""IVON: Improved Variational Online Newton (Shen et al., ICML 2024), written from the paper.

IVON learns a mean-field Gaussian posterior :math:`q(\theta) = \mathcal{N}(m, \mathrm{diag}(
\sigma^2))` over the parameters of an ordinary network. It minimises the same variational
objective as Bayes by Backprop, per example,

.. math::

    \mathcal{L}(q) = \mathbb{E}_{q}\big[\bar\ell(\theta)\big]
        + \frac{1}{\lambda}\,\mathrm{KL}\big(q \,\|\, \mathcal{N}(0, (\lambda\delta)^{-1} I)\big),

(:math:`\bar\ell` the mean loss of a mini-batch, :math:`\lambda` the *effective sample size*,
usually the number :math:`N` of training examples, :math:`\delta` the weight decay, so the
prior precision is :math:`\lambda\delta`), but by natural-gradient steps. It keeps no
:math:`\sigma` parameter at all: :math:`\sigma` is read off an online estimate :math:`h` of the
expected diagonal Hessian, exactly as the optimum of the objective demands
(:math:`1/\sigma^2 = \lambda(\mathbb{E}_q[\nabla^2\bar\ell] + \delta)`). Algorithm 1 of the
paper, in the symbols of the code below (every operation elementwise):

.. math::

    &\theta = m + \sigma\odot\varepsilon,\ \varepsilon\sim\mathcal{N}(0, I)
      && \text{sample (``mc_samples`` times, then average)}\\
    &\hat g = \nabla\bar\ell(\theta), \quad \hat h = \hat g \odot (\theta - m)/\sigma^2
      && \text{gradient, and Hessian by the reparameterisation trick}\\
    &g \leftarrow \beta_1 g + (1-\beta_1)\hat g\\
    &h \leftarrow \beta_2 h + (1-\beta_2)\hat h + \tfrac12(1-\beta_2)^2
        \frac{(h-\hat h)^2}{h+\delta} && \text{keeps } h + \delta > 0\\
    &\bar g = g / (1 - \beta_1^t)\\
    &m \leftarrow m - \alpha_t\,\mathrm{clip}_\xi\Big(\frac{\bar g + \delta m}{h+\delta}\Big)
      && \text{elementwise clip to } [-\xi, \xi]\\
    &\sigma = 1/\sqrt{\lambda\,(h+\delta)}

starting from :math:`h = h_0` (``hess_init``), :math:`g = 0`, :math:`m` the network's initial
weights. As in the paper, the learning rate is rescaled by :math:`h_0 + \delta` (the first
steps are then plain momentum-SGD steps of size :math:`\alpha_t`), and the clip radius
:math:`\xi` (``clip_radius``) bounds each element's step, which the paper uses to keep early
training stable. The term :math:`\tfrac12(1-\beta_2)^2 (h-\hat h)^2/(h+\delta)` is the
Riemannian-gradient correction of Lin et al. (2020): with it :math:`h+\delta` stays positive
although :math:`\hat h` can be negative.

This is a ``torch.optim.Optimizer``: its whole state (:math:`g`, :math:`h` and the step count
per parameter) is in ``self.state``, so ``state_dict()`` / ``load_state_dict()`` checkpoint and
resume it exactly. The noise :math:`\varepsilon` comes from the global generator of the
parameters' device.

Use::

    optimizer = IVON(model.parameters(), lr=0.2, ess=len(train_set), hess_init=0.5)
    for x, y in batches:
        def closure():
            loss = F.nll_loss(model(x), y)   # the mean loss of the batch: no KL term
            loss.backward()
            return loss
        optimizer.step(closure)              # samples, averages, updates

    with optimizer.sampled_params():         # one posterior sample in the model
        prediction = model(x)
    sigma = optimizer.posterior_std()        # one tensor per parameter

(``ivon-opt``, the authors' package, is GPL-3.0; this module is written from the paper and
shares no code with it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bnn_course.posterior import gaussian_kl_divergence

HYPERPARAMETERS = ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius")


def _check_hyperparameters(values: dict[str, Any]) -> None:
    """A ``ValueError`` naming every hyperparameter outside its domain."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    checks = {
        "lr": (number(values["lr"]) and values["lr"] >= 0, "a finite number >= 0"),
        "ess": (number(values["ess"]) and values["ess"] > 0, "a finite number > 0"),
        "hess_init": (number(values["hess_init"]) and values["hess_init"] > 0,
                      "a finite number > 0"),
        "beta1": (number(values["beta1"]) and 0 <= values["beta1"] < 1, "in [0, 1)"),
        "beta2": (number(values["beta2"]) and 0 <= values["beta2"] < 1, "in [0, 1)"),
        "weight_decay": (number(values["weight_decay"]) and values["weight_decay"] > 0,
                         "a finite number > 0 (the prior precision per example)"),
        "clip_radius": (values["clip_radius"] is None
                        or (isinstance(values["clip_radius"], (int, float))
                            and values["clip_radius"] > 0), "None or a number > 0"),
    }
    problems = [f"{name}={values[name]!r} (must be {rule})"
                for name, (ok, rule) in checks.items() if not ok]
    if problems:
        raise ValueError("invalid IVON hyperparameters: " + "; ".join(problems))


class IVON(torch.optim.Optimizer):
    r"""Improved Variational Online Newton (Shen et al., 2024, Algorithm 1).

    Parameters
    ----------
    params:
        The network's parameters (or parameter groups); their values are the posterior
        means :math:`m`.
    lr:
        :math:`\alpha`, the learning rate of the means (rescaled by :math:`h_0 + \delta`).
    ess:
        :math:`\lambda`, the effective sample size: the number of training examples for the
        posterior (smaller values give a wider, "tempered" posterior).
    hess_init:
        :math:`h_0 > 0`; with it the initial :math:`\sigma = 1/\sqrt{\lambda(h_0+\delta)}`.
    beta1, beta2:
        Averaging rates of the gradient and of the Hessian estimate, in :math:`[0, 1)`.
    weight_decay:
        :math:`\delta > 0`: the prior is :math:`\mathcal{N}(0, (\lambda\delta)^{-1} I)`.
    clip_radius:
        :math:`\xi`: each element of the preconditioned step is clipped to
        :math:`[-\xi, \xi]` before it is multiplied by the learning rate; ``None``: no clip.
    mc_samples:
        Posterior samples per step whose gradients are averaged (:meth:`step` with a
        closure draws them).
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        ess: float,
        hess_init: float = 0.5,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        clip_radius: float | None = None,
        mc_samples: int = 1,
    ) -> None:
        defaults = {"lr": lr, "ess": ess, "hess_init": hess_init, "beta1": beta1,
                    "beta2": beta2, "weight_decay": weight_decay, "clip_radius": clip_radius}
        _check_hyperparameters(defaults)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        self.mc_samples = mc_samples
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyperparameters(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"IVON needs floating-point parameters, got {p.dtype}")
        self._sampling: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._accumulated = 0

    # ------------------------------------------------------------------ state

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of parameter ``p``, created on first use: ``momentum`` :math:`g = 0`,
        ``hess`` :math:`h = h_0`, ``step`` :math:`t = 0`."""
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hess"] = torch.full_like(p, float(group["hess_init"]),
                                            memory_format=torch.preserve_format)
            state["step"] = torch.zeros((), dtype=torch.float64)
        return state

    def _sigma(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        hess = self._state(p, group)["hess"]
        return torch.rsqrt(group["ess"] * (hess + group["weight_decay"]))

    @torch.no_grad()
    def posterior_std(self) -> list[torch.Tensor]:
        r""":math:`\sigma = 1/\sqrt{\lambda(h+\delta)}` of every parameter, in parameter
        order (a list of tensors shaped like the parameters)."""
        return [self._sigma(p, group) for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def kl_divergence(self) -> torch.Tensor:
        r""":math:`\mathrm{KL}(q \,\|\, p)` of the posterior to the prior
        :math:`\mathcal{N}(0, (\lambda\delta)^{-1} I)` of each group, summed over all
        parameters (closed form, :func:`~bnn_course.posterior.gaussian_kl_divergence`); a
        scalar in at least float32."""
        terms = [gaussian_kl_divergence(p.detach(), self._sigma(p, group), prior)
                 for group, prior in zip(self.param_groups, self.prior_std(), strict=True)
                 for p in group["params"]]
        return torch.stack(terms).sum()

    def prior_std(self) -> list[float]:
        r"""The prior's standard deviation :math:`1/\sqrt{\lambda\delta}` of each group."""
        return [1.0 / math.sqrt(g["ess"] * g["weight_decay"]) for g in self.param_groups]

    # ------------------------------------------------------------------ sampling

    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        r"""Put one posterior sample :math:`\theta = m + \sigma\odot\varepsilon` into the
        parameters for the duration of the ``with`` block, then restore :math:`m` exactly.

        With ``train=True`` the block must run a backward pass of the mean batch loss
        :math:`\bar\ell(\theta)`: on exit, :math:`\hat g` (the parameters' ``grad``) and
        :math:`\hat h = \hat g\odot\varepsilon/\sigma` are added to the step's running sums
        (:meth:`step` averages them). Gradients present on entry are discarded.
        """
        if self._sampling is not None:
            raise RuntimeError("IVON.sampled_params blocks cannot be nested")
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    sigma = self._sigma(p, group)
                    noise = torch.randn_like(p)
                    mean = p.detach().clone()
                    p.add_(sigma * noise)
                    saved.append((mean, noise, sigma))
                    if train:
                        p.grad = None
        self._sampling = saved
        try:
            yield
            if train:
                self._accumulate()
        finally:
            with torch.no_grad():
                params = [p for group in self.param_groups for p in group["params"]]
                for p, (mean, _, _) in zip(params, saved, strict=True):
                    p.copy_(mean)
            self._sampling = None

    @torch.no_grad()
    def _accumulate(self) -> None:
        assert self._sampling is not None
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        missing = [i for i, (p, _) in enumerate(params) if p.grad is None]
        if len(missing) == len(params):
            raise RuntimeError("IVON.sampled_params(train=True): no parameter received a "
                               "gradient; run loss.backward() inside the block")
        for (p, _), (_, noise, sigma) in zip(params, self._sampling, strict=True):
            state = self.state[p]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if "grad_sum" not in state or self._accumulated == 0:
                state["grad_sum"] = grad.clone()
                state["hess_sum"] = grad * noise / sigma
            else:
                state["grad_sum"].add_(grad)
                state["hess_sum"].addcmul_(grad, noise / sigma)
        self._accumulated += 1

    # ------------------------------------------------------------------ update

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One IVON update.

        With ``closure`` (which computes the mean batch loss and calls ``backward()``, no
        ``zero_grad`` needed): draws ``mc_samples`` posterior samples, runs the closure in
        each (:meth:`sampled_params` with ``train=True``) and returns the mean loss.
        Without: uses the samples accumulated by ``sampled_params(train=True)`` blocks
        since the last step (at least one).
        """
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure().detach())
            loss = torch.stack(losses).mean()
        if self._accumulated == 0:
            raise RuntimeError("IVON.step needs a closure or at least one "
                               "sampled_params(train=True) block before it")
        self._update(self._accumulated)
        self._accumulated = 0
        return loss

    @torch.no_grad()
    def _update(self, num_samples: int) -> None:
        for group in self.param_groups:
            lr, delta = group["lr"], group["weight_decay"]
            beta1, beta2, radius = group["beta1"], group["beta2"], group["clip_radius"]
            for p in group["params"]:
                state = self._state(p, group)
                grad = state.pop("grad_sum").div_(num_samples)
                hess_estimate = state.pop("hess_sum").div_(num_samples)
                momentum, hess = state["momentum"], state["hess"]
                state["step"] += 1
                momentum.mul_(beta1).add_(grad, alpha=1 - beta1)
                # h <- b2 h + (1 - b2) h_hat + (1 - b2)^2 (h - h_hat)^2 / (2 (h + delta))
                correction = (hess - hess_estimate).square_().div_(hess + delta)
                hess.mul_(beta2).add_(hess_estimate, alpha=1 - beta2)
                hess.add_(correction, alpha=0.5 * (1 - beta2) ** 2)
                bias_correction = 1 - beta1 ** float(state["step"])
                update = (momentum / bias_correction).add_(p, alpha=delta).div_(hess + delta)
                if radius is not None:
                    update.clamp_(-radius, radius)
                p.add_(update, alpha=-lr * (group["hess_init"] + delta))
