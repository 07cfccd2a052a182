"""Gauge-equivariant spectral coupling layers for SU(N) links (Boyda et al. 2020, Abbott et al. 2023).

Links are complex ``[B, d, L0, ..., L{d-1}, N, N]`` (:mod:`latflow.sun`), any ``d >= 2``.

How a layer works
-----------------
A layer updates links ``U_mu(x)`` on a sparse set of sites. Each updated link has one **active**
loop, the plaquette of the plane ``(mu, nu)`` that starts with it,
``W(x) = U_mu(x) S(x)``, ``S(x) = U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger``. The layer sets

    U_mu(x) -> U'_mu(x) = h(W(x)) W(x)^dagger U_mu(x) = h(W(x)) S(x)^dagger,

so that the new active plaquette is ``h(W)``, with ``h`` the conjugation-equivariant spectral map of
:mod:`latflow.flows.spectral`. ``S`` contains no updated link, so for fixed ``S`` the map
``U -> h(U S) S^dagger`` is a right translation (Haar preserving), the spectral map, and a right
translation back: its log Jacobian with respect to the Haar measure is that of ``h``, summed over the
active sites. The parameters of ``h`` come from a translation-equivariant convolutional net fed with
``(Re tr P / N, Im tr P / N)`` of the **frozen** plaquettes of every plane (those containing no
updated link; the others are masked to zero), so the Jacobian is triangular. Under a gauge
transformation ``W -> Omega(x) W Omega(x)^dagger``, ``S -> Omega(x+mu) S Omega(x)^dagger`` and the
features are invariant, hence ``U' -> Omega(x) U' Omega(x+mu)^dagger``: the layer is gauge equivariant.

Mask pattern
------------
For direction ``mu``, plane partner ``nu != mu``, stripe ``offset`` in ``0..3`` and (``d >= 3``)
``parity`` in ``{0, 1}``, the updated links are ``U_mu(x)`` with

    x_nu = offset (mod 4)   and   sum_{rho != mu, nu} x_rho = parity (mod 2).

A plaquette of plane ``(mu, nu)`` contains two ``mu``-links ``x`` and ``x + nu`` (stride 4 keeps them
apart); one of plane ``(mu, rho)`` contains ``x`` and ``x + rho`` (the parity separates them). The
classes (active, passive = containing an updated link but not active, frozen = no updated link) are
computed from the links each plaquette contains, and :func:`sun_masks` raises ``ValueError`` where an
extent makes two updated links share a plaquette (``L_nu = 1 mod 4`` or too small, an odd ``L_rho``
with ``d >= 3``). :func:`make_sun_spectral_flow` cycles ``mu`` fastest, then ``offset``, then
``parity``, then ``nu``: every link is updated once per ``4 d`` layers in 2D, ``8 d`` layers for ``d >= 3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..gauge import planes
from ..lattice import Lattice, shift
from ..priors import PriorModule
from ..sun import dagger, haar_sun, sun_plaquettes
from .model import FlowModel, Prior
from .nets import PeriodicConvNet
from .spectral import IntervalSpline, spectral_map

__all__ = [
    "SUNCouplingMasks",
    "sun_masks",
    "SUNHaarPrior",
    "SUNSpectralCoupling",
    "coupling_schedule",
    "sun_coupling_schedule",
    "make_sun_spectral_flow",
]

STRIDE = 4


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.complex128
    if dtype == torch.float32:
        return torch.complex64
    raise ValueError(f"dtype must be torch.float32 or torch.float64 (the real dtype), got {dtype}")


@dataclass(frozen=True)
class SUNCouplingMasks:
    """Masks of one spectral coupling.

    Attributes
    ----------
    mu, nu, offset, parity
        Updated direction, plane partner, stripe offset along ``nu``, parity of the other coordinates.
    links
        ``[d, L0, ..., L{d-1}]`` bool, True on updated links (only channel ``mu``).
    active
        ``[L0, ..., L{d-1}]`` bool: sites ``x`` of the updated links, i.e. of the active plaquettes
        ``P_{mu nu}(x)``.
    frozen, passive
        ``[n_planes, L0, ..., L{d-1}]`` bool, planes in the order of :func:`latflow.gauge.planes`; frozen
        plaquettes contain no updated link, passive ones contain one but are not active.
    """

    mu: int
    nu: int
    offset: int
    parity: int
    links: torch.Tensor
    active: torch.Tensor
    frozen: torch.Tensor
    passive: torch.Tensor


def sun_masks(
    lattice: Lattice, mu: int, nu: int, offset: int, parity: int = 0, device: torch.device | str | None = None
) -> SUNCouplingMasks:
    """Link and plaquette masks of a spectral coupling (module docstring).

    Raises
    ------
    ValueError
        Bad ``mu``, ``nu``, ``offset`` or ``parity``, or extents on which some plaquette would contain two
        updated links.
    """
    d = lattice.dim
    if d < 2:
        raise ValueError(f"SU(N) couplings need d >= 2, got {list(lattice.shape)}")
    if not (0 <= mu < d and 0 <= nu < d and mu != nu):
        raise ValueError(f"need 0 <= mu, nu < {d} with mu != nu, got mu={mu}, nu={nu}")
    if not (isinstance(offset, int) and 0 <= offset < STRIDE):
        raise ValueError(f"offset must be an integer in [0, {STRIDE}), got {offset!r}")
    if parity not in (0, 1) or (d == 2 and parity != 0):
        raise ValueError(f"parity must be 0 or 1 (0 in 2D), got {parity!r}")
    coords = lattice.coordinates(device)
    on = (coords[nu] % STRIDE) == offset
    if d > 2:
        rest = sum(coords[r] for r in range(d) if r not in (mu, nu))
        on = on & ((rest % 2) == parity)
    links = torch.zeros((d, *lattice.shape), dtype=torch.bool, device=device)
    links[mu] = on
    m = links.to(torch.int64)
    counts = []
    for a, b in planes(d):
        # P_ab(x) contains U_a(x), U_b(x+a), U_a(x+b), U_b(x)
        counts.append(m[a] + shift(m[b], a, 1, 0) + shift(m[a], b, 1, 0) + m[b])
    count = torch.stack(counts, dim=0)
    if bool((count > 1).any()):
        raise ValueError(
            f"lattice {list(lattice.shape)} does not fit the spectral-coupling mask (mu={mu}, nu={nu}, "
            f"offset={offset}, parity={parity}): some plaquette would contain two updated links; use "
            f"L_{nu} >= 2 with L_{nu} != 1 (mod {STRIDE}) (ideally a multiple of {STRIDE}) and even extents in the "
            f"other directions"
        )
    frozen = count == 0
    plane_index = planes(d).index((min(mu, nu), max(mu, nu)))
    active_pl = torch.zeros_like(frozen)
    active_pl[plane_index] = on
    passive = (count > 0) & ~active_pl
    return SUNCouplingMasks(mu, nu, offset, parity, links, on, frozen, passive)


def _shift_sites(x: torch.Tensor, mu: int, step: int = 1) -> torch.Tensor:
    """``x(y + step mu)`` for fields ``[B, L0, ..., L{d-1}, ...]`` (lattice axes from 1)."""
    return shift(x, mu, step, 1)


class SUNHaarPrior(PriorModule):
    """Independent Haar-random SU(N) links, ``log r = 0`` with respect to the Haar probability measure.

    Parameters
    ----------
    lattice
        Geometry ``(L0, ..., L{d-1})``.
    n
        ``N``.
    dtype
        The real dtype (``float64`` gives ``complex128`` links, ``float32`` ``complex64``).
    device
        Of the samples.
    """

    def __init__(
        self, lattice: Lattice, n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> None:
        _complex_dtype(dtype)
        super().__init__(dtype, device)
        if int(n) < 2:
            raise ValueError(f"SU(N) needs N >= 2, got {n}")
        self.lattice = lattice
        self.n = int(n)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U [B, d, L..., N, N], log_r [B] = 0)``."""
        shape = (batch_size, self.lattice.dim, *self.lattice.shape)
        u = haar_sun(shape, self.n, generator, dtype=_complex_dtype(self.dtype), device=self.device)
        return u, self.log_prob(u)

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """Zeros ``[B]`` (real dtype)."""
        return torch.zeros(u.shape[0], dtype=self.dtype, device=u.device)

    def force(self, u: torch.Tensor) -> torch.Tensor:
        """The su(N) force of ``-log r``: zero (the Haar density is constant), ``[B, ..., N, N]``."""
        return torch.zeros_like(u)


def _make_net(
    dim: int, c_in: int, c_out: int, hidden: Sequence[int], kernel_size: int, activation: str, zero_init: bool
) -> nn.Module:
    return PeriodicConvNet(dim, c_in, c_out, tuple(hidden), kernel_size, activation=activation, zero_init=zero_init)


class SUNSpectralCoupling(nn.Module):
    """Gauge-equivariant spectral coupling of SU(N) links (module docstring).

    ``forward(U) -> (U', logJ [B])`` and ``reverse(U') -> (U, logJ [B])`` on links
    ``[B, d, L0, ..., L{d-1}, N, N]``; ``logJ`` is with respect to the product Haar measure.

    Parameters
    ----------
    lattice
        Geometry, ``d >= 2``.
    n
        ``N >= 2``.
    mu, nu, offset, parity
        Mask (:func:`sun_masks`).
    spline
        :class:`~latflow.flows.spectral.IntervalSpline` applied to each of the ``N - 1`` cell coordinates.
    net
        ``[B, 2 n_planes, L...] -> [B, (N - 1) spline.n_params, L...]``, translation equivariant.
    """

    def __init__(
        self,
        lattice: Lattice,
        n: int,
        mu: int,
        nu: int,
        offset: int,
        parity: int,
        spline: IntervalSpline,
        net: nn.Module,
    ) -> None:
        super().__init__()
        masks = sun_masks(lattice, mu, nu, offset, parity)
        self.lattice, self.n = lattice, int(n)
        self.mu, self.nu, self.offset, self.parity = mu, nu, offset, parity
        self.spline, self.net = spline, net
        self.register_buffer("frozen_mask", masks.frozen, persistent=False)
        self.register_buffer("active_index", torch.nonzero(masks.active.flatten()).flatten(), persistent=False)

    def extra_repr(self) -> str:
        return f"n={self.n}, mu={self.mu}, nu={self.nu}, offset={self.offset}, parity={self.parity}, {self.spline!r}"

    def _check(self, u: torch.Tensor) -> None:
        expected = (self.lattice.dim, *self.lattice.shape, self.n, self.n)
        if u.dim() != len(expected) + 1 or tuple(u.shape[1:]) != expected or not u.is_complex():
            raise ValueError(f"links must be complex [B, {', '.join(map(str, expected))}], got {list(u.shape)}")

    def _params(self, u: torch.Tensor) -> torch.Tensor:
        """Spline parameters at the active sites, ``[B, n_active, N - 1, n_params]``."""
        tr = torch.diagonal(sun_plaquettes(u), dim1=-2, dim2=-1).sum(-1) / self.n  # [B, n_planes, L...]
        m = self.frozen_mask.to(tr.real.dtype)
        inp = torch.cat([tr.real * m, tr.imag * m], dim=1)
        out = self.net(inp)
        k = (self.n - 1) * self.spline.n_params
        if out.shape[1] != k or tuple(out.shape[2:]) != tuple(self.lattice.shape):
            raise ValueError(f"the net must return [B, {k}, {', '.join(map(str, self.lattice.shape))}]")
        out = out.flatten(2)[:, :, self.active_index].transpose(1, 2)
        return out.reshape(*out.shape[:2], self.n - 1, self.spline.n_params)

    def _transform(self, u: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(u)
        mu, nu = self.mu, self.nu
        b, nn_ = u.shape[0], self.n
        u_mu, u_nu = u[:, mu], u[:, nu]
        staple = _shift_sites(u_nu, mu) @ dagger(_shift_sites(u_mu, nu)) @ dagger(u_nu)  # S(x)
        s_act = staple.flatten(1, -3)[:, self.active_index]  # [B, n_active, N, N]
        link_act = u_mu.flatten(1, -3)[:, self.active_index]
        w = link_act @ s_act
        w_new, log_j = spectral_map(w, self._params(u), self.spline, inverse=inverse)
        new_link = w_new @ dagger(s_act)
        flat = u_mu.flatten(1, -3).index_copy(1, self.active_index, new_link)
        new_mu = flat.view(b, *self.lattice.shape, nn_, nn_)
        out = torch.stack([new_mu if k == mu else u[:, k] for k in range(self.lattice.dim)], dim=1)
        return out, log_j.sum(dim=1)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U [B, d, L..., N, N] -> (U' [B, d, L..., N, N], logJ [B])``."""
        return self._transform(u, inverse=False)

    def reverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse map ``U' -> (U, logJ [B])``, ``logJ`` minus the forward one."""
        return self._transform(u, inverse=True)


def coupling_schedule(dim: int, i: int) -> tuple[int, int, int, int]:
    """``(mu, nu, offset, parity)`` of layer ``i`` of :func:`make_sun_spectral_flow`."""
    mu = i % dim
    offset = (i // dim) % STRIDE
    n_par = 2 if dim > 2 else 1
    parity = (i // (STRIDE * dim)) % n_par
    others = [r for r in range(dim) if r != mu]
    nu = others[(i // (STRIDE * dim * n_par)) % (dim - 1)]
    return mu, nu, offset, parity


def sun_coupling_schedule(lattice: Lattice, n_layers: int) -> list[tuple[int, int, int, int]]:
    """``(mu, nu, offset, parity)`` of the ``n_layers`` couplings of :func:`make_sun_spectral_flow`.

    The cycle of :func:`coupling_schedule`, skipping masks that update no link (offsets beyond a short
    extent ``L_nu < 4``), so every layer acts and each period of the list updates every link once.
    """
    d, out, i = lattice.dim, [], 0
    period = STRIDE * d * (2 if d > 2 else 1) * (d - 1)
    while len(out) < int(n_layers):
        sched = coupling_schedule(d, i)
        if bool(sun_masks(lattice, *sched).links.any()):
            out.append(sched)
        i += 1
        if i >= period and not out:
            raise ValueError(f"no spectral-coupling mask updates a link on lattice {list(lattice.shape)}")
    return out


def make_sun_spectral_flow(
    lattice: Lattice,
    n: int,
    n_layers: int,
    hidden: Sequence[int] = (8, 8),
    kernel_size: int = 3,
    n_bins: int = 8,
    prior: Prior | None = None,
    zero_init: bool = False,
    *,
    activation: str = "leaky_relu",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> FlowModel:
    """Gauge-equivariant spectral flow for SU(N) links: a prior and ``n_layers`` spectral couplings.

    Layer ``i`` uses entry ``i`` of :func:`sun_coupling_schedule`: with all extents multiples of 4, ``4 d``
    layers (2D) or ``8 d`` layers (``d >= 3``) update every link once (fewer where an extent is 2).
    Network weights come from torch's global generator.

    Parameters
    ----------
    lattice
        Geometry, ``d = 2, 3, 4`` (each extent must fit :func:`sun_masks` for the masks used).
    n
        ``N >= 2``.
    n_layers
        Number of couplings (``>= 1``; 0 only with an explicit ``prior``).
    hidden, kernel_size, activation
        Of each coupling's convolutional net.
    n_bins
        Bins of each :class:`~latflow.flows.spectral.IntervalSpline`.
    prior
        Base distribution of links; default :class:`SUNHaarPrior`.
    zero_init
        Zero the last convolution, so every coupling starts as the identity.
    dtype
        The real dtype (links are the matching complex dtype).
    device
        Of the weights and samples.

    Returns
    -------
    FlowModel
        ``sample(B, generator) -> (U [B, d, L..., N, N], log_q [B])``, ``log_q`` with respect to Haar.
    """
    _complex_dtype(dtype)
    d = lattice.dim
    if d not in (2, 3, 4):
        raise ValueError(f"spectral flows support d = 2, 3, 4, got {list(lattice.shape)}")
    if int(n_layers) < 0 or (int(n_layers) == 0 and prior is None):
        raise ValueError(f"n_layers must be a positive integer (0 only with an explicit prior), got {n_layers}")
    n_planes = d * (d - 1) // 2
    layers = []
    for sched in sun_coupling_schedule(lattice, int(n_layers)):
        spline = IntervalSpline(n_bins)
        net = _make_net(d, 2 * n_planes, (n - 1) * spline.n_params, hidden, kernel_size, activation, zero_init)
        layers.append(SUNSpectralCoupling(lattice, n, *sched, spline, net))
    if prior is None:
        prior = SUNHaarPrior(lattice, n, dtype=dtype, device=device)
    return FlowModel(prior, layers).to(dtype=dtype, device=device)
