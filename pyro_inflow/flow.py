"""The inflationary flow: data ``x (*, D)`` <-> Gaussian latent ``z (*, d)``."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from . import _io
from ._validation import check_data, check_positive_int
from .basis import EigenBasis
from .denoisers import (
    DENOISERS,
    Denoiser,
    EmpiricalDenoiser,
    GaussianMixtureDenoiser,
    check_mixture,
)
from .ode import ProbabilityFlow, SolveInfo, solve
from .schedule import InflationSchedule

__all__ = ["InflationaryFlow"]

FILLS = ("zeros", "normal")


class InflationaryFlow(nn.Module):
    r"""An inflationary flow (de Albuquerque & Pearson 2024) between data and a Gaussian latent.

    Encoding integrates the probability-flow ODE from ``0`` to ``T`` and returns
    ``z_i = ut_i(T) / sqrt(lam_i + gamma_i(T))`` on the kept dimensions; decoding integrates
    back. For Gaussian data the flow is PCA whitening, ``z = u / sqrt(lam + gamma0)``.

    Computation runs in the flow's dtype (``flow.double()`` for float64, recommended for
    log-densities); inputs are converted to it. Solver keywords accepted by :meth:`encode`,
    :meth:`decode`, :meth:`sample` and :meth:`log_prob`: ``rtol`` (default ``1e-5``), ``atol``
    (default ``rtol``), ``method`` (default ``"dopri5"``; fixed-step ``"euler"``, ``"rk4"``, ...
    with ``step_size``), ``max_num_steps``. The last solve is described by ``flow.last_solve``.

    Args:
        basis: the data's eigen-basis.
        denoiser: a denoiser in eigen-coordinates (its ``schedule`` defines the flow).

    Example:
        >>> flow = InflationaryFlow.from_gaussian_mixture(
        ...     torch.ones(1), torch.zeros(1, 2), torch.diag(torch.tensor([4.0, 1.0]))[None])
        >>> x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
        >>> flow.encode(x)  # PCA whitening: (2 / 2, 1 / 1), up to gamma0
        tensor([[0.9998, 0.9990]], dtype=torch.float64)
    """

    def __init__(self, basis: EigenBasis, denoiser: Denoiser) -> None:
        super().__init__()
        if denoiser.schedule.dim != basis.dim:
            raise ValueError(
                f"denoiser: schedule dimension {denoiser.schedule.dim} does not match the "
                f"basis dimension {basis.dim}"
            )
        self.basis = basis
        self.field = ProbabilityFlow(denoiser, basis.lam.clone())
        self.last_solve: SolveInfo | None = None

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self) -> Denoiser:
        return self.field.denoiser

    @property
    def schedule(self) -> InflationSchedule:
        return self.field.denoiser.schedule

    @property
    def dim(self) -> int:
        """Data dimension ``D``."""
        return self.basis.dim

    @property
    def latent_dim(self) -> int:
        """Latent dimension ``d`` (``D`` for PR-preserving flows)."""
        return self.schedule.dims_to_keep

    @property
    def dtype(self) -> torch.dtype:
        return self.basis.mean.dtype

    @property
    def device(self) -> torch.device:
        return self.basis.mean.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gaussian_mixture(
        cls,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
        *,
        schedule: str = "prp",
        dims_to_keep: int | None = None,
        inflation_gap: float | None = None,
        gamma0: float = 5e-4,
        rho: float = 1.0,
        A0: float = 1.0,
        t_max: float | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> InflationaryFlow:
        """Exact flow of the mixture ``sum_k weights_k N(means_k, covariances_k)``.

        The mean, global scale and eigen-basis are the mixture's exact moments.

        Args:
            weights: ``(K,)`` positive. means: ``(K, D)``. covariances: ``(K, D, D)`` PSD.
            schedule, dims_to_keep, inflation_gap, gamma0, rho, A0, t_max: see
                :class:`~pyro_inflow.schedule.InflationSchedule`.
            dtype: computation dtype (float64 by default).
        """
        w, m, S = check_mixture(weights, means, covariances, dtype)
        K, D = m.shape
        w = w / w.sum()
        mean = (w[:, None] * m).sum(0)
        dev = m - mean
        cov = (w[:, None, None] * (S + dev[:, :, None] * dev[:, None, :])).sum(0)
        basis = EigenBasis.from_moments(mean, cov)
        sched = InflationSchedule(
            D, schedule, dims_to_keep, inflation_gap=inflation_gap, gamma0=gamma0, rho=rho,
            A0=A0, t_max=t_max, lam=basis.lam.tolist(),
        ).to(dtype)
        m_u = basis.to_eigen(m)
        S_u = basis.W.T @ S @ basis.W / basis.scale**2
        return cls(basis, GaussianMixtureDenoiser(sched, w, m_u, S_u))

    @classmethod
    def from_empirical(
        cls, data: Tensor, *, schedule: str = "prp", dims_to_keep: int | None = None,
        dtype: torch.dtype = torch.float64, **schedule_kwargs,
    ) -> InflationaryFlow:
        """Exact flow of the point cloud ``data (n, D)`` (the "discrete score").

        Its ``t = 0`` marginal is the data convolved with ``N(0, gamma0)`` in scaled units.
        Extra keywords go to :class:`~pyro_inflow.schedule.InflationSchedule`.
        """
        x = check_data(data, "data", min_rows=2, dtype=dtype)
        basis = EigenBasis.from_data(x)
        sched = InflationSchedule(
            basis.dim, schedule, dims_to_keep, lam=basis.lam.tolist(), **schedule_kwargs
        ).to(dtype)
        return cls(basis, EmpiricalDenoiser(sched, basis.to_eigen(x)))

    @classmethod
    def fit(cls, data, schedule: str = "prp", dims_to_keep: int | None = None, **kwargs):
        """Learn a flow from samples ``data (n, D)``; see :func:`pyro_inflow.training.fit`."""
        from .training import fit

        return fit(data, schedule=schedule, dims_to_keep=dims_to_keep, **kwargs)

    # ------------------------------------------------------------------ the maps
    def _solve(self, w: Tensor, t0: float, t1: float, **kw) -> tuple[Tensor, Tensor | None]:
        w1, logdet, info = solve(self.field, w, t0, t1, **kw)
        self.last_solve = info
        return w1, logdet

    def _sigma0_root(self) -> Tensor:
        return torch.sqrt(self.field.sigma(torch.zeros((), dtype=self.dtype, device=self.device)))

    def _check(self, x, name: str, dim: int) -> Tensor:
        return check_data(x, name, dim=dim, batched=True, dtype=self.dtype, device=self.device)

    def encode_full(self, x: Tensor, **solver) -> Tensor:
        """Standardized state ``w(T)`` on all ``D`` dimensions, ``(*, D) -> (*, D)``."""
        x = self._check(x, "x", self.dim)
        w0 = self.basis.to_eigen(x) / self._sigma0_root()
        return self._solve(w0, 0.0, self.schedule.t_max, **solver)[0]

    def encode(self, x: Tensor, **solver) -> Tensor:
        """Latent ``z`` of data ``x``: ``(*, D) -> (*, d)`` (inflation, ``t: 0 -> T``)."""
        return self.encode_full(x, **solver)[..., self.schedule.kept]

    def decode(
        self, z: Tensor, *, fill: str = "zeros", generator: torch.Generator | None = None,
        **solver,
    ) -> Tensor:
        """Data ``x`` of latent ``z``: ``(*, d) -> (*, D)`` (generation, ``t: T -> 0``).

        Args:
            z: latent points ``(*, d)``.
            fill: for PR-reducing flows, the compressed coordinates at ``T``: ``"zeros"``
                (the learned ``d``-dimensional manifold) or ``"normal"`` (``N(0, 1)`` draws of
                their own standardized scale, the paper's small-variance option).
            generator: random generator for ``fill="normal"``.
        """
        if fill not in FILLS:
            raise ValueError(f"fill: expected one of {FILLS}, got {fill!r}")
        z = self._check(z, "z", self.latent_dim)
        extra = self.dim - self.latent_dim
        if extra:
            shape = (*z.shape[:-1], extra)
            rest = (torch.randn(shape, generator=generator, dtype=z.dtype, device=z.device)
                    if fill == "normal" else z.new_zeros(shape))
            z = torch.cat([z, rest], dim=-1)
        return self.decode_full(z, **solver)

    def decode_full(self, w: Tensor, **solver) -> Tensor:
        """Data ``x`` of a full standardized state ``w(T)``: ``(*, D) -> (*, D)``.

        The inverse of :meth:`encode_full`; for PR-preserving flows the same as :meth:`decode`.
        """
        w = self._check(w, "w", self.dim)
        w0 = self._solve(w, self.schedule.t_max, 0.0, **solver)[0]
        return self.basis.from_eigen(w0 * self._sigma0_root())

    def decode_with_logdet(self, w: Tensor, **solver) -> tuple[Tensor, Tensor]:
        """:meth:`decode_full` and ``log |det dx/dw|``: ``(*, D) -> ((*, D), (*))``.

        Takes the trace keywords of :meth:`log_prob` (``trace``, ``num_probes``, ``seed``).
        """
        trace = self._trace(solver.pop("trace", "auto"))
        solver.setdefault("num_probes", 16)
        w = self._check(w, "w", self.dim)
        w0, logdet = self._solve(w, self.schedule.t_max, 0.0, logdet=True, trace=trace,
                                 **solver)
        x = self.basis.from_eigen(w0 * self._sigma0_root())
        return x, logdet + self._affine_logdet()

    def _trace(self, trace: str) -> str:
        return ("exact" if self.dim <= 16 else "hutchinson") if trace == "auto" else trace

    def _affine_logdet(self) -> Tensor:
        """``log |det dx/dw(0)|`` of ``x = mu + scale W sqrt(sigma(0)) w(0)``."""
        return torch.log(self._sigma0_root()).sum() - self.basis.log_abs_det()

    def add_t0_noise(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the flow's ``t = 0`` marginal around data ``x``: ``(*, D) -> (*, D)``.

        Adds ``N(0, gamma0)`` noise in the scaled eigen-coordinates (``scale * sqrt(gamma0)``
        in data units, the same in every direction). The flow transports the data convolved
        with this noise, not the data itself, so calibration checks should encode noised
        held-out points. It matters where some direction's variance is close to ``gamma0``
        (e.g. dequantized pixels, whose smallest eigenvalue is near ``5e-4``): there clean
        points encode too close to the origin, with variance ``lam / (lam + gamma0)``.
        """
        x = self._check(x, "x", self.dim)
        sd = self.basis.scale * math.sqrt(self.schedule.gamma0)
        return x + sd * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    def sample(
        self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None,
        fill: str = "zeros", **solver,
    ) -> Tensor:
        """``n`` samples ``(n, D)``: decode ``z ~ N(0, I_d)``."""
        n = check_positive_int(n, "n")
        if generator is None:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=self.dtype,
                        device=self.device)
        return self.decode(z, fill=fill, generator=generator, **solver)

    def log_prob(
        self, x: Tensor, *, full_rank: bool = False, trace: str = "auto", num_probes: int = 16,
        seed: int = 0, **solver,
    ) -> Tensor:
        r"""Log-density ``log p(x)`` of the flow's ``t = 0`` marginal, ``(*, D) -> (*)``.

        ``log p(x) = log N(w(T); 0, I) + int_0^T tr(df/dw) dt - 0.5 sum_i log(lam_i + gamma0)
        - D log(scale)``, the trace exact (``D <= 16`` for ``trace="auto"``) or a Hutchinson
        estimate with ``num_probes`` Rademacher probes fixed by ``seed``.

        Args:
            x: points ``(*, D)``.
            full_rank: for PR-reducing flows, the density of the paper's full-rank model: all
                ``D`` coordinates of ``w(T)`` are ``N(0, 1)``, so the compressed directions keep
                their own small variance (what ``decode(z, fill="normal")`` samples).

        Raises:
            ValueError: for PR-reducing flows without ``full_rank=True``: their data live on a
                ``d``-dimensional manifold and have no density on ``R^D``.
        """
        if self.latent_dim != self.dim and not full_rank:
            raise ValueError(
                f"log_prob: a PR-reducing flow (d={self.latent_dim} < D={self.dim}) has no "
                f"density on R^{self.dim}; work in the latent (encode/decode, latent inference) "
                f"or pass full_rank=True for the full-rank model's density"
            )
        x = self._check(x, "x", self.dim)
        w0 = self.basis.to_eigen(x) / self._sigma0_root()
        wT, logdet = self._solve(
            w0, 0.0, self.schedule.t_max, logdet=True, trace=self._trace(trace),
            num_probes=num_probes, seed=seed, **solver,
        )
        log_normal = -0.5 * (wT.square().sum(-1) + self.dim * math.log(2 * math.pi))
        return log_normal + logdet - self._affine_logdet()

    def prior(self, *, full_rank: bool = False, **options):
        """This flow as a Pyro prior: an :class:`~pyro_inflow.InflationaryFlowPrior`.

        Freezes the flow's weights (``requires_grad=False``): inference never trains them.

        Args:
            full_rank: for PR-reducing flows, the full-rank model on ``R^D`` (a proper
                density) instead of the ``d``-dimensional manifold.
            **options: solver and trace options of the prior's transform, see
                :class:`~pyro_inflow.InflationaryFlowTransform`.
        """
        from .distributions import InflationaryFlowPrior

        return InflationaryFlowPrior(self, full_rank=full_rank, **options)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write the flow to ``path`` atomically (tensors and JSON-like data only)."""
        den = self.denoiser
        kind = next(k for k, c in DENOISERS.items() if isinstance(den, c))
        _io.save_payload(path, "flow", {
            "basis": {k: v.detach().cpu() for k, v in self.basis.state_dict().items()},
            "schedule": self.schedule.config(),
            "denoiser": {"type": kind, "config": den.config(),
                         "state": {k: v.detach().cpu() for k, v in den.state_dict().items()}},
            "metadata": dict(metadata or {}),
        })

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Read a flow written by :meth:`save`; never executes code from the file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a foreign, corrupt, truncated or newer-version file.
        """
        record = _io.load_payload(path, "flow")
        try:
            basis = EigenBasis(**record["basis"])
            dtype = basis.mean.dtype
            sched = InflationSchedule(**record["schedule"]).to(dtype)
            spec = record["denoiser"]
            den = DENOISERS[spec["type"]]._from_saved(sched, basis.lam, spec["config"],
                                                     spec["state"])
            flow = cls(basis, den.to(dtype))
            for name, value in flow.state_dict().items():
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise ValueError(f"non-finite values in {name}")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError,
                IndexError) as e:
            raise ValueError(f"{path}: corrupt pyro_inflow flow file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e
        flow.metadata = record.get("metadata", {})
        return flow.requires_grad_(False).to(map_location)
