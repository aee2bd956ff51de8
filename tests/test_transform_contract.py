"""The Transform contract, as a table: every kind of flow through the same property checks.

Pyro's and torch's conventions for a ``Transform``: shapes both ways, the inverse, the
log-determinant against the autograd Jacobian, the fused decode-and-log-det, the inverse's
log-det as minus the forward one, the cache, equality and hashing, ``bijective``, dtypes, and a
prior's ``log_prob`` of a value it just drew costing no second solve.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from _helpers import random_mixture

from pyro_inflow import InflationaryFlow, InflationaryFlowPrior, InflationaryFlowTransform, datasets

TIGHT = {"method": "dopri5", "rtol": 1e-9, "atol": 1e-9}


@dataclass
class Case:
    """A transform to check, and how exact its solver is (``tol``: the inverse and the
    log-det against autograd; a fixed 12-step grid is exact only to its own error)."""

    flow: InflationaryFlow
    options: dict
    tol: float
    full_rank: bool = False

    def transform(self, **kw: object) -> InflationaryFlowTransform:
        return InflationaryFlowTransform(self.flow, full_rank=self.full_rank,
                                         **{**self.options, **kw})


def _mixture(D: int, **kw: object) -> InflationaryFlow:
    return InflationaryFlow.from_gaussian_mixture(*random_mixture(2, D, seed=D), **kw)


_TRAINED: dict = {}


def _trained(dtype: torch.dtype) -> InflationaryFlow:
    """A small network flow with random output weights, so its field is far from zero."""
    if "flow" not in _TRAINED:
        flow = InflationaryFlow.fit(datasets.load("moons", n=500, seed=0), steps=5,
                                    hidden=16, depth=1, progress=False)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            out = flow.denoiser.network.out.weight
            out.copy_(0.3 * torch.randn(out.shape, generator=gen))
        _TRAINED["flow"] = flow
    return copy.deepcopy(_TRAINED["flow"]).to(dtype)


CASES = {
    "mixture-prp-2d-f64": lambda: Case(_mixture(2), TIGHT, 1e-6),
    "mixture-prp-3d-f64": lambda: Case(_mixture(3), TIGHT, 1e-6),
    "mixture-prr-3to2-f64": lambda: Case(_mixture(3, schedule="prr", dims_to_keep=2), TIGHT,
                                         1e-6),
    "mixture-prr-full-rank-f64": lambda: Case(_mixture(3, schedule="prr", dims_to_keep=2),
                                              TIGHT, 1e-6, full_rank=True),
    "trained-prp-2d-f64-default-grid": lambda: Case(_trained(torch.float64), {}, 2e-2),
    "trained-prp-2d-f32-default-grid": lambda: Case(_trained(torch.float32), {}, 2e-2),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


def _z(t: InflationaryFlowTransform, *batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, t.in_dim, generator=gen).to(t.flow.dtype)


def test_shapes_both_ways(case: Case) -> None:
    t = case.transform()
    z = _z(t, 4, 5)
    x = t(z)
    assert x.shape == (4, 5, t.out_dim) and x.dtype == case.flow.dtype
    assert t.forward_shape(z.shape) == x.shape and t.inverse_shape(x.shape) == z.shape
    assert t.inv(x.clone()).shape == z.shape
    with pytest.raises(ValueError, match=rf"shape \(\*, {t.in_dim}\).*got shape \(7, 9\)"):
        t(torch.zeros(7, 9, dtype=case.flow.dtype))


def test_inverse_of_call_is_identity(case: Case) -> None:
    t = case.transform(cache_size=0)
    z = _z(t, 6)
    torch.testing.assert_close(t.inv(t(z)), z, atol=case.tol, rtol=0)


def test_bijective_only_with_a_square_jacobian(case: Case) -> None:
    t = case.transform()
    assert t.bijective == (case.flow.latent_dim == case.flow.dim or case.full_rank)
    if not t.bijective:
        z = _z(t, 2)
        with pytest.raises(ValueError, match="no square Jacobian"):
            t.log_abs_det_jacobian(z, t(z))


def test_log_det_matches_the_autograd_jacobian(case: Case) -> None:
    t = case.transform(cache_size=0)
    if not t.bijective:
        pytest.skip("no square Jacobian")
    for z in _z(t, 3):
        J = torch.autograd.functional.jacobian(t, z)
        want = torch.linalg.slogdet(J.double())[1]
        got = t.log_abs_det_jacobian(z, t(z)).double()
        assert abs(float(got - want)) < case.tol, (float(got), float(want))


def test_fused_call_and_log_det_agree_and_are_cached(case: Case) -> None:
    t = case.transform()
    if not t.bijective:
        pytest.skip("no square Jacobian")
    z = _z(t, 5)
    x, ladj = t.call_and_ladj(z)
    plain = case.transform(cache_size=0)
    torch.testing.assert_close(x, plain(z))
    torch.testing.assert_close(ladj, plain.log_abs_det_jacobian(z, x))
    assert t.inv(x) is z and t.log_abs_det_jacobian(z, x) is ladj  # no solve: the cache
    # the inverse's log-det is minus the forward one
    torch.testing.assert_close(t.inv.log_abs_det_jacobian(x, z), -ladj)


def test_cache_returns_the_same_object(case: Case) -> None:
    t = case.transform()
    z = _z(t, 3)
    x = t(z)
    assert t.inv(x) is z
    assert t.with_cache(1) is t and t.with_cache(0)._cache_size == 0
    fresh = t.with_cache(0)
    assert fresh.inv(fresh(z)) is not z


def test_equal_transforms_hash_equal(case: Case) -> None:
    t = case.transform()
    twin = case.transform()
    other = case.transform(num_probes=3)
    assert t == twin and hash(t) == hash(twin) and len({t, twin}) == 1
    assert t != other and t.with_cache(0) == t
    assert InflationaryFlowTransform(copy.deepcopy(case.flow), full_rank=case.full_rank,
                                     **case.options) != t  # another flow object


def test_dtypes(case: Case) -> None:
    """As torch promotes: lower precision in gives the flow's dtype, higher precision in is
    computed in that precision (with the flow's weights converted once, not rounded down)."""
    t = case.transform()
    z = _z(t, 2)
    if case.flow.dtype == torch.float64:
        x = t(z.float())
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, t.with_cache(0)(z.float().double()))
    else:
        x64 = t(z.double())
        assert x64.dtype == torch.float64
        twin = InflationaryFlowTransform(copy.deepcopy(case.flow).double(), full_rank=t.full_rank,
                                         **case.options)
        torch.testing.assert_close(x64, twin(z.double()), atol=1e-12, rtol=1e-12)
        assert t.flow.computing_in(torch.float64) is t.flow.computing_in(torch.float64)
        assert (x64 - t.with_cache(0)(z.float())).abs().max() < 1e-3
        assert case.flow.dtype == torch.float32  # the flow itself was not converted


def test_prior_log_prob_of_its_own_draw_costs_no_second_solve(case: Case) -> None:
    prior = InflationaryFlowPrior(case.flow, full_rank=case.full_rank, **case.options)
    if not prior.full_rank:
        pytest.skip("no density")
    calls, field = [], case.flow.field
    real = field.time_terms  # every solve asks the field for its time terms: count them
    field.time_terms = lambda t: (calls.append(1), real(t))[1]
    try:
        x = prior.rsample((4,))
        solved = len(calls)
        lp = prior.log_prob(x)
        assert len(calls) == solved  # the log-det came with the decode
        fresh = prior.log_prob(x.clone())  # a value the prior did not draw: one encode
        assert len(calls) > solved
    finally:
        del field.time_terms
    torch.testing.assert_close(lp, fresh, atol=10 * case.tol, rtol=0)


def test_decode_gradcheck_direct_and_adjoint() -> None:
    w, m, S = random_mixture(2, 2, seed=3)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
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
