"""The data's eigen-basis: ``u = W^T (x - mean) / scale`` with ``cov(u) = diag(lam)``."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ._validation import check_data

__all__ = ["EigenBasis", "ledoit_wolf"]

#: An eigenvector's sign is fixed by its first entry of at least this fraction of its largest.
SIGN_PIVOT = 0.5


def _signs(evecs: Tensor) -> Tensor:
    """``+-1`` per column: the first entry with ``|w_j| >= SIGN_PIVOT max |w|`` is positive.

    Not simply the largest entry: standardized 2-D data have eigenvectors at exactly 45 degrees,
    whose two entries tie in magnitude, and which of them wins then changes with the sample
    (two training seeds gave opposite latents). A tie at the threshold is far less likely.
    """
    mag = evecs.abs()
    pivot = (mag >= SIGN_PIVOT * mag.amax(dim=0, keepdim=True)).int().argmax(dim=0)
    return torch.sign(evecs[pivot, torch.arange(evecs.shape[1])])


def ledoit_wolf(xc: Tensor) -> float:
    """The Ledoit-Wolf (2004) shrinkage weight of centered samples ``xc (n, D)``.

    The weight ``a`` in ``[0, 1]`` that minimizes the expected Frobenius error of
    ``(1 - a) S + a mu I`` (``S`` the maximum-likelihood covariance, ``mu = tr S / D``),
    estimated from the data.
    """
    n, D = xc.shape
    S = xc.T @ xc / n
    mu = S.diagonal().mean()
    delta = (S - mu * torch.eye(D, dtype=S.dtype)).square().sum() / D
    # (1/n^2) sum_k ||x_k x_k^T - S||_F^2 / D, without forming the n outer products
    beta = ((xc.square().sum(1).square().sum() / n - S.square().sum()) / n) / D
    return float((torch.minimum(beta, delta) / delta).clamp(0, 1)) if delta > 0 else 1.0


#: Eigenvalues below this fraction of the largest are raised to it (a documented floor).
EIGENVALUE_FLOOR = 1e-6


class EigenBasis(nn.Module):
    r"""Affine map between data ``x`` and eigen-coordinates ``u``.

    ``cov(x) = scale^2 W diag(lam) W^T`` with ``lam`` descending and ``lam[0] == 1`` (one global
    scale keeps the relative variances). In each column of ``W`` the first entry of at least
    half the column's largest magnitude is positive, which makes the basis unique for distinct
    eigenvalues and stable under resampling (see ``_signs``).

    Eigenvalues below ``EIGENVALUE_FLOOR`` (``1e-6`` of the largest, i.e. a standard deviation
    of ``1e-3`` of the top direction) are raised to the floor with a warning, so a
    (nearly) zero-variance direction never produces NaN; a data set with no variance at all is
    an error.

    Args:
        mean: ``(D,)``. W: ``(D, D)`` orthogonal. lam: ``(D,)``. scale: ``()`` positive.

    Example:
        >>> x = torch.randn(1000, 2, dtype=torch.float64) * torch.tensor([3.0, 0.5])
        >>> basis = EigenBasis.from_data(x)
        >>> u = basis.to_eigen(x)
        >>> torch.allclose(basis.from_eigen(u), x)
        True
    """

    mean: Tensor
    W: Tensor
    lam: Tensor
    scale: Tensor

    def __init__(self, mean: Tensor, W: Tensor, lam: Tensor, scale: Tensor) -> None:
        super().__init__()
        mean, W, lam, scale = (torch.as_tensor(v) for v in (mean, W, lam, scale))
        D = mean.shape[0] if mean.dim() == 1 else -1
        if (D < 1 or W.shape != (D, D) or lam.shape != (D,) or scale.dim() != 0
                or not all(v.is_floating_point() for v in (mean, W, lam, scale))):
            raise ValueError(f"EigenBasis: expected floating mean (D,), W (D, D), lam (D,) and "
                             f"scale (), got shapes {tuple(mean.shape)}, {tuple(W.shape)}, "
                             f"{tuple(lam.shape)}, {tuple(scale.shape)}")
        if not (bool((lam > 0).all()) and bool(scale > 0)):
            raise ValueError("EigenBasis: expected positive lam and scale")
        self.register_buffer("mean", mean)
        self.register_buffer("W", W)
        self.register_buffer("lam", lam)
        self.register_buffer("scale", scale)

    @property
    def dim(self) -> int:
        """Data dimension ``D``."""
        return self.mean.shape[-1]

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor) -> EigenBasis:
        """Basis from a mean ``(D,)`` and covariance ``(D, D)`` (computed in float64)."""
        dtype = cov.dtype
        cov64 = 0.5 * (cov + cov.transpose(-1, -2)).to(torch.float64)
        if not torch.isfinite(cov64).all():
            raise ValueError("covariance: expected finite values, got NaN or Inf")
        evals, evecs = torch.linalg.eigh(cov64)
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        top = float(evals[0])
        if not top > 0:
            raise ValueError(
                f"data: every direction has zero variance (largest covariance eigenvalue "
                f"{top:.3g}); a flow needs data that varies"
            )
        lam = evals / top
        small = lam < EIGENVALUE_FLOOR
        if small.any():
            warnings.warn(
                f"{int(small.sum())} eigen-direction(s) have variance below "
                f"{EIGENVALUE_FLOOR:g} of the largest; raised to that floor. Consider a "
                f"PR-reducing schedule (schedule='prr') that compresses them.",
                stacklevel=3,
            )
            lam = lam.clamp_min(EIGENVALUE_FLOOR)
        evecs = evecs * _signs(evecs)
        return cls(
            mean.to(dtype),
            evecs.to(dtype),
            lam.to(dtype),
            torch.tensor(math.sqrt(top), dtype=dtype),
        )

    @classmethod
    def from_data(cls, x: Tensor, shrinkage: float | str | None = None) -> EigenBasis:
        """Basis from samples ``x`` of shape ``(n, D)``.

        Args:
            x: samples ``(n, D)``.
            shrinkage: ``None`` (the unbiased sample covariance), ``"ledoit_wolf"``, or a
                weight ``a`` in ``[0, 1]``: the covariance ``(1 - a) S + a (tr S / D) I`` of
                the maximum-likelihood ``S`` (:func:`ledoit_wolf` chooses ``a``).
        """
        x = check_data(x, "data", min_rows=2)
        x64 = x.to(torch.float64)
        mean = x64.mean(0)
        xc = x64 - mean
        if shrinkage is None:
            cov = xc.T @ xc / (x.shape[0] - 1)
        else:
            weight = ledoit_wolf(xc) if shrinkage == "ledoit_wolf" else shrinkage
            if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
                raise ValueError(f"shrinkage: expected None, 'ledoit_wolf' or a number in "
                                 f"[0, 1], got {shrinkage!r}")
            S = xc.T @ xc / x.shape[0]
            cov = (1 - weight) * S + weight * S.diagonal().mean() * torch.eye(
                S.shape[0], dtype=S.dtype)
        return cls.from_moments(mean.to(x.dtype), cov.to(x.dtype))

    def to_eigen(self, x: Tensor) -> Tensor:
        """``u = W^T (x - mean) / scale``; ``(*, D) -> (*, D)``."""
        return ((x - self.mean) @ self.W) / self.scale

    def from_eigen(self, u: Tensor) -> Tensor:
        """``x = mean + scale W u``; ``(*, D) -> (*, D)``."""
        return self.mean + (u * self.scale) @ self.W.T

    def log_abs_det(self) -> Tensor:
        """``log |det du/dx| = -D log(scale)``."""
        return -self.dim * torch.log(self.scale)

    def extra_repr(self) -> str:
        """The dimension and scale, shown in the module's ``repr``."""
        return f"dim={self.dim}, scale={float(self.scale):.4g}"
