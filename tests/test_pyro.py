"""The flow as a Pyro prior: Transform contract, prior densities, latent NUTS and SVI."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from _helpers import random_mixture

import pyro_inflow as pif
from pyro_inflow import InflationaryFlow, SolverError
from pyro_inflow.denoisers import Denoiser

# a correlated 3-D Gaussian prior and a rank-deficient linear observation y = A x + noise
F64 = torch.float64
S3 = torch.tensor([[2.0, 0.6, 0.2], [0.6, 1.0, 0.3], [0.2, 0.3, 0.5]], dtype=F64)
M3 = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
A = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
NOISE = 0.4
Y = torch.tensor([0.3, -0.6], dtype=F64)


pytestmark = pytest.mark.usefixtures("fresh_pyro")


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


# ---------------------------------------------------------------- the prior
def test_weights_are_frozen_and_no_param_leaks():
    data = pif.datasets.load("moons", n=500, seed=0)
    flow = InflationaryFlow.fit(data, steps=3, progress=False, hidden=16, depth=1)
    flow.requires_grad_(True)  # a user unfroze it: the prior freezes it again
    before = {k: v.clone() for k, v in flow.state_dict().items()}

    def model():
        x = pyro.sample("x", flow.prior())
        pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=torch.tensor(0.3, dtype=flow.dtype))

    fit = pif.latent_svi(model, guide="normal", num_steps=5, progress=False)
    assert all(not p.requires_grad and p.grad is None for p in flow.parameters())
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
    names = list(pyro.get_param_store().keys())
    assert names and all(n.startswith("AutoNormal") for n in names)
    assert len(fit.losses) == 5 and all(math.isfinite(v) for v in fit.losses)


def test_latent_svi_keeps_the_users_params_and_starts_its_own_guide_afresh():
    flow = gaussian_flow()
    model = linear_model(exact_prior(flow))
    mine = pyro.param("my_scale", torch.tensor(2.5))
    first = pif.latent_svi(model, Y, guide="normal", num_steps=20, progress=False)
    trained = {k: v.detach().clone() for k, v in pyro.get_param_store().items()
               if k.startswith("AutoNormal.")}
    second = pif.latent_svi(model, Y, guide="normal", num_steps=1, lr=1e-9, progress=False)
    assert pyro.param("my_scale") is mine and float(mine.detach()) == 2.5  # untouched, twice
    # the second guide starts from its own initial values, not the first guide's
    store = pyro.get_param_store()
    assert not torch.allclose(store["AutoNormal.locs.x_base"], trained["AutoNormal.locs.x_base"])
    assert first.guide is not second.guide and second.model is not None
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

    class Broken(Denoiser):
        def __init__(self, schedule):
            super().__init__()
            self.schedule = schedule

        def forward(self, ut, t):
            return torch.where(t < 4.0, math.nan, 0.0) * ut

    flow = InflationaryFlow(base.basis, Broken(base.schedule))
    z = torch.zeros(1, 3)
    with pytest.raises(SolverError, match=r"non-finite values \(first at t=") as err:
        flow.decode(z, method="warped_rk4", num_steps=12)
    first_bad = float(str(err.value).split("first at t=")[1].split(",")[0])
    assert 3.0 < first_bad < 4.0  # the first evaluation past the broken time
    # the prior returns NaN (a sampler's divergence) and says once that the flow is broken
    with pytest.warns(RuntimeWarning, match=r"largest norm 0.*flow itself is broken"):
        x = flow.prior().transform(z)
    assert torch.isnan(x).all() and flow.prior_watch.nonfinite == 1


# ---------------------------------------------------------------- latent inference
def test_latent_potential_is_the_data_potential_minus_the_log_det():
    """Pyro's reparam, exactly: for z in the latent and x = decode(z), the log-joint of the
    rewritten model is that of the original model at x plus log |det dx/dz|."""
    flow = mixture_flow(D=3, K=2, seed=1)
    prior = flow.prior(method="dopri5", rtol=1e-9)
    model = linear_model(prior)
    latent = pif.reparam_flow_priors(model)
    for z in torch.randn(2, 3):
        tr = pyro.poutine.trace(pyro.condition(latent, {"x_base": z})).get_trace(Y)
        twice = pyro.poutine.trace(pyro.condition(pif.reparam_flow_priors(latent),
                                                  {"x_base": z})).get_trace(Y)
        x = tr.nodes["x"]["value"]
        data = pyro.poutine.trace(pyro.condition(model, {"x": x})).get_trace(Y)
        ladj = prior.transform.log_abs_det_jacobian(z, x)
        assert torch.allclose(tr.log_prob_sum(), data.log_prob_sum() + ladj, atol=1e-6)
        assert torch.allclose(twice.log_prob_sum(), tr.log_prob_sum(), atol=1e-12)
        assert abs(float(ladj)) > 0.1  # a curved flow: the identity is not trivially met


def test_latent_nuts_and_svi_smoke():
    """The fast level: a few NUTS draws and SVI steps run with the default prior of a small
    trained flow (an exact mixture's denoiser costs 1 ms an evaluation, a small network 0.1)."""
    data = pif.datasets.load("s_curve", n=500, seed=0)
    flow = InflationaryFlow.fit(data, steps=3, progress=False, hidden=16, depth=1)
    model = linear_model(flow.double().prior())
    mcmc = pif.latent_nuts(model, Y, num_samples=10, warmup_steps=10, max_tree_depth=4,
                           progress=False)
    draws = pif.posterior_samples(mcmc)
    assert draws["x"].shape == (10, 3) and draws["x_base"].shape == (10, 3)
    assert torch.isfinite(draws["x"]).all()
    fit = pif.latent_svi(model, Y, guide="normal", num_steps=10, progress=False)
    assert len(fit.losses) == 10 and all(math.isfinite(v) for v in fit.losses)
    assert pif.posterior_samples(fit, Y, num_samples=7)["x"].shape == (7, 3)


def test_sampler_geometry_flags_a_run_its_tree_depth_limited():
    data = pif.datasets.load("s_curve", n=500, seed=0)
    flow = InflationaryFlow.fit(data, steps=3, progress=False, hidden=16, depth=1)
    model = linear_model(flow.double().prior())
    with pytest.warns(UserWarning, match="tree-depth limit 1"):
        mcmc = pif.latent_nuts(model, Y, num_samples=8, warmup_steps=8, max_tree_depth=1,
                               progress=False)
    report = pif.inference.sampler_geometry(mcmc)
    assert report["limited"] and report["at_depth_limit"] > 0.5
    assert len(report["step_size"]) == 1 and report["radius"] > 0
    with pytest.raises(TypeError, match="latent_nuts"):
        pif.inference.sampler_geometry(object())


def test_the_decode_stretch_where_divergences_end_is_measured_and_a_tight_likelihood_is_no_seam():
    from pyro_inflow.inference import RecordingNUTS, _stretch

    flow = gaussian_flow()
    prior = exact_prior(flow)
    # an exact Gaussian flow decodes affinely: its stretch is one matrix's spectral norm
    z0 = torch.zeros(1, 3, requires_grad=True)
    x0 = prior.transforms[0](z0)
    jac = torch.stack([torch.autograd.grad(x0[0, i], z0, retain_graph=True)[0][0]
                       for i in range(3)])
    expected = torch.linalg.matrix_norm(jac, ord=2)
    got = _stretch(prior.transforms[0], torch.randn(5, 4, 3, dtype=F64))
    assert got.shape == (5,) and torch.allclose(got, expected.expand(5))

    def tight(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), 1e-3), obs=y)

    # steps far too long for the likelihood: every draw diverges, but nowhere near a seam
    kernel = RecordingNUTS(pif.reparam_flow_priors(tight), step_size=3.0,
                           adapt_step_size=False, max_tree_depth=3)
    mcmc = pyro.infer.MCMC(kernel, num_samples=6, warmup_steps=0, disable_progbar=True)
    mcmc.run(torch.tensor(0.5, dtype=F64))
    report = pif.inference.sampler_geometry(mcmc)
    assert report["divergences"] == 6 and report["limited"]
    (seam,) = report["seams"]
    assert seam["site"] == "x" and seam["at_divergences"] == pytest.approx(
        seam["at_draws"]) == pytest.approx(float(expected))
    assert "seam between modes" not in report["message"]


def test_divergences_that_end_on_a_seam_are_called_so():
    from pyro_inflow.inference import RecordingNUTS

    means = torch.tensor([[-1.2, 0.8], [1.2, -0.8]], dtype=F64)
    flow = InflationaryFlow.from_gaussian_mixture(
        torch.tensor([0.5, 0.5], dtype=F64), means, 0.2 * torch.eye(2, dtype=F64).expand(2, 2, 2))

    def model(y):
        x = pyro.sample("x", flow.prior())
        pyro.sample("y", dist.Normal(x.sum(-1), 0.3), obs=y)

    kernel = RecordingNUTS(pif.reparam_flow_priors(model), step_size=0.1,
                           adapt_step_size=False, max_tree_depth=2)
    mcmc = pyro.infer.MCMC(kernel, num_samples=5, warmup_steps=0, disable_progbar=True)
    mcmc.run(torch.tensor(0.5, dtype=F64))
    # a diverging step that ended at the latent origin: this symmetric two-mode flow decodes
    # it to the middle of the gap between its modes, the seam (stretch 78x, draws about 0.6x)
    # (and one that ended out of range, at inf: left out of the median, no error)
    mcmc._diagnostics[0]["diverging"] = [True, True, False, False, False]
    mcmc._diagnostics[0]["divergent_at"] = [{"x_base": torch.zeros(2, dtype=F64)},
                                            {"x_base": torch.full((2,), math.inf)}]
    report = pif.inference.sampler_geometry(mcmc)
    (seam,) = report["seams"]
    assert seam["at_divergences"] > 10 * seam["at_draws"]
    assert "on a seam between modes" in report["message"]
    assert "No step size or mass matrix" in report["message"]
    assert "centered=True" in report["message"]  # the remedy that works


def test_centered_nuts_keeps_its_data_space_draws():
    model, y, _ = _plate_model()
    mcmc = pif.latent_nuts(model, y, num_samples=6, warmup_steps=6, num_chains=2,
                           progress=False, centered=True, parallel=False)
    samples = mcmc.get_samples()
    assert set(samples) == {"x"} and samples["x"].shape == (12, 3, 2)
    both = pif.posterior_samples(mcmc, group_by_chain=True)
    assert set(both) == {"x"}
    # the draws themselves, not fresh prior draws
    assert torch.equal(both["x"].reshape(12, 3, 2), samples["x"])
    idata = pif.to_inference_data(mcmc)
    assert idata.posterior["x"].shape == (2, 6, 3, 2)
    assert "x" in idata.log_likelihood or "y" in idata.log_likelihood


@pytest.mark.slow
def test_centered_nuts_samples_the_data_space_value_with_the_prior_density():
    """``centered=True``: NUTS on ``x`` itself, scored by the prior's log-density, reproduces
    the closed-form linear-Gaussian posterior (the bounds follow the chain's own ESS)."""
    flow = gaussian_flow()
    mean, cov = closed_form_posterior(flow)
    model = linear_model(exact_prior(flow))
    mcmc = pif.latent_nuts(model, Y, num_samples=300, warmup_steps=150, progress=False,
                           centered=True)
    draws = pif.posterior_samples(mcmc)
    assert set(draws) == {"x"} and draws["x"].shape == (300, 3)  # no latent site
    x, sd = draws["x"], cov.diag().sqrt()
    for i in range(3):
        ess_mean, ess_var = _ess(x[:, i]), _ess((x[:, i] - mean[i]).square())
        assert ess_mean > 50 and ess_var > 50
        assert abs(x[:, i].mean() - mean[i]) / sd[i] < 4 / ess_mean**0.5
        assert abs(x[:, i].var() / cov[i, i] - 1) < 4 * (2 / ess_var) ** 0.5
    assert pif.inference.sampler_geometry(mcmc)["seams"] == []


def test_centered_nuts_refuses_a_prior_without_density():
    flow = InflationaryFlow.from_gaussian_mixture(torch.ones(1), M3[None], S3[None],
                                                  schedule="prr", dims_to_keep=2)
    model = linear_model(exact_prior(flow))
    with pytest.raises(ValueError, match="PR-reducing"):
        pif.latent_nuts(model, Y, num_samples=5, warmup_steps=5, progress=False,
                        centered=True)


def _ess(values):
    import arviz as az

    return float(az.ess(values.numpy()[None]))


@pytest.mark.slow
def test_latent_nuts_reproduces_the_linear_gaussian_posterior():
    flow = gaussian_flow()
    mean, cov = closed_form_posterior(flow)
    model = linear_model(exact_prior(flow))
    mcmc = pif.latent_nuts(model, Y, num_samples=500, warmup_steps=300, progress=False)
    x = pif.posterior_samples(mcmc)["x"]
    assert x.shape == (500, 3)
    sd = cov.diag().sqrt()
    for i in range(3):
        # the bounds follow the chain's own effective sample size: 4 Monte Carlo standard
        # errors (the draws are autocorrelated: ESS 120-360 of 500 over seeds 0-3)
        ess_mean = _ess(x[:, i])
        ess_var = _ess((x[:, i] - mean[i]).square())
        assert ess_mean > 50 and ess_var > 50  # the chain mixes
        assert abs(x[:, i].mean() - mean[i]) / sd[i] < 4 / ess_mean**0.5
        assert abs(x[:, i].var() / cov[i, i] - 1) < 4 * (2 / ess_var) ** 0.5
    assert torch.allclose(torch.corrcoef(x.T), cov / sd[:, None] / sd, atol=0.15)
    assert mcmc.diagnostics()["divergences"]["chain 0"] == []


@pytest.mark.slow
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


def _plate_model():
    """Three items in a plate, each a 2-D exact Gaussian flow prior: ``(model, y, prior)``."""
    flow = InflationaryFlow.from_gaussian_mixture(torch.ones(1), M3[None, :2], S3[None, :2, :2])
    prior = exact_prior(flow)

    def model(y):
        with pyro.plate("items", 3):
            x = pyro.sample("x", prior)
            pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=y)

    return model, torch.tensor([0.2, -1.0, 1.5]), prior


def test_plates_chains_and_predictive():
    model, y, prior = _plate_model()
    mcmc = pif.latent_nuts(model, y, num_samples=20, warmup_steps=20, num_chains=2,
                           progress=False)
    assert mcmc.get_samples()["x_base"].shape == (40, 3, 2)
    both = pif.posterior_samples(mcmc, group_by_chain=True)
    assert both["x"].shape == (2, 20, 3, 2) and both["x_base"].shape == (2, 20, 3, 2)
    # the data-space values are the decodes of the latent draws
    assert torch.allclose(both["x"], prior.transforms[0](both["x_base"]), atol=1e-12)
    assert not torch.allclose(both["x"][0], both["x"][1])  # two different chains
    latent = pif.reparam_flow_priors(model)
    draws = pyro.infer.Predictive(latent, num_samples=5, return_sites=["x", "x_base"])(y)
    assert draws["x"].shape == (5, 3, 2)


def test_parallel_chains_are_the_single_chains_of_their_seeds(monkeypatch):
    """Chains in worker processes: chain c is the one-chain run seeded seed + c, whatever the
    number of worker processes, with its own statistics; the data-space sites come back."""
    from pyro_inflow import inference

    model, y, _ = _plate_model()
    kw = {"num_samples": 8, "warmup_steps": 8, "progress": False, "max_tree_depth": 3}
    par = pif.latent_nuts(model, y, num_chains=3, seed=4, parallel=True, **kw)
    assert isinstance(par.sampler, inference._ChainProcesses)
    grouped = par.get_samples(group_by_chain=True)
    assert grouped["x_base"].shape == (3, 8, 3, 2) and grouped["x"].shape == (3, 8, 3, 2)
    for c in range(3):
        one = pif.latent_nuts(model, y, num_chains=1, seed=4 + c, parallel=False, **kw)
        assert torch.equal(grouped["x_base"][c], one.get_samples()["x_base"])
        assert par.diagnostics()["n_steps"][f"chain {c}"] == one.diagnostics()["n_steps"][
            "chain 0"]
    monkeypatch.setattr(inference, "_cores", lambda: 1)  # one worker runs the three chains
    again = pif.latent_nuts(model, y, num_chains=3, seed=4, parallel=True, **kw)
    assert torch.equal(again.get_samples()["x_base"], par.get_samples()["x_base"])
    # one core: the default runs the chains in this process
    assert not inference._use_processes(3, None) and inference._use_processes(3, True)
    assert not inference._use_processes(1, True)


def test_chains_not_in_our_processes_run_here_whatever_pyro_would_do(monkeypatch):
    """parallel=False (and the default once CUDA is in use) runs the chains one after another
    in this process, also where Pyro, seeing a spare core per chain, would fork its own
    processes (which cannot use CUDA: the failure seen on a GPU machine with 16 cores)."""
    import os

    from pyro.infer.mcmc import api

    model, y, _ = _plate_model()
    parent = os.getpid()

    def here_only(y):
        assert os.getpid() == parent, "a chain ran in another process"
        model(y)

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 16)  # Pyro would fork 2 processes
    kw = {"num_samples": 4, "warmup_steps": 4, "num_chains": 2, "progress": False,
          "max_tree_depth": 3}
    mcmc = pif.latent_nuts(here_only, y, parallel=False, **kw)
    assert isinstance(mcmc.sampler, api._UnarySampler)
    assert mcmc.get_samples(group_by_chain=True)["x"].shape == (2, 4, 3, 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert pif.latent_nuts(here_only, y, **kw).get_samples()["x"].shape == (8, 3, 2)


def test_parallel_chains_report_errors_and_dead_workers(monkeypatch):
    import os

    from pyro_inflow import inference

    model, y, _ = _plate_model()
    parent = os.getpid()

    def failing(y):
        model(y)
        if os.getpid() != parent:
            raise ValueError("bad data in a chain")

    def dying(y):
        if os.getpid() != parent:
            os._exit(3)
        model(y)

    kw = {"num_samples": 4, "warmup_steps": 4, "num_chains": 2, "progress": False,
          "parallel": True, "max_tree_depth": 3}
    with pytest.raises(ValueError, match="bad data in a chain"):
        pif.latent_nuts(failing, y, **kw)
    with pytest.raises(RuntimeError, match="worker process died .exit code 3.*parallel=False"):
        pif.latent_nuts(dying, y, **kw)
    monkeypatch.setattr(inference.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ValueError, match="cannot fork.*parallel=False"):
        pif.latent_nuts(model, y, **kw)
    assert not inference._use_processes(2, None)


def test_prr_prior_with_nuts_stays_on_the_manifold():
    flow = mixture_flow(D=3, K=2, seed=5, schedule="prr", dims_to_keep=2)

    def model(y):
        x = pyro.sample("x", flow.prior())
        pyro.sample("y", dist.Normal(x[..., 0] + x[..., 1], 0.3), obs=y)

    mcmc = pif.latent_nuts(model, torch.tensor(0.5), num_samples=6, warmup_steps=6,
                           max_tree_depth=4, progress=False)
    x = pif.posterior_samples(mcmc)["x"]
    assert x.shape == (6, 3) and mcmc.get_samples()["x_base"].shape == (6, 2)
    # on the manifold: the compressed coordinates of the full latent vanish
    w = flow.encode_full(x, rtol=1e-8)
    assert w[:, 2].abs().max() < 1e-3 and w[:, :2].abs().max() > 0.1
    with pytest.raises(ValueError, match="manifold"):
        pyro.poutine.trace(pyro.condition(model, {"x": x[0]})).get_trace(
            torch.tensor(0.5)).log_prob_sum()


def test_a_dense_mass_matrix_only_where_the_warm_up_can_estimate_it():
    """full_mass=None: dense for a latent of at most warmup_steps / 10 coordinates, diagonal
    beyond (a dense estimate from a few warm-up draws per coordinate fails: tutorial 5); the
    choice traces the model once without moving the random state; an explicit choice wins."""
    def model(n):
        with pyro.plate("p", n):
            pyro.sample("a", dist.Normal(0.0, 1.0))

    def mass(n, **kw):
        mcmc = pif.latent_nuts(model, n, num_samples=5, warmup_steps=40, progress=False, **kw)
        return mcmc.kernel._adapter.dense_mass

    assert mass(4) and not mass(5)
    assert mass(5, full_mass=True) and not mass(4, full_mass=False)
    pyro.set_rng_seed(1)
    a = pif.latent_nuts(model, 5, num_samples=5, warmup_steps=40, progress=False, seed=None)
    pyro.set_rng_seed(1)
    b = pif.latent_nuts(model, 5, num_samples=5, warmup_steps=40, progress=False, seed=None,
                    full_mass=False)
    torch.testing.assert_close(a.get_samples()["a"], b.get_samples()["a"])
