"""SIGTERM as an exception in the main thread, robust to places where Python swallows exceptions.

The handler raises :class:`Terminated` wherever the main thread happens to be. If that is inside a
weak-reference callback or a ``__del__`` (the garbage collector runs them at arbitrary points), the
interpreter prints "Exception ignored in ..." and carries on, and the run would finish as if the signal
had never come. So the handler also records the signal, and :func:`check` (called at every progress
update of training and sampling) raises it again at the next safe point.
"""

from __future__ import annotations

import signal

_pending: int | None = None


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (handled like Ctrl-C)."""


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler: ignore further SIGTERMs (the clean-up must not be cut short), record, raise."""
    global _pending
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _pending = signum
    raise Terminated(signum)


def check() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived and its exception was swallowed on the way."""
    if _pending is not None:
        raise Terminated(_pending)


def clear() -> None:
    """Forget a handled SIGTERM (the command has reported it)."""
    global _pending
    _pending = None
