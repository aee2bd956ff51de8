"""The fixed-grid ``warped_rk4`` solver against references and the authors' Euler."""

import warnings

import pytest
import torch
from _helpers import mixture_distribution, random_mixture

from pyro_inflow import InflationaryFlow, SolverError
from pyro_inflow.examples.problems import authors_euler
from pyro_inflow.solvers import SOLVERS, WARPED_STEPS, solve
from pyro_inflow.solvers.warped import warped_rk4


def _against_euler(flow, x):
    """Encode and roundtrip ``x`` with the default ``warped_rk4`` and with the authors' Euler:
    ``(rms of the warped roundtrip, Euler's; rms of the warped encode error, Euler's;
    per-point warped encode error; encode info; decode info; Euler's evaluations)``."""
    T = flow.schedule.t_max
    rms = lambda a, b: (a - b).square().sum(-1).mean().sqrt()  # noqa: E731
    with torch.no_grad():
        w0 = flow.to_state(x)
        ref = solve(flow.field, w0, 0.0, T, rtol=1e-10)[0]
        we, n_enc = authors_euler(flow.field, w0, 0.0, T)
        back_e, n_dec = authors_euler(flow.field, we, T, 0.0)
        wr, _, enc = solve(flow.field, w0, 0.0, T, method="warped_rk4")
        back_r, _, dec = solve(flow.field, wr, T, 0.0, method="warped_rk4")
    per_point = (wr - ref).square().mean(-1).sqrt()
    return (rms(back_r, w0), rms(back_e, w0), rms(wr, ref), rms(we, ref), per_point, enc, dec,
            n_enc + n_dec)


@pytest.mark.parametrize("D, schedule, d", [(2, "prp", None), (3, "prp", None), (3, "prr", 2)])
def test_roundtrip_beats_authors_euler_in_at_most_100_evaluations(D, schedule, d):
    w, m, S = random_mixture(3, D, seed=D)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S, schedule=schedule, dims_to_keep=d)
    x = mixture_distribution(w, m, S).sample((200,))
    rt, rt_euler, enc_err, enc_euler, per_point, enc, dec, n_euler = _against_euler(flow, x)
    assert enc.num_steps == dec.num_steps == WARPED_STEPS
    assert enc.nfe + dec.nfe <= 100 and n_euler / (enc.nfe + dec.nfe) > 20
    assert rt < rt_euler  # invertible to better than Euler
    assert enc_err < enc_euler  # and more accurate one way
    # the reported estimate bounds the actual per-point error (within a factor of 2)
    assert per_point.max() < 2 * enc.error and enc.error < 1e-2


def test_warp_follows_structure_finer_than_the_data_variance():
    """A thin curve of ten narrow Gaussians (variance 0.01, about 1/160 of the data's): its
    field moves while the noise is still far below the global variance. A warp built for the
    global variance alone (``WARP_SCALE = 1``) loses the 12-step roundtrip to Euler here
    (2.7e-3 against 1.5e-3); the multiscale warp wins it."""
    s = torch.linspace(-2, 2, 10)
    m = torch.stack([s, torch.sin(2 * s)], -1)
    S, w = 0.01 * torch.eye(2).expand(10, 2, 2), torch.full((10,), 0.1)
    flow = InflationaryFlow.from_gaussian_mixture(w, m, S)
    x = mixture_distribution(w, m, S).sample((300,))
    rt, rt_euler, enc_err, enc_euler, per_point, enc, dec, _ = _against_euler(flow, x)
    assert enc.nfe + dec.nfe <= 100
    assert rt < 0.75 * rt_euler and enc_err < 0.5 * enc_euler
    assert per_point.max() < enc.error


def test_error_budget_doubles_the_steps_or_raises(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    x = flow.sample(100, seed=1)
    ref = flow.encode(x, rtol=1e-10)
    z, info = flow.encode(x, method="warped_rk4", rtol=1e-5, return_info=True)
    assert info.num_steps > WARPED_STEPS and info.error <= 1e-5
    assert (z - ref).abs().max() < 2e-5
    with pytest.raises(SolverError, match=r"estimated error .* over rtol=1e-07; raise num_steps"):
        flow.encode(x, method="warped_rk4", num_steps=4, rtol=1e-7)
    with pytest.raises(ValueError, match="adjoint: not an option of method='warped_rk4'"):
        flow.encode(x, method="warped_rk4", adjoint=True)
    with pytest.raises(ValueError, match="num_steps: not an option of method='dopri5'"):
        flow.encode(x, method="dopri5", num_steps=12)
    with pytest.raises(ValueError, match="num_steps"):
        flow.encode(x, method="warped_rk4", num_steps=0)


def test_gaussian_flow_is_exact_and_log_prob_matches_dopri5(mixture2):
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    gauss = InflationaryFlow.from_gaussian_mixture(torch.ones(1), torch.zeros(1, 2), cov[None])
    x = torch.randn(50, 2, dtype=torch.float64)
    z, info = gauss.encode(x, method="warped_rk4", return_info=True)
    assert info.error < 1e-12  # the field is zero: nothing to get wrong
    assert torch.allclose(z, gauss.encode(x), atol=1e-12)
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    x = flow.sample(50, seed=2)
    lp = flow.log_prob(x, method="warped_rk4")
    assert torch.allclose(lp, flow.log_prob(x, rtol=1e-9), atol=5e-3)


def test_prior_keeps_its_grid_fixed_and_warns_once_over_budget(mixture2):
    flow = InflationaryFlow.from_gaussian_mixture(*mixture2)
    z = torch.randn(64, 2, dtype=torch.float64)
    x = flow.prior().transforms[0](z)
    same, info = flow.decode(z, method="warped_rk4", num_steps=WARPED_STEPS, rtol=1.0,
                             return_info=True)
    assert info.num_steps == WARPED_STEPS and torch.allclose(x, same)
    # the watch is the flow's: a new prior (as a model builds at every call) sees it
    assert flow.prior().transforms[0].max_error == flow.prior_watch.max_error == info.error > 0
    evaluations = []
    hook = flow.field.register_forward_hook(lambda *_: evaluations.append(1))
    with pytest.warns(UserWarning, match="over rtol=1e-07; the grid stays fixed"):
        flow.prior(rtol=1e-7).transforms[0](z)
    hook.remove()
    assert len(evaluations) == 4 * WARPED_STEPS + 1  # not doubled inside inference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.prior(rtol=1e-7).transforms[0](z.clone())  # once per flow


def test_warped_rk4_precomputed_time_state_is_exact_and_keeps_weight_gradients():
    """The grid's time-only terms are computed once per solve: same solution and the same
    gradients, to the weights of the time pathway included, as computing them per evaluation."""
    from pyro_inflow import datasets

    flow = InflationaryFlow.fit(datasets.load("moons", n=300, seed=0), steps=3, progress=False,
                                hidden=16, depth=1, dtype=torch.float64)
    net = flow.denoiser.network
    torch.nn.init.normal_(net.out.weight, std=0.3)
    flow.requires_grad_(True)
    w0 = torch.randn(5, 2, dtype=torch.float64)
    grid = SOLVERS["warped_rk4"].grid(flow.field, 6, w0)

    class PerEvaluation(torch.nn.Module):  # the same field, its time terms made every call
        def time_terms(self, t):
            return (t,)

        def forward(self, t, y, terms):
            return flow.field(terms[0], y)

    results = []
    for func in (flow.field, PerEvaluation()):
        net.zero_grad()
        w1, _ = warped_rk4(func, w0, grid, backward=True)
        w1.square().sum().backward()
        results.append((w1.detach(), net.time[0].weight.grad.clone()))
    (a, ga), (b, gb) = results
    assert (a - w0).abs().max() > 1e-2  # the network moves the points
    assert torch.allclose(a, b, atol=1e-12)
    assert ga.abs().max() > 1e-6 and torch.allclose(ga, gb, atol=1e-12)
