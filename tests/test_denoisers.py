import torch
from _helpers import random_mixture

from pyro_inflow import EmpiricalDenoiser, GaussianMixtureDenoiser, InflationSchedule
from pyro_inflow.denoisers import PreconditionedDenoiser
from pyro_inflow.networks import MLP, ResidualMLP


def test_mixture_denoiser_satisfies_tweedie():
    """E[u | ut] = ut + C(t) grad log p_t(ut), with p_t the exact convolved mixture."""
    sched = InflationSchedule(3, "prr", 2, t_max=8.0)
    w, m, S = random_mixture(4, 3, seed=1)
    den = GaussianMixtureDenoiser(sched, w, m, S)
    ut = torch.randn(50, 3, requires_grad=True) * 2
    for t in (0.0, 1.0, 3.0):
        (score,) = torch.autograd.grad(den.log_marginal(ut, torch.tensor(t)).sum(), ut)
        tweedie = ut + sched.gamma(t) * score
        assert torch.allclose(den(ut, torch.tensor(t)), tweedie, atol=1e-10)


def test_mixture_log_marginal_is_the_convolved_mixture():
    sched = InflationSchedule(2, t_max=5.0)
    w, m, S = random_mixture(3, 2, seed=2)
    den = GaussianMixtureDenoiser(sched, w, m, S)
    ut = torch.randn(20, 2)
    g = float(sched.gamma(2.0)[0])
    comp = torch.distributions.MultivariateNormal(m, S + g * torch.eye(2))
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(w), comp)
    assert torch.allclose(den.log_marginal(ut, torch.tensor(2.0)), ref.log_prob(ut), atol=1e-12)


def test_empirical_denoiser_equals_point_mass_mixture_and_is_chunk_invariant():
    sched = InflationSchedule(3, t_max=6.0)
    pts = torch.randn(300, 3)
    emp = EmpiricalDenoiser(sched, pts)
    small = EmpiricalDenoiser(sched, pts, max_elements=1000)  # many chunks
    mix = GaussianMixtureDenoiser(sched, torch.ones(300), pts, torch.zeros(300, 3, 3))
    ut = torch.randn(7, 11, 3)  # batch dims of any shape
    for t in (0.0, 2.0, 5.0):
        ref = mix(ut, torch.tensor(t))
        assert torch.allclose(emp(ut, torch.tensor(t)), ref, atol=1e-10)
        assert torch.allclose(small(ut, torch.tensor(t)), ref, atol=1e-10)


def test_preconditioned_denoiser_with_zero_network_is_the_exact_gaussian_denoiser():
    lam = torch.tensor([1.0, 0.4, 0.1])
    sched = InflationSchedule(3, "prr", 1, t_max=9.0)
    for net in (MLP(3), ResidualMLP(3)):
        den = PreconditionedDenoiser(sched, lam, net.double())
        gauss = GaussianMixtureDenoiser(sched, torch.ones(1), torch.zeros(1, 3),
                                        torch.diag(lam)[None])
        ut = torch.randn(10, 3)
        t = torch.rand(10) * 9  # per-point times
        assert torch.allclose(den(ut, t), gauss(ut[:, None], t[:, None])[:, 0], atol=1e-12)


def test_preconditioned_loss_is_the_weighted_denoising_error():
    lam = torch.tensor([1.0, 0.3])
    sched = InflationSchedule(2, t_max=10.0)
    net = MLP(2).double()
    torch.nn.init.normal_(net.net[-1].weight)
    den = PreconditionedDenoiser(sched, lam, net)
    u, t, eps = torch.randn(64, 2), torch.rand(64) * 10, torch.randn(64, 2)
    ut = u + sched.gamma(t).sqrt() * eps
    _, c_out, _, _ = den.preconditioning(t)
    direct = ((den(ut, t) - u) / c_out).square().sum(-1)
    assert torch.allclose(den.loss(u, t, eps), direct, rtol=1e-9)


def test_networks_split_time_features_from_the_state_pathway_exactly():
    """``forward(x, c) == forward_features(x, time_features(c))``, the split equals the plain
    formulas, and features of one time broadcast over the points."""
    silu = torch.nn.functional.silu
    x, c = torch.randn(9, 3, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    mlp, res = MLP(3).double(), ResidualMLP(3, hidden=16, depth=2).double()
    for net in (mlp, res):
        torch.nn.init.normal_(net.net[-1].weight if net is mlp else net.out.weight)
    plain_mlp = mlp.net(torch.cat([x, mlp.embed(c)], dim=-1))
    h = res.inp(x) + silu(res.time(res.embed(c)))
    for lin1, lin2, emb in res.blocks:
        h = h + lin2(silu(lin1(silu(h)) + emb(silu(res.time(res.embed(c))))))
    plain_res = res.out(silu(h))
    for net, plain in ((mlp, plain_mlp), (res, plain_res)):
        assert plain.abs().max() > 1e-3  # not the zero-initialized output
        assert torch.allclose(net(x, c), plain, atol=1e-12)
        one = net.forward_features(x, net.time_features(c[0]))
        assert torch.allclose(one, net(x, c[0].expand(9)), atol=1e-12)
