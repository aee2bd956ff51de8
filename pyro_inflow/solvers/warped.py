r"""``warped_rk4``: classic RK4 on a fixed grid in a warped time, with an embedded error estimate.

The grid puts the steps where the flow moves (see :func:`warped_grid`); the same grid serves
both directions, so encode and decode are inverse to its error. It is the prior's solver: a
fixed grid makes the potential a smooth, deterministic function of the latent, as HMC needs.
"""

from __future__ import annotations

import math
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from ._base import Counted, SolveInfo, SolverError, nonfinite
from .fused import fused_warped_rk4

__all__ = ["WarpedRK4", "warped_grid", "warped_rk4", "WARPED_STEPS", "WARPED_RTOL",
           "WARPED_MAX_STEPS", "WARP_POWER", "WARP_SCALE"]

#: Steps of ``method="warped_rk4"`` unless ``num_steps`` says otherwise (measured in
#: ``benchmarks/bench_solvers.py``: 12 steps, 98 evaluations per roundtrip, beat the authors'
#: Euler with h = 0.01 on the toys and the exact mixtures).
WARPED_STEPS = 12
#: Exponent of the time warp: steps are dense where ``max_i |dtheta_i/dt|`` is large.
WARP_POWER = 0.5
#: Smallest variance, relative to ``lam_i``, at which the warp expects structure: the angle
#: speed is averaged over variances ``c lam_i`` for ``c`` log-uniform in ``[WARP_SCALE, 1]``
#: (``benchmarks/bench_solvers.py``: 0.03 cut the 12-step RMS roundtrip error 1.2-5.6x on
#: the eight trained toys against ``c = 1`` alone).
WARP_SCALE = 0.03
#: Default error budget of ``warped_rk4``, checked against its estimate, which is conservative
#: (6-52x above the measured RMS roundtrip error on the toys); adaptive methods default to 1e-5.
WARPED_RTOL = 5e-2
#: Without ``num_steps``, ``warped_rk4`` doubles its steps from ``WARPED_STEPS`` until the
#: error estimate meets ``rtol``, up to this many.
WARPED_MAX_STEPS = 768


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``x`` (``xp`` increasing)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    frac = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + frac * (fp[i] - fp[i - 1])


def warped_grid(lam: Tensor, rate: Tensor, gamma0: float, t_max: float,
                num_steps: int) -> tuple[Tensor, Tensor]:
    """Times ``(N, 3)`` and ``dt/dtau`` ``(N, 3)`` of the RK4 stages (start, middle, end).

    The field is ``dw_i/dt = -(d theta_i/dt) F_i`` with ``F`` of order one and the angle
    ``theta_i = arctan sqrt(gamma_i / lam_i)``, whose speed ``|d theta_i/dt|`` is a bump of
    height ``|rate_i| / 4`` where ``gamma_i = lam_i``, decaying as ``exp(-|rate_i t| / 2)``
    away from it: it says where in time a Gaussian of variance ``lam_i`` moves. Non-Gaussian
    data also have structure at smaller variances (a curve's thickness, a cluster's spread),
    which the noise washes out earlier, so the speed is averaged over variances ``c lam_i``
    with ``c`` log-uniform in ``[WARP_SCALE, 1]``. The warped time ``tau in [0, 1]`` has
    ``dtau/dt`` proportional to ``max_i`` of that speed to the ``WARP_POWER`` (measured best
    among 0, 1/3, 1/2 and 1 for RK4 on the toys): uniform steps in ``tau`` are dense where
    some dimension moves fast and sparse in the tails. Computed in float64 on the CPU.

    Args:
        lam: ``(D,)`` eigenvalues.
        rate: ``(D,)`` ``rho (1 + g)``.
        gamma0: the schedule's noise variance at ``t = 0``.
        t_max: the schedule's end time ``T``.
        num_steps: RK4 steps ``N``.
    """
    rate_t = rate.detach().to("cpu", torch.float64)
    scales = torch.logspace(math.log10(WARP_SCALE), 0.0, 9, dtype=torch.float64)
    lam_c = lam.detach().to("cpu", torch.float64) * scales.unsqueeze(-1)  # (9, D)
    tt = torch.linspace(0.0, t_max, 8193, dtype=torch.float64)

    def density(t: Tensor) -> Tensor:
        gamma = gamma0 * torch.exp(t.unsqueeze(-1) * rate_t).unsqueeze(-2)  # (*t, 1, D)
        speed = 0.5 * rate_t.abs() * torch.sqrt(lam_c * gamma) / (lam_c + gamma)
        return speed.mean(-2).amax(-1).clamp_min(1e-12) ** WARP_POWER

    m = density(tt)
    tau = torch.cat([tt.new_zeros(1), torch.cumsum(0.5 * (m[1:] + m[:-1]) * tt.diff(), 0)])
    total = tau[-1]
    nodes = torch.linspace(0.0, 1.0, 2 * num_steps + 1, dtype=torch.float64)
    t_nodes = _interp(nodes, tau / total, tt)
    t_nodes[0], t_nodes[-1] = 0.0, t_max
    dt_dtau = total / density(t_nodes)
    idx = torch.arange(num_steps) * 2
    stages = torch.stack([idx, idx + 1, idx + 2], -1)
    return t_nodes[stages], dt_dtau[stages]


def warped_rk4(func: nn.Module, y0: Tensor, grid: tuple[Tensor, Tensor], backward: bool
               ) -> tuple[Tensor, Tensor]:
    r"""Classic RK4 with uniform steps in the warped time ``tau`` of ``grid``.

    In ``tau`` the ODE is ``dy/dtau = f(t(tau), y) dt/dtau``. The stage at the end of a step is
    the next step's first stage, so the embedded third-order solution
    ``b = (1/6, 1/3, 1/3, 0, 1/6)`` (the fourth stage replaced by the end-point slope) costs one
    extra evaluation per solve; ``h/6 |k4 - k5|`` summed over steps estimates the global error.
    Everything that depends on time alone (``func.time_terms``) is computed for all stages at
    once, before the first step.

    Args:
        func: ``f(t, y, terms)`` with a ``time_terms(t)`` method.
        y0: ``(*, S)``.
        grid: :func:`warped_grid` in ``y0``'s dtype and device.
        backward: integrate from ``t_max`` to 0.

    Returns:
        ``y1`` and the error estimate ``(*)`` per point (RMS over the state).
    """
    times, scale = grid
    if backward:
        times, scale = times.flip(0, 1), -scale.flip(0, 1)
    num_steps = times.shape[0]
    terms = func.time_terms(times)  # each (N, 3, ...)
    stages = list(zip(*(part.flatten(0, 1).unbind(0) for part in terms)))
    h = 1.0 / num_steps
    y, err = y0, torch.zeros_like(y0)
    k1 = func(times[0, 0], y, stages[0]) * scale[0, 0]
    for n in range(num_steps):
        t, c, st = times[n], scale[n], stages[3 * n : 3 * n + 3]
        k2 = func(t[1], y + 0.5 * h * k1, st[1]) * c[1]
        k3 = func(t[1], y + 0.5 * h * k2, st[1]) * c[1]
        k4 = func(t[2], y + h * k3, st[2]) * c[2]
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        k5 = func(t[2], y, st[2]) * c[2]
        err = err + (h / 6) * (k4 - k5).detach().abs()
        k1 = k5
    return y, err.square().mean(-1).sqrt()


class WarpedRK4:
    """The ``warped_rk4`` solver: fixed steps, doubled from ``WARPED_STEPS`` until the error
    estimate meets ``rtol`` unless ``num_steps`` is given.

    It keeps the grids it computed, per field, step count, dtype and device (weakly: a field
    that is gone takes its grids with it), so a solve costs no host sync for its grid.
    """

    name = "warped_rk4"
    adaptive = False
    default_rtol = WARPED_RTOL
    options = frozenset({"num_steps"})

    def __init__(self) -> None:
        self._grids: WeakKeyDictionary = WeakKeyDictionary()

    def grid(self, field: nn.Module, num_steps: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`warped_grid` of ``field`` in ``like``'s dtype and device, cached."""
        cache = self._grids.setdefault(field, {})
        key = (num_steps, like.dtype, like.device)
        if key not in cache:
            sched = field.schedule
            grid = warped_grid(field.lam, sched.rate, sched.gamma0, sched.t_max, num_steps)
            cache[key] = tuple(v.to(device=like.device, dtype=like.dtype) for v in grid)
        return cache[key]

    def __call__(self, func: nn.Module, field: nn.Module, y0: Tensor, t0: float, t1: float,
                 rtol: float, atol: float, options: dict) -> tuple[Tensor, SolveInfo]:
        """Integrate ``func`` from ``t0`` to ``t1`` (0 and ``t_max``, either way)."""
        t_max = float(field.schedule.t_max)
        if {t0, t1} != {0.0, t_max}:
            raise ValueError(f"method='warped_rk4' integrates between 0 and t_max="
                             f"{t_max:.4g}, got t0={t0:.4g}, t1={t1:.4g}")
        fixed = options.get("num_steps")
        steps, nfe = fixed or WARPED_STEPS, 0
        while True:
            grid = self.grid(field, steps, y0)
            fast = None
            if func is field:
                fast = fused_warped_rk4(field, y0, grid, t0 > t1)
            elif getattr(func, "exact", False) and func.field is field:
                fast = fused_warped_rk4(field, y0, grid, t0 > t1, logdet=True)
            y1, err = fast if fast is not None else warped_rk4(func, y0, grid, t0 > t1)
            nfe += 4 * steps + 1
            error = float(err.max()) if err.numel() else 0.0
            if options["nonfinite"] == "return":  # rows that overflowed carry no estimate
                if not math.isfinite(error):
                    err = torch.where(torch.isfinite(err), err, 0.0)
                    error = float(err.max())
            elif not torch.isfinite(y1).all():
                # rare path: solve again, watching every evaluation, to say where it went wrong
                counted = Counted(func, y0, (t0, t1))
                with torch.no_grad():
                    warped_rk4(counted, y0.detach(), grid, backward=t0 > t1)
                raise nonfinite(counted, t0, t1,
                                "check the denoiser and the input for extreme values")
            if error <= rtol:
                break
            if fixed is not None or 2 * steps > WARPED_MAX_STEPS:
                raise SolverError(
                    f"ODE solve from t={t0:.4g} to t={t1:.4g} with warped_rk4 ({steps} steps) "
                    f"has an estimated error of {error:.2e}, over rtol={rtol:g}; "
                    + ("raise num_steps, " if fixed is not None else "")
                    + "loosen rtol or use method='dopri5'"
                )
            steps *= 2
        return y1, SolveInfo(nfe, self.name, float(rtol), float(atol), float(t0), float(t1),
                             error, steps)
