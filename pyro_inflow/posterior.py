"""Posterior draws of a latent-inference run in both coordinates, and as ArviZ data.

* :func:`posterior_samples`: the latent sites, every data-space flow site and every
  ``pyro.deterministic`` site, as tensors;
* :func:`to_inference_data`: an ``arviz.InferenceData`` with the posterior in latent and data
  coordinates, ``sample_stats``, ``observed_data`` and ``log_likelihood`` (so ``az.loo``
  works);
* :func:`summary` and :func:`mcse_mean`: ArviZ's summary table and the Monte Carlo standard
  error of a mean (all ArviZ calls are in :mod:`pyro_inflow._arviz`).

Both readers run the reparametrized model once, vectorized over every draw, so the data-space
values are decoded once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import MCMC, Predictive
from pyro.poutine.util import site_is_subsample

from . import _arviz
from .inference import (
    LatentSVI,
    RecordingNUTS,
    is_flow_site,
    max_plate_nesting,
    reparam_flow_priors,
)

__all__ = ["posterior_samples", "to_inference_data", "summary", "mcse_mean", "PosteriorTrace",
           "posterior_trace", "data_space_draws"]

summary = _arviz.summary
mcse_mean = _arviz.mcse_mean


def pad_for_plates(samples: dict[str, torch.Tensor], nodes: dict) -> dict[str, torch.Tensor]:
    """Draws ``(n, *site_shape)`` shaped ``(n, 1, ..., *site_shape)`` for vectorized runs.

    Pyro's ``Predictive`` puts the draws' dimension left of every plate, but counts a site's
    event dimensions as plate dimensions when it pads, which breaks a site with an event shape
    (a flow prior's ``(d,)`` latent) outside the plates of a model that has some. Padding here
    to ``max_plate_nesting - len(batch_shape)`` ones leaves ``Predictive`` nothing to pad.
    """
    nesting = max_plate_nesting(nodes)
    out = {}
    for name, v in samples.items():
        site = nodes.get(name)
        pad = nesting - len(site["fn"].batch_shape) if site is not None else 0
        out[name] = v.reshape(v.shape[0], *[1] * pad, *v.shape[1:]) if pad > 0 else v
    return out


@dataclass
class PosteriorTrace:
    """One vectorized run of the reparametrized model over every posterior draw.

    Attributes:
        trace: the vectorized Pyro trace. nodes: the nodes of a plain trace (site shapes).
        names: the sites to report. chains, draws: the draws' layout.
        args, kwargs: the model arguments used.
    """

    trace: Any
    nodes: dict
    names: list[str]
    chains: int
    draws: int
    args: tuple
    kwargs: dict

    def values(self, name: str) -> torch.Tensor:
        """Site ``name`` per draw, ``(chains * draws, *site_shape)`` (expanded if it does not
        vary by draw)."""
        n, shape = self.chains * self.draws, self.nodes[name]["value"].shape
        value = self.trace.nodes[name]["value"].detach()
        if value.numel() == n * shape.numel():
            return value.reshape(n, *shape)
        return value.reshape(shape).expand(n, *shape)


def posterior_trace(fitted: MCMC | LatentSVI | Callable, args: tuple, kwargs: dict,
                    model: Callable | None = None, num_samples: int = 1000) -> PosteriorTrace:
    """The :class:`PosteriorTrace` of an MCMC run, a :class:`~pyro_inflow.inference.LatentSVI`
    or a guide (which needs ``model``)."""
    if isinstance(fitted, MCMC):
        model = model or fitted.kernel.model
        if not args and not kwargs:
            args, kwargs = fitted._args, fitted._kwargs
    elif isinstance(fitted, LatentSVI):
        model = model or fitted.model
    elif callable(fitted):
        if model is None:
            raise TypeError("posterior_samples: pass model= for a guide not made by latent_svi")
    else:
        raise TypeError(f"fitted: expected an MCMC, a latent_svi result or a guide, got "
                        f"{type(fitted).__name__}")
    original, model = model, reparam_flow_priors(model)
    with torch.no_grad():
        nodes = poutine.trace(model).get_trace(*args, **kwargs).nodes
    grouped = fitted.get_samples(group_by_chain=True) if isinstance(fitted, MCMC) else {}
    if any(k in nodes and is_flow_site(k, nodes[k], nodes) and f"{k}_base" not in grouped
           for k in grouped):
        # a run on the model itself (latent_nuts(centered=True)): its draws are data-space
        # values, which condition the model as it is
        model = original
        with torch.no_grad():
            nodes = poutine.trace(model).get_trace(*args, **kwargs).nodes
    names = [name for name, site in nodes.items()
             if site["type"] == "sample" and not site_is_subsample(site) and (
                 not site["is_observed"] or site["infer"].get("_deterministic")
                 or is_flow_site(name, site, nodes))]
    if isinstance(fitted, MCMC):
        chains, draws = next(iter(grouped.values())).shape[:2]
        # the sampled sites only (a LatentMCMC also holds the data-space values)
        latent = {k: v.reshape(chains * draws, *v.shape[2:]) for k, v in grouped.items()
                  if k in nodes and not nodes[k]["is_observed"]}
    else:
        chains, draws = 1, num_samples
        with torch.no_grad():
            guided = Predictive(fitted, num_samples=num_samples, parallel=True)(*args, **kwargs)
        latent = {k: v.reshape(num_samples, *nodes[k]["value"].shape)
                  for k, v in guided.items() if k in nodes}
    with torch.no_grad():
        try:
            trace = Predictive(model, posterior_samples=pad_for_plates(latent, nodes)
                               ).get_vectorized_trace(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            warnings.warn(
                f"the model does not broadcast over a batch of posterior draws "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); its sites are "
                f"computed one draw at a time instead, which is slower. To vectorize, write "
                f"the model so that a batch of draws on the left of every plate broadcasts "
                f"(e.g. (X * beta).sum(-1) instead of X @ beta)",
                UserWarning, stacklevel=3)
            trace = _sequential_trace(model, latent, names, chains * draws, args, kwargs)
    return PosteriorTrace(trace, nodes, names, chains, draws, args, kwargs)


def _sequential_trace(model: Callable, latent: dict[str, torch.Tensor], names: list[str],
                      n: int, args: tuple, kwargs: dict) -> Any:
    """What a vectorized trace holds (``nodes[name]["value"]`` of ``n`` draws), one draw at a
    time, for models that do not broadcast over a batch of draws."""
    values: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(n):
        conditioned = poutine.condition(model, {k: v[i] for k, v in latent.items()})
        nodes = poutine.trace(conditioned).get_trace(*args, **kwargs).nodes
        for k in names:
            values[k].append(nodes[k]["value"].detach())
    return SimpleNamespace(nodes={k: {"value": torch.stack(v)} for k, v in values.items()})


def posterior_samples(
    fitted: MCMC | LatentSVI | Callable,
    *args: object,
    model: Callable | None = None,
    num_samples: int = 1000,
    group_by_chain: bool = False,
    **kwargs: object,
) -> dict[str, torch.Tensor]:
    """Posterior draws in both coordinates: the latent sites and the data-space flow sites.

    Args:
        fitted: an ``MCMC`` run by :func:`~pyro_inflow.latent_nuts` (or any MCMC on a
            :func:`~pyro_inflow.reparam_flow_priors` model), a
            :func:`~pyro_inflow.latent_svi` result, or any autoguide on such a model (then pass
            ``model``).
        *args: the model's positional arguments (default for MCMC: those of its run).
        model: the model, when it cannot be read from ``fitted`` (a bare autoguide); it is
            passed through :func:`~pyro_inflow.reparam_flow_priors`.
        num_samples: draws from a guide (MCMC returns all its draws).
        group_by_chain: MCMC only: shape ``(chains, draws, ...)`` instead of ``(draws, ...)``.
        **kwargs: the model's keyword arguments (default for MCMC: those of its run).

    Returns:
        ``{site: tensor}`` with every latent site, every rewritten flow site ``name`` (data
        space, ``(..., D)``) and every ``pyro.deterministic`` site. An MCMC run on the model
        itself (``latent_nuts(..., centered=True)``, or ``NUTS(model)``) has no latent site:
        its draws of ``name`` are kept as they are.
    """
    post = posterior_trace(fitted, args, kwargs, model, num_samples)
    out = {k: post.values(k) for k in post.names}
    if group_by_chain:
        out = {k: v.reshape(post.chains, post.draws, *v.shape[1:]) for k, v in out.items()}
    return out


def data_space_draws(mcmc: MCMC) -> dict[str, torch.Tensor]:
    """The data-space flow sites and deterministic sites of an MCMC run on a
    :func:`~pyro_inflow.reparam_flow_priors` model, ``(chains, draws, *site_shape)``."""
    post = posterior_trace(mcmc, (), {})
    n = post.chains, post.draws
    return {k: post.values(k).reshape(*n, *post.nodes[k]["value"].shape) for k in post.names
            if post.nodes[k]["is_observed"]}


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.asarray(x.detach().cpu(), dtype=np.float64)


def to_inference_data(fitted: MCMC | LatentSVI | Callable, *args: object,
                      model: Callable | None = None, num_samples: int = 1000,
                      log_likelihood: bool = True, **kwargs: object) -> Any:
    """An ArviZ ``InferenceData`` of a latent-inference run, in latent and data coordinates.

    Args:
        fitted: an ``MCMC`` from :func:`~pyro_inflow.latent_nuts` (or any MCMC on a
            :func:`~pyro_inflow.reparam_flow_priors` model, several chains welcome), a
            :func:`~pyro_inflow.latent_svi` result, or an autoguide with ``model``.
        *args: the model's positional arguments (default for MCMC: those of its run).
        model: the model, for a bare autoguide.
        num_samples: draws from a guide (one "chain"); MCMC keeps all its draws.
        log_likelihood: add the pointwise log-likelihood of every observed site (draws x
            observations), so ``az.loo`` and ``az.waic`` work.
        **kwargs: the model's keyword arguments (default for MCMC: those of its run).

    Returns:
        ``arviz.InferenceData`` with groups

        * ``posterior``: every latent site (a flow prior ``x`` appears as ``x_base`` with dims
          ``(chain, draw, ..., "x_latent_dim")``) and every data-space flow site and
          ``pyro.deterministic`` site (``x`` with dims ``(chain, draw, ..., "x_dim")``);
        * ``sample_stats`` (MCMC): ``diverging``, and with :func:`~pyro_inflow.latent_nuts`
          also ``tree_depth``, ``n_steps``, ``step_size``, ``lp``;
        * ``observed_data`` and ``log_likelihood``: one variable per observed site.
    """
    # one vectorized run gives the data-space draws and the log-likelihood together
    post = posterior_trace(fitted, args, kwargs, model, num_samples)
    nodes, chains, n_draws = post.nodes, post.chains, post.draws
    n = chains * n_draws
    flow_sites = {name for name, site in nodes.items()
                  if site["type"] == "sample" and is_flow_site(name, site, nodes)}
    observed = {name: site for name, site in nodes.items()
                if site["type"] == "sample" and site["is_observed"] and name not in post.names}

    def dims_of(name: str, ndim: int) -> list[str]:
        lead = [f"{name}_dim_{i}" for i in range(ndim - 1)]
        if name in flow_sites:
            return [*lead, f"{name}_dim"]
        if name.endswith("_base") and name[:-5] in flow_sites:
            return [*lead, f"{name[:-5]}_latent_dim"]
        return [*lead, f"{name}_dim_{ndim - 1}"] if ndim else []

    posterior = {k: _numpy(post.values(k)).reshape(chains, n_draws, *nodes[k]["value"].shape)
                 for k in post.names}
    dims = {k: dims_of(k, v.ndim - 2) for k, v in posterior.items()}
    observed_data = {k: _numpy(s["value"]) for k, s in observed.items()}
    for k, v in observed_data.items():
        dims[k] = [f"{k}_dim_{i}" for i in range(v.ndim)]
    groups = {"posterior": posterior, "observed_data": observed_data}

    if log_likelihood and observed:
        loglik = {}
        for k in observed:
            site = post.trace.nodes[k]
            lp = site["fn"].log_prob(site["value"])  # (draws, 1 per plate pad, *batch)
            shape = observed_data[k].shape
            batch = shape[:len(shape) - len(site["fn"].event_shape)]
            lp = lp.reshape(lp.shape[0], *lp.shape[lp.dim() - len(batch):])
            lp = lp.expand(n, *batch)
            loglik[k] = _numpy(lp).reshape(chains, n_draws, *batch)
        groups["log_likelihood"] = loglik

    if isinstance(fitted, MCMC):
        diag = fitted.diagnostics()
        stats_ = {}
        if "diverging" in diag:
            for k in RecordingNUTS.STATS:
                stats_[k] = np.array([diag[k][f"chain {c}"] for c in range(chains)])
        else:
            div = np.zeros((chains, n_draws), bool)
            for c in range(chains):
                div[c, diag["divergences"][f"chain {c}"]] = True
            stats_["diverging"] = div
        groups["sample_stats"] = stats_
    return _arviz.from_dict(**groups, dims=dims)
