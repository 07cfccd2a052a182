"""Run as ``mpiexec -n K python torch_comm.py``: the torch.distributed communicator (gloo on CPU) against MPI.

Checks on every rank: ``get_comm("torch")`` is a :class:`TorchDistComm` on gloo with MPI's rank and size;
``allreduce_mean_`` of known tensors is exact; the gradients of a flow averaged by it equal those averaged by
:class:`MPIComm` (bit for bit with 2 ranks: a sum of two float64 numbers does not depend on the order; to
rounding otherwise) and keep their dtype and device; ``bcast_parameters_`` gives rank 0's parameters. Any
failure prints ``FAIL`` and aborts every rank; success prints ``TORCH_COMM_OK rank=<r> size=<K>``.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
import torch

from latflow.flows import make_affine_flow
from latflow.lattice import Lattice
from latflow.mpi import MPIComm, TorchDistComm, get_comm


class Failure(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


def local_gradients(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    """A rank's own gradients of ``mean(log q - log p)`` on its own draws (phi^4-like ``log p``)."""
    model.zero_grad()
    x, log_q = model.sample(8, torch.Generator().manual_seed(seed))
    log_p = -(x**2 + x**4).flatten(1).sum(1)
    (log_q - log_p).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def main() -> None:
    comm = get_comm("torch")
    check(isinstance(comm, TorchDistComm), f"get_comm('torch') gave {type(comm).__name__}")
    check(comm.backend == "gloo", f"backend {comm.backend!r} on a machine without CUDA")
    import torch.distributed as dist

    world = comm.comm
    rank, size = comm.rank, comm.size
    check(dist.get_rank() == rank == world.Get_rank(), "torch.distributed rank differs from MPI's")
    check(dist.get_world_size() == size == world.Get_size(), "torch.distributed size differs from MPI's")
    mpi = MPIComm(world)

    # 1. known tensors: rank r holds (r + 1) * base; the mean is exact in float64 and float32
    base64 = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 8
    base32 = torch.linspace(-1, 1, 5, dtype=torch.float32)
    a, b = (rank + 1) * base64, (rank + 1) * base32
    comm.allreduce_mean_([a, b])
    factor = sum(r + 1 for r in range(size)) / size
    check(torch.equal(a, factor * base64), f"float64 mean wrong: {a}")
    check(b.dtype == torch.float32 and torch.equal(b, (factor * base32.double()).float()), f"float32 mean: {b}")
    comm.allreduce_mean_([])  # nothing to do, no collective

    # 2. a flow's gradients, different on every rank: both backends average them alike
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(7)  # the same parameters everywhere
        model = make_affine_flow(Lattice((4, 4)), 2, (4,), 3, dtype=dtype)
        grads = local_gradients(model, 100 + rank)
        mine = np.concatenate([g.double().numpy().ravel() for g in grads])
        others = world.allgather(mine)
        check(not np.array_equal(others[0], others[1]), "test set-up: local gradients should differ")
        by_torch = [g.clone() for g in grads]
        by_mpi = [g.clone() for g in grads]
        comm.allreduce_mean_(by_torch)
        mpi.allreduce_mean_(by_mpi)
        expected = np.mean(others, axis=0)
        for i, (t, m) in enumerate(zip(by_torch, by_mpi)):
            check(t.dtype == dtype and t.device == grads[i].device, f"parameter {i}: dtype/device changed")
            if size == 2:
                check(torch.equal(t, m), f"{dtype} parameter {i}: torch and MPI averages differ bitwise")
            else:
                check(torch.allclose(t, m, rtol=4 * torch.finfo(dtype).eps, atol=0), f"parameter {i}: averages")
        got = np.concatenate([t.double().numpy().ravel() for t in by_torch])
        tol = 4 * torch.finfo(dtype).eps * np.abs(expected).max()
        check(np.abs(got - expected).max() <= tol, f"{dtype}: not the mean of the ranks' gradients")

    # 3. parameters broadcast from rank 0
    torch.manual_seed(1000 + rank)
    model = make_affine_flow(Lattice((4, 4)), 2, (4,), 3, dtype=torch.float64)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    root = world.bcast(flat, root=0)
    check(rank == 0 or not np.array_equal(flat, root), "test set-up: parameters should differ between ranks")
    comm.bcast_parameters_(params)
    check(np.array_equal(torch.cat([p.detach().reshape(-1) for p in params]).numpy(), root), "not rank 0's")
    check(all(p.requires_grad for p in params), "parameters lost requires_grad")
    comm.close()
    print(f"TORCH_COMM_OK rank={rank} size={size}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any failure must end every rank
        print(f"FAIL: {exc}", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
