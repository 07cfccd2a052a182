"""A SIGTERM whose exception the interpreter swallows (raised inside a weak-reference callback or a
``__del__``) still stops the run at the next progress update."""

from __future__ import annotations

import signal

import pytest

from latflow.jobs import termination
from latflow.jobs.progress import Progress


def test_swallowed_sigterm_is_raised_again_at_the_next_progress_update():
    previous = signal.getsignal(signal.SIGTERM)
    bar = Progress(10, "sample", every=1, enabled=False)
    try:
        bar.update(1)  # no signal: nothing happens
        try:  # what the garbage collector does with an exception from a callback: print and carry on
            termination.raise_terminated(signal.SIGTERM, None)
        except termination.Terminated:
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second SIGTERM cannot cut the clean-up
        with pytest.raises(termination.Terminated):
            bar.update(1)
        termination.clear()
        bar.update(1)  # reported and cleared: the next command runs normally
        assert bar.n == 2
    finally:
        termination.clear()
        signal.signal(signal.SIGTERM, previous)
