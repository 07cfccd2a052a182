"""Estimates from weighted ensembles: populations of annealing runs (SMC, AIS, ...) with per-run ``log Z``.

Run ``r`` holds particles ``O_ri`` with final log weights ``log w_ri`` (normalised within the run to
``W_ri = w_ri / sum_i w_ri``) and an unbiased estimate ``Z_r`` of the partition function. The runs are
combined with their ``Z`` estimates,

    O = sum_r Z_r sum_i W_ri O_ri / sum_r Z_r,

a ratio of unbiased estimators of ``Z <O>`` and ``Z``, hence consistent as the number of runs grows
at fixed particle number (an average of the runs' self-normalised estimates is not: each carries a
bias ``O(1/N)``). Errors:

- ``"runs"`` (two or more runs): delete-one-run jackknife of the ratio estimator (and of any function
  of such means), which takes every correlation between the particles of a run into account;
- ``"ess"`` (one run): the self-normalised importance-sampling delta-method error
  ``sqrt(sum_i W_i^2 (O_i - O)^2)``, which treats the particles as independent draws and therefore
  ignores the correlations that resampling introduces between them (an underestimate after resampling).

``log Z`` itself is combined by :func:`latflow.ensemble.combine_log_z`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["WeightedResult", "weighted_estimate", "weighted_estimate_derived"]


@dataclass(frozen=True)
class WeightedResult:
    """A weighted-ensemble estimate of one (primary or derived) observable.

    Attributes
    ----------
    mean : float
        The ratio estimate (or ``func`` of the primaries' ratio estimates).
    err : float
        Its statistical error.
    method : str
        ``"runs"`` (jackknife over runs) or ``"ess"`` (single-run delta method).
    n : int
        Particles over all runs.
    n_runs : int
        Runs.
    """

    mean: float
    err: float
    method: str
    n: int
    n_runs: int

    def as_dict(self) -> dict:
        """``{"mean", "err", "method", "n", "n_runs"}`` as plain Python numbers."""
        return {
            "mean": float(self.mean),
            "err": float(self.err),
            "method": self.method,
            "n": int(self.n),
            "n_runs": int(self.n_runs),
        }


def _normalised(log_w: np.ndarray) -> np.ndarray:
    """``softmax(log_w)``, shape ``(N,)``; all zero when every weight vanishes."""
    top = float(np.max(log_w))
    if top == -np.inf:
        return np.zeros_like(log_w)
    w = np.exp(log_w - top)
    return w / w.sum()


def _prepare(
    columns: Sequence[np.ndarray],
    chain: np.ndarray,
    log_w: np.ndarray,
    run_log_z: np.ndarray,
    run_chain: np.ndarray | None,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Checked inputs: values ``(n, k)``, row indices and weights ``W`` of each run, run weights ``Z_r / sum Z``."""
    chain = np.asarray(chain).reshape(-1)
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    x = np.stack([np.asarray(c, dtype=np.float64).reshape(-1) for c in columns], axis=1)
    lz = np.asarray(run_log_z, dtype=np.float64).reshape(-1)
    if not (x.shape[0] == chain.size == lw.size):
        raise ValueError(f"values ({x.shape[0]}), chain ({chain.size}) and log_w ({lw.size}) differ in length")
    if chain.size == 0:
        raise ValueError("no particles")
    if np.any(np.isnan(lw)) or np.any(lw == np.inf):
        raise ValueError("log_w contains NaN or +inf")
    if np.any(np.isnan(lz)) or np.any(lz == np.inf):
        raise ValueError("run_log_z contains NaN or +inf")
    ids = np.unique(chain) if run_chain is None else np.asarray(run_chain).reshape(-1)
    if ids.size != lz.size:
        raise ValueError(f"{lz.size} run log Z values for {ids.size} runs")
    rows = [np.flatnonzero(chain == c) for c in ids]
    if any(r.size == 0 for r in rows) or sum(r.size for r in rows) != chain.size:
        raise ValueError("the rows' chain ids are not exactly the runs' ids")
    if not np.all(np.isfinite(x)):
        raise ValueError("values contain NaN or inf")
    weights = [_normalised(lw[r]) for r in rows]
    if np.all(lz == -np.inf):
        raise ValueError("every run has Z = 0 (log Z = -inf)")
    a = np.exp(lz - lz.max())
    for r, w in enumerate(weights):
        if not w.any():
            a[r] = 0.0  # a run whose weights all vanished carries no information
    if not a.any():
        raise ValueError("no run has a non-zero weight")
    return x, rows, weights, a


def _gradient(func: Callable[..., float], m: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Central finite-difference gradient of ``func(*m)``, shape ``(k,)``."""
    g = np.empty(m.size)
    for k in range(m.size):
        up, dn = m.copy(), m.copy()
        up[k] += step[k]
        dn[k] -= step[k]
        g[k] = (float(func(*up)) - float(func(*dn))) / (2.0 * step[k])
    return g


def weighted_estimate_derived(
    func: Callable[..., float],
    columns: Sequence[np.ndarray],
    chain: np.ndarray,
    log_w: np.ndarray,
    run_log_z: np.ndarray,
    *,
    run_chain: np.ndarray | None = None,
) -> WeightedResult:
    """Estimate of ``func`` of the means of primaries from a weighted ensemble, with its error.

    Parameters
    ----------
    func : callable
        ``func(*means) -> float``.
    columns : sequence of np.ndarray
        One primary per entry, each ``(n,)``: its value on every particle.
    chain : np.ndarray
        Run id of every particle, ``(n,)`` (``markov/chain``).
    log_w : np.ndarray
        Final log weight of every particle within its run, ``(n,)`` (``weights/log_w``), unnormalised.
    run_log_z : np.ndarray
        ``log Z_r`` of each run, ``(R,)``, in the order of ``run_chain``.
    run_chain : np.ndarray, optional
        Run id of each entry of ``run_log_z``, ``(R,)`` (``annealing/chain``); default: the sorted
        distinct values of ``chain``.

    Returns
    -------
    WeightedResult
        ``method`` ``"runs"`` (delete-one-run jackknife) for ``R >= 2``, ``"ess"`` (delta method
        with the normalised weights) for one run.

    Raises
    ------
    ValueError
        Inconsistent lengths, NaN values or weights, runs without particles.
    """
    x, rows, weights, a = _prepare(columns, chain, log_w, run_log_z, run_chain)
    n_runs = len(rows)
    per_run = np.stack([w @ x[r] for w, r in zip(weights, rows, strict=True)])  # (R, k)
    mean = (a @ per_run) / a.sum()
    value = float(func(*mean))
    if n_runs == 1:
        w, d = weights[0], x[rows[0]] - mean  # (N,), (N, k)
        sd = np.sqrt((w[:, None] * d**2).sum(axis=0))
        step = np.maximum(np.maximum(0.01 * np.sqrt((w[:, None] ** 2 * d**2).sum(axis=0)), 1e-8 * np.abs(mean)), 1e-300)
        step = np.where(sd > 0, step, 1.0)
        g = _gradient(func, mean, step)
        err = float(np.sqrt(np.sum(w**2 * (d @ g) ** 2)))
        return WeightedResult(value, err, "ess", int(x.shape[0]), 1)
    jack = np.empty(n_runs)
    total, weighted_sum = a.sum(), a @ per_run
    for j in range(n_runs):
        rest = total - a[j]
        jack[j] = float(func(*((weighted_sum - a[j] * per_run[j]) / rest))) if rest > 0 else np.nan
    err = float(np.sqrt((n_runs - 1) / n_runs * np.sum((jack - jack.mean()) ** 2)))
    return WeightedResult(value, err, "runs", int(x.shape[0]), n_runs)


def weighted_estimate(
    values: np.ndarray,
    chain: np.ndarray,
    log_w: np.ndarray,
    run_log_z: np.ndarray,
    *,
    run_chain: np.ndarray | None = None,
) -> tuple[float, float, str]:
    """Mean of an observable over a weighted ensemble, its error and how the error was obtained.

    Parameters
    ----------
    values : np.ndarray
        The observable on every particle, ``(n,)``.
    chain : np.ndarray
        Run id of every particle, ``(n,)``.
    log_w : np.ndarray
        Final log weight of every particle within its run, ``(n,)``.
    run_log_z : np.ndarray
        ``log Z_r`` of each run, ``(R,)``, in the order of ``run_chain`` (default: sorted run ids).
    run_chain : np.ndarray, optional
        Run id of each entry of ``run_log_z``, ``(R,)``.

    Returns
    -------
    mean : float
        ``sum_r Z_r sum_i W_ri O_ri / sum_r Z_r``.
    err : float
        Jackknife over runs (``R >= 2``) or ``sqrt(sum_i W_i^2 (O_i - O)^2)`` (one run).
    method : str
        ``"runs"`` or ``"ess"``.
    """
    res = weighted_estimate_derived(lambda m: m, [values], chain, log_w, run_log_z, run_chain=run_chain)
    return res.mean, res.err, res.method
