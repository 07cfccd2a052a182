"""Gamma-method analysis of a whole ensemble file and its plain-text table."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .diagnostics import (
    KHAT_UNRELIABLE,
    accepted_warning,
    frozen_chains,
    khat_warning,
    pareto_khat,
    series_warnings,
)
from .ess import ess as _ess
from .gamma import GammaResult, gamma_method, gamma_method_derived
from .weighted import WeightedResult, weighted_estimate_derived

if TYPE_CHECKING:
    from latflow.ensemble import EnsembleReader

__all__ = ["AnalysisInputError", "DerivedObservable", "analyze_ensemble", "format_table", "format_value_error"]


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


class AnalysisInputError(ValueError):
    """A request the ensemble cannot answer (e.g. a known mean for an observable it does not hold)."""


def _independence_sampler(reader: EnsembleReader) -> bool:
    """Whether the rows come from an independence Metropolis sampler (flow-MCMC)."""
    kind = reader.sampler.get("kind") if isinstance(reader.sampler, dict) else None
    return reader.has("weights/proposal_log_w") or (isinstance(kind, str) and kind.endswith("flow-mcmc"))


def _check_known_means(known: Mapping[str, float], allowed: list[str]) -> dict[str, float]:
    """Known means by name, checked against the observables (datasets and components) present."""
    unknown = sorted(k for k in known if k not in allowed)
    if unknown:
        raise AnalysisInputError(
            f"no observable {', '.join(map(repr, unknown))} in the ensemble; allowed: {', '.join(allowed)}"
        )
    out = {}
    for k, v in known.items():
        v = float(v)
        if not np.isfinite(v):
            raise AnalysisInputError(f"known mean of {k!r} must be a finite number, got {v}")
        out[k] = v
    return out


def _ensemble_checks(reader: EnsembleReader, path: Path, check_checksums: bool, result: dict) -> list[str]:
    """Completeness and checksums of the file; fills ``result`` and returns warnings."""
    from latflow.ensemble.completeness import completeness

    warnings: list[str] = []
    done = completeness(reader)
    result.update(n_samples=done.n_samples, steps_per_chain=list(done.steps), complete=done.complete)
    if not done.complete:
        warnings.append(
            f"incomplete ensemble: {done.describe()}; the run was interrupted or is still writing "
            "(continue it with --resume)"
        )
    return warnings + _checksum_checks(path, check_checksums, result)


def _checksum_checks(path: Path, check_checksums: bool, result: dict) -> list[str]:
    """``verify`` of the file: refuses a damaged file, or (not ``check_checksums``) returns warnings."""
    from latflow.ensemble import EnsembleError, verify

    warnings: list[str] = []
    problems = verify(path)
    if not problems:
        result["checksums"] = "verified"
    elif check_checksums:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise EnsembleError(
            f"{problems[0]}{more}: the file is damaged or was modified, so its numbers are not analysed; "
            "'latflow verify' lists every problem, '--ignore-checksums' analyses it anyway"
        )
    else:
        result["checksums"] = "mismatch"
        warnings += [f"DAMAGED (checksums ignored on request): {p}" for p in problems]
    return warnings


def _sampler_checks(
    reader: EnsembleReader, chains: list[np.ndarray], accepted: np.ndarray | None, n: int, result: dict
) -> list[str]:
    """Accepted proposals of independence samplers (``accepted``: ``markov/accepted`` ``(n,)``, or None
    where absent) and the tail of the importance weights."""
    warnings: list[str] = []
    if n == 0:
        return warnings
    if _independence_sampler(reader) and accepted is not None:
        acc = accepted.astype(bool)
        per_chain = [int(acc[idx].sum()) for idx in chains]
        steps = [int(idx.size) for idx in chains]
        result["accepted_proposals"] = {"per_chain": per_chain, "total": int(sum(per_chain))}
        w = accepted_warning(per_chain, steps)
        if w:
            warnings.append(w)
    for name in ("weights/proposal_log_w", "weights/log_w"):
        if not reader.has(name):
            continue
        lw = np.asarray(reader.read(name), dtype=np.float64).reshape(-1)
        finite = lw[np.isfinite(lw)]
        if name == "weights/log_w":
            if not (finite.size and np.ptp(finite) > 0):
                continue  # plain MCMC: log_w = 0, nothing to diagnose
            warnings.append("weights/log_w is not constant: the means below are unweighted")
        try:
            tail = pareto_khat(lw)
        except ValueError as exc:
            warnings.append(f"Pareto k-hat of {name} skipped: {exc}")
            continue
        result.setdefault("pareto_khat", {})[name] = {"khat": tail.khat, "m_tail": tail.m_tail, "n": tail.n}
        w = khat_warning(tail, name)
        if w:
            warnings.append(w)
    return warnings


def analyze_ensemble(
    path: str | Path,
    *,
    derived: Mapping[str, DerivedObservable] | None = None,
    S: float = 1.5,
    known_means: Mapping[str, float] | None = None,
    check_checksums: bool = True,
    exact_log_z: float | None = None,
) -> dict:
    """Gamma-method analysis of every observable in an ensemble file, with diagnostics.

    A weighted ensemble (annealing runs: ``annealing/log_z`` present) is analysed by
    :func:`_analyze_weighted` instead: the runs combined with their ``Z`` estimates, errors from a
    jackknife over runs (:mod:`latflow.analysis.weighted`), never the Gamma method over particles.

    Rows ``[0, n_committed)`` are split into chains by ``markov/chain`` (one chain if
    absent) and ordered by ``markov/step`` within each chain; each chain is one
    replica of the Gamma method. Importance weights ``weights/log_w`` are *not*
    applied: if they are non-trivial a warning is recorded.

    Diagnostics (:mod:`latflow.analysis.diagnostics`): per observable, the window at its cap,
    chains shorter than 50 ``tau_int`` and chains in which the observable never changes; for the
    ensemble, completeness (committed steps per chain against the run's ``n_samples``), the
    ``sha256`` checksums of ``fields/*``, accepted proposals of independence samplers
    (flow-MCMC) and the Pareto ``k``-hat of the importance weights.

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
    check_checksums : bool, optional
        Refuse (:class:`~latflow.ensemble.EnsembleError`) a file whose checksums or layout do
        not verify (default). False: analyse it anyway, with a warning per problem.
    exact_log_z : float, optional
        Weighted ensembles only: the exact ``log Z`` (normalisation of ENSEMBLE_FORMAT.md) to compare
        the runs' combined ``log Z`` with (a z-score).

    Returns
    -------
    dict
        JSON-serialisable: ``"observables"`` ``{name: {**GammaResult.as_dict(), "window",
        "window_capped", "known_mean", "warnings"}}`` (and ``"description"``, ``"estimator"`` where
        the file records them), ``"derived"`` (the same and ``"inputs"``, ``"description"``),
        ``"acceptance"`` (Gamma-method result of ``markov/accepted``, only if present), ``"ess"``
        (reweighting ESS per configuration of the flow proposals, from ``weights/proposal_log_w``,
        only for flow proposals), ``"accepted_proposals"``
        (``{"per_chain", "total"}``, independence samplers only), ``"pareto_khat"``
        (``{weights dataset: {"khat", "m_tail", "n"}}``, only for importance weights),
        ``"n_committed"``, ``"n_chains"``, ``"n_samples"``, ``"steps_per_chain"``,
        ``"complete"``, ``"checksums"`` (``"verified"`` or ``"mismatch"``), ``"known_means"``,
        ``"theory"``, ``"couplings"``, ``"lattice_shape"`` and ``"warnings"`` (list of str: the
        ensemble-wide ones, which every observable's ``"warnings"`` repeats, and skipped
        observables).

    Raises
    ------
    AnalysisInputError
        A known mean names an observable the ensemble does not hold.
    latflow.ensemble.EnsembleError
        The file cannot be read, or (``check_checksums``) does not verify.
    """
    from latflow.ensemble import EnsembleReader  # deferred: keep the estimators importable alone

    result: dict = {"observables": {}, "derived": {}}
    warnings: list[str] = []
    with EnsembleReader(path) as reader:
        if reader.is_weighted:
            return _analyze_weighted(reader, Path(path), derived, known_means, check_checksums, exact_log_z)
        n = int(reader.n_committed)
        chains = _chain_index(reader, n)
        result.update(
            theory=str(reader.theory),
            couplings=dict(reader.couplings),
            lattice_shape=[int(x) for x in reader.lattice_shape],
            n_committed=n,
            n_chains=len(chains),
        )
        overall = _ensemble_checks(reader, Path(path), check_checksums, result)
        accepted = (
            np.asarray(reader.read("markov/accepted")).reshape(-1) if n and reader.has("markov/accepted") else None
        )
        overall += _sampler_checks(reader, chains, accepted, n, result)

        def replicas(series: np.ndarray) -> list[np.ndarray]:
            return [series[idx] for idx in chains]

        data = {ds: np.asarray(reader.read(f"observables/{ds}")) for ds in reader.names("observables")}
        columns = {ds: _components(ds, values) for ds, values in data.items()}
        allowed = sorted(set(columns) | {name for cols in columns.values() for name in cols})
        known = _check_known_means(dict(known_means or {}), allowed)
        result["known_means"] = dict(known)
        lengths = [int(idx.size) for idx in chains]

        series: dict[str, list[np.ndarray]] = {}
        frozen: dict[str, int] = {}
        centre: dict[str, float | None] = {}  # the known mean each series was analysed about
        for ds, cols in columns.items():
            about = _observable_about(reader, ds)
            for name, col in cols.items():
                reps = replicas(np.asarray(col, dtype=np.float64))
                mu = known.get(name, known.get(ds))
                try:
                    res = gamma_method(reps, S=S, known_mean=mu)
                except ValueError as exc:
                    warnings.append(f"observable {name!r} skipped: {exc}")
                    continue
                series[name] = reps
                frozen[name] = frozen_chains(reps)
                centre[name] = mu
                own = series_warnings(res, lengths, frozen=frozen[name], known_mean=mu)
                result["observables"][name] = {**_entry(res, mu, overall, own), **about}

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
                    known_means=[centre[i] for i in spec.inputs],
                )
            except ValueError as exc:
                warnings.append(f"derived {name!r} skipped: {exc}")
                continue
            n_frozen = max(frozen[i] for i in spec.inputs)
            own = series_warnings(res, lengths, frozen=n_frozen)
            entry = _entry(res, None, overall, own)
            entry.update(inputs=list(spec.inputs), description=spec.description)
            result["derived"][name] = entry

        if accepted is not None:
            try:
                result["acceptance"] = gamma_method(replicas(accepted.astype(np.float64)), S=S).as_dict()
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
    result["warnings"] = overall + warnings
    return result


#: Fewest runs behind a jackknife-over-runs error without a warning.
MIN_RUNS = 10
#: Smallest final ESS fraction of a run without a warning.
MIN_RUN_ESS = 0.1


def _analyze_weighted(
    reader: EnsembleReader,
    path: Path,
    derived: Mapping[str, DerivedObservable] | None,
    known_means: Mapping[str, float] | None,
    check_checksums: bool,
    exact_log_z: float | None,
) -> dict:
    """:func:`analyze_ensemble` of a weighted ensemble (annealing runs), see :mod:`latflow.analysis.weighted`.

    Returns the same ensemble-wide keys as the Markov-chain analysis (``n_chains`` counts runs,
    ``steps_per_chain`` their particles, ``n_samples`` the runs the sampler was asked for, ``complete``
    whether they all are committed), ``"weighted": True``
    and ``"runs"``: ``{"n_runs", "particles_per_run" (list), "ess_mean", "ess_min", "log_z",
    "log_z_err", "exact_log_z", "log_z_z"}``; each observable's entry holds ``mean``, ``err``,
    ``method`` (``"runs"`` or ``"ess"``), ``n``, ``n_runs``, ``known_mean``, ``z`` (with a known mean)
    and ``warnings``.
    """
    from latflow.ensemble import RUN_GROUP, combine_log_z
    from latflow.ensemble.completeness import completeness

    result: dict = {"observables": {}, "derived": {}, "weighted": True}
    warnings: list[str] = []
    n = int(reader.n_committed)
    runs = reader.runs()
    run_log_z = np.asarray(runs[f"{RUN_GROUP}/log_z"], dtype=np.float64)
    run_chain = np.asarray(runs[f"{RUN_GROUP}/chain"])
    particles = [int(p) for p in runs[f"{RUN_GROUP}/n_particles"]]
    run_ess = np.asarray(runs[f"{RUN_GROUP}/ess"], dtype=np.float64)
    n_runs = int(run_log_z.size)
    done = completeness(reader)  # n_samples counts runs
    result.update(
        theory=str(reader.theory),
        couplings=dict(reader.couplings),
        lattice_shape=[int(x) for x in reader.lattice_shape],
        n_committed=n,
        n_chains=n_runs,
        n_samples=done.n_samples,
        steps_per_chain=particles,
        complete=done.complete,
    )
    overall = (
        []
        if done.complete
        else [
            f"incomplete ensemble: {done.describe()}; the run was interrupted or is still writing "
            "(continue it with --resume)"
        ]
    )
    overall += _checksum_checks(path, check_checksums, result)
    log_z, log_z_err = combine_log_z(run_log_z)
    summary: dict = {
        "n_runs": n_runs,
        "particles_per_run": particles,
        "ess_mean": float(run_ess.mean()) if n_runs else None,
        "ess_min": float(run_ess.min()) if n_runs else None,
        # the smallest ESS fraction met along the anneal (before resampling), where the sampler records it
        "ess_min_anneal": (
            float(np.min(runs[f"{RUN_GROUP}/ess_min"])) if n_runs and f"{RUN_GROUP}/ess_min" in runs else None
        ),
        "log_z": float(log_z),
        "log_z_err": float(log_z_err),
        "exact_log_z": None if exact_log_z is None else float(exact_log_z),
        "log_z_z": None,
    }
    if exact_log_z is not None and np.isfinite(log_z_err) and log_z_err > 0:
        summary["log_z_z"] = float((log_z - float(exact_log_z)) / log_z_err)
    result["runs"] = summary
    result["known_means"] = {}
    if n == 0 or n_runs == 0:
        result["warnings"] = [*overall, "no committed runs"]
        return result
    chain = np.asarray(reader.read("markov/chain")).reshape(-1)
    log_w = np.asarray(reader.read("weights/log_w"), dtype=np.float64).reshape(-1)
    low = np.flatnonzero(run_ess < MIN_RUN_ESS)
    if low.size:
        overall.append(
            f"final ESS fraction below {MIN_RUN_ESS:g} in {low.size} of {n_runs} run(s) (lowest {run_ess.min():.3g}, "
            f"run {int(run_chain[int(np.argmin(run_ess))])}): few distinct particles carry the weight"
        )
    # pooled weights: particle i of run r carries Z_r W_ri of the combined estimate
    pooled = np.empty(n)
    for lz, c in zip(run_log_z, run_chain, strict=True):
        idx = np.flatnonzero(chain == c)
        lw = log_w[idx]
        top = float(lw.max())
        norm = top + float(np.log(np.sum(np.exp(lw - top)))) if top > -np.inf else 0.0
        pooled[idx] = lz + lw - norm
    try:
        tail = pareto_khat(pooled)
        result["pareto_khat"] = {"pooled log_w": {"khat": tail.khat, "m_tail": tail.m_tail, "n": tail.n}}
        if tail.khat is not None and tail.khat > KHAT_UNRELIABLE:
            overall.append(
                f"heavy-tailed pooled weights: Pareto k-hat {tail.khat:.2f} > {KHAT_UNRELIABLE}: a few particles "
                "dominate, estimates are unreliable"
            )
    except ValueError as exc:
        warnings.append(f"Pareto k-hat of the pooled weights skipped: {exc}")
    if n_runs == 1:
        overall.append(
            "one run: errors are the self-normalised importance-sampling delta method (method 'ess'), which "
            "ignores the correlations between resampled particles and underestimates the error after resampling"
        )
    elif n_runs < MIN_RUNS:
        overall.append(f"only {n_runs} runs back the jackknife errors (method 'runs'): unreliable below {MIN_RUNS}")

    data = {ds: np.asarray(reader.read(f"observables/{ds}")) for ds in reader.names("observables")}
    columns = {ds: _components(ds, values) for ds, values in data.items()}
    allowed = sorted(set(columns) | {name for cols in columns.values() for name in cols})
    known = _check_known_means(dict(known_means or {}), allowed)
    result["known_means"] = dict(known)
    series: dict[str, np.ndarray] = {}

    def estimate(func: Callable[..., float], cols: list[np.ndarray]) -> WeightedResult:
        return weighted_estimate_derived(func, cols, chain, log_w, run_log_z, run_chain=run_chain)

    for ds, cols in columns.items():
        about = _observable_about(reader, ds)
        for name, col in cols.items():
            values = np.asarray(col, dtype=np.float64)
            try:
                res = estimate(lambda m: m, [values])
            except ValueError as exc:
                warnings.append(f"observable {name!r} skipped: {exc}")
                continue
            series[name] = values
            result["observables"][name] = {**_weighted_entry(res, known.get(name, known.get(ds)), overall), **about}

    for name, spec in (derived or {}).items():
        missing = [i for i in spec.inputs if i not in series]
        if missing:
            warnings.append(f"derived {name!r} skipped: missing inputs {missing}")
            continue
        try:
            res = estimate(spec.func, [series[i] for i in spec.inputs])
        except (ValueError, ZeroDivisionError, FloatingPointError) as exc:
            warnings.append(f"derived {name!r} skipped: {exc}")
            continue
        entry = _weighted_entry(res, None, overall)
        entry.update(inputs=list(spec.inputs), description=spec.description)
        result["derived"][name] = entry
    result["warnings"] = overall + warnings
    return result


def _weighted_entry(res: WeightedResult, known_mean: float | None, overall: list[str]) -> dict:
    """JSON entry of one observable of a weighted ensemble, with the z-score against a known mean."""
    entry = res.as_dict()
    own: list[str] = []
    entry["known_mean"] = known_mean
    if known_mean is not None:
        entry["z"] = float((res.mean - known_mean) / res.err) if res.err > 0 else None
        if entry["z"] is not None and abs(entry["z"]) > 3:
            own.append(f"differs from its known mean {known_mean:g} by {entry['z']:.1f} standard errors")
    entry["warnings"] = [*overall, *own]
    return entry


def _observable_about(reader: EnsembleReader, ds: str) -> dict[str, str]:
    """What the file says about an observable: ``description`` and ``estimator`` ("exact"/"stochastic")."""
    attrs = reader.dataset_attrs(f"observables/{ds}")
    return {k: str(attrs[k]) for k in ("description", "estimator") if isinstance(attrs.get(k), str)}


def _entry(res: GammaResult, known_mean: float | None, overall: list[str], own: list[str]) -> dict:
    """JSON entry of one observable: the Gamma-method numbers, the window and the warnings."""
    entry = res.as_dict()
    entry.update(
        window=int(res.window),
        window_capped=bool(res.window_capped),
        known_mean=known_mean,
        warnings=[*overall, *own],
    )
    return entry


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


def _own_warnings(entry: Mapping, overall: list[str]) -> list[str]:
    """The warnings of one entry that are not ensemble-wide."""
    return [w for w in entry.get("warnings", []) if w not in overall]


def _row(name: str, r: Mapping, width: int, flag: str = "") -> str:
    return (
        f"{name:<{width}} {r['mean']:>15.8g} {r['err']:>11.3g} "
        f"{format_value_error(r['mean'], r['err']):>18} "
        f"{r['tau_int']:>9.3f} {r['tau_int_err']:>11.3f} {r.get('window', 0):>6d} {r['n']:>9d} {flag:<1}"
    )


def _table_body(
    result: Mapping, head: list[str], columns: str, row: Callable[[str, Mapping, int, str], str]
) -> tuple[list[str], dict]:
    """The lines of a result table after ``head``: known means, the column header (``mean``, ``error``,
    ``value(error)`` and then ``columns``), a ``row(name, entry, width, flag)`` per observable and derived
    observable, and the warnings. Returns the lines and the rows by name."""
    if result.get("known_means"):
        head.append("known means: " + ", ".join(f"{k}={v:g}" for k, v in result["known_means"].items()))
    overall = list(result.get("warnings", []))
    rows = {**result.get("observables", {}), **result.get("derived", {})}
    width = max([len("observable")] + [len(k) for k in rows])
    cols = f"{'observable':<{width}} {'mean':>15} {'error':>11} {'value(error)':>18} {columns}"
    out = head + ["", cols, "-" * len(cols)]
    flag = {k: "!" if _own_warnings(r, overall) else "" for k, r in rows.items()}
    out += [row(k, r, width, flag[k]) for k, r in result.get("observables", {}).items()]
    if result.get("derived"):
        out.append("-" * len(cols))
        out += [row(k, r, width, flag[k]) for k, r in result["derived"].items()]
    out += [f"warning: {w}" for w in overall]
    out += [f"warning: {k}: {w}" for k, r in rows.items() for w in _own_warnings(r, overall)]
    return out, rows


def format_table(result: dict) -> str:
    """Fixed-width plain-text table of an :func:`analyze_ensemble` result.

    Parameters
    ----------
    result : dict
        Output of :func:`analyze_ensemble`.

    Returns
    -------
    str
        Header lines (theory, couplings, lattice, n_committed, chains, steps per chain,
        acceptance, ESS, accepted proposals, Pareto k-hat, the files combined, error method and reweighting
        (:func:`latflow.analysis.multi.header_lines`), known means), then one row per
        observable and derived observable with columns observable | mean | error |
        value(error) | tau_int | tau_int err | W (window) | n | ``!`` (the row has warnings),
        then the warnings: ensemble-wide ones once, then each row's own, prefixed by its name, then
        a note naming the stochastic estimators. A weighted ensemble (annealing runs) has its own table
        (:func:`_format_weighted_table`).
    """
    if result.get("weighted"):
        return _format_weighted_table(result)
    couplings = ", ".join(f"{k}={v}" for k, v in result.get("couplings", {}).items())
    head = [f"theory: {result.get('theory', '?')}   couplings: {couplings or '-'}"]
    if result.get("lattice_shape"):
        head[0] += "   lattice: " + "x".join(str(x) for x in result["lattice_shape"])
    line = f"n_committed: {result.get('n_committed', 0)}   chains: {result.get('n_chains', 0)}"
    steps = result.get("steps_per_chain")
    if steps:
        done = str(steps[0]) if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"
        if result.get("n_samples") is not None:
            done += f" of {result['n_samples']}"
        line += f"   steps per chain: {done}" + ("" if result.get("complete", True) else " (INCOMPLETE)")
    head.append(line)
    line = ""
    if "acceptance" in result:
        acc = result["acceptance"]
        line += f"acceptance: {format_value_error(acc['mean'], acc['err'])} (tau_int {acc['tau_int']:.3g})   "
    if "accepted_proposals" in result:
        line += f"accepted proposals: {result['accepted_proposals']['total']}   "
    if "ess" in result:
        line += f"ESS: {result['ess']:.4g}   "
    for name, tail in result.get("pareto_khat", {}).items():
        khat = "-" if tail["khat"] is None else f"{tail['khat']:.2f}"
        line += f"Pareto k-hat ({name.split('/')[-1]}): {khat}   "
    if line:
        head.append(line.rstrip())
    from .multi import header_lines  # deferred: multi imports this module

    head += header_lines(result)
    out, rows = _table_body(
        result,
        head,
        f"{'tau_int':>9} {'tau_int err':>11} {'W':>6} {'n':>9} {'!':<1}",
        _row,
    )
    stochastic = [k for k, r in rows.items() if r.get("estimator") == "stochastic"]
    if stochastic:
        out.append(
            f"note: stochastic estimates (noise sources; their noise is part of the error): {', '.join(stochastic)}"
        )
    return "\n".join(out)


def _weighted_row(name: str, r: Mapping, width: int, flag: str = "") -> str:
    z = r.get("z")
    return (
        f"{name:<{width}} {r['mean']:>15.8g} {r['err']:>11.3g} "
        f"{format_value_error(r['mean'], r['err']):>18} {r['method']:>6} {r['n_runs']:>6d} {r['n']:>9d} "
        f"{'' if z is None else f'{z:+.2f}':>7} {flag:<1}"
    )


def _format_weighted_table(result: dict) -> str:
    """Plain-text table of the analysis of a weighted ensemble (annealing runs).

    Header: theory, couplings, lattice; rows, runs, particles per run; ESS fraction (mean, min) of the
    runs' final populations, ``log Z = value(err)`` (and the exact value with its z-score), the pooled
    Pareto k-hat, known means. Columns: observable | mean | error | value(error) | method (``runs``:
    jackknife over runs, ``ess``: one run's delta method) | runs | n | z (against a known mean) | ``!``.
    Then the warnings, as in :func:`format_table`.
    """
    couplings = ", ".join(f"{k}={v}" for k, v in result.get("couplings", {}).items())
    head = [f"theory: {result.get('theory', '?')}   couplings: {couplings or '-'}"]
    if result.get("lattice_shape"):
        head[0] += "   lattice: " + "x".join(str(x) for x in result["lattice_shape"])
    runs = result.get("runs", {})
    particles = runs.get("particles_per_run") or []
    per_run = (
        "-"
        if not particles
        else (str(particles[0]) if min(particles) == max(particles) else f"{min(particles)}-{max(particles)}")
    )
    of = f" of {result['n_samples']}" if result.get("n_samples") is not None else ""
    head.append(
        f"n_committed: {result.get('n_committed', 0)}   weighted ensemble: {runs.get('n_runs', 0)}{of} runs"
        f"{'' if result.get('complete', True) else ' (INCOMPLETE)'}   particles per run: {per_run}"
    )
    line = ""
    if runs.get("ess_mean") is not None:
        line += f"ESS fraction: mean {runs['ess_mean']:.3g}, min {runs['ess_min']:.3g}"
        if runs.get("ess_min_anneal") is not None:
            line += f" (along the anneal, before resampling: min {runs['ess_min_anneal']:.3g})"
        line += "   "
    if runs.get("log_z") is not None:
        line += f"log Z = {format_value_error(runs['log_z'], runs['log_z_err'])}"
        if runs.get("exact_log_z") is not None:
            z = runs.get("log_z_z")
            line += f" (exact {runs['exact_log_z']:.10g}" + ("" if z is None else f", z = {z:+.2f}") + ")"
        line += "   "
    for name, tail in result.get("pareto_khat", {}).items():
        khat = "-" if tail["khat"] is None else f"{tail['khat']:.2f}"
        line += f"Pareto k-hat ({name}): {khat}   "
    if line:
        head.append(line.rstrip())
    out, _ = _table_body(result, head, f"{'method':>6} {'runs':>6} {'n':>9} {'z':>7} {'!':<1}", _weighted_row)
    return "\n".join(out)
