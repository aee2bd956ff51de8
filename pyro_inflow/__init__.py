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
from .diagnostics import (
    credible_regions,
    flow_calibration,
    identifiability,
    interval_coverage,
    latent_coverage,
    plot_sbc,
    roundtrip_error,
    to_inference_data,
)
from .distributions import InflationaryFlowPrior
from .flow import InflationaryFlow
from .inference import latent_nuts, latent_svi, posterior_samples, reparam_flow_priors
from .inverse import corrupt, inpainting_model
from .ode import SolverError
from .sbc import SBCResult, simulation_based_calibration
from .schedule import InflationSchedule
from .training import TrainConfig, TrainingDiverged
from .transforms import InflationaryFlowTransform

__version__ = "0.1.0"

__all__ = [
    "InflationaryFlow",
    "InflationaryFlowPrior",
    "InflationaryFlowTransform",
    "InflationSchedule",
    "EigenBasis",
    "Denoiser",
    "GaussianMixtureDenoiser",
    "EmpiricalDenoiser",
    "PreconditionedDenoiser",
    "TrainConfig",
    "TrainingDiverged",
    "SolverError",
    "datasets",
    "reparam_flow_priors",
    "latent_nuts",
    "latent_svi",
    "posterior_samples",
    "latent_coverage",
    "roundtrip_error",
    "credible_regions",
    "flow_calibration",
    "identifiability",
    "interval_coverage",
    "corrupt",
    "inpainting_model",
    "to_inference_data",
    "simulation_based_calibration",
    "SBCResult",
    "plot_sbc",
]
