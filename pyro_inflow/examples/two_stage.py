"""A two-stage analysis with a known answer: the posterior of study 1 as the prior of study 2.

``theta = (a, b) ~ N(0, I_2)``. Study 1 measures the product: ``y1 ~ N(a b, NOISE1)``, observed
``Y1``; its posterior is two curved arms along the hyperbola ``a b = Y1``, one in each of the
quadrants ``a, b > 0`` and ``a, b < 0``, of equal mass. Study 2 measures the sum:
``y2 ~ N(a + b, NOISE2)``, observed ``Y2``, which favours one arm. The posterior of both studies
together is a grid sum (:func:`joint_quadrature`); the two-stage route fits a flow to draws of
study 1's posterior (:func:`stage1_draws`, exact draws from its grid) and uses it as the prior
of study 2 (:func:`study2_model`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["Y1", "NOISE1", "Y2", "NOISE2", "study1_model", "study2_model", "joint_model",
           "stage1_draws", "joint_quadrature", "importance_moments", "moments"]

#: Study 1: the observed product and its noise. Study 2: the observed sum and its noise.
Y1, NOISE1, Y2, NOISE2 = 1.0, 0.2, 1.0, 2.0
_LIM, _N = 4.5, 901


def study1_model(y1: Tensor | None = None) -> Tensor:
    """Study 1: ``theta ~ N(0, I_2)``, ``y1 ~ N(theta0 theta1, NOISE1)``."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0)
                        .to_event(1))
    pyro.sample("y1", dist.Normal(theta[..., 0] * theta[..., 1], NOISE1), obs=y1)
    return theta


def study2_model(prior: dist.Distribution, y2: Tensor | None = None) -> Tensor:
    """Study 2 under ``prior`` (study 1's posterior): ``y2 ~ N(theta0 + theta1, NOISE2)``."""
    theta = pyro.sample("theta", prior)
    pyro.sample("y2", dist.Normal(theta.sum(-1), NOISE2), obs=y2)
    return theta


def joint_model(y1: Tensor | None = None, y2: Tensor | None = None) -> Tensor:
    """Both studies analysed together (the reference the two-stage route must reproduce)."""
    theta = study1_model(y1)
    pyro.sample("y2", dist.Normal(theta.sum(-1), NOISE2), obs=y2)
    return theta


def _grid() -> tuple[Tensor, float]:
    axis = torch.linspace(-_LIM, _LIM, _N, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return grid, float(axis[1] - axis[0])


def _log_stage1(grid: Tensor) -> Tensor:
    prior = -0.5 * grid.square().sum(-1)
    return prior + dist.Normal(grid.prod(-1), NOISE1).log_prob(torch.tensor(Y1,
                                                                             dtype=grid.dtype))


def _log_lik2(theta: Tensor) -> Tensor:
    return dist.Normal(theta.sum(-1), NOISE2).log_prob(torch.tensor(Y2, dtype=theta.dtype))


def stage1_draws(n: int, seed: int = 0) -> Tensor:
    """``n`` exact draws ``(n, 2)`` of study 1's posterior (grid cells, jittered within)."""
    grid, h = _grid()
    probs = torch.softmax(_log_stage1(grid), 0)
    gen = torch.Generator().manual_seed(seed)
    cells = torch.multinomial(probs, n, replacement=True, generator=gen)
    jitter = (torch.rand(n, 2, generator=gen, dtype=torch.float64) - 0.5) * h
    return grid[cells] + jitter


def moments(theta: Tensor, weights: Tensor | None = None) -> dict:
    """Means ``(2,)``, sds ``(2,)`` and the mass of the arm ``a > 0`` of (weighted) points."""
    w = (torch.ones(len(theta), dtype=theta.dtype) if weights is None else weights)
    w = w / w.sum()
    mean = (w[:, None] * theta).sum(0)
    sd = (w[:, None] * (theta - mean).square()).sum(0).sqrt()
    return {"mean": mean.tolist(), "sd": sd.tolist(),
            "arm_mass": float(w[theta[:, 0] > 0].sum())}


def joint_quadrature() -> dict:
    """The joint posterior's :func:`moments` by a grid sum (901 x 901 points on
    ``[-4.5, 4.5]^2``)."""
    grid, _ = _grid()
    return moments(grid, torch.softmax(_log_stage1(grid) + _log_lik2(grid), 0))


def importance_moments(prior_draws: Tensor) -> dict:
    """Study 2's posterior :func:`moments` from draws ``(m, 2)`` of a prior, weighted by study
    2's likelihood (exact in the limit of many draws; study 2's data are weak, so the
    weights are even)."""
    theta = prior_draws.to(torch.float64)
    logw = _log_lik2(theta)
    return moments(theta, torch.exp(logw - logw.max()))

