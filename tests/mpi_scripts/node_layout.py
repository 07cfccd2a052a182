"""Run as ``mpiexec -n K python node_layout.py``: writes each rank's node layout to ``layout.<rank>.json``.

``{"rank": r, "size": K, "local_rank": ..., "local_size": ..., "node_ranks": [...], "launcher": [rank, size]
or null, "gpu_for_k": ..., "gpu_for_1": ...}``: the communicator's local rank and size (``MPI_COMM_TYPE_SHARED``),
the world ranks on the node, what the launcher's variables say, and the CUDA device
:func:`latflow.mpi.gpu_for_rank` picks with K and with 1 visible devices (no GPU needed: the selection is a
function of these numbers). One file per rank: the launcher interleaves the ranks' output lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from latflow.mpi import get_comm, gpu_for_rank, launcher_local_rank


def main() -> None:
    comm = get_comm()
    visible = {}
    for n in (comm.size, 1):
        try:
            visible[n] = gpu_for_rank(comm.local_rank, comm.local_size, n)
        except ValueError as exc:
            visible[n] = str(exc)
    record = {
        "rank": comm.rank,
        "size": comm.size,
        "local_rank": comm.local_rank,
        "local_size": comm.local_size,
        "node_ranks": comm.node_allgather(comm.rank),
        "launcher": launcher_local_rank(),
        "gpu_for_k": visible[comm.size],
        "gpu_for_1": visible[1],
    }
    Path(f"layout.{comm.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
