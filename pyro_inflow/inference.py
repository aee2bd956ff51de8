"""Inference in the flow's Gaussian latent, on Pyro's own machinery.

:func:`reparam_flow_priors` rewrites every latent site whose distribution is an
:class:`~pyro_inflow.InflationaryFlowPrior` with Pyro's ``TransformReparam``: the sampler sees a
standard Normal site ``"{name}_base"`` of the latent dimension, and the data-space value
``x = decode(z)`` becomes a deterministic site ``name`` (a masked ``Delta``). Any Pyro
algorithm then runs on the rewritten model: ``NUTS``, ``HMC``, ``SVI`` with any autoguide,
``Predictive``, several chains. :func:`latent_nuts` and :func:`latent_svi` are
short cuts for the common cases; :mod:`pyro_inflow.posterior` reads their draws in both
coordinates.

Example:
    >>> def model(y):
    ...     x = pyro.sample("x", flow.prior())
    ...     pyro.sample("y", dist.Normal(x.sum(-1), 0.3), obs=y)
    >>> mcmc = latent_nuts(model, torch.tensor(0.5), num_samples=500)  # doctest: +SKIP
    >>> posterior_samples(mcmc)["x"].shape  # doctest: +SKIP
    torch.Size([500, 2])
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO, autoguide
from pyro.infer.mcmc.api import _MultiSampler, _UnarySampler, _Worker
from pyro.infer.reparam import TransformReparam
from pyro.poutine.util import site_is_subsample

from ._progress import tqdm
from .distributions import InflationaryFlowPrior, enclosing_conditions

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from pyro.infer.mcmc.nuts import _TreeInfo

__all__ = ["reparam_flow_priors", "FlowReparam", "latent_nuts", "LatentMCMC", "latent_svi",
           "LatentSVI", "RecordingNUTS", "sampler_geometry", "is_flow_site", "max_plate_nesting",
           "GUIDES"]

GUIDES = {
    "normal": autoguide.AutoNormal,
    "multivariate_normal": autoguide.AutoMultivariateNormal,
    "lowrank_multivariate_normal": autoguide.AutoLowRankMultivariateNormal,
    "delta": autoguide.AutoDelta,
}


def _unwrap(fn: torch.distributions.Distribution) -> tuple[torch.distributions.Distribution,
                                                          list]:
    """The distribution inside ``Independent`` and ``MaskedDistribution`` layers, and the
    layers, outermost first."""
    layers = []
    while isinstance(fn, (torch.distributions.Independent, dist.MaskedDistribution)):
        layers.append(fn)
        fn = fn.base_dist
    return fn, layers


def _is_flow_prior(fn: torch.distributions.Distribution) -> bool:
    return isinstance(_unwrap(fn)[0], InflationaryFlowPrior)


def _conditioned_by_enclosing_handler(name: str) -> bool:
    """Whether a ``poutine.condition`` around the reparametrizer holds a value for ``name``
    (one inside it would already have made the site observed)."""
    return any(name in values for values in enclosing_conditions())


class FlowReparam(TransformReparam):
    """Pyro's ``TransformReparam`` for flow priors: the latent site ``"{name}_base"`` is a
    standard Normal and ``name`` holds ``decode(z)`` (a deterministic site).

    It differs from ``TransformReparam`` where a plain prior's user would otherwise be
    surprised:

    * **masks**: a prior wrapped by ``.mask(m)`` (or ``.to_event``) is unwrapped, and the latent
      site gets the same layers, so the mask weighs the latent's prior term as it weighed the
      prior's (``poutine.mask`` already worked);
    * **initialization**: Pyro applies init strategies to the original site ``name`` first. A
      value given for it (``init_to_value(values={"x": ...})``) is encoded to the latent; a
      default one (``init_to_sample``, ``init_to_median``, ..., or the fallback of an
      ``init_to_value`` that names only ``"x_base"``) is dropped, so that the strategy sees the
      latent site itself and ``init_to_value(values={"x_base": ...})`` is honoured.
    """

    def apply(self, msg: dict) -> dict:
        """Rewrite one flow-prior site (see the class)."""
        name, value = msg["name"], msg["value"]
        prior, layers = _unwrap(msg["fn"])
        if getattr(value, "_pyro_custom_init", True) is False:
            value = None  # a strategy's default for the data-space site: start in the latent
        transform = prior.transform
        value_base = None if value is None else transform.inv(value)
        base = prior.base_dist
        for layer in reversed(layers):
            base = (base.mask(layer._mask) if isinstance(layer, dist.MaskedDistribution)
                    else base.to_event(layer.reinterpreted_batch_ndims))
        # the transform rides on the latent site, for sampler_geometry's look at the decode
        value_base = pyro.sample(f"{name}_base", base, obs=value_base,
                                 infer={"is_observed": msg["is_observed"],
                                        "flow_transform": transform})
        if value is None:
            value = transform(value_base)
        delta = dist.Delta(value, event_dim=msg["fn"].event_dim).mask(False)
        return {"fn": delta, "value": value, "is_observed": True}


def reparam_flow_priors(model: Callable) -> Callable:
    """Run ``model`` with every latent :class:`InflationaryFlowPrior` site in the flow's latent.

    Sites inside ``pyro.plate`` and masked sites work too. Observed flow-prior sites are left
    alone (they are scored with ``log_prob``), and so are sites that a ``poutine.condition``
    *around* the rewritten model conditions: ``condition(reparam_flow_priors(model), {"x": v})``
    scores ``x = v`` by the prior's density exactly as ``reparam_flow_priors(condition(model,
    {"x": v}))`` does (Pyro's own reparametrizers would leave the latent free and lose the
    prior term). The latent site of ``name`` is ``name + "_base"``; ``name`` itself holds the
    data-space value (``Predictive(..., return_sites=[name])`` reads it). See
    :class:`FlowReparam` for masks and init strategies.

    Args:
        model: a Pyro model (a callable).

    Returns:
        The reparametrized model (``pyro.poutine.reparam`` with :class:`FlowReparam`).
        Applying it twice changes nothing: the rewritten data-space site is observed, and the
        latent site is a Normal, so the outer rewrite finds no flow prior left.
    """

    def config(msg: dict) -> FlowReparam | None:
        if (msg["is_observed"] or not _is_flow_prior(msg["fn"])
                or _conditioned_by_enclosing_handler(msg["name"])):
            return None
        return FlowReparam()

    return poutine.reparam(model, config=config)


def is_flow_site(name: str, site: dict, nodes: dict) -> bool:
    """A data-space site left by ``TransformReparam``: a masked ``Delta`` beside ``name_base``."""
    fn = site["fn"]
    return (f"{name}_base" in nodes and isinstance(fn, dist.MaskedDistribution)
            and isinstance(fn.base_dist, dist.Delta))


class RecordingNUTS(NUTS):
    """Pyro's NUTS that also keeps per-draw sampler statistics for ArviZ's ``sample_stats``.

    After warm-up, each draw records ``diverging``, ``tree_depth``, ``n_steps`` (leapfrog
    steps), ``step_size`` and ``lp`` (the log density, minus the potential energy). They come
    back through ``kernel.diagnostics()``, which Pyro returns from every chain, worker
    processes included: ``mcmc.diagnostics()["tree_depth"]["chain 0"]`` is a list.
    """

    STATS = ("diverging", "tree_depth", "n_steps", "step_size", "lp")

    def setup(self, warmup_steps: int, *args: object, **kwargs: object) -> None:
        """Reset the recorded statistics, then Pyro's ``NUTS.setup``."""
        self._stats = {k: [] for k in self.STATS}
        self._divergent_at: list[dict[str, torch.Tensor]] = []
        super().setup(warmup_steps, *args, **kwargs)

    def _build_tree(self, z: dict[str, torch.Tensor], r: dict[str, torch.Tensor],
                    z_grads: dict[str, torch.Tensor], log_slice: torch.Tensor, direction: int,
                    tree_depth: int, energy_current: torch.Tensor) -> _TreeInfo:
        # the top-level calls of one draw pass the current depth, recursive ones less
        self._depth = max(self._depth, tree_depth)
        return super()._build_tree(z, r, z_grads, log_slice, direction, tree_depth,
                                   energy_current)

    def _build_basetree(self, *args: object, **kwargs: object) -> _TreeInfo:
        self._leapfrogs += 1
        tree = super()._build_basetree(*args, **kwargs)
        if tree.diverging and self._diverged_at is None:
            self._diverged_at = {k: v.detach().clone() for k, v in tree.z_proposal.items()}
        return tree

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One NUTS draw, recording its statistics after warm-up."""
        self._depth, self._leapfrogs, self._diverged_at = -1, 0, None
        divergences = len(self._divergences)
        params = super().sample(params)
        if self._t > self._warmup_steps:
            diverging = len(self._divergences) > divergences
            self._stats["diverging"].append(diverging)
            self._stats["tree_depth"].append(self._depth + 1)
            self._stats["n_steps"].append(self._leapfrogs)
            self._stats["step_size"].append(float(self.step_size))
            self._stats["lp"].append(-float(self._potential_energy_last))
            if diverging and self._diverged_at is not None:
                self._divergent_at.append(self._diverged_at)
        return params

    def diagnostics(self) -> dict:
        """Pyro's NUTS diagnostics, the recorded per-draw statistics (lists), and
        ``divergent_at``: for each divergent draw, where its diverging leapfrog step ended
        (``{site: unconstrained value}``), which :func:`sampler_geometry` reads."""
        return {**super().diagnostics(), **self._stats, "divergent_at": self._divergent_at}


class LatentMCMC(MCMC):
    """Pyro's ``MCMC`` whose draws also hold the data-space value of every flow site.

    After :meth:`run`, ``get_samples()`` has ``"x"`` (decoded once, vectorized over the draws)
    beside the latent ``"x_base"``, and every ``pyro.deterministic`` site, as NumPyro's MCMC
    keeps deterministic sites. So the idiom ``Predictive(model, posterior_samples=
    mcmc.get_samples())`` on the *original* model, which has only ``"x"``, conditions on the
    posterior; with the latent alone Pyro would match no site and draw ``x`` from its prior.
    ``summary()`` and ``diagnostics()`` report the data-space sites too.
    """

    def run(self, *args: object, **kwargs: object) -> None:
        """Pyro's ``MCMC.run``, then the data-space values of the draws."""
        from .posterior import data_space_draws  # the posterior readers sit above this module

        super().run(*args, **kwargs)
        self._samples.update(data_space_draws(self))


def latent_nuts(
    model: Callable,
    *args: object,
    num_samples: int = 1000,
    warmup_steps: int | None = None,
    num_chains: int = 1,
    seed: int | None = 0,
    progress: bool = True,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    full_mass: bool | None = None,
    init_strategy: Callable[[dict], torch.Tensor] | None = None,
    parallel: bool | None = None,
    centered: bool = False,
    **kwargs: object,
) -> MCMC:
    """NUTS in the latent of every flow prior of ``model``; returns the run ``pyro.infer.MCMC``.

    Args:
        model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it.
        *args: the model's positional arguments.
        num_samples: draws per chain kept after warm-up.
        warmup_steps: adaptation steps per chain (default ``num_samples``).
        num_chains: chains, each with its own warm-up and initial point (for R-hat).
        seed: ``pyro.set_rng_seed(seed)`` first; ``None`` leaves the RNG alone.
        progress: Pyro's progress bar.
        target_accept_prob: NUTS's target acceptance probability of step-size adaptation.
        max_tree_depth: NUTS's largest tree depth (at most ``2**max_tree_depth`` leapfrog
            steps per draw).
        full_mass: adapt a dense mass matrix over all latent sites (Pyro's ``full_mass``)
            instead of a diagonal one. ``None`` (default): dense when the latent has at most
            ``warmup_steps / 10`` coordinates, else diagonal. Dense helps where the warm-up
            can estimate it, because a flow's latent posterior is correlated wherever the
            likelihood couples coordinates the decode mixes: on the moons problem (2
            coordinates) it kept every chain's step size within 2x of the others (diagonal:
            one chain of four adapted to a tenth of the rest) and gave 1.9 bulk ESS per second
            against 0.4-1.1 over two seeds (``benchmarks/README.md``). A dense estimate from
            fewer warm-up draws than a few per coordinate is worse than none: 8 digits in a
            plate (512 coordinates, 100 warm-up steps) hit the tree-depth limit on every draw
            and covered 56-66 % of the true pixels with 90 % intervals; diagonal: tree depth
            6, 92 %, in half the time (``tutorials/05_digits_inverse_problem.ipynb``).
        init_strategy: a Pyro init strategy (default ``init_to_sample``: a draw from the
            latent's standard Normal, a typical point of the prior). ``init_to_value`` takes
            the data-space site (``{"x": ...}``, encoded) or the latent (``{"x_base": ...}``,
            e.g. ``guide.median()`` of an SVI fit); see :class:`FlowReparam`.
        parallel: run the chains in forked worker processes, one per CPU core, each taking
            the next chain when it is free, on one torch thread. ``None`` (default): whenever
            there are several chains, two or more cores and Linux's ``fork`` (not once CUDA is
            initialized, nor inside a daemonic pool worker). Pyro alone does so only with a
            free core per chain plus one: on a 2-core machine it runs the chains one after
            another and leaves a core idle. ``False``: one after another in this process,
            also where Pyro would fork a process per chain itself (what breaks once CUDA is
            in use, so the default runs CUDA chains so too).
            ``True``: forked workers wherever ``fork`` exists. Forked workers need no pickling
            of the model. Chain ``c`` seeds ``seed + c``, so its draws are those of a
            one-chain run with that seed (a sequential run draws all chains from one stream).
        centered: sample each flow prior's data-space value itself, scored by the prior's
            log-density (the encode and the exact log-determinant of its Jacobian), instead
            of its latent. Only for PR-preserving priors (a PR-reducing one has no density).
            A step costs about 3x a latent step (``D = 2``), but the posterior has no seam:
            where a group's posterior reaches the thin band that the decode stretches between
            modes of the prior's data, the latent posterior has a cliff there and NUTS's
            step collapses (:func:`sampler_geometry` says so); in data space the same
            posterior is smooth. On the 8-group moons model of ``benchmarks/`` the step grew
            from 0.03-0.05 to about 0.5, without divergences.
        **kwargs: the model's keyword arguments.

    Returns:
        The run :class:`LatentMCMC`: ``mcmc.get_samples()`` holds the latent sites
        ``"{name}_base"`` (not with ``centered=True``), the data-space values ``name`` and the
        deterministic sites;
        :func:`posterior_samples` gives the same and
        :func:`~pyro_inflow.diagnostics.to_inference_data` makes an ArviZ ``InferenceData``
        (with per-draw ``diverging``, ``tree_depth``, ``n_steps``, ``step_size``, ``lp``).
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    target = model if centered else reparam_flow_priors(model)
    warm = num_samples if warmup_steps is None else warmup_steps
    if full_mass is None:
        full_mass = _latent_size(target, args, kwargs) <= warm / 10
    kernel = RecordingNUTS(target, target_accept_prob=target_accept_prob,
                           max_tree_depth=max_tree_depth, full_mass=full_mass,
                           init_strategy=init_strategy or pyro.infer.autoguide.init_to_sample)
    with warnings.catch_warnings():  # "Chains will be drawn sequentially": documented above
        warnings.filterwarnings("ignore", message="num_chains=", category=UserWarning)
        mcmc = LatentMCMC(kernel, num_samples=num_samples, warmup_steps=warm,
                          num_chains=num_chains, disable_progbar=not progress)
    # Pyro forks a process per chain where it sees a spare core for each, and a forked
    # process cannot use CUDA: the chains run in our worker processes or one after another
    if isinstance(mcmc.sampler, _MultiSampler):
        mcmc.sampler.terminate()  # stops the logging thread it started
        mcmc.sampler = _UnarySampler(kernel, mcmc.num_samples, mcmc.warmup_steps, num_chains,
                                     not progress)
    if _use_processes(num_chains, parallel):
        mcmc.sampler = _ChainProcesses(kernel, mcmc.num_samples, mcmc.warmup_steps, num_chains,
                                       "fork", not progress)
        with _one_thread():  # forked workers inherit it: no two thread pools per core
            mcmc.run(*args, **kwargs)
    else:
        mcmc.run(*args, **kwargs)
    report = sampler_geometry(mcmc)
    if report["limited"]:
        warnings.warn(report["message"], UserWarning, stacklevel=2)
    return mcmc


def _latent_size(model: Callable, args: tuple, kwargs: dict) -> int:
    """The number of coordinates NUTS samples: the model traced once (without touching the
    random state), its unobserved sample sites counted."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(
            *args, **kwargs)
    return sum(site["value"].numel() for site in trace.nodes.values()
               if site["type"] == "sample" and not site["is_observed"]
               and not site_is_subsample(site))


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _use_processes(num_chains: int, parallel: bool | None) -> bool:
    """Whether :func:`latent_nuts` runs its chains in forked worker processes."""
    if num_chains < 2 or parallel is False:
        return False
    fork = "fork" in multiprocessing.get_all_start_methods()
    if parallel is None:  # not where a fork breaks: CUDA in use, or a daemonic process
        return (fork and sys.platform.startswith("linux") and _cores() >= 2
                and not torch.cuda.is_initialized()
                and not multiprocessing.current_process().daemon)
    if not fork:
        raise ValueError("parallel=True: this platform cannot fork worker processes; pass "
                         "parallel=False (chains one after another)")
    return True


class _ChainProcesses(_MultiSampler):
    """Pyro's parallel sampler with one forked worker process per CPU core (at most one per
    chain); each takes the next chain not yet started when it is free.

    Pyro starts a process per chain; with more chains than cores they time-share the cores,
    which on a 2-core machine cost 1.5x the CPU time of the same chains in one process
    (4 chains of the moons problem). Chain ``c`` seeds ``torch.initial_seed() + c`` in any
    process, so the draws do not depend on the number of cores. A worker that dies without a
    word (killed for memory) raises here instead of leaving the run waiting.
    """

    def init_workers(self, *args: object, **kwargs: object) -> None:
        chains = [_Worker(c, self.result_queue, self.log_queue, self.events[c], self.kernel,
                          self.num_samples, self.warmup_steps, hook=self.hook)
                  for c in range(self.num_chains)]
        if getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None) is None:
            for chain in chains:
                # Pyro's worker sets torch's default device, which puts a mode in front of
                # every torch call (+70 % on a small op); the forked worker has it already
                chain.default_device = None
        following = self.ctx.Value("i", 0)
        self.workers = [self.ctx.Process(name=str(p), target=_run_chains, daemon=True,
                                         args=(chains, following, args, kwargs))
                        for p in range(min(_cores(), self.num_chains))]

    def run(self, *args: object, **kwargs: object) -> Iterator[tuple[object, int]]:
        """Pyro's loop over the workers' results, which also notices a dead worker."""
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)  # workers ignore Ctrl-C
        self.init_workers(*args, **kwargs)
        signal.signal(signal.SIGINT, sigint)
        active, failed = self.num_chains, True
        try:
            for w in self.workers:
                w.start()
            while active:
                try:
                    chain, val = self.result_queue.get(timeout=1)
                except queue.Empty:
                    dead = [w.exitcode for w in self.workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"latent_nuts: a chain's worker process died (exit "
                                           f"code {dead[0]}, e.g. killed for memory); pass "
                                           f"parallel=False to run the chains in this "
                                           f"process") from None
                    continue
                if isinstance(val, Exception):
                    raise val
                if val is None:
                    active -= 1
                else:
                    yield val, chain
                    self.events[chain].set()
            for w in self.workers:
                w.join(timeout=10)  # they have sent everything; reaped, they leave no zombie
            failed = False
        finally:
            self.terminate(terminate_workers=failed)


def _run_chains(chains: list, following: Synchronized, args: tuple, kwargs: dict) -> None:
    """A worker process: run chains, the next one not yet taken, until none is left."""
    while True:
        with following.get_lock():
            c = following.value
            following.value += 1
        if c >= len(chains):
            return
        chains[c].run(*args, **kwargs)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: :func:`sampler_geometry` flags a run where a chain's adapted step size is below this
#: fraction of the largest chain's, where more than this share of draws hit the tree-depth
#: limit, or where more than this share of draws diverged.
STEP_RATIO, DEPTH_SHARE, DIVERGENCE_SHARE = 0.25, 0.1, 0.01

#: :func:`sampler_geometry` says that divergences sit on a seam when the decode stretches this
#: many times more where the diverging steps end than at the draws (medians); it looks at flow
#: sites of data dimension up to ``SEAM_MAX_DIM`` (one backward pass per data dimension).
SEAM_RATIO, SEAM_MAX_DIM = 10.0, 16


def sampler_geometry(mcmc: MCMC) -> dict:
    """Whether the geometry of the latent posterior limited NUTS, from what
    :class:`RecordingNUTS` records (any run of :func:`latent_nuts`).

    A flow stretches its Gaussian latent across the gaps between modes of the data, and there
    the decode is steep: NUTS adapts a small step size in a chain that spends its warm-up near
    such a seam, builds deep trees everywhere else, and diverges on the seam. This reads the
    signs per chain. :func:`latent_nuts` warns with the message when ``limited``.

    Returns:
        ``{"step_size": [per chain], "leapfrogs_per_draw": [per chain mean],
        "at_depth_limit": share of draws, "divergences": count, "divergent_radius": mean
        latent radius ``|z|`` of the divergent draws (``None`` without any), "radius": mean
        latent radius of all draws, "seams": [{"site", "at_divergences", "at_draws"}] (the
        decode's stretch, its largest singular value, where the diverging leapfrog steps
        ended and at the draws, medians; for flow sites of up to ``SEAM_MAX_DIM`` data
        dimensions), "limited": bool, "message": str}``. When the divergent steps end where
        the decode stretches over ``SEAM_RATIO`` times more than at the draws, the message
        says they sit on a seam.

    Raises:
        TypeError: ``mcmc`` was not run with a :class:`RecordingNUTS` kernel.
    """
    if not isinstance(getattr(mcmc, "kernel", None), RecordingNUTS):
        raise TypeError("sampler_geometry: expected an MCMC run by latent_nuts (a "
                        "RecordingNUTS kernel)")
    diag = mcmc.diagnostics()
    chains = sorted(k for k in diag.get("step_size", {}) if k.startswith("chain"))
    steps = [sum(diag["step_size"][c]) / max(len(diag["step_size"][c]), 1) for c in chains]
    leaps = [sum(diag["n_steps"][c]) / max(len(diag["n_steps"][c]), 1) for c in chains]
    depth_limit = mcmc.kernel._max_tree_depth
    depths = [d for c in chains for d in diag["tree_depth"][c]]
    at_limit = sum(d >= depth_limit for d in depths) / max(len(depths), 1)
    flags = torch.tensor([bool(v) for c in chains for v in diag["diverging"][c]])
    samples = mcmc.get_samples()
    latents = [v.reshape(v.shape[0], -1) for k, v in samples.items() if k.endswith("_base")]
    radius = torch.cat(latents, -1).norm(dim=-1) if latents else None
    divergent = int(flags.sum()) if flags.numel() else 0
    div_radius = (float(radius[flags].mean()) if radius is not None and divergent
                  and radius.shape[0] == flags.shape[0] else None)
    seams = _seams(mcmc, chains, diag, samples) if divergent else []
    problems = []
    if steps and min(steps) < STEP_RATIO * max(steps):
        problems.append(f"the chains adapted step sizes from {min(steps):.3g} to "
                        f"{max(steps):.3g}")
    if at_limit > DEPTH_SHARE:
        problems.append(f"{at_limit:.0%} of draws hit the tree-depth limit {depth_limit}")
    if flags.numel() and divergent > DIVERGENCE_SHARE * flags.numel():
        where = (f" (mean latent radius {div_radius:.2f} against {float(radius.mean()):.2f} "
                 f"for all draws)" if div_radius is not None else "")
        problems.append(f"{divergent} of {flags.numel()} draws diverged{where}")
    on_seam = [r for r in seams if r["at_divergences"] > SEAM_RATIO * r["at_draws"]]
    if flags.numel() and divergent > DIVERGENCE_SHARE * flags.numel() and on_seam:
        problems.append("the divergent steps end where the decode stretches far more than at "
                        "the draws (" + ", ".join(
                            f"'{r['site']}': {r['at_divergences']:.0f}x against "
                            f"{r['at_draws']:.1f}x, medians" for r in on_seam)
                        + "): on a seam between modes of the prior's data, a cliff in the "
                        "posterior that no step size integrates, so a smaller step only "
                        "lengthens every trajectory")
    advice = ("No step size or mass matrix removes divergences on a seam; sample the "
              "data-space values instead (latent_nuts(..., centered=True): a smooth posterior, "
              "about 3x the cost per step; on the hierarchical model of benchmarks/README.md "
              "it multiplied the step size by ten and removed the divergences)" if on_seam else
              "A flow is steep on the seams between modes of its data; try more warm-up "
              "(warmup_steps), target_accept_prob=0.9 against divergences, a dense mass "
              "matrix where the warm-up has 10 draws per latent coordinate (latent_nuts's "
              "default; full_mass=False beyond), or start from an SVI fit (init_to_value "
              "with the data-space site's values)")
    message = ("NUTS was limited by the posterior's geometry: "
               + "; ".join(problems) + ". " + advice) if problems else (
               "no sign that the posterior's geometry limited NUTS")
    return {"step_size": steps, "leapfrogs_per_draw": leaps, "at_depth_limit": at_limit,
            "divergences": divergent, "divergent_radius": div_radius,
            "radius": float(radius.mean()) if radius is not None else None,
            "seams": seams, "limited": bool(problems), "message": message}


def _seams(mcmc: MCMC, chains: list[str], diag: dict, samples: dict) -> list[dict]:
    """For each flow site (data dimension at most ``SEAM_MAX_DIM``): the median over divergent
    draws of the decode's stretch (largest singular value of ``dx/dz``, the largest over the
    site's plate entries) where the diverging leapfrog step ended, and the same median over
    up to 256 draws."""
    ends = [e for c in chains for e in diag.get("divergent_at", {}).get(c, [])]
    if not ends or mcmc._args is None:
        return []
    # a best-effort look after the run: it leaves the RNG, and the user, alone when it fails
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                trace = poutine.trace(mcmc.kernel.model).get_trace(*mcmc._args,
                                                                   **mcmc._kwargs)
        except Exception:  # noqa: BLE001 (a model that needs more than its run's arguments)
            return []
        found = []
        for name, site in trace.nodes.items():
            transform = (site["infer"].get("flow_transform") if site["type"] == "sample"
                         else None)
            if (transform is None or name not in samples
                    or transform.flow.dim > SEAM_MAX_DIM):
                continue
            at = [e[name] for e in ends if name in e and torch.isfinite(e[name]).all()]
            draws = samples[name]
            draws = draws[torch.linspace(0, draws.shape[0] - 1,
                                         min(256, draws.shape[0])).long()]
            try:
                at_ends = _stretch(transform, torch.stack(at)) if at else None
                at_draws = _stretch(transform, draws)
            except (RuntimeError, ValueError):  # a decode that fails out there: no verdict
                continue
            if at_ends is not None and torch.isfinite(at_ends).any():
                found.append({"site": name.removesuffix("_base"),
                              "at_divergences": float(at_ends.nanmedian()),
                              "at_draws": float(at_draws.nanmedian())})
    return found


def _stretch(transform: torch.distributions.Transform, z: torch.Tensor) -> torch.Tensor:
    """The decode's largest singular value at latent points ``z`` ``(n, *batch, d)``, the
    largest over ``batch``: ``(n,)``."""
    z = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        x = transform(z)
        rows = [torch.autograd.grad(x[..., i].sum(), z, retain_graph=i + 1 < x.shape[-1])[0]
                for i in range(x.shape[-1])]
    norms = torch.linalg.matrix_norm(torch.stack(rows, -2), ord=2)  # (n, *batch)
    return norms.reshape(norms.shape[0], -1).amax(-1)


@dataclass
class LatentSVI:
    """A fitted :func:`latent_svi`: the guide, the model it fits, and the loss per step.

    Calling it runs the guide (``result(*args)``), so it serves wherever a guide does
    (``pyro.infer.Predictive(result.model, guide=result, ...)``);
    :func:`~pyro_inflow.posterior_samples` and :func:`~pyro_inflow.to_inference_data` take it
    directly.

    Attributes:
        guide: the fitted autoguide (its parameters are in Pyro's param store).
        model: the reparametrized model it fits (:func:`reparam_flow_priors`).
        losses: the ELBO loss of each step.
    """

    guide: Callable
    model: Callable
    losses: list[float] = field(default_factory=list)

    def __call__(self, *args: object, **kwargs: object) -> object:
        """Run the guide."""
        return self.guide(*args, **kwargs)


def latent_svi(
    model: Callable,
    *args: object,
    guide: str | type | Callable = "multivariate_normal",
    num_steps: int = 2000,
    lr: float = 0.01,
    num_particles: int = 1,
    seed: int | None = 0,
    progress: bool = True,
    **kwargs: object,
) -> LatentSVI:
    """Fit an autoguide in the latent of every flow prior of ``model`` by SVI (Adam, ELBO).

    Args:
        model: a Pyro model; ``*args`` and ``**kwargs`` are passed to it.
        *args: the model's positional arguments.
        guide: ``"normal"`` (mean-field ``AutoNormal``), ``"multivariate_normal"``,
            ``"lowrank_multivariate_normal"``, ``"delta"``, or an autoguide class or instance
            built on ``reparam_flow_priors(model)``.
        num_steps: optimization steps (``ClippedAdam``).
        lr: the initial learning rate, decaying to ``lr / 10`` over the run.
        num_particles: ELBO particles per step; several are vectorized (the model must
            broadcast over a leading batch dimension).
        seed: ``pyro.set_rng_seed(seed)`` first; ``None`` leaves the RNG alone.
        progress: a tqdm bar with the loss.
        **kwargs: the model's keyword arguments.

    Returns:
        A :class:`LatentSVI`: the fitted guide, the model and the losses. Only the guide's
        parameters are trained (the flow's weights are frozen), and only they are touched in
        Pyro's param store: a guide made here (``guide`` a name or a class) starts afresh,
        removing stale parameters under its own prefix first; a guide instance you pass
        continues from its current parameters. Other parameters in the store are left alone.
    """
    latent_model = reparam_flow_priors(model)
    if isinstance(guide, str):
        if guide not in GUIDES:
            raise ValueError(f"guide: expected one of {sorted(GUIDES)} or an autoguide, "
                             f"got {guide!r}")
        guide = GUIDES[guide]
    if isinstance(guide, type):
        guide = guide(latent_model)
        prefix = getattr(guide, "_pyro_name", None)  # PyroModule: params are "prefix.name"
        if prefix:
            store = pyro.get_param_store()
            for name in [n for n in store.keys() if n.startswith(prefix + ".")]:
                del store[name]
    if seed is not None:
        pyro.set_rng_seed(seed)
    # Adam whose learning rate decays 10x over the run, so the last iterates settle
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1.0 / max(num_steps, 1))})
    elbo = {"num_particles": num_particles, "vectorize_particles": num_particles > 1}
    if num_particles > 1:  # Pyro would guess it, and log that it did
        with torch.no_grad(), poutine.block():
            nodes = poutine.trace(latent_model).get_trace(*args, **kwargs).nodes
        elbo["max_plate_nesting"] = max_plate_nesting(nodes)
    svi = SVI(latent_model, guide, optim, Trace_ELBO(**elbo))
    losses = []
    with tqdm(range(num_steps), desc="SVI", disable=not progress, leave=False) as bar:
        for step in bar:
            losses.append(svi.step(*args, **kwargs))
            if step % 50 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
    return LatentSVI(guide, latent_model, losses)


def max_plate_nesting(nodes: dict) -> int:
    """The number of batch dimensions the plates of a trace's ``nodes`` use."""
    return max((-f.dim for site in nodes.values() if site["type"] == "sample"
                for f in site["cond_indep_stack"] if f.dim is not None), default=0)


