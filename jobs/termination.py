"""SIGTERM as an exception in the main thread, robust to places where Python swallows exceptions.

The handler raises :class:`Terminated` wherever the main thread happens to be. If that is inside a
weak-reference callback or a ``__del__`` (the garbage collector runs them at arbitrary points), the
interpreter prints "Exception ignored in ..." and carries on, and the run would finish as if the signal
had never come. So the handler also records the signal, and :func:`check` (called at every progress
update of training and sampling) raises it again at the next safe point.

SIGUSR1 (what Slurm's ``--signal=USR1@N`` sends before the walltime ends) is handled the same way.

Inside :func:`deferred` the handler only records the signal: the code that opened the block stops at
a point of its own choosing (training: after the last completed optimiser step, where it writes a
checkpoint), using :func:`pending`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: the signals that stop a run cleanly (the scheduler's termination and walltime-warning signals)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_pending: int | None = None
_deferred = False


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM or SIGUSR1 (handled like Ctrl-C).

    ``args[0]`` is the signal number. ``everywhere``: raised on every rank of a multi-rank run at the same
    point, after the ranks agreed to stop (:func:`agreed`) and the checkpoint was written; such a stop ends
    each rank normally (exit 143) instead of through ``MPI_Abort``.
    """

    def __init__(self, signum: int = signal.SIGTERM, *, everywhere: bool = False) -> None:
        super().__init__(signum)
        self.everywhere = everywhere

    @property
    def signal_name(self) -> str:
        """``"SIGTERM"`` or ``"SIGUSR1"`` (the signal that stopped the run)."""
        return signal_name(self.args[0] if self.args else signal.SIGTERM)


def signal_name(signum: int) -> str:
    """The name of a signal number, e.g. ``"SIGUSR1"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def install() -> dict[int, object]:
    """Install :func:`raise_terminated` for every signal in :data:`SIGNALS`; returns the previous handlers."""
    return {int(s): signal.signal(s, raise_terminated) for s in SIGNALS}


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers that :func:`install` returned."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]


def raise_terminated(signum: int, frame: object) -> None:
    """The handler: ignore further stop signals (the clean-up must not be cut short), record, raise.

    Inside :func:`deferred` it records only.
    """
    global _pending
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _pending = signum
    if not _deferred:
        raise Terminated(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a stop signal is only recorded; the block's owner stops where :func:`pending` says so."""
    global _deferred
    previous = _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = previous


def pending() -> int | None:
    """The stop signal received so far (None if none)."""
    return _pending


def check() -> None:
    """Raise :class:`Terminated` if a stop signal arrived and its exception was swallowed on the way.

    Inside :func:`deferred` this does nothing: the block's owner decides where to stop.
    """
    if _pending is not None and not _deferred:
        raise Terminated(_pending)


def agreed(comm: object) -> int | None:
    """The stop signal of a multi-rank run, the same on every rank (collective: every rank must call it).

    Any rank having received a stop signal stops all of them. The name reported is SIGUSR1 when any rank got it
    (the walltime warning), else SIGTERM: one allreduce of ``n_SIGTERM + (R + 1) n_SIGUSR1`` tells both counts.
    ``comm``: :class:`latflow.mpi.SerialComm` or a subclass (one rank: :func:`pending`).
    """
    signum = _pending
    size = int(getattr(comm, "size", 1))
    if size == 1:
        return signum
    code = 0 if signum is None else (size + 1 if signum == signal.SIGUSR1 else 1)
    total = int(round(comm.allreduce_sum(code)))  # type: ignore[attr-defined]
    n_usr1, n_term = divmod(total, size + 1)
    if n_usr1:
        return int(signal.SIGUSR1)
    return int(signal.SIGTERM) if n_term else None


def clear() -> None:
    """Forget a handled stop signal (the command has reported it)."""
    global _pending
    _pending = None
