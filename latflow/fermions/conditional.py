"""Gauge-covariant conditional distributions ``r(phi | U)`` of pseudofermions.

A flow proposal for Nf = 2 Wilson fermions with pseudofermions (Abbott et al. 2022) draws the
links ``U ~ q`` and then every pseudofermion ``phi_f ~ r_f(. | U)`` from a *conditional* flow.
Every conditional here is linear in complex Gaussian noise,

    phi_f = M_f(U) chi_f,    chi_f with density exp(-|chi_f|^2) / pi^{n_f},

so that (``n_f`` complex components, the Jacobian of a complex linear map being ``|det M_f|^2``)

    log r_f(phi_f | U) = -|chi_f|^2 - n_f log pi - log |det M_f(U)|^2,   chi_f = M_f(U)^{-1} phi_f.

The pseudofermion target of a factor ``f`` is the Gaussian ``N(0, K_f(U))`` with
``K_f = A^dag A`` (plain factor, ``A = D`` or the even-site Schur complement ``M_hat``) or
``K_f = A'^{-dag} A^dag A A'^{-1}`` (Hasenbusch ratio ``det(A^dag A) / det(A'^dag A')``), see
:mod:`latflow.fermions.pseudofermions`. A conditional is good when ``M_f M_f^dag ~ K_f``.

Per-factor maps (``nn.Module``; ``forward(U, chi) -> (phi, logdet)``, ``inverse(U, phi) -> (chi, logdet)``
with ``logdet = log |det M|^2`` ``[B]``):

- :class:`HeatbathMap`: ``M = A^dag`` (plain) or ``(A'^dag)^{-1} A^dag`` (ratio), the exact
  conditional (``M M^dag = K``). Its density needs ``log det`` of dense matrices: small lattices.
- :class:`TriangularMap`: ``M = (1 + P_2 N_L P_1) (a P_1 + M_2 P_2) (1 + P_1 N_R P_2)`` with site
  projectors ``P_1, P_2`` and gauge-covariant hops ``N_X = -kappa^k (c_X (H^dag)^k + c'_X H^k)``:
  unit lower x block diagonal x unit upper triangular, so ``log |det M|^2 = 2 n_1 log a +
  log |det M_2|^2`` and ``M^{-1}`` needs no solver. Full lattice (``P_1 / P_2`` even / odd sites,
  ``k = 1``): at its initial couplings this is the block LDU factorisation of ``D^dag`` with the
  odd-site Schur complement ``1 - kappa^2 H^dag_oe H^dag_eo`` replaced by ``M_2``, itself a
  triangular map on the odd sites split by the parity of ``x_0`` (``k = 2``: the diagonal two-hops
  ``x -> x +- mu +- nu`` connect the two classes; the straight ones ``x -> x +- 2 mu`` are dropped)
  with a scale in its middle. Even/odd pseudofermions (``K = M_hat^dag M_hat``, fields on even
  sites): the same two-hop map on the even sites.
- :class:`ScalarMap`: ``M = a`` (one learnable scale).

Scales (stored as logarithms) and couplings are ``nn.Parameter`` scalars, so a conditional can be
trained by reverse KL on the joint target together with the gauge flow
(:class:`latflow.samplers.pf_flow_mcmc.JointTarget`), or fitted alone by maximum likelihood on exact
pseudofermion draws (:func:`fit_to_heatbath`, no solver for plain factors). Everything is gauge
covariant: for ``U -> U^Omega`` and ``chi -> Omega chi`` (site-diagonal ``Omega``) the output
transforms as ``phi -> Omega phi`` and ``log r`` is invariant.

What limits them: a map built from a bounded number of hops cannot reproduce the near-zero modes
of ``D`` (they live in the deepest Schur complement, which the maps replace by a scale), so
``M M^dag`` is too narrow in some directions near ``kappa_c``. For an independence sampler that
means heavy-tailed weights (infinite variance once ``lambda_min(M M^dag, K) < 1/2``;
:func:`covariance_ratio_spectrum`). Even/odd and Hasenbusch factors push ``lambda_min`` up, and the
``dispersion`` option of :class:`TriangularConditional` widens a conditional (at some cost in
acceptance).

The operators of each factor (support, noise, exact draws, quadratic forms) are described by
:class:`~latflow.fermions.pf_layout.FactorLayout`. Containers (:class:`ConditionalPseudofermions`) hold one
map per factor, in the factor order
of :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions` (heaviest first):
:class:`ExactConditional` (heatbath maps), :class:`TriangularConditional` (triangular map for the
plain factor, scalars for Hasenbusch ratios) and :class:`ScalarConditional` (scalars only).

Shapes: links ``U`` complex ``[B, d, *L]`` (U(1)), pseudofermions ``[B, *field_shape]`` (full
lattice; zero on odd sites for even/odd factors), densities ``[B]`` real.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .dense import dense_matrix
from .evenodd import EvenOddWilson
from .pf_layout import FactorLayout, _same_layout, _site_weights, layout_of, pseudofermion_layout
from .pseudofermions import _norm2
from .wilson import WilsonDirac

__all__ = [
    "FactorLayout",
    "pseudofermion_layout",
    "layout_of",
    "HeatbathMap",
    "TriangularMap",
    "ScalarMap",
    "ConditionalPseudofermions",
    "ExactConditional",
    "TriangularConditional",
    "ScalarConditional",
    "fit_to_heatbath",
    "covariance_ratio_spectrum",
    "smallest_covariance_ratio",
    "dispersion_for",
    "DEFAULT_DISPERSION",
    "FINITE_VARIANCE_LAMBDA",
]

LOG_PI = math.log(math.pi)
# M -> 1.1 M: lambda_min(M M^dag, K) of the triangular maps ~0.58 -> ~0.7 at kappa = 0.2 (4x4, 8x8), the
# width at which the joint chain's exactness tests pass (finite-variance weights need > 1/2)
DEFAULT_DISPERSION = 1.1
# lambda_min above which the weights have a finite variance, and the margin a suggested dispersion aims at
FINITE_VARIANCE_LAMBDA = 0.5
SUGGESTED_LAMBDA = 0.7


# ------------------------------------------------------------------------------------ maps
class HeatbathMap(nn.Module):
    """Exact conditional ``M = A^dag`` (plain) or ``M = (A'^dag)^{-1} A^dag`` (ratio); ``M M^dag = K``.

    Dense: builds ``A^dag`` (and ``A'^dag``) as ``[B, n, n]`` matrices on the field's support,
    so ``log |det M|^2 = log det(A^dag A) [- log det(A'^dag A')]`` is exact. Small lattices only.
    No parameters.
    """

    def __init__(self, layout: FactorLayout) -> None:
        super().__init__()
        self.layout = layout

    def _index(self, device: torch.device) -> torch.Tensor:
        shape = self.layout.dirac.field_shape
        if self.layout.mask is None:
            return torch.arange(math.prod(shape), device=device)
        m = self.layout.mask.to(device)
        full = m.reshape(*m.shape, *([1] * (len(shape) - m.dim()))).expand(shape)
        return torch.nonzero(full.reshape(-1), as_tuple=False).squeeze(1)

    def _dense_dagger(self, op: WilsonDirac | EvenOddWilson, U: torch.Tensor) -> torch.Tensor:
        return dense_matrix(op.apply_dagger, U, self.layout.dirac.field_shape, mask=self.layout.mask)

    def matrix(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M [B, n, n], log |det M|^2 [B])`` on the field's support."""
        a_dag = self._dense_dagger(self.layout.op, U)
        _, logabs = torch.linalg.slogdet(a_dag)
        logdet = 2.0 * logabs
        if self.layout.op_heavy is None:
            return a_dag, logdet
        h_dag = self._dense_dagger(self.layout.op_heavy, U)
        _, logabs_h = torch.linalg.slogdet(h_dag)
        return torch.linalg.solve(h_dag, a_dag), logdet - 2.0 * logabs_h

    def _vec(self, psi: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return psi.reshape(psi.shape[0], -1)[:, idx]

    def _field(self, vec: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        shape = self.layout.dirac.field_shape
        out = torch.zeros((vec.shape[0], math.prod(shape)), dtype=vec.dtype, device=vec.device)
        out[:, idx] = vec
        return out.reshape(vec.shape[0], *shape)

    def forward(self, U: torch.Tensor, chi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi = M chi, log |det M|^2)``; ``chi``, ``phi`` ``[B, *field_shape]``."""
        m, logdet = self.matrix(U)
        idx = self._index(chi.device)
        phi = torch.matmul(m, self._vec(chi, idx).unsqueeze(-1)).squeeze(-1)
        return self._field(phi, idx), logdet

    def inverse(self, U: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chi = M^{-1} phi, log |det M|^2)``."""
        m, logdet = self.matrix(U)
        idx = self._index(phi.device)
        chi = torch.linalg.solve(m, self._vec(phi, idx))
        return self._field(chi, idx), logdet


def _log_param(value: float, name: str) -> nn.Parameter:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return nn.Parameter(torch.tensor(math.log(value), dtype=torch.float64))


class ScaleMap(nn.Module):
    """``M = a`` on ``n_components`` complex components (``a > 0`` learnable, stored as ``log_scale``).

    Parameters
    ----------
    n_components
        Complex dimension of the space the map acts on (for ``log |det M|^2 = 2 n log a``).
    scale
        Initial ``a``.
    """

    def __init__(self, n_components: int, scale: float = 1.0) -> None:
        super().__init__()
        self.n_components = int(n_components)
        self.log_scale = _log_param(float(scale), "scale")

    def extra_repr(self) -> str:
        return f"n={self.n_components}, a={float(self.log_scale.detach().exp()):.4g}"

    def _logdet(self, like: torch.Tensor) -> torch.Tensor:
        ld = 2.0 * self.n_components * self.log_scale
        return ld.to(device=like.device).expand(like.shape[0])

    def forward(self, U: torch.Tensor, chi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a chi, 2 n log a)``."""
        return chi * self.log_scale.exp().to(chi.device), self._logdet(chi)

    def inverse(self, U: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi / a, 2 n log a)``."""
        return phi / self.log_scale.exp().to(phi.device), self._logdet(phi)


class ScalarMap(ScaleMap):
    """``phi = a chi`` for one pseudofermion factor (``a > 0`` learnable).

    Parameters
    ----------
    layout
        The factor (for its number of components).
    scale
        Initial ``a``.
    """

    def __init__(self, layout: FactorLayout, scale: float = 1.0) -> None:
        super().__init__(layout.n_components, scale)
        self.layout = layout


class TriangularMap(nn.Module):
    """``M = (1 + P_2 N_L P_1) (a P_1 + M_2 P_2) (1 + P_1 N_R P_2)``: unit lower x block diagonal x unit upper.

    ``P_1``, ``P_2`` project onto two disjoint site classes (bool masks ``[*L]``) between which
    ``k`` hops of the Wilson hopping term lead, and
    ``N_X = -kappa^k (c_X (H^dag)^k + c'_X H^k)`` (``X = L, R``) are gauge covariant. ``M_2`` acts on
    fields supported on ``P_2`` (another such map, or a scale). The triangular factors have unit
    determinant (``P_2 N_L P_1`` and ``P_1 N_R P_2`` are nilpotent), so
    ``log |det M|^2 = 2 n_1 log a + log |det M_2|^2``, and ``M^{-1}`` needs no solver:
    ``(1 + P_2 N_L P_1)^{-1} = 1 - P_2 N_L P_1``.

    With ``P_1 / P_2`` the even / odd sites, ``k = 1``, ``c_L = c_R = 1``, ``c'_L = c'_R = 0`` and
    ``a = 1`` this is ``D^dag`` exactly when ``M_2`` is the odd-site Schur complement
    ``1 - kappa^2 H^dag_oe H^dag_eo`` (the block LDU factorisation of ``D^dag``); an approximate
    ``M_2`` keeps everything else exact.

    Parameters
    ----------
    dirac
        The Wilson operator (for ``H``, ``kappa`` and the field shape).
    mask1, mask2
        Bool ``[*L]`` site classes.
    power
        ``k``.
    inner
        ``M_2`` (``forward``/``inverse`` with ``log |det|^2``, on fields supported on ``mask2``);
        a :class:`ScaleMap` when ``None``.
    scale
        Initial ``a``.
    couplings
        Initial ``(c_L, c'_L, c_R, c'_R)``.
    """

    def __init__(
        self,
        dirac: WilsonDirac,
        mask1: torch.Tensor,
        mask2: torch.Tensor,
        power: int,
        inner: nn.Module | None = None,
        *,
        scale: float = 1.0,
        couplings: Sequence[float] = (1.0, 0.0, 1.0, 0.0),
    ) -> None:
        super().__init__()
        if bool((mask1 & mask2).any()):
            raise ValueError("the two site classes of a TriangularMap must be disjoint")
        if int(power) < 1:
            raise ValueError(f"power must be a positive integer, got {power}")
        if len(couplings) != 4:
            raise ValueError(f"couplings must be four numbers (c_L, c'_L, c_R, c'_R), got {list(couplings)}")
        self.dirac = dirac
        self.power = int(power)
        self.n_site_dims = dirac.lattice.dim
        self.register_buffer("mask1", mask1.clone(), persistent=False)
        self.register_buffer("mask2", mask2.clone(), persistent=False)
        per_site = math.prod(dirac.field_shape[dirac.lattice.dim :])
        self.n1 = int(mask1.sum()) * per_site
        self.n2 = int(mask2.sum()) * per_site
        self.log_scale = _log_param(float(scale), "scale")
        self.couplings = nn.Parameter(torch.tensor([float(c) for c in couplings], dtype=torch.float64))
        self.inner = inner if inner is not None else ScaleMap(self.n2)

    def extra_repr(self) -> str:
        c = ", ".join(f"{v:.4g}" for v in self.couplings.detach().tolist())
        return f"power={self.power}, n=({self.n1}, {self.n2}), a={float(self.log_scale.detach().exp()):.4g}, c=({c})"

    def _w(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _site_weights(mask, like, self.n_site_dims)

    def _hop(self, U: torch.Tensor, psi: torch.Tensor, c: torch.Tensor, out_mask: torch.Tensor) -> torch.Tensor:
        """``P_out N psi`` with ``N = -kappa^k (c[0] (H^dag)^k + c[1] H^k)``."""
        t_dag, t = psi, psi
        for _ in range(self.power):
            t_dag = self.dirac.hop(U, t_dag, dagger=True)
            t = self.dirac.hop(U, t)
        n = (c[0] * t_dag + c[1] * t) * (-(self.dirac.kappa**self.power))
        return n * self._w(out_mask, n)

    def forward(self, U: torch.Tensor, chi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi = M chi, log |det M|^2 [B])``; ``chi`` ``[B, *field_shape]`` supported on ``P_1 + P_2``."""
        c = self.couplings.to(chi.device)
        x1 = chi * self._w(self.mask1, chi)
        x2 = chi * self._w(self.mask2, chi)
        x1 = x1 + self._hop(U, x2, c[2:], self.mask1)  # (1 + P1 N_R P2)
        y2, logdet = self.inner(U, x2)
        y1 = x1 * self.log_scale.exp().to(chi.device)
        y2 = y2 + self._hop(U, y1, c[:2], self.mask2)  # (1 + P2 N_L P1)
        ld = (2.0 * self.n1 * self.log_scale).to(chi.device)
        return y1 + y2, logdet + ld

    def inverse(self, U: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chi = M^{-1} phi, log |det M|^2 [B])`` (components off ``P_1 + P_2`` are ignored)."""
        c = self.couplings.to(phi.device)
        y1 = phi * self._w(self.mask1, phi)
        y2 = phi * self._w(self.mask2, phi) - self._hop(U, y1, c[:2], self.mask2)
        x1 = y1 / self.log_scale.exp().to(phi.device)
        x2, logdet = self.inner.inverse(U, y2)
        x1 = x1 - self._hop(U, x2, c[2:], self.mask1)
        ld = (2.0 * self.n1 * self.log_scale).to(phi.device)
        return x1 + x2, logdet + ld

    @classmethod
    def for_factor(cls, layout: FactorLayout, *, nested: bool = True) -> TriangularMap:
        """The triangular conditional of a plain factor, initialised at the LDU structure of ``A^dag``.

        Full lattice: even / odd sites, ``k = 1``; the odd-site Schur complement ``M_2`` is (with
        ``nested``) itself a triangular map over the odd sites split by the parity of ``x_0``
        (``k = 2``, a scale in its middle), else a scale. Even/odd fields: the even sites split by
        the parity of ``x_0``, ``k = 2``, a scale in the middle.
        """
        if layout.heavy is not None:
            raise ValueError("triangular maps are for plain factors (det A^dag A); use ScalarMap for ratio factors")
        dirac = layout.dirac
        lattice = dirac.lattice
        even = lattice.checkerboard(0)
        t_even = (lattice.coordinates()[0] % 2) == 0
        if layout.even_odd:
            return cls(dirac, even & t_even, even & ~t_even, 2)
        inner = cls(dirac, ~even & t_even, ~even & ~t_even, 2) if nested else None
        return cls(dirac, even, ~even, 1, inner)


# ------------------------------------------------------------------------------------ containers
class ConditionalPseudofermions(nn.Module):
    """One conditional map per pseudofermion factor: ``r(phis | U) = prod_f r_f(phi_f | U)``.

    Parameters
    ----------
    layout
        The factors (:func:`pseudofermion_layout` or :func:`layout_of`).
    maps
        One map per factor (``forward``/``inverse`` as in the module notes).

    Attributes
    ----------
    layout, maps
    n_components
        ``[n_f]`` complex components per factor.
    """

    def __init__(self, layout: Sequence[FactorLayout], maps: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(layout) != len(maps) or not layout:
            raise ValueError(f"need one map per factor, got {len(maps)} maps for {len(layout)} factors")
        self.layout = tuple(layout)
        self.maps = nn.ModuleList(maps)
        self.n_components = [f.n_components for f in self.layout]

    def __len__(self) -> int:
        return len(self.layout)

    @property
    def even_odd(self) -> bool:
        return self.layout[0].even_odd

    @property
    def hasenbusch_kappas(self) -> tuple[float, ...]:
        return tuple(f.kappa for f in self.layout[:-1])

    def matches(self, layout: Sequence[FactorLayout]) -> bool:
        """Whether this conditional was built for the factors ``layout`` (couplings, even/odd, lattice)."""
        return _same_layout(self.layout, layout)

    def _check(self, U: torch.Tensor, phis: Sequence[torch.Tensor]) -> None:
        if len(phis) != len(self.layout):
            raise ValueError(f"expected {len(self.layout)} pseudofermions, got {len(phis)}")
        shape = (U.shape[0], *self.layout[0].dirac.field_shape)
        for phi in phis:
            if tuple(phi.shape) != shape:
                raise ValueError(f"pseudofermions must have shape {list(shape)}, got {list(phi.shape)}")

    def _log_density(self, chi: torch.Tensor, logdet: torch.Tensor, n: int) -> torch.Tensor:
        return -_norm2(chi) - n * LOG_PI - logdet

    def sample(
        self, U: torch.Tensor, generator: torch.Generator, *, return_noise: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Draw one pseudofermion per factor given the links.

        Parameters
        ----------
        U
            Complex links ``[B, d, *L]``.
        generator
            Random stream; the noise of the factors is drawn in factor order.
        return_noise
            Also return the noise fields ``chi_f``.

        Returns
        -------
        phis, log_r(, chis)
            ``[phi_f [B, *field_shape]]`` and ``log r(phis | U)`` ``[B]`` (normalised;
            differentiable in the parameters and in ``U``).
        """
        phis, chis, log_r = [], [], None
        for f, m in zip(self.layout, self.maps):
            chi = f.noise(U, generator)
            phi, logdet = m(U, chi)
            term = self._log_density(chi, logdet, f.n_components)
            log_r = term if log_r is None else log_r + term
            phis.append(phi)
            chis.append(chi)
        assert log_r is not None
        return (phis, log_r, chis) if return_noise else (phis, log_r)

    def log_prob(self, U: torch.Tensor, phis: Sequence[torch.Tensor]) -> torch.Tensor:
        """Normalised ``log r(phis | U)`` ``[B]`` of given pseudofermions (components off a factor's
        support, the odd sites of even/odd fields, are ignored)."""
        self._check(U, phis)
        out = None
        for f, m, phi in zip(self.layout, self.maps, phis):
            w = f.site_weights(phi)
            chi, logdet = m.inverse(U, phi if w is None else phi * w)
            term = self._log_density(chi, logdet, f.n_components)
            out = term if out is None else out + term
        assert out is not None
        return out


def _layout(
    dirac: WilsonDirac | EvenOddWilson, even_odd: bool | None, hasenbusch_kappas: Sequence[float]
) -> tuple[FactorLayout, ...]:
    if isinstance(dirac, EvenOddWilson):
        if even_odd is False:
            raise ValueError("an EvenOddWilson operator implies even_odd=True")
        dirac, even_odd = dirac.dirac, True
    if not isinstance(dirac, WilsonDirac):
        raise ValueError(f"expected a WilsonDirac or EvenOddWilson, got {type(dirac).__name__}")
    return pseudofermion_layout(dirac, even_odd=bool(even_odd), hasenbusch_kappas=hasenbusch_kappas)


class ExactConditional(ConditionalPseudofermions):
    """The heatbath as a conditional: ``M_f M_f^dag = K_f`` for every factor (dense; small lattices).

    With it the joint weight ``p(U, phi) / (q(U) r(phi | U))`` equals the exact-determinant weight
    ``exp(-S_g) det(D^dag D) / q(U)`` (up to the CG tolerance of the target): the baseline.

    Parameters
    ----------
    op
        ``WilsonDirac`` (``D``) or ``EvenOddWilson`` (``M_hat``; implies ``even_odd``).
    even_odd, hasenbusch_kappas
        As for :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions`.
    """

    def __init__(
        self,
        op: WilsonDirac | EvenOddWilson,
        *,
        even_odd: bool | None = None,
        hasenbusch_kappas: Sequence[float] = (),
    ) -> None:
        layout = _layout(op, even_odd, hasenbusch_kappas)
        super().__init__(layout, [HeatbathMap(f) for f in layout])


class TriangularConditional(ConditionalPseudofermions):
    """Learnable gauge-covariant conditional: :class:`TriangularMap` for the plain (heaviest) factor,
    :class:`ScalarMap` for the Hasenbusch ratio factors.

    Parameters
    ----------
    dirac
        Wilson operator at the target ``kappa``.
    even_odd, hasenbusch_kappas
        As for :class:`~latflow.fermions.pseudofermions.Nf2Pseudofermions`.
    nested
        Full lattice only: the odd-site Schur complement is itself triangular (else a scale).
    ratio_scale
        Initial scale of the ratio factors.
    dispersion
        Multiplies every map (``M_f -> dispersion M_f``). Values above 1 widen the proposal; see
        :func:`covariance_ratio_spectrum` for why an independence sampler wants that.
    """

    def __init__(
        self,
        dirac: WilsonDirac | EvenOddWilson,
        *,
        even_odd: bool | None = None,
        hasenbusch_kappas: Sequence[float] = (),
        nested: bool = True,
        ratio_scale: float = 1.0,
        dispersion: float = 1.0,
    ) -> None:
        layout = _layout(dirac, even_odd, hasenbusch_kappas)
        maps: list[nn.Module] = [TriangularMap.for_factor(layout[0], nested=nested)]
        maps += [ScalarMap(f, ratio_scale) for f in layout[1:]]
        super().__init__(layout, maps)
        if not (math.isfinite(dispersion) and dispersion > 0):
            raise ValueError(f"dispersion must be a positive finite number, got {dispersion}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.split(".")[-1] == "log_scale":
                    p.add_(math.log(dispersion))


class ScalarConditional(ConditionalPseudofermions):
    """``phi_f = a_f chi_f`` for every factor (``a_f > 0`` learnable): the simplest conditional.

    Parameters
    ----------
    dirac, even_odd, hasenbusch_kappas
        As for :class:`TriangularConditional`.
    scale
        Initial ``a_f`` (all factors).
    """

    def __init__(
        self,
        dirac: WilsonDirac | EvenOddWilson,
        *,
        even_odd: bool | None = None,
        hasenbusch_kappas: Sequence[float] = (),
        scale: float = 1.0,
    ) -> None:
        layout = _layout(dirac, even_odd, hasenbusch_kappas)
        super().__init__(layout, [ScalarMap(f, scale) for f in layout])


@torch.no_grad()
def covariance_ratio_spectrum(conditional: ConditionalPseudofermions, U: torch.Tensor) -> list[torch.Tensor]:
    """Generalised eigenvalues ``lambda`` of ``(M_f M_f^dag, K_f)`` per factor (dense; small lattices).

    The pseudofermion part of the joint weight is, for fixed links,
    ``w(phi) ~ exp(-phi^dag (K^{-1} - (M M^dag)^{-1}) phi)``. Its moments under ``r`` are finite
    only if ``M M^dag`` is wide enough: ``E_r[w^2] < infinity`` iff ``lambda_min > 1/2`` (the
    chain's estimates then obey a central limit theorem with a finite variance), and ``w`` is
    bounded in ``phi`` iff ``lambda_min >= 1``. The exact conditional has ``lambda = 1``; the mean
    ``sum_i (log lambda_i - lambda_i + 1)`` of ``log w`` over ``phi`` measures how much acceptance
    the conditional costs.

    Parameters
    ----------
    conditional
        Any conditional whose maps act linearly on ``chi``.
    U
        Complex links ``[B, d, *L]``.

    Returns
    -------
    list[torch.Tensor]
        Per factor, ``[B, n_f]`` real eigenvalues in ascending order.
    """
    out = []
    for f, m in zip(conditional.layout, conditional.maps):
        mm = dense_matrix(lambda u, x, m=m: m(u, x)[0], U, f.dirac.field_shape, mask=f.mask)
        root, _ = HeatbathMap(f).matrix(U)  # K = root root^dag
        g = torch.linalg.solve(root, mm)
        out.append(torch.linalg.eigvalsh(g @ g.mH))
    return out


def smallest_covariance_ratio(conditional: ConditionalPseudofermions, U: torch.Tensor) -> torch.Tensor:
    """``lambda_min`` ``[B]`` of ``(M_f M_f^dag, K_f)`` over all factors (dense; small lattices).

    The joint weights have a finite variance at links ``U`` iff this exceeds
    :data:`FINITE_VARIANCE_LAMBDA` (:func:`covariance_ratio_spectrum`).
    """
    return torch.stack([lam[:, 0] for lam in covariance_ratio_spectrum(conditional, U)]).min(dim=0).values


def dispersion_for(lambda_min: float, dispersion: float, target: float = SUGGESTED_LAMBDA) -> float:
    """The dispersion (rounded up to 0.05) that moves ``lambda_min`` measured at ``dispersion`` to ``target``.

    ``M -> c M`` scales every eigenvalue of ``(M M^dag, K)`` by ``c^2``.
    """
    if not (lambda_min > 0 and dispersion > 0):
        raise ValueError(f"lambda_min and dispersion must be positive, got {lambda_min} and {dispersion}")
    return math.ceil(20 * dispersion * math.sqrt(target / lambda_min) - 1e-9) / 20


def fit_to_heatbath(
    conditional: ConditionalPseudofermions,
    links: Callable[[int, torch.Generator], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> list[float]:
    """Fit a conditional by maximum likelihood on exact pseudofermion draws (forward KL).

    Each step draws links ``U = links(batch_size, generator)`` (complex ``[B, d, *L]``, e.g. from the
    gauge flow), exact pseudofermions ``phi_f ~ N(0, K_f(U))`` (:meth:`FactorLayout.heatbath`; no
    solve for plain factors), and takes an Adam step on ``-mean log r(phis | U)``. The forward KL
    is mass covering: it prefers conditionals at least as wide as the target, which is what an
    independence Metropolis proposal needs (reverse KL, :class:`latflow.samplers.pf_flow_mcmc.JointTarget`,
    shrinks them instead).

    Returns
    -------
    list[float]
        The loss of every step (cross entropy per configuration, ``>= n (1 + log pi) + log det K``).
    """
    params = [p for p in conditional.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the conditional has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(int(steps)):
        with torch.no_grad():
            U = links(int(batch_size), generator)
            phis = [f.heatbath(U, generator)[0] for f in conditional.layout]
        loss = -conditional.log_prob(U, phis).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history
