"""Reverse-KL self-training of a flow against an unnormalised target ``p = exp(-S)``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .mpi import SerialComm


class TrainingDivergedError(RuntimeError):
    """Loss or parameters became NaN/Inf; the last good checkpoint is kept untouched."""


def ess_per_config(log_w: torch.Tensor) -> float:
    """``(sum w)^2 / (N sum w^2)`` for log weights ``[N]``, computed in log space."""
    lw = log_w.detach().double()
    return math.exp(2 * torch.logsumexp(lw, 0).item() - torch.logsumexp(2 * lw, 0).item()) / lw.numel()


@dataclass
class TrainMetrics:
    """Per-step record: ``loss`` = mean(log q - log p) (reverse KL up to log Z), ``ess`` of the batch."""

    step: int
    loss: float
    loss_std: float
    ess: float


@dataclass
class TrainHistory:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)

    def append(self, m: TrainMetrics) -> None:
        self.step.append(m.step)
        self.loss.append(m.loss)
        self.ess.append(m.ess)

    def as_dict(self) -> dict[str, list]:
        return {"step": list(self.step), "loss": list(self.loss), "ess": list(self.ess)}


class ReverseKLTrainer:
    """Adam on ``KL(q || p) = E_q[log q + S] + const`` with reparameterised samples.

    Under MPI every rank draws its own batch from its own stream and gradients are
    averaged each step, so ``K`` ranks train one model with ``K`` times the batch.

    Parameters
    ----------
    model
        A flow with ``sample(B, generator)`` and ``parameters()``.
    log_p
        ``x [B, ...] -> [B]`` unnormalised log target, ``-S``.
    batch_size
        Samples per rank per step.
    lr
        Adam learning rate.
    generator
        This rank's random stream.
    comm
        Communicator (serial by default).
    grad_clip
        Clip the global gradient norm (``None``: no clipping).
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
    ) -> None:
        self.model = model
        self.log_p = log_p
        self.batch_size = int(batch_size)
        self.generator = generator
        self.comm = comm or SerialComm()
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.step = 0
        self.history = TrainHistory()
        self.comm.bcast_parameters_(list(self.model.parameters()))

    def train_step(self) -> TrainMetrics:
        """One Adam step; raises :class:`TrainingDivergedError` on a non-finite loss or parameter."""
        self.optimizer.zero_grad(set_to_none=False)
        x, log_q = self.model.sample(self.batch_size, self.generator)
        log_p = self.log_p(x)
        dkl = log_q - log_p
        loss = dkl.mean()
        local = torch.tensor([loss.item(), (dkl.detach() ** 2).mean().item()], dtype=torch.float64)
        # averaged before the check, so that under MPI every rank stops at the same step
        self.comm.allreduce_mean_([local])
        if not torch.isfinite(local[0]):
            raise TrainingDivergedError(f"loss is {local[0].item()} at step {self.step + 1}")
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.comm.allreduce_mean_([p.grad for p in params])
        if not all(torch.isfinite(p.grad).all() for p in params):
            raise TrainingDivergedError(f"gradient became non-finite at step {self.step + 1}")
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.step += 1
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingDivergedError(f"parameters became non-finite at step {self.step}")
        mean, mean_sq = local.tolist()
        metrics = TrainMetrics(
            step=self.step,
            loss=mean,
            loss_std=math.sqrt(max(mean_sq - mean * mean, 0.0)) if math.isfinite(mean_sq) else math.inf,
            ess=ess_per_config(-dkl),
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        h = state.get("history", {})
        self.history = TrainHistory(list(h.get("step", [])), list(h.get("loss", [])), list(h.get("ess", [])))

    def save(self, path: str | Path, *, complete: bool, extra: dict[str, Any] | None = None) -> None:
        """Atomic checkpoint (rank 0 writes; per-rank RNG states are gathered)."""
        state = self.state_dict()
        gens = self.comm.gather(state.pop("generator"))
        if not self.comm.is_root:
            return
        state["generators"] = gens
        state["complete"] = complete
        if extra:
            state.update(extra)
        checkpoint.save_atomic(state, path)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimiser, step, history and this rank's RNG state; returns the raw checkpoint."""
        state = checkpoint.load(path, map_location=next(self.model.parameters()).device)
        gens = state.get("generators", [])
        if len(gens) != self.comm.size:
            raise ValueError(f"{path}: checkpoint was written by {len(gens)} rank(s), this run has {self.comm.size}")
        self.load_state_dict({**state, "generator": gens[self.comm.rank]})
        return state
