"""The held-out certificate: a trained flow measures its own calibration on data it never saw.

:meth:`~pyro_inflow.InflationaryFlow.fit` keeps a held-out split (``validation_fraction``).
After training it encodes those points plus the flow's ``t = 0`` noise with the prior's own
solver (``warped_rk4``, 12 steps) and stores the latent coverage as ``flow.certificate``; the
flow file carries it. The same check on as many *training* points shows overfitting: a flow
that memorized its training points encodes them closer to the origin than new ones.

When the check fails, ``fit`` recalibrates the latent on the same points
(:func:`recalibrate_latent`: a radial map, :mod:`pyro_inflow.radial`) and the certificate then
describes the recalibrated flow, its coverage *cross-fitted* (each half of the points judged
by a map fitted on the other half, so no point judges a map it fitted), with the check before
it kept under ``"recalibration"``. A flow whose certificate still fails warns once when it is
trained and once when it first becomes a prior (:class:`~pyro_inflow.InflationaryFlowPrior`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..radial import fit_radial_map
from ..solvers import SolverError
from .coverage import FLAG_SIGMAS, LEVELS, latent_coverage

if TYPE_CHECKING:  # calibration sits above the flow and never imports it at run time
    from ..flow import InflationaryFlow

__all__ = ["holdout_certificate", "recalibrate_latent", "certificate_table",
           "warn_failed_certificate", "check_certificate", "CERTIFICATE_SOLVER",
           "MAX_CERTIFICATE_POINTS"]

#: The solver of the check: the prior's default grid (what inference will use).
CERTIFICATE_SOLVER = {"method": "warped_rk4", "num_steps": 12}
#: Where that grid's error estimate is over its tolerance for this flow: the adaptive solver.
FALLBACK_SOLVER = {"method": "dopri5", "rtol": 1e-5}
#: At most this many held-out (and training) points are encoded for the certificate.
MAX_CERTIFICATE_POINTS = 10_000


def _latents_of(flow: InflationaryFlow, x: torch.Tensor, seed: int,
                solver: dict) -> tuple[torch.Tensor, dict]:
    """Latents of ``x`` plus ``t = 0`` noise; the prior's grid, or ``dopri5`` where that grid
    is too coarse for this flow (the returned solver says which)."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
    xn = flow.add_t0_noise(x, generator=gen)
    with torch.no_grad():
        try:
            z = flow.encode(xn, **solver)
        except SolverError:
            solver = FALLBACK_SOLVER
            z = flow.encode(xn, **solver)
    return z, solver


#: What a certificate keeps of :func:`~pyro_inflow.calibration.latent_coverage`.
_CHECK_KEYS = ("levels", "coverage", "stderr", "z", "max_abs_error", "ks", "ks_pvalue",
               "verdict", "n", "d")


def holdout_certificate(flow: InflationaryFlow, heldout: torch.Tensor,
                        train: torch.Tensor | None = None, *, seed: int = 0) -> dict:
    """The latent coverage of held-out points, and of as many training points.

    Args:
        flow: a trained flow.
        heldout: held-out points ``(m, D)`` (at most :data:`MAX_CERTIFICATE_POINTS` are used).
        train: training points ``(n, D)``; the first ``m`` (same cap) are checked the same way.
        seed: seed of the ``t = 0`` noise.

    Returns:
        A JSON-ready dict: ``levels``, ``coverage``, ``stderr``, ``z``, ``max_abs_error``,
        ``ks``, ``ks_pvalue``, ``verdict`` and ``n`` of the held-out points (as
        :func:`~pyro_inflow.calibration.latent_coverage`), ``passed`` (the verdict is
        ``"calibrated"``: no level is more than ``FLAG_SIGMAS`` standard errors off),
        ``train_coverage`` and ``overfit_gap`` (mean over levels of training minus held-out
        coverage; near 0 for a flow that generalizes, positive when it memorized its
        training points), and the ``solver``: the prior's default grid, or ``dopri5`` with a
        ``note`` when that grid's error estimate is over its tolerance for this flow.
    """
    return _certify(flow, heldout, train, seed)[0]


def _certify(flow: InflationaryFlow, heldout: torch.Tensor, train: torch.Tensor | None,
             seed: int) -> tuple[dict, torch.Tensor]:
    """:func:`holdout_certificate` and the held-out latents it judged ``(m, d)`` (which
    :func:`recalibrate_latent` fits on, without a second encode)."""
    heldout = flow.check_points(heldout, "heldout")[:MAX_CERTIFICATE_POINTS]
    z, solver = _latents_of(flow, heldout, seed, CERTIFICATE_SOLVER)
    cov = latent_coverage(z, LEVELS)
    cert = {k: cov[k] for k in _CHECK_KEYS}
    cert["passed"] = cov["verdict"] == "calibrated"
    cert["solver"] = dict(solver) if solver is CERTIFICATE_SOLVER else {
        **solver, "note": "the prior's default grid (warped_rk4, 12 steps) is too coarse for "
                          "this flow"}
    if train is not None:
        train = flow.check_points(train, "train")[:len(heldout)]
        tr = latent_coverage(_latents_of(flow, train, seed + 1, solver)[0], LEVELS)
        cert["train_coverage"] = tr["coverage"]
        cert["overfit_gap"] = float(np.mean(np.subtract(tr["coverage"], cov["coverage"])))
    return cert, z


def recalibrate_latent(flow: InflationaryFlow, z: torch.Tensor, cert: dict) -> dict:
    """Give ``flow`` a radial map of its latent fitted on ``z``, the held-out latents of
    ``cert`` (a failed check), and return the recalibrated flow's certificate.

    The map (:func:`~pyro_inflow.radial.fit_radial_map`) makes the spread of the held-out
    points' squared latent radii chi-square(d)'s. The returned certificate's coverage is
    cross-fitted: the even-numbered points are judged by a map fitted on the odd-numbered ones
    and the other way round. ``cert["recalibration"]`` keeps the map (``c``, ``b``, ``s``,
    ``dim``) and the check ``before`` it; where no map fits (too few points, or a spread out
    of the family's reach) the flow is left alone and ``cert`` comes back with
    ``"recalibration": {"applied": False, "reason": ...}``.

    Args:
        flow: a flow without a radial map.
        z: the latents ``(m, d)`` ``cert`` judged (the held-out points plus ``t = 0`` noise,
            encoded by ``flow`` as it is).
        cert: their certificate (:func:`holdout_certificate`).
    """
    if flow.radial is not None:
        raise ValueError("recalibrate_latent: this flow's latent is already recalibrated")
    z = torch.as_tensor(z).detach().cpu().double()  # (m, d): small, fitted on the CPU
    r2, d = z.square().sum(-1), z.shape[-1]
    even = torch.arange(len(z)) % 2 == 0
    try:
        crossed = torch.cat([fit_radial_map(r2[fit], d, dtype=torch.float64)(z[judge])
                             for fit, judge in ((even, ~even), (~even, even))])
        radial = fit_radial_map(r2, d, dtype=flow.dtype)
    except ValueError as err:
        return {**cert, "recalibration": {"applied": False, "reason": str(err)}}
    flow.radial = radial.to(flow.device)
    cov = latent_coverage(crossed, LEVELS)
    before = {k: cert[k] for k in _CHECK_KEYS}
    return {**cert, **{k: cov[k] for k in _CHECK_KEYS if k != "n"},
            "passed": cov["verdict"] == "calibrated",
            "recalibration": {"applied": True, **radial.config(), "before": before}}


def check_certificate(cert: object) -> dict | None:
    """A certificate read from a file, checked: ``None`` stays ``None``.

    Raises:
        ValueError: anything else than a certificate of this module's shape (what a flow file
            that is corrupt, or not ours, might hold), so that no later use can fail on it.
    """
    if cert is None:
        return None
    lists = ("levels", "coverage", "stderr", "z")
    try:
        ok = (isinstance(cert, dict) and isinstance(cert["passed"], bool)
              and isinstance(cert["verdict"], str) and isinstance(cert["n"], int)
              and isinstance(cert["max_abs_error"], float)
              and all(isinstance(cert[k], list) and len(cert[k]) == len(cert["levels"]) > 0
                      and all(isinstance(v, float) for v in cert[k]) for k in lists))
        recal = cert.get("recalibration")
        ok = ok and (recal is None or (isinstance(recal, dict)
                                       and isinstance(recal.get("applied"), bool)))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError("certificate: not a held-out certificate of pyro_inflow")
    return cert


def certificate_table(cert: dict) -> str:
    """A readable table of a certificate (what ``pyro-inflow train`` and ``calibrate`` print)."""
    train = cert.get("train_coverage")
    recalibrated = (cert.get("recalibration") or {}).get("applied")
    # after a recalibration, the training column is the flow's before it ("raw")
    lines = [f"{'level':>6}{'held-out':>10}{'s.e.':>8}{'z':>7}"
             + (f"{'raw train' if recalibrated else 'training':>10}"
                if train else "")]
    for k, level in enumerate(cert["levels"]):
        row = (f"{level:>6.2f}{cert['coverage'][k]:>10.4f}{cert['stderr'][k]:>8.4f}"
               f"{cert['z'][k]:>7.1f}")
        lines.append(row + (f"{train[k]:>10.4f}" if train else ""))
    lines.append(certificate_summary(cert))
    return "\n".join(lines)


def certificate_summary(cert: dict) -> str:
    """One line: verdict, largest error, number of points, overfitting gap."""
    gap = cert.get("overfit_gap")
    gap_text = "" if gap is None else f", training minus held-out coverage {gap:+.3f}"
    verdict = "passed" if cert["passed"] else f"FAILED ({cert['verdict']})"
    recal = cert.get("recalibration") or {}
    recal_text = ("" if not recal.get("applied") else
                  f"; after a radial recalibration of the latent on these points, cross-fitted "
                  f"(before it: {recal['before']['verdict']}, "
                  f"{recal['before']['max_abs_error']:.3f})")
    return (f"held-out certificate: {verdict}, largest |coverage - nominal| "
            f"{cert['max_abs_error']:.3f} on {cert['n']:,} held-out points (flagged past "
            f"{FLAG_SIGMAS:g} s.e.){recal_text}{gap_text}")


def warn_failed_certificate(flow: InflationaryFlow, where: str) -> None:
    """Warn when ``flow``'s certificate failed: once per flow object and ``where`` (``"fit"``
    or ``"prior"``; a model builds its prior at every call, so this stays cheap)."""
    cert = getattr(flow, "certificate", None)
    if not cert or cert["passed"]:
        return
    warned = flow.__dict__.setdefault("_certificate_warned", set())
    if where in warned:
        return
    warned.add(where)
    worst = int(np.argmax(np.abs(cert["z"])))
    direction = ("held-out points fall outside its regions too often: the prior is too narrow"
                 if cert["verdict"] == "under-covers" else
                 "held-out points fall inside its regions too often: the prior is too wide")
    recal = " (after recalibrating its latent there)" if (
        cert.get("recalibration") or {}).get("applied") else ""
    warnings.warn(
        f"{where}: this flow failed its held-out calibration check{recal} ({cert['verdict']}: "
        f"{cert['coverage'][worst]:.3f} of {cert['n']} held-out points inside the "
        f"{cert['levels'][worst]:.0%} region); {direction}. Train on more samples, or a "
        f"smaller network (hidden=64, depth=2) with early stopping (patience=4, the default); "
        f"print(pyro_inflow.calibration.certificate_table(flow.certificate)) shows the check",
        RuntimeWarning, stacklevel=3)
