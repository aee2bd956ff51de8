r"""The probability-flow ODE in the standardized state, and its divergence.

In unscaled eigen-coordinates the pfODE is (paper Eq. 7 with ``dC/dt C^{-1} = rho (1 + g)``)::

    d ut / dt = 0.5 rho (1 + g) (ut - Dn(ut, t)).

This module holds the exactly equivalent ODE of the *standardized state*
``w = ut / sqrt(sigma(t))``, ``sigma(t) = lam + gamma(t)``::

    dw / dt = 0.5 rho (1 + g) / sqrt(sigma) * (c_skip ut - Dn(ut, t)),   c_skip = lam / sigma,

whose right-hand side is zero for Gaussian data (``c_skip ut`` is the Gaussian denoiser), so a
solver follows only the non-Gaussian part and every coordinate stays of order one, kept or
compressed. The latent is ``z = w(T)`` (kept dimensions), this package's convention
``z_i = ut_i(T) / sqrt(lam_i + gamma_i(T))``.

The log-determinant comes from the instantaneous change of variables integrated alongside the
state, ``d log|det dw(t)/dw(0)| / dt = tr(d f / d w)``: exact (a vectorized vector-Jacobian
product per dimension, ``torch.func``) or a Hutchinson estimate with probes fixed for the whole
solve (:class:`AugmentedField`). The solvers live in :mod:`pyro_inflow.solvers`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from .denoisers import Denoiser
from .schedule import InflationSchedule

__all__ = ["PFODEField", "AugmentedField", "TRACES", "probes"]

TRACES = ("exact", "hutchinson")


class PFODEField(nn.Module):
    """Right-hand side ``f(t, w)`` of the standardized pfODE.

    Holds no solver state: the solvers (:mod:`pyro_inflow.solvers`) call it and keep their own.

    Args:
        denoiser: ``Dn(ut, t)`` in eigen-coordinates; its ``schedule`` defines the flow.
        lam: ``(D,)`` eigenvalues of the data covariance.
    """

    lam: Tensor

    def __init__(self, denoiser: Denoiser, lam: Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("lam", lam)

    @property
    def schedule(self) -> InflationSchedule:
        """The denoiser's :class:`~pyro_inflow.InflationSchedule`."""
        return self.denoiser.schedule

    def time_terms(self, t: Tensor) -> tuple[Tensor, ...]:
        """What ``f(t, .)`` needs of the times ``t`` ``(*t)`` alone (the denoiser's
        :meth:`~pyro_inflow.denoisers.Denoiser.time_terms`): computed once per time rather than
        once per point, and by ``warped_rk4`` once per solve for its whole grid."""
        return self.denoiser.time_terms(t, self.lam)

    def forward(self, t: Tensor, w: Tensor, terms: tuple[Tensor, ...] | None = None) -> Tensor:
        """``dw/dt`` for ``w`` of shape ``(*, D)`` at scalar ``t``; ``terms`` are
        :meth:`time_terms` of ``t``, computed here when not given."""
        terms = self.time_terms(t) if terms is None else terms
        return self.denoiser.velocity(w, terms)

    def with_divergence(self, t: Tensor, w: Tensor, probes: Tensor, weight: float,
                        terms: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``f(t, w)`` ``(*, D)`` and ``weight * sum_p eps_p^T J eps_p`` ``(*)``.

        With the ``D`` basis vectors as ``probes`` and ``weight = 1`` this is the exact trace;
        with ``P`` Rademacher probes and ``weight = 1 / P``, the Hutchinson estimate.
        """
        terms = self.time_terms(t) if terms is None else terms
        f, pullback = vjp(lambda w_: self.forward(t, w_, terms), w)
        vjps = vmap(lambda v: pullback(v)[0])(probes)  # (P, *, D)
        return f, weight * (vjps * probes).sum(-1).sum(0)


class AugmentedField(nn.Module):
    """State ``[w, log det]`` of shape ``(*, D + 1)``; the log-det column integrates the trace.

    Args:
        field: the pfODE.
        probes: ``(P, *, D)`` from :func:`probes`, fixed for the whole solve.
        weight: the weight of their sum.
        exact: the probes are the ``D`` basis vectors with weight 1 (the exact trace), which
            the compiled kernel computes itself (:mod:`pyro_inflow.solvers.fused`).
    """

    def __init__(self, field: PFODEField, probes: Tensor, weight: float,
                 exact: bool = False) -> None:
        super().__init__()
        self.field, self.probes, self.weight, self.exact = field, probes, weight, exact

    @property
    def schedule(self) -> InflationSchedule:
        """The field's schedule."""
        return self.field.schedule

    def time_terms(self, t: Tensor) -> tuple[Tensor, ...]:
        """The field's :meth:`PFODEField.time_terms`."""
        return self.field.time_terms(t)

    def forward(self, t: Tensor, y: Tensor, terms: tuple[Tensor, ...] | None = None) -> Tensor:
        """``[f, tr(df/dw)]`` ``(*, D + 1)`` at ``y = [w, log det]``."""
        f, div = self.field.with_divergence(t, y[..., :-1], self.probes, self.weight, terms)
        return torch.cat([f, div.unsqueeze(-1)], dim=-1)


def probes(w0: Tensor, trace: str, num_probes: int, seed: int) -> tuple[Tensor, float]:
    """Probe vectors ``(P, *, D)`` for the divergence, made once per solve, and their weight.

    ``trace="exact"``: the ``D`` basis vectors, weight 1. ``"hutchinson"``: ``num_probes``
    Rademacher vectors drawn from ``seed`` (so the estimate is a deterministic function of the
    state, as NUTS needs), weight ``1 / num_probes``.
    """
    if trace not in TRACES:
        raise ValueError(f"trace: expected one of {TRACES}, got {trace!r}")
    if trace == "exact":
        dim = w0.shape[-1]
        eye = torch.eye(dim, dtype=w0.dtype, device=w0.device)
        return eye.reshape(dim, *([1] * (w0.dim() - 1)), dim).expand(dim, *w0.shape), 1.0
    # the same probes for every point: a point's estimate does not depend on the batch it is
    # in (chunked evaluation gives the numbers of one batch, and a prior's value at x does
    # not change with the other points of a plate)
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same probes on any device
    shape = (num_probes, *[1] * (w0.dim() - 1), w0.shape[-1])
    signs = torch.randint(0, 2, shape, generator=gen).to(w0.device)
    return (signs.to(w0.dtype) * 2 - 1).expand(num_probes, *w0.shape), 1.0 / num_probes
