"""Nested (Sexton-Weingarten) multi-time-scale integrators for HMC, leapfrog and Omelyan (2MN).

The action is split into levels ``S = S_0 + S_1 + ... + S_{L-1}``; level 0 is integrated with the
finest step, level ``L-1`` with the coarsest (the trajectory's ``n_steps`` steps of size ``eps``).
``multipliers[j]`` (``j = 0 .. L-2``) is the number of level-``j`` steps that integrate each drift
segment of a level-``j+1`` step:

- leapfrog: one level-``l`` step of size ``h`` is ``kick_l(h/2) [m level-(l-1) steps of h/m] kick_l(h/2)``;
- Omelyan: ``kick_l(lam h) [m steps of h/(2m)] kick_l((1-2 lam) h) [m steps of h/(2m)] kick_l(lam h)``,

and at level 0 the bracket is a plain drift. Both are symmetric compositions, so the map is
reversible and area preserving whenever every level's force is a function of the field alone.
Kicks that fall between the same two drifts are evaluated at the same field, so each level's force is
computed once there and its coefficients are summed (``lam h + lam h = 2 lam h`` between Omelyan steps);
with one level the sequence of operations, and every coefficient, is that of
:meth:`latflow.samplers.hmc.HMC._integrate`, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .hmc import OMELYAN_LAMBDA

__all__ = ["Schedule", "integrate_nested", "nested_schedule"]

# one operation: ("drift", None, coef) or ("kick", level, coef), coef in units of the outermost step eps
Op = tuple[str, int | None, float]
Schedule = list[list[tuple[int, float]] | float]


def _ops(level: int, h: float, multipliers: Sequence[int], integrator: str, out: list[Op]) -> None:
    """Append the operations of one level-``level`` step of size ``h`` (units of ``eps``) to ``out``."""
    if integrator == "leapfrog":
        out.append(("kick", level, 0.5 * h))
        if level == 0:
            out.append(("drift", None, h))
        else:
            m = multipliers[level - 1]
            for _ in range(m):
                _ops(level - 1, h / m, multipliers, integrator, out)
        out.append(("kick", level, 0.5 * h))
        return
    lam = OMELYAN_LAMBDA
    out.append(("kick", level, lam * h))
    for half in range(2):
        if level == 0:
            out.append(("drift", None, 0.5 * h))
        else:
            m = multipliers[level - 1]
            for _ in range(m):
                _ops(level - 1, 0.5 * h / m, multipliers, integrator, out)
        out.append(("kick", level, (1 - 2 * lam) * h if half == 0 else lam * h))


def nested_schedule(n_steps: int, multipliers: Sequence[int], integrator: str) -> Schedule:
    """The merged operation list of a trajectory of ``n_steps`` outermost steps of unit size.

    Returns
    -------
    list
        Alternating entries: a list of ``(level, coef)`` kicks at one field (each level at most once,
        coefficients summed), then a drift coefficient (float), ..., ending with a kick list. Multiply the
        coefficients by ``eps``.
    """
    if integrator not in ("leapfrog", "omelyan"):
        raise ValueError(f"integrator must be 'leapfrog' or 'omelyan', got {integrator!r}")
    if n_steps < 1 or any(int(m) < 1 for m in multipliers):
        raise ValueError(f"need n_steps >= 1 and time-scale multipliers >= 1, got {n_steps}, {list(multipliers)}")
    ops: list[Op] = []
    for _ in range(n_steps):
        _ops(len(multipliers), 1.0, [int(m) for m in multipliers], integrator, ops)
    sched: Schedule = []
    kicks: dict[int, float] = {}
    for kind, level, coef in ops:
        if kind == "kick":
            assert level is not None
            kicks[level] = kicks[level] + coef if level in kicks else coef
        else:
            sched.append(sorted(kicks.items()))
            sched.append(coef)
            kicks = {}
    sched.append(sorted(kicks.items()))
    return sched


def integrate_nested(
    x: torch.Tensor,
    p: torch.Tensor,
    eps: float,
    n_steps: int,
    forces: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    multipliers: Sequence[int],
    integrator: str,
    kick: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    drift: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate ``(x, p)`` over ``n_steps`` outermost steps of size ``eps`` on ``len(forces)`` time scales.

    Parameters
    ----------
    x, p
        Field ``[B, ...]`` and momenta (the manifold's shapes); not modified.
    eps, n_steps
        Outermost step size and number of outermost steps.
    forces
        ``forces[l]``: ``x -> dS_l/dx`` in the manifold's coordinates, level 0 the finest.
    multipliers
        ``len(forces) - 1`` integers >= 1 (module docstring).
    integrator
        ``"leapfrog"`` or ``"omelyan"``.
    kick, drift
        The manifold's ``kick(p, F, h)`` and ``drift(x, p, h)``.

    Returns
    -------
    x, p
        The end point.
    """
    if len(multipliers) != len(forces) - 1:
        raise ValueError(f"{len(forces)} force levels need {len(forces) - 1} multipliers, got {list(multipliers)}")
    x = x.clone()
    p = p.clone()
    for item in nested_schedule(n_steps, multipliers, integrator):
        if isinstance(item, list):
            for level, coef in item:
                p = kick(p, forces[level](x), coef * eps)
        else:
            x = drift(x, p, item * eps)
    return x, p
