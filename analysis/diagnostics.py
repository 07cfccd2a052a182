"""Diagnostics that say when a Monte Carlo error cannot be trusted.

The Gamma method (:mod:`latflow.analysis.gamma`) returns an error for any series; these checks
say when that error is only a lower bound or meaningless:

* the automatic window reached its cap ``W_max - 1`` (``max_r N_r / 2 - 1``): ``tau_int`` and
  the error are then lower bounds (Wolff, hep-lat/0306017, sec. 3.3);
* a chain is shorter than :data:`MIN_CHAIN_TAU` times ``tau_int``: the autocorrelation
  function is not sampled well enough for the window procedure to be reliable;
* the observable never changes in some chain (frozen, e.g. a topological charge that never
  tunnels): that chain carries no information on the fluctuations;
* independence samplers (flow-MCMC) with few accepted proposals: a chain with ``A`` accepted
  proposals holds at most ``A + 1`` distinct configurations;
* heavy-tailed importance weights, measured by the Pareto ``k``-hat of the weight tail
  (:func:`pareto_khat`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from .gamma import GammaResult

__all__ = [
    "MIN_CHAIN_TAU",
    "MIN_ACCEPTED",
    "KHAT_INFINITE_VARIANCE",
    "KHAT_UNRELIABLE",
    "ParetoTail",
    "pareto_khat",
    "frozen_chains",
    "series_warnings",
    "accepted_warning",
    "khat_warning",
]

MIN_CHAIN_TAU = 50.0
"""A chain shorter than this many ``tau_int`` is flagged (Wolff recommends ``N >> tau_int``)."""

MIN_ACCEPTED = 50
"""An independence-sampler chain with fewer accepted proposals than this is flagged."""

KHAT_INFINITE_VARIANCE = 0.5
"""Above this ``k``-hat the importance weights have infinite variance (tail index ``1/k < 2``)."""

KHAT_UNRELIABLE = 0.7
"""Above this ``k``-hat even Pareto-smoothed importance sampling is unreliable (Vehtari et al.)."""


@dataclass(frozen=True)
class ParetoTail:
    """Generalised-Pareto fit to the largest importance weights.

    Attributes
    ----------
    khat : float or None
        Estimated shape ``k`` of the tail (``1 / k`` is the tail index: moments of order
        ``>= 1/k`` are infinite); None where it cannot be estimated (too few weights, or
        the largest weights tie).
    m_tail : int
        Number of largest weights fitted.
    n : int
        Number of weights.
    """

    khat: float | None
    m_tail: int
    n: int


def _gpd_shape_zhang_stephens(x: np.ndarray) -> float:
    """Shape ``k`` of a generalised Pareto distribution fitted to exceedances ``x``.

    Zhang & Stephens, Technometrics 51 (2009) 316: with ``theta = k / sigma`` the profile
    log-likelihood is ``l(theta) = n (log(theta / k(theta)) - k(theta) - 1)``,
    ``k(theta) = mean(log(1 + theta x))``. ``theta`` is the posterior mean over the grid
    ``theta_j = -1/x_(n) + (sqrt(m / (j - 1/2)) - 1) / (3 x_(q))``, ``j = 1..m``,
    ``m = 30 + floor(sqrt(n))``, ``x_(q)`` the first-quartile order statistic; then
    ``k = k(theta)``. Convention: ``k > 0`` for heavy tails.

    Parameters
    ----------
    x : np.ndarray
        Positive exceedances over the threshold, sorted ascending, shape ``(n,)``, ``n >= 5``.

    Returns
    -------
    float
        The estimate of ``k`` (before any prior).
    """
    n = x.size
    m = 30 + int(math.sqrt(n))
    j = np.arange(1, m + 1, dtype=np.float64)
    x_q = x[int(n / 4 + 0.5) - 1]
    theta = -1.0 / x[-1] + (np.sqrt(m / (j - 0.5)) - 1.0) / (3.0 * x_q)
    k = np.log1p(theta[:, None] * x[None, :]).mean(axis=1)
    loglik = n * (np.log(theta / k) - k - 1.0)
    post = softmax(loglik)
    theta_hat = float(np.sum(post * theta))
    return float(np.mean(np.log1p(theta_hat * x)))


def pareto_khat(log_w: np.ndarray | Sequence[float]) -> ParetoTail:
    """Pareto ``k``-hat tail diagnostic of importance weights.

    The diagnostic of Pareto smoothed importance sampling: A. Vehtari, D. Simpson, A. Gelman,
    Y. Yao, J. Gabry, "Pareto smoothed importance sampling", J. Mach. Learn. Res. 25 (2024) 1,
    arXiv:1507.02646. A generalised Pareto distribution is fitted to the ``M = ceil(min(N/5,
    3 sqrt(N)))`` largest weights (exceedances over the ``(M+1)``-th largest) with the
    estimator of Zhang & Stephens (:func:`_gpd_shape_zhang_stephens`), and shrunk towards 1/2 by
    the weakly informative prior of Vehtari et al., ``k <- (M k + 10 * 0.5) / (M + 10)``.

    Reading: ``k < 1/2``: the weights have finite variance; ``1/2 <= k < 0.7``: infinite
    variance, estimates converge slowly and their errors are not trustworthy; ``k >= 0.7``:
    the estimates are unreliable even with Pareto smoothing. ``k`` is invariant under a
    constant shift of ``log_w`` (the normalisation of the weights). For an independence
    Metropolis chain (flow-MCMC) heavy tails also mean the chain is not geometrically ergodic,
    so its Gamma-method error rests on no central limit theorem.

    At small ``N`` the estimate of a light tail is biased up (towards 1/2 by the prior and by the
    pre-asymptotic tail): log-normal weights with ``sigma = 1`` give about 0.48 at ``N = 300`` and
    0.19 at ``N = 10^4``. Its statistical error is about ``(1 + k) / sqrt(M)``.

    Parameters
    ----------
    log_w : array_like
        Log importance weights, shape ``(N,)``; NaN entries are ignored, ``-inf`` entries are
        zero weights.

    Returns
    -------
    ParetoTail
        ``khat`` (None if ``N < 50`` after dropping NaN, or if fewer than five of the largest
        weights exceed the threshold), the number ``m_tail`` of weights fitted and ``N``.

    Raises
    ------
    ValueError
        ``+inf`` entries.
    """
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    lw = lw[~np.isnan(lw)]
    if np.any(lw == np.inf):
        raise ValueError("log weights contain +inf")
    n = int(lw.size)
    m = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) if n else 0
    if n < 50 or np.all(lw == -np.inf):
        return ParetoTail(None, m, n)
    lw = np.sort(lw)
    top = lw[-1]
    tail = np.exp(lw[-m:] - top)  # the largest weight is 1: no overflow
    threshold = np.exp(lw[-m - 1] - top)
    x = tail - threshold
    x = x[x > 0]
    if x.size < 5:
        return ParetoTail(None, m, n)
    k = _gpd_shape_zhang_stephens(x)
    k = (x.size * k + 10 * 0.5) / (x.size + 10)
    return ParetoTail(float(k), m, n)


def frozen_chains(replicas: Sequence[np.ndarray]) -> int:
    """Number of chains (of at least two samples) in which a series never changes.

    Parameters
    ----------
    replicas : sequence of np.ndarray
        One series ``(N_r,)`` per chain.

    Returns
    -------
    int
    """
    return sum(1 for r in replicas if r.size >= 2 and np.all(r == r[0]))


def series_warnings(
    result: GammaResult, lengths: Sequence[int], *, frozen: int = 0, known_mean: float | None = None
) -> list[str]:
    """Warnings on one Gamma-method result: window at its cap, short chains, frozen chains.

    Parameters
    ----------
    result : GammaResult
        The analysis of the series.
    lengths : sequence of int
        Length ``N_r`` of each chain (replica).
    frozen : int, optional
        Number of chains in which the series never changes (:func:`frozen_chains`).
    known_mean : float, optional
        The exact mean used, if any (named in the frozen-chain warning).

    Returns
    -------
    list of str
        One-line warnings, ``[]`` when all is well.
    """
    out: list[str] = []
    n_chains = len(lengths)
    if frozen:
        what = f"{frozen} of {n_chains} chain(s)" if n_chains > 1 else "the chain"
        hint = "" if known_mean is not None else "; if its exact mean is known, pass --mean NAME=VALUE"
        out.append(f"never changes in {what}: the chains do not sample its distribution{hint}")
    if result.window_capped:
        out.append(
            f"the automatic window reached its cap W = {result.window} (half the longest chain): "
            "tau_int and the error are lower bounds"
        )
    need = MIN_CHAIN_TAU * result.tau_int
    short = [n for n in lengths if n < need]
    if short:
        what = f"{len(short)} of {n_chains} chains are" if n_chains > 1 else "the chain is"
        out.append(
            f"{what} shorter than {MIN_CHAIN_TAU:g} tau_int = {need:.0f} steps "
            f"(shortest {min(short)}): the error is not reliable"
        )
    return out


def accepted_warning(accepted: Sequence[int], steps: Sequence[int]) -> str | None:
    """Warning for independence-sampler chains with few accepted proposals.

    Parameters
    ----------
    accepted : sequence of int
        Accepted proposals per chain.
    steps : sequence of int
        Markov steps per chain.

    Returns
    -------
    str or None
        A one-line warning if some chain accepted fewer than :data:`MIN_ACCEPTED` proposals.
    """
    if not accepted or min(accepted) >= MIN_ACCEPTED:
        return None
    i = int(np.argmin(accepted))
    which = f"chain {i}" if len(accepted) > 1 else "the chain"
    return (
        f"few accepted proposals: {which} accepted {accepted[i]} of {steps[i]} (all chains: {sum(accepted)} "
        f"of {sum(steps)}), i.e. at most {accepted[i] + 1} distinct configurations: errors are not meaningful "
        f"below {MIN_ACCEPTED} per chain"
    )


def khat_warning(tail: ParetoTail, what: str) -> str | None:
    """Warning for heavy-tailed importance weights (:func:`pareto_khat`).

    Parameters
    ----------
    tail : ParetoTail
        The fit.
    what : str
        Name of the weights (e.g. ``"weights/proposal_log_w"``).

    Returns
    -------
    str or None
        A one-line warning for ``k > 1/2``.
    """
    if tail.khat is None or tail.khat <= KHAT_INFINITE_VARIANCE:
        return None
    if tail.khat > KHAT_UNRELIABLE:
        verdict = f"> {KHAT_UNRELIABLE}: infinite variance, estimates are unreliable even with Pareto smoothing"
    else:
        verdict = f"> {KHAT_INFINITE_VARIANCE}: infinite variance likely, errors may be too small"
    return f"heavy-tailed importance weights ({what}): Pareto k-hat {tail.khat:.2f} {verdict}"
