"""Optional MPI: a communicator that is real under ``mpiexec`` and trivial otherwise.

A single process never imports mpi4py. Under a launcher (environment variables
of MPICH/Hydra, Open MPI, PMIx or Slurm's PMI) mpi4py is required, and its
absence is a clear error instead of K processes silently doing the same work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: the number of ranks as launchers announce it: Open MPI's mpirun, PMI-1/2 (MPICH/Hydra mpiexec, Intel MPI,
#: srun --mpi=pmi2), PMIx (srun --mpi=pmix, Open MPI 5's prterun), Hydra's node-local count, and srun itself
#: (SLURM_STEP_NUM_TASKS: set inside a job step only, unlike SLURM_NTASKS, which every batch script sees)
_LAUNCHER_SIZE_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_STEP_NUM_TASKS",
)


class SerialComm:
    """The one-process communicator."""

    rank = 0
    size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average ``tensors`` over ranks in place (no-op for one rank)."""

    def allreduce_sum(self, value: float) -> float:
        return float(value)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj]

    def barrier(self) -> None:
        pass

    def bcast_parameters_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make every rank's ``tensors`` equal to rank 0's (no-op for one rank)."""

    def abort(self, code: int = 1) -> None:
        """End the program with exit status ``code`` (under MPI: every rank, via ``MPI_Abort``)."""
        raise SystemExit(code)


class MPIComm(SerialComm):
    """``MPI.COMM_WORLD`` through mpi4py."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def _flat(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()

    @torch.no_grad()
    def _unflat_(self, tensors: Sequence[torch.Tensor], flat: np.ndarray) -> None:
        # no_grad: the targets may be leaf parameters (bcast_parameters_), which refuse in-place copies under autograd
        offset = 0
        src = torch.from_numpy(flat)
        for t in tensors:
            n = t.numel()
            t.copy_(src[offset : offset + n].view_as(t).to(t))
            offset += n

    def allreduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        from mpi4py import MPI

        if not tensors:
            return
        send = self._flat(tensors)
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=MPI.SUM)
        self._unflat_(tensors, recv / self.size)

    def allreduce_sum(self, value: float) -> float:
        return float(self.comm.allreduce(float(value)))

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self.comm.gather(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        # a rank that fails alone would leave the others blocked in a collective forever
        self.comm.Abort(code)
        os._exit(code)  # MPICH's MPI_Abort may return while the launcher tears the job down

    def bcast_parameters_(self, tensors: Sequence[torch.Tensor]) -> None:
        if not tensors:
            return
        buf = self._flat(tensors)
        self.comm.Bcast(buf, root=0)
        self._unflat_(tensors, buf)


def launched_by_mpi() -> bool:
    """True when the process was started by an MPI launcher with more than one rank.

    The first of the launcher variables (``_LAUNCHER_SIZE_VARS``) that is set and an integer decides;
    Slurm's ``SLURM_NTASKS`` alone does not (a batch script sees it before any ``srun``).
    """
    for var in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value) > 1
            except ValueError:
                continue
    return False


def get_comm() -> SerialComm:
    """The world communicator: :class:`MPIComm` under a multi-rank launcher, else :class:`SerialComm`."""
    if not launched_by_mpi():
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "started by an MPI launcher but mpi4py is not importable; install the extra: pip install 'latflow[mpi]'"
        ) from exc
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return SerialComm()
    return MPIComm(comm)
