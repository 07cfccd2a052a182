"""``python rank_by_rank.py JOB R [--set KEY=VALUE ...]``: the sampling of ``mpiexec -n R latflow sample JOB``, one
rank at a time in this single process.

Rank ``r`` of ``R`` is run alone, as the rank it would be under MPI (its random stream, its chain ids
``r * n_chains + b``, or ``r`` for a flow chain), and writes its own ensemble ``rank<r>.h5`` next to the
job. The rows of chain ``c`` in ``rank<r>.h5`` are then exactly the rows of chain ``c`` that the R-rank
run must write into its one ensemble, whatever the order in which rank 0 received the ranks' blocks.

Collectives are those of one process (no averaging over ranks), so the job must not tune HMC's step size
(``sampler.tune = false``): the tuned step size is the average over the ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from latflow.jobs import runner
from latflow.jobs.config import load_job
from latflow.mpi import SerialComm


class RankAlone(SerialComm):
    """Rank ``rank`` of ``size`` with one-process collectives; it writes its own rows (it is the root here)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size

    @property
    def is_root(self) -> bool:
        return True


def main(argv: list[str]) -> None:
    job_file, size = Path(argv[0]), int(argv[1])
    sets = [a.removeprefix("--set=") for a in argv[2:] if a != "--set"]
    for rank in range(size):
        out = job_file.parent / f"rank{rank}.h5"
        job = load_job(job_file, sets, out=str(out))
        runner.sample(job, resume=False, force=True, comm=RankAlone(rank, size))
        print(f"RANK_ALONE_OK rank={rank} out={out.name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
