"""``pyro-inflow demo``: the whole method on moons, in a few minutes.

1. Train a PR-preserving flow on moons (progress bar).
2. Calibrate it on held-out points: latent coverage, data-space credible regions, roundtrip.
3. Use it as the prior of an ambiguous inverse problem, ``y = x0 + x1 + Normal(0, 0.3)`` with
   ``y = 0.5`` (a bimodal, curved posterior): NUTS in the latent (four chains) and mean-field
   SVI, with the ArviZ summary and the posterior mass of each moon against quadrature.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from .. import _io, datasets
from ..calibration import calibration_table, flow_calibration, plot_calibration, report_json
from ..flow import InflationaryFlow
from ..inference import latent_nuts, latent_svi
from ..posterior import mcse_mean, posterior_samples, summary, to_inference_data
from .problems import NOISE, Y_OBS, moons_model, quadrature_right_moon

__all__ = ["run_demo"]


#: NUTS chains of the demo: four, so R-hat compares independent runs (one after another on
#: a machine with fewer free cores than chains).
CHAINS = 4
#: NUTS's largest tree depth in the demo (at most 63 leapfrog steps per draw). Its 2-D latent
#: posterior needs 8-25 per draw, but a chain whose warm-up keeps meeting the seam between the
#: moons adapts a tiny step: at Pyro's depth 10, 3 of 7 chain seeds adapted 0.017-0.07 against
#: 0.24-0.33 and one took 157 leapfrog steps per draw, so NUTS took 54-83 s instead of ~30.
#: Capped at 6, seeds 0 and 4 took 38 and 33 s with bulk ESS 61-79 (at depth 10: 17-67).
MAX_TREE_DEPTH = 6


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plot(path: Path, held: np.ndarray, z: np.ndarray, samples: np.ndarray, cov: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 4.4), constrained_layout=True)
    ax = fig.subplots(1, 3)
    kw = {"s": 2, "alpha": 0.5, "linewidths": 0}
    ax[0].scatter(*held.T, color="C0", **kw)
    ax[0].set_title(f"held-out data ({len(held):,} points)")
    ax[1].scatter(*z.T, color="C1", **kw)
    angle = np.linspace(0, 2 * np.pi, 200)
    for level, got in zip(cov["levels"], cov["coverage"]):
        r = np.sqrt(stats.chi2.ppf(level, 2))
        ax[1].plot(r * np.cos(angle), r * np.sin(angle), color="k", lw=0.7)
        ax[1].annotate(f"{level:.0%}: {got:.1%}", (r * 0.71, r * 0.71), fontsize=7)
    ax[1].set_title("latent z = encode(x), chi-square regions\n(nominal: observed coverage)")
    ax[2].scatter(*samples.T, color="C2", **kw)
    ax[2].set_title(f"samples = decode(N(0, I)) ({len(samples):,})")
    lim = [min(a.get_xlim()[0] for a in (ax[0], ax[2])),
           max(a.get_xlim()[1] for a in (ax[0], ax[2]))]
    for a in ax:
        a.set_aspect("equal")
    for a in (ax[0], ax[2]):
        a.set_xlim(lim)
        a.set_ylim(ax[0].get_ylim())
    fig.suptitle("pyro-inflow demo: a PR-preserving inflationary flow on moons")
    _io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _plot_posterior(path: Path, prior_x: np.ndarray, nuts_x: np.ndarray,
                    svi_x: np.ndarray) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 4.6), constrained_layout=True)
    ax = fig.subplots(1, 2, sharey=True)
    for a, (x, name, color) in zip(ax, ((nuts_x, "NUTS in the latent", "C3"),
                                        (svi_x, "mean-field SVI (AutoNormal)", "C4"))):
        a.scatter(*prior_x.T, s=2, color="0.75", linewidths=0, label="prior draws")
        a.scatter(*x.T, s=3, color=color, alpha=0.5, linewidths=0, label="posterior draws")
        a.axline((Y_OBS, 0.0), slope=-1, color="k", lw=0.8, ls="--",
                 label=f"x0 + x1 = {Y_OBS} (observed)")
        a.set(aspect="equal", title=f"{name}: P(x0 > 0) = {(x[:, 0] > 0).mean():.2f}",
              xlabel="x0", ylabel="x1")
        a.legend(fontsize=8, loc="lower left", markerscale=3)
    fig.suptitle(f"posterior of x given y = x0 + x1 + N(0, {NOISE}^2) = {Y_OBS}, "
                 "prior: the trained flow")
    _io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def run_demo(out: Path, n: int = 20_000, steps: int = 4000, seed: int = 0,
             progress: bool = True, n_heldout: int = 5000, draws: int = 150,
             svi_steps: int = 1000, nuts_threads: int | None = None) -> dict:
    """Train, calibrate, and use the flow as a prior; print, plot, return the report.

    Args:
        out: output folder (created).
        n: training points.
        steps: training steps.
        seed: seed of the data, the training and the inference.
        progress: progress bars (training, NUTS, SVI).
        n_heldout: held-out points for the calibration.
        draws: NUTS draws per chain (``CHAINS`` chains, as many warm-up steps).
        svi_steps: mean-field SVI steps.
        nuts_threads: if given, torch's intra-op thread count while NUTS runs (restored
            after); the command passes 1 (one point per gradient: more threads only add
            overhead). ``None`` leaves it alone.
    """
    if n < 10 or steps < 1 or draws < 4 or svi_steps < 1 or n_heldout < 10:
        raise ValueError(f"--n, --steps, --draws: expected n >= 10, steps >= 1, draws >= 4, "
                         f"got {n}, {steps}, {draws}")
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    data = datasets.load("moons", n=n, seed=seed)
    held = datasets.load("moons", n=n_heldout, seed=seed + 1)
    _say(f"pyro-inflow demo [1/3]: train a PR-preserving flow on moons ({n:,} points, "
         f"{steps:,} steps)")
    tic = time.perf_counter()
    flow = InflationaryFlow.fit(data, steps=steps, seed=seed, progress=progress)
    train_s = time.perf_counter() - tic
    h = flow.history
    _say(f"trained in {train_s:.1f} s: {h['samples_seen'][-1]:,} samples seen, validation "
         f"loss {h['val_loss'][0]:.4f} -> {h['val_loss'][-1]:.4f}")
    flow.save(out / "moons.flow", metadata={"demo": True, "steps": steps, "n": n})

    _say(f"\npyro-inflow demo [2/3]: calibrate on {n_heldout:,} held-out points")
    tic = time.perf_counter()
    cal = flow_calibration(flow, held)
    cal_s = time.perf_counter() - tic
    print("\nflow calibration on held-out points")
    print(calibration_table(cal))
    with torch.no_grad():
        samples = flow.sample(n_heldout, seed=seed)
    plots = plot_calibration(cal, out, x=held)
    _plot(out / "demo.png", held.numpy(), cal["z"].numpy(), samples.numpy(), cal["coverage"])

    _say(f"\npyro-inflow demo [3/3]: the flow as a Pyro prior; y = x0 + x1 + N(0, {NOISE}^2) "
         f"= {Y_OBS}; NUTS in the latent ({CHAINS} chains x {draws} draws) and mean-field SVI")
    model = moons_model(flow.prior())
    y = torch.tensor(Y_OBS, dtype=flow.dtype)
    tic = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(nuts_threads or threads)
    try:
        mcmc = latent_nuts(model, y, num_samples=draws, warmup_steps=draws, num_chains=CHAINS,
                           max_tree_depth=MAX_TREE_DEPTH, progress=progress, seed=seed)
    finally:
        torch.set_num_threads(threads)
    nuts_s = time.perf_counter() - tic
    idata = to_inference_data(mcmc)
    tic = time.perf_counter()
    guide = latent_svi(model, y, guide="normal", num_steps=svi_steps, lr=0.02,
                       num_particles=4, progress=progress, seed=seed)
    svi_s = time.perf_counter() - tic
    x_nuts = posterior_samples(mcmc)["x"].double().numpy()
    p_nuts, p_mcse, p_ess = mcse_mean(idata.posterior["x"].values[..., 0] > 0)
    x_svi = posterior_samples(guide, y, num_samples=CHAINS * draws)["x"].double().numpy()
    truth = quadrature_right_moon(lambda x: flow.log_prob(x.to(flow.dtype),
                                                          method="warped_rk4"))
    table = summary(idata, var_names=["x", "x_base"])
    print(f"\nNUTS in the latent: {nuts_s:.1f} s, ArviZ summary (x: data space, x_base: latent)")
    print(table.to_string())
    divergent = int(idata.sample_stats["diverging"].sum())
    print(f"divergences: {divergent} of {CHAINS * draws} draws")
    print(f"\nposterior mass of the right-hand moon, P(x0 > 0): NUTS {p_nuts:.3f} "
          f"+- {p_mcse:.3f} (Monte Carlo s.e.; ESS {p_ess:.0f}: the chains cross between the "
          f"moons rarely), mean-field SVI {(x_svi[:, 0] > 0).mean():.3f} ({svi_s:.1f} s), "
          f"quadrature under the same prior {truth:.3f}")
    print(f"posterior sd of x (data space): NUTS {np.round(x_nuts.std(0), 3).tolist()}, "
          f"mean-field SVI {np.round(x_svi.std(0), 3).tolist()}")
    _plot_posterior(out / "posterior.png", samples.numpy(), x_nuts, x_svi)

    report = {"data": "moons", "n_train": n, "n_heldout": n_heldout, "steps": steps,
              "train_seconds": train_s, "samples_seen": h["samples_seen"][-1],
              "val_loss": h["val_loss"][-1], "calibration_seconds": cal_s,
              "calibration": report_json(cal),
              "inverse_problem": {
                  "y_obs": Y_OBS, "noise": NOISE, "nuts_seconds": nuts_s,
                  "svi_seconds": svi_s, "chains": CHAINS, "draws_per_chain": draws,
                  "divergences": divergent,
                  "ess_bulk_min": float(table["ess_bulk"].min()),
                  "r_hat_max": float(table["r_hat"].max()),
                  "p_right_moon": {"nuts": p_nuts, "nuts_mcse": p_mcse, "nuts_ess": p_ess,
                                   "svi_mean_field": float((x_svi[:, 0] > 0).mean()),
                                   "quadrature": truth},
                  "posterior_sd": {"nuts": x_nuts.std(0).tolist(),
                                   "svi_mean_field": x_svi.std(0).tolist()}},
              "total_seconds": time.perf_counter() - total}
    _io.atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    files = [out / "moons.flow", out / "demo.png", *plots, out / "posterior.png",
             out / "report.json"]
    print(f"\nwrote {', '.join(str(f) for f in files)} in {report['total_seconds']:.0f} s")
    return report
