"""Matrix-free, batched Wilson Dirac operator for U(1) and SU(N) links in any dimension d >= 2.

``D = 1 - kappa H`` with the hopping term

``(H psi)(x) = sum_mu [ (1 - gamma_mu) U_mu(x) psi(x+mu) + (1 + gamma_mu) U_mu(x-mu)^dagger psi(x-mu) ]``,

antiperiodic in time (a hop across the boundary of lattice axis 0 picks up a factor -1),
periodic in space. ``D`` is gamma5-Hermitian: ``D^dagger = gamma_5 D gamma_5``, and
``H^dagger`` is ``H`` with ``gamma_mu -> -gamma_mu``, which is how :meth:`WilsonDirac.apply_dagger`
is computed (also in odd ``d``, where there is no ``gamma_5``).

Shapes (batch first): links ``U`` complex ``[B, d, L0, ..., L{d-1}]`` for U(1)
(``u1_links(theta)``) and ``[B, d, L0, ..., L{d-1}, N, N]`` for SU(N); spinors ``psi``
``[B, L0, ..., L{d-1}, Ns]`` for U(1) and ``[B, L0, ..., L{d-1}, Ns, N]`` for SU(N),
``Ns = spin_dim(d)``.

Implementation. The gamma matrices are monomial, so ``(1 -+ gamma_mu) = sum u w^T`` over
``Ns / 2`` pairs of spin components (exact +-1, +-i entries): each hop needs only ``Ns / 2``
half-spinor components. For U(1) one small matrix product projects ``psi`` onto all ``2 d Ns / 2``
components at once, each component is multiplied by its link while being shifted (written
straight into a work buffer slice by slice, no ``torch.roll`` copy), and one small matrix
product reconstructs ``H psi``. Work buffers and the pre-sliced views are reused between calls.
SU(N) links and calls that need autograd (links or spinors with ``requires_grad``) take a plainer
path with ``torch.roll``; both give the same numbers. The time-boundary sign is folded into the
links once: ``U_0(x)`` with ``x_0 = L0 - 1`` is multiplied by -1 (both hops across the boundary
use that link). These prepared links are cached for the last link tensor seen (same object,
unchanged version counter, not requiring grad), so Krylov solvers do not redo that work in every
iteration.

Compiled kernel. On CPU, for contiguous complex64/complex128 fields and links without autograd,
``Ns`` in {2, 4} and ``N`` in {1, 2, 3}, the hop runs in one fused pass of the compiled kernel of
:mod:`latflow.fermions.hopping` (OpenMP over sites, ``torch.get_num_threads()`` threads); every
other call (GPU, autograd, no compiler, ``LATFLOW_KERNELS=off``) takes the torch code above, which
stays the reference. ``WilsonDirac(..., backend="torch")`` forces the torch code.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from latflow.lattice import Lattice

from .gamma import _gammas_np, monomial_form, spin_dim
from .hopping import check_backend, hop_tables, kernel_hop, kernel_usable, term_tables

__all__ = ["u1_links", "DiracOperator", "WilsonDirac"]

_MAX_WORK_BUFFERS = 12

# one half-spinor component: (projection terms, reconstruction terms), each ((spin, coefficient), ...)
_Term = tuple[tuple[tuple[int, complex], ...], tuple[tuple[int, complex], ...]]


def u1_links(theta: torch.Tensor) -> torch.Tensor:
    """Complex U(1) links ``exp(i theta)`` ``[B, d, L0, ..., L{d-1}]`` from real angles (same shape)."""
    if theta.is_complex():
        raise ValueError("u1_links takes real link angles theta, got a complex tensor")
    return torch.polar(torch.ones_like(theta), theta)


@runtime_checkable
class DiracOperator(Protocol):
    """A batched, matrix-free Dirac operator acting on spinor fields ``[B, *field_shape]``."""

    field_shape: tuple[int, ...]

    def apply(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``D psi``."""
        ...

    def apply_dagger(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger psi``."""
        ...

    def apply_normal(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger D psi``."""
        ...


def _clean(c: complex) -> complex | float:
    """Real coefficients as floats (cheaper ``alpha`` in ``torch.add``)."""
    c = complex(c)
    return c.real if c.imag == 0 else c


def _spin_terms(gamma: torch.Tensor | object, sigma: int) -> tuple[_Term, ...]:
    """Half-spinor decomposition of ``(1 + sigma gamma)`` for a monomial Hermitian ``gamma``.

    On a pair ``(i, j)`` with ``gamma[i, j] = c`` the block ``[[1, s c], [s c*, 1]]`` equals
    ``u w^T`` with ``w = (1, s c)`` and ``u = (1, s c*)``; a diagonal entry ``gamma[i, i] = g``
    gives the 1x1 block ``1 + s g`` (0 or 2).
    """
    perm, phase = monomial_form(gamma)  # type: ignore[arg-type]
    terms: list[_Term] = []
    done: set[int] = set()
    for i, (j, c) in enumerate(zip(perm, phase)):
        if i in done:
            continue
        done.update((i, j))
        if j == i:
            val = 1 + sigma * c
            if abs(val) > 1e-12:
                terms.append((((i, 1.0),), ((i, _clean(val)),)))
        else:
            terms.append((((i, 1.0), (j, _clean(sigma * c))), ((i, 1.0), (j, _clean(sigma * c.conjugate())))))
    return tuple(terms)


@dataclass
class _Links:
    """Prepared links of one ``U`` (see :meth:`WilsonDirac.prepared_links`) and the hop plans using them."""

    ref: weakref.ref
    version: int | None
    uf: torch.Tensor
    n_colors: int
    plans: dict
    _ub: torch.Tensor | None = None

    @property
    def ub(self) -> torch.Tensor:
        """``uf^dagger``, computed on first use (the compiled kernel never needs it)."""
        if self._ub is None:
            if self.n_colors == 1:
                self._ub = self.uf.conj().resolve_conj()
            else:
                self._ub = self.uf.conj().transpose(-1, -2).contiguous()
        return self._ub


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


class WilsonDirac:
    """Wilson Dirac operator ``D = 1 - kappa H`` (see the module docstring).

    Parameters
    ----------
    lattice
        Geometry ``(L0, ..., L{d-1})``, ``d >= 2``; axis 0 is time.
    kappa
        Hopping parameter (real, finite).
    n_colors
        1 for U(1) links (no colour axis), ``N >= 2`` for SU(N) links.
    antiperiodic_time
        Antiperiodic boundary condition along axis 0 (default); periodic otherwise.
    backend
        ``"auto"`` (default): the compiled hopping kernel where it applies (CPU, no autograd, see the
        module docstring), torch otherwise; ``"torch"``: always the torch code (the reference);
        ``"kernel"``: the compiled kernel or ``RuntimeError``.

    Attributes
    ----------
    lattice, kappa, n_spin, n_colors, antiperiodic_time
    field_shape
        Spinor shape of one configuration: ``(*L, Ns)`` for U(1), ``(*L, Ns, N)`` for SU(N).
    link_shape
        Link shape of one configuration: ``(d, *L)`` for U(1), ``(d, *L, N, N)`` for SU(N).
    """

    def __init__(
        self,
        lattice: Lattice,
        kappa: float,
        *,
        n_colors: int = 1,
        antiperiodic_time: bool = True,
        backend: str = "auto",
    ) -> None:
        if not isinstance(lattice, Lattice):
            lattice = Lattice(tuple(lattice))
        if lattice.dim < 2:
            raise ValueError(f"WilsonDirac needs d >= 2, got lattice shape {list(lattice.shape)}")
        if isinstance(kappa, complex) or not math.isfinite(float(kappa)):
            raise ValueError(f"kappa must be a finite real number, got {kappa!r}")
        if int(n_colors) != n_colors or n_colors < 1:
            raise ValueError(f"n_colors must be a positive integer (1 = U(1)), got {n_colors!r}")
        self.lattice = lattice
        self.kappa = float(kappa)
        self.n_colors = int(n_colors)
        self.antiperiodic_time = bool(antiperiodic_time)
        self.backend = check_backend(backend)
        d = lattice.dim
        self.n_spin = spin_dim(d)
        colour = () if self.n_colors == 1 else (self.n_colors,)
        self.field_shape: tuple[int, ...] = (*lattice.shape, self.n_spin, *colour)
        self.link_shape: tuple[int, ...] = (d, *lattice.shape, *colour, *colour)
        gammas, g5 = _gammas_np(d)
        # terms[dagger][mu] = (forward terms of (1 - s gamma_mu), backward terms of (1 + s gamma_mu)), s = -1 if dagger
        self._terms = {
            dag: [(_spin_terms(g, -1 if not dag else 1), _spin_terms(g, 1 if not dag else -1)) for g in gammas]
            for dag in (False, True)
        }
        self._g5_diag = None if g5 is None else [float(g5[s, s].real) for s in range(self.n_spin)]
        self._spin_axis = -1 if self.n_colors == 1 else -2
        self._flat_terms = {
            dag: [
                (mu, backward, proj, recon)
                for mu, pair in enumerate(self._terms[dag])
                for backward, terms in ((False, pair[0]), (True, pair[1]))
                for proj, recon in terms
            ]
            for dag in (False, True)
        }
        self._term_tabs = {dag: term_tables(self._flat_terms[dag]) for dag in (False, True)}
        self._map_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._work: dict[tuple, torch.Tensor] = {}
        self._sign_cache: dict[tuple, torch.Tensor] = {}
        self._link_cache: _Links | None = None

    def __repr__(self) -> str:
        group = "U(1)" if self.n_colors == 1 else f"SU({self.n_colors})"
        bc = "antiperiodic" if self.antiperiodic_time else "periodic"
        return f"WilsonDirac(lattice={list(self.lattice.shape)}, kappa={self.kappa}, {group}, {bc} time)"

    def with_kappa(self, kappa: float) -> WilsonDirac:
        """The same operator with another hopping parameter (e.g. a Hasenbusch mass)."""
        return WilsonDirac(
            self.lattice, kappa, n_colors=self.n_colors, antiperiodic_time=self.antiperiodic_time, backend=self.backend
        )

    # ------------------------------------------------------------------ checks and helpers
    def check_links(self, U: torch.Tensor) -> None:
        """``ValueError`` unless ``U`` is a complex ``[B, *link_shape]`` tensor."""
        if not isinstance(U, torch.Tensor):
            raise ValueError(f"links must be a torch.Tensor, got {type(U).__name__}")
        if tuple(U.shape[1:]) != self.link_shape or U.dim() != len(self.link_shape) + 1:
            layout = "[B, d, L0, ..., L{d-1}]" if self.n_colors == 1 else "[B, d, L0, ..., L{d-1}, N, N]"
            raise ValueError(
                f"{self!r} expects links {layout} = [B, {', '.join(map(str, self.link_shape))}], got {list(U.shape)}"
            )
        if not U.is_complex():
            hint = " (use u1_links(theta) for U(1) angles)" if self.n_colors == 1 else ""
            raise ValueError(f"links must be complex, got {U.dtype}{hint}")

    def check_field(self, U: torch.Tensor, psi: torch.Tensor) -> None:
        """``ValueError`` unless ``U`` are valid links and ``psi`` a matching ``[B, *field_shape]`` spinor."""
        self.check_links(U)
        if not isinstance(psi, torch.Tensor) or tuple(psi.shape) != (U.shape[0], *self.field_shape):
            shape = list(psi.shape) if isinstance(psi, torch.Tensor) else type(psi).__name__
            raise ValueError(
                f"{self!r} expects spinors [B, {', '.join(map(str, self.field_shape))}] with B = {U.shape[0]} "
                f"(the links' batch), got {shape}"
            )
        if psi.dtype != U.dtype or psi.device != U.device:
            raise ValueError(
                f"spinor ({psi.dtype}, {psi.device}) and links ({U.dtype}, {U.device}) must share dtype and device"
            )

    def zeros(self, U: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Zero spinor ``[batch, *field_shape]`` (``batch`` defaults to the links' batch) like ``U``."""
        b = U.shape[0] if batch is None else int(batch)
        return torch.zeros((b, *self.field_shape), dtype=U.dtype, device=U.device)

    def gaussian(
        self,
        batch: int,
        generator: torch.Generator,
        *,
        dtype: torch.dtype = torch.complex128,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Complex Gaussian spinor ``[batch, *field_shape]`` with density proportional to ``exp(-|chi|^2)``."""
        return torch.randn((int(batch), *self.field_shape), generator=generator, dtype=dtype, device=device)

    def gamma5(self, psi: torch.Tensor) -> torch.Tensor:
        """``gamma_5 psi`` for spinors ``[B, *field_shape]`` (even ``d`` only)."""
        if self._g5_diag is None:
            raise ValueError(f"there is no gamma_5 in d = {self.lattice.dim}")
        shape = (self.n_spin,) if self.n_colors == 1 else (self.n_spin, 1)
        g5 = torch.tensor(self._g5_diag, dtype=psi.real.dtype, device=psi.device).view(shape)
        return psi * g5

    # ------------------------------------------------------------------ links with boundary signs
    def _boundary_sign(self, U: torch.Tensor) -> torch.Tensor:
        key = (U.dtype, U.device, torch.is_inference_mode_enabled())
        sign = self._sign_cache.get(key)
        if sign is None:
            d, l0 = self.lattice.dim, self.lattice.shape[0]
            extra = len(self.link_shape) - 2  # lattice axes after axis 0, plus colour axes
            sign = torch.ones((d, l0) + (1,) * extra, dtype=U.real.dtype, device=U.device)
            sign[0, l0 - 1] = -1.0
            self._sign_cache[key] = sign
        return sign

    def prepared_links(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_fwd, U_bwd)``: links with the time-boundary sign folded in, and their adjoints.

        ``U_fwd[:, mu, x] = s_mu(x) U_mu(x)`` with ``s_0(x) = -1`` at ``x_0 = L0 - 1`` (antiperiodic
        time) and 1 elsewhere; ``U_bwd = U_fwd^dagger`` (complex conjugate for U(1)). Cached for the
        last ``U`` object seen while its version counter is unchanged (not when ``U`` requires grad).
        """
        state = self._link_state(U)
        return state.uf, state.ub

    def _link_state(self, U: torch.Tensor) -> _Links:
        cache = self._link_cache
        version = _version(U)
        if cache is not None and version is not None and cache.ref() is U and cache.version == version:
            return cache
        uf = U * self._boundary_sign(U) if self.antiperiodic_time else U
        state = _Links(weakref.ref(U), version, uf, self.n_colors, {})
        cacheable = not U.requires_grad and version is not None
        self._link_cache = state if cacheable else None
        return state

    # ------------------------------------------------------------------ shifted link products
    def _fwd(self, h: torch.Tensor, uf: torch.Tensor, mu: int) -> torch.Tensor:
        """``y(x) = U_fwd_mu(x) h(x + mu)``; ``h`` ``[B, *L]`` (U(1)) or ``[B, *L, N]`` (SU(N))."""
        shifted = torch.roll(h, -1, 1 + mu)
        if self.n_colors > 1:
            return torch.matmul(uf, shifted.unsqueeze(-1)).squeeze(-1)
        return shifted * uf

    def _bwd(self, h: torch.Tensor, ub: torch.Tensor, mu: int) -> torch.Tensor:
        """``y(x) = U_bwd_mu(x - mu) h(x - mu)``."""
        if self.n_colors > 1:
            return torch.roll(torch.matmul(ub, h.unsqueeze(-1)).squeeze(-1), 1, 1 + mu)
        return torch.roll(h * ub, 1, 1 + mu)

    def _spin_maps(self, dagger: bool, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Projection ``A`` ``[K, Ns]`` and reconstruction ``R`` ``[Ns, K]`` of all ``K`` half-spinor
        components of all hops (order of ``_flat_terms``), so ``H = R diag(shifted link products) A``."""
        key = (dagger, dtype, device, torch.is_inference_mode_enabled())
        maps = self._map_cache.get(key)
        if maps is None:
            terms = self._flat_terms[dagger]
            a = torch.zeros((len(terms), self.n_spin), dtype=dtype)
            r = torch.zeros((self.n_spin, len(terms)), dtype=dtype)
            for k, (_, _, proj, recon) in enumerate(terms):
                for s, c in proj:
                    a[k, s] = c
                for s, c in recon:
                    r[s, k] = c
            maps = (a.to(device), r.to(device))
            self._map_cache[key] = maps
        return maps

    def _workspace(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, shape, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self._work.get(key)
        if buf is None:
            if len(self._work) >= _MAX_WORK_BUFFERS:  # many shapes seen (e.g. dense_matrix chunks): start over
                self._work.clear()
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._work[key] = buf
        return buf

    def _plan(self, links: _Links, psi: torch.Tensor, dagger: bool) -> tuple:
        """Buffers and pre-sliced views of one U(1) hop (no grad): ``(A, R, proj, hopped, recon, muls)``
        with ``muls`` the ``(x, y, out)`` triples of ``torch.mul``. Kept with the prepared links."""
        key = (dagger, tuple(psi.shape), psi.dtype, psi.device, torch.is_inference_mode_enabled())
        plan = links.plans.get(key)
        if plan is not None:
            return plan
        a, r = self._spin_maps(dagger, psi.dtype, psi.device)
        terms = self._flat_terms[dagger]
        n_sites = psi.numel() // self.n_spin
        site_shape = psi.shape[:-1]
        proj = self._workspace("proj", (len(terms), n_sites), psi)
        hopped = self._workspace("hopped", (len(terms), n_sites), psi)
        recon = self._workspace("recon", (self.n_spin, n_sites), psi)
        muls = []
        for k, (mu, backward, _, _) in enumerate(terms):
            h, dst = proj[k].view(site_shape), hopped[k].view(site_shape)
            ax, n = 1 + mu, self.lattice.shape[mu]
            if n == 1:  # x + mu = x - mu = x
                muls.append((h, (links.ub if backward else links.uf)[:, mu], dst))
            elif backward:  # dst(x) = ub(x - mu) h(x - mu)
                ub = links.ub[:, mu]
                muls.append((h.narrow(ax, 0, n - 1), ub.narrow(ax, 0, n - 1), dst.narrow(ax, 1, n - 1)))
                muls.append((h.narrow(ax, n - 1, 1), ub.narrow(ax, n - 1, 1), dst.narrow(ax, 0, 1)))
            else:  # dst(x) = uf(x) h(x + mu)
                uf = links.uf[:, mu]
                muls.append((h.narrow(ax, 1, n - 1), uf.narrow(ax, 0, n - 1), dst.narrow(ax, 0, n - 1)))
                muls.append((h.narrow(ax, 0, 1), uf.narrow(ax, n - 1, 1), dst.narrow(ax, n - 1, 1)))
        plan = (a, r, proj, hopped, recon, tuple(muls))
        links.plans[key] = plan
        return plan

    def _hop_u1(self, U: torch.Tensor, psi: torch.Tensor, dagger: bool, fast: bool) -> torch.Tensor:
        """``(H psi)^T`` as ``[Ns, B * V]`` (U(1)): projection to half spinors (one small matrix
        product), shifted link products, reconstruction (one small matrix product)."""
        links = self._link_state(U)
        flat = psi.reshape(-1, self.n_spin)
        if fast:
            a, r, proj, hopped, recon, muls = self._plan(links, psi, dagger)
            torch.matmul(a, flat.T, out=proj)
            for x, y, out in muls:
                torch.mul(x, y, out=out)
            return torch.matmul(r, hopped, out=recon)
        a, r = self._spin_maps(dagger, psi.dtype, psi.device)
        proj = a @ flat.T
        site_shape = psi.shape[:-1]
        hopped = []
        for k, (mu, backward, _, _) in enumerate(self._flat_terms[dagger]):
            h = proj[k].view(site_shape)
            y = self._bwd(h, links.ub[:, mu], mu) if backward else self._fwd(h, links.uf[:, mu], mu)
            hopped.append(y.reshape(-1))
        return r @ torch.stack(hopped)

    def _hop_sun(self, out: torch.Tensor, U: torch.Tensor, psi: torch.Tensor, scale: float, dagger: bool) -> None:
        """``out += scale * H psi`` for SU(N), component by component."""
        links = self._link_state(U)
        ax = self._spin_axis
        comps = [psi.select(ax, s) for s in range(self.n_spin)]
        for mu, backward, proj, recon in self._flat_terms[dagger]:
            (i, _), *rest = proj
            h = comps[i] if not rest else torch.add(comps[i], comps[rest[0][0]], alpha=rest[0][1])
            y = self._bwd(h, links.ub[:, mu], mu) if backward else self._fwd(h, links.uf[:, mu], mu)
            for s, c in recon:
                out.select(ax, s).add_(y, alpha=scale * c)  # fresh view: autograd-safe in place

    def _scaled_hop(
        self, U: torch.Tensor, psi: torch.Tensor, scale: float, base: torch.Tensor | None, dagger: bool
    ) -> torch.Tensor:
        """``base + scale * H psi`` (``H^dagger`` with ``dagger``; ``base = 0`` if ``None``); inputs checked."""
        if self.backend != "torch":
            out = self._kernel_scaled_hop(U, psi, scale, base, dagger)
            if out is not None:
                return out
        fast = not (torch.is_grad_enabled() and (U.requires_grad or psi.requires_grad))
        if self.n_colors == 1:
            hop_t = self._hop_u1(U, psi, dagger, fast).T.view(psi.shape)
            if base is None:
                # never return the work buffer itself
                return hop_t * scale if scale != 1.0 else hop_t.clone(memory_format=torch.contiguous_format)
            return torch.add(base, hop_t, alpha=scale)
        out = torch.zeros_like(psi) if base is None else base.clone()
        self._hop_sun(out, U, psi, scale, dagger)
        return out

    def flat_links(self, U: torch.Tensor) -> torch.Tensor:
        """Prepared forward links (time-boundary sign folded in) as ``[B, d, V(, N, N)]``, contiguous."""
        uf = self._link_state(U).uf
        b, d = uf.shape[0], self.lattice.dim
        return uf.reshape(b, d, self.lattice.volume, *uf.shape[2 + d :]).contiguous()

    def _kernel_scaled_hop(
        self, U: torch.Tensor, psi: torch.Tensor, scale: float, base: torch.Tensor | None, dagger: bool
    ) -> torch.Tensor | None:
        """:meth:`_scaled_hop` by the compiled kernel on the full lattice, or ``None`` if it does not apply."""
        if not kernel_usable(U, psi, base, n_spin=self.n_spin, n_colors=self.n_colors):
            if self.backend == "kernel":
                raise RuntimeError(f"{self!r}: backend='kernel' but the compiled kernel cannot take this call")
            return None
        b, v = psi.shape[0], self.lattice.volume
        flat = psi.reshape(b, v, *self.field_shape[self.lattice.dim :])
        ints, coefs = self._term_tabs[dagger]
        out = kernel_hop(
            hop_tables(tuple(self.lattice.shape), "all"),
            ints,
            coefs,
            self.flat_links(U),
            flat,
            scale,
            None if base is None else base.reshape(flat.shape),
            self.n_spin,
            self.n_colors,
        )
        return out.view(psi.shape)

    # ------------------------------------------------------------------ public operator
    def hop(self, U: torch.Tensor, psi: torch.Tensor, *, dagger: bool = False) -> torch.Tensor:
        """Hopping term ``H psi`` (``H^dagger psi`` with ``dagger``), ``[B, *field_shape]``."""
        self.check_field(U, psi)
        return self._scaled_hop(U, psi, 1.0, None, dagger)

    def apply(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``D psi = psi - kappa H psi``, ``[B, *field_shape]``."""
        self.check_field(U, psi)
        return self._scaled_hop(U, psi, -self.kappa, psi, False)

    def apply_dagger(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger psi = gamma_5 D gamma_5 psi = psi - kappa H^dagger psi``."""
        self.check_field(U, psi)
        return self._scaled_hop(U, psi, -self.kappa, psi, True)

    def apply_normal(self, U: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger D psi`` (Hermitian positive definite for ``D`` invertible)."""
        return self.apply_dagger(U, self.apply(U, psi))
