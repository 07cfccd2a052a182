"""Stochastic gradient of ``log det(D^dag D)`` with respect to the links, by noise vectors and CG.

With ``M(theta) = D^dag D`` Hermitian positive definite, ``d log det M = tr(M^{-1} dM)``, and for noise
``eta`` with ``E[eta eta^dag] = 1`` (independent ``+-1`` entries, or complex Gaussian with ``E|eta_i|^2 = 1``)

    tr(M^{-1} dM) = E[eta^dag M^{-1} dM eta].

With ``psi = M^{-1} eta`` solved by CG *without* gradient, the surrogate

    s(theta) = Re[psi^dag M(theta) eta] = Re[(D psi)^dag (D eta)]      (two Wilson applies with autograd)

has ``ds/dtheta = Re[eta^dag M^{-1} (dM/dtheta) eta]``: an unbiased estimate of ``d log det(D^dag D)/dtheta``
(real, since ``M`` is Hermitian). The value of ``s`` carries no information (``|eta|^2`` up to the CG
residual): :meth:`StochasticLogdetGradient.zero_value_term` returns ``s - s.detach()``, exactly zero in
value with the stochastic gradient, to be added to a differentiable action.

Cost per configuration and noise vector: one CG solve on ``D^dag D`` (``O(V)`` per iteration) and two
applies of ``D`` with their backward pass, against ``O(V^3)`` for the dense ``logdet`` and its backward.
The variance of the estimate grows with the condition number of ``M`` (towards the critical kappa);
``n_noise`` vectors per configuration divide it by ``n_noise``.
"""

from __future__ import annotations

from typing import Literal

import torch

from .pseudofermions import complex_gaussian
from .solvers import cg
from .wilson import WilsonDirac, u1_links

__all__ = ["NoiseKind", "noise_vectors", "StochasticLogdetGradient"]

NoiseKind = Literal["z2", "gaussian"]


def noise_vectors(
    shape: tuple[int, ...], generator: torch.Generator, kind: NoiseKind, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Noise ``[*shape]`` (complex ``dtype``) with ``E[eta eta^dag] = 1``: ``"z2"`` (real ``+-1``) or ``"gaussian"``."""
    if kind == "z2":
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        return (2 * bits - 1).to(dtype)
    if kind == "gaussian":
        return complex_gaussian(shape, generator, dtype=dtype, device=device)
    raise ValueError(f"noise must be 'z2' or 'gaussian', got {kind!r}")


class StochasticLogdetGradient:
    """Unbiased noisy gradient of ``log det(D^dag D)`` ``[B]`` with respect to U(1) link angles.

    Parameters
    ----------
    dirac
        The Wilson operator ``D`` (its ``apply`` is differentiable in the links).
    generator
        Random stream of the noise vectors (on the device of the links).
    n_noise
        Noise vectors per configuration, ``>= 1``.
    noise
        ``"z2"`` (independent ``+-1``: no noise from the diagonal of ``M^{-1} dM``) or ``"gaussian"``.
    tol, max_iter
        CG settings of ``psi = (D^dag D)^{-1} eta`` (a residual far below the noise of the estimate suffices).

    Attributes
    ----------
    last_iterations
        ``[B * n_noise]`` CG iterations of the last call (``None`` before the first).
    """

    def __init__(
        self,
        dirac: WilsonDirac,
        generator: torch.Generator,
        *,
        n_noise: int = 1,
        noise: NoiseKind = "z2",
        tol: float = 1e-8,
        max_iter: int = 10_000,
    ) -> None:
        if int(n_noise) < 1:
            raise ValueError(f"n_noise must be >= 1, got {n_noise}")
        if noise not in ("z2", "gaussian"):
            raise ValueError(f"noise must be 'z2' or 'gaussian', got {noise!r}")
        self.dirac = dirac
        self.generator = generator
        self.n_noise = int(n_noise)
        self.noise = noise
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.last_iterations: torch.Tensor | None = None

    def surrogate(self, theta: torch.Tensor) -> torch.Tensor:
        """``(1/n_noise) sum_k Re[psi_k^dag D^dag D eta_k]`` ``[B]`` for U(1) angles ``theta`` ``[B, d, *L]``
        or complex SU(N) links ``[B, d, *L, N, N]``.

        Its gradient with respect to ``theta`` (through ``D`` only; ``psi_k = (D^dag D)^{-1} eta_k`` is a
        constant) is an unbiased estimate of ``d log det(D^dag D) / d theta`` (for complex links in torch's
        convention ``d = Re tr(G^dagger dU)``; :meth:`latflow.manifolds.SUN.lie_force` turns it into a force).
        """
        b, n = theta.shape[0], self.n_noise
        links = theta if theta.is_complex() else u1_links(theta)
        U = links.repeat_interleave(n, dim=0)  # [B * n, *link_shape], differentiable
        eta = noise_vectors((b * n, *self.dirac.field_shape), self.generator, self.noise, U.dtype, theta.device)
        with torch.no_grad():
            Ud = U.detach()
            res = cg(lambda v: self.dirac.apply_normal(Ud, v), eta, tol=self.tol, max_iter=self.max_iter)
        self.last_iterations = res.iterations
        d_psi = self.dirac.apply(U, res.x)
        d_eta = self.dirac.apply(U, eta)
        s = (d_psi.conj() * d_eta).flatten(1).sum(dim=1).real  # [B * n]
        return s.reshape(b, n).mean(dim=1)

    def zero_value_term(self, theta: torch.Tensor) -> torch.Tensor:
        """``s - s.detach()`` ``[B]``: exactly zero in value, the stochastic ``d log det(D^dag D)`` as gradient."""
        s = self.surrogate(theta)
        return s - s.detach()

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """The estimate of ``d log det(D^dag D) / d theta`` (the shape of ``theta``) itself (tests, diagnostics)."""
        x = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.surrogate(x).sum(), x)
        return g
