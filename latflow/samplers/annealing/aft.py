"""AFT: annealed flow transport Monte Carlo (Arbel, Matthews, Doucet 2021).

One SMC pass; at each transition a transport flow is fitted by several gradient steps on the weighted
``KL(T # pi_{k-1} || pi_k)`` objective and then moves the particles. To keep the ``Z`` estimate unbiased the
flow is fitted on a separate *training population*, annealed alongside the reported ones with the same flows,
and never on the particles it transports (the paper's train/test split).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .core import AnnealResult
from .flow_transitions import pooled_weights, transition_kl
from .kernels import MarkovKernel
from .paths import AnnealingPath
from .smc import SMC
from .transport import TransportFlow

__all__ = ["AFT"]


class AFT:
    """Annealed flow transport with a flow fitted per transition.

    Parameters
    ----------
    path, kernel, schedule
        As for :class:`~latflow.samplers.annealing.smc.SMC` (fixed schedule).
    make_flow
        ``() -> TransportFlow``, identity-initialised; called once (the first transition), later transitions
        start from the previous transition's fitted flow (``warm_start``) or from a new one.
    n_opt_steps
        Adam steps per transition.
    lr
        Adam learning rate.
    resample_threshold, resampling
        As for SMC.
    n_train_populations
        Training populations annealed beside the reported ones (their particles fit the flows only).
    warm_start
        Start each transition's fit from the previous transition's flow.
    """

    kind = "aft"

    def __init__(
        self,
        path: AnnealingPath,
        kernel: MarkovKernel | None,
        schedule: list[float] | int,
        make_flow: Callable[[], TransportFlow],
        *,
        n_opt_steps: int = 20,
        lr: float = 1e-3,
        resample_threshold: float = 0.3,
        resampling: str = "systematic",
        n_train_populations: int = 1,
        warm_start: bool = True,
    ) -> None:
        self.smc = SMC(path, kernel, schedule, resample_threshold=resample_threshold, resampling=resampling)
        if self.smc.n_transitions is None:
            raise ValueError("AFT needs a fixed schedule")
        if n_opt_steps < 0 or n_train_populations < 1:
            raise ValueError("AFT needs n_opt_steps >= 0 and n_train_populations >= 1")
        self.path = path
        self.make_flow = make_flow
        self.n_opt_steps = int(n_opt_steps)
        self.lr = float(lr)
        self.n_train_populations = int(n_train_populations)
        self.warm_start = bool(warm_start)

    def run(self, n_particles: int, generator: torch.Generator, *, n_populations: int = 1) -> AnnealResult:
        """Anneal ``n_populations`` reported populations (plus the training ones) of ``n_particles`` each.

        Returns the reported populations only; ``extra["loss"]`` holds each transition's final objective.
        """
        p, n, pt = int(n_populations), int(n_particles), self.n_train_populations
        ts = list(self.smc.schedule)  # type: ignore[arg-type]
        losses: list[float] = []
        previous: list[TransportFlow] = []

        def transport(k: int, x: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flow = copy.deepcopy(previous[-1]) if (self.warm_start and previous) else self.make_flow()
            train_x = x[p * n :]
            weights = pooled_weights(log_w[p:])
            params = [q for q in flow.parameters() if q.requires_grad]
            loss = torch.tensor(float("nan"))
            if params and self.n_opt_steps:
                opt = torch.optim.Adam(params, lr=self.lr)
                for _ in range(self.n_opt_steps):
                    opt.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        loss, _, _ = transition_kl(flow, self.path, train_x, weights, ts[k - 1], ts[k])
                        loss.backward()
                    if not torch.isfinite(loss):
                        break
                    opt.step()
            losses.append(float(loss.detach()))
            previous.append(flow)
            with torch.no_grad():
                return flow(x)

        r = self.smc.run(n, generator, n_populations=p + pt, transport=transport)
        return AnnealResult(
            x=r.x[: p * n],
            log_w=r.log_w[:p],
            log_z=r.log_z[:p],
            log_p=r.log_p[: p * n],
            ts=r.ts,
            ess=[e[:p] for e in r.ess],
            resampled=[s[:p] for s in r.resampled],
            acceptance=r.acceptance,
            extra={"loss": losses, "flows": previous},
        )
