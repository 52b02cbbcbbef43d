r"""The BayesianCNN: Flipout convolutions for features, Flipout dense layers to classify.

Default architecture for 32x32 RGB images (CIFAR-10), the "seed-sized" network of the book::

    [conv3x3(3->32), ReLU, conv3x3(32->32), ReLU, maxpool2]      32x32 -> 16x16
    [conv3x3(32->64), ReLU, conv3x3(64->64), ReLU, maxpool2]     16x16 ->  8x8
    [conv3x3(64->128), ReLU, conv3x3(128->128), ReLU, maxpool2]   8x8  ->  4x4
    flatten (2048) -> dense(2048->256), ReLU -> dense(256->10) -> log-softmax

Every convolution and dense layer is Bayesian (weights and biases Gaussian). The output is
log-probabilities, so the negative log-likelihood of a label is ``-output[label]``
(``F.nll_loss``).

The layout is written once, in :class:`CNNStack`, which takes the layers from two factories
``conv(in_channels, out_channels)`` and ``dense(in_features, out_features)``:
:class:`BayesianCNN` passes Flipout layers, :class:`DeterministicCNN` ``nn.Conv2d`` and
``nn.Linear``, the benchmark bayesian-torch's Flipout layers, and
:func:`bnn_course.inspection.deterministic_twin` copies the stages of a trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.layers import (
    BayesianConv2dFlipout,
    BayesianDenseFlipout,
    BayesianLayer,
    bayesian_layers,
    draw_flipout_noise,
    summed_kl_divergence,
)

LayerFactory = Callable[[int, int], nn.Module]
"""``factory(in, out)``: a conv (3x3, padding 1) or dense layer with those widths."""


def _check_channels(channels: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(channels)
    if not widths or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                         for c in widths):
        raise ValueError(f"channels must be a non-empty sequence of positive ints (one per "
                         f"block of two convolutions), got {channels!r}")
    return widths


def flat_feature_count(image_size: int, channels: Sequence[int]) -> int:
    """Features after the convolution blocks: ``channels[-1] * (image_size / 2**blocks)**2``.

    Each block of two 3x3 convolutions ends with a 2x2 max pool, so ``image_size`` must be
    divisible by ``2 ** len(channels)``, and ``channels`` must not be empty; a
    ``ValueError`` says so otherwise.
    """
    widths = _check_channels(channels)
    downsampling = 2 ** len(widths)
    if image_size < 1 or image_size % downsampling:
        raise ValueError(f"image_size ({image_size}) must be a positive multiple of "
                         f"2**len(channels) = {downsampling} (divisible)")
    return widths[-1] * (image_size // downsampling) ** 2


class CNNStack(nn.Module):
    r"""The book's CNN layout, with its layers made by two factories.

    For ``channels = (c_1, ..., c_L)``, in call order::

        [conv(c_{l-1}, c_l), ReLU, conv(c_l, c_l), ReLU, MaxPool2d(2)]   l = 1..L, c_0 = C
        Flatten, [Dropout], dense(F, hidden), ReLU, [Dropout], dense(hidden, K)

    (each block followed by ``[Dropout(conv_dropout)]``) with :math:`F = c_L (S / 2^L)^2`
    features (:func:`flat_feature_count`) and the dropout stages only for a probability
    above 0. The layers are registered as ``convs`` (a
    ``ModuleList``), ``hidden`` and ``classifier``; ReLU, pooling, flatten and dropout are
    stateless and not registered (they have no parameters, and :meth:`stages` lists them).

    Parameters
    ----------
    conv, dense:
        Layer factories ``conv(in_channels, out_channels)`` (a 3x3 convolution with padding
        1, which keeps the spatial size) and ``dense(in_features, out_features)``.
    num_classes, in_channels, image_size, channels, hidden_features:
        :math:`K`, :math:`C`, :math:`S` (square images, divisible by :math:`2^L`),
        :math:`(c_1, \ldots, c_L)` (non-empty) and the hidden width.
    dropout:
        Probability of the dropout stages before the two dense layers; 0 leaves them out.
    conv_dropout:
        Probability of a dropout stage after every block of two convolutions (after its
        pooling); 0 (the default) leaves them out.
    """

    def __init__(
        self,
        conv: LayerFactory,
        dense: LayerFactory,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        channels: Sequence[int],
        hidden_features: int,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("hidden_features", hidden_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= conv_dropout < 1.0:
            raise ValueError(f"conv_dropout must be in [0, 1), got {conv_dropout}")
        flat_features = flat_feature_count(image_size, channels)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.dropout = float(dropout)
        self.conv_dropout = float(conv_dropout)
        convs: list[nn.Module] = []
        previous = self.in_channels
        for width in _check_channels(channels):
            convs += [conv(previous, width), conv(width, width)]
            previous = width
        self.convs = nn.ModuleList(convs)
        self.hidden = dense(flat_features, hidden_features)
        self.classifier = dense(hidden_features, num_classes)

        stages: list[nn.Module] = []
        for index, layer in enumerate(self.convs):
            stages += [layer, nn.ReLU()]
            if index % 2 == 1:  # end of a block of two convolutions
                stages.append(nn.MaxPool2d(2))
                if self.conv_dropout > 0:
                    stages.append(nn.Dropout(self.conv_dropout))
        stages.append(nn.Flatten(1))
        for layer, activation in ((self.hidden, nn.ReLU()), (self.classifier, None)):
            if self.dropout > 0:
                stages.append(nn.Dropout(self.dropout))
            stages.append(layer)
            if activation is not None:
                stages.append(activation)
        # A plain tuple: the layers are registered above, the rest has no state.
        self._stages = tuple(stages)

    def stages(self) -> tuple[nn.Module, ...]:
        """Every stage in call order: the layers and the ReLU, pooling, flatten (dropout)."""
        return self._stages

    def layers(self) -> list[nn.Module]:
        """The convolutions, the hidden and the output layer, input to output."""
        return [*self.convs, self.hidden, self.classifier]

    def check_input(self, x: torch.Tensor) -> None:
        """A ``ValueError`` naming the expected shape and dtype unless ``x`` fits."""
        expected = (self.in_channels, self.image_size, self.image_size)
        shape = f"(batch, {expected[0]}, {expected[1]}, {expected[2]})"
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects images of shape {shape}, got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects floating-point images of shape "
                             f"{shape}, got {x.dtype} (normalise uint8 images first, e.g. "
                             "with bnn_course.data.normalize)")

    def run_stages(
        self, x: torch.Tensor, call: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The log-probabilities (B, num_classes) of ``x = call(stage, x)`` over the stages.

        The log-softmax is taken in at least float32 (float64 for a float64 network), also
        when the logits come out of a bfloat16 autocast region.
        """
        for stage in self._stages:
            x = call(stage, x)
        return F.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


class BayesianCNN(CNNStack):
    """A convolutional classifier whose every weight and bias is a Gaussian.

    Parameters
    ----------
    num_classes:
        Number of output classes.
    in_channels:
        Channels of the input images.
    image_size:
        Height and width of the (square) input images; must be divisible by
        ``2 ** len(channels)``.
    channels:
        Output channels of each block of two 3x3 convolutions followed by a 2x2 max pool;
        at least one block.
    hidden_features:
        Width of the hidden dense layer.
    prior_sigma, init_log_sigma, parametrization:
        Passed to every Bayesian layer (see :class:`~bnn_course.layers.BayesianDenseFlipout`).

    Shapes
    ------
    Input (B, in_channels, image_size, image_size), floating point; output
    (B, num_classes) of log-probabilities (each row's ``exp`` sums to one), in float32
    (float64 for a float64 model).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        hidden_features: int = 256,
        prior_sigma: float = 1.0,
        init_log_sigma: float = -5.0,
        parametrization: str = "log",
    ) -> None:
        layer_args = {"prior_sigma": prior_sigma, "init_log_sigma": init_log_sigma,
                      "parametrization": parametrization}
        super().__init__(
            lambda c_in, c_out: BayesianConv2dFlipout(c_in, c_out, 3, padding=1, **layer_args),
            lambda f_in, f_out: BayesianDenseFlipout(f_in, f_out, **layer_args),
            num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            channels=channels, hidden_features=hidden_features)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Log-probabilities (B, num_classes); ``sample=False`` uses the posterior means.

        A sampled pass draws the randomness of all its layers at once
        (:func:`~bnn_course.layers.draw_flipout_noise`: one ``randn`` for the perturbations,
        one ``randint`` for the signs) and hands each layer its share; every example still
        sees its own weight sample in every layer.
        """
        self.check_input(x)
        layers = self.layers()
        noises = (draw_flipout_noise(layers, x.shape[0], like=x) if sample
                  else [None] * len(layers))
        noise_of = dict(zip(layers, noises, strict=True))

        def call(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
            if isinstance(stage, BayesianLayer):
                return stage(h, sample=sample, noise=noise_of[stage])
            return stage(h)

        return self.run_stages(x, call)

    def bayesian_layers(self) -> list[tuple[str, BayesianLayer]]:
        """``(name, layer)`` for every Bayesian layer, input to output."""
        return bayesian_layers(self)

    def kl_divergence(self) -> torch.Tensor:
        """Sum of the layers' closed-form KL divergences, each to its layer's prior; a
        float32 scalar (float64 for a float64 model). Computed for all layers at once
        (:func:`~bnn_course.layers.summed_kl_divergence`), it equals
        ``sum(layer.kl_divergence() for layer in self.layers())`` up to rounding."""
        return summed_kl_divergence(self.layers())


class DeterministicCNN(CNNStack):
    """The deterministic twin of :class:`BayesianCNN`: same layers, point-estimate weights.

    Same constructor arguments (minus the Bayesian ones) and the same interface:
    ``forward(x, sample=...)`` and :meth:`kl_divergence` (zero), so the training engine
    treats both networks alike. Used as the baseline of every comparison.

    With ``dropout > 0`` it is the MC-dropout baseline (Gal & Ghahramani, 2016): dropout
    with probability ``dropout`` before the hidden and the output dense layers, active
    whenever ``sample=True`` (in training *and* at test time, so that repeated stochastic
    passes are samples of an approximate posterior) and off with ``sample=False``;
    ``conv_dropout > 0`` adds such a stage after every convolution block. With both 0 (the
    default) ``sample`` changes nothing.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        hidden_features: int = 256,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1), nn.Linear,
            num_classes=num_classes, in_channels=in_channels, image_size=image_size,
            channels=channels, hidden_features=hidden_features, dropout=dropout,
            conv_dropout=conv_dropout)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Log-probabilities (B, num_classes); ``sample`` switches MC dropout on or off."""
        self.check_input(x)

        def call(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
            if isinstance(stage, nn.Dropout):  # driven by `sample`, not by train()/eval()
                return F.dropout(h, stage.p, training=sample)
            return stage(h)

        return self.run_stages(x, call)

    def bayesian_layers(self) -> list[tuple[str, BayesianLayer]]:
        """No Bayesian layers: an empty list."""
        return []

    def kl_divergence(self) -> torch.Tensor:
        """Zero: point estimates carry no KL term."""
        return torch.zeros((), device=self.classifier.weight.device)
