r"""Last-layer Laplace: a Gaussian posterior over the deterministic twin's output layer,
after training (Daxberger et al., 2021, with their library ``laplace-torch``).

The method, in the symbols of laplace-torch. The trained twin's last layer
(``classifier``, an ``nn.Linear`` :math:`\mathbb{R}^H \to \mathbb{R}^K`) has the parameters
:math:`\theta = (\mathrm{vec}(W), b) \in \mathbb{R}^P`, :math:`P = KH + K` (``vec`` row by
row, as ``parameters_to_vector``), taken as the MAP :math:`\theta_{\mathrm{MAP}}`; every
other weight stays fixed. With the features :math:`\phi(x) \in \mathbb{R}^H` (the input of
``classifier``) the logits are **linear** in :math:`\theta`:

.. math::

    f(x; \theta) = W \phi(x) + b = J(x)\, \theta, \qquad
    J(x) = [\, I_K \otimes \phi(x)^\top, \; I_K \,] \in \mathbb{R}^{K \times P}.

With a Gaussian prior :math:`\mathcal{N}(0, \delta^{-1} I)` and the categorical likelihood,
the Laplace approximation is :math:`q(\theta) = \mathcal{N}(\theta_{\mathrm{MAP}}, \Sigma)`,

.. math::

    \Sigma^{-1} = \sum_{n=1}^{N} J_n^\top \bigl(\mathrm{diag}(p_n) - p_n p_n^\top\bigr) J_n
    + \delta I, \qquad p_n = \mathrm{softmax}(f(x_n; \theta_{\mathrm{MAP}})),

the generalised Gauss-Newton (GGN) matrix plus the prior precision; ``hessian_structure``
says how the GGN is stored: ``"full"`` (:math:`P \times P`), ``"diag"`` (its diagonal) or
``"kron"`` (K-FAC: for the last layer exactly
:math:`\bigl(\sum_n \Lambda_n\bigr) \otimes \bigl(\frac1N \sum_n \phi_n \phi_n^\top\bigr)`
for :math:`W` and :math:`\sum_n \Lambda_n` for :math:`b`, no cross terms, with
:math:`\Lambda_n = \mathrm{diag}(p_n) - p_n p_n^\top`).
:math:`\delta` maximises the Laplace approximation of the log marginal likelihood
(``optimize_prior_precision(method="marglik")``),

.. math::

    \log p(\mathcal{D} \mid \delta) \approx \sum_n \log p(y_n \mid x_n, \theta_{\mathrm{MAP}})
    - \tfrac12 \Bigl[\log\det \Sigma^{-1} - P \log \delta
    + \delta \lVert\theta_{\mathrm{MAP}}\rVert^2\Bigr].

**Predictive.** Because :math:`f` is linear in :math:`\theta`, the GLM ("linearised")
predictive and the predictive of sampled last-layer weights are the same thing:
:math:`f(x) \sim \mathcal{N}(J(x)\theta_{\mathrm{MAP}}, J(x) \Sigma J(x)^\top)`.
:func:`laplace_sample_probs` draws :math:`S` weight vectors :math:`\theta_s \sim q` once
and returns :math:`\mathrm{softmax}(f(x_n; \theta_s))` for every image, the ``(S, N, K)``
``sample_probs`` of :mod:`bnn_course.comparison` (the same :math:`\theta_s` for every image,
as the Bayesian CNN's weight samples). :func:`laplace_probs` is the deterministic probit
approximation :math:`\mathrm{softmax}_k\bigl(\mu_k / \sqrt{1 + \tfrac{\pi}{8} v_{kk}}\bigr)`
with :math:`\mu = J\theta_{\mathrm{MAP}}`, :math:`v = J \Sigma J^\top`.

**What laplace-torch sees.** Given the twin itself, laplace-torch would call ``model(x)``,
i.e. ``forward(x, sample=True)`` (for a twin with dropout that is MC dropout, a different
network at every call; without dropout ``sample`` changes nothing), and would take the
twin's *output*, the log-probabilities :math:`\log p = f - \log\sum_k e^{f_k}`, for the
function it linearises, with the Jacobian of the last layer's output :math:`J`. The fit does
not mind: its loss is ``CrossEntropyLoss`` on the output, and cross-entropy of
log-probabilities equals that of logits (``log_softmax`` is idempotent); its GGN is taken
with respect to the output, and the cross-entropy Hessian there,
:math:`\mathrm{diag}(p) - p p^\top`, annihilates the all-ones direction that ``log_softmax``
adds, so the GGN is the same (``tests/test_laplace.py`` checks both). Sampled
predictives do not mind either (softmax ignores a constant per row). But the probit
approximation scales each class by its own factor and is *not* invariant to a constant per
row. So this module hands laplace-torch a view of the twin (:func:`logits_view`) that takes
the ``uint8`` images as stored by :mod:`bnn_course.data`, normalises them with
:func:`bnn_course.data.normalize` (as :func:`bnn_course.evaluation.predict_log_probs`
does), runs the twin's stages without dropout (as ``sample=False``) and returns the
``classifier``'s logits. The stages below the last layer run without autograd (last-layer
Laplace never differentiates through them), and :func:`fit_last_layer_laplace` runs them
once per training image: it computes the features :math:`\phi(x_n)` first and fits
laplace-torch on them (the view applies the classifier alone to features), since
laplace-torch's K-FAC back end would otherwise make two forward passes per batch.

laplace-torch 0.3 (MIT) installs with its curvature back ends (curvlinops, BackPACK,
ASDL/asdfghjkl, all MIT) beside torch 2.14.1; the default back end is curvlinops' GGN
(exact for ``"full"``, K-FAC type-2 for ``"kron"``). Importing it makes ASDL call
``torch.jit.script``, which torch 2.14 marks as deprecated with a ``FutureWarning``; that one
warning is silenced here. (``"full"`` makes curvlinops use forward-mode autodiff, whose first
use makes torch itself emit the same warning once; it is harmless.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from bnn_course.data import normalize
from bnn_course.evaluation import prediction_batch_size
from bnn_course.layers import preferred_memory_format
from bnn_course.models import CNNStack

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                            category=FutureWarning)
    from laplace import Laplace
    from laplace.baselaplace import ParametricLaplace

HESSIAN_STRUCTURES: tuple[str, ...] = ("kron", "diag", "full")
"""The GGN structures of laplace-torch's last-layer Laplace offered here."""

PRIOR_PRECISION_METHODS: tuple[str | None, ...] = ("marglik", None)
""":func:`fit_last_layer_laplace`'s choices: maximise the marginal likelihood, or keep the
given prior precision."""

LINK_APPROXIMATIONS: tuple[str, ...] = ("probit", "bridge", "bridge_norm")
"""Deterministic approximations of the GLM predictive of :func:`laplace_probs` (the Monte
Carlo one is :func:`laplace_sample_probs`)."""

CURVATURE_BATCH_SIZE = 8192
"""Features per curvature batch of laplace-torch's fit: the features are computed first, so
its batches cost only the last layer, and large ones amortise the back end's overhead
per batch (about 0.2 s on a CPU)."""

LAST_LAYER_NAME = "network.classifier"
"""The name of the twin's last layer inside :func:`logits_view`."""


class _Logits(nn.Module):
    """The network as laplace-torch sees it (:func:`logits_view`)."""

    def __init__(self, network: CNNStack) -> None:
        super().__init__()
        self.network = network

    @torch.no_grad()  # last-layer Laplace needs no gradient below the last layer
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's input ``(B, H)`` for ``uint8`` images ``(B, C, S, S)``."""
        x = normalize(images).to(self.network.classifier.weight.dtype)
        self.network.check_input(x)
        x = x.contiguous(memory_format=preferred_memory_format(x.device))
        for stage in self.network.stages()[:-1]:
            if not isinstance(stage, nn.Dropout):  # as sample=False: no dropout
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.features(x)
        elif not (x.is_floating_point() and x.dim() == 2):
            raise ValueError(f"expected uint8 images (B, C, S, S) or features (B, H), got "
                             f"{x.dtype} {tuple(x.shape)}")
        classifier = self.network.classifier
        return classifier(x.to(classifier.weight.dtype))


def logits_view(network: nn.Module) -> nn.Module:
    r"""A module that maps ``uint8`` images ``(B, C, S, S)`` to the network's logits ``(B, K)``.

    It normalises with :func:`bnn_course.data.normalize`, runs ``network.stages()`` without
    the dropout stages and returns the output of ``network.classifier``, so that
    ``log_softmax(view(images)) == network(normalize(images), sample=False)``. Given
    floating-point features ``(B, H)`` (the classifier's input, ``view.features(images)``)
    instead, it applies the classifier alone: :func:`fit_last_layer_laplace` computes the
    training features once and lets laplace-torch fit on them. The network is shared, not
    copied; the last layer is registered as :data:`LAST_LAYER_NAME`.

    Raises
    ------
    ValueError
        Unless ``network`` is a :class:`~bnn_course.models.CNNStack` without Bayesian
        layers (the deterministic twin) whose last stage is its ``nn.Linear`` classifier.
    """
    if not isinstance(network, CNNStack):
        raise ValueError(f"expected a DeterministicCNN (a CNNStack), got "
                         f"{type(network).__name__}")
    if network.bayesian_layers():
        raise ValueError("last-layer Laplace is for the deterministic twin; this network "
                         "has Bayesian layers")
    if not isinstance(network.classifier, nn.Linear) or \
            network.stages()[-1] is not network.classifier:
        raise ValueError("the network's last stage must be its nn.Linear `classifier`")
    return _Logits(network)


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or \
            images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else None
        dtype = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be uint8 (N >= 1, C, H, W) as stored by "
                         f"bnn_course.data, got {dtype} {shape}")


def _check_batch_size(batch_size: int | None, device: torch.device) -> int:
    if batch_size is None:
        return prediction_batch_size(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class _BatchSlices(Sampler):
    """``slice(start, start + batch_size)`` over ``0..n-1``: a ``TensorDataset`` indexed
    with it returns whole batches (views), without a Python loop over the images."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size

    def __iter__(self) -> Iterator[slice]:
        return (slice(start, start + self.batch_size)
                for start in range(0, self.n, self.batch_size))

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def _batches(images: torch.Tensor, batch_size: int, device: torch.device
             ) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size].to(device)


def _device_of(la: ParametricLaplace) -> torch.device:
    if not isinstance(la, ParametricLaplace) or getattr(la, "n_data", 0) == 0 or \
            getattr(la.model, "last_layer", None) is None:
        raise ValueError("expected a fitted laplace-torch object from fit_last_layer_laplace")
    return la.model.last_layer.weight.device


def fit_last_layer_laplace(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    hessian_structure: str = "kron",
    batch_size: int | None = None,
    prior_precision_method: str | None = "marglik",
    prior_precision: float = 1.0,
    marglik_steps: int = 300,
) -> ParametricLaplace:
    r"""``Laplace(model, "classification", subset_of_weights="last_layer",
    hessian_structure=...)``, fitted on the training set, with its prior precision chosen.

    Parameters
    ----------
    model:
        The trained deterministic twin (:class:`~bnn_course.models.DeterministicCNN`);
        laplace-torch deep-copies it (through :func:`logits_view`), so later changes to
        ``model`` do not reach the returned object.
    images, labels:
        The training set as stored by :mod:`bnn_course.data`: ``uint8`` ``(N, 3, 32, 32)``
        and ``(N,)`` integer labels in ``0..K-1``, on any device (moved to the model's
        device batch by batch).
    hessian_structure:
        ``"kron"`` (K-FAC, the default), ``"diag"`` or ``"full"`` (:math:`P \times P`).
        For the default twin (:math:`P = 2570`) ``"full"`` is slow with ``"marglik"``:
        every Adam step takes a :math:`P \times P` log-determinant (about 2 s on a shared
        2-core CPU), where ``"kron"`` and ``"diag"`` take milliseconds; ``"full"`` is meant
        for small last layers.
    batch_size:
        Images per forward pass; ``None``:
        :func:`~bnn_course.evaluation.prediction_batch_size` of the model's device. The
        curvature is then summed over batches of :data:`CURVATURE_BATCH_SIZE` features
        (for ``"kron"`` each Kronecker factor over all batches); neither batch size changes
        the result beyond rounding.
    prior_precision_method:
        ``"marglik"``: maximise the log marginal likelihood over a scalar :math:`\delta`
        (``optimize_prior_precision(method="marglik")``, Adam on :math:`\log\delta` from
        ``prior_precision``, ``marglik_steps`` steps); ``None``: keep ``prior_precision``.
    prior_precision:
        :math:`\delta > 0`: the starting value for ``"marglik"``, or the value kept.
    marglik_steps:
        Adam steps (learning rate 0.1 on :math:`\log\delta`, laplace-torch's default);
        laplace-torch's default of 100 moves :math:`\log\delta` by at most about 10.

    Returns
    -------
    The fitted laplace-torch object (a ``ParametricLaplace``). ``la.prior_precision`` is the
    chosen :math:`\delta` (a tensor of shape ``(1,)``), ``la.log_marginal_likelihood()``
    its value, ``la.posterior_precision`` :math:`\Sigma^{-1}`; :func:`laplace_summary`
    collects them as numbers.
    """
    view = logits_view(model)
    if hessian_structure not in HESSIAN_STRUCTURES:
        raise ValueError(f"hessian_structure must be one of {HESSIAN_STRUCTURES}, got "
                         f"{hessian_structure!r}")
    if prior_precision_method not in PRIOR_PRECISION_METHODS:
        raise ValueError(f"prior_precision_method must be one of {PRIOR_PRECISION_METHODS}, "
                         f"got {prior_precision_method!r}")
    if isinstance(prior_precision, bool) or not isinstance(prior_precision, (int, float)) \
            or not (math.isfinite(prior_precision) and prior_precision > 0):
        raise ValueError(f"prior_precision must be positive and finite, got "
                         f"{prior_precision!r}")
    if isinstance(marglik_steps, bool) or not isinstance(marglik_steps, int) or \
            marglik_steps < 1:
        raise ValueError(f"marglik_steps must be a positive int, got {marglik_steps!r}")
    _check_images(images)
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1] or \
            labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer (N,) = ({images.shape[0]},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    num_classes = model.classifier.out_features
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got values from "
                         f"{labels.min().item()} to {labels.max().item()}")
    device = model.classifier.weight.device
    batch_size = _check_batch_size(batch_size, device)

    features = torch.cat([view.features(x) for x in _batches(images, batch_size, device)])
    la = Laplace(view, "classification", subset_of_weights="last_layer",
                 hessian_structure=hessian_structure, last_layer_name=LAST_LAYER_NAME,
                 prior_precision=float(prior_precision))
    dataset = TensorDataset(features, labels.to(device, torch.int64))
    loader = DataLoader(dataset, batch_size=None,
                        sampler=_BatchSlices(len(dataset), CURVATURE_BATCH_SIZE))
    la.fit(loader)
    if prior_precision_method == "marglik":
        with warnings.catch_warnings():  # "By default `link_approx` is `probit`...": n/a
            warnings.filterwarnings("ignore", message=".*link_approx.*")
            la.optimize_prior_precision(method="marglik", pred_type="glm",
                                        prior_structure="scalar", n_steps=marglik_steps,
                                        init_prior_prec=float(prior_precision))
    return la


def laplace_summary(la: ParametricLaplace) -> dict[str, float | int | str]:
    """The numbers a notebook prints about a fitted last-layer Laplace.

    Keys: ``prior_precision`` (:math:`\\delta`), ``log_marginal_likelihood`` (at it),
    ``num_parameters`` (:math:`P`), ``num_data`` (:math:`N`), ``hessian_structure``.
    """
    _device_of(la)
    with torch.no_grad():
        log_marglik = la.log_marginal_likelihood().item()
    structure = {"FullLLLaplace": "full", "KronLLLaplace": "kron", "DiagLLLaplace": "diag"}
    return {
        "prior_precision": la.prior_precision.item(),
        "log_marginal_likelihood": log_marglik,
        "num_parameters": int(la.n_params),
        "num_data": int(la.n_data),
        "hessian_structure": structure.get(type(la).__name__, type(la).__name__),
    }


@torch.no_grad()
def laplace_sample_probs(
    la: ParametricLaplace,
    images: torch.Tensor,
    num_samples: int,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Class probabilities ``(S, N, K)`` of :math:`S` last-layer weight samples
    :math:`\theta_s \sim \mathcal{N}(\theta_{\mathrm{MAP}}, \Sigma)`.

    ``probs[s, n] = softmax(W_s \phi(x_n) + b_s)``: the GLM predictive, exactly (the logits
    are linear in :math:`\theta`; module docstring). The :math:`S` samples are drawn once
    (``la.sample``) and shared by all images; the features :math:`\phi` are computed once
    per batch and the :math:`S` logits in one ``einsum``.

    Parameters
    ----------
    la:
        From :func:`fit_last_layer_laplace`.
    images:
        ``uint8`` ``(N, 3, 32, 32)``, any device (moved to the model's device batch by batch).
    num_samples:
        :math:`S \ge 1`.
    batch_size:
        Images per forward pass; ``None``: ``prediction_batch_size`` of the model's device.
    generator:
        For the weight samples; must live on the model's device. ``None``: the global
        generator of that device.

    Returns
    -------
    float32 ``(S, N, K)`` on the model's device, each row summing to one: the input of
    :mod:`bnn_course.uncertainty` and :func:`bnn_course.comparison.summary_metrics`.
    """
    device = _device_of(la)
    _check_images(images)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    batch_size = _check_batch_size(batch_size, device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}")
    layer = la.model.last_layer
    num_classes, num_features = layer.weight.shape
    theta = la.sample(num_samples, generator=generator)  # (S, P)
    weights = theta[:, :num_classes * num_features].reshape(num_samples, num_classes,
                                                           num_features)
    biases = (theta[:, num_classes * num_features:] if layer.bias is not None
              else theta.new_zeros(num_samples, num_classes))
    was_training = la.model.training
    la.model.eval()
    probs = []
    try:
        for x in _batches(images, batch_size, device):
            _, features = la.model.forward_with_features(x)  # (B, H)
            logits = torch.einsum("bh,skh->sbk", features.to(weights.dtype), weights)
            probs.append(torch.softmax((logits + biases[:, None, :]).float(), dim=-1))
    finally:
        la.model.train(was_training)
    return torch.cat(probs, dim=1)


@torch.no_grad()
def laplace_probs(
    la: ParametricLaplace,
    images: torch.Tensor,
    *,
    batch_size: int | None = None,
    link_approx: str = "probit",
) -> torch.Tensor:
    r"""The deterministic GLM predictive ``(N, K)``: ``la(x, pred_type="glm", link_approx=...)``.

    ``"probit"``: :math:`\mathrm{softmax}_k\bigl(\mu_k / \sqrt{1 + \tfrac{\pi}{8}
    v_{kk}}\bigr)` (module docstring); ``"bridge"``, ``"bridge_norm"``: laplace-torch's
    Laplace bridge. ``images`` ``uint8`` ``(N, 3, 32, 32)``; float32 on the model's device,
    rows summing to one.
    """
    device = _device_of(la)
    _check_images(images)
    if link_approx not in LINK_APPROXIMATIONS:
        raise ValueError(f"link_approx must be one of {LINK_APPROXIMATIONS}, got "
                         f"{link_approx!r}")
    batch_size = _check_batch_size(batch_size, device)
    was_training = la.model.training
    la.model.eval()
    try:
        probs = [la(x, pred_type="glm", link_approx=link_approx).float()
                 for x in _batches(images, batch_size, device)]
    finally:
        la.model.train(was_training)
    return torch.cat(probs)
