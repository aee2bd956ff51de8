"""Posterior draws in both coordinates, and their ArviZ conversion."""

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from _helpers import gaussian_flow_and_law as gaussian

import pyro_inflow as pif
from pyro_inflow.posterior import mcse_mean, to_inference_data

matplotlib.use("Agg")
F64 = torch.float64


def _linear_flow_model():
    flow, law = gaussian(2)
    prior = flow.prior(method="euler", step_size=flow.schedule.t_max)  # exact for Gaussians

    def model(y):
        x = pyro.sample("x", prior)
        with pyro.plate("obs", y.shape[0]):
            pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=y)
    return model, torch.tensor([0.2, 0.9, 0.4], dtype=F64)


def test_to_inference_data_of_nuts_has_both_coordinates_stats_and_loglik():
    model, y = _linear_flow_model()
    mcmc = pif.latent_nuts(model, y, num_samples=60, warmup_steps=60, num_chains=2,
                           progress=False)
    idata = to_inference_data(mcmc)
    post = idata.posterior
    assert post["x"].dims == ("chain", "draw", "x_dim") and post["x"].shape == (2, 60, 2)
    assert post["x_base"].dims == ("chain", "draw", "x_latent_dim")
    # the data-space draws are the decode of the latent draws
    x = pif.posterior_samples(mcmc, group_by_chain=True)["x"]
    assert np.allclose(post["x"].values, x.numpy())
    stats_ = idata.sample_stats
    for k in ("diverging", "tree_depth", "n_steps", "step_size", "lp"):
        assert stats_[k].shape == (2, 60), k
    assert stats_["diverging"].dtype == bool and (stats_["tree_depth"] >= 1).all()
    assert (stats_["n_steps"] <= 2 ** stats_["tree_depth"]).all()
    assert np.allclose(idata.observed_data["y"].values, y.numpy())
    # pointwise log-likelihood equals the Normal density at the decoded draws
    ll = idata.log_likelihood["y"].values
    assert ll.shape == (2, 60, 3)
    ref = dist.Normal(x.sum(-1)[..., None], 0.5).log_prob(y).numpy()
    assert np.allclose(ll, ref)
    # ArviZ's own tools work unchanged
    summ = az.summary(idata, var_names=["x", "x_base"])
    assert list(summ.index) == ["x[0]", "x[1]", "x_base[0]", "x_base[1]"]
    assert np.isfinite(az.loo(idata).elpd_loo)
    axes = az.plot_posterior(idata, var_names=["x"]).ravel()
    assert [ax.get_title() for ax in axes] == ["x\n0", "x\n1"]
    matplotlib.pyplot.close("all")


def test_to_inference_data_of_a_guide():
    model, y = _linear_flow_model()
    guide = pif.latent_svi(model, y, guide="normal", num_steps=50, progress=False)
    idata = to_inference_data(guide, y, num_samples=100)
    assert idata.posterior["x"].shape == (1, 100, 2)
    assert "sample_stats" not in idata.groups()
    assert idata.log_likelihood["y"].shape == (1, 100, 3)


def test_mcse_mean_knows_autocorrelation():
    """iid draws: s.e. sqrt(p(1-p)/n); AR(1) with rho = 0.9: ESS n (1 - rho) / (1 + rho)."""
    rng = np.random.default_rng(0)
    iid = (rng.standard_normal((4, 2000)) > 0.3).astype(float)
    p, se, ess = mcse_mean(iid)
    assert abs(p - 0.3821) < 0.03
    assert se == pytest.approx(np.sqrt(p * (1 - p) / iid.size), rel=0.15)
    rho, chains = 0.9, np.zeros((4, 20_000))
    for i in range(1, chains.shape[1]):
        chains[:, i] = rho * chains[:, i - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(4)
    _, se, ess = mcse_mean(chains)
    assert ess == pytest.approx(chains.size * (1 - rho) / (1 + rho), rel=0.25)
    assert se == pytest.approx(1 / np.sqrt(ess), rel=0.1)
    with pytest.raises(ValueError, match="values: expected shape"):
        mcse_mean(np.zeros(10))


