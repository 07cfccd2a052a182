"""Even/odd (Schur complement) preconditioning of the Wilson operator.

Order the sites even (``sum_mu x_mu`` even) then odd. ``H`` only connects sites of opposite
parity, and without a clover term ``D_ee = D_oo = 1``, so

``D = [[1, -kappa H_eo], [-kappa H_oe, 1]]``,  ``det D = det M_hat``,
``M_hat = 1 - kappa^2 H_eo H_oe`` acting on even sites.

``D x = b`` is solved by ``M_hat x_e = b_e + kappa H_eo b_o`` followed by
``x_o = b_o + kappa H_oe x_e``.

Even-site fields are stored as full-lattice spinors ``[B, *field_shape]`` whose odd sites are
zero; for such a field ``M_hat psi = psi - kappa^2 H H psi`` exactly (``H psi`` lives on odd
sites, ``H H psi`` on even ones), and the odd sites of the result stay exactly zero. Every
extent must be even (otherwise parity is not a checkerboard of the torus).

Packed (half-lattice) fields. :meth:`EvenOddWilson.pack` stores the even sites alone, ``[B, V/2,
Ns(, N)]`` in increasing full-lattice flat index (:func:`~latflow.fermions.hopping.parity_sites`),
and :meth:`~EvenOddWilson.apply_packed`, :meth:`~EvenOddWilson.apply_dagger_packed` and
:meth:`~EvenOddWilson.apply_normal_packed` act on such vectors with two table hops (odd <- even,
then even <- odd) that touch only the sites they produce, so one ``M_hat`` costs about one full
``D``. :meth:`~EvenOddWilson.solve` runs its Krylov solver on packed vectors. The hops use the
compiled kernel on CPU where it applies, the torch gather path otherwise (GPU, autograd).
"""

from __future__ import annotations

import itertools

import torch

from .hopping import hop_tables, kernel_schur_normal, kernel_usable, parity_sites, table_hop
from .solvers import ConvergenceError, SolverResult, bicgstab, cgnr
from .wilson import WilsonDirac

__all__ = ["EvenOddWilson"]


class EvenOddWilson:
    """Schur complement ``M_hat = 1 - kappa^2 H_eo H_oe`` of a :class:`WilsonDirac` on even sites.

    Implements the :class:`~latflow.fermions.wilson.DiracOperator` protocol for ``M_hat`` on
    full-lattice spinors with zero odd sites; ``det M_hat = det D``.

    Parameters
    ----------
    dirac
        The full Wilson operator (any gauge group, any even extents).
    check_parity
        If true (default), :meth:`apply`, :meth:`apply_dagger` and :meth:`apply_normal` raise
        ``ValueError`` when the input has non-zero odd-site entries (costs one reduction per call).

    Attributes
    ----------
    dirac, lattice, kappa, n_spin, n_colors, field_shape
        As for the Wilson operator; ``field_shape`` is the full-lattice spinor shape.
    even_mask, odd_mask
        Bool ``[*L]`` site masks (CPU; moved to the field's device when used).
    packed_shape
        Shape of one configuration's packed even (or odd) field: ``(V/2, Ns)`` for U(1),
        ``(V/2, Ns, N)`` for SU(N).
    """

    def __init__(self, dirac: WilsonDirac, *, check_parity: bool = True) -> None:
        if not isinstance(dirac, WilsonDirac):
            raise ValueError(f"EvenOddWilson wraps a WilsonDirac, got {type(dirac).__name__}")
        shape = dirac.lattice.shape
        if any(n % 2 for n in shape):
            raise ValueError(
                f"even/odd preconditioning needs even extents in every direction, got lattice shape {list(shape)}"
            )
        self.dirac = dirac
        self.lattice = dirac.lattice
        self.kappa = dirac.kappa
        self.n_spin = dirac.n_spin
        self.n_colors = dirac.n_colors
        self.field_shape = dirac.field_shape
        self.check_parity = bool(check_parity)
        self.even_mask = self.lattice.checkerboard(0)
        self.odd_mask = ~self.even_mask
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self.packed_shape: tuple[int, ...] = (self.lattice.volume // 2, *self.field_shape[self.lattice.dim :])
        self._sites = {p: parity_sites(self.lattice.shape, p) for p in ("even", "odd")}
        self._sites_on: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"EvenOddWilson({self.dirac!r})"

    def with_kappa(self, kappa: float) -> EvenOddWilson:
        """The same preconditioned operator at another hopping parameter."""
        return EvenOddWilson(self.dirac.with_kappa(kappa), check_parity=self.check_parity)

    # ------------------------------------------------------------------ parity helpers
    def _site_weights(self, parity: str, psi: torch.Tensor) -> torch.Tensor:
        """0/1 weights ``[*L, 1(, 1)]`` selecting ``parity`` sites, in the real dtype of ``psi``."""
        key = (parity, psi.real.dtype, psi.device, torch.is_inference_mode_enabled())
        w = self._mask_cache.get(key)
        if w is None:
            mask = self.even_mask if parity == "even" else self.odd_mask
            extra = len(self.field_shape) - self.lattice.dim
            w = mask.to(device=psi.device, dtype=psi.real.dtype).reshape(*mask.shape, *([1] * extra))
            self._mask_cache[key] = w
        return w

    def project_even(self, psi: torch.Tensor) -> torch.Tensor:
        """``psi`` with its odd sites set to zero, ``[B, *field_shape]``."""
        self._check_shape(psi)
        return psi * self._site_weights("even", psi)

    def project_odd(self, psi: torch.Tensor) -> torch.Tensor:
        """``psi`` with its even sites set to zero, ``[B, *field_shape]``."""
        self._check_shape(psi)
        return psi * self._site_weights("odd", psi)

    def _check_shape(self, psi: torch.Tensor) -> None:
        if not isinstance(psi, torch.Tensor) or tuple(psi.shape[1:]) != self.field_shape or psi.dim() < 2:
            shape = list(psi.shape) if isinstance(psi, torch.Tensor) else type(psi).__name__
            raise ValueError(f"{self!r} expects spinors [B, {', '.join(map(str, self.field_shape))}], got {shape}")

    def _odd_parts(self, psi: torch.Tensor) -> list[torch.Tensor]:
        """Strided views of ``psi`` covering exactly its odd sites (no copy for contiguous ``psi``).

        Splitting every extent as ``L = 2 (L / 2)``, the parity of a site is the parity of the sum
        of its ``d`` sub-indices, so the odd sites are the ``2**(d-1)`` sub-index patterns with an
        odd sum."""
        d = self.lattice.dim
        split = [n for L in self.lattice.shape for n in (L // 2, 2)]
        r = psi.reshape(psi.shape[0], *split, *psi.shape[1 + d :])
        parts = []
        for pattern in itertools.product((0, 1), repeat=d):
            if sum(pattern) % 2:
                idx = (slice(None),) + tuple(x for a in pattern for x in (slice(None), a))
                parts.append(r[idx])
        return parts

    def check_even(self, psi: torch.Tensor) -> None:
        """``ValueError`` unless ``psi`` ``[B, *field_shape]`` vanishes on odd sites."""
        self._check_shape(psi)
        parts = self._odd_parts(psi)
        if bool(torch.stack([torch.count_nonzero(v) for v in parts]).sum()):
            worst = max(float(v.abs().max()) for v in parts)
            raise ValueError(
                f"{self!r} acts on even-site fields, but the input has non-zero odd-site entries "
                f"(max |psi_odd| = {worst:.3e}); use project_even(psi) first"
            )

    # ------------------------------------------------------------------ operator
    def _m(self, U: torch.Tensor, psi: torch.Tensor, dagger: bool) -> torch.Tensor:
        d = self.dirac
        t = d._scaled_hop(U, psi, 1.0, None, dagger)
        return d._scaled_hop(U, t, -self.kappa * self.kappa, psi, dagger)

    def apply(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``M_hat psi = psi - kappa^2 H H psi`` for an even-site spinor ``[B, *field_shape]``."""
        self.dirac.check_field(U, psi)
        if self.check_parity:
            self.check_even(psi)
        return self._m(U, psi, False)

    def apply_dagger(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``M_hat^dagger psi = psi - kappa^2 H^dagger H^dagger psi`` (even-site spinor)."""
        self.dirac.check_field(U, psi)
        if self.check_parity:
            self.check_even(psi)
        return self._m(U, psi, True)

    def apply_normal(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``M_hat^dagger M_hat psi`` (even-site spinor; Hermitian positive definite)."""
        self.dirac.check_field(U, psi)
        if self.check_parity:
            self.check_even(psi)
        return self._m(U, self._m(U, psi, False), True)

    def gamma5(self, psi: torch.Tensor) -> torch.Tensor:
        """``gamma_5 psi`` (site-diagonal, so it keeps even-site fields even)."""
        return self.dirac.gamma5(psi)

    # ------------------------------------------------------------------ packed (half-lattice) fields
    def _site_index(self, parity: str, device: torch.device) -> torch.Tensor:
        key = (parity, torch.device(device))
        idx = self._sites_on.get(key)
        if idx is None:
            idx = self._sites[parity].to(device)
            self._sites_on[key] = idx
        return idx

    def _pack_parity(self, psi: torch.Tensor, parity: str) -> torch.Tensor:
        self._check_shape(psi)
        flat = psi.reshape(psi.shape[0], self.lattice.volume, *self.packed_shape[1:])
        return flat.index_select(1, self._site_index(parity, psi.device))

    def pack(self, psi: torch.Tensor) -> torch.Tensor:
        """The even sites of a full-lattice spinor ``[B, *field_shape]`` as a packed ``[B, *packed_shape]``."""
        return self._pack_parity(psi, "even")

    def pack_odd(self, psi: torch.Tensor) -> torch.Tensor:
        """The odd sites of a full-lattice spinor ``[B, *field_shape]`` as a packed ``[B, *packed_shape]``."""
        return self._pack_parity(psi, "odd")

    def unpack(self, x_e: torch.Tensor, x_o: torch.Tensor | None = None) -> torch.Tensor:
        """Full-lattice spinor ``[B, *field_shape]`` from packed even sites ``x_e`` ``[B, *packed_shape]``
        (and packed odd sites ``x_o``; zero odd sites if ``None``)."""
        self._check_packed(x_e)
        b = x_e.shape[0]
        full = torch.zeros((b, self.lattice.volume, *self.packed_shape[1:]), dtype=x_e.dtype, device=x_e.device)
        full = full.index_copy(1, self._site_index("even", x_e.device), x_e)
        if x_o is not None:
            self._check_packed(x_o)
            full = full.index_copy(1, self._site_index("odd", x_o.device), x_o)
        return full.reshape(b, *self.field_shape)

    def _check_packed(self, x: torch.Tensor, U: torch.Tensor | None = None) -> None:
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.packed_shape or x.dim() < 2:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{self!r} expects packed even-site spinors [B, {', '.join(map(str, self.packed_shape))}], got {shape}"
            )
        if U is not None:
            self.dirac.check_links(U)
            if x.shape[0] != U.shape[0] or x.dtype != U.dtype or x.device != U.device:
                raise ValueError(
                    f"packed spinor [{x.shape[0]}, ...] ({x.dtype}, {x.device}) and links [{U.shape[0]}, ...] "
                    f"({U.dtype}, {U.device}) must share batch, dtype and device"
                )

    def hop_packed(
        self,
        U: torch.Tensor,
        src: torch.Tensor,
        out_parity: str,
        *,
        scale: float = 1.0,
        base: torch.Tensor | None = None,
        dagger: bool = False,
    ) -> torch.Tensor:
        """``base + scale * H src`` from a packed field of one parity to the packed sites of ``out_parity``.

        Parameters
        ----------
        U
            Links ``[B, *link_shape]``.
        src
            Packed source ``[B, *packed_shape]`` of the parity opposite to ``out_parity``.
        out_parity
            ``"even"`` (``H_eo src``) or ``"odd"`` (``H_oe src``).
        scale, base
            Real factor, and an optional packed ``[B, *packed_shape]`` field of ``out_parity`` to add.
        dagger
            Use ``H^dagger``.

        Returns
        -------
        torch.Tensor
            Packed ``[B, *packed_shape]`` field of ``out_parity``.
        """
        if out_parity not in ("even", "odd"):
            raise ValueError(f"out_parity must be 'even' or 'odd', got {out_parity!r}")
        d = self.dirac
        return table_hop(
            hop_tables(tuple(self.lattice.shape), out_parity),
            d._flat_terms[dagger],
            d._term_tabs[dagger],
            d.flat_links(U),
            src.contiguous(),
            scale=scale,
            base=None if base is None else base.contiguous(),
            n_spin=self.n_spin,
            n_colors=self.n_colors,
            backend=d.backend,
        )

    def _m_packed(self, U: torch.Tensor, x: torch.Tensor, dagger: bool) -> torch.Tensor:
        t = self.hop_packed(U, x, "odd", dagger=dagger)
        return self.hop_packed(U, t, "even", scale=-self.kappa * self.kappa, base=x, dagger=dagger)

    def apply_packed(self, U: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M_hat x = x - kappa^2 H_eo H_oe x`` for a packed even-site spinor ``[B, *packed_shape]``."""
        self._check_packed(x, U)
        return self._m_packed(U, x, False)

    def apply_dagger_packed(self, U: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M_hat^dagger x`` for a packed even-site spinor ``[B, *packed_shape]``."""
        self._check_packed(x, U)
        return self._m_packed(U, x, True)

    def apply_normal_packed(self, U: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M_hat^dagger M_hat x`` for a packed even-site spinor ``[B, *packed_shape]`` (Hermitian positive
        definite)."""
        self._check_packed(x, U)
        d = self.dirac
        if d.backend != "torch":
            uf, src = d.flat_links(U), x.contiguous()
            if kernel_usable(uf, src, n_spin=self.n_spin, n_colors=self.n_colors):
                shape = tuple(self.lattice.shape)
                odd, even = hop_tables(shape, "odd"), hop_tables(shape, "even")
                tabs = d._term_tabs
                return kernel_schur_normal(
                    odd, even, tabs[False], tabs[True], uf, src, self.kappa, self.n_spin, self.n_colors
                )
        return self._m_packed(U, self._m_packed(U, x, False), True)

    def source_packed(self, U: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Packed even-site right-hand side ``b_e + kappa H_eo b_o`` of the Schur system for ``D x = b``
        (``b`` full-lattice ``[B, *field_shape]``)."""
        self.dirac.check_field(U, b)
        return self.hop_packed(U, self.pack_odd(b), "even", scale=self.kappa, base=self.pack(b))

    def reconstruct_packed(self, U: torch.Tensor, x_e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Full solution ``[B, *field_shape]``: packed even part ``x_e`` and odd part ``b_o + kappa H_oe x_e``."""
        self._check_packed(x_e, U)
        self.dirac.check_field(U, b)
        x_o = self.hop_packed(U, x_e, "odd", scale=self.kappa, base=self.pack_odd(b))
        return self.unpack(x_e, x_o)

    # ------------------------------------------------------------------ full solve
    def source(self, U: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Even-site right-hand side ``b_e + kappa H_eo b_o`` of the Schur system for ``D x = b``."""
        self.dirac.check_field(U, b)
        b_e = self.project_even(b)
        return self.dirac._scaled_hop(U, self.project_odd(b), self.kappa, b_e, False)

    def reconstruct(self, U: torch.Tensor, x_e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Full solution ``x = x_e + (b_o + kappa H_oe x_e)`` from the even part ``x_e``."""
        self.dirac.check_field(U, x_e)
        self.dirac.check_field(U, b)
        x_o = self.dirac._scaled_hop(U, x_e, self.kappa, self.project_odd(b), False)
        return x_e + x_o

    def solve(
        self,
        U: torch.Tensor,
        b: torch.Tensor,
        *,
        tol: float = 1e-10,
        max_iter: int = 1000,
        x0: torch.Tensor | None = None,
        method: str = "cgnr",
    ) -> SolverResult:
        """Solve the full system ``D x = b`` through the Schur complement.

        The Krylov solver runs on packed even-site vectors ``[B, *packed_shape]`` (:meth:`apply_packed`).

        Parameters
        ----------
        U
            Links ``[B, *link_shape]``.
        b
            Full-lattice right-hand side ``[B, *field_shape]`` (both parities).
        tol
            Target for the full relative residual ``|b - D x| / |b|``.
        max_iter
            Maximum iterations of the even-site solver.
        x0
            Optional initial guess for the full solution (its even part seeds the solver).
        method
            ``"cgnr"`` (CG on ``M_hat^dagger M_hat``, stopping on the ``M_hat`` residual) or
            ``"bicgstab"``.

        Returns
        -------
        SolverResult
            ``x`` the full solution, ``iterations`` of the even-site solver, ``residual`` the
            true ``|b - D x| / |b|`` recomputed with the unpreconditioned operator. Raises
            :class:`~latflow.fermions.solvers.ConvergenceError` if a system misses ``tol``.
        """
        self.dirac.check_field(U, b)
        if method not in ("cgnr", "bicgstab"):
            raise ValueError(f"method must be 'cgnr' or 'bicgstab', got {method!r}")
        rhs = self.source_packed(U, b)
        # the odd residual vanishes by construction, so |b - D x| = |rhs - M_hat x_e|:
        # tighten the even-site tolerance so that it means tol relative to |b|
        bnorm = torch.linalg.vector_norm(b.reshape(b.shape[0], -1), dim=-1)
        rnorm = torch.linalg.vector_norm(rhs.reshape(rhs.shape[0], -1), dim=-1)
        ok = rnorm > 0
        ratio = torch.where(ok, bnorm / torch.where(ok, rnorm, torch.ones_like(rnorm)), torch.ones_like(rnorm))
        inner_tol = tol * min(1.0, float(ratio.min())) if b.shape[0] else tol
        x_e0 = None if x0 is None else self.pack(x0)
        apply_m = lambda v: self._m_packed(U, v, False)  # noqa: E731
        if method == "cgnr":
            inner = cgnr(apply_m, lambda v: self._m_packed(U, v, True), rhs, tol=inner_tol, max_iter=max_iter, x0=x_e0)
        else:
            inner = bicgstab(apply_m, rhs, tol=inner_tol, max_iter=max_iter, x0=x_e0)
        x = self.reconstruct_packed(U, inner.x, b)
        residual = torch.linalg.vector_norm((b - self.dirac.apply(U, x)).reshape(b.shape[0], -1), dim=-1)
        residual = residual / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        result = SolverResult(x=x, iterations=inner.iterations, residual=residual)
        if not bool((residual < tol).all()):
            raise ConvergenceError(f"EvenOddWilson.solve ({method})", tol, max_iter, result)
        return result
