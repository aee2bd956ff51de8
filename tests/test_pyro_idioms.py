"""Plain-Pyro idioms, each run as a Pyro user writes it, flow prior against a control.

The control is the same model with a ``MultivariateNormal`` prior equal to the flow's law (an
exact Gaussian flow, whose decode is affine and exact in one Euler step, so everything here is
fast). Where the control is right the flow prior must agree; where the flow prior cannot do
what the control does, it must say so as clearly as Pyro would.
"""

import math
import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from _helpers import gaussian_flow_and_law
from pyro import poutine
from pyro.infer import HMC, MCMC, NUTS, SVI, Importance, Predictive, Trace_ELBO, autoguide
from pyro.infer.autoguide import init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.stats import effective_sample_size

import pyro_inflow as pif

NOISE, Y = 0.3, torch.tensor(0.5)
FLOW, LAW = gaussian_flow_and_law(2, seed=3)
EXACT = {"method": "euler", "step_size": FLOW.schedule.t_max}  # exact for a Gaussian flow


def flow_prior(flow=FLOW, **kw):
    return flow.prior(**{**EXACT, **kw})


def control_prior():
    return dist.MultivariateNormal(LAW.loc, LAW.covariance_matrix)


def model_with(prior):
    def model(y=Y):
        x = pyro.sample("x", prior())
        pyro.sample("y", dist.Normal(x.sum(-1), NOISE), obs=y)
    return model


FLOW_MODEL, CONTROL = model_with(flow_prior), model_with(control_prior)


def closed_form():
    """Posterior mean and covariance of x for y ~ N(x0 + x1, NOISE)."""
    a = torch.ones(1, 2)
    precision = torch.linalg.inv(LAW.covariance_matrix) + a.T @ a / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (torch.linalg.solve(LAW.covariance_matrix, LAW.loc) + a[0] * Y / NOISE**2)
    return mean, cov


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------- samplers and guides
@pytest.mark.parametrize("kernel", [NUTS, HMC])
def test_plain_mcmc_agrees_with_the_control_and_the_closed_form(kernel):
    """Each run's mean and sd match the closed form within 4 Monte Carlo standard errors of
    its own effective sample size (which must be worth the name)."""
    mean, cov = closed_form()
    sd = cov.diagonal().sqrt()
    runs = [("flow", pif.reparam_flow_priors(FLOW_MODEL)), ("control", CONTROL)]
    if kernel is NUTS:  # and on the model itself: x sampled, scored by the prior's log_prob
        runs.append(("flow, data space", FLOW_MODEL))
    for name, model in runs:
        pyro.set_rng_seed(1)
        options = {"num_steps": 4, "step_size": 0.4} if kernel is HMC else {}
        mcmc = MCMC(kernel(model, **options), num_samples=120, warmup_steps=80,
                    disable_progbar=True)
        mcmc.run()
        x = pif.posterior_samples(mcmc)["x"] if name != "control" else mcmc.get_samples()["x"]
        if name == "flow, data space":  # its own draws, not fresh prior draws
            assert torch.equal(x, mcmc.get_samples()["x"])
        ess = effective_sample_size(x.unsqueeze(0)).min()
        assert ess > 5, name  # a stuck chain would make the bounds vacuous
        assert ((x.mean(0) - mean).abs() / sd).max() < 4 / ess.sqrt(), name
        assert ((x.std(0) / sd) - 1).abs().max() < 4 / (2 * ess).sqrt(), name


@pytest.mark.parametrize("guide", [autoguide.AutoNormal, autoguide.AutoMultivariateNormal,
                                   autoguide.AutoLowRankMultivariateNormal, autoguide.AutoDelta])
def test_svi_with_any_autoguide_then_nuts_starts_where_svi_ended(guide):
    """SVI in the latent finds the posterior mean (the decode is affine, so mean-field and MAP
    are exact too); ``init_to_value(values=guide.median())`` then starts NUTS there."""
    mean, _ = closed_form()
    latent_model = pif.reparam_flow_priors(FLOW_MODEL)
    medians = {}
    for name, model in [("flow", latent_model), ("control", CONTROL)]:
        pyro.clear_param_store()  # both guides would name their parameters alike
        g = guide(model)
        optim = pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / 300)})
        svi = SVI(model, g, optim, Trace_ELBO())
        for _ in range(300):
            svi.step()
        medians[name] = {k: v.detach().clone() for k, v in g.median().items()}
    x_flow = FLOW.decode(medians["flow"]["x_base"], **EXACT)
    # a quarter of a posterior sd (the prior's mean is a whole one away)
    tol = 0.25 * closed_form()[1].diagonal().sqrt().max()
    torch.testing.assert_close(x_flow, mean, atol=tol, rtol=0)
    torch.testing.assert_close(medians["control"]["x"], mean, atol=tol, rtol=0)
    # the documented speed-up: the chain starts at the guide's median, by the latent's name
    params, *_ = initialize_model(latent_model, init_strategy=init_to_value(
        values=medians["flow"]))
    torch.testing.assert_close(params["x_base"], medians["flow"]["x_base"])
    # or by the data-space site's name, as with a plain prior
    params, *_ = initialize_model(latent_model, init_strategy=init_to_value(values={"x": mean}))
    torch.testing.assert_close(FLOW.decode(params["x_base"], **EXACT), mean)


def test_importance_sampling_agrees_with_the_closed_form():
    mean, _ = closed_form()
    imp = Importance(pif.reparam_flow_priors(FLOW_MODEL), num_samples=800).run()
    weights = torch.stack(imp.log_weights).softmax(0)
    x = torch.stack([t.nodes["x"]["value"] for t in imp.exec_traces])
    ess = 1 / weights.square().sum()  # about 80 of 800 draws from the prior
    sd = closed_form()[1].diagonal().sqrt()
    assert (((weights[:, None] * x).sum(0) - mean).abs() / sd).max() < 4 / ess.sqrt()


# ---------------------------------------------------------------- Predictive
def test_predictive_on_the_original_model_conditions_on_the_posterior():
    """The most common idiom after MCMC. ``latent_nuts``'s draws carry ``x``, so the original
    model is conditioned on them; a plain MCMC's carry only ``x_base``: Pyro matches no site
    of the original model and draws ``x`` from the prior, which the prior now says."""
    mcmc = quiet(pif.latent_nuts, FLOW_MODEL, num_samples=30, warmup_steps=30, progress=False)
    samples = mcmc.get_samples()
    assert set(samples) == {"x_base", "x"}
    torch.testing.assert_close(samples["x"], pif.posterior_samples(mcmc)["x"])
    pred = Predictive(FLOW_MODEL, posterior_samples=samples, return_sites=["x", "y"])()
    torch.testing.assert_close(pred["x"], samples["x"])
    assert pred["y"].shape == (30,)
    # the reparametrized model reads the latent draws: the same x
    pred = Predictive(pif.reparam_flow_priors(FLOW_MODEL), posterior_samples={
        "x_base": samples["x_base"]}, return_sites=["x"])()
    torch.testing.assert_close(pred["x"], samples["x"])
    # a plain MCMC's draws hold the latent only: no silent prior draw
    with pytest.warns(UserWarning, match=r"conditioned on \['x_base'\].*posterior_samples"):
        Predictive(FLOW_MODEL, posterior_samples={"x_base": samples["x_base"]})()


# ---------------------------------------------------------------- divergences, not crashes
@pytest.mark.parametrize("step_size", [1e100, 1e200])
def test_wild_hmc_steps_are_divergences_as_with_the_control(step_size):
    """Steps far out overflow (and, after an overflow, reach NaN): Pyro counts a non-finite
    potential as a divergence. The flow prior must not end the run where the control goes on."""
    for model in (pif.reparam_flow_priors(model_with(FLOW.prior)), CONTROL):
        pyro.set_rng_seed(0)
        mcmc = MCMC(HMC(model, step_size=step_size, num_steps=3, adapt_step_size=False),
                    num_samples=5, warmup_steps=5, disable_progbar=True)
        quiet(mcmc.run)
        draws = next(iter(mcmc.get_samples().values()))
        assert torch.isfinite(draws).all() and (draws == draws[0]).all()  # all rejected


def test_nan_latent_follows_pyros_validation_like_the_control():
    """Validation on: a NaN latent raises (the control's Normal refuses it too); off (what
    HMC/NUTS do during warm-up): the potential is NaN, which Pyro counts as divergent."""
    nan = torch.tensor([math.nan, 0.0])
    cases = [(pif.reparam_flow_priors(FLOW_MODEL), "x_base"), (CONTROL, "x")]
    for model, site in cases:
        conditioned = poutine.condition(model, {site: nan})
        with pyro.validation_enabled(True), pytest.raises(ValueError, match="finite|Real"):
            poutine.trace(conditioned).get_trace().log_prob_sum()
        with pyro.validation_enabled(False):
            assert torch.isnan(poutine.trace(conditioned).get_trace().log_prob_sum())


def test_empty_extreme_and_unvalidated_values():
    prior, control = flow_prior(), control_prior()
    assert prior.sample((0,)).shape == control.sample((0,)).shape == (0, 2)
    assert prior.rsample((0, 3)).shape == (0, 3, 2)
    assert prior.log_prob(torch.zeros(0, 2)).shape == (0,)
    # far out: the control's density is -inf, the flow prior's too, and nothing raises
    far = torch.tensor([1e200, 0.0])
    assert control.log_prob(far) == -math.inf and prior.log_prob(far) == -math.inf
    assert not torch.isfinite(quiet(prior.transform, far)).all()
    # validate_args=False: NaN in, NaN out, as the control
    nan = torch.tensor([math.nan, 0.0])
    loose = flow_prior(validate_args=False)
    control = dist.MultivariateNormal(LAW.loc, LAW.covariance_matrix, validate_args=False)
    assert torch.isnan(loose.log_prob(nan)) and torch.isnan(control.log_prob(nan))
    with pytest.raises(ValueError, match="expected finite data values"):
        flow_prior(validate_args=True).log_prob(nan)


# ---------------------------------------------------------------- plates, masks, conditions
G = 3
Y_GROUPS = torch.tensor([[0.4, -1.0, 2.0], [0.6, -0.8, 1.7]])  # (obs, groups)


def plate_model(prior, mask=None):
    def model(y=Y_GROUPS):
        with pyro.plate("groups", G):
            d = prior() if mask is None else prior().mask(mask)
            x = pyro.sample("x", d)
            with pyro.plate("obs", y.shape[0], dim=-2):
                pyro.sample("y", dist.Normal(x.sum(-1), NOISE), obs=y)
    return model


def test_plates_report_variables_only_and_any_mcmc_converts_to_arviz():
    """Plate index sites are not posterior variables, and a plain ``pyro.infer.MCMC`` (not
    made by ``latent_nuts``) converts with its log-likelihood, so ``az.loo`` works.
    (``arviz.from_pyro`` drops the log-likelihood of such plate models, for the control too.)"""
    mcmc = MCMC(NUTS(pif.reparam_flow_priors(plate_model(flow_prior))), num_samples=20,
                warmup_steps=20, disable_progbar=True)
    mcmc.run()
    samples = pif.posterior_samples(mcmc)
    assert set(samples) == {"x_base", "x"} and samples["x"].shape == (20, G, 2)
    idata = pif.to_inference_data(mcmc)
    assert set(idata.posterior.data_vars) == {"x_base", "x"}
    assert idata.log_likelihood["y"].shape == (1, 20, 2, G)
    loo = quiet(az.loo, idata)
    assert math.isfinite(loo.elpd_loo)
    table = pif.posterior.summary(idata)
    assert not any(name.startswith(("groups", "obs")) for name in table.index)


@pytest.mark.parametrize("how", ["method", "handler"])
def test_masked_prior_is_reparametrized_and_weighs_as_the_control(how):
    """``prior.mask(m)`` (and ``poutine.mask``) in a plate: the latent site carries the mask;
    for an affine decode the latent log-joint is the control's plus ``log |det|`` per group
    whose prior term counts."""
    mask = torch.tensor([True, False, True])

    def masked(prior):
        if how == "method":
            return plate_model(prior, mask)
        return poutine.mask(plate_model(prior), mask=mask)

    latent_model = pif.reparam_flow_priors(masked(flow_prior))
    trace = poutine.trace(latent_model).get_trace()
    assert "x_base" in trace.nodes and trace.nodes["x_base"]["value"].shape == (G, 2)
    z, x = trace.nodes["x_base"]["value"], trace.nodes["x"]["value"]
    control = poutine.trace(poutine.condition(masked(control_prior), {"x": x})).get_trace()
    log_det = flow_prior().transform.log_abs_det_jacobian(z[0], x[0])
    expected = control.log_prob_sum() + int(mask.sum()) * log_det
    torch.testing.assert_close(trace.log_prob_sum(), expected)


def test_conditioning_outside_or_inside_the_reparam_is_the_control():
    """``condition(reparam_flow_priors(model), {"x": v})`` scores ``v`` under the prior exactly
    as the documented order ``reparam_flow_priors(condition(model, ...))`` and the control."""
    v = torch.tensor([0.3, 0.2])
    outside = poutine.condition(pif.reparam_flow_priors(FLOW_MODEL), {"x": v})
    inside = pif.reparam_flow_priors(poutine.condition(FLOW_MODEL, {"x": v}))
    control = poutine.condition(CONTROL, {"x": v})
    lps = [poutine.trace(m).get_trace().log_prob_sum() for m in (outside, inside, control)]
    torch.testing.assert_close(lps[0], lps[2])
    torch.testing.assert_close(lps[1], lps[2])
    assert "x_base" not in poutine.trace(outside).get_trace().nodes


def test_conditioning_a_pr_reducing_prior_is_refused_in_either_order():
    flow = pif.InflationaryFlow.from_gaussian_mixture(torch.ones(1), LAW.loc[None],
                                                      LAW.covariance_matrix[None],
                                                      schedule="prr", dims_to_keep=1)
    model = model_with(lambda: flow.prior(**EXACT))
    v = torch.tensor([0.3, 0.2])
    for m in (poutine.condition(pif.reparam_flow_priors(model), {"x": v}),
              pif.reparam_flow_priors(poutine.condition(model, {"x": v}))):
        with pytest.raises(ValueError, match="PR-reducing flow .* has no density"):
            poutine.trace(m).get_trace().log_prob_sum()


# ---------------------------------------------------------------- dtypes
def test_dtypes_follow_torch_promotion_on_every_path():
    """Draws have the flow's dtype (as a distribution's draws have its parameters'); values
    of higher precision are computed in it; a prior made before ``flow.double()`` follows."""
    import copy

    flow32 = copy.deepcopy(FLOW).float()
    prior = flow32.prior(**EXACT)
    control32 = dist.MultivariateNormal(LAW.loc.float(), LAW.covariance_matrix.float())
    assert prior.sample().dtype == control32.sample().dtype == torch.float32
    x64 = torch.tensor([0.3, 0.2], dtype=torch.float64)
    assert prior.log_prob(x64).dtype == torch.float64  # as float32 Normal.log_prob promotes
    assert dist.Normal(LAW.loc.float(), 1.0).log_prob(x64).dtype == torch.float64
    torch.testing.assert_close(prior.log_prob(x64), FLOW.prior(**EXACT).log_prob(x64),
                               atol=1e-5, rtol=1e-5)
    assert prior.transform(x64).dtype == torch.float64
    assert flow32.decode(x64, **EXACT).dtype == flow32.encode(x64, **EXACT).dtype == torch.float64
    assert flow32.decode(x64.float(), **EXACT).dtype == torch.float32
    # the latent model in a float32 flow: float32 sites, float64 potential from float64 data
    trace = poutine.trace(pif.reparam_flow_priors(model_with(lambda: prior))).get_trace()
    assert trace.nodes["x_base"]["value"].dtype == trace.nodes["x"]["value"].dtype == torch.float32
    flow32.double()  # the prior was made before: it follows the flow
    trace = poutine.trace(pif.reparam_flow_priors(model_with(lambda: prior))).get_trace()
    assert trace.nodes["x_base"]["value"].dtype == trace.nodes["x"]["value"].dtype == torch.float64
    assert prior.rsample().dtype == prior.sample((2,)).dtype == torch.float64
