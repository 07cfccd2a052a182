"""Field manifolds: the geometry HMC needs from a field (momenta, kinetic energy, drift, kick, force).

Each field lives on a manifold: real scalars on ``R^n``, U(1) link angles on the torus, SU(N) links on
``SU(N)^{links}``. A :class:`FieldManifold` supplies everything molecular dynamics needs, so that
:class:`latflow.samplers.hmc.HMC` is written once for all of them and a new group is one class here:

- ``random_momenta(x, generator)``: momenta ``p`` conjugate to ``x`` with density ``propto exp(-kinetic(p))``;
- ``kinetic(p)``: the kinetic energy ``[B]`` (float64);
- ``drift(x, p, eps)``: the position update along ``p`` for a time ``eps``;
- ``kick(p, force, eps)``: the momentum update ``p - eps * force``;
- ``force(action, x)``: the derivative of ``S`` along the manifold's directions, in the coordinates of ``p``;
- ``project(x)``: the map back onto the manifold (or to a canonical representative), applied once per trajectory.

Gauge manifolds (:class:`U1Angles`, :class:`SUN`) also have ``links(x)`` (the complex links of the field) and
``link_force(G, x)`` (the force in the coordinates of ``p`` from a closed-form gradient ``G = dS/dU`` in torch's
convention ``dS = Re tr(G^dagger dU)``), used by the pseudofermion forces, which never differentiate a solver.

``drift`` and ``kick`` may update their first argument in place and return it (the integrator passes private
copies); callers must use the returned tensor.

SU(N) conventions (those of :mod:`latflow.sun`): momenta ``P = i sum_a p_a T_a`` in su(N) on every link,
``tr(T_a T_b) = delta_ab / 2``, ``p_a ~ N(0, 1)``, so the kinetic energy is
``sum_links tr(P^dagger P) = (1/2) sum p_a^2`` and :func:`latflow.sun.random_algebra` draws exactly
``exp(-kinetic)``. The drift is ``U -> expm(eps P) U`` (left multiplication), so ``p_a`` are canonical momenta
of the coordinates ``q_a`` in ``U = exp(i q_a T_a) U_0`` and Hamilton's equations read
``dp_a/dt = -d_a S`` with the left Lie derivative ``d_a S = d/dt S(exp(i t T_a) U)|_{t=0}``. In matrix form the
force is ``F = i sum_a T_a d_a S`` and the kick ``P -> P - eps F``. With ``G = dS/dU`` as torch autograd
returns it for real ``S`` of complex ``U`` (``dS = Re tr(G^dagger dU)``):

``d_a S = Re tr(G^dagger i T_a U) = Re tr(i T_a U G^dagger)``, hence
``F = -(1/2) ta(U G^dagger) = (1/2) ta(G U^dagger)``,

with ``ta`` the traceless anti-Hermitian part (:func:`latflow.sun.traceless_antihermitian`). Equivalently, for
any ``Y`` in su(N): ``d/dt S(exp(t Y) U)|_0 = 2 Re tr(Y^dagger F)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from .gauge import wrap_angle
from .sun import algebra_norm2, dagger, expm_su, project_sun, random_algebra, traceless_antihermitian

__all__ = [
    "FieldManifold",
    "Euclidean",
    "U1Angles",
    "SUN",
    "MANIFOLDS",
    "manifold_for",
    "action_gradient",
]


def action_gradient(action: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``dS/dx`` ``[B, ...]`` by autograd for ``x`` ``[B, ...]`` (torch's convention for complex ``x``)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(action(xg).sum(), xg)
    return grad


@runtime_checkable
class FieldManifold(Protocol):
    """The geometry of a field for molecular dynamics (see the module docstring for the contract)."""

    name: str

    def random_momenta(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def kinetic(self, p: torch.Tensor) -> torch.Tensor: ...

    def drift(self, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor: ...

    def kick(self, p: torch.Tensor, force: torch.Tensor, eps: float) -> torch.Tensor: ...

    def force(self, action: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor: ...

    def project(self, x: torch.Tensor) -> torch.Tensor: ...


class Euclidean:
    """Real fields ``x`` ``[B, ...]`` on ``R^n``: unit-mass Gaussian momenta, ``K = p^2 / 2``, ``x -> x + eps p``."""

    name = "real"

    def random_momenta(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard normal ``p`` ``[B, ...]`` of the shape, dtype and device of ``x``."""
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    def kinetic(self, p: torch.Tensor) -> torch.Tensor:
        """``sum p^2 / 2`` per configuration, float64 ``[B]``."""
        return 0.5 * p.flatten(1).pow(2).sum(1, dtype=torch.float64)

    def drift(self, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        """``x + eps p`` (in place on ``x``), ``[B, ...]``."""
        return x.add_(p, alpha=eps)

    def kick(self, p: torch.Tensor, force: torch.Tensor, eps: float) -> torch.Tensor:
        """``p - eps force`` (in place on ``p``), ``[B, ...]``."""
        return p.add_(force, alpha=-eps)

    def force(self, action: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``dS/dx`` ``[B, ...]`` by autograd."""
        return action_gradient(action, x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class U1Angles(Euclidean):
    """U(1) link angles ``theta`` ``[B, d, L...]``: Euclidean dynamics; projection wraps into ``(-pi, pi]``."""

    name = "u1"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`latflow.gauge.wrap_angle` (bit for bit on angles already in ``(-pi, pi]``)."""
        return wrap_angle(x)

    def links(self, x: torch.Tensor) -> torch.Tensor:
        """Complex links ``exp(i theta)`` ``[B, d, L...]`` of the angles ``x``."""
        return torch.polar(torch.ones_like(x), x)

    def link_force(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``dS/dtheta = Re(conj(G) i U) = -Im(U conj(G))`` ``[B, d, L...]`` from ``G = dS/dU`` (torch convention)."""
        return -(self.links(x) * grad.conj()).imag


class SUN:
    """SU(N) links ``U`` ``[B, ..., N, N]`` (complex; lattice layout ``[B, d, L0, ..., N, N]``).

    Momenta are su(N) matrices of the same shape; conventions in the module docstring.

    Parameters
    ----------
    n
        ``N >= 2``.
    """

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ValueError(f"SUN needs N >= 2, got {n}")
        self.n = int(n)
        self.name = f"su{self.n}"

    def _check(self, x: torch.Tensor) -> None:
        if not x.is_complex() or x.dim() < 3 or x.shape[-2:] != (self.n, self.n):
            raise ValueError(f"{self.name} fields must be complex [B, ..., {self.n}, {self.n}], got {list(x.shape)}")

    def random_momenta(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gaussian su(N) momenta ``[B, ..., N, N]`` with density ``propto exp(-tr(P^dagger P))`` per link."""
        self._check(x)
        return random_algebra(tuple(x.shape[:-2]), self.n, generator, dtype=x.dtype, device=x.device)

    def kinetic(self, p: torch.Tensor) -> torch.Tensor:
        """``sum_links tr(P^dagger P)`` (``= (1/2) sum p_a^2``), float64 ``[B]``."""
        return algebra_norm2(p).flatten(1).sum(1, dtype=torch.float64)

    def drift(self, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        """``U -> expm(eps P) U`` ``[B, ..., N, N]`` (a new tensor)."""
        return expm_su(eps * p) @ x

    def kick(self, p: torch.Tensor, force: torch.Tensor, eps: float) -> torch.Tensor:
        """``P - eps F`` (in place on ``p``), ``[B, ..., N, N]``."""
        return p.add_(force, alpha=-eps)

    def lie_force(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``F = (1/2) ta(G U^dagger)`` ``[B, ..., N, N]`` from the autograd gradient ``G = dS/dU``."""
        return 0.5 * traceless_antihermitian(grad @ dagger(x))

    def links(self, x: torch.Tensor) -> torch.Tensor:
        """The links themselves (the field is already complex ``[B, d, L..., N, N]``)."""
        return x

    def link_force(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`lie_force`: ``F = (1/2) ta(G U^dagger)`` from a closed-form ``G = dS/dU`` (e.g. pseudofermions)."""
        return self.lie_force(grad, x)

    def force(self, action: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Left Lie derivative of ``S`` as an su(N) matrix ``F = i sum_a T_a d_a S`` ``[B, ..., N, N]``."""
        return self.lie_force(action_gradient(action, x), x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`latflow.sun.project_sun` (removes the rounding drift off SU(N))."""
        return project_sun(x)

    def __repr__(self) -> str:
        return f"SUN({self.n})"


MANIFOLDS: dict[str, Callable[[], FieldManifold]] = {
    "real": Euclidean,
    "u1": U1Angles,
    "su2": lambda: SUN(2),
    "su3": lambda: SUN(3),
}


def manifold_for(name: str, n: int | None = None) -> FieldManifold:
    """The manifold called ``name`` (``"real"``, ``"u1"``, ``"su2"``, ``"su3"``, or ``"sun"`` with ``n``)."""
    key = name.lower()
    if key == "sun":
        if n is None:
            raise ValueError("manifold 'sun' needs n")
        return SUN(n)
    if key not in MANIFOLDS:
        raise ValueError(f"unknown manifold {name!r}; known: {sorted(MANIFOLDS)} and 'sun'")
    return MANIFOLDS[key]()
