r"""Denoisers ``Dn(ut, t) ~ E[u | ut]`` in eigen-coordinates, where ``ut = u + sqrt(C(t)) eps``.

Two are exact (they make the ODE and Pyro layers testable without training):

* :class:`GaussianMixtureDenoiser`: data ``sum_k pi_k N(m_k, S_k)``, noisy marginal
  ``sum_k pi_k N(m_k, S_k + C(t))``, posterior mean by Gaussian conditioning per component;
* :class:`EmpiricalDenoiser`: the training set as point masses (the "discrete score").

:class:`PreconditionedDenoiser` is the learned one, with EDM-style preconditioning per
eigen-dimension (Karras et al. 2022, Table 1; paper Eq. 10):
``sigma* = lam + gamma(t)``, ``c_in = 1/sqrt(sigma*)``, ``c_skip = lam/sigma*``,
``c_out = sqrt(lam gamma / sigma*)``, ``Dn = c_skip ut + c_out F(c_in ut, c_noise(t))``.
With ``F = 0`` it is the exact denoiser of Gaussian data, so the network learns only the
non-Gaussian part. The score is ``C(t)^{-1} (Dn - ut)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .networks import build_network
from .schedule import InflationSchedule, as_time

__all__ = [
    "Denoiser",
    "GaussianMixtureDenoiser",
    "EmpiricalDenoiser",
    "PreconditionedDenoiser",
    "DENOISERS",
    "check_mixture",
]


class Denoiser(nn.Module):
    r"""Base of every denoiser ``Dn(ut, t) -> E[u | ut]`` in eigen-coordinates.

    A subclass sets ``self.schedule`` and implements ``forward(ut, t)`` (``ut`` of shape
    ``(*, D)``, ``t`` a scalar or ``(*)``). The pfODE (:mod:`pyro_inflow.pfode`) reads it through
    two methods, which a subclass may override to be faster:

    * :meth:`time_terms`: everything that depends on the time alone, computed once per time
      (and by ``warped_rk4`` once per solve for its whole grid);
    * :meth:`velocity`: the pfODE's ``dw/dt = 0.5 rho (1 + g) (c_skip ut - Dn(ut, t)) /
      sqrt(sigma(t))`` at the standardized state ``w = ut / sqrt(sigma(t))``,
      ``sigma = lam + gamma``, ``c_skip = lam / sigma`` (zero for Gaussian data, whose denoiser
      is ``c_skip ut``). It is called thousands of times a solve: every factor that depends on
      time alone belongs in :meth:`time_terms`.
    """

    schedule: InflationSchedule

    def time_terms(self, t: Tensor, lam: Tensor) -> tuple[Tensor, ...]:
        """``(t, sqrt(sigma), c_skip, 0.5 rho (1 + g) / sqrt(sigma))`` at times ``t``
        ``(*t)``: the times, then three ``(*t, D)``."""
        sigma = self.schedule.sigma(t, lam)
        root = torch.sqrt(sigma)
        return t, root, lam / sigma, (0.5 * self.schedule.rate) / root

    def velocity(self, w: Tensor, terms: tuple[Tensor, ...]) -> Tensor:
        """``dw/dt`` ``(*, D)`` at ``w`` ``(*, D)`` from the :meth:`time_terms` of one time."""
        t, root, c_skip, speed = terms
        ut = w * root
        return speed * (c_skip * ut - self(ut, t))


def check_mixture(
    weights: Tensor | np.ndarray,
    means: Tensor | np.ndarray,
    covariances: Tensor | np.ndarray,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a Gaussian mixture ``(K,), (K, D), (K, D, D)``; returns the three tensors.

    Args:
        weights: ``(K,)`` positive weights (tensor or array-like).
        means: ``(K, D)`` component means.
        covariances: ``(K, D, D)`` positive semi-definite covariances.
        dtype: convert to this dtype (default: keep the inputs' own).

    Raises:
        ValueError, TypeError: wrong shapes, non-floating, non-finite, non-positive weights or
            non-PSD covariances, named.
    """
    w, m, S = (torch.as_tensor(v, dtype=dtype) for v in (weights, means, covariances))
    if w.dim() != 1 or m.dim() != 2 or S.dim() != 3:
        raise ValueError(
            f"weights, means, covariances: expected shapes (K,), (K, D), (K, D, D), got "
            f"{tuple(w.shape)}, {tuple(m.shape)}, {tuple(S.shape)}"
        )
    K, D = m.shape
    if w.shape[0] != K or S.shape != (K, D, D):
        raise ValueError(
            f"weights, means, covariances: expected shapes ({K},), ({K}, {D}), "
            f"({K}, {D}, {D}), got {tuple(w.shape)}, {tuple(m.shape)}, {tuple(S.shape)}"
        )
    for name, v in (("weights", w), ("means", m), ("covariances", S)):
        if not v.is_floating_point():
            raise TypeError(f"{name}: expected floating-point values, got {v.dtype}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    if not (w > 0).all():
        raise ValueError("weights: expected positive weights")
    if (torch.linalg.eigvalsh(0.5 * (S + S.mT)) < -1e-10 * S.abs().amax()).any():
        raise ValueError("covariances: expected positive semi-definite matrices")
    return w, m, S


class GaussianMixtureDenoiser(Denoiser):
    r"""Exact posterior mean for a Gaussian mixture in eigen-coordinates.

    Args:
        schedule: the noise schedule ``C(t)``.
        weights: ``(K,)`` positive, normalized here.
        means: ``(K, D)``.
        covariances: ``(K, D, D)`` symmetric positive semi-definite.
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor

    def __init__(
        self,
        schedule: InflationSchedule,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
    ) -> None:
        super().__init__()
        weights, means, covariances = check_mixture(weights, means, covariances)
        if means.shape[1] != schedule.dim:
            raise ValueError(f"means: dimension {means.shape[1]} does not match the schedule's "
                             f"{schedule.dim}")
        self.schedule = schedule
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        self.register_buffer("covariances", 0.5 * (covariances + covariances.transpose(-1, -2)))

    def _components(self, ut: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Component log-densities ``(*, K)``, ``P (ut - m)`` ``(*, K, D)``, and ``S P``."""
        gamma = self.schedule.gamma(as_time(t, ut)).to(ut.dtype)  # (*t, D)
        cov = self.covariances + torch.diag_embed(gamma).unsqueeze(-3)  # (*t, K, D, D)
        chol = torch.linalg.cholesky(cov)
        prec = torch.cholesky_inverse(chol)
        diff = ut.unsqueeze(-2) - self.means  # (*, K, D)
        pdiff = (prec @ diff.unsqueeze(-1)).squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_comp = torch.log(self.weights) - 0.5 * (
            (diff * pdiff).sum(-1) + logdet + ut.shape[-1] * math.log(2 * math.pi)
        )
        return log_comp, pdiff, diff

    def forward(self, ut: Tensor, t: Tensor) -> Tensor:
        """Posterior mean ``E[u | ut]`` ``(*, D)`` at times ``t`` (scalar or ``(*)``)."""
        log_comp, pdiff, _ = self._components(ut, t)
        resp = torch.softmax(log_comp, dim=-1)  # (*, K)
        post = self.means + (self.covariances @ pdiff.unsqueeze(-1)).squeeze(-1)
        return (resp.unsqueeze(-1) * post).sum(-2)

    def log_marginal(self, ut: Tensor, t: Tensor) -> Tensor:
        """Exact ``log p_t(ut)`` of the noisy marginal in eigen-coordinates, shape ``(*)``."""
        log_comp, _, _ = self._components(ut, t)
        return torch.logsumexp(log_comp, dim=-1)

    def config(self) -> dict:
        """JSON-like settings for saved files (the tensors are in the state dict)."""
        return {"num_components": self.weights.shape[0]}

    @classmethod
    def from_saved(cls, schedule: InflationSchedule, lam: Tensor, config: dict,
                   state: dict[str, Tensor]) -> GaussianMixtureDenoiser:
        """Rebuild from a saved :meth:`config` and state dict (``lam`` is unused)."""
        return cls(schedule, state["weights"], state["means"], state["covariances"])


class EmpiricalDenoiser(Denoiser):
    r"""Exact posterior mean when the data are the point masses ``points`` (the discrete score).

    ``E[u | ut] = sum_j softmax_j(-0.5 sum_i (ut_i - y_ji)^2 / gamma_i) y_j``. The constant
    ``|ut|^2`` term is dropped from the logits, leaving two matrix products, and queries are
    processed in chunks of at most ``max_elements / N`` rows, so ``20_000`` reference points by
    ``10_000`` queries takes about a second on two CPU cores. Use float64 when some
    ``gamma_i`` is tiny (PR-reducing schedules near ``T``).

    Args:
        schedule: the noise schedule.
        points: ``(N, D)`` reference points in eigen-coordinates.
        max_elements: size of the largest ``(queries, N)`` block held in memory.
    """

    points: Tensor

    def __init__(
        self, schedule: InflationSchedule, points: Tensor, max_elements: int = 2**23
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("points", points)
        self.register_buffer("_points_sq", points.square(), persistent=False)
        self.max_elements = int(max_elements)

    def forward(self, ut: Tensor, t: Tensor) -> Tensor:
        """Posterior mean ``E[u | ut]`` ``(*, D)`` at times ``t`` (scalar or ``(*)``)."""
        inv_gamma = 1.0 / self.schedule.gamma(as_time(t, ut)).to(ut.dtype)  # (*t, D)
        batch = ut.shape[:-1]
        flat = ut.reshape(-1, ut.shape[-1])
        inv = inv_gamma.expand(*batch, ut.shape[-1]).reshape(-1, ut.shape[-1])
        y, y2 = self.points, self._points_sq
        rows = max(1, self.max_elements // y.shape[0])
        out = []
        for start in range(0, flat.shape[0], rows):
            q, ig = flat[start : start + rows], inv[start : start + rows]
            logits = (q * ig) @ y.T - 0.5 * (ig @ y2.T)
            out.append(torch.softmax(logits, dim=-1) @ y)
        return torch.cat(out).reshape(ut.shape)

    def config(self) -> dict:
        """JSON-like settings for saved files (the points are in the state dict)."""
        return {"num_points": self.points.shape[0], "max_elements": self.max_elements}

    @classmethod
    def from_saved(cls, schedule: InflationSchedule, lam: Tensor, config: dict,
                   state: dict[str, Tensor]) -> EmpiricalDenoiser:
        """Rebuild from a saved :meth:`config` and state dict (``lam`` is unused)."""
        return cls(schedule, state["points"], config.get("max_elements", 2**23))


class PreconditionedDenoiser(Denoiser):
    r"""Learned denoiser ``Dn = c_skip ut + c_out F(c_in ut, c_noise)`` per eigen-dimension.

    Args:
        schedule: the noise schedule.
        lam: ``(D,)`` eigenvalues of the data covariance (``max == 1``).
        network: ``F``, a module mapping ``(*, D)`` inputs and ``(*)`` noise levels to
            ``(*, D)``, split into ``time_features(c_noise)`` and ``forward_features(x,
            features)`` as the backbones of :mod:`pyro_inflow.networks` are.
            ``c_noise(t) = t / t_max``.
    """

    lam: Tensor

    def __init__(self, schedule: InflationSchedule, lam: Tensor, network: nn.Module) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("lam", torch.as_tensor(lam))
        self.network = network

    def preconditioning(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` of shape ``(*t, D)`` and ``c_noise`` of shape ``(*t)``."""
        t = as_time(t, self.lam)
        gamma = self.schedule.gamma(t)
        sigma = self.schedule.sigma(t, self.lam)
        c_skip = self.lam / sigma
        c_out = torch.sqrt(self.lam * gamma / sigma)
        c_in = torch.rsqrt(sigma)
        c_noise = t / self.schedule.t_max
        return c_skip, c_out, c_in, c_noise

    def forward(self, ut: Tensor, t: Tensor) -> Tensor:
        """``Dn(ut, t)`` ``(*, D)`` at times ``t`` (scalar or ``(*)``)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(t)
        c_noise = c_noise.expand(ut.shape[:-1])
        return c_skip * ut + c_out * self.network(c_in * ut, c_noise)

    def time_terms(self, t: Tensor, lam: Tensor | None = None) -> tuple[Tensor, ...]:
        """``-0.5 rho (1 + g) c_out / sqrt(sigma)`` ``(*t, D)`` and the network's
        ``time_features(c_noise)``; the ``lam`` argument is ignored (this denoiser holds its
        own)."""
        t = as_time(t, self.lam)
        gamma = self.schedule.gamma(t)
        sigma = self.schedule.sigma(t, self.lam)
        coef = -(0.5 * self.schedule.rate) * torch.sqrt(self.lam * gamma) / sigma
        c_noise = t / self.schedule.t_max
        return coef, *self.network.time_features(c_noise)

    def velocity(self, w: Tensor, terms: tuple[Tensor, ...]) -> Tensor:
        """``c_skip ut - Dn = -c_out F(c_in ut, c_noise)`` and ``c_in ut = w``: one network
        call on the standardized state and one product, no cancellation."""
        return terms[0] * self.network.forward_features(w, terms[1:])

    def loss(self, u: Tensor, t: Tensor, eps: Tensor, network: nn.Module | None = None) -> Tensor:
        r"""Denoising score-matching loss ``sum_i (Dn_i - u_i)^2 / c_out_i^2``, shape ``(B,)``.

        Args:
            u: clean points ``(B, D)``.
            t: times ``(B,)``.
            eps: standard normal ``(B, D)``.
            network: evaluate this module instead of ``self.network`` (training passes its
                ``DistributedDataParallel`` wrapper here).
        """
        c_skip, c_out, c_in, c_noise = self.preconditioning(t)
        ut = u + torch.sqrt(self.schedule.gamma(t)) * eps
        target = (u - c_skip * ut) / c_out
        net = self.network if network is None else network
        return (net(c_in * ut, c_noise) - target).square().sum(-1)

    def config(self) -> dict:
        """JSON-like settings for saved files: the network's :meth:`config`."""
        return {"network": self.network.config()}

    @classmethod
    def from_saved(cls, schedule: InflationSchedule, lam: Tensor, config: dict,
                   state: dict[str, Tensor]) -> PreconditionedDenoiser:
        """Rebuild from a saved :meth:`config`, the eigenvalues and the state dict."""
        net = build_network(**config["network"])
        den = cls(schedule, lam.clone(), net)
        den.load_state_dict(state, strict=True)
        return den


#: Denoiser classes by the name stored in saved files.
DENOISERS: dict[str, type[Denoiser]] = {
    "gaussian_mixture": GaussianMixtureDenoiser,
    "empirical": EmpiricalDenoiser,
    "preconditioned": PreconditionedDenoiser,
}
