"""Run as ``mpiexec -n K python grad_average.py``: checks that ReverseKLTrainer averages gradients over ranks.

Every check runs on every rank; any failure prints ``FAIL`` with the reason and exits 1
(``MPI.COMM_WORLD.Abort`` so no rank waits forever for a failed partner). Success prints
``GRAD_AVERAGE_OK rank=<r> size=<K>`` on every rank.
"""

from __future__ import annotations

import copy
import sys
import traceback

import numpy as np
import torch

from latflow.flows import make_affine_flow
from latflow.lattice import Lattice
from latflow.mpi import MPIComm, get_comm
from latflow.training import ReverseKLTrainer

LATTICE = (4, 4)
BATCH = 8
M2, LAM = -4.0, 6.975


def phi4_log_p(x: torch.Tensor) -> torch.Tensor:
    """``-S`` of phi^4 (Albergo-Kanwar-Shanahan normalisation), written out here so the check is self-contained."""
    kinetic = torch.zeros_like(x)
    for mu in range(1, x.dim()):
        kinetic = kinetic + x * (2 * x - torch.roll(x, 1, mu) - torch.roll(x, -1, mu))
    s = kinetic + M2 * x**2 + LAM * x**4
    return -s.flatten(1).sum(1)


class Failure(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


def flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).numpy()


def same_everywhere(world, arr: np.ndarray) -> bool:
    """Bitwise equality of ``arr`` across all ranks."""
    allb = world.allgather(np.ascontiguousarray(arr).tobytes())
    return all(b == allb[0] for b in allb)


def local_grads(model: torch.nn.Module, gen_state: torch.Tensor) -> list[torch.Tensor]:
    """The reverse-KL gradient one rank computes from the stream state ``gen_state`` (on a replica)."""
    replica = copy.deepcopy(model)
    g = torch.Generator()
    g.set_state(gen_state)
    x, log_q = replica.sample(BATCH, g)
    (log_q - phi4_log_p(x)).mean().backward()
    return [p.grad.detach().clone() for p in replica.parameters()]


def main() -> None:
    comm = get_comm()
    check(isinstance(comm, MPIComm), f"get_comm() gave {type(comm).__name__} under mpiexec")
    world = comm.comm
    rank, size = comm.rank, comm.size
    check(size >= 2, f"needs >= 2 ranks, got {size}")
    check(rank == world.Get_rank() and size == world.Get_size(), "rank/size disagree with MPI.COMM_WORLD")

    # 1. allreduce_mean_ on known tensors: rank r holds (r + 1) * base (+ a rank-odd part), mean is exact
    base64 = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 8
    base32 = torch.linspace(-1, 1, 5, dtype=torch.float32)
    a = (rank + 1) * base64.clone()
    b = (rank + 1) * base32.clone()
    comm.allreduce_mean_([a, b])
    mean_factor = sum(r + 1 for r in range(size)) / size
    check(torch.equal(a, mean_factor * base64), f"allreduce_mean_ float64 wrong: {a}")
    check(
        b.dtype == torch.float32 and torch.equal(b, (mean_factor * base32.double()).float()),
        f"allreduce_mean_ float32 wrong: {b}",
    )
    check(comm.allreduce_sum(rank + 1) == size * (size + 1) / 2, "allreduce_sum wrong")

    # 2. parameters start different on every rank; the trainer broadcasts rank 0's
    torch.manual_seed(1000 + rank)
    model = make_affine_flow(Lattice(LATTICE), 2, (4,), 3, dtype=torch.float64)
    p0 = flat(model.parameters())
    check(not same_everywhere(world, p0), "test set-up: initial parameters should differ between ranks")
    gen = torch.Generator().manual_seed(12345 + 77 * rank)
    trainer = ReverseKLTrainer(model, phi4_log_p, batch_size=BATCH, lr=1e-2, generator=gen, comm=comm)
    check(same_everywhere(world, flat(model.parameters())), "parameters differ across ranks after the broadcast")
    root_p0 = world.bcast(p0, root=0)
    check(np.array_equal(flat(model.parameters()), root_p0), "parameters are not rank 0's after the broadcast")

    n_checked = 0
    for step in range(4):
        # every rank reconstructs every rank's local gradient from the streams' states,
        # independently of the trainer's communication
        states = world.allgather(gen.get_state())
        grads = [local_grads(model, s) for s in states]
        expected = [sum(g[i] for g in grads) / size for i in range(len(grads[0]))]
        mine = flat(grads[rank])
        check(not same_everywhere(world, mine), f"step {step}: local gradients should differ between ranks")

        m = trainer.train_step()

        got = [p.grad for p in model.parameters()]
        check(len(got) == len(expected), "parameter count changed")
        check(same_everywhere(world, flat(got)), f"step {step}: averaged gradient differs across ranks")
        for i, (g, e) in enumerate(zip(got, expected)):
            check(
                torch.equal(g, e),
                f"step {step}, parameter {i}: gradient is not the mean of the ranks' "
                f"local gradients (max diff {(g - e).abs().max().item():.3g})",
            )
            check(
                not torch.equal(g, grads[rank][i]) or all(torch.equal(gr[i], grads[0][i]) for gr in grads),
                f"step {step}, parameter {i}: gradient is this rank's local one, not the average",
            )
        check(same_everywhere(world, flat(model.parameters())), f"step {step}: parameters diverged across ranks")
        check(same_everywhere(world, np.array([m.loss, m.loss_std])), f"step {step}: loss is not averaged")
        n_checked += 1

    for _ in range(3):
        trainer.train_step()
    check(same_everywhere(world, flat(model.parameters())), "parameters diverged across ranks after training")
    check(not np.array_equal(flat(model.parameters()), root_p0), "training did not move the parameters")
    print(f"GRAD_AVERAGE_OK rank={rank} size={size} steps_checked={n_checked}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any failure must end every rank
        print(f"FAIL: {exc}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
