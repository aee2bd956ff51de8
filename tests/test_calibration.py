"""Calibration against known answers: coverage, decoded regions, identifiability, report."""

import matplotlib
import numpy as np
import pytest
import torch
from _helpers import gaussian_flow_and_law as gaussian

import pyro_inflow as pif
from pyro_inflow.calibration import (
    calibration_table,
    credible_regions,
    identifiability,
    latent_coverage,
)
from pyro_inflow.calibration.regions import icosphere, winding_number

matplotlib.use("Agg")
F64 = torch.float64


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
    verts, faces = icosphere(2)
    pts = np.array([[0, 0, 0], [0.5, -0.3, 0.2], [0, 0, 0.97], [1.1, 0, 0], [3, 3, 3.0]])
    w = winding_number(pts, verts, faces)
    assert np.allclose(w, [1, 1, 1, 0, 0], atol=1e-9)
    # the decode may reverse the orientation: the sign flips, the magnitude stays
    assert np.allclose(winding_number(pts, verts, faces[:, ::-1]), -w, atol=1e-9)


@pytest.mark.parametrize("D", [2, 3])
def test_decoded_credible_regions_of_a_gaussian_flow_hold_their_nominal_mass(D):
    flow, law = gaussian(D)
    # 3-D: icospheres of 3 subdivisions (1,280 triangles) instead of the default 4 keep this
    # at 4 s instead of 80; their flat faces cut the ellipsoid by up to 0.005 of mass
    x, res, atol = (law.sample((4000,)), None, 0.004) if D == 2 else (law.sample((2000,)), 3,
                                                                       0.006)
    reg = credible_regions(flow, x, resolution=res)
    cov = latent_coverage(flow.encode(x))
    # the decoded spheres are ellipsoids holding exactly the latent balls' points
    assert np.allclose(reg["inside"], cov["coverage"], atol=atol)
    assert reg["verdict"] == "calibrated"
    assert reg["method"] == ("polygon" if D == 2 else "winding number")
    # and points from a wider law are flagged
    wide = law.mean + 1.2 * (x - law.mean)
    assert credible_regions(flow, wide, resolution=res)["verdict"] == "under-covers"


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
