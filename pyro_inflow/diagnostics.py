"""Calibration diagnostics. All ArviZ calls of the package live in this module."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

__all__ = ["LEVELS", "latent_coverage", "roundtrip_error"]

#: Nominal levels of the chi-square credible regions used throughout.
LEVELS = (0.5, 0.68, 0.9, 0.95, 0.99)


def latent_coverage(z, levels: Sequence[float] = LEVELS) -> dict:
    """Fraction of latents inside the chi-square(d) regions ``||z||^2 <= q_level``.

    Args:
        z: latents ``(n, d)``, ideally ``N(0, I_d)``.
        levels: nominal coverage levels in ``(0, 1)``.

    Returns:
        ``{"levels", "coverage", "stderr", "max_abs_error", "ks", "n", "d"}``: observed
        coverage per level with its binomial standard error ``sqrt(p (1 - p) / n)`` at the
        nominal ``p``, the largest ``|coverage - level|``, and the Kolmogorov-Smirnov statistic
        of ``||z||^2`` against chi-square(d).
    """
    z = np.asarray(z.detach().cpu() if isinstance(z, torch.Tensor) else z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z: expected shape (n, d) with n >= 1, got {z.shape}")
    levels = np.asarray(levels, dtype=np.float64)
    if ((levels <= 0) | (levels >= 1)).any():
        raise ValueError(f"levels: expected values in (0, 1), got {levels.tolist()}")
    n, d = z.shape
    r2 = (z**2).sum(1)
    cover = np.array([(r2 <= stats.chi2.ppf(p, d)).mean() for p in levels])
    return {
        "levels": levels.tolist(),
        "coverage": cover.tolist(),
        "stderr": np.sqrt(levels * (1 - levels) / n).tolist(),
        "max_abs_error": float(np.abs(cover - levels).max()),
        "ks": float(stats.kstest(r2, stats.chi2(d).cdf).statistic),
        "n": n,
        "d": d,
    }


def roundtrip_error(x, x_back) -> dict:
    """Roundtrip error ``||x - decode(encode(x))||`` in data units: RMS, median and max."""
    x = torch.as_tensor(x, dtype=torch.float64)
    err = (x - torch.as_tensor(x_back, dtype=torch.float64)).norm(dim=-1)
    return {"rms": float(err.square().mean().sqrt()), "median": float(err.median()),
            "max": float(err.max())}
