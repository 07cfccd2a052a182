"""Explicit random streams: one ``torch.Generator`` per purpose and per MPI rank."""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for the sub-stream ``stream`` of ``seed`` (independent streams per rank or purpose)."""
    ss = np.random.SeedSequence(int(seed), spawn_key=tuple(int(s) for s in stream))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, *stream)``."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, *stream))
    return g


def numpy_generator(generator: torch.Generator) -> np.random.Generator:
    """A numpy ``Generator`` seeded from the torch stream ``generator`` (which the draw advances).

    For draws numpy does well and torch lacks (von Mises): the torch stream stays the single source of
    randomness, so a seed still reproduces a run bit for bit.
    """
    seed = torch.randint(0, 2**62, (4,), generator=generator, dtype=torch.int64, device=generator.device).tolist()
    return np.random.default_rng(np.random.SeedSequence(seed))
