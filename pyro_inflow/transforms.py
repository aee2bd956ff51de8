"""The flow as a :class:`torch.distributions.Transform`: latent ``z`` -> data ``x``.

Pyro's reparametrizers and ``TransformedDistribution`` speak this interface: ``_call`` decodes
(``t: T -> 0``), ``_inverse`` encodes (``t: 0 -> T``) and ``log_abs_det_jacobian`` integrates
the instantaneous change of variables along a decode. :meth:`InflationaryFlowTransform.
call_and_ladj` does a decode and its log-determinant in one solve and caches both, as Pyro's
``Planar`` caches the log-determinant it computes in ``_call``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from .solvers import WARPED_RTOL, WARPED_STEPS, SolveInfo

if TYPE_CHECKING:  # the Pyro layer sits above the flow and never imports it at run time
    from .flow import InflationaryFlow

__all__ = ["InflationaryFlowTransform", "SOLVER_KEYS", "TRACE_KEYS"]

#: Solver options of the transform (see :func:`pyro_inflow.solvers.solve`).
SOLVER_KEYS = ("method", "rtol", "atol", "step_size", "num_steps", "max_num_steps", "adjoint")
#: Options of the log-determinant's divergence estimate.
TRACE_KEYS = ("trace", "num_probes", "seed")
#: The prior's solver unless told otherwise: a fixed grid makes the potential a smooth,
#: deterministic function of the latent (what HMC needs) at about a third of dopri5's cost.
DEFAULT_SOLVER = {"method": "warped_rk4"}


class InflationaryFlowTransform(Transform):
    r"""Decoding of an :class:`~pyro_inflow.InflationaryFlow`, ``(*, d) -> (*, D)``.

    For PR-preserving flows (and PR-reducing ones with ``full_rank=True``) this is a bijection
    of ``R^D`` (``bijective`` is true). For PR-reducing flows it maps ``R^d`` onto the flow's
    ``d``-dimensional manifold in ``R^D`` (``bijective`` is false): ``_inverse`` encodes onto the
    kept coordinates (a left inverse) and ``log_abs_det_jacobian`` raises, because the map has
    no square Jacobian.

    Gradients flow through the decode (for NUTS and SVI in the latent); the flow's own weights
    are constants and never receive gradients. Batch dimensions of any shape are accepted.
    On the CPU, the default grid's decode and its gradient run in a compiled kernel
    (:mod:`pyro_inflow.solvers.fused`, about 8x faster per gradient); the log-determinant
    (``log_abs_det_jacobian``, ``call_and_ladj``), adaptive methods and ``adjoint=True`` take
    the PyTorch path, which is slower and gives the same numbers.

    **dtypes.** Values are computed in the flow's dtype. An input of lower precision (float32
    into a float64 flow) is converted to it; an input of higher precision (float64 into a
    float32 flow) raises ``TypeError`` naming both dtypes, since converting would silently
    lose precision (convert the flow with ``flow.double()``).

    Args:
        flow: the flow; its weights are frozen (``requires_grad_(False)``).
        full_rank: for PR-reducing flows, decode the full standardized state ``w(T)``
            ``(*, D)`` (the paper's full-rank model) instead of the kept coordinates.
        method, rtol, atol, step_size, num_steps, max_num_steps: ODE solver settings (see
            :func:`pyro_inflow.solvers.solve`). The default is ``method="warped_rk4"`` with
            ``num_steps=12`` (49 evaluations per decode): a fixed grid makes the potential a
            smooth, deterministic function of the latent, as HMC needs. The grid never
            changes inside inference; instead, the largest error estimate seen is kept in
            :attr:`max_error` and a warning is issued once per flow if it exceeds ``rtol``
            (default ``5e-2``; the estimate is conservative). ``method="dopri5"`` gives
            tolerance-controlled adaptive steps.
        adjoint: backpropagate with the adjoint method instead of through the solver (needs a
            torchdiffeq ``method``; the default then is ``dopri5``).
        trace, num_probes, seed: the divergence estimate of ``log_abs_det_jacobian``
            (``"auto"``: exact for ``D <= 16``, else Hutchinson with fixed, seeded probes).
        cache_size: ``1`` (default) remembers the last ``x = t(z)`` pair, so ``t.inv(t(z))``
            returns ``z`` without a solve, and the last log-determinant of
            :meth:`call_and_ladj`; ``0`` disables both.

    Example:
        >>> from pyro_inflow import InflationaryFlow
        >>> flow = InflationaryFlow.from_gaussian_mixture(
        ...     torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
        >>> t = InflationaryFlowTransform(flow)
        >>> t(torch.zeros(5, 2, dtype=torch.float64)).shape
        torch.Size([5, 2])
        >>> t.bijective, t == InflationaryFlowTransform(flow), hash(t) == hash(t.with_cache(1))
        (True, True, True)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, flow: InflationaryFlow, *, full_rank: bool = False,
                 cache_size: int = 1, **options: object) -> None:
        if not callable(getattr(flow, "decode_with_logdet", None)):
            raise TypeError(f"flow: expected an InflationaryFlow, got {type(flow).__name__}")
        unknown = sorted(set(options) - set(SOLVER_KEYS + TRACE_KEYS))
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown}; expected some of "
                            f"{list(SOLVER_KEYS + TRACE_KEYS)}")
        super().__init__(cache_size=cache_size)
        self.flow = flow.requires_grad_(False)
        self.full_rank = bool(full_rank) or flow.latent_dim == flow.dim
        self.bijective = self.full_rank
        default = {"method": "dopri5"} if options.get("adjoint") else DEFAULT_SOLVER
        self.options = {**default, **options}
        self._solver = {k: v for k, v in self.options.items() if k in SOLVER_KEYS}
        self._trace = {k: v for k, v in self.options.items() if k in TRACE_KEYS}
        self._budget = None
        if self._solver["method"] == "warped_rk4":
            # a fixed grid: never doubled or raised mid-inference, but watched
            self._solver.setdefault("num_steps", WARPED_STEPS)
            self._budget = self._solver.pop("rtol", WARPED_RTOL)
            self._solver["rtol"] = math.inf
        self._cached_ladj: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def max_error(self) -> float:
        """Largest ``warped_rk4`` error estimate of any prior solve on this flow so far
        (``flow.prior_watch``, shared by every transform of the flow)."""
        return self.flow.prior_watch.max_error

    def record(self, info: SolveInfo) -> None:
        """Watch a solve of this transform's flow (see :attr:`max_error`)."""
        if self._budget is not None:
            self.flow.prior_watch.record(info, self._budget)

    def solver_options(self, trace: bool = False) -> dict:
        """Keywords for the flow's solves (with the trace options when ``trace``)."""
        return {**self._solver, **self._trace} if trace else dict(self._solver)

    # ------------------------------------------------------------------ shapes and dtypes
    @property
    def in_dim(self) -> int:
        """Latent dimension this transform takes: ``d``, or ``D`` when full-rank."""
        return self.flow.dim if self.full_rank else self.flow.latent_dim

    @property
    def out_dim(self) -> int:
        """Data dimension ``D``."""
        return self.flow.dim

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        """``(*, d) -> (*, D)``."""
        self._check_shape(shape, self.in_dim, "latent")
        return torch.Size((*shape[:-1], self.out_dim))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        """``(*, D) -> (*, d)``."""
        self._check_shape(shape, self.out_dim, "data")
        return torch.Size((*shape[:-1], self.in_dim))

    @property
    def _full_rank_prr(self) -> bool:
        return self.full_rank and self.flow.latent_dim < self.flow.dim

    def _check_shape(self, shape: torch.Size, dim: int, what: str) -> None:
        if len(shape) < 1 or shape[-1] != dim:
            raise ValueError(
                f"InflationaryFlowTransform: expected {what} values of shape (*, {dim}) for "
                f"this flow (D={self.flow.dim}, d={self.flow.latent_dim}"
                f"{', full rank' if self._full_rank_prr else ''}), got shape {tuple(shape)}"
            )

    def checked(self, value: Tensor, latent: bool) -> Tensor:
        """``value`` of shape ``(*, d)`` (``latent``) or ``(*, D)`` in the flow's dtype (see the
        class's dtype rule)."""
        dim, what = (self.in_dim, "latent") if latent else (self.out_dim, "data")
        self._check_shape(value.shape, dim, what)
        dtype = self.flow.dtype
        if value.dtype != dtype and torch.promote_types(value.dtype, dtype) != dtype:
            raise TypeError(
                f"InflationaryFlowTransform: {what} values of dtype {value.dtype} for a flow of "
                f"dtype {dtype} would lose precision; convert the flow (flow.double()) or the "
                f"values (.to({dtype}))")
        return value.to(dtype)

    # ------------------------------------------------------------------ the maps
    def _call(self, z: Tensor) -> Tensor:
        z = self.checked(z, latent=True)
        decode = self.flow.decode_full if self.full_rank else self.flow.decode
        x, info = decode(z, return_info=True, **self._solver)
        self.record(info)
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        x = self.checked(x, latent=False)
        w, info = self.flow.encode_full(x, return_info=True, **self._solver)
        self.record(info)
        return w if self.full_rank else w[..., self.flow.schedule.kept]

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``x = t(z)`` and ``log |det dx/dz|`` ``(*)`` in one augmented solve.

        Both are cached (``cache_size=1``): ``t.inv(x)`` then returns ``z`` and
        ``t.log_abs_det_jacobian(z, x)`` the log-determinant, each without a solve, so a
        ``TransformedDistribution.log_prob`` of this ``x`` costs nothing more.
        """
        x, ladj = self._decode_with_logdet(z, "call_and_ladj")
        if self._cache_size == 1:
            self._cached_x_y = z, x
            self._cached_ladj = z, x, ladj
        return x, ladj

    def cached_ladj(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(z, log |det dx/dz|)`` when ``x`` is the output of the last :meth:`call_and_ladj`
        (the very tensor), else ``None``."""
        cached = self._cached_ladj
        if cached is not None and cached[1] is x:
            return cached[0], cached[2]
        return None

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """``log |det dx/dz|`` ``(*)``, integrated along the decode of ``z`` (cached after
        :meth:`call_and_ladj`)."""
        cached = self._cached_ladj
        if cached is not None and cached[0] is z and cached[1] is x:
            return cached[2]
        return self._decode_with_logdet(z, "log_abs_det_jacobian")[1]

    def _decode_with_logdet(self, z: Tensor, where: str) -> tuple[Tensor, Tensor]:
        """The decode of ``z`` and its log-determinant in one augmented solve, watched."""
        if not self.full_rank:
            self.flow.require_density(where)
        x, ladj, info = self.flow.decode_with_logdet(self.checked(z, latent=True),
                                                     **self.solver_options(trace=True))
        self.record(info)
        return x, ladj

    # ------------------------------------------------------------------ plumbing
    def with_cache(self, cache_size: int = 1) -> InflationaryFlowTransform:
        """This transform with another cache size (itself when unchanged)."""
        if self._cache_size == cache_size:
            return self
        return InflationaryFlowTransform(self.flow, full_rank=self.full_rank,
                                         cache_size=cache_size, **self.options)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, InflationaryFlowTransform) and other.flow is self.flow
                and other.full_rank == self.full_rank and other.options == self.options)

    def __hash__(self) -> int:
        try:
            options = frozenset(self.options.items())
        except TypeError:  # an unhashable option value: equal transforms still hash equal
            options = frozenset(self.options)
        return hash((InflationaryFlowTransform, id(self.flow), self.full_rank, options))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(D={self.out_dim}, d={self.in_dim}"
                f"{', full_rank=True' if self._full_rank_prr else ''})")
