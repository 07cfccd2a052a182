"""SU(3) gauge configuration files in openQCD's exported ("universal", global I/O) format.

Specification followed (written from openQCD's documentation, M. Luescher et al., openQCD-1.x/2.x:
``main/README.io``, "ORDERING OF THE FIELD VARIABLES" and "HEADER DATA", type 2, and the comments of
``modules/archive/archive.c`` on ``export_cnfg``/``import_cnfg``; no code taken from openQCD):

- Byte order: little endian on every machine; integers 4 bytes, doubles 8 bytes (IEEE 754).
- Header: ``int32 N0, N1, N2, N3`` (the lattice sizes; ``x0`` is time) and ``double`` the average
  plaquette.
- Then, for every *odd* point ``x`` (``x0 + x1 + x2 + x3`` odd) in lexicographic order
  ``ix = x3 + N3 (x2 + N2 (x1 + N1 x0))`` (``x3`` fastest, ``x0`` slowest), the 8 link variables
  attached to ``x`` in the directions ``+0, -0, +1, -1, +2, -2, +3, -3``: that is
  ``U_0(x), U_0(x - e0), U_1(x), U_1(x - e1), ..., U_3(x - e3)`` (the link in direction ``-mu``
  is the one from ``x - e_mu`` to ``x``, stored as ``U_mu(x - e_mu)``). Each is a 3x3 complex
  matrix of doubles, row-major, ``(re, im)`` pairs (openQCD's ``su3_dble``: ``c11, c12, ..., c33``).
  Every link of the lattice is stored exactly once because all sizes are even (openQCD requires
  each ``N_mu`` to be even -- its local lattices are even and at least 4).
- Plaquette normalisation: openQCD's header holds ``sum_p Re tr U(p) / (6 N0 N1 N2 N3)`` over all
  plaquettes, i.e. ``<Re tr P>`` *without* the ``1/3``: 3 for the unit field. latflow's
  :func:`latflow.sun.plaquette_mean` (like NERSC's ``PLAQUETTE``) is ``<Re tr P> / 3``, so
  ``header = 3 * plaquette_mean``. openQCD's ``import_cnfg`` accepts the file if the recomputed
  sum agrees within ``sqrt(64 n_p) eps + 64 (|a| + |b|) eps`` (``n_p = 6 V`` plaquettes,
  ``eps`` = double epsilon); :func:`read_openqcd` checks the average with the same tolerance
  divided by ``n_p``, times a safety factor (our summation order differs).
- File size: ``16 + 8 + (V / 2) * 8 * 144 = 24 + 576 V`` bytes.

Axes and directions
-------------------
latflow's axis 0 is time, like openQCD's ``x0``, and axes 1, 2, 3 are ``x1, x2, x3``: the mapping is
the identity for both the site coordinates and the directions (links ``[4, N0, N1, N2, N3, 3, 3]``,
``links[mu, x0, x1, x2, x3]`` is openQCD's ``U(x, mu)``).

Only periodic boundary conditions are represented (openQCD's boundary values of SF/open boundary
conditions are ordinary stored links).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from latflow.ildg import _atomic_write, _check_su3_links
from latflow.sun import plaquette_mean

HEADER_BYTES = 4 * 4 + 8
BYTES_PER_LINK = 9 * 16
_DBL_EPS = float(np.finfo(np.float64).eps)
_SAFETY = 16.0  # our summation order differs from openQCD's: allow this many times its bound


def file_size(shape: tuple[int, int, int, int]) -> int:
    """Bytes of an openQCD configuration of lattice sizes ``(N0, N1, N2, N3)``: ``24 + 576 V``."""
    volume = int(np.prod(shape))
    return HEADER_BYTES + volume * 4 * BYTES_PER_LINK


def openqcd_plaquette(links: torch.Tensor) -> float:
    """openQCD's average plaquette ``sum_p Re tr U(p) / (6 V)`` of links ``[4, N0, N1, N2, N3, 3, 3]``.

    Equals ``3 * latflow.sun.plaquette_mean`` (3 for the unit field).
    """
    _check_su3_links(links)
    return 3.0 * float(plaquette_mean(links.detach().to("cpu", torch.complex128)[None])[0])


def plaquette_tolerance(shape: tuple[int, int, int, int], a: float, b: float) -> float:
    """Tolerance on the average plaquette: openQCD's bound on the sum / ``n_p = 6 V``, times a safety factor."""
    n_p = 6.0 * float(np.prod(shape))
    eps_sum = np.sqrt(64.0 * n_p) * _DBL_EPS + 64.0 * n_p * (abs(a) + abs(b)) * _DBL_EPS
    return _SAFETY * eps_sum / n_p


def _odd_mask(shape: tuple[int, ...]) -> np.ndarray:
    """Boolean ``[N0, N1, N2, N3]``: ``x0 + x1 + x2 + x3`` odd."""
    return np.indices(shape).sum(axis=0) % 2 == 1


def _check_even(shape: tuple[int, ...], name: str) -> None:
    if any(n % 2 for n in shape):
        raise ValueError(
            f"{name}: openQCD's format needs even lattice sizes (links are stored at odd points only), "
            f"got {'x'.join(map(str, shape))}"
        )


def to_openqcd_order(links: torch.Tensor) -> np.ndarray:
    """latflow links ``[4, N0, N1, N2, N3, 3, 3]`` -> complex128 ``[V/2, 8, 3, 3]`` in file order.

    Row ``k`` is the ``k``-th odd point in lexicographic order, column ``2 mu`` its link ``U_mu(x)``,
    column ``2 mu + 1`` the link ``U_mu(x - e_mu)``.
    """
    shape = _check_su3_links(links)
    _check_even(shape, "links")
    u = links.detach().to("cpu", torch.complex128).numpy()
    odd = _odd_mask(shape)
    cols = []
    for mu in range(4):
        cols.append(u[mu][odd])  # U_mu(x)
        cols.append(np.roll(u[mu], 1, axis=mu)[odd])  # rolled[x] = U_mu(x - e_mu)
    return np.ascontiguousarray(np.stack(cols, axis=1))


def from_openqcd_order(data: np.ndarray, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of :func:`to_openqcd_order`: ``[V/2, 8, 3, 3]`` -> links ``[4, N0, N1, N2, N3, 3, 3]`` complex128."""
    _check_even(shape, "data")
    odd = _odd_mask(shape)
    u = np.empty((4, *shape, 3, 3), dtype=np.complex128)
    for mu in range(4):
        fwd = np.empty((*shape, 3, 3), dtype=np.complex128)
        fwd[odd] = data[:, 2 * mu]
        back = np.empty_like(fwd)
        back[odd] = data[:, 2 * mu + 1]  # back[x] = U_mu(x - e_mu) at odd x
        # at even y, U_mu(y) = back[y + e_mu] (y + e_mu is odd because N_mu is even)
        shifted = np.roll(back, -1, axis=mu)
        u[mu] = np.where(odd[..., None, None], fwd, shifted)
    return torch.from_numpy(u)


def write_openqcd(path: str | os.PathLike, links: torch.Tensor, *, overwrite: bool = False) -> None:
    """Write an SU(3) configuration in openQCD's exported format (little-endian doubles).

    Parameters
    ----------
    path
        Output file (written atomically; an existing file is replaced only with ``overwrite``).
    links
        Complex ``[4, N0, N1, N2, N3, 3, 3]`` (axis 0 = time = openQCD's ``x0``), every ``N_mu`` even.
    overwrite
        Replace an existing file.
    """
    shape = _check_su3_links(links)
    body = to_openqcd_order(links).astype("<c16").tobytes()
    header = struct.pack("<4i", *shape) + struct.pack("<d", openqcd_plaquette(links))
    _atomic_write(path, header + body, overwrite)


def read_openqcd_header(path: str | os.PathLike) -> tuple[tuple[int, int, int, int], float] | None:
    """``((N0, N1, N2, N3), plaquette)`` if ``path`` is plausibly an openQCD configuration, else None.

    Plausible: at least 24 bytes, four positive even sizes, and the file is exactly ``24 + 576 V`` bytes.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(HEADER_BYTES)
    except OSError:
        return None
    if len(head) < HEADER_BYTES:
        return None
    shape = struct.unpack_from("<4i", head)
    if any(n <= 0 for n in shape) or size != file_size(shape):
        return None
    return shape, struct.unpack_from("<d", head, 16)[0]


def read_openqcd(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Read an openQCD exported configuration, checking its size and header plaquette.

    Returns
    -------
    links
        complex128 ``[4, N0, N1, N2, N3, 3, 3]``.
    metadata
        ``{"shape": (N0, N1, N2, N3), "plaquette": header value (openQCD normalisation, 3 for the unit
        field), "plaquette_computed": ours times 3, "checksum_verified": True}``.

    Raises
    ------
    ValueError
        One line naming the file: too short, sizes not positive and even, size mismatch, or a
        plaquette that differs from the header beyond openQCD's tolerance.
    """
    name = str(path)
    raw = Path(path).read_bytes()
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{name}: too short for an openQCD configuration ({len(raw)} bytes < {HEADER_BYTES})")
    shape = tuple(int(n) for n in struct.unpack_from("<4i", raw))
    stated = struct.unpack_from("<d", raw, 16)[0]
    if any(n <= 0 for n in shape) or any(n % 2 for n in shape):
        raise ValueError(f"{name}: openQCD header sizes {list(shape)} are not positive even integers")
    expected = file_size(shape)  # type: ignore[arg-type]
    if len(raw) != expected:
        raise ValueError(f"{name}: openQCD file of {'x'.join(map(str, shape))} needs {expected} bytes, has {len(raw)}")
    data = np.frombuffer(raw, dtype="<c16", offset=HEADER_BYTES).reshape(-1, 8, 3, 3)
    links = from_openqcd_order(data, shape)  # type: ignore[arg-type]
    got = openqcd_plaquette(links)
    finite = np.isfinite(stated) and np.isfinite(got)
    if not finite or abs(got - stated) > plaquette_tolerance(shape, got, stated):  # type: ignore[arg-type]
        raise ValueError(f"{name}: openQCD plaquette mismatch: header {stated!r}, data give {got!r}")
    meta = {"shape": shape, "plaquette": stated, "plaquette_computed": got, "checksum_verified": True}
    return links, meta
