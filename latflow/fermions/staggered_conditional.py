"""Conditional distributions ``r(phi | sigma)`` of the staggered pseudofermion on a scalar background (Yukawa theory).

The Yukawa theory's pseudofermion (:class:`~latflow.fermions.staggered.StaggeredPseudofermions`) has the target
``N(0, K(sigma))``, ``K = D^dag D`` with ``D = D_st + m + g sigma``. As for the Wilson conditionals of
:mod:`latflow.fermions.conditional`, every conditional here is linear in complex Gaussian noise,

    phi = M(sigma) chi,    log r(phi | sigma) = -|chi|^2 - V log pi - log |det M|^2,    chi = M^{-1} phi,

and the joint chain (:class:`latflow.samplers.pf_flow_mcmc.PseudofermionFlowMCMC`) is exact for any of them.

Maps (``forward(sigma, chi) -> (phi, log |det M|^2)``, ``inverse(sigma, phi) -> (chi, log |det M|^2)``):

- :class:`StaggeredHeatbathMap`: ``M = D^dag`` (the heatbath; ``M M^dag = K``). ``log |det M|^2 = log det K``
  by a dense LU, so the joint weights equal the exact-determinant ones. Small lattices.
- :class:`~latflow.fermions.conditional.ScaleMap`: ``M = a``.
- :class:`FreeStaggeredMap`: ``M = D_0(mu)^dag S(sigma)`` with the free operator ``D_0(mu) = D_st + mu`` at a
  learnable mass ``mu > 0`` and the site scales ``S = diag(s_x)``,
  ``s_x = exp(a) sqrt(1 + c (m + g sigma_x)^2)`` (learnable ``a`` and ``c >= 0``). Then
  ``M M^dag = D_0^dag S^2 D_0`` follows ``K`` in both its momentum structure (``-D_st^2``) and the local size of
  the site mass, and ``log |det M|^2 = sum_p log(mu^2 + sum_mu sin^2 p_mu) + sum_x log s_x^2`` in closed form
  (:func:`free_logdet_normal_torch`). ``D_0`` is normal with ``D_0^dag D_0 = mu^2 - D_st^2``, diagonal in
  (twisted) momentum space, so ``M^{-1} = S^{-1} D_0 (mu^2 - D_st^2)^{-1}`` is applied exactly by FFT
  (:func:`free_normal_solve`): no iterative solver.

Containers (:class:`StaggeredConditional` and its subclasses :class:`ExactStaggeredConditional`,
:class:`ScalarStaggeredConditional`, :class:`FreeStaggeredConditional`) have the interface of
:class:`~latflow.fermions.conditional.ConditionalPseudofermions` (``sample``, ``log_prob``, ``layout``,
``matches``), with one factor (:class:`StaggeredFactor`). :func:`staggered_covariance_ratio_spectrum` gives the
generalised eigenvalues of ``(M M^dag, K)``: the joint weights have a finite variance iff ``lambda_min > 1/2``.

Shapes: scalar ``sigma`` real ``[B, *L]``; pseudofermions complex ``[B, *L]``; densities ``[B]`` real.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .conditional import ConditionalPseudofermions, ScaleMap
from .pseudofermions import complex_gaussian
from .solvers import ConvergenceError, SolverResult, cg
from .staggered import StaggeredDirac, StaggeredPseudofermions

__all__ = [
    "StaggeredFactor",
    "staggered_layout",
    "free_normal_eigenvalues",
    "free_logdet_normal_torch",
    "free_normal_solve",
    "StaggeredHeatbathMap",
    "FreeStaggeredMap",
    "StaggeredConditional",
    "ExactStaggeredConditional",
    "ScalarStaggeredConditional",
    "FreeStaggeredConditional",
    "staggered_covariance_ratio_spectrum",
    "smallest_staggered_covariance_ratio",
    "default_free_mass",
]

# mu = sqrt(m^2 + (g * FREE_MASS_FIELD_RMS)^2) unless given: |phi| ~ 0.4-0.7 at the Yukawa points of interest
FREE_MASS_FIELD_RMS = 0.4
MIN_FREE_MASS = 1e-3


def _complex_dtype(sigma: torch.Tensor) -> torch.dtype:
    return torch.complex64 if sigma.dtype == torch.float32 else torch.complex128


def _norm2(x: torch.Tensor) -> torch.Tensor:
    return (x.conj() * x).real.flatten(1).sum(1)


class StaggeredFactor:
    """The one factor ``det(D^dag D)`` of the staggered pseudofermion, as conditionals and the joint target see it.

    Parameters
    ----------
    dirac
        :class:`~latflow.fermions.staggered.StaggeredDirac` without links (background: the scalar ``sigma``).

    Attributes
    ----------
    n_components
        ``V`` complex components.
    mask, heavy
        ``None`` (full lattice, plain factor), as for the Wilson factor layout.
    even_odd
        ``False``.
    """

    even_odd = False
    heavy = None
    mask = None

    def __init__(self, dirac: StaggeredDirac) -> None:
        if dirac.has_links:
            raise ValueError("a staggered factor on a scalar background needs an operator without links")
        self.dirac = dirac
        self.n_components = dirac.lattice.volume

    def key(self) -> tuple[Any, ...]:
        """What fixes the target: couplings, lattice and boundary condition."""
        d = self.dirac
        return ("staggered", d.mass, d.yukawa, tuple(d.lattice.shape), d.antiperiodic_time)

    def site_weights(self, like: torch.Tensor) -> None:
        return None

    def noise(self, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``chi`` complex ``[B, *L]`` with density ``exp(-|chi|^2) / pi^V``."""
        shape = (sigma.shape[0], *self.dirac.field_shape)
        return complex_gaussian(shape, generator, dtype=_complex_dtype(sigma), device=sigma.device)

    def heatbath(self, sigma: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An exact draw ``(phi = D^dag chi, chi)``, ``phi ~ N(0, D^dag D)``."""
        chi = self.noise(sigma, generator)
        return self.dirac.apply_dagger(sigma, chi), chi

    def quadratic_form(
        self,
        sigma: torch.Tensor,
        phi: torch.Tensor,
        *,
        tol: float = 1e-10,
        max_iter: int = 10_000,
        dense_fallback: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(phi^dag K^{-1} phi [B], K^{-1} phi [B, *L], CG iterations [B])`` with ``K = D^dag D``.

        A system that misses ``tol`` raises :class:`~latflow.fermions.solvers.ConvergenceError` unless
        ``dense_fallback`` (then solved by dense LU, its iteration count set to ``max_iter``).
        """
        dirac = self.dirac
        try:
            res = cg(lambda z: dirac.apply_normal(sigma, z), phi, tol=tol, max_iter=max_iter)
        except ConvergenceError as exc:
            if not dense_fallback:
                raise
            res = exc.result
            bad = ~(res.residual < tol)
            y = res.x.clone()
            d = dirac.dense(sigma[bad]).to(phi.dtype)
            rhs = phi[bad].reshape(int(bad.sum()), -1, 1)
            z = torch.linalg.solve(d, torch.linalg.solve(d.mH, rhs))
            y[bad] = z.reshape(phi[bad].shape)
            res = SolverResult(x=y, iterations=torch.where(bad, max_iter, res.iterations), residual=res.residual)
        return (phi.conj() * res.x).flatten(1).sum(1).real, res.x, res.iterations


def staggered_layout(pseudofermions: StaggeredPseudofermions) -> tuple[StaggeredFactor]:
    """The layout (one :class:`StaggeredFactor`) of a :class:`StaggeredPseudofermions`."""
    return (StaggeredFactor(pseudofermions.dirac),)


# ------------------------------------------------------------------------------------ free operator
def free_normal_eigenvalues(dirac: StaggeredDirac, mu: torch.Tensor) -> torch.Tensor:
    """``mu^2 + sum_mu sin^2 p_mu`` ``[*L]``: the spectrum of ``mu^2 - D_st^2`` (twisted momenta; differentiable).

    ``p_0 = 2 pi (n + 1/2) / L0`` for antiperiodic time, ``p_mu = 2 pi n / L_mu``, in the order of ``fft``.
    """
    shape = tuple(dirac.lattice.shape)
    dtype = mu.dtype if mu.is_floating_point() else torch.float64
    total = mu * mu
    for axis, n in enumerate(shape):
        twist = 0.5 if (axis == 0 and dirac.antiperiodic_time) else 0.0
        p = 2 * math.pi * (torch.arange(n, dtype=dtype, device=mu.device) + twist) / n
        view = [1] * len(shape)
        view[axis] = n
        total = total + torch.sin(p).pow(2).reshape(view)
    return total


def free_logdet_normal_torch(dirac: StaggeredDirac, mu: torch.Tensor) -> torch.Tensor:
    """``log det(mu^2 - D_st^2) = sum_p log(mu^2 + sum_mu sin^2 p_mu)`` (scalar tensor, differentiable in ``mu``)."""
    return torch.log(free_normal_eigenvalues(dirac, mu)).sum()


def _twist(dirac: StaggeredDirac, like: torch.Tensor, sign: float) -> torch.Tensor | None:
    """``exp(sign i pi x_0 / L0)`` broadcastable against ``like`` ``[B, *L]`` (antiperiodic time), else ``None``."""
    if not dirac.antiperiodic_time:
        return None
    n = dirac.lattice.shape[0]
    x0 = torch.arange(n, dtype=like.real.dtype, device=like.device)
    phase = torch.polar(torch.ones_like(x0), sign * math.pi * x0 / n)
    return phase.reshape(n, *([1] * (like.dim() - 2)))


def free_normal_solve(dirac: StaggeredDirac, mu: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``(mu^2 - D_st^2)^{-1} psi`` ``[B, *L]`` by FFT (exact; differentiable in ``mu`` and ``psi``).

    ``-D_st^2 = (1/4) sum_mu (2 - T_{2 mu} - T_{-2 mu})`` (module notes of :mod:`latflow.fermions.staggered`)
    is diagonal in momentum space; antiperiodic time is made periodic by the phase ``exp(-i pi x_0 / L0)``.
    Needs even extents (the phases ``eta`` are then periodic).
    """
    dims = tuple(range(1, psi.dim()))
    down, up = _twist(dirac, psi, -1.0), _twist(dirac, psi, 1.0)
    u = psi if down is None else psi * down
    u_hat = torch.fft.fftn(u, dim=dims) / free_normal_eigenvalues(dirac, mu).to(psi.real.dtype)
    u = torch.fft.ifftn(u_hat, dim=dims)
    return u if up is None else u * up


def default_free_mass(dirac: StaggeredDirac, sigma: torch.Tensor | None = None) -> float:
    """Initial ``mu``: the rms of the site mass ``m + g sigma`` over ``sigma`` ``[B, *L]`` (e.g. flow draws), or
    ``sqrt(m^2 + (0.4 g)^2)`` without samples; at least ``1e-3``."""
    if sigma is not None:
        site = dirac.mass + dirac.yukawa * sigma.detach().to(torch.float64)
        value = float(site.pow(2).mean().sqrt())
    else:
        value = math.hypot(dirac.mass, FREE_MASS_FIELD_RMS * dirac.yukawa)
    return max(value, MIN_FREE_MASS)


# ------------------------------------------------------------------------------------ maps
class StaggeredHeatbathMap(nn.Module):
    """``M = D^dag`` (exact conditional): ``log |det M|^2 = log det(D^dag D)`` (dense LU), ``M^{-1}`` by dense solve."""

    def __init__(self, factor: StaggeredFactor) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, sigma: torch.Tensor, chi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D^dag chi, log det(D^dag D))``."""
        d = self.factor.dirac
        return d.apply_dagger(sigma, chi), d.logdet_normal(sigma)

    def inverse(self, sigma: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D^{-dag} phi, log det(D^dag D))`` (dense)."""
        d = self.factor.dirac
        dense = d.dense(sigma)
        _, logabs = torch.linalg.slogdet(dense)
        rhs = phi.reshape(phi.shape[0], -1, 1)
        chi = torch.linalg.solve(dense.mT.to(phi.dtype), rhs).reshape(phi.shape)  # D real: D^dag = D^T
        return chi, 2.0 * logabs


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class FreeStaggeredMap(nn.Module):
    """``M = D_0(mu)^dag S(sigma)``, ``S = diag(exp(a) sqrt(1 + c (m + g sigma_x)^2))`` (module notes).

    Parameters
    ----------
    factor
        The staggered factor (operator: ``m``, ``g``, lattice; even extents).
    mass
        Initial ``mu > 0`` (stored as ``log_mass``).
    scale
        Initial ``exp(a)`` (stored as ``log_scale``; a ``dispersion`` multiplies it).
    site_coupling
        Initial ``c > 0`` (``c = softplus(raw_site_coupling)``, so it stays ``>= 0`` in training).
    """

    def __init__(
        self, factor: StaggeredFactor, mass: float, *, scale: float = 1.0, site_coupling: float = 0.25
    ) -> None:
        super().__init__()
        shape = tuple(factor.dirac.lattice.shape)
        if any(n % 2 for n in shape):
            raise ValueError(f"the free staggered conditional needs even extents, got lattice {list(shape)}")
        for name, value in (("mass", mass), ("scale", scale), ("site_coupling", site_coupling)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        self.factor = factor
        self.log_mass = nn.Parameter(torch.tensor(math.log(mass), dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float64))
        self.raw_site_coupling = nn.Parameter(torch.tensor(_inverse_softplus(site_coupling), dtype=torch.float64))

    @property
    def mass(self) -> torch.Tensor:
        """``mu`` (scalar tensor)."""
        return self.log_mass.exp()

    @property
    def site_coupling(self) -> torch.Tensor:
        """``c >= 0`` (scalar tensor)."""
        return nn.functional.softplus(self.raw_site_coupling)

    def extra_repr(self) -> str:
        return (
            f"mu={float(self.mass.detach()):.4g}, a={float(self.log_scale.detach()):.4g}, "
            f"c={float(self.site_coupling.detach()):.4g}"
        )

    def log_site_scale2(self, sigma: torch.Tensor) -> torch.Tensor:
        """``log s_x^2 = 2 a + log(1 + c (m + g sigma_x)^2)`` ``[B, *L]`` real."""
        d = self.factor.dirac
        site = d.mass + d.yukawa * sigma
        c = self.site_coupling.to(dtype=sigma.dtype, device=sigma.device)
        a = self.log_scale.to(dtype=sigma.dtype, device=sigma.device)
        return 2.0 * a + torch.log1p(c * site * site)

    def _logdet(self, log_s2: torch.Tensor) -> torch.Tensor:
        mu = self.mass.to(dtype=log_s2.dtype, device=log_s2.device)
        return free_logdet_normal_torch(self.factor.dirac, mu) + log_s2.flatten(1).sum(1)

    def forward(self, sigma: torch.Tensor, chi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi = D_0^dag S chi, log |det M|^2 [B])``."""
        log_s2 = self.log_site_scale2(sigma)
        v = chi * torch.exp(0.5 * log_s2)
        mu = self.mass.to(dtype=sigma.dtype, device=sigma.device)
        phi = mu * v - self.factor.dirac.hop(sigma, v)  # D_0^dag = -D_st + mu
        return phi, self._logdet(log_s2)

    def inverse(self, sigma: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chi = S^{-1} D_0 (mu^2 - D_st^2)^{-1} phi, log |det M|^2 [B])`` (FFT, exact)."""
        log_s2 = self.log_site_scale2(sigma)
        mu = self.mass.to(dtype=sigma.dtype, device=sigma.device)
        y = free_normal_solve(self.factor.dirac, mu, phi)
        v = mu * y + self.factor.dirac.hop(sigma, y)  # D_0 = D_st + mu
        return v * torch.exp(-0.5 * log_s2), self._logdet(log_s2)


# ------------------------------------------------------------------------------------ containers
class StaggeredConditional(ConditionalPseudofermions):
    """One map for the staggered pseudofermion: ``r(phi | sigma)`` (``sample``, ``log_prob`` as in the Wilson
    :class:`~latflow.fermions.conditional.ConditionalPseudofermions`, the background being ``sigma`` ``[B, *L]``).

    Parameters
    ----------
    dirac
        The Yukawa theory's :class:`~latflow.fermions.staggered.StaggeredDirac`.
    map
        ``forward(sigma, chi) -> (phi, log |det M|^2)`` and ``inverse``.
    """

    kind = "staggered"

    def __init__(self, dirac: StaggeredDirac, map: nn.Module) -> None:
        super().__init__((StaggeredFactor(dirac),), [map])

    @property
    def dirac(self) -> StaggeredDirac:
        return self.layout[0].dirac

    @property
    def hasenbusch_kappas(self) -> tuple[float, ...]:
        return ()

    def matches(self, layout: Any) -> bool:
        """Whether this conditional was built for the factor ``layout`` (couplings, lattice, boundary)."""
        layout = tuple(layout)
        return len(layout) == 1 and isinstance(layout[0], StaggeredFactor) and layout[0].key() == self.layout[0].key()

    def describe(self) -> str:
        m, g, shape, apbc = self.layout[0].key()[1:]
        return f"{self.kind} conditional for m = {m}, g = {g}, lattice {list(shape)}, antiperiodic_time = {apbc}"

    def covariance_ratio_spectrum(self, sigma: torch.Tensor) -> torch.Tensor:
        """Generalised eigenvalues of ``(M M^dag, K)`` ``[B, V]`` ascending (dense; small lattices)."""
        return staggered_covariance_ratio_spectrum(self, sigma)


class ExactStaggeredConditional(StaggeredConditional):
    """The heatbath ``M = D^dag``: joint weights equal the exact-determinant weights (dense ``log det``)."""

    kind = "exact"

    def __init__(self, dirac: StaggeredDirac) -> None:
        factor = StaggeredFactor(dirac)
        super().__init__(dirac, StaggeredHeatbathMap(factor))


class ScalarStaggeredConditional(StaggeredConditional):
    """``phi = a chi`` (one learnable scale ``a``, initially ``scale``)."""

    kind = "scalar"

    def __init__(self, dirac: StaggeredDirac, *, scale: float = 1.0) -> None:
        super().__init__(dirac, ScaleMap(dirac.lattice.volume, scale))


class FreeStaggeredConditional(StaggeredConditional):
    """``M = dispersion * D_0(mu)^dag S(sigma)`` (:class:`FreeStaggeredMap`): the default for the Yukawa theory.

    Parameters
    ----------
    dirac
        The Yukawa theory's operator.
    mass
        Initial ``mu``; ``None``: :func:`default_free_mass` (without samples).
    site_coupling
        Initial ``c``.
    dispersion
        Widens the conditional, ``M -> dispersion M`` (folded into ``exp(a)``).
    """

    kind = "free"

    def __init__(
        self,
        dirac: StaggeredDirac,
        *,
        mass: float | None = None,
        site_coupling: float = 0.25,
        dispersion: float = 1.0,
    ) -> None:
        if not (math.isfinite(dispersion) and dispersion > 0):
            raise ValueError(f"dispersion must be a positive finite number, got {dispersion}")
        factor = StaggeredFactor(dirac)
        mu = default_free_mass(dirac) if mass is None else float(mass)
        super().__init__(dirac, FreeStaggeredMap(factor, mu, scale=dispersion, site_coupling=site_coupling))


@torch.no_grad()
def staggered_covariance_ratio_spectrum(conditional: StaggeredConditional, sigma: torch.Tensor) -> torch.Tensor:
    """Generalised eigenvalues ``lambda`` of ``(M M^dag, K)``, ``K = D^dag D``, ``[B, V]`` ascending (dense).

    As for the Wilson conditionals (:func:`~latflow.fermions.conditional.covariance_ratio_spectrum`): the joint
    weights have a finite variance under ``r`` iff ``lambda_min > 1/2``; the exact conditional has ``lambda = 1``.

    Parameters
    ----------
    conditional
        A staggered conditional (its map linear in ``chi``).
    sigma
        Scalar backgrounds ``[B, *L]`` (real).
    """
    factor = conditional.layout[0]
    dirac, v = factor.dirac, factor.n_components
    m = conditional.maps[0]
    b = sigma.shape[0]
    eye = torch.eye(v, dtype=_complex_dtype(sigma), device=sigma.device).reshape(v, *dirac.field_shape)
    cols = []
    for i in range(b):
        phi, _ = m(sigma[i : i + 1].expand(v, *sigma.shape[1:]), eye)
        cols.append(phi.reshape(v, v).T)  # column j = M e_j
    mm = torch.stack(cols)
    root = dirac.dense(sigma).mT.to(mm.dtype)  # D^dag, K = root root^dag
    g = torch.linalg.solve(root, mm)
    return torch.linalg.eigvalsh(g @ g.mH)


def smallest_staggered_covariance_ratio(conditional: StaggeredConditional, sigma: torch.Tensor) -> torch.Tensor:
    """``lambda_min`` ``[B]`` of ``(M M^dag, K)`` (dense; small lattices)."""
    return staggered_covariance_ratio_spectrum(conditional, sigma)[:, 0]
