"""What every solver shares: the solve record, the error type, and an evaluation counter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["SolveInfo", "SolverError", "Counted", "nonfinite"]


class SolverError(RuntimeError):
    """The ODE solve failed: step budget exceeded, step size underflow, or non-finite values."""


@dataclass(frozen=True)
class SolveInfo:
    """What one solve did: function evaluations, solver and tolerances, time span.

    ``error`` is the solver's own estimate of its global error (largest per-point RMS over the
    state, standardized units) and ``num_steps`` the steps taken, where the method has them
    (``warped_rk4``), else ``None``.
    """

    nfe: int
    method: str
    rtol: float
    atol: float
    t0: float
    t1: float
    error: float | None = None
    num_steps: int | None = None


class Counted(nn.Module):
    """Counts evaluations of ``func`` and remembers the first time a non-finite derivative
    appeared (on the device, without a host sync per evaluation)."""

    def __init__(self, func: nn.Module, like: Tensor, span: tuple[float, float]) -> None:
        super().__init__()
        self.func, self.nfe, self.last_t = func, 0, None
        self.lo, self.hi = (torch.tensor(min(span), dtype=like.dtype, device=like.device),
                            torch.tensor(max(span), dtype=like.dtype, device=like.device))
        self.first_bad = torch.full((), math.nan, dtype=like.dtype, device=like.device)
        self._first_bad_nfe = torch.zeros((), dtype=torch.long, device=like.device)

    def time_terms(self, t: Tensor) -> tuple[Tensor, ...]:
        """The wrapped field's time terms."""
        return self.func.time_terms(t)

    def forward(self, t: Tensor, y: Tensor, terms: tuple[Tensor, ...] | None = None) -> Tensor:
        """``func(t, y)``, counted and watched."""
        self.nfe += 1
        self.last_t = t
        dy = self.func(t, y, terms)
        # the solver's initial step selection may probe times outside the span: ignored
        t = t.detach()
        new = ~torch.isfinite(dy).all() & torch.isnan(self.first_bad) & (t >= self.lo) & (
            t <= self.hi)
        self.first_bad = torch.where(new, t, self.first_bad)
        self._first_bad_nfe = torch.where(new, self.nfe, self._first_bad_nfe)
        return dy

    @property
    def first_bad_nfe(self) -> int:
        """The evaluation at which the first non-finite derivative appeared (0: none)."""
        return int(self._first_bad_nfe)


def nonfinite(counted: Counted, t0: float, t1: float, hint: str) -> SolverError:
    """The error for a solve that produced non-finite values, naming where they began."""
    return SolverError(
        f"ODE solve from t={t0:.4g} to t={t1:.4g} produced non-finite values (first at "
        f"t={float(counted.first_bad):.4g}, evaluation {counted.first_bad_nfe} of "
        f"{counted.nfe}); {hint}"
    )
