"""Gamma-method analysis of a whole ensemble file and its plain-text table."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .ess import ess as _ess
from .gamma import gamma_method, gamma_method_derived

if TYPE_CHECKING:
    from latflow.ensemble import EnsembleReader

__all__ = ["DerivedObservable", "analyze_ensemble", "format_table", "format_value_error"]


@dataclass(frozen=True)
class DerivedObservable:
    """A function of the means of observables stored in an ensemble.

    Attributes
    ----------
    inputs : tuple of str
        Names of the primaries: datasets under ``observables/`` of shape ``(n,)``,
        or components ``"name[i]"`` of datasets of shape ``(n, k)``.
    func : callable
        ``func(*means_of_inputs) -> float``.
    description : str
        Free text shown nowhere but kept in the result.
    """

    inputs: tuple[str, ...]
    func: Callable[..., float]
    description: str = ""


def _chain_index(reader: EnsembleReader, n: int) -> list[np.ndarray]:
    """Row indices of each chain, in Markov order.

    Parameters
    ----------
    reader : EnsembleReader
        Open ensemble.
    n : int
        Number of committed rows.

    Returns
    -------
    list of np.ndarray
        One integer index array ``(n_c,)`` per chain (sorted chain ids), rows sorted
        by ``markov/step`` where that dataset exists.
    """
    chain = reader.read("markov/chain").reshape(-1) if reader.has("markov/chain") else np.zeros(n, int)
    step = reader.read("markov/step").reshape(-1) if reader.has("markov/step") else None
    out = []
    for c in np.unique(chain):
        idx = np.flatnonzero(chain == c)
        if step is not None:
            idx = idx[np.argsort(step[idx], kind="stable")]
        out.append(idx)
    return out


def _components(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """Split a dataset ``(n,)`` or ``(n, k, ...)`` into named 1D series ``(n,)``."""
    if values.ndim == 1:
        return {name: values}
    out = {}
    for i in np.ndindex(*values.shape[1:]):
        label = ",".join(str(j) for j in i)
        out[f"{name}[{label}]"] = values[(slice(None), *i)]
    return out


def analyze_ensemble(
    path: str | Path,
    *,
    derived: Mapping[str, DerivedObservable] | None = None,
    S: float = 1.5,
    known_means: Mapping[str, float] | None = None,
) -> dict:
    """Gamma-method analysis of every observable in an ensemble file.

    Rows ``[0, n_committed)`` are split into chains by ``markov/chain`` (one chain if
    absent) and ordered by ``markov/step`` within each chain; each chain is one
    replica of the Gamma method. Importance weights ``weights/log_w`` are *not*
    applied: if they are non-trivial a warning is recorded.

    Parameters
    ----------
    path : str or Path
        Ensemble file following ENSEMBLE_FORMAT.md.
    derived : mapping of str to DerivedObservable, optional
        Functions of observable means to analyse as well (``gamma_method_derived``).
    S : float, optional
        Wolff's window parameter (default 1.5).
    known_means : mapping of str to float, optional
        Exact means by observable name (``"name"`` or ``"name[i]"``; a dataset name
        applies to all its components); see ``gamma_method(known_mean=...)``.

    Returns
    -------
    dict
        JSON-serialisable: ``"observables"`` ``{name: GammaResult.as_dict()}``,
        ``"derived"`` ``{name: {... , "inputs", "description"}}``, ``"acceptance"``
        (Gamma-method result of ``markov/accepted``, only if present), ``"ess"``
        (reweighting ESS per configuration of the flow proposals, from ``weights/proposal_log_w``, only for flow
        proposals), ``"n_committed"``, ``"n_chains"``, ``"theory"``, ``"couplings"``,
        ``"lattice_shape"`` and ``"warnings"`` (list of str).
    """
    from latflow.ensemble import EnsembleReader  # deferred: keep the estimators importable alone

    known = dict(known_means or {})
    result: dict = {"observables": {}, "derived": {}}
    warnings: list[str] = []
    with EnsembleReader(path) as reader:
        n = int(reader.n_committed)
        chains = _chain_index(reader, n)
        result.update(
            theory=str(reader.theory),
            couplings=dict(reader.couplings),
            lattice_shape=[int(x) for x in reader.lattice_shape],
            n_committed=n,
            n_chains=len(chains),
        )

        def replicas(series: np.ndarray) -> list[np.ndarray]:
            return [series[idx] for idx in chains]

        series: dict[str, list[np.ndarray]] = {}
        for ds in reader.names("observables"):
            values = np.asarray(reader.read(f"observables/{ds}"))
            for name, col in _components(ds, values).items():
                reps = replicas(np.asarray(col, dtype=np.float64))
                mu = known.get(name, known.get(ds))
                try:
                    res = gamma_method(reps, S=S, known_mean=mu)
                except ValueError as exc:
                    warnings.append(f"observable {name!r} skipped: {exc}")
                    continue
                series[name] = reps
                result["observables"][name] = res.as_dict()

        for name, spec in (derived or {}).items():
            missing = [i for i in spec.inputs if i not in series]
            if missing:
                warnings.append(f"derived {name!r} skipped: missing inputs {missing}")
                continue
            try:
                res = gamma_method_derived(
                    spec.func,
                    [series[i] for i in spec.inputs],
                    S=S,
                    known_means=[known.get(i) for i in spec.inputs],
                )
            except ValueError as exc:
                warnings.append(f"derived {name!r} skipped: {exc}")
                continue
            entry = res.as_dict()
            entry.update(inputs=list(spec.inputs), description=spec.description)
            result["derived"][name] = entry

        if reader.has("markov/accepted") and n > 0:
            acc = np.asarray(reader.read("markov/accepted")).reshape(-1).astype(np.float64)
            try:
                result["acceptance"] = gamma_method(replicas(acc), S=S).as_dict()
            except ValueError as exc:
                warnings.append(f"acceptance skipped: {exc}")

        if reader.has("weights/proposal_log_w") and n > 0:
            # flow-MCMC stores the log weight log p - log q of the proposal made at every step;
            # proposals are independent draws from q, so this is the flow's reweighting ESS.
            # (log_p - log_q of the chain's rows would not do: those rows are distributed as p.)
            lw = np.asarray(reader.read("weights/proposal_log_w"), dtype=np.float64).reshape(-1)
            try:
                result["ess"] = _ess(lw[~np.isnan(lw)])
            except ValueError as exc:
                warnings.append(f"ESS skipped: {exc}")

        if reader.has("weights/log_w") and n > 0:
            log_w = np.asarray(reader.read("weights/log_w"), dtype=np.float64)
            finite = log_w[np.isfinite(log_w)]
            if finite.size and np.ptp(finite) > 0:
                warnings.append(
                    "weights/log_w is not constant: the means above are unweighted"
                )
    result["warnings"] = warnings
    return result


def format_value_error(mean: float, err: float, digits: int = 2) -> str:
    """Compact ``value(error)`` notation, e.g. ``0.11712(34)``.

    Parameters
    ----------
    mean, err : float
        Value and its error.
    digits : int, optional
        Significant digits of the error (default 2).

    Returns
    -------
    str
        ``"0.11712(34)"``, ``"1.234(12)e-07"`` for very small or large numbers, or
        the plain value when the error is zero or not finite.
    """
    if not (math.isfinite(mean) and math.isfinite(err)) or err <= 0:
        return f"{mean:.8g}"
    scale = max(abs(mean), err)
    exp = math.floor(math.log10(scale))
    suffix = ""
    if exp < -4 or exp >= 6:
        mean, err, suffix = mean / 10.0**exp, err / 10.0**exp, f"e{exp:+03d}"
    decimals = digits - 1 - math.floor(math.log10(err))
    if round(err * 10.0**decimals) >= 10**digits:  # 0.0999 -> 0.10, not 0.100
        decimals -= 1
    decimals = max(decimals, 0)
    e_int = int(round(err * 10.0**decimals))
    return f"{mean:.{decimals}f}({e_int}){suffix}"


def _row(name: str, r: Mapping, width: int) -> str:
    return (
        f"{name:<{width}} {r['mean']:>15.8g} {r['err']:>11.3g} "
        f"{format_value_error(r['mean'], r['err']):>18} "
        f"{r['tau_int']:>9.3f} {r['tau_int_err']:>11.3f} {r['n']:>9d}"
    )


def format_table(result: dict) -> str:
    """Fixed-width plain-text table of an :func:`analyze_ensemble` result.

    Parameters
    ----------
    result : dict
        Output of :func:`analyze_ensemble`.

    Returns
    -------
    str
        Header lines (theory, couplings, lattice, n_committed, chains, acceptance,
        ESS), then one row per observable and derived observable with columns
        observable | mean | error | value(error) | tau_int | tau_int err | n,
        then any warnings.
    """
    couplings = ", ".join(f"{k}={v}" for k, v in result.get("couplings", {}).items())
    head = [f"theory: {result.get('theory', '?')}   couplings: {couplings or '-'}"]
    if result.get("lattice_shape"):
        head[0] += "   lattice: " + "x".join(str(x) for x in result["lattice_shape"])
    line = f"n_committed: {result.get('n_committed', 0)}   chains: {result.get('n_chains', 0)}"
    if "acceptance" in result:
        acc = result["acceptance"]
        line += f"   acceptance: {format_value_error(acc['mean'], acc['err'])}"
        line += f" (tau_int {acc['tau_int']:.3g})"
    if "ess" in result:
        line += f"   ESS: {result['ess']:.4g}"
    head.append(line)

    rows = {**result.get("observables", {}), **result.get("derived", {})}
    width = max([len("observable")] + [len(k) for k in rows])
    cols = (
        f"{'observable':<{width}} {'mean':>15} {'error':>11} {'value(error)':>18} "
        f"{'tau_int':>9} {'tau_int err':>11} {'n':>9}"
    )
    out = head + ["", cols, "-" * len(cols)]
    out += [_row(k, r, width) for k, r in result.get("observables", {}).items()]
    if result.get("derived"):
        out.append("-" * len(cols))
        out += [_row(k, r, width) for k, r in result["derived"].items()]
    out += [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(out)
