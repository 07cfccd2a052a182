"""Pure U(1) lattice gauge theory with the Wilson action, in d >= 2 dimensions.

``S = -beta sum_p cos(theta_p)`` over all plaquettes ``p`` (every site, every plane
``mu < nu``); links are angles ``theta`` ``[B, d, L0, ..., L{d-1}]`` (see
:mod:`latflow.gauge`), ``U_mu(x) = exp(i theta_mu(x))``.

Observables per configuration (``V`` sites, ``n_planes = d (d-1)/2``), each ``[B]``:

- ``action``               ``S``
- ``plaquette``            ``(1 / (n_planes V)) sum_p cos(theta_p)``
- ``wilson_loop_RxT``      real part of the ``R x T`` Wilson loop, averaged over sites,
                           planes and (for ``R != T``) both orientations ``R x T``, ``T x R``;
                           sizes ``1x1``, ``1x2``, ``2x2`` by default
- ``polyakov_loop``        ``Re`` of the spatial average of the Polyakov loop along axis 0
- ``polyakov_loop_abs``    ``|.|`` of that spatial average
- ``topological_charge``   (d = 2 only) geometric ``Q = (1/2pi) sum_x arg P_01(x)``,
                           ``arg`` in ``(-pi, pi]``; an integer up to rounding on the torus
- ``topological_charge_sq`` (d = 2 only) ``Q^2``

Design choice: ``Q^2`` is stored as a primary observable because derived observables
are functions of *means* of primaries, and ``<Q^2>`` is not a function of ``<Q>``.
Derived (d = 2): ``topological_susceptibility = <Q^2> / V``.

Exact results on the 2D torus (docs/REFERENCES.md, "2D U(1)"): the product of all
``P = L0 L1`` plaquettes is 1, so ``Z = sum_n I_n(beta)^P``. See :func:`exact_plaquette`,
:func:`exact_wilson_loop`, :func:`exact_q2` and their infinite-volume limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ive

from latflow.gauge import (
    planes,
    u1_plaquette_angles,
    u1_polyakov_loop,
    u1_wilson_loops,
    wrap_angle,
)
from latflow.gauge_kernels import u1_wilson_force
from latflow.lattice import Lattice, shift
from latflow.plaquette_prior import u1_links_with_plaquettes
from latflow.rng import numpy_generator

from .base import Derived, TheorySpec

DEFAULT_WILSON_LOOPS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 2))


@dataclass(frozen=True)
class U1Params:
    """Coupling of the U(1) Wilson action: inverse coupling ``beta``."""

    beta: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.beta):
            raise ValueError(f"beta must be finite, got {self.beta}")


def topological_charge(theta: torch.Tensor) -> torch.Tensor:
    """Geometric topological charge of 2D links ``[B, 2, L0, L1]``, ``[B]`` (real, integer-valued).

    ``Q = (1/2pi) sum_x wrap(theta_01(x))`` with :func:`latflow.gauge.wrap_angle` into ``(-pi, pi]``.
    """
    if theta.dim() != 4 or theta.shape[1] != 2:
        raise ValueError(f"the geometric charge is defined in 2D, links [B, 2, L0, L1]; got {list(theta.shape)}")
    plaq = u1_plaquette_angles(theta)[:, 0]
    return wrap_angle(plaq).flatten(1).sum(dim=1) / (2 * math.pi)


class U1GaugeAction:
    """U(1) Wilson gauge theory on a periodic lattice, links ``[B, d, L0, ..., L{d-1}]``.

    Parameters
    ----------
    params
        The coupling ``beta``.
    lattice
        Geometry with ``d >= 2``.
    wilson_loops
        ``(R, T)`` sizes of the ``wilson_loop_RxT`` observables.
    """

    name = "u1"
    field_name = "links"

    def __init__(
        self,
        params: U1Params,
        lattice: Lattice,
        wilson_loops: tuple[tuple[int, int], ...] = DEFAULT_WILSON_LOOPS,
    ) -> None:
        if lattice.dim < 2:
            raise ValueError(f"U(1) gauge theory needs d >= 2, got lattice shape {list(lattice.shape)}")
        self.params = params
        self.beta = float(params.beta)
        self.lattice = lattice
        self.field_shape = (lattice.dim, *lattice.shape)
        self.wilson_loop_sizes = tuple((int(r), int(t)) for r, t in wilson_loops)

    def couplings(self) -> dict[str, float]:
        return {"beta": self.beta}

    def action(self, theta: torch.Tensor) -> torch.Tensor:
        """``S[B] = -beta sum_p cos(theta_p)`` for links ``[B, d, L0, ..., L{d-1}]``."""
        return -self.beta * torch.cos(u1_plaquette_angles(theta)).flatten(1).sum(dim=1)

    def force(self, theta: torch.Tensor) -> torch.Tensor:
        """Analytic ``dS/dtheta`` ``[B, d, L0, ..., L{d-1}]``.

        With ``s_{mu nu}(x) = sin(theta_{mu nu}(x))`` (``mu < nu``), each plane contributes
        ``beta (s_{mu nu}(x) - s_{mu nu}(x - nu))`` to direction ``mu`` and
        ``beta (s_{mu nu}(x - mu) - s_{mu nu}(x))`` to direction ``nu``; this equals
        ``beta Im(U_mu(x) A_mu(x))`` with the staples ``A`` of :func:`latflow.gauge.u1_staples`.

        On CPU without autograd the fused compiled kernel (:func:`latflow.gauge_kernels.u1_wilson_force`)
        computes it (links read once, no torch temporaries); :meth:`force_reference` (torch) otherwise.
        """
        fused = u1_wilson_force(theta, self.beta)
        return fused if fused is not None else self.force_reference(theta)

    def force_reference(self, theta: torch.Tensor) -> torch.Tensor:
        """The torch ``dS/dtheta`` ``[B, d, L0, ..., L{d-1}]`` (any device); see :meth:`force`."""
        d = self.lattice.dim
        if d == 2:
            return self._force_2d(theta)
        s = torch.sin(u1_plaquette_angles(theta))
        out = [torch.zeros_like(theta[:, 0]) for _ in range(d)]
        for k, (mu, nu) in enumerate(planes(d)):
            s_p = s[:, k]
            out[mu] = out[mu] + s_p - shift(s_p, nu, -1)
            out[nu] = out[nu] + shift(s_p, mu, -1) - s_p
        return self.beta * torch.stack(out, dim=1)

    def _force_2d(self, theta: torch.Tensor) -> torch.Tensor:
        """The same force for ``d = 2`` in a few fused, in-place steps (the HMC hot loop)."""
        t0, t1 = theta[:, 0], theta[:, 1]
        p = t0 - t1
        p += t1.roll(-1, 1)
        p -= t0.roll(-1, 2)
        s = p.sin_().mul_(self.beta)
        out = torch.empty_like(theta)
        torch.sub(s, s.roll(1, 2), out=out[:, 0])
        torch.sub(s.roll(1, 1), s, out=out[:, 1])
        return out

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Wrap link angles into ``(-pi, pi]`` (HMC's ``project`` hook; leaves ``S`` unchanged)."""
        return wrap_angle(theta)

    def wilson_loop(self, theta: torch.Tensor, R: int, T: int) -> torch.Tensor:
        """``Re W`` of ``R x T`` loops averaged over sites, planes and both orientations, ``[B]``."""
        d = self.lattice.dim
        shapes = [(R, T)] if R == T else [(R, T), (T, R)]
        terms = [
            torch.cos(u1_wilson_loops(theta, mu, nu, r, t)).flatten(1).mean(dim=1)
            for mu, nu in planes(d)
            for r, t in shapes
        ]
        return torch.stack(terms, dim=1).mean(dim=1)

    def observables(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each ``[B]`` (see module docstring)."""
        plaq = u1_plaquette_angles(theta)
        cos_p = torch.cos(plaq)
        obs = {
            "action": -self.beta * cos_p.flatten(1).sum(dim=1),
            "plaquette": cos_p.flatten(1).mean(dim=1),
        }
        for r, t in self.wilson_loop_sizes:
            obs[f"wilson_loop_{r}x{t}"] = self.wilson_loop(theta, r, t)
        poly = u1_polyakov_loop(theta).flatten(1).mean(dim=1)
        obs["polyakov_loop"] = poly.real
        obs["polyakov_loop_abs"] = poly.abs()
        if self.lattice.dim == 2:
            q = wrap_angle(plaq[:, 0]).flatten(1).sum(dim=1) / (2 * math.pi)
            obs["topological_charge"] = q
            obs["topological_charge_sq"] = q * q
        return obs

    def observable_descriptions(self) -> dict[str, str]:
        """What each observable of :meth:`observables` is (lattice units, angles in radians)."""
        out = {
            "action": "S = -beta sum_p cos(theta_p), the Wilson gauge action summed over all plaquettes",
            "plaquette": "(1 / (n_planes V)) sum_p cos(theta_p), in [-1, 1]",
        }
        for r, t in self.wilson_loop_sizes:
            out[f"wilson_loop_{r}x{t}"] = (
                f"Re of the {r}x{t} Wilson loop, averaged over sites, planes and both orientations"
            )
        out["polyakov_loop"] = "Re of the spatial average of the Polyakov loop along axis 0 (time)"
        out["polyakov_loop_abs"] = "|spatial average of the Polyakov loop along axis 0|"
        if self.lattice.dim == 2:
            out["topological_charge"] = "geometric Q = (1/2pi) sum_x arg P_01(x), arg in (-pi, pi]; an integer"
            out["topological_charge_sq"] = "Q^2 (its mean / V is the topological susceptibility)"
        return out

    def derived_observables(self) -> dict[str, Derived]:
        if self.lattice.dim != 2:
            return {}
        v = self.lattice.volume
        return {
            "topological_susceptibility": Derived(("topological_charge_sq",), lambda q2: q2 / v, "<Q^2> / V (per site)")
        }

    def exact_means(self) -> dict[str, float]:
        """Means fixed by symmetry: ``<Re P> = 0`` (center symmetry: the links of one time slice times
        ``e^{i alpha}`` leave the action invariant and rotate ``P``) and, in 2D, ``<Q> = 0`` (``theta -> -theta``)."""
        means = {"polyakov_loop": 0.0}
        if self.lattice.dim == 2:
            means["topological_charge"] = 0.0
        return means

    def exact_log_z(self) -> float | None:
        """Exact ``log Z`` under the Haar probability measure (:func:`exact_log_z`); ``None`` for ``d != 2``
        (except ``beta = 0``: 0 in any ``d``).

        Against the Lebesgue measure on link angles add :meth:`field_log_volume`.
        """
        if self.beta == 0:
            return 0.0
        if self.lattice.dim != 2:
            return None
        return exact_log_z(self.beta, self.lattice.shape)

    def field_log_volume(self) -> float:
        """``n_links log(2 pi)``: log Lebesgue volume of the link-angle space ``(-pi, pi]^{n_links}``, any ``d``."""
        return self.lattice.dim * self.lattice.volume * math.log(2 * math.pi)

    def sample_exact(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """``n`` independent exact draws ``[n, d, L...]`` (float64 angles in ``(-pi, pi]``), or None where no
        exact sampler exists: any ``beta`` in 2D (:func:`sample_exact_2d`), uniform links at ``beta = 0`` in any ``d``.
        The starts of annealing along the coupling."""
        if self.lattice.dim == 2:
            return sample_exact_2d(self.beta, self.lattice.shape, n, generator)
        if self.beta == 0:
            u = torch.rand((n, *self.field_shape), generator=generator, dtype=torch.float64)
            return wrap_angle(2 * math.pi * u - math.pi)
        return None

    def exact_charge_distribution(self, q_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(Q [K], P(Q) [K])`` of the geometric charge (:func:`exact_q_distribution`); 2D only."""
        if self.lattice.dim != 2:
            raise ValueError(f"the geometric charge is defined in 2D, lattice shape {list(self.lattice.shape)}")
        return exact_q_distribution(self.beta, self.lattice.shape, q_max)


# --- exact results on the 2D torus -------------------------------------------
#
# With r_n = I_n(beta) / I_0(beta) (from the exponentially scaled scipy.special.ive, so
# no overflow), Z / I_0^P = sum_n r_n^P and every expectation is a ratio of sums of
# products of r's (no division by a small I_n). The sum runs over |n| <= n_max with
# n_max the smallest n >= 1 such that r_n < 1e-20 (r_n decays like (beta/2)^n / n! for
# n >> beta): every neglected term carries at least P - 1 >= 1 factors r_m <= r_{n_max}
# and Z / I_0^P >= 1, so the truncation error is far below 1e-16 relative.

_TAIL_TOL = 1e-20


def _plaquette_count(shape: tuple[int, ...]) -> int:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or any(n < 1 for n in shape):
        raise ValueError(f"exact U(1) results are for the 2D torus (L0, L1), got shape {list(shape)}")
    return shape[0] * shape[1]


def _n_cutoff(beta: float, tol: float = _TAIL_TOL) -> int:
    """Smallest ``n >= 1`` with ``I_n(beta) / I_0(beta) < tol``."""
    if beta < 0:
        raise ValueError(f"exact results are implemented for beta >= 0, got {beta}")
    upper = 64
    while True:
        n = np.arange(1, upper + 1)
        r = ive(n, beta) / ive(0, beta)
        hit = np.flatnonzero(r < tol)
        if hit.size:
            return int(n[hit[0]])
        upper *= 2
        if upper > 1 << 20:
            raise ValueError(f"no Bessel cutoff found for beta = {beta}")


def _bessel_ratios(beta: float, n: np.ndarray) -> np.ndarray:
    """``I_n(beta) / I_0(beta)`` for integer array ``n`` (``I_{-n} = I_n``)."""
    return ive(np.abs(n), beta) / ive(0, beta)


def _sectors(beta: float, n_max: int | None) -> np.ndarray:
    n_max = _n_cutoff(beta) if n_max is None else int(n_max)
    return np.arange(-n_max, n_max + 1)


def exact_plaquette_infinite(beta: float) -> float:
    """Infinite-volume ``<cos theta_p> = I_1(beta) / I_0(beta)`` in 2D."""
    return float(ive(1, beta) / ive(0, beta))


def exact_wilson_loop(beta: float, shape: tuple[int, int], area: int, n_max: int | None = None) -> float:
    """Exact ``<Re W>`` of a loop enclosing ``area`` plaquettes on the ``L0 x L1`` torus.

    ``<Re W> = sum_n I_n^{P-A} (I_{n+1}^A + I_{n-1}^A) / 2 / sum_n I_n^P`` (``A = area``, ``P = L0 L1``),
    valid for any loop equal to the product of ``A < P`` plaquettes (e.g. an ``R x T`` rectangle,
    ``A = R T``). ``area = 1`` is the plaquette.

    Parameters
    ----------
    beta
        Coupling, ``>= 0``.
    shape
        ``(L0, L1)``.
    area
        ``0 <= A < P``.
    n_max
        Sectors ``|n| <= n_max``; automatic (see the module notes) when ``None``.
    """
    p = _plaquette_count(shape)
    if not 0 <= area < p:
        raise ValueError(f"loop area must be in [0, {p}), got {area}")
    n = _sectors(beta, n_max)
    r = _bessel_ratios(beta, n)
    rp, rm = _bessel_ratios(beta, n + 1), _bessel_ratios(beta, n - 1)
    num = np.sum(r ** (p - area) * 0.5 * (rp**area + rm**area))
    return float(num / np.sum(r**p))


def exact_plaquette(beta: float, shape: tuple[int, int], n_max: int | None = None) -> float:
    """Exact ``<cos theta_p>`` on the ``L0 x L1`` torus.

    ``sum_n w_n (I_{n-1} + I_{n+1}) / (2 I_n)`` with ``w_n = I_n^P / sum_m I_m^P``, ``P = L0 L1``,
    evaluated as ``sum_n I_n^{P-1} (I_{n-1} + I_{n+1}) / 2 / sum_n I_n^P``.
    """
    return exact_wilson_loop(beta, shape, 1, n_max)


def _gauss_nodes(n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on ``[0, pi]``; enough for ``cos(n t)``, ``|n| <= n_max + 1``."""
    m = max(256, 4 * (n_max + 1) + 64)
    x, w = np.polynomial.legendre.leggauss(m)
    return 0.5 * math.pi * (x + 1), 0.5 * math.pi * w


def _j_integrals(beta: float, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``J_k(n) e^{-beta}`` for ``k = 0, 1, 2`` (REFERENCES.md), each shaped like ``n``.

    ``J_k(n) = (1/2pi) int_{-pi}^{pi} t^k e^{beta cos t} {cos(n t), k even; sin(n t), k odd} dt``;
    each integrand is even in ``t``, so ``J_k = (1/pi) int_0^pi``, done by Gauss-Legendre
    quadrature. The integrands are entire functions, so the rule converges exponentially;
    with at least ``4 |n| + 64`` (and 256) nodes it is exact to rounding (tests compare with
    ``scipy.integrate.quad`` and with ``J_0(n) = I_n(beta)``).
    """
    t, w = _gauss_nodes(int(np.max(np.abs(n))))
    base = w * np.exp(beta * (np.cos(t) - 1.0)) / math.pi  # [m]
    nt = np.outer(n, t)  # [len(n), m]
    cos_nt, sin_nt = np.cos(nt), np.sin(nt)
    j0 = cos_nt @ base
    j1 = sin_nt @ (base * t)
    j2 = cos_nt @ (base * t * t)
    return j0, j1, j2


def exact_q2(beta: float, shape: tuple[int, int], n_max: int | None = None) -> float:
    """Exact ``<Q^2>`` of the geometric charge on the ``L0 x L1`` torus.

    ``<Q^2> = (1/4pi^2) sum_n w_n [ P J_2(n)/J_0(n) - P (P-1) (J_1(n)/J_0(n))^2 ]`` with
    ``J_0(n) = I_n(beta)``, evaluated as
    ``(1/4pi^2) sum_n [ P I_n^{P-1} J_2(n) - P (P-1) I_n^{P-2} J_1(n)^2 ] / sum_n I_n^P``.
    """
    p = _plaquette_count(shape)
    n = _sectors(beta, n_max)
    r = _bessel_ratios(beta, n)
    i0 = ive(0, beta)
    _, j1, j2 = _j_integrals(beta, n)
    j1, j2 = j1 / i0, j2 / i0
    num = p * r ** (p - 1) * j2
    if p > 1:
        num = num - p * (p - 1) * r ** (p - 2) * j1 * j1
    return float(np.sum(num) / np.sum(r**p) / (4 * math.pi**2))


def exact_topological_susceptibility(beta: float, shape: tuple[int, int], n_max: int | None = None) -> float:
    """Exact ``<Q^2> / V`` on the ``L0 x L1`` torus."""
    return exact_q2(beta, shape, n_max) / _plaquette_count(shape)


def exact_topological_susceptibility_infinite(beta: float) -> float:
    """Infinite-volume ``chi_t = <Q^2>/V = <t^2>_{von Mises(beta)} / 4pi^2 = J_2(0) / (4pi^2 J_0(0))``."""
    if beta < 0:
        raise ValueError(f"exact results are implemented for beta >= 0, got {beta}")
    j0, _, j2 = _j_integrals(beta, np.array([0]))
    return float(j2[0] / j0[0] / (4 * math.pi**2))


# --- exact (independent) samples on the 2D torus -------------------------------
#
# On the L0 x L1 torus the Haar measure on links factorises into the V = L0 L1 plaquette angles,
# constrained only by sum_x theta_p(x) = 0 mod 2pi, two holonomies (Wilson lines winding around the
# two cycles) and V - 1 gauge angles; the Wilson action depends on the plaquettes alone. So the
# plaquette angles are independent von Mises(beta) variables conditioned on the constraint, the
# holonomies are uniform and independent of them, and the gauge angles are uniform. This gives
# independent exact samples of the theory, for any beta, without a Markov chain: a reference tool
# for tests (a chain started from it is in equilibrium from its first step, whatever its
# autocorrelation time) and for checks of other samplers.


def sample_plaquettes_2d(beta: float, shape: tuple[int, int], n: int, generator: torch.Generator) -> torch.Tensor:
    """Exact independent draws of the plaquette angles of the 2D U(1) Wilson theory.

    ``V = L0 L1`` angles ``theta_p`` in ``(-pi, pi]`` with density
    ``prod_p exp(beta cos theta_p)`` restricted to ``sum_p theta_p = 0 mod 2pi``. Rejection sampling:
    ``V - 1`` angles are drawn from von Mises(beta), the last is fixed by the constraint (wrapped into
    ``(-pi, pi]``) and the draw is accepted with probability ``exp(beta (cos theta_V - 1))``. The
    acceptance rate is ``>= e^{-2 beta}`` and about ``I_0(beta) e^{-beta}`` on large lattices.

    Parameters
    ----------
    beta
        Coupling, ``>= 0``.
    shape
        ``(L0, L1)``.
    n
        Number of configurations.
    generator
        Random stream (torch; a numpy generator is seeded from it).

    Returns
    -------
    torch.Tensor
        ``[n, L0, L1]`` float64; ``sum`` over a configuration is ``2 pi Q`` with ``Q`` the geometric
        topological charge (an integer).
    """
    p = _plaquette_count(shape)
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"exact sampling is implemented for finite beta >= 0, got {beta}")
    if n < 0:
        raise ValueError(f"number of configurations must be >= 0, got {n}")
    rng = numpy_generator(generator)
    rate = max(float(ive(0, beta)), math.exp(-2 * beta))  # expected acceptance, >= its lower bound
    out: list[np.ndarray] = []
    have = 0
    while have < n:
        m = int(min(1 << 20, max(16, 1.2 * (n - have) / rate)))
        free = rng.vonmises(0.0, beta, size=(m, p - 1)) if p > 1 else np.zeros((m, 0))
        # the last angle closes the constraint, wrapped into (-pi, pi]
        last = -free.sum(axis=1)
        last = last - 2 * math.pi * np.ceil((last - math.pi) / (2 * math.pi))
        keep = rng.random(m) < np.exp(beta * (np.cos(last) - 1.0))
        angles = np.concatenate([free, last[:, None]], axis=1)[keep]
        # wrap the von Mises draws into (-pi, pi] as well (numpy returns [-pi, pi])
        angles = np.where(angles <= -math.pi, angles + 2 * math.pi, angles)
        out.append(angles)
        have += angles.shape[0]
    angles = np.concatenate(out, axis=0)[:n] if out else np.zeros((0, p))
    return torch.from_numpy(np.ascontiguousarray(angles)).reshape(n, *(int(L) for L in shape))


def sample_exact_2d(beta: float, shape: tuple[int, int], n: int, generator: torch.Generator) -> torch.Tensor:
    """Independent exact samples of the 2D U(1) Wilson theory on the ``L0 x L1`` torus.

    Plaquette angles from :func:`sample_plaquettes_2d`, links from :func:`u1_links_with_plaquettes`.
    Every configuration is an independent draw from ``exp(-S) / Z`` (with the Haar measure), in
    every topological sector with its exact weight.

    Parameters
    ----------
    beta
        Coupling, ``>= 0``.
    shape
        ``(L0, L1)``.
    n
        Number of configurations.
    generator
        Random stream.

    Returns
    -------
    torch.Tensor
        Links ``theta`` ``[n, 2, L0, L1]``, float64, in ``(-pi, pi]``.
    """
    return u1_links_with_plaquettes(sample_plaquettes_2d(beta, shape, n, generator), generator)


def build(params: U1Params, lattice: Lattice) -> U1GaugeAction:
    return U1GaugeAction(params, lattice)


SPEC = TheorySpec(
    name="u1",
    params=U1Params,
    build=build,
    description="pure U(1) gauge theory, Wilson action, d >= 2 (exact results on the 2D torus)",
    field_name="links",
)


# --- exact log Z and charge distribution on the 2D torus ------------------------
#
# log Z (Haar probability measure on every link) = V log I_0(beta) + log sum_n r_n^V, r_n = I_n / I_0,
# with log I_0(beta) = log ive(0, beta) + beta: nothing overflows at any beta or volume.
#
# The charge distribution. The V plaquette angles, wrapped into (-pi, pi], are i.i.d. von Mises(beta)
# conditioned on S = sum_x theta_p(x) = 0 mod 2pi, and on each hyperplane S = 2 pi Q the induced measure
# is the same, so P(Q) = 2 pi p_S(2 pi Q) / sum_n r_n^V with p_S the density of S for unconstrained
# i.i.d. angles (Poisson summation gives sum_Q 2 pi p_S(2 pi Q) = sum_n r_n^V). With the characteristic
# function phi(k) = <cos(k t)>_{von Mises(beta)} of real k (phi(n) = r_n at integers),
# p_S(s) = (1/pi) int_0^inf phi(k)^V cos(k s) dk. S is supported on [-V pi, V pi], so the trapezoid rule
# with step 1/V in k is exact (Poisson summation again: its aliases sit at s + 2 pi V j, outside the
# support for |Q| < V/2), which gives
#     P(Q) = (1/V) sum_{m in Z} phi(m/V)^V cos(2 pi m Q / V) / sum_n r_n^V.
# The only error is the cut |m| <= M. Integrating phi by parts twice bounds |phi(k)| <= A(k)/k with
# A(k) = min(1, e^{-2 beta} + 2 beta h_max / k) / (pi ive(0, beta)), h_max = max_t e^{beta (cos t - 1)} sin t,
# so the neglected terms add up to at most V k_c (A(k_c)/k_c)^V / (V - 1), k_c = M/V; M is chosen to make
# the error of every P(Q) below 1e-17. phi(k) itself is a Gauss-Legendre integral of an entire function
# (the rule of _gauss_nodes, exact to rounding for |k| <= k_c).

_Q_DIST_TOL = 1e-17  # absolute truncation error of each P(Q)
_Q_DIST_MAX_WORK = 2e8  # (number of k) x (quadrature nodes): above this the volume is too small for the method


def exact_log_z(beta: float, shape: tuple[int, int], n_max: int | None = None) -> float:
    """Exact ``log Z`` of the 2D U(1) Wilson theory on the ``L0 x L1`` torus, Haar probability measure.

    ``Z = int prod_links dU exp(beta sum_p cos theta_p) = sum_n I_n(beta)^V`` (``V = L0 L1``, ``dU`` of
    total mass 1), evaluated as ``V log I_0(beta) + log sum_n (I_n / I_0)^V``. The partition function
    over link angles with the Lebesgue measure ``d theta`` is ``log Z + n_links log(2 pi)``.

    Parameters
    ----------
    beta
        Coupling, ``>= 0``.
    shape
        ``(L0, L1)``.
    n_max
        Sectors ``|n| <= n_max``; automatic (see the notes above :func:`exact_plaquette`) when ``None``.
    """
    p = _plaquette_count(shape)
    r = _bessel_ratios(beta, _sectors(beta, n_max))
    log_i0 = math.log(ive(0, beta)) + beta
    return float(p * log_i0 + math.log(np.sum(r**p)))


def von_mises_characteristic(beta: float, k: np.ndarray) -> np.ndarray:
    """Characteristic function ``phi(k) = <cos(k t)>`` of von Mises(beta) on ``(-pi, pi]``, real ``k``.

    ``phi(k) = (1/(pi I_0(beta))) int_0^pi e^{beta cos t} cos(k t) dt`` by Gauss-Legendre quadrature (the
    rule of :func:`_gauss_nodes` for ``|k| <= max |k|``); ``phi(n) = I_n(beta) / I_0(beta)`` at integers.

    Parameters
    ----------
    beta
        Concentration, ``>= 0``.
    k
        Wave numbers, any shape ``[...]``.

    Returns
    -------
    np.ndarray
        ``phi(k)``, shaped like ``k``.
    """
    k = np.asarray(k, dtype=np.float64)
    if k.size == 0:
        return np.zeros_like(k)
    t, w = _gauss_nodes(math.ceil(float(np.max(np.abs(k)))))
    base = w * np.exp(beta * (np.cos(t) - 1.0)) / (math.pi * ive(0, beta))  # [m]
    flat = k.reshape(-1)
    out = np.empty_like(flat)
    chunk = max(1, (1 << 22) // t.size)
    for i in range(0, flat.size, chunk):
        out[i : i + chunk] = np.cos(np.outer(flat[i : i + chunk], t)) @ base
    return out.reshape(k.shape)


def _characteristic_cutoff(beta: float, p: int, tol: float) -> float:
    """Smallest ``k_c`` (on a 1.02 geometric grid) with ``sum_{|m| > k_c p} |phi(m/p)|^p <= tol`` (bound above)."""
    if beta == 0:
        h_max = 1.0
    else:
        c = (math.sqrt(1.0 + 4.0 * beta * beta) - 1.0) / (2.0 * beta)  # cos t at the maximum of h
        h_max = math.exp(beta * (c - 1.0)) * math.sqrt(1.0 - c * c)
    scale = 1.0 / (math.pi * ive(0, beta))
    log_tol = math.log(tol)
    k = 0.25
    while True:
        a = scale * min(1.0, math.exp(-2.0 * beta) + 2.0 * beta * h_max / k)
        if a < k and math.log(p * k / (p - 1)) + p * math.log(a / k) <= log_tol:
            return k
        k *= 1.02


def exact_q_distribution(
    beta: float, shape: tuple[int, int], q_max: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact distribution ``P(Q)`` of the geometric topological charge on the ``L0 x L1`` torus.

    ``P(Q) = (1/V) sum_m phi(m/V)^V cos(2 pi m Q / V) / sum_n (I_n / I_0)^V`` (``V = L0 L1``,
    ``phi`` = :func:`von_mises_characteristic`; derivation and error bound in the notes above): exact up to
    an absolute error below ``1e-17`` per ``Q`` plus rounding (``~1e-16``, up to ``1e-15`` on tiny lattices);
    negative rounding residues in the far tail are set to 0, and ``P(+-V/2) = 0`` exactly for even ``V``.
    ``sum_Q P(Q) = 1`` and ``sum_Q Q^2 P(Q) =`` :func:`exact_q2`.

    Parameters
    ----------
    beta
        Coupling, ``>= 0``.
    shape
        ``(L0, L1)``; ``V = 1, 2`` give ``P(0) = 1``, and volumes so small that the series converges too
        slowly (``V = 3``; ``V = 4`` at small ``beta``) raise ``ValueError``.
    q_max
        Return ``|Q| <= q_max`` (clipped to ``V // 2``, since ``|Q| <= V/2``). ``None``: extend until
        ``P(Q) < 1e-16`` (the mass left out is of that order: ``P`` falls off faster than geometrically).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``Q`` values ``[K]`` (int64, ``-q_max .. q_max``) and probabilities ``[K]`` (float64).
    """
    p = _plaquette_count(shape)
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"the charge distribution is implemented for finite beta >= 0, got {beta}")
    q_cap = p // 2
    q_lim = q_cap if q_max is None else min(int(q_max), q_cap)
    if q_lim < 0:
        raise ValueError(f"q_max must be >= 0, got {q_max}")
    if p <= 2:  # |Q| <= V/2 and Q = +-1 at V = 2 needs both plaquettes at pi: a null set
        q = np.arange(-q_lim, q_lim + 1, dtype=np.int64)
        return q, (q == 0).astype(np.float64)
    k_c = _characteristic_cutoff(beta, p, _Q_DIST_TOL * p / 2)
    n_k = math.ceil(k_c * p)
    if n_k * (4 * (k_c + 1) + 68) > _Q_DIST_MAX_WORK:
        raise ValueError(
            f"volume {p} at beta = {beta} is too small for the characteristic-function series "
            f"(it would need {n_k} terms); use a larger lattice"
        )
    m = np.arange(n_k + 1)
    terms = von_mises_characteristic(beta, m / p) ** p  # [M + 1]
    terms[1:] *= 2.0  # m and -m
    norm = p * float(np.sum(_bessel_ratios(beta, _sectors(beta, None)) ** p))

    def prob(q: np.ndarray) -> np.ndarray:
        # cos(2 pi m Q / V) with the phase reduced mod V exactly in integers
        phase = np.outer(q, m) % p
        return np.cos(2 * math.pi * phase / p) @ terms / norm

    if q_max is not None:
        q = np.arange(0, q_lim + 1, dtype=np.int64)
        half = prob(q)
    else:
        blocks: list[np.ndarray] = []
        start = 0
        while start <= q_cap:
            q_block = np.arange(start, min(start + 16, q_cap + 1), dtype=np.int64)
            blocks.append(prob(q_block))
            start += 16
            if blocks[-1][-1] < 1e-16:
                break
        half = np.concatenate(blocks)
        last = int(np.flatnonzero(half >= 1e-16)[-1]) + 1 if np.any(half >= 1e-16) else 1
        half = half[: min(last + 1, half.size)]
    half = np.clip(half, 0.0, None)
    if p % 2 == 0 and half.size == q_cap + 1:
        half[-1] = 0.0  # Q = V/2 needs every plaquette at pi: a single point of the hyperplane S = V pi
    n_half = half.size - 1
    q = np.arange(-n_half, n_half + 1, dtype=np.int64)
    return q, np.concatenate([half[:0:-1], half])
