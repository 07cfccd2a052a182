"""The Schwinger model: 2D U(1) gauge theory with Nf = 2 Wilson fermions.

Target density of the link angles ``theta`` ``[B, 2, L0, L1]`` (``U_mu(x) = exp(i theta_mu(x))``):

    p(theta) prop. to exp(-S_g(theta)) det(D^dag D) = exp(-S_eff(theta)),
    S_eff = S_g - log det(D^dag D),

with the Wilson gauge action ``S_g = -beta sum_p cos(theta_p)`` (:class:`U1GaugeAction`) and the
Wilson operator ``D = 1 - kappa H`` of :mod:`latflow.fermions.wilson` (``(1 -+ gamma_mu)`` hops,
antiperiodic in time, periodic in space). ``action`` is ``S_eff`` with the determinant computed
exactly from the dense matrix (``2 V`` by ``2 V`` per configuration): meant for small lattices
(exact-determinant samplers, reweighting, validation). Large-volume sampling uses pseudofermions
(:class:`latflow.samplers.pf_hmc.PseudofermionHMC`, built from ``gauge_action``, ``gauge_force``
and ``dirac``).

Observables per configuration, each ``[B]`` (:meth:`SchwingerModel.observables`):

- ``action``                 ``S_eff`` (exact determinant; volumes ``V <= dense_max_volume`` only)
- ``gauge_action``           ``S_g`` (larger volumes, in place of ``action``)
- ``plaquette``              ``(1/V) sum_x cos(theta_01(x))``
- ``topological_charge``     geometric ``Q`` (:func:`latflow.theories.u1.topological_charge`)
- ``topological_charge_sq``  ``Q^2``
- ``chiral_condensate``      ``Sigma = (1/V) Tr D^{-1}`` (trace over sites and spins), per flavour:
  exact (dense LU) for ``V <= dense_max_volume``, else the unbiased Z2-noise estimate of
  :meth:`SchwingerModel.chiral_condensate_stochastic` with ``n_noise`` vectors per configuration
- ``fermion_logdet``         ``log det(D^dag D)`` (for reweighting between couplings; dense, so
  ``V <= dense_max_volume`` only)

Cost per configuration: dense ``O(V^3)`` time and ``O(V^2)`` memory (0.5 ms at V = 16, 3.4 ms at
V = 64, 8.6 ms at V = 100, 72 ms at V = 256 on one core); stochastic ``n_noise`` CG solves on
``D^dag D``, ``O(V)`` per iteration (4 Z2 vectors to a residual of 1e-8: 8.6 ms at V = 100, 23 ms at
V = 256). The default ``dense_max_volume = 100`` (10x10) is where the two cost the same. Batches are
processed in chunks of ``chunk_size`` configurations, so memory is bounded whatever the batch.
:meth:`SchwingerModel.observable_info` says which estimator each observable uses (recorded in
the ensemble's metadata).

Normalisation of the condensate: ``Sigma`` is the trace of the inverse of ``D = 1 - kappa H``
exactly as it stands (real per configuration by gamma5-hermiticity: ``Tr D^{-1} = Tr D^{-dag}``).
The Wick contraction ``<psi_x psibar_x> = D^{-1}_{xx}`` gives ``<psibar psi> = -Sigma`` per flavour
in this normalisation; with the conventionally normalised operator ``D_W = D / (2 kappa)``
(``m_0 = 1/(2 kappa) - 2`` in 2D) it is ``-2 kappa Sigma``. No additive renormalisation is done.
Derived: ``topological_susceptibility = <Q^2> / V``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from latflow.fermions.dense import dense_matrix, logdet_normal
from latflow.fermions.gamma import gamma_matrices
from latflow.fermions.pseudofermions import complex_gaussian
from latflow.fermions.solvers import cg
from latflow.fermions.wilson import WilsonDirac, u1_links
from latflow.gauge import u1_plaquette_angles, wrap_angle
from latflow.lattice import Lattice
from latflow.rng import configuration_z2_noise

from .base import Derived, TheorySpec
from .u1 import U1GaugeAction, U1Params

KAPPA_MAX = 0.5
# observables: exact dense ones up to this volume, CG-based stochastic estimates above (module notes)
DENSE_MAX_VOLUME = 100
N_NOISE = 4  # Z2 noise vectors per configuration of the stochastic condensate
NOISE_CG_TOL = 1e-8  # far below the noise of the estimate (relative ~1e-2 per configuration)
CHUNK_SIZE = 64  # configurations per dense / CG batch inside observables()


@dataclass(frozen=True)
class SchwingerParams:
    """Couplings of the Schwinger model.

    Parameters
    ----------
    beta
        Inverse gauge coupling, finite and ``>= 0``.
    kappa
        Wilson hopping parameter, finite, ``0 <= kappa < 0.5`` (``kappa = 0``: quenched, ``D = 1``;
        the free critical value is ``1/4``; the bound only excludes values without a lattice
        fermion interpretation, near-critical points are the user's choice).
    """

    beta: float
    kappa: float

    def __post_init__(self) -> None:
        for name in ("beta", "kappa"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 <= self.kappa < KAPPA_MAX:
            raise ValueError(f"kappa must be in [0, {KAPPA_MAX}), got {self.kappa}")


class SchwingerModel:
    """Nf = 2 Wilson fermions coupled to 2D U(1) links ``[B, 2, L0, L1]``.

    Parameters
    ----------
    params
        ``beta`` and ``kappa``.
    lattice
        A 2D lattice, each extent ``>= 2`` (time is axis 0).
    dense_max_volume
        Largest volume whose observables are exact (dense LU); above it the condensate is
        stochastic and ``action`` / ``fermion_logdet`` are not measured.
    n_noise
        Z2 noise vectors per configuration of the stochastic condensate.
    chunk_size
        Configurations per batch of the observables' linear algebra (bounds their memory).

    Attributes
    ----------
    gauge
        The :class:`U1GaugeAction` at ``beta``.
    dirac
        The :class:`WilsonDirac` operator at ``kappa`` (antiperiodic time).
    """

    name = "schwinger"
    field_name = "links"

    def __init__(
        self,
        params: SchwingerParams,
        lattice: Lattice,
        *,
        dense_max_volume: int = DENSE_MAX_VOLUME,
        n_noise: int = N_NOISE,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if int(n_noise) < 1 or int(chunk_size) < 1:
            raise ValueError(f"n_noise and chunk_size must be >= 1, got {n_noise} and {chunk_size}")
        if lattice.dim != 2:
            raise ValueError(f"the Schwinger model is 2D, got lattice shape {list(lattice.shape)}")
        if any(n < 2 for n in lattice.shape):
            raise ValueError(f"the Schwinger model needs extents >= 2, got {list(lattice.shape)}")
        self.params = params
        self.beta = float(params.beta)
        self.kappa = float(params.kappa)
        self.lattice = lattice
        self.field_shape = (2, *lattice.shape)
        self.gauge = U1GaugeAction(U1Params(self.beta), lattice, wilson_loops=())
        self.dirac = WilsonDirac(lattice, self.kappa)
        self.dense_max_volume = int(dense_max_volume)
        self.n_noise = int(n_noise)
        self.chunk_size = int(chunk_size)

    @property
    def dense_observables(self) -> bool:
        """Whether :meth:`observables` uses exact dense linear algebra (``V <= dense_max_volume``)."""
        return self.lattice.volume <= self.dense_max_volume

    def couplings(self) -> dict[str, float]:
        return {"beta": self.beta, "kappa": self.kappa}

    # --- actions and forces ---------------------------------------------------------------------
    def _check(self, theta: torch.Tensor) -> None:
        if theta.is_complex() or tuple(theta.shape[1:]) != self.field_shape or theta.dim() != 4:
            shape = ", ".join(map(str, self.field_shape))
            raise ValueError(f"links must be real angles [B, {shape}], got {list(theta.shape)} ({theta.dtype})")

    def gauge_action(self, theta: torch.Tensor) -> torch.Tensor:
        """Wilson gauge action ``S_g`` ``[B]``."""
        return self.gauge.action(theta)

    def gauge_force(self, theta: torch.Tensor) -> torch.Tensor:
        """Analytic ``dS_g/dtheta`` ``[B, 2, L0, L1]``."""
        return self.gauge.force(theta)

    def dirac_matrix(self, theta: torch.Tensor) -> torch.Tensor:
        """Dense ``D`` ``[B, n, n]``, ``n = 2 V``; index ``(t * L1 + x1) * 2 + spin`` (C order of ``[L0, L1, 2]``)."""
        self._check(theta)
        return dense_matrix(self.dirac.apply, u1_links(theta), self.dirac.field_shape)

    def fermion_logdet(self, theta: torch.Tensor) -> torch.Tensor:
        """Exact ``log det(D^dag D)`` ``[B]`` (dense; differentiable)."""
        self._check(theta)
        return logdet_normal(self.dirac, u1_links(theta))

    def action(self, theta: torch.Tensor) -> torch.Tensor:
        """Effective action ``S_eff = S_g - log det(D^dag D)`` ``[B]`` (exact; differentiable)."""
        return self.gauge_action(theta) - self.fermion_logdet(theta)

    def force(self, theta: torch.Tensor) -> torch.Tensor:
        """Analytic ``dS_eff/dtheta`` ``[B, 2, L0, L1]`` from the dense inverse.

        ``d log det(D^dag D) = 2 Re Tr(D^{-1} dD)`` with ``dD = -kappa dH``, and
        ``d Re Tr(S H) / d theta_mu(x) = -Im(U_mu(x) F_mu(x) - U_mu(x)^* G_mu(x))`` with
        ``F = s_mu(x) tr[(1 - gamma_mu) S(x+mu, x)]``, ``G = s_mu(x) tr[(1 + gamma_mu) S(x, x+mu)]``
        (``S = D^{-1}``, ``s_0 = -1`` across the time boundary).
        """
        force = self.gauge_force(theta)
        if self.kappa == 0.0:
            return force
        with torch.no_grad():
            s = torch.linalg.inv(self.dirac_matrix(theta))
        return force + 2.0 * self.kappa * self._trace_hop_derivative(theta, s)

    def _trace_hop_derivative(self, theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``d Re Tr(S H) / d theta`` ``[B, 2, L0, L1]`` for a fixed matrix ``S`` ``[B, n, n]``."""
        b = theta.shape[0]
        shape = self.lattice.shape
        v, ns = self.lattice.volume, self.dirac.n_spin
        blocks = s.reshape(b, v, ns, v, ns).permute(0, 1, 3, 2, 4)  # [B, row site, col site, ns, ns]
        gam = gamma_matrices(2, dtype=s.dtype, device=s.device)
        eye = torch.eye(ns, dtype=s.dtype, device=s.device)
        sites = torch.arange(v, device=s.device).reshape(shape)
        U = u1_links(theta)
        out = []
        for mu in range(2):
            fwd = torch.roll(sites, -1, dims=mu).reshape(-1)
            here = sites.reshape(-1)
            # tr[P M] = sum_ij P_ij M_ji
            f = ((eye - gam[mu]) * blocks[:, fwd, here].transpose(-1, -2)).sum(dim=(-1, -2)).reshape(b, *shape)
            g = ((eye + gam[mu]) * blocks[:, here, fwd].transpose(-1, -2)).sum(dim=(-1, -2)).reshape(b, *shape)
            z = U[:, mu] * f - U[:, mu].conj() * g
            if mu == 0 and getattr(self.dirac, "antiperiodic_time", True):
                z = torch.cat([z[:, :-1], -z[:, -1:]], dim=1)
            out.append(-z.imag)
        return torch.stack(out, dim=1)

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Wrap angles into ``(-pi, pi]`` (leaves ``S_eff`` unchanged)."""
        return wrap_angle(theta)

    # --- fermionic observables --------------------------------------------------------------------
    def propagator(self, theta: torch.Tensor) -> torch.Tensor:
        """Dense ``D^{-1}`` ``[B, n, n]`` (index order of :meth:`dirac_matrix`)."""
        return torch.linalg.inv(self.dirac_matrix(theta))

    def chiral_condensate(self, theta: torch.Tensor) -> torch.Tensor:
        """Exact ``Sigma = (1/V) Re Tr D^{-1}`` ``[B]`` per flavour (see the module notes)."""
        with torch.no_grad():
            s = self.propagator(theta)
        return s.diagonal(dim1=-2, dim2=-1).sum(-1).real / self.lattice.volume

    def _solve(self, U: torch.Tensor, b: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
        """``D^{-1} b`` via CG on the normal equations ``D^dag D x = D^dag b``."""
        res = cg(lambda v: self.dirac.apply_normal(U, v), self.dirac.apply_dagger(U, b), tol=tol, max_iter=max_iter)
        return res.x

    @torch.no_grad()
    def chiral_condensate_stochastic(
        self,
        theta: torch.Tensor,
        generator: torch.Generator,
        n_noise: int,
        *,
        noise: str = "z2",
        tol: float = 1e-10,
        max_iter: int = 10_000,
    ) -> torch.Tensor:
        """Unbiased noisy estimate of :meth:`chiral_condensate`, ``[B]``.

        ``Sigma ~ (1/(n_noise V)) sum_k Re(eta_k^dag D^{-1} eta_k)`` with noise vectors
        ``eta_k`` ``[*L, 2]`` satisfying ``E[eta eta^dag] = 1``: ``"z2"`` (independent real
        ``+-1`` entries; exact diagonal, noise only from off-diagonal elements) or
        ``"gaussian"`` (complex Gaussian, ``E|eta_i|^2 = 1``). ``D^{-1} eta`` by CG on the normal
        equations (all configurations and noise vectors in one batch).

        Parameters
        ----------
        theta
            Links ``[B, 2, L0, L1]``.
        generator
            Random stream of the noise.
        n_noise
            Noise vectors per configuration, ``>= 1``.
        noise
            ``"z2"`` or ``"gaussian"``.
        tol, max_iter
            CG settings.
        """
        self._check(theta)
        if int(n_noise) < 1:
            raise ValueError(f"n_noise must be >= 1, got {n_noise}")
        if noise not in ("z2", "gaussian"):
            raise ValueError(f"noise must be 'z2' or 'gaussian', got {noise!r}")
        b, n = theta.shape[0], int(n_noise)
        cdtype = torch.complex128 if theta.dtype == torch.float64 else torch.complex64
        shape = (b * n, *self.dirac.field_shape)
        if noise == "z2":
            bits = torch.randint(0, 2, shape, generator=generator, device=theta.device)
            eta = (2 * bits - 1).to(cdtype)
        else:
            eta = complex_gaussian(shape, generator, dtype=cdtype, device=theta.device)
        return self._condensate_from_noise(theta, eta, tol, max_iter)

    @torch.no_grad()
    def pion_correlator(self, theta: torch.Tensor, *, tol: float = 1e-12, max_iter: int = 10_000) -> torch.Tensor:
        """Zero-momentum pion correlator from a point source at the origin, ``[B, L0]``.

        ``C(t) = sum_x1 sum_{a,b} |S_ab(t, x1; 0, 0)|^2`` with ``S = D^{-1}`` (gamma5-hermiticity
        turns ``Tr[gamma5 S(x,0) gamma5 S(0,x)]`` into this sum of squares), so ``C(t) > 0`` per
        configuration. ``C(t) = C(L0 - t)`` holds for ensemble averages (time reflection is a
        symmetry of the measure), per configuration only between a configuration and its time
        reflection. Two solves of ``D`` (one per source spin) per configuration.
        """
        self._check(theta)
        b, ns = theta.shape[0], self.dirac.n_spin
        U = u1_links(theta).repeat_interleave(ns, dim=0)
        src = torch.zeros((b * ns, *self.dirac.field_shape), dtype=U.dtype, device=theta.device)
        spins = torch.arange(ns, device=theta.device).repeat(b)
        src[torch.arange(b * ns, device=theta.device), 0, 0, spins] = 1.0
        x = self._solve(U, src, tol, max_iter)
        corr = torch.view_as_real(x).pow(2).sum(dim=(-1, -2, -3))  # [B*ns, L0]
        return corr.reshape(b, ns, -1).sum(dim=1)

    # --- observables ----------------------------------------------------------------------------
    @torch.no_grad()
    def observables(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each ``[B]`` (see the module notes), in chunks of ``chunk_size``.

        The stochastic condensate draws its noise from a stream seeded by the configuration's
        bytes (:meth:`configuration_noise`): a deterministic function of the configuration, so
        that a repeated (rejected) state or a resumed run measures the same value.
        """
        self._check(theta)
        parts = [self._observables(theta[i : i + self.chunk_size]) for i in range(0, theta.shape[0], self.chunk_size)]
        if not parts:
            one = self._observables(torch.zeros((1, *self.field_shape), dtype=theta.dtype))
            return {k: v[:0] for k, v in one.items()}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _observables(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        plaq = u1_plaquette_angles(theta)[:, 0]
        cos_p = torch.cos(plaq)
        s_g = -self.beta * cos_p.flatten(1).sum(dim=1)
        q = wrap_angle(plaq).flatten(1).sum(dim=1) / (2 * math.pi)
        out = {"plaquette": cos_p.flatten(1).mean(dim=1), "topological_charge": q, "topological_charge_sq": q * q}
        if not self.dense_observables:
            eta = self.configuration_noise(theta, self.n_noise)
            sigma = self._condensate_from_noise(theta, eta, NOISE_CG_TOL, 10_000)
            return {"gauge_action": s_g, **out, "chiral_condensate": sigma}
        d = self.dirac_matrix(theta)
        lu, pivots = torch.linalg.lu_factor(d)  # one factorisation for both det and inverse
        logdet = 2.0 * lu.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device).expand_as(d)
        inv = torch.linalg.lu_solve(lu, pivots, eye)
        sigma = inv.diagonal(dim1=-2, dim2=-1).sum(-1).real / self.lattice.volume
        return {"action": s_g - logdet, **out, "chiral_condensate": sigma, "fermion_logdet": logdet}

    def configuration_noise(self, theta: torch.Tensor, n_noise: int) -> torch.Tensor:
        """Z2 noise ``[B * n_noise, *L, 2]`` (configuration-major), seeded by each configuration's bytes.

        Entries are independent ``+-1`` (``E[eta eta^dag] = 1``); configuration ``b`` gets rows
        ``b * n_noise ... (b + 1) * n_noise - 1`` from a CPU generator seeded with a BLAKE2b hash of
        its float64 link angles, so the noise is a fixed function of the configuration.
        """
        return configuration_z2_noise(theta, n_noise, self.dirac.field_shape)

    def _condensate_from_noise(self, theta: torch.Tensor, eta: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
        """``(1/(n V)) sum_k Re(eta_k^dag D^{-1} eta_k)`` ``[B]`` for noise ``eta`` ``[B * n, *L, 2]``."""
        b = theta.shape[0]
        n = eta.shape[0] // max(b, 1)
        U = u1_links(theta).repeat_interleave(n, dim=0)
        x = self._solve(U, eta.to(U.dtype), tol, max_iter)
        est = (eta.conj().to(x.dtype) * x).flatten(1).sum(1).real.reshape(b, n)
        return est.mean(dim=1) / self.lattice.volume

    def observable_info(self) -> dict[str, str]:
        """How each per-configuration observable is computed (exact or stochastic), by name."""
        info = {
            "plaquette": "exact: (1/V) sum_x cos theta_01(x)",
            "topological_charge": "exact: geometric Q = (1/2 pi) sum_x arg P_01(x)",
            "topological_charge_sq": "exact: Q^2",
        }
        if self.dense_observables:
            return {
                "action": "exact: S_g - log det(D^dag D) (dense LU)",
                **info,
                "chiral_condensate": "exact: (1/V) Re Tr D^-1 per flavour (dense LU)",
                "fermion_logdet": "exact: log det(D^dag D) (dense LU)",
            }
        return {
            "gauge_action": "exact: S_g = -beta sum_p cos theta_p",
            **info,
            "chiral_condensate": (
                f"stochastic: (1/V) Re Tr D^-1 per flavour, {self.n_noise} Z2 noise vectors per configuration "
                f"(seeded by the configuration), CG on D^dag D to relative residual {NOISE_CG_TOL:g}; unbiased"
            ),
        }

    def observable_attrs(self) -> dict[str, dict[str, Any]]:
        """Extra attributes of the observable datasets: the stochastic estimator's settings."""
        if self.dense_observables:
            return {}
        return {"chiral_condensate": {"n_noise": self.n_noise, "noise": "z2", "cg_tol": NOISE_CG_TOL}}

    def measurement_settings(self) -> dict[str, Any]:
        """The observables' estimators as plain data (for the ensemble's metadata)."""
        return {
            "dense_max_volume": self.dense_max_volume,
            "estimator": "exact" if self.dense_observables else "stochastic",
            **self.observable_attrs().get("chiral_condensate", {}),
            "observables": self.observable_info(),
        }

    def derived_observables(self) -> dict[str, Derived]:
        v = self.lattice.volume
        return {
            "topological_susceptibility": Derived(("topological_charge_sq",), lambda q2: q2 / v, "<Q^2> / V (per site)")
        }

    def exact_log_z(self) -> float | None:
        """At ``kappa = 0`` (``D = 1``, the pure U(1) gauge theory) the exact ``log Z`` under the Haar probability
        measure; None otherwise."""
        return self.gauge.exact_log_z() if self.kappa == 0 else None

    def field_log_volume(self) -> float:
        """``n_links log(2 pi)`` (as for :class:`U1GaugeAction`)."""
        return self.gauge.field_log_volume()

    def sample_exact(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Exact draws ``[n, 2, L0, L1]`` at ``kappa = 0`` (the pure gauge theory); None otherwise.
        The start of annealing in ``kappa``."""
        return self.gauge.sample_exact(n, generator) if self.kappa == 0 else None

    def exact_means(self) -> dict[str, float]:
        """Means fixed by symmetry: ``<Q> = 0`` (charge conjugation ``theta -> -theta`` maps ``Q -> -Q`` and
        leaves the gauge action and ``det(D^dag D)`` invariant)."""
        return {"topological_charge": 0.0}


def build(params: SchwingerParams, lattice: Lattice) -> SchwingerModel:
    return SchwingerModel(params, lattice)


SPEC = TheorySpec(
    name="schwinger",
    params=SchwingerParams,
    build=build,
    description="Schwinger model: 2D U(1) with Nf = 2 Wilson fermions (exact determinant; pseudofermion HMC)",
    field_name="links",
)
