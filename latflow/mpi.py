"""Optional MPI: a communicator that is real under ``mpiexec`` and trivial otherwise.

A single process never imports mpi4py. Under a launcher (environment variables
of MPICH/Hydra, Open MPI, PMIx or Slurm's PMI) mpi4py is required, and its
absence is a clear error instead of K processes silently doing the same work.

Two backends for the tensors of data-parallel training (``[run] comm``):

* ``"mpi"`` (:class:`MPIComm`): gradients are flattened into one float64 host buffer and averaged with
  ``MPI_Allreduce``; works everywhere mpi4py does.
* ``"torch"`` (:class:`TorchDistComm`): the same buffer is built on the tensors' own device and averaged with
  ``torch.distributed.all_reduce`` (NCCL for CUDA tensors, gloo for CPU tensors), so GPU gradients never
  travel through the host. The process group is set up from the MPI rank and size; MPI still carries
  everything else (objects, barriers, aborts).

Each rank's node layout (:attr:`SerialComm.local_rank`, :attr:`SerialComm.local_size`: its index among the
ranks on its node, and their number) comes from ``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``;
:func:`gpu_for_rank` turns it into the CUDA device of the rank.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
from collections.abc import Mapping, Sequence
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

#: (local rank, ranks on the node) as launchers announce them: MPICH/Hydra, Open MPI, PMIx, Slurm's srun
#: (whose per-node count SLURM_STEP_TASKS_PER_NODE is a list like "2(x3),1", so only the rank is read there)
_LAUNCHER_LOCAL_VARS = (
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("SLURM_LOCALID", None),
)

#: the values of ``[run] comm``
COMM_BACKENDS = ("mpi", "torch")


class SerialComm:
    """The one-process communicator."""

    rank = 0
    size = 1
    #: this rank's index among the ranks on its node, and their number
    local_rank = 0
    local_size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def node_allgather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank on this node, in local-rank order."""
        return [obj]

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
        self.node = _node_comm(comm)
        self.local_rank = self.node.Get_rank()
        self.local_size = self.node.Get_size()

    def node_allgather(self, obj: Any) -> list[Any]:
        return self.node.allgather(obj)

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


def get_comm(backend: str = "mpi") -> SerialComm:
    """The world communicator: under a multi-rank launcher :class:`MPIComm` (``backend = "mpi"``) or
    :class:`TorchDistComm` (``"torch"``), else :class:`SerialComm`."""
    if backend not in COMM_BACKENDS:
        raise ValueError(f"unknown communicator backend {backend!r}; allowed: {', '.join(COMM_BACKENDS)}")
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
    return TorchDistComm(comm) if backend == "torch" else MPIComm(comm)


class TorchDistComm(MPIComm):
    """:class:`MPIComm` whose tensor collectives go through ``torch.distributed`` on the tensors' own device.

    ``allreduce_mean_`` and ``bcast_parameters_`` flatten their tensors into one float64 buffer on the
    tensors' device (the precision of :class:`MPIComm`'s host buffer, so both backends give the same averages)
    and call ``all_reduce`` / ``broadcast``: NCCL for CUDA tensors, gloo for CPU tensors (one process group
    with the backend ``"cpu:gloo,cuda:nccl"`` where NCCL exists, else ``"gloo"``). Objects, barriers and
    aborts stay with MPI.

    The process group's rendezvous is a ``TCPStore`` on rank 0: at ``MASTER_ADDR``/``MASTER_PORT`` when both
    are set, else on a free port of rank 0's host (``127.0.0.1`` when every rank shares rank 0's node, its
    host name otherwise), broadcast to the other ranks through MPI.
    """

    def __init__(self, comm: Any, timeout_s: float = 1800.0) -> None:
        super().__init__(comm)
        import torch.distributed as dist

        if not dist.is_available():  # pragma: no cover - depends on the torch build
            raise RuntimeError("run.comm = 'torch' needs a torch build with torch.distributed; use run.comm = 'mpi'")
        self.dist = dist
        self.backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self._rendezvous(timeout)
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size, timeout=timeout)
        self.group = dist.group.WORLD
        atexit.register(self.close)

    def _rendezvous(self, timeout: datetime.timedelta) -> Any:
        """The ``TCPStore`` of the process group: created on rank 0, its address broadcast through MPI."""
        address = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if not (address and port):
            address, port = None, 0
            if self.rank == 0:
                address = "127.0.0.1" if self.local_size == self.size else socket.gethostname()
        store = None
        error = ""
        if self.rank == 0:
            try:
                store = self.dist.TCPStore(address, int(port), self.size, True, timeout, wait_for_workers=False)
                port = store.port
            except (RuntimeError, ValueError, OSError) as exc:
                error = f"torch.distributed rendezvous on rank 0 ({address}:{port}) failed: {exc}"
        address, port, error = self.comm.bcast((address, port, error), root=0)
        if error:
            raise RuntimeError(error)
        if store is None:
            store = self.dist.TCPStore(address, int(port), self.size, False, timeout)
        return store

    def close(self) -> None:
        """Destroy the process group (registered with :mod:`atexit`; safe to call twice)."""
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def _flat_on_device(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"tensors on several devices ({sorted(map(str, devices))}): average each device's apart")
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])

    @torch.no_grad()
    def _unflat_device_(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def allreduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = self._flat_on_device(tensors)
        self.dist.all_reduce(flat, op=self.dist.ReduceOp.SUM, group=self.group)
        self._unflat_device_(tensors, flat / self.size)

    def bcast_parameters_(self, tensors: Sequence[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = self._flat_on_device(tensors)
        self.dist.broadcast(flat, src=0, group=self.group)
        self._unflat_device_(tensors, flat)


def _node_comm(comm: Any) -> Any:
    """The ranks of ``comm`` that share this rank's node (``MPI_COMM_TYPE_SHARED``), ordered by world rank."""
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def launcher_local_rank(environ: Mapping[str, str] | None = None) -> tuple[int, int | None] | None:
    """``(local rank, ranks on the node or None)`` from the launcher's variables, None if none is set.

    MPICH/Hydra (``MPI_LOCALRANKID``), Open MPI (``OMPI_COMM_WORLD_LOCAL_RANK``), PMIx (``PMIX_LOCAL_RANK``) and
    srun (``SLURM_LOCALID``), the first that is set and an integer. :class:`MPIComm` asks MPI instead
    (``MPI_COMM_TYPE_SHARED``), which every launcher agrees with; this is for launchers and checks without MPI.
    """
    env = os.environ if environ is None else environ
    for rank_var, size_var in _LAUNCHER_LOCAL_VARS:
        try:
            rank = int(env[rank_var])
        except (KeyError, ValueError):
            continue
        try:
            size = int(env[size_var]) if size_var else None
        except (KeyError, ValueError):
            size = None
        return rank, size
    return None


def gpu_for_rank(local_rank: int, local_size: int, n_visible: int, visible_env: str | None = None) -> int:
    """The CUDA device index of a rank: one rank per GPU, by local rank.

    Parameters
    ----------
    local_rank, local_size
        The rank's index among the ranks on its node, and their number.
    n_visible
        CUDA devices this rank sees (``torch.cuda.device_count()``, after ``CUDA_VISIBLE_DEVICES``).
    visible_env
        The value of ``CUDA_VISIBLE_DEVICES`` (None: unset), for the messages only.

    Returns
    -------
    int
        ``local_rank`` when the node's GPUs are visible to every rank; 0 when a rank sees one GPU (the
        launcher gave each rank its own through ``CUDA_VISIBLE_DEVICES``: ``srun --gpus-per-task=1``, or
        ranks that share one are caught by :func:`check_distinct_gpus`).

    Raises
    ------
    ValueError
        No visible device, or fewer visible devices than ranks on the node (one line).
    """
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} is not in [0, {local_size})")
    where = "CUDA_VISIBLE_DEVICES unset" if visible_env is None else f"CUDA_VISIBLE_DEVICES={visible_env!r}"
    if n_visible < 1:
        raise ValueError(f"no CUDA device is visible to this rank ({where})")
    if n_visible == 1:
        return 0
    if local_size > n_visible:
        raise ValueError(
            f"{local_size} MPI ranks on this node but {n_visible} GPUs visible ({where}): run at most one rank "
            "per GPU (e.g. [resources] ranks_per_node = gpus_per_node), or give each rank one GPU "
            "(srun --gpus-per-task=1)"
        )
    return local_rank


def check_distinct_gpus(uuids: Sequence[str]) -> None:
    """``ValueError`` (one line) if two ranks of a node chose the same GPU.

    Parameters
    ----------
    uuids
        The UUID of each local rank's chosen device, in local-rank order.
    """
    first: dict[str, int] = {}
    for local, uuid in enumerate(uuids):
        if uuid in first:
            raise ValueError(
                f"local ranks {first[uuid]} and {local} of this node use the same GPU ({uuid}): each rank sees one "
                "GPU through CUDA_VISIBLE_DEVICES but not its own; run one rank per GPU (srun --gpus-per-task=1, "
                "or CUDA_VISIBLE_DEVICES unset so that rank i takes GPU i)"
            )
        first[uuid] = local
