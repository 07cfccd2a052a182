"""Whether an ensemble holds every step its run asked for (:func:`completeness`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .reader import EnsembleReader


@dataclass(frozen=True)
class Completeness:
    """Committed Markov steps per chain against the run's ``n_samples``.

    Attributes
    ----------
    n_samples : int or None
        Steps per chain the run asked for (``n_samples`` of the ``sampler`` attribute); None
        where the file does not record it.
    steps : tuple of int
        Committed steps (rows) of each chain, in order of the sorted ``markov/chain`` ids (one
        chain if there is no ``markov/chain``); ``()`` for an empty ensemble. Weighted ensembles:
        the particles of each committed run.
    weighted : bool
        A weighted ensemble (annealing runs), whose ``n_samples`` counts runs.
    """

    n_samples: int | None
    steps: tuple[int, ...]
    weighted: bool = False

    @property
    def complete(self) -> bool:
        """Every chain holds at least ``n_samples`` steps, or (weighted) ``n_samples`` runs are committed
        (True where ``n_samples`` is unknown)."""
        if self.n_samples is None:
            return True
        if self.weighted:
            return len(self.steps) >= self.n_samples
        return bool(self.steps) and min(self.steps) >= self.n_samples

    def describe(self) -> str:
        """E.g. ``"4000 of 20000 steps per chain committed (4 chains)"``, ``"12 of 16 runs committed (64 particles
        per run)"``."""
        if self.weighted:
            of = f" of {self.n_samples}" if self.n_samples is not None else ""
            size = (
                ""
                if not self.steps
                else str(self.steps[0])
                if min(self.steps) == max(self.steps)
                else (f"{min(self.steps)}-{max(self.steps)}")
            )
            return f"{len(self.steps)}{of} runs committed" + (f" ({size} particles per run)" if size else "")
        if not self.steps:
            done = "0"
        elif min(self.steps) == max(self.steps):
            done = str(self.steps[0])
        else:
            done = f"{min(self.steps)}-{max(self.steps)}"
        of = f" of {self.n_samples}" if self.n_samples is not None else ""
        chains = len(self.steps)
        return f"{done}{of} steps per chain committed ({chains} chain{'s' if chains != 1 else ''})"


def completeness(reader: EnsembleReader) -> Completeness:
    """Committed steps per chain of an open ensemble, and the ``n_samples`` it was asked for.

    Parameters
    ----------
    reader : EnsembleReader
        The open ensemble.

    Returns
    -------
    Completeness
    """
    raw = reader.sampler.get("n_samples") if isinstance(reader.sampler, dict) else None
    n_samples = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else None
    n = int(reader.n_committed)
    if getattr(reader, "is_weighted", False):
        particles = reader.runs().get("annealing/n_particles", np.zeros(0, np.int64))
        return Completeness(n_samples, tuple(int(p) for p in particles), weighted=True)
    if n == 0:
        return Completeness(n_samples, ())
    if reader.has("markov/chain"):
        _, counts = np.unique(np.asarray(reader.read("markov/chain")).reshape(-1), return_counts=True)
        steps = tuple(int(c) for c in counts)
    else:
        steps = (n,)
    return Completeness(n_samples, steps)
