"""The operators of each pseudofermion factor, as the conditional flows and the joint target see them.

A :class:`FactorLayout` names one factor of :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions`
(plain ``det(A^dag A)`` or a Hasenbusch ratio, on the full lattice or the even sites) and provides its
support (site mask, number of complex components), heatbath noise, an exact draw of ``phi`` and the
quadratic form ``phi^dag K^{-1} phi`` together with ``K^{-1} phi`` (what reverse-KL training needs),
with an optional dense fallback where CG stalls near ``kappa_c``.

Shapes: links ``U`` complex ``[B, d, *L]`` (U(1)), pseudofermions ``[B, *field_shape]`` (full lattice;
zero on odd sites for even/odd factors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .dense import dense_matrix
from .evenodd import EvenOddWilson
from .pseudofermions import supported_noise
from .solvers import ConvergenceError, SolverResult, cg
from .wilson import WilsonDirac

__all__ = ["FactorLayout", "pseudofermion_layout", "layout_of"]


def _site_weights(mask: torch.Tensor, like: torch.Tensor, n_site_dims: int) -> torch.Tensor:
    """0/1 weights of a site mask ``[*L]`` broadcastable against ``like`` ``[B, *L, ...]``."""
    extra = like.dim() - 1 - n_site_dims
    return mask.to(device=like.device, dtype=like.real.dtype).reshape(*mask.shape, *([1] * extra))


@dataclass(frozen=True, eq=False)
class FactorLayout:
    """The operators of one pseudofermion factor.

    Parameters
    ----------
    dirac
        Wilson operator ``D`` of the factor (hopping parameter ``kappa``).
    heavy
        ``D'`` of a Hasenbusch ratio factor (``kappa' < kappa``), ``None`` for a plain factor.
    even_odd
        Work with the even-site Schur complement ``M_hat`` (fields vanish on odd sites).

    Attributes
    ----------
    op, op_heavy
        ``A`` and ``A'``: the ``WilsonDirac`` itself or an ``EvenOddWilson`` around it.
    mask
        Bool site mask ``[*L]`` of the field's support (even sites), ``None`` for the full lattice.
    n_components
        Complex components of one pseudofermion (``V Ns N``, halved for even/odd).
    """

    dirac: WilsonDirac
    heavy: WilsonDirac | None = None
    even_odd: bool = False
    op: WilsonDirac | EvenOddWilson = field(init=False, repr=False)
    op_heavy: WilsonDirac | EvenOddWilson | None = field(init=False, repr=False)
    mask: torch.Tensor | None = field(init=False, repr=False)
    n_components: int = field(init=False)

    def __post_init__(self) -> None:
        if self.heavy is not None and not self.heavy.kappa < self.dirac.kappa:
            raise ValueError(f"a ratio factor needs kappa' < kappa, got {self.heavy.kappa} >= {self.dirac.kappa}")
        object.__setattr__(self, "op", self._operator(self.dirac))
        object.__setattr__(self, "op_heavy", None if self.heavy is None else self._operator(self.heavy))
        mask = self.dirac.lattice.checkerboard(0) if self.even_odd else None
        object.__setattr__(self, "mask", mask)
        n = math.prod(self.dirac.field_shape)
        object.__setattr__(self, "n_components", n // 2 if self.even_odd else n)

    def _operator(self, dirac: WilsonDirac) -> WilsonDirac | EvenOddWilson:
        return EvenOddWilson(dirac, check_parity=False) if self.even_odd else dirac

    @property
    def kappa(self) -> float:
        return self.dirac.kappa

    @property
    def kappa_heavy(self) -> float | None:
        return None if self.heavy is None else self.heavy.kappa

    def site_weights(self, like: torch.Tensor) -> torch.Tensor | None:
        """0/1 weights of the field's support broadcastable against ``like`` ``[B, *field_shape]``
        (``None`` on the full lattice)."""
        return None if self.mask is None else _site_weights(self.mask, like, self.dirac.lattice.dim)

    def noise(self, U: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``chi`` ``[B, *field_shape]`` with density ``exp(-|chi|^2) / pi^n`` on the field's support.

        One complex Gaussian per full-lattice component is drawn (odd sites then zeroed for
        even/odd), the same stream usage as the pseudofermion heatbath.
        """
        shape = self.dirac.field_shape
        return supported_noise(shape, self.mask, U.shape[0], generator, dtype=U.dtype, device=U.device)

    def heatbath(
        self, U: torch.Tensor, generator: torch.Generator, *, tol: float = 1e-10, max_iter: int = 10_000
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An exact draw ``phi ~ N(0, K)``: ``(phi, chi)`` with ``phi = A^dag chi`` (plain) or
        ``A'^dag phi = A^dag chi`` (ratio, one CG solve: ``phi = A' (A'^dag A')^{-1} A^dag chi``)."""
        chi = self.noise(U, generator)
        v = self.op.apply_dagger(U, chi)
        if self.op_heavy is None:
            return v, chi
        heavy = self.op_heavy
        res = cg(lambda z: heavy.apply_normal(U, z), v, tol=tol, max_iter=max_iter)
        return heavy.apply(U, res.x), chi

    def quadratic_form(
        self,
        U: torch.Tensor,
        phi: torch.Tensor,
        *,
        tol: float = 1e-10,
        max_iter: int = 10_000,
        dense_fallback: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``phi^dag K^{-1} phi`` by CG, with ``K^{-1} phi`` and the iteration count.

        Parameters
        ----------
        U, phi
            Links ``[B, d, *L]`` and pseudofermions ``[B, *field_shape]``.
        tol, max_iter
            CG settings; a system that misses ``tol`` raises
            :class:`~latflow.fermions.solvers.ConvergenceError` unless ``dense_fallback``.
        dense_fallback
            Solve the systems that CG could not (near-zero modes of ``D`` near ``kappa_c`` stall CG
            on the normal equations at a relative residual ~1e-8) with a dense LU factorisation of
            ``A^dag`` instead: exact, but ``O(n^3)`` per such configuration (small lattices).

        Returns
        -------
        value, x, iterations
            ``[B]`` real, ``x = K^{-1} phi`` ``[B, *field_shape]`` (so ``d value = 2 Re(x^dag d phi)``
            at fixed ``U``), ``[B]`` int64 CG iterations (``max_iter`` where the dense solve was used).
        """
        op = self.op
        v = phi if self.op_heavy is None else self.op_heavy.apply_dagger(U, phi)
        try:
            res = cg(lambda z: op.apply_normal(U, z), v, tol=tol, max_iter=max_iter)
        except ConvergenceError as exc:
            if not dense_fallback:
                raise
            res = exc.result
            bad = ~(res.residual < tol)
            y = res.x.clone()
            y[bad] = self._dense_normal_solve(U[bad], v[bad])
            res = SolverResult(x=y, iterations=torch.where(bad, max_iter, res.iterations), residual=res.residual)
        value = (v.conj() * res.x).flatten(1).sum(1).real
        x = res.x if self.op_heavy is None else self.op_heavy.apply(U, res.x)
        return value, x, res.iterations

    def _dense_normal_solve(self, U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(A^dag A)^{-1} v`` ``[b, *field_shape]`` from dense LU solves with ``A^dag`` and ``A``."""
        shape = self.dirac.field_shape
        if self.mask is None:
            idx = torch.arange(math.prod(shape), device=v.device)
        else:
            m = self.mask.to(v.device)
            full = m.reshape(*m.shape, *([1] * (len(shape) - m.dim()))).expand(shape)
            idx = torch.nonzero(full.reshape(-1), as_tuple=False).squeeze(1)
        a = dense_matrix(self.op.apply, U, shape, mask=self.mask)  # [b, n, n]
        rhs = v.reshape(v.shape[0], -1)[:, idx]
        y = torch.linalg.solve(a.mH, rhs)  # A^{-dag} v
        z = torch.linalg.solve(a, y)  # A^{-1} A^{-dag} v
        out = torch.zeros((v.shape[0], math.prod(shape)), dtype=v.dtype, device=v.device)
        out[:, idx] = z
        return out.reshape(v.shape)


def pseudofermion_layout(
    dirac: WilsonDirac, *, even_odd: bool = False, hasenbusch_kappas: Sequence[float] = ()
) -> tuple[FactorLayout, ...]:
    """The factors of :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions`, in its order.

    ``det(A^dag A) = det(A_1^dag A_1) prod_i det(A_{i+1}^dag A_{i+1} / A_i^dag A_i)`` with
    ``A_i`` at ``hasenbusch_kappas[i]`` (strictly increasing in ``(0, kappa)``) and ``A_{k+1} = A``.
    """
    kappa = float(dirac.kappa)
    ks = tuple(float(k) for k in hasenbusch_kappas)
    if any(not (math.isfinite(k) and 0 < k < kappa) for k in ks):
        raise ValueError(f"Hasenbusch kappas must lie in (0, kappa = {kappa}), got {list(ks)}")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"Hasenbusch kappas must be strictly increasing, got {list(ks)}")
    chain = [dirac.with_kappa(k) for k in ks] + [dirac]
    layout = [FactorLayout(chain[0], None, bool(even_odd))]
    layout += [FactorLayout(light, heavy, bool(even_odd)) for heavy, light in zip(chain[:-1], chain[1:])]
    return tuple(layout)


def layout_of(pseudofermions: object) -> tuple[FactorLayout, ...]:
    """The layout of an ``Nf2Pseudofermions`` container (its ``factors``, in order)."""
    out = []
    for f in pseudofermions.factors:  # type: ignore[attr-defined]
        out.append(FactorLayout(f.dirac, getattr(f, "dirac_heavy", None), bool(f.even_odd)))
    return tuple(out)


def _same_layout(a: Sequence[FactorLayout], b: Sequence[FactorLayout]) -> bool:
    def key(f: FactorLayout) -> tuple:
        return (f.kappa, f.kappa_heavy, f.even_odd, tuple(f.dirac.lattice.shape), f.dirac.antiperiodic_time)

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))
