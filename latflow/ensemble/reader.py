"""Read-only access to an ensemble's description and committed rows (:class:`EnsembleReader`)."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from ._format import ROW_GROUPS, _committed_rows, _common_length, _meta_from_attrs, _row_datasets
from ._h5 import _decode, _open_h5
from .meta import EnsembleError
from .runs import RUN_GROUP, combine_log_z, committed_runs, run_datasets


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
    is_weighted : bool
        The ensemble is a weighted population of annealing runs (``annealing/log_z`` exists); see
        :meth:`runs`, :attr:`n_runs_committed`, :attr:`log_z`.
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
        self.is_weighted: bool = self.has(f"{RUN_GROUP}/log_z")

    @property
    def n_runs_committed(self) -> int:
        """Committed annealing runs (0 unless :attr:`is_weighted`).

        The root attribute ``n_runs_committed``, clamped to the runs whose rows are all committed (a
        writer killed between its last two flushes leaves the attribute one commit ahead).
        """
        if not self.is_weighted:
            return 0
        raw = self.attrs.get("n_runs_committed", 0)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise EnsembleError(f"{self.path}: root attribute 'n_runs_committed' is not a non-negative integer")
        n_particles = self._f().get(f"{RUN_GROUP}/n_particles")
        if not isinstance(n_particles, h5py.Dataset):
            raise EnsembleError(f"{self.path}: weighted ensemble without {RUN_GROUP}/n_particles; file is damaged")
        return committed_runs(raw, n_particles[: min(raw, n_particles.shape[0])], self.n_committed)

    def runs(self) -> dict[str, np.ndarray]:
        """Per-run datasets of a weighted ensemble, committed runs only.

        Returns
        -------
        dict of str to np.ndarray
            ``{"annealing/log_z": (R,), "annealing/ess": (R,), "annealing/n_particles": (R,),
            "annealing/chain": (R,), ...}`` with ``R = n_runs_committed``; ``{}`` unless weighted.

        Raises
        ------
        EnsembleError
            A per-run dataset has fewer entries than the committed runs.
        """
        r = self.n_runs_committed
        out: dict[str, np.ndarray] = {}
        for name, ds in run_datasets(self._f()).items():
            if ds.ndim == 0 or ds.shape[0] < r:
                raise EnsembleError(f"{self.path}: {name} has fewer entries than the {r} committed runs; damaged")
            out[name] = ds[:r]
        return out if self.is_weighted else {}

    @property
    def log_z(self) -> float:
        """``log Z`` combined over the committed runs (:func:`~latflow.ensemble.combine_log_z`); NaN if none."""
        return combine_log_z(self.runs().get(f"{RUN_GROUP}/log_z", np.zeros(0)))[0]

    @property
    def log_z_err(self) -> float:
        """Standard error of :attr:`log_z` from the spread over runs; NaN with fewer than 2 runs."""
        return combine_log_z(self.runs().get(f"{RUN_GROUP}/log_z", np.zeros(0)))[1]

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

    def dataset_attrs(self, name: str) -> dict[str, Any]:
        """Every attribute of dataset ``name``, decoded (e.g. ``description``, ``estimator`` of an observable).

        Raises
        ------
        EnsembleError
            No such dataset.
        """
        key = name.strip("/")
        obj = self._f().get(key) if key else None
        if not isinstance(obj, h5py.Dataset):
            raise EnsembleError(f"{self.path}: no dataset {key!r}")
        return {k: _decode(v) for k, v in obj.attrs.items()}

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Committed rows of dataset ``name``.

        Parameters
        ----------
        name : str
            E.g. ``"fields/phi"`` (shape ``(n, L0, ...)``), ``"markov/chain"`` (shape ``(n,)``).
        rows : slice or None
            Rows to return, indexing the committed rows ``range(n_committed)`` (negative steps
            allowed). None: all committed rows. ``fields/*`` of a file with ``fields/row`` (configurations
            stored every ``save_every`` steps) index the committed stored configurations instead.

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
        if key.startswith("fields/"):  # stored every save_every steps: see fields/row
            n = _committed_rows(_row_datasets(self._f()), n)[key]
        if obj.shape[0] < n:
            raise EnsembleError(
                f"{self.path}: {key} has {obj.shape[0]} rows < its {n} committed rows; the file is damaged (run verify)"
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
