"""HMC with pseudofermions: Nf = 2 Wilson fermions on U(1) or SU(N) gauge links, batched over chains.

Target ``exp(-S_g(U)) det(D^dag D)``, sampled jointly with pseudofermions ``phi`` from
``exp(-S_g(U) - S_pf(U, phi))`` (:class:`latflow.fermions.pseudofermions.Nf2Pseudofermions`).
The field's manifold (:mod:`latflow.manifolds`: :class:`~latflow.manifolds.U1Angles` for angles
``theta`` ``[B, d, *L]``, :class:`~latflow.manifolds.SUN` for links ``[B, d, *L, N, N]``) supplies
momenta, kinetic energy, drift, kick, the complex links of the field and the projection.
Each trajectory, for every chain at once:

1. (optional) jitter of the step size, one draw shared by all chains;
2. momenta from the manifold (``p ~ N(0, 1)`` per angle; Gaussian su(N) per SU(N) link);
3. pseudofermion heatbath, one field per factor and chain (``S_pf = sum |chi|^2`` exactly);
4. molecular dynamics (Omelyan or leapfrog, as :class:`latflow.samplers.hmc.HMC`) with the force
   of ``S_g + S_pf`` at fixed ``phi`` (U(1): ``dS/dtheta``; SU(N): ``F = (1/2) ta(G U^dagger)``
   from the closed-form ``G = dS_pf/dU``);
5. Metropolis on ``H = K(p) + S_g + S_pf`` (``S_pf`` at the end point by CG), accumulated in float64;
6. accepted fields are projected (angles wrapped into ``(-pi, pi]``; SU(N) links re-unitarised).

Draws go in that order through one caller-held generator, so a state saved between
trajectories continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from latflow.fermions.pseudofermions import Nf2Pseudofermions
from latflow.fermions.wilson import WilsonDirac
from latflow.manifolds import SUN, Euclidean, FieldManifold, U1Angles

from .hmc import HMC, action_force
from .integrators import integrate_nested
from .records import SampleBlock

__all__ = ["PseudofermionHMC"]


class PseudofermionHMC(HMC):
    """Nf = 2 HMC for U(1) or SU(N) gauge links with Wilson pseudofermions; ``B`` chains in lock step.

    Parameters
    ----------
    gauge_action
        ``x -> S_g [B]`` for the field ``x`` (angles ``[B, d, *L]`` or SU(N) links ``[B, d, *L, N, N]``).
    dirac
        Wilson operator at the target ``kappa`` (``n_colors = 1`` for U(1), ``N`` for SU(N)).
    theta0
        Initial field (one configuration per chain): real angles ``[B, d, *L]`` for U(1), complex
        SU(N) links ``[B, d, *L, N, N]``.
    step_size, n_steps, generator, integrator, step_jitter, chain_offset
        As in :class:`latflow.samplers.hmc.HMC` (default integrator: Omelyan).
    gauge_force
        Analytic gauge force in the manifold's coordinates (``dS_g/dtheta``; the su(N) force for
        SU(N)); autograd of ``gauge_action`` through the manifold when ``None``.
    even_odd
        Pseudofermions for the even/odd Schur complement ``M_hat`` (``det D = det M_hat``).
    hasenbusch_kappas
        Hasenbusch hopping parameters, strictly increasing in ``(0, kappa)``; one extra
        pseudofermion per entry.
    time_scales
        Multipliers of a nested (Sexton-Weingarten) integrator, ``[]`` (default): every force on one
        time scale, as before. ``[m_0, ..., m_{L-2}]`` gives ``L`` levels: level 0 (finest) the gauge
        force; the pseudofermion factors (heaviest first) on levels ``1 .. L-1``, factor ``f`` on level
        ``min(f + 1, L - 1)``: with 2 levels all factors on level 1; with 3 levels the plain (heaviest,
        Hasenbusch-mass) factor on level 1 and the ratio factors on level 2 (coarsest); at most one level
        per factor. The coarsest level takes ``n_steps`` steps of ``step_size``; every drift segment of a
        level-``j+1`` step (leapfrog: one; Omelyan: two halves) is integrated by ``m_j`` level-``j`` steps
        (:mod:`latflow.samplers.integrators`).
    chrono
        Chronological initial guesses for the force solves: ``0`` (default) zero guesses; ``1`` the last
        solution of the same factor in this trajectory; ``k >= 2`` the minimal-residual extrapolation of
        the last ``k`` (:meth:`Nf2Pseudofermions.set_chrono`). The history starts empty every trajectory.
    solver, check_every
        How the pseudofermion systems are solved (:meth:`Nf2Pseudofermions.set_solver`): ``"cg"`` (default) or
        ``"cg_mixed"`` (single-precision inner CG, double-precision defect correction to ``tol``); host-side
        convergence checks every ``check_every`` iterations (``None``: 1 on the CPU, 10 on accelerators).
    tol, max_iter
        CG tolerance (relative residual) and limit of every solve. A solve that does not converge
        raises :class:`latflow.fermions.solvers.ConvergenceError`.
    manifold
        The field's manifold; ``None``: :class:`~latflow.manifolds.U1Angles` for ``n_colors = 1``,
        ``SUN(n_colors)`` otherwise. It must provide ``links`` and ``link_force`` (unless ``pseudofermions`` is
        given; then :class:`~latflow.manifolds.Euclidean` by default).
    pseudofermions
        Factors built elsewhere instead of :class:`Nf2Pseudofermions` (``refresh``, ``action``, ``force``, ``config``,
        solver statistics), e.g. the staggered pseudofermion of the Yukawa theory, whose background is the scalar
        field itself (:meth:`for_theory` takes them from a theory's ``pseudofermions(...)``). ``even_odd``,
        ``hasenbusch_kappas``, ``tol`` and ``max_iter`` are then those of the given factors.

    Attributes
    ----------
    pseudofermions
        The :class:`Nf2Pseudofermions` container.
    last_cg_iterations
        ``[B]`` CG iterations of the last trajectory, summed over all solves of all factors
        (heatbath, forces, final action).
    last_run_cg_iterations, last_run_delta_h
        ``[n_trajectories, B]`` of the last :meth:`run`.

    Notes
    -----
    Records (:meth:`run`): ``log_p = -(S_g + S_pf)`` of each chain's state after the trajectory,
    with that trajectory's pseudofermions (accepted: ``S_pf`` at the new links by CG; rejected:
    ``sum |chi|^2``, its exact value at the old links). It depends on the pseudofermions drawn and
    is not the marginal log density ``-S_g + log det(D^dag D)`` (small lattices: use the theory's
    exact effective action where that is needed). ``log_q = log_w = 0``.

    With ``chrono = 0`` every solve starts from a zero guess, so the force is a deterministic function
    of the links and the integrator is exactly reversible and area preserving whatever the CG tolerance;
    the tolerance only enters the accept/reject through ``S_pf`` at the end point. With ``chrono > 0``
    the force depends on the earlier solutions through the guess, by at most the CG tolerance, so the
    molecular dynamics is reversible only to that tolerance; the Metropolis step still uses ``S_pf`` at
    the end point from an independent solve started at zero, as ``H`` at the start is exact (heatbath).
    """

    kind = "pf-hmc"

    def __init__(
        self,
        gauge_action: Callable[[torch.Tensor], torch.Tensor],
        dirac: WilsonDirac,
        theta0: torch.Tensor,
        *,
        step_size: float,
        n_steps: int,
        generator: torch.Generator,
        gauge_force: Callable[[torch.Tensor], torch.Tensor] | None = None,
        even_odd: bool = False,
        hasenbusch_kappas: tuple[float, ...] = (),
        tol: float = 1e-10,
        max_iter: int = 10_000,
        integrator: str = "omelyan",
        step_jitter: float = 0.0,
        chain_offset: int = 0,
        manifold: FieldManifold | None = None,
        pseudofermions: Any = None,
        time_scales: tuple[int, ...] | list[int] = (),
        chrono: int = 0,
        solver: str = "cg",
        check_every: int | None = None,
    ) -> None:
        n_colors = int(getattr(dirac, "n_colors", None) or 1)
        if pseudofermions is not None:
            # a theory's own pseudofermions (e.g. staggered on a scalar background): the field is the background
            manifold = Euclidean() if manifold is None else manifold
        elif manifold is None:
            manifold = U1Angles() if n_colors == 1 else SUN(n_colors)
        if pseudofermions is not None:
            if not hasattr(manifold, "links") and tuple(theta0.shape[1:]) != tuple(dirac.lattice.shape):
                raise ValueError(
                    f"the initial field must be [B, {', '.join(map(str, dirac.lattice.shape))}], "
                    f"got {list(theta0.shape)}"
                )
        elif n_colors == 1:
            if (
                theta0.is_complex()
                or theta0.dim() != 2 + dirac.lattice.dim
                or tuple(theta0.shape[1:]) != (dirac.lattice.dim, *dirac.lattice.shape)
            ):
                raise ValueError(
                    f"theta0 must be real link angles [B, {dirac.lattice.dim}, "
                    f"{', '.join(map(str, dirac.lattice.shape))}], got {list(theta0.shape)} ({theta0.dtype})"
                )
        elif not theta0.is_complex() or tuple(theta0.shape[1:]) != tuple(dirac.link_shape):
            raise ValueError(
                f"SU({n_colors}) links must be complex [B, {', '.join(map(str, dirac.link_shape))}], "
                f"got {list(theta0.shape)} ({theta0.dtype})"
            )
        if pseudofermions is None and not (hasattr(manifold, "links") and hasattr(manifold, "link_force")):
            raise ValueError(f"PF-HMC needs a gauge manifold with links() and link_force(), got {manifold!r}")
        if pseudofermions is None:
            pseudofermions = Nf2Pseudofermions(
                dirac, even_odd=even_odd, hasenbusch_kappas=tuple(hasenbusch_kappas), tol=tol, max_iter=max_iter
            )
        self.pseudofermions = pseudofermions
        self.time_scales = self._check_time_scales(time_scales, pseudofermions)
        if int(chrono) != chrono or chrono < 0:
            raise ValueError(f"chrono must be an integer >= 0, got {chrono!r}")
        self.chrono = int(chrono)
        if self.chrono:
            if not hasattr(pseudofermions, "set_chrono"):
                raise ValueError(f"chrono = {chrono}: these pseudofermions do not support chronological guesses")
            pseudofermions.set_chrono(self.chrono)
        if solver != "cg" or check_every is not None:
            if not hasattr(pseudofermions, "set_solver"):
                raise ValueError(f"solver = {solver!r}: these pseudofermions support only plain CG")
            pseudofermions.set_solver(solver, check_every=check_every)
        # the operator's background: complex links of a gauge field, or the field itself (a scalar)
        self._background = manifold.links if hasattr(manifold, "links") else (lambda x: x)
        self.gauge_action = gauge_action
        if gauge_force is None:
            if n_colors == 1:
                gauge_force = lambda x: action_force(gauge_action, x)  # noqa: E731
            else:
                gauge_force = lambda x: manifold.force(gauge_action, x)  # noqa: E731
        self.gauge_force = gauge_force
        self.dirac = dirac
        self._phis: list[torch.Tensor] | None = None
        super().__init__(
            gauge_action,
            theta0,
            step_size=step_size,
            n_steps=n_steps,
            generator=generator,
            integrator=integrator,
            force=self.total_force,
            project=manifold.project,
            chain_offset=chain_offset,
            step_jitter=step_jitter,
            manifold=manifold,
        )
        self.last_cg_iterations = torch.zeros(self.n_chains, dtype=torch.long, device=self.x.device)
        self.last_run_cg_iterations: torch.Tensor | None = None
        self.last_run_delta_h: torch.Tensor | None = None

    @classmethod
    def for_theory(cls, theory: Any, theta0: torch.Tensor, **kwargs: Any) -> PseudofermionHMC:
        """Build from a theory with ``gauge_action``, ``gauge_force`` and ``dirac`` (e.g. Schwinger, su3-nf2).

        A theory with a gauge ``manifold`` attribute (e.g. ``SUN(3)``) passes it on unless ``manifold`` is given.
        """
        mf = getattr(theory, "manifold", None)
        if "manifold" not in kwargs and mf is not None and hasattr(mf, "link_force"):
            kwargs["manifold"] = mf
        make = getattr(theory, "pseudofermions", None)
        if callable(make) and kwargs.get("pseudofermions") is None:
            # the theory builds its own factors (e.g. the Yukawa theory: staggered, forces in the scalar)
            keys = ("even_odd", "hasenbusch_kappas", "tol", "max_iter")
            factors = {k: kwargs.pop(k) for k in keys if k in kwargs}
            kwargs["pseudofermions"] = make(**factors)
        return cls(theory.gauge_action, theory.dirac, theta0, gauge_force=theory.gauge_force, **kwargs)

    def config(self) -> dict[str, Any]:
        """The parameters that fix the target and the algorithm's numerics (stored in the state)."""
        return {
            **self.pseudofermions.config(),
            "integrator": self.integrator,
            "step_jitter": self.step_jitter,
            # only when chosen, so that states saved before these options still load
            **({"time_scales": list(self.time_scales)} if self.time_scales else {}),
            **({"chrono": self.chrono} if self.chrono else {}),
        }

    @staticmethod
    def _check_time_scales(time_scales: Any, pseudofermions: Any) -> tuple[int, ...]:
        ms = tuple(time_scales)
        if any(isinstance(m, bool) or int(m) != m or m < 1 for m in ms):
            raise ValueError(f"time_scales must be integers >= 1, got {list(ms)}")
        n_factors = len(getattr(pseudofermions, "factors", [None]))
        if len(ms) > n_factors:
            raise ValueError(
                f"time_scales {list(ms)}: {len(ms) + 1} levels but only the gauge force and {n_factors} "
                f"pseudofermion factor(s); at most {n_factors} multiplier(s)"
            )
        if len(ms) > 1 and not hasattr(pseudofermions, "factors"):
            raise ValueError("time_scales with more than one multiplier need pseudofermions with separate factors")
        return tuple(int(m) for m in ms)

    def level_forces(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The force of each time-scale level, finest first (class docstring), each ``x -> [B, ...]``."""
        n_levels = len(self.time_scales) + 1
        if n_levels == 1:
            return [self.total_force]
        pf = self.pseudofermions
        if n_levels == 2:
            return [self.gauge_force, lambda x: pf.force(x, self._current_phis(), self.manifold)]
        groups: list[list[int]] = [[] for _ in range(n_levels - 1)]
        for f in range(len(pf.factors)):
            groups[min(f, n_levels - 2)].append(f)

        def level(idx: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
            def force(x: torch.Tensor) -> torch.Tensor:
                phis = self._current_phis()
                out = [pf.factors[f].force(x, phis[f], self.manifold) for f in idx]
                return out[0] if len(out) == 1 else torch.stack(out).sum(dim=0)

            return force

        return [self.gauge_force, *(level(g) for g in groups)]

    def _current_phis(self) -> list[torch.Tensor]:
        if self._phis is None:
            raise RuntimeError("the pseudofermion force needs pseudofermions: call it within a trajectory")
        return self._phis

    def total_force(self, theta: torch.Tensor) -> torch.Tensor:
        """Force of ``S_g + S_pf`` in the manifold's coordinates at the current trajectory's pseudofermions.

        U(1): ``dS/dtheta`` ``[B, d, *L]``; SU(N): the su(N) force ``[B, d, *L, N, N]``.
        """
        if self._phis is None:
            raise RuntimeError("the pseudofermion force needs pseudofermions: call it within a trajectory")
        return self.gauge_force(theta) + self.pseudofermions.force(theta, self._phis, self.manifold)

    @torch.no_grad()
    def trajectory(
        self, step_size: float | None = None, n_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One trajectory for all chains; returns ``(accepted [B], delta_H [B])``."""
        eps = self.step_size if step_size is None else step_size
        n = self.n_steps if n_steps is None else n_steps
        gen, x0 = self.generator, self.x
        if self.step_jitter > 0:
            u = torch.rand((), generator=gen, dtype=torch.float64, device=x0.device).item()
            eps = eps * (1 + self.step_jitter * (2 * u - 1))
        mf = self.manifold
        p0 = mf.random_momenta(x0, gen)
        pf = self.pseudofermions
        pf.reset_stats()
        phis, s_pf0 = pf.refresh(self._background(x0), gen)
        s_g0 = self.gauge_action(x0)
        # the Hamiltonian is accumulated in float64 whatever the field's precision (as in HMC)
        h0 = mf.kinetic(p0) + s_g0.double() + s_pf0.double()
        self._phis = phis
        reset = getattr(pf, "chrono_reset", None)
        if reset is not None:
            reset()
        try:
            if self.time_scales:
                x1, p1 = integrate_nested(
                    x0, p0, eps, n, self.level_forces(), self.time_scales, self.integrator, mf.kick, mf.drift
                )
            else:
                x1, p1 = self._integrate(x0, p0, eps, n)
            s1 = self.gauge_action(x1) + pf.action(self._background(x1), phis)
        finally:
            self._phis = None
        h1 = mf.kinetic(p1) + s1.double()
        dh = h1 - h0
        u = torch.rand(self.n_chains, generator=gen, dtype=x0.dtype.to_real(), device=x0.device)
        acc = (torch.log(u) < -dh) & torch.isfinite(dh)
        sel = acc.view(-1, *([1] * (x0.dim() - 1)))
        self.x = mf.project(torch.where(sel, x1, x0))
        self.s = torch.where(acc, s1, s_g0 + s_pf0)
        total = pf.total_iterations
        self.last_cg_iterations = total if total is not None else torch.zeros_like(self.last_cg_iterations)
        return acc, dh

    @torch.no_grad()
    def run(self, n_trajectories: int) -> SampleBlock:
        """``n_trajectories`` trajectories; rows trajectory-major (``n_trajectories * B``).

        Also sets ``last_run_cg_iterations`` and ``last_run_delta_h`` (``[n_trajectories, B]``).
        """
        xs, accs, lps, steps, its, dhs = [], [], [], [], [], []
        for _ in range(n_trajectories):
            acc, dh = self.trajectory()
            xs.append(self.x.clone())
            accs.append(acc)
            lps.append(-self.s)
            steps.append(torch.full((self.n_chains,), self.step, dtype=torch.long, device=self.x.device))
            its.append(self.last_cg_iterations)
            dhs.append(dh)
            self.step += 1
        self.last_run_cg_iterations = torch.stack(its) if its else None
        self.last_run_delta_h = torch.stack(dhs) if dhs else None
        log_p = torch.cat(lps) if lps else torch.zeros(0, dtype=self.x.dtype, device=self.x.device)
        chain = (torch.arange(self.n_chains, device=self.x.device) + self.chain_offset).repeat(n_trajectories)
        return SampleBlock(
            x=torch.cat(xs) if xs else self.x[:0].clone(),
            chain=chain,
            step=torch.cat(steps) if steps else torch.zeros(0, dtype=torch.long, device=self.x.device),
            accepted=torch.cat(accs) if accs else torch.zeros(0, dtype=torch.bool, device=self.x.device),
            log_p=log_p,
            log_q=torch.zeros_like(log_p),
            log_w=torch.zeros_like(log_p),
        )

    def state_dict(self) -> dict[str, Any]:
        """HMC state (step, chain offset, generator, links, step size and count) plus :meth:`config`."""
        state = super().state_dict()
        state["config"] = self.config()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; ``ValueError`` for another sampler kind or configuration."""
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
        theirs, mine = state.get("config"), self.config()
        if theirs != mine:
            raise ValueError(f"sampler state was made with {theirs}, this sampler has {mine}")
        super().load_state_dict(state)
