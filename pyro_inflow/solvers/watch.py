"""Watching a fixed grid's error estimate across many solves (the prior's solver)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ._base import SolveInfo

__all__ = ["ErrorWatch"]


@dataclass
class ErrorWatch:
    """The largest error estimate seen so far, and whether a warning was given.

    A prior decodes on a fixed grid that never changes inside inference; instead its solves
    are watched: the largest estimate is kept, and one warning says so when an estimate passes
    the budget.

    Attributes:
        max_error: the largest estimate recorded (0 before any).
        warned: whether the one warning was given.
        nonfinite: points whose decode of a finite latent gave non-finite values.
        warned_nonfinite: whether the one warning about them was given.
    """

    max_error: float = 0.0
    warned: bool = False
    nonfinite: int = 0
    warned_nonfinite: bool = False

    def record(self, info: SolveInfo, budget: float) -> None:
        """Keep ``info.error`` (if the solver estimates one); warn once if over ``budget``."""
        if info.error is None:
            return
        self.max_error = max(self.max_error, info.error)
        if info.error > budget and not self.warned:
            self.warned = True
            warnings.warn(
                f"InflationaryFlowTransform: {info.method} with {info.num_steps} steps has an "
                f"estimated error of {info.error:.2e} here, over rtol={budget:g}; the grid "
                f"stays fixed (max_error keeps the largest); pass a larger num_steps or "
                f"method='dopri5' for more accuracy", stacklevel=4)

    def record_nonfinite(self, count: int, radius: float) -> None:
        """Count ``count`` finite latents (the largest of norm ``radius``) whose decode gave
        non-finite values; warn once."""
        self.nonfinite += count
        if not self.warned_nonfinite:
            self.warned_nonfinite = True
            warnings.warn(
                f"InflationaryFlowTransform: the decode of {count} finite latent point(s) "
                f"(largest norm {radius:.3g}) gave non-finite values, returned as NaN/inf; a "
                f"sampler counts them as divergences, as it would a Normal prior's overflow far "
                f"out. At a moderate norm (under 10) the flow itself is broken there: "
                f"flow.decode(z) raises a SolverError naming where", RuntimeWarning,
                stacklevel=4)
