"""The 2D SU(N) plaquette prior: independent single-plaquette draws on the torus, exact density.

Single plaquette
----------------
:class:`WilsonPlaquetteDensity` is ``f(P) = exp((beta/N) Re tr P) / z_1(beta, N)`` with respect to the Haar
probability measure on SU(N), ``z_1 = sum_{q in Z} det_{ij} I_{j-i+q}(beta/N)`` (the trivial-irrep
character coefficient; :func:`sun_single_plaquette_log_norm`). ``f`` is a class function, so a draw is
``P = W diag(e^{i lambda}) W^dagger`` with the eigenphases ``lambda`` drawn from their Weyl density and
``W`` Haar-random. By the Weyl integration formula the eigenphases, lifted to the hyperplane
``sum_i lambda_i = 0`` of ``R^N``, have the density (w.r.t. ``d lambda_1 ... d lambda_{N-1}``)

``f_W(lambda) propto prod_{i<j} 4 sin^2((lambda_i - lambda_j) / 2) exp(x sum_i cos lambda_i)``,  ``x = beta/N``,

on any fundamental domain of the lattice ``2 pi {k in Z^N, sum k = 0}`` of lifts. We take its Voronoi cell
``D = {max_i lambda_i - min_i lambda_i <= 2 pi}`` (for ``k = e_j - e_i`` the condition
``|lambda| <= |lambda + 2 pi k|`` reads ``lambda_i - lambda_j <= 2 pi``, and a general ``k`` is a sum of
``sum_{k_i > 0} k_i <= |k|^2 / 2`` such differences, so the pairwise conditions are sufficient).

Exact rejection sampling: the proposal is the eigenvalue law of a traceless GUE matrix ``H`` with density
``propto exp(-(a/2) tr H^2)``, i.e. ``g(lambda) propto prod_{i<j} (lambda_i - lambda_j)^2 exp(-(a/2) |lambda|^2)``
on the same hyperplane. On ``D``

``log(f_W / g) = sum_{i<j} 2 log sinc((lambda_i - lambda_j)/2) + sum_i [x cos lambda_i + (a/2) lambda_i^2]``

(``sinc y = sin y / y``), and a proposal is accepted when it lies in ``D`` and ``log u < log(f_W/g) - log M``.
The bound ``log M >= sup_D log(f_W/g)`` is *proved* by interval arithmetic: cover the box
``|lambda_i| <= 2 pi (N-1)/N`` (which contains ``D``) in the coordinates ``lambda_1..lambda_{N-1}`` by cells;
over a cell every ``lambda_i`` and every difference ``lambda_i - lambda_j`` ranges over an interval, on which
``x cos + (a/2) (.)^2`` is bounded by its endpoint/zero values and ``2 log sinc(./2)`` (decreasing in ``|.|``
up to ``2 pi``) by its value at the smallest ``|.|``; the sum of these term-wise maxima bounds the cell.
Branch and bound (subdivide the cells whose bound exceeds the best value found, ``>= N x`` at
``lambda = 0``) tightens it to within ``1e-3`` of the supremum. The precision ``a`` minimises the
rejection constant ``M(a) a^{-(N^2-1)/2}`` (``int g propto a^{-(N^2-1)/2}``). Measured acceptance
(accepted / proposed), :data:`ACCEPTANCE_NOTE`.

Since the law of ``H`` is conjugation invariant and acceptance depends on its eigenvalues only, an accepted
``H`` is conjugation invariant and ``P = exp(iH) = W diag(e^{i lambda}) W^dagger`` (``W`` the eigenvectors of
``H``) has the class density ``f``: no separate Haar draw is needed.

The 2D prior
------------
On the ``L0 x L1`` torus (``V = L0 L1`` sites and plaquettes, ``2V`` links) gauge-fix to the maximal tree
``T = {U_0(t, x): t < L0-1} u {U_1(0, x): x < L1-1}`` (``V - 1`` links). The Haar measure on the links is the
product of the Haar measure on the tree links and on the ``V + 1`` gauge-fixed non-tree links
``U~_l = path(T) U_l path(T)^dagger`` (for fixed tree links a left and right translation of ``U_l``).
In the gauge-fixed frame (tree links ``= 1``) the non-tree links are built from

- the holonomy links ``h = U~_0(L0-1, 0)`` and ``w = U~_1(0, L1-1)``, Haar;
- the plaquettes ``P(t, x)`` at all sites but the last ``(L0-1, L1-1)``, i.i.d. from ``f``, in the order
  ``t < L0-1`` column by column, ``U~_1(t+1, x) = P(t, x) U~_1(t, x)`` (a right translation of the new link
  ``U~_1(t+1, x)``), then along the last row ``U~_0(L0-1, x+1) = U~_1(L0-1, x)^dagger P(L0-1, x)^dagger
  U~_0(L0-1, x) U~_1(0, x)`` (the new link enters once, translated and inverted).

Each step brings exactly one new link, which the new plaquette determines through a Haar-preserving map
(translations and inversion), so the map ``(h, w, V-1 plaquettes) -> V + 1 non-tree links`` has unit Jacobian
with respect to the Haar measures. The last plaquette contains no new link: it is fixed by the others and the
holonomies (the torus constraint). Hence the gauge-fixed non-tree links have the density
``F_V(U) = prod_{p != V} f(P_p)`` with respect to Haar. A Haar-random gauge transformation ``Omega(y)`` at every
site then makes the tree links Haar and independent of the rest: writing ``Omega = Omega' g`` with
``g = Omega(root)``, the links are ``Omega'`` applied to ``g U~ g^dagger`` (whose density is again
``F_V``, a conjugation-invariant function) with ``Omega'(root) = 1`` and ``Omega'`` elsewhere Haar, which is
a bijection onto the tree links. As ``F_V`` is gauge invariant, the links have the density ``F_V`` w.r.t.
the Haar probability measure on all ``2V`` links; in particular ``int F_V dHaar = 1``.

With ``symmetric=True`` the configuration is finally translated by a uniformly random lattice vector, which
moves the closing plaquette to a uniform site ``k``; translations preserve Haar, so the density is the
mixture

``q(U) = (1/V) sum_k prod_{p != k} f(P_p) = prod_p f(P_p) mean_k 1 / f(P_k)``,

``log q = sum_p log f(P_p) + log mean_k exp(-log f(P_k))``, gauge and translation invariant and normalised.
Relative to the target ``exp(-S)/Z`` (``S`` the Wilson action, ``prod_p f(P_p) = exp(-S) / z_1^V``) the
importance weight is ``Z^{-1} z_1^V / mean_k exp(-(beta/N) Re tr P_k)``, a function of one nearly Haar
plaquette on large lattices. Densities are w.r.t. the Haar *probability* measure on every link (log volume 0).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.special import ive

from .lattice import Lattice
from .priors import PriorModule
from .sun import dagger, haar_sun, sun_gauge_transform, sun_plaquettes

__all__ = ["sun_single_plaquette_log_norm", "WilsonPlaquetteDensity", "sun_links_with_plaquettes", "SUNPlaquettePrior"]

ACCEPTANCE_NOTE = (
    "eigenphase rejection acceptance (accepted / proposed, 1e5 draws): "
    "N=2: beta 1: 0.94, beta 4: 0.60, beta 8: 0.46, beta 10: 0.42; "
    "N=3: beta 1: 0.75, beta 4: 0.53, beta 8: 0.23, beta 10: 0.17"
)

_TAIL_TOL = 1e-30


def sun_single_plaquette_log_norm(beta: float, n: int) -> float:
    """``log z_1`` with ``z_1 = int dU exp((beta/N) Re tr U) = sum_{q in Z} det_{ij} I_{j-i+q}(beta/N)``.

    Haar probability measure on SU(N). Evaluated with the scaled ``ive(k, x) = I_k(x) e^{-x}`` (each
    determinant is the true one times ``e^{-N x} = e^{-beta}``); the sum over ``q`` is cut at
    ``|q| > k_cut + N`` with ``I_{k_cut} / I_0 < 1e-30``: every product in such a determinant contains a
    factor ``I_k`` with ``|k| >= |q| - N + 1 > k_cut`` and ``|I_k| <= I_0``.

    Parameters
    ----------
    beta
        Coupling, finite and ``>= 0``.
    n
        ``N >= 2``.
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"the single-plaquette density needs a finite beta >= 0, got {beta}")
    if n < 2:
        raise ValueError(f"SU(N) needs N >= 2, got {n}")
    x = float(beta) / n
    k_cut = 1
    while ive(k_cut, x) / ive(0, x) >= _TAIL_TOL:
        k_cut += 1
    q = np.arange(-k_cut - n, k_cut + n + 1)
    i = np.arange(n)
    index = (i[None, :] - i[:, None])[None] + q[:, None, None]  # [Q, N, N]: j - i + q
    dets = np.linalg.det(ive(np.abs(index), x))
    return float(beta + math.log(dets.sum()))


def _log_sinc_half(d: np.ndarray) -> np.ndarray:
    """``2 log |sin(d/2) / (d/2)|`` elementwise (``-inf`` where ``sin(d/2) = 0``, ``d != 0``)."""
    with np.errstate(divide="ignore"):
        return 2.0 * np.log(np.abs(np.sinc(d / (2.0 * math.pi))))


class _EigenphaseBound:
    """Interval-arithmetic upper bound of ``sup_D log(f_W / g)`` (module docstring), for one ``(x, N)``."""

    def __init__(self, x: float, n: int) -> None:
        self.x, self.n = float(x), int(n)
        m = n - 1
        self.radius = 2.0 * math.pi * (n - 1) / n  # |lambda_i| <= radius on D
        c_lam = np.vstack([np.eye(m), -np.ones((1, m))])  # lambda_i as forms in lambda_1..lambda_{N-1}: [N, m]
        iu = np.triu_indices(n, 1)
        self.c_lam = c_lam
        self.c_dif = c_lam[iu[0]] - c_lam[iu[1]]  # [N(N-1)/2, m]

    def log_ratio(self, lam: np.ndarray, a: float) -> np.ndarray:
        """``log(f_W / g)`` at points ``lam`` ``[K, N]`` (not restricted to ``D``)."""
        iu = np.triu_indices(self.n, 1)
        d = lam[:, iu[0]] - lam[:, iu[1]]
        return _log_sinc_half(d).sum(1) + (self.x * np.cos(lam) + 0.5 * a * lam**2).sum(1)

    def cell_bounds(self, centers: np.ndarray, half: float, a: float) -> np.ndarray:
        """Upper bounds ``[K]`` of ``log(f_W/g)`` on ``D`` intersected with the cubes ``centers +- half``."""
        r = self.radius
        lc = centers @ self.c_lam.T
        lw = half * np.abs(self.c_lam).sum(1)
        lo, hi = np.maximum(lc - lw, -r), np.minimum(lc + lw, r)
        empty = (lo > hi).any(1)
        cos_max = np.where((lo <= 0) & (hi >= 0), 1.0, np.maximum(np.cos(lo), np.cos(hi)))
        sq_max = np.maximum(lo**2, hi**2)
        total = (self.x * cos_max + 0.5 * a * sq_max).sum(1)
        dc = centers @ self.c_dif.T
        dw = half * np.abs(self.c_dif).sum(1)
        two_pi = 2.0 * math.pi
        dlo, dhi = np.maximum(dc - dw, -two_pi), np.minimum(dc + dw, two_pi)
        empty |= (dlo > dhi).any(1)
        dmin = np.where((dlo <= 0) & (dhi >= 0), 0.0, np.minimum(np.abs(dlo), np.abs(dhi)))
        total = total + _log_sinc_half(dmin).sum(1)
        return np.where(empty, -np.inf, total)

    def bound(self, a: float, tol: float = 1e-3, max_cells: int = 400_000) -> float:
        """``log M >= sup_D log(f_W / g)``, by branch and bound over cubes."""
        m = self.n - 1
        n0 = max(8, int(round(20_000 ** (1.0 / m))))
        half = self.radius / n0
        axis = -self.radius + half * (2 * np.arange(n0) + 1)
        centers = np.stack(np.meshgrid(*([axis] * m), indexing="ij"), -1).reshape(-1, m)
        best = self.n * self.x  # log(f_W/g) at lambda = 0
        offsets = np.stack(np.meshgrid(*([np.array([-0.5, 0.5])] * m), indexing="ij"), -1).reshape(-1, m)
        while True:
            ub = self.cell_bounds(centers, half, a)
            lam = np.concatenate([centers, -centers.sum(1, keepdims=True)], 1)
            in_d = lam.max(1) - lam.min(1) <= 2 * math.pi
            vals = self.log_ratio(lam[in_d], a)
            if vals.size:
                best = max(best, float(vals.max()))
            keep = ub > best + tol
            if not keep.any():
                return best + tol
            if keep.sum() * offsets.shape[0] > max_cells:
                return max(best + tol, float(ub.max()))
            centers = (centers[keep][:, None, :] + half * offsets[None]).reshape(-1, m)
            half = 0.5 * half


@functools.lru_cache(maxsize=128)
def _proposal(beta: float, n: int) -> tuple[float, float]:
    """``(a, log M)``: the GUE precision minimising ``M(a) a^{-(N^2-1)/2}`` and the proved bound at it."""
    x = beta / n
    b = _EigenphaseBound(x, n)
    power = 0.5 * (n * n - 1)

    def cost(log_a: float) -> float:
        a = math.exp(log_a)
        return b.bound(a, tol=0.02, max_cells=20_000) - power * log_a

    lo, hi = math.log(0.05), math.log(2.0 * x + n)
    golden = 0.5 * (math.sqrt(5.0) - 1.0)
    c1, c2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
    f1, f2 = cost(c1), cost(c2)
    for _ in range(12):
        if f1 < f2:
            hi, c2, f2 = c2, c1, f1
            c1 = hi - golden * (hi - lo)
            f1 = cost(c1)
        else:
            lo, c1, f1 = c1, c2, f2
            c2 = lo + golden * (hi - lo)
            f2 = cost(c2)
    a = math.exp(0.5 * (lo + hi))
    return a, b.bound(a)


class WilsonPlaquetteDensity:
    """SU(N) single-plaquette density ``exp((beta/N) Re tr P) / z_1(beta, N)`` w.r.t. the Haar probability measure.

    A :class:`latflow.plaquette_prior.SinglePlaquetteDensity`. Exact sampling by rejection on the eigenphases
    with a traceless-GUE proposal and a proved bound (module docstring); any ``N >= 2``, any finite
    ``beta >= 0`` (the acceptance falls slowly with ``beta``: see :data:`ACCEPTANCE_NOTE`; the bound's set-up
    grows exponentially with ``N``, a fraction of a second for ``N <= 3``).

    Parameters
    ----------
    beta
        Wilson coupling, finite and ``>= 0`` (``0``: Haar).
    n
        ``N >= 2``.

    Attributes
    ----------
    log_norm
        ``log z_1``.
    precision, log_bound
        The GUE precision ``a`` of the proposal and ``log M``.
    n_proposed, n_accepted
        Running counts of eigenphase proposals and acceptances (the acceptance rate is their ratio).
    """

    def __init__(self, beta: float, n: int = 3) -> None:
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"the plaquette density needs a finite beta >= 0, got {beta}")
        if int(n) != n or n < 2:
            raise ValueError(f"the SU(N) plaquette density needs an integer N >= 2, got {n}")
        self.beta = float(beta)
        self.n = int(n)
        self.x = self.beta / self.n
        self.log_norm = sun_single_plaquette_log_norm(self.beta, self.n)
        self.precision, self.log_bound = _proposal(self.beta, self.n)
        self.n_proposed = 0
        self.n_accepted = 0

    @property
    def acceptance(self) -> float:
        """Accepted / proposed eigenphase draws so far (``nan`` before the first)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else float("nan")

    def _candidates(self, m: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``m`` proposals: eigenphases ``[m, N]``, eigenvectors ``[m, N, N]`` (complex128), accepted ``[m]``."""
        n, a, dev = self.n, self.precision, generator.device
        z = torch.randn(m, n, n, generator=generator, dtype=torch.complex128, device=dev)
        h = (z + dagger(z)) * (0.5 * math.sqrt(2.0 / a))  # density propto exp(-(a/2) tr H^2)
        tr = torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)
        h = h - (tr / n)[:, None, None] * torch.eye(n, dtype=h.dtype, device=dev)
        lam, w = torch.linalg.eigh(h)
        lam = lam - lam.mean(-1, keepdim=True)  # sum 0 to rounding
        iu = torch.triu_indices(n, n, 1, device=dev)
        d = lam[:, iu[0]] - lam[:, iu[1]]
        in_d = (lam.max(-1).values - lam.min(-1).values) <= 2 * math.pi
        sinc = torch.sinc(d / (2 * math.pi)).abs()
        log_r = 2 * torch.log(sinc).sum(-1) + (self.x * torch.cos(lam) + 0.5 * a * lam**2).sum(-1)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=dev)
        ok = in_d & (torch.log(u) < log_r - self.log_bound)
        return lam, w, ok

    def sample_eigen(self, m: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` exact draws as eigenphases ``[m, N]`` (float64, sum 0) and eigenvectors ``[m, N, N]`` (complex128).

        Vectorised rejection: rounds of ``2.5 x`` (missing draws) ``+ 8`` proposals until ``m`` are accepted. The
        round sizes depend on ``m`` and the stream only (not on earlier calls), so a seed reproduces the draws.
        """
        dev = generator.device
        lam_out = torch.empty(m, self.n, dtype=torch.float64, device=dev)
        w_out = torch.empty(m, self.n, self.n, dtype=torch.complex128, device=dev)
        filled = 0
        while filled < m:
            need = m - filled
            k = int(2.5 * need) + 8
            lam, w, ok = self._candidates(k, generator)
            self.n_proposed += k
            idx = torch.nonzero(ok).flatten()[:need]
            self.n_accepted += int(ok.sum())
            take = idx.numel()
            lam_out[filled : filled + take] = lam[idx]
            w_out[filled : filled + take] = w[idx]
            filled += take
        return lam_out, w_out

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Independent plaquettes ``[*shape, N, N]`` (complex128, on the generator's device)."""
        m = math.prod(shape)
        lam, w = self.sample_eigen(m, generator)
        p = (w * torch.polar(torch.ones_like(lam), lam)[:, None, :]) @ dagger(w)
        return p.reshape(*shape, self.n, self.n)

    def log_prob(self, plaquette: torch.Tensor) -> torch.Tensor:
        """``(beta/N) Re tr P - log z_1``, ``[..., N, N] -> [...]`` (real, differentiable)."""
        re_tr = torch.diagonal(plaquette, dim1=-2, dim2=-1).real.sum(-1)
        return self.x * re_tr - self.log_norm


def sun_links_with_plaquettes(
    plaquettes: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Haar-random 2D SU(N) links whose plaquettes are the given ones except the last (closing) one.

    The maximal-tree construction of the module docstring: gauge-fixed links from Haar holonomies ``h``,
    ``w`` and the plaquettes at all sites but ``(L0-1, L1-1)``, then a Haar gauge transformation at every site.

    Parameters
    ----------
    plaquettes
        ``[n, L0, L1, N, N]`` SU(N); entry ``(L0-1, L1-1)`` is ignored.
    generator
        Random stream (on the device of ``plaquettes``).

    Returns
    -------
    links : ``[n, 2, L0, L1, N, N]`` (complex128) whose plaquette at ``(t, x)`` (``sun_plaquettes``) is
        ``Omega(t, x) P(t, x) Omega(t, x)^dagger`` for every site but the last.
    closing : ``[n, N, N]`` the plaquette at ``(L0-1, L1-1)`` in the gauge-fixed frame (same class).
    """
    if plaquettes.dim() != 5 or plaquettes.shape[-1] != plaquettes.shape[-2]:
        raise ValueError(f"plaquettes must be [n, L0, L1, N, N], got {list(plaquettes.shape)}")
    p = plaquettes.to(torch.complex128)
    b, l0, l1, nc, _ = p.shape
    dev = p.device
    eye = torch.eye(nc, dtype=torch.complex128, device=dev).expand(b, nc, nc)
    hol = haar_sun((2, b), nc, generator, dtype=torch.complex128, device=dev)
    u0 = [[eye] * l1 for _ in range(l0)]  # u0[t][x]
    u1 = [[eye] * l1 for _ in range(l0)]
    u1[0][l1 - 1] = hol[1]  # w
    for t in range(l0 - 1):
        for x in range(l1):
            u1[t + 1][x] = p[:, t, x] @ u1[t][x]
    last = l0 - 1
    u0[last][0] = hol[0]  # h
    for x in range(l1 - 1):
        u0[last][x + 1] = dagger(u1[last][x]) @ dagger(p[:, last, x]) @ u0[last][x] @ u1[0][x]
    closing = u0[last][l1 - 1] @ u1[0][l1 - 1] @ dagger(u0[last][0]) @ dagger(u1[last][l1 - 1])
    links = torch.stack(
        [torch.stack([torch.stack(row, 1) for row in u], 1) for u in (u0, u1)], 1
    )  # [n, 2, L0, L1, N, N]
    omega = haar_sun((b, l0, l1), nc, generator, dtype=torch.complex128, device=dev)
    return sun_gauge_transform(links, omega), closing


class SUNPlaquettePrior(PriorModule):
    """Independent single-plaquette SU(N) plaquettes on the 2D torus: a prior for links ``[B, 2, L0, L1, N, N]``.

    Construction and exact density in the module docstring. ``log_prob`` is with respect to the Haar
    probability measure on every link; gauge invariant, and with ``symmetric`` translation invariant.

    Parameters
    ----------
    lattice
        2D geometry ``(L0, L1)``.
    beta
        Coupling of the single-plaquette density (the Wilson ``beta`` of the target, or the gauge ``beta``
        of a theory with fermions), ``>= 0``.
    n
        ``N >= 2``.
    symmetric
        Translate every draw by a uniformly random lattice vector (closing plaquette at a uniform site,
        mixture density; the default) instead of closing always at ``(L0-1, L1-1)``.
    dtype, device
        Of the samples (complex dtype). ``log_prob`` is computed in complex128 and returned in float64.
    """

    def __init__(
        self,
        lattice: Lattice,
        beta: float,
        n: int = 3,
        *,
        symmetric: bool = True,
        dtype: torch.dtype = torch.complex128,
        device: torch.device | str = "cpu",
    ) -> None:
        if not dtype.is_complex:
            raise ValueError(f"SU(N) links are complex, got dtype {dtype}")
        # the anchor holds the real precision, so that a model's ``.to(dtype=float32/float64)`` (which turns
        # complex buffers real) moves it; :attr:`dtype` gives the complex links' dtype of that precision
        super().__init__(dtype.to_real(), device)
        if lattice.dim != 2:
            raise ValueError(
                f"the plaquette prior is for 2D gauge fields (independent plaquettes on the torus), "
                f"got lattice shape {list(lattice.shape)}"
            )
        self.lattice = lattice
        self.density = WilsonPlaquetteDensity(beta, n)
        self.beta = self.density.beta
        self.n = self.density.n
        self.symmetric = bool(symmetric)
        self.shape = (2, *lattice.shape, self.n, self.n)
        self.volume = lattice.volume

    @property
    def dtype(self) -> torch.dtype:
        """Complex dtype of the draws (``complex128`` or ``complex64``), following the model's real precision."""
        return self._anchor.dtype.to_complex()

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` configurations.

        Returns
        -------
        links : ``[B, 2, L0, L1, N, N]`` SU(N) (``dtype`` of the prior)
        log_q : ``[B]`` float64, from the drawn plaquettes and the closing one (equal to :meth:`log_prob`
            of the links up to rounding).
        """
        l0, l1 = self.lattice.shape
        v = self.volume
        p = self.density.sample((batch_size, l0, l1), generator)  # the last site's draw is ignored
        links, closing = sun_links_with_plaquettes(p, generator)
        logf = self.density.log_prob(p).reshape(batch_size, v)
        logf = torch.cat([logf[:, :-1], self.density.log_prob(closing)[:, None]], 1)
        log_q = self._log_q(logf)
        if self.symmetric:
            dev = links.device
            s = torch.randint(0, v, (batch_size,), generator=generator, device=dev)
            t = (torch.arange(l0, device=dev)[None, :] - (s // l1)[:, None]) % l0  # [B, L0]
            x = (torch.arange(l1, device=dev)[None, :] - (s % l1)[:, None]) % l1  # [B, L1]
            rows = torch.arange(batch_size, device=dev)[:, None, None, None]
            mu = torch.arange(2, device=dev)[None, :, None, None]
            links = links[rows, mu, t[:, None, :, None], x[:, None, None, :]]
        return links.to(device=self.device, dtype=self.dtype), log_q.to(self.device)

    def _log_q(self, logf: torch.Tensor) -> torch.Tensor:
        """Log density ``[B]`` from the ``log f`` of all ``V`` plaquettes ``[B, V]`` (closing one last)."""
        if self.symmetric:
            return logf.sum(1) + torch.logsumexp(-logf, dim=1) - math.log(logf.shape[1])
        return logf[:, :-1].sum(1)

    def log_prob(self, links: torch.Tensor) -> torch.Tensor:
        """Log density ``[B]`` (float64, w.r.t. the Haar probability measure on every link) of links
        ``[B, 2, L0, L1, N, N]``; differentiable in ``links``."""
        if tuple(links.shape[1:]) != self.shape:
            raise ValueError(f"links of shape {list(links.shape)} do not fit the prior's {list(self.shape)}")
        plaq = sun_plaquettes(links.to(torch.complex128))[:, 0]  # [B, L0, L1, N, N]
        return self._log_q(self.density.log_prob(plaq).flatten(1))
