"""pyro_inflow: calibrated, identifiable priors for Pyro from inflationary flows.

An inflationary flow (de Albuquerque & Pearson, NeurIPS 2024) maps data deterministically and
invertibly onto a Gaussian latent, optionally of lower dimension, by integrating a diffusion
model's probability-flow ODE under a special noise schedule.
"""

from . import datasets
from .basis import EigenBasis
from .denoisers import (
    Denoiser,
    EmpiricalDenoiser,
    GaussianMixtureDenoiser,
    PreconditionedDenoiser,
)
from .diagnostics import latent_coverage, roundtrip_error
from .flow import InflationaryFlow
from .ode import SolverError
from .schedule import InflationSchedule
from .training import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "InflationaryFlow",
    "InflationSchedule",
    "EigenBasis",
    "Denoiser",
    "GaussianMixtureDenoiser",
    "EmpiricalDenoiser",
    "PreconditionedDenoiser",
    "TrainConfig",
    "SolverError",
    "datasets",
    "latent_coverage",
    "roundtrip_error",
]
