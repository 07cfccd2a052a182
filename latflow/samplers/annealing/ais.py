"""Annealed importance sampling (Neal 2001): annealed SMC that never resamples.

Each particle carries its own importance weight along the whole path; the weights degenerate faster than
SMC's, but every particle's trajectory is independent, which makes AIS the reference for ``log Z`` bias checks.
"""

from __future__ import annotations

from .kernels import MarkovKernel
from .paths import AnnealingPath
from .schedules import AdaptiveSchedule
from .smc import SMC

__all__ = ["AIS"]


class AIS(SMC):
    """:class:`~latflow.samplers.annealing.smc.SMC` with ``resample_threshold = 0``.

    Parameters
    ----------
    path, kernel, schedule
        As for :class:`~latflow.samplers.annealing.smc.SMC`.
    """

    kind = "ais"

    def __init__(
        self, path: AnnealingPath, kernel: MarkovKernel | None, schedule: list[float] | int | AdaptiveSchedule
    ) -> None:
        super().__init__(path, kernel, schedule, resample_threshold=0.0)
