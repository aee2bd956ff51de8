"""The flow against closed forms: Gaussian data (PCA whitening) and exact Gaussian mixtures."""

import math

import pytest
import torch
from _helpers import mixture_distribution, random_mixture

from pyro_inflow import InflationaryFlow, SolverError

COV3 = torch.tensor([[2.0, 0.6, 0.2], [0.6, 1.0, -0.3], [0.2, -0.3, 0.5]], dtype=torch.float64)


def gaussian_flow(schedule="prp", d=None, gamma0=5e-4):
    return InflationaryFlow.from_gaussian_mixture(
        torch.ones(1), torch.tensor([[0.5, -1.0, 2.0]]), COV3[None], schedule=schedule,
        dims_to_keep=d, gamma0=gamma0)


@pytest.mark.parametrize("schedule, d", [("prp", None), ("prr", 2), ("prr", 1)])
def test_gaussian_encode_is_pca_whitening(schedule, d):
    flow = gaussian_flow(schedule, d)
    x = torch.distributions.MultivariateNormal(torch.tensor([0.5, -1.0, 2.0]), COV3).sample((200,))
    evals, evecs = torch.linalg.eigh(COV3)
    evals, evecs = evals.flip(0), evecs.flip(1)
    evecs = evecs * torch.sign(evecs[evecs.abs().argmax(0), torch.arange(3)])
    u = (x - torch.tensor([0.5, -1.0, 2.0])) @ evecs / evals[0].sqrt()
    lam = evals / evals[0]
    z, info = flow.encode(x, rtol=1e-6, return_info=True)
    assert z.shape == (200, d or 3)
    # exact: the flow transports the t=0 marginal (data + gamma0 noise): z = u / sqrt(lam + g0)
    assert torch.allclose(z, (u / torch.sqrt(lam + 5e-4))[:, : d or 3], atol=1e-10)
    assert info.nfe <= 50  # at rest: dopri5 only grows its step, x10 a step


def test_the_standardizing_maps_follow_changes_to_the_basis():
    """to_state/from_state fold the basis and sqrt(lam + gamma0) into one matrix, cached: an
    in-place change of a buffer must reach them (against the unfolded closed form)."""
    flow = gaussian_flow()
    x = torch.tensor([[0.3, -0.8, 1.7], [1.0, 0.0, 2.5]], dtype=torch.float64)

    def closed_form():
        b = flow.basis
        return b.to_eigen(x) / torch.sqrt(flow.field.lam + flow.schedule.gamma0)

    assert torch.allclose(flow.to_state(x), closed_form(), atol=1e-14)
    with torch.no_grad():
        flow.basis.mean.add_(0.5)
        flow.basis.scale.mul_(1.5)
    assert torch.allclose(flow.to_state(x), closed_form(), atol=1e-14)
    assert torch.allclose(flow.from_state(flow.to_state(x)), x, atol=1e-13)
    assert torch.allclose(flow.from_state(flow.to_state(x[None]))[0], x, atol=1e-13)


def test_gaussian_encode_tends_to_u_over_sqrt_lam_as_gamma0_vanishes():
    """The issue's form z = u / sqrt(lam) holds to 1e-6 only when gamma0 << 1e-6 lam."""
    x = torch.distributions.MultivariateNormal(torch.zeros(3), COV3).sample((100,))
    flow = InflationaryFlow.from_gaussian_mixture(torch.ones(1), torch.zeros(1, 3), COV3[None],
                                                  gamma0=1e-12)
    u = flow.basis.to_eigen(x)
    assert torch.allclose(flow.encode(x), u / flow.basis.lam.sqrt(), atol=1e-6)


@pytest.mark.parametrize("D, schedule, d", [(2, "prp", None), (3, "prp", None), (5, "prp", None),
                                            (3, "prr", 2), (5, "prr", 2)])
def test_mixture_roundtrip_within_tolerance(D, schedule, d):
    w, m, S = random_mixture(3, D, seed=D)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S, schedule=schedule, dims_to_keep=d)
    x = mixture_distribution(w, m, S).sample((64,))
    if d is None:
        back = flow.decode(flow.encode(x, rtol=1e-8), rtol=1e-8)
    else:  # PR-reducing: the full standardized state is invertible
        back = flow.decode_full(flow.encode_full(x, rtol=1e-8), rtol=1e-8)
    assert (back - x).abs().max() < 1e-6


@pytest.mark.parametrize("D", [2, 3, 5])
def test_mixture_log_prob_is_the_convolved_mixture(D):
    w, m, S = random_mixture(3, D, seed=10 + D)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S)
    x = mixture_distribution(w, m, S).sample((40,))
    exact = mixture_distribution(w, m, S, 5e-4 * float(flow.basis.scale) ** 2).log_prob(x)
    assert (flow.log_prob(x, rtol=1e-7) - exact).abs().max() < 1e-3
    clean = mixture_distribution(w, m, S).log_prob(x)  # without the gamma0 noise: detectably off
    assert (flow.log_prob(x, rtol=1e-7) - clean).abs().max() > 1e-4


def test_hutchinson_is_seeded_and_unbiased(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    x = mixture_distribution(*mixture2).sample((10,))
    exact = flow.log_prob(x, trace="exact", rtol=1e-6)

    def hutchinson(seed, num_probes=3, rtol=1e-6):  # an odd count: in 2-D the cross terms
        return flow.log_prob(x, trace="hutchinson", seed=seed, num_probes=num_probes,
                             rtol=rtol)  # of the probes never cancel exactly

    a = hutchinson(3)
    assert torch.equal(a, hutchinson(3))
    assert not torch.equal(a, hutchinson(4))
    many = torch.stack([hutchinson(s, num_probes=65, rtol=1e-5) for s in range(8)]).mean(0)
    assert (many - exact).abs().mean() < 0.03 < (a - exact).abs().mean() * 10


def test_prr_compressed_dims_shrink_in_the_scaled_state():
    w, m, S = random_mixture(3, 3, seed=5)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S, schedule="prr", dims_to_keep=2)
    x = mixture_distribution(w, m, S).sample((500,))
    wT = flow.encode_full(x, rtol=1e-7)
    T = torch.tensor(flow.schedule.t_max)
    # the paper's scaled state v = s(T) ut(T) with s(T) = 1 / sqrt(lam_max + gamma_max(T)),
    # ut = w sqrt(sigma(T)); only ratios matter here, so s(T) drops out
    ut = wT * flow.schedule.sigma(T, flow.basis.lam).sqrt()
    kept, comp = ut[:, :2], ut[:, 2]
    assert comp.abs().max() < 1e-3 * kept.square().mean().sqrt()


def test_prr_log_prob_raises_and_decode_fills(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2, schedule="prr", dims_to_keep=1)
    with pytest.raises(ValueError, match="PR-reducing flow .* has no density"):
        flow.log_prob(torch.zeros(1, 2))
    z = torch.randn(5, 1)
    on = flow.decode(z, rtol=1e-8)
    gen = torch.Generator().manual_seed(0)
    off = flow.decode(z, fill="normal", generator=gen)
    assert torch.allclose(flow.encode(on, rtol=1e-8), z, atol=1e-6)
    assert not torch.allclose(on, off)
    with pytest.raises(ValueError, match="fill: expected one of"):
        flow.decode(z, fill="ones")
    with pytest.raises(ValueError, match="a standard deviation >= 0, got -0.1"):
        flow.decode(z, fill=-0.1)
    # a number is the standard deviation of the compressed end state: 0 is "zeros", and
    # eps scales the same draws as "normal" (the full state is linear in it for this flow)
    torch.testing.assert_close(flow.decode(z, fill=0.0, rtol=1e-8), on)
    w_eps = flow._full_state(z, 0.1, torch.Generator().manual_seed(0))
    w_one = flow._full_state(z, "normal", torch.Generator().manual_seed(0))
    torch.testing.assert_close(w_eps[:, 1], 0.1 * w_one[:, 1])


def test_decode_jacobian_of_gaussian_flow_is_exact():
    flow = gaussian_flow()
    z = torch.randn(3)
    J = torch.autograd.functional.jacobian(lambda v: flow.decode(v[None])[0], z)
    b = flow.basis
    expected = b.scale * b.W * torch.sqrt(b.lam + 5e-4)  # x = mean + scale W diag(sqrt(sigma0)) z
    assert torch.allclose(J, expected, atol=1e-10)


def test_gradcheck_decode_through_the_ode(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2, t_max=6.0)
    z = torch.randn(2, 2, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v: flow.decode(v, method="rk4", step_size=0.25), (z,), atol=1e-6)
    lp = flow.log_prob(flow.decode(z, rtol=1e-7), rtol=1e-7).sum()
    (grad,) = torch.autograd.grad(lp, z)
    assert torch.isfinite(grad).all()


def test_fixed_step_solver_and_dtypes(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    x = mixture_distribution(*mixture2).sample((20,))
    ref = flow.encode(x, rtol=1e-9)
    euler, info = flow.encode(x, method="euler", step_size=flow.schedule.t_max / 1500,
                              return_info=True)
    assert info.nfe == 1500
    assert (euler - ref).abs().max() < 2e-2
    rk4, info = flow.encode(x, method="rk4", step_size=flow.schedule.t_max / 200,
                            return_info=True)
    assert info.nfe == 800 and (rk4 - ref).abs().max() < 1e-4
    f32 = flow.float()
    z32 = f32.encode(x.float())
    assert z32.dtype == torch.float32 and (z32.double() - ref).abs().max() < 1e-3


def test_solver_errors_name_the_time_reached(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    x = mixture_distribution(*mixture2).sample((4,))
    with pytest.raises(SolverError, match=r"failed at t=.* after \d+ evaluations"):
        flow.encode(x, rtol=1e-12, max_num_steps=3)
    with pytest.raises(ValueError, match="method: expected one of"):
        flow.encode(x, method="leapfrog")


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([[float("nan"), 0.0]]), "expected finite values"),
        (torch.zeros(4, 3), r"expected last dimension 2"),
        (torch.zeros(0, 2), "at least 1 point"),
        (torch.zeros(4, 2, dtype=torch.int64), "expected a floating-point tensor"),
    ],
)
def test_bad_inputs_are_named(mixture2, bad, match):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    with pytest.raises((ValueError, TypeError), match=match):
        flow.encode(bad)


def test_sample_is_seeded_and_batched_shapes(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    assert torch.equal(flow.sample(5, seed=1), flow.sample(5, seed=1))
    x = mixture_distribution(*mixture2).sample((2, 3))
    assert flow.encode(x).shape == (2, 3, 2) and flow.log_prob(x).shape == (2, 3)
    assert math.isfinite(float(flow.log_prob(x[0, :1])))
