"""Pure SU(N) lattice gauge theory with the Wilson action, in d >= 2 dimensions (N = 2, 3, ...).

``S = -(beta/N) sum_p Re tr P_p`` over all plaquettes ``p`` (every site, every plane ``mu < nu``); links
are complex ``[B, d, L0, ..., L{d-1}, N, N]`` (see :mod:`latflow.sun`).

Observables per configuration (``V`` sites, ``n_planes = d (d-1)/2``), each ``[B]``, real:

- ``action``               ``S``
- ``plaquette``            ``(1 / (n_planes V)) sum_p Re tr P_p / N``
- ``wilson_loop_RxT``      ``Re tr W / N`` of the ``R x T`` Wilson loop, averaged over sites, planes and
                           (for ``R != T``) both orientations; ``1x1`` (the plaquette), ``1x2``, ``2x2``
- ``polyakov_loop``        ``Re`` of the spatial average of ``tr L / N``, ``L`` the Polyakov loop along axis 0
- ``polyakov_loop_abs``    ``|.|`` of that spatial average
- ``topological_charge``   (d = 4 only) clover ``Q = sum_x q(x)``,
                           ``q(x) = (1/32 pi^2) eps_{mu nu rho sigma} tr(F_{mu nu}(x) F_{rho sigma}(x))``
- ``topological_charge_sq`` (d = 4 only) ``Q^2``

The clover field strength: ``C_{mu nu}(x)`` is the sum of the four plaquettes in the plane ``(mu, nu)``
that start and end at ``x`` (all with the orientation ``mu`` then ``nu``), and
``F_{mu nu} = [(C - C^dagger) - tr(C - C^dagger)/N] / (8 i)`` (Hermitian,
traceless; no factor of the coupling: the normalisation in which ``Q`` is an integer in the continuum).
With ``eps`` summed, ``q(x) = (1/4 pi^2) [tr(F_01 F_23) - tr(F_02 F_13) + tr(F_03 F_12)]``.

Exact results on the 2D torus, from the character expansion (docs/REFERENCES.md, "2D SU(N)"):
with ``f(U) = e^{(beta/N) Re tr U} = sum_r c_r chi_r(U)`` and ``b_r = c_r / d_r``
(``c_r = int dU chi_r(U)^* f(U)``, Haar probability measure), gluing the ``P = L0 L1`` plaquettes of
the torus (genus 1) gives ``Z = sum_r d_r^{2 - 2g} b_r^P = sum_r b_r^P``. For SU(N) irreps labelled by
partitions ``lambda_1 >= ... >= lambda_{N-1} >= lambda_N = 0``,
``c_lambda = sum_{q in Z} det_{ij} I_{lambda_i + j - i + q}(beta/N)`` (Gross-Witten / Bars: the U(N)
coefficient ``det I_{lambda_i + j - i}``, summed over the ``det U = 1`` shifts ``lambda -> lambda + q``).
Then ``<Re tr P / N> = (1/P) d log Z / d beta = sum_r b_r^{P-1} b_r' / sum_r b_r^P`` and in infinite
volume ``b_0' / b_0``. See :func:`single_plaquette_coefficients`, :func:`exact_plaquette`,
:func:`exact_plaquette_infinite`, :func:`exact_log_z`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ive

from latflow.gauge import planes
from latflow.gauge_kernels import sun_wilson_force
from latflow.lattice import Lattice, shift
from latflow.manifolds import SUN
from latflow.sun import dagger, haar_sun, polyakov_loop, sun_plaquettes, sun_staples, traceless_antihermitian

from .base import Derived, TheorySpec

DEFAULT_WILSON_LOOPS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 2))


@dataclass(frozen=True)
class SUNParams:
    """Couplings of the SU(N) Wilson action: inverse coupling ``beta = 2 N / g^2`` and the number of colours ``n``."""

    beta: float
    n: int = 3

    def __post_init__(self) -> None:
        if not math.isfinite(self.beta):
            raise ValueError(f"beta must be finite, got {self.beta}")
        if isinstance(self.n, bool) or int(self.n) != self.n or self.n < 2:
            raise ValueError(f"SU(N) needs an integer N >= 2, got n = {self.n}")
        object.__setattr__(self, "n", int(self.n))


def _re_tr(m: torch.Tensor) -> torch.Tensor:
    """``Re tr m``, ``[..., N, N] -> [...]``."""
    return torch.diagonal(m, dim1=-2, dim2=-1).real.sum(-1)


def _line(u_mu: torch.Tensor, mu: int, length: int) -> torch.Tensor:
    """Straight Wilson line ``U_mu(x) U_mu(x+mu) ... U_mu(x+(length-1) mu)``, ``[B, L..., N, N]``."""
    out = u_mu
    for k in range(1, length):
        out = out @ shift(u_mu, mu, k)
    return out


def sun_wilson_loops(u: torch.Tensor, mu: int, nu: int, r: int, t: int) -> torch.Tensor:
    """``R x T`` Wilson loop matrices in the plane ``(mu, nu)`` at every site.

    ``W(x) = L_mu(x, R) L_nu(x + R mu, T) L_mu(x + T nu, R)^dagger L_nu(x, T)^dagger`` with ``L_mu(x, R)``
    the straight line of ``R`` links from ``x`` in direction ``mu``; ``R = T = 1`` is the plaquette.

    Parameters
    ----------
    u
        Links ``[B, d, L0, ..., L{d-1}, N, N]``.
    mu, nu
        The plane, ``mu != nu``.
    r, t
        Extents ``R >= 1`` along ``mu`` and ``T >= 1`` along ``nu``.

    Returns
    -------
    torch.Tensor
        ``[B, L0, ..., L{d-1}, N, N]``.
    """
    if r < 1 or t < 1:
        raise ValueError(f"Wilson loop extents must be >= 1, got {r} x {t}")
    line_mu = _line(u[:, mu], mu, r)
    line_nu = _line(u[:, nu], nu, t)
    return line_mu @ shift(line_nu, mu, r) @ dagger(shift(line_mu, nu, t)) @ dagger(line_nu)


def clover_field_strength(u: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """Clover ``F_{mu nu}(x)``, Hermitian and traceless, ``[B, L0, ..., L{d-1}, N, N]`` (module docstring)."""
    u_mu, u_nu = u[:, mu], u[:, nu]
    u_mu_m = shift(u_mu, mu, -1)  # U_mu(x - mu)
    u_nu_m = shift(u_nu, nu, -1)  # U_nu(x - nu)
    leaves = (
        u_mu @ shift(u_nu, mu) @ dagger(shift(u_mu, nu)) @ dagger(u_nu)
        + u_nu @ dagger(shift(u_mu_m, nu)) @ dagger(shift(u_nu, mu, -1)) @ u_mu_m
        + dagger(u_mu_m) @ dagger(shift(u_nu_m, mu, -1)) @ shift(u_mu_m, nu, -1) @ u_nu_m
        + dagger(u_nu_m) @ shift(u_mu, nu, -1) @ shift(u_nu_m, mu) @ dagger(u_mu)
    )
    a = leaves - dagger(leaves)
    n = u.shape[-1]
    tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)
    a = a - (tr / n)[..., None, None] * torch.eye(n, dtype=u.dtype, device=u.device)
    return a / 8j


def topological_charge_density(u: torch.Tensor) -> torch.Tensor:
    """Clover charge density ``q(x)`` of 4D links ``[B, 4, L0, ..., L3, N, N]``, real ``[B, L0, ..., L3]``.

    ``q = (1/32 pi^2) eps_{mu nu rho sigma} tr(F_{mu nu} F_{rho sigma})
    = (1/4 pi^2) [tr(F_01 F_23) - tr(F_02 F_13) + tr(F_03 F_12)]`` with :func:`clover_field_strength`.
    """
    if u.dim() != 8 or u.shape[1] != 4:
        raise ValueError(f"the clover charge is defined in 4D, links [B, 4, L0..L3, N, N]; got {list(u.shape)}")
    f = {(m, v): clover_field_strength(u, m, v) for m, v in planes(4)}

    def tr_prod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ij,...ji->...", a, b).real

    q = tr_prod(f[0, 1], f[2, 3]) - tr_prod(f[0, 2], f[1, 3]) + tr_prod(f[0, 3], f[1, 2])
    return q / (4 * math.pi**2)


class SUNGaugeAction:
    """SU(N) Wilson gauge theory on a periodic lattice, links ``[B, d, L0, ..., L{d-1}, N, N]``.

    Parameters
    ----------
    params
        ``beta`` and ``N``.
    lattice
        Geometry with ``d >= 2``.
    wilson_loops
        ``(R, T)`` sizes of the ``wilson_loop_RxT`` observables.
    """

    name = "su3"
    field_name = "links"

    def __init__(
        self,
        params: SUNParams,
        lattice: Lattice,
        wilson_loops: tuple[tuple[int, int], ...] = DEFAULT_WILSON_LOOPS,
    ) -> None:
        if lattice.dim < 2:
            raise ValueError(f"SU(N) gauge theory needs d >= 2, got lattice shape {list(lattice.shape)}")
        self.params = params
        self.beta = float(params.beta)
        self.n = int(params.n)
        self.lattice = lattice
        self.field_shape = (lattice.dim, *lattice.shape, self.n, self.n)
        self.wilson_loop_sizes = tuple((int(r), int(t)) for r, t in wilson_loops)
        self.manifold = SUN(self.n)  # HMC: su(N) momenta, U -> exp(eps P) U, projection onto SU(N)

    def initial_field(
        self,
        n_chains: int,
        generator: torch.Generator,
        start: str = "default",
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Links ``[n_chains, d, L0, ..., L{d-1}, N, N]`` to start Markov chains from.

        Parameters
        ----------
        n_chains
            Batch size ``B``.
        generator
            Random stream (on ``device``); a cold start draws nothing from it.
        start
            ``"cold"`` (every link the unit matrix; also ``"default"``) or ``"hot"`` (independent Haar links).
        dtype
            Real precision of the run: ``float64`` gives ``complex128`` links, ``float32`` ``complex64``.
        device
            Where the links live.
        """
        cdtype = {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype, dtype)
        if not cdtype.is_complex:
            raise ValueError(f"SU(N) links need a float32/float64 precision, got {dtype}")
        shape = (int(n_chains), *self.field_shape[:-2])
        if start in ("cold", "default"):
            eye = torch.eye(self.n, dtype=cdtype, device=device)
            return eye.expand(*shape, self.n, self.n).clone()
        if start == "hot":
            return haar_sun(shape, self.n, generator, dtype=cdtype, device=device)
        raise ValueError(f"start must be 'cold', 'hot' or 'default', got {start!r}")

    def couplings(self) -> dict[str, float]:
        return {"beta": self.beta, "n": float(self.n)}

    def _check(self, u: torch.Tensor) -> None:
        if tuple(u.shape[1:]) != self.field_shape or not u.is_complex():
            raise ValueError(
                f"expected complex links [B, {', '.join(map(str, self.field_shape))}], got {list(u.shape)}"
            )

    def action(self, u: torch.Tensor) -> torch.Tensor:
        """``S[B] = -(beta/N) sum_p Re tr P_p`` for links ``[B, d, L0, ..., L{d-1}, N, N]``."""
        self._check(u)
        return -(self.beta / self.n) * _re_tr(sun_plaquettes(u)).flatten(1).sum(dim=1)

    def force(self, u: torch.Tensor) -> torch.Tensor:
        """su(N) force of :meth:`action` for HMC: ``F_mu(x) = (beta / 2N) ta(U_mu(x) A_mu(x))`` ``[B, d, *L, N, N]``.

        The force of :mod:`latflow.manifolds` (``SUN.force(self.action, u)``, the left Lie derivative, sign such
        that the kick is ``P -> P - eps F``), in closed form: ``S = -(beta/N) Re tr(U A) + ...`` with the staple sum
        ``A`` (:func:`latflow.sun.sun_staples`) gives ``G = dS/dU = -(beta/N) A^dagger`` and
        ``F = (1/2) ta(G U^dagger) = (beta/2N) ta(U A)``. The fused compiled kernel
        (:func:`latflow.gauge_kernels.sun_wilson_force`: CPU, ``N <= 3``, no autograd graph needed) computes it
        in one sweep; :meth:`force_reference` (torch: any device, ``N``, differentiable) otherwise.
        """
        self._check(u)
        fused = sun_wilson_force(u, self.beta) if self._staples_exact else None
        return fused if fused is not None else self.force_reference(u)

    @property
    def _staples_exact(self) -> bool:
        """Whether the staple sum excludes the link itself (every extent >= 2; :func:`latflow.sun.sun_staples`)."""
        return min(self.lattice.shape) >= 2

    def force_reference(self, u: torch.Tensor) -> torch.Tensor:
        """The torch su(N) force of :meth:`action` from the staple sums, ``[B, d, *L, N, N]`` (see :meth:`force`).

        With an extent 1 the staples contain the link itself; then autograd of :meth:`action`
        (``SUN.force``) gives the force.
        """
        self._check(u)
        if not self._staples_exact:
            return self.manifold.force(self.action, u)
        staples = torch.stack([sun_staples(u, mu) for mu in range(self.lattice.dim)], dim=1)
        return (0.5 * self.beta / self.n) * traceless_antihermitian(u @ staples)

    def wilson_loop(self, u: torch.Tensor, r: int, t: int) -> torch.Tensor:
        """``Re tr W / N`` of ``R x T`` loops averaged over sites, planes and both orientations, ``[B]``."""
        shapes = [(r, t)] if r == t else [(r, t), (t, r)]
        terms = [
            _re_tr(sun_wilson_loops(u, mu, nu, a, b)).flatten(1).mean(dim=1)
            for mu, nu in planes(self.lattice.dim)
            for a, b in shapes
        ]
        return torch.stack(terms, dim=1).mean(dim=1) / self.n

    def observables(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-configuration observables, each real ``[B]`` (see module docstring)."""
        self._check(u)
        re_tr = _re_tr(sun_plaquettes(u)).flatten(1)
        obs = {
            "action": -(self.beta / self.n) * re_tr.sum(dim=1),
            "plaquette": re_tr.mean(dim=1) / self.n,
        }
        for r, t in self.wilson_loop_sizes:
            obs[f"wilson_loop_{r}x{t}"] = obs["plaquette"] if (r, t) == (1, 1) else self.wilson_loop(u, r, t)
        poly = polyakov_loop(u).flatten(1).mean(dim=1)
        obs["polyakov_loop"] = poly.real
        obs["polyakov_loop_abs"] = poly.abs()
        if self.lattice.dim == 4:
            q = topological_charge_density(u).flatten(1).sum(dim=1)
            obs["topological_charge"] = q
            obs["topological_charge_sq"] = q * q
        return obs

    def observable_descriptions(self) -> dict[str, str]:
        """What each observable of :meth:`observables` is (lattice units)."""
        out = {
            "action": "S = -(beta/N) sum_p Re tr P_p, the Wilson gauge action summed over all plaquettes",
            "plaquette": "(1 / (n_planes V)) sum_p Re tr P_p / N, in [-1, 1] (1 for the cold start)",
        }
        for r, t in self.wilson_loop_sizes:
            out[f"wilson_loop_{r}x{t}"] = (
                f"Re tr W / N of the {r}x{t} Wilson loop, averaged over sites, planes and both orientations"
            )
        out["polyakov_loop"] = "Re of the spatial average of tr L / N, L the Polyakov loop along axis 0 (time)"
        out["polyakov_loop_abs"] = "|spatial average of tr L / N|"
        if self.lattice.dim == 4:
            out["topological_charge"] = (
                "clover Q = sum_x (1/32 pi^2) eps tr(F F), not an integer on rough configurations"
            )
            out["topological_charge_sq"] = "Q^2 (its mean / V is the topological susceptibility)"
        return out

    def derived_observables(self) -> dict[str, Derived]:
        if self.lattice.dim != 4:
            return {}
        v = self.lattice.volume
        return {
            "topological_susceptibility": Derived(("topological_charge_sq",), lambda q2: q2 / v, "<Q^2> / V (per site)")
        }

    def exact_means(self) -> dict[str, float]:
        """Means fixed by symmetry: ``<Re tr L / N> = 0`` (center symmetry: the time links of one time slice
        times ``z = e^{2 pi i k / N}`` leave the action invariant and multiply ``tr L`` by ``z``; the average
        over ``k`` vanishes), in 2D the exact torus plaquette (:func:`exact_plaquette`) and, in 4D, ``<Q> = 0``
        (parity)."""
        means = {"polyakov_loop": 0.0}
        if self.lattice.dim == 2 and self.beta >= 0:  # the character expansion on the torus (exact_plaquette)
            means["plaquette"] = exact_plaquette(self.beta, self.n, self.lattice.shape)
            if (1, 1) in self.wilson_loop_sizes:
                means["wilson_loop_1x1"] = means["plaquette"]
        if self.lattice.dim == 4:
            means["topological_charge"] = 0.0
        return means

    def exact_log_z(self) -> float | None:
        """Exact ``log Z`` under the Haar probability measure (:func:`exact_log_z`); ``None`` for ``d != 2``
        (except ``beta = 0``: 0 in any ``d``)."""
        if self.beta == 0:
            return 0.0
        if self.lattice.dim != 2:
            return None
        return exact_log_z(self.beta, self.n, self.lattice.shape)

    def sample_exact(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """``n`` independent exact draws (Haar links, complex128 ``[n, d, L..., N, N]``) at ``beta = 0``; None
        otherwise. The start of annealing in ``beta``."""
        if self.beta != 0:
            return None
        return haar_sun((int(n), *self.field_shape[:-2]), self.n, generator, dtype=torch.complex128)

    def field_log_volume(self) -> float:
        """0: fields, flows' ``log q`` and :meth:`exact_log_z` all refer to the Haar probability measure."""
        return 0.0

    def exact_plaquette(self) -> float | None:
        """Exact ``<Re tr P / N>`` on the 2D torus (:func:`exact_plaquette`); ``None`` for ``d != 2``."""
        if self.lattice.dim != 2:
            return None
        return exact_plaquette(self.beta, self.n, self.lattice.shape)


# --- exact results on the 2D torus ---------------------------------------------
#
# Work with the exponentially scaled ive(k, x) = I_k(x) e^{-x}, x = beta/N: every N x N determinant is
# then the true one times e^{-beta}, a common factor that cancels in all ratios (and is added back in
# log Z). Truncation: |I_k| <= I_0, so a product in a determinant is negligible as soon as one index has
# |k| > k_cut, with k_cut the smallest k where I_k / I_0 < 1e-30. The indices of a product sum to
# |lambda| + N q; all of them are within k_cut only if -k_cut - lambda_1 <= q <= k_cut, and only if
# lambda_1 - lambda_N = lambda_1 <= 2 (k_cut + N). Both sums are cut there, so the neglected terms are
# below 1e-30 of I_0^N (times N! and the number of terms), far below rounding.

_TAIL_TOL = 1e-30


def _k_cutoff(x: float) -> int:
    """Smallest ``k >= 1`` with ``I_k(x) / I_0(x) < _TAIL_TOL``."""
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"exact results are implemented for finite beta >= 0, got beta/N = {x}")
    upper = 64
    while True:
        k = np.arange(1, upper + 1)
        hit = np.flatnonzero(ive(k, x) / ive(0, x) < _TAIL_TOL)
        if hit.size:
            return int(k[hit[0]])
        upper *= 2
        if upper > 1 << 16:
            raise ValueError(f"no Bessel cutoff found for beta/N = {x}")


def sun_partitions(n: int, n_max: int) -> np.ndarray:
    """Partitions ``lambda_1 >= ... >= lambda_{N-1} >= lambda_N = 0`` with ``lambda_1 <= n_max``, ``[K, N]``.

    Each labels one SU(N) irrep (trivial first); e.g. for SU(3) the Dynkin labels are
    ``(lambda_1 - lambda_2, lambda_2)``.
    """
    if n < 2 or n_max < 0:
        raise ValueError(f"need N >= 2 and n_max >= 0, got N = {n}, n_max = {n_max}")
    rows = [
        (*lam, 0)
        for lam in itertools.product(range(n_max + 1), repeat=n - 1)
        if all(lam[i] >= lam[i + 1] for i in range(n - 2))
    ]
    rows.sort(key=lambda lam: (lam[0], lam))
    return np.array(rows, dtype=np.int64).reshape(-1, n)


def sun_dimensions(partitions: np.ndarray) -> np.ndarray:
    """Irrep dimensions ``d_lambda = prod_{i<j} (lambda_i - lambda_j + j - i) / (j - i)``, ``[K]`` (float64)."""
    lam = np.asarray(partitions, dtype=np.float64)
    n = lam.shape[-1]
    d = np.ones(lam.shape[:-1])
    for i in range(n):
        for j in range(i + 1, n):
            d = d * (lam[..., i] - lam[..., j] + j - i) / (j - i)
    return d


@functools.lru_cache(maxsize=64)
def _scaled_coefficients(beta: float, n: int, n_max: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(partitions [K, N], c_lambda e^{-beta} [K], (d c_lambda / d beta) e^{-beta} [K])``, read-only (cached)."""
    if n < 2:
        raise ValueError(f"SU(N) needs N >= 2, got {n}")
    x = float(beta) / n
    k_cut = _k_cutoff(x)
    n_max = 2 * (k_cut + n) if n_max is None else int(n_max)
    lam = sun_partitions(n, n_max)  # [K, N]
    q = np.arange(-k_cut - n_max, k_cut + 1)  # [Q]
    i = np.arange(n)
    # index[k, q, i, j] = lambda_i + j - i + q
    index = lam[:, None, :, None] + (i[None, :] - i[:, None])[None, None] + q[None, :, None, None]
    k_lim = int(np.max(np.abs(index))) + 1
    ks = np.arange(-k_lim, k_lim + 2)
    table = ive(np.abs(ks), x)  # I_{-k} = I_k
    table_d = 0.5 * (ive(np.abs(ks - 1), x) + ive(np.abs(ks + 1), x)) / n  # d I_k(beta/N) / d beta
    m = table[index + k_lim]  # [K, Q, N, N]
    md = table_d[index + k_lim]
    c = np.linalg.det(m).sum(axis=1)
    dc = np.zeros_like(c)
    for row in range(n):  # d det = sum over rows of det with that row differentiated
        m_row = m.copy()
        m_row[..., row, :] = md[..., row, :]
        dc += np.linalg.det(m_row).sum(axis=1)
    for arr in (lam, c, dc):
        arr.setflags(write=False)
    return lam, c, dc


def single_plaquette_coefficients(
    beta: float, n: int, n_max: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character coefficients of the single-plaquette Boltzmann weight of SU(N).

    ``e^{(beta/N) Re tr U} = sum_r d_r b_r chi_r(U)``,
    ``b_r = (1/d_r) int dU chi_r(U)^* e^{(beta/N) Re tr U}`` (Haar probability measure), from
    ``d_lambda b_lambda = sum_{q in Z} det_{ij} I_{lambda_i + j - i + q}(beta / N)``.

    Parameters
    ----------
    beta
        Coupling, ``>= 0`` (``b_r`` grows like ``e^beta``: overflows beyond ``beta ~ 700``; the exact
        observables below use ratios and do not).
    n
        ``N >= 2``.
    n_max
        Irreps with ``lambda_1 <= n_max``; ``None``: all with ``b_r / b_0 > ~1e-30``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        Partitions ``[K, N]`` (int64, :func:`sun_partitions`, trivial irrep first), dimensions ``d_r`` ``[K]``
        and ``b_r`` ``[K]`` (float64).
    """
    lam, c, _ = _scaled_coefficients(float(beta), int(n), n_max)
    d = sun_dimensions(lam)
    return lam.copy(), d, c * math.exp(beta) / d


def _plaquette_count(shape: tuple[int, ...]) -> int:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or any(s < 1 for s in shape):
        raise ValueError(f"exact SU(N) results are for the 2D torus (L0, L1), got shape {list(shape)}")
    return shape[0] * shape[1]


def _ratios(beta: float, n: int, n_max: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """``b_r / b_0`` ``[K]``, ``b_r' / b_0`` ``[K]`` and ``log b_0``."""
    lam, c, dc = _scaled_coefficients(float(beta), int(n), n_max)
    d = sun_dimensions(lam)
    b, db = c / d, dc / d
    return b / b[0], db / b[0], math.log(b[0]) + beta


def exact_plaquette_infinite(beta: float, n: int) -> float:
    """Infinite-volume 2D ``<Re tr P / N> = b_0'(beta) / b_0(beta)``, the single-plaquette expectation."""
    _, db, _ = _ratios(beta, n, None)
    return float(db[0])


def exact_plaquette(beta: float, n: int, shape: tuple[int, int], n_max: int | None = None) -> float:
    """Exact ``<Re tr P / N>`` of the SU(N) Wilson theory on the ``L0 x L1`` torus.

    ``(1/P) d log Z / d beta = sum_r b_r^{P-1} b_r' / sum_r b_r^P`` (``P = L0 L1``), from
    ``Z = sum_r b_r^P`` (module docstring), evaluated with ratios ``b_r / b_0``.

    Parameters
    ----------
    beta
        Coupling, ``>= 0``.
    n
        ``N >= 2``.
    shape
        ``(L0, L1)``.
    n_max
        Irreps with ``lambda_1 <= n_max``; automatic when ``None``.
    """
    p = _plaquette_count(shape)
    r, dr, _ = _ratios(beta, n, n_max)
    return float(np.sum(r ** (p - 1) * dr) / np.sum(r**p))


def exact_log_z(beta: float, n: int, shape: tuple[int, int], n_max: int | None = None) -> float:
    """Exact ``log Z`` of the 2D SU(N) Wilson theory on the ``L0 x L1`` torus, Haar probability measure.

    ``Z = int prod_links dU e^{-S} = sum_r b_r^P`` (``P = L0 L1``), as ``P log b_0 + log sum_r (b_r / b_0)^P``.
    """
    p = _plaquette_count(shape)
    r, _, log_b0 = _ratios(beta, n, n_max)
    return float(p * log_b0 + math.log(np.sum(r**p)))


def build(params: SUNParams, lattice: Lattice) -> SUNGaugeAction:
    return SUNGaugeAction(params, lattice)


SPEC = TheorySpec(
    name="su3",
    params=SUNParams,
    build=build,
    description="pure SU(N) gauge theory (N = 3 by default), Wilson action, d >= 2 (exact results on the 2D torus)",
    field_name="links",
)
