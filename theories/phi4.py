"""Scalar phi^4 theory in the normalisation of Albergo, Kanwar, Shanahan (2019).

``S = sum_x [ sum_mu phi_x (2 phi_x - phi_{x+mu} - phi_{x-mu}) + m2 phi_x^2 + lam phi_x^4 ]``

Observables per configuration (``V`` sites, ``d`` dimensions):

- ``magnetization``      ``M = (1/V) sum_x phi_x``
- ``abs_magnetization``  ``|M|``
- ``chi2``               ``V M^2``; its mean is the two-point susceptibility ``sum_x <phi_0 phi_x>``
- ``ising_energy``       ``(1/(d V)) sum_x sum_mu phi_x phi_{x+mu}``; mean is ``(1/d) sum_mu G(e_mu)``
- ``phi2``               ``(1/V) sum_x phi_x^2``
- ``action``             ``S``

Derived (from means): ``chi2_connected = V (<M^2> - <|M|>^2)``, the usual
finite-volume estimator of the connected susceptibility in the broken phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latflow.lattice import Lattice, shift

from .base import Derived, TheorySpec


@dataclass(frozen=True)
class Phi4Params:
    """Couplings of phi^4: bare mass squared ``m2`` and quartic coupling ``lam``.

    The action must be bounded below for the measure ``exp(-S)`` to be normalisable: ``lam > 0``
    (any ``m2``), or ``lam = 0`` with ``m2 > 0`` (the free field; at ``m2 <= 0`` the zero mode
    ``phi_x = c`` has ``S = m2 V c^2``, unbounded or flat).
    """

    m2: float
    lam: float

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(
                f"lam = {self.lam}: must be >= 0 (lam > 0 for any m2, or lam = 0 with m2 > 0); "
                "for lam < 0 the action is unbounded below"
            )
        if self.lam == 0 and self.m2 <= 0:
            raise ValueError(
                f"m2 = {self.m2} with lam = 0: the free field needs m2 > 0 (or lam > 0); "
                "at m2 <= 0 the zero mode is not normalisable"
            )


class Phi4Theory:
    """phi^4 on a periodic lattice; fields ``[B, L0, ..., L{d-1}]`` real."""

    name = "phi4"
    field_name = "phi"

    def __init__(self, params: Phi4Params, lattice: Lattice) -> None:
        self.params = params
        self.lattice = lattice
        self.field_shape = lattice.shape

    def couplings(self) -> dict[str, float]:
        return {"m2": float(self.params.m2), "lam": float(self.params.lam)}

    def action(self, phi: torch.Tensor) -> torch.Tensor:
        """``S[B]`` for ``phi`` ``[B, L0, ..., L{d-1}]``."""
        kinetic = torch.zeros_like(phi)
        for mu in range(self.lattice.dim):
            kinetic = kinetic + phi * (2 * phi - shift(phi, mu, 1) - shift(phi, mu, -1))
        phi2 = phi * phi
        density = kinetic + self.params.m2 * phi2 + self.params.lam * phi2 * phi2
        return density.flatten(1).sum(dim=1)

    def force(self, phi: torch.Tensor) -> torch.Tensor:
        """Analytic ``dS/dphi`` ``[B, L0, ...]``: ``2 sum_mu (2 phi_x - phi_{x+mu} - phi_{x-mu}) + 2 m2 phi_x
        + 4 lam phi_x^3`` (the HMC force)."""
        lap = torch.zeros_like(phi)
        for mu in range(self.lattice.dim):
            lap = lap + (2 * phi - shift(phi, mu, 1) - shift(phi, mu, -1))
        return 2 * lap + (2 * self.params.m2) * phi + (4 * self.params.lam) * phi * phi * phi

    def observables(self, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each ``[B]`` (see module docstring)."""
        v = self.lattice.volume
        d = self.lattice.dim
        m = phi.flatten(1).mean(dim=1)
        link = sum(phi * shift(phi, mu, 1) for mu in range(d))
        return {
            "magnetization": m,
            "abs_magnetization": m.abs(),
            "chi2": v * m * m,
            "ising_energy": link.flatten(1).sum(dim=1) / (d * v),
            "phi2": (phi * phi).flatten(1).mean(dim=1),
            "action": self.action(phi),
        }

    def observable_descriptions(self) -> dict[str, str]:
        """What each observable of :meth:`observables` is: definition, normalisation, units."""
        return observable_descriptions(self.lattice.dim)

    def exact_means(self) -> dict[str, float]:
        """Means fixed by symmetry: ``<M> = 0`` (the action is even under ``phi -> -phi``).

        In the broken phase a chain that stays in one sector then shows a large error on ``M``
        instead of a small one about the wrong value.
        """
        return {"magnetization": 0.0}

    def exact_log_z(self) -> float | None:
        """Exact ``log Z = log int prod_x dphi_x exp(-S)`` of the free field (:func:`free_log_z`).

        ``None`` when ``lam != 0`` (no closed form).
        """
        if self.params.lam != 0:
            return None
        return free_log_z(self.lattice.shape, float(self.params.m2))

    def sample_exact(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Independent exact draws ``[n, L0, ...]`` (float64) of the free field (``lam = 0``); None otherwise.

        ``phi = F^{-1} sqrt(G(k)) F xi`` with white noise ``xi``: a Gaussian field with covariance
        ``G = (2 A)^{-1}`` (:func:`free_propagator`). The start of annealing in ``lam``.
        """
        if self.params.lam != 0:
            return None
        g = torch.from_numpy(free_propagator(self.lattice.shape, float(self.params.m2)))
        xi = torch.randn((int(n), *self.lattice.shape), generator=generator, dtype=torch.float64)
        dims = tuple(range(1, xi.dim()))
        return torch.fft.ifftn(g.sqrt() * torch.fft.fftn(xi, dim=dims), dim=dims).real.contiguous()

    def field_log_volume(self) -> float:
        """0: the field measure is already the Lebesgue measure ``prod_x dphi_x`` (no compact volume to add)."""
        return 0.0

    def derived_observables(self) -> dict[str, Derived]:
        v = self.lattice.volume
        return {
            "chi2_connected": Derived(
                ("chi2", "abs_magnetization"),
                lambda chi2, absm: chi2 - v * absm * absm,
                "V (<M^2> - <|M|>^2)",
            )
        }


def observable_descriptions(d: int) -> dict[str, str]:
    """Descriptions of the phi^4 observables (lattice units: ``a = 1``, phi dimensionless)."""
    return {
        "magnetization": "M = (1/V) sum_x phi_x, per configuration (lattice units)",
        "abs_magnetization": "|M|, M = (1/V) sum_x phi_x",
        "chi2": "V M^2; its mean is the two-point susceptibility sum_x <phi_0 phi_x>",
        "ising_energy": (f"(1/(d V)) sum_x sum_mu phi_x phi_(x+mu), d = {d}; its mean is (1/d) sum_mu G(e_mu)"),
        "phi2": "(1/V) sum_x phi_x^2",
        "action": "S, the full lattice action (Albergo-Kanwar-Shanahan normalisation), summed over sites",
    }


# --- exact free-field results (lam = 0) ------------------------------------


def free_propagator(shape: tuple[int, ...], m2: float) -> np.ndarray:
    """Momentum-space propagator ``G(k) = 1 / (2 (m2 + sum_mu 4 sin^2(k_mu/2)))``, array of ``shape``."""
    if m2 <= 0:
        raise ValueError(f"the free theory needs m2 > 0, got {m2}")
    grids = np.meshgrid(*[2 * np.pi * np.arange(n) / n for n in shape], indexing="ij")
    phat2 = sum(4 * np.sin(k / 2) ** 2 for k in grids)
    return 1.0 / (2.0 * (m2 + phat2))


def free_correlator(shape: tuple[int, ...], m2: float) -> np.ndarray:
    """Position-space ``G(x) = <phi_0 phi_x>`` of the free field, array of ``shape``."""
    return np.real(np.fft.ifftn(free_propagator(shape, m2)))


def free_phi2(shape: tuple[int, ...], m2: float) -> float:
    """Exact ``<phi^2>`` of the free field."""
    return float(free_propagator(shape, m2).mean())


def free_chi2(shape: tuple[int, ...], m2: float) -> float:
    """Exact two-point susceptibility ``sum_x G(x) = 1/(2 m2)``."""
    return float(free_propagator(shape, m2).flat[0])


def free_ising_energy(shape: tuple[int, ...], m2: float) -> float:
    """Exact Ising energy ``(1/d) sum_mu G(e_mu)`` of the free field."""
    g = free_correlator(shape, m2)
    d = len(shape)
    total = 0.0
    for mu in range(d):
        idx = [0] * d
        idx[mu] = 1 % shape[mu]
        total += g[tuple(idx)]
    return float(total / d)


def free_log_z(shape: tuple[int, ...], m2: float) -> float:
    """Exact ``log Z = log int prod_x dphi_x exp(-S)`` of the free field (``lam = 0``), Lebesgue measure.

    The action of :meth:`Phi4Theory.action` at ``lam = 0`` is ``S = phi^T A phi`` with
    ``A = -Delta + m2`` (``-Delta phi_x = sum_mu (2 phi_x - phi_{x+mu} - phi_{x-mu})``), i.e.
    ``S = phi^T K phi / 2`` with ``K = 2 A``. Hence ``Z = (2 pi)^{V/2} det(K)^{-1/2} = pi^{V/2} det(A)^{-1/2}``
    and, with the Fourier eigenvalues ``m2 + sum_mu 4 sin^2(k_mu / 2)`` of ``A`` (``1 / (2 G(k))``,
    :func:`free_propagator`),

    ``log Z = (V/2) log pi - (1/2) sum_k log(m2 + sum_mu 4 sin^2(k_mu / 2))``.

    Parameters
    ----------
    shape
        Lattice extents ``(L0, ..., L{d-1})``.
    m2
        Mass squared, ``> 0``.
    """
    g = free_propagator(shape, m2)  # 1 / (2 a_k)
    return float(0.5 * g.size * np.log(np.pi) + 0.5 * np.sum(np.log(2.0 * g)))


def build(params: Phi4Params, lattice: Lattice) -> Phi4Theory:
    return Phi4Theory(params, lattice)


SPEC = TheorySpec(
    name="phi4",
    params=Phi4Params,
    build=build,
    description="real scalar phi^4 (Albergo-Kanwar-Shanahan normalisation)",
)
