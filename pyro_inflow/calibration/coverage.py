"""Coverage: do latents, or posterior intervals, hold their nominal probability?

* :func:`latent_coverage`: the share of latents inside the chi-square(d) regions;
* :func:`interval_coverage`: how often central posterior intervals contain the truth;
* :func:`roundtrip_error`: ``x - decode(encode(x))`` of a flow, in data units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

if TYPE_CHECKING:  # calibration sits above the flow and never imports it at run time
    from ..flow import InflationaryFlow

__all__ = ["LEVELS", "FLAG_SIGMAS", "latent_coverage", "interval_coverage", "roundtrip_error",
           "coverage_verdict", "error_norms", "check_levels", "as_numpy"]


#: Nominal levels of the chi-square credible regions used throughout.
LEVELS = (0.5, 0.68, 0.9, 0.95, 0.99)

#: A level's coverage is flagged when it is this many binomial standard errors off nominal.
FLAG_SIGMAS = 3.0


def as_numpy(x: object) -> np.ndarray:
    """``x`` (a tensor or array-like) as a float64 NumPy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def check_levels(levels: Sequence[float] | np.ndarray) -> np.ndarray:
    """``levels`` as a flat float64 array, each in ``(0, 1)``.

    Raises:
        ValueError: no levels, or a level outside ``(0, 1)`` or NaN.
    """
    levels = np.asarray(levels, dtype=np.float64).reshape(-1)
    if levels.size == 0 or ((levels <= 0) | (levels >= 1)).any() or np.isnan(levels).any():
        raise ValueError(f"levels: expected values in (0, 1), got {levels.tolist()}")
    return levels


def coverage_verdict(coverage: Sequence[float] | np.ndarray, levels: Sequence[float] | np.ndarray,
                     n: int) -> tuple[str, list[float]]:
    """``("calibrated" | "under-covers" | "over-covers", z-scores)`` of observed coverage.

    A level is off when ``|coverage - level|`` passes :data:`FLAG_SIGMAS` binomial standard
    errors ``sqrt(level (1 - level) / n)``; the verdict names the direction of the largest
    z-score among the off levels. For latents, *under-covers* means the points spread wider
    than ``N(0, I)`` (over-dispersed); for posteriors, intervals that are too narrow
    (overconfident).
    """
    cover, levels = np.asarray(coverage, float), np.asarray(levels, float)
    z = (cover - levels) / np.sqrt(levels * (1 - levels) / n)
    worst = int(np.argmax(np.abs(z)))
    if abs(z[worst]) <= FLAG_SIGMAS:
        return "calibrated", z.tolist()
    return ("under-covers" if z[worst] < 0 else "over-covers"), z.tolist()


def latent_coverage(z: torch.Tensor | np.ndarray, levels: Sequence[float] = LEVELS) -> dict:
    """Fraction of latents inside the chi-square(d) regions ``||z||^2 <= q_level``.

    Args:
        z: latents ``(n, d)`` (tensor or array-like), ideally ``N(0, I_d)``.
        levels: nominal coverage levels in ``(0, 1)``.

    Returns:
        ``{"levels", "coverage", "stderr", "z", "max_abs_error", "ks", "ks_pvalue", "verdict",
        "n", "d"}``: observed coverage per level with its binomial standard error
        ``sqrt(p (1 - p) / n)`` at the nominal ``p`` and its z-score, the largest
        ``|coverage - level|``, the Kolmogorov-Smirnov statistic (and p-value) of ``||z||^2``
        against chi-square(d), and a verdict (see :func:`coverage_verdict`): ``"calibrated"``,
        ``"under-covers"`` (latents over-dispersed) or ``"over-covers"`` (under-dispersed).
    """
    z = as_numpy(z)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z: expected shape (n, d) with n >= 1, got {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("z: contains NaN or Inf")
    levels = check_levels(levels)
    n, d = z.shape
    r2 = (z**2).sum(1)
    cover = np.array([(r2 <= stats.chi2.ppf(p, d)).mean() for p in levels])
    verdict, zs = coverage_verdict(cover, levels, n)
    ks = stats.kstest(r2, stats.chi2(d).cdf)
    return {
        "levels": levels.tolist(),
        "coverage": cover.tolist(),
        "stderr": np.sqrt(levels * (1 - levels) / n).tolist(),
        "z": zs,
        "max_abs_error": float(np.abs(cover - levels).max()),
        "ks": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "verdict": verdict,
        "n": n,
        "d": d,
    }


def error_norms(x: torch.Tensor | np.ndarray, x_back: torch.Tensor | np.ndarray) -> dict:
    """Distances ``||x - x_back||`` per point ``(n, D)``: RMS, median and max."""
    x = torch.as_tensor(x, dtype=torch.float64)
    err = (x - torch.as_tensor(x_back, dtype=torch.float64)).norm(dim=-1)
    return {"rms": float(err.square().mean().sqrt()), "median": float(err.median()),
            "max": float(err.max())}


def interval_coverage(draws: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                      level: float = 0.9) -> dict:
    """How often central posterior intervals contain the true values.

    Args:
        draws: posterior draws ``(S, *shape)`` (tensor or array-like), e.g. ``(S, K, D)``
            pixels of ``K`` images.
        truth: the true values ``(*shape)`` (tensor or array-like).
        level: probability of the central interval, between the ``(1 - level) / 2`` and
            ``(1 + level) / 2`` quantiles of the draws of each value.

    Returns:
        ``{"level", "inside", "coverage", "stderr", "width"}``: ``inside`` is a boolean array
        ``(*shape)``, ``coverage`` its mean with the binomial standard error (independent
        values assumed), ``width`` the mean interval width. A calibrated posterior covers
        about ``level``; an overconfident one (e.g. mean-field VI) less.
    """
    d, t = as_numpy(draws).astype(np.float64), as_numpy(truth).astype(np.float64)
    if d.ndim < 1 or d.shape[1:] != t.shape or d.shape[0] < 2:
        raise ValueError(f"interval_coverage: expected draws (S >= 2, *shape) and truth "
                         f"(*shape), got {d.shape} and {t.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2], axis=0)
    inside = (t >= lo) & (t <= hi)
    n = max(inside.size, 1)
    cov = float(inside.mean())
    return {"level": level, "inside": inside, "coverage": cov,
            "stderr": float(np.sqrt(cov * (1 - cov) / n)), "width": float((hi - lo).mean())}


def roundtrip_error(flow: InflationaryFlow, x: torch.Tensor | np.ndarray,
                    **solver: object) -> dict:
    """Encode ``x`` ``(n, D)`` and decode it back: ``||x - decode(encode(x))||`` in data units.

    For a PR-reducing flow this is the distance to the learned manifold (the reconstruction
    error), which includes the compressed directions' variance.

    Args:
        flow: an :class:`~pyro_inflow.InflationaryFlow`.
        x: points ``(n, D)``.
        **solver: solver options of both solves.

    Returns:
        ``{"rms", "median", "max"}`` over the points.
    """
    x = flow.check_points(x)
    with torch.no_grad():
        back = flow.decode(flow.encode(x, **solver), **solver)
    return error_norms(x, back)
