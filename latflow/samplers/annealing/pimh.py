"""Particle independent Metropolis-Hastings (Andrieu, Doucet, Holenstein 2010): repeated independent
annealing runs turned into an exact Markov chain.

The state of a chain is a particle system with its estimate ``Z_hat`` and one particle chosen from it by its
weights. Each step runs a fresh system (SMC, AIS, AFT/CRAFT with frozen flows, an SNF: anything whose
``exp(log_z)`` is unbiased for ``Z``), draws a particle from it by its weights, and accepts the new system with
probability ``min(1, Z_hat_new / Z_hat_old)``; the chain's output is the chosen particle of the current system.
It is independence Metropolis-Hastings on the extended space of all the run's random variables, so the output
is distributed exactly as the target for any number of particles (the acceptance rises to 1 as the variance of
``log Z_hat`` falls). ``B`` chains run as ``B`` populations of one batched annealing pass per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..records import SampleBlock
from .core import AnnealResult, log_mean_exp, normalise_log_weights

__all__ = ["PIMH"]

# (n_particles, generator, n_populations=P) -> AnnealResult
SystemSampler = Callable[..., AnnealResult]


class PIMH:
    """Particle independent Metropolis-Hastings chains over batched annealing runs.

    Parameters
    ----------
    sampler
        An object with ``run(n_particles, generator, n_populations=P) -> AnnealResult`` (SMC, AIS, SNF, ...) or a
        callable with that signature; ``result.log_z`` ``[P]`` must be unbiased for ``Z`` after ``exp``.
    n_particles
        Particles per system.
    n_chains
        ``B`` independent chains (one population per chain in every annealing pass).
    generator
        The chains' random stream (annealing runs, particle choices, accept/reject draws).
    chain_offset
        Chain ids are ``chain_offset + b``.

    Notes
    -----
    Rows of :meth:`run` are step-major (``B`` rows per step): ``x`` the chosen particle of the current system,
    ``accepted`` whether the proposed system was accepted, ``log_p = log gamma_1(x)``, ``log_q = log_w = 0``
    and ``proposal_log_w`` the proposed system's ``log Z_hat`` (accepted or not: independent unbiased estimates,
    so their ``log mean exp`` estimates ``log Z`` again). The chains start (on the first :meth:`run`) from one
    unrecorded system each, so every recorded row is a Metropolis step.
    """

    kind = "pimh"

    def __init__(
        self,
        sampler: Any,
        n_particles: int,
        *,
        n_chains: int = 1,
        generator: torch.Generator,
        chain_offset: int = 0,
    ) -> None:
        if n_particles < 1 or n_chains < 1:
            raise ValueError(f"PIMH needs n_particles >= 1 and n_chains >= 1, got {n_particles}, {n_chains}")
        run = getattr(sampler, "run", None)
        if run is None and not callable(sampler):
            raise TypeError("PIMH needs an annealing sampler with run(n_particles, generator, n_populations=...)")
        self.proposal = sampler  # the annealing sampler (or callable) whose runs are the proposed systems
        self._run_systems: SystemSampler = run if run is not None else sampler
        self.n_particles = int(n_particles)
        self.n_chains = int(n_chains)
        self.generator = generator
        self.chain_offset = int(chain_offset)
        self.step = 0
        self.x: torch.Tensor | None = None  # chosen particle of each chain's current system [B, ...]
        self.log_p: torch.Tensor | None = None  # its log gamma_1 [B]
        self.log_z: torch.Tensor | None = None  # current systems' log Z_hat [B] float64
        self.log_w: torch.Tensor | None = None  # current systems' normalised log weights [B, N] float64
        self.n_accepted = torch.zeros(self.n_chains, dtype=torch.long)
        self.n_proposed = 0
        self.proposal_log_z: list[torch.Tensor] = []  # log Z_hat [B] of every system run by this object

    def _system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One fresh system per chain and a particle chosen from each by its weights.

        Draws the annealing pass, then one float64 uniform per chain for the choice.

        Returns
        -------
        x, log_p, log_z, log_w
            Chosen particles ``[B, ...]``, their ``log gamma_1`` ``[B]``, ``log Z_hat`` ``[B]`` (float64) and the
            systems' normalised log weights ``[B, N]``.
        """
        b, n = self.n_chains, self.n_particles
        res = self._run_systems(n, self.generator, n_populations=b)
        if tuple(res.log_w.shape) != (b, n) or tuple(res.log_z.shape) != (b,):
            raise ValueError(
                f"the annealing sampler returned log_w {tuple(res.log_w.shape)} and log_z {tuple(res.log_z.shape)}, "
                f"expected ({b}, {n}) and ({b},)"
            )
        log_w = normalise_log_weights(res.log_w.double())
        cdf = torch.cumsum(torch.exp(log_w), dim=1)
        u = torch.rand((b, 1), generator=self.generator, dtype=torch.float64, device=log_w.device)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=n - 1).view(b)
        rows = idx + n * torch.arange(b, device=idx.device)
        x = res.x[rows.to(res.x.device)].detach()
        log_p = res.log_p.view(b * n)[rows.to(res.log_p.device)].detach()
        log_z = res.log_z.double().detach()
        self.proposal_log_z.append(log_z.cpu())
        return x, log_p, log_z, log_w

    @torch.no_grad()
    def _start(self) -> None:
        """Initial state: one system per chain, accepted unconditionally (not recorded)."""
        self.x, self.log_p, self.log_z, self.log_w = self._system()
        if not bool(torch.isfinite(self.log_z).all()):
            raise RuntimeError("an initial PIMH system has log Z_hat = -inf or nan (all its weights vanish)")

    @torch.no_grad()
    def run(self, n_steps: int) -> SampleBlock:
        """Advance every chain by ``n_steps`` PIMH steps; rows step-major, ``n_steps * B`` of them.

        Each step draws one annealing pass, ``B`` uniforms for the particle choice and ``B`` for the
        accept/reject decision, so ``run(n1); run(n2)`` (with or without a state round trip) reproduces
        ``run(n1 + n2)`` bit for bit.
        """
        if self.x is None:
            self._start()
        assert self.x is not None and self.log_p is not None and self.log_z is not None and self.log_w is not None
        b = self.n_chains
        xs, lps, accs, steps, props = [], [], [], [], []
        for _ in range(int(n_steps)):
            x_new, lp_new, lz_new, lw_new = self._system()
            u = torch.rand(b, generator=self.generator, dtype=torch.float64, device=lz_new.device)
            log_ratio = lz_new - self.log_z.to(lz_new)
            acc = (torch.log(u) < log_ratio) & torch.isfinite(lz_new)
            acc_x = acc.to(self.x.device)
            self.x = torch.where(acc_x.view(-1, *([1] * (self.x.dim() - 1))), x_new.to(self.x), self.x)
            self.log_p = torch.where(acc.to(self.log_p.device), lp_new.to(self.log_p), self.log_p)
            self.log_z = torch.where(acc, lz_new, self.log_z.to(lz_new))
            self.log_w = torch.where(acc[:, None].to(self.log_w.device), lw_new.to(self.log_w), self.log_w)
            self.n_accepted += acc.long().cpu()
            self.n_proposed += 1
            xs.append(self.x.clone())
            lps.append(self.log_p.clone())
            accs.append(acc_x)
            props.append(lz_new.to(self.log_p.device))
            steps.append(torch.full((b,), self.step, dtype=torch.long, device=self.x.device))
            self.step += 1
        device = self.x.device
        if not xs:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return SampleBlock(
                x=self.x[:0],
                chain=empty,
                step=empty,
                accepted=empty.bool(),
                log_p=self.log_p[:0],
                log_q=self.log_p[:0],
                log_w=self.log_p[:0],
                proposal_log_w=self.log_p[:0],
            )
        log_p = torch.cat(lps)
        chain = (torch.arange(b, device=device) + self.chain_offset).repeat(len(xs))
        return SampleBlock(
            x=torch.cat(xs),
            chain=chain,
            step=torch.cat(steps),
            accepted=torch.cat(accs),
            log_p=log_p,
            log_q=torch.zeros_like(log_p),
            log_w=torch.zeros_like(log_p),
            proposal_log_w=torch.cat(props).to(log_p.dtype),
        )

    @property
    def acceptance_rate(self) -> torch.Tensor:
        """Fraction of accepted systems per chain ``[B]`` (float64; nan before the first step)."""
        if self.n_proposed == 0:
            return torch.full((self.n_chains,), math.nan, dtype=torch.float64)
        return self.n_accepted.double() / self.n_proposed

    def log_z_estimate(self) -> float:
        """``log mean exp`` of the ``log Z_hat`` of every system this object has run (all chains, the initial
        systems and every proposal, accepted or not): an unbiased estimate of ``Z`` after ``exp``."""
        if not self.proposal_log_z:
            raise RuntimeError("no system has been run yet")
        return float(log_mean_exp(torch.cat(self.proposal_log_z), dim=0))

    def current_ess(self) -> torch.Tensor:
        """ESS fraction ``[B]`` of each chain's current system."""
        if self.log_w is None:
            raise RuntimeError("the chains have not started")
        return torch.exp(-torch.logsumexp(2 * self.log_w, dim=-1)) / self.log_w.shape[-1]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the chains bit for bit (with the same annealing sampler)."""
        return {
            "kind": self.kind,
            "step": self.step,
            "chain_offset": self.chain_offset,
            "n_chains": self.n_chains,
            "n_particles": self.n_particles,
            "generator": self.generator.get_state(),
            "x": self.x,
            "log_p": self.log_p,
            "log_z": self.log_z,
            "log_w": self.log_w,
            "n_accepted": self.n_accepted.clone(),
            "n_proposed": self.n_proposed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
        if int(state["n_chains"]) != self.n_chains or int(state["n_particles"]) != self.n_particles:
            raise ValueError(
                f"sampler state has {state['n_chains']} chains of {state['n_particles']} particles, "
                f"this sampler {self.n_chains} of {self.n_particles}"
            )
        self.step = int(state["step"])
        self.chain_offset = int(state["chain_offset"])
        self.generator.set_state(state["generator"])
        dev = self.generator.device
        for name in ("x", "log_p", "log_z", "log_w"):
            value = state[name]
            setattr(self, name, None if value is None else value.to(dev))
        self.n_accepted = state["n_accepted"].clone().long().cpu()
        self.n_proposed = int(state["n_proposed"])
