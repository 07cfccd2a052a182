"""Where the particles of a population live: all in this process, or spread over MPI ranks.

An SMC population of ``N`` particles normally sits in one process. When one population is too large for one
device (or one rank's time), :class:`SpreadPopulation` gives each of ``R`` ranks a contiguous slice of it:
rank ``r`` holds the particles ``offset_r .. offset_r + n_r - 1`` of every population, with ``n_r`` differing by
at most one between ranks. Everything that couples particles is then global:

* normalised weights, ESS, conditional ESS and the ``log Z`` increment use a global ``logsumexp``: each rank's
  ``logsumexp`` over its slice, gathered (``R x P`` numbers per step) and combined in the same order on every
  rank, so every rank takes the same resampling and schedule decisions;
* resampling draws the ancestors of the whole population on every rank from a *shared* stream (the same seed on
  all ranks), and each rank then receives the ancestors of its slots from the ranks that hold them (one
  ``alltoall``; systematic resampling keeps most particles where they are);
* the transport flows' objective is a sum over particles, so its gradient is the sum of the ranks' gradients.

:class:`LocalPopulation` is the trivial one-process layout (the default everywhere): resampling there draws from
the run's own generator, exactly as before distributed populations existed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LocalPopulation", "SpreadPopulation", "split_counts"]


def split_counts(n_total: int, size: int) -> list[int]:
    """Particles per rank: ``n_total`` split into ``size`` contiguous parts differing by at most one."""
    base, extra = divmod(int(n_total), int(size))
    return [base + (1 if r < extra else 0) for r in range(int(size))]


class LocalPopulation:
    """Every particle in this process.

    Parameters
    ----------
    n_total
        Particles per population ``N``.
    """

    rank, size = 0, 1

    def __init__(self, n_total: int) -> None:
        self.n_total = int(n_total)
        self.n_local = self.n_total
        self.offset = 0

    @property
    def shared_generator(self) -> torch.Generator | None:
        """The stream of the resampling draws; None: the run's own generator."""
        return None

    def logsumexp(self, a: torch.Tensor) -> torch.Tensor:
        """``log sum_i exp(a_i)`` over the whole population: ``a`` ``[P, n_local]`` -> ``[P]``."""
        return torch.logsumexp(a, dim=-1)

    def gather(self, a: torch.Tensor) -> torch.Tensor:
        """The whole population's values ``[P, N]`` on every rank (CPU) from this rank's ``a`` ``[P, n_local]``."""
        return a

    def select(
        self, tensors: Sequence[torch.Tensor], which: torch.Tensor, ancestors: torch.Tensor
    ) -> list[torch.Tensor]:
        """Particle data after resampling.

        Parameters
        ----------
        tensors
            Per-particle data ``[P * n_local, ...]`` (population-major), e.g. fields and ``log gamma``.
        which
            ``[P]`` bool: the populations that resample.
        ancestors
            ``[P, N]``: each slot's ancestor (index within its population), for the resampled populations.

        Returns
        -------
        list of Tensor
            This rank's new slice of each tensor, ``[P * n_local, ...]``.
        """
        from .resampling import ancestor_index

        rows = ancestor_index(which, ancestors.to(tensors[0].device))
        return [t[rows] for t in tensors]

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks in place (gradients of a loss that sums over particles)."""

    def sum(self, value: float) -> float:
        """A number summed over ranks."""
        return float(value)


class SpreadPopulation(LocalPopulation):
    """Each population's particles spread over the ranks of an MPI communicator.

    Parameters
    ----------
    comm
        An mpi4py intracommunicator (``MPI.COMM_WORLD``), or :class:`latflow.mpi.MPIComm` (its ``comm`` is used).
    n_total
        Particles per population ``N`` (at least one per rank).
    shared_seed
        Seed of the resampling stream; must be the same on every rank (checked).
    """

    def __init__(self, comm: Any, n_total: int, shared_seed: int) -> None:
        self.comm = getattr(comm, "comm", comm)
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        if n_total < self.size:
            raise ValueError(f"a population of {n_total} particles cannot be spread over {self.size} ranks")
        self.n_total = int(n_total)
        self.counts = split_counts(n_total, self.size)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.n_local = self.counts[self.rank]
        self.offset = int(self.offsets[self.rank])
        seeds = self.comm.allgather(int(shared_seed))
        if len(set(seeds)) != 1:
            raise ValueError(f"the shared resampling seed differs between ranks: {seeds}")
        self._shared = torch.Generator().manual_seed(int(shared_seed))

    @property
    def shared_generator(self) -> torch.Generator:
        return self._shared

    def logsumexp(self, a: torch.Tensor) -> torch.Tensor:
        local = torch.logsumexp(a.detach().double(), dim=-1).cpu().numpy()
        parts = torch.from_numpy(np.stack(self.comm.allgather(local)))  # [R, P], the same array on every rank
        return torch.logsumexp(parts, dim=0).to(device=a.device, dtype=a.dtype)

    def gather(self, a: torch.Tensor) -> torch.Tensor:
        parts = self.comm.allgather(a.detach().cpu().numpy())
        return torch.from_numpy(np.concatenate(parts, axis=-1))

    def select(
        self, tensors: Sequence[torch.Tensor], which: torch.Tensor, ancestors: torch.Tensor
    ) -> list[torch.Tensor]:
        p = int(which.shape[0])
        n = self.n_total
        slots = np.broadcast_to(np.arange(n, dtype=np.int64), (p, n))
        source = np.where(which.cpu().numpy()[:, None], ancestors.cpu().numpy(), slots)  # [P, N] within population
        owner = np.searchsorted(self.offsets, source, side="right") - 1  # [P, N] rank holding each ancestor
        # the row of each ancestor in its owner's population-major slice
        counts = np.asarray(self.counts, dtype=np.int64)
        row = np.arange(p, dtype=np.int64)[:, None] * counts[owner] + (source - self.offsets[owner])
        mine = owner == self.rank
        sends = []
        for dest in range(self.size):
            lo, hi = self.offsets[dest], self.offsets[dest + 1]
            rows = torch.from_numpy(row[:, lo:hi][mine[:, lo:hi]])  # in the destination's slot order
            sends.append([t[rows.to(t.device)].cpu().numpy() for t in tensors])
        received = self.comm.alltoall(sends)
        lo, hi = self.offset, self.offset + self.n_local
        mine_from = owner[:, lo:hi].reshape(-1)  # [P * n_local]: the rank each of my new particles comes from
        out = []
        for i, t in enumerate(tensors):
            new = torch.empty_like(t)
            for src in range(self.size):
                mask = torch.from_numpy(mine_from == src).to(t.device)
                if bool(mask.any()):
                    new[mask] = torch.from_numpy(received[src][i]).to(device=t.device, dtype=t.dtype)
            out.append(new)
        return out

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        from mpi4py import MPI

        tensors = [t for t in tensors if t is not None]
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()
        # reduce to rank 0 and broadcast, rather than Allreduce: every rank must hold bit-identical sums, or the
        # ranks' copies of the flows would drift apart step by step
        total = np.empty_like(flat)
        self.comm.Reduce(flat, total, op=MPI.SUM, root=0)
        self.comm.Bcast(total, root=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                k = t.numel()
                t.copy_(torch.from_numpy(total[offset : offset + k]).view_as(t).to(t))
                offset += k

    def sum(self, value: float) -> float:
        # gathered and summed in rank order: the same float on every rank
        return float(math.fsum(self.comm.allgather(float(value))))
