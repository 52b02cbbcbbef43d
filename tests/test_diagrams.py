"""Tests of bnn_course.diagrams: the pictures are drawn from the code they show."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402


def _texts(fig: plt.Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_bayesian_cnn_diagram_shapes_and_sampling_steps_come_from_the_model() -> None:
    from bnn_course.diagrams import bayesian_cnn_diagram
    from bnn_course.models import BayesianCNN

    # A non-default network, so shapes typed into the drawing code could not pass.
    model = BayesianCNN(channels=(8, 16), hidden_features=24, num_classes=7)
    fig = bayesian_cnn_diagram(model, input_shape=(5, 3, 32, 32))
    texts = _texts(fig)
    try:
        flat = 16 * (32 // 4) ** 2
        for shape in ("(B, 3, 32, 32)", "(B, 8, 32, 32)", "(B, 8, 16, 16)",
                      "(B, 16, 8, 8)", f"(B, {flat})", "(B, 24)", "(B, 7)"):
            assert shape in texts, shape
        sampling = [t for t in texts if "Flipout conv" in t or "Flipout dense" in t]
        assert len(sampling) == len(list(model.bayesian_layers())) == 6
        # the random-variable count of every Bayesian layer is shown
        for _, layer in model.bayesian_layers():
            count = layer.weight_mu.numel() + layer.bias_mu.numel()
            assert f"{count:,}" in texts
        assert fig.get_size_inches()[0] <= 7.0 + 1e-9
        assert min(t.get_fontsize() for ax in fig.axes for t in ax.texts) >= 10
    finally:
        plt.close(fig)


def test_bayesian_cnn_diagram_rejects_a_non_image_shape() -> None:
    from bnn_course.diagrams import bayesian_cnn_diagram
    from bnn_course.models import BayesianCNN

    with pytest.raises(ValueError, match="B, C, H, W"):
        bayesian_cnn_diagram(BayesianCNN(), input_shape=(3, 32, 32))


def test_the_diagram_traces_a_float64_model() -> None:
    # Regression: the trace input was always float32.
    from bnn_course.diagrams import bayesian_cnn_diagram
    from bnn_course.models import BayesianCNN

    model = BayesianCNN(channels=(4, 8), hidden_features=16).double()
    figure = bayesian_cnn_diagram(model, (2, 3, 32, 32))
    assert figure is not None
    plt.close(figure)
