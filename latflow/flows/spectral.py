"""Conjugation-equivariant (spectral) maps of SU(N), after Boyda et al. 2020 (arXiv:2008.05456).

A spectral map keeps the eigenvectors of ``W`` in SU(N) and moves its eigenphases,
``W = V diag(e^{i theta}) V^dagger -> W' = V diag(e^{i theta'}) V^dagger``, so that
``h(X W X^dagger) = X h(W) X^dagger`` for every unitary ``X``.

Canonical cell
--------------
The conjugacy classes of SU(N) are the points of one simplex (the fundamental alcove). Lift the
eigenphases to real numbers with ``sum_i theta_i = 0`` exactly and spread at most ``2 pi``, and sort
them, ``theta_1 >= ... >= theta_N >= theta_1 - 2 pi``; this lift is unique. The gaps

    g_k = theta_k - theta_{k+1}  (k < N),     g_N = 2 pi - (theta_1 - theta_N),

are ``>= 0`` and sum to ``2 pi``: ``x = g / (2 pi)`` are barycentric coordinates of the cell, whose
vertices are the N centre elements (the identity is ``x_N = 1``) and whose faces ``x_k = 0`` are the
degenerate spectra. Stick breaking maps the open simplex bijectively onto the cube ``(0, 1)^{N-1}``,

    x_k = u_k prod_{j<k} (1 - u_j)  (k < N),    x_N = prod_{j<N} (1 - u_j),

and each ``u_k`` is moved by its own monotone rational-quadratic spline ``s_k`` of ``[0, 1]`` with
``s_k(0) = 0``, ``s_k(1) = 1`` (:class:`IntervalSpline`). The new phases follow from the new gaps
with ``sum theta' = 0``. The map is invertible because every step is (the splines are strictly
increasing bijections of ``[0, 1]``); faces go to faces, so a degenerate spectrum stays degenerate
and ``W'`` is well defined; ``det W' = exp(i sum theta') = 1``; and it is a class function since it
depends on the unordered spectrum only (permutation equivariant by construction: each new phase
follows its eigenvector). For SU(2) it reduces to a spline of ``phi / pi`` with ``theta = +-phi``.

Log Jacobian (Haar measure)
---------------------------
By the Weyl integration formula the Haar measure restricted to class functions is
``|Delta(theta)|^2 d theta_1 ... d theta_{N-1}`` with ``|Delta|^2 = prod_{i<j} |e^{i theta_i} - e^{i theta_j}|^2``;
the eigenvector part of Haar is untouched, so with respect to Haar

    log J = log|det d theta' / d theta| + log |Delta(theta')|^2 - log |Delta(theta)|^2
          = sum_k log s_k'(u_k) + sum_{j<N} (N - 1 - j) log[(1 - u'_j) / (1 - u_j)]
            + 2 sum_{i<j} log R_ij,    R_ij = sin((theta'_i - theta'_j) / 2) / sin((theta_i - theta_j) / 2).

Every ratio is evaluated without cancelling small numbers: ``u'/u`` and ``(1 - u')/(1 - u)`` come
in closed form from the spline's first and last bins, the gap ratios ``rho_k = g'_k / g_k`` are
products of those, and ``R_ij`` uses the shorter of the two arcs joining ``theta_i`` and ``theta_j``,
``R = (A'/A) sinc(A'/2) / sinc(A/2)`` with ``A'/A = sum rho_k g_k / sum g_k`` over the gaps of the arc.
So ``log J`` stays finite and accurate at and near degenerate spectra (where both ``Delta`` vanish).

Gradients near degenerate eigenvalues
-------------------------------------
The eigenvectors come from the Hermitian matrix ``i (1 - Z)(1 + Z)^{-1}``, ``Z = e^{-i alpha} W``
with ``e^{i alpha}`` in the middle of the largest gap of the spectrum (a Cayley transform, whose
eigenvalues ``tan((theta - alpha)/2)`` are strictly monotone in the phase), with
``torch.linalg.eigh``: an orthonormal basis even for (near-)degenerate spectra. The basis ``V`` is
treated as a constant; the eigenvalues are taken differentiably as ``lambda_i = (V^dagger W V)_ii``
(first-order perturbation theory), and ``W' = V diag(mu) V^dagger`` is assembled by
:class:`_SpectralRecompose`, whose backward is the Daleckii-Krein formula for normal matrices,

    dW' = V [diag(d mu) + Gamma o offdiag(V^dagger dW V)] V^dagger,
    Gamma_ij = (mu_i - mu_j) / (lambda_i - lambda_j) = e^{i (theta'_i + theta'_j - theta_i - theta_j)/2} R_ij,

with ``R_ij`` the cancellation-free ratio above, whose limit at ``lambda_i = lambda_j`` is the gap
derivative. No ``1 / (lambda_i - lambda_j)`` is ever formed, so gradients are finite at the identity,
at the centre elements and at any degenerate spectrum (where the map, a function of unordered
eigenvalues, need not be differentiable, the gradient is a finite one-sided derivative). The
derivative is exact for tangent directions ``dW = W X`` (``X`` anti-Hermitian); double backward is
not supported.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F

from .circular import _bin_geometry, check_spline_settings, cumulative_knots, rq_bin_position

__all__ = [
    "IntervalSpline",
    "interval_spline_forward",
    "interval_spline_inverse",
    "cell_phases",
    "spectral_map",
    "haar_log_weyl",
]

TWO_PI = 2.0 * math.pi


# ------------------------------------------------------------------ interval spline


def _bin_values(
    xi: torch.Tensor, idx: torch.Tensor, n_bins: int, geom: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x``, ``y``, ``log dy/dx``, ``y/x``, ``(1-y)/(1-x)`` at bin position ``xi`` (ratios exact in end bins)."""
    x0, y0, d0, d1, w, h = geom
    sig = h / w
    xi1 = xi * (1.0 - xi)
    denom = sig + (d1 + d0 - 2.0 * sig) * xi1
    num = sig * sig * (d1 * xi * xi + 2.0 * sig * xi1 + d0 * (1.0 - xi) ** 2)
    log_dy = torch.log(num) - 2.0 * torch.log(denom)
    y = (y0 + h * (sig * xi * xi + d0 * xi1) / denom).clamp(0.0, 1.0)
    x = (x0 + xi * w).clamp(0.0, 1.0)
    first, last = idx == 0, idx == n_bins - 1
    r0 = torch.where(first, sig * (sig * xi + d0 * (1.0 - xi)) / denom, y / torch.where(first, 1.0, x))
    r1 = torch.where(last, sig * (sig * (1.0 - xi) + d1 * xi) / denom, (1.0 - y) / torch.where(last, 1.0, 1.0 - x))
    return x, y, log_dy, r0, r1


def interval_spline_forward(
    x: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Monotone rational-quadratic spline of ``[0, 1]`` onto itself (Durkan et al. 2019).

    Parameters
    ----------
    x
        ``[...]`` in ``[0, 1]``.
    widths, heights
        Positive ``[..., K]`` (normalised here to sum to 1).
    derivatives
        Positive knot derivatives ``[..., K + 1]`` (both end points free).

    Returns
    -------
    y, log_dy_dx, y_over_x, one_minus_y_over_one_minus_x : torch.Tensor
        Each ``[...]``. The two ratios are evaluated in closed form in the first and last bins,
        so they are accurate for ``x -> 0`` and ``x -> 1`` (limits ``d_0`` and ``d_K``).
    """
    xk, yk = cumulative_knots(widths, 1.0), cumulative_knots(heights, 1.0)
    idx = (x.unsqueeze(-1) >= xk[..., 1:-1]).sum(dim=-1)
    geom = _bin_geometry(xk, yk, derivatives, idx)
    xi = ((x - geom[0]) / geom[4]).clamp(0.0, 1.0)
    _, y, log_dy, r0, r1 = _bin_values(xi, idx, widths.shape[-1], geom)
    return y, log_dy, r0, r1


def interval_spline_inverse(
    y: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interval_spline_forward`: ``(x, log dx/dy, x/y, (1-x)/(1-y))``, each ``[...]``."""
    xk, yk = cumulative_knots(widths, 1.0), cumulative_knots(heights, 1.0)
    idx = (y.unsqueeze(-1) >= yk[..., 1:-1]).sum(dim=-1)
    geom = _bin_geometry(xk, yk, derivatives, idx)
    xi = rq_bin_position(y, *geom[1:])
    x, _, log_dy, r0, r1 = _bin_values(xi, idx, widths.shape[-1], geom)
    return x, -log_dy, 1.0 / r0, 1.0 / r1


class IntervalSpline:
    """Rational-quadratic spline of ``[0, 1]`` with ``n_bins`` bins, from raw parameters.

    Layout (``n_params = 3 n_bins + 1``): ``[width logits (K), height logits (K), derivative raws (K+1)]``;
    widths and heights ``m + (1 - K m) softmax(raw)``, derivatives ``d_min + softplus(raw + c)`` with
    ``c`` such that raw zeros give ``d = 1``. All-zero parameters give the identity.
    """

    def __init__(self, n_bins: int = 8, *, min_bin_fraction: float = 1e-3, min_derivative: float = 1e-3) -> None:
        self._d_offset = check_spline_settings(n_bins, min_bin_fraction, min_derivative)
        self.n_bins = int(n_bins)
        self.min_bin_fraction = float(min_bin_fraction)
        self.min_derivative = float(min_derivative)
        self.n_params = 3 * self.n_bins + 1

    def __repr__(self) -> str:
        return f"IntervalSpline(n_bins={self.n_bins})"

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if params.shape[-1] != self.n_params:
            raise ValueError(f"IntervalSpline needs {self.n_params} parameters, got {params.shape[-1]}")
        k, m = self.n_bins, self.min_bin_fraction
        w = m + (1.0 - k * m) * torch.softmax(params[..., :k], dim=-1)
        h = m + (1.0 - k * m) * torch.softmax(params[..., k : 2 * k], dim=-1)
        d = self.min_derivative + F.softplus(params[..., 2 * k :] + self._d_offset)
        return w, h, d

    def forward(
        self, x: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [...]``, ``params [..., n_params]`` -> ``(y, log dy/dx, y/x, (1-y)/(1-x))``, each ``[...]``."""
        return interval_spline_forward(x, *self._split(params))

    def inverse(
        self, y: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y [...]`` -> ``(x, log dx/dy, x/y, (1-x)/(1-y))``, each ``[...]``."""
        return interval_spline_inverse(y, *self._split(params))


# ------------------------------------------------------------------ canonical cell


def cell_phases(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical lift of eigenphases: sorted descending, summing to 0, spread at most ``2 pi``.

    Parameters
    ----------
    phi
        Principal eigenphases ``[..., N]`` in ``(-pi, pi]`` (any order) of SU(N) matrices.

    Returns
    -------
    theta : torch.Tensor
        ``[..., N]``, ``theta_1 >= ... >= theta_N >= theta_1 - 2 pi``, ``sum theta = 0`` (up to rounding).
    perm : torch.Tensor
        ``[..., N]`` long, ``theta_k = lift(phi)[perm_k]``.
    """
    n = phi.shape[-1]
    k = torch.round(phi.detach().sum(-1) / TWO_PI)
    rank = torch.argsort(torch.argsort(phi.detach(), dim=-1), dim=-1)  # 0 = smallest
    kk = k[..., None]
    down = (kk > 0) & (rank >= n - kk)
    up = (kk < 0) & (rank < -kk)
    lifted = phi - TWO_PI * down.to(phi.dtype) + TWO_PI * up.to(phi.dtype)
    perm = torch.argsort(lifted.detach(), dim=-1, descending=True, stable=True)
    return torch.gather(lifted, -1, perm), perm


def _gaps(theta: torch.Tensor) -> torch.Tensor:
    """Gaps ``[..., N]`` (``>= 0``, sum ``2 pi``) of canonical phases ``[..., N]``."""
    inner = theta[..., :-1] - theta[..., 1:]
    last = TWO_PI - (theta[..., :1] - theta[..., -1:])
    return torch.cat([inner, last], dim=-1).clamp_min(0.0)


def _stick_break(x: torch.Tensor) -> torch.Tensor:
    """Barycentric ``x [..., N]`` -> stick-breaking ``u [..., N-1]`` in ``[0, 1]`` (0 where undefined)."""
    rest = torch.flip(torch.cumsum(torch.flip(x, [-1]), dim=-1), [-1])[..., :-1]  # sum_{j >= k} x_j
    ok = rest > 0
    return torch.where(ok, x[..., :-1] / torch.where(ok, rest, 1.0), 0.0).clamp(0.0, 1.0)


def _stick_join(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_stick_break`: ``u [..., N-1]`` -> ``x [..., N]``."""
    one_minus = 1.0 - u
    head = torch.cumprod(torch.cat([torch.ones_like(u[..., :1]), one_minus], dim=-1), dim=-1)
    return torch.cat([u * head[..., :-1], head[..., -1:]], dim=-1)


def _from_gaps(g: torch.Tensor) -> torch.Tensor:
    """Canonical phases ``[..., N]`` with ``sum = 0`` from gaps ``g [..., N]`` (the last one implied)."""
    offs = torch.cat([torch.zeros_like(g[..., :1]), torch.cumsum(g[..., :-1], dim=-1)], dim=-1)
    return offs.mean(dim=-1, keepdim=True) - offs


def _pair_ratios(g: torch.Tensor, rho: torch.Tensor, g_new: torch.Tensor) -> torch.Tensor:
    """``R_ij = sin(A'_ij/2) / sin(A_ij/2)`` ``[..., P]`` over pairs ``i < j`` (``combinations`` order)."""
    n = g.shape[-1]
    out = []
    for i, j in combinations(range(n), 2):
        inside = torch.zeros(n, dtype=torch.bool, device=g.device)
        inside[i:j] = True
        a_in = g[..., inside].sum(-1)
        use_in = (a_in <= math.pi).unsqueeze(-1)
        arc = torch.where(use_in, inside, ~inside).to(g.dtype)  # the shorter arc, length <= pi
        a = (g * arc).sum(-1)
        a_new = (g_new * arc).sum(-1)
        ok = a > 0
        mean_rho = (rho * arc).sum(-1) / arc.sum(-1)
        ratio = torch.where(ok, (rho * g * arc).sum(-1) / torch.where(ok, a, 1.0), mean_rho)
        out.append(ratio * torch.sinc(a_new / TWO_PI) / torch.sinc(a / TWO_PI))
    return torch.stack(out, dim=-1)


def haar_log_weyl(phi: torch.Tensor) -> torch.Tensor:
    """``log |Delta(phi)|^2 = sum_{i<j} log |e^{i phi_i} - e^{i phi_j}|^2`` ``[...]`` for phases ``[..., N]``."""
    n = phi.shape[-1]
    pairs = combinations(range(n), 2)
    terms = [torch.log(4.0 * torch.sin(0.5 * (phi[..., i] - phi[..., j])).square()) for i, j in pairs]
    return torch.stack(terms, dim=-1).sum(-1)


# ------------------------------------------------------------------ eigenbasis and recomposition


def _unitary_eigenbasis(w: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors ``V`` ``[..., N, N]`` of unitary ``w`` ``[..., N, N]`` (no gradient).

    ``Z = e^{-i alpha} w`` with ``alpha`` chosen so that ``-1`` sits in the middle of the largest gap of
    the spectrum of ``Z``, at least ``pi / N`` away from every eigenvalue; then
    ``H = i (1 - Z)(1 + Z)^{-1}`` is Hermitian with eigenvalues ``tan((theta - alpha) / 2)`` and
    ``torch.linalg.eigh(H)`` gives an orthonormal eigenbasis of ``w``, also for degenerate spectra.
    """
    with torch.no_grad():
        n = w.shape[-1]
        phi, _ = torch.sort(torch.angle(torch.linalg.eigvals(w)), dim=-1)
        nxt = torch.cat([phi[..., 1:], phi[..., :1] + TWO_PI], dim=-1)
        gap = nxt - phi
        k = torch.argmax(gap, dim=-1, keepdim=True)
        mid = torch.gather(phi + 0.5 * gap, -1, k).squeeze(-1)  # centre of the largest gap
        alpha = mid - math.pi  # so that Z = e^{-i alpha} w has no eigenvalue near -1
        z = w * torch.polar(torch.ones_like(alpha), -alpha)[..., None, None]
        eye = torch.eye(n, dtype=w.dtype, device=w.device)
        h = 1j * torch.linalg.solve(eye + z, eye - z, left=False)  # (1 - Z)(1 + Z)^{-1}, commuting factors
        h = 0.5 * (h + h.transpose(-2, -1).conj())
        _, v = torch.linalg.eigh(h)
    return v


class _SpectralRecompose(torch.autograd.Function):
    """``W' = V diag(mu) V^dagger`` with the Daleckii-Krein backward (module docstring)."""

    @staticmethod
    def forward(ctx, w, mu, v, gamma):  # type: ignore[override]
        ctx.save_for_backward(mu, v, gamma)
        return (v * mu.unsqueeze(-2)) @ v.transpose(-2, -1).conj()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        mu, v, gamma = ctx.saved_tensors
        vh = v.transpose(-2, -1).conj()
        g = vh @ grad @ v
        g_mu = torch.diagonal(g, dim1=-2, dim2=-1)
        off = gamma.conj() * g
        off = off - torch.diag_embed(torch.diagonal(off, dim1=-2, dim2=-1))
        g_w = v @ off @ vh
        return g_w, g_mu, None, None


def spectral_map(
    w: torch.Tensor, params: torch.Tensor, spline: IntervalSpline, *, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the spectral map ``W -> h(W)`` (or its inverse) to SU(N) matrices.

    Parameters
    ----------
    w
        SU(N) matrices ``[..., N, N]`` (complex), ``N >= 2``.
    params
        Raw spline parameters ``[..., N-1, spline.n_params]``, one spline per stick-breaking coordinate.
    spline
        The :class:`IntervalSpline`.
    inverse
        Apply ``h^{-1}`` (same parameters).

    Returns
    -------
    w_new : torch.Tensor
        ``[..., N, N]`` in SU(N), same eigenvectors as ``w``.
    log_j : torch.Tensor
        Real ``[...]``, ``log`` of the Jacobian of the applied map with respect to the Haar measure.
    """
    n = w.shape[-1]
    if n < 2 or w.shape[-2] != n or not w.is_complex():
        raise ValueError(f"spectral_map needs complex SU(N) matrices [..., N, N] with N >= 2, got {list(w.shape)}")
    if tuple(params.shape[-2:]) != (n - 1, spline.n_params) or params.shape[:-2] != w.shape[:-2]:
        raise ValueError(
            f"params must have shape [{', '.join(map(str, w.shape[:-2]))}, {n - 1}, {spline.n_params}], "
            f"got {list(params.shape)}"
        )
    v = _unitary_eigenbasis(w)
    lam = torch.diagonal(v.transpose(-2, -1).conj() @ w @ v, dim1=-2, dim2=-1)
    theta, perm = cell_phases(torch.angle(lam))
    g = _gaps(theta)
    u = _stick_break(g / TWO_PI)
    step = spline.inverse if inverse else spline.forward
    u_new, log_d, a, b = step(u, params.to(u.dtype))
    g_new = TWO_PI * _stick_join(u_new)
    theta_new = _from_gaps(g_new)
    # gap ratios g'_k / g_k: a_k prod_{j<k} b_j (k < N) and prod_{j<N} b_j
    cb = torch.cumprod(torch.cat([torch.ones_like(b[..., :1]), b], dim=-1), dim=-1)
    rho = torch.cat([a * cb[..., :-1], cb[..., -1:]], dim=-1)
    r = _pair_ratios(g, rho, g_new)
    expo = torch.arange(n - 2, -1, -1, dtype=u.dtype, device=u.device)  # N-1-j for j = 1..N-1
    log_j = log_d.sum(-1) + (expo * torch.log(b)).sum(-1) + 2.0 * torch.log(r).sum(-1)
    # Gamma in sorted order, then in the eigenvector order of V
    pairs = list(combinations(range(n), 2))
    gam = torch.zeros((*theta.shape, n), dtype=w.dtype, device=w.device)
    for p, (i, j) in enumerate(pairs):
        phase = 0.5 * (theta_new[..., i] + theta_new[..., j] - theta[..., i] - theta[..., j])
        val = torch.polar(r[..., p], phase)
        gam[..., i, j] = val
        gam[..., j, i] = val
    inv = torch.argsort(perm, dim=-1)
    mu = torch.polar(torch.ones_like(theta_new), torch.gather(theta_new, -1, inv))
    idx_r = inv.unsqueeze(-1).expand(*inv.shape, n)
    gam = torch.gather(gam, -2, idx_r)
    gam = torch.gather(gam, -1, inv.unsqueeze(-2).expand(*inv.shape[:-1], n, n))
    w_new = _SpectralRecompose.apply(w, mu, v, gam.detach())
    return w_new, log_j
