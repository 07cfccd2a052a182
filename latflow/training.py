"""Reverse-KL self-training of a flow against an unnormalised target ``p = exp(-S)``.

Three estimators of the gradient of ``KL(q || p) = E_q[log q - log p] + log Z`` (all unbiased, the
same gradient in expectation; the logged loss is ``mean(log q - log p)`` for every one):

- ``"reparam"``: reparameterised, ``grad mean(log q(f(z)) - log p(f(z)))`` through ``x = f_theta(z)``
  and ``log q``;
- ``"path"``: path gradient (Vaitl, Nicoli, Nakajima, Kessel 2022, "Gradients should stay on
  path"): ``x = f_theta(z)`` keeps its graph, ``log q`` is the inverse pass with the parameters
  held fixed, so only ``d/dx [log q(x) - log p(x)] dx/dtheta`` enters and the score term (zero
  mean) is dropped. Exactly zero per sample when ``q = p``, smaller variance near the optimum;
- ``"reinforce"``: score function, ``mean((F - b) grad log q(x))`` with ``F = log q - log p`` at
  samples drawn without gradient and the leave-one-out baseline ``b``; ``log p`` is never
  differentiated (targets whose gradient is expensive, e.g. fermion determinants).

Learning-rate schedules (:func:`lr_factor`) are stepped once per training step and checkpointed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import checkpoint
from .mpi import SerialComm

ESTIMATORS = ("reparam", "path", "reinforce")
LR_SCHEDULES = ("constant", "cosine", "exponential")
Estimator = Literal["reparam", "path", "reinforce"]
LRSchedule = Literal["constant", "cosine", "exponential"]


class TrainingDivergedError(RuntimeError):
    """Loss or parameters became NaN/Inf; the last good checkpoint is kept untouched."""


def ess_per_config(log_w: torch.Tensor) -> float:
    """``(sum w)^2 / (N sum w^2)`` for log weights ``[N]``, computed in log space."""
    lw = log_w.detach().double()
    return math.exp(2 * torch.logsumexp(lw, 0).item() - torch.logsumexp(2 * lw, 0).item()) / lw.numel()


def _all_finite(tensors: list[torch.Tensor], *, like: torch.Tensor) -> torch.Tensor:
    """``[1]`` bool on the tensors' device: every entry of every tensor is finite (no host read)."""
    if not tensors:
        return torch.ones(1, dtype=torch.bool, device=like.device)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all().reshape(1).to(like.device)


def lr_factor(
    k: int,
    *,
    schedule: LRSchedule,
    total_steps: int,
    warmup_steps: int = 0,
    lr: float = 1.0,
    lr_min: float = 0.0,
) -> float:
    """Learning rate of training step ``k`` (0-based: ``k`` steps done before it) over the base ``lr``.

    With ``W = warmup_steps``, ``T = total_steps`` and ``t = min((k - W) / max(T - 1 - W, 1), 1)``:

    - warm-up, ``k < W``: ``(k + 1) / (W + 1)`` (linear, reaching 1 at ``k = W``);
    - ``"constant"``: 1;
    - ``"cosine"``: ``[lr_min + (lr - lr_min) (1 + cos(pi t)) / 2] / lr`` (``lr_min`` at the last step);
    - ``"exponential"``: ``(lr_min / lr)^t`` (``lr`` decays geometrically to ``lr_min`` at the last step).

    Steps past ``T`` keep the last step's rate.
    """
    if k < warmup_steps:
        return (k + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    t = min((k - warmup_steps) / max(total_steps - 1 - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return (lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))) / lr
    if schedule == "exponential":
        return (lr_min / lr) ** t
    raise ValueError(f"unknown lr_schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")


@dataclass
class TrainMetrics:
    """Per-step record.

    ``loss`` = mean(log q - log p) (reverse KL up to log Z) and its spread ``loss_std`` over the
    batch, ``ess`` of the batch, ``kl`` = ``loss + log Z`` in nats when the trainer knows ``log Z``
    (None otherwise), ``lr`` the learning rate this step used.
    """

    step: int
    loss: float
    loss_std: float
    ess: float
    kl: float | None = None
    lr: float = math.nan


@dataclass
class TrainHistory:
    """Per-step lists (``kl`` entries are None where ``log Z`` was unknown)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    kl: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def append(self, m: TrainMetrics) -> None:
        self.step.append(m.step)
        self.loss.append(m.loss)
        self.ess.append(m.ess)
        self.kl.append(m.kl)
        self.lr.append(m.lr)

    def as_dict(self) -> dict[str, list]:
        return {
            "step": list(self.step),
            "loss": list(self.loss),
            "ess": list(self.ess),
            "kl": list(self.kl),
            "lr": list(self.lr),
        }

    @classmethod
    def from_dict(cls, h: dict[str, list]) -> TrainHistory:
        """Inverse of :meth:`as_dict`; histories saved before ``kl``/``lr`` were kept get None/NaN there."""
        n = len(h.get("step", []))
        return cls(
            list(h.get("step", [])),
            list(h.get("loss", [])),
            list(h.get("ess", [])),
            list(h.get("kl", [None] * n)),
            list(h.get("lr", [math.nan] * n)),
        )


class _LogProb(nn.Module):
    """``model.log_prob`` as ``forward``, so that :func:`torch.func.functional_call` can swap its parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x)


class ReverseKLTrainer:
    """Adam on ``KL(q || p) = E_q[log q + S] + log Z`` (module docstring: the gradient estimators).

    Under MPI every rank draws its own batch from its own stream and gradients are
    averaged each step, so ``K`` ranks train one model with ``K`` times the batch.

    Parameters
    ----------
    model
        A flow with ``sample(B, generator) -> (x [B, ...], log_q [B])`` and ``parameters()``;
        ``"path"`` and ``"reinforce"`` also need ``log_prob(x [B, ...]) -> [B]`` (inverse pass).
    log_p
        ``x [B, ...] -> [B]`` unnormalised log target, ``-S``.
    batch_size
        Samples per rank per step (``"reinforce"``: at least 2, for the leave-one-out baseline).
    lr
        Adam (base) learning rate.
    generator
        This rank's random stream.
    comm
        Communicator (serial by default).
    grad_clip
        Clip the global gradient norm (``None``: no clipping).
    estimator
        ``"reparam"`` (default), ``"path"`` or ``"reinforce"``.
    lr_schedule
        ``"constant"`` (default), ``"cosine"`` or ``"exponential"`` (:func:`lr_factor`), after
        ``warmup_steps`` steps of linear warm-up; stepped once per training step.
    warmup_steps
        Length of the linear warm-up.
    lr_min
        Floor of the cosine schedule, end point of the exponential one (``0 <= lr_min < lr``;
        ``> 0`` for exponential).
    total_steps
        Length of the run the schedule spans; needed unless the schedule is constant without warm-up.
    log_z
        Exact ``log Z`` of the target in the measure in which ``log q`` is a density; then every
        step reports the reverse KL in nats, ``kl = loss + log_z``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        log_p: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int,
        lr: float,
        generator: torch.Generator,
        comm: SerialComm | None = None,
        grad_clip: float | None = None,
        estimator: Estimator = "reparam",
        lr_schedule: LRSchedule = "constant",
        warmup_steps: int = 0,
        lr_min: float = 0.0,
        total_steps: int | None = None,
        log_z: float | None = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if estimator != "reparam" and not callable(getattr(model, "log_prob", None)):
            raise ValueError(f"estimator {estimator!r} needs a model with log_prob(x) (inverse pass)")
        if estimator == "reinforce" and batch_size < 2:
            raise ValueError(f"estimator 'reinforce' needs batch_size >= 2 (leave-one-out baseline), got {batch_size}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= lr_min < lr:
            raise ValueError(f"lr_min = {lr_min} must satisfy 0 <= lr_min < lr = {lr}")
        if lr_schedule == "exponential" and lr_min <= 0:
            raise ValueError("lr_schedule 'exponential' needs lr_min > 0 (the rate it decays to)")
        if (lr_schedule != "constant" or warmup_steps > 0) and (total_steps is None or total_steps < 1):
            raise ValueError(f"lr_schedule {lr_schedule!r} with warm-up {warmup_steps} needs total_steps >= 1")
        self.model = model
        self.log_p = log_p
        self.batch_size = int(batch_size)
        self.generator = generator
        self.comm = comm or SerialComm()
        self.grad_clip = grad_clip
        self.estimator = estimator
        self.log_z = None if log_z is None else float(log_z)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self._lr_factor = functools.partial(
            lr_factor,
            schedule=lr_schedule,
            total_steps=int(total_steps or 1),
            warmup_steps=int(warmup_steps),
            lr=float(lr),
            lr_min=float(lr_min),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self._log_prob = _LogProb(model) if estimator == "path" else None
        self.step = 0
        self.history = TrainHistory()
        self.comm.bcast_parameters_(list(self.model.parameters()))

    def _frozen_log_q(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` ``[B]`` by the inverse pass with detached parameters and buffers (graph in ``x`` only)."""
        assert self._log_prob is not None
        frozen = {f"model.{n}": t.detach() for n, t in self.model.named_parameters()}
        frozen.update({f"model.{n}": t.detach() for n, t in self.model.named_buffers()})
        return torch.func.functional_call(self._log_prob, frozen, (x,))

    def _surrogate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(surrogate [], dkl [B])``: the scalar whose gradient is this estimator's, and ``log q - log p``."""
        if self.estimator == "reparam":
            x, log_q = self.model.sample(self.batch_size, self.generator)
            dkl = log_q - self.log_p(x)
            return dkl.mean(), dkl
        if self.estimator == "path":
            x, _ = self.model.sample(self.batch_size, self.generator)
            dkl = self._frozen_log_q(x) - self.log_p(x)
            return dkl.mean(), dkl
        with torch.no_grad():
            x, log_q = self.model.sample(self.batch_size, self.generator)
            dkl = log_q - self.log_p(x)
        n = dkl.shape[0]
        baseline = (dkl.sum() - dkl) / (n - 1)  # leave-one-out: independent of its own sample
        return ((dkl - baseline) * self.model.log_prob(x)).mean(), dkl

    def train_step(self) -> TrainMetrics:
        """One Adam step; raises :class:`TrainingDivergedError` on a non-finite loss, gradient or parameter.

        Two host reads per step, whatever the number of parameters: the loss statistics, the ESS terms and the
        gradients' finiteness come back in one transfer before the Adam step, the parameters' finiteness in one
        after it (on a GPU each read is a synchronisation)."""
        self.optimizer.zero_grad(set_to_none=False)
        surrogate, dkl = self._surrogate()
        dkl = dkl.detach()
        if surrogate.requires_grad:  # a flow without trainable parameters has nothing to differentiate
            surrogate.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        lw = -dkl.double()
        stats = torch.stack([dkl.mean(), (dkl**2).mean()]).to(torch.float64)
        # loss averaged over the ranks before the check, so that under MPI every rank stops at the same step
        self.comm.allreduce_mean_([stats])
        self.comm.allreduce_mean_([p.grad for p in params])
        grads_finite = _all_finite([p.grad for p in params], like=stats)
        host = torch.cat(
            [stats, torch.stack([torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)]), grads_finite.double()]
        ).tolist()
        mean, mean_sq, lse_w, lse_w2, grads_ok = host
        if not math.isfinite(mean):
            raise TrainingDivergedError(f"loss is {mean} at step {self.step + 1}")
        if not grads_ok:
            raise TrainingDivergedError(f"gradient became non-finite at step {self.step + 1}")
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if not bool(_all_finite(list(self.model.parameters()), like=stats)):
            raise TrainingDivergedError(f"parameters became non-finite at step {self.step}")
        metrics = TrainMetrics(
            step=self.step,
            loss=mean,
            loss_std=math.sqrt(max(mean_sq - mean * mean, 0.0)) if math.isfinite(mean_sq) else math.inf,
            ess=math.exp(2 * lse_w - lse_w2) / dkl.numel(),
            kl=None if self.log_z is None else mean + self.log_z,
            lr=lr,
        )
        self.history.append(metrics)
        return metrics

    def train(
        self,
        n_steps: int,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_every: int = 0,
        callback: Callable[[TrainMetrics], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> TrainHistory:
        """Train until ``self.step == n_steps`` (a resumed trainer continues where it stopped).

        A checkpoint is written every ``checkpoint_every`` steps and at the end (rank 0 only).
        On divergence no checkpoint is written, so the last good one survives.
        """
        while self.step < n_steps:
            try:
                metrics = self.train_step()
            except TrainingDivergedError as exc:
                where = f"; the last good checkpoint {checkpoint_path} is kept" if checkpoint_path else ""
                raise TrainingDivergedError(f"training diverged: {exc}{where}") from None
            if callback is not None:
                callback(metrics)
            if checkpoint_path and checkpoint_every and self.step % checkpoint_every == 0 and self.step < n_steps:
                self.save(checkpoint_path, complete=False, extra=extra)
        if checkpoint_path:
            self.save(checkpoint_path, complete=True, extra=extra)
        return self.history

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "generator": self.generator.get_state(),
            "history": self.history.as_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before schedules were kept: put the schedule where the step is
            self.scheduler.last_epoch = self.step
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * self._lr_factor(self.step)
        self.history = TrainHistory.from_dict(state.get("history", {}))

    def save(self, path: str | Path, *, complete: bool, extra: dict[str, Any] | None = None) -> None:
        """Atomic checkpoint (rank 0 writes; per-rank RNG states are gathered).

        Collective: every rank returns once the file is written, so a rank that stops right after (a stop
        signal ends every rank with ``MPI_Abort``) cannot end rank 0 in the middle of the write.
        """
        state = self.state_dict()
        gens = self.comm.gather(state.pop("generator"))
        if self.comm.is_root:
            state["generators"] = gens
            state["complete"] = complete
            if extra:
                state.update(extra)
            checkpoint.save_atomic(state, path)
        self.comm.barrier()

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimiser, step, history and this rank's RNG state; returns the raw checkpoint."""
        state = checkpoint.load(path, map_location=next(self.model.parameters()).device)
        gens = state.get("generators", [])
        if len(gens) != self.comm.size:
            raise ValueError(f"{path}: checkpoint was written by {len(gens)} rank(s), this run has {self.comm.size}")
        self.load_state_dict({**state, "generator": gens[self.comm.rank]})
        return state
