"""Ensemble description (:class:`EnsembleMeta`) and the errors every part of the package raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: How configurations are stored (root attribute ``storage``, JSON); the defaults are what a file
#: without the attribute holds: every configuration, uncompressed.
STORAGE_DEFAULTS: dict[str, Any] = {"save_every": 1, "compression": "none", "compression_level": 0}
COMPRESSIONS = ("none", "gzip", "lzf")


class EnsembleError(Exception):
    """A problem with an ensemble file; the message is one line and names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class EnsembleExistsError(EnsembleError):
    """The target ensemble exists and neither resume nor force was asked for."""


@dataclass(frozen=True)
class EnsembleMeta:
    """What an ensemble is a sample of, and how it was made (the root attributes of the file).

    Parameters
    ----------
    theory : str
        Theory name in the registry, e.g. ``"phi4"``, ``"u1"``.
    couplings : dict
        Every coupling by name (JSON-serialisable), e.g. ``{"beta": 6.0}``.
    lattice_shape : tuple of int
        ``(L0, L1, ...)``; axis 0 is time.
    sampler : dict
        Sampler ``"kind"`` and all its settings (JSON-serialisable).
    seed : int
        The seed the run started from.
    job : str
        Full text of the job file that produced the ensemble.
    model_sha256 : str
        Hash of the flow weights used (empty for HMC).
    storage : dict
        How configurations are stored: ``save_every`` (a configuration is kept every
        ``save_every`` Markov steps of each chain; observables are kept at every step),
        ``compression`` (``"none"``, ``"gzip"`` or ``"lzf"``, HDF5 filters on ``fields/*``) and
        ``compression_level`` (gzip: 1-9). Missing keys take :data:`STORAGE_DEFAULTS`. Not part of
        equality: two descriptions of the same ensemble may differ in how it is stored.
    """

    theory: str
    couplings: dict
    lattice_shape: tuple[int, ...]
    sampler: dict
    seed: int
    job: str = ""
    model_sha256: str = ""
    storage: dict = field(default_factory=dict, compare=False)  # how rows are stored, not what they sample

    @property
    def storage_settings(self) -> dict[str, Any]:
        """``storage`` with the defaults filled in."""
        return {**STORAGE_DEFAULTS, **dict(self.storage)}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
