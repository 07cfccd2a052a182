"""Topological-sector check: observed charges against an exact charge distribution ``P(Q)``.

A flow trained by reverse KL is mode seeking: it can learn the ``Q = 0`` sector well and never propose
``|Q| >= 2``. Reweighting or an independence Metropolis chain cannot repair a sector that is never
proposed, and the chain's own error bars do not show it. Comparing the charges of the raw (unweighted)
proposals, or of the chain, with the exact ``P(Q)`` (e.g. ``theories.u1.exact_q_distribution``) does:
a dropped sector shows as a *missing mass* (the exact probability of the sectors never seen) and as a
large chi2. For raw proposals the test is against the flow's own distribution, so a passing chi2 says the
flow has learnt the sector weights; the missing mass is the part of the target it cannot reach at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2 as chi2_distribution

__all__ = ["SectorCheck", "sector_check"]


@dataclass(frozen=True)
class SectorCheck:
    """Per-sector counts of charges against exact probabilities (see :func:`sector_check`).

    Attributes
    ----------
    q : np.ndarray
        Sectors ``[K]`` (int64): the exact table's ``Q`` values plus any observed ``Q`` outside it.
    observed : np.ndarray
        Observed counts ``[K]`` (weighted counts scaled to ``n_eff`` when weights are given).
    expected : np.ndarray
        Expected counts ``n_eff P(Q)`` ``[K]``.
    z : np.ndarray
        Binomial z-score per sector ``(observed - n_eff P) / sqrt(n_eff P (1 - P))`` ``[K]``; ``inf`` where
        ``P = 0`` and the sector was seen, ``nan`` where ``P = 0`` and it was not.
    chi2 : float
        Pearson chi2 over the sectors with expected count ``>= 5``, the others pooled into one bin
        (see :func:`sector_check`).
    dof : int
        Number of bins minus one.
    p_value : float
        ``P(chi2_dof >= chi2)``; 1.0 when ``dof = 0``.
    missing_mass : float
        Exact probability of the sectors never seen, ``1 - sum_{Q seen} P(Q)``.
    expected_missing_mass : float
        Its mean for ``n_eff`` independent exact draws, ``sum_Q P(Q) (1 - P(Q))^n_eff``.
    n_eff : float
        Number of draws (Kish effective sample size ``(sum w)^2 / sum w^2`` with weights).
    """

    q: np.ndarray
    observed: np.ndarray
    expected: np.ndarray
    z: np.ndarray
    chi2: float
    dof: int
    p_value: float
    missing_mass: float
    expected_missing_mass: float
    n_eff: float

    def summary(self) -> str:
        """One line, e.g. ``"sectors Q = -3..3 seen (7), chi2/dof 1.10 (dof 4), p 0.35; missing mass 0.004"``."""
        seen = self.q[self.observed > 0]
        lo, hi = (int(seen.min()), int(seen.max())) if seen.size else (0, -1)
        seen_txt = f"sectors Q = {lo}..{hi} seen ({seen.size})" if seen.size else "no sectors seen"
        ratio = self.chi2 / self.dof if self.dof > 0 else float("nan")
        return (
            f"{seen_txt}, chi2/dof {ratio:.2f} (dof {self.dof}), p {self.p_value:.3g}; "
            f"missing mass {self.missing_mass:.3g} (expected {self.expected_missing_mass:.2g})"
        )


def sector_check(
    q: np.ndarray,
    probs: tuple[np.ndarray, np.ndarray],
    *,
    weights: np.ndarray | None = None,
) -> SectorCheck:
    """Compare observed topological charges with an exact distribution ``P(Q)``.

    Charges are rounded to the nearest integer first (the geometric charge is an integer up to rounding).
    Sectors with expected count ``>= 5`` enter the chi2 one by one; all other sectors, including every
    ``Q`` outside the table and the probability ``1 - sum P`` the table leaves out, are pooled into one
    bin. Where that pool expects fewer than 5 draws, the smallest single-sector bins are moved into it
    until it expects at least 5 (so that the chi2 distribution applies to every bin); a pool that expects
    nothing is kept only if a draw fell into it (an impossible sector: chi2 = inf). The p-value assumes independent
    draws: for a Markov chain pass every ``2 tau_int``-th charge (or expect a small p from autocorrelation
    alone). The missing mass needs no such care: a flow that never proposes ``|Q| >= 2`` leaves
    ``P(|Q| >= 2)`` missing however long it runs, while independent exact draws leave about
    :attr:`SectorCheck.expected_missing_mass`.

    Parameters
    ----------
    q : np.ndarray
        Charges ``[N]`` of the raw (unweighted) proposals of a sampler, or of a chain.
    probs : tuple[np.ndarray, np.ndarray]
        ``(Q values [K], P(Q) [K])``, e.g. from ``theories.u1.exact_q_distribution``.
    weights : np.ndarray, optional
        Importance weights ``[N]`` (``>= 0``, not log weights): the counts are weighted, scaled to the Kish
        effective sample size, and the chi2 is then approximate.

    Returns
    -------
    SectorCheck
    """
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    if q.size == 0:
        raise ValueError("sector_check needs at least one charge")
    if not np.all(np.isfinite(q)):
        raise ValueError("charges contain NaN or inf")
    q_int = np.rint(q).astype(np.int64)
    table_q = np.asarray(probs[0]).astype(np.int64).reshape(-1)
    table_p = np.asarray(probs[1], dtype=np.float64).reshape(-1)
    if table_q.shape != table_p.shape or np.unique(table_q).size != table_q.size:
        raise ValueError("probs must be (distinct Q values [K], P(Q) [K])")
    if np.any(table_p < 0) or table_p.sum() > 1 + 1e-9:
        raise ValueError(f"P(Q) must be >= 0 with sum <= 1, got sum {table_p.sum()}")

    if weights is None:
        w = np.ones_like(q)
        n_eff = float(q.size)
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != q.shape or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise ValueError("weights must be finite, >= 0, not all zero, one per charge")
        n_eff = float(w.sum() ** 2 / np.sum(w * w))

    sectors = np.union1d(table_q, q_int)
    p = np.zeros(sectors.size)
    p[np.searchsorted(sectors, table_q)] = table_p
    obs = np.zeros(sectors.size)
    np.add.at(obs, np.searchsorted(sectors, q_int), w)
    obs *= n_eff / w.sum()
    exp = n_eff * p
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (obs - exp) / np.sqrt(exp * (1.0 - p))

    big = exp >= 5.0
    # the pool must itself expect >= 5 draws (or none at all): merge the smallest bins into it
    while np.any(big) and 0 < n_eff * (1.0 - float(p[big].sum())) < 5.0:
        big[np.flatnonzero(big)[np.argmin(exp[big])]] = False
    obs_bins = list(obs[big])
    exp_bins = list(exp[big])
    pooled_exp = n_eff * max(0.0, 1.0 - float(p[big].sum()))
    pooled_obs = float(obs[~big].sum())
    if pooled_exp > 0 or pooled_obs > 0:
        obs_bins.append(pooled_obs)
        exp_bins.append(pooled_exp)
    o, e = np.asarray(obs_bins), np.asarray(exp_bins)
    dof = max(0, o.size - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = float(np.sum(np.where(e > 0, (o - e) ** 2 / e, np.where(o > 0, np.inf, 0.0))))
    p_value = float(chi2_distribution.sf(chi2, dof)) if dof > 0 else 1.0

    seen = obs > 0
    missing = max(0.0, 1.0 - float(p[seen].sum()))
    with np.errstate(divide="ignore"):
        expected_missing = float(np.sum(table_p * np.exp(n_eff * np.log1p(-table_p))))
    expected_missing += max(0.0, 1.0 - float(table_p.sum()))
    return SectorCheck(
        q=sectors,
        observed=obs,
        expected=exp,
        z=z,
        chi2=chi2,
        dof=dof,
        p_value=p_value,
        missing_mass=missing,
        expected_missing_mass=expected_missing,
        n_eff=n_eff,
    )
