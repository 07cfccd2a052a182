"""Invertible elementwise maps of the circle, for gauge-equivariant coupling layers.

Domain convention
-----------------
Every map here acts on angles in the half-open interval ``[0, 2 pi)`` and returns
angles in ``[0, 2 pi)``. Without a rotation each map is a strictly increasing
bijection ``h: [0, 2 pi] -> [0, 2 pi]`` with ``h(0) = 0`` and ``h(2 pi) = 2 pi``,
hence a bijection of the circle; its derivative is continuous across the point
``0 == 2 pi`` (``h'(0) = h'(2 pi)``), so the map is a C^1 diffeomorphism of the
circle. An optional rotation ``y -> (y + t) mod 2 pi`` follows; it does not change
the derivative. Inputs outside ``[0, 2 pi)`` are the caller's business: reduce them
with :func:`to_circle` first (the gauge layers do).

Two families, both taking their parameters *per element* (any batch shape ``[...]``
of angles, with a trailing parameter axis):

- **NCP mixtures** (non-compact projection, Rezende et al. 2020, as used by Kanwar
  et al. 2020): ``g_s(x) = 2 atan(e^s tan(x / 2))`` mixed convexly over ``K``
  components with softmax weights. A convex mixture of increasing maps with the same
  fixed endpoints is again one. Forward and its log-derivative are closed form; the
  inverse is found by Newton's method safeguarded by bisection.
- **Circular rational-quadratic splines** (Durkan et al. 2019, neural spline flows,
  with the circular boundary condition of Rezende et al. 2020): ``K`` bins on
  ``[0, 2 pi]``, ``K`` knot derivatives with the derivative at ``2 pi`` tied to the
  one at ``0``; forward and inverse are both analytic.

Pure functions (:func:`ncp_mixture_forward`, :func:`ncp_mixture_inverse`,
:func:`circular_spline_forward`, :func:`circular_spline_inverse`) take constrained
parameters; the small classes :class:`NCPMixture` and :class:`CircularSpline` map an
unconstrained parameter vector (what a network outputs) onto them, and are what the
coupling layers take as their ``inner`` transform.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "TWO_PI",
    "to_circle",
    "rotate",
    "ncp_forward",
    "ncp_mixture_forward",
    "ncp_mixture_inverse",
    "circular_spline_forward",
    "circular_spline_inverse",
    "CircleTransform",
    "NCPMixture",
    "CircularSpline",
]

TWO_PI = 2.0 * math.pi


def to_circle(x: torch.Tensor) -> torch.Tensor:
    """Reduce angles into ``[0, 2 pi)``.

    ``torch.remainder`` may round ``-tiny`` up to exactly ``2 pi``; such values are
    mapped to ``0``. Differentiable with derivative 1 (away from the cut).

    Parameters
    ----------
    x
        Real tensor of any shape.

    Returns
    -------
    torch.Tensor
        Same shape, values in ``[0, 2 pi)``, equal to ``x`` modulo ``2 pi``.
    """
    r = torch.remainder(x, TWO_PI)
    return torch.where(r >= TWO_PI, r - TWO_PI, r)


def rotate(x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``(x + shift) mod 2 pi`` into ``[0, 2 pi)``; ``shift = None`` returns ``x`` unchanged."""
    if shift is None:
        return x
    return to_circle(x + shift)


def _check_trailing(x: torch.Tensor, params: torch.Tensor, name: str) -> None:
    if params.shape[:-1] != x.shape:
        raise ValueError(
            f"{name} must have shape [*x.shape, K] = [{', '.join(map(str, x.shape))}, K], got {list(params.shape)}"
        )


# --------------------------------------------------------------------------- NCP


def ncp_forward(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One NCP component ``g_s(x) = 2 atan(e^s tan(x/2))`` on ``[0, 2 pi]``.

    Evaluated as ``2 atan2(e^s sin(x/2), cos(x/2))``, which is continuous through
    ``x = pi`` and returns values in ``[0, 2 pi]`` for ``x`` in ``[0, 2 pi]``.
    The derivative is ``g'(x) = e^s / (cos^2(x/2) + e^{2s} sin^2(x/2))``, with
    ``g'(0) = g'(2 pi) = e^s`` and ``g'(pi) = e^{-s}``.

    Parameters
    ----------
    x
        Angles ``[...]`` in ``[0, 2 pi]``.
    s
        Log-concentration ``[...]`` (broadcast against ``x``); ``e^{2s}`` must be finite.

    Returns
    -------
    y : torch.Tensor
        ``g_s(x)``, broadcast shape of ``x`` and ``s``.
    log_dy_dx : torch.Tensor
        ``log g_s'(x)``, same shape.
    """
    alpha = torch.exp(s)
    half = 0.5 * x
    sn, cs = torch.sin(half), torch.cos(half)
    y = 2.0 * torch.atan2(alpha * sn, cs)
    denom = cs * cs + (alpha * sn) ** 2
    return y, s - torch.log(denom)


def _ncp_mixture_eval(x: torch.Tensor, s: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture value ``[...]`` and log-derivative ``[...]`` at ``x`` (no rotation)."""
    y_k, logd_k = ncp_forward(x.unsqueeze(-1), s)
    w = torch.exp(log_w)
    y = (w * y_k).sum(dim=-1)
    log_dy = torch.logsumexp(log_w + logd_k, dim=-1)
    return y, log_dy


def ncp_mixture_forward(
    x: torch.Tensor,
    s: torch.Tensor,
    logits: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex mixture of NCP maps, optionally followed by a rotation.

    ``y = ( sum_k w_k g_{s_k}(x) + t ) mod 2 pi`` with ``w = softmax(logits)``.

    Parameters
    ----------
    x
        Angles ``[...]`` in ``[0, 2 pi)``.
    s
        Log-concentrations ``[..., K]``.
    logits
        Unnormalised mixture weights ``[..., K]``.
    shift
        Rotation angle ``t`` ``[...]``, or ``None`` for no rotation.

    Returns
    -------
    y : torch.Tensor
        ``[...]`` in ``[0, 2 pi)`` (in ``[0, 2 pi]`` when ``shift is None``).
    log_dy_dx : torch.Tensor
        ``[...]``, ``log sum_k w_k g_{s_k}'(x)``.
    """
    _check_trailing(x, s, "s")
    _check_trailing(x, logits, "logits")
    y, log_dy = _ncp_mixture_eval(x, s, torch.log_softmax(logits, dim=-1))
    return rotate(y, shift), log_dy


def ncp_mixture_inverse(
    y: torch.Tensor,
    s: torch.Tensor,
    logits: torch.Tensor,
    shift: torch.Tensor | None = None,
    *,
    tol: float = 1e-13,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`ncp_mixture_forward`.

    The rotation is undone first; then ``f(x) = sum_k w_k g_k(x) - y = 0`` is solved
    elementwise on the bracket ``[0, 2 pi]`` by Newton's method, falling back to
    bisection whenever a Newton step leaves the current bracket (so it always
    converges, however steep the map). The iteration runs without autograd until
    every Newton step is below ``tol`` (floored at a few ulps of ``2 pi`` of the dtype);
    a final Newton step is then taken *with* autograd, which leaves the value
    unchanged to rounding but gives the exact implicit derivatives
    ``dx/dy = 1 / f'(x)`` and ``dx/dtheta = -(df/dtheta) / f'(x)``.

    Parameters
    ----------
    y
        Angles ``[...]`` in ``[0, 2 pi)``.
    s, logits, shift
        As in :func:`ncp_mixture_forward`.
    tol
        Absolute tolerance on the Newton step (radians).
    max_iter
        Iteration cap; ``RuntimeError`` if not converged by then.

    Returns
    -------
    x : torch.Tensor
        ``[...]`` in ``[0, 2 pi]``.
    log_dx_dy : torch.Tensor
        ``[...]``, ``-log f'(x)`` (the log-derivative of the inverse map).
    """
    _check_trailing(y, s, "s")
    _check_trailing(y, logits, "logits")
    log_w = torch.log_softmax(logits, dim=-1)
    target = y if shift is None else to_circle(y - shift)
    eps_tol = 8.0 * torch.finfo(y.dtype).eps * TWO_PI
    tol = max(float(tol), eps_tol)
    with torch.no_grad():
        t_d, s_d, lw_d = target.detach(), s.detach(), log_w.detach()
        lo = torch.zeros_like(t_d)
        hi = torch.full_like(t_d, TWO_PI)
        x = t_d.clone()
        for _ in range(max_iter):
            fx, log_d = _ncp_mixture_eval(x, s_d, lw_d)
            fx = fx - t_d
            lo = torch.where(fx <= 0, x, lo)
            hi = torch.where(fx >= 0, x, hi)
            newton = x - fx * torch.exp(-log_d)
            inside = (newton > lo) & (newton < hi)
            x_new = torch.where(inside, newton, 0.5 * (lo + hi))
            step = (x_new - x).abs()
            # a root hit exactly (fx == 0) gives lo == hi == x, and the step is 0
            x = x_new
            if x.numel() == 0 or bool(step.max() <= tol):
                break
        else:
            raise RuntimeError(f"NCP mixture inverse did not converge in {max_iter} iterations")
    # one more Newton step, attached to the graph (implicit-function derivatives)
    fx, log_d = _ncp_mixture_eval(x, s, log_w)
    x = x - (fx - target) * torch.exp(-log_d.detach())
    _, log_d = _ncp_mixture_eval(x, s, log_w)
    return x, -log_d


# ------------------------------------------------------------------------ spline


def check_spline_settings(n_bins: int, min_bin_fraction: float, min_derivative: float) -> float:
    """Validate a rational-quadratic spline's bin count, minimal bin fraction and minimal derivative; return the
    softplus offset that makes raw derivative parameters of zero give ``d = 1``."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    if not 0 <= min_bin_fraction * n_bins < 1:
        raise ValueError(f"need 0 <= n_bins * min_bin_fraction < 1, got {n_bins} * {min_bin_fraction}")
    if not 0 < min_derivative < 1:
        raise ValueError(f"min_derivative must lie in (0, 1), got {min_derivative}")
    return math.log(math.expm1(1.0 - float(min_derivative)))


def cumulative_knots(w: torch.Tensor, total: float) -> torch.Tensor:
    """Knots ``[..., K+1]`` from ``0`` to exactly ``total`` for positive bin sizes ``w`` ``[..., K]`` (normalised)."""
    c = torch.cumsum(w, dim=-1)
    c = total * c / c[..., -1:]
    zero = torch.zeros_like(c[..., :1])
    full = torch.full_like(c[..., :1], total)
    return torch.cat([zero, c[..., :-1], full], dim=-1)


def _spline_knots(
    widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knot positions ``[..., K+1]`` (x and y, from 0 to exactly 2 pi) and derivatives ``[..., K+1]``."""
    if not (widths.shape == heights.shape == derivatives.shape):
        raise ValueError(
            "widths, heights and derivatives must have the same shape [..., K], got "
            f"{list(widths.shape)}, {list(heights.shape)}, {list(derivatives.shape)}"
        )

    d = torch.cat([derivatives, derivatives[..., :1]], dim=-1)  # circular: d_K = d_0
    return cumulative_knots(widths, TWO_PI), cumulative_knots(heights, TWO_PI), d


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, -1, idx.unsqueeze(-1)).squeeze(-1)


def _bin_geometry(xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For the bins ``idx`` ``[...]``: left knot ``(x0, y0)``, knot derivatives ``d0, d1``, width, height."""
    x0, y0 = _gather(xk, idx), _gather(yk, idx)
    w = _gather(xk, idx + 1) - x0
    h = _gather(yk, idx + 1) - y0
    return x0, y0, _gather(d, idx), _gather(d, idx + 1), w, h


def rq_bin_position(
    y: torch.Tensor, y0: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor, w: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """Position ``xi`` in ``[0, 1]`` within its bin of the rational-quadratic spline value ``y`` (the inverse map):
    the numerically stable root of the bin's quadratic (Durkan et al. 2019)."""
    sig = h / w
    dy = y - y0
    c2 = d1 + d0 - 2.0 * sig
    a = h * (sig - d0) + dy * c2
    b = h * d0 - dy * c2
    c = -sig * dy
    disc = (b * b - 4.0 * a * c).clamp_min(0.0)
    return ((2.0 * c) / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)


def _bin(v: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Index ``k`` in ``[0, K-1]`` of the bin ``[knots_k, knots_{k+1})`` holding ``v``."""
    return (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(dim=-1)


def circular_spline_forward(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular rational-quadratic spline, optionally followed by a rotation.

    Bin ``k`` spans ``[x_k, x_{k+1}]`` (width ``w_k``) in input and ``[y_k, y_{k+1}]``
    (height ``h_k``) in output; with slope ``sigma_k = h_k / w_k`` and
    ``xi = (x - x_k) / w_k`` (Durkan et al. 2019, eq. 4)::

        y = y_k + h_k (sigma_k xi^2 + d_k xi (1 - xi)) / (sigma_k + (d_{k+1} + d_k - 2 sigma_k) xi (1 - xi))

    and the derivative at knot ``k`` is ``d_k``; the circular condition ``d_K = d_0``
    makes the derivative continuous across ``0 == 2 pi``.

    Parameters
    ----------
    x
        Angles ``[...]`` in ``[0, 2 pi)``.
    widths, heights
        Positive bin sizes ``[..., K]``, normalised here to sum to ``2 pi``.
    derivatives
        Positive derivatives ``[..., K]`` at the knots ``0, ..., K-1``.
    shift
        Rotation angle ``[...]`` or ``None``.

    Returns
    -------
    y : torch.Tensor
        ``[...]`` in ``[0, 2 pi)`` (``[0, 2 pi]`` without rotation).
    log_dy_dx : torch.Tensor
        ``[...]``.
    """
    _check_trailing(x, widths, "widths")
    xk, yk, d = _spline_knots(widths, heights, derivatives)
    idx = _bin(x, xk)
    x0, y0, d0, d1, w, h = _bin_geometry(xk, yk, d, idx)
    sig = h / w
    xi = ((x - x0) / w).clamp(0.0, 1.0)
    xi1 = xi * (1.0 - xi)
    denom = sig + (d1 + d0 - 2.0 * sig) * xi1
    y = y0 + h * (sig * xi * xi + d0 * xi1) / denom
    num = sig * sig * (d1 * xi * xi + 2.0 * sig * xi1 + d0 * (1.0 - xi) ** 2)
    log_dy = torch.log(num) - 2.0 * torch.log(denom)
    return rotate(y, shift), log_dy


def circular_spline_inverse(
    y: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic inverse of :func:`circular_spline_forward` (root of the bin's quadratic).

    Returns
    -------
    x : torch.Tensor
        ``[...]`` in ``[0, 2 pi]``.
    log_dx_dy : torch.Tensor
        ``[...]``, minus the forward log-derivative at ``x``.
    """
    _check_trailing(y, widths, "widths")
    target = y if shift is None else to_circle(y - shift)
    xk, yk, d = _spline_knots(widths, heights, derivatives)
    idx = _bin(target, yk)
    x0, y0, d0, d1, w, h = _bin_geometry(xk, yk, d, idx)
    xi = rq_bin_position(target, y0, d0, d1, w, h)
    sig = h / w
    x = x0 + xi * w
    xi1 = xi * (1.0 - xi)
    denom = sig + (d1 + d0 - 2.0 * sig) * xi1
    num = sig * sig * (d1 * xi * xi + 2.0 * sig * xi1 + d0 * (1.0 - xi) ** 2)
    return x, 2.0 * torch.log(denom) - torch.log(num)


# ------------------------------------------------------- parameterised transforms


@runtime_checkable
class CircleTransform(Protocol):
    """An elementwise circle bijection driven by an unconstrained parameter vector.

    ``forward(x [...], params [..., n_params]) -> (y [...], log dy/dx [...])`` and
    ``inverse(y, params) -> (x, log dx/dy)``, angles in ``[0, 2 pi)``.
    """

    n_params: int

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _check_params(x: torch.Tensor, params: torch.Tensor, n: int, name: str) -> None:
    if params.shape[:-1] != x.shape or params.shape[-1] != n:
        raise ValueError(
            f"{name} expects params of shape [*x.shape, {n}] = [{', '.join(map(str, (*x.shape, n)))}], "
            f"got {list(params.shape)}"
        )


class NCPMixture:
    """Mixture of ``n_mix`` NCP maps plus an optional rotation, from raw parameters.

    Parameter layout along the last axis (``n_params = 2 n_mix + rotate``):
    ``[s_1 .. s_K, logit_1 .. logit_K, (t)]``. The log-concentrations are bounded
    softly, ``s = s_max tanh(raw / s_max)`` (``s_max = None``: unbounded), which keeps
    ``e^{2s}`` finite in float32 and the inverse well conditioned. Raw zeros give the
    identity map.

    Parameters
    ----------
    n_mix
        Number of components ``K >= 1``.
    rotate
        Follow the mixture by a rotation by the last parameter.
    s_max
        Soft bound on ``|s|`` (positive), or ``None``.
    tol, max_iter
        Passed to :func:`ncp_mixture_inverse`.
    """

    def __init__(
        self,
        n_mix: int = 6,
        *,
        rotate: bool = True,
        s_max: float | None = 8.0,
        tol: float = 1e-13,
        max_iter: int = 200,
    ) -> None:
        if int(n_mix) < 1:
            raise ValueError(f"n_mix must be a positive integer, got {n_mix}")
        if s_max is not None and not s_max > 0:
            raise ValueError(f"s_max must be positive or None, got {s_max}")
        self.n_mix = int(n_mix)
        self.rotate = bool(rotate)
        self.s_max = None if s_max is None else float(s_max)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.n_params = 2 * self.n_mix + int(self.rotate)

    def __repr__(self) -> str:
        return f"NCPMixture(n_mix={self.n_mix}, rotate={self.rotate}, s_max={self.s_max})"

    def _split(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        _check_params(x, params, self.n_params, "NCPMixture")
        k = self.n_mix
        s = params[..., :k]
        if self.s_max is not None:
            s = self.s_max * torch.tanh(s / self.s_max)
        logits = params[..., k : 2 * k]
        shift = params[..., 2 * k] if self.rotate else None
        return s, logits, shift

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [...]`` in ``[0, 2 pi)``, ``params [..., n_params]`` -> ``(y [...], log dy/dx [...])``."""
        return ncp_mixture_forward(x, *self._split(x, params))

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y [...]`` in ``[0, 2 pi)`` -> ``(x [...], log dx/dy [...])``."""
        s, logits, shift = self._split(y, params)
        return ncp_mixture_inverse(y, s, logits, shift, tol=self.tol, max_iter=self.max_iter)


class CircularSpline:
    """Circular rational-quadratic spline with ``n_bins`` bins, from raw parameters.

    Parameter layout (``n_params = 3 n_bins + rotate``):
    ``[width logits (K), height logits (K), derivative raws (K), (t)]``.
    Widths and heights are ``2 pi (m + (1 - K m) softmax(raw))`` with ``m`` the minimum
    bin fraction; derivatives ``d_min + softplus(raw + c)`` with ``c`` chosen so that a
    raw zero gives ``d = 1``. Raw zeros give the identity map.

    Parameters
    ----------
    n_bins
        Number of bins ``K >= 1``.
    rotate
        Follow the spline by a rotation by the last parameter.
    min_bin_fraction
        Minimal width and height of a bin as a fraction of ``2 pi`` (``K m < 1``).
    min_derivative
        Lower bound ``d_min`` of the knot derivatives (``0 < d_min < 1``).
    """

    def __init__(
        self,
        n_bins: int = 8,
        *,
        rotate: bool = False,
        min_bin_fraction: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        self._d_offset = check_spline_settings(n_bins, min_bin_fraction, min_derivative)
        self.n_bins = int(n_bins)
        self.rotate = bool(rotate)
        self.min_bin_fraction = float(min_bin_fraction)
        self.min_derivative = float(min_derivative)
        self.n_params = 3 * self.n_bins + int(self.rotate)

    def __repr__(self) -> str:
        return f"CircularSpline(n_bins={self.n_bins}, rotate={self.rotate})"

    def _split(
        self, x: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        _check_params(x, params, self.n_params, "CircularSpline")
        k, m = self.n_bins, self.min_bin_fraction
        w = m + (1.0 - k * m) * torch.softmax(params[..., :k], dim=-1)
        h = m + (1.0 - k * m) * torch.softmax(params[..., k : 2 * k], dim=-1)
        d = self.min_derivative + F.softplus(params[..., 2 * k : 3 * k] + self._d_offset)
        shift = params[..., 3 * k] if self.rotate else None
        return w, h, d, shift

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [...]`` in ``[0, 2 pi)``, ``params [..., n_params]`` -> ``(y [...], log dy/dx [...])``."""
        return circular_spline_forward(x, *self._split(x, params))

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y [...]`` in ``[0, 2 pi)`` -> ``(x [...], log dx/dy [...])``."""
        return circular_spline_inverse(y, *self._split(y, params))
