"""Flow-MCMC in the joint space of links and pseudofermions (Nf = 2 Wilson fermions, U(1) or SU(N) links).

The exact-determinant target ``exp(-S_g(U)) det(D^dag D)`` is the ``U``-marginal of the joint

    p(U, phis) = exp( -S_g(U) - sum_f [ phi_f^dag K_f(U)^{-1} phi_f + n_f log pi ] ),

since ``int dphi exp(-phi^dag K^{-1} phi) = pi^n det K`` and ``prod_f det K_f = det(D^dag D)``
(the factors of :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions`: plain ``D`` or
even/odd ``M_hat``, and Hasenbusch ratios). Evaluating it needs one CG solve per factor and no
determinant, so it scales to volumes where dense determinants do not.

:class:`PseudofermionFlowMCMC` is an independence Metropolis chain on ``(U, phis)``: a proposal
``U' ~ q`` (a gauge flow) and ``phis' ~ r(. | U')`` (a conditional from
:mod:`latflow.fermions.conditional`) is accepted with probability ``min(1, w'/w)``,
``w = p(U, phis) / (q(U) r(phis | U))``. The chain is exact for any ``q`` and ``r``: its ``U``
follow ``exp(-S_g) det(D^dag D)``. It pays for the stochastic determinant estimate with a lower
acceptance than the exact-determinant chain, which is the same sampler with the exact
conditional (:class:`~latflow.fermions.conditional.ExactConditional`: ``w`` is then the
exact-determinant weight) or, without pseudofermions at all, :func:`exact_determinant_flow_mcmc`
(:class:`FlowMCMC` with ``log p = -S_eff``, dense determinants).

Training: :class:`JointProposal` (flow and conditional as one model) and :class:`JointTarget`
(the joint ``log p``, differentiable without differentiating a solver) plug into
:class:`latflow.training.ReverseKLTrainer` for reverse-KL training on the joint target, of the
conditional alone (freeze the flow) or of both.

Fields: U(1) flows produce real angles ``theta`` ``[B, d, *L]`` (complex links ``exp(i theta)``);
SU(N) flows produce the complex links ``[B, d, *L, N, N]`` themselves. The field's ``manifold``
(:class:`~latflow.manifolds.U1Angles` or :class:`~latflow.manifolds.SUN`, chosen from the Wilson
operator's ``n_colors`` by default) converts fields to links (``links``) and closed-form link
gradients to forces (``link_force``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from latflow.fermions.conditional import (
    DEFAULT_DISPERSION,
    ConditionalPseudofermions,
    TriangularConditional,
    layout_of,
)
from latflow.fermions.pseudofermions import Nf2Pseudofermions
from latflow.fermions.solvers import ConvergenceError
from latflow.fermions.staggered import StaggeredPseudofermions
from latflow.fermions.staggered_conditional import FreeStaggeredConditional, staggered_layout
from latflow.fermions.wilson import WilsonDirac
from latflow.manifolds import SUN, Euclidean, U1Angles

from .flow_mcmc import FlowMCMC

__all__ = ["PseudofermionFlowMCMC", "JointProposal", "JointTarget", "exact_determinant_flow_mcmc"]

LOG_PI = math.log(math.pi)


def _gauge_manifold(manifold: Any, dirac: Any) -> Any:
    """``manifold``, or the default for the operator's links: ``U1Angles`` (``n_colors = 1``) or ``SUN(N)``;
    ``Euclidean`` for an operator without links (``n_colors = None``: the background is a real scalar field)."""
    if manifold is not None:
        return manifold
    n = getattr(dirac, "n_colors", 1)
    if n is None:
        return Euclidean()
    return U1Angles() if int(n) == 1 else SUN(int(n))


def _background(manifold: Any) -> Callable[[torch.Tensor], Any]:
    """The operator's background of a field: its complex links, or the field itself (a scalar, no ``links``)."""
    return manifold.links if hasattr(manifold, "links") else (lambda x: x)


def _layout(pseudofermions: Any) -> tuple[Any, ...]:
    """The factor layout of Wilson (``Nf2Pseudofermions``) or staggered pseudofermions."""
    if isinstance(pseudofermions, StaggeredPseudofermions):
        return staggered_layout(pseudofermions)
    return layout_of(pseudofermions)


class PseudofermionFlowMCMC(FlowMCMC):
    """Independence Metropolis on links and pseudofermions with flow proposals (see the module notes).

    Parameters
    ----------
    model
        Gauge flow: ``sample(B, generator) -> (x, log_q [B])`` with ``x`` real link angles
        ``[B, d, *L]`` (U(1)) or SU(N) links ``[B, d, *L, N, N]``.
    gauge_action
        ``x -> S_g [B]``.
    dirac
        Wilson operator at the target ``kappa`` (``n_colors = 1`` for U(1), ``N`` for SU(N)).
    batch_size
        Proposals per model call.
    generator
        The chain's random stream. Per batch: the flow's draws, then the conditional's noise
        (factor by factor), then the ``B`` accept/reject uniforms.
    conditional
        ``r(phis | U)`` with ``sample(U, generator) -> (phis, log_r)`` and a ``layout`` matching the
        pseudofermion factors; default: an untrained
        :class:`~latflow.fermions.conditional.TriangularConditional` widened by
        :data:`~latflow.fermions.conditional.DEFAULT_DISPERSION` (the validated choice; at width 1
        its weights have an infinite variance near ``kappa_c``).
    even_odd, hasenbusch_kappas
        The pseudofermion factors, as for :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions`;
        ``None``: taken from ``conditional`` (or ``False`` / ``()`` without one).
    tol, max_iter
        CG tolerance (relative residual) and limit of the target's solves. A solve that fails
        raises :class:`~latflow.fermions.solvers.ConvergenceError` from :meth:`run` (the chain's
        state is then unchanged but its generator has moved on), unless ``dense_fallback``.
    dense_fallback
        Evaluate the target of configurations whose CG fails by dense LU instead (exact; small
        lattices). Near ``kappa_c`` near-zero modes of ``D`` stall CG on ``A^dag A`` at a relative
        residual of 1e-10 to 1e-8 in float64 (seen at 4x4 and 8x8, ``beta = 2``, ``kappa = 0.276``).
    chain_id
        Stream id recorded in the rows.
    manifold
        The field's manifold (``links(x)`` gives the complex links); default from ``dirac.n_colors``
        (``Euclidean`` for an operator without links).
    pseudofermions
        Factors built elsewhere instead of :class:`Nf2Pseudofermions`, e.g. the staggered pseudofermion of the
        Yukawa theory (:class:`~latflow.fermions.staggered.StaggeredPseudofermions`), whose background is the
        field itself; ``even_odd``, ``hasenbusch_kappas``, ``tol`` and ``max_iter`` are then theirs. The
        default conditional is then :class:`~latflow.fermions.staggered_conditional.FreeStaggeredConditional`.

    Attributes
    ----------
    pseudofermions
        The :class:`Nf2Pseudofermions` whose factor actions define the target.
    conditional
        The conditional.
    last_run_cg_iterations
        ``[n, n_factors]`` int64 CG iterations of each proposal's target evaluation in the last
        :meth:`run` (one solve per factor).
    cg_iterations, n_proposals, n_dense_fallbacks
        Totals over the chain's life (kept in the state).

    Notes
    -----
    Rows (:class:`~latflow.samplers.records.SampleBlock`): ``x`` the links ``theta`` of the chain's
    state (the pseudofermions are auxiliary and not stored); ``log_p`` the *joint* log target
    ``-S_g - sum_f (phi_f^dag K_f^{-1} phi_f + n_f log pi)`` of the state (``U``, with the
    pseudofermions that came with it); ``log_q = log q(U) + log r(phis | U)`` the joint proposal
    density; ``log_w = 0``; ``proposal_log_w = log_p - log_q`` of every proposal, accepted or
    not. The ``n_f log pi`` terms make ``E_{q r}[exp(proposal_log_w)] = int dU exp(-S_g) det(D^dag D)``,
    the same normalisation as the exact-determinant weights: ``proposal_log_w`` are valid
    importance weights of the links for the marginal target (noisier than the exact ones).
    """

    kind = "pf-flow-mcmc"

    def __init__(
        self,
        model: Any,
        gauge_action: Callable[[torch.Tensor], torch.Tensor],
        dirac: WilsonDirac,
        *,
        batch_size: int,
        generator: torch.Generator,
        conditional: ConditionalPseudofermions | None = None,
        even_odd: bool | None = None,
        hasenbusch_kappas: Sequence[float] | None = None,
        tol: float = 1e-10,
        max_iter: int = 10_000,
        dense_fallback: bool = False,
        chain_id: int = 0,
        manifold: Any = None,
        pseudofermions: Any = None,
    ) -> None:
        self.manifold = _gauge_manifold(manifold, dirac)
        self._background = _background(self.manifold)
        super().__init__(model, self._log_p_unavailable, batch_size=batch_size, generator=generator, chain_id=chain_id)
        if pseudofermions is not None:
            self._init_given_factors(pseudofermions, conditional, dirac, gauge_action, dense_fallback)
            return
        if even_odd is None:
            even_odd = conditional.even_odd if conditional is not None else False
        if hasenbusch_kappas is None:
            hasenbusch_kappas = conditional.hasenbusch_kappas if conditional is not None else ()
        self.pseudofermions = Nf2Pseudofermions(
            dirac, even_odd=bool(even_odd), hasenbusch_kappas=tuple(hasenbusch_kappas), tol=tol, max_iter=max_iter
        )
        if conditional is None:
            conditional = TriangularConditional(
                dirac,
                even_odd=bool(even_odd),
                hasenbusch_kappas=tuple(hasenbusch_kappas),
                dispersion=DEFAULT_DISPERSION,
            )
        if not conditional.matches(layout_of(self.pseudofermions)):
            raise ValueError(
                "the conditional was built for other pseudofermion factors: "
                f"conditional even_odd={conditional.even_odd}, "
                f"hasenbusch_kappas={list(conditional.hasenbusch_kappas)}, "
                f"kappa={conditional.layout[-1].kappa}; sampler even_odd={bool(even_odd)}, "
                f"hasenbusch_kappas={list(self.pseudofermions.hasenbusch_kappas)}, kappa={dirac.kappa}"
            )
        self.gauge_action = gauge_action
        self.dirac = dirac
        self.conditional = conditional
        self.layout = layout_of(self.pseudofermions)
        self.dense_fallback = bool(dense_fallback)
        self.n_dense_fallbacks = 0
        self.n_components_total = sum(f.n_components for f in self.pseudofermions.factors)
        self.last_run_cg_iterations: torch.Tensor | None = None
        self.cg_iterations = 0
        self.n_proposals = 0

    def _init_given_factors(
        self,
        pseudofermions: Any,
        conditional: Any,
        dirac: Any,
        gauge_action: Callable[[torch.Tensor], torch.Tensor],
        dense_fallback: bool,
    ) -> None:
        """The attributes for factors built elsewhere (e.g. staggered, conditional on the scalar field)."""
        self.pseudofermions = pseudofermions
        layout = _layout(pseudofermions)
        if conditional is None:
            conditional = FreeStaggeredConditional(dirac)
        if not conditional.matches(layout):
            what = conditional.describe() if hasattr(conditional, "describe") else type(conditional).__name__
            raise ValueError(
                f"the conditional was built for other pseudofermion factors: {what}; sampler {layout[0].key()}"
            )
        self.gauge_action = gauge_action
        self.dirac = dirac
        self.conditional = conditional
        self.layout = layout
        self.dense_fallback = bool(dense_fallback)
        self.n_dense_fallbacks = 0
        self.n_components_total = sum(f.n_components for f in pseudofermions.factors)
        self.last_run_cg_iterations = None
        self.cg_iterations = 0
        self.n_proposals = 0

    @staticmethod
    def _log_p_unavailable(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the joint target depends on the pseudofermions; use joint_log_p(theta, phis)")

    @classmethod
    def for_theory(cls, theory: Any, model: Any, **kwargs: Any) -> PseudofermionFlowMCMC:
        """Build from a theory with ``gauge_action`` and ``dirac`` (e.g. the Schwinger model, su3-nf2, Yukawa).

        A theory's gauge ``manifold`` (e.g. ``SUN(3)``) is passed on unless ``manifold`` is given. A theory with
        its own pseudofermion factory ``theory.pseudofermions(even_odd, hasenbusch_kappas, tol, max_iter)`` (the
        Yukawa theory: staggered, background the scalar field) builds the factors, as for
        :meth:`~latflow.samplers.pf_hmc.PseudofermionHMC.for_theory`.
        """
        mf = getattr(theory, "manifold", None)
        if "manifold" not in kwargs and mf is not None and hasattr(mf, "links"):
            kwargs["manifold"] = mf
        make = getattr(theory, "pseudofermions", None)
        if callable(make) and kwargs.get("pseudofermions") is None:
            factors = {k: kwargs.pop(k) for k in ("even_odd", "hasenbusch_kappas", "tol", "max_iter") if k in kwargs}
            if factors.get("even_odd") is None:
                factors.pop("even_odd", None)
            if factors.get("hasenbusch_kappas") is None:
                factors.pop("hasenbusch_kappas", None)
            kwargs["pseudofermions"] = make(**factors)
        return cls(model, theory.gauge_action, theory.dirac, **kwargs)

    def config(self) -> dict[str, Any]:
        """The parameters that fix the target and its numerics (stored in the state)."""
        return {**self.pseudofermions.config(), "lattice": list(self.dirac.lattice.shape)}

    @torch.no_grad()
    def joint_log_p(self, theta: torch.Tensor, phis: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint log target ``[B]`` of links ``theta`` ``[B, d, *L]`` and pseudofermions, by CG.

        The factor actions come from :meth:`Nf2Pseudofermions.action`. With ``dense_fallback``, a
        batch in which some CG solve fails is evaluated again factor by factor
        (:meth:`~latflow.fermions.conditional.FactorLayout.quadratic_form`), the failed systems by
        dense LU; ``n_dense_fallbacks`` counts them.

        Returns
        -------
        log_p, iterations
            ``-S_g - sum_f (phi_f^dag K_f^{-1} phi_f + n_f log pi)`` ``[B]`` and the CG iterations
            ``[B, n_factors]`` of the solves.
        """
        U = self._background(theta)
        pf = self.pseudofermions
        try:
            s_pf = pf.action(U, list(phis))
            iters = torch.stack(pf.last_iterations, dim=1)  # type: ignore[arg-type]
        except ConvergenceError:
            if not self.dense_fallback:
                raise
            solved = [
                f.quadratic_form(U, phi, tol=pf.tol, max_iter=pf.max_iter, dense_fallback=True)
                for f, phi in zip(self.layout, phis)
            ]
            s_pf = torch.stack([v for v, _, _ in solved]).sum(dim=0)
            iters = torch.stack([it for _, _, it in solved], dim=1)
            self.n_dense_fallbacks += int((iters >= pf.max_iter).any(dim=1).sum())
        log_p = -self.gauge_action(theta) - s_pf - self.n_components_total * LOG_PI
        return log_p, iters

    @torch.no_grad()
    def _proposals(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # per batch: the flow's draws, the conditional's noise, then b uniforms (see FlowMCMC)
        xs, lps, lqs, lus, its = [], [], [], [], []
        while n > 0:
            b = min(n, self.batch_size)
            theta, log_q = self.model.sample(b, self.generator)
            phis, log_r = self.conditional.sample(self._background(theta), self.generator)
            log_p, iters = self.joint_log_p(theta, phis)
            u = torch.rand(b, generator=self.generator, dtype=log_p.dtype, device=log_p.device)
            xs.append(theta)
            lps.append(log_p)
            lqs.append(log_q + log_r)
            lus.append(torch.log(u))
            its.append(iters.to(torch.long))
            n -= b
        iterations = torch.cat(its)
        self.last_run_cg_iterations = iterations
        self.cg_iterations += int(iterations.sum())
        self.n_proposals += int(iterations.shape[0])
        return torch.cat(xs), torch.cat(lps), torch.cat(lqs), torch.cat(lus)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the chain bit for bit (with the same flow and conditional)."""
        state = super().state_dict()
        state.update(
            config=self.config(),
            cg_iterations=self.cg_iterations,
            n_proposals=self.n_proposals,
            n_dense_fallbacks=self.n_dense_fallbacks,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is for {state.get('kind')!r}, not {self.kind!r}")
        if state.get("config") != self.config():
            raise ValueError(f"sampler state was written for {state.get('config')}, this chain is {self.config()}")
        super().load_state_dict(state)
        self.cg_iterations = int(state.get("cg_iterations", 0))
        self.n_proposals = int(state.get("n_proposals", 0))
        self.n_dense_fallbacks = int(state.get("n_dense_fallbacks", 0))


def exact_determinant_flow_mcmc(
    model: Any, theory: Any, *, batch_size: int, generator: torch.Generator, chain_id: int = 0
) -> FlowMCMC:
    """The exact-determinant baseline: :class:`FlowMCMC` on ``log p = -S_eff = -S_g + log det(D^dag D)``.

    ``theory.action`` must be the exact effective action (e.g.
    :class:`latflow.theories.schwinger.SchwingerModel`, dense determinants: small lattices).
    """
    return FlowMCMC(
        model, lambda theta: -theory.action(theta), batch_size=batch_size, generator=generator, chain_id=chain_id
    )


# ------------------------------------------------------------------------------------ training
class JointProposal(nn.Module):
    """Gauge flow and conditional as one model on ``(theta, phis)``.

    ``sample(B, generator) -> ((theta, phis), log q(theta) + log r(phis | U))``, differentiable in
    both models' parameters (reparameterisation); the shape :class:`latflow.training.ReverseKLTrainer`
    expects, with :class:`JointTarget` as its ``log_p``. Freeze the flow
    (``flow.requires_grad_(False)``) to train the conditional alone.
    """

    def __init__(self, flow: nn.Module, conditional: ConditionalPseudofermions, manifold: Any = None) -> None:
        super().__init__()
        self.flow = flow
        self.conditional = conditional
        self.manifold = _gauge_manifold(manifold, conditional.layout[0].dirac)
        self._background = _background(self.manifold)

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[tuple[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
        theta, log_q = self.flow.sample(batch_size, generator)
        phis, log_r = self.conditional.sample(self._background(theta), generator)
        return (theta, phis), log_q + log_r


class JointTarget:
    """Joint log target ``log p(theta, phis)`` ``[B]`` (module notes) with gradients for training.

    The value is ``-S_g - sum_f (phi_f^dag K_f^{-1} phi_f + n_f log pi)`` (CG). Gradients flow
    without differentiating the solver: in ``phi_f`` through ``2 Re(x_f^dag d phi_f)``,
    ``x_f = K_f^{-1} phi_f``, and in ``theta`` (when it requires grad) through ``S_g`` by autograd
    and the pseudofermion force ``dS_pf/dtheta`` at fixed ``phis``
    (:meth:`Nf2Pseudofermions.force`).

    Parameters
    ----------
    gauge_action
        ``theta -> S_g [B]`` (differentiable).
    pseudofermions
        The factors (e.g. ``sampler.pseudofermions``): ``Nf2Pseudofermions``, or the staggered pseudofermion of the
        Yukawa theory (the field is then the operator's background, the force ``dS_pf/dsigma``).
    manifold
        The field's manifold; default from the operator's ``n_colors`` (``Euclidean`` without links). For
        SU(N) links the gradient in ``U`` flows through ``Re tr(G^dagger dU)`` with the closed-form ``G = dS_pf/dU``
        (:meth:`Nf2Pseudofermions.link_gradient`).
    """

    def __init__(
        self,
        gauge_action: Callable[[torch.Tensor], torch.Tensor],
        pseudofermions: Nf2Pseudofermions,
        manifold: Any = None,
    ) -> None:
        self.gauge_action = gauge_action
        self.pseudofermions = pseudofermions
        self.manifold = _gauge_manifold(manifold, pseudofermions.dirac)
        self._background = _background(self.manifold)
        self.layout = _layout(pseudofermions)
        self.n_components_total = sum(f.n_components for f in self.layout)

    def __call__(self, x: tuple[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        theta, phis = x
        if len(phis) != len(self.layout):
            raise ValueError(f"expected {len(self.layout)} pseudofermions, got {len(phis)}")
        pf = self.pseudofermions
        with torch.no_grad():
            U = self._background(theta.detach())
            solved = [
                f.quadratic_form(U, phi.detach(), tol=pf.tol, max_iter=pf.max_iter) for f, phi in zip(self.layout, phis)
            ]
        s_pf = torch.stack([s[0] for s in solved]).sum(dim=0)
        # zero-valued terms carrying the gradient of phi^dag K^{-1} phi
        for (_, xf, _), phi in zip(solved, phis):
            if phi.requires_grad:
                s_pf = s_pf + 2.0 * (xf.conj() * (phi - phi.detach())).flatten(1).sum(1).real
        if theta.requires_grad and theta.is_complex():
            with torch.no_grad():
                grad = pf.link_gradient(U, [phi.detach() for phi in phis])
            s_pf = s_pf + (grad.conj() * (theta - theta.detach())).flatten(1).sum(1).real
        elif theta.requires_grad:
            with torch.no_grad():
                force = pf.force(theta.detach(), [phi.detach() for phi in phis])
            s_pf = s_pf + (force * (theta - theta.detach())).flatten(1).sum(1)
        return -self.gauge_action(theta) - s_pf - self.n_components_total * LOG_PI
