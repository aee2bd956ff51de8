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
#: Options of the log-determinant's divergence estimate, and their defaults.
TRACE_KEYS = ("trace", "num_probes", "seed")
TRACE_DEFAULTS = {"trace": "auto", "num_probes": 16, "seed": 0}
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

    **dtypes**, as torch promotes: the result has the dtype of the input when that is of
    higher precision than the flow's (a float64 latent into a float32 flow is decoded in
    float64, with the flow's weights converted once, see
    :meth:`~pyro_inflow.InflationaryFlow.computing_in`), else the flow's dtype.

    **Non-finite values** raise ``ValueError`` while validating (``validate_args``, else
    torch's default, which ``pyro.enable_validation`` sets and Pyro's HMC/NUTS switch off
    during warm-up); otherwise their results are NaN. A finite point whose decode overflows
    (a latent of 1e200) gives inf or NaN instead of raising, as a Normal's density gives
    ``-inf`` far out, so a sampler counts it as a divergence (fixed-step methods; adaptive
    ones cannot step past it and raise :class:`~pyro_inflow.SolverError`). An empty batch
    gives an empty result.

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
        validate_args: whether non-finite values raise (``None``: torch's default at the
            time of the call); the prior passes its own.

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
                 cache_size: int = 1, validate_args: bool | None = None,
                 **options: object) -> None:
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
        # a point whose decode overflows gives inf/NaN, as a Normal's density gives -inf far
        # out: inside a sampler that is a divergence, not the end of the run
        self._solver["nonfinite"] = "return"
        self.validate_args = validate_args
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
        return {**self._solver, **TRACE_DEFAULTS, **self._trace} if trace else dict(self._solver)

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

    def validating(self) -> bool:
        """Whether non-finite values raise: ``validate_args`` if given, else torch's default,
        which ``pyro.enable_validation`` sets and Pyro's HMC/NUTS turn off during warm-up."""
        if self.validate_args is not None:
            return bool(self.validate_args)
        return bool(torch.distributions.Distribution._validate_args)

    def checked(self, value: Tensor, latent: bool) -> tuple[InflationaryFlow, Tensor,
                                                           Tensor | None]:
        """``value`` ``(*, d)`` (``latent``) or ``(*, D)`` checked for this flow.

        Returns:
            The flow to compute with (in the promoted dtype, see the class's dtype rule), the
            value in that dtype on the flow's device, and ``None``, or, when validation is off
            and some points are not finite, the mask ``(*)`` of finite points (the others are
            zeroed here; :meth:`restore` makes their results NaN).

        Raises:
            ValueError: wrong shape; NaN or Inf while validating. TypeError: not floating.
        """
        dim, what = (self.in_dim, "latent") if latent else (self.out_dim, "data")
        self._check_shape(value.shape, dim, what)
        if not value.is_floating_point():
            raise TypeError(f"InflationaryFlowTransform: expected floating-point {what} values, "
                            f"got dtype {value.dtype}")
        dtype = torch.promote_types(value.dtype, self.flow.dtype)
        value = value.to(dtype=dtype, device=self.flow.device)
        finite = None
        if value.numel() and not bool(torch.isfinite(value).all()):  # one check when all are
            ok = torch.isfinite(value).all(-1)
            if self.validating():
                bad = (~ok).reshape(-1).nonzero()
                raise ValueError(
                    f"InflationaryFlowTransform: expected finite {what} values, got NaN or "
                    f"Inf in {len(bad)} point(s) (first at flat index {int(bad[0])}); with "
                    f"validation off (validate_args=False, pyro.enable_validation(False), "
                    f"HMC/NUTS warm-up) they give NaN, which samplers count as divergent")
            finite = ok
            value = torch.where(ok.unsqueeze(-1), value, torch.zeros_like(value))
        return self.flow.computing_in(dtype), value, finite

    def restore(self, result: Tensor, value: Tensor, finite: Tensor | None,
                watch: bool = True) -> Tensor:
        """``result`` (``(*)`` or ``(*, k)``) of ``value`` ``(*, n)``, with NaN where
        ``finite`` (``(*)``) is false; with ``watch``, finite values whose result overflowed
        are counted in ``flow.prior_watch`` (one warning per flow)."""
        if watch and not bool(torch.isfinite(result.detach()).all()):
            overflow = ~torch.isfinite(result.detach().reshape(*value.shape[:-1], -1)).all(-1)
            if finite is not None:
                overflow = overflow & finite
            if bool(overflow.any()):
                radius = float(value.detach()[overflow].norm(dim=-1).max())
                self.flow.prior_watch.record_nonfinite(int(overflow.sum()), radius)
        if finite is None:
            return result
        mask = finite if result.dim() == finite.dim() else finite.unsqueeze(-1)
        return torch.where(mask, result, torch.full_like(result, math.nan))

    # ------------------------------------------------------------------ the maps
    def _call(self, z: Tensor) -> Tensor:
        flow, z, finite = self.checked(z, latent=True)
        if not z.numel():
            return z.new_zeros(self.forward_shape(z.shape))
        w = flow._state_of_latent(z, self.full_rank)
        x, info = flow._decode_full(w, **self._solver)
        self.record(info)
        return self.restore(x, z, finite)

    def _inverse(self, x: Tensor) -> Tensor:
        flow, x, finite = self.checked(x, latent=False)
        if not x.numel():
            return x.new_zeros(self.inverse_shape(x.shape))
        w, info = flow._encode_full(x, **self._solver)
        self.record(info)
        return self.restore(flow._latent_of_state(w, self.full_rank), x, finite)

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
        flow, z, finite = self.checked(z, latent=True)
        if not z.numel():
            return z.new_zeros(self.forward_shape(z.shape)), z.new_zeros(z.shape[:-1])
        w = flow._state_of_latent(z, full_rank=True)  # z itself without a radial map
        x, ladj, info = flow._decode_with_logdet(w, **self.solver_options(trace=True))
        if flow.radial is not None:  # d x / d z = (d x / d w)(d w / d z)
            ladj = ladj - flow._radial_logdet(w)
        self.record(info)
        # one watch per solve: the decode's overflow is the log-determinant's
        return self.restore(x, z, finite), self.restore(ladj, z, finite, watch=False)

    def log_density(self, x: Tensor) -> Tensor:
        """The flow's ``log p(x)`` ``(*)`` of data ``x`` ``(*, D)`` (full rank), checked and
        watched as the maps are (one encode with the change of variables)."""
        flow, x, finite = self.checked(x, latent=False)
        if not x.numel():
            return x.new_zeros(x.shape[:-1])
        lp, info = flow._log_prob(x, **self.solver_options(trace=True))
        self.record(info)
        # a point so far out that its encode overflowed has density 0, as a Normal's does
        lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -math.inf))
        return self.restore(lp, x, finite)

    # ------------------------------------------------------------------ plumbing
    def with_cache(self, cache_size: int = 1) -> InflationaryFlowTransform:
        """This transform with another cache size (itself when unchanged)."""
        if self._cache_size == cache_size:
            return self
        return InflationaryFlowTransform(self.flow, full_rank=self.full_rank,
                                         cache_size=cache_size,
                                         validate_args=self.validate_args, **self.options)

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
