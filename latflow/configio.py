"""One front door to SU(3) configuration files of other lattice codes: ILDG, NERSC and openQCD.

:func:`write_configuration` and :func:`read_configuration` take and return a single configuration
as latflow lays it out, links ``[d, L0, ..., L{d-1}, 3, 3]`` complex (no batch axis), lattice axis 0
= time, ``d = 4`` or ``d = 2``. The format modules hold the byte layouts: :mod:`latflow.ildg`
(ILDG/LIME with SciDAC checksum, NERSC archive) and :mod:`latflow.openqcd`.

Axis mapping (latflow axis 0 is time)
-------------------------------------
- ILDG and NERSC: sites run x fastest, then y, z, t slowest; ``(x, y, z, t) = (axis 1, axis 2,
  axis 3, axis 0)`` and file direction ``mu = 0, 1, 2, 3`` (x, y, z, t) is latflow direction
  ``1, 2, 3, 0`` (``lx, ly, lz, lt = L1, L2, L3, L0``).
- openQCD: ``x0`` = time is the slowest coordinate and ``x3`` the fastest; ``(x0, x1, x2, x3) =
  (axis 0, axis 1, axis 2, axis 3)`` and directions coincide.

2D lattices embedded in 4D
--------------------------
The three formats are 4D. A 2D SU(3) configuration ``[2, L0, L1, 3, 3]`` is written as the 4D
configuration on ``L0 x L1 x E x E`` whose links in directions 0 and 1 are the 2D ones, copied to
every ``(x2, x3)``, and whose links in directions 2 and 3 are the identity. ``E = 1`` for ILDG and
NERSC (the lattice ``L0 x L1 x 1 x 1``); ``E = 4`` for openQCD, whose odd-point storage needs even
sizes and whose programs accept no lattice size below 4. Every plaquette in a plane with direction 2
or 3 of such a field is the identity, so its 4D average plaquette is ``(p_2D + 5) / 6`` (the files'
header values are those of the 4D field; ``info["plaquette"]`` is that of the returned lattice).

On reading (``ndim=None``), a 4D file is returned as 2D exactly when it is such an embedding: all
links in directions 2 and 3 are bitwise the identity and the links in directions 0 and 1 do not depend
on ``(x2, x3)``. Any other field is returned as 4D; ``ndim=4`` always returns 4D and ``ndim=2``
raises unless the file is an embedding.

Safety
------
Writes are atomic (a temporary file in the target directory, then a link or rename) and never replace
an existing file unless ``force=True``. Reading checks the format's checksums (SciDAC CRC for ILDG,
``CHECKSUM``, ``PLAQUETTE`` and ``LINK_TRACE`` for NERSC, the plaquette for openQCD) and that every
link is in SU(3) (``|U U^dagger - 1|`` and ``|det U - 1|`` below a tolerance set by the file's
precision). Every failure is a :class:`ConfigurationError` (a ``ValueError``) with a one-line message
that names the file.
"""

from __future__ import annotations

import html
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latflow import ildg, openqcd
from latflow.sun import plaquette_mean

FORMATS: tuple[str, ...] = ("ildg", "nersc", "openqcd")
#: lattice size in directions 2 and 3 of a 2D lattice embedded in 4D, per format
EMBED_EXTENT: dict[str, int] = {"ildg": 1, "nersc": 1, "openqcd": 4}
#: unitarity tolerance by the precision (bits per real number) of the stored numbers
SU3_TOLERANCE: dict[int, float] = {64: 1e-10, 32: 1e-5}


class ConfigurationError(ValueError):
    """A configuration file cannot be written or read; the message is one line and names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _as_links(links: Any) -> torch.Tensor:
    """``links`` (numpy or torch) as a complex128 CPU tensor."""
    if isinstance(links, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(links))
    elif isinstance(links, torch.Tensor):
        t = links.detach().to("cpu")
    else:
        raise TypeError(f"links must be a numpy array or a torch tensor, got {type(links).__name__}")
    if not t.is_complex():
        raise ValueError(f"SU(3) links must be complex, got {t.dtype}")
    return t.to(torch.complex128)


def su3_violation(links: torch.Tensor) -> tuple[float, float]:
    """``(max |U U^dagger - 1|, max |det U - 1|)`` over links ``[..., 3, 3]`` (entry-wise max norm)."""
    eye = torch.eye(links.shape[-1], dtype=links.dtype)
    unit = (links @ links.transpose(-2, -1).conj() - eye).abs().amax().item() if links.numel() else 0.0
    det = (torch.linalg.det(links) - 1).abs().amax().item() if links.numel() else 0.0
    return float(unit), float(det)


def _check_su3(links: torch.Tensor, tol: float, name: str) -> None:
    unit, det = su3_violation(links)
    if not (unit <= tol and det <= tol):  # also false for NaN
        raise ConfigurationError(
            f"{name}: links are not SU(3): max |U U^dagger - 1| = {unit:.3g}, max |det U - 1| = {det:.3g} "
            f"(tolerance {tol:g})"
        )


def embed_2d(links: torch.Tensor, extent: int = 1) -> torch.Tensor:
    """2D links ``[2, L0, L1, N, N]`` -> 4D links ``[4, L0, L1, E, E, N, N]`` (see the module docstring)."""
    if links.dim() != 5 or links.shape[0] != 2:
        raise ValueError(f"2D links are [2, L0, L1, N, N], got {list(links.shape)}")
    _, l0, l1, n, _ = links.shape
    out = torch.empty((4, l0, l1, extent, extent, n, n), dtype=links.dtype)
    out[:2] = links[:, :, :, None, None]
    out[2:] = torch.eye(n, dtype=links.dtype)
    return out


def is_embedded_2d(links: torch.Tensor) -> bool:
    """Whether 4D links ``[4, L0, L1, L2, L3, N, N]`` are a 2D field embedded as :func:`embed_2d` does (bitwise)."""
    if links.dim() != 7 or links.shape[0] != 4:
        return False
    eye = torch.eye(links.shape[-1], dtype=links.dtype)
    if not bool(torch.equal(links[2:], eye.expand_as(links[2:]))):
        return False
    first = links[:2, :, :, :1, :1]
    return bool(torch.equal(links[:2], first.expand_as(links[:2])))


def reduce_to_2d(links: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`embed_2d`: ``[4, L0, L1, L2, L3, N, N]`` -> ``[2, L0, L1, N, N]`` (no check)."""
    return links[:2, :, :, 0, 0].clone()


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path``: ``"ildg"``, ``"nersc"`` or ``"openqcd"``.

    ILDG by the LIME magic number, NERSC by ``BEGIN_HEADER``, openQCD when its header sizes match the
    file size.

    Raises
    ------
    ConfigurationError
        Unreadable, or none of the three.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(head) >= 4 and struct.unpack(">I", head[:4])[0] == ildg.LIME_MAGIC:
        return "ildg"
    if head.startswith(b"BEGIN_HEADER"):
        return "nersc"
    if openqcd.read_openqcd_header(path) is not None:
        return "openqcd"
    raise ConfigurationError(
        f"{path}: not a configuration file this version reads (no LIME magic number, no NERSC BEGIN_HEADER, "
        f"and not an openQCD file: {path.stat().st_size} bytes match no lattice size in its header)"
    )


def _check_format(fmt: str) -> str:
    f = str(fmt).lower()
    if f not in FORMATS:
        raise ConfigurationError(f"unknown configuration format {fmt!r}; known: {', '.join(FORMATS)}")
    return f


def write_configuration(
    path: str | os.PathLike,
    links: np.ndarray | torch.Tensor,
    fmt: str,
    *,
    beta: float | None = None,
    force: bool = False,
    precision: int = 64,
    two_rows: bool = False,
    ensemble_id: str = "latflow",
    sequence_number: int = 0,
    description: str | None = None,
) -> dict[str, Any]:
    """Write one SU(3) configuration in format ``fmt``.

    Parameters
    ----------
    path
        Output file; written atomically, an existing one is refused unless ``force``.
    links
        Complex ``[4, L0, L1, L2, L3, 3, 3]`` or ``[2, L0, L1, 3, 3]`` (embedded in 4D as the module
        docstring says), numpy or torch; must be SU(3) to ``1e-10``.
    fmt
        ``"ildg"``, ``"nersc"`` or ``"openqcd"``.
    beta
        Gauge coupling recorded where the format has room: ILDG in the ``scidac-file-xml`` record
        (``<beta>``), NERSC as header line ``BETA``; openQCD files have no metadata (not stored).
    force
        Replace an existing file.
    precision
        ILDG/NERSC: 64 or 32 bits per real number (openQCD: always 64).
    two_rows
        NERSC: store two rows per matrix (``4D_SU3_GAUGE``) instead of three.
    ensemble_id, sequence_number
        NERSC header ``ENSEMBLE_ID``/``ENSEMBLE_LABEL`` and ``SEQUENCE_NUMBER``; ILDG: in the file XML.
    description
        Free text for the ILDG file XML (``<description>``).

    Returns
    -------
    dict
        ``{"format", "path", "shape" (latflow lattice shape), "file_shape" (4D, latflow axis order),
        "embedded_2d", "bytes"}``.
    """
    fmt = _check_format(fmt)
    name = str(path)
    u = _as_links(links)
    if u.dim() < 3 or u.shape[-2:] != (3, 3):
        raise ConfigurationError(f"{name}: {fmt} stores SU(3) links [d, L0, ..., 3, 3], got {list(u.shape)}")
    d = u.dim() - 3
    if d not in (2, 4) or u.shape[0] != d:
        raise ConfigurationError(
            f"{name}: links must be [d, L0, ..., L{{d-1}}, 3, 3] with d = 2 or 4, got {list(u.shape)}"
        )
    _check_su3(u, SU3_TOLERANCE[64], name)
    shape = tuple(int(s) for s in u.shape[1:-2])
    u4 = embed_2d(u, EMBED_EXTENT[fmt]) if d == 2 else u
    try:
        if fmt == "ildg":
            xml = _ildg_file_xml(shape, beta, ensemble_id, sequence_number, description)
            ildg.write_ildg(path, u4, precision=precision, extra_xml=xml, overwrite=force)
        elif fmt == "nersc":
            extra = {} if beta is None else {"BETA": f"{float(beta):.17g}"}
            ildg.write_nersc(
                path,
                u4,
                two_rows=two_rows,
                precision=precision,
                ensemble_id=ensemble_id,
                ensemble_label=ensemble_id,
                sequence_number=sequence_number,
                extra_header=extra,
                overwrite=force,
            )
        else:
            if precision != 64:
                raise ConfigurationError(f"{name}: openQCD files hold doubles only (precision 64), got {precision}")
            openqcd.write_openqcd(path, u4, overwrite=force)
    except FileExistsError:
        raise ConfigurationError(f"{name}: exists; pass force=True (--force) to replace it") from None
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot write: {exc.strerror or exc}") from None
    except ConfigurationError:
        raise
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    return {
        "format": fmt,
        "path": name,
        "shape": shape,
        "file_shape": tuple(int(s) for s in u4.shape[1:5]),
        "embedded_2d": d == 2,
        "bytes": Path(path).stat().st_size,
    }


def _ildg_file_xml(
    shape: tuple[int, ...], beta: float | None, ensemble_id: str, sequence_number: int, description: str | None
) -> str:
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?><latflow>',
        f"<ensemble_id>{html.escape(ensemble_id)}</ensemble_id>",
        f"<sequence_number>{int(sequence_number)}</sequence_number>",
        f"<lattice_shape>{' '.join(map(str, shape))}</lattice_shape>",
    ]
    if beta is not None:
        parts.append(f"<beta>{float(beta):.17g}</beta>")
    if description:
        parts.append(f"<description>{html.escape(' '.join(description.split()))}</description>")
    parts.append("</latflow>")
    return "".join(parts)


def _float_or_none(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_configuration(
    path: str | os.PathLike, fmt: str | None = None, *, ndim: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one SU(3) configuration, verifying checksums, header values and SU(3)-ness.

    Parameters
    ----------
    path
        The file.
    fmt
        ``"ildg"``, ``"nersc"``, ``"openqcd"``, or None to detect it (:func:`detect_format`).
    ndim
        None: 2D if the file is an embedded 2D lattice, else 4D; 4: always 4D; 2: 2D or an error.

    Returns
    -------
    links
        complex128 ``[d, L0, ..., L{d-1}, 3, 3]`` (axis 0 = time), ``d`` 4 or 2.
    info
        ``{"format", "path", "shape" (lattice shape of ``links``), "file_shape" (4D, latflow axis
        order), "embedded_2d", "plaquette" (``<Re tr P>/3`` of the returned lattice), "plaquette_4d"
        (of the 4D field in the file), "header_plaquette" (the file's value in latflow's normalisation,
        ``<Re tr P>/3``; None if it has none), "checksum_verified", "precision", "beta" (float or None),
        "header" (format-specific: NERSC header dict, ILDG user XML and SciDAC sums, openQCD header)}``.

    Raises
    ------
    ConfigurationError
        One line naming the file: missing, unrecognised, truncated, checksum or header mismatch,
        links not in SU(3), or not 2D when ``ndim=2``.
    """
    name = str(path)
    if ndim not in (None, 2, 4):
        raise ConfigurationError(f"{name}: ndim must be None, 2 or 4, got {ndim}")
    if not Path(path).is_file():
        raise ConfigurationError(f"{name}: no such file")
    fmt = detect_format(path) if fmt is None else _check_format(fmt)
    beta: float | None = None
    header_plaquette: float | None = None
    try:
        if fmt == "ildg":
            u4, meta = ildg.read_ildg(path)
            precision = int(meta["precision"])
            checked = bool(meta["checksum_verified"])
            xml = meta.get("user_xml") or ""
            m = re.search(r"<beta>\s*([^<]*?)\s*</beta>", xml)
            beta = _float_or_none(m.group(1)) if m else None
            header = {"user_xml": meta.get("user_xml"), "scidac_checksum": meta.get("scidac_checksum")}
        elif fmt == "nersc":
            u4, header = ildg.read_nersc(path)
            precision = 32 if "32" in header.get("FLOATING_POINT", "") else 64
            checked = True
            beta = _float_or_none(header.get("BETA"))
            header_plaquette = _float_or_none(header.get("PLAQUETTE"))
        else:
            u4, meta = openqcd.read_openqcd(path)
            precision, checked = 64, True
            header_plaquette = float(meta["plaquette"]) / 3.0
            header = {k: meta[k] for k in ("shape", "plaquette")}
    except ConfigurationError:
        raise
    except (ValueError, KeyError, struct.error) as exc:
        text = str(exc)
        raise ConfigurationError(text if text.startswith(name) else f"{name}: {fmt}: {text}") from None
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot read: {exc.strerror or exc}") from None
    _check_su3(u4, SU3_TOLERANCE[precision], name)
    embedded = is_embedded_2d(u4)
    if ndim == 2 and not embedded:
        raise ConfigurationError(
            f"{name}: not a 2D lattice embedded in 4D (directions 2 and 3 must be identity links and "
            "directions 0 and 1 independent of x2, x3)"
        )
    want_2d = embedded if ndim is None else ndim == 2
    links = reduce_to_2d(u4) if want_2d else u4
    plaq4 = float(plaquette_mean(u4[None])[0])
    info: dict[str, Any] = {
        "format": fmt,
        "path": name,
        "shape": tuple(int(s) for s in links.shape[1:-2]),
        "file_shape": tuple(int(s) for s in u4.shape[1:5]),
        "embedded_2d": bool(want_2d),
        "plaquette": float(plaquette_mean(links[None])[0]) if want_2d else plaq4,
        "plaquette_4d": plaq4,
        "header_plaquette": header_plaquette,
        "checksum_verified": checked,
        "precision": precision,
        "beta": beta,
        "header": header,
    }
    return links.numpy(), info
