"""``latflow export`` and ``latflow import``: SU(3) ensembles to and from ILDG, NERSC and openQCD files.

Both commands check everything before they write anything: ``export`` refuses a damaged ensemble,
a field that is not SU(3) and any existing output file (without ``--force``); ``import`` reads and
verifies every file (format, checksums, header plaquette, SU(3), one lattice shape) before it
creates the ensemble. Mistakes are :class:`~jobs.config.JobError` or
:class:`~latflow.ensemble.EnsembleError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from latflow.configio import ConfigurationError, read_configuration, write_configuration
from latflow.ensemble import EnsembleError, EnsembleMeta, EnsembleReader, EnsembleWriter, require_hdf5_file, verify

from .config import JobError

log = logging.getLogger("latflow")
IMPORT_THEORIES = ("su3",)
#: configuration formats of ``latflow export`` (observable histories: :mod:`jobs.exports`)
CONFIG_FORMATS = ("ildg", "nersc", "openqcd")


def _parse_rows(text: str | None, row: int | None, n: int, path: str) -> range:
    """Stored-configuration indices selected by ``--rows START:STOP[:STEP]`` or ``--row i`` (all if neither)."""
    if row is not None:
        i = row + n if row < 0 else row
        if not 0 <= i < n:
            raise JobError(f"{path}: --row {row} is out of range: the ensemble stores {n} configurations")
        return range(i, i + 1)
    if text is None:
        return range(n)
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        values = [int(p) if p.strip() else None for p in parts]
        sel = range(n)[slice(*values)]
    except ValueError:
        raise JobError(f"--rows {text!r}: expected START:STOP[:STEP] with integers, e.g. 0:10:2") from None
    if len(sel) == 0:
        raise JobError(f"{path}: --rows {text} selects no configuration of the {n} stored")
    return sel


def _out_paths(template: str, rows: range) -> list[Path]:
    if len(rows) > 1 and "{row}" not in template:
        raise JobError(f"-o {template}: {len(rows)} rows are selected, so the name must contain {{row}}")
    try:
        return [Path(template.format(row=r)) for r in rows]
    except (KeyError, IndexError, ValueError) as exc:
        raise JobError(f"-o {template}: bad name pattern ({exc}); only {{row}} may be used") from None


def export_configurations(args: argparse.Namespace) -> int:
    """``latflow export``: write the selected configurations of an SU(3) ensemble, one file each."""
    path = Path(args.ensemble)
    require_hdf5_file(path)
    problems = verify(path)
    if problems:
        raise EnsembleError(f"{path}: damaged, not exported: {problems[0]}")
    with EnsembleReader(path) as r:
        if not r.has("fields/links"):
            raise JobError(f"{path}: has no fields/links: only gauge ensembles can be exported")
        n = _n_stored(r)
        rows = _parse_rows(args.rows, args.row, n, str(path))
        outs = _out_paths(args.out, rows)
        if not args.force:
            existing = [str(p) for p in outs if p.exists() or p.is_symlink()]
            if existing:
                more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
                raise JobError(f"{existing[0]}{more}: exists; use --force to replace")
        for p in outs:
            if not p.parent.is_dir():
                raise JobError(f"{p}: directory {p.parent} does not exist")
        links = r.read("fields/links", slice(rows.start, rows.stop, rows.step))
        beta = r.couplings.get("beta")
        theory, shape = r.theory, tuple(r.lattice_shape)
    if links.dtype.kind != "c" or links.shape[-2:] != (3, 3) or links.shape[1] != len(shape):
        raise JobError(
            f"{path}: fields/links {list(links.shape[1:])} {links.dtype} are not SU(3) links "
            f"[d, L0, ..., 3, 3] (theory {theory!r})"
        )
    for k, (row, out) in enumerate(zip(rows, outs)):
        try:
            info = write_configuration(
                out,
                links[k],
                args.fmt,
                beta=float(beta) if isinstance(beta, (int, float)) else None,
                force=args.force,
                precision=args.precision,
                two_rows=args.two_rows,
                ensemble_id=path.stem,
                sequence_number=row,
                description=f"row {row} of {path.name} (theory {theory}, lattice {'x'.join(map(str, shape))})",
            )
        except ConfigurationError as exc:
            raise JobError(f"{exc} (row {row} of {path})") from None
        print(f"{out}: row {row}, {args.fmt}, {'x'.join(map(str, info['file_shape']))}, {info['bytes']} bytes")
    return 0


def _n_stored(r: EnsembleReader) -> int:
    """Number of committed stored configurations (``fields/*`` may hold every save_every-th: ``fields/row``)."""
    return len(r.read("fields/row")) if r.has("fields/row") else int(r.n_committed)


def _couplings(args: argparse.Namespace, infos: list[dict[str, Any]]) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in args.overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in ("theory.beta", "theory.n"):
            raise JobError(f"--set {item!r}: import takes theory.beta=VALUE (and theory.n=3)")
        try:
            values[key.split(".", 1)[1]] = float(text)
        except ValueError:
            raise JobError(f"--set {item!r}: {text!r} is not a number") from None
    if args.beta is not None:
        if "beta" in values and values["beta"] != args.beta:
            raise JobError(f"--beta {args.beta} and --set theory.beta={values['beta']} disagree")
        values["beta"] = args.beta
    if values.get("n", 3.0) != 3.0:
        raise JobError(f"theory.n = {values['n']:g}: the configuration formats hold SU(3) only")
    if "beta" not in values:
        stated = {info["beta"] for info in infos}
        if len(stated) != 1 or None in stated:
            raise JobError(
                "import needs the gauge coupling: --set theory.beta=VALUE or --beta VALUE "
                f"(the files record {sorted(str(b) for b in stated)})"
            )
        values["beta"] = float(stated.pop())
    return {"beta": float(values["beta"]), "n": 3}


def import_configurations(args: argparse.Namespace) -> int:
    """``latflow import``: an ensemble with one row per configuration file."""
    import torch

    from latflow.lattice import Lattice
    from latflow.theories.su3 import SUNGaugeAction, SUNParams

    from .runner import dataset_attrs, measure

    if args.theory not in IMPORT_THEORIES:
        raise JobError(f"--theory {args.theory!r}: import makes SU(3) gauge ensembles: --theory su3")
    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.force:
        raise EnsembleError(f"{out}: ensemble exists; use --force to replace")
    fields: list[np.ndarray] = []
    infos: list[dict[str, Any]] = []
    for name in args.files:
        try:
            links, info = read_configuration(name, args.fmt, ndim=args.ndim)
        except ConfigurationError as exc:
            raise JobError(str(exc)) from None
        if fields and links.shape != fields[0].shape:
            raise JobError(
                f"{name}: lattice {'x'.join(map(str, info['shape']))} differs from "
                f"{'x'.join(map(str, infos[0]['shape']))} of {infos[0]['path']}"
            )
        fields.append(links)
        infos.append(info)
    couplings = _couplings(args, infos)
    shape = infos[0]["shape"]
    theory = SUNGaugeAction(SUNParams(beta=couplings["beta"], n=3), Lattice(shape))
    x = torch.from_numpy(np.stack(fields))
    n = x.shape[0]
    with torch.no_grad():
        action = theory.action(x).numpy()
    rows: dict[str, np.ndarray] = {
        "fields/links": x.numpy(),
        "markov/chain": np.zeros(n, dtype=np.int64),
        "markov/step": np.arange(n, dtype=np.int64),
        "weights/log_p": -action,
        "weights/log_w": np.zeros(n),
    }
    rows.update(measure(theory, x))
    sampler = {
        "kind": "import",
        "n_samples": n,
        "files": [str(Path(i["path"]).resolve().name) for i in infos],
        "formats": sorted({i["format"] for i in infos}),
        "embedded_2d": bool(infos[0]["embedded_2d"]),
    }
    command = "latflow import " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    meta = EnsembleMeta(
        theory="su3",
        couplings=couplings,
        lattice_shape=tuple(shape),
        sampler=sampler,
        seed=0,
        job=command,
    )
    # built under a temporary name and moved into place complete: a failure leaves no file behind
    tmp = out.with_name(f".{out.name}.{os.getpid()}.import.tmp")
    try:
        writer = EnsembleWriter.create(tmp, meta, force=True, dataset_attrs=dataset_attrs(theory))
        try:
            writer.append(rows)
        finally:
            writer.close()
        if args.force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if the file appeared meanwhile
            except FileExistsError:
                raise EnsembleError(f"{out}: ensemble exists; use --force to replace") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    plaq = rows["observables/plaquette"]
    print(
        f"{out}: {n} configuration(s) imported ({', '.join(sampler['formats'])}), lattice "
        f"{'x'.join(map(str, shape))}, beta = {couplings['beta']:g}, plaquette {plaq.mean():.6f}"
    )
    return 0
