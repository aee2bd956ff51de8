"""Posterior draws as training data: the posterior of one study as the prior of the next.

:meth:`~pyro_inflow.InflationaryFlow.fit` accepts, besides an array of samples, the draws of an
earlier analysis:

* a Pyro :class:`~pyro.infer.MCMC` object after ``run`` (the sites' supports come from its
  transforms; chains are kept apart);
* a dict of draws ``{site: (S, *shape)}``, e.g. ``mcmc.get_samples()`` or
  :func:`~pyro_inflow.posterior_samples`;
* an ArviZ ``InferenceData`` (its ``posterior`` group, ``(chain, draw, *shape)``).

Each chosen site is mapped to unconstrained space by its Pyro bijection
(``biject_to(support).inv``: ``log`` for a positive scale, stick-breaking for a simplex),
flattened, and the sites are concatenated into one vector per draw. The flow learns the law of
that vector; its :class:`SiteLayout` (names, shapes, supports) travels in the flow file, and
:func:`sample_sites` draws the vector in a model and hands back named, constrained values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to, constraints

__all__ = ["SiteLayout", "PosteriorDraws", "as_draws", "is_draws", "sample_sites"]


def _support_spec(name: str, support: constraints.Constraint) -> dict:
    """A JSON-ready description of a site's support (the ones Pyro's models use)."""
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if base.is_discrete:
        raise ValueError(f"site {name!r}: a discrete site ({support}) cannot be learned by a "
                         f"flow; leave it out with sites=[...] (or marginalize it)")
    if base is constraints.real:
        return {"type": "real"}
    if base is constraints.simplex:
        return {"type": "simplex"}
    try:
        # a closed bound has the open bound's bijection (the bound itself has measure zero)
        if isinstance(base, (constraints.interval, constraints.half_open_interval)):
            return {"type": "interval", "lower": float(base.lower_bound),
                    "upper": float(base.upper_bound)}
        if isinstance(base, (constraints.greater_than, constraints.greater_than_eq)):
            return {"type": "greater_than", "lower": float(base.lower_bound)}
        if isinstance(base, constraints.less_than):
            return {"type": "less_than", "upper": float(base.upper_bound)}
    except (TypeError, ValueError, RuntimeError):  # bounds that are tensors of several values
        pass
    raise ValueError(f"site {name!r}: its support {support} is not one a flow file can "
                     f"record (real, positive, greater_than, less_than, interval with scalar "
                     f"bounds, simplex); transform the draws yourself and pass an array")


def _support_of(spec: dict) -> constraints.Constraint:
    kind = spec["type"]
    if kind == "real":
        return constraints.real
    if kind == "simplex":
        return constraints.simplex
    if kind == "interval":
        return constraints.interval(spec["lower"], spec["upper"])
    if kind == "greater_than":
        return constraints.greater_than(spec["lower"])
    if kind == "less_than":
        return constraints.less_than(spec["upper"])
    raise ValueError(f"unknown support {spec!r}")


_NAMED = {"positive": {"type": "greater_than", "lower": 0.0},
          "real": {"type": "real"}, "simplex": {"type": "simplex"},
          "unit_interval": {"type": "interval", "lower": 0.0, "upper": 1.0}}


@dataclass(frozen=True)
class _Site:
    """One site of a layout; its bijection and sizes are built once (``unpack`` runs in the
    model, at every step of a sampler)."""

    name: str
    shape: tuple[int, ...]
    support: dict

    @cached_property
    def transform(self) -> torch.distributions.Transform:
        return biject_to(_support_of(self.support))

    @cached_property
    def free_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.inverse_shape(torch.Size(self.shape)))

    @cached_property
    def size(self) -> int:
        return math.prod(self.free_shape)


def _first_bad(name: str, rows: Tensor, what: str) -> None:
    """Raise naming the first row of ``rows (*batch, k)`` with a non-finite value."""
    bad = ~torch.isfinite(rows).all(-1)
    if bad.any():
        raise ValueError(f"site {name!r}: draw {int(bad.flatten().nonzero()[0])} {what}")


class SiteLayout:
    """How named sites pack into one unconstrained vector ``(*, D)`` and back.

    Args:
        sites: ``[{"name", "shape", "support"}]`` in packing order; ``support`` as recorded in
            the flow file (``{"type": "real" | "greater_than" | "less_than" | "interval" |
            "simplex", ...bounds}``).

    Example:
        >>> layout = SiteLayout([{"name": "mu", "shape": [2], "support": {"type": "real"}},
        ...                      {"name": "sigma", "shape": [], "support": {"type":
        ...                       "greater_than", "lower": 0.0}}])
        >>> layout.dim
        3
        >>> v = layout.unpack(torch.zeros(3))
        >>> v["mu"].tolist(), float(v["sigma"])
        ([0.0, 0.0], 1.0)
    """

    def __init__(self, sites: Sequence[Mapping]) -> None:
        self.sites = [_Site(str(s["name"]), tuple(int(k) for k in s["shape"]),
                            dict(s["support"])) for s in sites]
        if not self.sites:
            raise ValueError("sites: expected at least one site")
        for s in self.sites:
            _support_of(s.support)  # refuses an unknown support

    @property
    def names(self) -> list[str]:
        """The site names, in packing order."""
        return [s.name for s in self.sites]

    @property
    def dim(self) -> int:
        """Length ``D`` of the packed unconstrained vector."""
        return sum(s.size for s in self.sites)

    def config(self) -> list[dict]:
        """The JSON-ready record of the layout (what the flow file stores)."""
        return [{"name": s.name, "shape": list(s.shape), "support": dict(s.support)}
                for s in self.sites]

    def pack(self, values: Mapping[str, Tensor], batch_ndims: int = 1) -> Tensor:
        """Constrained values ``{site: (*batch, *shape)}`` -> unconstrained ``(*batch, D)``.

        Raises:
            ValueError: a missing site, a wrong shape, a NaN or Inf, or a value outside its
                support (named, with the first bad row).
        """
        parts = []
        for s in self.sites:
            if s.name not in values:
                raise ValueError(f"site {s.name!r}: missing; the values have "
                                 f"{sorted(values)}")
            v = torch.as_tensor(values[s.name])
            batch = v.shape[:batch_ndims]
            if tuple(v.shape[batch_ndims:]) != s.shape:
                raise ValueError(f"site {s.name!r}: expected shape (*batch, {s.shape}), got "
                                 f"{tuple(v.shape)}")
            _first_bad(s.name, v.reshape((*batch, -1)), "is NaN or Inf; drop the bad draws (a "
                       "diverged chain?) before fitting")
            u = s.transform.inv(v).reshape((*batch, s.size))
            _first_bad(s.name, u, f"is outside its support {_support_of(s.support)}")
            parts.append(u)
        return torch.cat(parts, dim=-1)

    def unpack(self, x: Tensor) -> dict[str, Tensor]:
        """Unconstrained ``(*batch, D)`` -> constrained values ``{site: (*batch, *shape)}``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (*batch, {self.dim}), got {tuple(x.shape)}")
        out, start = {}, 0
        for s in self.sites:
            u = x[..., start:start + s.size].reshape((*x.shape[:-1], *s.free_shape))
            out[s.name] = s.transform(u)
            start += s.size
        return out

    def __repr__(self) -> str:
        parts = [f"{s.name}{list(s.shape)}:{s.support['type']}" for s in self.sites]
        return f"SiteLayout({', '.join(parts)}; D={self.dim})"


@dataclass
class PosteriorDraws:
    """Draws made ready for training: ``data (n, D)`` unconstrained, with the layout, the
    rows to hold out (the last ``fraction`` of every chain, so held-out draws are not
    neighbours of training draws), and the effective sample size."""

    data: Tensor
    layout: SiteLayout
    holdout: Tensor
    chains: int
    ess: float


def is_draws(data: object) -> bool:
    """Whether ``data`` are posterior draws (MCMC, dict of sites, InferenceData)."""
    return (isinstance(data, Mapping) or hasattr(data, "get_samples")
            or hasattr(data, "posterior"))


def _mcmc_supports(mcmc: object) -> dict[str, constraints.Constraint]:
    """The supports of an MCMC's latent sites, from its kernel's trace of the model."""
    kernel = getattr(mcmc, "kernel", None)
    trace = getattr(kernel, "_prototype_trace", None)  # HMC/NUTS keep the trace of setup
    if trace is None:
        model = getattr(kernel, "model", None)
        if model is None:
            return {}
        trace = poutine.trace(model).get_trace(*(getattr(mcmc, "_args", None) or ()),
                                               **(getattr(mcmc, "_kwargs", None) or {}))
    return {name: site["fn"].support for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site) and not site["infer"].get("_deterministic")}


def _by_chain(data: object, sites: Sequence[str] | None,
              supports: Mapping[str, object] | None) -> tuple[dict, dict]:
    """``({site: (chain, draw, *shape) tensor}, {site: support spec})``."""
    given = {k: (_NAMED[v] if isinstance(v, str) and v in _NAMED else
                 _support_spec(k, v) if isinstance(v, constraints.Constraint) else v)
             for k, v in (supports or {}).items()}
    for k, v in given.items():
        if not isinstance(v, dict):
            raise ValueError(f"supports[{k!r}]: expected a torch constraint or one of "
                             f"{sorted(_NAMED)}, got {v!r}")
    if hasattr(data, "get_samples"):  # pyro.infer.MCMC
        try:
            raw = data.get_samples(group_by_chain=True)
        except Exception as e:  # not run yet, or a foreign object
            raise ValueError(f"data: could not read the draws of {type(data).__name__} "
                             f"({type(e).__name__}: {e}); run it first") from e
        supports_of = _mcmc_supports(data)
        if sites is None:  # the sampled sites (not deterministic ones), else all
            sites = [k for k in raw if k in supports_of] or list(raw)
        specs = {k: _support_spec(k, supports_of[k]) for k in sites
                 if k in supports_of and k not in given}
        arrays = {k: torch.as_tensor(v) for k, v in raw.items()}
    elif hasattr(data, "posterior"):  # arviz.InferenceData
        post = data.posterior
        arrays = {k: torch.as_tensor(np.asarray(post[k].values)) for k in post.data_vars}
        specs = {}
    else:  # a dict {site: (S, *shape)}: one chain
        arrays = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v)[None]
                  for k, v in data.items()}
        specs = {}
    if sites is None:
        sites = list(arrays)
    sites = list(sites)
    if not sites:
        raise ValueError("sites: expected at least one site")
    for k in sites:
        if k not in arrays:
            raise ValueError(f"site {k!r}: not in the draws, which have {sorted(arrays)}")
    for k in given:
        if k not in sites:
            raise ValueError(f"supports: site {k!r} is not among the chosen sites {sites}")
    chosen = {}
    for k in sites:
        v = arrays[k]
        if v.is_complex():
            raise ValueError(f"site {k!r}: complex draws are not supported")
        if not v.is_floating_point():
            raise ValueError(f"site {k!r}: discrete draws ({v.dtype}) cannot be learned by a "
                             f"flow; leave the site out with sites=[...]")
        if v.dim() < 2:
            raise ValueError(f"site {k!r}: expected draws (draw, *shape), got shape "
                             f"{tuple(v.shape[1:])}")
        chosen[k] = v.detach().cpu().to(torch.float64)  # checked as they are packed; fit moves them
    specs = {k: given.get(k, specs.get(k, {"type": "real"})) for k in sites}
    return chosen, specs


def as_draws(data: object, sites: Sequence[str] | None = None,
             supports: Mapping[str, object] | None = None, *, thin: int = 1,
             validation_fraction: float = 0.1) -> PosteriorDraws:
    """Posterior draws as one unconstrained array, with their layout.

    Args:
        data: an :class:`~pyro.infer.MCMC` after ``run``, a dict ``{site: (S, *shape)}``, or an
            ArviZ ``InferenceData``.
        sites: the sites to learn (default: every sampled site of an MCMC, every key of a
            dict, every variable of the posterior group).
        supports: ``{site: constraint}`` for sites whose support is not in the draws (dicts
            and InferenceData): a torch constraint (``constraints.positive``, ...) or one of
            ``"real"``, ``"positive"``, ``"unit_interval"``, ``"simplex"``. Default real, or
            what the MCMC's transforms say.
        thin: keep every ``thin``-th draw of each chain.
        validation_fraction: the share of each chain, at its end, to hold out.

    Raises:
        ValueError: a missing, discrete, non-finite or out-of-support site (named), or
            fewer draws than dimensions + 2. Non-finite values and the support are checked on
            the draws kept after ``thin``.
    """
    if not (isinstance(thin, int) and thin >= 1):
        raise ValueError(f"thin: expected a positive integer, got {thin!r}")
    chosen, specs = _by_chain(data, sites, supports)
    shapes = {k: v.shape[:2] for k, v in chosen.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"sites: the draws disagree in (chain, draw) counts: "
                         f"{ {k: tuple(s) for k, s in shapes.items()} }")
    chains, draws = next(iter(shapes.values()))
    layout = SiteLayout([{"name": k, "shape": list(v.shape[2:]), "support": specs[k]}
                         for k, v in chosen.items()])
    values = {k: v[:, ::thin] for k, v in chosen.items()}
    per_chain = values[layout.names[0]].shape[1]
    flat = layout.pack(values, batch_ndims=2)  # (chain, draw, D)
    n, D = chains * per_chain, layout.dim
    if n < D + 2:
        raise ValueError(f"sites {layout.names}: {n} draws for {D} unconstrained dimensions; "
                         f"a flow needs at least D + 2 = {D + 2} draws")
    ess = _min_ess(flat)
    if ess < 0.1 * n:
        warnings.warn(f"the draws of {layout.names} are strongly autocorrelated: an effective "
                      f"sample size of {ess:.0f} of {n} draws (smallest bulk ESS of any "
                      f"coordinate); the flow sees about {ess:.0f} independent points, and its "
                      f"held-out check is the last {validation_fraction:.0%} of each chain",
                      RuntimeWarning, stacklevel=3)
    n_val = 0 if validation_fraction <= 0 else max(1, round(validation_fraction * per_chain))
    idx = torch.arange(n).reshape(chains, per_chain)
    holdout = idx[:, per_chain - n_val:].reshape(-1) if n_val < per_chain else idx[:, :0]
    return PosteriorDraws(flat.reshape(n, D), layout, holdout, chains, ess)


def _min_ess(flat: Tensor) -> float:
    """The smallest bulk ESS of any coordinate of ``flat (chain, draw, D)``."""
    from ._arviz import ess_bulk

    return float(min(ess_bulk(flat[..., j].numpy()) for j in range(flat.shape[-1])))


def sample_sites(name: str, flow: object, **prior_options: object) -> dict[str, Tensor]:
    """Draw the named sites a flow learned from posterior draws, inside a Pyro model.

    Samples ``name`` from ``flow.prior()`` (the packed unconstrained vector; reparametrize it
    with :func:`~pyro_inflow.reparam_flow_priors` or run :func:`~pyro_inflow.latent_nuts`), maps
    it back through each site's bijection, and records every site as a
    ``pyro.deterministic`` of its own name, so the posterior reports ``mu``, ``sigma``, ...
    as in the first study.

    Args:
        name: the sample site of the packed vector.
        flow: a flow fitted to posterior draws (``flow.sites`` is its layout).
        **prior_options: options of :meth:`~pyro_inflow.InflationaryFlow.prior`.

    Returns:
        ``{site: value (*batch, *shape)}``, constrained.

    Example:
        >>> def model(y):
        ...     theta = sample_sites("theta", flow)  # doctest: +SKIP
        ...     pyro.sample("y", dist.Normal(theta["mu"], theta["sigma"]), obs=y)  # doctest: +SKIP
    """
    layout = getattr(flow, "sites", None)
    if layout is None:
        raise ValueError("sample_sites: this flow was not fitted to posterior draws "
                         "(flow.sites is None); use pyro.sample(name, flow.prior())")
    x = pyro.sample(name, flow.prior(**prior_options))
    values = layout.unpack(x)
    for site in layout.sites:
        pyro.deterministic(site.name, values[site.name], event_dim=len(site.shape))
    return values
