"""``latflow export --format pyerrors-json|csv|npz``: observable histories for existing analysis tools.

Three formats, all written by this module (no analysis package is imported):

* ``pyerrors-json``: the JSON format of pyerrors (``pyerrors.input.json.load_json`` reads it; format
  version 1.1, as ``pyerrors.input.json.create_json_string`` writes it), gzip-compressed when the name
  ends in ``.gz``. Each observable component is one ``Obs`` (tag: its name as ``latflow analyze``
  prints it, ``name`` or ``name[i]``) on the ensemble ``<stem>`` with one replica per chain,
  ``<stem>|r<chain>``; the configuration numbers (``idl``) are the chain's ``markov/step`` values, so
  a resumed chain keeps its Markov times. The file's ``description`` holds the ensemble's record
  (theory, couplings, lattice, sampler, seed, job text, observable descriptions). Weighted ensembles
  (annealing runs) are refused: their rows are weighted particles, not Markov chains, and pyerrors'
  Gamma method over them would be wrong.
* ``csv``: one line per committed row, ordered by chain and step: ``chain``, ``step``, ``accepted``,
  ``log_w`` (where the ensemble has it), then every observable (vector observables as ``name[i]``
  columns); floats in shortest round-trip notation, so the values read back exactly.
* ``npz``: NumPy archive with ``chain``, ``step``, ``accepted``, ``log_w`` (where present) ``(n,)``
  and one array per observable, ``(n,)`` or ``(n, k, ...)``, rows in the same order as the CSV.

Mistakes (unknown observable, existing output without ``--force``, bad file name) are
:class:`~jobs.config.JobError` or :class:`~latflow.ensemble.EnsembleError`: one line, exit status 2,
nothing written.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import getpass
import gzip
import io
import json
import os
import platform
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latflow import __version__
from latflow.ensemble import EnsembleError, EnsembleReader, require_hdf5_file, verify

from .config import JobError

#: formats of observable histories (the configuration formats are in :mod:`jobs.configfiles`)
OBSERVABLE_FORMATS = ("pyerrors-json", "csv", "npz")
#: markov/weights columns of the CSV and arrays of the npz, before the observables
MARKOV_COLUMNS = ("chain", "step", "accepted", "log_w")
PYERRORS_JSON_VERSION = "1.1"


@dataclass
class Histories:
    """Committed rows of an ensemble, ordered by chain, then Markov step.

    Attributes
    ----------
    name : str
        Ensemble name (the file's stem, ``|`` replaced): pyerrors' ensemble id.
    markov : dict of str to np.ndarray
        ``chain``, ``step`` ``(n,)`` int64, ``accepted`` ``(n,)`` bool, and ``log_w`` ``(n,)`` float64
        where the ensemble has ``weights/log_w``.
    observables : dict of str to np.ndarray
        Selected ``observables/<name>``, ``(n,)`` or ``(n, k, ...)``, in the stored dtype.
    record : dict
        The ensemble's description for the pyerrors file (JSON-serialisable).
    weighted : bool
        The ensemble is a weighted population of annealing runs.
    """

    name: str
    markov: dict[str, np.ndarray]
    observables: dict[str, np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)
    weighted: bool = False


def default_output(ensemble: Path, fmt: str) -> Path:
    """Output path when ``-o`` is not given: next to the ensemble, ``<stem>.json.gz|.csv|.npz``."""
    suffix = {"pyerrors-json": ".json.gz", "csv": ".csv", "npz": ".npz"}[fmt]
    return ensemble.with_name(ensemble.stem + suffix)


def _selection(text: str | None, available: list[str], path: Path) -> list[str]:
    """Observable datasets named by ``--observables a,b`` (all if None), checked against the file."""
    if text is None:
        return available
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise JobError(f"--observables {text!r}: expected comma-separated names, allowed: {', '.join(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise JobError(
            f"--observables {unknown[0]!r}: {path} has no such observable; allowed: {', '.join(available) or 'none'}"
        )
    return list(dict.fromkeys(names))


def _row_order(chain: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Row indices sorted by chain, then step (stable), shape ``(n,)``."""
    return np.lexsort((np.arange(chain.size), step, chain))


def read_histories(path: Path, observables: str | None = None) -> Histories:
    """The committed rows of ``path`` (checksums verified), ordered by chain and step.

    Parameters
    ----------
    path : Path
        Ensemble (ENSEMBLE_FORMAT.md).
    observables : str or None
        ``--observables``: comma-separated dataset names under ``observables/`` (None: all).

    Returns
    -------
    Histories

    Raises
    ------
    EnsembleError
        Not an HDF5 file, or damaged (``latflow verify`` fails).
    JobError
        An unknown observable, or a chain with a repeated step.
    """
    require_hdf5_file(path)
    problems = verify(path)
    if problems:
        raise EnsembleError(f"{path}: damaged, not exported: {problems[0]}")
    with EnsembleReader(path) as r:
        n = int(r.n_committed)
        names = _selection(observables, r.names("observables"), path)
        chain = r.read("markov/chain").astype(np.int64) if r.has("markov/chain") else np.zeros(n, np.int64)
        step = r.read("markov/step").astype(np.int64) if r.has("markov/step") else np.arange(n, dtype=np.int64)
        order = _row_order(chain, step)
        markov = {"chain": chain[order], "step": step[order]}
        accepted = r.read("markov/accepted").astype(bool) if r.has("markov/accepted") else np.ones(n, bool)
        markov["accepted"] = accepted[order]
        if r.has("weights/log_w"):
            markov["log_w"] = r.read("weights/log_w").astype(np.float64)[order]
        data = {name: np.asarray(r.read(f"observables/{name}"))[order] for name in names}
        record = _record(r, path, names)
        weighted = bool(r.is_weighted)
    same = (np.diff(markov["chain"]) == 0) & (np.diff(markov["step"]) == 0)
    if np.any(same):
        i = int(np.flatnonzero(same)[0])
        raise JobError(f"{path}: chain {markov['chain'][i]} holds step {markov['step'][i]} twice; damaged ensemble")
    stem = path.name[: -len(".h5")] if path.name.endswith(".h5") else path.stem
    return Histories(stem.replace("|", "_"), markov, data, record, weighted)


def _record(r: EnsembleReader, path: Path, names: list[str]) -> dict[str, Any]:
    """What the pyerrors file's ``description`` says about the ensemble (JSON-serialisable)."""
    about = {}
    for name in names:
        attrs = r.dataset_attrs(f"observables/{name}")
        about[name] = {k: str(attrs[k]) for k in ("description", "estimator") if k in attrs}
    attrs = r.attrs
    return {
        "ensemble": path.name,
        "format": "latflow observable histories: one Obs per observable component, one replica per chain "
        "(<ensemble>|r<chain>), configuration numbers = markov/step",
        "theory": r.theory,
        "couplings": r.couplings,
        "lattice_shape": [int(x) for x in r.lattice_shape],
        "sampler": r.sampler,
        "seed": int(r.seed),
        "n_committed": int(r.n_committed),
        "latflow_version": str(attrs.get("latflow_version", "")),
        "created_utc": str(attrs.get("created_utc", "")),
        "model_sha256": str(attrs.get("model_sha256", "")),
        "job": str(attrs.get("job", "")),
        "observables": about,
    }


def _components(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """``(n,)`` -> ``{name: (n,)}``; ``(n, k, ...)`` -> ``{"name[i,...]": (n,)}`` as ``latflow analyze`` names them."""
    if values.ndim == 1:
        return {name: values}
    return {f"{name}[{','.join(map(str, i))}]": values[(slice(None), *i)] for i in np.ndindex(*values.shape[1:])}


# -- pyerrors JSON ----------------------------------------------------------------------------------


def _global_mean(series: np.ndarray) -> float:
    """Mean over all rows, as ``latflow analyze`` computes it (the common value for constant data)."""
    if np.all(series == series[0]):
        return float(series[0])
    return float(series.sum() / series.size)


def _obs_entry(tag: str, series: np.ndarray, h: Histories) -> dict[str, Any]:
    """One pyerrors ``Obs``: ``series`` ``(n,)`` split into replicas by chain; entries ``[step, value - mean]``."""
    mean = _global_mean(series)
    chain, step = h.markov["chain"], h.markov["step"]
    replicas = []
    for c in np.unique(chain):
        idx = np.flatnonzero(chain == c)
        deltas = [[int(s), float(v) - mean] for s, v in zip(step[idx], series[idx])]
        replicas.append({"name": f"{h.name}|r{int(c)}", "deltas": deltas})
    return {"type": "Obs", "layout": "1", "tag": [tag], "value": [mean], "data": [{"id": h.name, "replica": replicas}]}


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container
        return ""


def pyerrors_document(h: Histories) -> dict[str, Any]:
    """The pyerrors JSON document (format 1.1) of the histories.

    Raises
    ------
    JobError
        A weighted ensemble, or non-finite values (JSON cannot hold them).
    """
    if h.weighted:
        raise JobError(
            f"--format pyerrors-json: {h.record['ensemble']} is a weighted ensemble (annealing runs): its rows are "
            "weighted particles, not Markov chains, so pyerrors' Gamma method does not apply; use --format csv or "
            "npz (with log_w) and `latflow analyze` (jackknife over runs)"
        )
    obsdata = []
    for ds, values in h.observables.items():
        for tag, series in _components(ds, values).items():
            series = np.asarray(series, dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(series))
            if bad.size:
                i = int(bad[0])
                raise JobError(
                    f"--format pyerrors-json: observable {tag!r} is {series[i]} at chain {h.markov['chain'][i]} step "
                    f"{h.markov['step'][i]}; JSON cannot hold it (use --format csv or npz, or --observables)"
                )
            obsdata.append(_obs_entry(tag, series, h))
    return {
        "program": f"latflow {__version__}",
        "version": PYERRORS_JSON_VERSION,
        "who": _who(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": f"{socket.gethostname()}, {platform.platform()}",
        "description": h.record,
        "obsdata": obsdata,
    }


def _write_pyerrors_json(h: Histories, tmp: Path, out: Path) -> None:
    text = json.dumps(pyerrors_document(h), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if out.name.endswith(".gz"):
        with gzip.open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
    else:
        tmp.write_text(text, encoding="utf-8")


# -- CSV and npz ------------------------------------------------------------------------------------


def _columns(h: Histories) -> dict[str, np.ndarray]:
    """Every CSV column ``(n,)``: the markov/weights ones, then the observable components."""
    cols = dict(h.markov)
    for ds, values in h.observables.items():
        for name, series in _components(ds, values).items():
            if name in cols:
                raise JobError(f"--format csv: observable {name!r} has the name of a column {list(MARKOV_COLUMNS)}")
            cols[name] = series
    return cols


def _cell(kind: str) -> Callable[[Any], str]:
    """Text of one value: integers as integers, booleans as 0/1, floats in shortest round-trip notation."""
    if kind == "b":
        return lambda v: "1" if v else "0"
    if kind in "iu":
        return lambda v: str(int(v))
    return lambda v: repr(float(v))


def _write_csv(h: Histories, tmp: Path, out: Path) -> None:
    cols = _columns(h)
    fmt = [_cell(np.asarray(v).dtype.kind) for v in cols.values()]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(cols))
    for row in zip(*cols.values()):
        w.writerow([f(v) for f, v in zip(fmt, row)])
    data = buf.getvalue().encode("utf-8")
    if out.name.endswith(".gz"):
        with gzip.open(tmp, "wb") as f:
            f.write(data)
    else:
        tmp.write_bytes(data)


def _write_npz(h: Histories, tmp: Path, out: Path) -> None:
    arrays = dict(h.markov)
    for name, values in h.observables.items():
        if name in arrays:
            raise JobError(f"--format npz: observable {name!r} has the name of an array {list(MARKOV_COLUMNS)}")
        arrays[name] = values
    with open(tmp, "wb") as f:  # a file object: numpy appends no suffix
        np.savez(f, **arrays)


WRITERS: dict[str, Callable[[Histories, Path, Path], None]] = {
    "pyerrors-json": _write_pyerrors_json,
    "csv": _write_csv,
    "npz": _write_npz,
}


def _check_name(out: Path, fmt: str) -> None:
    """File names the readers accept: pyerrors' ``load_json`` appends ``.json`` to other names."""
    if fmt == "pyerrors-json" and not out.name.endswith((".json", ".json.gz")):
        raise JobError(f"-o {out}: pyerrors-json files end in .json or .json.gz (gzip), as pyerrors' load_json reads")
    if fmt == "npz" and not out.name.endswith(".npz"):
        raise JobError(f"-o {out}: npz files end in .npz")
    if fmt == "csv" and not out.name.endswith((".csv", ".csv.gz")):
        raise JobError(f"-o {out}: csv files end in .csv or .csv.gz (gzip)")


def _place(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished file into place; without ``force`` never replace an existing one."""
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if the file appeared meanwhile
    except FileExistsError:
        raise JobError(f"{out}: exists; use --force to replace") from None


def export_observables(args: argparse.Namespace) -> int:
    """``latflow export --format pyerrors-json|csv|npz``: write the observable histories of an ensemble.

    Parameters
    ----------
    args : argparse.Namespace
        ``ensemble``, ``fmt``, ``out`` (None: :func:`default_output`), ``observables``, ``force``.

    Returns
    -------
    int
        Exit status 0.
    """
    path = Path(args.ensemble)
    out = Path(args.out) if args.out else default_output(path, args.fmt)
    _check_name(out, args.fmt)
    if (out.exists() or out.is_symlink()) and not args.force:
        raise JobError(f"{out}: exists; use --force to replace")
    if not out.parent.is_dir():
        raise JobError(f"-o {out}: directory {out.parent} does not exist")
    if out.resolve() == path.resolve():
        raise JobError(f"-o {out}: is the ensemble itself")
    h = read_histories(path, args.observables)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.export.tmp")
    try:
        WRITERS[args.fmt](h, tmp, out)
        _place(tmp, out, args.force)
    finally:
        if tmp.exists():
            tmp.unlink()
    n_chains = int(np.unique(h.markov["chain"]).size)
    n = int(h.markov["chain"].size)
    print(f"{out}: {args.fmt}, {len(h.observables)} observable(s), {n} rows in {n_chains} chain(s)")
    return 0


def export(args: argparse.Namespace) -> int:
    """``latflow export``: observable histories (this module) or configurations (:mod:`jobs.configfiles`).

    Checks the options that belong to the other kind of export and fills in the configuration defaults
    (``--precision 64``); returns the exit status.
    """
    from .configfiles import CONFIG_FORMATS, export_configurations

    allowed = ", ".join((*OBSERVABLE_FORMATS, *CONFIG_FORMATS))
    if args.fmt in CONFIG_FORMATS:
        if args.observables is not None:
            raise JobError(f"--observables: only with --format {'|'.join(OBSERVABLE_FORMATS)}, not {args.fmt}")
        if args.out is None:
            raise JobError(f"--format {args.fmt}: -o FILE is required (with several rows containing {{row}})")
        if args.precision is None:
            args.precision = 64
        return export_configurations(args)
    if args.fmt not in OBSERVABLE_FORMATS:
        raise JobError(f"--format {args.fmt!r}: unknown; allowed: {allowed}")
    given = [
        opt
        for opt, value in (("--rows", args.rows), ("--row", args.row), ("--precision", args.precision))
        if value is not None
    ]
    if args.two_rows:
        given.append("--two-rows")
    if given:
        raise JobError(f"{given[0]}: only with --format {'|'.join(CONFIG_FORMATS)}, not {args.fmt}")
    return export_observables(args)
