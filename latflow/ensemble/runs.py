"""Weighted ensembles (annealing samplers): per-run datasets under ``annealing/`` and their ``log Z``.

An annealing run (SMC, AIS, ...) is one "chain" of rows: ``markov/chain`` is the run id,
``markov/step`` the particle index, ``weights/log_w`` the particle's final log weight within its run.
Each run also has one entry in every per-run dataset ``annealing/<name>`` (``log_z``, ``ess``,
``n_particles``, ``chain`` and whatever else the sampler records), committed together with its rows.
:func:`combine_log_z` is the one place that combines the runs' ``log Z`` estimates.
"""

from __future__ import annotations

from collections.abc import Mapping

import h5py
import numpy as np

RUN_GROUP = "annealing"
#: Per-run datasets every weighted ensemble holds (ENSEMBLE_FORMAT.md, "Weighted ensembles").
RUN_REQUIRED: tuple[str, ...] = ("annealing/log_z", "annealing/ess", "annealing/n_particles", "annealing/chain")
RUN_DESCRIPTIONS: dict[str, str] = {
    "annealing/log_z": (
        "log of the run's unbiased estimate of Z (compact fields under the Haar probability measure, real fields "
        "under Lebesgue measure)"
    ),
    "annealing/ess": "ESS fraction (sum w)^2 / (N sum w^2) of the run's final particle population",
    "annealing/n_particles": "number of particles N of the run (its rows)",
    "annealing/chain": "the run id: markov/chain of the run's rows",
    "annealing/ess_min": "smallest ESS fraction of the run's population along the anneal, before resampling",
    "annealing/n_resample": "number of times the run's population was resampled",
    "annealing/n_transitions": "number of annealing transitions of the run",
}


def combine_log_z(run_log_z: np.ndarray) -> tuple[float, float]:
    """Combine unbiased per-run estimates of ``Z`` into ``log Z`` and its standard error.

    ``log_z = log mean_r exp(log Z_r)`` (the mean of unbiased estimates of ``Z`` is unbiased), and
    ``log_z_err = std(Z_r) / (sqrt(R) mean(Z_r))`` (the delta-method error of the log of the mean,
    ``std`` with ``R - 1`` degrees of freedom), both computed in log space so that ``log Z_r`` of any
    size neither overflows nor underflows.

    Parameters
    ----------
    run_log_z : np.ndarray
        ``log Z_r`` of each run, shape ``(R,)``; ``-inf`` is a run whose weights all vanished.

    Returns
    -------
    log_z : float
        NaN for ``R = 0`` or when any entry is NaN or ``+inf``.
    log_z_err : float
        NaN for ``R < 2``.
    """
    lz = np.asarray(run_log_z, dtype=np.float64).reshape(-1)
    if lz.size == 0 or np.any(np.isnan(lz)) or np.any(lz == np.inf):
        return float("nan"), float("nan")
    top = float(lz.max())
    if top == -np.inf:
        return -np.inf, float("nan")
    z = np.exp(lz - top)  # in (0, 1], the largest is 1
    mean = float(z.mean())
    log_z = top + float(np.log(mean))
    if lz.size < 2:
        return log_z, float("nan")
    err = float(z.std(ddof=1)) / (np.sqrt(lz.size) * mean)
    return log_z, err


def committed_runs(n_runs_attr: int, n_particles: np.ndarray, n_committed: int) -> int:
    """Runs committed when ``n_committed`` rows are: the first ``k <= n_runs_attr`` runs whose rows all are.

    Every row belongs to one run and runs are appended in order with their rows, so run ``r`` ends at
    row ``sum(n_particles[:r + 1])``. ``n_runs_committed`` is raised together with the checksums, one
    flush before ``n_committed``; a writer killed in between leaves it ahead, and this clamps it back.

    Parameters
    ----------
    n_runs_attr : int
        The root attribute ``n_runs_committed``.
    n_particles : np.ndarray
        ``annealing/n_particles``, shape ``(>= n_runs_attr,)``.
    n_committed : int
        The root attribute ``n_committed``.

    Returns
    -------
    int
    """
    k = max(0, min(int(n_runs_attr), int(np.shape(n_particles)[0])))
    if k == 0:
        return 0
    stops = np.cumsum(np.asarray(n_particles[:k], dtype=np.int64))
    return int(np.searchsorted(stops, int(n_committed), side="right"))


def run_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """Datasets directly under ``annealing/``, keyed ``"annealing/name"``, in sorted order."""
    grp = f.get(RUN_GROUP)
    if not isinstance(grp, h5py.Group):
        return {}
    out: dict[str, h5py.Dataset] = {}
    for name in sorted(grp.keys()):
        obj = grp.get(name)
        if isinstance(obj, h5py.Dataset):
            out[f"{RUN_GROUP}/{name}"] = obj
    return out


def check_runs_against_rows(
    runs: Mapping[str, np.ndarray], chain: np.ndarray, first_row: int = 0, *, what: str = "runs"
) -> list[str]:
    """Problems with per-run arrays against the rows they describe (``[]``: consistent).

    Parameters
    ----------
    runs : mapping of str to np.ndarray
        ``annealing/chain`` and ``annealing/n_particles`` (shape ``(R,)``) at least.
    chain : np.ndarray
        ``markov/chain`` of exactly these runs' rows, shape ``(n,)``, runs in order.
    first_row : int
        Row number of ``chain[0]`` (for messages only).
    what : str
        What the runs are, for messages.

    Returns
    -------
    list of str
    """
    ids = np.asarray(runs["annealing/chain"]).reshape(-1)
    counts = np.asarray(runs["annealing/n_particles"]).reshape(-1)
    chain = np.asarray(chain).reshape(-1)
    if ids.shape != counts.shape:
        return [f"{what}: annealing/chain and annealing/n_particles differ in length"]
    if np.any(counts < 1):
        return [f"{what}: annealing/n_particles must be >= 1"]
    if int(counts.sum()) != chain.size:
        return [f"{what}: n_particles sum to {int(counts.sum())}, but there are {chain.size} rows"]
    if ids.size > 1 and np.any(np.diff(ids) <= 0):
        return [f"{what}: annealing/chain must be strictly increasing"]
    expected = np.repeat(ids, counts)
    bad = np.flatnonzero(np.sort(chain, kind="stable") != expected)
    if bad.size:
        return [f"{what}: markov/chain of rows from {first_row} does not match annealing/chain and n_particles"]
    return []
