"""The flow as a Pyro prior: a ``TransformedDistribution`` over a standard Normal latent."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from .calibration.certificate import warn_failed_certificate
from .transforms import InflationaryFlowTransform

if TYPE_CHECKING:  # the Pyro layer sits above the flow and never imports it at run time
    from .flow import InflationaryFlow

__all__ = ["InflationaryFlowPrior"]

_NO_SHAPE = torch.Size()


class InflationaryFlowPrior(dist.TransformedDistribution):
    r"""A learned prior on ``R^D``: ``x = decode(z)``, ``z ~ N(0, I_d)``; event shape ``(D,)``.

    Use it like any Pyro distribution, ``x = pyro.sample("x", flow.prior())``, and run
    inference in the flow's Gaussian latent with :func:`pyro_inflow.reparam_flow_priors` (or
    :func:`pyro_inflow.latent_nuts`), which rewrites the site with Pyro's ``TransformReparam``.

    * PR-preserving flows (``d = D``), and PR-reducing ones with ``full_rank=True``:
      ``log_prob(x)`` is the flow's density (one encode with the change of variables; exact
      trace for ``D <= 16``, else a Hutchinson estimate with probes fixed by ``seed``, so the
      potential stays deterministic inside NUTS). ``rsample`` decodes with the
      log-determinant in the same solve and caches it, so ``log_prob`` of a value just drawn
      by ``rsample`` (what a Pyro trace does) costs no second solve; ``sample`` (no
      gradients) decodes without it.
    * PR-reducing flows (``d < D``): the prior lives on a ``d``-dimensional manifold in
      ``R^D`` and ``log_prob`` raises; ``sample``, ``rsample`` and reparametrized (latent)
      inference work.

    Args:
        flow: the flow (its weights are frozen).
        full_rank: PR-reducing flows only: the paper's full-rank model, a proper density on
            ``R^D`` whose compressed directions keep their own small variance.
        **options: solver and trace options of :class:`~pyro_inflow.InflationaryFlowTransform`
            (``rtol``, ``atol``, ``method``, ``adjoint``, ``trace``, ``num_probes``, ``seed``,
            ...).
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, flow: InflationaryFlow, *, full_rank: bool = False,
                 validate_args: bool | None = None, **options: object) -> None:
        transform = InflationaryFlowTransform(flow, full_rank=full_rank,
                                              validate_args=validate_args, **options)
        zeros = torch.zeros(transform.in_dim, dtype=flow.dtype, device=flow.device)
        base = dist.Normal(zeros, 1.0).to_event(1)
        super().__init__(base, [transform], validate_args=validate_args)
        warn_failed_certificate(flow, "prior")

    @property
    def base_dist(self) -> dist.TorchDistribution:
        """The standard Normal latent ``(*batch_shape, d)``, in the flow's current dtype and
        device (a prior made before ``flow.double()`` draws float64 latents after it)."""
        base, transforms = self._base, self.__dict__.get("transforms")
        if transforms:
            flow, loc = transforms[0].flow, base.base_dist.loc
            if loc.dtype != flow.dtype or loc.device != flow.device:
                zeros = torch.zeros(loc.shape, dtype=flow.dtype, device=flow.device)
                base = self._base = dist.Normal(zeros, 1.0).to_event(
                    base.reinterpreted_batch_ndims)
        return base

    @base_dist.setter
    def base_dist(self, value: dist.TorchDistribution) -> None:
        self._base = value

    @property
    def transform(self) -> InflationaryFlowTransform:
        """The decode, latent -> data."""
        return self.transforms[0]

    @property
    def flow(self) -> InflationaryFlow:
        """The flow."""
        return self.transform.flow

    @property
    def full_rank(self) -> bool:
        """Whether the prior has a density on ``R^D`` (PR-preserving, or full-rank PR-reducing)."""
        return self.transform.full_rank

    def expand(self, batch_shape: torch.Size,
               _instance: InflationaryFlowPrior | None = None) -> InflationaryFlowPrior:
        """The prior with batch shape ``batch_shape`` (Pyro's ``expand``)."""
        new = self._get_checked_instance(InflationaryFlowPrior, _instance)
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        """Draws ``(*sample_shape, *batch_shape, D)`` in the flow's dtype, without gradients."""
        _warn_if_conditioned_on_latents(self.transform.in_dim)
        return super().sample(sample_shape)

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        """Reparametrized draws ``(*sample_shape, *batch_shape, D)``; with a density, the
        log-determinant comes from the same solve and is cached for :meth:`log_prob`."""
        _warn_if_conditioned_on_latents(self.transform.in_dim)
        if not self.full_rank:
            return super().rsample(sample_shape)
        z = self.base_dist.rsample(sample_shape)
        return self.transform.call_and_ladj(z)[0]

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(x)`` of data ``x`` ``(*batch, D) -> (*batch)`` (one encode solve, or none
        for the last value drawn by :meth:`rsample`)."""
        flow, t = self.flow, self.transform
        if not self.full_rank:
            flow.require_density("InflationaryFlowPrior.log_prob")
        if value.dim() < 1 or value.shape[-1] != flow.dim:
            raise ValueError(
                f"InflationaryFlowPrior.log_prob: expected values of shape (*, {flow.dim}) "
                f"for this flow (D={flow.dim}), got shape {tuple(value.shape)}"
            )
        cached = t.cached_ladj(value)
        if cached is not None:
            z, ladj = cached
            lp = self.base_dist.log_prob(z) - ladj
        else:
            lp = t.log_density(value)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def __repr__(self) -> str:
        kind = "full-rank" if self.full_rank and self.flow.latent_dim < self.flow.dim else (
            "PR-preserving" if self.full_rank else "PR-reducing")
        return (f"{type(self).__name__}(D={self.flow.dim}, d={self.transform.in_dim}, {kind}, "
                f"batch_shape={tuple(self.batch_shape)})")


def enclosing_conditions() -> Iterator[Mapping[str, object]]:
    """The values held by each enclosing ``poutine.condition`` (a dict, or a trace's site
    values), innermost last."""
    for handler in _PYRO_STACK:
        data = getattr(handler, "data", None) if isinstance(handler, ConditionMessenger) else None
        if data is not None:
            yield ({k: site["value"] for k, site in data.nodes.items()}
                   if isinstance(data, Trace) else data)


def _conditioned_latents(dim: int) -> list[str]:
    """Sites ``"{name}_base"`` with values ``(..., dim)`` that an enclosing
    ``poutine.condition`` holds without their data-space site ``name``: the latents of
    :func:`~pyro_inflow.reparam_flow_priors`, given to a model that has only ``name``."""
    return [k for values in enclosing_conditions() for k, v in values.items()
            if isinstance(k, str) and k.endswith("_base") and k[:-5] not in values
            and isinstance(v, Tensor) and v.dim() >= 1 and v.shape[-1] == dim]


def _warn_if_conditioned_on_latents(dim: int) -> None:
    """Warn when a flow prior is drawn afresh although the model is conditioned on what looks
    like its latent: ``Predictive(model, posterior_samples=mcmc.get_samples())`` on the
    original model of a plain MCMC run, whose draws hold only ``"x_base"``."""
    names = _conditioned_latents(dim) if _PYRO_STACK else []
    if names:
        warnings.warn(
            f"InflationaryFlowPrior: drawn from the prior although the model is conditioned on "
            f"{sorted(set(names))}, the latent of a flow site under reparam_flow_priors; this "
            f"model has no such site, so the draw ignores those values. Condition on the "
            f"data-space values instead (Predictive(model, posterior_samples="
            f"pif.posterior_samples(mcmc)); latent_nuts's get_samples() carries them) or run "
            f"Predictive on pif.reparam_flow_priors(model)", UserWarning, stacklevel=3)
