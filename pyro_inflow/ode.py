r"""The probability-flow ODE, integrated with torchdiffeq in the standardized state.

In unscaled eigen-coordinates the pfODE is (paper Eq. 7 with ``dC/dt C^{-1} = rho (1 + g)``)::

    d ut / dt = 0.5 rho (1 + g) (ut - Dn(ut, t)).

We integrate the exactly equivalent ODE of the *standardized state*
``w = ut / sqrt(sigma(t))``, ``sigma(t) = lam + gamma(t)``::

    dw / dt = 0.5 rho (1 + g) / sqrt(sigma) * (c_skip ut - Dn(ut, t)),   c_skip = lam / sigma,

whose right-hand side is zero for Gaussian data (``c_skip ut`` is the Gaussian denoiser), so the
solver follows only the non-Gaussian part and every coordinate stays of order one, kept or
compressed. The latent is ``z = w(T)`` (kept dimensions), which is this package's convention
``z_i = ut_i(T) / sqrt(lam_i + gamma_i(T))``.

The log-determinant comes from the instantaneous change of variables integrated alongside the
state, ``d log|det dw(t)/dw(0)| / dt = tr(d f / d w)``: exact (a vectorized vector-Jacobian
product per dimension, ``torch.func``) or a Hutchinson estimate with probes fixed for the whole
solve. Precision follows the state's dtype (float64 is recommended for log-densities).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torchdiffeq import odeint, odeint_adjoint

from .denoisers import Denoiser, PreconditionedDenoiser

__all__ = ["ProbabilityFlow", "SolveInfo", "SolverError", "solve", "ADAPTIVE", "FIXED"]

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED = ("warped_rk4", "euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
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
TRACES = ("exact", "hutchinson")


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


class ProbabilityFlow(nn.Module):
    """Right-hand side ``f(t, w)`` of the standardized pfODE, with an NFE counter.

    Args:
        denoiser: ``Dn(ut, t)`` in eigen-coordinates.
        lam: ``(D,)`` eigenvalues of the data covariance.
    """

    lam: Tensor

    def __init__(self, denoiser: Denoiser, lam: Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("lam", lam)
        self.nfe = 0
        self._grids: dict = {}

    def warped_grid(self, num_steps: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The ``warped_rk4`` stage times and ``dt/dtau`` ``(N, 3)`` in ``like``'s dtype and
        device, computed once per step count, dtype and device."""
        key = (num_steps, like.dtype, like.device)
        if key not in self._grids:
            sched = self.schedule
            grid = _warped_grid(tuple(self.lam.tolist()), tuple(sched.rate.tolist()),
                                float(sched.gamma0), float(sched.t_max), num_steps)
            self._grids[key] = tuple(v.to(device=like.device, dtype=like.dtype) for v in grid)
        return self._grids[key]

    @property
    def schedule(self):
        return self.denoiser.schedule

    def sigma(self, t: Tensor) -> Tensor:
        """``lam + gamma(t)``, shape ``(*t, D)``."""
        return self.lam + self.schedule.gamma(t)

    def time_state(self, t: Tensor) -> tuple[Tensor, ...] | None:
        """What ``f(t, .)`` needs of the times ``t`` ``(*t)`` alone, so that it is computed once
        per time rather than once per point (and by ``warped_rk4`` once per solve): for a
        learned denoiser, the coefficient ``(*t, D)`` followed by the network's time features
        ``(*t, ...)``; ``None`` for the exact denoisers."""
        if not isinstance(self.denoiser, PreconditionedDenoiser):
            return None
        gamma = self.schedule.gamma(t)
        coef = (0.5 * self.schedule.rate) * torch.sqrt(self.lam * gamma) / (self.lam + gamma)
        return (coef, *self.denoiser.time_features(t))

    def forward(self, t: Tensor, w: Tensor, state: tuple[Tensor, ...] | None = None) -> Tensor:
        """``dw/dt`` for ``w`` of shape ``(*, D)`` at scalar ``t``; ``state`` is
        :meth:`time_state` of ``t``, computed here when not given."""
        if isinstance(self.denoiser, PreconditionedDenoiser):
            # c_skip ut - Dn = -c_out F(c_in ut, c_noise) and c_in ut = w: one network call,
            # no cancellation between c_skip ut and Dn
            state = self.time_state(t) if state is None else state
            return -state[0] * self.denoiser.network_at(w, state[1:])
        sigma = self.sigma(t)
        root = torch.sqrt(sigma)
        ut = w * root
        resid = (self.lam / sigma) * ut - self.denoiser(ut, t)
        return (0.5 * self.schedule.rate) / root * resid

    def with_divergence(self, t: Tensor, w: Tensor, probes: Tensor, weight: float,
                        state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``f(t, w)`` ``(*, D)`` and ``weight * sum_p eps_p^T J eps_p`` ``(*)``.

        With the ``D`` basis vectors as ``probes`` and ``weight = 1`` this is the exact trace;
        with ``P`` Rademacher probes and ``weight = 1 / P``, the Hutchinson estimate.
        """
        f, pullback = vjp(lambda w_: self.forward(t, w_, state), w)
        vjps = vmap(lambda v: pullback(v)[0])(probes)  # (P, *, D)
        return f, weight * (vjps * probes).sum(-1).sum(0)


class _Augmented(nn.Module):
    """State ``[w, log det]`` of shape ``(*, D + 1)``; the log-det column integrates the trace."""

    def __init__(self, field: ProbabilityFlow, probes: Tensor, weight: float) -> None:
        super().__init__()
        self.field, self.probes, self.weight = field, probes, weight

    def forward(self, t: Tensor, y: Tensor, state: tuple[Tensor, ...] | None = None) -> Tensor:
        f, div = self.field.with_divergence(t, y[..., :-1], self.probes, self.weight, state)
        return torch.cat([f, div.unsqueeze(-1)], dim=-1)


class _Counted(nn.Module):
    """Counts evaluations and remembers the first time a non-finite derivative appeared."""

    def __init__(self, func: nn.Module, like: Tensor, span: tuple[float, float]) -> None:
        super().__init__()
        self.func, self.nfe, self.last_t = func, 0, None
        self.lo, self.hi = (torch.tensor(min(span), dtype=like.dtype, device=like.device),
                            torch.tensor(max(span), dtype=like.dtype, device=like.device))
        self.first_bad = torch.full((), math.nan, dtype=like.dtype, device=like.device)
        self._first_bad_nfe = torch.zeros((), dtype=torch.long, device=like.device)

    def forward(self, t: Tensor, y: Tensor, state: tuple[Tensor, ...] | None = None) -> Tensor:
        self.nfe += 1
        self.last_t = t
        dy = self.func(t, y) if state is None else self.func(t, y, state)
        # recorded on the device, without a host sync per evaluation
        # (the solver's initial step selection may probe times outside the span: ignored)
        t = t.detach()
        new = ~torch.isfinite(dy).all() & torch.isnan(self.first_bad) & (t >= self.lo) & (
            t <= self.hi)
        self.first_bad = torch.where(new, t, self.first_bad)
        self._first_bad_nfe = torch.where(new, self.nfe, self._first_bad_nfe)
        return dy

    @property
    def first_bad_nfe(self) -> int:
        return int(self._first_bad_nfe)


def _probes(w0: Tensor, trace: str, num_probes: int, seed: int) -> tuple[Tensor, float]:
    """Probe vectors ``(P, *, D)``, made once per solve, and the weight of their sum."""
    if trace == "exact":
        dim = w0.shape[-1]
        eye = torch.eye(dim, dtype=w0.dtype, device=w0.device)
        return eye.reshape(dim, *([1] * (w0.dim() - 1)), dim).expand(dim, *w0.shape), 1.0
    gen = torch.Generator(device=w0.device).manual_seed(seed)
    signs = torch.randint(0, 2, (num_probes, *w0.shape), generator=gen, device=w0.device)
    return signs.to(w0.dtype) * 2 - 1, 1.0 / num_probes


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``x`` (``xp`` increasing)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    frac = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + frac * (fp[i] - fp[i - 1])


def _warped_grid(lam: tuple, rate: tuple, gamma0: float, t_max: float,
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
    some dimension moves fast and sparse in the tails. Float64 on the CPU; each field keeps
    its own copies (:meth:`ProbabilityFlow.warped_grid`).
    """
    rate_t = torch.tensor(rate, dtype=torch.float64)
    scales = torch.logspace(math.log10(WARP_SCALE), 0.0, 9, dtype=torch.float64)
    lam_c = torch.tensor(lam, dtype=torch.float64) * scales.unsqueeze(-1)  # (9, D)
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


def _warped_rk4(func: nn.Module, y0: Tensor, field: ProbabilityFlow, t0: float, t1: float,
                num_steps: int) -> tuple[Tensor, Tensor]:
    r"""Classic RK4 with ``num_steps`` uniform steps in the warped time ``tau``.

    In ``tau`` the ODE is ``dy/dtau = f(t(tau), y) dt/dtau``. The stage at the end of a step is
    the next step's first stage, so the embedded third-order solution
    ``b = (1/6, 1/3, 1/3, 0, 1/6)`` (the fourth stage replaced by the end-point slope) costs one
    extra evaluation per solve; ``h/6 |k4 - k5|`` summed over steps estimates the global error.
    The same grid serves both directions, so encode and decode are inverse to that error.
    Everything that depends on time alone (:meth:`ProbabilityFlow.time_state`) is computed for
    all stages at once, before the first step.

    Returns:
        ``y1`` and the error estimate ``(*)`` per point (RMS over the state).
    """
    times, scale = field.warped_grid(num_steps, y0)
    if t0 > t1:
        times, scale = times.flip(0, 1), -scale.flip(0, 1)
    state = field.time_state(times)  # each (N, 3, ...)
    if state is None:
        stages = [None] * (3 * num_steps)
    else:
        rows = [part.flatten(0, 1).unbind(0) for part in state]
        stages = list(zip(*rows))
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


def _nonfinite(counted: _Counted, t0: float, t1: float, hint: str) -> SolverError:
    return SolverError(
        f"ODE solve from t={t0:.4g} to t={t1:.4g} produced non-finite values (first at "
        f"t={float(counted.first_bad):.4g}, evaluation {counted.first_bad_nfe} of "
        f"{counted.nfe}); {hint}"
    )


def _solve_warped(func: nn.Module, field: ProbabilityFlow, y0: Tensor, t0: float, t1: float,
                  num_steps: int | None, rtol: float, atol: float, logdet: bool):
    if {t0, t1} != {0.0, float(field.schedule.t_max)}:
        raise ValueError(f"method='warped_rk4' integrates between 0 and t_max="
                         f"{field.schedule.t_max:.4g}, got t0={t0:.4g}, t1={t1:.4g}")
    steps, nfe = num_steps or WARPED_STEPS, 0
    while True:
        y1, err = _warped_rk4(func, y0, field, t0, t1, steps)
        nfe += 4 * steps + 1
        if not torch.isfinite(y1).all():
            # rare path: solve again, watching every evaluation, to say where it went wrong
            counted = _Counted(func, y0, (t0, t1))
            with torch.no_grad():
                _warped_rk4(counted, y0.detach(), field, t0, t1, steps)
            raise _nonfinite(counted, t0, t1, "check the denoiser and the input for extreme values")
        error = float(err.max()) if err.numel() else 0.0
        if error <= rtol:
            break
        if num_steps is not None or 2 * steps > WARPED_MAX_STEPS:
            raise SolverError(
                f"ODE solve from t={t0:.4g} to t={t1:.4g} with warped_rk4 ({steps} steps) has "
                f"an estimated error of {error:.2e}, over rtol={rtol:g}; "
                + ("raise num_steps, " if num_steps is not None else "")
                + "loosen rtol or use method='dopri5'"
            )
        steps *= 2
    info = SolveInfo(nfe, "warped_rk4", float(rtol), float(atol), float(t0), float(t1), error,
                     steps)
    if logdet:
        return y1[..., :-1], y1[..., -1], info
    return y1, None, info


def _pointwise_norm(x: Tensor) -> Tensor:
    """Largest per-point RMS over the last dimension: every point meets the tolerance."""
    if x.dim() < 2:
        return x.abs().max()
    return x.square().mean(-1).sqrt().max()


def solve(
    field: ProbabilityFlow,
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
    step_size: float | None = None,
    num_steps: int | None = None,
    max_num_steps: int = 10_000,
    first_step: float | None = None,
    adjoint: bool = False,
) -> tuple[Tensor, Tensor | None, SolveInfo]:
    """Integrate the standardized pfODE from ``t0`` to ``t1``.

    Args:
        field: the right-hand side.
        w0: initial standardized state ``(*, D)``.
        t0, t1: start and end time (``t1 < t0`` integrates backward).
        logdet: also integrate ``log |det dw(t1)/dw(t0)|``.
        trace: ``"exact"`` or ``"hutchinson"`` (Rademacher probes drawn once from ``seed``).
        num_probes: Hutchinson probes.
        method: ``"warped_rk4"`` (this package's fixed-grid solver: RK4 in a warped time that
            puts steps where the flow moves, with an embedded error estimate) or a torchdiffeq
            solver, adaptive (``ADAPTIVE``) or fixed-step (``FIXED``).
        rtol, atol: adaptive tolerances per point (default ``1e-5``; ``atol=None`` means
            ``atol = rtol``; the state is standardized, so both are on the same scale). For
            ``warped_rk4``, ``rtol`` (default ``WARPED_RTOL``) is the error budget: without
            ``num_steps`` the steps double from ``WARPED_STEPS`` until the error estimate
            meets it; with ``num_steps``, or past ``WARPED_MAX_STEPS``, a solve whose estimate
            exceeds it raises :class:`SolverError`.
        step_size: fixed-step size of torchdiffeq's fixed-step methods (default
            ``|t1 - t0| / 100``).
        num_steps: fixed steps of ``warped_rk4`` (``4 * num_steps + 1`` evaluations); ``None``
            chooses them from ``rtol``.
        max_num_steps: step budget of adaptive solvers.
        first_step: first trial step of adaptive solvers (default ``|t1 - t0| / 100``).
        adjoint: backpropagate with the adjoint method (a second ODE solved backward, memory
            independent of the number of steps) instead of through the solver's operations.
            Gradients flow to ``w0`` only: the field's weights are treated as constants.

    Returns:
        ``w1`` ``(*, D)``, the log-det ``(*)`` or ``None``, and a :class:`SolveInfo`.

    Raises:
        ValueError: unknown ``method`` or ``trace``, bad tolerances.
        SolverError: step budget exceeded, step-size underflow, or non-finite values.
    """
    if method not in ADAPTIVE + FIXED:
        raise ValueError(f"method: expected one of {ADAPTIVE + FIXED}, got {method!r}")
    if trace not in TRACES:
        raise ValueError(f"trace: expected one of {TRACES}, got {trace!r}")
    if rtol is None:
        rtol = WARPED_RTOL if method == "warped_rk4" else 1e-5
    atol = rtol if atol is None else atol
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol, atol: expected positive tolerances, got {rtol}, {atol}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                  or num_steps < 1):
        raise ValueError(f"num_steps: expected a positive integer, got {num_steps!r}")
    if adjoint and method == "warped_rk4":
        raise ValueError("adjoint: the adjoint method needs a torchdiffeq solver (e.g. "
                         "method='dopri5'); warped_rk4 backpropagates through its steps")
    func: nn.Module = _Augmented(field, *_probes(w0, trace, num_probes, seed)) if logdet else field
    y0 = torch.cat([w0, w0.new_zeros(*w0.shape[:-1], 1)], dim=-1) if logdet else w0
    if method == "warped_rk4":
        return _solve_warped(func, field, y0, t0, t1, num_steps, rtol, atol, logdet)
    counted = _Counted(func, y0, (t0, t1))
    options: dict = {}
    if method in ADAPTIVE:
        options = {"max_num_steps": max_num_steps, "norm": _pointwise_norm}
        # a fixed first trial step: torchdiffeq's heuristic divides by the field's norm, which
        # nearly vanishes for near-Gaussian data, and in float32 its rounding noise proposed
        # first steps far past t1 (the schedule then overflowed at t ~ 1e5)
        options["first_step"] = 0.01 * abs(t1 - t0) if first_step is None else first_step
    else:
        options = {"step_size": step_size or abs(t1 - t0) / 100}
    times = torch.tensor([t0, t1], dtype=w0.dtype, device=w0.device)
    if method in ADAPTIVE:  # land on t1 instead of stepping past it and interpolating back:
        options["step_t"] = times  # the schedule overflows far beyond T (float32 at t ~ 45)
    try:
        integrate = functools.partial(odeint_adjoint, adjoint_params=()) if adjoint else odeint
        y1 = integrate(counted, y0, times, method=method, rtol=rtol, atol=atol,
                       options=options)[-1]
    except (AssertionError, torch.linalg.LinAlgError) as e:
        reached = float("nan") if counted.last_t is None else float(counted.last_t)
        bad = float(counted.first_bad)
        if not math.isnan(bad):
            raise SolverError(
                f"ODE solve from t={t0:.4g} to t={t1:.4g} failed: the vector field returned "
                f"non-finite values (first at t={bad:.4g}, evaluation {counted.first_bad_nfe}) "
                f"and the step size collapsed at t={reached:.4g} ({e}); check the denoiser "
                f"and the input for extreme values"
            ) from e
        raise SolverError(
            f"ODE solve from t={t0:.4g} to t={t1:.4g} failed at t={reached:.4g} after "
            f"{counted.nfe} evaluations ({e}); loosen rtol/atol, raise max_num_steps or "
            f"check the input for extreme values"
        ) from e
    if not torch.isfinite(y1).all():
        raise _nonfinite(counted, t0, t1, "try method='dopri5' or tighter tolerances")
    info = SolveInfo(counted.nfe, method, float(rtol), float(atol), float(t0), float(t1))
    if logdet:
        return y1[..., :-1], y1[..., -1], info
    return y1, None, info
