"""Shared helpers for the tests (closed-form references)."""

import os

import torch

from pyro_inflow import InflationaryFlow


def random_mixture(K: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=gen) + 0.2
    m = torch.randn(K, D, generator=gen) * 1.5
    A = torch.randn(K, D, D, generator=gen) * 0.4
    S = A @ A.mT + 0.05 * torch.eye(D)
    return w / w.sum(), m, S


def mixture_distribution(w, m, S, extra_var: float = 0.0):
    D = m.shape[-1]
    comp = torch.distributions.MultivariateNormal(m, S + extra_var * torch.eye(D))
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(w), comp)


class Evil:
    """Unpickling this runs ``touch marker``: a file that must never be executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def gaussian_flow_and_law(D, seed=0):
    """An exact Gaussian flow of dimension ``D`` and its t = 0 law (a MultivariateNormal)."""
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(D, D, generator=gen, dtype=torch.float64)
    S = B @ B.T / D + 0.3 * torch.eye(D, dtype=torch.float64)
    m = torch.randn(D, generator=gen, dtype=torch.float64)
    flow = InflationaryFlow.from_gaussian_mixture(torch.ones(1, dtype=torch.float64), m[None],
                                                  S[None])
    # the flow's t = 0 marginal: the Gaussian plus gamma0 noise in scaled units
    S0 = S + flow.schedule.gamma0 * flow.basis.scale**2 * torch.eye(D, dtype=torch.float64)
    return flow, torch.distributions.MultivariateNormal(m, S0)
