"""Several ensembles of one theory point analysed as replicas, with reweighting and other error methods.

:func:`analyze_ensembles` combines the chains of several files the way ``pyerrors`` combines the
replicas of one ensemble: every chain of every file is one replica of a single Gamma-method
analysis (one common mean over all samples; the autocorrelation function summed over the
replicas, :mod:`latflow.analysis.gamma`). Files are combined only when they sample the same
distribution: the same ``theory``, ``couplings`` and ``lattice_shape`` (root attributes); seeds,
samplers and storage may differ.

Reweighting: given per-row log weights ``log w`` (from ``weights/log_w``, from the action at a
nearby coupling or from a user function; :mod:`latflow.jobs.analyze` computes them), every
quantity ``f(<O_1>, ..., <O_A>)`` becomes ``f(<O_1 w>/<w>, ..., <O_A w>/<w>)``: a derived
observable of the primaries ``O_a w`` and ``w``, whose error is the Gamma method (or
binning/jackknife/bootstrap, :mod:`latflow.analysis.resampling`) of that ratio. Rows whose weight
is NaN (no stored configuration, ``save_every > 1``) are left out. The reweighting ESS
``(sum w)^2 / sum w^2`` is reported, with a warning below :data:`MIN_REWEIGHT_ESS` of the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .diagnostics import frozen_chains, khat_warning, pareto_khat, series_warnings
from .ess import ess as _ess
from .gamma import GammaResult, gamma_method, gamma_method_derived
from .report import (
    AnalysisInputError,
    DerivedObservable,
    _chain_index,
    _components,
    _observable_about,
    analyze_ensemble,
)
from .resampling import ERROR_METHODS, default_bin_size, resample_error

__all__ = ["MIN_REWEIGHT_ESS", "analyze_ensembles", "check_compatible", "header_lines"]

#: Reweighting ESS fraction below which the reweighted means get a warning.
MIN_REWEIGHT_ESS = 0.1
#: Root attributes that must agree for files to be combined as replicas.
MATCH_ATTRIBUTES = ("theory", "couplings", "lattice_shape")
_UNWEIGHTED = "weights/log_w is not constant: the means below are unweighted"


@dataclass
class _Ensemble:
    """The series of one file: row indices of each chain and every observable component ``(n,)``."""

    path: Path
    attrs: dict
    chains: list[np.ndarray]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: dict[str, list[str]] = field(default_factory=dict)
    about: dict[str, dict] = field(default_factory=dict)
    accepted: np.ndarray | None = None
    proposal_log_w: np.ndarray | None = None


def _load(path: Path) -> _Ensemble:
    """Read the committed rows' observables, chains and acceptance of one (unweighted) ensemble."""
    from latflow.ensemble import EnsembleReader

    with EnsembleReader(path) as r:
        if r.is_weighted:
            raise AnalysisInputError(
                f"{path}: a weighted ensemble (annealing runs) is analysed alone, with the Gamma method and "
                "its jackknife over runs; it cannot be combined with other files, reweighted or given --errors"
            )
        n = int(r.n_committed)
        attrs = {
            "theory": str(r.theory),
            "couplings": dict(r.couplings),
            "lattice_shape": [int(x) for x in r.lattice_shape],
            "seed": r.seed,
            "sampler": r.sampler,
            "model_sha256": r.meta.model_sha256,
        }
        ens = _Ensemble(path=path, attrs=attrs, chains=_chain_index(r, n))
        for ds in r.names("observables"):
            cols = _components(ds, np.asarray(r.read(f"observables/{ds}"), dtype=np.float64))
            ens.columns.update(cols)
            ens.datasets[ds] = list(cols)
            ens.about[ds] = _observable_about(r, ds)
        if n and r.has("markov/accepted"):
            ens.accepted = np.asarray(r.read("markov/accepted")).reshape(-1).astype(np.float64)
        if n and r.has("weights/proposal_log_w"):
            lw = np.asarray(r.read("weights/proposal_log_w"), dtype=np.float64).reshape(-1)
            ens.proposal_log_w = lw[~np.isnan(lw)]
    return ens


def check_compatible(attrs: Sequence[tuple[Path, Mapping]]) -> list[str]:
    """Refuse files of different theory points; warn about files that look like copies of each other.

    Parameters
    ----------
    attrs : sequence of (Path, mapping)
        Each file with its root attributes (``theory``, ``couplings``, ``lattice_shape``, ``seed``,
        ``sampler``, ``model_sha256``).

    Returns
    -------
    list of str
        Warnings (two files with the same seed, sampler and flow: probably the same chains).

    Raises
    ------
    AnalysisInputError
        One line naming the file, the attribute and both values.
    """
    (p0, a0), warnings = attrs[0], []
    for p, a in attrs[1:]:
        for key in MATCH_ATTRIBUTES:
            if a[key] != a0[key]:
                raise AnalysisInputError(
                    f"{p}: attribute {key!r} is {a[key]!r} but {p0} has {a0[key]!r}: only ensembles of the same "
                    "theory, couplings and lattice are combined"
                )
    for i, (p, a) in enumerate(attrs):
        for q, b in attrs[:i]:
            if all(a.get(k) == b.get(k) for k in ("seed", "sampler", "model_sha256")):
                warnings.append(
                    f"{p} and {q} have the same seed, sampler and flow: their chains are probably the same, "
                    "and combining them underestimates the errors"
                )
    return warnings


@dataclass(frozen=True)
class _Replicas:
    """The rows of every file and chain that enter the analysis, and their reweighting factors."""

    index: list[tuple[int, np.ndarray]]  # (file, row indices) per replica
    weights: list[np.ndarray] | None  # w = exp(log w - max) per replica, or None

    @property
    def lengths(self) -> list[int]:
        return [int(idx.size) for _, idx in self.index]


def _replicas(ensembles: list[_Ensemble], log_weights: Sequence[np.ndarray] | None) -> _Replicas:
    """Replicas: every chain of every file, restricted to rows with a finite log weight when reweighting."""
    index, lws = [], []
    for f, ens in enumerate(ensembles):
        for idx in ens.chains:
            if log_weights is not None:
                lw = np.asarray(log_weights[f], dtype=np.float64).reshape(-1)
                idx = idx[~np.isnan(lw[idx])]
                lws.append(lw[idx])
            if idx.size:
                index.append((f, idx))
            elif log_weights is not None:
                lws.pop()
    if not index:
        raise AnalysisInputError("no rows to analyse (no committed rows, or no row has a reweighting factor)")
    if log_weights is None:
        return _Replicas(index, None)
    top = max(float(np.max(lw)) for lw in lws)
    if not np.isfinite(top):
        raise AnalysisInputError("the reweighting log weights are not finite")
    return _Replicas(index, [np.exp(lw - top) for lw in lws])


class _Estimator:
    """One estimate (Gamma method, then optionally a resampling error) of a function of primaries."""

    def __init__(
        self,
        ensembles: list[_Ensemble],
        reps: _Replicas,
        *,
        S: float,
        errors: str,
        bin_size: int | None,
        n_boot: int,
        seed: int,
    ) -> None:
        self.ensembles, self.reps = ensembles, reps
        self.S, self.errors, self.bin_size, self.n_boot, self.seed = S, errors, bin_size, n_boot, seed

    def series(self, name: str) -> list[np.ndarray]:
        """Replicas of one observable component ``(N_r,)``."""
        return [self.ensembles[f].columns[name][idx] for f, idx in self.reps.index]

    def estimate(
        self, func: Callable[..., float], names: Sequence[str], known: Sequence[float | None]
    ) -> tuple[GammaResult, dict]:
        """Gamma-method result and the JSON numbers of ``func`` of the (reweighted) means of ``names``."""
        prims = [self.series(n) for n in names]
        w = self.reps.weights
        if w is not None:
            prims = [[x * wr for x, wr in zip(p, w, strict=True)] for p in prims] + [w]
            inner = func
            func = lambda *a: inner(*(x / a[-1] for x in a[:-1]))  # noqa: E731
            known = [None] * len(prims)
        if len(prims) == 1 and w is None and func is _identity:
            res = gamma_method(prims[0], S=self.S, known_mean=known[0])
        else:
            res = gamma_method_derived(func, prims, S=self.S, known_means=list(known))
        out = res.as_dict()
        out.update(window=int(res.window), window_capped=bool(res.window_capped))
        if self.errors != "gamma":
            b = self.bin_size or default_bin_size(res.tau_int, self.reps.lengths)
            rs = resample_error(self.errors, func, prims, bin_size=b, n_boot=self.n_boot, seed=self.seed)
            out.update(mean=rs.mean, err=rs.err, method=rs.method, bin_size=rs.bin_size, n_bins=rs.n_bins)
        return res, out


def _identity(x: float) -> float:
    return x


def _per_file(paths: list[Path], S: float, known: Mapping[str, float], check_checksums: bool) -> list[dict]:
    """Each file's own analysis: its checks (completeness, checksums, sampler, weights) and header numbers."""
    return [analyze_ensemble(p, S=S, known_means=dict(known), check_checksums=check_checksums) for p in paths]


def _file_summary(path: Path, res: dict) -> dict:
    keys = ("n_committed", "n_chains", "n_samples", "steps_per_chain", "complete", "checksums")
    return {"path": str(path), **{k: res[k] for k in keys if k in res}, **_optional(res, ("acceptance", "ess"))}


def _optional(res: Mapping, keys: Sequence[str]) -> dict:
    return {k: res[k] for k in keys if k in res}


def _header(paths: list[Path], per: list[dict], reweighted: bool) -> tuple[dict, list]:
    """Ensemble-wide entries of the combined result and the ensemble-wide warnings."""
    many = len(paths) > 1
    overall: list[str] = []
    for p, res in zip(paths, per, strict=True):
        for w in res.get("warnings", []):
            if reweighted and w == _UNWEIGHTED:
                continue
            if w.startswith("observable ") and " skipped: " in w:
                continue  # said again by the combined analysis
            line = f"{p}: {w}" if many else w
            if line not in overall:
                overall.append(line)
    first = per[0]
    samples = {res.get("n_samples") for res in per}
    result: dict = {
        "theory": first["theory"],
        "couplings": first["couplings"],
        "lattice_shape": first["lattice_shape"],
        "files": [_file_summary(p, res) for p, res in zip(paths, per, strict=True)],
        "n_committed": sum(int(res["n_committed"]) for res in per),
        "n_chains": sum(int(res["n_chains"]) for res in per),
        "n_samples": samples.pop() if len(samples) == 1 else None,
        "steps_per_chain": [s for res in per for s in res.get("steps_per_chain", [])],
        "complete": all(res.get("complete", True) for res in per),
        "checksums": "verified" if all(res.get("checksums") == "verified" for res in per) else "mismatch",
    }
    accepted = [res["accepted_proposals"] for res in per if "accepted_proposals" in res]
    if accepted:
        result["accepted_proposals"] = {
            "per_chain": [c for a in accepted for c in a["per_chain"]],
            "total": sum(a["total"] for a in accepted),
        }
    for p, res in zip(paths, per, strict=True):
        for name, tail in res.get("pareto_khat", {}).items():
            result.setdefault("pareto_khat", {})[f"{name} ({p.name})" if many else name] = tail
    return result, overall


def _reweighting_summary(reps: _Replicas, label: str) -> tuple[dict, list[str]]:
    """ESS and Pareto k-hat of the reweighting factors of the analysed rows."""
    lw = np.log(np.concatenate(reps.weights))
    frac = _ess(lw)
    out = {"by": label, "n": int(lw.size), "ess": float(frac * lw.size), "ess_fraction": float(frac)}
    warnings = []
    if frac < MIN_REWEIGHT_ESS:
        warnings.append(
            f"reweighting ESS {frac * lw.size:.1f} of {lw.size} rows (fraction {frac:.3g} < {MIN_REWEIGHT_ESS:g}): "
            "the reweighted means rest on few configurations; move the target closer to the sampled point"
        )
    try:
        tail = pareto_khat(lw)
        out["pareto_khat"] = tail.khat
        w = khat_warning(tail, "reweighting weights")
        if w:
            warnings.append(w)
    except ValueError:
        out["pareto_khat"] = None
    return out, warnings


def _check_request(paths: list[Path], errors: str, bin_size: int | None, log_weights: Sequence | None) -> None:
    if errors not in ERROR_METHODS:
        raise AnalysisInputError(f"--errors {errors!r}: allowed: {', '.join(ERROR_METHODS)}")
    if bin_size is not None and (isinstance(bin_size, bool) or int(bin_size) != bin_size or bin_size < 1):
        raise AnalysisInputError(f"--bin-size {bin_size!r}: allowed: an integer >= 1")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise AnalysisInputError(f"{p}: given twice (as {seen[key]}); each file enters the analysis once")
        seen[key] = p
    if log_weights is not None and len(log_weights) != len(paths):
        raise ValueError(f"{len(log_weights)} arrays of log weights for {len(paths)} files")


def analyze_ensembles(
    paths: Sequence[str | Path],
    *,
    derived: Mapping[str, DerivedObservable] | None = None,
    S: float = 1.5,
    known_means: Mapping[str, float] | None = None,
    check_checksums: bool = True,
    errors: str = "gamma",
    bin_size: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    log_weights: Sequence[np.ndarray] | None = None,
    reweight_label: str = "",
    exact_log_z: float | None = None,
) -> dict:
    """Analyse one or several ensembles of one theory point as replicas of one Gamma-method analysis.

    One file, Gamma-method errors and no reweighting give exactly :func:`analyze_ensemble` (weighted
    ensembles included), with ``"files"`` and ``"error_method"`` added.

    Parameters
    ----------
    paths : sequence of path
        Ensemble files (ENSEMBLE_FORMAT.md) with equal ``theory``, ``couplings`` and ``lattice_shape``.
    derived : mapping of str to DerivedObservable, optional
        Functions of observable means, analysed like the primaries (and reweighted with them).
    S : float, optional
        Wolff's window parameter (default 1.5).
    known_means : mapping of str to float, optional
        Exact means by observable (see :func:`analyze_ensemble`); not used for reweighted means.
    check_checksums : bool, optional
        Refuse files whose checksums do not verify (default).
    errors : {"gamma", "jackknife", "bootstrap", "binning"}, optional
        Error method (:mod:`latflow.analysis.resampling`); ``tau_int`` and ``W`` are the Gamma method's
        in every case.
    bin_size : int, optional
        Bin size of the resampling methods; default :func:`default_bin_size` of each quantity's ``tau_int``.
    n_boot, seed : int, optional
        Bootstrap resamples (default 1000) and the seed of their generator (default 0).
    log_weights : sequence of np.ndarray, optional
        Reweighting: per file, log weights of its rows ``(n_committed,)`` (NaN: row left out).
    reweight_label : str, optional
        What the weights reweight to (shown in the table), e.g. ``"beta=2.1"``.
    exact_log_z : float, optional
        Passed on to :func:`analyze_ensemble` for a single weighted ensemble.

    Returns
    -------
    dict
        The entries of :func:`analyze_ensemble` (``observables`` and ``derived`` with the Gamma method's
        ``tau_int`` and ``window``; ``mean``/``err`` from ``errors``, with ``method``, ``bin_size`` and
        ``n_bins`` for the resampling methods), the header numbers summed over files, and ``"files"``
        (per file: path, rows, chains, completeness, checksums, acceptance, ESS), ``"error_method"``,
        ``"reweighting"`` (``{"by", "n", "ess", "ess_fraction", "pareto_khat"}``, when reweighting).

    Raises
    ------
    AnalysisInputError
        Mismatched files, a file given twice, an unknown error method or bin size, a weighted
        ensemble with other files, reweighting or ``errors``.
    """
    paths = [Path(p) for p in paths]
    _check_request(paths, errors, bin_size, log_weights)
    known = dict(known_means or {})
    if len(paths) == 1 and errors == "gamma" and log_weights is None:
        res = analyze_ensemble(
            paths[0], derived=derived, S=S, known_means=known, check_checksums=check_checksums, exact_log_z=exact_log_z
        )
        return {**res, "files": [_file_summary(paths[0], res)], "error_method": "gamma"}
    ensembles = [_load(p) for p in paths]
    extra = check_compatible([(e.path, e.attrs) for e in ensembles])
    per = _per_file(paths, S, known, check_checksums)
    result, overall = _header(paths, per, log_weights is not None)
    overall += extra
    reps = _replicas(ensembles, log_weights)
    result.update(error_method=errors, observables={}, derived={}, known_means=known)
    if errors != "gamma":
        result.update(bin_size=bin_size, n_boot=n_boot if errors == "bootstrap" else None, seed=seed)
    if reps.weights is not None:
        summary, rw_warn = _reweighting_summary(reps, reweight_label)
        result["reweighting"] = summary
        overall += rw_warn
        if summary["n"] < result["n_committed"]:
            overall.append(
                f"reweighted means use the {summary['n']} of {result['n_committed']} rows that have a stored "
                "configuration (save_every > 1)"
            )
        result["known_means"] = {}  # exact means hold at the sampled point, not at the reweighting target
    warnings = _fill(result, ensembles, reps, derived or {}, known, overall, S, errors, bin_size, n_boot, seed)
    _acceptance_and_ess(result, ensembles, reps, S)
    result["warnings"] = overall + warnings
    return result


def _fill(
    result: dict,
    ensembles: list[_Ensemble],
    reps: _Replicas,
    derived: Mapping[str, DerivedObservable],
    known: Mapping[str, float],
    overall: list[str],
    S: float,
    errors: str,
    bin_size: int | None,
    n_boot: int,
    seed: int,
) -> list[str]:
    """Analyse every observable common to all files, then the derived ones; returns the skipped ones."""
    warnings: list[str] = []
    est = _Estimator(ensembles, reps, S=S, errors=errors, bin_size=bin_size, n_boot=n_boot, seed=seed)
    common = [ds for ds in ensembles[0].datasets if all(ds in e.datasets for e in ensembles)]
    for e in ensembles:
        for ds in e.datasets:
            if ds not in common:
                warnings.append(f"{e.path}: observable {ds!r} is not in every file and is skipped")
    frozen: dict[str, int] = {}
    for ds in common:
        for name in ensembles[0].datasets[ds]:
            mu = None if reps.weights is not None else known.get(name, known.get(ds))
            try:
                res, entry = est.estimate(_identity, [name], [mu])
            except ValueError as exc:
                warnings.append(f"observable {name!r} skipped: {exc}")
                continue
            frozen[name] = frozen_chains(est.series(name))
            own = series_warnings(res, reps.lengths, frozen=frozen[name], known_mean=mu)
            entry.update(known_mean=mu, warnings=[*overall, *own], **ensembles[0].about.get(ds, {}))
            result["observables"][name] = entry
    for name, spec in derived.items():
        missing = [i for i in spec.inputs if i not in result["observables"]]
        if missing:
            warnings.append(f"derived {name!r} skipped: missing inputs {missing}")
            continue
        mus = [result["observables"][i]["known_mean"] for i in spec.inputs]
        try:
            res, entry = est.estimate(spec.func, list(spec.inputs), mus)
        except Exception as exc:  # noqa: BLE001 (a user's function may raise anything: one warning line)
            warnings.append(f"derived {name!r} skipped: {type(exc).__name__}: {exc}")
            continue
        own = series_warnings(res, reps.lengths, frozen=max(frozen[i] for i in spec.inputs))
        entry.update(known_mean=None, warnings=[*overall, *own], inputs=list(spec.inputs))
        entry["description"] = spec.description
        result["derived"][name] = entry
    return warnings


def _acceptance_and_ess(result: dict, ensembles: list[_Ensemble], reps: _Replicas, S: float) -> None:
    """Acceptance (Gamma method over every chain of every file) and the flow proposals' pooled ESS."""
    if all(e.accepted is not None for e in ensembles):
        acc = [ensembles[f].accepted[idx] for f, idx in reps.index]
        try:
            result["acceptance"] = gamma_method(acc, S=S).as_dict()
        except ValueError:
            pass
    if all(e.proposal_log_w is not None and e.proposal_log_w.size for e in ensembles):
        try:
            result["ess"] = _ess(np.concatenate([e.proposal_log_w for e in ensembles]))
        except ValueError:
            pass


def header_lines(result: Mapping) -> list[str]:
    """Table lines for the files combined, the error method and the reweighting (empty when none apply).

    Parameters
    ----------
    result : mapping
        Output of :func:`analyze_ensembles`.

    Returns
    -------
    list of str
        ``files: A.h5 (400 rows, 4 chains), B.h5 (...)`` when several files were combined;
        ``errors: jackknife (bins of ... )`` for a resampling method; ``reweighted to ...: ESS ...``.
    """
    out = []
    files = result.get("files") or []
    if len(files) > 1:
        parts = [f"{f['path']} ({f.get('n_committed', '?')} rows, {f.get('n_chains', '?')} chain(s))" for f in files]
        out.append("files (replicas of one analysis): " + ", ".join(parts))
    method = result.get("error_method", "gamma")
    if method != "gamma":
        b = result.get("bin_size")
        bins = f"bin size {b}" if b else "bin size ceil(20 tau_int) per observable (at least 20 bins)"
        if method == "bootstrap":
            bins += f", {result.get('n_boot')} resamples, seed {result.get('seed')}"
        out.append(f"errors: {method} ({bins}); tau_int and W are the Gamma method's")
    rw = result.get("reweighting")
    if rw:
        khat = "" if rw.get("pareto_khat") is None else f", Pareto k-hat {rw['pareto_khat']:.2f}"
        out.append(
            f"reweighted to {rw['by']}: <O w>/<w> over {rw['n']} rows, reweighting ESS {rw['ess']:.1f} "
            f"(fraction {rw['ess_fraction']:.3g}){khat}"
        )
    return out
