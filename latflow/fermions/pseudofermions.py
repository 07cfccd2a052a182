"""Pseudofermions for Nf = 2 Wilson fermions on U(1) or SU(N) gauge fields, with even/odd and Hasenbusch.

The Nf = 2 weight ``det(D^dagger D)`` is written as a Gaussian integral over a complex field
``phi`` (the pseudofermion):

    det(A^dagger A) = pi^{-n} int dphi exp(-phi^dagger (A^dagger A)^{-1} phi),

with ``A`` either the Wilson operator ``D`` on the full lattice (``n = V Ns`` complex components)
or its even-site Schur complement ``M_hat = 1 - kappa^2 H_eo H_oe`` (``det D = det M_hat``,
``n = V Ns / 2``). Hasenbusch mass preconditioning splits the determinant with heavier
operators ``A_1, ..., A_k`` (hopping parameters ``kappa_1 < ... < kappa_k < kappa``):

    det(A^dag A) = det(A_1^dag A_1) prod_i det(A_{i+1}^dag A_{i+1} / A_i^dag A_i)   (A_{k+1} = A),

one pseudofermion per factor. The factors (``A'`` the heavier operator of a ratio):

- plain ``A``: action ``phi^dag (A^dag A)^{-1} phi``, heatbath ``phi = A^dag chi``;
- ratio ``A / A'``: action ``phi^dag A' (A^dag A)^{-1} A'^dag phi``, heatbath
  ``phi = (A'^dag)^{-1} A^dag chi``,

where ``chi`` is complex Gaussian with density proportional to ``exp(-|chi|^2)``, so that the
action at the heatbath point is exactly ``|chi|^2`` (expectation ``n``).

Forces with respect to the link angles ``theta`` (``U_mu(x) = exp(i theta_mu(x))``). With
``X = (A^dag A)^{-1} v`` and ``Y = A X``, ``d(v^dag (A^dag A)^{-1} v) = -2 Re(Y^dag dA X)`` for
fixed ``v``; for the ratio factor ``v = A'^dag phi`` also moves, adding ``2 Re(phi^dag dA' X)``.
``dA`` follows from the hopping term ``H`` (``D = 1 - kappa H``):

- ``d Re(a^dag D b) = -kappa d Re(a^dag H b)``,
- ``d Re(a^dag M_hat b) = -kappa^2 [ d Re(a^dag H c) + d Re(w^dag H b) ]`` with ``c = H b`` and
  ``w = H^dag a = gamma_5 H gamma_5 a`` (``a``, ``b`` even: ``c``, ``w`` live on odd sites),

and :func:`hop_derivative` gives ``d Re(a^dag H b) / d theta`` in closed form, so no solver is
ever differentiated.

Any gauge group: :func:`hop_link_gradient` gives ``G = d Re(a^dag H b) / dU`` in torch's convention
(``d Re(a^dag H b) = Re tr(G^dagger dU)``) for U(1) links ``[B, d, *L]`` and SU(N) links
``[B, d, *L, N, N]``; the factors' ``link_gradient(U, phi)`` assemble ``dS/dU`` from it exactly as
above, and the field's manifold turns it into its force (``link_force``: ``-Im(U conj(G))`` for U(1)
angles, ``F = (1/2) ta(G U^dagger)`` for SU(N), see :mod:`latflow.manifolds`). ``force(x, phi)``
takes real U(1) angles (the angle formulas above, unchanged) or complex SU(N) links (the manifold route,
``SUN(n_colors)`` by default).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from latflow.lattice import shift
from latflow.manifolds import SUN

from .evenodd import EvenOddWilson
from .gamma import gamma_matrices
from .solvers import SOLVERS, SolverResult, lower_dtype, solve_links
from .wilson import WilsonDirac, u1_links

__all__ = [
    "HasenbuschRatioFactor",
    "Nf2Pseudofermions",
    "PseudofermionFactor",
    "SOLVERS",
    "SolveStats",
    "chrono_guess",
    "complex_gaussian",
    "heatbath",
    "hop_derivative",
    "hop_link_gradient",
]


def complex_gaussian(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Complex Gaussian noise with density proportional to ``exp(-|chi|^2)``.

    Real and imaginary parts are independent ``N(0, 1/2)`` (real part drawn first), so
    ``E |chi_i|^2 = 1`` per component.

    Parameters
    ----------
    shape
        Output shape.
    generator
        Random stream (held by the caller).
    dtype, device
        Complex dtype and device of the result.
    """
    real = torch.empty(0, dtype=dtype).real.dtype
    parts = torch.randn((2, *shape), generator=generator, dtype=real, device=device) * math.sqrt(0.5)
    return torch.complex(parts[0], parts[1])


def supported_noise(
    field_shape: tuple[int, ...],
    mask: torch.Tensor | None,
    batch: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Heatbath noise ``chi`` ``[batch, *field_shape]`` (density ``exp(-|chi|^2)``) on a site subset.

    One complex Gaussian is drawn per full-lattice component (the same stream usage with or
    without ``mask``); components on sites outside the bool ``mask`` ``[*L]`` (e.g. odd sites for
    even/odd pseudofermions) are then zeroed. ``mask=None``: the full lattice.
    """
    chi = complex_gaussian((batch, *field_shape), generator, dtype=dtype, device=device)
    if mask is None:
        return chi
    m = mask.to(device=chi.device)
    m = m.reshape(*m.shape, *([1] * (len(field_shape) - m.dim())))
    return chi * m.to(chi.real.dtype)


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^dagger b`` per configuration, ``[B]`` complex."""
    return (a.conj() * b).flatten(1).sum(dim=1)


def _norm2(a: torch.Tensor) -> torch.Tensor:
    """``|a|^2`` per configuration, ``[B]`` real."""
    return torch.view_as_real(a).pow(2).flatten(1).sum(dim=1)


def hop_derivative(dirac: WilsonDirac, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``d Re(a^dagger H b) / d theta_mu(x)`` for the Wilson hopping term on U(1) links.

    With ``(H b)(x) = sum_mu [ (1 - gamma_mu) s_mu(x) U_mu(x) b(x+mu)
    + (1 + gamma_mu) s_mu(x-mu) U_mu(x-mu)^* b(x-mu) ]`` (``s_0(x) = -1`` on the last time
    slice for antiperiodic time, 1 otherwise), the link ``U_mu(x) = exp(i theta_mu(x))`` enters
    through ``F_mu(x) = s_mu(x) a(x)^dag (1 - gamma_mu) b(x+mu)`` and
    ``G_mu(x) = s_mu(x) a(x+mu)^dag (1 + gamma_mu) b(x)``:

    ``d Re(a^dag H b) / d theta_mu(x) = Re(i U F - i U^* G) = -Im(U_mu(x) F_mu(x) - U_mu(x)^* G_mu(x))``.

    Parameters
    ----------
    dirac
        The Wilson operator (U(1): ``n_colors = 1``), for its lattice, spin dimension and boundary.
    U
        Complex links ``[B, d, *L]``.
    a, b
        Spinors ``[B, *L, Ns]``.

    Returns
    -------
    torch.Tensor
        Real ``[B, d, *L]``.
    """
    d = dirac.lattice.dim
    gam = gamma_matrices(d, dtype=a.dtype, device=a.device)
    eye = torch.eye(gam.shape[-1], dtype=a.dtype, device=a.device)
    ac = a.conj()
    out = []
    for mu in range(d):
        # a^dag P b' = sum_ij conj(a_i) P_ij b'_j = sum_j (conj(a) @ P)_j b'_j
        f = ((ac @ (eye - gam[mu])) * shift(b, mu)).sum(dim=-1)
        g = ((shift(ac, mu) @ (eye + gam[mu])) * b).sum(dim=-1)
        u = U[:, mu]
        z = u * f - u.conj() * g
        if mu == 0 and getattr(dirac, "antiperiodic_time", True):
            z = torch.cat([z[:, :-1], -z[:, -1:]], dim=1)
        out.append(-z.imag)
    return torch.stack(out, dim=1)


def hop_link_gradient(dirac: WilsonDirac, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G = d Re(a^dagger H b) / dU`` in torch's convention (``d Re(a^dag H b) = Re tr(G^dagger dU)``).

    The link ``U_mu(x)`` enters ``a^dag H b`` through the forward hop
    ``s_mu(x) a(x)^dag (1 - gamma_mu) U_mu(x) b(x+mu)`` and the backward hop
    ``s_mu(x) a(x+mu)^dag (1 + gamma_mu) U_mu(x)^dagger b(x)``, which give (spin indices summed,
    colour indices ``c, e``)

    ``G_mu(x)_{ce} = s_mu(x) [ sum_i a_{ic}(x) conj(((1 - gamma_mu) b(x+mu))_{ie})
    + sum_i ((1 + gamma_mu) b(x))_{ic} conj(a_{ie}(x+mu)) ]``.

    For U(1) (no colour axis) the same formula with scalar links. Closed form: nothing is
    differentiated. With the manifold's ``link_force`` this gives the force on U(1) angles
    (``dS/dtheta = -Im(U conj(G))``) or on SU(N) links (``F = (1/2) ta(G U^dagger)``).

    Parameters
    ----------
    dirac
        The Wilson operator, for its lattice, spin dimension, colours and boundary.
    U
        Complex links ``[B, d, *L]`` (U(1)) or ``[B, d, *L, N, N]`` (SU(N)).
    a, b
        Spinors ``[B, *L, Ns]`` (U(1)) or ``[B, *L, Ns, N]`` (SU(N)).

    Returns
    -------
    torch.Tensor
        Complex, the shape of ``U``.
    """
    d = dirac.lattice.dim
    gam = gamma_matrices(d, dtype=a.dtype, device=a.device)
    eye = torch.eye(gam.shape[-1], dtype=a.dtype, device=a.device)
    colour = int(getattr(dirac, "n_colors", 1)) > 1
    out = []
    for mu in range(d):
        b_fwd = shift(b, mu)
        if colour:
            # spinors [B, *L, Ns, N]: spin matrices act on axis -2
            pb = torch.matmul(eye - gam[mu], b_fwd)
            qb = torch.matmul(eye + gam[mu], b)
            g = a.transpose(-1, -2) @ pb.conj() + qb.transpose(-1, -2) @ shift(a, mu).conj()
        else:
            pb = b_fwd @ (eye - gam[mu]).T
            qb = b @ (eye + gam[mu]).T
            g = (a * pb.conj()).sum(dim=-1) + (qb * shift(a, mu).conj()).sum(dim=-1)
        if mu == 0 and getattr(dirac, "antiperiodic_time", True):
            g = torch.cat([g[:, :-1], -g[:, -1:]], dim=1)
        out.append(g)
    return torch.stack(out, dim=1)


class _Operator(Protocol):
    """What a pseudofermion factor needs from ``A`` (``D`` or ``M_hat``)."""

    dirac: WilsonDirac
    mask: torch.Tensor | None
    n_components: int

    def apply(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor: ...

    def apply_dagger(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor: ...

    def apply_normal(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor: ...

    def derivative(self, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def link_derivative(self, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def pack(self, psi: torch.Tensor) -> torch.Tensor: ...

    def unpack(self, v: torch.Tensor) -> torch.Tensor: ...

    def normal(self, U: torch.Tensor) -> Any: ...


class _FullOperator:
    """``A = D`` on the full lattice."""

    def __init__(self, dirac: WilsonDirac) -> None:
        self.dirac = dirac
        self.kappa = float(dirac.kappa)
        self.mask = None
        self.n_components = dirac.lattice.volume * dirac.n_spin

    def apply(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.dirac.apply(U, psi)

    def apply_dagger(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.dirac.apply_dagger(U, psi)

    def apply_normal(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.dirac.apply_normal(U, psi)

    def derivative(self, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``d Re(a^dag D b) / d theta`` ``[B, d, *L]``."""
        return -self.kappa * hop_derivative(self.dirac, U, a, b)

    def link_derivative(self, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``d Re(a^dag D b) / dU`` (torch convention), the shape of ``U``."""
        return -self.kappa * hop_link_gradient(self.dirac, U, a, b)

    def pack(self, psi: torch.Tensor) -> torch.Tensor:
        """The solver's vector for a field ``[B, *field_shape]``: the field itself."""
        return psi

    def unpack(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`."""
        return v

    def normal(self, U: torch.Tensor) -> Any:
        """``v -> D^dag D v`` on solver vectors (:meth:`pack`)."""
        return lambda v: self.dirac.apply_normal(U, v)


class _EvenOddOperator:
    """``A = M_hat = 1 - kappa^2 H_eo H_oe`` on even sites (full-lattice tensors, odd sites zero)."""

    def __init__(self, dirac: WilsonDirac) -> None:
        self.dirac = dirac
        self.eo = EvenOddWilson(dirac, check_parity=False)
        self.kappa = float(dirac.kappa)
        if any(n % 2 for n in dirac.lattice.shape):
            raise ValueError(f"even/odd preconditioning needs even extents, got {list(dirac.lattice.shape)}")
        self.mask = dirac.lattice.checkerboard(0)
        self.n_components = dirac.lattice.volume // 2 * dirac.n_spin

    def apply(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.eo.apply(U, psi)

    def apply_dagger(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.eo.apply_dagger(U, psi)

    def apply_normal(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.eo.apply_normal(U, psi)

    def derivative(self, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``d Re(a^dag M_hat b) / d theta`` ``[B, d, *L]`` for even ``a``, ``b``."""
        dirac = self.dirac
        c = dirac.hop(U, b)
        w = dirac.gamma5(dirac.hop(U, dirac.gamma5(a)))
        return -(self.kappa**2) * (hop_derivative(dirac, U, a, c) + hop_derivative(dirac, U, w, b))

    def link_derivative(self, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``d Re(a^dag M_hat b) / dU`` (torch convention) for even ``a``, ``b``; the shape of ``U``."""
        dirac = self.dirac
        c = dirac.hop(U, b)
        w = dirac.gamma5(dirac.hop(U, dirac.gamma5(a)))
        return -(self.kappa**2) * (hop_link_gradient(dirac, U, a, c) + hop_link_gradient(dirac, U, w, b))

    def pack(self, psi: torch.Tensor) -> torch.Tensor:
        """The solver's vector ``[B, V/2, Ns(, N)]`` for an even-site field ``[B, *field_shape]``: its even sites."""
        return self.eo.pack(psi)

    def unpack(self, v: torch.Tensor) -> torch.Tensor:
        """The full-lattice field (odd sites zero) of a packed even-site vector."""
        return self.eo.unpack(v)

    def normal(self, U: torch.Tensor) -> Any:
        """``v -> M_hat^dag M_hat v`` on packed even-site vectors (half-lattice hops)."""
        return lambda v: self.eo.apply_normal_packed(U, v)


def _make_operator(dirac: WilsonDirac, even_odd: bool) -> _FullOperator | _EvenOddOperator:
    return _EvenOddOperator(dirac) if even_odd else _FullOperator(dirac)


def _link_manifold(manifold: Any, dirac: WilsonDirac) -> Any:
    """The manifold of complex link fields: ``manifold``, or ``SUN(n_colors)`` when ``None``."""
    if manifold is not None:
        return manifold
    n = int(getattr(dirac, "n_colors", 1))
    if n < 2:
        raise ValueError("complex U(1) links need a manifold with links()/link_force(); pass real angles instead")
    return SUN(n)


class SolveStats:
    """Iteration counts of the CG solves of one factor.

    Attributes
    ----------
    last
        ``[B]`` int64 iterations of the most recent solve (``None`` before any).
    total
        ``[B]`` int64 iterations summed since the last :meth:`reset` (``None`` before any).
    n_solves
        Number of solves since the last :meth:`reset`.
    """

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None  # [B] iterations of the most recent solve
        self.total: torch.Tensor | None = None  # [B] summed since the last reset
        self.n_solves = 0

    def add(self, iterations: torch.Tensor) -> None:
        it = iterations.detach().to(torch.long)
        self.last = it
        self.total = it.clone() if self.total is None or self.total.shape != it.shape else self.total + it
        self.n_solves += 1

    def reset(self) -> None:
        self.last, self.total, self.n_solves = None, None, 0


class _FactorBase:
    """Shared solver plumbing of the factors."""

    op: _Operator
    tol: float
    max_iter: int
    n_components: int

    def _init_solver(self, tol: float, max_iter: int) -> None:
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"CG tolerance must be a positive finite number, got {tol}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.stats = SolveStats()
        self.chrono = 0
        self._history: list[torch.Tensor] = []
        self.set_solver("cg")

    def set_solver(self, solver: str = "cg", *, check_every: int | None = None, inner_tol: float = 1e-5) -> None:
        """How this factor's ``(A^dag A) x = b`` systems are solved (see :meth:`Nf2Pseudofermions.set_solver`)."""
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
        if check_every is not None and (isinstance(check_every, bool) or int(check_every) != check_every):
            raise ValueError(f"check_every must be a positive integer or None, got {check_every!r}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be a positive integer or None, got {check_every!r}")
        if solver == "cg_mixed" and not 1e-6 < inner_tol < 1:
            raise ValueError(f"inner_tol must lie in (1e-6, 1) (single-precision inner solves), got {inner_tol}")
        self.solver = solver
        self.check_every = None if check_every is None else int(check_every)
        self.inner_tol = float(inner_tol)

    def _cg(self, op: _Operator, U: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None) -> SolverResult:
        """Solve ``A^dag A x = b`` on solver vectors (``op.pack``) with this factor's solver; records iterations.
        Single-precision fields take plain CG (there is no lower precision to correct from)."""
        solver = self.solver if lower_dtype(b.dtype) != b.dtype else "cg"
        res = solve_links(
            op.normal,
            U,
            b,
            solver=solver,
            tol=self.tol,
            max_iter=self.max_iter,
            check_every=self.check_every,
            inner_tol=self.inner_tol,
            x0=x0,
        )
        self.stats.add(res.iterations)
        return res

    def _solve_normal(self, op: _Operator, U: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``(A^dag A)^{-1} rhs`` ``[B, *field_shape]`` from a zero guess; records the iterations."""
        return op.unpack(self._cg(op, U, op.pack(rhs), None).x)

    def _solve_force(self, op: _Operator, U: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """The force solve ``(A^dag A)^{-1} rhs``: from a zero guess, or a chronological one (``chrono > 0``).

        The guess is :func:`chrono_guess` of this factor's last ``chrono`` force solutions since
        :meth:`chrono_reset` (kept as solver vectors); the solution joins that history.
        """
        if not self.chrono:
            return self._solve_normal(op, U, rhs)
        b = op.pack(rhs)
        x0 = chrono_guess(op.normal(U), b, self._history) if self._history else None
        x = self._cg(op, U, b, x0).x
        self._history = [*self._history, x][-self.chrono :]
        return op.unpack(x)

    def chrono_reset(self) -> None:
        """Forget the force solutions (the start of a trajectory: new pseudofermions)."""
        self._history = []

    def _noise(self, U: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``chi`` ``[B, *L, Ns]`` (zero on odd sites for even/odd operators)."""
        return supported_noise(
            self.op.dirac.field_shape, self.op.mask, U.shape[0], generator, dtype=U.dtype, device=U.device
        )


class PseudofermionFactor(_FactorBase):
    """One pseudofermion for ``det(A^dag A)``, ``A = D`` or ``A = M_hat`` (even/odd).

    Parameters
    ----------
    dirac
        Wilson operator (U(1) or SU(N) links).
    even_odd
        Use the even-site Schur complement ``M_hat`` (same determinant, better conditioned).
    tol, max_iter
        CG tolerance (relative residual) and iteration limit for every solve.

    Attributes
    ----------
    dirac, even_odd, tol, max_iter
        As given.
    n_components
        Complex components of ``phi`` (``V Ns``, or ``V Ns / 2`` even/odd).
    stats
        :class:`SolveStats` of this factor's CG solves.
    """

    def __init__(
        self, dirac: WilsonDirac, *, even_odd: bool = False, tol: float = 1e-10, max_iter: int = 10_000
    ) -> None:
        self.dirac = dirac
        self.even_odd = bool(even_odd)
        self.op = _make_operator(dirac, self.even_odd)
        self.n_components = self.op.n_components
        self._init_solver(tol, max_iter)

    def heatbath(self, U: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi, chi)`` with ``phi = A^dag chi`` ``[B, *L, Ns]``; ``S(phi) = |chi|^2`` exactly."""
        chi = self._noise(U, generator)
        return self.op.apply_dagger(U, chi), chi

    def action(self, U: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``S = phi^dag (A^dag A)^{-1} phi`` ``[B]`` (real) for links ``U`` ``[B, d, *L]``."""
        x = self._solve_normal(self.op, U, phi)
        return _vdot(phi, x).real

    def link_gradient(self, U: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``dS/dU = -2 d Re(Y^dag A X)/dU`` (torch convention) with ``X = (A^dag A)^{-1} phi``, ``Y = A X``.

        Links ``U`` ``[B, d, *L]`` (U(1)) or ``[B, d, *L, N, N]`` (SU(N)); the result has their shape.
        """
        x = self._solve_force(self.op, U, phi)
        y = self.op.apply(U, x)
        return -2.0 * self.op.link_derivative(U, y, x)

    def force(self, theta: torch.Tensor, phi: torch.Tensor, manifold: Any = None) -> torch.Tensor:
        """The force of ``S`` in the coordinates of the field's manifold.

        Real U(1) angles ``theta`` ``[B, d, *L]``: ``dS/dtheta = -2 Re(Y^dag dA X)`` with
        ``X = (A^dag A)^{-1} phi``, ``Y = A X`` (``manifold`` is not needed). Complex links (SU(N)
        ``[B, d, *L, N, N]``): ``manifold.link_force(link_gradient(U, phi), U)``, the su(N) force
        ``F = (1/2) ta(G U^dagger)`` for :class:`latflow.manifolds.SUN` (the default).
        """
        if theta.is_complex():
            mf = _link_manifold(manifold, self.dirac)
            return mf.link_force(self.link_gradient(mf.links(theta), phi), theta)
        U = u1_links(theta)
        x = self._solve_force(self.op, U, phi)
        y = self.op.apply(U, x)
        return -2.0 * self.op.derivative(U, y, x)


class HasenbuschRatioFactor(_FactorBase):
    """One pseudofermion for ``det(A^dag A) / det(A'^dag A')`` with a heavier ``A'``.

    Action ``S = phi^dag A' (A^dag A)^{-1} A'^dag phi``, heatbath ``phi = (A'^dag)^{-1} A^dag chi``
    (computed as ``phi = A' (A'^dag A')^{-1} A^dag chi``, one CG solve).

    Parameters
    ----------
    dirac
        Wilson operator ``D`` (hopping parameter ``kappa``).
    dirac_heavy
        ``D'`` with ``kappa' < kappa`` (e.g. ``dirac.with_kappa(kappa')``).
    even_odd, tol, max_iter
        As in :class:`PseudofermionFactor`.

    Attributes
    ----------
    dirac, dirac_heavy, even_odd, tol, max_iter, n_components, stats
        As for :class:`PseudofermionFactor`.
    """

    def __init__(
        self,
        dirac: WilsonDirac,
        dirac_heavy: WilsonDirac,
        *,
        even_odd: bool = False,
        tol: float = 1e-10,
        max_iter: int = 10_000,
    ) -> None:
        self.dirac = dirac
        self.dirac_heavy = dirac_heavy
        self.even_odd = bool(even_odd)
        self.op = _make_operator(dirac, self.even_odd)
        self.op_heavy = _make_operator(dirac_heavy, self.even_odd)
        self.n_components = self.op.n_components
        self._init_solver(tol, max_iter)

    def heatbath(self, U: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi, chi)`` with ``A'^dag phi = A^dag chi``; ``S(phi) = |chi|^2`` up to the CG tolerance."""
        chi = self._noise(U, generator)
        z = self._solve_normal(self.op_heavy, U, self.op.apply_dagger(U, chi))
        return self.op_heavy.apply(U, z), chi

    def action(self, U: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``S = v^dag (A^dag A)^{-1} v`` ``[B]`` with ``v = A'^dag phi``."""
        v = self.op_heavy.apply_dagger(U, phi)
        x = self._solve_normal(self.op, U, v)
        return _vdot(v, x).real

    def link_gradient(self, U: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``dS/dU = 2 d Re(phi^dag A' X)/dU - 2 d Re(Y^dag A X)/dU`` (torch convention), the shape of ``U``.

        ``X = (A^dag A)^{-1} A'^dag phi``, ``Y = A X``.
        """
        v = self.op_heavy.apply_dagger(U, phi)
        x = self._solve_force(self.op, U, v)
        y = self.op.apply(U, x)
        return 2.0 * (self.op_heavy.link_derivative(U, phi, x) - self.op.link_derivative(U, y, x))

    def force(self, theta: torch.Tensor, phi: torch.Tensor, manifold: Any = None) -> torch.Tensor:
        """The force of ``S`` in the manifold's coordinates (see :meth:`PseudofermionFactor.force`).

        U(1) angles: ``dS / dtheta = 2 Re(phi^dag dA' X) - 2 Re(Y^dag dA X)`` ``[B, d, *L]`` with
        ``X = (A^dag A)^{-1} A'^dag phi``, ``Y = A X``; complex links: ``manifold.link_force`` of
        :meth:`link_gradient`.
        """
        if theta.is_complex():
            mf = _link_manifold(manifold, self.dirac)
            return mf.link_force(self.link_gradient(mf.links(theta), phi), theta)
        U = u1_links(theta)
        v = self.op_heavy.apply_dagger(U, phi)
        x = self._solve_force(self.op, U, v)
        y = self.op.apply(U, x)
        return 2.0 * (self.op_heavy.derivative(U, phi, x) - self.op.derivative(U, y, x))


def chrono_guess(apply_normal: Any, rhs: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Minimal-residual extrapolation of earlier solutions: the initial guess for ``M x = rhs``.

    Over the span of the ``k`` earlier solutions ``v_1 .. v_k`` (Brower, Ivanenko, Levi, Orginos 1997)
    the guess ``x = sum_i c_i v_i`` minimises ``(x - x*)^dag M (x - x*)`` (``x* = M^{-1} rhs``), i.e.
    ``G c = r`` with ``G_ij = v_i^dag M v_j``, ``r_i = v_i^dag rhs``, per configuration (pseudo-inverse of
    ``G``: nearly parallel solutions do not blow up). ``k = 1``: the last solution itself, no product
    with ``M``; ``k >= 2``: ``k`` products with ``M``.

    Parameters
    ----------
    apply_normal
        ``v [B, ...] -> M v``, ``M`` Hermitian positive definite (``A^dag A``).
    rhs
        ``[B, ...]``.
    history
        Earlier solutions, each the shape of ``rhs``, oldest first (at least one).

    Returns
    -------
    torch.Tensor
        The guess, the shape of ``rhs``.
    """
    if len(history) == 1:
        return history[0]
    V = torch.stack([h.flatten(1) for h in history], dim=1)  # [B, k, n]
    MV = torch.stack([apply_normal(h).flatten(1) for h in history], dim=1)
    G = V.conj() @ MV.transpose(1, 2)  # [B, k, k]
    G = 0.5 * (G + G.conj().transpose(1, 2))
    r = (V.conj() @ rhs.flatten(1).unsqueeze(-1)).squeeze(-1)  # [B, k]
    c = (torch.linalg.pinv(G, hermitian=True, rtol=1e-13) @ r.unsqueeze(-1)).squeeze(-1)
    return (c.unsqueeze(-1) * V).sum(dim=1).reshape(rhs.shape)


def heatbath(
    op: WilsonDirac | EvenOddWilson, U: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudofermion heatbath for ``det(A^dag A)``: ``(phi, chi)`` with ``phi = A^dag chi``.

    Parameters
    ----------
    op
        ``WilsonDirac`` (``A = D``) or ``EvenOddWilson`` (``A = M_hat``; ``chi`` zero on odd sites).
    U
        Complex links ``[B, d, *L]``.
    generator
        Random stream for ``chi`` (density proportional to ``exp(-|chi|^2)``).

    Returns
    -------
    phi, chi
        ``[B, *L, Ns]`` each.
    """
    mask = op.even_mask if isinstance(op, EvenOddWilson) else None
    chi = supported_noise(op.field_shape, mask, U.shape[0], generator, dtype=U.dtype, device=U.device)
    return op.apply_dagger(U, chi), chi


class Nf2Pseudofermions:
    """All pseudofermion factors of ``det(D^dag D)`` (Nf = 2 Wilson, U(1) or SU(N) links).

    With Hasenbusch hopping parameters ``kappa_1 < ... < kappa_k < kappa`` the factors are
    ``det(A_1^dag A_1)`` (plain) followed by the ratios ``det(A_{i+1}^dag A_{i+1} / A_i^dag A_i)``
    (``A_{k+1} = A``); without them a single plain factor. ``A`` is ``D`` or, with ``even_odd``,
    ``M_hat`` (``det D = det M_hat``).

    Parameters
    ----------
    dirac
        Wilson operator at the target ``kappa`` (must provide ``with_kappa``).
    even_odd
        Even/odd preconditioning (needs even lattice extents).
    hasenbusch_kappas
        Strictly increasing, each in ``(0, kappa)``.
    tol, max_iter
        CG tolerance and iteration limit of every solve (heatbath, action and force).

    Attributes
    ----------
    factors
        ``[PseudofermionFactor, HasenbuschRatioFactor, ...]``, heaviest first.
    n_components
        Complex components per pseudofermion (``V Ns``, or ``V Ns / 2`` even/odd).
    """

    def __init__(
        self,
        dirac: WilsonDirac,
        *,
        even_odd: bool = False,
        hasenbusch_kappas: tuple[float, ...] = (),
        tol: float = 1e-10,
        max_iter: int = 10_000,
    ) -> None:
        kappa = float(dirac.kappa)
        ks = tuple(float(k) for k in hasenbusch_kappas)
        if any(not math.isfinite(k) for k in ks):
            raise ValueError(f"Hasenbusch kappas must be finite, got {list(ks)}")
        if any(not 0 < k < kappa for k in ks):
            raise ValueError(f"Hasenbusch kappas must lie in (0, kappa = {kappa}), got {list(ks)}")
        if any(b <= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"Hasenbusch kappas must be strictly increasing, got {list(ks)}")
        self.dirac = dirac
        self.kappa = kappa
        self.even_odd = bool(even_odd)
        self.hasenbusch_kappas = ks
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        chain = [dirac.with_kappa(k) for k in ks] + [dirac]
        opts = dict(even_odd=self.even_odd, tol=tol, max_iter=max_iter)
        self.factors: list[PseudofermionFactor | HasenbuschRatioFactor] = [PseudofermionFactor(chain[0], **opts)]
        for heavy, light in zip(chain[:-1], chain[1:]):
            self.factors.append(HasenbuschRatioFactor(light, heavy, **opts))
        self.n_components = self.factors[0].n_components
        self.solver, self.check_every = "cg", None

    def __len__(self) -> int:
        return len(self.factors)

    def set_chrono(self, k: int) -> None:
        """Chronological initial guesses for the force solves of every factor: ``k = 0`` zero guesses (default);
        ``k >= 1`` the minimal-residual extrapolation of that factor's last ``k`` force solutions
        (:func:`chrono_guess`), forgotten at :meth:`chrono_reset`.

        A non-zero guess makes the force depend on the earlier solutions by up to the CG tolerance, so
        molecular dynamics is reversible only to that tolerance; the action solves (heatbath, Metropolis)
        always start from zero.
        """
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ValueError(f"chrono must be an integer >= 0, got {k!r}")
        for f in self.factors:
            f.chrono = int(k)
            f.chrono_reset()

    def chrono_reset(self) -> None:
        """Forget every factor's force solutions (called at the start of each trajectory)."""
        for f in self.factors:
            f.chrono_reset()

    def set_solver(self, solver: str = "cg", *, check_every: int | None = None, inner_tol: float = 1e-5) -> None:
        """How every factor solves its ``(A^dag A) x = b`` systems (heatbath, action and force).

        Parameters
        ----------
        solver
            ``"cg"`` (default): CG in the fields' dtype; ``"cg_mixed"``: complex64 inner CG to ``inner_tol``
            with complex128 defect correction to the factors' ``tol`` (same solutions to that tolerance; the
            Metropolis step stays exact).
        check_every
            Iterations between the solver's host-side convergence checks; ``None``: 1 on the CPU, 10 on
            accelerators (the iterations and solutions do not depend on it).
        inner_tol
            Relative tolerance of the single-precision inner solves of ``"cg_mixed"``.
        """
        for f in self.factors:
            f.set_solver(solver, check_every=check_every, inner_tol=inner_tol)
        self.solver = solver
        self.check_every = check_every

    def heatbath(self, U: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """One pseudofermion per factor, drawn in factor order: ``[phi_1, ...]``, each ``[B, *L, Ns]``."""
        return self.refresh(U, generator)[0]

    def refresh(self, U: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Heatbath plus its action: ``(phis, S [B])`` with ``S = sum_f |chi_f|^2``.

        ``|chi|^2`` is the exact value of each factor's action at its heatbath point (for the
        ratio factors up to the heatbath solve's tolerance), so no extra solve is needed.
        """
        phis, s = [], None
        for f in self.factors:
            phi, chi = f.heatbath(U, generator)
            phis.append(phi)
            s = _norm2(chi) if s is None else s + _norm2(chi)
        assert s is not None
        return phis, s

    def _check(self, phis: list[torch.Tensor]) -> None:
        if len(phis) != len(self.factors):
            raise ValueError(f"expected {len(self.factors)} pseudofermions, got {len(phis)}")

    def action(self, U: torch.Tensor, phis: list[torch.Tensor]) -> torch.Tensor:
        """``sum_f S_f(U, phi_f)`` ``[B]`` for complex links ``U`` ``[B, d, *L]``."""
        self._check(phis)
        return torch.stack([f.action(U, phi) for f, phi in zip(self.factors, phis)]).sum(dim=0)

    def factor_actions(self, U: torch.Tensor, phis: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-factor actions, each ``[B]``."""
        self._check(phis)
        return [f.action(U, phi) for f, phi in zip(self.factors, phis)]

    def force(self, theta: torch.Tensor, phis: list[torch.Tensor], manifold: Any = None) -> torch.Tensor:
        """The force summed over the factors, in the coordinates of the field's manifold.

        U(1) angles ``theta`` ``[B, d, *L]``: ``dS/dtheta`` (as before, ``manifold`` unused); SU(N)
        links ``[B, d, *L, N, N]``: the su(N) force ``F = (1/2) ta(G U^dagger)`` of ``manifold``
        (default ``SUN(n_colors)``), ``G = dS/dU`` from :meth:`link_gradient`.
        """
        self._check(phis)
        if theta.is_complex():
            mf = _link_manifold(manifold, self.dirac)
            return mf.link_force(self.link_gradient(mf.links(theta), phis), theta)
        return sum(f.force(theta, phi) for f, phi in zip(self.factors, phis))  # type: ignore[return-value]

    def link_gradient(self, U: torch.Tensor, phis: list[torch.Tensor]) -> torch.Tensor:
        """``dS/dU`` (torch convention, ``dS = Re tr(G^dagger dU)``) summed over the factors; the shape of ``U``."""
        self._check(phis)
        return sum(f.link_gradient(U, phi) for f, phi in zip(self.factors, phis))  # type: ignore[return-value]

    # --- CG statistics --------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that fix these factors and their solves (kappa, even_odd, Hasenbusch kappas, tol)."""
        return {
            "kappa": self.kappa,
            "even_odd": self.even_odd,
            "hasenbusch_kappas": list(self.hasenbusch_kappas),
            "tol": self.tol,
            **({"solver": self.solver} if self.solver != "cg" else {}),
        }

    def reset_stats(self) -> None:
        """Zero the iteration counters of every factor."""
        for f in self.factors:
            f.stats.reset()

    @property
    def last_iterations(self) -> list[torch.Tensor | None]:
        """Per factor, the iterations ``[B]`` of its most recent CG solve (``None`` before any)."""
        return [f.stats.last for f in self.factors]

    @property
    def total_iterations(self) -> torch.Tensor | None:
        """CG iterations ``[B]`` summed over factors and solves since :meth:`reset_stats`."""
        tot = [f.stats.total for f in self.factors if f.stats.total is not None]
        if not tot:
            return None
        return torch.stack(tot).sum(dim=0)

    @property
    def n_solves(self) -> list[int]:
        """Per factor, the number of CG solves since :meth:`reset_stats`."""
        return [f.stats.n_solves for f in self.factors]
