"""Theory registry: look a theory up by the name used in job files and ensembles."""

from __future__ import annotations

from . import phi4, schwinger, su3, su3_nf2, u1, yukawa
from .base import Derived, Theory, TheorySpec

REGISTRY: dict[str, TheorySpec] = {
    spec.name: spec for spec in (phi4.SPEC, u1.SPEC, schwinger.SPEC, su3.SPEC, su3_nf2.SPEC, yukawa.SPEC)
}


def get_spec(name: str) -> TheorySpec:
    """Registry entry for ``name``; ``KeyError`` lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown theory {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["Derived", "REGISTRY", "Theory", "TheorySpec", "get_spec"]
