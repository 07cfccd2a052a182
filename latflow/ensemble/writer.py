"""Append-only, crash-safe :class:`EnsembleWriter`."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from ._checkpoint import _SLOTS, CHECKPOINT_GROUP, _ensure_checkpoint, _read_state, _write_state
from ._format import FIELD_INDEX, ROW_GROUPS, _committed_rows, _common_length, _meta_from_attrs, _row_datasets
from ._h5 import (
    _SHA_DTYPE,
    _UTC_DTYPE,
    _decode,
    _fixed,
    _hash_rows_into,
    _open_h5,
    _raw_le_bytes,
    _set_attr,
    _utc_now,
)
from ._layout import _create_row_dataset, _init_file, _storage_array, _validate_meta
from .meta import EnsembleError, EnsembleExistsError, EnsembleMeta
from .runs import RUN_DESCRIPTIONS, RUN_GROUP, RUN_REQUIRED, check_runs_against_rows, combine_log_z, committed_runs
from .runs import run_datasets as _run_datasets


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


class EnsembleWriter:
    """Append-only writer of one ensemble file; use :meth:`create` or :meth:`resume`.

    A context manager: ``with EnsembleWriter.create(path, meta) as w: w.append(rows, state)``.

    Configurations (``fields/*``) may be stored for only some rows (``meta.storage["save_every"]``
    > 1): then every commit passes ``fields/row``, the rows its configurations belong to, and the
    ``fields/*`` arrays have one entry per stored configuration (possibly none).

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
        self._m = 0  # committed rows of fields/* (= _n unless fields/row indexes them)
        self._dataset_attrs: dict[str, dict[str, Any]] = {}
        self._keys: frozenset[str] | None = None  # fixed after the first commit
        self._hashers: dict[str, Any] = {}
        self._slot = -1  # checkpoint slot of the committed state (-1: none)
        self._broken: str | None = None
        self._datasets: dict[str, h5py.Dataset] = {}  # open handles (h5py look-ups are slow)
        self._slots = tuple(file[CHECKPOINT_GROUP][name] for name in _SLOTS)
        # weighted ensembles (annealing samplers): committed runs, their keys, log Z and last run id
        self._r = 0
        self._run_keys: frozenset[str] | None = None  # fixed after the first commit (empty: not weighted)
        self._run_log_z = np.zeros(0)
        self._last_run = -(2**63)
        self._checkpoint = file[CHECKPOINT_GROUP]

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        meta: EnsembleMeta,
        *,
        force: bool = False,
        dataset_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> EnsembleWriter:
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
        dataset_attrs : mapping or None
            ``{"observables/plaquette": {"description": "...", "exact": True}, ...}``: HDF5
            attributes set on each dataset when it is created (with the first commit).

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
        w = cls(f, path, meta, _token=_PRIVATE)
        w.set_dataset_attrs(dataset_attrs or {})
        return w

    def set_dataset_attrs(self, dataset_attrs: Mapping[str, Mapping[str, Any]]) -> None:
        """Attributes for datasets not created yet (see :meth:`create`); existing ones keep theirs."""
        for key, attrs in dataset_attrs.items():
            self._dataset_attrs[str(key).strip("/")] = dict(attrs)

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
            committed = _committed_rows(datasets, n)
            for name, ds in datasets.items():
                if ds.ndim == 0 or ds.shape[0] < committed[name]:
                    raise EnsembleError(
                        f"{path}: {name} has fewer rows than its {committed[name]} committed ones; file is damaged"
                    )
                if ds.chunks is None or ds.maxshape[0] is not None:
                    raise EnsembleError(f"{path}: {name} is not resizable along axis 0; cannot append")
            hashers: dict[str, Any] = {}
            for name, ds in datasets.items():
                if name.startswith("fields/"):
                    hashers[name] = _check_and_hash(path, name, ds, committed[name])
            runs, r = _run_datasets(f), 0
            if runs:
                r = _resumable_runs(path, f, runs, attrs, n)
                for name, ds in runs.items():
                    committed[name] = r
                    hashers[name] = _check_and_hash(path, name, ds, r)
            state, slot = _read_state(f, n)
            # -- from here on the file is modified: discard uncommitted rows and runs, repair attributes
            for name, ds in {**datasets, **runs}.items():
                if ds.shape[0] != committed[name]:
                    ds.resize(committed[name], axis=0)
            f.flush()
            for name, h in hashers.items():
                ds = datasets[name] if name in datasets else runs[name]
                _set_attr(ds, "sha256", _fixed(h.hexdigest(), _SHA_DTYPE))
                _set_attr(ds, "sha256_rows", np.int64(committed[name]))
            run_log_z = np.asarray(runs["annealing/log_z"][:r], dtype=np.float64) if runs else np.zeros(0)
            if runs:
                _set_run_attrs(f, r, run_log_z)
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
        w._m = committed.get(FIELD_INDEX, n)
        w._hashers = hashers
        w._slot = slot
        w._keys = frozenset(datasets) if n > 0 else None
        if n > 0:
            w._run_keys = frozenset(runs)
        w._r = r
        w._run_log_z = run_log_z
        if r:
            w._last_run = int(runs["annealing/chain"][r - 1])
        return w, state

    # -- properties ------------------------------------------------------------------------

    @property
    def n_committed(self) -> int:
        """Number of rows fully committed so far."""
        return self._n

    @property
    def n_runs_committed(self) -> int:
        """Number of annealing runs fully committed so far (0 for a Markov-chain ensemble)."""
        return self._r

    @property
    def closed(self) -> bool:
        return self._file is None

    # -- appending -------------------------------------------------------------------------

    def append(
        self,
        rows: Mapping[str, np.ndarray],
        state: bytes | None = None,
        runs: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append ``n`` rows (and, for a weighted ensemble, ``R`` runs) and the sampler state as ONE crash-safe commit.

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
        runs : mapping of str to array, or None
            Weighted ensembles (annealing samplers) only: the runs whose particles are the rows of
            this commit, one entry per run along axis 0 (shape ``(R,)`` or ``(R, ...)``):
            ``"annealing/log_z"`` (float, the run's log Z estimate), ``"annealing/ess"`` (float, the
            final population's ESS fraction), ``"annealing/n_particles"`` and ``"annealing/chain"``
            (int, the run id, greater than every earlier run's), and any further ``"annealing/<name>"``.
            The rows must be exactly these runs' particles (``markov/chain`` = run id, ``n_particles``
            rows each). Either every commit of a file passes runs or none does. The root attributes
            ``n_runs_committed``, ``log_z`` and ``log_z_err`` (:func:`combine_log_z` of all committed runs)
            are updated with the commit.

        Raises
        ------
        ValueError
            Inconsistent rows or runs (leading lengths, keys, row shapes, dtypes, runs that do not
            match the rows); nothing is written.
        EnsembleError
            The writer is closed, or a previous commit failed part-way (resume the file).
        """
        f = self._require_open()
        if state is not None and not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes or None, got {type(state).__name__}")
        arrays = self._prepare(rows)
        run_arrays = self._prepare_runs(runs, arrays)
        n_add = next(a.shape[0] for k, a in arrays.items() if not k.startswith("fields/"))
        n_new = self._n + n_add
        m_new = self._m + (arrays[FIELD_INDEX].shape[0] if FIELD_INDEX in arrays else n_add)
        r_new = self._r + (run_arrays["annealing/log_z"].shape[0] if run_arrays else 0)
        run_log_z = np.concatenate([self._run_log_z, run_arrays["annealing/log_z"]]) if run_arrays else self._run_log_z
        new_hashers: dict[str, Any] = {}
        for key, arr in {**arrays, **run_arrays}.items():
            if key.startswith(("fields/", f"{RUN_GROUP}/")):
                h = self._hashers[key].copy() if key in self._hashers else hashlib.sha256()
                h.update(_raw_le_bytes(arr, arr.dtype))
                new_hashers[key] = h
        slot = 1 - self._slot if self._slot in (0, 1) else 0
        try:
            # 1. rows, then the sampler state into the slot the committed state does not use
            for key, arr in arrays.items():
                ds = self._dataset(key)
                if ds is None:
                    ds = self._datasets[key] = _create_row_dataset(
                        f, key, arr, self.meta.storage, self._dataset_attrs.get(key)
                    )
                start, stop = (self._m, m_new) if key.startswith("fields/") else (self._n, n_new)
                ds.resize(stop, axis=0)
                if stop > start:
                    ds[start:stop] = arr
            for key, arr in run_arrays.items():
                ds = self._dataset(key)
                if ds is None:
                    attrs = {"description": RUN_DESCRIPTIONS[key]} if key in RUN_DESCRIPTIONS else {}
                    attrs.update(self._dataset_attrs.get(key, {}))
                    ds = self._datasets[key] = _create_row_dataset(f, key, arr, None, attrs)
                    ds.attrs.create("sha256", _fixed(hashlib.sha256().hexdigest(), _SHA_DTYPE))
                    ds.attrs.create("sha256_rows", np.int64(0))
                ds.resize(r_new, axis=0)
                ds[self._r : r_new] = arr
            _write_state(self._slots[slot], state, n_new)
            f.flush()
            # 2. checksums covering the new rows (and runs), the runs' attributes, and the slot pointer
            for key, h in new_hashers.items():
                _set_attr(self._datasets[key], "sha256", _fixed(h.hexdigest(), _SHA_DTYPE))
                _set_attr(self._datasets[key], "sha256_rows", np.int64(r_new if key in run_arrays else m_new))
            if run_arrays:
                _set_run_attrs(f, r_new, run_log_z)
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
        self._m = m_new
        self._hashers.update(new_hashers)
        self._keys = frozenset(arrays)
        self._slot = slot
        self._run_keys = frozenset(run_arrays)
        if run_arrays:
            self._r = r_new
            self._run_log_z = run_log_z
            self._last_run = int(run_arrays["annealing/chain"][-1])

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
            out[key] = _storage_array(key, arr)
        indexed = FIELD_INDEX in out
        for key, arr in out.items():
            if indexed and key.startswith("fields/"):
                continue  # checked against fields/row below
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"{key}: has {arr.shape[0]} rows, other arrays have {n}")
        if n is None:
            raise ValueError("rows need at least one dataset outside fields/ (markov/, weights/, observables/)")
        if n == 0:
            raise ValueError("append needs at least one row")
        if indexed:
            idx = out[FIELD_INDEX]
            for key, arr in out.items():
                if key.startswith("fields/") and arr.shape[0] != idx.shape[0]:
                    raise ValueError(f"{key}: has {arr.shape[0]} configurations, {FIELD_INDEX} has {idx.shape[0]}")
            if idx.size and (np.any(np.diff(idx) <= 0) or int(idx[0]) < self._n or int(idx[-1]) >= self._n + n):
                raise ValueError(
                    f"{FIELD_INDEX}: must be strictly increasing rows of this commit, in [{self._n}, {self._n + n})"
                )
        keys = frozenset(out)
        if self._keys is not None:
            missing, extra = sorted(self._keys - keys), sorted(keys - self._keys)
            if missing or extra:
                raise ValueError(
                    f"rows must have exactly the keys of earlier commits; missing {missing}, extra {extra}"
                )
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

    def _prepare_runs(
        self, runs: Mapping[str, np.ndarray] | None, arrays: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Validate the per-run arrays of a commit against its (prepared) rows; ``{}`` without runs."""
        expected = self._run_keys
        if expected is None and self._n == 0:
            assert self._file is not None
            expected = frozenset(_run_datasets(self._file)) or None
        if runs is None or (isinstance(runs, Mapping) and not runs):
            if expected:
                raise ValueError("this ensemble is weighted (annealing runs): every commit needs runs=")
            return {}
        if not isinstance(runs, Mapping):
            raise ValueError("runs must be a mapping of 'annealing/<name>' to an array with one entry per run")
        if self._n > 0 and not expected:
            raise ValueError("runs= given, but the ensemble's earlier commits have no runs (not a weighted ensemble)")
        out: dict[str, np.ndarray] = {}
        for raw_key, value in runs.items():
            key = str(raw_key).strip("/")
            parts = key.split("/")
            if len(parts) != 2 or parts[0] != RUN_GROUP or not parts[1]:
                raise ValueError(f"run key {raw_key!r} is not '{RUN_GROUP}/<name>'")
            arr = np.asarray(value)
            if arr.ndim == 0:
                raise ValueError(f"{key}: needs a leading run axis, got a scalar")
            if key in RUN_REQUIRED and arr.ndim != 1:
                raise ValueError(f"{key}: must have shape (R,), got {arr.shape}")
            if key in ("annealing/log_z", "annealing/ess"):
                if arr.dtype.kind not in "iuf":
                    raise ValueError(f"{key}: must be real, got {arr.dtype}")
                arr = arr.astype(np.float64)
            if key in ("annealing/n_particles", "annealing/chain") and arr.dtype.kind not in "iu":
                raise ValueError(f"{key}: must be integer, got {arr.dtype}")
            out[key] = _storage_array(key, arr)
        missing = [k for k in RUN_REQUIRED if k not in out]
        if missing:
            raise ValueError(f"runs lack {missing}")
        n_runs = out["annealing/log_z"].shape[0]
        for key, arr in out.items():
            if arr.shape[0] != n_runs:
                raise ValueError(f"{key}: has {arr.shape[0]} runs, annealing/log_z has {n_runs}")
        if expected is not None and frozenset(out) != expected:
            missing, extra = sorted(expected - frozenset(out)), sorted(frozenset(out) - expected)
            raise ValueError(f"runs must have exactly the keys of earlier commits; missing {missing}, extra {extra}")
        if "markov/chain" not in arrays:
            raise ValueError("a weighted commit needs markov/chain (the run id of each row)")
        problems = check_runs_against_rows(out, arrays["markov/chain"], self._n, what="runs of this commit")
        if problems:
            raise ValueError(problems[0])
        if int(out["annealing/chain"][0]) <= self._last_run:
            raise ValueError(f"annealing/chain: run ids must exceed the last committed run's ({self._last_run})")
        if np.any(np.isnan(out["annealing/log_z"])) or np.any(out["annealing/log_z"] == np.inf):
            raise ValueError("annealing/log_z must not be NaN or +inf")
        for key, arr in out.items():
            ds = self._dataset(key)
            if ds is None:
                continue
            if tuple(ds.shape[1:]) != arr.shape[1:]:
                raise ValueError(f"{key}: shape {arr.shape[1:]} differs from the stored {tuple(ds.shape[1:])}")
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


def _set_run_attrs(f: h5py.File, n_runs: int, run_log_z: np.ndarray) -> None:
    """Root attributes ``n_runs_committed``, ``log_z``, ``log_z_err`` for the first ``n_runs`` runs."""
    log_z, log_z_err = combine_log_z(run_log_z[:n_runs])
    _set_attr(f, "n_runs_committed", np.int64(n_runs))
    _set_attr(f, "log_z", np.float64(log_z))
    _set_attr(f, "log_z_err", np.float64(log_z_err))


def _resumable_runs(
    path: Path, f: h5py.File, runs: Mapping[str, h5py.Dataset], attrs: Mapping[str, Any], n: int
) -> int:
    """Committed runs of a weighted file being resumed, after checking they match the committed rows."""
    missing = [k for k in RUN_REQUIRED if k not in runs]
    if missing:
        raise EnsembleError(f"{path}: weighted ensemble lacks {missing}; file is damaged")
    n_attr = attrs.get("n_runs_committed", 0)
    if isinstance(n_attr, bool) or not isinstance(n_attr, int) or n_attr < 0:
        raise EnsembleError(f"{path}: root attribute 'n_runs_committed' is not a non-negative integer")
    for name, ds in runs.items():
        if ds.ndim == 0 or ds.shape[0] < min(n_attr, runs["annealing/n_particles"].shape[0]):
            raise EnsembleError(f"{path}: {name} has fewer entries than the committed runs; file is damaged")
        if ds.chunks is None or ds.maxshape[0] is not None:
            raise EnsembleError(f"{path}: {name} is not resizable along axis 0; cannot append")
    r = committed_runs(n_attr, runs["annealing/n_particles"], n)
    head = {k: runs[k][:r] for k in ("annealing/chain", "annealing/n_particles")}
    chain = f["markov/chain"][:n] if "markov/chain" in f else np.zeros(n, np.int64)
    problems = check_runs_against_rows(head, chain, what="committed runs")
    if problems:
        raise EnsembleError(f"{path}: {problems[0]}; file is damaged")
    return r


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
