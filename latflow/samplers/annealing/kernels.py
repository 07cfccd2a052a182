"""Markov kernels for annealing: each leaves ``gamma_t`` invariant at the current time ``t``.

A kernel maps particles ``x`` ``[B, ...]`` to new particles with the same invariant density; it works on any
field manifold (:mod:`latflow.manifolds`), so the same SMC runs on real scalars, U(1) angles and SU(N) links.
Step sizes may depend on the annealing time (piecewise-linear in ``t``, as in Arbel, Matthews, Doucet 2021).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ...manifolds import Euclidean, FieldManifold
from ..hmc import HMC
from .schedules import interpolate

__all__ = ["HMCKernel", "MarkovKernel", "RandomWalkMetropolis", "StepSize"]


class StepSize:
    """A step size piecewise linear in the annealing time ``t``.

    Parameters
    ----------
    values
        One value (constant) or values at ``knots``.
    knots
        Increasing times in ``[0, 1]``; default evenly spaced over ``[0, 1]``.
    """

    def __init__(self, values: float | Sequence[float], knots: Sequence[float] | None = None) -> None:
        vals = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
        if not vals or any(v <= 0 for v in vals):
            raise ValueError(f"step sizes must be positive, got {vals}")
        if knots is None:
            knots = (0.0,) if len(vals) == 1 else tuple(i / (len(vals) - 1) for i in range(len(vals)))
        ks = tuple(float(k) for k in knots)
        if len(ks) != len(vals) or any(b <= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"step-size knots must be increasing and match the values, got {ks} for {vals}")
        self.values, self.knots = vals, ks

    def __call__(self, t: float) -> float:
        return self.values[0] if len(self.values) == 1 else interpolate(self.knots, self.values, t)

    def __repr__(self) -> str:
        return f"StepSize({list(self.values)}, knots={list(self.knots)})"


class MarkovKernel(Protocol):
    """``move(x, log_gamma, t, generator, force=None) -> (x', accepted [B])``, invariant for ``exp(log_gamma)``;
    ``force`` is an optional analytic ``-d log_gamma / dx`` (kernels without gradients ignore it)."""

    def move(
        self,
        x: torch.Tensor,
        log_gamma: Callable[[torch.Tensor], torch.Tensor],
        t: float,
        generator: torch.Generator,
        force: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class EvaluatingKernel:
    """Base of the kernels here: :meth:`move` is :meth:`move_evaluated` without the final ``log_gamma``."""

    def move(
        self,
        x: torch.Tensor,
        log_gamma: Callable[[torch.Tensor], torch.Tensor],
        t: float,
        generator: torch.Generator,
        force: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, ...]`` -> ``(x', accepted [B])``: the int64 count of accepted updates per particle.

        ``force``: analytic ``-d log_gamma/dx`` in the manifold's coordinates (kernels without gradients ignore it)."""
        x, n_acc, _ = self.move_evaluated(x, log_gamma, t, generator, force)
        return x, n_acc

    def move_evaluated(
        self,
        x: torch.Tensor,
        log_gamma: Callable[[torch.Tensor], torch.Tensor],
        t: float,
        generator: torch.Generator,
        force: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class HMCKernel(EvaluatingKernel):
    """``n_trajectories`` HMC trajectories of ``n_steps`` integrator steps at the step size of time ``t``.

    Parameters
    ----------
    step_size
        :class:`StepSize` (or a number).
    n_steps
        Integrator steps per trajectory.
    n_trajectories
        Trajectories per application.
    integrator
        ``"leapfrog"`` or ``"omelyan"``.
    manifold
        The field's manifold (default real fields).
    step_jitter
        Each trajectory draws its step size uniformly in ``eps(t) [1 - step_jitter, 1 + step_jitter]``: a fixed
        trajectory length leaves modes with ``omega tau = k pi`` unmoved, so copies made by resampling would never
        spread out along them (free fields, Gaussian targets). 0 disables it.
    """

    def __init__(
        self,
        step_size: StepSize | float,
        n_steps: int,
        n_trajectories: int = 1,
        *,
        integrator: str = "leapfrog",
        manifold: FieldManifold | None = None,
        step_jitter: float = 0.0,
    ) -> None:
        self.step_size = step_size if isinstance(step_size, StepSize) else StepSize(step_size)
        if n_steps < 1 or n_trajectories < 1:
            raise ValueError("HMCKernel needs n_steps >= 1 and n_trajectories >= 1")
        self.n_steps = int(n_steps)
        self.n_trajectories = int(n_trajectories)
        self.integrator = integrator
        self.manifold = manifold if manifold is not None else Euclidean()
        if not 0 <= step_jitter < 1:
            raise ValueError(f"step_jitter must be in [0, 1), got {step_jitter}")
        self.step_jitter = float(step_jitter)

    def move_evaluated(
        self,
        x: torch.Tensor,
        log_gamma: Callable[[torch.Tensor], torch.Tensor],
        t: float,
        generator: torch.Generator,
        force: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`move`, and ``log_gamma(x')`` ``[B]`` as the last accept/reject left it (no extra evaluation)."""
        hmc = HMC(
            lambda y: -log_gamma(y),
            x,
            step_size=self.step_size(t),
            n_steps=self.n_steps,
            generator=generator,
            integrator=self.integrator,
            manifold=self.manifold,
            step_jitter=self.step_jitter,
            force=force,
        )
        n_acc = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.n_trajectories):
            acc, _ = hmc.trajectory()
            n_acc += acc.long()
        return hmc.x, n_acc, -hmc.s

    @property
    def proposals(self) -> int:
        return self.n_trajectories


class RandomWalkMetropolis(EvaluatingKernel):
    """``n_sweeps`` random-walk Metropolis updates of the whole field.

    The proposal moves every component along a standard Gaussian direction of the manifold
    (``x + sigma xi`` for real fields and angles, ``exp(sigma P) U`` for SU(N)); it is symmetric, so the
    acceptance is ``min(1, gamma(x') / gamma(x))``. Global proposals need ``sigma ~ V^(-1/2)``; for lattices
    larger than a few hundred sites HMC mixes far better.

    Parameters
    ----------
    step_size
        :class:`StepSize` (or a number): ``sigma`` at time ``t``.
    n_sweeps
        Updates per application.
    manifold
        The field's manifold (default real fields).
    """

    def __init__(self, step_size: StepSize | float, n_sweeps: int = 1, *, manifold: FieldManifold | None = None):
        self.step_size = step_size if isinstance(step_size, StepSize) else StepSize(step_size)
        if n_sweeps < 1:
            raise ValueError(f"RandomWalkMetropolis needs n_sweeps >= 1, got {n_sweeps}")
        self.n_sweeps = int(n_sweeps)
        self.manifold = manifold if manifold is not None else Euclidean()

    @torch.no_grad()
    def move_evaluated(
        self,
        x: torch.Tensor,
        log_gamma: Callable[[torch.Tensor], torch.Tensor],
        t: float,
        generator: torch.Generator,
        force: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`move`, and ``log_gamma(x')`` ``[B]`` (no extra evaluation)."""
        sigma = self.step_size(t)
        mf = self.manifold
        lg = log_gamma(x)
        n_acc = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.n_sweeps):
            y = mf.project(mf.drift(x.clone(), mf.random_momenta(x, generator), sigma))
            lg_y = log_gamma(y)
            u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64, device=x.device)
            acc = (torch.log(u) < (lg_y - lg).double()) & torch.isfinite(lg_y)
            x = torch.where(acc.view(-1, *([1] * (x.dim() - 1))), y, x)
            lg = torch.where(acc, lg_y, lg)
            n_acc += acc.long()
        return x, n_acc, lg

    @property
    def proposals(self) -> int:
        return self.n_sweeps
