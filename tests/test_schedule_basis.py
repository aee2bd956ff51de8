import math
import warnings

import pytest
import torch

from pyro_inflow import InflationSchedule
from pyro_inflow.basis import EigenBasis


def test_an_unknown_named_gap_is_refused():
    with pytest.raises(ValueError, match="inflation_gap: expected a number or 'paper'"):
        InflationSchedule(3, "prr", 2, inflation_gap="papr")


@pytest.mark.parametrize(
    "dim, kind, d, gap, expected",
    [
        (3, "prp", None, None, [0.0, 0.0, 0.0]),
        (3, "prr", 2, None, [1.0, 1.0, -2.0]),
        (4, "prr", 1, None, [1.0, -1 / 3, -1 / 3, -1 / 3]),
        (4, "prr", 2, 1.02, [1.0, 1.0, -1.02, -1.02]),
        (3, "prr", 2, "paper", [1.0, 1.0, -0.02]),  # the paper's 1 + g = 0.98
    ],
)
def test_g_per_schedule(dim, kind, d, gap, expected):
    s = InflationSchedule(dim, kind, d, inflation_gap=gap)
    assert s.g.tolist() == pytest.approx(expected)
    assert s.dims_to_keep == (d or dim)
    if kind == "prr" and gap is None:
        assert float(s.g.sum()) == pytest.approx(0.0, abs=1e-12)  # PR-reducing keeps sum(g)=0


def test_gamma_rate_and_sigma_match_closed_forms_and_finite_differences():
    s = InflationSchedule(3, "prr", 2, gamma0=1e-3, rho=0.7, t_max=10.0)
    t = torch.tensor([0.0, 1.3, 4.0])
    gamma = s.gamma(t)
    assert gamma.shape == (3, 3)
    assert torch.allclose(gamma, 1e-3 * torch.exp(0.7 * (1 + s.g) * t[:, None]))
    h = 1e-6  # the rate is d log gamma / dt, the constant the pfODE uses
    assert torch.allclose((s.gamma(t + h).log() - s.gamma(t - h).log()) / (2 * h),
                          s.rate.expand(3, 3), rtol=1e-6)
    lam = torch.tensor([1.0, 0.5, 0.1])
    assert torch.allclose(s.sigma(t, lam), lam + gamma)


def test_auto_t_max_prp_rule_is_tight():
    s = InflationSchedule(2)
    T = s.t_max
    frac = lambda t: 1.0 / (1.0 + float(s.gamma(t)[0]))  # noqa: E731  lam_max = 1
    assert frac(T) <= s.tol * (1 + 1e-9)
    assert frac(T - 0.05) > s.tol
    assert 14 < T < 18  # near the paper's T ~ 15


def test_auto_t_max_prr_compresses_scaled_state():
    lam = [1.0, 0.6, 0.3]
    s = InflationSchedule(3, "prr", 2, lam=lam)
    g = s.gamma(s.t_max)
    ratio = (lam[2] + float(g[2])) / (lam[1] + float(g[1]))
    assert ratio <= s.tol**2 * (1 + 1e-6)
    g_before = s.gamma(s.t_max - 0.05)
    assert (lam[2] + float(g_before[2])) / (lam[1] + float(g_before[1])) > s.tol**2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 3, "schedule": "prr", "dims_to_keep": 3}, r"dims_to_keep: expected .* \[1, 2\]"),
        ({"dim": 3, "schedule": "prr", "dims_to_keep": 0}, r"dims_to_keep: expected .* \[1, 2\]"),
        ({"dim": 3, "schedule": "prr"}, "dims_to_keep"),
        ({"dim": 3, "schedule": "prp", "dims_to_keep": 2}, "use schedule='prr'"),
        ({"dim": 3, "schedule": "vp"}, r"schedule: expected one of \('prp', 'prr'\)"),
        ({"dim": 3, "gamma0": -1.0}, "gamma0: expected a finite positive number"),
        ({"dim": 3, "t_max": float("nan")}, "t_max: expected a finite positive number"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InflationSchedule(**kwargs)


def test_eigen_basis_conventions():
    A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.2]])
    x = torch.randn(20_000, 3) @ A.T + torch.tensor([1.0, -2.0, 0.5])
    b = EigenBasis.from_data(x)
    assert torch.allclose(b.W.T @ b.W, torch.eye(3), atol=1e-12)
    assert b.lam[0] == 1.0 and (b.lam.diff() < 0).all()
    first = (b.W.abs() >= 0.5 * b.W.abs().amax(0)).int().argmax(0)
    assert (b.W[first, torch.arange(3)] > 0).all()  # sign convention
    u = b.to_eigen(x)
    assert torch.allclose(torch.cov(u.T), torch.diag(b.lam), atol=1e-10)
    assert torch.allclose(b.from_eigen(u), x, atol=1e-12)
    assert float(b.scale) ** 2 == pytest.approx(float(torch.linalg.eigvalsh(torch.cov(x.T))[-1]))


def test_degenerate_direction_is_floored_not_nan():
    x = torch.randn(500, 3)
    x[:, 2] = x[:, 0] + x[:, 1]  # exactly rank 2
    with pytest.warns(UserWarning, match="raised to that floor"):
        b = EigenBasis.from_data(x)
    assert torch.isfinite(b.lam).all() and float(b.lam[-1]) == pytest.approx(1e-6)


def test_constant_data_is_an_error():
    with pytest.raises(ValueError, match="every direction has zero variance"):
        EigenBasis.from_data(torch.ones(10, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EigenBasis.from_data(torch.randn(10, 2))  # a normal case warns about nothing
    assert math.isfinite(1.0)


def test_eigen_basis_signs_are_stable_for_standardized_2d_data():
    """Standardized 2-D data have eigenvectors at 45 degrees: their two entries tie in
    magnitude. The sign must not follow the sampling noise (it did, with 'largest entry
    positive', and two training seeds then gave opposite latents)."""
    gen = torch.Generator().manual_seed(0)
    L = torch.linalg.cholesky(torch.tensor([[1.0, 0.6], [0.6, 1.0]]))
    Ws = []
    for _ in range(20):
        x = torch.randn(2000, 2, generator=gen) @ L.T
        Ws.append(EigenBasis.from_data((x - x.mean(0)) / x.std(0)).W)
    for W in Ws[1:]:
        assert torch.allclose(W, Ws[0], atol=0.05)
