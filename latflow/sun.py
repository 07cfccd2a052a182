"""SU(N) group numerics and SU(N) lattice gauge fields, in any dimension d >= 2.

Layout (docs/DESIGN.md): links ``U`` of shape ``[B, d, L0, ..., L{d-1}, N, N]``, complex
(``complex64`` or ``complex128``), with ``U_mu(x)`` living on the link from ``x`` to ``x + mu``.
Axis 0 of the lattice is time. Group elements elsewhere are ``[..., N, N]`` with any leading
shape; algebra elements are traceless anti-Hermitian ``[..., N, N]``.

Conventions
-----------
- Plaquette ``P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger``, planes in the
  order of :func:`latflow.gauge.planes`.
- Wilson action ``S = -(beta / N) sum_x sum_{mu < nu} Re tr P_{mu nu}(x)``.
- Gauge transformation ``U_mu(x) -> Omega(x) U_mu(x) Omega(x+mu)^dagger``.
- Algebra normalisation: ``P = i sum_a p_a T_a`` with ``tr(T_a T_b) = delta_ab / 2``, so that
  ``tr(P^dagger P) = (1/2) sum_a p_a^2`` (the HMC kinetic energy for unit-variance ``p_a``).

``N = 1`` is accepted by the lattice functions (``1 x 1`` links ``exp(i theta)``, i.e. U(1)),
which cross-checks orientations against :mod:`latflow.gauge`; the group functions need
``N >= 1`` and are only meaningful for ``N >= 2``.

Nothing here holds global state or a default device: every random draw takes a
``torch.Generator`` held by the caller, and outputs follow the inputs' dtype and device.
"""

from __future__ import annotations

import math

import torch

from .gauge import planes
from .lattice import shift

__all__ = [
    "dagger",
    "haar_sun",
    "project_sun",
    "reunitarize",
    "traceless_antihermitian",
    "expm_su",
    "logm_su",
    "eigenphases",
    "random_algebra",
    "algebra_norm2",
    "sun_plaquettes",
    "sun_staples",
    "sun_gauge_transform",
    "wilson_action",
    "plaquette_mean",
    "polyakov_loop",
]


def dagger(m: torch.Tensor) -> torch.Tensor:
    """Hermitian conjugate of the last two axes, ``[..., N, N] -> [..., N, N]``."""
    return m.transpose(-2, -1).conj()


def _check_square(m: torch.Tensor, what: str) -> int:
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{what} must have shape [..., N, N], got {list(m.shape)}")
    if not m.is_complex():
        raise ValueError(f"{what} must be complex, got {m.dtype}")
    return m.shape[-1]


def _remove_det_phase(u: torch.Tensor) -> torch.Tensor:
    """Divide unitary ``u`` ``[..., N, N]`` by ``det(u)^(1/N)`` on the principal branch.

    With ``det(u) = |det| exp(i phi)``, ``phi`` in ``(-pi, pi]``, the result is
    ``u exp(-i phi / N)``, whose determinant is ``exp(i phi) exp(-i phi) = 1`` up to rounding
    (the branch is the same for the phase removed and the phase of the determinant, so no
    ``N``-th root of unity is left over).
    """
    n = u.shape[-1]
    phi = torch.angle(torch.linalg.det(u))
    phase = torch.polar(torch.ones_like(phi), -phi / n)
    return u * phase[..., None, None]


def haar_sun(
    shape: tuple[int, ...],
    n: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Haar-random SU(N) matrices.

    QR decomposition ``Z = Q R`` of a complex Gaussian matrix ``Z`` (i.i.d. standard complex
    normal entries), with the phases of the diagonal of ``R`` moved into ``Q``
    (``Q -> Q diag(R_ii / |R_ii|)``), gives Haar-distributed U(N) (Mezzadri 2007). Dividing by
    ``det(Q)^(1/N)`` on the principal branch (:func:`project_sun` uses the same map) commutes
    with left multiplication by SU(N), so it pushes the U(N) Haar measure forward to the
    SU(N) Haar measure.

    Parameters
    ----------
    shape
        Leading shape ``(...)`` of the batch of matrices.
    n
        ``N >= 1`` (``N = 1`` gives the identity).
    generator
        Random stream (held by the caller, on ``device``).
    dtype
        ``torch.complex64`` or ``torch.complex128``.
    device
        Of the result.

    Returns
    -------
    torch.Tensor
        ``[*shape, N, N]`` unitary with ``det = 1`` up to rounding.
    """
    if n < 1:
        raise ValueError(f"SU(N) needs N >= 1, got {n}")
    if not dtype.is_complex:
        raise ValueError(f"SU(N) matrices are complex, got dtype {dtype}")
    z = torch.randn((*tuple(shape), n, n), generator=generator, dtype=dtype, device=device)
    q, r = torch.linalg.qr(z)
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    q = q * (diag / diag.abs())[..., None, :]
    return _remove_det_phase(q)


def project_sun(m: torch.Tensor) -> torch.Tensor:
    """Reunitarise: the unitary polar factor of ``m`` with its determinant phase removed.

    With the SVD ``m = W S V^dagger``, the unitary polar factor ``W V^dagger`` is the U(N)
    element nearest to ``m`` (Frobenius norm); dividing it by ``det^(1/N)`` on the principal
    branch makes the determinant 1. For ``m = U (1 + eps X)``, ``U`` in SU(N), the result is
    ``U exp(eps ta(X)) + O(eps^2)`` with ``ta(X)`` the traceless anti-Hermitian part of ``X``,
    i.e. the nearest SU(N) element to first order in ``eps``; a perturbation normal to SU(N)
    (``X`` Hermitian plus an imaginary multiple of the identity) is removed up to ``O(eps^2)``.
    Idempotent on SU(N) (up to rounding). Not differentiable where ``m`` is singular.

    Parameters
    ----------
    m
        Complex ``[..., N, N]``.

    Returns
    -------
    torch.Tensor
        ``[..., N, N]`` in SU(N).
    """
    _check_square(m, "project_sun input")
    w, _, vh = torch.linalg.svd(m)
    return _remove_det_phase(w @ vh)


reunitarize = project_sun


def traceless_antihermitian(m: torch.Tensor) -> torch.Tensor:
    """``ta(m) = (m - m^dagger) / 2 - tr(m - m^dagger) / (2 N)``, the projection onto su(N), ``[..., N, N]``."""
    n = _check_square(m, "traceless_antihermitian input")
    a = 0.5 * (m - dagger(m))
    tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    return a - (tr / n)[..., None, None] * eye


def expm_su(a: torch.Tensor) -> torch.Tensor:
    """Exponential of traceless anti-Hermitian ``a`` ``[..., N, N]``, in SU(N).

    Uses ``torch.linalg.matrix_exp`` (scaling and squaring with a Pade/Taylor approximant,
    differentiable); no projection is applied, so the input is expected in su(N) and the result
    is unitary with unit determinant up to rounding.
    """
    _check_square(a, "expm_su input")
    return torch.linalg.matrix_exp(a)


def logm_su(u: torch.Tensor) -> torch.Tensor:
    """Traceless anti-Hermitian logarithm of SU(N) matrices, ``[..., N, N] -> [..., N, N]``.

    From the eigendecomposition ``u = V diag(exp(i phi)) V^{-1}`` (``torch.linalg.eig``), as
    ``V diag(i phi) V^{-1}`` projected onto su(N) (:func:`traceless_antihermitian`, which only
    removes rounding). The principal eigenphases ``phi`` in ``(-pi, pi]`` sum to ``2 pi k``;
    where ``k = 0`` (for instance whenever ``sum_i |phi_i| < 2 pi``, and for SU(2) everywhere
    except ``-1``) this is the principal logarithm. Where ``k != 0`` the ``|k|`` largest
    (``k > 0``) or smallest (``k < 0``) phases are shifted by ``-+2 pi`` so that the result stays
    traceless and ``expm_su(logm_su(u)) = u`` still holds. Ill-defined at eigenphases ``+-pi``
    (the branch cut), where nearby inputs give logarithms far apart. Not meant for autograd
    (the eigenvector gradient is singular at degenerate eigenvalues); use :func:`eigenphases`
    for differentiable class functions.
    """
    _check_square(u, "logm_su input")
    lam, v = torch.linalg.eig(u)
    phi = _sum_zero_phases(torch.angle(lam))
    d = torch.complex(torch.zeros_like(phi), phi)
    log = torch.linalg.solve(v, v * d[..., None, :], left=False)  # V diag(i phi) V^{-1}
    return traceless_antihermitian(log)


def _sum_zero_phases(phi: torch.Tensor) -> torch.Tensor:
    """Shift the ``|k|`` extreme entries of ``phi`` ``[..., N]`` by ``-2 pi sign(k)`` so they sum to 0."""
    n = phi.shape[-1]
    k = torch.round(phi.sum(-1) / (2 * math.pi))
    rank = torch.argsort(torch.argsort(phi, dim=-1), dim=-1).to(phi.dtype)  # 0 = smallest
    kk = k[..., None]
    down = (kk > 0) & (rank >= n - kk)
    up = (kk < 0) & (rank < -kk)
    return phi - 2 * math.pi * down.to(phi.dtype) + 2 * math.pi * up.to(phi.dtype)


def eigenphases(u: torch.Tensor) -> torch.Tensor:
    """Sorted principal eigenphases of SU(N) matrices, differentiable.

    ``phi_i = arg(lambda_i)`` in ``(-pi, pi]`` of the eigenvalues ``lambda_i`` of ``u``
    (``torch.linalg.eigvals``), sorted ascending; their sum is ``0 mod 2 pi`` for ``u`` in SU(N).

    Gradient: ``torch.linalg.eigvals`` back-propagates with
    ``grad_u = V^{-dagger} diag(grad_lambda) V^dagger``, which contains no ``1 / (lambda_i - lambda_j)``
    factors (those arise only from eigenvector gradients, which are not used). The gradient
    is therefore finite at degenerate points (the identity, centre elements
    ``exp(2 pi i k / N) 1``, and partly degenerate spectra), and it is the exact derivative of any
    symmetric function of the phases (a class function); for a single phase of a degenerate
    eigenvalue, which is not differentiable there, it is one finite element of the
    subgradient that depends on the eigenvector basis returned. ``arg`` is smooth because
    ``|lambda| = 1`` on the group. The phases jump where one crosses ``+-pi`` (the sort and the
    branch cut); they are continuous elsewhere.

    Parameters
    ----------
    u
        Complex ``[..., N, N]`` (SU(N); any matrix with non-zero eigenvalues is accepted, as
        autograd checks need).

    Returns
    -------
    torch.Tensor
        Real ``[..., N]`` (``float64`` for ``complex128``), ascending.
    """
    _check_square(u, "eigenphases input")
    phi = torch.angle(torch.linalg.eigvals(u))
    return torch.sort(phi, dim=-1).values


def random_algebra(
    shape: tuple[int, ...],
    n: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gaussian traceless anti-Hermitian matrices (HMC momenta).

    ``P = i sum_{a=1}^{N^2-1} p_a T_a`` with i.i.d. ``p_a ~ N(0, 1)`` and generators normalised by
    ``tr(T_a T_b) = delta_ab / 2``; equivalently the density is ``propto exp(-tr(P^dagger P))``
    on su(N). Hence ``<tr(P^dagger P)> = (N^2 - 1) / 2``, ``<|P_ij|^2> = 1/2`` for ``i != j``,
    and ``<|P_ii|^2> = (N - 1) / (2 N)``. Built without generators: the anti-Hermitian part of
    a complex Gaussian matrix with ``<|Z_ij|^2> = 1``, with its trace removed.

    Parameters
    ----------
    shape
        Leading shape ``(...)``.
    n
        ``N >= 1`` (``N = 1`` gives zeros).
    generator
        Random stream (held by the caller, on ``device``).
    dtype, device
        Of the result (complex dtype).

    Returns
    -------
    torch.Tensor
        ``[*shape, N, N]`` traceless anti-Hermitian.
    """
    if n < 1:
        raise ValueError(f"su(N) needs N >= 1, got {n}")
    if not dtype.is_complex:
        raise ValueError(f"su(N) matrices are complex, got dtype {dtype}")
    z = torch.randn((*tuple(shape), n, n), generator=generator, dtype=dtype, device=device)
    # ta(z) = (z - z^dagger)/2 - trace: off-diagonal entries have <|.|^2> = 1/2, the diagonal i N(0, 1/2)
    return traceless_antihermitian(z)


def algebra_norm2(a: torch.Tensor) -> torch.Tensor:
    """``tr(a^dagger a) = sum_ij |a_ij|^2``, real ``[...]`` for ``a`` ``[..., N, N]`` (``(1/2) sum_a p_a^2``)."""
    _check_square(a, "algebra_norm2 input")
    return (a.real.square() + a.imag.square()).sum(dim=(-2, -1))


# --- lattice fields ---------------------------------------------------------------


def _check_links(u: torch.Tensor) -> int:
    """Lattice dimension d of links ``[B, d, L0, ..., L{d-1}, N, N]``; ``ValueError`` otherwise."""
    if u.dim() < 6 or u.shape[1] != u.dim() - 4 or u.shape[-1] != u.shape[-2]:
        raise ValueError(
            f"SU(N) links must have shape [B, d, L0, ..., L{{d-1}}, N, N] with d >= 2, got {list(u.shape)}"
        )
    if not u.is_complex():
        raise ValueError(f"SU(N) links must be complex, got {u.dtype}")
    return u.shape[1]


def _re_tr(m: torch.Tensor) -> torch.Tensor:
    """``Re tr m``, ``[..., N, N] -> [...]``."""
    return torch.diagonal(m, dim1=-2, dim2=-1).real.sum(-1)


def _plaquette(u: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """``U_mu(x) U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger``, ``[B, L..., N, N]``."""
    u_mu, u_nu = u[:, mu], u[:, nu]
    return u_mu @ shift(u_nu, mu) @ dagger(shift(u_mu, nu)) @ dagger(u_nu)


def sun_plaquettes(u: torch.Tensor) -> torch.Tensor:
    """Plaquettes of all planes.

    Parameters
    ----------
    u
        Links ``[B, d, L0, ..., L{d-1}, N, N]``.

    Returns
    -------
    torch.Tensor
        ``[B, n_planes, L0, ..., L{d-1}, N, N]``, ``n_planes = d (d-1) / 2`` in the order of
        :func:`latflow.gauge.planes`; entry ``(mu, nu)`` at ``x`` is
        ``U_mu(x) U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger``.
    """
    d = _check_links(u)
    return torch.stack([_plaquette(u, mu, nu) for mu, nu in planes(d)], dim=1)


def sun_staples(u: torch.Tensor, mu: int) -> torch.Tensor:
    """Sum of the staples of the links in direction ``mu``.

    ``A_mu(x) = sum_{nu != mu} [ U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger
    + U_nu(x+mu-nu)^dagger U_mu(x-nu)^dagger U_nu(x-nu) ]``, each term the path from ``x + mu`` back
    to ``x`` that closes ``U_mu(x)`` into a plaquette, so that the ``2 (d-1)`` plaquettes containing
    the link ``(x, mu)`` satisfy ``sum_{p containing (x, mu)} Re tr P_p = Re tr(U_mu(x) A_mu(x))``
    (a plaquette and its reverse have the same ``Re tr``). The Wilson action depends on that link
    only through ``S = -(beta / N) Re tr(U_mu(x) A_mu(x)) + (terms without U_mu(x))``, provided
    every extent ``L_nu``, ``nu != mu``, is at least 2 (then ``A_mu(x)`` does not contain ``U_mu(x)``).

    Parameters
    ----------
    u
        Links ``[B, d, L0, ..., L{d-1}, N, N]``.
    mu
        Link direction, ``0 <= mu < d``.

    Returns
    -------
    torch.Tensor
        ``[B, L0, ..., L{d-1}, N, N]``.
    """
    d = _check_links(u)
    if not 0 <= mu < d:
        raise ValueError(f"direction mu must be in [0, {d}), got {mu}")
    u_mu = u[:, mu]
    total = torch.zeros_like(u_mu)
    for nu in range(d):
        if nu == mu:
            continue
        u_nu = u[:, nu]
        # upper: x+mu -> x+mu+nu -> x+nu -> x
        total = total + shift(u_nu, mu) @ dagger(shift(u_mu, nu)) @ dagger(u_nu)
        # lower: x+mu -> x+mu-nu -> x-nu -> x
        u_nu_down = shift(u_nu, nu, -1)
        total = total + dagger(shift(u_nu_down, mu)) @ dagger(shift(u_mu, nu, -1)) @ u_nu_down
    return total


def sun_gauge_transform(u: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Gauge-transform links: ``U_mu(x) -> Omega(x) U_mu(x) Omega(x+mu)^dagger``.

    Parameters
    ----------
    u
        Links ``[B, d, L0, ..., L{d-1}, N, N]``.
    omega
        SU(N) field ``[B, L0, ..., L{d-1}, N, N]`` (or ``[L0, ..., L{d-1}, N, N]``, applied to all),
        e.g. from :func:`haar_sun`.

    Returns
    -------
    torch.Tensor
        Transformed links ``[B, d, L0, ..., L{d-1}, N, N]``.
    """
    d = _check_links(u)
    if tuple(omega.shape[-d - 2 :]) != tuple(u.shape[2:]):
        raise ValueError(f"gauge field {list(omega.shape)} does not match links {list(u.shape)}")
    if omega.dim() == d + 2:
        omega = omega.unsqueeze(0)
    if omega.dim() != d + 3:
        raise ValueError(f"gauge field must be [B, L..., N, N] or [L..., N, N], got {list(omega.shape)}")
    return torch.stack([omega @ u[:, mu] @ dagger(shift(omega, mu)) for mu in range(d)], dim=1)


def wilson_action(u: torch.Tensor, beta: float) -> torch.Tensor:
    """Wilson action ``S = -(beta / N) sum_x sum_{mu < nu} Re tr P_{mu nu}(x)``.

    Parameters
    ----------
    u
        Links ``[B, d, L0, ..., L{d-1}, N, N]``.
    beta
        Coupling ``beta = 2 N / g^2``.

    Returns
    -------
    torch.Tensor
        Real ``[B]``; ``-beta n_planes V`` for the cold start (identity links).
    """
    _check_links(u)
    n = u.shape[-1]
    re_tr = _re_tr(sun_plaquettes(u))
    return -(beta / n) * re_tr.flatten(start_dim=1).sum(dim=1)


def plaquette_mean(u: torch.Tensor) -> torch.Tensor:
    """Average plaquette ``<Re tr P / N>`` over all sites and planes, real ``[B]`` (1 for identity links)."""
    _check_links(u)
    n = u.shape[-1]
    return _re_tr(sun_plaquettes(u)).flatten(start_dim=1).mean(dim=1) / n


def polyakov_loop(u: torch.Tensor, *, traced: bool = True) -> torch.Tensor:
    """Polyakov loop along lattice axis 0 (time) at every spatial site.

    ``L(x_s) = prod_{t=0}^{L0-1} U_0(t, x_s)`` (ordered left to right with increasing ``t``).

    Parameters
    ----------
    u
        Links ``[B, d, L0, L1, ..., L{d-1}, N, N]``.
    traced
        Return ``tr L / N`` (complex ``[B, L1, ..., L{d-1}]``, gauge invariant); otherwise the
        matrices ``L`` ``[B, L1, ..., L{d-1}, N, N]`` (which transform as
        ``Omega(0, x_s) L Omega(0, x_s)^dagger``).
    """
    _check_links(u)
    n = u.shape[-1]
    u0 = u[:, 0]
    loop = u0[:, 0]
    for t in range(1, u0.shape[1]):
        loop = loop @ u0[:, t]
    if not traced:
        return loop
    return torch.diagonal(loop, dim1=-2, dim2=-1).sum(-1) / n
