"""The flow as a :class:`torch.distributions.Transform`: latent ``z`` -> data ``x``.

Pyro's reparametrizers and ``TransformedDistribution`` speak this interface: ``_call`` decodes
(``t: T -> 0``), ``_inverse`` encodes (``t: 0 -> T``) and ``log_abs_det_jacobian`` integrates
the instantaneous change of variables along a decode.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from .flow import InflationaryFlow
from .ode import WARPED_RTOL, WARPED_STEPS

__all__ = ["InflationaryFlowTransform"]

_SOLVER_KEYS = ("method", "rtol", "atol", "step_size", "num_steps", "max_num_steps", "adjoint")
#: The prior's solver unless told otherwise: a fixed grid makes the potential a smooth,
#: deterministic function of the latent (what HMC needs) at about a third of dopri5's cost.
DEFAULT_SOLVER = {"method": "warped_rk4"}
_TRACE_KEYS = ("trace", "num_probes", "seed")


class InflationaryFlowTransform(Transform):
    r"""Decoding of an :class:`~pyro_inflow.InflationaryFlow`, ``(*, d) -> (*, D)``.

    For PR-preserving flows (and PR-reducing ones with ``full_rank=True``) this is a bijection
    of ``R^D``. For PR-reducing flows it maps ``R^d`` onto the flow's ``d``-dimensional manifold
    in ``R^D``: ``_inverse`` encodes onto the kept coordinates (a left inverse) and
    ``log_abs_det_jacobian`` raises, because the map has no square Jacobian.

    Gradients flow through the decode (for NUTS and SVI in the latent); the flow's own weights
    are constants and never receive gradients. Batch dimensions of any shape are accepted.

    Args:
        flow: the flow; its weights are frozen (``requires_grad_(False)``).
        full_rank: for PR-reducing flows, decode the full standardized state ``w(T)``
            ``(*, D)`` (the paper's full-rank model) instead of the kept coordinates.
        method, rtol, atol, step_size, num_steps, max_num_steps: ODE solver settings (see
            :func:`pyro_inflow.ode.solve`). The default is ``method="warped_rk4"`` with
            ``num_steps=12`` (49 evaluations per decode): a fixed grid makes the potential a
            smooth, deterministic function of the latent, as HMC needs. The grid never
            changes inside inference; instead, the largest error estimate seen is kept in
            :attr:`max_error` and a warning is issued once per flow if it exceeds ``rtol``
            (default ``5e-2``; the estimate is conservative). ``method="dopri5"`` gives
            tolerance-controlled adaptive steps.
        adjoint: backpropagate with the adjoint method instead of through the solver (needs a
            torchdiffeq ``method``).
        trace, num_probes, seed: the divergence estimate of ``log_abs_det_jacobian``
            (``"auto"``: exact for ``D <= 16``, else Hutchinson with fixed, seeded probes).
        cache_size: ``1`` (default) remembers the last ``x = t(z)`` pair, so ``t.inv(t(z))``
            returns ``z`` without a solve; ``0`` disables the cache.

    Example:
        >>> flow = InflationaryFlow.from_gaussian_mixture(
        ...     torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
        >>> t = InflationaryFlowTransform(flow)
        >>> t(torch.zeros(5, 2)).shape
        torch.Size([5, 2])
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, flow: InflationaryFlow, *, full_rank: bool = False,
                 cache_size: int = 1, **options) -> None:
        if not isinstance(flow, InflationaryFlow):
            raise TypeError(f"flow: expected an InflationaryFlow, got {type(flow).__name__}")
        unknown = sorted(set(options) - set(_SOLVER_KEYS + _TRACE_KEYS))
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown}; expected some of "
                            f"{list(_SOLVER_KEYS + _TRACE_KEYS)}")
        super().__init__(cache_size=cache_size)
        self.flow = flow.requires_grad_(False)
        self.full_rank = bool(full_rank) or flow.latent_dim == flow.dim
        default = {"method": "dopri5"} if options.get("adjoint") else DEFAULT_SOLVER
        self.options = {**default, **options}
        self._solver = {k: v for k, v in self.options.items() if k in _SOLVER_KEYS}
        self._budget = None
        if self._solver["method"] == "warped_rk4":
            # a fixed grid: never doubled or raised mid-inference, but watched
            self._solver.setdefault("num_steps", WARPED_STEPS)
            self._budget = self._solver.pop("rtol", WARPED_RTOL)
            self._solver["rtol"] = math.inf

    @property
    def max_error(self) -> float:
        """Largest ``warped_rk4`` error estimate of any prior solve on this flow so far.

        Kept on the flow, since models usually build ``flow.prior()`` afresh at every call.
        """
        return getattr(self.flow, "_prior_max_error", 0.0)

    def _solved(self, out):
        """Record the last solve's error estimate; warn once per flow if over the budget."""
        info = self.flow.last_solve
        if self._budget is not None and info is not None and info.error is not None:
            flow = self.flow
            flow._prior_max_error = max(self.max_error, info.error)
            if info.error > self._budget and not getattr(flow, "_prior_warned", False):
                flow._prior_warned = True
                warnings.warn(
                    f"InflationaryFlowTransform: warped_rk4 with {info.num_steps} steps "
                    f"has an estimated error of {info.error:.2e} here, over rtol="
                    f"{self._budget:g}; the grid stays fixed (max_error keeps the largest); "
                    f"pass a larger num_steps or method='dopri5' for more accuracy",
                    stacklevel=3,
                )
        return out

    def solver_options(self, trace: bool = False) -> dict:
        """Keywords for the flow's solves (with the trace options when ``trace``)."""
        if not trace:
            return dict(self._solver)
        return {**self._solver, **{k: v for k, v in self.options.items() if k in _TRACE_KEYS}}

    # ------------------------------------------------------------------ shapes
    @property
    def in_dim(self) -> int:
        """Latent dimension this transform takes: ``d``, or ``D`` when full-rank."""
        return self.flow.dim if self.full_rank else self.flow.latent_dim

    @property
    def out_dim(self) -> int:
        """Data dimension ``D``."""
        return self.flow.dim

    def forward_shape(self, shape) -> torch.Size:
        self._check_shape(shape, self.in_dim, "latent")
        return torch.Size((*shape[:-1], self.out_dim))

    def inverse_shape(self, shape) -> torch.Size:
        self._check_shape(shape, self.out_dim, "data")
        return torch.Size((*shape[:-1], self.in_dim))

    @property
    def _full_rank_prr(self) -> bool:
        return self.full_rank and self.flow.latent_dim < self.flow.dim

    def _check_shape(self, shape, dim: int, what: str) -> None:
        if len(shape) < 1 or shape[-1] != dim:
            raise ValueError(
                f"InflationaryFlowTransform: expected {what} values of shape (*, {dim}) for "
                f"this flow (D={self.flow.dim}, d={self.flow.latent_dim}"
                f"{', full rank' if self._full_rank_prr else ''}), got shape {tuple(shape)}"
            )

    # ------------------------------------------------------------------ the maps
    def _call(self, z: Tensor) -> Tensor:
        self._check_shape(z.shape, self.in_dim, "latent")
        if self.full_rank:
            return self._solved(self.flow.decode_full(z, **self._solver))
        return self._solved(self.flow.decode(z, **self._solver))

    def _inverse(self, x: Tensor) -> Tensor:
        self._check_shape(x.shape, self.out_dim, "data")
        w = self._solved(self.flow.encode_full(x, **self._solver))
        return w if self.full_rank else w[..., self.flow.schedule.kept]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """``log |det dx/dz|`` ``(*)``, integrated along the decode of ``z``."""
        if not self.full_rank:
            raise ValueError(
                f"log_abs_det_jacobian: a PR-reducing flow maps R^{self.in_dim} onto a "
                f"manifold in R^{self.out_dim} and has no square Jacobian; use latent "
                f"inference, or full_rank=True for a bijection of R^{self.out_dim}"
            )
        self._check_shape(z.shape, self.in_dim, "latent")
        return self._solved(self.flow.decode_with_logdet(z, **self.solver_options(True)))[1]

    # ------------------------------------------------------------------ plumbing
    def with_cache(self, cache_size: int = 1) -> InflationaryFlowTransform:
        if self._cache_size == cache_size:
            return self
        return InflationaryFlowTransform(self.flow, full_rank=self.full_rank,
                                         cache_size=cache_size, **self.options)

    def __eq__(self, other) -> bool:
        return (isinstance(other, InflationaryFlowTransform) and other.flow is self.flow
                and other.full_rank == self.full_rank and other.options == self.options)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(D={self.out_dim}, d={self.in_dim}"
                f"{', full_rank=True' if self._full_rank_prr else ''})")
