"""Inflationary noise schedules (de Albuquerque & Pearson 2024, Sec. 3 and App. B).

All quantities live in the data's eigen-coordinates ``u`` (see :mod:`pyro_inflow.basis`), where
the data covariance is ``diag(lam)`` with ``max(lam) == 1``. Per eigen-dimension ``i``:

* noise variance ``gamma_i(t) = gamma0 * exp(rho * (1 + g_i) * t)``, ``C(t) = diag(gamma(t))``;
* PR-preserving (``"prp"``): ``g = 0``;
* PR-reducing (``"prr"``) to ``d`` kept dimensions: ``g_i = 1`` for the top ``d`` directions and
  ``g_i = -d / (D - d)`` for the others (so ``sum(g) = 0``), or ``g_i = -inflation_gap`` for the
  compressed dimensions (the paper's constant inflation-gap variant);
* total variance ``sigma_i(t) = lam_i + gamma_i(t)`` of the noisy coordinate ``ut_i``.

The paper's scale ``s(t)`` (its scaled variable ``v = s ut``) is not needed: the flow integrates
the standardized state ``ut / sqrt(sigma(t))`` instead (:mod:`pyro_inflow.pfode`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["InflationSchedule", "SCHEDULES", "SCHEDULE_OPTIONS", "as_time"]

SCHEDULES = ("prp", "prr")
#: The paper's constant inflation gap (``inflation_gap="paper"``): compressed directions inflate
#: at ``1 + g = 0.98`` against the kept ones' 2 (``benchmarks/bench_schedules.py`` compares it
#: with the default ``g = -d / (D - d)``).
PAPER_INFLATION_GAP = 0.02
#: Keyword options of :class:`InflationSchedule` that the flow constructors pass through.
SCHEDULE_OPTIONS = ("inflation_gap", "gamma0", "rho", "t_max", "tol")


def as_time(t: float | Tensor, like: Tensor) -> Tensor:
    """``t`` as a tensor of ``like``'s dtype and device (a scalar or ``(*)`` times)."""
    return torch.as_tensor(t, dtype=like.dtype, device=like.device)


class InflationSchedule(nn.Module):
    r"""Noise schedule ``C(t)`` and scale ``s(t)`` of an inflationary flow.

    Args:
        dim: data dimension ``D``.
        schedule: ``"prp"`` (PR-preserving) or ``"prr"`` (PR-reducing).
        dims_to_keep: for ``"prr"``, the number ``d`` of kept dimensions, ``1 <= d < D``.
        inflation_gap: for ``"prr"``, use the constant inflation-gap variant
            ``g_i = -inflation_gap`` on compressed dimensions (any ``inflation_gap > -1``
            keeps them below the kept rate); ``"paper"`` is the paper's ``0.02``
            (``1 + g = 0.98``: the compressed noise still grows, slower than the kept).
        gamma0: noise variance at ``t = 0`` (scaled units; the flow's ``t = 0`` marginal is the
            data convolved with ``N(0, gamma0 I)``).
        rho: exponential growth rate of the noise.
        t_max: end time ``T``. ``None`` chooses it with :meth:`auto_t_max`.
        lam: eigenvalues of the data covariance ``(D,)``, descending, ``max == 1``; used only to
            choose ``t_max`` (``None`` assumes the worst case).
        tol: accuracy target of the automatic ``t_max`` (see :meth:`auto_t_max`).

    Example:
        >>> sched = InflationSchedule(3, "prr", dims_to_keep=2)
        >>> sched.g.tolist()
        [1.0, 1.0, -2.0]
        >>> round(InflationSchedule(2).t_max, 2)
        16.81
    """

    g: Tensor

    def __init__(
        self,
        dim: int,
        schedule: str = "prp",
        dims_to_keep: int | None = None,
        *,
        inflation_gap: float | str | None = None,
        gamma0: float = 5e-4,
        rho: float = 1.0,
        t_max: float | None = None,
        lam: Sequence[float] | Tensor | None = None,
        tol: float = 1e-4,
    ) -> None:
        super().__init__()
        dim = int(dim)
        if dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
        if schedule == "prp":
            if dims_to_keep not in (None, dim):
                raise ValueError(
                    f"dims_to_keep: a 'prp' schedule keeps all {dim} dimensions, got "
                    f"{dims_to_keep}; use schedule='prr' to reduce dimension"
                )
            if inflation_gap is not None:
                raise ValueError("inflation_gap: only meaningful with schedule='prr'")
            dims_to_keep = dim
        else:
            if dims_to_keep is None:
                raise ValueError("dims_to_keep: schedule='prr' needs dims_to_keep=d, 1 <= d < D")
            if not 1 <= int(dims_to_keep) < dim:
                raise ValueError(
                    f"dims_to_keep: expected an integer in [1, {dim - 1}] for D={dim}, "
                    f"got {dims_to_keep}"
                )
            dims_to_keep = int(dims_to_keep)
        for name, value in (("gamma0", gamma0), ("rho", rho), ("tol", tol)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite positive number, got {value}")
        if not tol < 1:
            raise ValueError(f"tol: expected a number in (0, 1), got {tol}")
        self.dim, self.schedule, self.dims_to_keep = dim, schedule, dims_to_keep
        if inflation_gap == "paper":
            inflation_gap = PAPER_INFLATION_GAP
        elif isinstance(inflation_gap, str) or isinstance(inflation_gap, bool):
            raise ValueError(f"inflation_gap: expected a number or 'paper', got "
                             f"{inflation_gap!r}")
        self.inflation_gap = None if inflation_gap is None else float(inflation_gap)
        self.gamma0, self.rho, self.tol = float(gamma0), float(rho), float(tol)
        g = [0.0] * dim
        if schedule == "prr":
            d = dims_to_keep
            low = -d / (dim - d) if inflation_gap is None else -float(inflation_gap)
            if not 1 + low < 2:
                raise ValueError(
                    f"inflation_gap: compressed dims must inflate slower than kept ones "
                    f"(1 - inflation_gap < 2), got {inflation_gap}"
                )
            g = [1.0] * d + [low] * (dim - d)
        self.register_buffer("g", torch.tensor(g, dtype=torch.float64))
        # derived once: the ODE right-hand side reads it at every evaluation
        self.register_buffer("_rate", self.rho * (1.0 + self.g), persistent=False)
        if t_max is None:
            t_max = self.auto_t_max(lam)
        elif not (math.isfinite(t_max) and t_max > 0):
            raise ValueError(f"t_max: expected a finite positive number, got {t_max}")
        self.t_max = float(t_max)

    # ------------------------------------------------------------------ the schedule
    @property
    def rate(self) -> Tensor:
        """``rho * (1 + g)``, the constant ``d log gamma / dt`` per dimension, shape ``(D,)``."""
        return self._rate

    @property
    def kept(self) -> slice:
        """Index of the kept (latent) dimensions: the first ``dims_to_keep``."""
        return slice(0, self.dims_to_keep)

    def gamma(self, t: float | Tensor) -> Tensor:
        """Noise variance ``gamma(t)``; ``t`` of shape ``(*)`` gives ``(*, D)``."""
        t = as_time(t, self.g)
        return self.gamma0 * torch.exp(t.unsqueeze(-1) * self.rate)

    def sigma(self, t: float | Tensor, lam: Tensor) -> Tensor:
        """Total variance ``lam + gamma(t)`` of the noisy eigen-coordinates, ``(*t, D)``.

        ``sigma*`` of the preconditioning (paper Eq. 10) and the standardizer of the pfODE state.
        """
        return lam + self.gamma(t)

    # ------------------------------------------------------------------ choosing T
    def auto_t_max(self, lam: Sequence[float] | Tensor | None = None) -> float:
        r"""The end time ``T`` at which the latent is Gaussian to accuracy ``tol``.

        The rule: ``T`` is the smallest time at which

        (a) in every kept dimension the data's share of the variance is at most ``tol``,
            ``lam_i / (lam_i + gamma_i(T)) <= tol``. The latent is then ``sqrt(1 - f) eps +
            sqrt(f) u_std`` with ``f <= tol``, so its non-Gaussian cumulants of order ``k`` are
            those of the standardized data times ``f^(k/2) <= tol^(3/2)`` (``1e-6`` at the
            default), and the latent has stopped moving: ``|z(T) - z(inf)| = O(tol^(3/2))``;
        (b) for PR-reducing schedules, the compressed dimensions' standard deviation in the
            scaled state ``s(T) ut`` is at most ``tol`` times that of the kept ones,
            ``(lam_c + gamma_c(T)) / (lam_k + gamma_k(T)) <= tol^2`` for the largest compressed
            and smallest kept variances.

        With the defaults (``gamma0 = 5e-4``, ``rho = 1``, ``tol = 1e-4``) this gives
        ``T = 16.8`` for PR-preserving flows, near the paper's ``T ~ 15``.

        Args:
            lam: eigenvalues ``(D,)`` of the data covariance (``max == 1``). ``None`` assumes
                the worst case (all ones; zero for the smallest kept eigenvalue in (b)).
        """
        d, dim, tol = self.dims_to_keep, self.dim, self.tol
        lam_k = [1.0] * d if lam is None else [float(v) for v in list(lam)[:d]]
        lam_c = [1.0] * (dim - d) if lam is None else [float(v) for v in list(lam)[d:]]
        rate = [self.rho * (1.0 + float(v)) for v in self.g]
        # (a) closed form: gamma0 exp(r_k T) >= lam_max_kept (1 - tol) / tol
        t_a = max(0.0, math.log(max(lam_k) * (1.0 - tol) / (tol * self.gamma0)) / rate[0])
        if d == dim:
            return t_a

        def ratio(t: float) -> float:
            top_c = max(lc + self.gamma0 * math.exp(r * t) for lc, r in zip(lam_c, rate[d:]))
            low_k = (0.0 if lam is None else min(lam_k)) + self.gamma0 * math.exp(rate[0] * t)
            return top_c / low_k

        lo, hi = 0.0, max(t_a, 1.0)
        while ratio(hi) > tol**2:  # the ratio decreases: kept dims inflate fastest
            lo, hi = hi, 2.0 * hi
            if hi > 1e4:
                raise ValueError("t_max: no finite time compresses the schedule; check g")
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ratio(mid) > tol**2 else (lo, mid)
        return max(t_a, hi)

    def config(self) -> dict:
        """JSON-serializable arguments that rebuild this schedule."""
        return {
            "dim": self.dim,
            "schedule": self.schedule,
            "dims_to_keep": self.dims_to_keep if self.schedule == "prr" else None,
            "inflation_gap": self.inflation_gap,
            "gamma0": self.gamma0,
            "rho": self.rho,
            "t_max": self.t_max,
            "tol": self.tol,
        }

    def extra_repr(self) -> str:
        """The schedule's settings, shown in the module's ``repr``."""
        return (
            f"{self.schedule}, dim={self.dim}, dims_to_keep={self.dims_to_keep}, "
            f"gamma0={self.gamma0:g}, rho={self.rho:g}, t_max={self.t_max:.3f}"
        )
