"""Training a :class:`~pyro_inflow.denoisers.PreconditionedDenoiser` by denoising score matching.

Training works in eigen-coordinates and knows nothing of flows: it takes points, a schedule
and the eigenvalues, and returns a denoiser and its history.
:meth:`pyro_inflow.InflationaryFlow.fit` builds the basis and schedule, calls it, and wraps the
result. The rooms:

* :mod:`~pyro_inflow.training.config`: :class:`TrainConfig`, the settings, validated once;
* :mod:`~pyro_inflow.training.trainer`: :class:`Trainer`, the loop;
* :mod:`~pyro_inflow.training.checkpoint`: resumable checkpoints;
* :mod:`~pyro_inflow.training.distributed`: data-parallel training under ``torchrun``.
"""

from .config import TrainConfig
from .distributed import init_distributed
from .trainer import Trainer, TrainingDiverged, TrainState, split

__all__ = ["TrainConfig", "Trainer", "TrainState", "TrainingDiverged", "init_distributed",
           "split"]
