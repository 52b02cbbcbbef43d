r"""The BayesianCNN: Flipout convolutions for features, Flipout dense layers to classify.

Default architecture for 32x32 RGB images (CIFAR-10), the "seed-sized" network of the book::

    [conv3x3(3->32), ReLU, conv3x3(32->32), ReLU, maxpool2]      32x32 -> 16x16
    [conv3x3(32->64), ReLU, conv3x3(64->64), ReLU, maxpool2]     16x16 ->  8x8
    [conv3x3(64->128), ReLU, conv3x3(128->128), ReLU, maxpool2]   8x8  ->  4x4
    flatten (2048) -> dense(2048->256), ReLU -> dense(256->10) -> log-softmax

Every convolution and dense layer is Bayesian (weights and biases Gaussian). The output is
log-probabilities, so the negative log-likelihood of a label is ``-output[label]``
(``F.nll_loss``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnn_course.layers import BayesianConv2dFlipout, BayesianDenseFlipout, _BayesianLayer


def flat_feature_count(image_size: int, channels: Sequence[int]) -> int:
    """Features after the convolution blocks: ``channels[-1] * (image_size / 2**blocks)**2``.

    Each block of two 3x3 convolutions ends with a 2x2 max pool, so ``image_size`` must be
    divisible by ``2 ** len(channels)``; a ``ValueError`` says so otherwise.
    """
    downsampling = 2 ** len(channels)
    if image_size % downsampling:
        raise ValueError(f"image_size ({image_size}) must be divisible by "
                         f"2**len(channels) = {downsampling}")
    return int(channels[-1]) * (image_size // downsampling) ** 2


def _check_images(x: torch.Tensor, in_channels: int, image_size: int, name: str) -> None:
    expected = (in_channels, image_size, image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{name} expects images of shape (batch, {expected[0]}, "
                         f"{expected[1]}, {expected[2]}), got {tuple(x.shape)}")


class BayesianCNN(nn.Module):
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
        Output channels of each block of two 3x3 convolutions followed by a 2x2 max pool.
    hidden_features:
        Width of the hidden dense layer.
    prior_sigma, init_log_sigma, parametrization:
        Passed to every Bayesian layer (see :class:`~bnn_course.layers.BayesianDenseFlipout`).

    Shapes
    ------
    Input (B, in_channels, image_size, image_size); output (B, num_classes) of
    log-probabilities (each row's ``exp`` sums to one), in float32.
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
        super().__init__()
        flat_features = flat_feature_count(image_size, channels)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        layer_args = {"prior_sigma": prior_sigma, "init_log_sigma": init_log_sigma,
                      "parametrization": parametrization}

        convs: list[BayesianConv2dFlipout] = []
        previous = self.in_channels
        for width in channels:
            convs.append(BayesianConv2dFlipout(previous, width, 3, padding=1, **layer_args))
            convs.append(BayesianConv2dFlipout(width, width, 3, padding=1, **layer_args))
            previous = width
        self.convs = nn.ModuleList(convs)
        self.hidden = BayesianDenseFlipout(flat_features, hidden_features, **layer_args)
        self.classifier = BayesianDenseFlipout(hidden_features, num_classes, **layer_args)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Log-probabilities (B, num_classes); ``sample=False`` uses the posterior means."""
        _check_images(x, self.in_channels, self.image_size, type(self).__name__)
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x, sample=sample))
            if index % 2 == 1:  # end of a block of two convolutions
                x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.hidden(x, sample=sample))
        logits = self.classifier(x, sample=sample)
        return F.log_softmax(logits.float(), dim=-1)

    def bayesian_layers(self) -> Iterator[tuple[str, _BayesianLayer]]:
        """``(name, layer)`` for every Bayesian layer, input to output."""
        for name, module in self.named_modules():
            if isinstance(module, _BayesianLayer):
                yield name, module

    def kl_divergence(self) -> torch.Tensor:
        """Sum of the layers' closed-form KL divergences; a float32 scalar."""
        return torch.stack([layer.kl_divergence() for _, layer in self.bayesian_layers()]).sum()


class DeterministicCNN(nn.Module):
    """The deterministic twin of :class:`BayesianCNN`: same layers, point-estimate weights.

    Same constructor arguments (minus the Bayesian ones) and the same interface:
    ``forward(x, sample=...)`` and :meth:`kl_divergence` (zero), so the training engine
    treats both networks alike. Used as the baseline of every comparison.

    With ``dropout > 0`` it is the MC-dropout baseline (Gal & Ghahramani, 2016): dropout
    with probability ``dropout`` before the hidden and the output dense layers, active
    whenever ``sample=True`` (in training *and* at test time, so that repeated stochastic
    passes are samples of an approximate posterior) and off with ``sample=False``. With
    ``dropout = 0`` (the default) ``sample`` changes nothing.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        channels: Sequence[int] = (32, 64, 128),
        hidden_features: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        flat_features = flat_feature_count(image_size, channels)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        convs: list[nn.Conv2d] = []
        previous = self.in_channels
        for width in channels:
            convs.append(nn.Conv2d(previous, width, 3, padding=1))
            convs.append(nn.Conv2d(width, width, 3, padding=1))
            previous = width
        self.convs = nn.ModuleList(convs)
        self.hidden = nn.Linear(flat_features, hidden_features)
        self.classifier = nn.Linear(hidden_features, num_classes)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Log-probabilities (B, num_classes); ``sample`` switches MC dropout on or off."""
        _check_images(x, self.in_channels, self.image_size, type(self).__name__)
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if index % 2 == 1:
                x = F.max_pool2d(x, 2)
        drop = sample and self.dropout > 0
        x = F.dropout(torch.flatten(x, 1), self.dropout, training=drop)
        x = F.relu(self.hidden(x))
        x = F.dropout(x, self.dropout, training=drop)
        return F.log_softmax(self.classifier(x).float(), dim=-1)

    def bayesian_layers(self) -> Iterator[tuple[str, _BayesianLayer]]:
        """No Bayesian layers: an empty iterator."""
        return iter(())

    def kl_divergence(self) -> torch.Tensor:
        """Zero: point estimates carry no KL term."""
        return torch.zeros((), device=self.classifier.weight.device)
