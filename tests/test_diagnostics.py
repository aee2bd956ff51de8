"""Calibration diagnostics against known answers, and the ArviZ conversion."""

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_inflow as pif
from pyro_inflow.diagnostics import (
    _icosphere,
    calibration_table,
    credible_regions,
    identifiability,
    latent_coverage,
    mcse_mean,
    to_inference_data,
    winding_number,
)

matplotlib.use("Agg")
F64 = torch.float64


def gaussian(D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(D, D, generator=gen, dtype=F64)
    S = B @ B.T / D + 0.3 * torch.eye(D, dtype=F64)
    m = torch.randn(D, generator=gen, dtype=F64)
    flow = pif.InflationaryFlow.from_gaussian_mixture(torch.ones(1, dtype=F64), m[None], S[None])
    # the flow's t = 0 marginal: the Gaussian plus gamma0 noise in scaled units
    S0 = S + flow.schedule.gamma0 * flow.basis.scale**2 * torch.eye(D, dtype=F64)
    return flow, dist.MultivariateNormal(m, S0)


@pytest.mark.parametrize("d", [2, 5])
def test_coverage_of_exact_gaussian_draws_and_flags_for_wrong_dispersion(d):
    z = torch.randn(5000, d, generator=torch.Generator().manual_seed(d), dtype=F64)
    ok = latent_coverage(z)
    assert ok["verdict"] == "calibrated"
    assert all(abs(c - p) < 3.5 * s for c, p, s in zip(ok["coverage"], ok["levels"], ok["stderr"]))
    assert ok["ks_pvalue"] > 0.001
    # too wide: points fall outside the regions (under-coverage); too narrow: the reverse
    assert latent_coverage(1.15 * z)["verdict"] == "under-covers"
    assert latent_coverage(0.85 * z)["verdict"] == "over-covers"
    with pytest.raises(ValueError, match="levels"):
        latent_coverage(z, levels=[0.5, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        latent_coverage(z.clone().fill_(float("nan")))


def test_winding_number_of_a_sphere_mesh():
    verts, faces = _icosphere(2)
    pts = np.array([[0, 0, 0], [0.5, -0.3, 0.2], [0, 0, 0.97], [1.1, 0, 0], [3, 3, 3.0]])
    w = winding_number(pts, verts, faces)
    assert np.allclose(w, [1, 1, 1, 0, 0], atol=1e-9)
    # the decode may reverse the orientation: the sign flips, the magnitude stays
    assert np.allclose(winding_number(pts, verts, faces[:, ::-1]), -w, atol=1e-9)


@pytest.mark.parametrize("D", [2, 3])
def test_decoded_credible_regions_of_a_gaussian_flow_hold_their_nominal_mass(D):
    flow, law = gaussian(D)
    x = law.sample((4000,))
    reg = credible_regions(flow, x)
    cov = latent_coverage(flow.encode(x))
    # the decoded spheres are ellipsoids holding exactly the latent balls' points
    assert np.allclose(reg["inside"], cov["coverage"], atol=0.004)
    assert reg["verdict"] == "calibrated"
    assert reg["method"] == ("polygon" if D == 2 else "winding number")
    # and points from a wider law are flagged
    assert credible_regions(flow, law.mean + 1.2 * (x - law.mean))["verdict"] == "under-covers"


def test_credible_regions_refuse_prr_and_high_dimensions():
    flow, law = gaussian(3)
    prr = pif.InflationaryFlow.from_gaussian_mixture(
        torch.ones(1, dtype=F64), law.mean[None], law.covariance_matrix[None], schedule="prr",
        dims_to_keep=2)
    with pytest.raises(ValueError, match="PR-reducing"):
        credible_regions(prr, law.sample((10,)))
    flow4, law4 = gaussian(4)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        credible_regions(flow4, law4.sample((10,)))


def test_identifiability_of_flows_from_two_samples_of_one_gaussian():
    flow, law = gaussian(2)
    x = law.sample((2000,))
    assert identifiability(flow, flow, x)["relative"] < 1e-9
    # Gaussian flows fitted to two independent samples: the latent is the data's own
    # (PCA-whitened) coordinate, so they agree up to the estimation error
    fits = []
    for _ in range(2):
        s = law.sample((5000,))
        fits.append(pif.InflationaryFlow.from_gaussian_mixture(
            torch.ones(1, dtype=F64), s.mean(0)[None], torch.cov(s.T)[None]))
    near = identifiability(*fits, x)
    assert near["relative"] < 0.05 and min(near["correlation"]) > 0.998
    # a flow of a shifted Gaussian gives latents one unit off
    shifted = pif.InflationaryFlow.from_gaussian_mixture(
        torch.ones(1, dtype=F64), (law.mean + 1.0)[None], law.covariance_matrix[None])
    assert identifiability(flow, shifted, x)["relative"] > 0.5


# ---------------------------------------------------------------- ArviZ
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
    az.plot_posterior(idata, var_names=["x"])
    az.plot_pair(idata, var_names=["x"], divergences=True)
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


def test_calibration_checks_the_t0_marginal_the_flow_transports():
    """A direction with variance close to gamma0 (as for dequantized pixels): the exact flow
    whitens data + N(0, gamma0), so clean points have latent variance lam / (lam + gamma0)
    there, and only noised points are N(0, I)."""
    lam = torch.tensor([1.0, 0.3, 5e-4], dtype=torch.float64)
    flow = pif.InflationaryFlow.from_gaussian_mixture(
        torch.ones(1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64),
        torch.diag(lam).unsqueeze(0), schedule="prp")
    g0 = flow.schedule.gamma0
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) * lam.sqrt()
    noised = flow.add_t0_noise(x, generator=torch.Generator().manual_seed(2))
    assert torch.allclose((noised - x).std(0), torch.full((3,), g0**0.5, dtype=x.dtype),
                          rtol=0.05)
    clean = pif.flow_calibration(flow, x, noise=False, regions=False)
    right = pif.flow_calibration(flow, x, regions=False)
    assert right["noise"] and not clean["noise"]
    var_clean, var_right = clean["z"].var(0), right["z"].var(0)
    assert abs(var_clean[2] - 5e-4 / (5e-4 + g0)) < 0.05  # half the variance: ~0.5
    assert torch.allclose(var_right, torch.ones(3, dtype=x.dtype), atol=0.06)
    assert right["coverage"]["verdict"] == "calibrated"
    assert clean["coverage"]["verdict"] == "over-covers"
    assert "plus the flow's t = 0 noise" in calibration_table(right)
