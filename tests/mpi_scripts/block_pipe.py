"""``mpiexec -n K python block_pipe.py``: :class:`latflow.mpi_blocks.BlockPipe` delivers every rank's blocks to
rank 0 complete and in order, whatever the ranks' timing.

Each rank puts ``N_BLOCKS`` blocks, small and large (a few MB, past any eager limit), sleeping a random
while (its own stream) between them, so that ranks run ahead of rank 0 and fall behind it. Rank 0 checks
that ``put`` returns, for block ``i``, the blocks ``i`` of ranks ``0 .. K-1`` in rank order, bit for bit,
and prints ``BLOCK_PIPE_OK``; every rank prints ``BLOCK_PIPE_DONE`` after ``close``.
"""

from __future__ import annotations

import time

import numpy as np

from latflow.mpi import get_comm
from latflow.mpi_blocks import BlockPipe

N_BLOCKS = 12


def block(rank: int, i: int) -> dict[str, object]:
    """Block ``i`` of ``rank``: every third one large (~4 MB)."""
    n = 500_000 if i % 3 == 0 else 10
    return {"rank": rank, "i": i, "x": np.random.default_rng([rank, i]).standard_normal(n)}


def main() -> None:
    comm = get_comm()
    assert comm.size > 1, "run under mpiexec -n K, K > 1"
    pipe = BlockPipe(comm)
    delay = np.random.default_rng(comm.rank + 100)
    for i in range(N_BLOCKS):
        time.sleep(float(delay.uniform(0, 0.03)))
        mine = block(comm.rank, i)
        got = pipe.put(mine)
        mine["x"][:] = 0  # changed after put: what was put must arrive, not this
        if comm.is_root:
            assert got is not None and len(got) == comm.size, got
            for r, b in enumerate(got):
                want = block(r, i)
                assert b["rank"] == r and b["i"] == i, (r, i, b["rank"], b["i"])
                if r:
                    assert b["x"].tobytes() == want["x"].tobytes(), (r, i)
        else:
            assert got is None
    pipe.close()
    if comm.is_root:
        print(f"BLOCK_PIPE_OK size={comm.size} blocks={N_BLOCKS}", flush=True)
    print(f"BLOCK_PIPE_DONE rank={comm.rank}", flush=True)


if __name__ == "__main__":
    main()
