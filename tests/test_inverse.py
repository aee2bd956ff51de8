"""The inpainting model: masks, its likelihood, and a closed-form linear-Gaussian posterior."""

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

import pyro_inflow as pif
from pyro_inflow.calibration import interval_coverage
from pyro_inflow.examples import corrupt, inpainting_model


def _gaussian_flow(cov: torch.Tensor):
    D = cov.shape[0]
    return pif.InflationaryFlow.from_gaussian_mixture(
        torch.ones(1, dtype=torch.float64), torch.zeros(1, D, dtype=torch.float64),
        cov.unsqueeze(0), schedule="prp")


def test_corrupt_hides_the_same_count_of_pixels_and_adds_noise_to_the_rest():
    x = torch.rand(500, 64, dtype=torch.float64)
    y, mask = corrupt(x, hidden=0.5, sigma=0.1, seed=3)
    assert mask.dtype == torch.bool and (mask.sum(1) == 32).all()
    assert (y[~mask] == 0).all()
    noise = (y - x)[mask]
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 0.1) < 0.003
    assert not torch.equal(mask[0], mask[1])  # each image its own pixels
    y2, mask2 = corrupt(x, hidden=0.5, sigma=0.1, seed=3)
    assert torch.equal(y, y2) and torch.equal(mask, mask2)
    with pytest.raises(ValueError, match="hidden: expected a fraction"):
        corrupt(x, hidden=1.0)
    with pytest.raises(ValueError, match="sigma: expected a positive"):
        corrupt(x, sigma=0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        corrupt(x.clone().fill_(float("nan")))


def test_inpainting_likelihood_scores_only_the_observed_pixels():
    flow = _gaussian_flow(torch.diag(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)))
    x = torch.randn(4, 3, dtype=torch.float64)
    y, mask = corrupt(x, hidden=1 / 3, sigma=0.2, seed=0)
    model = inpainting_model(flow, sigma=0.2)
    tr = poutine.trace(poutine.condition(model, data={"x": x})).get_trace(y, mask)
    expected = torch.distributions.Normal(x, 0.2).log_prob(y)[mask].sum()
    assert torch.allclose(tr.nodes["y"]["fn"].log_prob(y).sum(), expected)
    assert tr.nodes["x"]["value"].shape == (4, 3)


@pytest.mark.slow  # 1,500 SVI steps with 8 particles
def test_svi_in_the_latent_recovers_the_closed_form_posterior_of_a_gaussian_prior():
    """Gaussian prior (the flow is exact whitening): with a full-covariance guide, SVI in the
    latent must reach the linear-Gaussian posterior of the hidden and observed pixels."""
    A = torch.tensor([[1.0, 0.6, 0.2], [0.6, 1.0, 0.5], [0.2, 0.5, 0.8]], dtype=torch.float64)
    flow = _gaussian_flow(A)
    sigma = 0.3
    x = torch.tensor([[0.5, -0.4, 1.0]], dtype=torch.float64)
    y, mask = corrupt(x, hidden=1 / 3, sigma=sigma, seed=1)
    obs = mask[0]
    # closed form: prior N(0, A + gamma0-smoothing), observe the masked coordinates
    S = A + flow.schedule.gamma0 * flow.basis.scale**2 * torch.eye(3, dtype=torch.float64)
    H = torch.eye(3, dtype=torch.float64)[obs]
    gain = S @ H.T @ torch.linalg.inv(H @ S @ H.T + sigma**2 * torch.eye(int(obs.sum())))
    mean = gain @ y[0, obs]
    cov = S - gain @ H @ S
    model = inpainting_model(flow, sigma=sigma)
    guide = pif.latent_svi(model, y, mask, guide="multivariate_normal", num_steps=1500,
                           lr=0.02, num_particles=8, progress=False)
    draws = pif.posterior_samples(guide, y, mask, num_samples=4000)["x"][:, 0]
    assert torch.allclose(draws.mean(0), mean, atol=0.05)
    assert torch.allclose(torch.cov(draws.T), cov, atol=0.05)
    pyro.clear_param_store()


def test_interval_coverage_of_calibrated_and_overconfident_draws():
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(400, 5000))
    right = interval_coverage(draws, rng.normal(size=5000), 0.9)
    wide = interval_coverage(draws, 2 * rng.normal(size=5000), 0.9)
    assert abs(right["coverage"] - 0.9) < 3 * right["stderr"] + 0.01
    assert wide["coverage"] < 0.65  # P(|N(0, 4)| < 1.645) = 0.59
    assert abs(right["width"] - 2 * 1.645) < 0.05
    with pytest.raises(ValueError, match="expected draws"):
        interval_coverage(draws, rng.normal(size=10))
