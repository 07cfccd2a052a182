"""CRAFT: continual repeated annealed flow transport Monte Carlo (Matthews, Arbel, Rezende, Doucet 2022).

SMC with one transport flow per transition. Every CRAFT iteration is a full SMC pass; at each transition the
flow ``T_k`` transports the weighted particles, and takes one gradient step on the weighted estimate of
``KL(T_k # pi_{k-1} || pi_k)`` computed on those same particles. The particles are moved with the parameters
from *before* the step, which the particles have not influenced, so every iteration's ``Z`` estimate is
unbiased, during training as after it. After training, :meth:`CRAFT.run` is SMC with the frozen flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .core import AnnealResult
from .flow_transitions import pooled_weights, transition_kl
from .kernels import MarkovKernel
from .paths import AnnealingPath
from .population import LocalPopulation
from .smc import SMC
from .transport import TransportFlow

__all__ = ["CRAFT"]


class CRAFT:
    """CRAFT on ``K`` transitions with ``K`` transport flows.

    Parameters
    ----------
    path
        Annealing path.
    kernel
        Markov kernel after each transition.
    schedule
        Fixed times ``0 = t_0 < ... < t_K = 1`` or ``K`` (linear).
    flows
        ``K`` :class:`TransportFlow` (identity-initialised).
    resample_threshold, resampling
        As for :class:`~latflow.samplers.annealing.smc.SMC` (the paper resamples below ESS 0.3).
    lr
        Adam learning rate of the flows (the paper's 1e-3).
    grad_clip
        Clip each transition's gradient norm (None: no clipping).
    """

    kind = "craft"

    def __init__(
        self,
        path: AnnealingPath,
        kernel: MarkovKernel | None,
        schedule: list[float] | int,
        flows: Sequence[TransportFlow],
        *,
        resample_threshold: float = 0.3,
        resampling: str = "systematic",
        lr: float = 1e-3,
        grad_clip: float | None = None,
    ) -> None:
        self.smc = SMC(path, kernel, schedule, resample_threshold=resample_threshold, resampling=resampling)
        k = self.smc.n_transitions
        if k is None:
            raise ValueError("CRAFT needs a fixed schedule (one flow per transition)")
        if len(flows) != k:
            raise ValueError(f"CRAFT needs one flow per transition: {k} transitions, {len(flows)} flows")
        self.path = path
        self.flows = nn.ModuleList(flows)
        self.optimizer = torch.optim.Adam(self.flows.parameters(), lr=lr)
        self.grad_clip = grad_clip
        self.iteration = 0

    @property
    def ts(self) -> list[float]:
        return list(self.smc.schedule)  # type: ignore[arg-type]

    def train_iteration(
        self,
        n_particles: int,
        generator: torch.Generator,
        *,
        n_populations: int = 1,
        population: LocalPopulation | None = None,
        x0: torch.Tensor | None = None,
    ) -> AnnealResult:
        """One CRAFT iteration: an SMC pass that transports with the flows and trains each on its transition.

        Returns the pass's :class:`AnnealResult` (its ``log_z`` is a valid unbiased estimate);
        ``extra["loss"]`` holds the ``K`` transition objectives.

        ``population`` spread over MPI ranks (:class:`~latflow.samplers.annealing.population.SpreadPopulation`)
        makes the training data-parallel: each rank transports its share of the particles, the objective and its
        gradient are summed over ranks, and every rank takes the same optimiser step, so the ranks' flows stay
        identical. ``x0``: initial particles as for :meth:`SMC.run`.
        """
        pop = population or LocalPopulation(n_particles)
        losses: list[float] = []
        ts = self.ts
        params = {k: [p for p in f.parameters() if p.requires_grad] for k, f in enumerate(self.flows)}

        def transport(k: int, x: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flow = self.flows[k - 1]
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                weights = pooled_weights(log_w, population)
                loss, y, log_j = transition_kl(flow, self.path, x, weights, ts[k - 1], ts[k])
                if params[k - 1]:
                    loss.backward()
            if pop.size > 1:  # the objective sums over particles: sum the ranks' parts and gradients
                for q in params[k - 1]:
                    if q.grad is None:  # the same buffer layout on every rank
                        q.grad = torch.zeros_like(q)
                pop.sum_([q.grad for q in params[k - 1]])
                loss = torch.tensor(pop.sum(float(loss.detach())), dtype=torch.float64)
            if params[k - 1] and torch.isfinite(loss):
                if self.grad_clip:
                    nn.utils.clip_grad_norm_(params[k - 1], self.grad_clip)
                self.optimizer.step()
            losses.append(float(loss.detach()))
            return y.detach(), log_j.detach()

        result = self.smc.run(
            n_particles, generator, n_populations=n_populations, transport=transport, population=population, x0=x0
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        result.extra["loss"] = losses
        return result

    def train(
        self, n_iterations: int, n_particles: int, generator: torch.Generator, *, n_populations: int = 1
    ) -> list[AnnealResult]:
        """``n_iterations`` CRAFT iterations; returns their results."""
        return [self.train_iteration(n_particles, generator, n_populations=n_populations) for _ in range(n_iterations)]

    @torch.no_grad()
    def run(
        self,
        n_particles: int,
        generator: torch.Generator,
        *,
        n_populations: int = 1,
        population: LocalPopulation | None = None,
    ) -> AnnealResult:
        """SMC with the frozen flows (no training); independent populations give independent unbiased ``Z``."""

        def transport(k: int, x: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.flows[k - 1](x)

        return self.smc.run(
            n_particles, generator, n_populations=n_populations, transport=transport, population=population
        )

    def state_dict(self) -> dict[str, Any]:
        """Flows, optimiser and iteration count (the caller holds the generator)."""
        return {"flows": self.flows.state_dict(), "optimizer": self.optimizer.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flows.load_state_dict(state["flows"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
