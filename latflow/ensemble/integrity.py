"""Checking an ensemble file against the format and its checksums (:func:`verify`)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ._format import FIELD_INDEX, _committed_rows, _common_length, _parse_shape, _root_problems, _row_datasets
from ._h5 import _decode, _open_h5, sha256_of_rows
from .meta import EnsembleError, _one_line
from .runs import RUN_REQUIRED, check_runs_against_rows, combine_log_z, committed_runs, run_datasets


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Check an ensemble file against the format; returns one-line problems (``[]``: intact).

    Checks: the file opens as HDF5 and every group in it can be listed; every required root
    attribute is present and well-formed
    (``format``, ``format_version`` = 1, JSON ``couplings``/``sampler`` with a ``kind``, integer
    ``lattice_shape``, ``seed``, ``n_committed``); every per-row dataset has at least
    ``n_committed`` rows; ``fields/phi`` / ``fields/links`` match ``lattice_shape``; every
    ``fields/*`` dataset has a ``sha256`` attribute that matches its rows. Weighted ensembles
    (``annealing/*`` datasets): the required per-run datasets and ``n_runs_committed`` exist, every
    per-run dataset holds the committed runs and matches its ``sha256`` where it has one, the committed
    runs are exactly the committed rows (``markov/chain``, ``n_particles``), and the root ``log_z``,
    ``log_z_err`` are those of the committed runs.

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
        # walk every group first: a damaged group index would otherwise just hide its datasets
        f.visit(lambda name: None)
        datasets = _row_datasets(f)
        n = attrs.get("n_committed")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            n = _common_length(datasets)
        shape: tuple[int, ...] | None
        try:
            shape = _parse_shape(attrs["lattice_shape"]) if "lattice_shape" in attrs else None
        except ValueError:
            shape = None
        committed = _committed_rows(datasets, n)
        for name, ds in datasets.items():
            problems += [f"{path}: {p}" for p in _dataset_problems(name, ds, committed[name], shape)]
        if FIELD_INDEX in datasets:
            idx = datasets[FIELD_INDEX][: committed[FIELD_INDEX]]
            if idx.size and (int(idx[0]) < 0 or bool(np.any(np.diff(idx) <= 0))):
                problems.append(f"{path}: {FIELD_INDEX} is not a strictly increasing list of rows")
        runs = run_datasets(f)
        if runs:
            chain = datasets["markov/chain"][:n] if "markov/chain" in datasets else np.zeros(n, np.int64)
            problems += [f"{path}: {p}" for p in _run_problems(attrs, runs, chain, n)]
    except Exception as exc:  # a damaged file can fail anywhere
        problems.append(_one_line(f"{path}: cannot read: {type(exc).__name__}: {exc}"))
    finally:
        f.close()
    return [_one_line(p) for p in problems]


def _run_problems(attrs: dict, runs: dict[str, h5py.Dataset], chain: np.ndarray, n: int) -> list[str]:
    """Problems with the per-run datasets of a weighted ensemble (``chain``: committed ``markov/chain``)."""
    missing = [k for k in RUN_REQUIRED if k not in runs]
    if missing:
        return [f"weighted ensemble lacks per-run dataset(s) {missing}"]
    n_attr = attrs.get("n_runs_committed")
    if n_attr is None:
        return ["weighted ensemble has no root attribute 'n_runs_committed'"]
    if isinstance(n_attr, bool) or not isinstance(n_attr, int) or n_attr < 0:
        return ["root attribute 'n_runs_committed' is not a non-negative integer"]
    problems: list[str] = []
    for name, ds in runs.items():
        if ds.ndim == 0 or ds.shape[0] < n_attr:
            problems.append(f"{name} has {ds.shape[0] if ds.ndim else 0} entries < n_runs_committed={n_attr}")
    if problems:
        return problems
    r = committed_runs(n_attr, runs["annealing/n_particles"][:n_attr], n)
    for name, ds in runs.items():
        if "sha256" in ds.attrs:
            problems += _dataset_problems(name, ds, r, None)
    head = {k: runs[k][:r] for k in ("annealing/chain", "annealing/n_particles")}
    problems += check_runs_against_rows(head, chain, what=f"the {r} committed run(s)")
    if r == n_attr and not problems:
        expected = combine_log_z(runs["annealing/log_z"][:r])
        for key, want in zip(("log_z", "log_z_err"), expected, strict=True):
            got = attrs.get(key)
            ok = isinstance(got, float) and (
                (np.isnan(got) and np.isnan(want)) or bool(np.isclose(got, want, rtol=1e-12, atol=1e-12))
            )
            if not ok:
                problems.append(f"root attribute {key!r} is {got!r}, the committed runs give {want!r}")
    return problems


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
    if not name.startswith(("fields/", "annealing/")):
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
