"""The torchdiffeq solvers: adaptive (tolerance-controlled) and fixed-step."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from ._base import Counted, SolveInfo, SolverError, nonfinite

__all__ = ["TorchdiffeqSolver", "ADAPTIVE", "FIXED"]

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


def _pointwise_norm(x: Tensor) -> Tensor:
    """Largest per-point RMS over the last dimension: every point meets the tolerance."""
    if x.dim() < 2:
        return x.abs().max()
    return x.square().mean(-1).sqrt().max()


class TorchdiffeqSolver:
    """One of torchdiffeq's methods, by name.

    Adaptive methods take ``max_num_steps`` (step budget, default 10,000) and ``first_step``
    (default ``|t1 - t0| / 100``: torchdiffeq's heuristic divides by the field's norm, which
    nearly vanishes for near-Gaussian data, and in float32 its rounding noise proposed first
    steps far past ``t1``); they land on ``t1`` instead of stepping past it, because the
    schedule overflows far beyond ``T``. Fixed-step methods take ``step_size`` (default
    ``|t1 - t0| / 100``). Both take ``adjoint``: backpropagate with the adjoint method (a second
    ODE solved backward, memory independent of the number of steps); gradients then flow to
    the initial state only.

    Args:
        name: a torchdiffeq method, one of ``ADAPTIVE + FIXED``.
    """

    default_rtol = 1e-5

    def __init__(self, name: str) -> None:
        self.name = name
        self.adaptive = name in ADAPTIVE
        self.options = frozenset({"adjoint", "max_num_steps", "first_step"} if self.adaptive
                                 else {"adjoint", "step_size"})

    def __call__(self, func: nn.Module, field: nn.Module, y0: Tensor, t0: float, t1: float,
                 rtol: float, atol: float, options: dict) -> tuple[Tensor, SolveInfo]:
        """Integrate ``func`` from ``t0`` to ``t1``."""
        counted = Counted(func, y0, (t0, t1))
        times = torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)
        if self.adaptive:
            first = options.get("first_step")
            settings = {"max_num_steps": options.get("max_num_steps", 10_000),
                        "norm": _pointwise_norm, "step_t": times,
                        "first_step": 0.01 * abs(t1 - t0) if first is None else first}
        else:
            settings = {"step_size": options.get("step_size") or abs(t1 - t0) / 100}
        integrate = (functools.partial(odeint_adjoint, adjoint_params=())
                     if options.get("adjoint") else odeint)
        try:
            y1 = integrate(counted, y0, times, method=self.name, rtol=rtol, atol=atol,
                           options=settings)[-1]
        except (AssertionError, torch.linalg.LinAlgError) as e:
            raise self._failure(counted, t0, t1, e) from e
        if (self.adaptive or options["nonfinite"] == "raise") and not torch.isfinite(y1).all():
            raise nonfinite(counted, t0, t1, "try method='dopri5' or tighter tolerances")
        return y1, SolveInfo(counted.nfe, self.name, float(rtol), float(atol), float(t0),
                             float(t1))

    @staticmethod
    def _failure(counted: Counted, t0: float, t1: float, e: Exception) -> SolverError:
        reached = float("nan") if counted.last_t is None else float(counted.last_t)
        bad = float(counted.first_bad)
        if not math.isnan(bad):
            return SolverError(
                f"ODE solve from t={t0:.4g} to t={t1:.4g} failed: the vector field returned "
                f"non-finite values (first at t={bad:.4g}, evaluation {counted.first_bad_nfe}) "
                f"and the step size collapsed at t={reached:.4g} ({e}); check the denoiser "
                f"and the input for extreme values")
        return SolverError(
            f"ODE solve from t={t0:.4g} to t={t1:.4g} failed at t={reached:.4g} after "
            f"{counted.nfe} evaluations ({e}); loosen rtol/atol, raise max_num_steps or "
            f"check the input for extreme values")
