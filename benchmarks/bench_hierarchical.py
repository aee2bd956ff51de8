"""Issue-20 figures: a hierarchical model with a learned prior per group, NUTS end to end.

Eight groups in a ``pyro.plate``, each with a 2-D moons flow prior (trained with the default
settings; ``--quick``: 300 steps) and its own regression ``y_gj ~ N(x_g0 + x_g1 t_j, sigma)`` on
5 points ``t_j`` in [-1, 1], one noise scale ``sigma ~ HalfNormal(0.5)`` shared by all: a
17-dimensional posterior (16 latent coordinates and ``sigma``). The data are drawn from the
model itself (the groups' ``x`` from the flow, ``sigma = 0.3``, seed 0). ``latent_nuts`` with
its defaults, 4 chains (one after another on this machine), 1 torch thread: wall time, the
smallest bulk and tail ESS over every parameter (ArviZ, the 16 data-space coordinates and
``sigma``), the largest R-hat, divergences, each chain's adapted step size and mean leapfrog
steps per draw, and how many draws hit the tree-depth limit.

    python benchmarks/bench_hierarchical.py [--quick] [--draws N] [--chains N]

Prints a table and writes benchmarks/results/hierarchical.json (``--quick``: 300 training
steps, 1 chain of 20 draws, benchmarks/results/quick/hierarchical.json). The full run (4 chains
of 250) takes about an hour on a 2-core machine today: the step size adapts to about 0.025 and
trees are 250 leapfrog steps deep (``benchmarks/README.md``).
"""

from __future__ import annotations

import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from _harness import parser, write_results

import pyro_inflow as pif
from pyro_inflow.solvers import fused

GROUPS, POINTS = 8, 5


def make_model(prior, t: torch.Tensor):
    def model(y: torch.Tensor) -> None:
        sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
        with pyro.plate("groups", GROUPS):
            x = pyro.sample("x", prior)
            with pyro.plate("points", POINTS):
                mean = x[..., None, :, 0] + x[..., None, :, 1] * t[:, None]  # (..., points, groups)
                pyro.sample("y", dist.Normal(mean, sigma), obs=y)
    return model


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=None, help="draws per chain (default 250)")
    p.add_argument("--chains", type=int, default=None, help="chains (default 4)")
    a = p.parse_args()
    torch.set_num_threads(1)
    steps = 300 if a.quick else 4000
    draws = a.draws or (20 if a.quick else 250)
    chains = a.chains or (1 if a.quick else 4)
    data = pif.datasets.load("moons", n=20_000, seed=1)
    flow = pif.InflationaryFlow.fit(data, steps=steps, progress=False).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(-1, 1, POINTS)
    x_true = flow.sample(GROUPS, generator=gen)
    y = x_true[:, 0] + x_true[:, 1] * t[:, None] + 0.3 * torch.randn(POINTS, GROUPS,
                                                                      generator=gen)
    model = make_model(flow.prior(), t)
    tic = time.perf_counter()
    mcmc = pif.latent_nuts(model, y, num_samples=draws, num_chains=chains, seed=0,
                           progress=False)
    wall = time.perf_counter() - tic
    draws_x = pif.posterior_samples(mcmc, group_by_chain=True)
    x = draws_x["x"].double().numpy()  # (chains, draws, groups, 2)
    sigma = draws_x["sigma"].double().numpy()
    params = {"sigma": sigma, **{f"x[{g},{i}]": x[:, :, g, i] for g in range(GROUPS)
                                 for i in range(2)}}
    ess_bulk = {k: float(az.ess(v, method="bulk")) for k, v in params.items()}
    ess_tail = {k: float(az.ess(v, method="tail")) for k, v in params.items()}
    rhat = {k: float(az.rhat(v)) if chains > 1 else float("nan") for k, v in params.items()}
    diag = mcmc.diagnostics()
    names = sorted(diag["step_size"])
    steps_per = [float(np.mean(diag["n_steps"][c])) for c in names]
    at_limit = sum(int(np.sum(np.asarray(diag["tree_depth"][c]) >= 10)) for c in names)
    divergences = sum(int(np.sum(diag["diverging"][c])) for c in names)
    worst = min(ess_bulk, key=ess_bulk.get)
    row = {"wall_s": wall, "draws_per_chain": draws, "chains": chains,
           "ess_bulk_min": ess_bulk[worst], "ess_bulk_min_param": worst,
           "ess_tail_min": min(ess_tail.values()), "rhat_max": max(rhat.values()),
           "divergences": divergences, "step_size": [float(np.mean(diag["step_size"][c]))
                                                     for c in names],
           "leapfrogs_per_draw": steps_per, "draws_at_depth_limit": at_limit,
           "sigma_mean": float(sigma.mean()), "kernel": fused.kernel_info()["backend"],
           "geometry": pif.inference.sampler_geometry(mcmc)["message"]}
    print(f"8 groups x 2-D moons prior + shared sigma: {chains} chains x {draws} draws "
          f"(+ as many warm-up), {wall:.0f} s")
    print(f"smallest bulk ESS {row['ess_bulk_min']:.0f} ({worst}), smallest tail ESS "
          f"{row['ess_tail_min']:.0f}, largest R-hat {row['rhat_max']:.3f}, divergences "
          f"{divergences}, draws at the depth limit {at_limit}")
    print("step size per chain: " + ", ".join(f"{s:.3f}" for s in row["step_size"])
          + "; leapfrog steps per draw: " + ", ".join(f"{s:.1f}" for s in steps_per))
    print(f"posterior mean of sigma {row['sigma_mean']:.3f} (true 0.3)")
    print(row["geometry"])
    write_results("hierarchical", {"train_steps": steps, **row, "ess_bulk": ess_bulk,
                                   "rhat": rhat}, a.quick)


if __name__ == "__main__":
    main()
