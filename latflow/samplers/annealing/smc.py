"""Sequential Monte Carlo samplers (Del Moral, Doucet, Jasra 2006) along an annealing path, with optional
transport maps between temperatures (the common engine of SMC, AIS, AFT and CRAFT).

One transition ``t_{k-1} -> t_k`` on weighted particles ``(x_i, W_i)``:

1. transport (AFT/CRAFT): ``y_i = T_k(x_i)`` with ``log |det dT_k / dx|`` (identity otherwise);
2. reweight: ``log w_i = log gamma_k(y_i) + log|J_k(x_i)| - log gamma_{k-1}(x_i)``; the run's ``log Z`` grows
   by ``log sum_i W_i w_i``;
3. resample the population if its ESS fraction fell below ``resample_threshold``;
4. move every particle with a Markov kernel that leaves ``gamma_k`` invariant.

``Z_0 prod_k sum_i W_i w_i`` is an unbiased estimate of ``Z = Z_1`` for a fixed schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .core import AnnealResult, ess_fraction, reweight
from .kernels import MarkovKernel
from .paths import AnnealingPath
from .population import LocalPopulation
from .resampling import RESAMPLERS, resampled_log_weights
from .schedules import AdaptiveSchedule, fixed_schedule

__all__ = ["SMC", "Transport"]

# transport(k, x [P*N, ...], log_W [P, N]) -> (y [P*N, ...], log_j [P*N]); k = 1..K, the transition t_{k-1} -> t_k
Transport = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SMC:
    """Annealed SMC with resampling and Markov moves, batched over independent populations.

    Parameters
    ----------
    path
        :class:`~latflow.samplers.annealing.paths.AnnealingPath`.
    kernel
        Markov kernel applied after each transition (None: no moves).
    schedule
        Times ``0 = t_0 < ... < t_K = 1``, an int ``K`` (linear), or an :class:`AdaptiveSchedule`.
    resample_threshold
        Resample a population when its ESS fraction falls below this (0: never, which is AIS; 1: always).
    resampling
        ``"systematic"`` or ``"multinomial"``.
    """

    kind = "smc"

    def __init__(
        self,
        path: AnnealingPath,
        kernel: MarkovKernel | None,
        schedule: list[float] | int | AdaptiveSchedule,
        *,
        resample_threshold: float = 0.5,
        resampling: str = "systematic",
    ) -> None:
        if isinstance(schedule, int):
            schedule = fixed_schedule(schedule)
        if isinstance(schedule, list):
            ts = [float(t) for t in schedule]
            if len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0 or any(b <= a for a, b in zip(ts, ts[1:])):
                raise ValueError("an annealing schedule must increase strictly from 0 to 1")
            schedule = ts
        if not 0 <= resample_threshold <= 1:
            raise ValueError(f"resample_threshold must be in [0, 1], got {resample_threshold}")
        if resampling not in RESAMPLERS:
            raise ValueError(f"resampling must be one of {sorted(RESAMPLERS)}, got {resampling!r}")
        self.path = path
        self.kernel = kernel
        self.schedule = schedule
        self.resample_threshold = float(resample_threshold)
        self.resampling = resampling

    @property
    def n_transitions(self) -> int | None:
        """``K`` for a fixed schedule, None for an adaptive one."""
        return len(self.schedule) - 1 if isinstance(self.schedule, list) else None

    def run(
        self,
        n_particles: int,
        generator: torch.Generator,
        *,
        n_populations: int = 1,
        transport: Transport | None = None,
        x0: torch.Tensor | None = None,
        population: LocalPopulation | None = None,
    ) -> AnnealResult:
        """Anneal ``n_populations`` independent populations of ``n_particles`` each.

        Parameters
        ----------
        n_particles
            ``N`` per population.
        generator
            The random stream of every draw (initial particles, resampling, kernels).
        n_populations
            ``P`` independent runs, batched.
        transport
            Optional map per transition (:data:`Transport`); needs a fixed schedule.
        x0
            Initial particles ``[P * N, ...]`` instead of fresh draws (must be exact draws of ``gamma_0``).
        population
            Where the particles live (:mod:`~latflow.samplers.annealing.population`). Spread over MPI ranks
            (every rank calls ``run`` with the same arguments), each rank holds ``population.n_local`` of the
            ``N = n_particles`` particles of each population (``x0`` is then this rank's slice
            ``[P * n_local, ...]``, ``generator`` this rank's own stream); weights, ESS, resampling and ``log Z``
            are global and every rank returns the same ``log_z``. None: all particles here.

        Returns
        -------
        AnnealResult
            Final particles ``[P * N, ...]``, weights ``[P, N]``, ``log Z`` ``[P]``, diagnostics.
        """
        p, n_total = int(n_populations), int(n_particles)
        if p < 1 or n_total < 1:
            raise ValueError("SMC needs n_particles >= 1 and n_populations >= 1")
        spread = population is not None and population.size > 1
        if population is None:
            population = LocalPopulation(n_total)
        if population.n_total != n_total:
            raise ValueError(f"population of {population.n_total} particles, but n_particles = {n_total}")
        n = population.n_local
        if transport is not None and not isinstance(self.schedule, list):
            raise ValueError("transport maps need a fixed schedule (one map per transition)")
        path = self.path
        x = path.sample_initial(p * n, generator) if x0 is None else x0.detach()
        real = x.real.dtype if x.is_complex() else x.dtype
        log_w = torch.full((p, n), -math.log(n_total), dtype=torch.float64, device=x.device)
        log_z = torch.full((p,), float(path.log_z0), dtype=torch.float64, device=x.device)
        result = AnnealResult(x=x, log_w=log_w, log_z=log_z, log_p=torch.empty(0), ts=[0.0])
        t = 0.0
        k = 0
        with torch.no_grad():
            lg_prev = path.log_gamma(x, 0.0).double()
        while t < 1.0:
            k += 1
            if isinstance(self.schedule, list):
                t_next = self.schedule[k]
            else:
                if k > self.schedule.max_steps:
                    raise RuntimeError(f"adaptive schedule did not reach t = 1 in {self.schedule.max_steps} steps")
                t_next = self._adaptive_next(t, x, log_w, lg_prev, p, n, population)
            if transport is not None:
                y, log_j = transport(k, x, log_w)
                y, log_j = y.detach(), log_j.detach().double()
            else:
                y, log_j = x, torch.zeros(p * n, dtype=torch.float64, device=x.device)
            with torch.no_grad():
                lg_new = path.log_gamma(y, t_next).double()
            inc = (lg_new + log_j - lg_prev).view(p, n)
            log_w, log_ratio = reweight(log_w, inc, population)
            log_z = log_z + log_ratio
            x, lg_prev = y, lg_new
            ess = ess_fraction(log_w, population)
            which = ess < self.resample_threshold
            result.ess.append(ess.cpu())
            result.resampled.append(which.cpu())
            if bool(which.any()):
                draws = population.shared_generator or generator  # the same ancestors on every rank
                ancestors = RESAMPLERS[self.resampling](population.gather(log_w), draws)
                x, lg_prev = population.select([x, lg_prev], which, ancestors)
                log_w = resampled_log_weights(log_w, which, n_total)
            if self.kernel is not None:
                path_force = getattr(path, "force", None)
                force = None if path_force is None else (lambda z, s=t_next: path_force(z, s))
                log_gamma = lambda z, s=t_next: path.log_gamma(z, s)  # noqa: E731
                evaluated = getattr(self.kernel, "move_evaluated", None)
                if evaluated is not None:  # the kernel knows log gamma where it left the particles
                    x, n_acc, lg = evaluated(x, log_gamma, t_next, generator, force)
                    lg_prev = lg.detach().double()
                else:
                    x, n_acc = self.kernel.move(x, log_gamma, t_next, generator, force=force)
                    with torch.no_grad():
                        lg_prev = path.log_gamma(x, t_next).double()
                if spread:
                    mean_acc = population.sum(float(n_acc.double().sum())) / (p * n_total)
                else:
                    mean_acc = float(n_acc.double().mean())
                result.acceptance.append(mean_acc / self.kernel.proposals)  # type: ignore[attr-defined]
            else:
                result.acceptance.append(float("nan"))
            t = t_next
            result.ts.append(t)
        result.x = x
        result.log_w = log_w
        result.log_z = log_z
        result.log_p = lg_prev.to(real)
        result.population = population if spread else None
        return result

    def _adaptive_next(
        self,
        t: float,
        x: torch.Tensor,
        log_w: torch.Tensor,
        lg_prev: torch.Tensor,
        p: int,
        n: int,
        population: LocalPopulation,
    ) -> float:
        assert isinstance(self.schedule, AdaptiveSchedule)
        with torch.no_grad():
            parts = self.path.linear_parts(x)
            if parts is not None:
                a, b = (v.double() for v in parts)

                def increment(s: float) -> torch.Tensor:
                    return (a + s * b - lg_prev).view(p, n)

            else:

                def increment(s: float) -> torch.Tensor:
                    return (self.path.log_gamma(x, s).double() - lg_prev).view(p, n)

            return self.schedule.next(t, log_w, increment, None if population.size == 1 else population)
