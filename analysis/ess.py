"""Effective sample size, reweighting log-weights and acceptance rates."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

__all__ = ["ess", "reweighting_log_w", "acceptance_rate"]


def ess(log_w: np.ndarray) -> float:
    """Effective sample size per configuration of importance weights.

    ``ESS = (sum_i w_i)^2 / (N sum_i w_i^2)``, computed in log space so that log
    weights of any size (e.g. ``1e4``) neither overflow nor underflow. The value
    is invariant under a constant shift of ``log_w`` and lies in ``(0, 1]``: 1 for
    equal weights, ``1/N`` for one dominant weight.

    Parameters
    ----------
    log_w : np.ndarray
        Log importance weights, shape ``(N,)``; ``-inf`` entries are zero weights.

    Returns
    -------
    float
        Effective sample size divided by ``N``.

    Raises
    ------
    ValueError
        Empty input, NaN or ``+inf`` entries, or all weights zero.
    """
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    if lw.size == 0:
        raise ValueError("ess needs at least one weight")
    if np.any(np.isnan(lw)) or np.any(lw == np.inf):
        raise ValueError("log weights contain NaN or +inf")
    if np.all(lw == -np.inf):
        raise ValueError("all weights are zero (log_w = -inf)")
    lw = lw - lw.max()  # shift invariance; keeps both log-sums O(log N) for accuracy
    log_ess = 2.0 * logsumexp(lw) - logsumexp(2.0 * lw) - np.log(lw.size)
    return float(min(np.exp(log_ess), 1.0))


def reweighting_log_w(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Log importance weights of proposals ``q`` for the target ``p``.

    Parameters
    ----------
    log_p : np.ndarray
        Unnormalised log target density (``-S``), shape ``(N,)``.
    log_q : np.ndarray
        Log density of the proposal that produced each sample, shape ``(N,)``.

    Returns
    -------
    np.ndarray
        ``log_p - log_q``, shape ``(N,)``, float64.
    """
    lp = np.asarray(log_p, dtype=np.float64)
    lq = np.asarray(log_q, dtype=np.float64)
    if lp.shape != lq.shape:
        raise ValueError(f"log_p has shape {lp.shape}, log_q has shape {lq.shape}")
    return lp - lq


def acceptance_rate(accepted: np.ndarray) -> float:
    """Fraction of accepted proposals.

    Parameters
    ----------
    accepted : np.ndarray
        Accept flags (bool or 0/1), shape ``(N,)``.

    Returns
    -------
    float
        Mean of ``accepted`` in ``[0, 1]``.
    """
    acc = np.asarray(accepted).reshape(-1)
    if acc.size == 0:
        raise ValueError("acceptance_rate needs at least one entry")
    return float(np.mean(acc.astype(np.float64)))
