"""Hybrid Monte Carlo on a field manifold (real scalars, U(1) angles, SU(N) links), batched over chains."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..manifolds import Euclidean, FieldManifold
from .records import SampleBlock

OMELYAN_LAMBDA = 0.1931833275037836  # minimum-norm 2nd-order integrator (Omelyan, Mryglod, Folk 2003)


def action_force(action: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``dS/dx`` ``[B, ...]`` by autograd for a batch of configurations ``x`` ``[B, ...]``."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(action(xg).sum(), xg)
    return grad


class HMC:
    """HMC on a field manifold (:mod:`latflow.manifolds`); ``B`` chains advanced in lock step.

    The manifold supplies the momenta and kinetic energy, the drift and kick of the integrator, the
    autograd force and the projection; the default :class:`latflow.manifolds.Euclidean` is HMC with
    unit-mass Gaussian momenta for real fields.

    Parameters
    ----------
    action
        ``x [B, ...] -> S [B]``.
    x0
        Initial configurations ``[B, ...]`` (one per chain).
    step_size, n_steps
        Integrator step and steps per trajectory (trajectory length ``n_steps * step_size``).
    generator
        Random stream for momenta and accept/reject.
    integrator
        ``"leapfrog"`` or ``"omelyan"`` (2nd-order minimum norm, two force evaluations per step).
    force
        Optional analytic force in the manifold's coordinates (``dS/dx`` for real fields, the su(N)
        force ``F`` of :mod:`latflow.manifolds` for SU(N) links); the manifold's autograd force otherwise.
    project
        Optional map applied after each accept/reject (e.g. wrapping angles into ``(-pi, pi]``);
        must leave the action unchanged. Default: the manifold's projection (none for ``Euclidean``).
    chain_offset
        Chain ids are ``chain_offset + b``.
    manifold
        The field's manifold; ``None`` means :class:`latflow.manifolds.Euclidean`.
    step_jitter
        Each trajectory draws its step size uniformly in
        ``step_size * [1 - step_jitter, 1 + step_jitter]`` (the same for all chains).
        This breaks the resonances of fixed-length trajectories (modes with
        ``omega * tau = pi`` never move in a free field); 0 disables it.
    """

    kind = "hmc"

    def __init__(
        self,
        action: Callable[[torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        *,
        step_size: float,
        n_steps: int,
        generator: torch.Generator,
        integrator: str = "leapfrog",
        force: Callable[[torch.Tensor], torch.Tensor] | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chain_offset: int = 0,
        step_jitter: float = 0.0,
        manifold: FieldManifold | None = None,
    ) -> None:
        if integrator not in ("leapfrog", "omelyan"):
            raise ValueError(f"integrator must be 'leapfrog' or 'omelyan', got {integrator!r}")
        if step_size <= 0 or n_steps < 1:
            raise ValueError("HMC needs step_size > 0 and n_steps >= 1")
        self.action = action
        self.manifold = manifold if manifold is not None else Euclidean()
        mf = self.manifold
        self.force = force if force is not None else (lambda x: mf.force(action, x))
        if project is None and type(mf) is not Euclidean:
            project = mf.project
        self.project = project
        self.x = x0.detach().clone()
        self.step_size = float(step_size)
        self.n_steps = int(n_steps)
        self.generator = generator
        self.integrator = integrator
        self.chain_offset = int(chain_offset)
        if not 0 <= step_jitter < 1:
            raise ValueError(f"step_jitter must be in [0, 1), got {step_jitter}")
        self.step_jitter = float(step_jitter)
        self.step = 0
        self.s = self.action(self.x).detach()

    @property
    def n_chains(self) -> int:
        return int(self.x.shape[0])

    def _integrate(self, x: torch.Tensor, p: torch.Tensor, eps: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # in-place updates of private copies: the hot loop allocates only the forces
        x = x.clone()
        p = p.clone()
        kick, drift, force = self.manifold.kick, self.manifold.drift, self.force
        if self.integrator == "leapfrog":
            p = kick(p, force(x), 0.5 * eps)
            for i in range(n):
                x = drift(x, p, eps)
                if i < n - 1:
                    p = kick(p, force(x), eps)
            p = kick(p, force(x), 0.5 * eps)
            return x, p
        lam = OMELYAN_LAMBDA
        p = kick(p, force(x), lam * eps)
        for i in range(n):
            x = drift(x, p, 0.5 * eps)
            p = kick(p, force(x), (1 - 2 * lam) * eps)
            x = drift(x, p, 0.5 * eps)
            p = kick(p, force(x), (2 * lam if i < n - 1 else lam) * eps)
        return x, p

    @torch.no_grad()
    def trajectory(
        self, step_size: float | None = None, n_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One trajectory for all chains; returns ``(accepted [B], delta_H [B])``."""
        eps = self.step_size if step_size is None else step_size
        n = self.n_steps if n_steps is None else n_steps
        if self.step_jitter > 0:
            u = torch.rand((), generator=self.generator, dtype=torch.float64, device=self.x.device).item()
            eps = eps * (1 + self.step_jitter * (2 * u - 1))
        mf = self.manifold
        p0 = mf.random_momenta(self.x, self.generator)
        # the Hamiltonian is accumulated in float64 whatever the field's precision
        h0 = mf.kinetic(p0) + self.s.double()
        x1, p1 = self._integrate(self.x, p0, eps, n)
        s1 = self.action(x1)
        h1 = mf.kinetic(p1) + s1.double()
        dh = h1 - h0
        u = torch.rand(self.n_chains, generator=self.generator, dtype=self.x.dtype.to_real(), device=self.x.device)
        acc = torch.log(u) < -dh
        acc = acc & torch.isfinite(dh)
        sel = acc.view(-1, *([1] * (self.x.dim() - 1)))
        x_new = torch.where(sel, x1, self.x)
        if self.project is not None:
            x_new = self.project(x_new)
        self.x = x_new
        self.s = torch.where(acc, s1, self.s)
        return acc, dh

    def tune(self, n_trajectories: int, target_acceptance: float = 0.8) -> float:
        """Adapt the step size during warm-up (trajectory length held fixed); returns it.

        Robbins-Monro on ``log step_size`` driven by the mean acceptance
        probability ``min(1, exp(-dH))``. Not part of the recorded chain.
        """
        traj_len = self.trajectory_length
        log_eps = math.log(self.step_size)
        for k in range(n_trajectories):
            eps, n = self._fit_step(math.exp(log_eps), traj_len)
            _, dh = self.trajectory(eps, n)
            p_acc = torch.clamp(torch.exp(-torch.nan_to_num(dh, nan=1e3)), max=1.0).mean().item()
            log_eps += (p_acc - target_acceptance) / (1 + k) ** 0.6
        return self.set_step_size(math.exp(log_eps))

    @property
    def trajectory_length(self) -> float:
        """``n_steps * step_size``."""
        return self.step_size * self.n_steps

    @staticmethod
    def _fit_step(step_size: float, traj_len: float) -> tuple[float, int]:
        n = max(1, math.ceil(traj_len / step_size - 1e-9))
        return traj_len / n, n

    def set_step_size(self, step_size: float) -> float:
        """Use the step closest to ``step_size`` (from above) that divides the trajectory
        length into a whole number of steps; the trajectory length is unchanged. Returns it."""
        self.step_size, self.n_steps = self._fit_step(step_size, self.trajectory_length)
        return self.step_size

    @torch.no_grad()
    def run(self, n_trajectories: int) -> SampleBlock:
        """``n_trajectories`` trajectories; rows ordered trajectory-major, ``n_trajectories * B`` of them."""
        xs, accs, lps, steps = [], [], [], []
        for _ in range(n_trajectories):
            acc, _ = self.trajectory()
            xs.append(self.x.clone())
            accs.append(acc)
            lps.append(-self.s)
            steps.append(torch.full((self.n_chains,), self.step, dtype=torch.long, device=self.x.device))
            self.step += 1
        x = torch.cat(xs)
        log_p = torch.cat(lps)
        chain = (torch.arange(self.n_chains, device=self.x.device) + self.chain_offset).repeat(n_trajectories)
        return SampleBlock(
            x=x,
            chain=chain,
            step=torch.cat(steps),
            accepted=torch.cat(accs),
            log_p=log_p,
            log_q=torch.zeros_like(log_p),
            log_w=torch.zeros_like(log_p),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "chain_offset": self.chain_offset,
            "generator": self.generator.get_state(),
            "x": self.x,
            "step_size": self.step_size,
            "n_steps": self.n_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
        self.step = int(state["step"])
        self.chain_offset = int(state["chain_offset"])
        self.generator.set_state(state["generator"])
        self.x = state["x"].to(self.x)
        self.step_size = float(state["step_size"])
        self.n_steps = int(state["n_steps"])
        self.s = self.action(self.x).detach()
