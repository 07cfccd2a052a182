"""Gauge-equivariant coupling layers for U(1) links (Kanwar et al. 2020, arXiv:2003.06413).

Links are angles ``theta`` ``[B, d, L0, ..., L{d-1}]`` (docs/DESIGN.md); only
``d = 2`` is implemented (``[B, 2, L0, L1]``, one plaquette plane ``(0, 1)``).

How a layer works
-----------------
A layer updates the links ``U_mu(x)`` of one direction ``mu`` on a sparse set of
sites, chosen such that every plaquette ``P(x) = P_01(x)`` contains at most one
updated link. The plaquettes then fall into three classes:

- **active**: ``P(x)`` at the same site ``x`` as an updated link ``U_mu(x)``; it
  contains that link (and no other updated one) with orientation sign
  ``sigma = +1`` for ``mu = 0`` (bottom edge) and ``sigma = -1`` for ``mu = 1``
  (left edge), since ``theta_01(x) = theta_0(x) + theta_1(x+0) - theta_0(x+1) - theta_1(x)``;
- **passive**: the other plaquette containing an updated link (at ``x - nu_hat``,
  ``nu = 1 - mu``); it changes, but only as a consequence of the update;
- **frozen**: plaquettes containing no updated link; they are unchanged.

Each active plaquette angle ``P`` (reduced to ``[0, 2 pi)``) is moved by an
invertible circle map, ``P' = h(P | frozen)``, whose parameters come from a
:class:`~latflow.flows.nets.PeriodicConvNet` fed with ``(cos, sin)`` of the frozen
plaquettes (and optionally of frozen 2x1 / 1x2 rectangles), every other position
masked to zero. The updated link absorbs the change,
``theta_mu(x) -> theta_mu(x) + sigma (P'(x) - P(x))``, so its active plaquette becomes
``P'`` exactly. Plaquettes and loops are gauge invariant, so the shift is gauge
invariant, and the map commutes with gauge transformations. In the link angles the
Jacobian is triangular (the conditioner sees only non-updated links; each updated link
enters its own active plaquette with unit weight), so
``log J = sum_{active x} log h'(P(x))``. Output angles are wrapped into ``(-pi, pi]``,
which changes no log-determinant.

Mask pattern
------------
For direction ``mu`` and ``offset`` in ``0..3`` (with ``nu = 1 - mu``):

- updated links: ``U_mu(x)`` for all ``x`` with ``x_nu = offset (mod 4)``;
- active plaquettes: ``P(x)`` with ``x_nu = offset (mod 4)``;
- passive: ``P(x)`` with ``x_nu = offset - 1 (mod 4)``;
- frozen: ``P(x)`` with ``x_nu = offset + 1`` or ``offset + 2 (mod 4)``.

This holds verbatim when ``4 | L_nu``. For other extents the updated links are the
same rule ``x_nu = offset (mod 4)`` on ``0 <= x_nu < L_nu`` and the plaquette classes
are computed from which links each plaquette actually contains, so the stripes near
the boundary may differ; :func:`u1_masks` raises ``ValueError`` if two updated links
end up in one active plaquette (e.g. ``L_nu = 1`` or ``L_nu = 1 (mod 4)`` with
``offset = 0``). Cycling ``mu`` over ``{0, 1}`` and ``offset`` over ``0..3`` updates every
link once per 8 layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..gauge import UniformU1Prior, u1_plaquette_angles, u1_wilson_loops, wrap_angle
from ..lattice import Lattice
from .circular import CircleTransform, CircularSpline, NCPMixture, to_circle
from .model import FlowModel, Prior
from .nets import PeriodicConvNet

__all__ = [
    "U1CouplingMasks",
    "u1_masks",
    "LOOP_KINDS",
    "conditioner_channels",
    "GaugeEquivariantCoupling",
    "make_u1_equivariant_flow",
]

STRIDE = 4


def _loop_plaq(theta: torch.Tensor) -> torch.Tensor:
    return u1_plaquette_angles(theta)[:, 0]


def _loop_2x1(theta: torch.Tensor) -> torch.Tensor:
    return u1_wilson_loops(theta, 0, 1, 2, 1)


def _loop_1x2(theta: torch.Tensor) -> torch.Tensor:
    return u1_wilson_loops(theta, 0, 1, 1, 2)


# name in ``loops`` -> the loop functions it stands for (links [B, 2, L0, L1] -> angles [B, L0, L1])
LOOP_KINDS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "plaq": (_loop_plaq,),
    "2x1": (_loop_2x1, _loop_1x2),
}


def conditioner_channels(loops: Sequence[str] = ("plaq",)) -> int:
    """Input channels of a coupling's net: ``(cos, sin)`` of every loop type in ``loops``.

    ``"plaq"`` is one loop type, ``"2x1"`` two (the ``2 x 1`` and ``1 x 2`` rectangles).
    """
    _check_loops(loops)
    return 2 * sum(len(LOOP_KINDS[k]) for k in loops)


def _check_loops(loops: Sequence[str]) -> tuple[str, ...]:
    if isinstance(loops, str) or not tuple(loops):
        raise ValueError(f"loops must be a non-empty sequence of {sorted(LOOP_KINDS)}, got {loops!r}")
    loops = tuple(loops)
    bad = [k for k in loops if k not in LOOP_KINDS]
    if bad or len(set(loops)) != len(loops):
        raise ValueError(f"loops must be distinct names from {sorted(LOOP_KINDS)}, got {list(loops)}")
    return loops


@dataclass(frozen=True)
class U1CouplingMasks:
    """Masks of one gauge-equivariant coupling (2D).

    Attributes
    ----------
    mu, offset
        Updated direction and stripe offset.
    links
        ``[2, L0, L1]`` bool, True on updated links (only channel ``mu`` is non-empty).
    active, frozen, passive
        ``[1, L0, L1]`` bool plaquette masks (axis 0 is the plane axis of
        :func:`latflow.gauge.u1_plaquette_angles`); a partition of all plaquettes.
        The active plaquette of updated link ``U_mu(x)`` is ``P(x)``.
    sign
        Orientation ``sigma`` of an updated link in its active plaquette
        (``+1`` for ``mu = 0``, ``-1`` for ``mu = 1``).
    """

    mu: int
    offset: int
    links: torch.Tensor
    active: torch.Tensor
    frozen: torch.Tensor
    passive: torch.Tensor
    sign: int


def _require_2d(lattice: Lattice) -> None:
    if lattice.dim != 2:
        raise NotImplementedError(
            f"gauge-equivariant U(1) couplings are implemented for d = 2 only (one plaquette plane); "
            f"got a {lattice.dim}-dimensional lattice {list(lattice.shape)}"
        )


def u1_masks(lattice: Lattice, mu: int, offset: int, device: torch.device | str | None = None) -> U1CouplingMasks:
    """Link and plaquette masks for updating direction ``mu`` on stripe ``offset`` (2D).

    See the module docstring for the pattern. The plaquette classes are computed from
    the links each plaquette contains, so they are correct for any extents; the
    function checks that every active plaquette contains exactly one updated link.

    Parameters
    ----------
    lattice
        2D geometry ``(L0, L1)``.
    mu
        Direction of the updated links, 0 or 1.
    offset
        Stripe offset, ``0 <= offset < 4``: links ``U_mu(x)`` with ``x_nu = offset (mod 4)``
        are updated, ``nu = 1 - mu``.
    device
        Of the masks.

    Returns
    -------
    U1CouplingMasks

    Raises
    ------
    NotImplementedError
        For ``d != 2``.
    ValueError
        For a bad ``mu`` or ``offset``, or extents on which the pattern puts two updated
        links into one active plaquette.
    """
    _require_2d(lattice)
    if mu not in (0, 1):
        raise ValueError(f"mu must be 0 or 1 in 2D, got {mu}")
    if not (isinstance(offset, int) and 0 <= offset < STRIDE):
        raise ValueError(f"offset must be an integer in [0, {STRIDE}), got {offset!r}")
    nu = 1 - mu
    coords = lattice.coordinates(device)
    on = (coords[nu] % STRIDE) == offset
    links = torch.zeros((2, *lattice.shape), dtype=torch.bool, device=device)
    links[mu] = on
    # how many updated links each plaquette P(x) contains (each edge counted once):
    # edges U_0(x), U_1(x+0), U_0(x+1), U_1(x)
    m = links.to(torch.int64)
    count = m[0] + torch.roll(m[1], -1, 0) + torch.roll(m[0], -1, 1) + m[1]
    active = on
    if bool((count[active] != 1).any()):
        raise ValueError(
            f"lattice {list(lattice.shape)} does not fit the stride-{STRIDE} mask (mu={mu}, offset={offset}): "
            f"some active plaquette would contain two updated links; use L_{nu} >= 2 with L_{nu} != 1 (mod 4), "
            f"ideally a multiple of 4"
        )
    frozen = count == 0
    passive = (count > 0) & ~active
    return U1CouplingMasks(
        mu=mu,
        offset=offset,
        links=links,
        active=active.unsqueeze(0),
        frozen=frozen.unsqueeze(0),
        passive=passive.unsqueeze(0),
        sign=1 if mu == 0 else -1,
    )


def _frozen_loop_mask(
    lattice: Lattice, links: torch.Tensor, loop: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``[L0, L1]`` bool: loops whose angle does not depend on the updated links.

    A loop angle is linear in the link angles; evaluating it on random weights placed on
    the updated links only (zero elsewhere) gives zero exactly when no updated link lies
    on its boundary (links met twice with opposite orientation cancel, rightly so). The
    weights come from a fixed local generator, so the result is deterministic.
    """
    g = torch.Generator().manual_seed(12345)
    w = 1.0 + torch.rand(links.shape, generator=g, dtype=torch.float64)
    probe = (w * links.cpu().to(torch.float64)).unsqueeze(0)
    val = loop(probe)[0]
    return (val.abs() < 1e-9).to(links.device)


class GaugeEquivariantCoupling(nn.Module):
    """Gauge-equivariant coupling for 2D U(1) links (plaquette coupling of Kanwar et al.).

    ``forward(theta) -> (theta', logJ)`` moves every active plaquette ``P`` to
    ``h(P | frozen loops)`` by shifting its updated link (see the module docstring);
    ``reverse`` inverts it.

    Parameters
    ----------
    lattice
        2D geometry (``NotImplementedError`` otherwise).
    mu, offset
        Which links are updated (:func:`u1_masks`).
    inner
        Circle transform on ``[0, 2 pi)`` with ``n_params`` parameters per plaquette,
        e.g. :class:`~latflow.flows.circular.NCPMixture` or
        :class:`~latflow.flows.circular.CircularSpline`.
    net
        Module mapping ``[B, conditioner_channels(loops), L0, L1]`` to
        ``[B, inner.n_params, L0, L1]`` (translation equivariant, e.g. a
        :class:`~latflow.flows.nets.PeriodicConvNet`); its outputs at the active
        plaquettes are the parameters of ``h``.
    loops
        Frozen gauge-invariant inputs of the net: ``"plaq"`` (plaquettes) and/or
        ``"2x1"`` (the ``2 x 1`` and ``1 x 2`` rectangles whose boundary contains no
        updated link; a rectangle straddling an updated link has it in its interior and is
        unchanged by the layer). Each loop type gives two channels, ``cos`` and ``sin``.
    """

    def __init__(
        self,
        lattice: Lattice,
        mu: int,
        offset: int,
        inner: CircleTransform,
        net: nn.Module,
        loops: Sequence[str] = ("plaq",),
    ) -> None:
        super().__init__()
        masks = u1_masks(lattice, mu, offset)
        self.lattice = lattice
        self.mu = mu
        self.offset = offset
        self.sign = masks.sign
        self.inner = inner
        self.net = net
        self.loops = _check_loops(loops)
        self._loop_fns = [fn for k in self.loops for fn in LOOP_KINDS[k]]
        cond = []
        for fn in self._loop_fns:
            if fn is _loop_plaq:
                cond.append(masks.frozen[0])
            else:
                cond.append(_frozen_loop_mask(lattice, masks.links, fn))
        self.register_buffer("link_mask", masks.links, persistent=False)
        self.register_buffer("active_mask", masks.active, persistent=False)
        self.register_buffer("frozen_mask", masks.frozen, persistent=False)
        self.register_buffer("passive_mask", masks.passive, persistent=False)
        self.register_buffer("cond_mask", torch.stack(cond, dim=0), persistent=False)
        self.register_buffer("active_index", torch.nonzero(masks.active[0].flatten()).flatten(), persistent=False)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, offset={self.offset}, inner={self.inner!r}, loops={self.loops}"

    def _check(self, theta: torch.Tensor) -> None:
        expected = (2, *self.lattice.shape)
        if theta.dim() != 4 or tuple(theta.shape[1:]) != expected:
            raise ValueError(f"links must have shape [B, {', '.join(map(str, expected))}], got {list(theta.shape)}")

    def _params(self, theta: torch.Tensor, plaq: torch.Tensor) -> torch.Tensor:
        """Transform parameters at the active plaquettes, ``[B, n_active, n_params]``."""
        angles = [plaq if fn is _loop_plaq else fn(theta) for fn in self._loop_fns]
        a = torch.stack(angles, dim=1)  # [B, n_loops, L0, L1]
        m = self.cond_mask.to(a.dtype)
        inp = torch.cat([torch.cos(a) * m, torch.sin(a) * m], dim=1)
        out = self.net(inp)
        if out.dim() != 4 or out.shape[1] != self.inner.n_params or out.shape[2:] != a.shape[2:]:
            raise ValueError(
                f"the net must return [B, {self.inner.n_params}, {', '.join(map(str, self.lattice.shape))}] "
                f"(inner.n_params channels), got {list(out.shape)}"
            )
        return out.flatten(2)[:, :, self.active_index].transpose(1, 2)

    def _shift_links(self, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Add ``sign * delta`` ``[B, n_active]`` to the updated links and wrap into ``(-pi, pi]``."""
        b = theta.shape[0]
        full = torch.zeros(b, self.lattice.volume, dtype=theta.dtype, device=theta.device)
        full = full.index_copy(1, self.active_index, self.sign * delta).view(b, *self.lattice.shape)
        chans = [theta[:, k] + full if k == self.mu else theta[:, k] for k in range(2)]
        return wrap_angle(torch.stack(chans, dim=1))

    def _active_plaquettes(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plaq = u1_plaquette_angles(theta)[:, 0]  # [B, L0, L1]
        p = to_circle(plaq.flatten(1)[:, self.active_index])  # [B, n_active]
        return plaq, p

    def forward(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map links ``[B, 2, L0, L1]`` to ``(theta' [B, 2, L0, L1], logJ [B])``."""
        self._check(theta)
        plaq, p = self._active_plaquettes(theta)
        params = self._params(theta, plaq)
        p_new, log_d = self.inner.forward(p, params)
        return self._shift_links(theta, p_new - p), log_d.sum(dim=1)

    def reverse(self, theta_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse map ``theta' -> (theta, logJ)``; ``logJ [B]`` is minus the forward one."""
        self._check(theta_new)
        plaq, p_new = self._active_plaquettes(theta_new)
        params = self._params(theta_new, plaq)
        p, log_d = self.inner.inverse(p_new, params)
        return self._shift_links(theta_new, p - p_new), log_d.sum(dim=1)


def make_u1_equivariant_flow(
    lattice: Lattice,
    n_layers: int,
    inner: str = "ncp",
    hidden: Sequence[int] = (8, 8),
    kernel_size: int = 3,
    *,
    n_mix: int = 6,
    n_bins: int = 8,
    rotate: bool | None = None,
    loops: Sequence[str] = ("plaq",),
    activation: str = "leaky_relu",
    zero_init: bool = False,
    prior: Prior | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> FlowModel:
    """Gauge-equivariant flow for 2D U(1): a prior and ``n_layers`` plaquette couplings.

    Layer ``i`` updates direction ``mu = i mod 2`` on stripe ``offset = (i // 2) mod 4``,
    so 8 consecutive layers update every link once. Network weights are drawn from torch's
    global generator (as in :func:`~latflow.flows.model.make_affine_flow`); seed it, or load
    a state dict, for reproducibility.

    Parameters
    ----------
    lattice
        2D geometry.
    n_layers
        Number of couplings (a multiple of 8 touches every link equally often).
    inner
        ``"ncp"`` (:class:`NCPMixture` with ``n_mix`` components) or ``"spline"``
        (:class:`CircularSpline` with ``n_bins`` bins).
    hidden, kernel_size, activation
        Of each coupling's :class:`PeriodicConvNet`.
    n_mix, n_bins
        Size of the inner transform.
    rotate
        Follow the inner map by a learned rotation; default ``True`` for NCP, ``False``
        for splines.
    loops
        Conditioner inputs (see :class:`GaugeEquivariantCoupling`).
    zero_init
        Zero the last convolution, so that every coupling starts as the identity.
    prior
        The base distribution of links ``[B, 2, L0, L1]``: the Haar measure
        (:class:`~latflow.gauge.UniformU1Prior`, the default) or a structure-aware one such as
        :class:`~latflow.plaquette_prior.U1PlaquettePrior`, whose draws the couplings then correct.
        With ``n_layers = 0`` the model is the prior alone.
    dtype, device
        Of the prior samples and the weights.

    Returns
    -------
    FlowModel
        ``sample(B, generator) -> (theta [B, 2, L0, L1] in (-pi, pi], log_q [B])``.
    """
    _require_2d(lattice)
    if int(n_layers) < 0 or (int(n_layers) == 0 and prior is None):
        raise ValueError(f"n_layers must be a positive integer (0 only with a structure-aware prior), got {n_layers}")
    layers = []
    for i in range(int(n_layers)):
        if inner == "ncp":
            tr: CircleTransform = NCPMixture(n_mix, rotate=True if rotate is None else rotate)
        elif inner == "spline":
            tr = CircularSpline(n_bins, rotate=False if rotate is None else rotate)
        else:
            raise ValueError(f"inner must be 'ncp' or 'spline', got {inner!r}")
        net = PeriodicConvNet(
            2,
            conditioner_channels(loops),
            tr.n_params,
            tuple(hidden),
            kernel_size,
            activation=activation,
            zero_init=zero_init,
        )
        layers.append(GaugeEquivariantCoupling(lattice, i % 2, (i // 2) % STRIDE, tr, net, loops))
    if prior is None:
        prior = UniformU1Prior(lattice, dtype=dtype, device=device)
    return FlowModel(prior, layers).to(dtype=dtype, device=device)
