"""The flow as a Pyro prior: a ``TransformedDistribution`` over a standard Normal latent."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor

from .flow import InflationaryFlow
from .transforms import InflationaryFlowTransform

__all__ = ["InflationaryFlowPrior"]


class InflationaryFlowPrior(dist.TransformedDistribution):
    r"""A learned prior on ``R^D``: ``x = decode(z)``, ``z ~ N(0, I_d)``; event shape ``(D,)``.

    Use it like any Pyro distribution, ``x = pyro.sample("x", flow.prior())``, and run
    inference in the flow's Gaussian latent with :func:`pyro_inflow.reparam_flow_priors` (or
    :func:`pyro_inflow.latent_nuts`), which rewrites the site with Pyro's ``TransformReparam``.

    * PR-preserving flows (``d = D``), and PR-reducing ones with ``full_rank=True``:
      ``log_prob(x)`` is the flow's density (one encode with the change of variables; exact
      trace for ``D <= 16``, else a Hutchinson estimate with probes fixed by ``seed``, so the
      potential stays deterministic inside NUTS).
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
                 validate_args: bool | None = None, **options) -> None:
        transform = InflationaryFlowTransform(flow, full_rank=full_rank, **options)
        zeros = torch.zeros(transform.in_dim, dtype=flow.dtype, device=flow.device)
        base = dist.Normal(zeros, 1.0).to_event(1)
        super().__init__(base, [transform], validate_args=validate_args)

    @property
    def transform(self) -> InflationaryFlowTransform:
        return self.transforms[0]

    @property
    def flow(self) -> InflationaryFlow:
        return self.transform.flow

    @property
    def full_rank(self) -> bool:
        """Whether the prior has a density on ``R^D`` (PR-preserving, or full-rank PR-reducing)."""
        return self.transform.full_rank

    def expand(self, batch_shape, _instance=None) -> InflationaryFlowPrior:
        new = self._get_checked_instance(InflationaryFlowPrior, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(x)`` of data ``x`` ``(*batch, D) -> (*batch)`` (one encode solve)."""
        flow = self.flow
        if not self.full_rank:
            raise ValueError(
                f"InflationaryFlowPrior.log_prob: this PR-reducing prior (d={flow.latent_dim} "
                f"< D={flow.dim}) lives on a {flow.latent_dim}-dimensional manifold in "
                f"R^{flow.dim} and has no density there; use latent inference "
                f"(pyro_inflow.reparam_flow_priors or latent_nuts), or "
                f"flow.prior(full_rank=True) for a proper density"
            )
        if value.dim() < 1 or value.shape[-1] != flow.dim:
            raise ValueError(
                f"InflationaryFlowPrior.log_prob: expected values of shape (*, {flow.dim}) "
                f"for this flow (D={flow.dim}), got shape {tuple(value.shape)}"
            )
        t = self.transform
        lp = t._solved(flow.log_prob(value, full_rank=True, **t.solver_options(trace=True)))
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def __repr__(self) -> str:
        kind = "full-rank" if self.full_rank and self.flow.latent_dim < self.flow.dim else (
            "PR-preserving" if self.full_rank else "PR-reducing")
        return (f"{type(self).__name__}(D={self.flow.dim}, d={self.transform.in_dim}, {kind}, "
                f"batch_shape={tuple(self.batch_shape)})")
