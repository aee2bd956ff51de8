"""``pyro-inflow demo``: train on moons, check the roundtrip and latent calibration, plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from . import _io, datasets
from .diagnostics import latent_coverage, roundtrip_error
from .flow import InflationaryFlow

__all__ = ["run_demo"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plot(path: Path, held: torch.Tensor, z: torch.Tensor, samples: torch.Tensor, cov: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13.5, 4.4), constrained_layout=True)
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
    plt.close(fig)


def run_demo(out: Path, n: int = 20_000, steps: int = 4000, seed: int = 0,
             progress: bool = True, n_heldout: int = 5000) -> dict:
    """Train a flow on moons, encode held-out points, report and plot. Returns the report."""
    if n < 10 or steps < 1:
        raise ValueError(f"--n and --steps: expected n >= 10 and steps >= 1, got {n}, {steps}")
    out.mkdir(parents=True, exist_ok=True)
    data = datasets.load("moons", n=n, seed=seed)
    held = datasets.load("moons", n=n_heldout, seed=seed + 1)
    _say(f"pyro-inflow demo: a PR-preserving flow on moons ({n:,} training points, "
         f"{steps:,} steps)")
    tic = time.perf_counter()
    flow = InflationaryFlow.fit(data, steps=steps, seed=seed, progress=progress)
    train_s = time.perf_counter() - tic
    h = flow.history
    _say(f"trained in {train_s:.1f} s: {h['samples_seen'][-1]:,} samples seen, validation "
         f"loss {h['val_loss'][0]:.4f} -> {h['val_loss'][-1]:.4f}")
    with torch.no_grad():
        tic = time.perf_counter()
        z = flow.encode(held)
        enc = (flow.last_solve.nfe, time.perf_counter() - tic)
        back = flow.decode(z)
        dec = (flow.last_solve.nfe, time.perf_counter() - tic - enc[1])
        samples = flow.sample(n_heldout, seed=seed)
    rt = roundtrip_error(held, back)
    cov = latent_coverage(z)
    _say(f"encode {n_heldout:,} held-out points: {enc[0]} evaluations, {enc[1]:.1f} s; "
         f"decode: {dec[0]} evaluations, {dec[1]:.1f} s")
    print(f"\nroundtrip error |x - decode(encode(x))| (data units, rtol "
          f"{flow.last_solve.rtol:g}): rms {rt['rms']:.2e}, median {rt['median']:.2e}, "
          f"max {rt['max']:.2e}")
    print("\nlatent coverage of chi-square(2) regions on held-out points")
    print("  nominal  observed  binomial s.e.")
    for lv, c, se in zip(cov["levels"], cov["coverage"], cov["stderr"]):
        print(f"  {lv:7.2f}  {c:8.4f}  {se:13.4f}")
    print(f"  largest |observed - nominal| = {cov['max_abs_error']:.4f}, KS = {cov['ks']:.4f}")
    flow.save(out / "moons.flow", metadata={"demo": True, "steps": steps, "n": n})
    _plot(out / "demo.png", held.numpy(), z.numpy(), samples.numpy(), cov)
    report = {"data": "moons", "n_train": n, "n_heldout": n_heldout, "steps": steps,
              "train_seconds": train_s, "samples_seen": h["samples_seen"][-1],
              "val_loss": h["val_loss"][-1], "encode_nfe": enc[0], "decode_nfe": dec[0],
              "roundtrip": rt, "coverage": cov}
    _io.atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    print(f"\nwrote {out / 'moons.flow'}, {out / 'demo.png'}, {out / 'report.json'}")
    return report
