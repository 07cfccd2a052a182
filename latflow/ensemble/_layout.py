"""Layout of a new ensemble file: validated metadata, root attributes, row datasets and their chunks."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import latflow

from ._checkpoint import _ensure_checkpoint
from ._format import FIELD_INDEX, FORMAT_NAME, FORMAT_VERSION, ROW_GROUPS, _parse_shape
from ._h5 import _SHA_DTYPE, _UTC_DTYPE, _fixed, _le, _utc_now
from .meta import COMPRESSIONS, STORAGE_DEFAULTS, EnsembleMeta

_CHUNK_TARGET_BYTES = 64 * 1024  # rows per chunk chosen so a chunk is about this large
_CHUNK_MAX_BYTES = 256 * 1024 * 1024  # rows larger than this are chunked along inner axes too

_DESCRIPTIONS = {
    "fields/phi": "scalar field phi[i, x0, ..., x{d-1}]",
    "fields/links": (
        "gauge links links[i, mu, x0, ...] = U_mu(x) on the link x -> x + mu; "
        "U(1): angles in (-pi, pi]; SU(N): complex [..., N, N] matrices"
    ),
    "markov/chain": "stream id (one per independent chain or MPI rank)",
    "markov/step": (
        "Markov time within its chain (updates: trajectories or Metropolis steps), counted from the "
        "chain's start, thermalisation included: the first row of a fresh chain has step = the "
        "sampler's thermalization setting (HMC step-size tuning is not counted)"
    ),
    "markov/accepted": "proposal accepted (MCMC samplers)",
    "weights/log_p": (
        "-S, unnormalised log target density (dimensionless; S is the effective action where fermions "
        "are integrated out)"
    ),
    "weights/log_q": (
        "log density of the proposal that produced the row (flows: log q(x) of the configuration "
        "held by the chain, w.r.t. Lebesgue measure for real fields, Haar probability measure for links; 0 for HMC)"
    ),
    "weights/log_w": "log importance weight of the row (0 for plain MCMC)",
    "weights/proposal_log_w": (
        "flow samplers: log p(x') - log q(x') of the proposal x' drawn at this step, accepted or not "
        "(independent draws from q). p is unnormalised (log p = -S; pf-flow-mcmc: the joint link and "
        "pseudofermion density, normalised so that the mean of exp(proposal_log_w) estimates the same Z "
        "as the exact-determinant weights), so weights are used self-normalised; for the flow's "
        "reweighting ESS and the tail (Pareto k-hat) diagnostic"
    ),
    FIELD_INDEX: (
        "row (of markov/, weights/, observables/) that each stored configuration belongs to; present when "
        "configurations are stored every save_every steps (root attribute storage) while observables are "
        "measured at every step"
    ),
}
_ROOT_DESCRIPTION = (
    "latflow ensemble (format latflow-ensemble v1). Axis 0 of every dataset under fields/, markov/, "
    "weights/ and observables/ is the configuration index; only rows < n_committed belong to the "
    "ensemble. Rows of one chain (markov/chain) are in Markov order. Each fields/* dataset carries "
    "sha256: hex SHA-256 of the little-endian C-order bytes of its first sha256_rows rows "
    "(= its committed rows after a completed commit). Lattice axis 0 is time. With a fields/row "
    "dataset, fields/* hold only every save_every-th configuration of each chain: fields/row maps "
    "them to rows. The format is described in ENSEMBLE_FORMAT.md of the latflow repository."
)


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
    _validate_storage(meta)
    return couplings, sampler, shape, seed


def _validate_storage(meta: EnsembleMeta) -> None:
    if not isinstance(meta.storage, Mapping):
        raise TypeError("meta.storage must be a dict")
    unknown = sorted(set(meta.storage) - set(STORAGE_DEFAULTS))
    if unknown:
        raise ValueError(f"meta.storage has unknown key {unknown[0]!r}; allowed: {', '.join(STORAGE_DEFAULTS)}")
    st = meta.storage_settings
    every = st["save_every"]
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"meta.storage save_every must be a positive integer, got {every!r}")
    if st["compression"] not in COMPRESSIONS:
        raise ValueError(f"meta.storage compression must be one of {COMPRESSIONS}, got {st['compression']!r}")
    level = st["compression_level"]
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= 9:
        raise ValueError(f"meta.storage compression_level must be an integer in [0, 9], got {level!r}")


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


def _storage_array(key: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` in the dtype it is stored in: bool, int64, or its own float/complex dtype (little-endian)."""
    kind = arr.dtype.kind
    if key == "markov/accepted" and kind != "b":
        raise ValueError(f"{key}: must be bool, got {arr.dtype}")
    if key in ("markov/chain", "markov/step", FIELD_INDEX) and kind not in "iu":
        raise ValueError(f"{key}: must be integer, got {arr.dtype}")
    if (key.startswith(("markov/", "weights/")) or key == FIELD_INDEX) and arr.ndim != 1:
        raise ValueError(f"{key}: must have shape (n,), got {arr.shape}")
    if key.startswith("observables/") and arr.ndim not in (1, 2):
        raise ValueError(f"{key}: must have shape (n,) or (n, k), got {arr.shape}")
    if key.startswith("fields/") and key != FIELD_INDEX and arr.ndim < 2:
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
    a["storage"] = json.dumps(meta.storage_settings, sort_keys=True)
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


def _create_row_dataset(
    f: h5py.File,
    key: str,
    arr: np.ndarray,
    storage: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> h5py.Dataset:
    """Create the empty, resizable dataset ``key`` for rows like ``arr``.

    ``storage`` (the file's storage settings) decides the filters of ``fields/*`` datasets: with
    compression every configuration is its own chunk, so that a chunk is written once and never
    rewritten (a compressed chunk that grew would move, freeing file space under committed rows).
    ``attrs`` are set on the new dataset (e.g. ``description``, ``units``), over the built-in
    description.
    """
    group, name = key.split("/")
    grp = f.require_group(group)
    row_shape = tuple(arr.shape[1:])
    st = {**STORAGE_DEFAULTS, **dict(storage or {})}
    filters: dict[str, Any] = {}
    chunks = _chunk_shape(row_shape, arr.dtype.itemsize)
    if group == "fields" and key != FIELD_INDEX and st["compression"] != "none":
        chunks = (1, *chunks[1:])
        filters = {"compression": st["compression"], "shuffle": True}
        if st["compression"] == "gzip":
            filters["compression_opts"] = int(st["compression_level"]) or 4
    ds = grp.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=arr.dtype,
        chunks=chunks,
        **filters,
    )
    if key in _DESCRIPTIONS:
        ds.attrs["description"] = _DESCRIPTIONS[key]
    for attr, value in (attrs or {}).items():
        ds.attrs[attr] = value
    if group == "fields":
        ds.attrs.create("sha256", _fixed(hashlib.sha256().hexdigest(), _SHA_DTYPE))
        ds.attrs.create("sha256_rows", np.int64(0))
    return ds
