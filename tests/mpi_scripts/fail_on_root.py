"""``mpiexec -n K python fail_on_root.py sample job.toml``: the ``latflow`` command with rank 0's
second ensemble commit failing (a full disk, say) while the other ranks wait for it in a gather.

The job must end on every rank with a non-zero status instead of hanging.
"""

from __future__ import annotations

import sys

import latflow.ensemble as ensemble
from latflow.jobs import cli

_append = ensemble.EnsembleWriter.append


def append(self, rows, state=None):  # type: ignore[no-untyped-def]
    if self.n_committed > 0:
        raise OSError(28, "No space left on device (injected by fail_on_root.py)")
    return _append(self, rows, state)


ensemble.EnsembleWriter.append = append  # only rank 0 writes, so only rank 0 fails

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
