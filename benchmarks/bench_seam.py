"""Issue-3 question: where do latent NUTS's divergences come from on the moons benchmark?

A continuous bijection from a Gaussian onto data with an (almost) empty gap, such as the two
moons, must cover the gap with a thin band of latent space that it stretches enormously: a
*seam*. Along the seam the decode's Jacobian is huge, so the likelihood of the benchmark's
observation ``y = x0 + x1 + Normal(0, 0.3)`` has a curvature ``|J^T 1|^2 / 0.3^2`` many orders
above its value elsewhere, and a leapfrog step that lands in it diverges. This script measures
that, for the trained moons flow and for an *exact* two-Gaussian mixture flow (exact scores, so
no learning error), with two solvers (the prior's fixed-grid ``warped_rk4`` and dopri5 at
``rtol=1e-7``, so no solver error either):

* the likelihood curvature on a latent grid: its posterior-weighted median, its largest value
  inside the posterior (points above 1e-3 of the peak density), and the posterior mass where
  it passes 1e3 and 1e4;
* NUTS in the latent (2 chains x 500 + 500): divergences, adapted step size, and the posterior
  mass of ``x0 > 0`` against its value by quadrature under the same prior.

    python benchmarks/bench_seam.py [--quick]

Prints a table, writes benchmarks/results/seam.json and seam.png (the curvature maps, the
posterior's contours and the draws of divergent transitions). ``--quick``: a 61 x 61 grid,
400 training steps, 2 chains x (100 + 100), both files under benchmarks/results/quick/. The
moons problem (``Y_OBS``, ``NOISE``, the model, the quadrature) is
:mod:`pyro_inflow.examples.problems`, the same as ``bench_pyro.py``'s.
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _harness import parser, results_dir, write_results  # noqa: E402

import pyro_inflow as pif  # noqa: E402
from pyro_inflow.examples.problems import (  # noqa: E402
    NOISE,
    Y_OBS,
    moons_model,
    quadrature_right_moon,
)

SOLVERS = {"warped_rk4 N=12": {"method": "warped_rk4", "num_steps": 12, "rtol": 1.0},
           "dopri5 1e-7": {"method": "dopri5", "rtol": 1e-7, "atol": 1e-7}}


def curvature_grid(flow, solver: dict, n: int, half: float = 4.5, h: float = 1e-4):
    """Latent grid ``(n*n, 2)``, likelihood curvature and (unnormalized) posterior there."""
    g = torch.linspace(-half, half, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        x = flow.decode(z, **solver).double()
        cols = [(flow.decode(z + h * e, **solver).double() - x) / h
                for e in torch.eye(2, dtype=torch.float64)]
    jt1 = torch.stack(cols, -1).sum(-2)  # J^T 1: (n*n, 2)
    curv = jt1.square().sum(-1) / NOISE**2
    log_post = (-0.5 * z.square().sum(-1)
                + dist.Normal(x.sum(-1), NOISE).log_prob(torch.tensor(Y_OBS, dtype=x.dtype)))
    return z, x, curv, torch.softmax(log_post, 0)


def grid_row(curv, post) -> dict:
    inside = post > 1e-3 * post.max()
    order = torch.argsort(curv)
    cdf = torch.cumsum(post[order], 0)
    median = float(curv[order][torch.searchsorted(cdf, torch.tensor(0.5, dtype=cdf.dtype))])
    return {"curv_post_median": median, "curv_max_in_posterior": float(curv[inside].max()),
            "post_mass_curv_gt_1e3": float(post[curv > 1e3].sum()),
            "post_mass_curv_gt_1e4": float(post[curv > 1e4].sum())}


def nuts_row(flow, samples: int, chains: int) -> tuple[dict, np.ndarray]:
    model = moons_model(flow.prior())
    y = torch.tensor(Y_OBS, dtype=flow.dtype)
    tic = time.perf_counter()
    mcmc = pif.latent_nuts(model, y, num_samples=samples, warmup_steps=samples,
                           num_chains=chains, progress=False, seed=0)
    wall = time.perf_counter() - tic
    z = mcmc.get_samples(group_by_chain=True)["x_base"].detach().double()  # (chain, draw, 2)
    x = pif.posterior_samples(mcmc, group_by_chain=True)["x"].detach().double()
    div = mcmc.diagnostics()["divergences"]
    z_div = np.concatenate([z[c, idx].numpy().reshape(-1, 2)
                            for c, idx in enumerate(div.values())]) if div else np.empty((0, 2))
    step = float(mcmc.kernel.step_size)
    return {"wall_s": wall, "chains": chains, "draws_per_chain": samples,
            "divergences": int(sum(len(v) for v in div.values())), "step_size_last_chain": step,
            "frac_x0_gt_0": float((x[..., 0] > 0).double().mean())}, z_div


def main() -> None:
    a = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    n_grid, steps, samples = (61, 400, 100) if a.quick else (161, 4000, 500)

    # an exact two-Gaussian flow whose components the line x0 + x1 = 0.5 crosses, with the
    # gap between them (density 0.5% of the peak at the midpoint) not parallel to it, and the
    # trained moons flow of bench_pyro.py (same data, same default training)
    means = torch.tensor([[-1.2, 0.8], [1.2, -0.8]], dtype=torch.float64)
    covs = 0.2 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mix = dist.MixtureSameFamily(dist.Categorical(weights),
                                 dist.MultivariateNormal(means, covs))
    exact = pif.InflationaryFlow.from_gaussian_mixture(weights, means, covs)
    data = pif.datasets.load("moons", n=20_000, seed=1).float()
    tic = time.perf_counter()
    moons = pif.InflationaryFlow.fit(data, progress=False, steps=steps)
    train_s = time.perf_counter() - tic
    flows = {"exact 2-Gaussian mixture": (exact, mix.log_prob),
             "moons (trained)": (moons, lambda c: moons.log_prob(c, rtol=1e-5).double())}

    rows, maps = [], {}
    for name, (flow, log_prior) in flows.items():
        for sname, solver in SOLVERS.items():
            z, x, curv, post = curvature_grid(flow, solver, n_grid)
            rows.append({"flow": name, "solver": sname, **grid_row(curv, post)})
            maps.setdefault(name, (z, curv, post))
        nuts, z_div = nuts_row(flow, samples, chains=2)
        nuts["truth_frac_x0_gt_0"] = quadrature_right_moon(log_prior, (-3.5, -3.5), (3.5, 3.5),
                                                          n=201)
        rows.append({"flow": name, "solver": "NUTS (prior default)", **nuts})
        maps[name] = (*maps[name], z_div)

    print(f"{'flow':<26}{'solver':<22}{'curv median':>12}{'curv max':>10}"
          f"{'mass>1e3':>10}{'mass>1e4':>10}")
    for r in rows:
        if "curv_post_median" in r:
            print(f"{r['flow']:<26}{r['solver']:<22}{r['curv_post_median']:>12.1f}"
                  f"{r['curv_max_in_posterior']:>10.1e}{r['post_mass_curv_gt_1e3']:>10.4f}"
                  f"{r['post_mass_curv_gt_1e4']:>10.4f}")
    print(f"\n{'flow':<26}{'wall s':>8}{'div':>5}{'step':>7}{'P(x0>0)':>9}{'truth':>7}")
    for r in rows:
        if "divergences" in r:
            print(f"{r['flow']:<26}{r['wall_s']:>8.0f}{r['divergences']:>5}"
                  f"{r['step_size_last_chain']:>7.3f}{r['frac_x0_gt_0']:>9.3f}"
                  f"{r['truth_frac_x0_gt_0']:>7.3f}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    for ax, (name, (z, curv, post, z_div)) in zip(axes, maps.items()):
        n = int(round(len(z) ** 0.5))
        zz = [z[:, i].reshape(n, n).numpy() for i in range(2)]
        im = ax.pcolormesh(*zz, curv.log10().reshape(n, n).numpy(), cmap="magma",
                           shading="auto", vmin=-1, vmax=6)
        levels = np.quantile(post.numpy(), [0.9, 0.99])
        ax.contour(*zz, post.reshape(n, n).numpy(), levels=levels, colors="c", linewidths=1)
        ax.scatter(z_div[:, 0], z_div[:, 1], marker="x", c="lime", s=30,
                   label="draws of divergent transitions")
        ax.set(title=name, xlabel="z1", ylabel="z2", aspect="equal")
        ax.legend(loc="lower left", fontsize=8)
    fig.colorbar(im, ax=axes, label="log10 likelihood curvature |J^T 1|^2 / sigma^2")
    fig.savefig(results_dir(a.quick) / "seam.png", dpi=80)
    write_results("seam", {"moons_train_s": train_s, "grid": n_grid, "rows": rows}, a.quick)


if __name__ == "__main__":
    main()
