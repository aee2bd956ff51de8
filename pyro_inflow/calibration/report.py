"""The flow report: everything ``pyro-inflow calibrate`` says about a flow on held-out data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .coverage import LEVELS, as_numpy, error_norms, latent_coverage
from .regions import credible_regions

if TYPE_CHECKING:  # calibration sits above the flow and never imports it at run time
    from ..flow import InflationaryFlow

__all__ = ["flow_calibration", "identifiability", "calibration_table", "report_json"]


def flow_calibration(flow: InflationaryFlow, x: torch.Tensor | np.ndarray,
                     levels: Sequence[float] = LEVELS, *, regions: bool = True,
                     noise: bool = True, seed: int = 0, **solver: object) -> dict:
    """Everything :command:`pyro-inflow calibrate` reports about a flow on held-out data.

    Args:
        flow: an :class:`~pyro_inflow.InflationaryFlow`.
        x: held-out data ``(n, D)`` (tensor or array-like), not used in training.
        levels: nominal levels of the chi-square regions.
        regions: add :func:`credible_regions` when the flow is PR-preserving with ``D <= 3``.
        noise: check the points plus the flow's ``t = 0`` noise
            (:meth:`~pyro_inflow.InflationaryFlow.add_t0_noise`, seeded by ``seed``), which is
            the distribution the flow transports. Without it, directions whose variance is
            close to ``gamma0`` (dequantized pixels) encode too close to the origin and the
            coverage reads too high; on the 2-D and 3-D toys it changes nothing visible.
        seed: seed of the noise.
        **solver: solver options for encode and decode (default: the flow's).

    Returns:
        ``{"flow", "coverage", "roundtrip" | "reconstruction", "solver", "regions"?}``;
        ``"roundtrip"`` (PR-preserving) is ``||x - decode(encode(x))||`` in data units,
        ``"reconstruction"`` (PR-reducing) the same distance to the learned manifold, which
        includes the compressed dimensions' variance. ``"solver"`` names method, tolerances
        and evaluations of the encode. ``"z"`` holds the latents ``(n, d)``.
    """
    x = flow.check_points(x)
    if noise:
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
        x = flow.add_t0_noise(x, generator=gen)
    with torch.no_grad():
        z, enc = flow.encode(x, return_info=True, **solver)
        back, dec = flow.decode(z, return_info=True, **solver)
    prr = flow.latent_dim < flow.dim
    report = {
        "flow": {"dim": flow.dim, "latent_dim": flow.latent_dim,
                 "schedule": "prr" if prr else "prp"},
        "coverage": latent_coverage(z, levels),
        ("reconstruction" if prr else "roundtrip"): error_norms(x, back),
        "solver": {"method": enc.method, "rtol": enc.rtol, "atol": enc.atol,
                   "encode_nfe": enc.nfe, "decode_nfe": dec.nfe,
                   "error_estimate": max(e for e in (enc.error, dec.error, 0.0)
                                         if e is not None)},
        "z": z,
        "noise": bool(noise),
    }
    if regions and not prr and flow.dim in (2, 3):
        report["regions"] = credible_regions(flow, x, levels, **solver)
    return report


def identifiability(flow_a: InflationaryFlow, flow_b: InflationaryFlow,
                    x: torch.Tensor | np.ndarray, **solver: object) -> dict:
    """How far apart two flows' latents are on the same points (e.g. two training seeds).

    Args:
        flow_a: a flow.
        flow_b: a flow of the same data dimension and latent dimension.
        x: points ``(n, D)`` (tensor or array-like), ideally held out from both trainings.
        **solver: solver options of both encodes.

    Returns:
        ``{"rms_diff", "latent_scale", "relative", "correlation", "n"}``: the RMS over points
        and coordinates of ``z_a - z_b``, the RMS of the latents themselves (about 1), their
        ratio (the figure to compare with 0.05), and the per-coordinate correlation.
    """
    if (flow_a.dim, flow_a.latent_dim) != (flow_b.dim, flow_b.latent_dim):
        raise ValueError(f"identifiability: flows map {flow_a.dim}->{flow_a.latent_dim} and "
                         f"{flow_b.dim}->{flow_b.latent_dim} dimensions; they must match")
    with torch.no_grad():
        za = as_numpy(flow_a.encode(flow_a.check_points(x), **solver))
        zb = as_numpy(flow_b.encode(flow_b.check_points(x), **solver))
    rms = float(np.sqrt(((za - zb) ** 2).mean()))
    scale = float(np.sqrt((0.5 * (za**2 + zb**2)).mean()))
    corr = [float(np.corrcoef(za[:, i], zb[:, i])[0, 1]) for i in range(za.shape[1])]
    return {"rms_diff": rms, "latent_scale": scale, "relative": rms / scale,
            "correlation": corr, "n": len(za)}


def calibration_table(report: dict) -> str:
    """A readable table of a :func:`flow_calibration` report (what ``calibrate`` prints)."""
    cov, sol, f = report["coverage"], report["solver"], report["flow"]
    reg = report.get("regions")
    lines = [f"solver: {sol['method']} (rtol {sol['rtol']:g}, atol {sol['atol']:g}), "
             f"{sol['encode_nfe']} evaluations to encode, {sol['decode_nfe']} to decode",
             "points: the held-out data plus the flow's t = 0 noise N(0, gamma0), the "
             "distribution it transports" if report.get("noise") else "points: the held-out "
             "data as given (no t = 0 noise)",
             "",
             f"{'level':>6}{'latent coverage':>17}{'s.e.':>8}{'z':>7}"
             + (f"{'data-space regions':>20}{'z':>7}" if reg else "")]
    for k, level in enumerate(cov["levels"]):
        row = (f"{level:>6.2f}{cov['coverage'][k]:>17.4f}{cov['stderr'][k]:>8.4f}"
               f"{cov['z'][k]:>7.1f}")
        if reg:
            row += f"{reg['inside'][k]:>20.4f}{reg['z'][k]:>7.1f}"
        lines.append(row)
    lines.append(f"latent ({cov['n']:,} points, d={cov['d']}): {cov['verdict']}, largest "
                 f"|coverage - nominal| {cov['max_abs_error']:.4f}, KS {cov['ks']:.4f} "
                 f"(p={cov['ks_pvalue']:.2g})")
    if reg:
        lines.append(f"data-space regions ({reg['method']}): {reg['verdict']}, largest "
                     f"|inside - nominal| {reg['max_abs_error']:.4f}")
    key = "reconstruction" if f["schedule"] == "prr" else "roundtrip"
    rt = report[key]
    what = ("reconstruction |x - decode(encode(x))| (distance to the learned manifold)"
            if key == "reconstruction" else "roundtrip |x - decode(encode(x))|")
    lines.append(f"{what}: rms {rt['rms']:.2e}, median {rt['median']:.2e}, "
                 f"max {rt['max']:.2e} (data units)")
    if "identifiability" in report:
        idf = report["identifiability"]
        corr = ", ".join(f"{c:.4f}" for c in idf["correlation"])
        lines.append(f"identifiability vs the second flow: RMS latent difference "
                     f"{idf['relative']:.4f} of the latent scale (correlation per coordinate "
                     f"{corr})")
    return "\n".join(lines)


def report_json(report: dict) -> dict:
    """The JSON-ready part of a :func:`flow_calibration` report (no latents, no meshes)."""
    out = {k: v for k, v in report.items() if k != "z"}
    if "regions" in out:
        out["regions"] = {k: v for k, v in out["regions"].items()
                          if k not in ("boundaries", "regions_containing")}
    return out


