"""Property tests (hypothesis) over random mixtures, dimensions, schedules and batch shapes.

Every flow here is an *exact* Gaussian-mixture flow, so the properties hold up to the solver's
tolerance and nothing depends on training.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from _helpers import random_mixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_inflow import InflationaryFlow, InflationaryFlowPrior, InflationaryFlowTransform

TIGHT = {"method": "dopri5", "rtol": 1e-9, "atol": 1e-9}
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def flows(draw, max_dim: int = 4, prr: bool = True):
    D = draw(st.integers(1, max_dim))
    K = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    schedule = draw(st.sampled_from(["prp", "prr"])) if prr and D > 1 else "prp"
    d = draw(st.integers(1, D - 1)) if schedule == "prr" else None
    w, m, S = random_mixture(K, D, seed)
    return InflationaryFlow.from_gaussian_mixture(w, m, S, schedule=schedule, dims_to_keep=d)


batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@SETTINGS
@given(flow=flows(), batch=batch_shapes, seed=st.integers(0, 1000))
def test_transform_shapes_and_inverse(flow, batch, seed):
    t = InflationaryFlowTransform(flow, cache_size=0, **TIGHT)
    z = torch.randn(*batch, flow.latent_dim, generator=torch.Generator().manual_seed(seed))
    x = t(z)
    assert x.shape == (*batch, flow.dim) and x.dtype == z.dtype
    assert t.forward_shape(z.shape) == x.shape and t.inverse_shape(x.shape) == z.shape
    # encode is a (left) inverse of decode, for PR-reducing flows onto their manifold too
    torch.testing.assert_close(t.inv(x), z, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(flow=flows(max_dim=3, prr=False), seed=st.integers(0, 1000))
def test_log_det_matches_autograd_jacobian(flow, seed):
    t = InflationaryFlowTransform(flow, cache_size=0, trace="exact", **TIGHT)
    z = torch.randn(flow.dim, generator=torch.Generator().manual_seed(seed))
    J = torch.autograd.functional.jacobian(t, z)
    want = torch.linalg.slogdet(J)[1]
    torch.testing.assert_close(t.log_abs_det_jacobian(z, t(z)), want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(D=st.integers(1, 4), seed=st.integers(0, 10_000), n=st.integers(1, 5),
       schedule=st.sampled_from(["prp", "prr"]))
def test_gaussian_flow_is_pca_whitening(D, seed, n, schedule):
    """For one Gaussian, encode is the closed form u / sqrt(lam + gamma0) on the kept dims."""
    if schedule == "prr" and D == 1:
        schedule = "prp"
    w, m, S = random_mixture(1, D, seed)
    flow = InflationaryFlow.from_gaussian_mixture(
        w, m, S, schedule=schedule, dims_to_keep=max(1, D // 2) if schedule == "prr" else None)
    x = torch.distributions.MultivariateNormal(m[0], S[0]).sample((n,))
    u = flow.basis.to_eigen(x)
    kept = flow.schedule.kept
    want = (u / torch.sqrt(flow.basis.lam + flow.schedule.gamma0))[..., kept]
    torch.testing.assert_close(flow.encode(x, **TIGHT), want, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(flow=flows(max_dim=3), n=st.integers(1, 4), outer=st.integers(1, 3))
def test_prior_in_plates_has_the_right_shapes(flow, n, outer):
    """Pyro shape rules: batch dims from plates left, the event dim D right, log-prob (plates)."""
    prior = InflationaryFlowPrior(flow, full_rank=True)  # shapes: the default grid will do

    def model():
        with pyro.plate("outer", outer, dim=-2), pyro.plate("inner", n, dim=-1):
            return pyro.sample("x", prior)

    tr = pyro.poutine.trace(model).get_trace()
    site = tr.nodes["x"]
    assert site["value"].shape == (outer, n, flow.dim)
    assert site["fn"].batch_shape == (outer, n) and site["fn"].event_shape == (flow.dim,)
    assert prior.log_prob(site["value"]).shape == (outer, n)
    tr.compute_log_prob()
    assert torch.isfinite(tr.nodes["x"]["log_prob"]).all()


@SETTINGS
@given(flow=flows(max_dim=3), seed=st.integers(0, 1000))
def test_float32_agrees_with_float64_within_the_documented_tolerance(flow, seed):
    """README: at the default tolerances float32 encodes and decodes agree with float64 to
    1e-3 (latent units, and data units relative to the data's scale)."""
    z = torch.randn(16, flow.latent_dim, generator=torch.Generator().manual_seed(seed))
    x64 = flow.decode(z, method="dopri5")
    x32 = flow.float().decode(z.float(), method="dopri5")
    flow.double()
    assert x32.dtype == torch.float32 and x64.dtype == torch.float64
    scale = flow.basis.scale
    assert ((x32.double() - x64).abs() / scale).max() < 1e-3
    z32 = flow.float().encode(x64.float(), method="dopri5")
    flow.double()
    assert (z32.double() - flow.encode(x64, method="dopri5")).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_input_is_refused_by_name(dtype):
    flow = InflationaryFlow.from_gaussian_mixture(*random_mixture(2, 2, 0))
    with pytest.raises((TypeError, ValueError), match="^x: "):
        flow.encode(torch.ones(3, 2, dtype=dtype))


def test_prior_site_shape_mismatch_names_the_flow():
    flow = InflationaryFlow.from_gaussian_mixture(*random_mixture(2, 3, 0))
    prior = InflationaryFlowPrior(flow)

    def model():
        return pyro.sample("x", prior, obs=torch.zeros(4, 2))

    with pytest.raises(ValueError, match=r"expected values of shape \(\*, 3\)"):
        pyro.poutine.trace(model).get_trace().compute_log_prob()


def test_a_model_site_can_use_the_prior_as_a_base_distribution():
    """The prior composes with Pyro distributions (to_event, expand) without losing its shape."""
    flow = InflationaryFlow.from_gaussian_mixture(*random_mixture(2, 2, 0))
    prior = InflationaryFlowPrior(flow, **TIGHT).expand([5])
    x = prior.sample()
    assert x.shape == (5, 2) and prior.log_prob(x).shape == (5,)
    y = dist.Normal(x.sum(-1), 1.0).sample()
    assert y.shape == (5,)
