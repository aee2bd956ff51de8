"""Simulation-based calibration on models with known posteriors."""

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_inflow as pif
from pyro_inflow.sbc import plot_sbc, simulation_based_calibration

matplotlib.use("Agg")
F64 = torch.float64


def conjugate_model(y=None):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)


def exact_posterior(scale: float):
    """Draws from the exact posterior N(y / 2, 1 / 2), with its sd multiplied by ``scale``."""
    def inference(model, y, num_samples):
        tr = pyro.poutine.trace(model).get_trace(y)
        y_sim = tr.nodes["y"]["value"]  # the simulated observation, conditioned in
        eps = torch.randn(num_samples, 2, dtype=F64)
        return {"theta": y_sim / 2 + scale * 0.5**0.5 * eps}
    return inference


def test_exact_posterior_passes_and_wrong_spread_is_flagged():
    y = torch.zeros(2, dtype=F64)
    kw = {"num_simulations": 300, "num_posterior_samples": 49, "progress": False}
    ok = simulation_based_calibration(conjugate_model, y, inference=exact_posterior(1.0), **kw)
    assert ok.passed and set(ok.pit) == {"theta[0]", "theta[1]"}
    assert all(r.min() >= 0 and r.max() <= 49 for r in ok.ranks.values())
    assert np.allclose(ok.pooled_coverage(), [0.5, 0.8, 0.95], atol=0.06)
    narrow = simulation_based_calibration(conjugate_model, y, inference=exact_posterior(0.5),
                                          **kw)
    assert not narrow.passed and narrow.pooled_coverage()[-1] < 0.8  # overconfident
    wide = simulation_based_calibration(conjugate_model, y, inference=exact_posterior(2.0),
                                        **kw)
    assert not wide.passed and wide.pooled_coverage()[0] > 0.7  # underconfident
    assert "passed" in ok.table() and "FAILED" in narrow.table()


def test_sbc_is_reproducible_and_rejects_bad_arguments():
    y = torch.zeros(2, dtype=F64)
    kw = {"num_simulations": 5, "num_posterior_samples": 9, "progress": False,
          "inference": exact_posterior(1.0)}
    a = simulation_based_calibration(conjugate_model, y, seed=3, **kw)
    b = simulation_based_calibration(conjugate_model, y, seed=3, **kw)
    assert all((a.ranks[k] == b.ranks[k]).all() for k in a.ranks)
    with pytest.raises(ValueError, match="inference"):
        simulation_based_calibration(conjugate_model, y, inference="mcmc", num_simulations=3)
    with pytest.raises(ValueError, match="parameters"):
        simulation_based_calibration(conjugate_model, y, parameters=["nope"], **kw)
    with pytest.raises(ValueError, match="observed"):
        simulation_based_calibration(lambda: pyro.sample("a", dist.Normal(0.0, 1.0)),
                                     inference=exact_posterior(1.0), num_simulations=3)


def test_sbc_does_not_fork_workers_once_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="CUDA is in use.*num_workers=1"):
        simulation_based_calibration(conjugate_model, torch.zeros(2, dtype=F64),
                                     inference=exact_posterior(1.0), num_simulations=3,
                                     num_workers=2, progress=False)


# A Gaussian flow prior and one noisy observation of x0 + x1 + x2: the posterior is strongly
# correlated in the latent too, so a mean-field guide's marginals are far too narrow. The
# noise is 0.3: at 0.1 NUTS needed 33 s a simulation (long trees across a posterior 10x
# narrower in one direction), at 0.3 it needs 7 s, and mean-field SVI is still overconfident.
S3 = torch.tensor([[2.0, 0.6, 0.2], [0.6, 1.0, 0.3], [0.2, 0.3, 0.5]], dtype=F64)
M3 = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
A1 = torch.ones(1, 3, dtype=F64)
NOISE_SBC = 0.3


def flow_model():
    flow = pif.InflationaryFlow.from_gaussian_mixture(torch.ones(1), M3[None], S3[None])
    prior = flow.prior(method="euler", step_size=flow.schedule.t_max)  # exact for Gaussians

    def model(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x @ A1.T, NOISE_SBC).to_event(1), obs=y)
    return model


def run_pair(num_simulations: int, num_workers: int = 1, thin: int = 2, warmup: int = 100,
             svi_steps: int = 400):
    model, y = flow_model(), torch.zeros(1, dtype=F64)
    nuts = simulation_based_calibration(
        model, y, num_simulations=num_simulations, num_posterior_samples=50,
        inference_kwargs={"warmup_steps": warmup, "thin": thin}, num_workers=num_workers,
        progress=False)
    svi = simulation_based_calibration(
        model, y, num_simulations=num_simulations, num_posterior_samples=50, inference="svi",
        inference_kwargs={"guide": "normal", "num_steps": svi_steps, "lr": 0.05},
        num_workers=num_workers, progress=False)
    return nuts, svi


def test_sbc_of_latent_inference_smoke(tmp_path):
    """The fast level: both inferences run in forked workers, ranks in range, a plot file."""
    nuts, svi = run_pair(num_simulations=2, num_workers=2, thin=1, warmup=20, svi_steps=20)
    assert set(nuts.groups) == {"x", "x_base"} and len(nuts.pit) == 6
    assert all(0 <= r.min() and r.max() <= 50 for r in nuts.ranks.values())
    assert svi.label == "svi (normal)" and set(svi.groups) == {"x", "x_base"}
    fig = plot_sbc([nuts, svi], tmp_path / "sbc.png")
    titles = [ax.get_title() for ax in fig.axes]  # rows: parameters, columns: inferences
    first = next(iter(nuts.pit))
    assert titles[0].startswith(f"nuts: {first}\n")
    assert titles[1].startswith(f"svi (normal): {first}\n")
    assert f"KS p={nuts.pvalues[first]:.2g}" in titles[0] and len(titles) == 2 * 6
    assert (tmp_path / "sbc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_latent_nuts_is_calibrated_and_mean_field_svi_is_not():
    """The two SBC runs of 0.1.0 (20 unthinned and 150 thinned simulations) in one: 40
    simulations with unthinned draws, a harder test of the ranks than thinned ones."""
    nuts, svi = run_pair(num_simulations=40, num_workers=2, thin=1)
    assert nuts.passed
    # pooled over 6 coordinates that are 3 independent ones: s.e. 0.046 at 50 %, 0.02 at 95 %
    assert np.allclose(nuts.pooled_coverage(), [0.5, 0.8, 0.95], atol=0.12)
    assert nuts.pooled_coverage(nuts.groups["x"])[-1] >= 0.88
    assert not svi.passed and svi.pooled_coverage(svi.groups["x"])[-1] < 0.8  # overconfident
