"""U(1) lattice gauge fields stored as link angles, in any dimension d >= 2.

Layout (docs/DESIGN.md): links ``theta`` of shape ``[B, d, L0, ..., L{d-1}]``,
real, with ``U_mu(x) = exp(i theta[:, mu, x])`` living on the link from ``x`` to
``x + mu``. Axis 0 of the lattice is time. Nothing here knows an action: these
are the group-level pieces (wrapping, plaquettes, staples, gauge transformations,
Haar measure, Wilson and Polyakov loops) that theories and gauge-equivariant flows
build on.

Angles are *not* wrapped by the functions below unless they say so: a plaquette
or loop angle is the plain sum of link angles, so identities such as Stokes'
theorem hold exactly (up to rounding) and ``exp(i angle)`` is the group element.
Wrap with :func:`wrap_angle` where a principal value is needed (the geometric
topological charge).

Plane order: the ``n_planes = d (d - 1) / 2`` planes ``(mu, nu)`` with ``mu < nu``
in lexicographic order, ``(0, 1), (0, 2), ..., (0, d-1), (1, 2), ..., (d-2, d-1)``;
see :func:`planes` and :func:`plane_index`.
"""

from __future__ import annotations

import math

import torch

from .lattice import Lattice, shift
from .priors import PriorModule

__all__ = [
    "wrap_angle",
    "planes",
    "plane_index",
    "u1_plaquette_angles",
    "u1_staples",
    "random_u1_gauge_transform",
    "u1_gauge_transform",
    "UniformU1Prior",
    "u1_wilson_loops",
    "u1_polyakov_loop",
]

_TWO_PI = 2.0 * math.pi


def _check_links(theta: torch.Tensor) -> int:
    """Lattice dimension d of links ``[B, d, L0, ..., L{d-1}]``; ``ValueError`` otherwise."""
    if theta.dim() < 4 or theta.shape[1] != theta.dim() - 2:
        raise ValueError(f"U(1) links must have shape [B, d, L0, ..., L{{d-1}}] with d >= 2, got {list(theta.shape)}")
    if theta.is_complex():
        raise ValueError("U(1) links are real angles, got a complex tensor")
    return theta.shape[1]


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Principal value of angles in the half-open interval ``(-pi, pi]``.

    ``wrap_angle(t) = pi - ((pi - t) mod 2 pi)`` with ``mod`` into ``[0, 2 pi)``, so
    ``-pi`` maps to ``+pi`` (the convention of the geometric topological charge).
    Values already in ``(-pi, pi]`` are returned bit for bit, so the map is
    idempotent and leaves equilibrated HMC configurations untouched.

    Parameters
    ----------
    theta
        Real tensor of any shape.

    Returns
    -------
    torch.Tensor
        Same shape and dtype, values in ``(-pi, pi]`` (``pi`` being the dtype's
        rounding of ``math.pi``), equal to ``theta`` modulo ``2 pi`` up to rounding.
    """
    pi = math.pi
    wrapped = pi - torch.remainder(pi - theta, _TWO_PI)
    # remainder may round up to exactly 2 pi for arguments just below a multiple of 2 pi
    wrapped = torch.where(wrapped <= -pi, wrapped + _TWO_PI, wrapped)
    inside = (theta > -pi) & (theta <= pi)
    return torch.where(inside, theta, wrapped)


def planes(d: int) -> list[tuple[int, int]]:
    """The planes ``(mu, nu)``, ``mu < nu``, in the order used for plaquette axes."""
    if d < 2:
        raise ValueError(f"planes need d >= 2, got d = {d}")
    return [(mu, nu) for mu in range(d) for nu in range(mu + 1, d)]


def plane_index(mu: int, nu: int, d: int) -> int:
    """Position of plane ``(mu, nu)`` (``0 <= mu < nu < d``) on the plane axis.

    ``plane_index(mu, nu, d) = mu d - mu (mu + 1) / 2 + (nu - mu - 1)``, e.g.
    ``(0, 1) -> 0`` for any ``d`` and ``(2, 3) -> 5`` for ``d = 4``.
    """
    if not 0 <= mu < nu < d:
        raise ValueError(f"plane_index needs 0 <= mu < nu < d, got mu={mu}, nu={nu}, d={d}")
    return mu * d - mu * (mu + 1) // 2 + (nu - mu - 1)


def _plaquette(theta: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """``theta_mu(x) + theta_nu(x+mu) - theta_mu(x+nu) - theta_nu(x)``, ``[B, L...]``."""
    t_mu, t_nu = theta[:, mu], theta[:, nu]
    return t_mu + shift(t_nu, mu) - shift(t_mu, nu) - t_nu


def u1_plaquette_angles(theta: torch.Tensor) -> torch.Tensor:
    """Plaquette angles of all planes, not wrapped.

    ``theta_{mu nu}(x) = theta_mu(x) + theta_nu(x+mu) - theta_mu(x+nu) - theta_nu(x)``,
    so that ``P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^* U_nu(x)^* = exp(i theta_{mu nu}(x))``.

    Parameters
    ----------
    theta
        Links ``[B, d, L0, ..., L{d-1}]``, ``d >= 2``.

    Returns
    -------
    torch.Tensor
        ``[B, n_planes, L0, ..., L{d-1}]`` with ``n_planes = d (d-1) / 2`` in the
        order of :func:`planes` (entry ``plane_index(mu, nu, d)`` is plane ``(mu, nu)``).
    """
    d = _check_links(theta)
    return torch.stack([_plaquette(theta, mu, nu) for mu, nu in planes(d)], dim=1)


def u1_staples(theta: torch.Tensor, mu: int) -> torch.Tensor:
    """Sum of the staples of the links in direction ``mu``, as a complex field.

    ``A_mu(x) = sum_{nu != mu} [ U_nu(x+mu) U_mu(x+nu)^* U_nu(x)^*
    + U_nu(x+mu-nu)^* U_mu(x-nu)^* U_nu(x-nu) ]``, so that the ``2 (d-1)`` plaquettes
    containing the link ``(x, mu)`` satisfy

    ``sum_{p containing (x, mu)} cos(theta_p) = Re( U_mu(x) A_mu(x) )``

    and the Wilson action depends on that link only through
    ``S = -beta Re(U_mu(x) A_mu(x)) + (terms without theta_mu(x))``, with
    ``dS/dtheta_mu(x) = beta Im(U_mu(x) A_mu(x))``. ``A_mu(x)`` does not depend on
    ``theta_mu(x)`` provided every extent ``L_nu``, ``nu != mu``, is at least 2.

    Parameters
    ----------
    theta
        Links ``[B, d, L0, ..., L{d-1}]``.
    mu
        Link direction, ``0 <= mu < d``.

    Returns
    -------
    torch.Tensor
        Complex ``[B, L0, ..., L{d-1}]`` (``complex128`` for ``float64`` links).
    """
    d = _check_links(theta)
    if not 0 <= mu < d:
        raise ValueError(f"direction mu must be in [0, {d}), got {mu}")
    t_mu = theta[:, mu]
    angles = []
    for nu in range(d):
        if nu == mu:
            continue
        t_nu = theta[:, nu]
        # upper staple: x -> x+mu -> x+mu+nu -> x+nu -> x (without the link itself)
        angles.append(shift(t_nu, mu) - shift(t_mu, nu) - t_nu)
        # lower staple: x+mu -> x+mu-nu -> x-nu -> x
        t_nu_down = shift(t_nu, nu, -1)
        angles.append(-shift(t_nu_down, mu) - shift(t_mu, nu, -1) + t_nu_down)
    a = torch.stack(angles, dim=0)
    return torch.polar(torch.ones_like(a), a).sum(dim=0)


def random_u1_gauge_transform(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Haar-random gauge transformation ``Omega(x) = exp(i alpha(x))``.

    Parameters
    ----------
    shape
        ``(B, L0, ..., L{d-1})``.
    generator
        Random stream (held by the caller).
    dtype, device
        Of the angles.

    Returns
    -------
    torch.Tensor
        ``alpha`` ``[B, L0, ..., L{d-1}]``, independent and uniform in ``(-pi, pi]``.
    """
    u = torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)
    return math.pi - _TWO_PI * u


def u1_gauge_transform(theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Gauge-transform links: ``U_mu(x) -> Omega(x) U_mu(x) Omega(x+mu)^*``.

    In angles ``theta_mu(x) -> alpha(x) + theta_mu(x) - alpha(x+mu)``, not wrapped.

    Parameters
    ----------
    theta
        Links ``[B, d, L0, ..., L{d-1}]``.
    alpha
        Gauge angles ``[B, L0, ..., L{d-1}]`` (or ``[L0, ..., L{d-1}]``, applied to all).

    Returns
    -------
    torch.Tensor
        Transformed links ``[B, d, L0, ..., L{d-1}]``.
    """
    d = _check_links(theta)
    if tuple(alpha.shape[-d:]) != tuple(theta.shape[2:]):
        raise ValueError(f"gauge angles {list(alpha.shape)} do not match links {list(theta.shape)}")
    if alpha.dim() == d:
        alpha = alpha.unsqueeze(0)
    first = alpha.dim() - d
    return torch.stack([alpha + theta[:, mu] - shift(alpha, mu, first_axis=first) for mu in range(d)], dim=1)


class UniformU1Prior(PriorModule):
    """Haar measure on every link: independent angles uniform on the circle.

    The density with respect to ``prod dtheta`` on ``(-pi, pi]^{n_links}`` is
    ``(2 pi)^{-n_links}``, ``n_links = d V``. It is constant, so :meth:`log_prob`
    returns it for any real input (angles are taken modulo ``2 pi``).

    Parameters
    ----------
    lattice
        The geometry; configurations have shape ``(d, L0, ..., L{d-1})``.
    dtype, device
        Of the samples.
    """

    def __init__(
        self,
        lattice: Lattice,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dtype, device)
        if lattice.dim < 2:
            raise ValueError(f"gauge links need d >= 2, got lattice shape {list(lattice.shape)}")
        self.lattice = lattice
        self.shape = (lattice.dim, *lattice.shape)
        self.n_links = lattice.dim * lattice.volume

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` configurations.

        Returns
        -------
        theta : ``[B, d, L0, ..., L{d-1}]`` angles in ``(-pi, pi]``
        log_r : ``[B]``, all equal to ``-n_links log(2 pi)``
        """
        u = torch.rand((batch_size, *self.shape), generator=generator, dtype=self.dtype, device=self.device)
        theta = math.pi - _TWO_PI * u
        return theta, self.log_prob(theta)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """Normalised log density ``[B]`` of links ``theta`` ``[B, d, L0, ..., L{d-1}]``."""
        if tuple(theta.shape[1:]) != self.shape:
            raise ValueError(f"links of shape {list(theta.shape)} do not fit the prior's {list(self.shape)}")
        value = -self.n_links * math.log(_TWO_PI)
        return torch.full((theta.shape[0],), value, dtype=theta.dtype, device=theta.device)

    def force(self, theta: torch.Tensor) -> torch.Tensor:
        """``-d log r / dtheta = 0`` ``[B, d, L...]``: the Haar density is constant."""
        return torch.zeros_like(theta)


def _line(t_mu: torch.Tensor, mu: int, length: int) -> torch.Tensor:
    """``sum_{k=0}^{length-1} t_mu(x + k mu)``: angle of a straight line of links, ``[B, L...]``."""
    out = torch.zeros_like(t_mu)
    for k in range(length):
        out = out + (t_mu if k == 0 else shift(t_mu, mu, k))
    return out


def u1_wilson_loops(theta: torch.Tensor, mu: int, nu: int, R: int, T: int) -> torch.Tensor:
    """Angles of the rectangular ``R x T`` Wilson loops in plane ``(mu, nu)``, one per site.

    The loop starting at ``x`` goes ``R`` links along ``+mu``, ``T`` along ``+nu``, ``R``
    back along ``-mu`` and ``T`` back along ``-nu`` (counter-clockwise in the
    ``(mu, nu)`` plane, the orientation of the plaquette):

    ``W(x) = prod_{k<R} U_mu(x+k mu) prod_{k<T} U_nu(x+R mu+k nu)
    [prod_{k<R} U_mu(x+T nu+k mu)]^* [prod_{k<T} U_nu(x+k nu)]^* = exp(i angle(x))``.

    ``R = T = 1`` gives the plaquette; by Stokes the angle equals the sum of the
    (unwrapped) plaquette angles ``theta_{mu nu}`` inside the rectangle.

    Parameters
    ----------
    theta
        Links ``[B, d, L0, ..., L{d-1}]``.
    mu, nu
        Distinct directions (either order; ``(nu, mu)`` gives the reversed loop of ``(mu, nu)``
        with ``R`` and ``T`` swapped, i.e. minus that angle).
    R, T
        Extents along ``mu`` and ``nu`` (positive integers).

    Returns
    -------
    torch.Tensor
        Loop angles ``[B, L0, ..., L{d-1}]``, not wrapped.
    """
    d = _check_links(theta)
    if not (0 <= mu < d and 0 <= nu < d and mu != nu):
        raise ValueError(f"need two distinct directions in [0, {d}), got mu={mu}, nu={nu}")
    if R < 1 or T < 1:
        raise ValueError(f"loop extents must be positive, got R={R}, T={T}")
    line_mu = _line(theta[:, mu], mu, R)
    line_nu = _line(theta[:, nu], nu, T)
    return line_mu + shift(line_nu, mu, R) - shift(line_mu, nu, T) - line_nu


def u1_polyakov_loop(theta: torch.Tensor) -> torch.Tensor:
    """Polyakov loop along lattice axis 0 (time) at every spatial site.

    ``P(x_s) = prod_{t=0}^{L0-1} U_0(t, x_s) = exp(i sum_t theta_0(t, x_s))``.

    Parameters
    ----------
    theta
        Links ``[B, d, L0, L1, ..., L{d-1}]``.

    Returns
    -------
    torch.Tensor
        Complex ``[B, L1, ..., L{d-1}]``.
    """
    _check_links(theta)
    angle = theta[:, 0].sum(dim=1)
    return torch.polar(torch.ones_like(angle), angle)
