"""Every ArviZ call of the package, so a move to another ArviZ line changes this file only.

ArviZ 0.23 (what Python 3.11 resolves to): ``from_dict``, ``summary``, ``mcse``, ``ess`` and
``plot_ecdf`` with ``difference=True`` (there is no ``plot_sbc``). ArviZ is imported when first
needed, so importing pyro_inflow stays fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

__all__ = ["from_dict", "summary", "mcse_mean", "ess_bulk", "plot_ecdf_difference"]


def from_dict(**groups: Any) -> Any:
    """``arviz.from_dict``: an ``InferenceData`` from groups of arrays ``(chain, draw, ...)``."""
    import arviz as az

    return az.from_dict(**groups)


def summary(idata: Any, var_names: list[str] | None = None, **kwargs: Any) -> Any:
    """``arviz.summary`` (a ``pandas.DataFrame``): mean, sd, HDI, MCSE, ESS, R-hat."""
    import arviz as az

    return az.summary(idata, var_names=var_names, **kwargs)


def mcse_mean(values: Any) -> tuple[float, float, float]:
    """Mean of ``values (chain, draw)`` with its Monte Carlo standard error and bulk ESS.

    For an indicator (e.g. ``x[..., 0] > 0``) this is a posterior probability and how far the
    chains' autocorrelation lets it be trusted: ``(mean, mcse, ess_bulk)``.
    """
    import arviz as az

    v = _chains(values)
    return float(v.mean()), float(az.mcse(v, method="mean")), ess_bulk(v)


def ess_bulk(values: Any) -> float:
    """Bulk effective sample size of ``values (chain, draw)`` (rank-normalized, ArviZ)."""
    import arviz as az

    return float(az.ess(_chains(values), method="bulk"))


def _chains(values: Any) -> np.ndarray:
    """``values`` as a float64 array ``(chain, draw)``, or a ``ValueError``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values: expected shape (chain, draw), got {v.shape}")
    return v


def plot_ecdf_difference(u: np.ndarray, ax: Any) -> None:
    """The ECDF of ``u`` in ``(0, 1)`` minus the uniform's, with 95 % simultaneous bands."""
    import arviz as az

    az.plot_ecdf(u, eval_points=np.linspace(0, 1, 201), cdf=stats.uniform(0, 1).cdf,
                 difference=True, confidence_bands=True, ci_prob=0.95, ax=ax,
                 rvs=stats.uniform(0, 1).rvs, random_state=0)
