"""Yukawa theory: a real scalar coupled to two degenerate staggered fermions in two dimensions.

The model of Albergo et al. 2021 (flows for fermionic theories): massless staggered fermions coupled to
a real scalar ``phi`` through a Yukawa term. With the fermions integrated out, the target density of
``phi`` ``[B, L0, L1]`` is

    p(phi) prop. to exp(-S_B(phi)) det(D[phi])^2 = exp(-S_B(phi) + log det(D^dag D)) = exp(-S_eff(phi)),

- scalar action ``S_B = sum_x [ -2 sum_mu phi_x phi_{x+mu} + (2 d + m2) phi_x^2 + lam phi_x^4 ]``, the
  lattice phi^4 action of the same group's scalar paper (Albergo-Kanwar-Shanahan 2019) in nearest-neighbour
  form (the paper's own text was not available to us; the normalisation is checked against a third-party HMC
  value below). Summation by parts turns it into ``sum_x [ sum_mu phi_x (2 phi_x - phi_{x+mu} - phi_{x-mu}) + m2 phi_x^2
  + lam phi_x^4 ]``, the phi^4 action of :mod:`latflow.theories.phi4`, configuration by configuration: the
  map between the two normalisations is the identity (``m2``, ``lam`` and ``phi`` unchanged;
  :func:`nearest_neighbour_action` is tested against :meth:`YukawaTheory.scalar_action`). The hopping form
  of the older Yukawa literature is mapped by :func:`from_hopping_form`.
- fermion operator ``D = D_st + m_f + g phi`` (:class:`latflow.fermions.staggered.StaggeredDirac`, no gauge
  links, antiperiodic in time), ``m_f = 0`` in the paper.
- fermion content: ``D^dag = epsilon D epsilon`` makes ``det D`` real but not positive for a site-dependent
  mass; two degenerate staggered fields (``N_f = 2``, in 2D each carrying two tastes) give the positive
  weight ``det(D)^2 = det(D^dag D)``, estimated with one pseudofermion on ``K = D^dag D``.

Parameter points (L = 16, m_f = 0) as quoted with a third-party pseudofermion HMC of this model (the
paper's own text was not available to us; docs/REFERENCES.md): ``(m2, lam, g) = (-4, 6, 0.1)``, with
``<|M|> = 0.07326(17)``, and ``(-1.55, 2.4, 0.3)`` (:data:`PAPER_POINTS`). Our HMC at ``g = 0`` and the first
point's ``(m2, lam)`` gives ``<|M|> = 0.0707(6)``, in the normalisation above: the same normalisation.

Observables per configuration, each ``[B]`` (``V`` sites):

- ``magnetization``, ``abs_magnetization``, ``chi2``, ``ising_energy``, ``phi2``: as for phi^4;
- ``scalar_action``: ``S_B``;
- ``action``: ``S_eff = S_B - log det(D^dag D)`` and ``fermion_logdet`` = ``log det(D^dag D)`` (dense LU,
  volumes up to ``dense_max_volume`` only);
- ``condensate``: ``Sigma = (1/V) Tr D^{-1}`` per staggered field (real: ``Tr D^{-dag} = Tr D^{-1}``), exact
  (dense inverse) up to ``dense_max_volume``, else the Z2-noise estimate (:meth:`YukawaTheory.condensate_stochastic`,
  noise seeded by the configuration's bytes). The Wick contraction gives ``<psibar psi> = -Sigma``. At
  ``m_f = 0`` ``D(-phi) = -epsilon D(phi) epsilon``, so ``Tr D^{-1}`` is odd under ``phi -> -phi`` and
  ``<Sigma> = 0`` exactly (like ``<M>``); ``condensate_sign`` = ``Sigma sign(M)`` is the order parameter
  (finite-volume analogue of ``<|M|>``);

The sign of ``det D`` of one staggered field (the sign problem ``N_f = 2`` avoids) is
:meth:`~latflow.fermions.staggered.StaggeredDirac.sign_det`; it is +1 throughout at the paper's points on
8x8 and 16x16 (``|g phi|`` stays well below the smallest eigenvalue of ``D_st``), so it is not recorded.

Correlators (``[B, L0]``, not stored per configuration; for analysis and benchmarks):
:meth:`YukawaTheory.scalar_correlator` and :meth:`YukawaTheory.fermion_correlator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latflow.fermions.solvers import cg
from latflow.fermions.staggered import StaggeredDirac, StaggeredPseudofermions, free_logdet_normal
from latflow.lattice import Lattice, shift
from latflow.rng import configuration_z2_noise

from .base import Derived, TheorySpec
from .phi4 import Phi4Params, Phi4Theory, free_log_z
from .phi4 import observable_descriptions as phi4_descriptions

__all__ = [
    "PAPER_POINTS",
    "YukawaParams",
    "YukawaTheory",
    "from_hopping_form",
    "nearest_neighbour_action",
]

# (m2, lam, g) at L = 16, m_f = 0 (module notes)
PAPER_POINTS: dict[str, tuple[float, float, float]] = {"g0.1": (-4.0, 6.0, 0.1), "g0.3": (-1.55, 2.4, 0.3)}
DENSE_MAX_VOLUME = 1024  # 32x32: one 1024 x 1024 real LU per configuration (~30 ms on one core)
N_NOISE = 4
NOISE_CG_TOL = 1e-8
CHUNK_SIZE = 64


@dataclass(frozen=True)
class YukawaParams:
    """Couplings: scalar ``m2``, ``lam`` (phi^4 normalisation), Yukawa ``g`` and fermion mass ``m_f``.

    Normalisable for ``lam > 0`` (any ``m2``) or ``lam = 0`` with ``m2 > 0`` (the determinant grows only
    polynomially in ``phi``).
    """

    m2: float
    lam: float
    g: float
    m_f: float = 0.0

    def __post_init__(self) -> None:
        for name in ("m2", "lam", "g", "m_f"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        Phi4Params(self.m2, self.lam)  # the scalar's own rules (lam >= 0; m2 > 0 when lam = 0)


def nearest_neighbour_action(phi: torch.Tensor, m2: float, lam: float) -> torch.Tensor:
    """``S_B = sum_x [ -2 sum_mu phi_x phi_{x+mu} + (2 d + m2) phi_x^2 + lam phi_x^4 ]`` ``[B]`` (paper's form).

    ``phi`` ``[B, L0, ..., L{d-1}]``. Equal to the phi^4 action of this package (module notes).
    """
    d = phi.dim() - 1
    hop = sum(phi * shift(phi, mu, 1) for mu in range(d))
    phi2 = phi * phi
    return (-2.0 * hop + (2 * d + m2) * phi2 + lam * phi2 * phi2).flatten(1).sum(1)  # type: ignore[operator]


def from_hopping_form(kappa: float, lam_hat: float, y: float, d: int = 2) -> tuple[YukawaParams, float]:
    """Map the hopping form to this package's normalisation; returns ``(params, field_scale)``.

    ``S_hop = sum_x [ -2 kappa sum_mu h_x h_{x+mu} + h_x^2 + lam_hat (h_x^2 - 1)^2 ]`` with Yukawa term
    ``y h_x`` equals ``S_B(phi) + lam_hat V`` with ``phi = sqrt(kappa) h`` and

    ``m2 = (1 - 2 lam_hat) / kappa - 2 d``, ``lam = lam_hat / kappa^2``, ``g = y / sqrt(kappa)``;

    ``field_scale = sqrt(kappa)`` (``phi = field_scale * h``; the measure changes by ``kappa^{V/2}``).
    """
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    params = YukawaParams(m2=(1 - 2 * lam_hat) / kappa - 2 * d, lam=lam_hat / kappa**2, g=y / math.sqrt(kappa))
    return params, math.sqrt(kappa)


class YukawaTheory:
    """Real scalar ``phi`` ``[B, L0, L1]`` with two staggered fields integrated out (module notes).

    Parameters
    ----------
    params
        Couplings.
    lattice
        The geometry (any ``d``; the paper's model is 2D). Even time extent: with antiperiodic time
        ``D_st`` is then invertible, so the massless free operator is.
    dense_max_volume
        Largest volume whose determinant-based observables are exact (dense LU).
    n_noise
        Z2 noise vectors per configuration of the stochastic condensate above ``dense_max_volume``.
    chunk_size
        Configurations per batch of the observables' linear algebra.

    Attributes
    ----------
    dirac
        The :class:`~latflow.fermions.staggered.StaggeredDirac` ``D_st + m_f + g phi``.
    scalar
        The scalar theory (:class:`~latflow.theories.phi4.Phi4Theory`) with the same ``m2``, ``lam``.
    """

    name = "yukawa"
    field_name = "phi"

    def __init__(
        self,
        params: YukawaParams,
        lattice: Lattice,
        *,
        dense_max_volume: int = DENSE_MAX_VOLUME,
        n_noise: int = N_NOISE,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if lattice.shape[0] % 2:
            raise ValueError(f"the Yukawa theory needs an even time extent L0, got lattice {list(lattice.shape)}")
        self.params = params
        self.lattice = lattice
        self.field_shape = lattice.shape
        self.scalar = Phi4Theory(Phi4Params(params.m2, params.lam), lattice)
        self.dirac = StaggeredDirac(lattice, mass=params.m_f, yukawa=params.g)
        self.dense_max_volume = int(dense_max_volume)
        self.n_noise = int(n_noise)
        self.chunk_size = int(chunk_size)

    def couplings(self) -> dict[str, float]:
        p = self.params
        return {"m2": float(p.m2), "lam": float(p.lam), "g": float(p.g), "m_f": float(p.m_f)}

    # --- actions ------------------------------------------------------------------------
    def scalar_action(self, phi: torch.Tensor) -> torch.Tensor:
        """``S_B`` ``[B]``."""
        return self.scalar.action(phi)

    def gauge_action(self, phi: torch.Tensor) -> torch.Tensor:
        """The bosonic action ``S_B`` ``[B]``, under the name the samplers with pseudofermions look up."""
        return self.scalar.action(phi)

    def gauge_force(self, phi: torch.Tensor) -> torch.Tensor:
        """``dS_B/dphi`` ``[B, *L]`` (analytic)."""
        return self.scalar.force(phi)

    def pseudofermions(
        self,
        *,
        even_odd: bool = False,
        hasenbusch_kappas: tuple[float, ...] = (),
        tol: float = 1e-10,
        max_iter: int = 10_000,
    ) -> StaggeredPseudofermions:
        """The pseudofermion of ``det(D^dag D)`` (one field on the full lattice; forces in ``phi``).

        ``even_odd`` and ``hasenbusch_kappas`` (Wilson-operator options) are refused: the site-dependent mass
        couples even and odd sites (:mod:`latflow.fermions.staggered`), and Hasenbusch kappas have no meaning here.
        """
        if even_odd or hasenbusch_kappas:
            raise ValueError(
                "the Yukawa theory's staggered pseudofermions take neither even_odd nor hasenbusch_kappas "
                "(allowed: even_odd = false, hasenbusch_kappas = [])"
            )
        return StaggeredPseudofermions(self.dirac, tol=tol, max_iter=max_iter)

    def _check_dense(self, what: str) -> None:
        if self.lattice.volume > self.dense_max_volume:
            raise ValueError(
                f"{what} needs a dense determinant: volume {self.lattice.volume} > dense_max_volume = "
                f"{self.dense_max_volume}; sample with pseudofermions (pf-hmc, pf-flow-mcmc)"
            )

    def fermion_logdet(self, phi: torch.Tensor) -> torch.Tensor:
        """``log det(D^dag D)`` ``[B]`` (dense LU; differentiable in ``phi``)."""
        self._check_dense("fermion_logdet")
        return self.dirac.logdet_normal(phi)

    def action(self, phi: torch.Tensor) -> torch.Tensor:
        """``S_eff = S_B - log det(D^dag D)`` ``[B]`` (exact, dense; differentiable)."""
        self._check_dense("the exact effective action")
        return self.scalar.action(phi) - self.dirac.logdet_normal(phi)

    def force(self, phi: torch.Tensor) -> torch.Tensor:
        """``dS_eff/dphi = dS_B/dphi - 2 g Re diag(D^{-1})`` ``[B, *L]`` (dense inverse; HMC on ``S_eff``)."""
        self._check_dense("the exact effective force")
        dinv = torch.linalg.inv(self.dirac.dense(phi))
        diag = torch.diagonal(dinv, dim1=-2, dim2=-1).reshape(phi.shape)
        return self.scalar.force(phi) - 2.0 * self.params.g * diag.to(phi.dtype)

    # --- condensate --------------------------------------------------------------------
    def condensate(self, phi: torch.Tensor) -> torch.Tensor:
        """Exact ``(1/V) Tr D^{-1}`` ``[B]`` (dense inverse)."""
        self._check_dense("the exact condensate")
        dinv = torch.linalg.inv(self.dirac.dense(phi))
        return torch.diagonal(dinv, dim1=-2, dim2=-1).sum(-1) / self.lattice.volume

    def configuration_noise(self, phi: torch.Tensor, n_noise: int) -> torch.Tensor:
        """Z2 noise ``[B * n_noise, *L]`` seeded by each configuration's bytes (same configuration, same noise)."""
        return configuration_z2_noise(phi, n_noise, self.field_shape)

    def condensate_stochastic(
        self, phi: torch.Tensor, eta: torch.Tensor, *, tol: float = NOISE_CG_TOL, max_iter: int = 10_000
    ) -> torch.Tensor:
        """Unbiased ``(1/(n V)) sum_k Re(eta_k^dag D^{-1} eta_k)`` ``[B]`` for noise ``eta`` ``[B * n, *L]``.

        ``D^{-1} eta = (D^dag D)^{-1} D^dag eta`` by CG; ``E[eta eta^dag] = 1`` makes it unbiased for Z2
        (or complex Gaussian) noise.
        """
        b = phi.shape[0]
        n = eta.shape[0] // max(b, 1)
        rep = phi.repeat_interleave(n, dim=0)
        rhs = self.dirac.apply_dagger(rep, eta)
        x = cg(lambda v: self.dirac.apply_normal(rep, v), rhs, tol=tol, max_iter=max_iter).x
        per = (eta.conj() * x).real.flatten(1).sum(1).reshape(b, n)
        return per.mean(1).to(phi.dtype) / self.lattice.volume

    # --- observables ---------------------------------------------------------------------
    def observables(self, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each ``[B]`` (module notes), in chunks of ``chunk_size``."""
        if tuple(phi.shape[1:]) != tuple(self.field_shape):
            raise ValueError(f"phi must be [B, {', '.join(map(str, self.field_shape))}], got {list(phi.shape)}")
        parts = [self._observables(phi[i : i + self.chunk_size]) for i in range(0, phi.shape[0], self.chunk_size)]
        if not parts:
            one = self._observables(torch.zeros((1, *self.field_shape), dtype=phi.dtype, device=phi.device))
            return {k: v[:0] for k, v in one.items()}
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _observables(self, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            obs = self.scalar.observables(phi)
            obs["scalar_action"] = obs.pop("action")
            sign_m = torch.sign(obs["magnetization"])
            if self.lattice.volume <= self.dense_max_volume:
                dense = self.dirac.dense(phi.to(torch.float64))
                _, logabs = torch.linalg.slogdet(dense)
                dinv = torch.linalg.inv(dense)
                sigma = torch.diagonal(dinv, dim1=-2, dim2=-1).sum(-1) / self.lattice.volume
                obs["fermion_logdet"] = (2.0 * logabs).to(phi.dtype)
                obs["action"] = obs["scalar_action"] - obs["fermion_logdet"]
            else:
                eta = self.configuration_noise(phi, self.n_noise)
                sigma = self.condensate_stochastic(phi, eta)
            obs["condensate"] = sigma.to(phi.dtype)
            obs["condensate_sign"] = (sigma.to(phi.dtype) * sign_m).to(phi.dtype)
        return obs

    def observable_info(self) -> dict[str, str]:
        """Which estimator each determinant-based observable uses (recorded in the ensemble's metadata)."""
        if self.lattice.volume <= self.dense_max_volume:
            return {
                "action": "exact: S_B - log det(D^dag D) (dense LU)",
                "fermion_logdet": "exact: log det(D^dag D) (dense LU)",
                "condensate": "exact: (1/V) Tr D^-1 per staggered field (dense inverse)",
                "condensate_sign": "exact: (1/V) Tr D^-1 sign(M) (dense inverse)",
            }
        noise = (
            f"{self.n_noise} Z2 noise vectors per configuration (seeded by the configuration), CG on D^dag D to "
            f"relative residual {NOISE_CG_TOL:g}; unbiased"
        )
        return {
            "condensate": f"stochastic: (1/V) Tr D^-1 per staggered field, {noise}",
            "condensate_sign": f"stochastic: (1/V) Tr D^-1 sign(M), {noise}",
        }

    def observable_descriptions(self) -> dict[str, str]:
        d = self.lattice.dim
        out = phi4_descriptions(d)
        out["scalar_action"] = out.pop("action").replace("S,", "S_B,")
        out.update(
            {
                "action": "S_eff = S_B - log det(D^dag D), the effective action of the scalar (dense determinant)",
                "fermion_logdet": "log det(D^dag D) of the staggered operator D = D_st + m_f + g phi (dense LU)",
                "condensate": (
                    "Sigma = (1/V) Tr D^-1 per staggered field (<psibar psi> = -Sigma); <Sigma> = 0 at m_f = 0"
                ),
                "condensate_sign": "Sigma sign(M): the condensate aligned with the magnetisation (order parameter)",
            }
        )
        return out

    def exact_means(self) -> dict[str, float]:
        """Means fixed by symmetry.

        At ``m_f = 0``: ``S_eff(-phi) = S_eff(phi)`` and ``Tr D^{-1}`` is odd, so ``<M> = <Sigma> = 0``.
        At ``m_f != 0`` the determinant breaks ``phi -> -phi`` and nothing is fixed.
        """
        if self.params.m_f != 0:
            return {}
        return {"magnetization": 0.0, "condensate": 0.0}

    def exact_log_z(self) -> float | None:
        """``log Z`` of the free theory (``lam = 0``, ``g = 0``): free scalar plus free ``log det(D^dag D)``."""
        p = self.params
        if p.lam != 0 or p.g != 0:
            return None
        return free_log_z(self.lattice.shape, float(p.m2)) + free_logdet_normal(self.lattice.shape, float(p.m_f))

    def sample_exact(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Independent exact draws ``[n, *L]`` (float64) of the free theory (``lam = 0``, ``g = 0``); else None."""
        p = self.params
        if p.lam != 0 or p.g != 0:
            return None
        return self.scalar.sample_exact(n, generator)

    def field_log_volume(self) -> float:
        """0: Lebesgue measure on the real scalar field."""
        return 0.0

    def derived_observables(self) -> dict[str, Derived]:
        return self.scalar.derived_observables()

    # --- correlators ---------------------------------------------------------------------
    def scalar_correlator(self, phi: torch.Tensor) -> torch.Tensor:
        """Zero-momentum ``C(t) = (1/V) sum_t0 Phi(t0) Phi(t0 + t)``, ``Phi(t) = sum_x phi(t, x)``, ``[B, L0]``.

        ``sum_t C(t) = V M^2 = chi2``.
        """
        big_phi = phi.reshape(phi.shape[0], phi.shape[1], -1).sum(-1)  # [B, L0] (also for d = 1)
        f = torch.fft.fft(big_phi, dim=1)
        corr = torch.fft.ifft(f.conj() * f, dim=1).real
        return corr / self.lattice.volume

    def fermion_correlator(self, phi: torch.Tensor) -> torch.Tensor:
        """``C_f(t) = sum_x |G(t, x; 0)|^2`` ``[B, L0]`` with ``G = D^{-1}`` from a point source at the origin.

        The staggered "pion" (Goldstone) channel; by CG on ``D^dag D`` at any volume.
        """
        b = phi.shape[0]
        cdtype = torch.complex128 if phi.dtype == torch.float64 else torch.complex64
        src = torch.zeros((b, *self.field_shape), dtype=cdtype, device=phi.device)
        src[(slice(None),) + (0,) * self.lattice.dim] = 1.0
        rhs = self.dirac.apply_dagger(phi, src)
        x = cg(lambda v: self.dirac.apply_normal(phi, v), rhs, tol=1e-12, max_iter=10_000).x
        return (x.conj() * x).real.reshape(b, self.field_shape[0], -1).sum(-1).to(phi.dtype)


def build(params: YukawaParams, lattice: Lattice) -> YukawaTheory:
    return YukawaTheory(params, lattice)


SPEC = TheorySpec(
    name="yukawa",
    params=YukawaParams,
    build=build,
    description="real scalar with a Yukawa coupling to two staggered fermions (Albergo et al. 2021)",
)
