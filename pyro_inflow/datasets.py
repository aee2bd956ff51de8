"""Seeded toy data sets, generated here (no download, no scikit-learn).

The generators follow the paper's toy experiments (scikit-learn's ``make_*`` recipes with the
authors' noise levels), but draw i.i.d. points (random angles rather than an even grid), so
that two seeds give independent samples of the same distribution. Each set is standardized
with the *distribution's* per-column mean and standard deviation (estimated once from
``2**20`` draws with a fixed seed), not the sample's own, so held-out draws share the
training draws' coordinates.

============  ===  ==========================================================
name           D   recipe
============  ===  ==========================================================
circles        2   two circles, radii 1 and 0.5, Gaussian noise 0.08
moons          2   two interleaved half circles, Gaussian noise 0.08
sine           2   ``y = sin(4 pi x) / 4 + N(0, 0.15^2)``, ``x ~ U(-1, 1)``
s_curve        3   the S-shaped surface, Gaussian noise 0.2
swiss_roll     3   the rolled sheet, Gaussian noise 1.25
============  ===  ==========================================================
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from ._validation import check_positive_int

__all__ = ["load", "NAMES"]


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(rng.random(n) < 0.5, 1.0, 0.5)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x + rng.normal(0, 0.08, x.shape)


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.uniform(0, np.pi, n)
    lower = rng.random(n) < 0.5
    x = np.stack([np.where(lower, 1 - np.cos(angle), np.cos(angle)),
                  np.where(lower, 0.5 - np.sin(angle), np.sin(angle))], axis=1)
    return x + rng.normal(0, 0.08, x.shape)


def _sine(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.uniform(-1, 1, n)
    return np.stack([x, np.sin(4 * np.pi * x) / 4 + rng.normal(0, 0.15, n)], axis=1)


def _s_curve(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 3 * np.pi * (rng.random(n) - 0.5)
    x = np.stack([np.sin(t), 2 * rng.random(n), np.sign(t) * (np.cos(t) - 1)], axis=1)
    return x + rng.normal(0, 0.2, x.shape)


def _swiss_roll(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), 21 * rng.random(n), t * np.sin(t)], axis=1)
    return x + rng.normal(0, 1.25, x.shape)


_GENERATORS = {
    "circles": _circles,
    "moons": _moons,
    "sine": _sine,
    "s_curve": _s_curve,
    "swiss_roll": _swiss_roll,
}
NAMES = tuple(_GENERATORS)


@cache
def _standardization(name: str) -> tuple[np.ndarray, np.ndarray]:
    ref = _GENERATORS[name](np.random.default_rng(20240711), 2**20)
    return ref.mean(0), ref.std(0)


def load(
    name: str, n: int = 20_000, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` i.i.d. standardized samples ``(n, D)`` of a toy data set.

    Args:
        name: one of ``NAMES``: circles, moons, sine (2-D); s_curve, swiss_roll (3-D).
        n: number of points.
        seed: random seed; different seeds give independent samples.
        dtype: floating dtype of the result.

    Example:
        >>> load("moons", n=3, seed=0).shape
        torch.Size([3, 2])
    """
    if name not in _GENERATORS:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    n = check_positive_int(n, "n")
    mean, std = _standardization(name)
    x = (_GENERATORS[name](np.random.default_rng(seed), n) - mean) / std
    return torch.as_tensor(x, dtype=dtype)
