"""Inpainting and denoising with a flow prior (the digits inverse problem of tutorial 5).

Each image ``x`` (``D`` pixels) is seen through a mask: hidden pixels are missing, the others
are observed with Gaussian noise, ``y_j ~ Normal(x_j, sigma)`` where ``mask_j`` is true. With
``K`` images in one ``pyro.plate`` the posterior factorizes over images, so one NUTS run
samples all ``K`` posteriors at once: its latent has ``K x d`` coordinates and the flow decodes
the ``K`` images as one batch, which costs little more than decoding one.

Example:
    >>> held = torch.rand(16, 64)
    >>> y, mask = corrupt(held, hidden=0.5, sigma=0.1, seed=0)
    >>> y.shape, int(mask[0].sum())
    (torch.Size([16, 64]), 32)
    >>> model = inpainting_model(flow, sigma=0.1)  # doctest: +SKIP
    >>> mcmc = latent_nuts(model, y, mask, num_samples=200)  # doctest: +SKIP
    >>> x = posterior_samples(mcmc)["x"]  # (200, 16, D)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from .._validation import check_data

if TYPE_CHECKING:
    from ..flow import InflationaryFlow

__all__ = ["corrupt", "inpainting_model"]


def corrupt(x: Tensor | np.ndarray, *, hidden: float = 0.5, sigma: float = 0.1, seed: int = 0
            ) -> tuple[Tensor, Tensor]:
    """Hide a random ``hidden`` fraction of each image's pixels and add noise to the rest.

    Args:
        x: clean images ``(K, D)`` (tensor or array-like, floating).
        hidden: fraction of pixels hidden in each image (the same count in every image,
            different pixels), in ``[0, 1)``.
        sigma: standard deviation of the Gaussian noise on the observed pixels, ``> 0``.
        seed: seeds the masks and the noise.

    Returns:
        ``(y, mask)``: observations ``(K, D)`` (zero where hidden) and the boolean mask
        ``(K, D)``, true where a pixel is observed.
    """
    x = check_data(x, "x", batched=True)
    if x.dim() != 2:
        raise ValueError(f"x: expected images of shape (K, D), got {tuple(x.shape)}")
    if not 0 <= hidden < 1:
        raise ValueError(f"hidden: expected a fraction in [0, 1), got {hidden!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    gen = torch.Generator().manual_seed(seed)
    K, D = x.shape
    n_hidden = round(hidden * D)
    order = torch.rand(K, D, generator=gen).argsort(-1)
    mask = torch.ones(K, D, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_hidden], False)
    noise = sigma * torch.randn(K, D, generator=gen, dtype=torch.float64)
    mask = mask.to(x.device)
    y = torch.where(mask, x + noise.to(x.device, x.dtype), torch.zeros_like(x))
    return y, mask


def inpainting_model(flow: InflationaryFlow, sigma: float = 0.1,
                     **prior_options: object) -> Callable[[Tensor, Tensor], None]:
    """A Pyro model ``model(y, mask)`` of ``K`` images with ``flow`` as their prior.

    ``x ~ flow.prior()`` in a plate of ``K`` images (site ``"x"``, ``(K, D)``) and
    ``y ~ Normal(x, sigma)`` on the observed pixels (site ``"y"``, masked).

    Args:
        flow: an :class:`~pyro_inflow.InflationaryFlow` of dimension ``D``.
        sigma: the observation noise, as in :func:`corrupt`.
        **prior_options: passed to ``flow.prior()`` (solver options).

    Returns:
        ``model(y, mask)`` with ``y`` ``(K, D)`` and ``mask`` ``(K, D)`` boolean.
    """
    prior = flow.prior(**prior_options)

    def model(y: Tensor, mask: Tensor) -> None:
        with pyro.plate("images", y.shape[0]):
            x = pyro.sample("x", prior)
            pyro.sample("y", dist.Normal(x, sigma).mask(mask).to_event(1), obs=y)

    return model
