"""Simulation-based calibration (Talts et al., 2018) of inference under a flow prior.

Draw parameters from the prior, simulate the observed sites, run the inference on the
simulated data, and rank each true value among its posterior draws. If the inference is
calibrated, every rank is uniform on ``{0, ..., L}``. Ties are broken at random and the ranks
turned into fractional ranks ``u = (rank + U(0, 1)) / (L + 1)``, exactly ``Uniform(0, 1)``
under calibration; the uniformity test is Kolmogorov-Smirnov on ``u``, and the central
``p`` interval of the posterior covers the truth exactly when ``|u - 1/2| <= p/2``.

Example:
    >>> res_nuts = simulation_based_calibration(model, num_simulations=100)  # doctest: +SKIP
    >>> res_svi = simulation_based_calibration(
    ...     model, inference="svi", inference_kwargs={"guide": "normal"})  # doctest: +SKIP
    >>> print(res_nuts.table())  # doctest: +SKIP
    >>> plot_sbc([res_nuts, res_svi], "sbc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from scipy import stats

from ._progress import tqdm
from ._validation import check_positive_int
from .inference import (
    _is_rewritten_site,
    latent_nuts,
    latent_svi,
    posterior_samples,
    reparam_flow_priors,
)

__all__ = ["simulation_based_calibration", "SBCResult", "INTERVALS"]

#: Central-interval levels whose coverage SBC reports.
INTERVALS = (0.5, 0.8, 0.95)


@dataclass
class SBCResult:
    """Ranks and tests of one :func:`simulation_based_calibration` run.

    Attributes:
        label: the inference's name (``"nuts"``, ``"svi (normal)"``, ...).
        num_simulations, num_posterior_samples: ``S`` and ``L``.
        ranks: ``{parameter: (S,) int}`` ranks in ``{0, ..., L}``, one entry per scalar
            component (``"x[0]"``, ``"x_base[1]"``, ...).
        pit: ``{parameter: (S,)}`` fractional ranks in ``(0, 1)``.
        pvalues: ``{parameter: KS p-value}`` of ``pit`` against ``Uniform(0, 1)``.
        coverage: ``{parameter: [coverage at each of intervals]}``.
        intervals: the central-interval levels (``INTERVALS``).
        alpha: the test level; ``passed`` is the Bonferroni verdict over all parameters.
    """

    label: str
    num_simulations: int
    num_posterior_samples: int
    ranks: dict[str, np.ndarray]
    pit: dict[str, np.ndarray]
    pvalues: dict[str, float]
    coverage: dict[str, list[float]]
    intervals: tuple[float, ...] = INTERVALS
    alpha: float = 0.01
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no parameter's KS p-value is below ``alpha / #parameters``."""
        return min(self.pvalues.values()) >= self.alpha / len(self.pvalues)

    def pooled_coverage(self, names: Sequence[str] | None = None) -> list[float]:
        """Coverage at each interval pooled over ``names`` (default: all parameters)."""
        names = list(self.pit) if names is None else list(names)
        u = np.concatenate([self.pit[n] for n in names])
        return [float((np.abs(u - 0.5) <= p / 2).mean()) for p in self.intervals]

    def table(self) -> str:
        """A readable table: per parameter KS p-value and interval coverage."""
        head = (f"{'parameter':<16}{'KS p':>8}"
                + "".join(f"{f'{p:.0%} cover':>11}" for p in self.intervals))
        lines = [f"SBC of {self.label}: {self.num_simulations} simulations, "
                 f"{self.num_posterior_samples} posterior draws each", head]
        for name in self.pit:
            lines.append(f"{name:<16}{self.pvalues[name]:>8.3f}"
                         + "".join(f"{c:>11.2f}" for c in self.coverage[name]))
        se = [np.sqrt(p * (1 - p) / self.num_simulations) for p in self.intervals]
        lines.append(f"{'(binomial s.e.)':<16}{'':>8}" + "".join(f"{s:>11.2f}" for s in se))
        for group, names in self.groups.items():
            lines.append(f"{'pooled ' + group:<16}{'':>8}"
                         + "".join(f"{c:>11.2f}" for c in self.pooled_coverage(names)))
        lines.append(f"uniformity (KS, Bonferroni at {self.alpha}): "
                     + ("passed" if self.passed else "FAILED"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data for JSON: ranks, p-values, coverage, verdict."""
        return {"label": self.label, "num_simulations": self.num_simulations,
                "num_posterior_samples": self.num_posterior_samples,
                "intervals": list(self.intervals), "alpha": self.alpha, "passed": self.passed,
                "pvalues": self.pvalues, "coverage": self.coverage,
                "pooled_coverage": {g: self.pooled_coverage(n) for g, n in self.groups.items()},
                "ranks": {k: v.tolist() for k, v in self.ranks.items()}}


def _simulate(latent_model, args, kwargs):
    """One prior-predictive draw: (true values of the parameters, simulated observations)."""
    with torch.no_grad():
        tr = poutine.trace(poutine.uncondition(latent_model)).get_trace(*args, **kwargs)
    truth, observed = {}, {}
    nodes = tr.nodes
    for name, site in nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get("_deterministic") or _is_rewritten_site(name, site, nodes):
            truth[name] = site["value"].detach()
        elif site["infer"].get("was_observed"):  # an observation, simulated
            observed[name] = site["value"].detach()
        else:
            truth[name] = site["value"].detach()
    return truth, observed


def _observed_names(latent_model, args, kwargs) -> set[str]:
    with torch.no_grad():
        tr = poutine.trace(latent_model).get_trace(*args, **kwargs)
    nodes = tr.nodes
    return {n for n, s in nodes.items() if s["type"] == "sample" and s["is_observed"]
            and not s["infer"].get("_deterministic") and not _is_rewritten_site(n, s, nodes)}


def _run_inference(inference, model, args, kwargs, L: int, options: dict):
    if inference == "nuts":
        opts = {"warmup_steps": max(L, 100), "thin": 2, **options}
        thin = opts.pop("thin")
        mcmc = latent_nuts(model, *args, num_samples=L * thin, progress=False, seed=None,
                           **opts, **kwargs)
        return {k: v[::thin] for k, v in posterior_samples(mcmc).items()}
    if inference == "svi":
        guide = latent_svi(model, *args, progress=False, seed=None, **options, **kwargs)
        return posterior_samples(guide, *args, num_samples=L, **kwargs)
    return inference(model, *args, num_samples=L, **options, **kwargs)


def _one(i: int, job: dict) -> dict[str, np.ndarray]:
    """Simulation ``i``: ranks ``{site: (k,)}`` of the flattened true values."""
    pyro.set_rng_seed(job["seed"] + i)
    pyro.clear_param_store()
    truth, observed = _simulate(job["latent_model"], job["args"], job["kwargs"])
    conditioned = poutine.condition(job["model"], data=observed)
    draws = _run_inference(job["inference"], conditioned, job["args"], job["kwargs"],
                           job["L"], job["options"])
    gen = np.random.default_rng(job["seed"] + i)
    out = {}
    for name, value in truth.items():
        if name not in draws:
            continue
        d = draws[name].detach().reshape(job["L"], -1).double().cpu().numpy()
        v = value.reshape(-1).double().cpu().numpy()
        less = (d < v).sum(0)
        ties = (d == v).sum(0)
        out[name] = less + np.array([gen.integers(0, t + 1) for t in ties])
    return out


_JOB: dict = {}  # the job of the worker processes (inherited by fork, never pickled)


def _worker(i: int) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    return _one(i, _JOB)


def simulation_based_calibration(
    model: Callable,
    *args,
    num_simulations: int = 100,
    num_posterior_samples: int = 100,
    inference: str | Callable = "nuts",
    inference_kwargs: dict | None = None,
    parameters: Sequence[str] | None = None,
    seed: int = 0,
    num_workers: int = 1,
    progress: bool = True,
    alpha: float = 0.01,
    label: str | None = None,
    **kwargs,
) -> SBCResult:
    """Simulation-based calibration of latent inference on ``model``.

    For each simulation the model is run with its observations *unconditioned*
    (``poutine.uncondition``) to draw the true parameters and fake data, then conditioned on
    that data (``poutine.condition``) and handed to the inference.

    Args:
        model: a Pyro model with observed sites (``obs=...``); ``*args``, ``**kwargs`` are
            passed to it (the observed values in them are replaced by the simulated ones).
        num_simulations: ``S``, simulated data sets.
        num_posterior_samples: ``L``, posterior draws per data set (ranks lie in ``0..L``).
        inference: ``"nuts"`` (:func:`~pyro_inflow.latent_nuts`, thinned by 2 by default:
            keys ``warmup_steps``, ``thin``, ``target_accept_prob``, ...), ``"svi"``
            (:func:`~pyro_inflow.latent_svi`: keys ``guide``, ``num_steps``, ``lr``, ...), or a
            callable ``f(model, *args, num_samples=L, **inference_kwargs, **kwargs)``
            returning ``{site: (L, ...) draws}``.
        inference_kwargs: options of the inference.
        parameters: sites to rank (default: every latent site and every data-space flow
            site, e.g. ``"x_base"`` and ``"x"``).
        seed: simulation ``i`` uses ``pyro.set_rng_seed(seed + i)``: runs are reproducible
            and independent of ``num_workers``.
        num_workers: processes; above 1 they are forked (Linux, macOS), each with one thread.
        progress: a tqdm bar over simulations.
        alpha: level of the Bonferroni-corrected uniformity test.
        label: name of the inference in tables and plots.

    Returns:
        An :class:`SBCResult`; ``result.table()`` prints it,
        :func:`~pyro_inflow.diagnostics.plot_sbc` plots it.
    """
    num_simulations = check_positive_int(num_simulations, "num_simulations", minimum=2)
    L = check_positive_int(num_posterior_samples, "num_posterior_samples")
    num_workers = check_positive_int(num_workers, "num_workers")
    if not (isinstance(inference, str) and inference in ("nuts", "svi")) \
            and not callable(inference):
        raise ValueError(f"inference: expected 'nuts', 'svi' or a callable, got {inference!r}")
    options = dict(inference_kwargs or {})
    latent_model = reparam_flow_priors(model)
    if not _observed_names(latent_model, args, kwargs):
        raise ValueError("simulation_based_calibration: the model has no observed site "
                         "(pyro.sample(..., obs=...)) to simulate")
    if label is None:
        label = (inference if isinstance(inference, str) else getattr(inference, "__name__",
                                                                      "custom"))
        if inference == "svi":
            g = options.get("guide", "multivariate_normal")
            label += f" ({g if isinstance(g, str) else getattr(g, '__name__', 'guide')})"
    job = {"model": model, "latent_model": latent_model, "args": args, "kwargs": kwargs,
           "inference": inference, "options": options, "L": L, "seed": seed}
    bar = tqdm(total=num_simulations, desc=f"SBC {label}", disable=not progress, leave=False)
    results: list[dict] = []
    if num_workers > 1 and "fork" in mp.get_all_start_methods():
        global _JOB
        _JOB = job
        try:
            with mp.get_context("fork").Pool(num_workers) as pool:
                for r in pool.imap(_worker, range(num_simulations)):
                    results.append(r)
                    bar.update()
        finally:
            _JOB = {}
    else:
        for i in range(num_simulations):
            results.append(_one(i, job))
            bar.update()
    bar.close()

    names = list(results[0]) if parameters is None else list(parameters)
    missing = [n for n in names if n not in results[0]]
    if missing:
        raise ValueError(f"parameters: {missing} are not latent or flow sites of the model "
                         f"(choose from {sorted(results[0])})")
    ranks, groups = {}, {}
    for name in names:
        per_sim = np.stack([r[name] for r in results])  # (S, k)
        comps = [f"{name}[{j}]" for j in range(per_sim.shape[1])]
        groups[name] = comps
        for j, comp in enumerate(comps):
            ranks[comp] = per_sim[:, j]
    gen = np.random.default_rng(seed)
    pit = {k: (v + gen.random(len(v))) / (L + 1) for k, v in ranks.items()}
    pvalues = {k: float(stats.kstest(u, "uniform").pvalue) for k, u in pit.items()}
    coverage = {k: [float((np.abs(u - 0.5) <= p / 2).mean()) for p in INTERVALS]
                for k, u in pit.items()}
    return SBCResult(label=label, num_simulations=num_simulations, num_posterior_samples=L,
                     ranks=ranks, pit=pit, pvalues=pvalues, coverage=coverage, alpha=alpha,
                     groups=groups)
