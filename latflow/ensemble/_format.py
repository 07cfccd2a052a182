"""The format's root attributes and per-row groups: constants, checks, and the metadata they describe."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .meta import EnsembleError, EnsembleMeta

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
#: Present when configurations are stored only every ``save_every`` steps: ``fields/row[j]`` is the
#: row (of markov/, weights/, observables/) that stored configuration ``j`` belongs to.
FIELD_INDEX = "fields/row"


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


def _committed_rows(datasets: Mapping[str, h5py.Dataset], n: int) -> dict[str, int]:
    """Committed rows of each per-row dataset when ``n`` rows are committed.

    ``n`` for every dataset, except the ``fields/*`` datasets of a file with a ``fields/row``
    index: those hold the configurations of the committed rows that were stored, i.e. as many as
    ``fields/row`` has entries ``< n`` (entries of an interrupted commit are ``>= n``).
    """
    idx = datasets.get(FIELD_INDEX)
    m = n
    if idx is not None and idx.ndim == 1:
        m = int(np.count_nonzero(idx[:] < n))
    return {name: (m if name.startswith("fields/") else n) for name in datasets}


def _common_length(datasets: Mapping[str, h5py.Dataset]) -> int:
    indexed = FIELD_INDEX in datasets  # then fields/* have their own (shorter) row axis
    lengths = [
        ds.shape[0] for name, ds in datasets.items() if ds.ndim >= 1 and not (indexed and name.startswith("fields/"))
    ]
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
        storage=_storage_from_attrs(attrs),
    )


def _storage_from_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``storage`` root attribute (JSON object) as a dict; ``{}`` where absent or malformed."""
    raw = attrs.get("storage")
    try:
        obj = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        obj = None
    return obj if isinstance(obj, dict) else {}
