"""Shared helpers for the tests (closed-form references)."""

import os

import torch


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
