"""Progress reporting: a bar on a terminal, a log line every N steps in batch jobs."""

from __future__ import annotations

import logging
import sys
from typing import Any

from . import termination

log = logging.getLogger("latflow")


class Progress:
    """Counts ``total`` units of work.

    On a terminal (stderr is a TTY) a ``tqdm`` bar is shown; otherwise a log line
    is written every ``every`` units and at the end. ``enabled=False`` (MPI ranks
    other than 0) silences it.
    """

    def __init__(self, total: int, desc: str, *, every: int, enabled: bool = True, initial: int = 0) -> None:
        self.total = total
        self.desc = desc
        self.every = max(1, every)
        self.enabled = enabled
        self.n = initial
        self._last_logged = initial
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, k: int = 1, **info: Any) -> None:
        """Advance by ``k`` units; ``info`` (e.g. loss, acceptance) is shown beside the count.

        Also the safe point where a SIGTERM whose exception the interpreter swallowed is raised again
        (:func:`latflow.jobs.termination.check`).
        """
        termination.check()
        self.n += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            if info:
                self._bar.set_postfix({key: _fmt(v) for key, v in info.items()}, refresh=False)
            return
        if self.n - self._last_logged >= self.every or self.n >= self.total:
            self._last_logged = self.n
            extra = " ".join(f"{key}={_fmt(v)}" for key, v in info.items())
            log.info("%s %d/%d %s", self.desc, self.n, self.total, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def setup_logging(rank: int = 0) -> None:
    """Log lines to stderr with a UTC timestamp (rank shown under MPI)."""
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s latflow {tag}%(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
