"""Making flows: learned from samples, exact for a Gaussian mixture or a point cloud, or read
from a file (and written to one).

The classmethods :meth:`~pyro_inflow.InflationaryFlow.fit`,
:meth:`~pyro_inflow.InflationaryFlow.from_gaussian_mixture` and
:meth:`~pyro_inflow.InflationaryFlow.from_empirical` are the entry points (and document the
arguments); this module holds their steps and the schedule construction they share. Training
itself (:mod:`pyro_inflow.training`) works in eigen-coordinates and knows nothing of flows.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _io
from ._validation import check_data, check_positive_int
from .basis import EIGENVALUE_FLOOR, EigenBasis
from .calibration.certificate import (
    _certify,
    certificate_summary,
    check_certificate,
    recalibrate_latent,
    warn_failed_certificate,
)
from .denoisers import DENOISERS, EmpiricalDenoiser, GaussianMixtureDenoiser, check_mixture
from .draws import SiteLayout, as_draws, is_draws
from .radial import RadialMap
from .schedule import SCHEDULE_OPTIONS, InflationSchedule
from .training import TrainConfig, Trainer, TrainingDiverged, TrainState, split

if TYPE_CHECKING:
    from .flow import InflationaryFlow

__all__ = ["fit_flow", "mixture_flow", "empirical_flow", "load_flow", "save_flow",
           "make_schedule", "check_rank"]


def make_schedule(dim: int, schedule: str, dims_to_keep: int | None, lam: Tensor,
              dtype: torch.dtype, options: dict) -> InflationSchedule:
    """The flow's schedule from the constructors' arguments (one place for all of them)."""
    unknown = sorted(set(options) - set(SCHEDULE_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected schedule option(s) {unknown}; expected some of "
                        f"{list(SCHEDULE_OPTIONS)} (see InflationSchedule)")
    return InflationSchedule(dim, schedule, dims_to_keep, lam=lam.tolist(), **options).to(dtype)


def check_rank(x: Tensor, lam: Tensor, schedule: str, dims_to_keep: int | None) -> None:
    """Refuse data whose covariance is (numerically) singular unless a PR-reducing schedule
    compresses every degenerate direction."""
    D = x.shape[1]
    rank = int((lam > EIGENVALUE_FLOOR).sum())
    if rank == D:
        return
    if schedule == "prr" and (not isinstance(dims_to_keep, int) or not 1 <= dims_to_keep < D
                              or dims_to_keep <= rank):
        return  # compressed (or the schedule reports a missing or invalid dims_to_keep)
    const = (x.std(0) <= 1e-12 * x.abs().amax().clamp_min(1e-300)).nonzero().flatten().tolist()
    why = (f"column(s) {const} are constant" if const else
           f"its columns are linearly dependent (covariance rank {rank} < D={D})")
    raise ValueError(f"data: {why}, so the flow would have no density in those directions; "
                     f"drop them, or compress them with schedule='prr', dims_to_keep <= {rank}")


def fit_flow(cls: type[InflationaryFlow], data: Tensor, schedule: str,
             dims_to_keep: int | None, *, checkpoint: str | os.PathLike | None,
             checkpoint_every: int, resume: str | os.PathLike | None, progress: bool,
             dtype: torch.dtype, device: str | torch.device | None,
             callback: Callable[[TrainState], None] | None, settings: dict,
             sites: Sequence[str] | None = None, supports: Mapping | None = None,
             thin: int = 1) -> InflationaryFlow:
    """The body of :meth:`pyro_inflow.InflationaryFlow.fit` (see there)."""
    settings = dict(settings)
    options = {k: settings.pop(k) for k in SCHEDULE_OPTIONS if k in settings}
    shrinkage = settings.pop("shrinkage", None)
    recalibrate = settings.pop("recalibrate", True)
    if not isinstance(recalibrate, bool):
        raise TypeError(f"recalibrate: expected True or False, got {recalibrate!r}")
    config = TrainConfig.from_settings(settings)
    check_positive_int(checkpoint_every, "checkpoint_every")
    gen = torch.Generator().manual_seed(config.seed)
    layout = None
    if is_draws(data):  # posterior draws: unconstrained, the end of each chain held out
        draws = as_draws(data, sites, supports, thin=thin,
                         validation_fraction=config.validation_fraction)
        x, layout, val_idx = draws.data, draws.layout, draws.holdout
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[val_idx] = False
        train_idx = keep.nonzero().flatten()
    elif sites is not None or supports is not None or thin != 1:
        raise TypeError("fit: sites, supports and thin apply to posterior draws (an MCMC, a "
                        "dict of sites or an InferenceData), not to an array of samples")
    else:
        x = check_data(data, "data", dtype=torch.float64)
        train_idx, val_idx = split(x.shape[0], config.validation_fraction, gen)
    if x.shape[0] < x.shape[1] + 2:
        raise ValueError(f"data: expected at least D + 2 = {x.shape[1] + 2} points to "
                         f"estimate a covariance, got {x.shape[0]}")
    with warnings.catch_warnings():  # degenerate directions: judged below, with the schedule
        warnings.simplefilter("ignore")
        basis = EigenBasis.from_data(x[train_idx], shrinkage=shrinkage)
    check_rank(x[train_idx], basis.lam, schedule, dims_to_keep)
    basis = basis.to(dtype)
    sched = make_schedule(x.shape[1], schedule, dims_to_keep, basis.lam, dtype, options)
    u = basis.to_eigen(x.to(dtype))
    trainer = Trainer(u[train_idx], u[val_idx], sched, basis.lam, config, generator=gen,
                      device=device)
    try:
        denoiser, history = trainer.run(checkpoint=checkpoint,
                                        checkpoint_every=checkpoint_every, resume=resume,
                                        progress=progress, callback=callback)
    except TrainingDiverged as e:
        e.flow = cls(basis.to(e.denoiser.lam.device), e.denoiser).requires_grad_(False)
        raise
    flow = cls(basis.to(denoiser.lam.device), denoiser).requires_grad_(False)
    flow.history, flow.sites = history, layout
    if len(val_idx):  # every rank computes it (the same numbers); rank 0 says it
        dev = denoiser.lam.device
        cert, z = _certify(flow, x[val_idx].to(dtype).to(dev), x[train_idx].to(dtype).to(dev),
                           config.seed)  # and the held-out latents, for the recalibration
        if recalibrate and not cert["passed"]:
            cert = recalibrate_latent(flow, z, cert)
        flow.certificate = cert
        if trainer.rank == 0:
            if progress:
                print(certificate_summary(flow.certificate), file=sys.stderr)
            warn_failed_certificate(flow, "fit")
    return flow


def mixture_flow(cls: type[InflationaryFlow], weights: Tensor, means: Tensor,
                 covariances: Tensor, schedule: str, dims_to_keep: int | None,
                 dtype: torch.dtype, options: dict) -> InflationaryFlow:
    """The body of :meth:`pyro_inflow.InflationaryFlow.from_gaussian_mixture`."""
    w, m, S = check_mixture(weights, means, covariances, dtype)
    w = w / w.sum()
    mean = (w[:, None] * m).sum(0)
    dev = m - mean
    cov = (w[:, None, None] * (S + dev[:, :, None] * dev[:, None, :])).sum(0)
    basis = EigenBasis.from_moments(mean, cov)
    sched = make_schedule(m.shape[1], schedule, dims_to_keep, basis.lam, dtype, options)
    m_u = basis.to_eigen(m)
    S_u = basis.W.T @ S @ basis.W / basis.scale**2
    return cls(basis, GaussianMixtureDenoiser(sched, w, m_u, S_u))


def empirical_flow(cls: type[InflationaryFlow], data: Tensor, schedule: str,
                   dims_to_keep: int | None, dtype: torch.dtype,
                   options: dict) -> InflationaryFlow:
    """The body of :meth:`pyro_inflow.InflationaryFlow.from_empirical`."""
    x = check_data(data, "data", min_rows=2, dtype=dtype)
    basis = EigenBasis.from_data(x)
    sched = make_schedule(basis.dim, schedule, dims_to_keep, basis.lam, dtype, options)
    return cls(basis, EmpiricalDenoiser(sched, basis.to_eigen(x)))


def save_flow(flow: InflationaryFlow, path: str | os.PathLike, metadata: dict | None) -> None:
    """The body of :meth:`pyro_inflow.InflationaryFlow.save`."""
    den = flow.denoiser
    kind = next(k for k, c in DENOISERS.items() if isinstance(den, c))
    _io.save_payload(path, "flow", {
        "basis": {k: v.detach().cpu() for k, v in flow.basis.state_dict().items()},
        "schedule": flow.schedule.config(),
        "denoiser": {"type": kind, "config": den.config(),
                     "state": {k: v.detach().cpu() for k, v in den.state_dict().items()}},
        "metadata": dict(metadata or {}),
        "certificate": flow.certificate,
        "sites": None if flow.sites is None else flow.sites.config(),
        "radial": None if flow.radial is None else flow.radial.config(),
    })


def load_flow(cls: type[InflationaryFlow], path: str | os.PathLike,
              map_location: str | torch.device) -> InflationaryFlow:
    """The body of :meth:`pyro_inflow.InflationaryFlow.load`."""
    record = _io.load_payload(path, "flow")
    try:
        basis = EigenBasis(**record["basis"])
        dtype = basis.mean.dtype
        config = dict(record["schedule"])
        config.pop("A0", None)  # files of 0.1.0: the unused scale s(t) had a parameter
        sched = InflationSchedule(**config).to(dtype)
        spec = record["denoiser"]
        den = DENOISERS[spec["type"]].from_saved(sched, basis.lam, spec["config"],
                                                 spec["state"])
        flow = cls(basis, den.to(dtype))
        radial = record.get("radial")
        if radial is not None:
            if not isinstance(radial, dict) or radial.get("dim") != flow.latent_dim:
                raise ValueError(f"radial map {radial!r} for a {flow.latent_dim}-D latent")
            flow.radial = RadialMap(radial["c"], radial["b"], radial["s"], radial["dim"],
                                    dtype=dtype)
        for name, value in flow.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"non-finite values in {name}")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError,
            IndexError) as e:
        raise ValueError(f"{path}: corrupt pyro_inflow flow file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from e
    flow.metadata = dict(record.get("metadata", {}))
    try:
        flow.certificate = check_certificate(record.get("certificate"))
        flow.sites = None if record.get("sites") is None else SiteLayout(record["sites"])
        if flow.sites is not None and flow.sites.dim != flow.dim:
            raise ValueError(f"sites: {flow.sites.dim} dimensions for a {flow.dim}-D flow")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt pyro_inflow flow file ({e})") from e
    return flow.requires_grad_(False).to(map_location)
