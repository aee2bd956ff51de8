"""Reference problems shared by the demo, the tests and the benchmarks, defined once.

* The moons inverse problem: a 2-D prior and one ambiguous observation
  ``y = x0 + x1 + Normal(0, NOISE)`` with ``y = Y_OBS``, whose posterior is bimodal and curved;
  :func:`moons_model` is its Pyro model and :func:`quadrature_right_moon` the posterior mass
  of the right-hand moon (``x0 > 0``) by quadrature, the answer NUTS must reproduce.
* :func:`authors_euler`: the paper's own solver (fixed-step Euler in ``t`` with ``h = 0.01``),
  the reference the package's solvers are measured against.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

__all__ = ["Y_OBS", "NOISE", "moons_model", "quadrature_right_moon", "authors_euler"]

#: The observation and its noise of the moons inverse problem.
Y_OBS, NOISE = 0.5, 0.3


def moons_model(prior: dist.Distribution) -> Callable[[Tensor], None]:
    """``model(y)``: ``x ~ prior`` (site ``"x"``, ``(2,)``), ``y ~ Normal(x0 + x1, NOISE)``."""

    def model(y: Tensor) -> None:
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), NOISE), obs=y)

    return model


def quadrature_right_moon(log_prior: Callable[[Tensor], Tensor], lo: tuple[float, float] = (-3.0,
                          -3.0), hi: tuple[float, float] = (3.0, 3.0), n: int = 101) -> float:
    """Posterior mass of ``x0 > 0`` by a grid sum of prior density times likelihood.

    Args:
        log_prior: log-density of the prior at points ``(m, 2)`` (float64), e.g.
            ``lambda x: flow.log_prob(x, method="warped_rk4")``.
        lo: the grid's lower corner.
        hi: the grid's upper corner.
        n: points per axis.
    """
    g0 = torch.linspace(lo[0], hi[0], n, dtype=torch.float64)
    g1 = torch.linspace(lo[1], hi[1], n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        lp = torch.cat([log_prior(c).double() for c in grid.split(8192)])
    lp = lp + dist.Normal(grid.sum(-1), NOISE).log_prob(torch.tensor(Y_OBS, dtype=grid.dtype))
    post = torch.softmax(lp, 0)
    return float(post[grid[:, 0] > 0].sum())


def authors_euler(field: nn.Module, w: Tensor, t0: float, t1: float,
                  h: float = 0.01) -> tuple[Tensor, int]:
    """The authors' fixed-step Euler in ``t`` with step ``h`` (their toys: ``h = 0.01``):
    ``w(t1)`` ``(*, D)`` and the number of evaluations."""
    n = round(abs(t1 - t0) / h)
    ts = torch.linspace(t0, t1, n + 1, dtype=w.dtype)
    for k in range(n):
        w = w + field(ts[k], w) * (ts[k + 1] - ts[k])
    return w, n
