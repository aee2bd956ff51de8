"""The latent's radial recalibration: the map against closed forms, the flow's density with it,
and fit's use of it when the held-out check fails."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import special

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.radial import RadialMap, fit_radial_map

MIX = (torch.tensor([0.3, 0.7]), torch.tensor([[-1.5, 0.5], [1.0, -0.3]]),
       torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]),
                    torch.tensor([[0.2, -0.05], [-0.05, 0.4]])]))


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_the_map_inverts_and_its_log_determinant_is_the_jacobians(dim):
    m = RadialMap(1.7, 0.6, 0.05, dim)
    w = torch.randn(6, dim) * torch.tensor([0.01, 0.3, 1.0, 2.0, 4.0, 9.0])[:, None]
    z = m(w)
    torch.testing.assert_close(m.inverse(z), w, atol=1e-12, rtol=1e-10)
    for k in range(6):
        J = torch.autograd.functional.jacobian(m, w[k])
        assert torch.allclose(torch.linalg.slogdet(J)[1], m.log_abs_det(w[k]), atol=1e-10)
    # linear at the origin: z = sqrt(c) w, a regular Jacobian and finite gradients there
    origin = torch.zeros(dim, requires_grad=True)
    J0 = torch.autograd.functional.jacobian(m, torch.zeros(dim))
    torch.testing.assert_close(J0, math.sqrt(1.7) * torch.eye(dim))
    (g,) = torch.autograd.grad(m(origin).sum() + m.log_abs_det(origin), origin)
    assert torch.isfinite(g).all()
    assert torch.allclose(m.log_abs_det(torch.zeros(dim)), torch.tensor(0.5 * dim * math.log(1.7)))
    # c = b = 1 is the identity
    one = RadialMap(1.0, 1.0, 0.05, dim)
    torch.testing.assert_close(one(w), w)
    assert torch.allclose(one.log_abs_det(w), torch.zeros(6), atol=1e-12)


@pytest.mark.parametrize("dim", [2, 64])
def test_fit_matches_the_log_moments_of_chi_square_and_leaves_chi_square_alone(dim):
    rng = np.random.default_rng(0)
    exact = fit_radial_map(rng.chisquare(dim, 100_000), dim)
    c, b, _ = exact.params.tolist()
    assert abs(c - 1) < 0.03 and abs(b - 1) < 0.03  # chi-square radii: (nearly) the identity
    k = 2.5 if dim > 2 else 1.5
    r2 = k * rng.chisquare(dim / k, 2000)  # over-dispersed, as memorizing flows' are
    m = fit_radial_map(r2, dim)
    w = torch.as_tensor(np.sqrt(r2))[:, None] * torch.eye(dim)[0]  # points of those radii
    log_rho2 = torch.log(m(w).square().sum(-1)).numpy()
    assert abs(log_rho2.mean() - (special.digamma(dim / 2) + math.log(2))) < 1e-8
    assert abs(log_rho2.var(ddof=1) - special.polygamma(1, dim / 2)) < 1e-8
    assert m.params[1] < 1  # compresses the spread
    with pytest.raises(ValueError, match="at least 3 positive"):
        fit_radial_map(np.array([1.0, -2.0, 3.0]), dim)


def recalibrated_gaussian_flow():
    flow = InflationaryFlow.from_gaussian_mixture(*MIX)
    flow.radial = RadialMap(1.6, 0.7, 0.03, 2)
    return flow


def test_the_density_with_a_radial_map_is_the_change_of_variables_and_normalized():
    plain, flow = InflationaryFlow.from_gaussian_mixture(*MIX), recalibrated_gaussian_flow()
    x = torch.randn(50, 2) * 1.5
    w = plain.encode(x, rtol=1e-9, atol=1e-9)
    # log p(x) = log p_plain(x) - log N(w) + log N(R(w)) + log |det R'(w)|
    expected = (plain.log_prob(x, rtol=1e-9, atol=1e-9) + 0.5 * w.square().sum(-1)
                - 0.5 * flow.radial(w).square().sum(-1) + flow.radial.log_abs_det(w))
    torch.testing.assert_close(flow.log_prob(x, rtol=1e-9, atol=1e-9), expected, atol=1e-7,
                               rtol=1e-7)
    # and it still integrates to one (a grid over where the mass is)
    g = torch.linspace(-6, 6, 161)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = flow.log_prob(grid, method="warped_rk4").exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 5e-3
    # encode and decode are each other's inverse through the map
    z = flow.encode(x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z, flow.radial(w))
    torch.testing.assert_close(flow.decode(z, rtol=1e-9, atol=1e-9), x, atol=1e-6, rtol=1e-6)


def test_the_prior_transform_carries_the_map_and_its_jacobian():
    flow = recalibrated_gaussian_flow()
    prior = flow.prior(method="dopri5", rtol=1e-9, atol=1e-9)
    t = prior.transform
    z = torch.randn(4, 2)
    x = t(z)
    torch.testing.assert_close(x, flow.decode(z, rtol=1e-9, atol=1e-9), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(t.inv(x.clone()), z, atol=1e-7, rtol=1e-7)
    for k in range(4):
        J = torch.autograd.functional.jacobian(lambda v: t(v), z[k])
        ladj = t.log_abs_det_jacobian(z[k], t(z[k]))
        assert torch.allclose(torch.linalg.slogdet(J)[1], ladj, atol=1e-6)
    # the latent route and the density route agree: N(z) / |det dx/dz| = p(x)
    torch.testing.assert_close(prior.log_prob(x), flow.log_prob(x, rtol=1e-9, atol=1e-9),
                               atol=1e-6, rtol=1e-6)


def test_a_pr_reducing_flow_maps_its_kept_coordinates():
    flow = InflationaryFlow.from_gaussian_mixture(
        torch.ones(1), torch.zeros(1, 3), torch.diag(torch.tensor([2.0, 1.0, 0.01]))[None],
        schedule="prr", dims_to_keep=2)
    w = flow.encode_full(torch.randn(20, 3), rtol=1e-9, atol=1e-9)
    flow.radial = RadialMap(0.8, 1.4, 0.03, 2)
    z = flow._latent_of_state(w)
    torch.testing.assert_close(z, flow.radial(w[:, :2]))
    full = flow._latent_of_state(w, full_rank=True)
    torch.testing.assert_close(full[:, 2:], w[:, 2:])
    torch.testing.assert_close(flow._state_of_latent(full, full_rank=True), w)
    torch.testing.assert_close(flow._state_of_latent(z)[:, :2], w[:, :2])


def test_save_load_keeps_the_map_and_refuses_a_bad_one(tmp_path):
    flow = recalibrated_gaussian_flow()
    x = torch.randn(5, 2)
    flow.save(tmp_path / "f.flow")
    again = InflationaryFlow.load(tmp_path / "f.flow")
    assert again.radial is not None and again.radial.config() == flow.radial.config()
    torch.testing.assert_close(again.encode(x), flow.encode(x))
    payload = torch.load(tmp_path / "f.flow", weights_only=True)
    payload["radial"]["dim"] = 3
    torch.save(payload, tmp_path / "bad.flow")
    with pytest.raises(ValueError, match="corrupt pyro_inflow flow file"):
        InflationaryFlow.load(tmp_path / "bad.flow")


def test_fit_recalibrates_a_flow_that_fails_its_check_and_says_so():
    """400 digits (64-D), 600 steps: the held-out check fails (memorization); fit fits the map
    on the 120 held-out images and certifies the result cross-fitted, keeping the check
    before it."""
    x = datasets.load("digits", seed=0)[:400]
    settings = {"steps": 600, "hidden": 64, "depth": 2, "batch_size": 128, "eval_every": 100,
                "validation_fraction": 0.3, "patience": None, "progress": False}
    with warnings.catch_warnings():  # failed checks warn; not the point here
        warnings.simplefilter("ignore")
        flow = InflationaryFlow.fit(x, **settings)
        plain = InflationaryFlow.fit(x, **settings, recalibrate=False)
    assert plain.radial is None and "recalibration" not in plain.certificate
    assert not plain.certificate["passed"]
    cert = flow.certificate
    assert flow.radial is not None and cert["recalibration"]["applied"]
    assert cert["recalibration"]["before"]["coverage"] == plain.certificate["coverage"]
    assert cert["max_abs_error"] < cert["recalibration"]["before"]["max_abs_error"]
    assert flow.radial.config()["c"] == cert["recalibration"]["c"]
    # the same network: only the latent differs
    s1, s2 = flow.denoiser.state_dict(), plain.denoiser.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    with pytest.raises(TypeError, match="recalibrate"):
        InflationaryFlow.fit(x, **settings, recalibrate="yes")

