"""Seeded toy data sets, generated here (no download), and the 8x8 digits shipped with scikit-learn.

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
digits        64   scikit-learn's 1,797 8x8 handwritten digits (optional extra)
============  ===  ==========================================================

``digits`` are real data: the images that ship inside scikit-learn (``pip install
"pyro-inflow[digits]"``; nothing is downloaded). Pixels are integers 0..16; each is
dequantized with uniform noise and scaled to ``[0, 1)``: ``(pixel + U(0, 1)) / 17``, which
gives the data a density (and the three always-blank corner pixels a variance). ``seed``
permutes the images, so slices of one call are disjoint (train on ``x[:1500]``, hold out
``x[1500:]``).
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
NAMES = (*_GENERATORS, "digits")
DIGITS = 1797


def _digits(n: int, seed: int) -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError('load("digits") needs scikit-learn, which ships the images: '
                          'pip install "pyro-inflow[digits]"') from e
    if n > DIGITS:
        raise ValueError(f"n: digits has {DIGITS} images, got n={n}")
    rng = np.random.default_rng(seed)
    pixels = load_digits().data[rng.permutation(DIGITS)[:n]]
    return (pixels + rng.random(pixels.shape)) / 17.0


@cache
def _standardization(name: str) -> tuple[np.ndarray, np.ndarray]:
    ref = _GENERATORS[name](np.random.default_rng(20240711), 2**20)
    return ref.mean(0), ref.std(0)


def load(
    name: str, n: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` samples ``(n, D)`` of a data set: standardized toys, or dequantized digits.

    Args:
        name: one of ``NAMES``: circles, moons, sine (2-D); s_curve, swiss_roll (3-D);
            digits (64-D, needs scikit-learn).
        n: number of points (default 20,000 for the toys, all 1,797 images for digits).
        seed: random seed; different seeds give independent toy samples; for digits it
            permutes the images and draws the dequantization noise.
        dtype: floating dtype of the result.

    Example:
        >>> load("moons", n=3, seed=0).shape
        torch.Size([3, 2])
    """
    if name not in NAMES:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    if name == "digits":
        n = check_positive_int(DIGITS if n is None else n, "n")
        return torch.as_tensor(_digits(n, seed), dtype=dtype)
    n = check_positive_int(20_000 if n is None else n, "n")
    mean, std = _standardization(name)
    x = (_GENERATORS[name](np.random.default_rng(seed), n) - mean) / std
    return torch.as_tensor(x, dtype=dtype)
