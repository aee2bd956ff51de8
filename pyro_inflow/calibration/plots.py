"""Plots of calibration reports: coverage, latents, decoded regions (files, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from .. import _io
from .coverage import as_numpy

if TYPE_CHECKING:
    import torch

__all__ = ["plot_calibration", "save_png"]


def save_png(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically; a pyplot figure is closed after."""
    import matplotlib.pyplot as plt

    _io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    if plt.fignum_exists(getattr(fig, "number", -1)):
        plt.close(fig)


def plot_calibration(report: dict, out_dir: str | Path,
                     x: torch.Tensor | np.ndarray | None = None) -> list:
    """Write the PNGs of :command:`pyro-inflow calibrate` from a :func:`flow_calibration` report.

    ``coverage.png`` (observed vs nominal with binomial 95 % bars, latent and data-space),
    ``latent.png`` (``||z||^2`` against chi-square(d), and the latent scatter for d = 2 or the
    per-coordinate histograms against N(0, 1) otherwise) and, when the report has data-space
    regions, ``regions.png`` (decoded regions over the held-out points ``x``).

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    cov = report["coverage"]
    levels = np.array(cov["levels"])
    written = []

    fig = Figure(figsize=(5.2, 4.2), constrained_layout=True)
    ax = fig.subplots()
    ax.axhline(0, color="0.5", lw=1)
    ax.errorbar(levels, np.array(cov["coverage"]) - levels,
                yerr=1.96 * np.array(cov["stderr"]), fmt="o-", capsize=3,
                label=f"latent ||z||^2 (n={cov['n']:,})")
    if "regions" in report:
        reg = report["regions"]
        ax.errorbar(levels + 0.006, np.array(reg["inside"]) - levels,
                    yerr=1.96 * np.array(reg["stderr"]), fmt="s--", capsize=3,
                    label=f"data-space regions ({reg['method']})")
    ax.set(xlabel="nominal level", ylabel="observed - nominal coverage (95 % bars)",
           title=f"coverage: {cov['verdict']} (max |error| {cov['max_abs_error']:.3f})")
    ax.legend(fontsize=8)
    written.append(out_dir / "coverage.png")
    save_png(fig, written[-1])

    z = as_numpy(report["z"])
    d = z.shape[1]
    ncols = 2 if d == 2 else 1 + min(d, 4)
    fig = Figure(figsize=(4.2 * ncols, 4), constrained_layout=True)
    axes = fig.subplots(1, ncols)
    r2 = (z**2).sum(1)
    grid = np.linspace(0, np.quantile(r2, 0.995), 200)
    axes[0].hist(r2, bins=60, density=True, alpha=0.6, range=(0, grid[-1]))
    axes[0].plot(grid, stats.chi2(d).pdf(grid), "k", lw=1.2, label=f"chi-square({d})")
    axes[0].set(xlabel="||z||^2", title=f"KS {cov['ks']:.3f} (p={cov['ks_pvalue']:.2g})")
    axes[0].legend(fontsize=8)
    if d == 2:
        angle = np.linspace(0, 2 * np.pi, 200)
        axes[1].scatter(*z.T, s=2, alpha=0.4, linewidths=0)
        for level, got in zip(levels, cov["coverage"]):
            r = np.sqrt(stats.chi2.ppf(level, 2))
            axes[1].plot(r * np.cos(angle), r * np.sin(angle), color="k", lw=0.7)
            axes[1].annotate(f"{level:.0%}: {got:.1%}", (r * 0.71, r * 0.71), fontsize=7)
        axes[1].set(aspect="equal", title="latent z, chi-square regions (nominal: observed)")
    else:
        g = np.linspace(-4, 4, 200)
        for i, ax in enumerate(axes[1:]):
            ax.hist(z[:, i], bins=60, density=True, alpha=0.6, range=(-4, 4))
            ax.plot(g, stats.norm.pdf(g), "k", lw=1.2)
            ax.set(xlabel=f"z[{i}]", title="against N(0, 1)")
    written.append(out_dir / "latent.png")
    save_png(fig, written[-1])

    if "regions" in report and x is not None:
        reg = report["regions"]
        x = as_numpy(x)
        if x.shape[1] == 2:
            fig = Figure(figsize=(5.4, 5), constrained_layout=True)
            ax = fig.subplots()
            ax.scatter(*x.T, s=2, alpha=0.4, color="0.5", linewidths=0)
            for k, (level, b) in enumerate(zip(levels, reg["boundaries"])):
                bb = np.vstack([b, b[:1]])
                ax.plot(*bb.T, color=matplotlib.colormaps["viridis"](k / len(levels)), lw=1.2,
                        label=f"{level:.0%}: {reg['inside'][k]:.1%} inside")
            ax.set(aspect="equal", title="decoded latent chi-square regions")
            ax.legend(fontsize=8, loc="lower right")
        else:
            fig = Figure(figsize=(11, 5), constrained_layout=True)
            count = reg["regions_containing"]
            for j, k in enumerate((0, 2)):  # the 50 % and 90 % regions, one panel each
                ax = fig.add_subplot(1, 2, j + 1, projection="3d")
                verts, faces = reg["boundaries"][k]
                ax.plot_trisurf(*verts.T, triangles=faces, alpha=0.12, color="C0",
                                edgecolor="none")
                within = count >= len(levels) - k
                ax.scatter(*x[within].T, s=1, color="C2", alpha=0.5,
                           label=f"inside: {reg['inside'][k]:.1%}")
                ax.scatter(*x[~within].T, s=1, color="C3", alpha=0.5, label="outside")
                ax.set_title(f"decoded {levels[k]:.0%} region (nominal {levels[k]:.0%})")
                ax.legend(fontsize=8, loc="lower right", markerscale=6)
        written.append(out_dir / "regions.png")
        save_png(fig, written[-1])
    return written
