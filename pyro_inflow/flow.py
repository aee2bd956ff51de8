"""The inflationary flow: data ``x (*, D)`` <-> Gaussian latent ``z (*, d)``."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from ._chunks import DEFAULT_BATCH, map_rows
from ._validation import check_data, check_positive_int
from .basis import EigenBasis
from .constructors import empirical_flow, fit_flow, load_flow, mixture_flow, save_flow
from .denoisers import Denoiser
from .distributions import InflationaryFlowPrior
from .draws import SiteLayout
from .pfode import PFODEField
from .schedule import InflationSchedule
from .solvers import SolveInfo, solve
from .solvers.watch import ErrorWatch
from .training import TrainState

__all__ = ["InflationaryFlow", "FILLS", "SAMPLE_BLOCK"]

FILLS = ("zeros", "normal")
#: Rows of latent draws per random block of :meth:`InflationaryFlow.latent_blocks`.
SAMPLE_BLOCK = 65536
#: A flow's copy in another dtype, with the state it was converted from (``computing_in``).
_CONVERTED: WeakKeyDictionary = WeakKeyDictionary()


def _fill_sd(fill: str | float) -> float:
    """The standard deviation of the compressed coordinates that ``fill`` asks for."""
    if isinstance(fill, str) and fill in FILLS:
        return 0.0 if fill == "zeros" else 1.0
    if (isinstance(fill, (int, float)) and not isinstance(fill, bool) and math.isfinite(fill)
            and fill >= 0):
        return float(fill)
    raise ValueError(f"fill: expected one of {FILLS} or a standard deviation >= 0, got {fill!r}")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype,
           device: torch.device) -> Tensor:
    """Standard normal draws ``shape`` made on ``generator``'s device (by default the CPU's
    global generator) and moved to ``device``: a seed gives the same numbers on any device."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)


class InflationaryFlow(nn.Module):
    r"""An inflationary flow (de Albuquerque & Pearson 2024) between data and a Gaussian latent.

    Encoding integrates the probability-flow ODE from ``0`` to ``T`` and returns
    ``z_i = ut_i(T) / sqrt(lam_i + gamma_i(T))`` on the kept dimensions; decoding integrates
    back. For Gaussian data the flow is PCA whitening, ``z = u / sqrt(lam + gamma0)``.

    **dtypes**, as torch promotes: a map's result has the dtype of its input tensor when that is
    of higher precision than the flow's (float64 points for a float32 flow are computed in
    float64, with a converted copy of the flow, see :meth:`computing_in`), else the flow's
    (float32 points for a float64 flow, NumPy arrays and lists take the flow's dtype). Draws
    (:meth:`sample`) have the flow's dtype. ``flow.double()`` makes float64 the default,
    recommended for log-densities and NUTS.

    **Big inputs**: :meth:`encode`, :meth:`decode`, :meth:`log_prob` and :meth:`sample` solve
    ``batch_size`` rows at a time (default ``DEFAULT_BATCH = 8192``; ``None``: one batch), so
    memory stays bounded. On a fixed grid (``warped_rk4`` with ``num_steps``, fixed-step
    methods) the results are those of one batch; adaptive methods (``dopri5``, and
    ``warped_rk4`` without ``num_steps``) choose their steps per chunk, driven by its worst
    row, and agree with one batch within their tolerance.

    Solver keywords accepted by :meth:`encode`,
    :meth:`decode`, :meth:`sample` and :meth:`log_prob` (see :func:`pyro_inflow.solvers.solve`):
    ``method`` (default ``"dopri5"``; ``"warped_rk4"``, the fast fixed grid; fixed-step
    ``"euler"``, ``"rk4"``, ... with ``step_size``), ``rtol`` (default ``1e-5``), ``atol``
    (default ``rtol``), ``num_steps``, ``max_num_steps``. With ``return_info=True`` they also
    return the :class:`~pyro_inflow.solvers.SolveInfo` of the solve (evaluations, error).

    Args:
        basis: the data's eigen-basis.
        denoiser: a denoiser in eigen-coordinates (its ``schedule`` defines the flow).

    Attributes:
        history: the training history (:meth:`fit`), else ``None``.
        certificate: the held-out calibration check made by :meth:`fit` (saved with the flow;
            see :func:`pyro_inflow.calibration.holdout_certificate`), else ``None``.
        radial: the latent's radial recalibration (a :class:`~pyro_inflow.radial.RadialMap`,
            saved with the flow), which :meth:`fit` fits on its held-out split when the flow
            fails its check there (``recalibrate=False`` turns it off), else ``None``.
        sites: for a flow fitted to posterior draws, the :class:`~pyro_inflow.draws.SiteLayout`
            of its named sites (saved with the flow; :func:`pyro_inflow.sample_sites`), else
            ``None``.
        metadata: what :meth:`save` was given (:meth:`load`), else ``{}``.
        prior_watch: the largest ``warped_rk4`` error estimate seen by this flow's priors
            (an :class:`~pyro_inflow.solvers.watch.ErrorWatch`, shared by every
            ``flow.prior()``, since models usually build the prior afresh at every call).

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
        self.field = PFODEField(denoiser, basis.lam.clone())
        #: the latent's radial recalibration (:mod:`pyro_inflow.radial`), or ``None``: the
        #: latent is ``z = radial(w_kept)`` of the kept coordinates of ``w(T)``
        self.register_module("radial", None)
        self.history: dict | None = None
        self.certificate: dict | None = None
        self.sites: SiteLayout | None = None
        self.metadata: dict = {}
        self.prior_watch = ErrorWatch()

    @property
    def denoiser(self) -> Denoiser:
        """The denoiser in eigen-coordinates."""
        return self.field.denoiser

    @property
    def schedule(self) -> InflationSchedule:
        """The noise schedule."""
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
        """The dtype of the flow's computations."""
        return self.basis.mean.dtype

    @property
    def device(self) -> torch.device:
        """The device of the flow's computations."""
        return self.basis.mean.device

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gaussian_mixture(
        cls, weights: Tensor, means: Tensor, covariances: Tensor, *, schedule: str = "prp",
        dims_to_keep: int | None = None, dtype: torch.dtype = torch.float64,
        **schedule_options: float | None,
    ) -> InflationaryFlow:
        """Exact flow of the mixture ``sum_k weights_k N(means_k, covariances_k)``.

        The mean, global scale and eigen-basis are the mixture's exact moments.

        Args:
            weights: ``(K,)`` positive.
            means: ``(K, D)``.
            covariances: ``(K, D, D)`` PSD.
            schedule: ``"prp"`` (PR-preserving) or ``"prr"`` (PR-reducing).
            dims_to_keep: for ``"prr"``, the number ``d`` of kept dimensions.
            dtype: computation dtype (float64 by default).
            **schedule_options: ``inflation_gap``, ``gamma0``, ``rho``, ``t_max``, ``tol``; see
                :class:`~pyro_inflow.InflationSchedule`.
        """
        return mixture_flow(cls, weights, means, covariances, schedule, dims_to_keep, dtype,
                            schedule_options)

    @classmethod
    def from_empirical(
        cls, data: Tensor, *, schedule: str = "prp", dims_to_keep: int | None = None,
        dtype: torch.dtype = torch.float64, **schedule_options: float | None,
    ) -> InflationaryFlow:
        """Exact flow of the point cloud ``data (n, D)`` (the "discrete score").

        Its ``t = 0`` marginal is the data convolved with ``N(0, gamma0)`` in scaled units.
        Arguments as in :meth:`from_gaussian_mixture`.
        """
        return empirical_flow(cls, data, schedule, dims_to_keep, dtype, schedule_options)

    @classmethod
    def fit(
        cls, data: Tensor, schedule: str = "prp", dims_to_keep: int | None = None, *,
        checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1000,
        resume: str | os.PathLike | None = None, progress: bool = True,
        dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
        callback: Callable[[TrainState], None] | None = None,
        sites: Sequence[str] | None = None, supports: Mapping[str, object] | None = None,
        thin: int = 1, **settings: object,
    ) -> InflationaryFlow:
        """Learn an inflationary flow from samples, or from the posterior draws of a study.

        The data are split (``validation_fraction`` held out, seeded; for posterior draws the
        last ``validation_fraction`` of every chain); the eigen-basis and the schedule come
        from the training split, and a :class:`~pyro_inflow.denoisers.PreconditionedDenoiser`
        is trained on it (:mod:`pyro_inflow.training`). After training the flow checks its
        latent coverage on the held-out split (``flow.certificate``, saved with the flow). A
        flow that fails it gets a radial recalibration of its latent fitted on those points
        (``flow.radial``, :func:`~pyro_inflow.calibration.recalibrate_latent`; the setting
        ``recalibrate=False`` turns it off), and the certificate then judges the result,
        cross-fitted; a flow that still fails warns, here and when it first becomes a prior.

        Args:
            data: ``(n, D)`` floating array or tensor of samples, finite, ``n >= D + 2``; or
                posterior draws (:mod:`pyro_inflow.draws`): a ``pyro.infer.MCMC`` after
                ``run``, a dict ``{site: (S, *shape)}`` such as ``mcmc.get_samples()``, or an
                ArviZ ``InferenceData``. Draws are mapped to unconstrained space site by site
                and packed into one vector; ``flow.sites`` records how, and
                :func:`pyro_inflow.sample_sites` unpacks the prior into named values.
            schedule: ``"prp"`` (PR-preserving) or ``"prr"`` (PR-reducing).
            dims_to_keep: for ``"prr"``, the number ``d`` of kept dimensions.
            checkpoint: write a resumable checkpoint here every ``checkpoint_every`` steps, at
                the end, and when SIGINT/SIGTERM (Ctrl-C) stops the run between two steps; the
                interrupt is then re-raised as ``KeyboardInterrupt``. Writes are atomic.
            checkpoint_every: steps between two checkpoints.
            resume: continue from this checkpoint (same data and settings; ``steps`` may grow).
            progress: show a tqdm bar with the loss, validation loss and samples per second.
            dtype: training dtype (the returned flow can be converted with ``.double()``).
            device: where the network trains (default: the CPU, or under NCCL this process's
                ``cuda:LOCAL_RANK``). Random draws are made on the CPU generator whatever the
                device, so a seed gives the same batches everywhere. The flow is returned there.
            callback: called after every training step with a
                :class:`~pyro_inflow.training.TrainState` (step, losses at evaluations, the EMA
                denoiser); raising ``KeyboardInterrupt`` in it stops the run like Ctrl-C.
            sites: posterior draws only: the sites to learn (default: every sampled site).
            supports: posterior draws only: ``{site: constraint}`` for dicts and
                InferenceData (a torch constraint or ``"positive"``, ``"unit_interval"``,
                ``"simplex"``, ``"real"``); an MCMC's own transforms say it otherwise.
            thin: posterior draws only: keep every ``thin``-th draw of each chain.
            **settings: schedule options (``inflation_gap``, ``gamma0``, ``rho``, ``t_max``,
                ``tol``; see :class:`~pyro_inflow.InflationSchedule`), ``shrinkage`` of the
                covariance that defines the basis (``None``, ``"ledoit_wolf"`` or a weight in
                ``[0, 1]``, see :meth:`~pyro_inflow.basis.EigenBasis.from_data`),
                ``recalibrate`` (default ``True``, see above), and training
                settings (fields of :class:`~pyro_inflow.training.TrainConfig`: ``steps``,
                ``batch_size``, ``lr``, ``patience``, ``seed``, ...).

        Returns:
            The flow with the EMA weights, frozen (``requires_grad=False``); ``flow.history``
            holds steps, losses, samples seen and wall time.

        Raises:
            ValueError, TypeError: bad data or settings, named.
            TrainingDiverged: a non-finite loss or gradient; its ``flow`` has the last good
                weights.

        Under ``torchrun`` (an initialized default process group) the run is data-parallel;
        ``batch_size`` is the global batch and must divide evenly among the processes, and
        every process must pass the same data and settings.

        Example:
            >>> from pyro_inflow import datasets
            >>> data = datasets.load("moons", n=2000, seed=0)
            >>> flow = InflationaryFlow.fit(data, steps=20, progress=False)
            >>> flow.latent_dim, len(flow.history["step"])
            (2, 1)
        """
        return fit_flow(cls, data, schedule, dims_to_keep, checkpoint=checkpoint,
                        checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                        dtype=dtype, device=device, callback=callback, settings=settings,
                        sites=sites, supports=supports, thin=thin)

    # ------------------------------------------------------------------ the maps
    # Each public map checks its input (check_points) and computes with the flow in the
    # input's dtype (computing_in); the private ones take checked tensors of the flow's dtype,
    # which is how the prior's transform, with its own checks, calls them.
    def check_points(self, x: object, name: str = "x", latent: bool = False) -> Tensor:
        """``x`` validated as points ``(*, D)`` (``(*, d)`` when ``latent``), on the flow's
        device, in the dtype the flow computes it in (see the class's dtype rule).

        Raises:
            TypeError: non-floating input. ValueError: wrong width, no points, NaN or Inf.
        """
        dim = self.latent_dim if latent else self.dim
        dtype = (torch.promote_types(x.dtype, self.dtype)
                 if isinstance(x, Tensor) and x.is_floating_point() else self.dtype)
        return check_data(x, name, dim=dim, batched=True, dtype=dtype, device=self.device)

    def computing_in(self, dtype: torch.dtype) -> InflationaryFlow:
        """This flow with its weights in ``dtype``: itself when it has that dtype, else a
        converted copy, kept (weakly) until the flow's weights change.

        The maps use it for inputs of a higher precision than the flow's (float64 points for a
        float32 flow are computed in float64, as torch promotes float32 with float64).
        """
        if dtype == self.dtype:
            return self
        state = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        key = (dtype, state)
        cached = _CONVERTED.get(self)
        if cached is None or cached[0] != key:
            converted = copy.deepcopy(self).to(dtype).requires_grad_(False)
            cached = _CONVERTED[self] = (key, converted)
        return cached[1]

    def require_density(self, where: str) -> None:
        """Raise the one error for asking a PR-reducing flow for a density on ``R^D``.

        Raises:
            ValueError: when the flow is PR-reducing, naming ``where`` and what to do instead.
        """
        d, D = self.latent_dim, self.dim
        if d < D:
            raise ValueError(
                f"{where}: a PR-reducing flow (d={d} < D={D}) maps R^{d} onto a {d}-dimensional "
                f"manifold in R^{D} and has no density (no square Jacobian) there; use latent "
                f"inference (reparam_flow_priors, latent_nuts) or encode/decode, or "
                f"full_rank=True for the full-rank model's density")

    def _state_maps(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(root, mean, to, back, logdet)``: ``root = sqrt(lam + gamma0)`` ``(D,)``, the
        standardizer of ``w(0)``; the basis and that standardizer folded into one matrix each
        way, ``w(0) = (x - mean) @ to`` and ``x = mean + w(0) @ back`` (``(D, D)``); and
        ``log |det dx/dw(0)|`` ``()``. Kept until a buffer or ``gamma0`` changes: every decode
        and density of a prior needs them, and folded they are one operator instead of four,
        forward and backward."""
        b, lam = self.basis, self.field.lam
        key = (self.schedule.gamma0, *((t.data_ptr(), t._version, t.dtype, t.device)
                                       for t in (lam, b.mean, b.W, b.scale)))
        hit = self.__dict__.get("_state_cache")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                zero = torch.zeros((), dtype=lam.dtype, device=lam.device)
                root = torch.sqrt(self.schedule.sigma(zero, lam))
                factor = b.scale * root
                maps = (root, b.mean, b.W / factor, (b.W * factor).T.contiguous(),
                        torch.log(root).sum() - b.log_abs_det())
            hit = self.__dict__["_state_cache"] = (key, maps)
        return hit[1]

    def _sigma0_root(self) -> Tensor:
        """``sqrt(lam + gamma0)`` ``(D,)``, the standardizer of ``w(0)``."""
        return self._state_maps()[0]

    def to_state(self, x: Tensor) -> Tensor:
        """The standardized state ``w(0) = u / sqrt(lam + gamma0)`` of data ``x``, where the
        pfODE starts: ``(*, D) -> (*, D)`` (no solve)."""
        x = self.check_points(x)
        return self.computing_in(x.dtype)._to_state(x)

    def _to_state(self, x: Tensor) -> Tensor:
        _, mean, to, _, _ = self._state_maps()
        return (x - mean) @ to

    def from_state(self, w: Tensor) -> Tensor:
        """Data ``x`` of a standardized state ``w(0)``: ``(*, D) -> (*, D)`` (no solve)."""
        _, mean, _, back, _ = self._state_maps()
        if w.dim() == 2:
            return torch.addmm(mean, w, back)
        return mean + w @ back

    def _solve(self, w: Tensor, t0: float, t1: float,
               **solver: object) -> tuple[Tensor, Tensor | None, SolveInfo]:
        if solver.get("trace") == "auto":  # the exact trace up to D = 16
            solver["trace"] = "exact" if self.dim <= 16 else "hutchinson"
        return solve(self.field, w, t0, t1, **solver)

    def encode_full(self, x: Tensor, *, return_info: bool = False,
                    batch_size: int | None = DEFAULT_BATCH,
                    **solver: object) -> Tensor | tuple[Tensor, SolveInfo]:
        """Standardized state ``w(T)`` on all ``D`` dimensions, ``(*, D) -> (*, D)``."""
        x = self.check_points(x)
        w, info = map_rows(self.computing_in(x.dtype)._encode_full, x, batch_size, **solver)
        return (w, info) if return_info else w

    def _encode_full(self, x: Tensor, **solver: object) -> tuple[Tensor, SolveInfo]:
        w, _, info = self._solve(self._to_state(x), 0.0, self.schedule.t_max, **solver)
        return w, info

    def encode(self, x: Tensor, *, return_info: bool = False,
               batch_size: int | None = DEFAULT_BATCH,
               **solver: object) -> Tensor | tuple[Tensor, SolveInfo]:
        """Latent ``z`` of data ``x``: ``(*, D) -> (*, d)`` (inflation, ``t: 0 -> T``): the kept
        coordinates of the end state ``w(T)``, through :attr:`radial` where ``fit`` recalibrated
        the latent.

        ``batch_size`` rows are solved at a time (``None``: all at once); see the class
        docstring for what that changes."""
        w, info = self.encode_full(x, return_info=True, batch_size=batch_size, **solver)
        z = self._latent_of_state(w)  # the radial map computes in w's dtype
        return (z, info) if return_info else z

    def decode(
        self, z: Tensor, *, fill: str | float = "zeros", generator: torch.Generator | None = None,
        return_info: bool = False, batch_size: int | None = DEFAULT_BATCH, **solver: object,
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        """Data ``x`` of latent ``z``: ``(*, d) -> (*, D)`` (generation, ``t: T -> 0``).

        Args:
            z: latent points ``(*, d)``.
            fill: for PR-reducing flows, the compressed coordinates at ``T``: ``"zeros"``
                (the learned ``d``-dimensional manifold), ``"normal"`` (``N(0, 1)`` draws of
                their own standardized scale: the full-rank model's end state), or a number
                ``eps >= 0``: ``N(0, eps^2)`` draws (the paper's small-variance generation;
                ``"zeros"`` is ``0``, ``"normal"`` is ``1``).
            generator: random generator for ``fill="normal"``.
            return_info: also return the solve's :class:`~pyro_inflow.solvers.SolveInfo`.
            batch_size: rows solved at a time (``None``: all at once).
            **solver: solver keywords (see the class docstring).
        """
        _fill_sd(fill)
        z = self.check_points(z, "z", latent=True)
        w = self._full_state(z, fill, generator)
        x, info = map_rows(self.computing_in(z.dtype)._decode_full, w, batch_size, **solver)
        return (x, info) if return_info else x

    def _full_state(self, z: Tensor, fill: str | float = "zeros",
                    generator: torch.Generator | None = None) -> Tensor:
        """The full state ``w(T)`` ``(*, D)`` of latent ``z`` ``(*, d)``: the compressed
        coordinates of a PR-reducing flow are zeros or ``N(0, sd^2)`` draws (``fill``)."""
        if self.radial is not None:
            z = self.radial.inverse(z)
        extra = self.dim - self.latent_dim
        if not extra:
            return z
        shape, sd = (*z.shape[:-1], extra), _fill_sd(fill)
        rest = (sd * _randn(shape, generator, z.dtype, z.device) if sd > 0
                else z.new_zeros(shape))
        return torch.cat([z, rest], dim=-1)

    def _latent_of_state(self, w: Tensor, full_rank: bool = False) -> Tensor:
        """The latent of a full state ``w(T)`` ``(*, D)``: its kept coordinates ``(*, d)``
        through :attr:`radial`; with ``full_rank``, ``(*, D)``, the compressed ones as
        they are."""
        kept = w[..., self.schedule.kept]
        z = kept if self.radial is None else self.radial(kept)
        if not full_rank or self.latent_dim == self.dim:
            return z
        return torch.cat([z, w[..., self.latent_dim:]], dim=-1)

    def _state_of_latent(self, z: Tensor, full_rank: bool = False) -> Tensor:
        """The inverse of :meth:`_latent_of_state` (without ``full_rank``, the compressed
        coordinates are zeros)."""
        if not full_rank or self.latent_dim == self.dim:
            return self._full_state(z)
        if self.radial is None:
            return z
        d = self.latent_dim
        return torch.cat([self.radial.inverse(z[..., :d]), z[..., d:]], dim=-1)

    def _radial_logdet(self, w: Tensor) -> Tensor:
        """``log |det dz/dw|`` ``(*)`` of the latent's radial map (:attr:`radial`, not
        ``None``) at full states ``w`` ``(*, D)``."""
        return self.radial.log_abs_det(w[..., self.schedule.kept])

    def decode_full(self, w: Tensor, *, return_info: bool = False,
                    batch_size: int | None = DEFAULT_BATCH,
                    **solver: object) -> Tensor | tuple[Tensor, SolveInfo]:
        """Data ``x`` of a full standardized state ``w(T)``: ``(*, D) -> (*, D)``.

        The inverse of :meth:`encode_full`; for PR-preserving flows the same as :meth:`decode`
        unless the latent is recalibrated (:attr:`radial`: ``decode(z)`` is
        ``decode_full(radial.inverse(z))``).
        """
        w = self.check_points(w, "w")
        x, info = map_rows(self.computing_in(w.dtype)._decode_full, w, batch_size, **solver)
        return (x, info) if return_info else x

    def _decode_full(self, w: Tensor, **solver: object) -> tuple[Tensor, SolveInfo]:
        w0, _, info = self._solve(w, self.schedule.t_max, 0.0, **solver)
        return self.from_state(w0), info

    def decode_with_logdet(self, w: Tensor, *, trace: str = "auto", num_probes: int = 16,
                           seed: int = 0, **solver: object
                           ) -> tuple[Tensor, Tensor, SolveInfo]:
        """:meth:`decode_full` and ``log |det dx/dw|`` in one augmented solve:
        ``(*, D) -> ((*, D), (*), SolveInfo)``. Trace keywords as in :meth:`log_prob`."""
        w = self.check_points(w, "w")
        return self.computing_in(w.dtype)._decode_with_logdet(
            w, trace=trace, num_probes=num_probes, seed=seed, **solver)

    def _decode_with_logdet(self, w: Tensor, **solver: object) -> tuple[Tensor, Tensor, SolveInfo]:
        w0, logdet, info = self._solve(w, self.schedule.t_max, 0.0, logdet=True, **solver)
        return self.from_state(w0), logdet + self._affine_logdet(), info

    def _affine_logdet(self) -> Tensor:  # log |det dx/dw(0)| of x = from_state(w(0))
        return self._state_maps()[4]

    def add_t0_noise(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the flow's ``t = 0`` marginal around data ``x``: ``(*, D) -> (*, D)``.

        Adds ``N(0, gamma0)`` noise in the scaled eigen-coordinates (``scale * sqrt(gamma0)``
        in data units, the same in every direction). The flow transports the data convolved
        with this noise, not the data itself, so calibration checks should encode noised
        held-out points. It matters where some direction's variance is close to ``gamma0``
        (e.g. dequantized pixels, whose smallest eigenvalue is near ``5e-4``): there clean
        points encode too close to the origin, with variance ``lam / (lam + gamma0)``.
        """
        x = self.check_points(x)
        sd = self.basis.scale * math.sqrt(self.schedule.gamma0)
        return x + sd * _randn(x.shape, generator, x.dtype, x.device)

    def sample(
        self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None,
        fill: str | float = "zeros", return_info: bool = False,
        batch_size: int | None = DEFAULT_BATCH,
        **solver: object,
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        """``n`` samples ``(n, D)`` in the flow's dtype: decode ``z ~ N(0, I_d)``.

        The latents are drawn in blocks of ``SAMPLE_BLOCK`` rows (:meth:`latent_blocks`), so a
        seed gives the same samples whatever ``batch_size``, and ``pyro-inflow sample``, which
        streams the blocks, gives the same file. A seed draws on the CPU's generator, so it
        gives the same latents on any device (a ``generator`` draws on its own device)."""
        _fill_sd(fill)
        w = torch.cat(list(self.latent_blocks(n, seed=seed, generator=generator, fill=fill)))
        x, info = map_rows(self._decode_full, w, batch_size, **solver)
        return (x, info) if return_info else x

    def latent_blocks(self, n: int, *, seed: int | None = None,
                      generator: torch.Generator | None = None,
                      fill: str | float = "zeros") -> Iterator[Tensor]:
        """The full states ``w(T)`` of ``n`` draws from the latent, ``(b, D)`` blocks of at most
        ``SAMPLE_BLOCK`` rows, in the flow's dtype (see :meth:`sample`)."""
        n = check_positive_int(n, "n")
        if generator is None:  # a seeded one, or one seeded from fresh entropy
            generator = torch.Generator()  # the CPU's: the same draws on any device
            _ = generator.seed() if seed is None else generator.manual_seed(seed)
        for start in range(0, n, SAMPLE_BLOCK):
            z = _randn((min(SAMPLE_BLOCK, n - start), self.latent_dim), generator, self.dtype,
                       self.device)
            yield self._full_state(z, fill, generator)

    def log_prob(
        self, x: Tensor, *, full_rank: bool = False, trace: str = "auto", num_probes: int = 16,
        seed: int = 0, return_info: bool = False, batch_size: int | None = DEFAULT_BATCH,
        **solver: object,
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        r"""Log-density ``log p(x)`` of the flow's ``t = 0`` marginal, ``(*, D) -> (*)``.

        ``log p(x) = log N(w(T); 0, I) + int_0^T tr(df/dw) dt - 0.5 sum_i log(lam_i + gamma0)
        - D log(scale)``, the trace exact (``D <= 16`` for ``trace="auto"``) or a Hutchinson
        estimate with ``num_probes`` Rademacher probes fixed by ``seed``.

        Args:
            x: points ``(*, D)``.
            full_rank: for PR-reducing flows, the density of the paper's full-rank model: all
                ``D`` coordinates of ``w(T)`` are ``N(0, 1)``, so the compressed directions keep
                their own small variance (what ``decode(z, fill="normal")`` samples).
            trace: ``"exact"``, ``"hutchinson"``, or ``"auto"`` (exact for ``D <= 16``).
            num_probes: number of Rademacher probes of the Hutchinson estimate.
            seed: seed of the probes (fixed, so the estimate is a deterministic function of
                ``x``).
            return_info: also return the solve's :class:`~pyro_inflow.solvers.SolveInfo`.
            batch_size: rows solved at a time (``None``: all at once).
            **solver: solver keywords (see the class docstring).

        Raises:
            ValueError: for PR-reducing flows without ``full_rank=True``: their data live on a
                ``d``-dimensional manifold and have no density on ``R^D``.
        """
        if not full_rank:
            self.require_density("log_prob")
        x = self.check_points(x)
        lp, info = map_rows(self.computing_in(x.dtype)._log_prob, x, batch_size, trace=trace,
                            num_probes=num_probes, seed=seed, **solver)
        return (lp, info) if return_info else lp

    def _log_prob(self, x: Tensor, **solver: object) -> tuple[Tensor, SolveInfo]:
        wT, logdet, info = self._solve(self._to_state(x), 0.0, self.schedule.t_max, logdet=True,
                                       **solver)
        z = self._latent_of_state(wT, full_rank=True)  # wT itself without a radial map
        log_normal = -0.5 * (z.square().sum(-1) + self.dim * math.log(2 * math.pi))
        lp = log_normal + logdet - self._affine_logdet()
        return (lp if self.radial is None else lp + self._radial_logdet(wT)), info

    def prior(self, *, full_rank: bool = False, **options: object) -> InflationaryFlowPrior:
        """This flow as a Pyro prior: an :class:`~pyro_inflow.InflationaryFlowPrior`.

        Freezes the flow's weights (``requires_grad=False``): inference never trains them.

        Args:
            full_rank: for PR-reducing flows, the full-rank model on ``R^D`` (a proper
                density) instead of the ``d``-dimensional manifold.
            **options: solver and trace options of the prior's transform, see
                :class:`~pyro_inflow.InflationaryFlowTransform`.
        """
        return InflationaryFlowPrior(self, full_rank=full_rank, **options)

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write the flow to ``path`` atomically (tensors and JSON-like data only)."""
        save_flow(self, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike,
             map_location: str | torch.device = "cpu") -> InflationaryFlow:
        """Read a flow written by :meth:`save`; never executes code from the file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a foreign, corrupt, truncated or newer-version file.
        """
        return load_flow(cls, path, map_location)
