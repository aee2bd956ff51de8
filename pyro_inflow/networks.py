"""Small backbones ``F(x, c_noise)`` for :class:`~pyro_inflow.denoisers.PreconditionedDenoiser`.

Both map inputs ``(*, D)`` and noise levels ``(*)`` (``c_noise = t / t_max`` in ``[0, 1]``) to
``(*, D)``. The last layer starts at zero, so an untrained denoiser is the exact Gaussian one
and an untrained flow is PCA whitening.

Each splits its work in two: ``time_features(c)`` is everything that depends on the noise level
alone, and ``forward_features(x, features)`` the rest, with ``forward(x, c) =
forward_features(x, time_features(c))``. The ODE solvers compute the time features once per
time (not once per point), and ``warped_rk4`` once per solve for its whole grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TimeEmbedding", "MLP", "ResidualMLP", "NETWORKS", "build_network"]


class TimeEmbedding(nn.Module):
    """Fourier features of ``c in [0, 1]``: ``[c, sin(pi 2^k c), cos(pi 2^k c)]``, ``k < n``."""

    freqs: Tensor

    def __init__(self, num_frequencies: int = 3, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("freqs",
                             math.pi * 2.0 ** torch.arange(num_frequencies, dtype=dtype))
        self.dim = 2 * num_frequencies + 1

    def forward(self, c: Tensor) -> Tensor:
        """Features ``(*, 2 n + 1)`` of noise levels ``c`` ``(*)``."""
        arg = c.unsqueeze(-1) * self.freqs.to(c.dtype)
        return torch.cat([c.unsqueeze(-1), torch.sin(arg), torch.cos(arg)], dim=-1)


class MLP(nn.Module):
    """Plain MLP on ``[x, embed(c_noise)]`` with SiLU activations.

    Args:
        dim: data dimension ``D``. hidden: width. depth: number of hidden layers.
        num_frequencies: Fourier frequencies of the time embedding (3: the field stays smooth
            in time, so ODE solvers take long steps; see ``TrainConfig.num_frequencies``).
        dtype: parameter dtype (default: torch's default dtype).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_frequencies: int = 3,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._config = {"type": "mlp", "dim": dim, "hidden": hidden, "depth": depth,
                        "num_frequencies": num_frequencies}
        self.dim = dim
        self.embed = TimeEmbedding(num_frequencies, dtype)
        layers: list[nn.Module] = []
        width = dim + self.embed.dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, dtype=dtype), nn.SiLU()]
            width = hidden
        out = nn.Linear(width, dim, dtype=dtype)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def time_features(self, c_noise: Tensor) -> tuple[Tensor]:
        """The first layer's time part plus its bias, ``(*c, hidden)``."""
        first = self.net[0]
        return (nn.functional.linear(self.embed(c_noise), first.weight[:, self.dim:], first.bias),)

    def forward_features(self, x: Tensor, features: tuple[Tensor]) -> Tensor:
        """``F`` at ``x`` ``(*, D)`` with time features broadcastable to ``(*, hidden)``."""
        h = nn.functional.linear(x, self.net[0].weight[:, : self.dim]) + features[0]
        return self.net[1:](h)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """``F(x, c_noise)`` ``(*, D)`` for ``x`` ``(*, D)`` and ``c_noise`` ``(*)``."""
        return self.forward_features(x, self.time_features(c_noise))

    def config(self) -> dict:
        """The constructor's arguments and the ``type`` name, for saved files."""
        return dict(self._config)


class ResidualMLP(nn.Module):
    """Residual MLP: ``h += W2 silu(W1 silu(h) + E_k(t))`` with a shared time embedding.

    Args:
        dim: data dimension ``D``. hidden: width. depth: number of residual blocks.
        num_frequencies: Fourier frequencies of the time embedding (3: the field stays smooth
            in time, so ODE solvers take long steps; see ``TrainConfig.num_frequencies``).
        dtype: parameter dtype (default: torch's default dtype).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_frequencies: int = 3,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._config = {"type": "residual_mlp", "dim": dim, "hidden": hidden, "depth": depth,
                        "num_frequencies": num_frequencies}
        self.embed = TimeEmbedding(num_frequencies, dtype)
        self.time = nn.Sequential(nn.Linear(self.embed.dim, hidden, dtype=dtype), nn.SiLU(),
                                  nn.Linear(hidden, hidden, dtype=dtype))
        self.inp = nn.Linear(dim, hidden, dtype=dtype)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden, dtype=dtype) for _ in range(3)])
            for _ in range(depth)
        )
        self.out = nn.Linear(hidden, dim, dtype=dtype)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def time_features(self, c_noise: Tensor) -> tuple[Tensor, ...]:
        """The shared embedding and each block's time term, each ``(*c, hidden)``."""
        temb = nn.functional.silu(self.time(self.embed(c_noise)))
        return (temb, *(emb(temb) for _, _, emb in self.blocks))

    def forward_features(self, x: Tensor, features: tuple[Tensor, ...]) -> Tensor:
        """``F`` at ``x`` ``(*, D)`` with time features broadcastable to ``(*, hidden)``."""
        silu = nn.functional.silu
        h = self.inp(x) + features[0]
        for (lin1, lin2, _), temb in zip(self.blocks, features[1:]):
            h = h + lin2(silu(lin1(silu(h)) + temb))
        return self.out(silu(h))

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """``F(x, c_noise)`` ``(*, D)`` for ``x`` ``(*, D)`` and ``c_noise`` ``(*)``."""
        return self.forward_features(x, self.time_features(c_noise))

    def config(self) -> dict:
        """The constructor's arguments and the ``type`` name, for saved files."""
        return dict(self._config)


#: Backbones by name (the ``network=`` option of ``InflationaryFlow.fit``).
NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLP, "residual_mlp": ResidualMLP}


def build_network(type: str = "residual_mlp", **kwargs: int | torch.dtype | None) -> nn.Module:
    """Build a backbone by name; ``kwargs`` (``dim``, ``hidden``, ``depth``,
    ``num_frequencies``, ``dtype``) go to its constructor."""
    if type not in NETWORKS:
        raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {type!r}")
    return NETWORKS[type](**kwargs)
