"""What every theory provides to the engine, the samplers and the analysis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from latflow.lattice import Lattice


@dataclass(frozen=True)
class Derived:
    """An observable computed from means of primary observables.

    ``func(*means)`` with ``means`` those of the datasets named in ``inputs``.
    """

    inputs: tuple[str, ...]
    func: Callable[..., float]
    description: str = ""


class Theory(Protocol):
    """A lattice theory: field layout, action and observables.

    Attributes
    ----------
    name
        Registry name (the ensemble's ``theory`` attribute).
    field_name
        Dataset name under ``fields/`` (``"phi"`` or ``"links"``).
    lattice
        The geometry.
    field_shape
        Shape of one configuration (without batch axis).
    """

    name: str
    field_name: str
    lattice: Lattice
    field_shape: tuple[int, ...]

    def couplings(self) -> dict[str, float]: ...

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """Action ``S[B]`` of configurations ``x`` ``[B, *field_shape]``."""
        ...

    def observables(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each ``[B]``."""
        ...

    def derived_observables(self) -> dict[str, Derived]: ...


@dataclass(frozen=True)
class TheorySpec:
    """Registry entry: the coupling dataclass and how to build the theory."""

    name: str
    params: type
    build: Callable[..., Any]
    description: str = ""
    field_name: str = "phi"  # dataset under fields/: "phi" (scalar) or "links" (gauge)
