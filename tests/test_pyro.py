"""The flow as a Pyro prior: Transform contract, prior densities, latent NUTS and SVI."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from _helpers import random_mixture
from torch import nn

import pyro_inflow as pif
from pyro_inflow import InflationaryFlow, InflationaryFlowTransform, SolverError

# a correlated 3-D Gaussian prior and a rank-deficient linear observation y = A x + noise
F64 = torch.float64
S3 = torch.tensor([[2.0, 0.6, 0.2], [0.6, 1.0, 0.3], [0.2, 0.3, 0.5]], dtype=F64)
M3 = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
A = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
NOISE = 0.4
Y = torch.tensor([0.3, -0.6], dtype=F64)


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def gaussian_flow(**kw):
    return InflationaryFlow.from_gaussian_mixture(torch.ones(1), M3[None], S3[None], **kw)


def mixture_flow(D=3, K=2, seed=0, **kw):
    return InflationaryFlow.from_gaussian_mixture(*random_mixture(K, D, seed), **kw)


def closed_form_posterior(flow):
    """Posterior of x for the linear-Gaussian model under the flow's exact prior."""
    # the flow's t = 0 marginal: the Gaussian convolved with gamma0 noise in scaled units
    prior_cov = S3 + flow.schedule.gamma0 * flow.basis.scale**2 * torch.eye(3)
    precision = torch.linalg.inv(prior_cov) + A.T @ A / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (torch.linalg.solve(prior_cov, M3) + A.T @ Y / NOISE**2)
    return mean, cov


def exact_prior(flow):
    """The prior of a Gaussian flow with one fixed solver step: exact, because the
    standardized pfODE of Gaussian data has a zero right-hand side (keeps NUTS and SVI fast)."""
    return flow.prior(method="euler", step_size=flow.schedule.t_max)


def linear_model(prior):
    def model(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x @ A.T, NOISE).to_event(1), obs=y)
    return model


# ---------------------------------------------------------------- the Transform contract
def test_inverse_of_call_is_identity_and_cache_returns_the_same_object():
    flow = mixture_flow()
    t = InflationaryFlowTransform(flow, cache_size=0, method="dopri5", rtol=1e-9)
    z = torch.randn(6, 3)
    assert torch.allclose(t.inv(t(z)), z, atol=1e-6)
    cached = InflationaryFlowTransform(flow, method="dopri5", rtol=1e-9)
    x = cached(z)
    assert cached.inv(x) is z  # no solve: Pyro's cache
    assert cached.with_cache(0)._cache_size == 0 and cached.with_cache(1) is cached


def test_log_abs_det_jacobian_matches_autograd_jacobian():
    flow = mixture_flow(seed=1)
    t = InflationaryFlowTransform(flow, cache_size=0, method="dopri5", rtol=1e-10)
    for z in torch.randn(3, 3):
        jac = torch.autograd.functional.jacobian(t, z)
        expected = torch.linalg.slogdet(jac)[1]
        assert torch.allclose(t.log_abs_det_jacobian(z, t(z)), expected, atol=1e-6)


def test_shapes_with_batch_dimensions():
    t = InflationaryFlowTransform(mixture_flow(), method="dopri5", rtol=1e-6)
    z = torch.randn(4, 5, 3)
    x = t(z)
    assert x.shape == (4, 5, 3)
    assert t.log_abs_det_jacobian(z, x).shape == (4, 5)
    assert t.inv(x.clone()).shape == (4, 5, 3)
    prr = InflationaryFlowTransform(mixture_flow(schedule="prr", dims_to_keep=2))
    assert prr.forward_shape((7, 2)) == (7, 3) and prr.inverse_shape((7, 3)) == (7, 2)
    assert prr(torch.randn(2, 7, 2)).shape == (2, 7, 3)
    with pytest.raises(ValueError, match=r"shape \(\*, 2\).*got shape \(7, 3\)"):
        prr(torch.randn(7, 3))
    with pytest.raises(ValueError, match="no square Jacobian"):
        prr.log_abs_det_jacobian(torch.randn(2), torch.randn(3))


def test_decode_gradcheck_direct_and_adjoint():
    w, m, S = random_mixture(2, 2, seed=3)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S)
    z = torch.randn(3, 2, requires_grad=True)
    # a fixed-step solver is a smooth function of its input: finite differences agree exactly
    t = InflationaryFlowTransform(flow, cache_size=0, method="rk4", step_size=0.25)
    assert torch.autograd.gradcheck(t, (z,))
    # adaptive solves: direct backpropagation and the adjoint agree to the tolerance
    direct = torch.autograd.grad(
        InflationaryFlowTransform(flow, cache_size=0, method="dopri5", rtol=1e-9)(z)
        .square().sum(), z)[0]
    adjoint = torch.autograd.grad(
        InflationaryFlowTransform(flow, cache_size=0, rtol=1e-9, adjoint=True)(z)
        .square().sum(), z)[0]
    assert torch.allclose(direct, adjoint, atol=1e-6)


def test_weights_are_frozen_and_no_param_leaks():
    data = pif.datasets.load("moons", n=500, seed=0)
    flow = InflationaryFlow.fit(data, steps=3, progress=False, hidden=16, depth=1)
    flow.requires_grad_(True)  # a user unfroze it: the prior freezes it again
    before = {k: v.clone() for k, v in flow.state_dict().items()}

    def model():
        x = pyro.sample("x", flow.prior())
        pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=torch.tensor(0.3, dtype=flow.dtype))

    guide = pif.latent_svi(model, guide="normal", num_steps=5, progress=False)
    assert all(not p.requires_grad and p.grad is None for p in flow.parameters())
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    names = list(pyro.get_param_store().keys())
    assert names and all(n.startswith("AutoNormal") for n in names)
    assert len(guide.losses) == 5


# ---------------------------------------------------------------- the prior
def test_prior_log_prob_and_shapes():
    flow = mixture_flow()
    prior = flow.prior(method="dopri5", rtol=1e-8)
    assert prior.event_shape == (3,) and prior.batch_shape == ()
    x = prior.sample((5,))
    assert x.shape == (5, 3)
    assert torch.allclose(prior.log_prob(x), flow.log_prob(x, rtol=1e-8), atol=1e-8)
    expanded = prior.expand([4])
    assert isinstance(expanded, pif.InflationaryFlowPrior) and expanded.sample().shape == (4, 3)
    assert expanded.log_prob(x[:1]).shape == (4,)
    z = torch.randn(3, requires_grad=True)
    x = prior.transforms[0](z)
    x.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert prior.rsample((2,)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"shape \(\*, 3\).*got shape \(5, 2\)"):
        prior.log_prob(torch.randn(5, 2))


def test_prr_prior_raises_and_full_rank_density_is_exact_for_gaussian_data():
    flow = gaussian_flow(schedule="prr", dims_to_keep=2)
    with pytest.raises(ValueError, match="manifold.*latent inference"):
        flow.prior().log_prob(torch.randn(3))
    full = flow.prior(full_rank=True, method="dopri5", rtol=1e-9)
    assert full.base_dist.event_shape == (3,) and full.full_rank
    x = torch.randn(20, 3) + M3
    # for Gaussian data the full-rank model is the data Gaussian convolved with gamma0 noise
    cov = S3 + flow.schedule.gamma0 * flow.basis.scale**2 * torch.eye(3)
    exact = dist.MultivariateNormal(M3, cov).log_prob(x)
    assert torch.allclose(full.log_prob(x), exact, atol=1e-6)


def test_hutchinson_prior_log_prob_is_deterministic():
    prior = mixture_flow().prior(trace="hutchinson", num_probes=4, seed=3, method="dopri5",
                                 rtol=1e-6)
    x = torch.randn(4, 3)
    assert torch.equal(prior.log_prob(x), prior.log_prob(x.clone()))


def test_solver_nan_names_the_time():
    base = gaussian_flow()

    class Broken(nn.Module):
        def __init__(self, schedule):
            super().__init__()
            self.schedule = schedule

        def forward(self, ut, t):
            return torch.where(t < 4.0, math.nan, 0.0) * ut

    flow = InflationaryFlow(base.basis, Broken(base.schedule))
    with pytest.raises(SolverError, match=r"non-finite values \(first at t=") as err:
        flow.prior().sample()
    first_bad = float(str(err.value).split("first at t=")[1].split(",")[0])
    assert 3.0 < first_bad < 4.0  # the first evaluation past the broken time


# ---------------------------------------------------------------- latent inference
def test_latent_nuts_reproduces_the_linear_gaussian_posterior():
    flow = gaussian_flow()
    mean, cov = closed_form_posterior(flow)
    model = linear_model(exact_prior(flow))
    mcmc = pif.latent_nuts(model, Y, num_samples=500, warmup_steps=300, progress=False)
    x = pif.posterior_samples(mcmc)["x"]
    assert x.shape == (500, 3)
    sd = cov.diag().sqrt()
    # Monte Carlo error of 500 nearly independent draws: sd / sqrt(500) = 0.045 sd
    assert ((x.mean(0) - mean).abs() / sd).max() < 0.2
    assert torch.allclose(x.var(0) / cov.diag(), torch.ones(3), atol=0.25)
    assert torch.allclose(torch.corrcoef(x.T), cov / sd[:, None] / sd, atol=0.12)
    assert mcmc.diagnostics()["divergences"]["chain 0"] == []


def test_latent_svi_full_rank_matches_and_mean_field_is_overconfident():
    flow = gaussian_flow()
    mean, cov = closed_form_posterior(flow)
    model = linear_model(exact_prior(flow))
    mvn = pif.latent_svi(model, Y, guide="multivariate_normal", num_steps=1500, lr=0.03,
                         num_particles=8, progress=False)
    x = pif.posterior_samples(mvn, Y, num_samples=4000)["x"]
    sd = cov.diag().sqrt()
    assert ((x.mean(0) - mean).abs() / sd).max() < 0.15
    assert torch.allclose(x.var(0) / cov.diag(), torch.ones(3), atol=0.2)
    mf = pif.latent_svi(model, Y, guide="normal", num_steps=1500, lr=0.03, num_particles=8,
                        progress=False)
    x_mf = pif.posterior_samples(mf, Y, num_samples=4000)["x"]
    # mean field ignores the latent posterior's correlations: far too narrow
    assert x_mf.var(0).sum() < 0.6 * cov.diag().sum()
    assert ((x_mf.mean(0) - mean).abs() / sd).max() < 0.3


def test_plates_chains_and_predictive():
    flow = InflationaryFlow.from_gaussian_mixture(torch.ones(1), M3[None, :2], S3[None, :2, :2])
    prior = exact_prior(flow)

    def model(y):
        with pyro.plate("items", 3):
            x = pyro.sample("x", prior)
            pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=y)

    y = torch.tensor([0.2, -1.0, 1.5])
    mcmc = pif.latent_nuts(model, y, num_samples=50, warmup_steps=50, num_chains=2,
                           progress=False)
    assert mcmc.get_samples()["x_base"].shape == (100, 3, 2)
    both = pif.posterior_samples(mcmc, group_by_chain=True)
    assert both["x"].shape == (2, 50, 3, 2) and both["x_base"].shape == (2, 50, 3, 2)
    # the data-space values are the decodes of the latent draws
    assert torch.allclose(both["x"], prior.transforms[0](both["x_base"]), atol=1e-12)
    assert not torch.allclose(both["x"][0], both["x"][1])  # two different chains
    latent = pif.reparam_flow_priors(model)
    draws = pyro.infer.Predictive(latent, num_samples=5, return_sites=["x", "x_base"])(y)
    assert draws["x"].shape == (5, 3, 2)


def test_prr_prior_with_nuts_stays_on_the_manifold():
    flow = mixture_flow(D=3, K=2, seed=5, schedule="prr", dims_to_keep=2)

    def model(y):
        x = pyro.sample("x", flow.prior(method="dopri5", rtol=1e-4))
        pyro.sample("y", dist.Normal(x[..., 0] + x[..., 1], 0.3), obs=y)

    mcmc = pif.latent_nuts(model, torch.tensor(0.5), num_samples=40, warmup_steps=40,
                           progress=False)
    x = pif.posterior_samples(mcmc)["x"]
    assert x.shape == (40, 3) and mcmc.get_samples()["x_base"].shape == (40, 2)
    # on the manifold: the compressed coordinates of the full latent vanish
    w = flow.encode_full(x, rtol=1e-8)
    assert w[:, 2].abs().max() < 1e-3 and w[:, :2].abs().max() > 0.1
    with pytest.raises(ValueError, match="manifold"):
        pyro.poutine.trace(pyro.condition(model, {"x": x[0]})).get_trace(
            torch.tensor(0.5)).log_prob_sum()
