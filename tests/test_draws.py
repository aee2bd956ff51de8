"""Posterior draws as data, and the held-out certificate every trained flow carries."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from torch.distributions import constraints

import pyro_inflow as pif
from pyro_inflow import InflationaryFlow
from pyro_inflow.calibration import certificate_table, holdout_certificate
from pyro_inflow.draws import SiteLayout, as_draws

pytestmark = pytest.mark.usefixtures("fresh_pyro")

POS = {"type": "greater_than", "lower": 0.0}


def _layout() -> SiteLayout:
    return SiteLayout([
        {"name": "mu", "shape": [2, 3], "support": {"type": "real"}},
        {"name": "sigma", "shape": [], "support": POS},
        {"name": "w", "shape": [4], "support": {"type": "simplex"}},
        {"name": "p", "shape": [2], "support": {"type": "interval", "lower": -1.0,
                                                  "upper": 2.0}},
    ])


def test_layout_packs_and_unpacks_through_each_sites_bijection():
    layout = _layout()
    assert layout.dim == 6 + 1 + 3 + 2
    x = torch.randn(5, 7, layout.dim)
    values = layout.unpack(x)
    assert values["mu"].shape == (5, 7, 2, 3) and values["w"].shape == (5, 7, 4)
    assert (values["sigma"] > 0).all()
    assert torch.allclose(values["w"].sum(-1), torch.ones(5, 7))
    assert ((values["p"] > -1) & (values["p"] < 2)).all()
    torch.testing.assert_close(values["sigma"], x[..., 6].exp())
    torch.testing.assert_close(layout.pack(values, batch_ndims=2), x)
    assert SiteLayout(layout.config()).config() == layout.config()


def _dict_draws(n: int = 400, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"mu": torch.randn(n, 2, generator=g, dtype=torch.float64),
            "sigma": torch.randn(n, generator=g, dtype=torch.float64).mul(0.3).exp()}


def test_dict_draws_hold_out_the_end_of_the_chain_and_map_supports():
    draws = _dict_draws()
    prepared = as_draws(draws, supports={"sigma": "positive"}, validation_fraction=0.1)
    assert prepared.layout.names == ["mu", "sigma"] and prepared.data.shape == (400, 3)
    assert prepared.holdout.tolist() == list(range(360, 400))
    torch.testing.assert_close(prepared.data[:, 2], draws["sigma"].log())
    thinned = as_draws(draws, sites=["sigma"], supports={"sigma": constraints.positive},
                       thin=4)
    assert thinned.data.shape == (100, 1)
    torch.testing.assert_close(thinned.data[:, 0], draws["sigma"][::4].log())


@pytest.mark.parametrize("case, message", [
    ("nan", "site 'sigma': draw 7 is NaN or Inf"),
    ("missing", "site 'tau': not in the draws"),
    ("discrete", "site 'k': discrete draws"),
    ("few", "a flow needs at least D + 2 = 5 draws"),
    ("support", "site 'sigma': draw 3 is outside its support"),
])
def test_bad_posterior_input_is_named(case, message):
    draws = _dict_draws(n=40)
    kwargs = {"supports": {"sigma": "positive"}}
    if case == "nan":
        draws["sigma"][7] = float("nan")
    elif case == "missing":
        kwargs["sites"] = ["mu", "tau"]
    elif case == "discrete":
        draws["k"] = torch.arange(40)
    elif case == "few":
        draws = {k: v[:4] for k, v in draws.items()}
    elif case == "support":
        draws["sigma"][3] = -1.0
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        as_draws(draws, **kwargs)


def _mcmc_of_a_constrained_model() -> MCMC:
    def model():
        pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("scale", dist.LogNormal(0.0, 0.5))
        pyro.sample("probs", dist.Dirichlet(torch.ones(3)))

    mcmc = MCMC(NUTS(model), num_samples=30, warmup_steps=20, num_chains=1,
                disable_progbar=True)
    mcmc.run()
    return mcmc


def test_mcmc_and_inference_data_give_the_same_layout():
    mcmc = _mcmc_of_a_constrained_model()
    prepared = as_draws(mcmc)
    supports = {s.name: s.support["type"] for s in prepared.layout.sites}
    assert supports == {"loc": "real", "scale": "greater_than", "probs": "simplex"}
    assert prepared.data.shape == (30, 1 + 1 + 2)
    idata = pif.to_inference_data(mcmc)
    again = as_draws(idata, supports={"scale": "positive", "probs": "simplex"})
    assert sorted(again.layout.names) == sorted(prepared.layout.names)
    mine, theirs = prepared.layout.unpack(prepared.data), again.layout.unpack(again.data)
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name])


def test_fit_from_draws_remembers_the_sites_and_the_prior_unpacks_them(tmp_path):
    draws = _dict_draws(n=300)
    flow = InflationaryFlow.fit(draws, supports={"sigma": "positive"}, steps=30,
                                progress=False, hidden=16, depth=1)
    assert flow.sites.names == ["mu", "sigma"] and flow.dim == 3
    assert flow.certificate["n"] == 30  # the last tenth of the one chain
    flow.save(tmp_path / "f.flow")
    loaded = InflationaryFlow.load(tmp_path / "f.flow")
    assert loaded.sites.config() == flow.sites.config()
    assert loaded.certificate == flow.certificate

    def model():
        theta = pif.sample_sites("theta", loaded)
        return theta

    trace = pyro.poutine.trace(model).get_trace()
    assert trace.nodes["theta"]["value"].shape == (3,)
    assert trace.nodes["sigma"]["type"] == "sample" and trace.nodes["sigma"]["infer"].get(
        "_deterministic")
    assert float(trace.nodes["sigma"]["value"]) == pytest.approx(
        math.exp(float(trace.nodes["theta"]["value"][2])))


def test_sample_sites_is_the_pushforward_of_an_exact_gaussian_flow():
    # an exact Gaussian flow on (mu, log sigma): sigma must come out LogNormal(0.5, 0.4)
    cov = torch.tensor([[1.0, 0.0], [0.0, 0.16]], dtype=torch.float64)
    flow = InflationaryFlow.from_gaussian_mixture(
        torch.ones(1), torch.tensor([[0.0, 0.5]], dtype=torch.float64), cov[None])
    flow.sites = SiteLayout([{"name": "mu", "shape": [], "support": {"type": "real"}},
                             {"name": "sigma", "shape": [], "support": POS}])
    pyro.set_rng_seed(0)
    with pyro.plate("draws", 4000):
        values = pif.sample_sites("theta", flow, method="warped_rk4")
    logs = values["sigma"].log()
    # the flow's t = 0 marginal adds gamma0 * scale^2 of variance: sd 0.4 becomes about 0.4001
    assert float(logs.mean()) == pytest.approx(0.5, abs=4 * 0.4 / math.sqrt(4000))
    assert float(logs.std()) == pytest.approx(0.4, rel=0.05)
    assert (values["sigma"] > 0).all()


def test_sample_sites_refuses_a_flow_without_sites():
    flow = InflationaryFlow.from_gaussian_mixture(
        torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(ValueError, match="not fitted to posterior draws"):
        pif.sample_sites("theta", flow)


def test_array_data_refuses_draw_options():
    with pytest.raises(TypeError, match="apply to posterior draws"):
        InflationaryFlow.fit(torch.randn(50, 2), thin=2, steps=1, progress=False)


# ------------------------------------------------------------------ the held-out certificate
def _gaussian_flow() -> InflationaryFlow:
    return InflationaryFlow.from_gaussian_mixture(
        torch.ones(1), torch.zeros(1, 2), torch.diag(torch.tensor([4.0, 1.0]))[None])


def test_certificate_passes_for_the_true_law_and_fails_for_a_wider_one():
    flow = _gaussian_flow()
    g = torch.Generator().manual_seed(123)  # not the noise's seed 0: that noise would be x
    x = torch.randn(3000, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    cert = holdout_certificate(flow, x, x)
    assert cert["passed"] and cert["max_abs_error"] < 0.03
    assert abs(cert["overfit_gap"]) < 0.03
    wide = holdout_certificate(flow, 1.3 * x, x)
    assert not wide["passed"] and wide["verdict"] == "under-covers"
    assert wide["overfit_gap"] > 0.1  # training points look tighter than the held-out ones
    assert "FAILED (under-covers)" in certificate_table(wide)


def test_a_failed_certificate_warns_once_at_the_prior_and_travels_in_the_file(tmp_path):
    flow = _gaussian_flow()
    x = torch.randn(2000, 2, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    flow.certificate = holdout_certificate(flow, 1.5 * x, x)
    flow.save(tmp_path / "f.flow")
    loaded = InflationaryFlow.load(tmp_path / "f.flow")
    with pytest.warns(RuntimeWarning, match="failed its held-out calibration check"):
        loaded.prior()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.prior()  # once per flow
        _gaussian_flow().prior()  # no certificate: silent


def test_fit_stores_a_certificate_of_its_held_out_split():
    x = torch.randn(400, 2) * torch.tensor([2.0, 1.0])
    flow = InflationaryFlow.fit(x, steps=20, progress=False, hidden=16, depth=1,
                                validation_fraction=0.25)
    cert = flow.certificate
    assert cert["n"] == 100 and len(cert["train_coverage"]) == len(pif.calibration.LEVELS)
    assert cert["solver"]["method"] in ("warped_rk4", "dopri5")
    assert np.allclose(cert["levels"], pif.calibration.LEVELS)
    # it is the check of those 100 points: the same numbers from the public function
    gen = torch.Generator().manual_seed(0)
    val = x[torch.randperm(400, generator=gen)[:100]].float()  # as fit checks it
    again = holdout_certificate(flow, val)
    assert again["coverage"] == cert["coverage"]


# ------------------------------------------------------------------ the two-stage analysis
@pytest.mark.slow  # default training on 4,000 draws: about 30 s
def test_two_stage_analysis_reproduces_the_joint_posterior():
    from pyro_inflow.examples import two_stage as ts

    draws = {"theta": ts.stage1_draws(4000, seed=1)}
    flow = InflationaryFlow.fit(draws, progress=False).double()
    assert flow.certificate["passed"], certificate_table(flow.certificate)
    reference = ts.joint_quadrature()
    with torch.no_grad():
        prior_draws = flow.sample(40_000, seed=2, method="warped_rk4", num_steps=12)
    two_stage = ts.importance_moments(prior_draws)
    for k in range(2):
        sd = reference["sd"][k]
        assert abs(two_stage["mean"][k] - reference["mean"][k]) < 0.15 * sd, two_stage
        assert two_stage["sd"][k] == pytest.approx(sd, rel=0.15), two_stage
    assert two_stage["arm_mass"] == pytest.approx(reference["arm_mass"], abs=0.06), two_stage


def test_a_model_that_does_not_broadcast_still_gets_its_named_sites_after_nuts():
    """``X @ beta`` does not broadcast over a batch of draws: the sites are computed draw by
    draw (with a warning saying how to vectorize), and nothing of the run is lost."""
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    flow = InflationaryFlow.from_gaussian_mixture(torch.ones(1), torch.zeros(1, 2), cov[None])
    flow.sites = SiteLayout([{"name": "beta", "shape": [2], "support": {"type": "real"}}])
    X = torch.randn(10, 2, dtype=torch.float64)
    y = X @ torch.tensor([0.5, -0.2], dtype=torch.float64)

    def model(X, y):
        beta = pif.sample_sites("prior", flow, method="warped_rk4")["beta"]
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(X @ beta, 0.5), obs=y)

    with pytest.warns(UserWarning, match=r"does not broadcast.*\(X \* beta\).sum\(-1\)"):
        mcmc = pif.latent_nuts(model, X, y, num_samples=8, warmup_steps=8, progress=False)
    samples = mcmc.get_samples()
    assert samples["beta"].shape == (8, 2) and samples["prior"].shape == (8, 2)
    torch.testing.assert_close(samples["beta"], samples["prior"])
    decoded = flow.decode(samples["prior_base"], method="warped_rk4")
    torch.testing.assert_close(samples["prior"], decoded)


@pytest.mark.parametrize("field, value, message", [
    ("certificate", {"passed": False}, "certificate: not a held-out certificate"),
    ("certificate", "calibrated", "certificate: not a held-out certificate"),
    ("sites", [{"name": "a", "shape": [3], "support": {"type": "real"}}],
     "sites: 3 dimensions for a 2-D flow"),
    ("sites", [{"name": "a", "shape": [2], "support": {"type": "os.system"}}],
     "unknown support"),
])
def test_a_foreign_certificate_or_layout_is_refused_at_load(tmp_path, field, value, message):
    flow = _gaussian_flow()
    setattr(flow, field, value if field == "certificate" else SiteLayout.__new__(SiteLayout))
    if field == "sites":  # a layout object whose record is the bad value
        flow.sites.config = lambda: value
    flow.save(tmp_path / "f.flow")
    with pytest.raises(ValueError, match=f"corrupt pyro_inflow flow file .*{message}"):
        InflationaryFlow.load(tmp_path / "f.flow")


def test_certificate_falls_back_to_dopri5_for_both_columns(monkeypatch):
    """Where the prior's grid fails its error budget, held-out and training points are both
    encoded with dopri5, and the certificate says so."""
    from pyro_inflow.calibration import certificate

    monkeypatch.setattr(certificate, "CERTIFICATE_SOLVER",
                        {"method": "warped_rk4", "num_steps": 1, "rtol": 1e-30})
    x = torch.randn(500, 2, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    cert = certificate.holdout_certificate(_gaussian_flow(), x, x)
    assert cert["solver"]["method"] == "dopri5" and "too coarse" in cert["solver"]["note"]
    assert len(cert["train_coverage"]) == len(cert["levels"])
