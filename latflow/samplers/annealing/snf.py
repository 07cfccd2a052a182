"""Stochastic normalising flows (Wu, Köhler, Noé 2020) along an annealing path.

Block ``k = 1..K`` maps ``x_{k-1}`` to ``x_k`` in two stages: a deterministic flow layer
``y_k = f_k(x_{k-1})`` with ``log |det df_k/dx|``, then a stochastic layer: a few Markov steps
``x_k ~ F_k(y_k -> .)`` at the intermediate density ``gamma_{t_k}`` of the path (``t_K = 1``). Starting from
exact draws ``x_0 ~ gamma_0 / Z_0``, the importance weight of the whole forward path against the backward path
(backward kernels ``B_k``) is

``log w = log Z_0 + log gamma_1(x_K) - log gamma_0(x_0) + sum_k logJ_k + sum_k log[B_k(x_k -> y_k) / F_k(y_k -> x_k)]``,

and ``E[w] = Z``, the target's normalising constant in the path's measure. The ratio of a stochastic layer is

- Metropolis (any kernel reversible w.r.t. ``gamma_{t_k}``, backward kernel = forward kernel):
  ``log gamma_k(y_k) - log gamma_k(x_k)``;
- unadjusted Langevin (real fields), ``x' = x + eps grad log gamma_k(x) + sqrt(2 eps) xi``, backward step the
  same Langevin step taken from ``x'``: the log ratio of the two Gaussian transition densities.

With identity flows and Metropolis layers the weight is exactly AIS's (Neal 2001). ``-mean(log w)`` is the
reverse KL divergence of the forward and backward path measures up to ``log Z``; it is differentiable in the
flow parameters with reparameterised noise (Metropolis accept decisions held fixed, as in Wu et al.), and
:meth:`SNF.train` minimises it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from .core import AnnealResult, ess_fraction, log_mean_exp, normalise_log_weights
from .kernels import MarkovKernel, RandomWalkMetropolis, StepSize
from .paths import AnnealingPath
from .schedules import fixed_schedule

__all__ = ["SNF", "IdentityLayer", "Langevin"]


class IdentityLayer(nn.Module):
    """The identity flow layer: ``forward(x) = (x, 0)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, ...]`` -> ``(x, zeros [B])``."""
        return x, torch.zeros(x.shape[0], dtype=x.real.dtype if x.is_complex() else x.dtype, device=x.device)


class _LayerChain(nn.Module):
    """Several flow layers applied in order as one block; ``logJ`` summed."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_j = torch.zeros(x.shape[0], dtype=x.real.dtype if x.is_complex() else x.dtype, device=x.device)
        for layer in self.layers:
            x, lj = layer(x)
            log_j = log_j + lj
        return x, log_j


class Langevin:
    """``n_steps`` unadjusted Langevin steps ``x' = x + eps grad log gamma_t(x) + sqrt(2 eps) xi`` (real fields).

    Parameters
    ----------
    step_size
        :class:`~latflow.samplers.annealing.kernels.StepSize` (or a number): ``eps`` at time ``t``.
    n_steps
        Steps per application.
    """

    def __init__(self, step_size: StepSize | float, n_steps: int = 1) -> None:
        self.step_size = step_size if isinstance(step_size, StepSize) else StepSize(step_size)
        if n_steps < 1:
            raise ValueError(f"Langevin needs n_steps >= 1, got {n_steps}")
        self.n_steps = int(n_steps)

    @property
    def proposals(self) -> int:
        return self.n_steps

    def __repr__(self) -> str:
        return f"Langevin({self.step_size!r}, n_steps={self.n_steps})"


StochasticLayer = RandomWalkMetropolis | Langevin | MarkovKernel
LogGamma = Callable[[torch.Tensor], torch.Tensor]


def _value_and_grad(log_gamma: LogGamma, x: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log gamma(x) [B], grad log gamma(x) [B, ...])``; kept in the graph (for second derivatives) when
    ``differentiable`` and ``x`` depends on parameters, detached otherwise."""
    if differentiable and x.requires_grad:
        lg = log_gamma(x)
        (g,) = torch.autograd.grad(lg.sum(), x, create_graph=True)
        return lg, g
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        lg = log_gamma(leaf)
        (g,) = torch.autograd.grad(lg.sum(), leaf)
    return lg.detach(), g.detach()


def metropolis_layer(
    kernel: RandomWalkMetropolis, x: torch.Tensor, log_gamma: LogGamma, t: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-walk Metropolis sweeps of ``kernel``, differentiable in ``x`` with the accept decisions fixed.

    Draws exactly the random numbers of ``kernel.move`` (one manifold direction, then one float64 uniform
    per configuration and sweep), so with the same stream it moves the particles bit for bit as the kernel.

    Returns
    -------
    x_new, log_ratio, n_acc
        ``[B, ...]``; ``log gamma_t(x) - log gamma_t(x_new)`` float64 ``[B]`` (the backward/forward path ratio
        of a reversible kernel); accepted updates int64 ``[B]``.
    """
    sigma = kernel.step_size(t)
    mf = kernel.manifold
    lg_in = log_gamma(x)
    lg = lg_in
    n_acc = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    shape = (-1, *([1] * (x.dim() - 1)))
    for _ in range(kernel.n_sweeps):
        xi = mf.random_momenta(x.detach(), generator)
        y = mf.project(mf.drift(x.clone(), xi, sigma))
        lg_y = log_gamma(y)
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64, device=x.device)
        lg_y_d = lg_y.detach()
        acc = (torch.log(u) < (lg_y_d - lg.detach()).double()) & torch.isfinite(lg_y_d)
        x = torch.where(acc.view(shape), y, x)
        lg = torch.where(acc, lg_y, lg)
        n_acc += acc.long()
    return x, (lg_in - lg).double(), n_acc


def langevin_layer(
    layer: Langevin,
    x: torch.Tensor,
    log_gamma: LogGamma,
    t: float,
    generator: torch.Generator,
    differentiable: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unadjusted Langevin steps with their log backward/forward transition ratio.

    Forward ``F(x -> x') = N(x'; x + eps g(x), 2 eps)``, backward ``B(x' -> x) = N(x; x' + eps g(x'), 2 eps)``
    with ``g = grad log gamma_t``; per step ``log B - log F = -|x - x' - eps g(x')|^2 / (4 eps) + |xi|^2 / 2``.

    Returns
    -------
    x_new, log_ratio, n_steps
        ``[B, ...]``; float64 ``[B]``; int64 ``[B]`` (every step counts as accepted).
    """
    if x.is_complex():
        raise ValueError("Langevin layers need real fields (use Metropolis layers on group manifolds)")
    eps = layer.step_size(t)
    _, g = _value_and_grad(log_gamma, x, differentiable)
    log_ratio = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _ in range(layer.n_steps):
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_new = x + eps * g + math.sqrt(2 * eps) * xi
        _, g_new = _value_and_grad(log_gamma, x_new, differentiable)
        back = x - x_new - eps * g_new
        log_b = -back.flatten(1).pow(2).sum(1) / (4 * eps)
        log_f = -0.5 * xi.flatten(1).pow(2).sum(1)
        log_ratio = log_ratio + (log_b - log_f).double()
        x, g = x_new, g_new
    return x, log_ratio, torch.full((x.shape[0],), layer.n_steps, dtype=torch.long, device=x.device)


def kernel_layer(
    kernel: MarkovKernel, x: torch.Tensor, log_gamma: LogGamma, t: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any kernel reversible w.r.t. ``gamma_t`` (e.g. HMC): exact weights, but no gradient through the move."""
    x_new, n_acc = kernel.move(x.detach(), log_gamma, t, generator)
    x_new = x_new.detach()
    return x_new, (log_gamma(x) - log_gamma(x_new)).double(), n_acc


class SNF:
    """A stochastic normalising flow: ``K`` blocks of (flow layer, stochastic layer at ``gamma_{t_k}``).

    The flow layers live in :attr:`flows` (an ``nn.ModuleList``: move them with ``snf.flows.to(...)``, save
    ``snf.flows.state_dict()``); the sampler itself holds no other state.

    Parameters
    ----------
    path
        :class:`~latflow.samplers.annealing.paths.AnnealingPath` (exact start, intermediate densities, ``log Z_0``).
    flows
        ``K`` flow layers, one per block: a module with ``forward(x) -> (y, logJ [B])``, a list of such modules
        (applied in order), or None (identity). None: identity flows throughout (AIS).
    stochastic
        The stochastic layer of every block, or a sequence of ``K`` of them:
        :class:`~latflow.samplers.annealing.kernels.RandomWalkMetropolis` (differentiable, any manifold),
        :class:`Langevin` (real fields) or any other kernel reversible w.r.t. ``gamma_t`` (exact weights, no
        gradient through its move).
    schedule
        Times ``0 = t_0 < ... < t_K = 1`` or an int ``K`` (linear); block ``k`` targets ``gamma_{t_k}``.
    """

    kind = "snf"

    def __init__(
        self,
        path: AnnealingPath,
        flows: Sequence[nn.Module | Sequence[nn.Module] | None] | None,
        stochastic: StochasticLayer | Sequence[StochasticLayer],
        schedule: list[float] | int,
    ) -> None:
        ts = fixed_schedule(schedule) if isinstance(schedule, int) else [float(t) for t in schedule]
        if len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0 or any(b <= a for a, b in zip(ts, ts[1:])):
            raise ValueError("an annealing schedule must increase strictly from 0 to 1")
        n_blocks = len(ts) - 1
        if flows is None:
            flows = [None] * n_blocks
        if len(flows) != n_blocks:
            raise ValueError(f"SNF needs one flow layer per block: {n_blocks} blocks, got {len(flows)} layers")
        blocks: list[nn.Module] = []
        for f in flows:
            if f is None:
                blocks.append(IdentityLayer())
            elif isinstance(f, nn.Module):
                blocks.append(f)
            else:
                blocks.append(_LayerChain(list(f)))
        if isinstance(stochastic, Sequence):
            layers = list(stochastic)
            if len(layers) != n_blocks:
                raise ValueError(f"SNF needs one stochastic layer per block: {n_blocks} blocks, got {len(layers)}")
        else:
            layers = [stochastic] * n_blocks
        for layer in layers:
            if isinstance(layer, Langevin):
                continue
            if isinstance(layer, RandomWalkMetropolis) or hasattr(layer, "move"):
                continue
            raise TypeError(f"not a stochastic layer: {layer!r}")
        self.path = path
        self.ts = ts
        self.flows = nn.ModuleList(blocks)
        self.stochastic = layers

    @property
    def n_blocks(self) -> int:
        return len(self.ts) - 1

    def _stochastic_step(
        self, k: int, x: torch.Tensor, generator: torch.Generator, differentiable: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.ts[k]
        layer = self.stochastic[k - 1]

        def log_gamma(z: torch.Tensor) -> torch.Tensor:
            return self.path.log_gamma(z, t)

        if isinstance(layer, Langevin):
            return langevin_layer(layer, x, log_gamma, t, generator, differentiable)
        if isinstance(layer, RandomWalkMetropolis):
            return metropolis_layer(layer, x, log_gamma, t, generator)
        return kernel_layer(layer, x, log_gamma, t, generator)  # type: ignore[arg-type]

    def forward_paths(
        self, n: int, generator: torch.Generator, *, differentiable: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
        """Run ``n`` forward paths.

        Parameters
        ----------
        n
            Number of paths.
        generator
            The random stream (start, stochastic layers).
        differentiable
            Keep the graph: ``log_w`` differentiable in the flow parameters (reparameterised noise).

        Returns
        -------
        x, log_w, log_p, acceptance
            Final configurations ``[n, ...]``; log importance weights float64 ``[n]`` (``log Z_0`` included;
            ``E[exp(log_w)] = Z``); ``log gamma_1(x)`` ``[n]``; mean acceptance of each block's stochastic layer.
        """
        path = self.path
        grad_ctx = nullcontext() if differentiable else torch.no_grad()
        x = path.sample_initial(n, generator)
        with torch.no_grad():
            log_w = float(path.log_z0) - path.log_gamma(x, 0.0).double()
        acceptance = []
        for k in range(1, self.n_blocks + 1):
            with grad_ctx:
                y, log_j = self.flows[k - 1](x)
                log_w = log_w + log_j.double()
                if not differentiable:
                    y = y.detach()
                x, log_ratio, n_acc = self._stochastic_step(k, y, generator, differentiable)
                log_w = log_w + log_ratio
            proposals = getattr(self.stochastic[k - 1], "proposals", 1)
            acceptance.append(float(n_acc.double().mean()) / proposals)
        with grad_ctx:
            log_p = path.log_gamma(x, 1.0)
            log_w = log_w + log_p.double()
        if not differentiable:
            x, log_w, log_p = x.detach(), log_w.detach(), log_p.detach()
        return x, log_w, log_p, acceptance

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` weighted configurations: ``(x [n, ...], log_w [n] float64)``; ``log mean exp(log_w)`` estimates
        ``log Z`` (unbiased in ``Z``)."""
        x, log_w, _, _ = self.forward_paths(n, generator)
        return x, log_w

    def loss(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``-mean(log w)`` over ``n`` paths (scalar, differentiable in the flow parameters): the reverse KL
        divergence of the forward and backward path measures minus ``log Z``; it bounds ``-log Z`` from above."""
        _, log_w, _, _ = self.forward_paths(n, generator, differentiable=True)
        return -log_w.mean()

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the flow layers."""
        return [p for p in self.flows.parameters() if p.requires_grad]

    def train(self, steps: int, batch: int, lr: float, generator: torch.Generator) -> list[float]:
        """Minimise :meth:`loss` with Adam for ``steps`` steps of ``batch`` paths; returns the loss history."""
        params = self.parameters()
        if not params:
            raise ValueError("SNF.train: the flow layers have no trainable parameters")
        opt = torch.optim.Adam(params, lr=lr)
        history = []
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = self.loss(batch, generator)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        return history

    def run(self, n_particles: int, generator: torch.Generator, *, n_populations: int = 1) -> AnnealResult:
        """``P = n_populations`` independent populations of ``N = n_particles`` weighted paths.

        Returns
        -------
        AnnealResult
            ``x`` ``[P * N, ...]`` (population-major), normalised ``log_w`` ``[P, N]``, ``log_z`` ``[P]``
            (``log mean exp`` of each population's weights), ``log_p`` ``[P * N]``; ``acceptance`` per block;
            ``ess`` holds the final ESS fraction; ``extra["mean_log_w"]`` ``[P]`` is the (negative) loss.
        """
        p, n = int(n_populations), int(n_particles)
        if p < 1 or n < 1:
            raise ValueError("SNF.run needs n_particles >= 1 and n_populations >= 1")
        x, log_w, log_p, acceptance = self.forward_paths(p * n, generator)
        lw = log_w.view(p, n)
        finite = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
        normalised = normalise_log_weights(lw)
        return AnnealResult(
            x=x,
            log_w=normalised,
            log_z=log_mean_exp(finite),
            log_p=log_p,
            ts=list(self.ts),
            ess=[ess_fraction(lw).cpu()],
            resampled=[],
            acceptance=acceptance,
            extra={"mean_log_w": lw.mean(dim=1)},
        )
