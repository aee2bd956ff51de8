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

    python benchmarks/bench_hierarchical.py [--quick] [--draws N] [--chains N] [--warmup N]
        [--diagonal] [--max-tree-depth K] [--sequential] [--centered] [--tag TAG] [--geometry]

Prints a table and writes benchmarks/results/hierarchical[_TAG].json (``--quick``: 300 training
steps, 1 chain of 20 draws, under benchmarks/results/quick/). The chains run in worker
processes sharing the cores (``latent_nuts``'s default; ``--sequential``: one after another).
``--centered`` samples the groups' data-space ``x`` with the prior's log-density
(``latent_nuts(..., centered=True)``) instead of their latents.
``--geometry`` instead shows where the step size collapses: each group's latent posterior on
a grid (sigma fixed at 0.3) against the decode's stretch (largest singular value of ``dx/dz``),
and NUTS on each group alone (2 chains of 300 + 300); it writes
hierarchical_geometry.json and .png. The figures are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import time
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from _harness import parser, results_dir, write_results

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


def stretch(flow, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Largest singular value of the prior's decode Jacobian ``dx/dz`` at latent points
    ``(n, 2)`` (``sampler_geometry``'s measure), ``chunk`` points at a time."""
    transform = flow.prior().transforms[0]
    return torch.cat([pif.inference._stretch(transform, c) for c in z.split(chunk)])


def geometry(flow, t: torch.Tensor, y: torch.Tensor, x_true: torch.Tensor, quick: bool) -> dict:
    """Where the step size collapses (``--geometry``): each group's latent posterior (sigma
    fixed at its true 0.3) on a grid, the decode's stretch there, and NUTS on that group alone
    (2 chains of 300 + 300): step size, leapfrog steps per draw, share of divergent draws, and
    (``sampler_geometry``) the decode's stretch where the diverging steps ended."""
    n = 81 if quick else 241
    g = torch.linspace(-4, 4, n)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    s = stretch(flow, z)
    with torch.no_grad():
        x = flow.decode(z, method="warped_rk4", num_steps=12, rtol=1e9)
    prior = flow.prior()
    rows, posts = [], []
    for k in range(GROUPS):
        ll = dist.Normal(x[:, :1] + x[:, 1:] * t, 0.3).log_prob(y[:, k]).sum(-1)
        post = torch.softmax(ll - 0.5 * z.square().sum(-1), 0)
        posts.append(post.reshape(n, n))

        def one(obs=y[:, k]) -> None:
            xk = pyro.sample("x", prior)
            pyro.sample("y", dist.Normal(xk[..., :1] + xk[..., 1:] * t, 0.3), obs=obs)

        draws = 30 if quick else 300
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mcmc = pif.latent_nuts(one, num_samples=draws, num_chains=2, seed=k,
                                   progress=False)
        geo = pif.inference.sampler_geometry(mcmc)
        seam = geo["seams"][0] if geo["seams"] else {}
        rows.append({"group": k, "x_true": x_true[k].tolist(),
                     "stretch_where_divergent_steps_end": seam.get("at_divergences"),
                     "stretch_at_draws": seam.get("at_draws"),
                     "posterior_mass_stretch_over_10": float(post[s > 10].sum()),
                     "posterior_mean_stretch": float((post * s).sum()),
                     "step_size": geo["step_size"], "leapfrogs_per_draw":
                     geo["leapfrogs_per_draw"], "divergent_share": geo["divergences"] / (
                         2 * draws), "wall_s": time.perf_counter() - tic})
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 6.2), constrained_layout=True)
    ax = fig.subplots(1, 2)
    im = ax[0].pcolormesh(g, g, s.log10().reshape(n, n).T, cmap="magma", shading="auto")
    fig.colorbar(im, ax=ax[0], label="log10 largest singular value of dx/dz")
    for k, post in enumerate(posts):
        ax[0].contour(g, g, post.T, levels=[0.05 * float(post.max())], colors="c",
                      linewidths=0.8)
        i = int(post.argmax())
        ax[0].annotate(str(k), z[i].tolist(), color="w", fontsize=9)
    ax[0].set(title="the decode's stretch over the latent, and each group's latent\n"
                    "posterior (5 % of its peak; sigma = 0.3)", xlabel="z0", ylabel="z1")
    pts = pif.datasets.load("moons", n=4000, seed=3)
    ax[1].scatter(*pts.T, s=1, color="0.75", linewidths=0)
    for k, post in enumerate(posts):
        idx = torch.multinomial(post.reshape(-1), 300, replacement=True)
        ax[1].scatter(*x[idx].T, s=2, linewidths=0)
        ax[1].annotate(str(k), x_true[k].tolist(), fontsize=9)
    ax[1].set(aspect="equal", title="the same posteriors in data space (over the moons)",
              xlabel="x0", ylabel="x1")
    path = results_dir(quick) / "hierarchical_geometry.png"
    fig.savefig(path, dpi=100)
    print(f"\nper group alone (sigma = 0.3, 2 chains x {draws} + {draws}): "
          "posterior mass where the decode stretches > 10x, step sizes, leapfrogs per draw, "
          "divergent share, the decode's stretch where the diverging steps ended and at the "
          "draws (medians)")
    for r in rows:
        ends = r["stretch_where_divergent_steps_end"]
        print(f"group {r['group']}: {r['posterior_mass_stretch_over_10']:.3f}  steps "
              + ", ".join(f"{v:.2f}" for v in r["step_size"]) + "  leapfrogs "
              + ", ".join(f"{v:.1f}" for v in r["leapfrogs_per_draw"])
              + f"  divergent {r['divergent_share']:.1%}"
              + (f"  stretch {ends:.3g}x vs {r['stretch_at_draws']:.3g}x" if ends else ""))
    print(f"wrote {path}")
    return {"groups": rows, "figure": path.name}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=None, help="draws per chain (default 250)")
    p.add_argument("--chains", type=int, default=None, help="chains (default 4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per chain "
                   "(default: as many as draws)")
    p.add_argument("--diagonal", action="store_true", help="a diagonal mass matrix "
                   "(latent_nuts's default is dense)")
    p.add_argument("--max-tree-depth", type=int, default=10, help="NUTS's largest tree depth")
    p.add_argument("--tag", default="", help="write hierarchical_TAG.json")
    p.add_argument("--geometry", action="store_true", help="only where the step size "
                   "collapses: each group alone and a figure (hierarchical_geometry.json/png)")
    p.add_argument("--sequential", action="store_true", help="chains one after another in "
                   "this process (default: worker processes sharing the cores)")
    p.add_argument("--centered", action="store_true", help="NUTS on the data-space x with the "
                   "prior's log-density (latent_nuts(centered=True))")
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
    if a.geometry:
        write_results("hierarchical_geometry", geometry(flow, t, y, x_true, a.quick), a.quick)
        return
    model = make_model(flow.prior(), t)
    tic = time.perf_counter()
    mcmc = pif.latent_nuts(model, y, num_samples=draws, warmup_steps=a.warmup,
                           num_chains=chains, seed=0, progress=False,
                           full_mass=not a.diagonal, max_tree_depth=a.max_tree_depth,
                           parallel=False if a.sequential else None, centered=a.centered)
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
    at_limit = sum(int(np.sum(np.asarray(diag["tree_depth"][c]) >= a.max_tree_depth))
                   for c in names)
    divergences = sum(int(np.sum(diag["diverging"][c])) for c in names)
    worst = min(ess_bulk, key=ess_bulk.get)
    row = {"wall_s": wall, "draws_per_chain": draws, "chains": chains,
           "warmup_per_chain": draws if a.warmup is None else a.warmup,
           "mass": "diagonal" if a.diagonal else "dense", "max_tree_depth": a.max_tree_depth,
           "parameterization": "centered (data space)" if a.centered else "latent",
           "processes": 1 if a.sequential else min(chains, pif.inference._cores()),
           "ess_bulk_min": ess_bulk[worst], "ess_bulk_min_param": worst,
           "ess_tail_min": min(ess_tail.values()), "rhat_max": max(rhat.values()),
           "divergences": divergences, "step_size": [float(np.mean(diag["step_size"][c]))
                                                     for c in names],
           "leapfrogs_per_draw": steps_per, "draws_at_depth_limit": at_limit,
           "sigma_mean": float(sigma.mean()), "kernel": fused.kernel_info()["backend"],
           "geometry": pif.inference.sampler_geometry(mcmc)["message"]}
    print(f"8 groups x 2-D moons prior + shared sigma, {row['parameterization']}: {chains} "
          f"chains x {draws} draws (+ as many warm-up), {wall:.0f} s")
    print(f"smallest bulk ESS {row['ess_bulk_min']:.0f} ({worst}), smallest tail ESS "
          f"{row['ess_tail_min']:.0f}, largest R-hat {row['rhat_max']:.3f}, divergences "
          f"{divergences}, draws at the depth limit {at_limit}")
    print("step size per chain: " + ", ".join(f"{s:.3f}" for s in row["step_size"])
          + "; leapfrog steps per draw: " + ", ".join(f"{s:.1f}" for s in steps_per))
    print(f"posterior mean of sigma {row['sigma_mean']:.3f} (true 0.3)")
    print(row["geometry"])
    write_results("hierarchical" + (f"_{a.tag}" if a.tag else ""),
                  {"train_steps": steps, **row, "ess_bulk": ess_bulk, "rhat": rhat}, a.quick)


if __name__ == "__main__":
    main()
