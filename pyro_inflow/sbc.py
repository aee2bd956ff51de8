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
import os
import queue
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyro
import torch
from pyro import poutine
from scipy import stats

from . import _arviz
from ._progress import tqdm
from ._validation import check_positive_int
from .calibration.plots import save_png
from .inference import is_flow_site, latent_nuts, latent_svi, reparam_flow_priors
from .posterior import posterior_samples

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["simulation_based_calibration", "SBCResult", "plot_sbc", "INTERVALS"]

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


def _simulate(latent_model: Callable, args: tuple, kwargs: dict
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One prior-predictive draw: (true values of the parameters, simulated observations)."""
    with torch.no_grad():
        tr = poutine.trace(poutine.uncondition(latent_model)).get_trace(*args, **kwargs)
    truth, observed = {}, {}
    nodes = tr.nodes
    for name, site in nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get("_deterministic") or is_flow_site(name, site, nodes):
            truth[name] = site["value"].detach()
        elif site["infer"].get("was_observed"):  # an observation, simulated
            observed[name] = site["value"].detach()
        else:
            truth[name] = site["value"].detach()
    return truth, observed


def _observed_names(latent_model: Callable, args: tuple, kwargs: dict) -> set[str]:
    with torch.no_grad():
        tr = poutine.trace(latent_model).get_trace(*args, **kwargs)
    nodes = tr.nodes
    return {n for n, s in nodes.items() if s["type"] == "sample" and s["is_observed"]
            and not s["infer"].get("_deterministic") and not is_flow_site(n, s, nodes)}


def _run_inference(inference: str | Callable, model: Callable, args: tuple, kwargs: dict,
                   L: int, options: dict) -> dict[str, torch.Tensor]:
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


def _worker(job: dict, indices: range, results: mp.Queue) -> None:
    """A forked process: simulations ``indices`` of ``job`` on one thread; each result (or
    the error that stopped it) goes to ``results`` as ``(i, ranks or None, error or None)``."""
    torch.set_num_threads(1)  # this process's own setting: 2 workers share the cores
    for i in indices:
        try:
            results.put((i, _one(i, job), None))
        except Exception as e:  # reported in the parent, which raises it
            results.put((i, None, f"{type(e).__name__}: {e}"))
            return


def _run_forked(job: dict, num_simulations: int, num_workers: int, bar: tqdm) -> list[dict]:
    """The simulations in ``num_workers`` forked processes (the job is inherited by the fork,
    never pickled), in the order of their index."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(job, range(k, num_simulations, num_workers),
                                               results), daemon=True)
             for k in range(num_workers)]
    for proc in procs:
        proc.start()
    out: dict[int, dict] = {}
    try:
        while len(out) < num_simulations:
            try:
                i, ranks, error = results.get(timeout=5.0)
            except queue.Empty:
                if any(proc.is_alive() for proc in procs):
                    continue
                raise RuntimeError(f"simulation_based_calibration: the worker processes ended "
                                   f"after {len(out)} of {num_simulations} simulations without "
                                   f"an error report (killed?); try num_workers=1") from None
            if error is not None:
                raise RuntimeError(f"simulation_based_calibration: simulation {i} failed in a "
                                   f"worker process: {error}")
            out[i] = ranks
            bar.update()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return [out[i] for i in range(num_simulations)]


def simulation_based_calibration(
    model: Callable,
    *args: object,
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
    **kwargs: object,
) -> SBCResult:
    """Simulation-based calibration of latent inference on ``model``.

    For each simulation the model is run with its observations *unconditioned*
    (``poutine.uncondition``) to draw the true parameters and fake data, then conditioned on
    that data (``poutine.condition``) and handed to the inference.

    Args:
        model: a Pyro model with observed sites (``obs=...``); ``*args``, ``**kwargs`` are
            passed to it (the observed values in them are replaced by the simulated ones).
        *args: the model's positional arguments.
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
        num_workers: processes; above 1 they are forked (Linux, macOS), each with one thread
            (not once CUDA is initialized in this process: a forked process cannot use it).
        progress: a tqdm bar over simulations.
        alpha: level of the Bonferroni-corrected uniformity test.
        label: name of the inference in tables and plots.
        **kwargs: the model's keyword arguments.

    Returns:
        An :class:`SBCResult`; ``result.table()`` prints it,
        :func:`plot_sbc` plots it.
    """
    num_simulations = check_positive_int(num_simulations, "num_simulations", minimum=2)
    L = check_positive_int(num_posterior_samples, "num_posterior_samples")
    num_workers = check_positive_int(num_workers, "num_workers")
    if num_workers > 1 and torch.cuda.is_initialized():
        raise ValueError("num_workers: CUDA is in use in this process, and a forked worker "
                         "process cannot use it; pass num_workers=1")
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
        results = _run_forked(job, num_simulations, num_workers, bar)
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


def plot_sbc(results: Mapping[str, SBCResult] | Sequence[SBCResult],
             path: str | os.PathLike | None = None, *, max_parameters: int = 6) -> Figure:
    """Rank-ECDF differences with 95 % simultaneous bands, one column per SBC result.

    Args:
        results: :class:`SBCResult` objects, or ``{label: result}``; shown
            side by side (e.g. NUTS in the latent beside mean-field SVI).
        path: write a PNG here (atomically); ``None`` returns the figure only.
        max_parameters: rows: the first parameters (scalar components) of each result.

    Returns:
        The matplotlib figure. A calibrated posterior stays inside the band. Overconfidence
        (ranks piled at both ends) shows as a difference above zero left of 0.5 and below
        zero right of it; underconfidence as the reverse; a biased posterior as one sign.
    """
    import matplotlib.pyplot as plt  # a pyplot figure: shown inline in notebooks

    if not isinstance(results, Mapping):
        results = {r.label: r for r in results}
    labels = list(results)
    names = list(next(iter(results.values())).pit)[:max_parameters]
    fig, axes = plt.subplots(len(names), len(labels), squeeze=False, sharex=True,
                             figsize=(3.6 * len(labels), 2.1 * len(names) + 0.6),
                             constrained_layout=True)
    for j, label in enumerate(labels):
        res = results[label]
        for i, name in enumerate(names):
            ax = axes[i, j]
            _arviz.plot_ecdf_difference(res.pit[name], ax)
            cov95 = res.coverage[name][-1]
            ax.set_title(f"{label}: {name}\nKS p={res.pvalues[name]:.2g}, "
                         f"95% cover {cov95:.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(names) - 1:
                ax.set_xlabel("fractional rank", fontsize=8)
            if j == 0:
                ax.set_ylabel("ECDF - uniform", fontsize=8)
    fig.suptitle(f"SBC: {next(iter(results.values())).num_simulations} simulations, "
                 "95 % simultaneous bands", fontsize=10)
    if path is not None:
        save_png(fig, path)
    return fig
