"""Is the flow calibrated? Checks against known answers, on held-out data.

* :mod:`~pyro_inflow.calibration.coverage`: latent coverage of the chi-square regions,
  interval coverage of posteriors, the roundtrip error;
* :mod:`~pyro_inflow.calibration.regions`: the decoded credible regions in data space;
* :mod:`~pyro_inflow.calibration.certificate`: the held-out check every trained flow carries;
* :mod:`~pyro_inflow.calibration.report`: the flow report (what ``pyro-inflow calibrate``
  prints) and the identifiability of two flows;
* :mod:`~pyro_inflow.calibration.plots`: its figures.
"""

from .certificate import certificate_table, holdout_certificate, recalibrate_latent
from .coverage import LEVELS, interval_coverage, latent_coverage, roundtrip_error
from .plots import plot_calibration
from .regions import credible_regions
from .report import calibration_table, flow_calibration, identifiability, report_json

__all__ = ["LEVELS", "calibration_table", "certificate_table", "credible_regions",
           "flow_calibration", "holdout_certificate", "identifiability", "interval_coverage",
           "latent_coverage", "plot_calibration", "recalibrate_latent", "report_json",
           "roundtrip_error"]
