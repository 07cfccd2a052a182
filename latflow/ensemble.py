"""Reading, writing and verifying ensembles: the one place that touches ensemble files.

An ensemble is one HDF5 file laid out as ``shared/ENSEMBLE_FORMAT.md`` (version 1) describes:
root attributes that make it self-describing, and per-configuration datasets under ``fields/``,
``markov/``, ``weights/`` and ``observables/`` whose axis 0 is the configuration (row) index.
Only rows ``< n_committed`` are part of the ensemble.

Crash safety
------------
:class:`EnsembleWriter` appends one *commit* at a time and raises ``n_committed`` only after
every row of the commit, and the sampler-state checkpoint that goes with it, has been flushed::

    1. resize every dataset and write the new rows; write the sampler state into the checkpoint
       slot that the committed state does not use;                                   -> flush
    2. ``sha256`` / ``sha256_rows`` attributes of every ``fields/*`` dataset, the checkpoint
       group's ``current`` slot;                                                        -> flush
    3. root attribute ``n_committed``.                                                  -> flush

A process killed at any instant therefore leaves a file whose rows below ``n_committed`` are intact.
A kill between flushes 2 and 3 leaves checksums that cover *more* rows than are committed; the
``sha256_rows`` attribute says how many, :func:`verify` accepts that state (the committed rows are
a prefix of the checksummed ones) and :meth:`EnsembleWriter.resume` repairs it. To keep HDF5 from
writing metadata between these points the writer disables metadata-cache evictions, every mutable
attribute is fixed-size and rewritten in place, datasets are uncompressed (chunks never move) and
nothing is deleted while appending, so no file space is freed and reused under the feet of the
committed state.

Sampler state
-------------
The caller serialises its sampler state (RNG states included) to ``bytes``; this module stores the
blob verbatim in one of two slots, ``checkpoint/state_0`` and ``checkpoint/state_1`` (``uint8``,
attributes ``n_committed`` and ``nbytes``), alternating between commits. The current slot is the one
whose ``n_committed`` attribute equals the root ``n_committed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

import latflow

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "REQUIRED_ATTRS",
    "ROW_GROUPS",
    "EnsembleError",
    "EnsembleExistsError",
    "EnsembleMeta",
    "EnsembleReader",
    "EnsembleWriter",
    "sha256_of_rows",
    "verify",
]

FORMAT_NAME = "latflow-ensemble"
FORMAT_VERSION = 1
#: Root attributes every ensemble holds (ENSEMBLE_FORMAT.md, "Root attributes").
REQUIRED_ATTRS: tuple[str, ...] = (
    "format",
    "format_version",
    "latflow_version",
    "created_utc",
    "theory",
    "couplings",
    "lattice_shape",
    "sampler",
    "seed",
    "job",
    "model_sha256",
    "n_committed",
)
#: Groups whose datasets have one row per configuration along axis 0.
ROW_GROUPS: tuple[str, ...] = ("fields", "markov", "weights", "observables")

CHECKPOINT_GROUP = "checkpoint"
_SLOTS = ("state_0", "state_1")
_SHA_DTYPE = "S64"  # fixed-length: rewritten in place, never through the global heap
_UTC_DTYPE = "S25"  # "YYYY-MM-DDTHH:MM:SS+00:00"
_CHUNK_TARGET_BYTES = 64 * 1024  # rows per chunk chosen so a chunk is about this large
_CHUNK_MAX_BYTES = 256 * 1024 * 1024  # rows larger than this are chunked along inner axes too
_STATE_CHUNK = 64 * 1024
_HASH_BLOCK_BYTES = 16 * 1024 * 1024  # sha256_of_rows reads about this much at a time

_DESCRIPTIONS = {
    "fields/phi": "scalar field phi[i, x0, ..., x{d-1}]",
    "fields/links": (
        "gauge links links[i, mu, x0, ...] = U_mu(x) on the link x -> x + mu; "
        "U(1): angles in (-pi, pi]; SU(N): complex [..., N, N] matrices"
    ),
    "markov/chain": "stream id (one per independent chain or MPI rank)",
    "markov/step": "Markov time within its chain",
    "markov/accepted": "proposal accepted (MCMC samplers)",
    "weights/log_p": "-S, unnormalised log target density",
    "weights/log_q": "log density of the proposal that produced the row",
    "weights/log_w": "log importance weight of the row (0 for plain MCMC)",
}
_ROOT_DESCRIPTION = (
    "latflow ensemble (format latflow-ensemble v1). Axis 0 of every dataset under fields/, markov/, "
    "weights/ and observables/ is the configuration index; only rows < n_committed belong to the "
    "ensemble. Rows of one chain (markov/chain) are in Markov order. Each fields/* dataset carries "
    "sha256: hex SHA-256 of the little-endian C-order bytes of its first sha256_rows rows "
    "(= n_committed after a completed commit). Lattice axis 0 is time."
)


class EnsembleError(Exception):
    """A problem with an ensemble file; the message is one line and names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class EnsembleExistsError(EnsembleError):
    """The target ensemble exists and neither resume nor force was asked for."""


@dataclass(frozen=True)
class EnsembleMeta:
    """What an ensemble is a sample of, and how it was made (the root attributes of the file).

    Parameters
    ----------
    theory : str
        Theory name in the registry, e.g. ``"phi4"``, ``"u1"``.
    couplings : dict
        Every coupling by name (JSON-serialisable), e.g. ``{"beta": 6.0}``.
    lattice_shape : tuple of int
        ``(L0, L1, ...)``; axis 0 is time.
    sampler : dict
        Sampler ``"kind"`` and all its settings (JSON-serialisable).
    seed : int
        The seed the run started from.
    job : str
        Full text of the job file that produced the ensemble.
    model_sha256 : str
        Hash of the flow weights used (empty for HMC).
    """

    theory: str
    couplings: dict
    lattice_shape: tuple[int, ...]
    sampler: dict
    seed: int
    job: str = ""
    model_sha256: str = ""


# ----------------------------------------------------------------------------------------------
# small helpers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable with finite numbers: {exc}") from None


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _open_h5(path: Path, mode: str) -> h5py.File:
    """Open ``path`` with h5py, turning every failure into a one-line :class:`EnsembleError`."""
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
        if "lock" in str(exc).lower():
            raise EnsembleError(f"{path}: cannot open for writing (is another process writing it?): {exc}") from None
        raise EnsembleError(f"{path}: cannot open: {exc}") from None


def _row_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """Datasets directly under the row groups, keyed ``"group/name"``, in sorted order."""
    out: dict[str, h5py.Dataset] = {}
    for g in ROW_GROUPS:
        grp = f.get(g)
        if not isinstance(grp, h5py.Group):
            continue
        for name in sorted(grp.keys()):
            obj = grp.get(name)
            if isinstance(obj, h5py.Dataset):
                out[f"{g}/{name}"] = obj
    return out


def _common_length(datasets: Mapping[str, h5py.Dataset]) -> int:
    lengths = [ds.shape[0] for ds in datasets.values() if ds.ndim >= 1]
    return min(lengths) if lengths else 0


def _root_problems(attrs: Mapping[str, Any]) -> list[str]:
    """Problems with decoded root attributes (without the file name), [] if they follow the format."""
    problems = [f"missing required root attribute {k!r}" for k in REQUIRED_ATTRS if k not in attrs]
    if "format" in attrs and attrs["format"] != FORMAT_NAME:
        problems.append(f"root attribute 'format' is {attrs['format']!r}, expected {FORMAT_NAME!r}")
    if "format_version" in attrs:
        v = attrs["format_version"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != FORMAT_VERSION:
            problems.append(f"root attribute 'format_version' is {v!r}, expected {FORMAT_VERSION}")
    for key in ("latflow_version", "created_utc", "theory", "job", "model_sha256"):
        if key in attrs and not isinstance(attrs[key], str):
            problems.append(f"root attribute {key!r} is not a string")
    for key in ("couplings", "sampler"):
        if key not in attrs:
            continue
        try:
            obj = json.loads(attrs[key]) if isinstance(attrs[key], str) else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            problems.append(f"root attribute {key!r} is not a JSON object")
        elif key == "sampler" and "kind" not in obj:
            problems.append("root attribute 'sampler' has no 'kind'")
    if "lattice_shape" in attrs:
        try:
            _parse_shape(attrs["lattice_shape"])
        except ValueError as exc:
            problems.append(f"root attribute 'lattice_shape': {exc}")
    for key in ("seed", "n_committed"):
        if key in attrs:
            v = attrs[key]
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(f"root attribute {key!r} is not an integer")
            elif key == "n_committed" and v < 0:
                problems.append("root attribute 'n_committed' is negative")
    return problems


def _parse_shape(value: Any) -> tuple[int, ...]:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iuf":
        raise ValueError("must be a non-empty 1-d integer array")
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise ValueError("must hold integers")
    shape = tuple(int(x) for x in arr.tolist())
    if any(s <= 0 for s in shape):
        raise ValueError(f"must be positive, got {list(shape)}")
    return shape


def _meta_from_attrs(path: Path, attrs: Mapping[str, Any]) -> EnsembleMeta:
    """The :class:`EnsembleMeta` of a file, or :class:`EnsembleError` naming what is wrong."""
    if attrs.get("format") != FORMAT_NAME:
        found = attrs.get("format")
        detail = "no root attribute 'format'" if found is None else f"root attribute 'format' is {found!r}"
        raise EnsembleError(f"{path}: not a latflow ensemble ({detail})")
    problems = [p for p in _root_problems(attrs) if "'n_committed'" not in p]
    if problems:
        raise EnsembleError(f"{path}: {problems[0]}")
    return EnsembleMeta(
        theory=attrs["theory"],
        couplings=json.loads(attrs["couplings"]),
        lattice_shape=_parse_shape(attrs["lattice_shape"]),
        sampler=json.loads(attrs["sampler"]),
        seed=int(attrs["seed"]),
        job=attrs["job"],
        model_sha256=attrs["model_sha256"],
    )


def _validate_meta(meta: EnsembleMeta) -> tuple[str, str, np.ndarray, Any]:
    """Check ``meta`` before anything is written; returns (couplings JSON, sampler JSON, shape, seed)."""
    if not isinstance(meta, EnsembleMeta):
        raise TypeError(f"meta must be an EnsembleMeta, got {type(meta).__name__}")
    if not isinstance(meta.theory, str) or not meta.theory:
        raise ValueError("meta.theory must be a non-empty string")
    if not isinstance(meta.couplings, Mapping):
        raise TypeError("meta.couplings must be a dict")
    if not isinstance(meta.sampler, Mapping):
        raise TypeError("meta.sampler must be a dict")
    if "kind" not in meta.sampler:
        raise ValueError("meta.sampler must contain 'kind'")
    couplings = _to_json(dict(meta.couplings), "meta.couplings")
    sampler = _to_json(dict(meta.sampler), "meta.sampler")
    try:
        shape = np.asarray(_parse_shape(meta.lattice_shape), dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"meta.lattice_shape {exc}") from None
    if isinstance(meta.seed, bool) or not isinstance(meta.seed, (int, np.integer)):
        raise TypeError("meta.seed must be an integer")
    seed_int = int(meta.seed)
    if -(2**63) <= seed_int < 2**63:
        seed: Any = np.int64(seed_int)
    elif 0 <= seed_int < 2**64:
        seed = np.uint64(seed_int)
    else:
        raise ValueError("meta.seed must fit in 64 bits")
    if not isinstance(meta.job, str) or not isinstance(meta.model_sha256, str):
        raise TypeError("meta.job and meta.model_sha256 must be strings")
    return couplings, sampler, shape, seed


def _chunk_shape(row_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of about ``_CHUNK_TARGET_BYTES`` along axis 0; huge rows are also split inside."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    rows = max(1, _CHUNK_TARGET_BYTES // row_bytes)
    inner = [max(1, s) for s in row_shape]
    while int(np.prod(inner, dtype=np.int64)) * itemsize > _CHUNK_MAX_BYTES:
        k = int(np.argmax(inner))
        if inner[k] == 1:
            break
        inner[k] = (inner[k] + 1) // 2
    return (rows, *inner)


def _configure_cache(f: h5py.File) -> None:
    """Keep dirty metadata in memory until an explicit flush (no evictions between commit steps)."""
    try:
        cfg = f.id.get_mdc_config()
        cfg.incr_mode = 0  # H5C_incr__off
        cfg.flash_incr_mode = 0  # H5C_flash_incr__off
        cfg.decr_mode = 0  # H5C_decr__off
        cfg.evictions_enabled = False
        f.id.set_mdc_config(cfg)
    except Exception:  # pragma: no cover - older HDF5 builds: default cache still flushes on commit
        pass


# ----------------------------------------------------------------------------------------------
# writer


class EnsembleWriter:
    """Append-only writer of one ensemble file; use :meth:`create` or :meth:`resume`.

    A context manager: ``with EnsembleWriter.create(path, meta) as w: w.append(rows, state)``.

    Attributes
    ----------
    path : Path
        The ensemble file.
    meta : EnsembleMeta
        Its root description.
    """

    path: Path
    meta: EnsembleMeta

    def __init__(self, file: h5py.File, path: Path, meta: EnsembleMeta, *, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use EnsembleWriter.create(...) or EnsembleWriter.resume(...)")
        self._file: h5py.File | None = file
        self.path = path
        self.meta = meta
        self._n = 0
        self._keys: frozenset[str] | None = None  # fixed after the first commit
        self._hashers: dict[str, Any] = {}
        self._slot = -1  # checkpoint slot of the committed state (-1: none)
        self._broken: str | None = None
        self._datasets: dict[str, h5py.Dataset] = {}  # open handles (h5py look-ups are slow)
        self._slots = tuple(file[CHECKPOINT_GROUP][name] for name in _SLOTS)
        self._checkpoint = file[CHECKPOINT_GROUP]

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: EnsembleMeta, *, force: bool = False) -> EnsembleWriter:
        """Create a new, empty ensemble (``n_committed = 0``) at ``path``.

        Parameters
        ----------
        path : path-like
            Target file. Its directory must exist.
        meta : EnsembleMeta
            Root description; ``meta.sampler`` must contain ``"kind"``.
        force : bool
            Replace an existing file. Without it an existing ``path`` raises
            :class:`EnsembleExistsError` and is left untouched.

        Notes
        -----
        The file is built under a temporary name in the same directory and then linked (or,
        with ``force``, renamed) into place, so ``path`` never holds a half-initialised file.
        """
        path = Path(path)
        couplings, sampler, shape, seed = _validate_meta(meta)
        if (path.exists() or path.is_symlink()) and not force:
            raise EnsembleExistsError(f"{path}: ensemble exists; use --resume to append or --force to replace")
        if not path.parent.is_dir():
            raise EnsembleError(f"{path}: directory {path.parent} does not exist")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            try:
                with h5py.File(str(tmp), "w") as f:
                    _init_file(f, meta, couplings, sampler, shape, seed)
            except OSError as exc:
                raise EnsembleError(f"{path}: cannot create: {exc}") from None
            if force:
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise EnsembleError(f"{path}: cannot replace: {exc}") from None
            else:
                try:
                    os.link(tmp, path)  # atomic: fails if path appeared meanwhile
                except FileExistsError:
                    raise EnsembleExistsError(
                        f"{path}: ensemble exists; use --resume to append or --force to replace"
                    ) from None
                except OSError:  # file systems without hard links
                    if path.exists():
                        raise EnsembleExistsError(
                            f"{path}: ensemble exists; use --resume to append or --force to replace"
                        ) from None
                    os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        f = _open_h5(path, "r+")
        _configure_cache(f)
        return cls(f, path, meta, _token=_PRIVATE)

    @classmethod
    def resume(cls, path: str | os.PathLike[str]) -> tuple[EnsembleWriter, bytes | None]:
        """Open an existing ensemble for appending.

        Rows ``>= n_committed`` (left by an interrupted commit) are discarded, the running
        checksums are recomputed from the committed rows and checked against the stored ones.

        Parameters
        ----------
        path : path-like
            An existing ensemble.

        Returns
        -------
        writer : EnsembleWriter
            Positioned at ``n_committed``.
        state : bytes or None
            Sampler-state blob saved with the last commit (None if that commit saved none, or
            nothing was committed yet).

        Raises
        ------
        EnsembleError
            Missing or damaged file (checksum mismatch, dataset shorter than ``n_committed``,
            a dataset that cannot grow).
        """
        path = Path(path)
        f = _open_h5(path, "r+")
        try:
            _configure_cache(f)
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            meta = _meta_from_attrs(path, attrs)
            datasets = _row_datasets(f)
            if "n_committed" in attrs:
                n = attrs["n_committed"]
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise EnsembleError(f"{path}: root attribute 'n_committed' is not a non-negative integer")
            else:
                n = _common_length(datasets)
            for name, ds in datasets.items():
                if ds.ndim == 0 or ds.shape[0] < n:
                    raise EnsembleError(f"{path}: {name} has fewer rows than n_committed={n}; file is damaged")
                if ds.chunks is None or ds.maxshape[0] is not None:
                    raise EnsembleError(f"{path}: {name} is not resizable along axis 0; cannot append")
            hashers: dict[str, Any] = {}
            for name, ds in datasets.items():
                if name.startswith("fields/"):
                    hashers[name] = _check_and_hash(path, name, ds, n)
            state, slot = _read_state(f, n)
            # -- from here on the file is modified: discard uncommitted rows, repair attributes
            for ds in datasets.values():
                if ds.shape[0] != n:
                    ds.resize(n, axis=0)
            f.flush()
            for name, h in hashers.items():
                ds = datasets[name]
                _set_attr(ds, "sha256", _fixed(h.hexdigest(), _SHA_DTYPE))
                _set_attr(ds, "sha256_rows", np.int64(n))
            _ensure_checkpoint(f)
            _set_attr(f[CHECKPOINT_GROUP], "current", np.int64(slot))
            f.flush()
            _set_attr(f, "n_committed", np.int64(n))
            f.flush()
        except EnsembleError:
            f.close()
            raise
        except Exception as exc:
            f.close()
            raise EnsembleError(f"{path}: cannot resume: {type(exc).__name__}: {exc}") from None
        w = cls(f, path, meta, _token=_PRIVATE)
        w._n = n
        w._hashers = hashers
        w._slot = slot
        w._keys = frozenset(datasets) if n > 0 else None
        return w, state

    # -- properties ------------------------------------------------------------------------

    @property
    def n_committed(self) -> int:
        """Number of rows fully committed so far."""
        return self._n

    @property
    def closed(self) -> bool:
        return self._file is None

    # -- appending -------------------------------------------------------------------------

    def append(self, rows: Mapping[str, np.ndarray], state: bytes | None = None) -> None:
        """Append ``n`` rows and the sampler state as ONE crash-safe commit.

        Parameters
        ----------
        rows : mapping of str to array
            ``"fields/<name>"``: ``(n, ...)``; ``"markov/chain"``, ``"markov/step"``: ``(n,)`` int;
            ``"markov/accepted"``: ``(n,)`` bool; ``"weights/log_p"``, ``"weights/log_q"``,
            ``"weights/log_w"``: ``(n,)`` float; ``"observables/<name>"``: ``(n,)`` or ``(n, k)``.
            Every array has the same leading ``n >= 1``. Datasets are created on the first commit
            with the arrays' dtypes (integers stored as int64); afterwards the set of keys and the
            row shapes are fixed.
        state : bytes or None
            Opaque sampler-state blob stored with this commit (returned by :meth:`resume`).

        Raises
        ------
        ValueError
            Inconsistent rows (leading lengths, keys, row shapes, dtypes); nothing is written.
        EnsembleError
            The writer is closed, or a previous commit failed part-way (resume the file).
        """
        f = self._require_open()
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes or None, got {type(state).__name__}")
        arrays = self._prepare(rows)
        n_add = next(iter(arrays.values())).shape[0]
        n_new = self._n + n_add
        new_hashers: dict[str, Any] = {}
        for key, arr in arrays.items():
            if key.startswith("fields/"):
                h = self._hashers[key].copy() if key in self._hashers else hashlib.sha256()
                h.update(_raw_le_bytes(arr, arr.dtype))
                new_hashers[key] = h
        slot = 1 - self._slot if self._slot in (0, 1) else 0
        try:
            # 1. rows, then the sampler state into the slot the committed state does not use
            for key, arr in arrays.items():
                ds = self._dataset(key)
                if ds is None:
                    ds = self._datasets[key] = _create_row_dataset(f, key, arr)
                ds.resize(n_new, axis=0)
                ds[self._n : n_new] = arr
            _write_state(self._slots[slot], state, n_new)
            f.flush()
            # 2. checksums covering the new rows, and the slot pointer
            for key, h in new_hashers.items():
                _set_attr(self._datasets[key], "sha256", _fixed(h.hexdigest(), _SHA_DTYPE))
                _set_attr(self._datasets[key], "sha256_rows", np.int64(n_new))
            _set_attr(self._checkpoint, "current", np.int64(slot))
            _set_attr(f, "last_commit_utc", _fixed(_utc_now(), _UTC_DTYPE))
            f.flush()
            # 3. the commit itself
            _set_attr(f, "n_committed", np.int64(n_new))
            f.flush()
        except BaseException as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        self._n = n_new
        self._hashers.update(new_hashers)
        self._keys = frozenset(arrays)
        self._slot = slot

    def _dataset(self, key: str) -> h5py.Dataset | None:
        ds = self._datasets.get(key)
        if ds is None:
            assert self._file is not None
            obj = self._file.get(key)
            if isinstance(obj, h5py.Dataset):
                ds = self._datasets[key] = obj
        return ds

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise EnsembleError(f"{self.path}: writer is closed")
        if self._broken is not None:
            raise EnsembleError(
                f"{self.path}: a previous commit failed ({self._broken}); close and resume the ensemble"
            )
        return self._file

    def _prepare(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``rows`` and convert them to the dtypes they will be stored in."""
        if not isinstance(rows, Mapping) or not rows:
            raise ValueError("rows must be a non-empty mapping of dataset name to array")
        f = self._file
        assert f is not None
        out: dict[str, np.ndarray] = {}
        n: int | None = None
        for raw_key, value in rows.items():
            key = str(raw_key).strip("/")
            parts = key.split("/")
            if len(parts) != 2 or parts[0] not in ROW_GROUPS or not parts[1]:
                raise ValueError(f"row key {raw_key!r} is not '<group>/<name>' with group in {ROW_GROUPS}")
            if key in out:
                raise ValueError(f"row key {key!r} given twice")
            arr = np.asarray(value)
            if arr.ndim == 0:
                raise ValueError(f"{key}: needs a leading row axis, got a scalar")
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"{key}: has {arr.shape[0]} rows, other arrays have {n}")
            out[key] = _storage_array(key, arr)
        assert n is not None
        if n == 0:
            raise ValueError("append needs at least one row")
        keys = frozenset(out)
        if self._keys is not None:
            missing, extra = sorted(self._keys - keys), sorted(keys - self._keys)
            if missing or extra:
                raise ValueError(f"rows must have exactly the keys of earlier commits; missing {missing}, extra {extra}")
        else:
            present = frozenset(_row_datasets(f))
            for key in present & keys:
                obj = f[key]
                if obj.chunks is None or obj.maxshape[0] is not None:
                    raise ValueError(f"{key}: the stored dataset is not resizable along axis 0")
            if present - keys:
                raise ValueError(f"rows lack keys of datasets already in the file: {sorted(present - keys)}")
        for key, arr in out.items():
            ds = self._dataset(key)
            if ds is None:
                continue
            if tuple(ds.shape[1:]) != arr.shape[1:]:
                raise ValueError(f"{key}: row shape {arr.shape[1:]} differs from the stored {tuple(ds.shape[1:])}")
            if arr.dtype != ds.dtype:
                if not np.can_cast(arr.dtype, ds.dtype, casting="same_kind"):
                    raise ValueError(f"{key}: dtype {arr.dtype} cannot be stored as {ds.dtype}")
                out[key] = arr.astype(ds.dtype)
        return out

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent). Rows are already committed; nothing else is written."""
        if self._file is not None:
            self._datasets.clear()
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> EnsembleWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EnsembleWriter({str(self.path)!r}, n_committed={self._n}{', closed' if self.closed else ''})"


_PRIVATE = object()


def _storage_array(key: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` in the dtype it is stored in: bool, int64, or its own float/complex dtype (little-endian)."""
    kind = arr.dtype.kind
    if key == "markov/accepted" and kind != "b":
        raise ValueError(f"{key}: must be bool, got {arr.dtype}")
    if key in ("markov/chain", "markov/step") and kind not in "iu":
        raise ValueError(f"{key}: must be integer, got {arr.dtype}")
    if key.startswith(("markov/", "weights/")) and arr.ndim != 1:
        raise ValueError(f"{key}: must have shape (n,), got {arr.shape}")
    if key.startswith("observables/") and arr.ndim not in (1, 2):
        raise ValueError(f"{key}: must have shape (n,) or (n, k), got {arr.shape}")
    if key.startswith("fields/") and arr.ndim < 2:
        raise ValueError(f"{key}: must have shape (n, ...) with lattice axes, got {arr.shape}")
    if kind == "b":
        return np.ascontiguousarray(arr, dtype=np.bool_)
    if kind in "iu":
        if kind == "u" and arr.size and int(arr.max()) >= 2**63:
            raise ValueError(f"{key}: integer values do not fit in int64")
        return np.ascontiguousarray(arr, dtype=np.int64)
    if kind in "fc":
        return np.ascontiguousarray(arr, dtype=_le(arr.dtype))
    raise ValueError(f"{key}: unsupported dtype {arr.dtype}")


def _set_attr(obj: h5py.HLObject, name: str, value: np.ndarray | np.generic) -> None:
    """Rewrite an existing attribute in place (keeping its type), or create it."""
    if name in obj.attrs:
        obj.attrs.modify(name, value)
    else:
        obj.attrs.create(name, value)


def _init_file(f: h5py.File, meta: EnsembleMeta, couplings: str, sampler: str, shape: np.ndarray, seed: Any) -> None:
    a = f.attrs
    a["format"] = FORMAT_NAME
    a["format_version"] = np.int64(FORMAT_VERSION)
    a["latflow_version"] = str(latflow.__version__)
    now = _utc_now()
    a["created_utc"] = now
    a["theory"] = meta.theory
    a["couplings"] = couplings
    a["lattice_shape"] = shape
    a["sampler"] = sampler
    a["seed"] = seed
    a["job"] = meta.job
    a["model_sha256"] = meta.model_sha256
    a.create("n_committed", np.int64(0))
    # provenance that helps a reader years later (no machine names, no paths)
    a.create("last_commit_utc", _fixed(now, _UTC_DTYPE))
    a["description"] = _ROOT_DESCRIPTION
    a["sampler_kind"] = str(meta.sampler["kind"])
    a["software"] = (
        f"python {platform.python_version()}; numpy {np.__version__}; h5py {h5py.__version__}; "
        f"hdf5 {h5py.version.hdf5_version}; {platform.system()} {platform.machine()}; "
        f"byteorder {sys.byteorder}"
    )
    for g in ROW_GROUPS:
        f.create_group(g)
    _ensure_checkpoint(f)
    f.flush()


def _ensure_checkpoint(f: h5py.File) -> None:
    """Create the checkpoint group and its two slots where missing (new files, foreign files)."""
    g = f.require_group(CHECKPOINT_GROUP)
    if "current" not in g.attrs:
        g.attrs.create("current", np.int64(-1))
    if "description" not in g.attrs:
        g.attrs["description"] = (
            "sampler state (opaque bytes) saved with each commit, alternating between two slots; "
            "the current slot is the one whose n_committed equals the root n_committed; nbytes -1: no state"
        )
    for name in _SLOTS:
        if name in g:
            ds = g[name]
            if not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8 or ds.ndim != 1 or ds.maxshape[0] is not None:
                raise EnsembleError(f"{f.filename}: {CHECKPOINT_GROUP}/{name} is not a resizable uint8 dataset")
            continue
        ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(_STATE_CHUNK,))
        ds.attrs.create("n_committed", np.int64(-1))
        ds.attrs.create("nbytes", np.int64(-1))


def _create_row_dataset(f: h5py.File, key: str, arr: np.ndarray) -> h5py.Dataset:
    group, name = key.split("/")
    grp = f.require_group(group)
    row_shape = tuple(arr.shape[1:])
    ds = grp.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=arr.dtype,
        chunks=_chunk_shape(row_shape, arr.dtype.itemsize),
    )
    if key in _DESCRIPTIONS:
        ds.attrs["description"] = _DESCRIPTIONS[key]
    if group == "fields":
        ds.attrs.create("sha256", _fixed(hashlib.sha256().hexdigest(), _SHA_DTYPE))
        ds.attrs.create("sha256_rows", np.int64(0))
    return ds


def _write_state(ds: h5py.Dataset, state: bytes | bytearray | memoryview | None, n_new: int) -> None:
    if state is None:
        _set_attr(ds, "nbytes", np.int64(-1))
    else:
        blob = np.frombuffer(bytes(state), dtype=np.uint8)
        if blob.size > ds.shape[0]:
            ds.resize(max(blob.size, 2 * ds.shape[0]), axis=0)  # grow only: nothing is freed
        if blob.size:
            ds[: blob.size] = blob
        _set_attr(ds, "nbytes", np.int64(blob.size))
    _set_attr(ds, "n_committed", np.int64(n_new))


def _read_state(f: h5py.File, n: int) -> tuple[bytes | None, int]:
    """(blob, slot) of the checkpoint slot that belongs to commit ``n``; (None, -1) if none does."""
    grp = f.get(CHECKPOINT_GROUP)
    if not isinstance(grp, h5py.Group) or n <= 0:
        return None, -1
    hint = _decode(grp.attrs.get("current", -1))
    order = [hint] + [i for i in (0, 1) if i != hint] if hint in (0, 1) else [0, 1]
    for i in order:
        ds = grp.get(_SLOTS[i])
        if not isinstance(ds, h5py.Dataset):
            continue
        if _decode(ds.attrs.get("n_committed", -1)) != n:
            continue
        nbytes = int(_decode(ds.attrs.get("nbytes", -1)))
        if nbytes < 0:
            return None, i
        if nbytes > ds.shape[0]:
            raise EnsembleError(f"{f.filename}: {CHECKPOINT_GROUP}/{_SLOTS[i]} is shorter than its nbytes")
        return (ds[:nbytes].tobytes() if nbytes else b""), i
    return None, -1


def _check_and_hash(path: Path, name: str, ds: h5py.Dataset, n: int) -> Any:
    """Running sha256 of rows [0, n) of ``ds``, after checking the stored checksum (if any)."""
    h = hashlib.sha256()
    _hash_rows_into(h, ds, 0, n)
    if "sha256" not in ds.attrs:
        return h
    stored = _decode(ds.attrs["sha256"])
    covered = int(_decode(ds.attrs.get("sha256_rows", n)))
    if covered == n:
        ok = h.hexdigest() == stored
    elif n < covered <= ds.shape[0]:  # killed between checksum update and n_committed update
        h2 = h.copy()
        _hash_rows_into(h2, ds, n, covered)
        ok = h2.hexdigest() == stored
    else:
        ok = False
    if not ok:
        raise EnsembleError(f"{path}: {name}: sha256 mismatch; the committed rows are damaged, refusing to append")
    return h


# ----------------------------------------------------------------------------------------------
# reader


class EnsembleReader:
    """Read-only view of an ensemble: its description and its committed rows.

    Accepts any file that follows ENSEMBLE_FORMAT.md: string attributes stored as ``bytes`` or
    ``str``, numpy scalars, contiguous or chunked datasets of any float width, extra groups and
    attributes, no checkpoint group, and a missing ``n_committed`` (then the common length of the
    per-row datasets is used).

    Parameters
    ----------
    path : path-like
        The ensemble file.

    Attributes
    ----------
    path : Path
    theory : str
    couplings : dict
    lattice_shape : tuple of int
        ``(L0, ..., L{d-1})``.
    sampler : dict
    seed : int
    n_committed : int
        Rows ``[0, n_committed)`` are the ensemble.
    attrs : dict
        Every root attribute decoded (bytes -> str, numpy scalars -> Python; JSON stays str).
    meta : EnsembleMeta
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = _open_h5(self.path, "r")
        try:
            self.attrs: dict[str, Any] = {k: _decode(v) for k, v in self._file.attrs.items()}
            self.meta = _meta_from_attrs(self.path, self.attrs)
            n = self.attrs.get("n_committed")
            if n is None:
                n = _common_length(_row_datasets(self._file))
            elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise EnsembleError(f"{self.path}: root attribute 'n_committed' is not a non-negative integer")
        except BaseException:
            self._file.close()
            self._file = None
            raise
        self.n_committed: int = int(n)
        self.theory: str = self.meta.theory
        self.couplings: dict = self.meta.couplings
        self.lattice_shape: tuple[int, ...] = self.meta.lattice_shape
        self.sampler: dict = self.meta.sampler
        self.seed: int = self.meta.seed

    def _f(self) -> h5py.File:
        if self._file is None:
            raise EnsembleError(f"{self.path}: reader is closed")
        return self._file

    def names(self, group: str) -> list[str]:
        """Names of the datasets directly under ``group`` (sorted); ``[]`` if there is no such group."""
        grp = self._f().get(group.strip("/") or "/")
        if not isinstance(grp, h5py.Group):
            return []
        return sorted(k for k in grp.keys() if isinstance(grp.get(k), h5py.Dataset))

    def has(self, name: str) -> bool:
        """Whether a dataset ``name`` (e.g. ``"fields/links"``) exists."""
        return isinstance(self._f().get(name.strip("/")), h5py.Dataset) if name.strip("/") else False

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Committed rows of dataset ``name``.

        Parameters
        ----------
        name : str
            E.g. ``"fields/phi"`` (shape ``(n, L0, ...)``), ``"markov/chain"`` (shape ``(n,)``).
        rows : slice or None
            Rows to return, indexing the committed rows ``range(n_committed)`` (negative steps
            allowed). None: all committed rows.

        Returns
        -------
        np.ndarray
            Shape ``(len(range(n_committed)[rows]), *row_shape)``, the stored dtype. Datasets
            outside the per-row groups are returned whole (``rows`` applied as a plain slice).
        """
        key = name.strip("/")
        obj = self._f().get(key) if key else None
        if not isinstance(obj, h5py.Dataset):
            raise EnsembleError(f"{self.path}: no dataset {key!r}")
        if rows is not None and not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice or None, got {type(rows).__name__}")
        if key.split("/")[0] not in ROW_GROUPS or obj.ndim == 0:
            data = obj[()]
            return data if rows is None or np.ndim(data) == 0 else np.asarray(data)[rows]
        n = self.n_committed
        if obj.shape[0] < n:
            raise EnsembleError(
                f"{self.path}: {key} has {obj.shape[0]} rows < n_committed={n}; the file is damaged (run verify)"
            )
        r = range(n)[rows if rows is not None else slice(None)]
        if len(r) == 0:
            return np.empty((0, *obj.shape[1:]), dtype=obj.dtype)
        if r.step > 0:
            if r.step == 1:
                return obj[r.start : r.stop]
            return obj[r.start : r[-1] + 1 : r.step]
        lo, hi = r[-1], r[0] + 1
        block = obj[lo:hi]
        return np.ascontiguousarray(block[r.start - lo :: r.step])

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> EnsembleReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EnsembleReader({str(self.path)!r}, theory={self.theory!r}, "
            f"lattice_shape={self.lattice_shape}, n_committed={self.n_committed})"
        )


# ----------------------------------------------------------------------------------------------
# verify


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Check an ensemble file against the format; returns one-line problems (``[]``: intact).

    Checks: the file opens as HDF5; every required root attribute is present and well-formed
    (``format``, ``format_version`` = 1, JSON ``couplings``/``sampler`` with a ``kind``, integer
    ``lattice_shape``, ``seed``, ``n_committed``); every per-row dataset has at least
    ``n_committed`` rows; ``fields/phi`` / ``fields/links`` match ``lattice_shape``; every
    ``fields/*`` dataset has a ``sha256`` attribute that matches its rows.

    The checksum covers rows ``[0, sha256_rows)`` where the dataset has a ``sha256_rows``
    attribute and ``[0, n_committed)`` otherwise; ``sha256_rows > n_committed`` (a writer killed
    just before raising ``n_committed``) is accepted, because the committed rows are a prefix.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    list of str
        Each names the file and, where one is at fault, the dataset or attribute.
    """
    path = Path(path)
    try:
        f = _open_h5(path, "r")
    except EnsembleError as exc:
        return [str(exc)]
    problems: list[str] = []
    try:
        try:
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
        except Exception as exc:
            return [_one_line(f"{path}: cannot read root attributes: {exc}")]
        problems += [f"{path}: {p}" for p in _root_problems(attrs)]
        datasets = _row_datasets(f)
        n = attrs.get("n_committed")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            n = _common_length(datasets)
        shape: tuple[int, ...] | None
        try:
            shape = _parse_shape(attrs["lattice_shape"]) if "lattice_shape" in attrs else None
        except ValueError:
            shape = None
        for name, ds in datasets.items():
            problems += [f"{path}: {p}" for p in _dataset_problems(name, ds, n, shape)]
    except Exception as exc:  # a damaged file can fail anywhere
        problems.append(_one_line(f"{path}: cannot read: {type(exc).__name__}: {exc}"))
    finally:
        f.close()
    return [_one_line(p) for p in problems]


def _dataset_problems(name: str, ds: h5py.Dataset, n: int, shape: tuple[int, ...] | None) -> list[str]:
    if ds.ndim == 0:
        return [f"{name} is a scalar, expected a row axis"]
    problems: list[str] = []
    if ds.shape[0] < n:
        problems.append(f"{name} has {ds.shape[0]} rows < n_committed={n}")
    if shape is not None:
        d = len(shape)
        if name == "fields/phi" and tuple(ds.shape[1 : 1 + d]) != shape:
            problems.append(f"{name} shape {ds.shape} does not match lattice_shape {list(shape)}")
        if name == "fields/links" and (ds.ndim < 2 + d or ds.shape[1] != d or tuple(ds.shape[2 : 2 + d]) != shape):
            problems.append(f"{name} shape {ds.shape} does not match (n, {d}, {', '.join(map(str, shape))}, ...)")
    if not name.startswith("fields/"):
        return problems
    if "sha256" not in ds.attrs:
        return problems + [f"{name} has no sha256 attribute"]
    stored = _decode(ds.attrs["sha256"])
    covered_raw = _decode(ds.attrs.get("sha256_rows", n))
    if isinstance(covered_raw, bool) or not isinstance(covered_raw, int):
        return problems + [f"{name} attribute sha256_rows is not an integer"]
    covered = covered_raw
    if covered < n:
        return problems + [f"{name} sha256 covers {covered} rows < n_committed={n}"]
    if covered > ds.shape[0]:
        return problems + [f"{name} sha256 covers {covered} rows but the dataset has {ds.shape[0]}"]
    computed = sha256_of_rows(ds, covered)
    if computed != stored:
        problems.append(f"{name} sha256 mismatch (stored {stored}, computed {computed})")
    return problems
