"""Training settings: one dataclass, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .._validation import check_positive_int
from ..networks import NETWORKS

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of training (all have defaults that suit 2-D and 3-D data on a CPU).

    Every field is checked when the config is made; a bad value raises ``ValueError`` or
    ``TypeError`` naming it. The schedule is not a training setting: it is part of the flow
    (:meth:`pyro_inflow.InflationaryFlow.fit`).

    Example:
        >>> TrainConfig(steps=100).lr
        0.002
        >>> TrainConfig(lr=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: lr: expected a positive number, got -1.0
    """

    network: str = "residual_mlp"
    hidden: int = 128
    depth: int = 3
    #: Fourier frequencies of the network's time embedding (``pi 2^k t / T``, ``k < n``):
    #: 3 keeps the learned field smooth in ``t``, so the solvers take long steps
    #: (``benchmarks/bench_solvers.py``; 6 made the one-way error of 12 RK4 steps 4-8x larger)
    num_frequencies: int = 3
    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    warmup: int = 200
    signal_fraction: float = 0.8
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    validation_fraction: float = 0.1
    eval_every: int = 250
    #: early stopping: end when the validation loss (every ``eval_every`` steps) has not
    #: improved for this many evaluations, and return the EMA weights of its best (``None``:
    #: train all ``steps``). On by default since 0.3: on 1,500 digits 4,000 steps memorized
    #: the training images (held-out coverage error 0.40-0.46 over three splits, against
    #: 0.07-0.13 with early stopping), and on the 20,000-point toys it changed nothing
    #: measurable (moons 0.011 -> 0.012, s_curve 0.007 -> 0.006; ``benchmarks/README.md``)
    patience: int | None = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {self.network!r}")
        for name in ("steps", "batch_size", "eval_every", "hidden", "depth", "num_frequencies"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.warmup, "warmup", minimum=0)
        for name in ("lr", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not 0 <= self.signal_fraction <= 1:
            raise ValueError(f"signal_fraction: expected a number in [0, 1], "
                             f"got {self.signal_fraction}")
        if not 0 <= self.validation_fraction < 0.5:
            raise ValueError(f"validation_fraction: expected a number in [0, 0.5), "
                             f"got {self.validation_fraction}")
        if self.patience is not None:
            check_positive_int(self.patience, "patience")
            if self.validation_fraction == 0:
                raise ValueError("patience: early stopping watches the validation loss; pass "
                                 "patience=None to train without it, or keep "
                                 "validation_fraction > 0")

    @classmethod
    def from_settings(cls, settings: dict) -> TrainConfig:
        """A config from keyword settings, refusing unknown names with the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"fit: unexpected setting(s) {unknown}; expected some of "
                            f"{sorted(known)} (pyro_inflow.training.TrainConfig)")
        return cls(**settings)

    def rank_share(self, rank: int, world: int) -> slice:
        """The rows of each global batch that process ``rank`` of ``world`` trains on.

        Raises:
            ValueError: ``batch_size`` does not divide evenly among the processes.
        """
        if self.batch_size % world:
            raise ValueError(f"batch_size: the global batch {self.batch_size} does not divide "
                             f"among {world} processes; use a multiple of {world}")
        return slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world)

    #: Settings that must agree between a checkpoint and the run that resumes it.
    FROZEN = ("network", "hidden", "depth", "num_frequencies", "batch_size", "lr", "warmup",
              "signal_fraction", "ema_decay", "max_grad_norm", "validation_fraction",
              "patience", "seed")
