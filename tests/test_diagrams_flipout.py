"""The Flipout perturbation diagram of chapter 3 (bnn_course.diagrams)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bnn_course.diagrams import flipout_perturbation_diagram  # noqa: E402
from bnn_course.flipout import rademacher  # noqa: E402


def _inputs(batch: int = 2, out_features: int = 4, in_features: int = 6):
    torch.manual_seed(0)
    delta = 0.1 * torch.randn(out_features, in_features)
    return (delta, rademacher((batch, in_features), like=delta),
            rademacher((batch, out_features), like=delta))


def test_diagram_draws_the_rank_one_sign_matrix_and_the_product() -> None:
    delta, sign_in, sign_out = _inputs()
    fig = flipout_perturbation_diagram(delta, sign_in, sign_out)
    try:
        assert fig.get_size_inches()[0] == pytest.approx(7.0)
        images = [np.asarray(image.get_array()) for image in fig.axes[0].images]
        assert len(images) == 5 * 2  # delta, s_n, r_n, s_n r_n^T, product per example
        for n in range(2):
            drawn_delta, s, r, signs, product = images[5 * n:5 * n + 5]
            outer = np.outer(sign_out[n].numpy(), sign_in[n].numpy())
            np.testing.assert_allclose(drawn_delta, delta.numpy(), rtol=1e-6)
            np.testing.assert_array_equal(s[:, 0], sign_out[n].numpy())
            np.testing.assert_array_equal(r[0], sign_in[n].numpy())
            np.testing.assert_array_equal(signs, outer)
            assert np.linalg.matrix_rank(signs) == 1
            np.testing.assert_allclose(product, delta.numpy() * outer, rtol=1e-6)
        sizes = [text.get_fontsize() for text in fig.axes[0].texts]
        assert min(sizes) >= 10
    finally:
        plt.close(fig)


def test_diagram_rejects_bad_input() -> None:
    delta, sign_in, sign_out = _inputs()
    with pytest.raises(ValueError, match="fit"):
        flipout_perturbation_diagram(delta, sign_out, sign_in)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        flipout_perturbation_diagram(delta, 0.5 * sign_in, sign_out)
    with pytest.raises(ValueError, match="at most"):
        flipout_perturbation_diagram(*_inputs(batch=4))
