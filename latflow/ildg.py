"""SU(3) gauge configuration files read by other lattice codes: ILDG (LIME) and NERSC archive.

Specifications followed (written from the format descriptions, no code taken from any project):

- LIME, "Lattice QCD Interchange Message Encapsulation" (USQCD c-lime documentation): a file is a
  sequence of records, each a 144-byte big-endian header -- ``uint32`` magic ``0x456789ab``,
  ``uint16`` version (1), ``uint16`` flags (bit 15 MB "message begin", bit 14 ME "message end"),
  ``uint64`` data length in bytes, a 128-byte NUL-padded ASCII type string -- followed by the data,
  zero-padded to a multiple of 8 bytes (the length field holds the unpadded size).
- ILDG binary file format (ILDG Metadata/Middleware Working Groups, "ILDG file format", v1.1):
  record ``ildg-format`` (XML ``<ildgFormat>`` with ``version``, ``field`` = ``su3gauge``,
  ``precision`` 32|64, ``lx ly lz lt``) and ``ildg-binary-data`` (big-endian IEEE floats; sites in
  the order x fastest, then y, z, t slowest; at each site the links ``mu = 0..3 = x, y, z, t``,
  each a 3x3 complex matrix row-major with (re, im) pairs).
- SciDAC QIO user guide (USQCD): messages ``scidac-private-file-xml`` + ``scidac-file-xml``, then
  ``scidac-private-record-xml``, ``scidac-record-xml``, the ILDG records and ``scidac-checksum``;
  the checksum takes the CRC-32 (the zlib/IEEE 802.3 polynomial) ``c(r)`` of the bytes of the site
  of lexicographic rank ``r`` (x fastest) and forms ``suma = XOR_r rotl32(c(r), r mod 29)``,
  ``sumb = XOR_r rotl32(c(r), r mod 31)``, written in hexadecimal.
- NERSC archive format ("QCD archive format", The Gauge Connection, qcd.nersc.gov): an ASCII header
  ``BEGIN_HEADER`` / ``KEY = value`` lines / ``END_HEADER`` followed directly by the data in the
  same site and direction order as ILDG; ``DATATYPE = 4D_SU3_GAUGE`` stores the first two rows of
  each matrix (the third is ``conj(row0 x row1)``), ``4D_SU3_GAUGE_3x3`` all three;
  ``FLOATING_POINT = IEEE64BIG`` etc.; ``CHECKSUM`` is the ``uint32`` sum (mod 2^32) of the data
  read as 32-bit words; ``PLAQUETTE = <Re tr P>/3`` over the 6 planes and all sites;
  ``LINK_TRACE = <Re tr U>/3`` over the 4 directions and all sites.

Direction and site mapping
--------------------------
latflow links are ``[4, L0, L1, L2, L3, 3, 3]`` (a single configuration, no batch axis) with lattice
axis 0 = time and axes 1, 2, 3 = space. The files use ``(x, y, z, t) = (axis 1, axis 2, axis 3,
axis 0)``, so ``lx = L1, ly = L2, lz = L3, lt = L0``, file direction ``mu = 0, 1, 2, 3`` is latflow
direction ``1, 2, 3, 0``, and the file stores ``U_file[t, z, y, x, mu] = links[(mu + 1) % 4, t, x, y, z]``
in C order (x fastest, t slowest). The link ``U_mu(x)`` is the one from ``x`` to ``x + mu`` in both.

Writes go to a temporary file in the target directory which is renamed into place, and never
replace an existing file unless ``overwrite=True``. Readers raise ``ValueError`` with a one-line
message naming the file on a bad magic number, a truncated file, a missing or wrong record, a
size mismatch or a checksum/header mismatch. Files are read whole into memory.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latflow.sun import plaquette_mean

LIME_MAGIC = 0x456789AB
LIME_VERSION = 1
LIME_HEADER_BYTES = 144
LIME_TYPE_BYTES = 128
LIME_MB = 0x8000
LIME_ME = 0x4000

# file direction mu (x, y, z, t) -> latflow direction (axis 1, 2, 3, 0)
FILE_TO_LATFLOW_DIR = (1, 2, 3, 0)
LATFLOW_TO_FILE_DIR = (3, 0, 1, 2)

_NC = 3


# ------------------------------------------------------------------------------------------------
# LIME


@dataclass(frozen=True)
class LimeRecord:
    """One LIME record: its type, the byte offset and unpadded length of its data, and MB/ME flags."""

    type: str
    offset: int
    length: int
    mb: bool
    me: bool


def lime_pack(messages: list[list[tuple[str, bytes]]]) -> bytes:
    """Encode LIME messages (each a list of ``(type, data)`` records) into the bytes of a file.

    The first record of each message carries MB, the last ME; data are zero-padded to 8 bytes.
    """
    out = bytearray()
    for message in messages:
        if not message:
            raise ValueError("a LIME message needs at least one record")
        for i, (rtype, data) in enumerate(message):
            tbytes = rtype.encode("ascii")
            if len(tbytes) >= LIME_TYPE_BYTES:
                raise ValueError(f"LIME record type too long: {rtype!r}")
            flags = (LIME_MB if i == 0 else 0) | (LIME_ME if i == len(message) - 1 else 0)
            out += struct.pack(">IHHQ", LIME_MAGIC, LIME_VERSION, flags, len(data))
            out += tbytes.ljust(LIME_TYPE_BYTES, b"\0")
            out += data
            out += b"\0" * (-len(data) % 8)
    return bytes(out)


def lime_parse(data: bytes, name: str = "<bytes>") -> list[LimeRecord]:
    """List the records of LIME file contents ``data``; ``ValueError`` naming ``name`` if malformed."""
    records: list[LimeRecord] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < LIME_HEADER_BYTES:
            raise ValueError(f"{name}: truncated LIME record header at byte {pos}")
        magic, version, flags, length = struct.unpack_from(">IHHQ", data, pos)
        if magic != LIME_MAGIC:
            raise ValueError(f"{name}: bad LIME magic number {magic:#010x} at byte {pos} (expected {LIME_MAGIC:#010x})")
        tbytes = data[pos + 16 : pos + LIME_HEADER_BYTES]
        rtype = tbytes.split(b"\0", 1)[0].decode("ascii", errors="replace")
        start = pos + LIME_HEADER_BYTES
        if start + length > len(data):
            raise ValueError(
                f"{name}: truncated LIME record {rtype!r}: needs {length} bytes, {len(data) - start} present"
            )
        records.append(LimeRecord(rtype, start, length, bool(flags & LIME_MB), bool(flags & LIME_ME)))
        pos = start + length + (-length % 8)
    return records


def lime_records(path: str | os.PathLike) -> list[LimeRecord]:
    """List the records (type, data offset, data length, MB, ME) of the LIME file ``path``."""
    return lime_parse(Path(path).read_bytes(), str(path))


# ------------------------------------------------------------------------------------------------
# shared helpers


def _atomic_write(path: str | os.PathLike, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; refuse to replace unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_su3_links(links: torch.Tensor) -> tuple[int, int, int, int]:
    """Extents ``(L0, L1, L2, L3)`` of links ``[4, L0, L1, L2, L3, 3, 3]`` complex; ``ValueError`` otherwise."""
    if links.dim() != 7 or links.shape[0] != 4 or links.shape[-2:] != (_NC, _NC) or not links.is_complex():
        raise ValueError(f"SU(3) links are complex [4, L0, L1, L2, L3, 3, 3], got {list(links.shape)} {links.dtype}")
    return tuple(int(s) for s in links.shape[1:5])  # type: ignore[return-value]


def _to_file_order(links: torch.Tensor) -> np.ndarray:
    """latflow links ``[4, L0, L1, L2, L3, 3, 3]`` -> complex128 ``[lt, lz, ly, lx, 4, 3, 3]`` (file order)."""
    u = links.detach().to("cpu", torch.complex128).numpy()
    u = u[list(FILE_TO_LATFLOW_DIR)]  # [mu_file, t, x, y, z, 3, 3]
    return np.ascontiguousarray(u.transpose(1, 4, 3, 2, 0, 5, 6))


def _from_file_order(u: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`_to_file_order`: ``[lt, lz, ly, lx, 4, 3, 3]`` -> links ``[4, L0, L1, L2, L3, 3, 3]``."""
    u = u.transpose(4, 0, 3, 2, 1, 5, 6)[list(LATFLOW_TO_FILE_DIR)]  # [mu_latflow, t, x, y, z, 3, 3]
    return torch.from_numpy(np.ascontiguousarray(u, dtype=np.complex128))


def _complex_dtype(precision: int, big_endian: bool = True) -> np.dtype:
    """numpy complex dtype of one (re, im) pair at ``precision`` bits per real number."""
    if precision not in (32, 64):
        raise ValueError(f"precision must be 32 or 64, got {precision}")
    return np.dtype((">" if big_endian else "<") + ("c16" if precision == 64 else "c8"))


def link_trace_mean(links: torch.Tensor) -> float:
    """``<Re tr U> / 3`` over the 4 directions and all sites of links ``[4, L0, L1, L2, L3, 3, 3]``."""
    _check_su3_links(links)
    return float(torch.diagonal(links, dim1=-2, dim2=-1).real.sum(-1).mean()) / _NC


def reconstruct_third_row(two_rows: torch.Tensor) -> torch.Tensor:
    """SU(3) matrices ``[..., 3, 3]`` from their first two rows ``[..., 2, 3]``: row 2 = ``conj(row0 x row1)``."""
    a, b = two_rows[..., 0, :], two_rows[..., 1, :]
    c = torch.linalg.cross(a, b, dim=-1).conj()
    return torch.stack([a, b, c], dim=-2)


# ------------------------------------------------------------------------------------------------
# ILDG


def scidac_checksum(site_bytes: bytes, volume: int) -> tuple[int, int]:
    """SciDAC ``(suma, sumb)`` of binary data holding ``volume`` equal-size sites in lexicographic order."""
    if volume <= 0 or len(site_bytes) % volume:
        raise ValueError(f"{len(site_bytes)} bytes do not split into {volume} sites")
    size = len(site_bytes) // volume
    view = memoryview(site_bytes)
    suma = sumb = 0
    for r in range(volume):
        c = zlib.crc32(view[r * size : (r + 1) * size]) & 0xFFFFFFFF
        s29, s31 = r % 29, r % 31
        suma ^= ((c << s29) | (c >> (32 - s29))) & 0xFFFFFFFF
        sumb ^= ((c << s31) | (c >> (32 - s31))) & 0xFFFFFFFF
    return suma, sumb


_XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>'


def _xml_value(text: str, tag: str, name: str, what: str) -> str:
    m = re.search(rf"<(?:\w+:)?{tag}>\s*([^<]*?)\s*</(?:\w+:)?{tag}>", text)
    if m is None:
        raise ValueError(f"{name}: {what} has no <{tag}>")
    return m.group(1)


def write_ildg(
    path: str | os.PathLike,
    links: torch.Tensor,
    *,
    precision: int = 64,
    extra_xml: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write an SU(3) configuration as an ILDG file (LIME, SciDAC records and checksum).

    Parameters
    ----------
    path
        Output file (written atomically).
    links
        Complex ``[4, L0, L1, L2, L3, 3, 3]`` (axis 0 = time; see the module docstring for the mapping).
    precision
        64 (IEEE double) or 32 (single; values rounded to float32).
    extra_xml
        User metadata stored as the ``scidac-file-xml`` record (an XML string); a minimal one if None.
    overwrite
        Replace an existing file.
    """
    lt, lx, ly, lz = _check_su3_links(links)
    volume = lx * ly * lz * lt
    binary = _to_file_order(links).astype(_complex_dtype(precision)).tobytes()
    suma, sumb = scidac_checksum(binary, volume)
    prec_letter = "D" if precision == 64 else "F"
    date = time.strftime("%a %b %d %H:%M:%S %Y UTC", time.gmtime())
    private_file = (
        f"{_XML_HEAD}<scidacFile><version>1.1</version><spacetime>4</spacetime>"
        f"<dims>{lx} {ly} {lz} {lt} </dims><volfmt>0</volfmt></scidacFile>"
    )
    user_file = extra_xml if extra_xml is not None else f"{_XML_HEAD}<info>latflow SU(3) configuration</info>"
    private_record = (
        f"{_XML_HEAD}<scidacRecord><version>1.1</version><date>{date}</date><recordtype>0</recordtype>"
        f"<datatype>QDP_{prec_letter}3_ColorMatrix</datatype><precision>{prec_letter}</precision>"
        f"<colors>3</colors><spins>4</spins><typesize>{18 * precision // 8}</typesize><datacount>4</datacount>"
        "</scidacRecord>"
    )
    ildg_format = (
        f'{_XML_HEAD}<ildgFormat xmlns="http://www.lqcd.org/ildg" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.lqcd.org/ildg http://www.lqcd.org/ildg/filefmt.xsd">'
        f"<version>1.0</version><field>su3gauge</field><precision>{precision}</precision>"
        f"<lx>{lx}</lx><ly>{ly}</ly><lz>{lz}</lz><lt>{lt}</lt></ildgFormat>"
    )
    checksum = (
        f"{_XML_HEAD}<scidacChecksum><version>1.0</version><suma>{suma:x}</suma><sumb>{sumb:x}</sumb></scidacChecksum>"
    )
    data = lime_pack(
        [
            [("scidac-private-file-xml", private_file.encode()), ("scidac-file-xml", user_file.encode())],
            [
                ("scidac-private-record-xml", private_record.encode()),
                ("scidac-record-xml", f"{_XML_HEAD}<info/>".encode()),
                ("ildg-format", ildg_format.encode()),
                ("ildg-binary-data", binary),
                ("scidac-checksum", checksum.encode()),
            ],
        ]
    )
    _atomic_write(path, data, overwrite)


def read_ildg(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Read an ILDG SU(3) configuration, checking sizes and (when present) the SciDAC checksum.

    Returns
    -------
    links
        complex128 ``[4, L0, L1, L2, L3, 3, 3]`` with ``L0 = lt, L1 = lx, L2 = ly, L3 = lz``.
    metadata
        ``{"lx", "ly", "lz", "lt", "precision", "field", "checksum_verified", "scidac_checksum" (suma, sumb)
        or None, "user_xml" (scidac-file-xml text or None), "records" (list of LimeRecord)}``.
    """
    name = str(path)
    raw = Path(path).read_bytes()
    records = lime_parse(raw, name)
    by_type: dict[str, LimeRecord] = {}
    for rec in records:
        by_type.setdefault(rec.type, rec)

    def text(rtype: str) -> str | None:
        rec = by_type.get(rtype)
        if rec is None:
            return None
        return raw[rec.offset : rec.offset + rec.length].split(b"\0", 1)[0].decode("utf-8", errors="replace")

    fmt = text("ildg-format")
    if fmt is None or "ildg-binary-data" not in by_type:
        found = ", ".join(r.type for r in records) or "none"
        raise ValueError(f"{name}: not an ILDG file (needs ildg-format and ildg-binary-data records; found {found})")
    field = _xml_value(fmt, "field", name, "ildg-format")
    if field != "su3gauge":
        raise ValueError(f"{name}: ildg-format field is {field!r}, expected 'su3gauge'")
    try:
        precision = int(_xml_value(fmt, "precision", name, "ildg-format"))
        lx, ly, lz, lt = (int(_xml_value(fmt, k, name, "ildg-format")) for k in ("lx", "ly", "lz", "lt"))
    except ValueError as err:
        raise ValueError(f"{name}: bad ildg-format record: {err}") from None
    dtype = _complex_dtype(precision)
    volume = lx * ly * lz * lt
    rec = by_type["ildg-binary-data"]
    expected = volume * 4 * 9 * dtype.itemsize
    if rec.length != expected:
        raise ValueError(
            f"{name}: ildg-binary-data holds {rec.length} bytes, expected {expected} for {lx}x{ly}x{lz}x{lt} "
            f"at precision {precision}"
        )
    binary = raw[rec.offset : rec.offset + rec.length]
    checksum_text = text("scidac-checksum")
    sums = None
    if checksum_text is not None:
        want = (int(_xml_value(checksum_text, t, name, "scidac-checksum"), 16) for t in ("suma", "sumb"))
        sums = tuple(want)
        got = scidac_checksum(binary, volume)
        if got != sums:
            raise ValueError(
                f"{name}: SciDAC checksum mismatch: file says suma={sums[0]:x} sumb={sums[1]:x}, "
                f"data give suma={got[0]:x} sumb={got[1]:x}"
            )
    u = np.frombuffer(binary, dtype=dtype).reshape(lt, lz, ly, lx, 4, 3, 3)
    links = _from_file_order(u)
    meta = {
        "lx": lx,
        "ly": ly,
        "lz": lz,
        "lt": lt,
        "precision": precision,
        "field": field,
        "checksum_verified": sums is not None,
        "scidac_checksum": sums,
        "user_xml": text("scidac-file-xml"),
        "records": records,
    }
    return links, meta


# ------------------------------------------------------------------------------------------------
# NERSC


def nersc_checksum(data: bytes, big_endian: bool = True) -> int:
    """NERSC ``CHECKSUM``: the sum mod 2^32 of ``data`` read as unsigned 32-bit words."""
    if len(data) % 4:
        raise ValueError(f"{len(data)} bytes are not a whole number of 32-bit words")
    words = np.frombuffer(data, dtype=">u4" if big_endian else "<u4")
    return int(words.astype(np.uint64).sum() & 0xFFFFFFFF)


def write_nersc(
    path: str | os.PathLike,
    links: torch.Tensor,
    *,
    two_rows: bool = False,
    precision: int = 64,
    ensemble_id: str = "latflow",
    ensemble_label: str = "latflow",
    sequence_number: int = 0,
    extra_header: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write an SU(3) configuration in the NERSC archive format (big-endian, periodic boundaries).

    Parameters
    ----------
    path
        Output file (written atomically).
    links
        Complex ``[4, L0, L1, L2, L3, 3, 3]`` (axis 0 = time; see the module docstring for the mapping).
    two_rows
        Store the first two rows only (``DATATYPE = 4D_SU3_GAUGE``); otherwise ``4D_SU3_GAUGE_3x3``.
    precision
        64 (``IEEE64BIG``) or 32 (``IEEE32BIG``).
    ensemble_id, ensemble_label, sequence_number
        Header fields.
    extra_header
        More ``KEY = value`` lines (e.g. ``{"BETA": "6.0"}``), written after the standard ones; keys are
        upper-case words, values single-line; a key of the standard header is refused.
    overwrite
        Replace an existing file.
    """
    lt, lx, ly, lz = _check_su3_links(links)
    u = _to_file_order(links)
    if two_rows:
        u = u[..., :2, :]
    binary = np.ascontiguousarray(u).astype(_complex_dtype(precision)).tobytes()
    u64 = links.detach().to("cpu", torch.complex128)
    header = {
        "HDR_VERSION": "1.0",
        "DATATYPE": "4D_SU3_GAUGE" if two_rows else "4D_SU3_GAUGE_3x3",
        "STORAGE_FORMAT": "1.0",
        "DIMENSION_1": str(lx),
        "DIMENSION_2": str(ly),
        "DIMENSION_3": str(lz),
        "DIMENSION_4": str(lt),
        "LINK_TRACE": f"{link_trace_mean(u64):.15g}",
        "PLAQUETTE": f"{float(plaquette_mean(u64[None])[0]):.15g}",
        "BOUNDARY_1": "PERIODIC",
        "BOUNDARY_2": "PERIODIC",
        "BOUNDARY_3": "PERIODIC",
        "BOUNDARY_4": "PERIODIC",
        "CHECKSUM": f"{nersc_checksum(binary):08x}",
        "ENSEMBLE_ID": ensemble_id,
        "ENSEMBLE_LABEL": ensemble_label,
        "SEQUENCE_NUMBER": str(sequence_number),
        "CREATOR": "latflow",
        "CREATION_DATE": time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime()),
        "FLOATING_POINT": f"IEEE{precision}BIG",
    }
    for key, value in (extra_header or {}).items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key) or key in header or "\n" in str(value) or "=" in str(value):
            raise ValueError(f"NERSC extra header entry {key!r} = {value!r} is not a new KEY = single-line value")
        header[key] = str(value)
    text = "BEGIN_HEADER\n" + "".join(f"{k} = {v}\n" for k, v in header.items()) + "END_HEADER\n"
    _atomic_write(path, text.encode("ascii") + binary, overwrite)


def read_nersc(path: str | os.PathLike, *, tol: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """Read a NERSC archive SU(3) configuration, checking CHECKSUM, PLAQUETTE and LINK_TRACE.

    Parameters
    ----------
    path
        The file.
    tol
        Absolute tolerance for PLAQUETTE and LINK_TRACE against the values recomputed from the data.

    Returns
    -------
    links
        complex128 ``[4, L0, L1, L2, L3, 3, 3]`` with ``L0 = DIMENSION_4, L1..L3 = DIMENSION_1..3``
        (third rows reconstructed for ``4D_SU3_GAUGE``).
    header
        The header as a ``{KEY: value string}`` dict.
    """
    name = str(path)
    raw = Path(path).read_bytes()
    if not raw.startswith(b"BEGIN_HEADER"):
        raise ValueError(f"{name}: not a NERSC archive file (no BEGIN_HEADER)")
    end = re.search(rb"END_HEADER[ \t]*\r?\n", raw)
    if end is None:
        raise ValueError(f"{name}: NERSC header has no END_HEADER line")
    header: dict[str, str] = {}
    for line in raw[: end.start()].decode("ascii", errors="replace").splitlines()[1:]:
        if "=" in line:
            key, value = line.split("=", 1)
            header[key.strip()] = value.strip()
    try:
        lx, ly, lz, lt = (int(header[f"DIMENSION_{i}"]) for i in range(1, 5))
        datatype, fp = header["DATATYPE"], header["FLOATING_POINT"]
        checksum = int(header["CHECKSUM"], 16)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{name}: NERSC header lacks or garbles {err}") from None
    if datatype not in ("4D_SU3_GAUGE", "4D_SU3_GAUGE_3x3"):
        raise ValueError(f"{name}: unsupported DATATYPE {datatype!r}")
    m = re.fullmatch(r"IEEE(32|64)(BIG|LITTLE)?", fp)
    if m is None:
        raise ValueError(f"{name}: unsupported FLOATING_POINT {fp!r}")
    precision, big = int(m.group(1)), m.group(2) != "LITTLE"
    dtype = _complex_dtype(precision, big)
    rows = 2 if datatype == "4D_SU3_GAUGE" else 3
    volume = lx * ly * lz * lt
    expected = volume * 4 * rows * 3 * dtype.itemsize
    binary = raw[end.end() :]
    if len(binary) != expected:
        raise ValueError(
            f"{name}: NERSC data hold {len(binary)} bytes, expected {expected} for {lx}x{ly}x{lz}x{lt} {datatype} {fp}"
        )
    got = nersc_checksum(binary, big)
    if got != checksum:
        raise ValueError(f"{name}: NERSC CHECKSUM mismatch: header {checksum:08x}, data {got:08x}")
    u = torch.from_numpy(np.frombuffer(binary, dtype=dtype).astype(np.complex128).reshape(lt, lz, ly, lx, 4, rows, 3))
    if rows == 2:
        u = reconstruct_third_row(u)
    links = _from_file_order(u.numpy())
    for key, value in (
        ("PLAQUETTE", float(plaquette_mean(links[None])[0])),
        ("LINK_TRACE", link_trace_mean(links)),
    ):
        if key in header:
            try:
                stated = float(header[key])
            except ValueError:
                raise ValueError(f"{name}: NERSC {key} {header[key]!r} is not a number") from None
            if abs(stated - value) > tol:
                raise ValueError(f"{name}: NERSC {key} mismatch: header {stated!r}, data give {value!r}")
    return links, header
