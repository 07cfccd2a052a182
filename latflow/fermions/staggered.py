"""Matrix-free, batched staggered Dirac operator with an optional site-dependent (Yukawa) mass term.

``D = D_st + m + g sigma`` with the naive staggered hopping term

``(D_st psi)(x) = (1/2) sum_mu eta_mu(x) [ U_mu(x) psi(x+mu) - U_mu(x-mu)^dagger psi(x-mu) ]``,

the Kawamoto-Smit phases ``eta_mu(x) = (-1)^(x_0 + ... + x_{mu-1})`` (``eta_0 = 1``; axis 0 is time),
antiperiodic in time (a hop across the boundary of axis 0 picks up -1), periodic in space. The links
are optional: without them (``n_colors = None``) ``U = 1`` and the operator is that of the Yukawa
theory, whose background is the real scalar field ``sigma``; with U(1) (``n_colors = 1``) or SU(N)
links the same code serves staggered gauge theories. ``m`` is a uniform bare mass and ``g`` the
Yukawa coupling to ``sigma`` (site-diagonal, real).

Symmetries. ``D_st`` is anti-Hermitian and anticommutes with ``epsilon(x) = (-1)^(x_0 + ... + x_{d-1})``
(it only connects even and odd sites), so with a real site mass ``D^dagger = -D_st + m + g sigma =
epsilon D epsilon``. Hence ``det D^dagger = det D`` is real, but with a site-dependent mass it may be
negative: two degenerate staggered fields, weight ``det(D)^2 = det(D^dagger D) >= 0``, make a positive
measure (:class:`StaggeredPseudofermions`). At ``m = 0``, ``D(-sigma) = -epsilon D(sigma) epsilon``.

Even/odd. For a uniform mass (``g = 0``) ``D^dagger D = m^2 - D_st^2`` is block diagonal on even and odd
sites, with equal determinants, so ``det D = det_e(m^2 - D_st^2)`` (:meth:`StaggeredDirac.apply_even_normal`,
one pseudofermion on even sites for one staggered field). With a site-dependent mass the cross term
``[D_st, g sigma]`` couples the two, and an even-site Schur complement needs ``(m + g sigma)^{-1}`` on odd
sites, unbounded for a massless Yukawa theory where ``sigma`` crosses zero: the Yukawa samplers use the
full operator.

Free spectrum (uniform mass, no links): ``-D_st^2 = (1/4) sum_mu (2 - T_{2 mu} - T_{-2 mu})`` (the cross
terms cancel because ``eta_mu(x) eta_nu(x + mu) = -eta_nu(x) eta_mu(x + nu)`` for ``mu != nu``), so the
eigenvalues of ``D^dagger D`` are ``m^2 + sum_mu sin^2 p_mu`` with ``p_0 = 2 pi (n + 1/2) / L0``
(antiperiodic) and ``p_mu = 2 pi n / L_mu`` (:func:`free_normal_spectrum`).

Shapes (batch first): scalar ``sigma`` real ``[B, L0, ..., L{d-1}]``; U(1) links complex
``[B, d, L0, ...]``; SU(N) links ``[B, d, L0, ..., N, N]``; spinors complex ``[B, L0, ...]`` (no links,
U(1)) or ``[B, L0, ..., N]`` (SU(N)). One spinor component per site: the ``2^d / 2^(d/2)`` tastes live in
the lattice structure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from latflow.lattice import Lattice

from .solvers import cg
from .staggered_kernels import staggered_apply

__all__ = [
    "eta_phases",
    "epsilon",
    "free_normal_spectrum",
    "free_logdet_normal",
    "StaggeredDirac",
    "StaggeredPseudofermions",
]


def eta_phases(shape: tuple[int, ...]) -> torch.Tensor:
    """Kawamoto-Smit phases ``eta_mu(x) = (-1)^(x_0 + ... + x_{mu-1})``, float64 ``[d, *shape]``."""
    d = len(shape)
    coords = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    out = torch.empty((d, *shape), dtype=torch.float64)
    partial = torch.zeros(shape, dtype=torch.long)
    for mu in range(d):
        out[mu] = 1.0 - 2.0 * (partial % 2).to(torch.float64)
        partial = partial + coords[mu]
    return out


def epsilon(shape: tuple[int, ...]) -> torch.Tensor:
    """Site parity sign ``epsilon(x) = (-1)^(x_0 + ... + x_{d-1})``, float64 ``[*shape]``."""
    coords = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    return 1.0 - 2.0 * (sum(coords) % 2).to(torch.float64)  # type: ignore[union-attr]


def free_normal_spectrum(shape: tuple[int, ...], mass: float, antiperiodic_time: bool = True) -> np.ndarray:
    """Eigenvalues ``m^2 + sum_mu sin^2 p_mu`` of ``D^dagger D`` for free staggered fermions, array of ``shape``.

    ``p_0 = 2 pi (n + 1/2) / L0`` for antiperiodic time (else ``2 pi n / L0``), ``p_mu = 2 pi n / L_mu``.
    Each entry is one eigenvalue (the full lattice, one component per site).
    """
    grids = []
    for mu, n in enumerate(shape):
        twist = 0.5 if (mu == 0 and antiperiodic_time) else 0.0
        grids.append(2 * np.pi * (np.arange(n) + twist) / n)
    mesh = np.meshgrid(*grids, indexing="ij")
    return float(mass) ** 2 + sum(np.sin(k) ** 2 for k in mesh)


def free_logdet_normal(shape: tuple[int, ...], mass: float, antiperiodic_time: bool = True) -> float:
    """Exact ``log det(D^dagger D)`` of free staggered fermions with uniform mass (closed form)."""
    return float(np.sum(np.log(free_normal_spectrum(shape, mass, antiperiodic_time))))


class StaggeredDirac:
    """Staggered operator ``D = D_st(U) + m + g sigma`` (see the module docstring); implements ``DiracOperator``.

    Parameters
    ----------
    lattice
        Geometry ``(L0, ..., L{d-1})``, ``d >= 1``, axis 0 is time; even extents for an even/odd
        structure.
    mass
        Uniform bare mass ``m`` (real, finite).
    yukawa
        Yukawa coupling ``g`` to a real scalar field (real, finite); 0: no scalar background.
    n_colors
        ``None``: no gauge links (``U = 1``); 1: U(1) links; ``N >= 2``: SU(N) links.
    antiperiodic_time
        Antiperiodic boundary condition along axis 0 (default); periodic otherwise.

    Notes
    -----
    The background ``x`` passed to :meth:`apply` (the ``U`` of the ``DiracOperator`` protocol) is

    - the scalar ``sigma`` ``[B, *L]`` when there are no links;
    - the links when there are links and ``g = 0``;
    - the pair ``(links, sigma)`` when there are both.
    """

    def __init__(
        self,
        lattice: Lattice,
        mass: float = 0.0,
        yukawa: float = 0.0,
        *,
        n_colors: int | None = None,
        antiperiodic_time: bool = True,
    ) -> None:
        for name, value in (("mass", mass), ("yukawa", yukawa)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if n_colors is not None and (isinstance(n_colors, bool) or int(n_colors) < 1):
            raise ValueError(f"n_colors must be None (no links), 1 (U(1)) or N >= 2 (SU(N)), got {n_colors!r}")
        self.lattice = lattice
        self.mass = float(mass)
        self.yukawa = float(yukawa)
        self.n_colors = None if n_colors is None else int(n_colors)
        self.antiperiodic_time = bool(antiperiodic_time)
        shape = tuple(lattice.shape)
        self.field_shape: tuple[int, ...] = shape if (self.n_colors or 1) == 1 else (*shape, self.n_colors)
        d = lattice.dim
        eta = eta_phases(shape)
        fwd, bwd = eta.clone(), eta.clone()
        if self.antiperiodic_time:
            fwd[0, -1] *= -1.0  # x_0 = L0 - 1 hops forward across the boundary
            bwd[0, 0] *= -1.0  # x_0 = 0 hops backward across the boundary
        self._fwd = 0.5 * fwd  # [d, *L], includes the 1/2
        self._bwd = 0.5 * bwd
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.even_mask = lattice.parity() == 0 if all(n % 2 == 0 for n in shape) else None
        self.d = d

    # --- background ------------------------------------------------------------------
    @property
    def has_links(self) -> bool:
        return self.n_colors is not None

    def split(self, x: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(links or None, sigma or None)`` of a background ``x`` (see the class notes)."""
        if self.has_links and self.yukawa != 0.0:
            if not (isinstance(x, (tuple, list)) and len(x) == 2):
                raise ValueError(
                    "a staggered operator with links and a Yukawa term takes the background (links, sigma)"
                )
            return x[0], x[1]
        if self.has_links:
            return x, None
        return None, x

    def site_mass(self, x: Any) -> torch.Tensor | float:
        """``m + g sigma`` ``[B, *L]`` (real), or the float ``m`` without a scalar background."""
        _, sigma = self.split(x)
        if sigma is None or self.yukawa == 0.0:
            return self.mass
        return self.mass + self.yukawa * sigma

    def _signs(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real = like.real.dtype if like.is_complex() else like.dtype
        key = (real, like.device)
        if key not in self._cache:
            dev = like.device
            self._cache[key] = (self._fwd.to(dtype=real, device=dev), self._bwd.to(dtype=real, device=dev))
        return self._cache[key]

    def _check_spinor(self, psi: torch.Tensor) -> None:
        if tuple(psi.shape[1:]) != self.field_shape:
            raise ValueError(f"spinor must be [B, {', '.join(map(str, self.field_shape))}], got {list(psi.shape)}")

    # --- the operator -----------------------------------------------------------------
    def hop(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        """``D_st psi`` ``[B, *field_shape]`` (anti-Hermitian hopping term with the 1/2).

        On CPU without autograd the fused compiled kernel (:func:`latflow.fermions.staggered_kernels.staggered_apply`)
        computes it in one pass; :meth:`hop_reference` (torch) otherwise.
        """
        self._check_spinor(psi)
        fused = staggered_apply(self, x, psi, sign=1.0, with_mass=False)
        return fused if fused is not None else self.hop_reference(x, psi)

    def hop_reference(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        """The torch ``D_st psi`` ``[B, *field_shape]`` (any device, differentiable); see :meth:`hop`."""
        self._check_spinor(psi)
        U, _ = self.split(x)
        fwd, bwd = self._signs(psi)
        out = torch.zeros_like(psi)
        colour = self.n_colors is not None and self.n_colors > 1
        for mu in range(self.d):
            ax = 1 + mu
            up = torch.roll(psi, -1, dims=ax)  # psi(x + mu)
            if U is None:
                f = up
            elif colour:
                f = (U[:, mu] @ up.unsqueeze(-1)).squeeze(-1)
            else:
                f = U[:, mu] * up
            if U is None:
                b = torch.roll(psi, 1, dims=ax)
            elif colour:
                b = torch.roll((U[:, mu].conj().transpose(-1, -2) @ psi.unsqueeze(-1)).squeeze(-1), 1, dims=ax)
            else:
                b = torch.roll(U[:, mu].conj() * psi, 1, dims=ax)  # U_mu(x - mu)^* psi(x - mu)
            sf, sb = fwd[mu], bwd[mu]
            if colour:
                sf, sb = sf.unsqueeze(-1), sb.unsqueeze(-1)
            out = out + sf * f - sb * b
        return out

    def _diag(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        mass = self.site_mass(x)
        if isinstance(mass, float):
            return mass * psi
        if self.n_colors is not None and self.n_colors > 1:
            mass = mass.unsqueeze(-1)
        return mass.to(psi.real.dtype if psi.is_complex() else psi.dtype) * psi

    def apply(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        """``D psi = D_st psi + (m + g sigma) psi`` (one fused pass where :meth:`hop` has one)."""
        self._check_spinor(psi)
        fused = staggered_apply(self, x, psi, sign=1.0, with_mass=True)
        return fused if fused is not None else self.hop_reference(x, psi) + self._diag(x, psi)

    def apply_dagger(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger psi = -D_st psi + (m + g sigma) psi`` (real site mass; fused like :meth:`apply`)."""
        self._check_spinor(psi)
        fused = staggered_apply(self, x, psi, sign=-1.0, with_mass=True)
        return fused if fused is not None else self._diag(x, psi) - self.hop_reference(x, psi)

    def apply_normal(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger D psi``."""
        return self.apply_dagger(x, self.apply(x, psi))

    def apply_even_normal(self, x: Any, psi: torch.Tensor) -> torch.Tensor:
        """``(m^2 - D_st^2) psi`` restricted to even sites (uniform mass only; see the module notes).

        ``psi`` lives on the even sites (zero on odd ones); so does the result.
        """
        if self.yukawa != 0.0:
            raise ValueError("the even/odd block structure of D^dagger D needs a uniform mass (yukawa = 0)")
        if self.even_mask is None:
            raise ValueError(f"even/odd needs even extents, got {list(self.lattice.shape)}")
        out = self.mass**2 * psi - self.hop(x, self.hop(x, psi))
        mask = self.even_mask.to(out.device).reshape(*self.even_mask.shape, *([1] * (out.dim() - 1 - self.d)))
        return out * mask.to(out.real.dtype)

    # --- dense, small lattices ----------------------------------------------------------
    def free_dense(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense ``D_st`` without links ``[V, V]`` (real; rows and columns in the lattice's row-major site order)."""
        key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._dense_cache:
            shape = tuple(self.lattice.shape)
            v = self.lattice.volume
            eye = torch.eye(v, dtype=torch.float64).reshape(v, *shape)
            if self.has_links:
                raise ValueError("free_dense is the operator without links; this one has links (use dense)")
            cols = self.hop(torch.zeros(v, *shape, dtype=torch.float64), eye)
            self._dense_cache[key] = cols.reshape(v, v).T.contiguous().to(dtype=dtype, device=key[1])
        return self._dense_cache[key]

    def dense(self, x: Any) -> torch.Tensor:
        """Dense ``D`` per configuration ``[B, V, V]`` (real for a scalar background without links).

        Without links: the cached ``D_st`` plus ``diag(m + g sigma)`` (differentiable in ``sigma``). With links:
        built from :meth:`apply` on the unit vectors, one configuration at a time.
        """
        if self.has_links:
            U, sigma = self.split(x)
            assert U is not None
            n = math.prod(self.field_shape)
            eye = torch.eye(n, dtype=U.dtype, device=U.device).reshape(n, *self.field_shape)
            mats = []
            for b in range(U.shape[0]):
                ub = U[b : b + 1].expand(n, *U.shape[1:])
                xb = ub if sigma is None else (ub, sigma[b : b + 1].expand(n, *sigma.shape[1:]))
                mats.append(self.apply(xb, eye).reshape(n, n).T)  # column j = D e_j
            return torch.stack(mats) if mats else torch.zeros((0, n, n), dtype=U.dtype, device=U.device)
        sigma = x
        d0 = self.free_dense(sigma.dtype if sigma.is_floating_point() else torch.float64, sigma.device)
        mass = self.site_mass(sigma)
        diag = (
            torch.full((sigma.shape[0], self.lattice.volume), mass, dtype=d0.dtype, device=d0.device)
            if isinstance(mass, float)
            else mass.reshape(sigma.shape[0], -1).to(d0.dtype)
        )
        return d0.unsqueeze(0) + torch.diag_embed(diag)

    def logdet(self, x: Any) -> torch.Tensor:
        """``log |det D|`` ``[B]`` and nothing else: ``det D`` is real (``D^dagger = epsilon D epsilon``)."""
        return torch.linalg.slogdet(self.dense(x))[1]

    def logdet_normal(self, x: Any) -> torch.Tensor:
        """Exact ``log det(D^dagger D) = 2 log |det D|`` ``[B]`` (dense LU; differentiable without links)."""
        return 2.0 * self.logdet(x)

    def sign_det(self, x: Any) -> torch.Tensor:
        """Sign of the real ``det D`` ``[B]`` (+1 or -1; one staggered field's weight is not positive)."""
        sign = torch.linalg.slogdet(self.dense(x))[0]
        return sign.real if sign.is_complex() else sign

    # --- derivatives in the scalar ------------------------------------------------------
    def scalar_derivative(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``d Re(a^dagger D b) / d sigma_x = g Re(conj(a_x) b_x)`` (summed over colour), real ``[B, *L]``."""
        prod = (a.conj() * b).real
        if self.n_colors is not None and self.n_colors > 1:
            prod = prod.sum(-1)
        return self.yukawa * prod


class StaggeredPseudofermions:
    """One pseudofermion for two degenerate staggered fields: ``det K = pi^-V int exp(-phi^dag K^-1 phi)``.

    ``K = D^dag D``.

    The interface of :class:`latflow.fermions.pseudofermions.Nf2Pseudofermions` that the pseudofermion
    samplers use (heatbath, action, force, solver statistics), for a scalar background ``sigma`` (the
    Yukawa theory; forces in ``sigma``).

    Heatbath ``phi = D^dagger chi`` with ``chi`` complex Gaussian (``exp(-|chi|^2)``), so the action at the
    heatbath point is ``|chi|^2``. Force at fixed ``phi``: with ``X = (D^dagger D)^{-1} phi`` and ``Y = D X``,
    ``dS/dsigma_x = -2 Re(conj(Y_x) dD_xx X_x) = -2 g Re(conj(Y_x) X_x)``. Every solve starts from zero, so
    the force is a deterministic function of ``sigma`` (a reversible molecular dynamics).

    Parameters
    ----------
    dirac
        A :class:`StaggeredDirac` without links.
    tol, max_iter
        CG tolerance (relative residual) and iteration limit of every solve.
    """

    even_odd = False
    hasenbusch_kappas: tuple[float, ...] = ()

    def __init__(self, dirac: StaggeredDirac, *, tol: float = 1e-10, max_iter: int = 10_000) -> None:
        if dirac.has_links:
            raise ValueError("StaggeredPseudofermions takes an operator on a scalar background (n_colors=None)")
        self.dirac = dirac
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.n_components = dirac.lattice.volume
        self.factors = [self]
        self._iters: list[torch.Tensor] = []
        self.last_iterations: list[torch.Tensor | None] = [None]

    def __len__(self) -> int:
        return 1

    def config(self) -> dict[str, Any]:
        return {
            "operator": "staggered",
            "mass": self.dirac.mass,
            "yukawa": self.dirac.yukawa,
            "antiperiodic_time": self.dirac.antiperiodic_time,
            "tol": self.tol,
            "max_iter": self.max_iter,
        }

    def reset_stats(self) -> None:
        self._iters = []
        self.last_iterations = [None]

    @property
    def total_iterations(self) -> torch.Tensor | None:
        """``[B]`` CG iterations of every solve since :meth:`reset_stats`."""
        if not self._iters:
            return None
        return torch.stack(self._iters).sum(dim=0)

    def _solve(self, sigma: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        res = cg(lambda v: self.dirac.apply_normal(sigma, v), rhs, tol=self.tol, max_iter=self.max_iter)
        self._iters.append(res.iterations.to(sigma.device))
        self.last_iterations = [res.iterations.to(sigma.device)]
        return res.x

    def _complex(self, sigma: torch.Tensor) -> torch.dtype:
        return torch.complex64 if sigma.dtype == torch.float32 else torch.complex128

    def heatbath(self, sigma: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([phi], |chi|^2 [B])`` with ``phi = D^dagger chi`` ``[B, *L]`` complex."""
        from .pseudofermions import complex_gaussian

        chi = complex_gaussian(
            (sigma.shape[0], *self.dirac.field_shape), generator, dtype=self._complex(sigma), device=sigma.device
        )
        phi = self.dirac.apply_dagger(sigma, chi)
        return [phi], (chi.conj() * chi).real.flatten(1).sum(1)

    def refresh(self, sigma: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Heatbath, as the pseudofermion HMC calls it: ``(phis, S_pf [B])``."""
        return self.heatbath(sigma, generator)

    def action(self, sigma: torch.Tensor, phis: list[torch.Tensor]) -> torch.Tensor:
        """``phi^dagger (D^dagger D)^{-1} phi`` ``[B]`` (one CG solve)."""
        (phi,) = phis
        x = self._solve(sigma, phi)
        return (phi.conj() * x).real.flatten(1).sum(1)

    def quadratic_form(self, sigma: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi^dagger K^{-1} phi [B], K^{-1} phi)`` with ``K = D^dagger D`` (one CG solve)."""
        x = self._solve(sigma, phi)
        return (phi.conj() * x).real.flatten(1).sum(1), x

    def force(self, sigma: torch.Tensor, phis: list[torch.Tensor], manifold: Any = None) -> torch.Tensor:
        """``dS_pf / dsigma`` ``[B, *L]`` at fixed ``phis`` (real, the dtype of ``sigma``)."""
        (phi,) = phis
        x = self._solve(sigma, phi)
        y = self.dirac.apply(sigma, x)
        return (-2.0 * self.dirac.scalar_derivative(y, x)).to(sigma.dtype)
