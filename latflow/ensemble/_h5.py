"""Low-level HDF5 helpers: opening files, decoding and rewriting attributes, row checksums."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .meta import EnsembleError

_SHA_DTYPE = "S64"  # fixed-length: rewritten in place, never through the global heap
_UTC_DTYPE = "S25"  # "YYYY-MM-DDTHH:MM:SS+00:00"
_HASH_BLOCK_BYTES = 16 * 1024 * 1024  # sha256_of_rows reads about this much at a time


def _decode(value: Any) -> Any:
    """An HDF5 attribute value as plain Python: bytes -> str, numpy scalars -> Python scalars.

    Numeric arrays stay ``np.ndarray``; arrays of strings become lists of ``str``.
    """
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _decode(value[()])
        if value.dtype.kind in "SOU":
            return [_decode(v) for v in value.tolist()]
        return value
    return value


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fixed(text: str, dtype: str) -> np.ndarray:
    return np.array(text.encode("ascii"), dtype=dtype)


def _le(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _raw_le_bytes(arr: np.ndarray, dtype: np.dtype) -> memoryview:
    """Bytes of ``arr`` in C order, little-endian, in ``dtype`` (the format's checksum convention)."""
    a = np.ascontiguousarray(np.asarray(arr).astype(_le(dtype), copy=False))
    return memoryview(a.reshape(-1).view(np.uint8))


def _hash_rows_into(hasher: Any, dataset: h5py.Dataset, start: int, stop: int) -> None:
    """Feed rows ``[start, stop)`` of ``dataset`` to ``hasher``, a block of rows at a time."""
    if stop <= start:
        return
    row_bytes = max(1, int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize)
    block = max(1, _HASH_BLOCK_BYTES // row_bytes)
    for a in range(start, stop, block):
        b = min(stop, a + block)
        hasher.update(_raw_le_bytes(dataset[a:b], dataset.dtype))


def sha256_of_rows(dataset: h5py.Dataset, n: int) -> str:
    """Hex SHA-256 of rows ``[0, n)`` of ``dataset`` as ENSEMBLE_FORMAT.md defines it.

    Equal to ``hashlib.sha256(np.ascontiguousarray(ds[:n]).astype(ds.dtype.newbyteorder("<"))
    .tobytes()).hexdigest()`` but streams blocks of rows, so big datasets are never loaded whole.

    Parameters
    ----------
    dataset : h5py.Dataset
        Shape ``(N, ...)`` with ``N >= n``.
    n : int
        Number of leading rows to hash.

    Returns
    -------
    str
        64 hex digits.
    """
    n = int(n)
    if n < 0 or dataset.ndim == 0 or n > dataset.shape[0]:
        length = dataset.shape[0] if dataset.ndim else 0
        raise ValueError(f"{dataset.name}: cannot hash {n} rows of a dataset with {length} rows")
    h = hashlib.sha256()
    _hash_rows_into(h, dataset, 0, n)
    return h.hexdigest()


def require_hdf5_file(path: Path) -> None:
    """Raise a one-line :class:`EnsembleError` unless ``path`` is an existing, readable HDF5 file.

    Only the file's kind is checked (it exists, is not a directory, has the HDF5 signature), not
    its contents: a file that passes may still be a damaged or foreign ensemble.
    """
    if not path.exists():
        raise EnsembleError(f"{path}: no such file")
    if path.is_dir():
        raise EnsembleError(f"{path}: is a directory, not an ensemble file")
    try:
        is_h5 = h5py.is_hdf5(str(path))
    except OSError as exc:
        raise EnsembleError(f"{path}: cannot read: {exc}") from None
    if not is_h5:
        raise EnsembleError(f"{path}: not an HDF5 file")


def _open_h5(path: Path, mode: str) -> h5py.File:
    """Open ``path`` with h5py, turning every failure into a one-line :class:`EnsembleError`."""
    require_hdf5_file(path)
    try:
        # Readers take no HDF5 file lock: they rely on n_committed (raised last by a writer), and a
        # reader's lock would stop a writer from opening the file (a resumed job, a live monitor).
        if mode == "r":
            try:
                return h5py.File(str(path), mode, locking=False)
            except OSError as exc:
                if "flag" not in str(exc).lower():
                    raise
                # this process already holds the file with locking on (e.g. its own writer)
        return h5py.File(str(path), mode)
    except OSError as exc:
        raise EnsembleError(_open_error(path, exc)) from None


def _open_error(path: Path, exc: OSError) -> str:
    """One line saying why h5py could not open ``path``: truncated, locked, or otherwise damaged."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "truncated file" in low:
        sizes = dict(re.findall(r"\b(eof|stored_eof)\s*=\s*(\d+)", low))
        if "eof" in sizes and "stored_eof" in sizes:
            what = f"{sizes['eof']} of its {sizes['stored_eof']} bytes are present"
        else:
            what = "it is shorter than its header says"
        return f"{path}: damaged HDF5 file: truncated ({what}; an interrupted copy or a full disk?)"
    # h5py's lock failure reads "unable to lock file, errno = 11, ..."; match it exactly (the word
    # "lock" alone also appears in unrelated messages, e.g. "sblock" for the superblock)
    if "unable to lock file" in low:
        return f"{path}: cannot open for writing (is another process writing it?): {text}"
    return f"{path}: damaged or unreadable HDF5 file: {text}"


def _set_attr(obj: h5py.HLObject, name: str, value: np.ndarray | np.generic) -> None:
    """Rewrite an existing attribute in place (keeping its type), or create it."""
    if name in obj.attrs:
        obj.attrs.modify(name, value)
    else:
        obj.attrs.create(name, value)
