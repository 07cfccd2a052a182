"""Figures of an ensemble and a training run (matplotlib, no display needed).

Every function takes plain data (numpy arrays, lists, dicts) and returns a
:class:`matplotlib.figure.Figure` whose axes all have labels and a title; :func:`save_figure` writes
it as PNG and/or PDF. Figures are made without :mod:`matplotlib.pyplot` (no global figure registry,
no GUI backend): PNG and PDF are rendered by Agg and matplotlib's PDF backend, so nothing here
needs a display.

Shapes: a *series* is ``(n,)`` (one chain in Markov order); *replicas* are a list of series, one per
chain, of possibly different lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .gamma import _as_replicas, _autocov_sum, _global_mean, gamma_method, gamma_method_derived

__all__ = [
    "Autocorrelation",
    "CorrelatorEstimate",
    "autocorrelation",
    "correlator_estimate",
    "plot_autocorrelation",
    "plot_charge_histogram",
    "plot_correlator",
    "plot_histogram",
    "plot_history",
    "plot_tau_int",
    "plot_training",
    "plot_weights",
    "save_figure",
]

#: default size of one panel, inches
PANEL = (6.0, 3.6)
#: at most this many chains are drawn one by one in a history (the rest are summarised in the title)
MAX_CHAINS_DRAWN = 8


def _figure(n_panels: int = 1) -> tuple[Figure, list]:
    """A figure with ``n_panels`` panels stacked vertically; returns it and its axes."""
    fig = Figure(figsize=(PANEL[0], PANEL[1] * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def save_figure(fig: Figure, path: str | Path, formats: Sequence[str] = ("png",), dpi: int = 100) -> list[Path]:
    """Write a figure as PNG and/or PDF.

    Parameters
    ----------
    fig : Figure
        The figure.
    path : str or Path
        Output path; its suffix is replaced by each format's.
    formats : sequence of str, optional
        Any of ``"png"``, ``"pdf"`` (default PNG only).
    dpi : int, optional
        Resolution of the PNG (default 100).

    Returns
    -------
    list of Path
        The files written, in the order of ``formats``.
    """
    bad = [f for f in formats if f not in ("png", "pdf")]
    if bad:
        raise ValueError(f"figure formats must be 'png' or 'pdf', got {bad}")
    out = []
    for fmt in formats:
        p = Path(path).with_suffix(f".{fmt}")
        fig.savefig(p, format=fmt, dpi=dpi)
        out.append(p)
    return out


def plot_history(replicas: Sequence[np.ndarray], name: str, *, steps: Sequence[np.ndarray] | None = None) -> Figure:
    """Monte Carlo history of an observable, one line per chain.

    Parameters
    ----------
    replicas : sequence of np.ndarray
        One series ``(n_c,)`` per chain, in Markov order.
    name : str
        Observable name (y label).
    steps : sequence of np.ndarray, optional
        Markov time ``(n_c,)`` of each value (``markov/step``); default ``0..n_c-1``.

    Returns
    -------
    Figure
    """
    fig, (ax,) = _figure()
    reps = [np.asarray(r, dtype=np.float64).reshape(-1) for r in replicas]
    drawn = reps[:MAX_CHAINS_DRAWN]
    for c, r in enumerate(drawn):
        x = np.arange(r.size) if steps is None else np.asarray(steps[c]).reshape(-1)
        ax.plot(x, r, lw=0.7, alpha=0.8, label=f"chain {c}")
    if 1 < len(drawn) <= 4:
        ax.legend(fontsize="small", loc="upper right")
    ax.set_xlabel("Markov step")
    ax.set_ylabel(name)
    more = f" (first {len(drawn)} of {len(reps)} chains)" if len(reps) > len(drawn) else ""
    ax.set_title(f"Monte Carlo history of {name}{more}")
    return fig


def plot_histogram(
    values: np.ndarray, name: str, *, weights: np.ndarray | None = None, bins: int | str = "auto"
) -> Figure:
    """Histogram (normalised to a density) of an observable over all rows.

    Parameters
    ----------
    values : np.ndarray
        Values ``(n,)``.
    name : str
        Observable name (x label).
    weights : np.ndarray, optional
        Non-negative weights ``(n,)`` of the rows (weighted ensembles); default equal.
    bins : int or str, optional
        As for :func:`numpy.histogram` (default ``"auto"``, at most 100 bins).

    Returns
    -------
    Figure
    """
    fig, (ax,) = _figure()
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(v)
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)[keep]
    edges = np.histogram_bin_edges(v[keep], bins=bins) if keep.any() else np.linspace(0, 1, 11)
    if edges.size > 101:
        edges = np.linspace(edges[0], edges[-1], 101)
    ax.hist(v[keep], bins=edges, weights=w, density=True, color="C0", alpha=0.8)
    ax.set_xlabel(name)
    ax.set_ylabel("density" if w is None else "weighted density")
    ax.set_title(f"Histogram of {name} ({int(keep.sum())} rows)")
    return fig


def plot_charge_histogram(charge: np.ndarray, *, exact: Mapping[int, float] | None = None) -> Figure:
    """Topological charge by sector: one bar per integer ``Q``.

    Parameters
    ----------
    charge : np.ndarray
        Topological charge per row ``(n,)``; rounded to the nearest integer (the geometric charge of
        the gauge theories is an integer up to rounding).
    exact : mapping of int to float, optional
        Exact ``P(Q)``, drawn as markers.

    Returns
    -------
    Figure
    """
    fig, (ax,) = _figure()
    q = np.rint(np.asarray(charge, dtype=np.float64).reshape(-1))
    q = q[np.isfinite(q)].astype(np.int64)
    sectors, counts = np.unique(q, return_counts=True)
    frac = counts / max(q.size, 1)
    err = np.sqrt(frac * (1 - frac) / max(q.size, 1))
    ax.bar(sectors, frac, width=0.8, yerr=err, color="C0", alpha=0.8, label="ensemble")
    if exact:
        ks = sorted(exact)
        ax.plot(ks, [exact[k] for k in ks], "o", color="C3", label="exact")
        ax.legend(fontsize="small")
    ax.set_xticks(sectors if sectors.size <= 21 else sectors[:: int(np.ceil(sectors.size / 21))])
    ax.set_xlabel("topological charge Q (sector)")
    ax.set_ylabel("fraction of rows")
    ax.set_title(f"Topological sectors ({q.size} rows, {sectors.size} sectors)")
    return fig


@dataclass(frozen=True)
class Autocorrelation:
    """Normalised autocorrelation function of one observable and the Gamma method's window.

    Attributes
    ----------
    rho : np.ndarray
        ``rho(t) = Gamma(t) / Gamma(0)``, ``(W_max,)``, ``t = 0..W_max-1`` (``W_max = max_r N_r // 2``),
        with the conventions of :mod:`latflow.analysis.gamma` (replicas share one ``Gamma``).
    tau_int : np.ndarray
        ``tau_int(W) = 1/2 + sum_{t=1}^{W} rho(t)`` for ``W = 0..W_max-1``, ``(W_max,)`` (no bias correction).
    tau_int_err : np.ndarray
        Wolff's eq. (42) error of ``tau_int(W)``, ``(W_max,)``.
    window : int
        The automatic window chosen by :func:`~latflow.analysis.gamma.gamma_method`.
    window_capped : bool
        The window reached its cap.
    n : int
        Samples over all replicas.
    """

    rho: np.ndarray
    tau_int: np.ndarray
    tau_int_err: np.ndarray
    window: int
    window_capped: bool
    n: int


def autocorrelation(replicas: Sequence[np.ndarray], *, S: float = 1.5) -> Autocorrelation:
    """Normalised autocorrelation function, ``tau_int(W)`` and the chosen window of one observable.

    Parameters
    ----------
    replicas : sequence of np.ndarray
        One series ``(n_c,)`` per chain.
    S : float, optional
        Wolff's window parameter (default 1.5).

    Returns
    -------
    Autocorrelation
        ``rho`` is all zeros beyond ``t = 0`` (and ``rho(0) = 1``) for constant data.
    """
    reps = _as_replicas(list(replicas))
    if not reps:
        raise ValueError("no data")
    res = gamma_method(reps, S=S)
    n = int(sum(r.size for r in reps))
    mean = _global_mean(reps)  # exactly the common value of constant data
    w_max = max(max(r.size for r in reps) // 2, 1)
    gamma = np.zeros(w_max)
    counts = np.zeros(w_max)
    lags = np.arange(w_max)
    for r in reps:
        m = min(r.size, w_max)
        gamma[:m] += _autocov_sum(r - mean, m)
        counts[:m] += r.size - lags[:m]
    gamma /= np.maximum(counts, 1.0)
    rho = np.zeros(w_max)
    rho[0] = 1.0
    if gamma[0] > 10.0 * np.finfo(np.float64).tiny:
        rho = gamma / gamma[0]
    tau = 0.5 + np.concatenate(([0.0], np.cumsum(rho[1:])))
    w = np.arange(w_max)
    tau_err = 2.0 * tau * np.sqrt(np.abs(w + 0.5 - tau) / n)
    return Autocorrelation(rho, tau, tau_err, int(res.window), bool(res.window_capped), n)


def _max_lag(acf: Autocorrelation) -> int:
    """Lags shown: a few windows, at least 20, at most all."""
    return int(min(acf.rho.size, max(20, 4 * acf.window + 1)))


def plot_autocorrelation(acf: Autocorrelation, name: str) -> Figure:
    """Normalised autocorrelation function with the chosen window marked.

    Parameters
    ----------
    acf : Autocorrelation
        From :func:`autocorrelation`.
    name : str
        Observable name (title).

    Returns
    -------
    Figure
    """
    fig, (ax,) = _figure()
    t = np.arange(_max_lag(acf))
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.plot(t, acf.rho[: t.size], ".-", color="C0", label="rho(t)")
    capped = " (capped)" if acf.window_capped else ""
    ax.axvline(acf.window, color="C3", ls="--", label=f"window W = {acf.window}{capped}")
    ax.legend(fontsize="small")
    ax.set_xlabel("lag t (Markov steps)")
    ax.set_ylabel("rho(t) = Gamma(t) / Gamma(0)")
    ax.set_title(f"Autocorrelation function of {name}")
    return fig


def plot_tau_int(acf: Autocorrelation, name: str) -> Figure:
    """``tau_int(W)`` against the summation window, with the chosen window marked.

    Parameters
    ----------
    acf : Autocorrelation
        From :func:`autocorrelation`.
    name : str
        Observable name (title).

    Returns
    -------
    Figure
    """
    fig, (ax,) = _figure()
    w = np.arange(_max_lag(acf))
    tau, err = acf.tau_int[: w.size], acf.tau_int_err[: w.size]
    ax.fill_between(w, tau - err, tau + err, color="C0", alpha=0.25, lw=0)
    ax.plot(w, tau, "-", color="C0", label="tau_int(W)")
    ax.axvline(acf.window, color="C3", ls="--", label=f"chosen W = {acf.window}")
    ax.plot([acf.window], [acf.tau_int[acf.window]], "o", color="C3")
    ax.legend(fontsize="small")
    ax.set_xlabel("summation window W (Markov steps)")
    ax.set_ylabel("tau_int(W)")
    ax.set_title(f"Integrated autocorrelation time of {name}")
    return fig


def _finite_series(history: Mapping[str, Sequence], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) of the entries of ``history[key]`` that are finite numbers, or None if there are none."""
    if key not in history:
        return None
    raw = list(history[key])
    steps = history.get("step")
    x = np.asarray(steps if steps is not None and len(steps) == len(raw) else np.arange(len(raw)), dtype=np.float64)
    y = np.array([np.nan if v is None else float(v) for v in raw], dtype=np.float64)
    keep = np.isfinite(y)
    return (x[keep], y[keep]) if keep.any() else None


#: training-history entries drawn, in order: key, y label, panel title
TRAINING_PANELS = (
    ("loss", "loss", "Training loss"),
    ("kl", "KL(q || p) (nats)", "True reverse KL (exact log Z)"),
    ("log_z", "log Z estimate", "log Z per iteration"),
    ("ess", "ESS fraction", "Effective sample size of the batch"),
    ("acceptance", "acceptance", "Flow-MCMC acceptance"),
)


def plot_training(history: Mapping[str, Sequence], *, title: str = "Training") -> Figure:
    """Training curves against step: loss, true KL (where known), log Z (CRAFT), ESS and acceptance.

    Parameters
    ----------
    history : mapping of str to sequence
        The checkpoint's ``history``: per-step lists ``"loss"``, ``"ess"``, ``"kl"`` (None where
        ``log Z`` is unknown), optionally ``"step"``, ``"acceptance"``, ``"log_z"`` (CRAFT: per
        iteration). A panel is drawn for each entry with at least one finite value.
    title : str, optional
        Figure title.

    Returns
    -------
    Figure

    Raises
    ------
    ValueError
        The history holds none of the entries above.
    """
    panels = [(p, s) for p in TRAINING_PANELS if (s := _finite_series(history, p[0])) is not None]
    if not panels:
        raise ValueError(f"training history has no finite {', '.join(p[0] for p in TRAINING_PANELS)} values")
    fig, axes = _figure(len(panels))
    x_label = "training step" if "step" in history else "iteration"
    for ax, ((key, ylabel, panel_title), (x, y)) in zip(axes, panels, strict=True):
        ax.plot(x, y, "-", lw=0.9, color="C0")
        if key in ("ess", "acceptance"):
            ax.set_ylim(0.0, 1.02)
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
    fig.suptitle(title)
    return fig


@dataclass(frozen=True)
class CorrelatorEstimate:
    """Mean correlator and effective mass with Gamma-method errors.

    Attributes
    ----------
    mean, err : np.ndarray
        ``C(t)`` and its error, ``(T,)``.
    m_eff, m_eff_err : np.ndarray
        ``m_eff(t) = log(C(t) / C(t+1))`` and its error, ``(T-1,)``; NaN where either mean is not positive.
    """

    mean: np.ndarray
    err: np.ndarray
    m_eff: np.ndarray
    m_eff_err: np.ndarray


def correlator_estimate(replicas: Sequence[np.ndarray], *, S: float = 1.5) -> CorrelatorEstimate:
    """Gamma-method mean of a correlator and its effective mass.

    Parameters
    ----------
    replicas : sequence of np.ndarray
        One array ``(n_c, T)`` per chain: the correlator measured on each configuration.
    S : float, optional
        Wolff's window parameter (default 1.5).

    Returns
    -------
    CorrelatorEstimate
    """
    reps = [np.asarray(r, dtype=np.float64) for r in replicas]
    if not reps or any(r.ndim != 2 for r in reps):
        raise ValueError("a correlator must be given as arrays (n_c, T), one per chain")
    n_t = reps[0].shape[1]
    mean, err = np.zeros(n_t), np.zeros(n_t)
    for t in range(n_t):
        res = gamma_method([r[:, t] for r in reps], S=S)
        mean[t], err[t] = res.mean, res.err
    m_eff, m_err = np.full(n_t - 1, np.nan), np.full(n_t - 1, np.nan)
    for t in range(n_t - 1):
        if mean[t] > 0 and mean[t + 1] > 0:
            res = gamma_method_derived(
                lambda a, b: float(np.log(a / b)) if a > 0 and b > 0 else float("nan"),
                [[r[:, t] for r in reps], [r[:, t + 1] for r in reps]],
                S=S,
            )
            m_eff[t], m_err[t] = res.mean, res.err
    return CorrelatorEstimate(mean, err, m_eff, m_err)


def plot_correlator(est: CorrelatorEstimate, name: str) -> Figure:
    """Correlator (log scale where positive) and effective mass against Euclidean time.

    Parameters
    ----------
    est : CorrelatorEstimate
        From :func:`correlator_estimate`.
    name : str
        Correlator name (titles).

    Returns
    -------
    Figure
    """
    fig, (ax, bx) = _figure(2)
    t = np.arange(est.mean.size)
    ax.errorbar(t, est.mean, yerr=est.err, fmt="o", ms=3, capsize=2, color="C0")
    if np.all(est.mean > 0):
        ax.set_yscale("log")
    ax.set_xlabel("Euclidean time t")
    ax.set_ylabel("C(t)")
    ax.set_title(f"Correlator {name}")
    ok = np.isfinite(est.m_eff)
    bx.errorbar(t[:-1][ok], est.m_eff[ok], yerr=est.m_eff_err[ok], fmt="o", ms=3, capsize=2, color="C1")
    bx.set_xlabel("Euclidean time t")
    bx.set_ylabel("m_eff(t) = log C(t)/C(t+1)")
    bx.set_title(f"Effective mass of {name}" + ("" if ok.any() else " (C(t) not positive: none)"))
    return fig


def plot_weights(
    log_w: np.ndarray,
    name: str,
    *,
    ess: float | None = None,
    run_ess: np.ndarray | None = None,
) -> Figure:
    """Importance weights: histogram of ``log w - max log w``, and the ESS fraction of each run.

    Parameters
    ----------
    log_w : np.ndarray
        Log weights ``(n,)`` (e.g. ``weights/proposal_log_w`` of a flow, or ``weights/log_w`` of a
        weighted ensemble, shifted per run by the caller if wanted); NaN and -inf are left out.
    name : str
        Dataset name (labels).
    ess : float, optional
        Reweighting ESS fraction, shown in the title.
    run_ess : np.ndarray, optional
        ESS fraction of each annealing run ``(R,)`` (``annealing/ess``): a second panel.

    Returns
    -------
    Figure
    """
    fig, axes = _figure(2 if run_ess is not None else 1)
    ax = axes[0]
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    lw = lw[np.isfinite(lw)]
    shifted = lw - lw.max() if lw.size else lw
    ax.hist(shifted, bins=min(60, max(10, int(np.sqrt(max(lw.size, 1))))), color="C2", alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"{name} - max")
    ax.set_ylabel("rows")
    ess_text = "" if ess is None else f", ESS fraction {ess:.3g}"
    ax.set_title(f"Importance weights ({lw.size} finite{ess_text})")
    if run_ess is not None:
        bx = axes[1]
        r = np.asarray(run_ess, dtype=np.float64).reshape(-1)
        bx.plot(np.arange(r.size), r, "o", ms=3, color="C2")
        bx.set_ylim(0.0, 1.02)
        bx.set_xlabel("annealing run")
        bx.set_ylabel("ESS fraction")
        bx.set_title("ESS of each run's final population")
    return fig
