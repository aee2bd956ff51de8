"""Small backbones ``F(x, c_noise)`` for :class:`~pyro_inflow.denoisers.PreconditionedDenoiser`.

Both map inputs ``(*, D)`` and noise levels ``(*)`` (``c_noise = t / t_max`` in ``[0, 1]``) to
``(*, D)``. The last layer starts at zero, so an untrained denoiser is the exact Gaussian one
and an untrained flow is PCA whitening.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TimeEmbedding", "MLP", "ResidualMLP", "NETWORKS", "build_network"]


class TimeEmbedding(nn.Module):
    """Fourier features of ``c in [0, 1]``: ``[c, sin(pi 2^k c), cos(pi 2^k c)]``, ``k < n``."""

    freqs: Tensor

    def __init__(self, num_frequencies: int = 6) -> None:
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_frequencies))
        self.dim = 2 * num_frequencies + 1

    def forward(self, c: Tensor) -> Tensor:
        arg = c.unsqueeze(-1) * self.freqs.to(c.dtype)
        return torch.cat([c.unsqueeze(-1), torch.sin(arg), torch.cos(arg)], dim=-1)


class MLP(nn.Module):
    """Plain MLP on ``[x, embed(c_noise)]`` with SiLU activations.

    Args:
        dim: data dimension ``D``. hidden: width. depth: number of hidden layers.
        num_frequencies: Fourier frequencies of the time embedding.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_frequencies: int = 6):
        super().__init__()
        self._config = {"type": "mlp", "dim": dim, "hidden": hidden, "depth": depth,
                        "num_frequencies": num_frequencies}
        self.embed = TimeEmbedding(num_frequencies)
        layers: list[nn.Module] = []
        width = dim + self.embed.dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        out = nn.Linear(width, dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return self.net(torch.cat([x, self.embed(c_noise)], dim=-1))

    def config(self) -> dict:
        return dict(self._config)


class ResidualMLP(nn.Module):
    """Residual MLP: ``h += W2 silu(W1 silu(h) + E_k(t))`` with a shared time embedding.

    Args:
        dim: data dimension ``D``. hidden: width. depth: number of residual blocks.
        num_frequencies: Fourier frequencies of the time embedding.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_frequencies: int = 6):
        super().__init__()
        self._config = {"type": "residual_mlp", "dim": dim, "hidden": hidden, "depth": depth,
                        "num_frequencies": num_frequencies}
        self.embed = TimeEmbedding(num_frequencies)
        self.time = nn.Sequential(nn.Linear(self.embed.dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden),
                           nn.Linear(hidden, hidden)])
            for _ in range(depth)
        )
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        temb = torch.nn.functional.silu(self.time(self.embed(c_noise)))
        h = self.inp(x) + temb
        for lin1, lin2, emb in self.blocks:
            h = h + lin2(torch.nn.functional.silu(lin1(torch.nn.functional.silu(h)) + emb(temb)))
        return self.out(torch.nn.functional.silu(h))

    def config(self) -> dict:
        return dict(self._config)


#: Backbones by name (the ``network=`` option of ``InflationaryFlow.fit``).
NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLP, "residual_mlp": ResidualMLP}


def build_network(type: str = "residual_mlp", **kwargs) -> nn.Module:
    """Build a backbone by name; ``kwargs`` go to its constructor."""
    if type not in NETWORKS:
        raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {type!r}")
    return NETWORKS[type](**kwargs)
