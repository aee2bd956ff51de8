"""pyro_inflow: calibrated, identifiable priors for Pyro from inflationary flows.

An inflationary flow (de Albuquerque & Pearson, NeurIPS 2024) maps data deterministically and
invertibly onto a Gaussian latent, optionally of lower dimension, by integrating a diffusion
model's probability-flow ODE under a special noise schedule.

The root holds what a user of the method needs; everything else lives in its submodule:
:mod:`~pyro_inflow.training` (``TrainConfig``), :mod:`~pyro_inflow.solvers` (``solve``,
``SolveInfo``), :mod:`~pyro_inflow.calibration` (``interval_coverage``, ``roundtrip_error``,
reports and plots), :mod:`~pyro_inflow.posterior` (``summary``, ``mcse_mean``),
:mod:`~pyro_inflow.sbc` (``SBCResult``), :mod:`~pyro_inflow.examples` (the demo and the
tutorials' inverse problems).
"""

from __future__ import annotations

import warnings
from typing import Any

from . import datasets
from .calibration import credible_regions, flow_calibration, identifiability, latent_coverage
from .denoisers import EmpiricalDenoiser, GaussianMixtureDenoiser
from .distributions import InflationaryFlowPrior
from .draws import sample_sites
from .flow import InflationaryFlow
from .inference import latent_nuts, latent_svi, reparam_flow_priors
from .posterior import posterior_samples, to_inference_data
from .sbc import plot_sbc, simulation_based_calibration
from .schedule import InflationSchedule
from .solvers import SolverError
from .training import TrainingDiverged
from .transforms import InflationaryFlowTransform

__version__ = "0.2.0"

__all__ = [
    "EmpiricalDenoiser",
    "GaussianMixtureDenoiser",
    "InflationSchedule",
    "InflationaryFlow",
    "InflationaryFlowPrior",
    "InflationaryFlowTransform",
    "SolverError",
    "TrainingDiverged",
    "credible_regions",
    "datasets",
    "flow_calibration",
    "identifiability",
    "latent_coverage",
    "latent_nuts",
    "latent_svi",
    "plot_sbc",
    "posterior_samples",
    "reparam_flow_priors",
    "sample_sites",
    "simulation_based_calibration",
    "to_inference_data",
]

#: Root names of 0.1.0 that moved, importable for one release: name -> (module, attribute).
_MOVED = {
    "Denoiser": ("pyro_inflow.denoisers", "Denoiser"),
    "EigenBasis": ("pyro_inflow.basis", "EigenBasis"),
    "PreconditionedDenoiser": ("pyro_inflow.denoisers", "PreconditionedDenoiser"),
    "SBCResult": ("pyro_inflow.sbc", "SBCResult"),
    "TrainConfig": ("pyro_inflow.training", "TrainConfig"),
    "corrupt": ("pyro_inflow.examples", "corrupt"),
    "inpainting_model": ("pyro_inflow.examples", "inpainting_model"),
    "interval_coverage": ("pyro_inflow.calibration", "interval_coverage"),
    "roundtrip_error": ("pyro_inflow.calibration.coverage", "error_norms"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'pyro_inflow' has no attribute {name!r}")
    module, attr = _MOVED[name]
    hint = (f"use {module}.{attr}" if name != "roundtrip_error" else
            "it compared two arrays; use pyro_inflow.calibration.roundtrip_error(flow, x), "
            "which performs the roundtrip")
    warnings.warn(f"pyro_inflow.{name} moved in 0.2.0 and will leave the package root in "
                  f"0.3.0; {hint}", DeprecationWarning, stacklevel=2)
    import importlib

    return getattr(importlib.import_module(module), attr)
