"""Integrating the pfODE: one :func:`solve` in front of a registry of solvers.

``SOLVERS`` maps a method name to a solver object: ``"warped_rk4"`` (this package's fixed grid
in a warped time, :mod:`pyro_inflow.solvers.warped`) and torchdiffeq's adaptive and fixed-step
methods (:mod:`pyro_inflow.solvers.diffeq`). Each solver takes the options it names
(``solver.options``) and reports what it did in a :class:`SolveInfo`, which :func:`solve`
returns; nothing is stored on the field or the flow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..pfode import AugmentedField, PFODEField, probes
from ._base import SolveInfo, SolverError
from .diffeq import ADAPTIVE, FIXED, TorchdiffeqSolver
from .warped import WARPED_RTOL, WARPED_STEPS, WarpedRK4

__all__ = ["solve", "SolveInfo", "SolverError", "SOLVERS", "METHODS", "NONFINITE", "WARPED_RTOL",
           "WARPED_STEPS"]

#: Solvers by name.
SOLVERS: dict = {"warped_rk4": WarpedRK4(),
                 **{name: TorchdiffeqSolver(name) for name in ADAPTIVE + FIXED}}
#: Valid ``method`` names, the package's own first.
METHODS = tuple(SOLVERS)
#: What a solve does with non-finite values: raise, or (fixed steps) return them.
NONFINITE = ("raise", "return")


def solve(
    field: PFODEField,
    w0: Tensor,
    t0: float,
    t1: float,
    *,
    logdet: bool = False,
    trace: str = "exact",
    num_probes: int = 8,
    seed: int = 0,
    method: str = "dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    nonfinite: str = "raise",
    **options: object,
) -> tuple[Tensor, Tensor | None, SolveInfo]:
    """Integrate the standardized pfODE from ``t0`` to ``t1``.

    Args:
        field: the right-hand side.
        w0: initial standardized state ``(*, D)``.
        t0: start time.
        t1: end time (``t1 < t0`` integrates backward).
        logdet: also integrate ``log |det dw(t1)/dw(t0)|``.
        trace: ``"exact"`` or ``"hutchinson"`` (Rademacher probes drawn once from ``seed``).
        num_probes: Hutchinson probes.
        seed: seed of the Hutchinson probes.
        method: a name in ``METHODS``: ``"warped_rk4"`` (fixed grid with an embedded error
            estimate) or a torchdiffeq method, adaptive (``"dopri5"``, ...) or fixed-step
            (``"euler"``, ``"rk4"``, ...).
        rtol: adaptive relative tolerance per point (default ``1e-5``; the state is
            standardized, so it is on the same scale as ``atol``). For ``warped_rk4``,
            ``rtol`` (default ``WARPED_RTOL``) is the error budget: without ``num_steps`` the
            steps double from ``WARPED_STEPS`` until the error estimate meets it; with
            ``num_steps`` a solve whose estimate exceeds it raises.
        atol: adaptive absolute tolerance per point (``None`` means ``atol = rtol``).
        nonfinite: ``"raise"`` (a :class:`SolverError` naming where non-finite values began)
            or ``"return"``: fixed-step methods return the rows that overflowed as they are
            (``inf``/``nan``), as a Normal's density returns ``-inf`` far out; the prior uses
            it, so that a sampler's wild step counts as a divergence instead of ending the run.
            Adaptive methods cannot step past non-finite values and raise either way.
        **options: the method's own options (``None`` means its default): ``num_steps``
            (``warped_rk4``: ``4 num_steps + 1`` evaluations), ``step_size`` (fixed-step
            torchdiffeq methods), ``max_num_steps`` and ``first_step`` (adaptive ones),
            ``adjoint`` (torchdiffeq methods: the adjoint method; gradients flow to ``w0``
            only, the field's weights are treated as constants).

    Returns:
        ``w1`` ``(*, D)``, the log-det ``(*)`` or ``None``, and a :class:`SolveInfo`.

    Raises:
        ValueError: unknown ``method``, ``trace`` or option, bad tolerances.
        SolverError: step budget exceeded, step-size underflow, or non-finite values.
    """
    if method not in SOLVERS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: expected one of {NONFINITE}, got {nonfinite!r}")
    solver = SOLVERS[method]
    options = {k: v for k, v in options.items() if v is not None and v is not False}
    unknown = sorted(set(options) - solver.options)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of method={method!r} (it takes "
                         f"{sorted(solver.options) or 'none'})")
    steps = options.get("num_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"num_steps: expected a positive integer, got {steps!r}")
    rtol = solver.default_rtol if rtol is None else rtol
    atol = rtol if atol is None else atol
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol, atol: expected positive tolerances, got {rtol}, {atol}")
    func: nn.Module = field
    y0 = w0
    if logdet:
        func = AugmentedField(field, *probes(w0, trace, num_probes, seed),
                              exact=trace == "exact")
        y0 = torch.cat([w0, w0.new_zeros(*w0.shape[:-1], 1)], dim=-1)
    options["nonfinite"] = nonfinite
    y1, info = solver(func, field, y0, float(t0), float(t1), rtol, atol, options)
    if logdet:
        return y1[..., :-1], y1[..., -1], info
    return y1, None, info
