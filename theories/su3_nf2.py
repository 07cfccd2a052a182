"""SU(N) lattice gauge theory with Nf = 2 Wilson fermions (registry name ``"su3-nf2"``), d = 2 and d = 4.

Target density of the links ``U`` ``[B, d, L0, ..., L{d-1}, N, N]`` (complex, SU(N)):

    p(U) prop. to exp(-S_g(U)) det(D^dag D) = exp(-S_eff(U)),   S_eff = S_g - log det(D^dag D),

with the Wilson gauge action ``S_g = -(beta/N) sum_p Re tr P_p`` (:class:`theories.su3.SUNGaugeAction`) and
the Wilson operator ``D = 1 - kappa H`` of :mod:`latflow.fermions.wilson` with ``n_colors = N`` (antiperiodic
in time). ``action`` is ``S_eff`` with the exact dense determinant (``n = V Ns N`` rows per configuration,
``Ns = 2`` in 2D and 4 in 4D): small lattices only (exact-determinant samplers, validation). Larger volumes
use pseudofermions: :meth:`latflow.samplers.pf_hmc.PseudofermionHMC.for_theory` (``gauge_action``,
``gauge_force``, ``dirac`` and ``manifold`` of this class).

Observables per configuration, each ``[B]`` (:meth:`SUNNf2Model.observables`): the pure-gauge ones of
:class:`theories.su3.SUNGaugeAction` with its ``action`` renamed ``gauge_action``, and, while the dense
dimension ``n <= dense_max_dim``:

- ``action``             ``S_eff`` (exact determinant)
- ``fermion_logdet``     ``log det(D^dag D)``
- ``chiral_condensate``  ``Sigma = (1/V) Re Tr D^{-1}`` (trace over sites, spins and colours), per flavour, in
                         the normalisation of :mod:`theories.schwinger` (``<psibar psi> = -Sigma``)

:meth:`SUNNf2Model.pion_correlator` gives the zero-momentum pion correlator from a point source (dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from latflow.fermions.dense import dense_matrix, logdet_normal
from latflow.fermions.wilson import WilsonDirac
from latflow.gauge_kernels import sun_wilson_force
from latflow.lattice import Lattice
from latflow.manifolds import SUN
from latflow.sun import sun_staples, traceless_antihermitian

from .base import Derived, TheorySpec
from .su3 import SUNGaugeAction, SUNParams

KAPPA_MAX = 0.5
DENSE_MAX_DIM = 600  # largest dense Dirac matrix (V Ns N rows) whose determinant and inverse observables() computes
CHUNK_SIZE = 32  # configurations per dense batch inside observables()


@dataclass(frozen=True)
class SUNNf2Params:
    """Couplings of SU(N) with Nf = 2 Wilson fermions.

    Parameters
    ----------
    beta
        Inverse gauge coupling ``2 N / g^2``, finite and ``>= 0``.
    kappa
        Wilson hopping parameter, ``0 <= kappa < 0.5`` (free critical value ``1/(2d)``).
    n
        Number of colours ``N >= 2`` (default 3).
    """

    beta: float
    kappa: float
    n: int = 3

    def __post_init__(self) -> None:
        for name in ("beta", "kappa"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 <= self.kappa < KAPPA_MAX:
            raise ValueError(f"kappa must be in [0, {KAPPA_MAX}), got {self.kappa}")
        if isinstance(self.n, bool) or int(self.n) != self.n or self.n < 2:
            raise ValueError(f"SU(N) needs an integer N >= 2, got n = {self.n}")
        object.__setattr__(self, "n", int(self.n))


class SUNNf2Model:
    """Nf = 2 Wilson fermions on SU(N) links ``[B, d, L0, ..., L{d-1}, N, N]`` (d = 2 or 4).

    Parameters
    ----------
    params
        ``beta``, ``kappa`` and ``n``.
    lattice
        2D or 4D lattice, every extent ``>= 2`` (time is axis 0).
    dense_max_dim
        Largest ``V Ns N`` for which :meth:`observables` computes the dense determinant and condensate.
    chunk_size
        Configurations per dense batch of :meth:`observables`.

    Attributes
    ----------
    gauge
        The pure-gauge :class:`theories.su3.SUNGaugeAction`.
    dirac
        :class:`WilsonDirac` at ``kappa`` with ``n_colors = N``.
    manifold
        ``SUN(N)``: momenta, drift, projection, ``links`` and ``link_force`` for (PF-)HMC.
    """

    name = "su3-nf2"
    field_name = "links"

    def __init__(
        self,
        params: SUNNf2Params,
        lattice: Lattice,
        *,
        dense_max_dim: int = DENSE_MAX_DIM,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if lattice.dim not in (2, 4):
            raise ValueError(f"su3-nf2 is defined in d = 2 and d = 4, got lattice shape {list(lattice.shape)}")
        if any(n < 2 for n in lattice.shape):
            raise ValueError(f"su3-nf2 needs extents >= 2, got {list(lattice.shape)}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.params = params
        self.beta = float(params.beta)
        self.kappa = float(params.kappa)
        self.n = int(params.n)
        self.lattice = lattice
        self.gauge = SUNGaugeAction(SUNParams(self.beta, self.n), lattice)
        self.field_shape = self.gauge.field_shape
        self.dirac = WilsonDirac(lattice, self.kappa, n_colors=self.n)
        self.manifold = SUN(self.n)
        self.dense_max_dim = int(dense_max_dim)
        self.chunk_size = int(chunk_size)

    @property
    def dense_dim(self) -> int:
        """Rows of the dense Dirac matrix, ``V Ns N``."""
        return self.lattice.volume * self.dirac.n_spin * self.n

    @property
    def dense_max_volume(self) -> int:
        """Largest volume with dense observables (``dense_max_dim // (Ns N)``); the training target's switch
        between the exact and the stochastic determinant gradient (:mod:`latflow.fermions.training_target`)."""
        return self.dense_max_dim // (self.dirac.n_spin * self.n)

    @property
    def dense_observables(self) -> bool:
        """Whether :meth:`observables` includes the dense fermionic observables."""
        return self.dense_dim <= self.dense_max_dim

    def couplings(self) -> dict[str, float]:
        return {"beta": self.beta, "kappa": self.kappa, "n": float(self.n)}

    def initial_field(self, n_chains: int, generator: torch.Generator, start: str = "default", **kwargs: Any):
        """Starting links ``[n_chains, d, *L, N, N]`` (see :meth:`theories.su3.SUNGaugeAction.initial_field`)."""
        return self.gauge.initial_field(n_chains, generator, start, **kwargs)

    # --- actions and forces ---------------------------------------------------------------------
    def _check(self, u: torch.Tensor) -> None:
        self.gauge._check(u)

    def gauge_action(self, u: torch.Tensor) -> torch.Tensor:
        """Wilson gauge action ``S_g`` ``[B]``."""
        return self.gauge.action(u)

    def gauge_force(self, u: torch.Tensor) -> torch.Tensor:
        """Analytic su(N) force of ``S_g``: ``F_mu(x) = (beta / 2N) ta(U_mu(x) A_mu(x))`` ``[B, d, *L, N, N]``.

        ``S_g = -(beta/N) Re tr(U A) + ...`` with the staple sum ``A`` (:func:`latflow.sun.sun_staples`) gives
        ``G = dS/dU = -(beta/N) A^dagger`` and ``F = (1/2) ta(G U^dagger) = (beta/2N) ta(U A)``. On CPU without
        autograd the fused compiled kernel (:func:`latflow.gauge_kernels.sun_wilson_force`) computes it in one
        pass; :meth:`gauge_force_reference` (torch) otherwise.
        """
        self._check(u)
        fused = sun_wilson_force(u, self.beta)
        return fused if fused is not None else self.gauge_force_reference(u)

    def gauge_force_reference(self, u: torch.Tensor) -> torch.Tensor:
        """The torch su(N) force of ``S_g`` ``[B, d, *L, N, N]`` (any device, differentiable; :meth:`gauge_force`)."""
        self._check(u)
        staples = torch.stack([sun_staples(u, mu) for mu in range(self.lattice.dim)], dim=1)
        return (0.5 * self.beta / self.n) * traceless_antihermitian(u @ staples)

    def dirac_matrix(self, u: torch.Tensor) -> torch.Tensor:
        """Dense ``D`` ``[B, n, n]``, ``n = V Ns N``; C order of ``[*L, Ns, N]``."""
        self._check(u)
        return dense_matrix(self.dirac.apply, u, self.dirac.field_shape)

    def fermion_logdet(self, u: torch.Tensor) -> torch.Tensor:
        """Exact ``log det(D^dag D)`` ``[B]`` (dense; differentiable)."""
        self._check(u)
        return logdet_normal(self.dirac, u)

    def action(self, u: torch.Tensor) -> torch.Tensor:
        """Effective action ``S_eff = S_g - log det(D^dag D)`` ``[B]`` (exact; differentiable)."""
        return self.gauge_action(u) - self.fermion_logdet(u)

    def force(self, u: torch.Tensor) -> torch.Tensor:
        """su(N) force of ``S_eff``: analytic gauge part plus autograd through the dense determinant."""
        if self.kappa == 0.0:
            return self.gauge_force(u)
        return self.gauge_force(u) + self.manifold.force(lambda v: -self.fermion_logdet(v), u)

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Re-unitarise onto SU(N)."""
        return self.manifold.project(u)

    # --- fermionic observables --------------------------------------------------------------------
    def propagator(self, u: torch.Tensor) -> torch.Tensor:
        """Dense ``D^{-1}`` ``[B, n, n]`` (index order of :meth:`dirac_matrix`)."""
        return torch.linalg.inv(self.dirac_matrix(u))

    @torch.no_grad()
    def chiral_condensate(self, u: torch.Tensor) -> torch.Tensor:
        """Exact ``Sigma = (1/V) Re Tr D^{-1}`` ``[B]`` per flavour."""
        s = self.propagator(u)
        return s.diagonal(dim1=-2, dim2=-1).sum(-1).real / self.lattice.volume

    @torch.no_grad()
    def pion_correlator(self, u: torch.Tensor) -> torch.Tensor:
        """Zero-momentum pion correlator ``C(t) = sum_x sum_{ab} |S_ab(t, x; 0)|^2`` ``[B, L0]`` (dense).

        ``S = D^{-1}``; ``a``, ``b`` run over spin and colour (gamma5-hermiticity makes the pion
        contraction this sum of squares).
        """
        s = self.propagator(u)
        b = u.shape[0]
        per_site = self.dirac.n_spin * self.n
        cols = s[:, :, :per_site]  # sources at the origin
        c = cols.abs().pow(2).reshape(b, self.lattice.shape[0], -1).sum(dim=-1)
        return c

    # --- observables ----------------------------------------------------------------------------
    @torch.no_grad()
    def observables(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each real ``[B]`` (module notes), in chunks of ``chunk_size``."""
        self._check(u)
        parts = [self._observables(u[i : i + self.chunk_size]) for i in range(0, u.shape[0], self.chunk_size)]
        if not parts:
            one = self._observables(self.initial_field(1, torch.Generator(), dtype=u.real.dtype))
            return {k: v[:0] for k, v in one.items()}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _observables(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        gauge = self.gauge.observables(u)
        s_g = gauge.pop("action")
        out = {"gauge_action": s_g, **gauge}
        if not self.dense_observables:
            return out
        d = self.dirac_matrix(u)
        lu, pivots = torch.linalg.lu_factor(d)
        logdet = 2.0 * lu.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device).expand_as(d)
        inv = torch.linalg.lu_solve(lu, pivots, eye)
        sigma = inv.diagonal(dim1=-2, dim2=-1).sum(-1).real / self.lattice.volume
        return {"action": s_g - logdet, **out, "fermion_logdet": logdet, "chiral_condensate": sigma}

    def observable_info(self) -> dict[str, str]:
        """How each observable is computed (exact dense linear algebra or pure gauge), by name."""
        info = {k: f"exact: {v}" for k, v in self.gauge.observable_descriptions().items() if k != "action"}
        info = {"gauge_action": "exact: S_g = -(beta/N) sum_p Re tr P_p", **info}
        if self.dense_observables:
            info.update(
                action="exact: S_g - log det(D^dag D) (dense LU)",
                fermion_logdet="exact: log det(D^dag D) (dense LU)",
                chiral_condensate="exact: (1/V) Re Tr D^-1 per flavour, trace over spin and colour (dense LU)",
            )
        return info

    def observable_descriptions(self) -> dict[str, str]:
        return self.observable_info()

    def measurement_settings(self) -> dict[str, Any]:
        return {
            "dense_max_dim": self.dense_max_dim,
            "estimator": "exact" if self.dense_observables else "gauge-only",
            "observables": self.observable_info(),
        }

    def derived_observables(self) -> dict[str, Derived]:
        return self.gauge.derived_observables()

    def exact_means(self) -> dict[str, float]:
        """Means fixed by symmetry: ``<Q> = 0`` in 4D (parity; the Wilson determinant is real and positive
        for Nf = 2). None in 2D."""
        return {"topological_charge": 0.0} if self.lattice.dim == 4 else {}


def build(params: SUNNf2Params, lattice: Lattice) -> SUNNf2Model:
    return SUNNf2Model(params, lattice)


SPEC = TheorySpec(
    name="su3-nf2",
    params=SUNNf2Params,
    build=build,
    description="SU(N) (default N = 3) with Nf = 2 Wilson fermions, d = 2 or 4 (exact determinant; pseudofermion HMC)",
    field_name="links",
)
