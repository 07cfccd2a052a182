"""Train the small gauge-equivariant flows used by ``tests/test_u1_flow_exactness.py``.

Flow-MCMC is exact whatever the flow, so the tests only need flows good enough that a short
chain has a useful acceptance; training them takes minutes, so they are trained once by this
script and stored beside it (``u1_flow_<L0>x<L1>_beta<beta>.pt``, float32 state dicts of
:func:`latflow.flows.gauge_layers.make_u1_equivariant_flow` with the settings in ``FLOW``).
Each 4x4 flow is annealed from beta = 1 to its target; the 8x4 flow starts from the 4x4 one
(the convolutional couplings do not depend on the volume) and is fine-tuned. The 8x4 flow at
beta = 3 is then refined (``REFINE``: 800 steps with batches of 128), which doubles its flow-MCMC
acceptance from about 0.06 to about 0.10.

Usage::

    python tests/data/train_u1_test_flows.py           # about 15 minutes on one core
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.theories.u1 import U1GaugeAction, U1Params
from latflow.training import ReverseKLTrainer

HERE = Path(__file__).resolve().parent
FLOW = {"n_layers": 16, "inner": "spline", "hidden": (8,), "n_bins": 8}
BETAS = (1.0, 2.0, 3.0)
SHAPES = ((4, 4), (8, 4))
STEPS = {(4, 4): 400, (8, 4): 150}
# (shape, beta): (steps, batch size, initial learning rate, seed) of a second, longer training
REFINE = {((8, 4), 3.0): (800, 128, 3e-3, 777)}


def flow_path(shape: tuple[int, int], beta: float) -> Path:
    return HERE / f"u1_flow_{shape[0]}x{shape[1]}_beta{beta:g}.pt"


def build(shape: tuple[int, int], dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    return make_u1_equivariant_flow(Lattice(shape), zero_init=True, dtype=dtype, **FLOW)


def train(shape: tuple[int, int], beta: float, init: dict | None, anneal: bool, seed: int) -> dict:
    lattice = Lattice(shape)
    torch.manual_seed(seed)
    model = build(shape)
    if init is not None:
        model.load_state_dict(init)
    target = {"theory": U1GaugeAction(U1Params(beta), lattice)}
    trainer = ReverseKLTrainer(
        model, lambda x: -target["theory"].action(x), batch_size=64, lr=1e-2,
        generator=make_generator(seed, 1), grad_clip=100.0,
    )
    n = STEPS[shape]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, n, eta_min=1e-3)
    t0 = time.perf_counter()
    for k in range(n):
        if anneal and k <= n // 2:
            target["theory"] = U1GaugeAction(U1Params(1.0 + (beta - 1.0) * min(1.0, 2 * k / n)), lattice)
        m = trainer.train_step()
        sched.step()
    print(f"{shape} beta={beta:g}: {n} steps in {time.perf_counter() - t0:.0f} s, loss {m.loss:.3f}, ESS {m.ess:.3f}")
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def refine(shape: tuple[int, int], beta: float, init: dict, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Continue training ``init`` (cosine schedule from ``lr`` to ``lr / 10``)."""
    model = build(shape)
    model.load_state_dict(init)
    theory = U1GaugeAction(U1Params(beta), Lattice(shape))
    trainer = ReverseKLTrainer(
        model, lambda x: -theory.action(x), batch_size=batch_size, lr=lr,
        generator=make_generator(seed, 1), grad_clip=100.0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, steps, eta_min=lr / 10)
    t0 = time.perf_counter()
    for _ in range(steps):
        m = trainer.train_step()
        sched.step()
    print(f"{shape} beta={beta:g}: refined {steps} steps in {time.perf_counter() - t0:.0f} s, ESS {m.ess:.3f}")
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def main() -> None:
    torch.set_num_threads(1)
    for i, beta in enumerate(BETAS):
        small = train(SHAPES[0], beta, None, anneal=True, seed=100 + i)
        torch.save(small, flow_path(SHAPES[0], beta))
        large = train(SHAPES[1], beta, small, anneal=False, seed=200 + i)
        if (SHAPES[1], beta) in REFINE:
            large = refine(SHAPES[1], beta, large, *REFINE[(SHAPES[1], beta)])
        torch.save(large, flow_path(SHAPES[1], beta))


if __name__ == "__main__":
    main()
