"""Wolff's Gamma method for Monte Carlo errors with autocorrelations.

Reference: U. Wolff, "Monte Carlo errors with less errors",
Comput. Phys. Commun. 156 (2004) 143, hep-lat/0306017.

Conventions (chosen to agree with the ``pyerrors`` package, see the test-suite)
---------------------------------------------------------------------------
* Replicas (independent chains, possibly of different lengths ``N_r``) share
  one autocorrelation function (Wolff sec. 3)::

      Gamma(t) = sum_r sum_{i=0}^{N_r-t-1} d^r_i d^r_{i+t} / sum_r (N_r - t)

  with ``d^r_i = a^r_i - abar``, where ``abar`` is the mean over *all* data
  (no per-replica mean subtraction), or the exact mean if ``known_mean`` is
  given. ``Gamma`` is computed by FFT for ``t < W_max = max_r(N_r) // 2``.
* ``tau_int(W) = 1/2 + sum_{t=1}^{W} rho(t)``, ``rho = Gamma / Gamma(0)``.
  Values below 1/2 (anticorrelated noise) are raised to 1/2 (plus one ulp), so
  the error is never claimed below the uncorrelated one; ``pyerrors`` does the same.
* Automatic window: the first ``W >= 1`` with ``g(W) < 0``, where
  ``tau(W) = S / ln((2 tau_int(W) + 1) / (2 tau_int(W) - 1))`` and
  ``g(W) = exp(-W / tau(W)) - tau(W) / sqrt(W N)``; ``W`` is capped at ``W_max - 1``.
  Series with ``W_max < 2`` (fewer than four samples in the longest replica) and
  ``S == 0`` use ``W = 0`` (no autocorrelation).
* Bias correction (Wolff eq. 49), applied when the mean is estimated from the data:
  ``C_F(W) -> C_F(W) (1 + (2W + 1) / N)`` with ``C_F(W) = 2 tau_int(W) Gamma(0)``.
  The error of the mean is ``sqrt(C_F(W) (1 + (2W + 1) / N) / N)`` and the reported
  ``tau_int`` is ``tau_int(W) (1 + (2W + 1) / N) / (1 + 1 / N)``, i.e. the corrected
  ``C_F`` over twice the leading-order corrected variance ``Gamma(0) (1 + 1/N)``.
  (Wolff's UWerr divides by the corrected ``Gamma(0) + C_F / N`` instead; the two
  differ at order ``tau_int / N``.)
* ``tau_int`` error: Wolff eq. (42), ``2 tau_int(W) sqrt((W + 1/2 - tau_int(W)) / N)``,
  evaluated with the uncorrected ``tau_int(W)`` at the chosen window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft as _fft

__all__ = ["GammaResult", "gamma_method", "gamma_method_derived"]

_TINY = 10.0 * np.finfo(np.float64).tiny
_EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class GammaResult:
    """Result of a Gamma-method analysis of one (primary or derived) observable.

    Attributes
    ----------
    mean : float
        Estimate of the observable (mean over all samples, or ``func`` of the means).
    err : float
        Statistical error of ``mean``, autocorrelations included.
    tau_int : float
        Integrated autocorrelation time (bias corrected; 1/2 for uncorrelated data).
    tau_int_err : float
        Statistical error of ``tau_int`` (Wolff eq. 42).
    window : int
        Summation window ``W`` chosen by the automatic windowing procedure.
    n : int
        Total number of samples over all replicas.
    window_capped : bool
        The automatic window reached its cap ``W_max - 1`` (``W_max = max_r(N_r) // 2``):
        ``tau_int`` and ``err`` are then lower bounds.
    """

    mean: float
    err: float
    tau_int: float
    tau_int_err: float
    window: int
    n: int
    window_capped: bool = False

    def as_dict(self) -> dict:
        """Plain JSON-serialisable summary.

        Returns
        -------
        dict
            Keys ``"mean"``, ``"err"``, ``"tau_int"``, ``"tau_int_err"`` (float) and ``"n"`` (int).
        """
        return {
            "mean": float(self.mean),
            "err": float(self.err),
            "tau_int": float(self.tau_int),
            "tau_int_err": float(self.tau_int_err),
            "n": int(self.n),
        }


def _as_replicas(data: np.ndarray | Sequence) -> list[np.ndarray]:
    """Normalise one observable's data to a list of 1D float64 replicas.

    Parameters
    ----------
    data : array_like
        A 1D array ``(N,)`` (one chain), a 2D array ``(R, N)`` (``R`` equal-length
        replicas) or a sequence of 1D arrays ``(N_r,)`` (replicas of any length).

    Returns
    -------
    list of np.ndarray
        Non-empty replicas, each of shape ``(N_r,)``, dtype float64.
    """
    if isinstance(data, np.ndarray):
        if data.ndim == 1:
            reps = [data]
        elif data.ndim == 2:
            reps = list(data)
        else:
            raise ValueError(f"data must be 1D (one chain) or 2D (replicas), got shape {data.shape}")
    else:
        items = list(data)
        if all(np.ndim(x) == 0 for x in items):
            reps = [np.asarray(items)]
        else:
            reps = [np.asarray(x) for x in items]
    out = []
    for r in reps:
        r = np.asarray(r, dtype=np.float64)
        if r.ndim != 1:
            raise ValueError(f"each replica must be one-dimensional, got shape {r.shape}")
        if not np.all(np.isfinite(r)):
            raise ValueError("data contain non-finite values (NaN or inf)")
        if r.size:
            out.append(r)
    return out


def _global_mean(reps: list[np.ndarray]) -> float:
    """Mean over all samples; exactly the common value for constant data."""
    first = reps[0][0]
    if all(np.all(r == first) for r in reps):
        return float(first)
    return float(sum(r.sum() for r in reps) / sum(r.size for r in reps))


def _autocov_sum(d: np.ndarray, m: int) -> np.ndarray:
    """Unnormalised autocovariance sums of one replica by FFT.

    Parameters
    ----------
    d : np.ndarray
        Fluctuations, shape ``(N_r,)``.
    m : int
        Number of lags, ``1 <= m <= N_r``.

    Returns
    -------
    np.ndarray
        ``s[t] = sum_{i=0}^{N_r-t-1} d[i] d[i+t]`` for ``t = 0..m-1``, shape ``(m,)``.
    """
    n = d.size
    size = _fft.next_fast_len(n + m, real=True)
    f = _fft.rfft(d, size)
    return _fft.irfft(f.real**2 + f.imag**2, size)[:m]


def _gamma_from_deltas(deltas: list[np.ndarray], S: float, bias_correct: bool) -> tuple[float, float, float, int, bool]:
    """Automatic-windowing Gamma analysis of fluctuations.

    Parameters
    ----------
    deltas : list of np.ndarray
        Fluctuations of each replica, shapes ``(N_r,)``.
    S : float
        Wolff's window parameter (``S == 0``: no autocorrelation, ``W = 0``).
    bias_correct : bool
        Apply the correction for a mean estimated from the same data.

    Returns
    -------
    tuple
        ``(err, tau_int, tau_int_err, window, window_capped)``.
    """
    lengths = np.array([d.size for d in deltas])
    n_tot = int(lengths.sum())
    w_max = max(int(lengths.max()) // 2, 1)
    gamma = np.zeros(w_max)
    counts = np.zeros(w_max)
    lags = np.arange(w_max)
    for d in deltas:
        m = min(d.size, w_max)
        gamma[:m] += _autocov_sum(d, m)
        counts[:m] += d.size - lags[:m]
    gamma /= np.maximum(counts, 1.0)
    if abs(gamma[0]) < _TINY:
        return 0.0, 0.5, 0.0, 0, False

    rho = gamma / gamma[0]
    tau_w = 0.5 + np.concatenate(([0.0], np.cumsum(rho[1:])))
    tau_w[tau_w <= 0.5] = 0.5 + _EPS

    window = 0
    capped = False
    if S > 0 and w_max >= 2:
        ws = np.arange(1, w_max)
        tw = tau_w[1:]
        tau = S / np.log((2.0 * tw + 1.0) / (2.0 * tw - 1.0))
        g = np.exp(-ws / tau) - tau / np.sqrt(ws * n_tot)
        stop = (g < 0) | (ws >= w_max - 1)
        window = int(ws[np.argmax(stop)])
        capped = window == w_max - 1  # the window summed over every lag it could

    t_w = float(tau_w[window])
    if bias_correct:
        corr = 1.0 + (2 * window + 1) / n_tot
        tau_int = t_w * corr / (1.0 + 1.0 / n_tot)
        err = np.sqrt(2.0 * t_w * gamma[0] * corr / n_tot)
    else:
        tau_int = t_w
        err = np.sqrt(2.0 * t_w * gamma[0] / n_tot)
    tau_err = 2.0 * t_w * np.sqrt(abs(window + 0.5 - t_w) / n_tot) if window > 0 else 0.0
    return float(err), float(tau_int), float(tau_err), window, capped


def _check_S(S: float) -> None:
    if not np.isfinite(S) or S < 0:
        raise ValueError(f"S must be a finite number >= 0, got {S}")


def gamma_method(
    data: np.ndarray | Sequence,
    *,
    S: float = 1.5,
    known_mean: float | None = None,
) -> GammaResult:
    """Mean, error and integrated autocorrelation time of a Monte Carlo series.

    Parameters
    ----------
    data : array_like
        One chain, shape ``(N,)``; or replicas (independent chains of the same
        ensemble) as a sequence of arrays of shapes ``(N_r,)`` (lengths may differ)
        or a 2D array ``(R, N)``. The replicas share one autocorrelation function.
    S : float, optional
        Wolff's window parameter (default 1.5); ``S = 0`` assumes no autocorrelation.
    known_mean : float, optional
        Exact expectation value, when known (e.g. ``<Q> = 0`` for the topological
        charge). Fluctuations are then taken about ``known_mean`` instead of the
        sample mean (no mean is subtracted, per chain or overall), and no bias
        correction is applied since no mean is estimated. A chain stuck away from
        ``known_mean`` (topological freezing) then shows up as a large error and
        ``tau_int`` rather than a deceptively small error. The returned ``mean`` is
        still the sample mean.

    Returns
    -------
    GammaResult
        Mean over all samples with its error, ``tau_int``, its error, window and ``n``.

    Raises
    ------
    ValueError
        Fewer than two samples, non-finite data, or ``S < 0``.
    """
    _check_S(S)
    reps = _as_replicas(data)
    n = sum(r.size for r in reps)
    if n < 2:
        raise ValueError(f"the Gamma method needs at least 2 samples, got {n}")
    mean = _global_mean(reps)
    center = mean if known_mean is None else float(known_mean)
    deltas = [r - center for r in reps]
    err, tau, dtau, w, capped = _gamma_from_deltas(deltas, S, bias_correct=known_mean is None)
    return GammaResult(mean=mean, err=err, tau_int=tau, tau_int_err=dtau, window=w, n=n, window_capped=capped)


def gamma_method_derived(
    func: Callable[..., float],
    data: Sequence,
    *,
    S: float = 1.5,
    known_means: Sequence[float | None] | None = None,
) -> GammaResult:
    """Gamma-method analysis of a function of the means of primary observables.

    The estimate is ``func(abar_1, ..., abar_A)``. Its error follows from the
    projected fluctuations ``sum_a f_a (a_a - abar_a)`` with the gradient
    ``f_a = d func / d abar_a`` from central finite differences (step a hundredth of
    each primary's naive error, at least ``1e-8 |abar_a|``); these are then
    analysed with the same windowing as :func:`gamma_method`.

    Parameters
    ----------
    func : callable
        ``func(*means) -> float``; e.g. ``lambda m2, am: V * (m2 - am**2)`` gives the
        connected susceptibility from the primaries ``M^2`` and ``|M|``.
    data : sequence
        One entry per primary observable, each in any form accepted by
        :func:`gamma_method` (one chain ``(N,)`` or replicas ``(N_r,)``); all primaries
        must have identical chain structure (same number of replicas, same lengths).
    S : float, optional
        Wolff's window parameter (default 1.5).
    known_means : sequence of float or None, optional
        Exact means of the primaries where known (``None`` where not); fluctuations of
        such a primary are taken about its exact mean. The bias correction is dropped
        only when every primary's mean is known.

    Returns
    -------
    GammaResult
        ``func`` of the means, its error, ``tau_int`` of the projected series, etc.

    Raises
    ------
    ValueError
        Mismatched chain structures, fewer than two samples, or a non-finite ``func``.
    """
    _check_S(S)
    prims = [_as_replicas(d) for d in data]
    if not prims:
        raise ValueError("gamma_method_derived needs at least one primary observable")
    shape = [r.size for r in prims[0]]
    for a, p in enumerate(prims):
        if [r.size for r in p] != shape:
            raise ValueError(f"primary {a} has chain lengths {[r.size for r in p]}, primary 0 has {shape}")
    n = sum(shape)
    if n < 2:
        raise ValueError(f"the Gamma method needs at least 2 samples, got {n}")
    if known_means is None:
        known = [None] * len(prims)
    else:
        known = list(known_means)
        if len(known) != len(prims):
            raise ValueError(f"known_means has {len(known)} entries for {len(prims)} primaries")

    means = np.array([_global_mean(p) for p in prims])
    value = float(func(*means))
    if not np.isfinite(value):
        raise ValueError(f"func evaluated at the means is not finite: {value}")

    deltas = [np.zeros(s) for s in shape]
    for a, p in enumerate(prims):
        center = means[a] if known[a] is None else float(known[a])
        dev = [r - center for r in p]
        naive = np.sqrt(sum(float(d @ d) for d in dev) / n / n)
        if naive == 0.0:
            continue
        h = max(1e-2 * naive, 1e-8 * abs(means[a]))
        up, down = means.copy(), means.copy()
        up[a] += h
        down[a] -= h
        grad = (float(func(*up)) - float(func(*down))) / (up[a] - down[a])
        if not np.isfinite(grad):
            raise ValueError(f"derivative of func with respect to primary {a} is not finite")
        for r, d in enumerate(dev):
            deltas[r] += grad * d

    bias_correct = any(k is None for k in known)
    err, tau, dtau, w, capped = _gamma_from_deltas(deltas, S, bias_correct=bias_correct)
    return GammaResult(mean=value, err=err, tau_int=tau, tau_int_err=dtau, window=w, n=n, window_capped=capped)
