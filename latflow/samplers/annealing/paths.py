"""Annealing paths: a family of unnormalised densities ``gamma_t``, ``t`` in ``[0, 1]``, from an exactly
sampled start with known ``Z_0`` to the target.

Two families cover the package's uses:

- :class:`GeometricPath`: ``log gamma_t = (1 - t) log r(x) + t log p(x)`` between a normalised prior ``r``
  (Gaussian, Haar, a plaquette prior, ...) and the target's ``log p = -S``; ``Z_0 = 1``.
- :class:`CouplingPath`: ``log gamma_t = log p_{c(t)}(x)``, the target at a coupling moved along a schedule
  (beta from 0 in a gauge theory, kappa from 0 in a theory with fermions), started from an exact sampler of
  ``t = 0`` whose ``log Z_0`` is known (the Haar measure, an exactly solvable pure gauge theory).

Both measure densities against the same base measure as the prior's ``log_prob`` (Lebesgue on real fields and
on U(1) angles, the Haar probability measure on SU(N) links), so ``log Z`` estimates are in that measure too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

__all__ = ["AnnealingPath", "CouplingPath", "GeometricPath"]


@runtime_checkable
class AnnealingPath(Protocol):
    """What the annealing samplers need from a path.

    Attributes
    ----------
    log_z0
        ``log Z_0`` of ``gamma_0`` (0 for a normalised prior).
    """

    log_z0: float

    def sample_initial(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact draws ``[n, ...]`` of ``gamma_0 / Z_0``."""
        ...

    def log_gamma(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Unnormalised ``log gamma_t(x)`` ``[B]`` of configurations ``x`` ``[B, ...]`` (differentiable in ``x``)."""
        ...

    def linear_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(a, b)`` ``[B]`` with ``log gamma_t(x) = a + t b`` for every ``t``, or None if not linear in ``t``.

        Lets adaptive schedules search ``t`` without evaluating the path again."""
        ...

    #: ``(x, t) -> -d log gamma_t / dx`` in the manifold's coordinates (an analytic HMC force), or None: the
    #: kernels then differentiate :meth:`log_gamma` by autograd.
    force: Callable[[torch.Tensor, float], torch.Tensor] | None


class GeometricPath:
    """``log gamma_t(x) = (1 - t) log r(x) + t log p(x)``.

    Parameters
    ----------
    prior
        Normalised prior with ``sample(n, generator) -> (x [n, ...], log_r [n])`` and ``log_prob(x) -> [B]``
        (the flows' priors of :mod:`latflow.priors`, :mod:`latflow.gauge`, ...).
    log_target
        ``x [B, ...] -> log p [B]`` (``-S``; the effective action where fermions are integrated out).
    target_force
        Optional analytic ``dS/dx`` of the target in the manifold's coordinates (a theory's ``force``); with a prior
        that has ``force(x)`` (``-d log r/dx``) the path's HMC force is then analytic too.
    """

    log_z0 = 0.0

    def __init__(
        self,
        prior: object,
        log_target: Callable[[torch.Tensor], torch.Tensor],
        target_force: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.prior = prior
        self.log_target = log_target
        prior_force = getattr(prior, "force", None)
        self.force = None
        if target_force is not None and callable(prior_force):

            def force(x: torch.Tensor, t: float) -> torch.Tensor:
                if t == 1.0:
                    return target_force(x)
                return (1.0 - t) * prior_force(x) + t * target_force(x)

            self.force = force

    def sample_initial(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x, _ = self.prior.sample(n, generator)  # type: ignore[attr-defined]
        return x.detach()

    def log_gamma(self, x: torch.Tensor, t: float) -> torch.Tensor:
        if t == 0.0:
            return self.prior.log_prob(x)  # type: ignore[attr-defined]
        if t == 1.0:
            return self.log_target(x)
        return (1.0 - t) * self.prior.log_prob(x) + t * self.log_target(x)  # type: ignore[attr-defined]

    def linear_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_r = self.prior.log_prob(x)  # type: ignore[attr-defined]
        return log_r, self.log_target(x) - log_r


class CouplingPath:
    """``log gamma_t(x) = log p(x; c(t))``: the target with a coupling moved along ``t``.

    Parameters
    ----------
    sample_initial
        ``(n, generator) -> x [n, ...]``: exact draws at ``t = 0``.
    log_z0
        ``log Z`` at ``t = 0`` in the measure of the densities.
    log_density
        ``(x [B, ...], t) -> log gamma_t(x) [B]``.
    linear
        ``x -> (a, b)`` with ``log gamma_t = a + t b`` when the coupling enters linearly (e.g. ``beta t`` in a
        Wilson action); None otherwise.
    force
        Optional analytic ``(x, t) -> -d log gamma_t / dx`` in the manifold's coordinates.
    """

    def __init__(
        self,
        sample_initial: Callable[[int, torch.Generator], torch.Tensor],
        log_z0: float,
        log_density: Callable[[torch.Tensor, float], torch.Tensor],
        linear: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        force: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    ) -> None:
        self.force = force
        self._sample = sample_initial
        self.log_z0 = float(log_z0)
        self._log_density = log_density
        self._linear = linear

    def sample_initial(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._sample(n, generator).detach()

    def log_gamma(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self._log_density(x, t)

    def linear_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self._linear is None else self._linear(x)
