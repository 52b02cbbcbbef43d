"""Last-layer Laplace through laplace-torch, checked against the GGN and predictive by hand."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bnn_course.laplace as laplace_module
from bnn_course.data import normalize
from bnn_course.laplace import (
    fit_last_layer_laplace,
    laplace_probs,
    laplace_sample_probs,
    laplace_summary,
    logits_view,
)
from bnn_course.models import BayesianCNN, DeterministicCNN

NUM_CLASSES, HIDDEN, NUM_IMAGES = 3, 4, 40
PRIOR_PRECISION = 0.7


@pytest.fixture(scope="module")
def tiny():
    """A float64 twin with a 4 -> 3 last layer (P = 15) on 40 random 4x4 images."""
    torch.manual_seed(123)
    model = DeterministicCNN(num_classes=NUM_CLASSES, channels=(2,), hidden_features=HIDDEN,
                             image_size=4).double()
    with torch.no_grad():  # spread the logits so that the p_n differ
        model.classifier.weight.mul_(5.0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, 4, 4), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=generator)
    return model, images, labels


def by_hand(model, images):
    """Features phi (N, H) (hooked at the classifier's input), probabilities p (N, K),
    Jacobians J (N, K, P) of the logits wrt theta = (vec_row(W), b), and
    Lambda_n = diag(p_n) - p_n p_n^T (N, K, K)."""
    features = []
    hook = model.classifier.register_forward_hook(lambda m, i, o: features.append(i[0]))
    with torch.no_grad():
        probs = model(normalize(images).double(), sample=False).exp()
    hook.remove()
    phi = features[0]
    n, k = probs.shape
    eye = torch.eye(k, dtype=torch.float64)
    jacobians = torch.cat([torch.einsum("kl,nh->nklh", eye, phi).reshape(n, k, -1),
                           eye.expand(n, k, k)], dim=2)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return phi, probs, jacobians, lam


def ggn(jacobians, lam):
    return torch.einsum("nkp,nkl,nlq->pq", jacobians, lam, jacobians)


def theta_map(model):
    return torch.cat([model.classifier.weight.detach().flatten(),
                      model.classifier.bias.detach()])


@pytest.mark.parametrize("batch_size, curvature_batch_size", [(7, 8192), (64, 7)])
def test_full_posterior_precision_is_the_ggn_plus_the_prior_precision(
        tiny, batch_size, curvature_batch_size, monkeypatch):
    monkeypatch.setattr(laplace_module, "CURVATURE_BATCH_SIZE", curvature_batch_size)
    model, images, labels = tiny
    _, _, jacobians, lam = by_hand(model, images)
    expected = ggn(jacobians, lam) + PRIOR_PRECISION * torch.eye(jacobians.shape[2],
                                                                 dtype=torch.float64)
    la = fit_last_layer_laplace(model, images, labels, hessian_structure="full",
                                prior_precision_method=None,
                                prior_precision=PRIOR_PRECISION, batch_size=batch_size)
    # laplace-torch's curvlinops back end multiplies by a float32 identity: ~1e-8 relative
    torch.testing.assert_close(la.posterior_precision, expected, rtol=1e-6,
                               atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("batch_size, curvature_batch_size", [(7, 8192), (64, 7)])
def test_kron_and_diag_are_the_kfac_and_the_diagonal_of_the_ggn(
        tiny, batch_size, curvature_batch_size, monkeypatch):
    monkeypatch.setattr(laplace_module, "CURVATURE_BATCH_SIZE", curvature_batch_size)
    model, images, labels = tiny
    phi, _, jacobians, lam = by_hand(model, images)
    identity = torch.eye(jacobians.shape[2], dtype=torch.float64)
    summed = lam.sum(0)
    kfac = torch.block_diag(torch.kron(summed, phi.T @ phi / NUM_IMAGES), summed)
    kron = fit_last_layer_laplace(model, images, labels, hessian_structure="kron",
                                  prior_precision_method=None,
                                  prior_precision=PRIOR_PRECISION, batch_size=batch_size)
    torch.testing.assert_close(kron.posterior_precision.to_matrix(),
                               kfac + PRIOR_PRECISION * identity)
    diag = fit_last_layer_laplace(model, images, labels, hessian_structure="diag",
                                  prior_precision_method=None,
                                  prior_precision=PRIOR_PRECISION, batch_size=batch_size)
    torch.testing.assert_close(diag.posterior_precision,
                               torch.diagonal(ggn(jacobians, lam)) + PRIOR_PRECISION)


def test_log_marginal_likelihood_is_the_laplace_formula(tiny):
    model, images, labels = tiny
    _, probs, jacobians, lam = by_hand(model, images)
    la = fit_last_layer_laplace(model, images, labels, hessian_structure="full",
                                prior_precision_method=None, prior_precision=PRIOR_PRECISION)
    num_params = jacobians.shape[2]
    precision = ggn(jacobians, lam) + PRIOR_PRECISION * torch.eye(num_params,
                                                                  dtype=torch.float64)
    theta = theta_map(model)
    expected = (probs.log().gather(1, labels[:, None]).sum()
                - 0.5 * (torch.logdet(precision) - num_params * math.log(PRIOR_PRECISION)
                         + PRIOR_PRECISION * theta @ theta))
    assert la.log_marginal_likelihood().item() == pytest.approx(expected.item(), rel=1e-6)


def test_samples_follow_the_glm_predictive(tiny):
    """Centred logits c = log p - mean_k log p = C f of S samples have the mean C J theta and
    the covariance C J Sigma J^T C, within 5 standard errors derived from S."""
    model, images, labels = tiny
    _, _, jacobians, lam = by_hand(model, images)
    num_params = jacobians.shape[2]
    sigma = torch.linalg.inv(ggn(jacobians, lam)
                             + PRIOR_PRECISION * torch.eye(num_params, dtype=torch.float64))
    la = fit_last_layer_laplace(model, images, labels, hessian_structure="full",
                                prior_precision_method=None, prior_precision=PRIOR_PRECISION)
    num_samples = 4000
    probs = laplace_sample_probs(la, images[:8], num_samples, batch_size=3,
                                 generator=torch.Generator().manual_seed(1))
    assert probs.shape == (num_samples, 8, NUM_CLASSES) and probs.dtype == torch.float32
    centred = probs.double().log()
    centred = centred - centred.mean(-1, keepdim=True)
    centring = torch.eye(NUM_CLASSES, dtype=torch.float64) - 1 / NUM_CLASSES
    mean = centring @ (jacobians[:8] @ theta_map(model))[..., None]
    covariance = centring @ jacobians[:8] @ sigma @ jacobians[:8].transpose(1, 2) @ centring
    variances = torch.diagonal(covariance, dim1=1, dim2=2)
    mean_error = (centred.mean(0) - mean.squeeze(-1)).abs()
    assert (mean_error <= 5 * (variances / num_samples).sqrt() + 1e-9).all()
    deviations = centred - centred.mean(0)
    sample_covariance = torch.einsum("snk,snl->nkl", deviations, deviations) / (num_samples - 1)
    # sd of a sample covariance entry: sqrt((s_kl^2 + s_kk s_ll) / S) (Gaussian data)
    standard_error = ((covariance ** 2 + variances[:, :, None] * variances[:, None, :])
                      / num_samples).sqrt()
    assert ((sample_covariance - covariance).abs() <= 5 * standard_error + 1e-9).all()


def test_sample_mean_approaches_the_monte_carlo_predictive(tiny):
    """The mean of S sampled probability vectors against an independent Monte Carlo
    predictive (4e5 draws of f ~ N(J theta, J Sigma J^T)), within 5 standard errors."""
    model, images, labels = tiny
    _, _, jacobians, lam = by_hand(model, images)
    num_params = jacobians.shape[2]
    sigma = torch.linalg.inv(ggn(jacobians, lam)
                             + PRIOR_PRECISION * torch.eye(num_params, dtype=torch.float64))
    mean = jacobians @ theta_map(model)
    covariance = jacobians @ sigma @ jacobians.transpose(1, 2)
    reference_draws = 400_000
    normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
    torch.manual_seed(2)
    reference_probs = torch.softmax(normal.sample((reference_draws,)), dim=-1)
    reference = reference_probs.mean(0)
    reference_variance = reference_probs.var(0) / reference_draws
    la = fit_last_layer_laplace(model, images, labels, hessian_structure="full",
                                prior_precision_method=None, prior_precision=PRIOR_PRECISION)
    for num_samples in (50, 5000):
        probs = laplace_sample_probs(la, images, num_samples,
                                     generator=torch.Generator().manual_seed(num_samples))
        standard_error = (probs.double().var(0) / num_samples + reference_variance).sqrt()
        assert ((probs.double().mean(0) - reference).abs() <= 5 * standard_error).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(NUM_IMAGES, num_samples).T)
        assert (probs >= 0).all()


def test_probit_predictive_is_the_formula_on_the_logits(tiny):
    model, images, labels = tiny
    _, _, jacobians, lam = by_hand(model, images)
    num_params = jacobians.shape[2]
    sigma = torch.linalg.inv(ggn(jacobians, lam)
                             + PRIOR_PRECISION * torch.eye(num_params, dtype=torch.float64))
    mean = jacobians @ theta_map(model)
    variances = torch.diagonal(jacobians @ sigma @ jacobians.transpose(1, 2), dim1=1, dim2=2)
    expected = torch.softmax(mean / (1 + math.pi / 8 * variances).sqrt(), dim=-1)
    la = fit_last_layer_laplace(model, images, labels, hessian_structure="full",
                                prior_precision_method=None, prior_precision=PRIOR_PRECISION)
    probs = laplace_probs(la, images, batch_size=9)
    assert probs.shape == (NUM_IMAGES, NUM_CLASSES) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected.float(), atol=1e-5, rtol=1e-4)


def test_raw_twin_gives_the_same_fit_but_probit_on_log_probabilities(tiny):
    """What the module docstring says about laplace-torch on a log_softmax output."""
    from laplace import Laplace

    model, images, labels = tiny
    loader = DataLoader(TensorDataset(normalize(images).double(), labels), batch_size=16)
    # the raw twin is fitted in batches of 16 images, ours on the features in one batch
    for structure in ("full", "kron"):
        raw = Laplace(model, "classification", subset_of_weights="last_layer",
                      hessian_structure=structure, last_layer_name="classifier",
                      prior_precision=PRIOR_PRECISION)
        raw.fit(loader)
        ours = fit_last_layer_laplace(model, images, labels, hessian_structure=structure,
                                      prior_precision_method=None,
                                      prior_precision=PRIOR_PRECISION, batch_size=16)
        raw_precision, our_precision = raw.posterior_precision, ours.posterior_precision
        if structure == "kron":
            raw_precision, our_precision = raw_precision.to_matrix(), our_precision.to_matrix()
        torch.testing.assert_close(raw_precision, our_precision)
        torch.testing.assert_close(raw.loss, ours.loss)
    raw_probit = raw(normalize(images).double(), pred_type="glm", link_approx="probit")
    our_probit = laplace_probs(ours, images).double()
    assert (raw_probit - our_probit).abs().max() > 1e-4  # a constant per row matters


def test_marginal_likelihood_prior_precision_is_a_maximum():
    torch.manual_seed(123)
    model = DeterministicCNN(channels=(4, 8), hidden_features=16)
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)
    la = fit_last_layer_laplace(model, images, labels, hessian_structure="kron")
    best = la.prior_precision.clone()
    at_best = la.log_marginal_likelihood().item()
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert la.log_marginal_likelihood(best * factor).item() <= at_best
    la.prior_precision = best
    summary = laplace_summary(la)
    assert summary["prior_precision"] == pytest.approx(best.item())
    assert summary["log_marginal_likelihood"] == pytest.approx(at_best)
    assert summary["num_parameters"] == 16 * 10 + 10
    assert summary["num_data"] == 200
    assert summary["hessian_structure"] == "kron"


def test_small_twin_on_random_images_end_to_end():
    torch.manual_seed(123)
    model = DeterministicCNN(channels=(4, 8), hidden_features=16)
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (150, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (150,), generator=generator)
    test_images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8,
                                generator=generator)
    la = fit_last_layer_laplace(model, images, labels, batch_size=64)
    probs = laplace_sample_probs(la, test_images, 8, batch_size=10,
                                 generator=torch.Generator().manual_seed(0))
    assert probs.shape == (8, 23, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 23))
    # the 8 weight samples are drawn once: the batch size does not change them
    again = laplace_sample_probs(la, test_images, 8, batch_size=7,
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs, again)
    probit = laplace_probs(la, test_images)
    assert probit.shape == (23, 10)
    torch.testing.assert_close(probit.sum(-1), torch.ones(23))
    # the returned object holds a copy: changing the model afterwards changes nothing
    with torch.no_grad():
        model.classifier.weight.zero_()
    torch.testing.assert_close(laplace_probs(la, test_images), probit)


def test_logits_view_is_the_pre_log_softmax_output_without_dropout():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    for model in (DeterministicCNN(channels=(4, 8), hidden_features=16),
                  DeterministicCNN(channels=(4, 8), hidden_features=16, dropout=0.5,
                                   conv_dropout=0.3)):
        view = logits_view(model)
        logits = view(images)
        with torch.no_grad():
            expected = model(normalize(images), sample=False)
        torch.testing.assert_close(torch.log_softmax(logits, -1), expected)
        torch.testing.assert_close(view(images), logits)  # no dropout in the view
        features = view.features(images)
        assert features.shape == (6, 16) and not features.requires_grad
        torch.testing.assert_close(view(features), logits)  # features: the classifier alone
        with pytest.raises(ValueError, match="features"):
            view(normalize(images))
        assert logits.requires_grad  # only the last layer is differentiated
        assert view.network is model
    plain = DeterministicCNN(channels=(4, 8), hidden_features=16)
    with torch.no_grad():  # for the twin without dropout, sample=True changes nothing
        torch.testing.assert_close(plain(normalize(images)),
                                   torch.log_softmax(logits_view(plain)(images), -1))


def test_bad_input_is_rejected():
    model = DeterministicCNN(channels=(4, 8), hidden_features=16)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    with pytest.raises(ValueError, match="Bayesian"):
        fit_last_layer_laplace(BayesianCNN(channels=(4, 8), hidden_features=16), images,
                               labels)
    with pytest.raises(ValueError, match="DeterministicCNN"):
        fit_last_layer_laplace(torch.nn.Linear(3, 2), images, labels)
    with pytest.raises(ValueError, match="hessian_structure"):
        fit_last_layer_laplace(model, images, labels, hessian_structure="lowrank")
    with pytest.raises(ValueError, match="prior_precision_method"):
        fit_last_layer_laplace(model, images, labels, prior_precision_method="gridsearch")
    with pytest.raises(ValueError, match="prior_precision"):
        fit_last_layer_laplace(model, images, labels, prior_precision=0.0)
    with pytest.raises(ValueError, match="uint8"):
        fit_last_layer_laplace(model, normalize(images), labels)
    with pytest.raises(ValueError, match="labels"):
        fit_last_layer_laplace(model, images, labels[:5])
    with pytest.raises(ValueError, match="0..9"):
        fit_last_layer_laplace(model, images, labels + 10)
    with pytest.raises(ValueError, match="batch_size"):
        fit_last_layer_laplace(model, images, labels, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        fit_last_layer_laplace(model, images[:, :, :16, :16], labels)
    la = fit_last_layer_laplace(model, images, labels, prior_precision_method=None)
    with pytest.raises(ValueError, match="num_samples"):
        laplace_sample_probs(la, images, 0)
    with pytest.raises(ValueError, match="uint8"):
        laplace_sample_probs(la, images.float(), 2)
    with pytest.raises(ValueError, match="link_approx"):
        laplace_probs(la, images, link_approx="mc")
    with pytest.raises(ValueError, match="fitted"):
        laplace_probs(model, images)
    from laplace import Laplace

    unfitted = Laplace(logits_view(model), "classification", subset_of_weights="last_layer",
                       hessian_structure="kron", last_layer_name="network.classifier")
    with pytest.raises(ValueError, match="fitted"):
        laplace_sample_probs(unfitted, images, 2)
