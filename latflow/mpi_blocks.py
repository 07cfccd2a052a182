"""Pipelined transfer of sample blocks from every MPI rank to the writing rank 0.

Sampling under MPI writes one ensemble: rank 0 commits, block after block, the rows of every rank.
A collective ``gather`` per block ties the ranks together in lock step: every rank waits at each block
for the slowest rank and then for rank 0's commit (HDF5 write, checksums). :class:`BlockPipe` instead
lets the other ranks hand over a block with a non-blocking send and go on sampling, at most ``depth``
blocks ahead of rank 0; rank 0 receives the ranks' blocks in rank order, in the order they were sent
(MPI's non-overtaking rule on one communicator, source and tag). What rank 0 commits is exactly what
``gather`` gave: the same objects, in the same order.

Waiting is polite: a rank that has to wait (rank 0 for a slower rank, a rank ``depth`` blocks ahead for
rank 0) polls with short sleeps instead of spinning in the MPI library, so that its core is free for
the ranks that compute (busy-polling MPI progress engines take a whole core while they wait).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from latflow.mpi import SerialComm

#: point-to-point tag of the blocks (on a communicator of their own, so nothing else can match it)
BLOCK_TAG = 17
#: seconds between two polls of a rank that waits
POLL_S = 5e-4


def _wait_until(done: Callable[[], bool], poll_s: float = POLL_S) -> None:
    """Return once ``done()`` is true, sleeping ``poll_s`` between calls (each call drives MPI progress)."""
    while not done():
        time.sleep(poll_s)


class BlockPipe:
    """Hands each rank's blocks to rank 0: ``put(obj)`` returns every rank's object on rank 0, ``None`` elsewhere.

    Parameters
    ----------
    comm
        The world communicator (:class:`latflow.mpi.SerialComm` or one with an mpi4py ``comm``).
    depth
        Sends a non-root rank may have in flight (blocks it may run ahead of rank 0); ``>= 1``. A rank
        holds up to ``depth`` pickled blocks besides the one it computes: with the default 1 its memory
        peak is that of the former ``gather`` (a block and its pickled copy). A rank waits only while rank 0
        has yet to receive ``depth`` blocks of it.

    Notes
    -----
    Every rank must call :meth:`put` equally often and :meth:`close` at the end (a non-root rank's
    ``close`` waits until rank 0 has received all its blocks). The object is pickled when
    :meth:`put` is called, so it may be changed afterwards. A failed rank ends the job through
    ``MPI_Abort`` (the command line's handler), which also ends a rank waiting here.
    """

    def __init__(self, comm: SerialComm, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.rank = comm.rank
        self.size = comm.size
        self.depth = depth
        world = getattr(comm, "comm", None)
        # a communicator of its own: the blocks cannot match any other point-to-point message
        self._comm = world.Dup() if world is not None and self.size > 1 else None
        self._pending: deque[Any] = deque()

    def put(self, obj: Any) -> list[Any] | None:
        """Hand over this rank's next block.

        Parameters
        ----------
        obj
            Any picklable object (here: a block's rows and the sampler state).

        Returns
        -------
        list or None
            On rank 0 the objects of ranks ``0 .. size-1`` for this block, in rank order (what
            ``comm.gather(obj)`` returns); ``None`` on the other ranks.
        """
        if self._comm is None:
            return [obj]
        if self.rank == 0:
            return [obj, *(self._recv(source) for source in range(1, self.size))]
        while len(self._pending) >= self.depth:
            request = self._pending.popleft()
            _wait_until(lambda r=request: r.Test())
        self._pending.append(self._comm.isend(obj, dest=0, tag=BLOCK_TAG))
        return None

    def _recv(self, source: int) -> Any:
        _wait_until(lambda: self._comm.iprobe(source=source, tag=BLOCK_TAG))
        return self._comm.recv(source=source, tag=BLOCK_TAG)

    def close(self) -> None:
        """Wait until every block of this rank is received (non-root ranks); release the communicator."""
        if self._comm is None:
            return
        while self._pending:
            request = self._pending.popleft()
            _wait_until(lambda r=request: r.Test())
        self._comm.Free()
        self._comm = None
