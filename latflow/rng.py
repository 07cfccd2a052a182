"""Explicit random streams: one ``torch.Generator`` per purpose and per MPI rank."""

from __future__ import annotations

import hashlib

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


def configuration_z2_noise(x: torch.Tensor, n_noise: int, field_shape: tuple[int, ...]) -> torch.Tensor:
    """Z2 noise ``[B * n_noise, *field_shape]`` (configuration-major) seeded by each configuration's bytes.

    Entries are independent ``+-1`` (``E[eta eta^dag] = 1``); configuration ``b`` of ``x`` ``[B, ...]`` gets rows
    ``b * n_noise ... (b + 1) * n_noise - 1`` from a CPU generator seeded with a BLAKE2b hash of its float64
    values, so the noise is a fixed function of the configuration (a repeated or resumed state measures the same
    stochastic estimate). Complex: complex128 for float64 ``x``, else complex64; on ``x``'s device.
    """
    shape = (int(n_noise), *field_shape)
    host = x.detach().to("cpu", torch.float64).contiguous().numpy()
    etas = []
    for c in host:
        seed = int.from_bytes(hashlib.blake2b(c.tobytes(), digest_size=8).digest(), "little") >> 1
        g = torch.Generator().manual_seed(seed)
        etas.append(torch.randint(0, 2, shape, generator=g, dtype=torch.int8))
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    eta = torch.cat(etas) if etas else torch.zeros((0, *shape[1:]), dtype=torch.int8)
    return (2 * eta.to(cdtype) - 1).to(x.device)
